"""Triton kernels of sdepth_ext, and the triton-free rules about which memory they can address.

Nothing here imports triton: the kernel module (:mod:`sdepth_ext.kernels.epilogue`) is imported on the first
Triton call through :func:`load_epilogue`. Two reasons: the package must import (and run its torch path)
where triton is missing, and ``@triton.jit`` reads ``TRITON_INTERPRET`` when the kernel is *defined*, so
deferring the import lets a user (or a conftest) set ``TRITON_INTERPRET=1`` any time before the first kernel
call.

The layout helpers are shared by the launchers and by the fake (meta) implementations of the registered ops,
so that the strides of a real output and of its fake always agree (``torch.library.opcheck`` checks this).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

import torch

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_RELU",
    "contiguous_strides",
    "is_dense",
    "kernel_strides",
    "load_epilogue",
    "output_strides",
    "same_strides",
    "triton_available",
]

# What may follow the epilogue's add: nothing, or a ReLU fused into the kernels (ResNet blocks).
ACTIVATION_RELU = "relu"
ACTIVATIONS = (None, ACTIVATION_RELU)


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (says nothing about a GPU being present)."""
    return importlib.util.find_spec("triton") is not None


def load_epilogue():
    """Import and return :mod:`sdepth_ext.kernels.epilogue`, with a clear error when triton is missing."""
    if not triton_available():
        raise RuntimeError(
            "sdepth_ext: backend='triton' needs the `triton` package, which is not installed; "
            "install triton or use backend='torch' (or backend=None, which picks torch on CPU)."
        )
    return importlib.import_module(".epilogue", __name__)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides = []
    acc = 1
    for size in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(size, 1)  # as torch does: a size-0 dim does not zero the outer strides
    return tuple(reversed(strides))


def is_dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when a tensor of ``shape``/``strides`` covers one gap-free, non-overlapping block of memory.

    Dims of size 1 are ignored (their stride is meaningless); the others, sorted by stride, must pack exactly.
    """
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_strides(shape: Sequence[int], a: Sequence[int], b: Sequence[int]) -> bool:
    """True when strides ``a`` and ``b`` order the elements of ``shape`` identically (size-1 dims ignored)."""
    return all(sa == sb for sz, sa, sb in zip(shape, a, b) if sz != 1)


def kernel_strides(t: torch.Tensor, row_mode: bool) -> tuple[int, ...] | None:
    """The strides of ``t`` if the epilogue kernels can read it in place, else ``None`` (a copy is needed).

    The kernels see a tensor as flat storage. Without rows any dense, non-overlapping layout works
    (contiguous, channels_last, ...), as long as all operands share it. In row mode each sample must in
    addition be one contiguous chunk of ``M = numel / N`` elements (batch dim outermost), so sample n
    starts at ``base + n * M``.
    """
    shape, strides = tuple(t.shape), tuple(t.stride())
    if not is_dense(shape, strides):
        return None
    if row_mode and len(shape) > 0 and shape[0] > 1:
        sample = 1
        for size in shape[1:]:
            sample *= size
        if strides[0] != sample:
            return None
    return strides


def output_strides(shortcut: torch.Tensor, row_mode: bool) -> tuple[int, ...]:
    """Strides of the epilogue's output for ``shortcut``: its own when usable in place, else contiguous."""
    strides = kernel_strides(shortcut, row_mode)
    return strides if strides is not None else contiguous_strides(shortcut.shape)
