"""The epilogue ``act(shortcut + scale * residual)`` of a stochastic-depth residual unit: reference, fused.

``act`` is ReLU (ResNet blocks) or nothing (ConvNeXt, MBConv, Swin, ViT units). Layers, from the math down:

1. :func:`gated_residual_add_reference` -- plain PyTorch; the test oracle. The ``backend="torch"`` path,
   the same arithmetic in fewer memory passes, is :mod:`sdepth_ext.kernels.torch_epilogue`. Autograd
   differentiates both; torch.compile/inductor fuses them on its own.
2. Triton kernels and launchers in :mod:`sdepth_ext.kernels.epilogue` (one pass forward, one pass backward,
   row-mode scatter/gather fused in, layout analysis cached per shape), and
   :class:`~sdepth_ext.kernels.torch_epilogue.TorchEpilogue`, the same two launchers' interface in PyTorch
   ops (what the units run on a CPU in row mode).
3. :class:`GatedResidualAddFunction` -- the eager hot path: its forward and backward call the launchers
   directly, one Python layer above the launch (on a fast GPU every layer shows in the step time: see
   ``benchmarks/bench_host.py``).
4. Two opaque ``torch.library.custom_op`` s, ``sdepth_ext::gated_residual_add`` and
   ``sdepth_ext::gated_residual_relu_backward``, with fake (meta) kernels that reproduce the real output
   strides and ``register_autograd``: used only while ``torch.compiler.is_compiling()``. Dynamo, AOTAutograd
   and inductor treat them as single nodes, so ``torch.compile(fullgraph=True)`` never traces into Triton (nor
   into the interpreter on CPU). An opaque custom_op was chosen over ``triton_op`` + ``wrap_triton`` because
   only the former passes ``opcheck`` and compiles under ``TRITON_INTERPRET=1``, which is how CI (no GPU)
   tests the kernels.
5. :func:`gated_residual_add` / :func:`gated_residual_relu` -- validate (O(1) checks, plus the values of
   user-given ``rows``), pick the backend, dispatch. :func:`fused_epilogue` is the library's own entry: the
   units' inputs are right by construction and their plan already carries the row map, so it skips the checks.

With ReLU the fused path saves only the output for backward (``out > 0`` is relu's derivative), never both
inputs, and in row mode not even that: the mask's bits (1/32 of an fp32 output); without an activation it
saves nothing, and ``grad_shortcut`` is the incoming gradient itself.
"""

import contextlib
import math
import numbers
from typing import Optional

import torch

from .kernels import ACTIVATION_RELU, ACTIVATIONS, load_epilogue, output_strides, triton_available
from .kernels.torch_epilogue import TorchEpilogue, gated_residual_add_torch, gather_rows

__all__ = ["ACTIVATIONS", "GatedResidualAddFunction", "TorchEpilogue", "epilogue_kernels", "fused_epilogue",
           "gated_residual_add", "gated_residual_add_reference", "gated_residual_relu", "gather_rows",
           "gated_residual_relu_reference", "gpu_path_on_cpu", "is_compiling", "keeps_output"]

# --------------------------------------------------------------------------------------------------
# PyTorch reference and the torch path
# --------------------------------------------------------------------------------------------------
def gated_residual_add_reference(shortcut: torch.Tensor, residual: torch.Tensor, scale: float = 1.0,
                                 rows: Optional[torch.Tensor] = None, activation: Optional[str] = None
                                 ) -> torch.Tensor:
    """``act(shortcut + scale * residual)``; with ``rows``, only those samples get their residual.

    Written with differentiable out-of-place ops so autograd gives the reference gradients: dropped samples
    get ``act(shortcut)`` and never touch the residual; ``index_put`` routes the survivors' gradients (and,
    unlike ``index_copy``, keeps a channels_last layout).
    """
    act = torch.relu if activation == ACTIVATION_RELU else (lambda t: t)
    if rows is None:
        return act(shortcut + scale * residual)
    out = act(shortcut)
    kept = act(shortcut.index_select(0, rows) + scale * residual)
    return torch.index_put(out, (rows,), kept)


def gated_residual_relu_reference(shortcut, residual, scale=1.0, rows=None):
    """:func:`gated_residual_add_reference` with ``activation="relu"``."""
    return gated_residual_add_reference(shortcut, residual, scale, rows, ACTIVATION_RELU)


