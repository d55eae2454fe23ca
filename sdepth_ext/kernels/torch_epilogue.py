"""The epilogue in PyTorch ops: the ``backend="torch"`` path and :class:`TorchEpilogue`, the launchers' twin.

:func:`gated_residual_add_torch` is the torch path of :func:`sdepth_ext.gated_residual_add` (autograd
differentiates it; torch.compile/inductor fuses it on its own). :class:`TorchEpilogue` offers the interface
of the Triton launchers (:mod:`sdepth_ext.kernels.epilogue`) in PyTorch ops, for any device: what the units
run in row mode on a CPU, through the same autograd Function as the Triton kernels
(:mod:`sdepth_ext.functional`), so both paths save the same tensors. Its backward is the one formula of the
epilogue's gradient in torch ops (the registered op's backward uses it too).
"""

from typing import Optional

import torch

__all__ = ["TorchEpilogue", "gated_residual_add_torch", "gather_rows", "rows_in_layout_of"]


def gated_residual_add_torch(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                              rows: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """The ``backend="torch"`` path: the reference's exact arithmetic in fewer memory passes.

    In row mode the reference's ``act(sc)`` + gather + add + act + ``index_put`` (a clone of the whole
    output) cost ~6 passes over the tensor forward and as many backward -- as much as a 16-channel 3x3
    convolution of a CIFAR ResNet. ``index_add`` adds the survivors' residual into a copy of the shortcut and
    one ``relu`` follows: 2 full passes forward, 1 backward. Bit-identical to the reference: the same
    ``scale * residual`` product and the same single addition (``alpha`` is not used, as ``add(.., alpha=)``
    may fuse the multiply-add and round once instead of twice).
    """
    scaled = residual if scale == 1.0 else scale * residual
    if rows is None:
        if scaled is residual or scaled.stride() != shortcut.stride():
            out = shortcut + scaled
        else:
            # The product is our own temporary: adding in place saves an allocation (same sum, same
            # rounding; equal strides, so the output keeps the shortcut's layout either way).
            out = scaled.add_(shortcut)
    else:
        scaled = rows_in_layout_of(scaled, shortcut)
        # clone + in-place index_add_ rather than out-of-place index_add, which returns a contiguous tensor
        # and would turn a channels_last batch into NCHW.
        out = shortcut.clone(memory_format=torch.preserve_format).index_add_(0, rows, scaled)
    # The in-place relu_ acts on a fresh tensor (the sum, the clone): no extra allocation and pass, and
    # autograd saves the output for ReluBackward, as it would for an out-of-place relu.
    return out.relu_() if relu else out


def rows_in_layout_of(rows_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows_tensor`` (K samples) in the per-sample layout of ``like`` (N samples); copied only if needed.

    index_add_ walks the source in the destination's order: a source in another layout (ConvNeXt's branch
    ends in a permute, so its residual is NHWC in memory) runs ~3x slower on a CPU than a copy to the
    shortcut's layout and then the add (measured on a 16x96x16x16 batch).
    """
    if rows_tensor.stride()[1:] == like.stride()[1:] or not rows_tensor.numel():
        return rows_tensor
    fmt = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) and \
        like.dim() == 4 and not like.is_contiguous() else torch.contiguous_format
    return rows_tensor.contiguous(memory_format=fmt)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, rows)`` in ``x``'s own memory layout.

    ``index_select`` returns a row-major tensor whatever its input's layout, so a channels_last batch (and
    ConvNeXt's activations, NHWC in memory after its permutes) would reach the branch as NCHW: another
    convolution algorithm for the sub-batch than for the full batch (a depthwise 7x7 ran 2x slower on a CPU),
    and layout copies downstream. Gathering on the permuted view that is contiguous keeps the layout.
    """
    if x.dim() < 3 or x.is_contiguous():
        return x.index_select(0, rows)
    order = [0, *sorted(range(1, x.dim()), key=lambda d: -x.stride(d))]
    view = x.permute(order)
    if not view.is_contiguous():  # not a permutation of a dense batch-outermost tensor: plain gather
        return x.index_select(0, rows)
    inverse = [order.index(d) for d in range(x.dim())]
    return view.index_select(0, rows).permute(inverse)


_threshold_backward = torch.ops.aten.threshold_backward.default  # relu's backward, as autograd runs it


class TorchEpilogue:
    """The two launchers of :mod:`sdepth_ext.kernels.epilogue`, written in PyTorch ops (any device).

    What :class:`GatedResidualAddFunction` runs for the units' row mode on a CPU, so that both paths save
    the same tensors and take as few passes as PyTorch allows. Autograd over the ops of
    :func:`_gated_residual_add_torch` would in addition keep the residual alive (``index_add``'s backward
    saves its source) and run clone + index_add_ + relu_ forward. The row map of these ops is ``rows``
    itself: the forward returns it where the Triton launcher returns its inverse map, and the backward takes
    it back in that place. Arithmetic, and so every bit of the result, is that of the torch path.
    """

    @staticmethod
    def gated_residual_add_forward(shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                                   rows: Optional[torch.Tensor] = None, slot: Optional[torch.Tensor] = None,
                                   *, relu: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], None]:
        if rows is None:
            return gated_residual_add_torch(shortcut, residual, scale, None, relu), None, None
        scaled = rows_in_layout_of(residual if scale == 1.0 else scale * residual, shortcut)
        # One op (a Function's forward runs without grad): the shortcut copied into ``out``, which keeps the
        # shortcut's layout, and the rows added.
        out = torch.index_add(shortcut, 0, rows, scaled, out=torch.empty_like(shortcut))
        return (out.relu_() if relu else out), rows, None

    @staticmethod
    def gated_residual_add_backward(grad: torch.Tensor, out: Optional[torch.Tensor], scale: float,
                                    slot: Optional[torch.Tensor] = None, num_rows: Optional[int] = None, *,
                                    relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        grad_shortcut = _threshold_backward(grad, out, 0) if relu else grad
        # In the gradient's layout, as the Triton kernel writes it (index_select alone returns row-major rows,
        # and a branch ending in a permute, like ConvNeXt's, would then copy them in its backward).
        grad_residual = grad_shortcut if slot is None else gather_rows(grad_shortcut, slot)
        if scale != 1.0:
            grad_residual = grad_residual * scale
        return grad_shortcut, grad_residual

    @staticmethod
    def add_rows(full: torch.Tensor, part: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``full`` with ``part`` added into its ``rows``: the row gather's backward, one op (the Triton path
        runs the forward kernel with scale 1 instead). Where the two layouts differ the output takes
        ``part``'s, so that index_add's own copy of ``full`` converts it and no second copy runs."""
        if torch.is_grad_enabled():  # a differentiable backward (create_graph=True): no out= variant
            return full.index_add(0, rows, part)
        if part.stride()[1:] == full.stride()[1:] or not part.numel():
            out = torch.empty_like(full)
        elif part.dim() == 4 and part.is_contiguous(memory_format=torch.channels_last):
            out = torch.empty_like(full, memory_format=torch.channels_last)
        else:
            out, part = torch.empty_like(full), rows_in_layout_of(part, full)
        return torch.index_add(full, 0, rows, part, out=out)
