# Fused residual epilogue: out = act(shortcut + scale * residual), act = ReLU or nothing, optionally with the
# residual given for a subset of rows only (row-mode stochastic depth).
#
# Design trade-off. The epilogue is purely memory-bound (2 FLOPs per element). Eager PyTorch runs the ReLU
# variant as mul -> add -> relu: 3 kernels moving the tensor 7 times forward (read residual, write scaled;
# read scaled, read shortcut, write sum; read sum, write out) = 28 B/elem fp32, and 2 kernels moving it 5
# times backward (threshold_backward reads grad + out, writes; mul reads, writes) = 20 B/elem. One fused
# forward pass reads shortcut + residual and writes out once: 12 B/elem fp32, 6 B/elem bf16. One fused
# backward pass reads grad + the saved output and writes both gradients: 16 B/elem fp32, 8 B/elem bf16. We
# save the *output* (not both inputs) for backward: relu'(x) = [out > 0] is all the mask we need, and the next
# layer keeps out alive anyway. Without an activation (ConvNeXt, Swin, ViT: nothing follows the add) nothing
# is saved at all: grad_shortcut *is* the incoming gradient (no kernel, no copy), and the backward kernel only
# writes grad_residual = scale * grad (gathered to the surviving rows in row mode). The activation is a
# constexpr flag of one kernel pair, not a second file: the two variants differ in three lines.
#
# Packed ReLU mask (PACKED_MASK, row mode's units). "The next layer keeps out alive anyway" fails in row mode:
# the next unit's branch keeps only its survivors' rows, so keeping the whole output for the mask would cost
# a full activation per unit, where a dropped unit in batch mode costs nothing. The forward then also writes
# the mask as bits (BLOCK / 8 bytes per program, 1/32 of an fp32 output, 1/16 of bf16), and the backward
# reads the bits instead of the output. Both kernels then see a block as [BLOCK / 8, 8] (the same addresses)
# so that a group of 8 packs into one byte by a sum over the short axis, without a reshape; the other
# variants keep their flat [BLOCK] block.
#
# Row mode: the residual branch ran on the K surviving samples only, so the residual has K rows. Instead of
# `out = relu(sc); out[rows] = ...` (a full extra read+write of the survivors plus an index kernel), a single
# launch covers all N output rows; an inverse map `slot[n] = k or -1` (N int32) tells each output row whether
# it has a residual row. The scheduler writes that map into the plan's packed index buffer (one host-to-device
# copy per step, no index kernels); for user-given `rows` the launcher builds it once in forward and backward
# reuses it. Survivors and dropped samples are each written exactly once, and a dropped sample never reads any
# residual memory (so a NaN/Inf in unrelated memory cannot leak into it).
#
# Host cost. On a fast GPU a CIFAR-sized epilogue is a few microseconds of HBM time, comparable to the Python
# above its launch, so the launchers do O(1) work per call: the layout analysis (density, strides, copies
# needed, grid, block size) is computed once per (shape, strides, dtype, device) and cached; a call then does
# a dict lookup, allocates its outputs and launches.
#
# Layering: PyTorch reference (sdepth_ext.functional) -> @triton.jit kernels -> launchers (here) ->
# autograd.Function (eager) / custom ops (torch.compile) -> gated_residual_add (sdepth_ext.functional).
#
# Numerics: fp16/bf16 are cast to fp32 before any arithmetic (also required for correctness under
# TRITON_INTERPRET=1), fp64 computes in fp64 (gradcheck). relu is `where(x < 0, 0, x)` so NaN propagates as
# in torch.relu; the backward mask is `where(out <= 0, 0, grad)`, exactly torch's threshold_backward (a NaN
# output passes its gradient through, as torch does).
#
# No `from __future__ import annotations` in this file: it turns the kernels' `tl.constexpr` annotations into
# strings, which Triton 3.0's interpreter does not recognise (the BLOCK argument then reaches tl.arange as a
# plain value and fails).

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import contiguous_strides, kernel_strides, same_strides

