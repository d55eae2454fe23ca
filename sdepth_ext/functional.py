"""The stochastic-depth epilogue ``relu(shortcut + scale * residual)``, eager reference and fused kernels.

Layers, from the math down:

1. :func:`gated_residual_relu_reference` -- plain PyTorch; the ``backend="torch"`` path and the test oracle.
   Autograd differentiates it; torch.compile/inductor fuses it on its own.
2. Triton kernels and launchers in :mod:`sdepth_ext.kernels.epilogue` (one pass forward, one pass backward,
   row-mode scatter/gather fused in).
3. Two opaque ``torch.library.custom_op`` s, ``sdepth_ext::gated_residual_relu`` and
   ``sdepth_ext::gated_residual_relu_backward``, with fake (meta) kernels that reproduce the real output
   strides, and ``register_autograd`` on the forward op. Dynamo/AOTAutograd/inductor treat them as single
   nodes, so ``torch.compile(fullgraph=True)`` never traces into Triton (nor into the interpreter on CPU). An
   opaque custom_op was chosen over ``triton_op`` + ``wrap_triton`` because only the former passes
   ``opcheck`` and compiles under ``TRITON_INTERPRET=1``, which is how CI (no GPU) tests the kernels.
4. :class:`GatedResidualReLUFunction` -- the user-facing autograd.Function; its forward and backward call the
   two custom ops. Its backward is ``once_differentiable``: double backward raises a clear error (so does the
   backward op, which has no autograd formula).
5. :func:`gated_residual_relu` -- validates, picks the backend, dispatches.

The fused path saves only the output for backward (``out > 0`` is relu's derivative), never both inputs.
"""

import math
import numbers
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .kernels import load_epilogue, output_strides, triton_available

__all__ = ["GatedResidualReLUFunction", "gated_residual_relu", "gated_residual_relu_reference"]

BACKENDS = (None, "triton", "torch")


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------
def gated_residual_relu_reference(shortcut: torch.Tensor, residual: torch.Tensor, scale: float = 1.0,
                                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(shortcut + scale * residual)``; with ``rows``, only those samples get their residual.

    Written with differentiable out-of-place ops so autograd gives the reference gradients: dropped samples
    get ``relu(shortcut)`` and never touch the residual; ``index_put`` routes the survivors' gradients (and,
    unlike ``index_copy``, keeps a channels_last layout).
    """
    if rows is None:
        return torch.relu(shortcut + scale * residual)
    out = torch.relu(shortcut)
    kept = torch.relu(shortcut.index_select(0, rows) + scale * residual)
    return torch.index_put(out, (rows,), kept)


def _gated_residual_relu_torch(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                               rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``backend="torch"`` path: the reference's exact arithmetic in fewer memory passes.

    On the CPU the fused kernels do not run, and in row mode the reference's ``relu(sc)`` + gather + add +
    relu + ``index_put`` (a clone of the whole output) cost ~6 passes over the tensor forward and as many
    backward -- as much as a 16-channel 3x3 convolution of a CIFAR ResNet. ``index_add`` adds the survivors'
    residual in place of a copy of the shortcut and one ``relu`` follows: 2 full passes forward, 1 backward.
    Bit-identical to the reference: the same ``scale * residual`` product and the same single addition
    (``alpha`` is not used, as ``add(.., alpha=)`` may fuse the multiply-add and round once instead of twice).
    """
    scaled = residual if scale == 1.0 else scale * residual
    # The in-place relu_ acts on a fresh tensor (the sum, the clone): no extra allocation and pass, and
    # autograd saves the output for ReluBackward, as it would for an out-of-place relu.
    if rows is None:
        return (shortcut + scaled).relu_()
    # clone + in-place index_add_ rather than out-of-place index_add, which returns a contiguous tensor for
    # an empty ``rows`` and would turn a channels_last batch into NCHW.
    return shortcut.clone(memory_format=torch.preserve_format).index_add_(0, rows, scaled).relu_()


