# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Each creates .venv (if missing), installs the requirements (an unpinned torch: the registry's CUDA
# build, which also runs on a CPU and with which torchvision imports), builds sdepth_ext._C, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BUILT  := $(VENV)/.sdepth-built
BENCH_ARGS ?=

.PHONY: test test-deep test-oldest bench build lint venv clean gpu-session

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

# The property tests (hypothesis, marked automatically) with the "deep" profile of tests/conftest.py: many
# more examples than `make test`'s bounded, fixed ones, and new ones every run.
test-deep: build
	SDEPTH_HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q -ra -m hypothesis

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The same suite on the oldest supported torch / torchvision / triton (requirements-oldest.txt), in its own
# venv and on its own copy of the sources: an extension built against one torch does not load in another.
OLD_VENV := .venv-oldest
OLD_SRC  := build/oldest
test-oldest:
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet --progress-bar off -r requirements-oldest.txt
	rm -rf $(OLD_SRC) && mkdir -p $(OLD_SRC)
	cp -r setup.py pyproject.toml Makefile README.md csrc sdepth_ext tests benchmarks docs $(OLD_SRC)/
	find $(OLD_SRC) \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	cd $(OLD_SRC) && $(abspath $(OLD_VENV))/bin/python setup.py --quiet build_ext --inplace
	cd $(OLD_SRC) && $(abspath $(OLD_VENV))/bin/python -m pytest -q -ra -p no:cacheprovider

# A GPU machine without network that already has torch, torchvision and triton (no venv, no downloads): the
# whole suite and `make bench` in one go, their logs beside the results in benchmarks/results/<device>/, and,
# with OUT=dir, those files packed into dir/results-<device>.tar.gz to carry back and commit.
SYS_PY ?= python3
gpu-session: SHELL := /bin/bash
gpu-session:
	$(SYS_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(SYS_PY) -c "import sdepth_ext as sd; assert sd.has_compiled_scheduler(), 'sdepth_ext._C did not build'"
	set -o pipefail; slug=$$($(SYS_PY) -c "from sdepth_ext.environment import best_device, device_slug; \
	print(device_slug(best_device()))"); dir=benchmarks/results/$$slug; mkdir -p $$dir; \
	PYTHONUNBUFFERED=1 $(SYS_PY) -m pytest -q -ra 2>&1 | tee $$dir/pytest.log; tests=$$?; \
	PYTHONUNBUFFERED=1 $(SYS_PY) -m benchmarks.run $(BENCH_ARGS) 2>&1 | tee $$dir/bench-stdout.log; bench=$$?; \
	if [ -n "$(OUT)" ]; then tar czf $(OUT)/results-$$slug.tar.gz $$dir; fi; \
	test $$tests -eq 0 && test $$bench -eq 0

lint: venv
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf build *.egg-info sdepth_ext/*.so $(BUILT)
