# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Each creates .venv (if missing), installs the requirements (an unpinned torch: the registry's CUDA
# build, which also runs on a CPU and with which torchvision imports), builds sdepth_ext._C, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BUILT  := $(VENV)/.sdepth-built
BENCH_ARGS ?=

.PHONY: test bench build lint venv clean

venv: $(VENV)/.requirements
$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --progress-bar off -r requirements.txt
	touch $@

build: $(BUILT)
$(BUILT): $(VENV)/.requirements setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import sdepth_ext as sd; assert sd.has_compiled_scheduler(), 'sdepth_ext._C did not build'"
	touch $@

test: build
	$(PY) -m pytest -q -ra

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info sdepth_ext/*.so $(BUILT)
