# Fused stochastic-depth epilogue: out = relu(shortcut + scale * residual), optionally on a subset of rows.
#
# Design trade-off. The epilogue is purely memory-bound (2 FLOPs per element). Eager PyTorch runs it as
# mul -> add -> relu: 3 kernels moving the tensor 7 times forward (read residual, write scaled; read scaled,
# read shortcut, write sum; read sum, write out) = 28 B/elem fp32, and 2 kernels moving it 5 times backward
# (threshold_backward reads grad + out, writes; mul reads, writes) = 20 B/elem. One fused forward pass reads
# shortcut + residual and writes out once: 12 B/elem fp32, 6 B/elem bf16. One fused backward pass reads grad +
# the saved output and writes both gradients: 16 B/elem fp32, 8 B/elem bf16. Forward + backward: 7 moves
# instead of 12, 2 launches instead of 5. We save the *output* (not both inputs) for backward:
# relu'(x) = [out > 0] is all the mask we need, and the next layer keeps out alive anyway.
#
# Row mode (per-sample stochastic depth): the residual branch ran on the K surviving samples only, so the
# residual has K rows and `rows[k]` says where row k goes. Instead of `out = relu(sc); out[rows] = ...` (a
# full extra read+write of the survivors plus an index kernel), a single launch covers all N output rows; a
# tiny inverse map `slot[n] = k or -1` (N int32, built by the launcher on the device) tells each output row
# whether it has a residual row. Survivors and dropped samples are each written exactly once, and a dropped
# sample never reads any residual memory (so a NaN/Inf in unrelated memory cannot leak into it).
#
# Layering: PyTorch reference (in sdepth_ext.functional) -> @triton.jit kernels -> launchers (here) ->
# custom ops / autograd.Function -> gated_residual_relu (sdepth_ext.functional).
#
# Numerics: fp16/bf16 are cast to fp32 before any arithmetic (also required for correctness under
# TRITON_INTERPRET=1), fp64 computes in fp64 (gradcheck). relu is `where(x < 0, 0, x)` so NaN propagates as
# in torch.relu; the backward mask is `where(out <= 0, 0, grad)`, exactly torch's threshold_backward (a NaN
# output passes its gradient through, as torch does).
#
# No `from __future__ import annotations` in this file: it turns the kernels' `tl.constexpr` annotations into
# strings, which Triton 3.0's interpreter does not recognise (the BLOCK argument then reaches tl.arange as a
# plain value and fails).

import contextlib
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import kernel_strides, same_strides

__all__ = ["gated_residual_relu_forward", "gated_residual_relu_backward", "is_interpreted"]