# --------------------------------------------------------------------------------------------------
# autograd.Function: the eager path, one layer above the launchers
# --------------------------------------------------------------------------------------------------
_epilogue = None


def _kernels():
    global _epilogue
    if _epilogue is None:
        _epilogue = load_epilogue()
    return _epilogue


class GatedResidualAddFunction(torch.autograd.Function):
    """Fused ``act(shortcut + scale * residual)`` (optionally row-scattered) with a one-pass backward.

    ``apply(shortcut, residual, scale, rows, slot, relu, kernels)``: ``kernels`` are the launchers that run
    it, the Triton ones (:mod:`sdepth_ext.kernels.epilogue`) or :class:`TorchEpilogue`; ``slot`` is the row
    map of ``rows`` (:func:`sdepth_ext.kernels.epilogue.inverse_map`) or None to build it. No input
    validation (:func:`gated_residual_add` does it). Saves the output (ReLU; on the Triton path in row mode
    the ReLU mask's bits instead) and the row map, nothing else.
    The Triton backward is not differentiable; with ``create_graph=True`` (a gradient penalty through a
    converted model, whose units pick the backend themselves) the backward runs as torch ops instead
    (:func:`_differentiable_backward`), which autograd differentiates again.
    """

    @staticmethod
    def forward(ctx, shortcut, residual, scale, rows, slot, relu, kernels):
        out_strides = None
        if relu and rows is not None and kernels is not TorchEpilogue:
            # Row mode: the ReLU's mask as bits, not the output. The next unit keeps only its survivors' rows
            # of this output (sdepth_ext.rows), so keeping the whole output for the mask alone would cost a
            # full activation per unit, and a dropped unit in batch mode costs none. (In batch mode the next
            # layer keeps the output anyway: there the output is the free mask.)
            out, slot, mask = kernels.gated_residual_add_forward(shortcut, residual, scale, rows, slot,
                                                                 relu=True, packed_mask=True)
            ctx.save_for_backward(mask, slot)
            out_strides = out.stride()
        else:
            out, slot, _ = kernels.gated_residual_add_forward(shortcut, residual, scale, rows, slot,
                                                              relu=relu)
            if relu:
                ctx.save_for_backward(out, slot)
            elif slot is not None:
                ctx.save_for_backward(slot)
        ctx.args = (scale, relu, None if rows is None else residual.shape[0], kernels, out_strides)
        return out

    @staticmethod
    def backward(ctx, grad):
        scale, relu, num_rows, kernels, out_strides = ctx.args
        saved = ctx.saved_tensors
        # autograd runs backward in grad mode only for create_graph=True
        twice = torch.is_grad_enabled() and kernels is not TorchEpilogue
        if out_strides is not None:
            mask, slot = saved
            if twice:
                out = _relu_mask_from_bits(kernels, mask, slot, num_rows, grad, out_strides)
                grads = _differentiable_backward(grad, out, scale, slot, num_rows, relu=True)
            else:
                grads = kernels.gated_residual_add_backward(grad, None, scale, slot, num_rows, relu=True,
                                                            mask=mask, out_strides=out_strides)
            return *grads, None, None, None, None, None
        if relu:
            out, slot = saved
        else:
            out, slot = None, (saved[0] if saved else None)
        backward = _differentiable_backward if twice else kernels.gated_residual_add_backward
        return *backward(grad, out, scale, slot, num_rows, relu=relu), None, None, None, None, None


def _relu_mask_from_bits(kernels, mask: torch.Tensor, slot: torch.Tensor, num_rows: int, grad: torch.Tensor,
                         out_strides: tuple) -> torch.Tensor:
    """The forward's ReLU mask, kept as bits (row mode), as a tensor laid out like the forward's output: 1
    where the ReLU passed its input, 0 elsewhere. The backward kernel writes it from a gradient of ones, so
    the bits are read exactly as the first-order backward reads them."""
    ones = torch.empty_strided(grad.shape, out_strides, dtype=grad.dtype, device=grad.device).fill_(1)
    with torch.no_grad():
        passed, _ = kernels.gated_residual_add_backward(ones, None, 1.0, slot, num_rows, relu=True, mask=mask,
                                                        out_strides=out_strides)
    return passed


