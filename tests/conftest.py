"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before any
``@triton.jit`` function is defined, i.e. before ``sdepth_ext`` is first imported; hence this runs at
collection time, ahead of every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: test needs a CUDA GPU (auto-skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_rng_state():
    """Tests that seed or consume torch's default RNG leave it as they found it."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if HAS_CUDA else None
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