__all__ = ["gated_residual_add_forward", "gated_residual_add_backward", "inverse_map", "is_interpreted"]

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
def _gated_residual_add_forward_kernel(
    OUT,  # [n_rows, M] output, same layout as SHORTCUT
    SHORTCUT,  # [n_rows, M]
    RESIDUAL,  # [n_rows, M], or [K, M] in row mode
    SLOT,  # [n_rows] int32: residual row of each output row, -1 = none (row mode only)
    MASK,  # [programs * BLOCK // 8] uint8 output: the ReLU's mask, one bit per element (PACKED_MASK only)
    scale_hi,  # fp32 scale
    scale_lo,  # scale - fp32(scale): fp64 inputs use hi + lo (Triton passes a Python float as fp32)
    M,  # elements per row
    blocks_per_row,
    HAS_ROWS: tl.constexpr,
    IS_FP64: tl.constexpr,
    RELU: tl.constexpr,
    PACKED_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A program owns one block of one row: row/col come from scalar math (no per-element division), and all
    # addresses are int64 because N * M can exceed 2**31.
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    col_block = pid - row * blocks_per_row
    if PACKED_MASK:
        # The block as [BLOCK // 8, 8], the same addresses: a group of 8 packs into one byte of the mask.
        # (Inline, not a helper @triton.jit function: the compile-only tests rebuild each kernel from its
        # source, which under the interpreter cannot reference another interpreted function.)
        groups = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        cols = col_block.to(tl.int64) * BLOCK + groups
    else:
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
        # scale * 0 == 0 for any finite scale, so out = act(shortcut) exactly, NaN-free.
        res_offs = tl.maximum(slot, 0).to(tl.int64) * M + cols
        r = tl.load(RESIDUAL + res_offs, mask=mask & (slot >= 0), other=0.0)
    else:
        r = tl.load(RESIDUAL + offs, mask=mask, other=0.0)
    r = r.to(x.dtype)
    if IS_FP64:
        x = x + (scale_hi * r + scale_lo * r)  # the fp32 scalars promote exactly to fp64
    else:
        x = x + scale_hi * r
    if RELU:
        x = tl.where(x < 0, 0.0, x)  # not maximum(x, 0): NaN must stay NaN, as in torch.relu
    out = x.to(OUT.dtype.element_ty)
    tl.store(OUT + offs, out, mask=mask)
    if PACKED_MASK:
        # Bit j of byte g: element 8g + j of the block passes its gradient, threshold_backward's
        # `out <= 0 ? 0 : grad` on the stored output (a value that rounds to 0 in fp16 is blocked, a NaN
        # passes). The tail past M loads 0: bit clear.
        # Three halvings of the group, each OR-ing the odd half onto the even one: builtins only (a tl.sum
        # is itself a @triton.jit function, which cannot be compiled ahead of time once the interpreter has
        # defined it, and the compile-only tests run under the interpreter).
        bits = tl.where(out <= 0, 0, 1)
        even, odd = tl.split(tl.reshape(bits, (BLOCK // 8, 4, 2)))
        pairs = even | (odd << 1)  # [G, 4]: elements 2i, 2i + 1
        even, odd = tl.split(tl.reshape(pairs, (BLOCK // 8, 2, 2)))
        quads = even | (odd << 2)  # [G, 2]: elements 4i .. 4i + 3
        low, high = tl.split(quads)
        packed = low | (high << 4)
        tl.store(MASK + pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8), packed.to(tl.uint8))


@triton.jit
def _gated_residual_add_backward_kernel(
    GRAD_SHORTCUT,  # [n_rows, M] output (RELU only; without an activation grad_shortcut is GRAD itself)
    GRAD_RESIDUAL,  # [n_rows, M] output, or [K, M] in row mode
    GRAD,  # [n_rows, M] incoming gradient, same layout as OUT
    OUT,  # [n_rows, M] saved forward output (RELU), or with PACKED_MASK the forward's MASK
    SLOT,  # [n_rows] int32, row mode only
    scale_hi,
    scale_lo,
    M,
    blocks_per_row,
    HAS_ROWS: tl.constexpr,
    IS_FP64: tl.constexpr,
    RELU: tl.constexpr,
    PACKED_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    col_block = pid - row * blocks_per_row
    if PACKED_MASK:
        # The block as [BLOCK // 8, 8], the same addresses: a group of 8 packs into one byte of the mask.
        # (Inline, not a helper @triton.jit function: the compile-only tests rebuild each kernel from its
        # source, which under the interpreter cannot reference another interpreted function.)
        groups = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        cols = col_block.to(tl.int64) * BLOCK + groups
    else:
        cols = col_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    offs = row.to(tl.int64) * M + cols
    if HAS_ROWS:
        slot = tl.load(SLOT + row)
        store_mask = mask & (slot >= 0)
        # Without an activation a dropped row has nothing to do: its loads are masked off too.
        load_mask = mask if RELU else store_mask
    else:
        load_mask = mask

    g = tl.load(GRAD + offs, mask=load_mask, other=0.0)
    if IS_FP64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
    if RELU:
        if PACKED_MASK:
            # The forward's bits, laid out by program: the same grid and BLOCK (same shape, layout, dtype).
            packed = tl.load(OUT + pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)).to(tl.int32)
            passes = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1
            g = tl.where(passes == 0, 0.0, g)
        else:
            o = tl.load(OUT + offs, mask=mask, other=0.0)
            # torch's threshold_backward(grad, out, 0): `out <= 0 ? 0 : grad` (a NaN output passes grad).
            g = tl.where(o.to(g.dtype) <= 0, 0.0, g)
        tl.store(GRAD_SHORTCUT + offs, g.to(GRAD_SHORTCUT.dtype.element_ty), mask=mask)
    if IS_FP64:
        gr = scale_hi * g + scale_lo * g
    else:
        gr = scale_hi * g
    if HAS_ROWS:
        # Only survivors own a residual-gradient row; every slot 0..K-1 appears exactly once, so each row of
        # GRAD_RESIDUAL is written once and dropped rows store nothing.
        res_offs = tl.maximum(slot, 0).to(tl.int64) * M + cols
        tl.store(GRAD_RESIDUAL + res_offs, gr.to(GRAD_RESIDUAL.dtype.element_ty), mask=store_mask)
    else:
        tl.store(GRAD_RESIDUAL + offs, gr.to(GRAD_RESIDUAL.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
# Fixed when the kernels are defined: triton.jit reads TRITON_INTERPRET then.
_INTERPRETED = type(_gated_residual_add_forward_kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """True when the kernels of this module were defined under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    return _INTERPRETED


def _check_launchable(device: torch.device) -> None:
    if device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "sdepth_ext: backend='triton' got CPU tensors, but the Triton kernels were not built for the "
            "interpreter. Set the environment variable TRITON_INTERPRET=1 before the first Triton call (it "
            "is read when the kernels are defined), or use backend='torch' / backend=None on CPU."
        )


def _launch_config(M: int, element_size: int) -> tuple[int, int]:
    block = min(_BYTES_PER_PROGRAM // element_size, triton.next_power_of_2(M))
    return max(block, _MIN_BLOCK), _NUM_WARPS


@functools.lru_cache(maxsize=1024)  # a network uses a few dozen distinct scales (one p_l per unit)
def _split_scale(scale: float) -> tuple[float, float]:
    # Triton passes a Python float as fp32. fp32/fp16/bf16 kernels use fp32(scale), as eager torch does (its
    # opmath for those dtypes is fp32); fp64 kernels rebuild ~48 mantissa bits from hi + lo.
    hi = float(torch.tensor(scale, dtype=torch.float32))
    lo = float(torch.tensor(scale - hi, dtype=torch.float32))
    return hi, lo


def inverse_map(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``slot[rows[k]] = k``, ``-1`` elsewhere: N int32 on the rows' device, no host sync.

    Three tiny kernels; the library's own units never call it (the scheduler ships the map in the plan).
    """
    slot = torch.full((n,), -1, dtype=torch.int32, device=rows.device)
    slot.scatter_(0, rows, torch.arange(rows.shape[0], dtype=torch.int32, device=rows.device))
    return slot


def _check_buffer(buf: torch.Tensor, name: str, shape, strides, like: torch.Tensor) -> None:
    if tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, {like.dtype} on {like.device}, got "
                         f"{tuple(buf.shape)}, {buf.dtype} on {buf.device}")
    if not same_strides(shape, buf.stride(), strides):
        raise ValueError(f"{name}: expected strides {tuple(strides)}, got {tuple(buf.stride())}")


def _launch(geo: "_Geometry", device: torch.device, *args) -> None:
    # Triton launches on the current GPU; a tensor on another one (a process that drives several GPUs) needs
    # a switch. Only there: the query and the guard each cost host time, on every call.
    if geo.check_device and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            geo.launch(*args, **geo.options)
    else:
        geo.launch(*args, **geo.options)


class _Geometry(NamedTuple):
    """Everything about a launch that follows from shapes, strides and dtype: computed once, then cached."""

    out_shape: tuple  # the output (forward) / grad_shortcut (backward) allocation
    out_strides: tuple
    copy_main: bool  # the shortcut (forward) / saved output (backward) must be copied to out_strides
    copy_second: bool  # the residual (forward) / incoming gradient (backward) must be copied
    res_shape: tuple  # residual (forward input) / grad_residual (backward output)
    res_strides: tuple
    grid: tuple  # (programs,); (0,) = nothing to launch (an empty tensor)
    M: int
    blocks_per_row: int
    options: dict  # the constexprs and num_warps of the launch, built once
    launch: Callable  # ``kernel[grid]``: Triton's launcher for this grid, built once
    check_device: bool  # CUDA with more than one visible GPU: the launch may need a device switch
    mask_bytes: int  # size of the packed ReLU mask of this launch: BLOCK / 8 bytes per program
    kernel: object  # the @triton.jit function launched (what a launch counter tells apart)


def _row_layout(ref_shape, ref_strides, n: int) -> tuple[tuple, tuple]:
    """Shape and strides of an ``n``-row tensor laid out like the samples of a ``ref`` tensor (row mode)."""
    sample = math.prod(ref_shape[1:])
    return (n, *ref_shape[1:]), (sample, *ref_strides[1:])


def _geometry(kernel, main: torch.Tensor, num_residual_rows: int, row_mode: bool, relu: bool,
              packed_mask: bool = False) -> _Geometry:
    """Layout analysis of one launch (the slow part, hence cached by the callers).

    ``main`` (the shortcut, or the saved output / incoming gradient in backward) fixes the layout: its own
    strides when the kernels can read it in place (any dense layout; in row mode each sample one contiguous
    chunk), else contiguous. The residual-sized operand gets the same per-sample layout. ``copy_second`` is
    left False for the caller to decide.
    """
    _check_launchable(main.device)
    shape = tuple(main.shape)
    strides = kernel_strides(main, row_mode)
    copy_main = strides is None
    if copy_main:
        strides = contiguous_strides(shape)
    if row_mode:
        res_shape, res_strides = _row_layout(shape, strides, num_residual_rows)
        n_rows, M = shape[0], math.prod(shape[1:])
    else:
        res_shape, res_strides = shape, strides
        n_rows, M = 1, math.prod(shape)  # the whole tensor is one row: a flat streaming kernel
    block, num_warps = _launch_config(max(M, 1), main.element_size())
    blocks_per_row = triton.cdiv(M, block)
    grid = n_rows * blocks_per_row if math.prod(shape) > 0 else 0
    options = {"HAS_ROWS": row_mode, "IS_FP64": main.dtype == torch.float64, "RELU": relu,
               "PACKED_MASK": packed_mask, "BLOCK": block, "num_warps": num_warps}
    check_device = main.is_cuda and torch.cuda.device_count() > 1
    return _Geometry(shape, strides, copy_main, False, res_shape, res_strides, (grid,), M, blocks_per_row,
                     options, kernel[(grid,)], check_device, grid * block // 8, kernel)


_FORWARD_GEOMETRY: dict = {}
_BACKWARD_GEOMETRY: dict = {}
_MAX_CACHED = 4096  # row mode caches one entry per distinct survivor count: bounded by the batch sizes seen


def _cached(cache: dict, key, make) -> _Geometry:
    geometry = cache.get(key)
    if geometry is None:
        geometry = make()
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        cache[key] = geometry
    return geometry


def _empty(shape, strides, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)


def _copy_to(t: torch.Tensor, shape, strides) -> torch.Tensor:
    return _empty(shape, strides, t).copy_(t)


def gated_residual_add_forward(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                               rows: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None, *,
                               relu: bool, packed_mask: bool = False, out: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``act(shortcut + scale * residual)``, ``act`` = ReLU if ``relu``; one launch over the whole output.

    With ``rows`` (row mode), residual row k goes to output row ``rows[k]`` and the other rows get
    ``act(shortcut)``; ``slot`` is the inverse map (:func:`inverse_map`), built here when not given. With
    ``relu`` and ``packed_mask`` the same launch also writes the ReLU's mask, one bit per element (uint8), for
    a backward that does not keep the output (:func:`gated_residual_add_backward`'s ``mask``). Returns
    ``(out, slot, mask)``: backward reuses the map, and ``mask`` is None unless asked for.

    Inputs are trusted (validated by :func:`sdepth_ext.gated_residual_add`). Shortcut and residual are used in
    place when they share a dense layout (contiguous, channels_last, [B, H, W, C], ...; in row mode with the
    batch dim outermost); otherwise they are copied to one. ``out`` (internal, for tests that poison the
    buffer) must have the layout the launcher would allocate: ``torch.empty_like(shortcut)`` for a usable
    ``shortcut``, contiguous otherwise.
    """
    row_mode = rows is not None
    packed_mask = packed_mask and relu
    key = (shortcut.shape, shortcut.stride(), residual.shape, residual.stride(), shortcut.dtype,
           shortcut.device, row_mode, relu, packed_mask)
    geo = _FORWARD_GEOMETRY.get(key)
    if geo is None:
        geo = _cached(_FORWARD_GEOMETRY, key,
                      lambda: _forward_geometry(shortcut, residual, rows, relu, packed_mask))
    sc = _copy_to(shortcut, geo.out_shape, geo.out_strides) if geo.copy_main else shortcut
    res = _copy_to(residual, geo.res_shape, geo.res_strides) if geo.copy_second else residual
    if out is None:
        # empty_like keeps a dense tensor's strides (preserve_format), and costs half of empty_strided
        out = torch.empty_like(sc)
    else:
        _check_buffer(out, "out", geo.out_shape, geo.out_strides, sc)
    mask = torch.empty(geo.mask_bytes, dtype=torch.uint8, device=sc.device) if packed_mask else None
    if row_mode and slot is None:
        slot = inverse_map(rows, geo.out_shape[0])
    if geo.grid[0] == 0:
        return out, slot, mask
    if row_mode and geo.res_shape[0] == 0:
        res = sc  # no survivors: every slot is -1, the residual pointer is never dereferenced
    scale_hi, scale_lo = _split_scale(scale)
    _launch(geo, sc.device, out, sc, res, slot if row_mode else sc, mask if packed_mask else sc,
            scale_hi, scale_lo, geo.M, geo.blocks_per_row)
    return out, slot, mask


def _forward_geometry(shortcut, residual, rows, relu, packed_mask) -> _Geometry:
    row_mode = rows is not None
    k = rows.shape[0] if row_mode else shortcut.shape[0]
    if row_mode and residual.shape[0] != k:
        raise ValueError(f"residual: expected {k} rows (len(rows)), got {residual.shape[0]}")
    geo = _geometry(_gated_residual_add_forward_kernel, shortcut, k, row_mode, relu, packed_mask)
    if tuple(residual.shape) != geo.res_shape:
        raise ValueError(f"residual: expected shape {geo.res_shape}, got {tuple(residual.shape)}")
    return geo._replace(copy_second=not same_strides(geo.res_shape, residual.stride(), geo.res_strides))


def gated_residual_add_backward(grad: torch.Tensor, out: Optional[torch.Tensor], scale: float,
                                slot: Optional[torch.Tensor] = None, num_rows: Optional[int] = None, *,
                                relu: bool, mask: Optional[torch.Tensor] = None,
                                out_strides: Optional[tuple] = None,
                                grad_shortcut: Optional[torch.Tensor] = None,
                                grad_residual: Optional[torch.Tensor] = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``grad_shortcut = grad * act'(out)``, ``grad_residual[k] = scale * grad_shortcut[rows[k]]``.

    With ``relu`` the mask is torch's threshold_backward on the saved forward output ``out``, or, with
    ``mask`` (the forward's packed mask; ``out`` then None), its bits: ``out_strides`` are then the forward
    output's strides, which the bits follow (``grad`` is read in that layout, copied to it if needed).
    Without an activation ``out`` is not needed (None) and ``grad_shortcut`` is ``grad`` itself. Row mode:
    ``slot`` is the forward's inverse map and ``num_rows`` = K. ``grad_shortcut`` / ``grad_residual``
    (internal, for tests) are preallocated outputs.
    """
    row_mode = slot is not None
    packed_mask = mask is not None
    if packed_mask:
        if out_strides is None or len(out_strides) != grad.dim():
            raise ValueError(f"out_strides: expected the forward output's {grad.dim()} strides with mask, "
                             f"got {out_strides!r}")
        if not same_strides(grad.shape, grad.stride(), out_strides):
            grad = _copy_to(grad, grad.shape, out_strides)  # the layout the forward wrote, bit by bit
    main = out if relu and not packed_mask else grad
    key = (main.shape, main.stride(), grad.shape, grad.stride(), main.dtype, main.device, row_mode, num_rows,
           relu, packed_mask)
    geo = _BACKWARD_GEOMETRY.get(key)
    if geo is None:
        geo = _cached(_BACKWARD_GEOMETRY, key,
                      lambda: _backward_geometry(grad, main, num_rows, row_mode, relu, packed_mask))
    if packed_mask:
        if mask.numel() != geo.mask_bytes:
            raise ValueError(f"mask: expected {geo.mask_bytes} bytes (the forward's packed mask for this "
                             f"shape and layout), got {mask.numel()}")
        g, o = grad, mask  # grad is in the output's layout already
    elif relu:
        o = _copy_to(out, geo.out_shape, geo.out_strides) if geo.copy_main else out
        g = _copy_to(grad, geo.out_shape, geo.out_strides) if geo.copy_second else grad
    else:
        g = _copy_to(grad, geo.out_shape, geo.out_strides) if geo.copy_main else grad
        grad_shortcut = grad  # d(shortcut + s r)/d shortcut = 1: the incoming gradient, no copy
        if not row_mode and scale == 1.0 and grad_residual is None:
            return grad_shortcut, grad
    if relu:
        if grad_shortcut is None:
            grad_shortcut = torch.empty_like(g if packed_mask else o)
        else:
            _check_buffer(grad_shortcut, "grad_shortcut", geo.out_shape, geo.out_strides, g)
    if grad_residual is None:
        grad_residual = _empty(geo.res_shape, geo.res_strides, g) if row_mode else torch.empty_like(g)
    else:
        _check_buffer(grad_residual, "grad_residual", geo.res_shape, geo.res_strides, g)
    if geo.grid[0] == 0:
        return grad_shortcut, grad_residual
    gr = grad_residual if not row_mode or geo.res_shape[0] > 0 else g  # K = 0: never stored to
    scale_hi, scale_lo = _split_scale(scale)
    _launch(geo, g.device,
            grad_shortcut if relu else g, gr, g, o if relu else g, slot if row_mode else g,
            scale_hi, scale_lo, geo.M, geo.blocks_per_row)
    return grad_shortcut, grad_residual


def _backward_geometry(grad, main, num_rows, row_mode, relu, packed_mask) -> _Geometry:
    if tuple(grad.shape) != tuple(main.shape):
        raise ValueError(f"grad: expected shape {tuple(main.shape)}, got {tuple(grad.shape)}")
    k = num_rows if row_mode else main.shape[0]
    if row_mode and (num_rows is None or not 0 <= num_rows <= main.shape[0]):
        raise ValueError(f"num_rows: expected an int in [0, {main.shape[0]}] with slot, got {num_rows!r}")
    # With relu the saved output fixes the layout and grad follows it; without, or with the packed mask (grad
    # is then already in the output's layout), grad is the main operand.
    geo = _geometry(_gated_residual_add_backward_kernel, main, k, row_mode, relu, packed_mask)
    if not relu or packed_mask:
        return geo
    return geo._replace(copy_second=not same_strides(geo.out_shape, grad.stride(), geo.out_strides))
