"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before any
``@triton.jit`` function is defined, i.e. before ``sdepth_ext`` is first imported; hence this runs at
collection time, ahead of every test module.
"""

import contextlib
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# Property tests (hypothesis). "ci", the default: a bounded number of examples, the same ones every run
# (derandomize, no example database), no deadline (2 shared cores make timings meaningless). "deep"
# (SDEPTH_HYPOTHESIS_PROFILE=deep, what `make test-deep` sets): many more examples, new ones each run, the
# reproduction blob printed on failure. A machine without hypothesis (a GPU box with only torch) skips the
# property tests instead of failing the whole suite at collection.
HYPOTHESIS_PROFILE_ENV = "SDEPTH_HYPOTHESIS_PROFILE"
try:
    import hypothesis
except ImportError:
    hypothesis = None
else:
    _QUIET = [hypothesis.HealthCheck.too_slow]
    hypothesis.settings.register_profile("ci", max_examples=40, derandomize=True, database=None,
                                         deadline=None, suppress_health_check=_QUIET)
    hypothesis.settings.register_profile("deep", max_examples=1000, derandomize=False, database=None,
                                         deadline=None, print_blob=True, suppress_health_check=_QUIET)
    _profile = os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci")
    if _profile not in ("ci", "deep"):
        raise ValueError(f"{HYPOTHESIS_PROFILE_ENV} must be 'ci' or 'deep', got {_profile!r}")
    hypothesis.settings.load_profile(_profile)


def property_examples(share: float):
    """``hypothesis.settings`` running ``share`` of the profile's examples (at least 5): what an expensive
    property (a model step, a collective, per example) uses, so that the deep profile deepens it too."""
    return hypothesis.settings(max_examples=max(5, int(hypothesis.settings.default.max_examples * share)))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: test needs a CUDA GPU (auto-skipped without one)")


def pytest_collection_modifyitems(config, items):
    # triton 3.0's interpreter patches triton.language for the rest of the process once it has run a kernel
    # (later versions undo it), after which compiling a kernel for a GPU fails at its first operator: the
    # compile-only tests run before any test that runs a kernel under the interpreter.
    items.sort(key=lambda item: item.path.name != "test_kernels_compile.py")
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside, the previous count restored after: results stay bit-stable on a loaded
    2-core machine (a convolution or reduction sums in another order with more threads), and thousands of
    tiny forwards do not pay for threading they cannot use. Also a decorator (``@single_thread()``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """:func:`single_thread` around a test; a module takes it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@pytest.fixture
def fresh_dynamo():
    """One thread (timing is irrelevant to the compile tests; 2 loaded cores), empty Dynamo caches and
    counters before the test, so that the graphs and breaks it counts are its own, and empty caches after
    it, so that no compiled code outlives it. A module takes it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    from torch._dynamo.utils import counters  # imported here: most test modules never load Dynamo

    with single_thread():
        torch._dynamo.reset()
        counters.clear()
        yield
        torch._dynamo.reset()


@pytest.fixture
def restore_rng_state():
    """Tests that seed or consume torch's default RNG leave it as they found it."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if HAS_CUDA else None
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


def package_root() -> str:
    """The folder holding the sdepth_ext this session imports: installed, or built in place (make
    test-oldest), wherever the cwd."""
    import sdepth_ext as sd

    return str(pathlib.Path(sd.__file__).resolve().parent.parent)


def child_env(**variables: str) -> dict[str, str]:
    """``os.environ`` for a child Python that must import the same sdepth_ext: :func:`package_root` first on
    ``PYTHONPATH``, and ``variables`` set."""
    pythonpath = os.pathsep.join(filter(None, [package_root(), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **variables, "PYTHONPATH": pythonpath}


def seed_where(predicate, survival, mode, batch_size, limit=10_000):
    """The smallest seed whose first plan (what ``convert(..., seed=s)`` draws at its first training forward)
    satisfies ``predicate(plan)``: tests that need "some unit dropped, another kept" say so, instead of
    relying on a seed that happened to do it under one version of the gate stream."""
    import sdepth_ext as sd

    for seed in range(limit):
        if predicate(sd.Scheduler(survival, mode=mode, seed=seed).draw(0, batch_size)):
            return seed
    raise AssertionError(f"no seed below {limit} gives a first plan with the wanted property")


def drops_some_keeps_some(plan):
    """Some unit is dropped for every sample, and another runs (for some samples in row mode)."""
    return 0 in plan.counts and any(plan.counts) and (
        plan.mode == "batch" or any(0 < c < plan.batch_size for c in plan.counts))