# Each program handles BLOCK elements of one sample: 8 KiB per operand (2048 fp32, 4096 fp16/bf16, 1024 fp64).
# With num_warps=4 (128 threads) that is 64 B per thread per operand = four 16-byte vector loads in flight,
# and up to 16 resident programs per SM: far above the ~25 KB per SM needed to saturate H100 HBM3
# (3.35 TB/s x ~1 us latency / 132 SMs), while keeping the tail waste small: every ResNet-50 / CIFAR ResNet
# feature map (M = 802816 ... 4096 elements per sample) is a multiple of 2048. No autotuning: one config is
# enough for a streaming kernel, and several autotune configs failed under the interpreter.
_BYTES_PER_PROGRAM = 8192
_MIN_BLOCK = 128  # one element per thread: tiny samples (M = 1) still get a sane block
_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_relu_forward_kernel(
    OUT,  # [n_rows, M] output, same layout as SHORTCUT
    SHORTCUT,  # [n_rows, M]
    RESIDUAL,  # [n_rows, M], or [K, M] in row mode
    SLOT,  # [n_rows] int32: residual row of each output row, -1 = none (row mode only)
    scale_hi,  # fp32 scale
    scale_lo,  # scale - fp32(scale): fp64 inputs use hi + lo (Triton passes a Python float as fp32)
    M,  # elements per row
    blocks_per_row,
    HAS_ROWS: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A program owns one block of one row: row/col come from scalar math (no per-element division), and all
    # addresses are int64 because N * M can exceed 2**31.
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    col_block = pid - row * blocks_per_row
    cols = col_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    offs = row.to(tl.int64) * M + cols

    x = tl.load(SHORTCUT + offs, mask=mask, other=0.0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if HAS_ROWS:
        slot = tl.load(SLOT + row)
        # Dropped rows (slot < 0) load nothing: the masked load issues no memory access and yields 0, and
        # scale * 0 == 0 for any finite scale, so out = relu(shortcut) exactly, NaN-free.
        res_offs = tl.maximum(slot, 0).to(tl.int64) * M + cols
        r = tl.load(RESIDUAL + res_offs, mask=mask & (slot >= 0), other=0.0)
    else:
        r = tl.load(RESIDUAL + offs, mask=mask, other=0.0)
    r = r.to(x.dtype)
    if IS_FP64:
        x = x + (scale_hi * r + scale_lo * r)  # the fp32 scalars promote exactly to fp64
    else:
        x = x + scale_hi * r
    y = tl.where(x < 0, 0.0, x)  # not maximum(x, 0): NaN must stay NaN, as in torch.relu
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_relu_backward_kernel(
    GRAD_SHORTCUT,  # [n_rows, M] output
    GRAD_RESIDUAL,  # [n_rows, M] output, or [K, M] in row mode
    GRAD,  # [n_rows, M] incoming gradient, same layout as OUT
    OUT,  # [n_rows, M] saved forward output
    SLOT,  # [n_rows] int32, row mode only
    scale_hi,
    scale_lo,
    M,
    blocks_per_row,
    HAS_ROWS: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    col_block = pid - row * blocks_per_row
    cols = col_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    offs = row.to(tl.int64) * M + cols

    g = tl.load(GRAD + offs, mask=mask, other=0.0)
    o = tl.load(OUT + offs, mask=mask, other=0.0)
    if IS_FP64:
        g = g.to(tl.float64)
        o = o.to(tl.float64)
    else:
        g = g.to(tl.float32)
        o = o.to(tl.float32)
    # torch's threshold_backward(grad, out, 0): `out <= 0 ? 0 : grad` (a NaN output lets grad through).
    gs = tl.where(o <= 0, 0.0, g)
    tl.store(GRAD_SHORTCUT + offs, gs.to(GRAD_SHORTCUT.dtype.element_ty), mask=mask)
    if IS_FP64:
        gr = scale_hi * gs + scale_lo * gs
    else:
        gr = scale_hi * gs
    if HAS_ROWS:
        # Only survivors own a residual-gradient row; every slot 0..K-1 appears exactly once, so each row of
        # GRAD_RESIDUAL is written once and dropped rows store nothing.
        slot = tl.load(SLOT + row)
        res_offs = tl.maximum(slot, 0).to(tl.int64) * M + cols
        tl.store(GRAD_RESIDUAL + res_offs, gr.to(GRAD_RESIDUAL.dtype.element_ty), mask=mask & (slot >= 0))
    else:
        tl.store(GRAD_RESIDUAL + offs, gr.to(GRAD_RESIDUAL.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
# Fixed when the kernels are defined: triton.jit reads TRITON_INTERPRET then.
_INTERPRETED = type(_gated_residual_relu_forward_kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """True when the kernels of this module were defined under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    return _INTERPRETED


def _check_launchable(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "sdepth_ext: backend='triton' got CPU tensors, but the Triton kernels were not built for the "
            "interpreter. Set the environment variable TRITON_INTERPRET=1 before the first Triton call (it "
            "is read when the kernels are defined), or use backend='torch' / backend=None on CPU."
        )


def _launch_config(M: int, element_size: int) -> tuple[int, int]:
    block = min(_BYTES_PER_PROGRAM // element_size, triton.next_power_of_2(M))
    return max(block, _MIN_BLOCK), _NUM_WARPS


@functools.lru_cache(maxsize=1024)  # a network uses a few dozen distinct scales (one p_l per block)
def _split_scale(scale: float) -> tuple[float, float]:
    # Triton passes a Python float as fp32. fp32/fp16/bf16 kernels use fp32(scale), as eager torch does (its
    # opmath for those dtypes is fp32); fp64 kernels rebuild ~48 mantissa bits from hi + lo.
    hi = float(torch.tensor(scale, dtype=torch.float32))
    lo = float(torch.tensor(scale - hi, dtype=torch.float32))
    return hi, lo


def _in_layout(t: torch.Tensor, shape, strides) -> torch.Tensor:
    """``t`` itself if it already has ``strides`` (size-1 dims ignored), else a copy with those strides."""
    if same_strides(shape, t.stride(), strides):
        return t
    return torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _row_strides(ref: torch.Tensor, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape and strides of an ``n``-row tensor laid out like the samples of ``ref`` (row mode)."""
    shape = (n, *ref.shape[1:])
    sample = math.prod(ref.shape[1:])
    return shape, (sample, *ref.stride()[1:])


def _inverse_map(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``slot[rows[k]] = k``, ``-1`` elsewhere: N int32 on the device, built by tiny kernels, no host sync."""
    slot = torch.full((n,), -1, dtype=torch.int32, device=rows.device)
    slot.scatter_(0, rows, torch.arange(rows.shape[0], dtype=torch.int32, device=rows.device))
    return slot


def _check_buffer(buf: torch.Tensor, name: str, shape, strides, like: torch.Tensor) -> None:
    if tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, {like.dtype} on {like.device}, got "
                         f"{tuple(buf.shape)}, {buf.dtype} on {buf.device}")
    if not same_strides(shape, buf.stride(), strides):
        raise ValueError(f"{name}: expected strides {tuple(strides)}, got {tuple(buf.stride())}")


def _geometry(t: torch.Tensor, row_mode: bool) -> tuple[int, int]:
    """(n_rows, M) of the flat [n_rows, M] view the kernels use. Without rows the whole tensor is one row:
    a flat streaming kernel with no row structure at all."""
    if not row_mode:
        return 1, t.numel()
    return t.shape[0], t.numel() // t.shape[0]


def _device_guard(t: torch.Tensor):
    # Launch on the tensors' GPU, not the current one (multi-GPU processes).
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def gated_residual_relu_forward(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                                rows: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None
                                ) -> torch.Tensor:
    """``relu(shortcut + scale * residual)``; with ``rows``, residual row k goes to output row ``rows[k]``
    and the other rows get ``relu(shortcut)``. One launch over the whole output.

    Inputs are trusted (validated by :func:`sdepth_ext.gated_residual_relu`); only metadata is checked here.
    Shortcut and residual are used in place when they share a dense layout (contiguous, channels_last, ...;
    in row mode with the batch dim outermost); otherwise they are copied to one. ``out`` (internal, for tests
    that poison the buffer) must have the layout the launcher would allocate: ``torch.empty_like(shortcut)``
    for a usable ``shortcut``, contiguous otherwise.
    """
    row_mode = rows is not None
    _check_launchable(shortcut)
    strides = kernel_strides(shortcut, row_mode)
    sc = shortcut if strides is not None else shortcut.contiguous()
    if row_mode:
        if residual.shape[0] != rows.shape[0]:
            raise ValueError(f"residual: expected {rows.shape[0]} rows (len(rows)), got {residual.shape[0]}")
        res_shape, res_strides = _row_strides(sc, residual.shape[0])
    else:
        res_shape, res_strides = tuple(sc.shape), tuple(sc.stride())
    if tuple(residual.shape) != tuple(res_shape):
        raise ValueError(f"residual: expected shape {tuple(res_shape)}, got {tuple(residual.shape)}")
    res = _in_layout(residual, res_shape, res_strides)
    if out is None:
        out = torch.empty_strided(sc.shape, sc.stride(), dtype=sc.dtype, device=sc.device)
    else:
        _check_buffer(out, "out", sc.shape, sc.stride(), sc)
    if sc.numel() == 0:
        return out

    n_rows, M = _geometry(sc, row_mode)
    slot = _inverse_map(rows, n_rows) if row_mode else sc  # unused pointer without rows
    if res.numel() == 0:
        res = sc  # no survivors: every slot is -1, the residual pointer is never dereferenced
    block, num_warps = _launch_config(M, sc.element_size())
    blocks_per_row = triton.cdiv(M, block)
    scale_hi, scale_lo = _split_scale(scale)
    with _device_guard(sc):
        _gated_residual_relu_forward_kernel[(n_rows * blocks_per_row,)](
            out, sc, res, slot, scale_hi, scale_lo, M, blocks_per_row,
            HAS_ROWS=row_mode, IS_FP64=sc.dtype == torch.float64, BLOCK=block, num_warps=num_warps,
        )
    return out


def gated_residual_relu_backward(grad: torch.Tensor, out: torch.Tensor, scale: float,
                                 rows: Optional[torch.Tensor] = None, *,
                                 grad_shortcut: Optional[torch.Tensor] = None,
                                 grad_residual: Optional[torch.Tensor] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``grad_shortcut = grad * [out > 0]`` (torch's threshold_backward) and
    ``grad_residual[k] = scale * grad_shortcut[rows[k]]`` (all rows without ``rows``).

    ``out`` is the forward output (normally already in a kernel layout); ``grad`` is brought to its layout if
    needed. ``grad_shortcut`` / ``grad_residual`` (internal, for tests) are preallocated outputs.
    """
    row_mode = rows is not None
    _check_launchable(out)
    if tuple(grad.shape) != tuple(out.shape):
        raise ValueError(f"grad: expected shape {tuple(out.shape)}, got {tuple(grad.shape)}")
    o = out if kernel_strides(out, row_mode) is not None else out.contiguous()
    g = _in_layout(grad, o.shape, o.stride())
    num_res = rows.shape[0] if row_mode else o.shape[0]
    res_shape, res_strides = _row_strides(o, num_res) if row_mode else (tuple(o.shape), tuple(o.stride()))
    if grad_shortcut is None:
        grad_shortcut = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
    else:
        _check_buffer(grad_shortcut, "grad_shortcut", o.shape, o.stride(), o)
    if grad_residual is None:
        grad_residual = torch.empty_strided(res_shape, res_strides, dtype=o.dtype, device=o.device)
    else:
        _check_buffer(grad_residual, "grad_residual", res_shape, res_strides, o)
    if o.numel() == 0:
        return grad_shortcut, grad_residual

    n_rows, M = _geometry(o, row_mode)
    slot = _inverse_map(rows, n_rows) if row_mode else o
    gr = grad_residual if grad_residual.numel() > 0 else grad_shortcut  # K = 0: never stored to
    block, num_warps = _launch_config(M, o.element_size())
    blocks_per_row = triton.cdiv(M, block)
    scale_hi, scale_lo = _split_scale(scale)
    with _device_guard(o):
        _gated_residual_relu_backward_kernel[(n_rows * blocks_per_row,)](
            grad_shortcut, gr, g, o, slot, scale_hi, scale_lo, M, blocks_per_row,
            HAS_ROWS=row_mode, IS_FP64=o.dtype == torch.float64, BLOCK=block, num_warps=num_warps,
        )
    return grad_shortcut, grad_residual