# --------------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("sdepth_ext::gated_residual_relu", mutates_args=())
def _gated_residual_relu_op(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                            rows: Optional[torch.Tensor]) -> torch.Tensor:
    return load_epilogue().gated_residual_relu_forward(shortcut, residual, scale, rows)


@_gated_residual_relu_op.register_fake
def _(shortcut, residual, scale, rows):
    # Same layout rule as the launcher (kernels.output_strides): channels_last in -> channels_last out.
    return shortcut.new_empty_strided(shortcut.shape, output_strides(shortcut, rows is not None))


@torch.library.custom_op("sdepth_ext::gated_residual_relu_backward", mutates_args=())
def _gated_residual_relu_backward_op(grad: torch.Tensor, out: torch.Tensor, scale: float,
                                     rows: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return load_epilogue().gated_residual_relu_backward(grad, out, scale, rows)


@_gated_residual_relu_backward_op.register_fake
def _(grad, out, scale, rows):
    row_mode = rows is not None
    strides = output_strides(out, row_mode)
    grad_shortcut = out.new_empty_strided(out.shape, strides)
    if not row_mode:
        return grad_shortcut, out.new_empty_strided(out.shape, strides)
    sample = math.prod(out.shape[1:])
    return grad_shortcut, out.new_empty_strided((rows.shape[0], *out.shape[1:]), (sample, *strides[1:]))


def _setup_context(ctx, inputs, output):
    _, _, scale, rows = inputs
    ctx.save_for_backward(output, rows)  # the output, not the inputs: relu' = [out > 0]
    ctx.scale = scale


def _backward(ctx, grad):
    out, rows = ctx.saved_tensors
    grad_shortcut, grad_residual = _gated_residual_relu_backward_op(grad, out, ctx.scale, rows)
    return grad_shortcut, grad_residual, None, None


# The backward op gets no autograd formula: differentiating it raises "no autograd formula was registered".
_gated_residual_relu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------------
class GatedResidualReLUFunction(torch.autograd.Function):
    """Fused ``relu(shortcut + scale * residual)`` (optionally row-scattered) with a one-pass backward.

    ``apply(shortcut, residual, scale, rows)``; no input validation (:func:`gated_residual_relu` does it).
    """

    @staticmethod
    def forward(ctx, shortcut, residual, scale, rows):
        out = _gated_residual_relu_op(shortcut, residual, scale, rows)
        ctx.save_for_backward(out, rows)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, rows = ctx.saved_tensors
        grad_shortcut, grad_residual = _gated_residual_relu_backward_op(grad, out, ctx.scale, rows)
        return grad_shortcut, grad_residual, None, None


# --------------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------------
def _is_compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    if fn is not None:
        return fn()
    return torch._dynamo.is_compiling()  # torch < 2.3 fallback (not reached on torch >= 2.4)


def _check_rows_values(rows: torch.Tensor, n: int) -> None:
    """Sorted, unique, in [0, n): one combined reduction and one host sync; details only on failure."""
    if rows.numel() == 0:
        return
    bad = (rows[0] < 0) | (rows[-1] >= n)  # enough for range once sortedness holds
    if rows.numel() > 1:
        bad = bad | (rows[1:] <= rows[:-1]).any()
    if not bool(bad):
        return
    diffs = rows[1:] - rows[:-1]
    if bool((diffs == 0).any()):
        raise ValueError("rows: contains duplicate indices; expected strictly ascending sample indices")
    if bool((diffs < 0).any()):
        raise ValueError("rows: not sorted; expected strictly ascending sample indices")
    raise ValueError(f"rows: indices out of range [0, {n}) (min {int(rows.min())}, max {int(rows.max())})")


def _check_inputs(shortcut, residual, scale, rows, trusted_rows: bool) -> float:
    if not isinstance(shortcut, torch.Tensor):
        raise TypeError(f"shortcut: expected a torch.Tensor, got {type(shortcut).__name__}")
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor, got {type(residual).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    if not shortcut.is_floating_point():
        raise TypeError(f"shortcut: expected a floating-point tensor, got {shortcut.dtype}")
    if residual.dtype != shortcut.dtype:
        raise TypeError(f"residual: dtype {residual.dtype} does not match shortcut dtype {shortcut.dtype}")
    if residual.device != shortcut.device:
        raise ValueError(f"residual: on device {residual.device}, but shortcut is on device "
                         f"{shortcut.device}")
    if shortcut.dim() == 0:
        raise ValueError("shortcut: expected at least 1 dimension (the batch), got a 0-d tensor")
    if residual.dim() != shortcut.dim() or residual.shape[1:] != shortcut.shape[1:]:
        raise ValueError(f"residual: shape {tuple(residual.shape)} does not match shortcut shape "
                         f"{tuple(shortcut.shape)} beyond the batch dimension")
    if rows is None:
        if residual.shape[0] != shortcut.shape[0]:
            raise ValueError(f"residual: batch size {residual.shape[0]} != shortcut batch size "
                             f"{shortcut.shape[0]} (pass rows=... if the residual covers only some samples)")
        return scale
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows: expected a 1-D int64 tensor or None, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows: expected dtype torch.int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows: expected a 1-D tensor, got {rows.dim()}-D")
    if rows.device != shortcut.device:
        raise ValueError(f"rows: on device {rows.device}, but shortcut is on device {shortcut.device}")
    if residual.shape[0] != rows.shape[0]:
        raise ValueError(f"residual: has {residual.shape[0]} rows but len(rows) = {rows.shape[0]}")
    # Data-dependent checks need the values (one device sync on GPU). Skipped for trusted callers (the
    # library's own blocks, whose rows come from the Scheduler) and under torch.compile (a sync would break
    # the graph); both must then pass sorted, unique, in-range rows.
    if not trusted_rows and not _is_compiling():
        _check_rows_values(rows, shortcut.shape[0])
    return scale


def _resolve_backend(backend, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of None, 'triton', 'torch', got {backend!r}")
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def gated_residual_relu(shortcut: torch.Tensor, residual: torch.Tensor, scale: float = 1.0,
                        rows: Optional[torch.Tensor] = None, backend: Optional[str] = None, *,
                        _trusted_rows: bool = False) -> torch.Tensor:
    """``relu(shortcut + scale * residual)``, the epilogue of a (stochastic-depth) residual block.

    Args:
        shortcut: ``[N, ...]`` identity (or projection-shortcut) output, floating point.
        residual: residual-branch output: ``[N, ...]``, or ``[len(rows), ...]`` when ``rows`` is given.
        scale: Python float; the paper's test-time ``p_l``, the inverted ``1 / p_l``, or 1. Must be finite.
        rows: optional 1-D int64 tensor on the same device, strictly ascending sample indices in ``[0, N)``:
            ``out[rows[k]] = relu(shortcut[rows[k]] + scale * residual[k])``, every other sample gets
            ``relu(shortcut)`` (it never reads a residual, so cannot become NaN through one).
        backend: ``None`` (Triton for CUDA tensors when triton is installed, torch otherwise), ``"triton"``
            (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.
        _trusted_rows: internal fast path: skip the value checks of ``rows`` (sorted / unique / in range),
            which cost one device->host sync on GPU. The library's blocks set it for Scheduler-made rows.

    Returns a new tensor with shortcut's layout (contiguous, channels_last, ...) when shortcut and residual
    are dense; other inputs are copied to a contiguous layout first on the Triton path.
    """
    scale = _check_inputs(shortcut, residual, scale, rows, _trusted_rows)
    if _resolve_backend(backend, shortcut.device) == "torch":
        return _gated_residual_relu_torch(shortcut, residual, scale, rows)
    return GatedResidualReLUFunction.apply(shortcut, residual, scale, rows)