def _differentiable_backward(grad: torch.Tensor, out: Optional[torch.Tensor], scale: float,
                             slot: Optional[torch.Tensor], num_rows: Optional[int], *, relu: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path's backward as the torch path's ops (:class:`TorchEpilogue`), for ``create_graph=True``:
    the torch path's values, which autograd differentiates again (the ReLU's mask and the row map are
    constants). ``out``: the forward's output, or any tensor positive exactly where it is (the mask);
    ``slot``: the forward's row map (``slot[rows[k]] = k``, -1 elsewhere), from which the rows come back
    without a device sync: a stable argsort puts the N - K absent samples (-1) first, then the rows in
    order."""
    rows = None if slot is None else slot.argsort(stable=True)[slot.shape[0] - num_rows:]
    return TorchEpilogue.gated_residual_add_backward(grad, out, scale, rows, num_rows, relu=relu)


def keeps_output(grad_fn) -> bool:
    """True when ``grad_fn`` (a tensor's autograd node) saved that tensor, its output, for backward: a ReLU
    (ReluBackward0 keeps its result) or a ReLU epilogue of :class:`GatedResidualAddFunction` that kept its
    output (not its mask's bits)."""
    if isinstance(grad_fn, GatedResidualAddFunction._backward_cls):
        return grad_fn.args[1] and grad_fn.args[4] is None
    return type(grad_fn).__name__ == "ReluBackward0"


# --------------------------------------------------------------------------------------------------
# Registered ops: what torch.compile sees (opaque nodes with fake kernels)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("sdepth_ext::gated_residual_add", mutates_args=())
def _gated_residual_add_op(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                           rows: Optional[torch.Tensor], slot: Optional[torch.Tensor], relu: bool
                           ) -> torch.Tensor:
    return _kernels().gated_residual_add_forward(shortcut, residual, scale, rows, slot, relu=relu)[0]


@_gated_residual_add_op.register_fake
def _(shortcut, residual, scale, rows, slot, relu):
    # Same layout rule as the launcher (kernels.output_strides): channels_last in -> channels_last out.
    return shortcut.new_empty_strided(shortcut.shape, output_strides(shortcut, rows is not None))


@torch.library.custom_op("sdepth_ext::gated_residual_relu_backward", mutates_args=())
def _gated_residual_relu_backward_op(grad: torch.Tensor, out: torch.Tensor, scale: float,
                                     rows: Optional[torch.Tensor], slot: Optional[torch.Tensor]
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if rows is not None and slot is None:
        slot = _kernels().inverse_map(rows, out.shape[0])
    num_rows = None if rows is None else rows.shape[0]
    grad_shortcut, grad_residual = _kernels().gated_residual_add_backward(
        grad, out, scale, slot, num_rows, relu=True)
    return grad_shortcut, grad_residual


@_gated_residual_relu_backward_op.register_fake
def _(grad, out, scale, rows, slot):
    row_mode = rows is not None
    strides = output_strides(out, row_mode)
    grad_shortcut = out.new_empty_strided(out.shape, strides)
    if not row_mode:
        return grad_shortcut, out.new_empty_strided(out.shape, strides)
    sample = math.prod(out.shape[1:])
    return grad_shortcut, out.new_empty_strided((rows.shape[0], *out.shape[1:]), (sample, *strides[1:]))


def _setup_context(ctx, inputs, output):
    _, _, scale, rows, slot, relu = inputs
    ctx.save_for_backward(output if relu else None, rows, slot)  # relu' = [out > 0]: the output, not inputs
    ctx.scale = scale
    ctx.relu = relu


def _backward(ctx, grad):
    out, rows, slot = ctx.saved_tensors
    if ctx.relu:
        grad_shortcut, grad_residual = _gated_residual_relu_backward_op(grad, out, ctx.scale, rows, slot)
    else:
        # Without an activation the backward is a scale (and a gather of the survivors): the torch ops' one
        # formula, plain ops that the compiler fuses into its neighbours; grad_shortcut is the incoming grad.
        grad_shortcut, grad_residual = TorchEpilogue.gated_residual_add_backward(grad, None, ctx.scale, rows,
                                                                                 relu=False)
    return grad_shortcut, grad_residual, None, None, None, None


# The backward op gets no autograd formula: differentiating it raises "no autograd formula was registered".
_gated_residual_add_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------------
# torch.compiler.is_compiling (torch >= 2.3) bound once: dynamo recognises the function itself, and a
# per-call attribute lookup on the torch.compiler module would cost host time on every eager call.
is_compiling = torch.compiler.is_compiling


# Looked up once at import: importlib's find_spec cannot be traced by dynamo (torch 2.4 refuses it inside
# compile(fullgraph=True)), and whether triton is installed does not change while the process runs.
_TRITON_INSTALLED = triton_available()


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def fused_epilogue(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                   rows: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None,
                   relu: bool = False) -> torch.Tensor:
    """The library's units' epilogue: no checks (inputs right by construction), backend by device.

    ``rows`` must be sorted, unique and in range and ``slot`` its row map (from a :class:`~sdepth_ext.Plan`),
    or None to build it. Triton for CUDA tensors when triton is installed (and for CPU tensors inside
    :func:`gpu_path_on_cpu`), the torch ops otherwise: :class:`TorchEpilogue` through the same Function in row
    mode, plain autograd ops without rows (their backward is already one pass and saves only the output).
    """
    if shortcut.is_cuda and _triton_installed() or _GPU_PATH_ON_CPU:
        if is_compiling():
            return _gated_residual_add_op(shortcut, residual, scale, rows, slot, relu)
        return GatedResidualAddFunction.apply(shortcut, residual, scale, rows, slot, relu, _kernels())
    if rows is None or is_compiling():
        return gated_residual_add_torch(shortcut, residual, scale, rows, relu)
    return GatedResidualAddFunction.apply(shortcut, residual, scale, rows, slot, relu, TorchEpilogue)


def epilogue_kernels(t: torch.Tensor):
    """The launchers the units use for tensors like ``t``: Triton's (a CUDA tensor with triton installed, or
    any tensor inside :func:`gpu_path_on_cpu`), else :class:`TorchEpilogue`."""
    return _kernels() if t.is_cuda and _triton_installed() or _GPU_PATH_ON_CPU else TorchEpilogue


_GPU_PATH_ON_CPU = False


@contextlib.contextmanager
def gpu_path_on_cpu():
    """Inside, the units take the path a GPU takes for CPU tensors too: the Triton kernels, run by Triton's
    interpreter. For counting what a GPU would run (launches, saved tensors) on a machine without one
    (``benchmarks/bench_footprint.py``, tests); ``TRITON_INTERPRET=1`` must have been set before the kernels
    were first loaded. Process-wide while it lasts (not for concurrent use)."""
    global _GPU_PATH_ON_CPU
    if not load_epilogue().is_interpreted() and not torch.cuda.is_available():
        raise RuntimeError("gpu_path_on_cpu: the Triton kernels were not defined under the interpreter; set "
                           "TRITON_INTERPRET=1 before sdepth_ext first loads them")
    previous, _GPU_PATH_ON_CPU = _GPU_PATH_ON_CPU, True
    try:
        yield
    finally:
        _GPU_PATH_ON_CPU = previous


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


def _as_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    return float(scale)


def _tensor_error(shortcut, residual) -> Exception:
    """The error for tensors that failed the combined fast check (cold path: says exactly what is wrong)."""
    for name, t in (("shortcut", shortcut), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            return TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtype = shortcut.dtype
    if not dtype.is_floating_point:
        return TypeError(f"shortcut: expected a floating-point tensor, got {dtype}")
    if residual.dtype != dtype:
        return TypeError(f"residual: dtype {residual.dtype} does not match shortcut dtype {dtype}")
    return ValueError(f"residual: on device {residual.device}, but shortcut is on device {shortcut.device}")


def _shape_error(shape, res_shape, rows) -> Exception:
    if not shape:
        return ValueError("shortcut: expected at least 1 dimension (the batch), got a 0-d tensor")
    if len(res_shape) != len(shape) or res_shape[1:] != shape[1:]:
        return ValueError(f"residual: shape {tuple(res_shape)} does not match shortcut shape "
                          f"{tuple(shape)} beyond the batch dimension")
    if rows is None:
        return ValueError(f"residual: batch size {res_shape[0]} != shortcut batch size {shape[0]} (pass "
                          "rows=... if the residual covers only some samples)")
    return ValueError(f"residual: has {res_shape[0]} rows but len(rows) = {rows.shape[0]}")


def _check_inputs(shortcut, residual, scale, rows, trusted_rows: bool) -> float:
    """O(1) metadata checks (plus, for untrusted ``rows``, their values); returns ``scale`` as a float.

    Every call of the public functions pays for these, so the common case is a few combined comparisons;
    which argument is wrong, and how, is worked out only once one fails.
    """
    if type(scale) is not float:
        scale = _as_scale(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    if not (isinstance(shortcut, torch.Tensor) and isinstance(residual, torch.Tensor)
            and shortcut.dtype.is_floating_point and residual.dtype == shortcut.dtype
            and residual.device == shortcut.device):
        raise _tensor_error(shortcut, residual)
    shape, res_shape = shortcut.shape, residual.shape
    if rows is None:
        if res_shape != shape or not shape:
            raise _shape_error(shape, res_shape, rows)
        return scale
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows: expected a 1-D int64 tensor or None, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows: expected dtype torch.int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows: expected a 1-D tensor, got {rows.dim()}-D")
    if rows.device != shortcut.device:
        raise ValueError(f"rows: on device {rows.device}, but shortcut is on device {shortcut.device}")
    if not shape or len(res_shape) != len(shape) or res_shape[1:] != shape[1:] or res_shape[0] != len(rows):
        raise _shape_error(shape, res_shape, rows)
    # Data-dependent checks need the values (one device sync on GPU). Skipped for trusted callers and under
    # torch.compile (a sync would break the graph); both must then pass sorted, unique, in-range rows.
    if not trusted_rows and not is_compiling():
        _check_rows_values(rows, shape[0])
    return scale


def _gated_residual_add(shortcut, residual, scale, rows, relu: bool, backend, trusted_rows: bool):
    """The public functions' body: check, pick the backend, dispatch."""
    scale = _check_inputs(shortcut, residual, scale, rows, trusted_rows)
    if backend is None:
        use_triton = shortcut.is_cuda and _triton_installed()
    elif backend == "triton":
        if not _triton_installed():
            load_epilogue()  # raises the error that says what is missing and what to use instead
        use_triton = True
    elif backend == "torch":
        use_triton = False
    else:
        raise ValueError(f"backend: expected one of None, 'triton', 'torch', got {backend!r}")
    if not use_triton:
        return gated_residual_add_torch(shortcut, residual, scale, rows, relu)
    if is_compiling():
        return _gated_residual_add_op(shortcut, residual, scale, rows, None, relu)
    return GatedResidualAddFunction.apply(shortcut, residual, scale, rows, None, relu, _kernels())


def gated_residual_add(shortcut: torch.Tensor, residual: torch.Tensor, scale: float = 1.0,
                       rows: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                       backend: Optional[str] = None, *, _trusted_rows: bool = False) -> torch.Tensor:
    """``act(shortcut + scale * residual)``, the epilogue of a (stochastic-depth) residual unit.

    Args:
        shortcut: ``[N, ...]`` identity (or projection-shortcut) output, floating point.
        residual: residual-branch output: ``[N, ...]``, or ``[len(rows), ...]`` when ``rows`` is given.
        scale: Python float; the paper's test-time ``p_l``, the inverted ``1 / p_l``, or 1. Must be finite.
        rows: optional 1-D int64 tensor on the same device, strictly ascending sample indices in ``[0, N)``:
            ``out[rows[k]] = act(shortcut[rows[k]] + scale * residual[k])``, every other sample gets
            ``act(shortcut)`` (it never reads a residual, so cannot become NaN through one).
        activation: ``None`` (nothing follows the add: ConvNeXt, MBConv, Swin, ViT) or ``"relu"`` (ResNet).
        backend: ``None`` (Triton for CUDA tensors when triton is installed, torch otherwise), ``"triton"``
            (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.
        _trusted_rows: internal: skip the value checks of ``rows`` (sorted / unique / in range), which cost
            one device->host sync on GPU.

    Returns a new tensor with shortcut's layout (contiguous, channels_last, ...) when shortcut and residual
    are dense; other inputs are copied to a contiguous layout first on the Triton path. Raises ``TypeError`` /
    ``ValueError`` naming the argument for bad inputs.
    """
    if activation is not None and activation != ACTIVATION_RELU:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    relu = activation is not None
    return _gated_residual_add(shortcut, residual, scale, rows, relu, backend, _trusted_rows)


def gated_residual_relu(shortcut: torch.Tensor, residual: torch.Tensor, scale: float = 1.0,
                        rows: Optional[torch.Tensor] = None, backend: Optional[str] = None, *,
                        _trusted_rows: bool = False) -> torch.Tensor:
    """``relu(shortcut + scale * residual)``: :func:`gated_residual_add` with ``activation="relu"``."""
    return _gated_residual_add(shortcut, residual, scale, rows, True, backend, _trusted_rows)
