"""Row mode around a unit's branch: the survivors gathered in, their gradient added back in one pass.

A unit with K of its N samples surviving (0 < K < N) runs its branch on ``x[rows]`` only, and the epilogue
scatters the K residual rows into the N-row output. Three pieces keep that as cheap in memory and launches
as the work it skips allows:

* :func:`~sdepth_ext.kernels.torch_epilogue.gather_rows`: ``index_select`` in ``x``'s own memory layout.
* :class:`SplitRows`: one autograd node for both consumers of the unit's input, the shortcut (all N rows)
  and the branch (the K gathered rows). Its backward sums their gradients in one pass over the batch,
  ``grad_x = grad_shortcut + scatter(grad_rows)``: the epilogue's own forward with scale 1 and no activation
  (one Triton launch, or one ``index_add``). Autograd through ``index_select`` would fill an N-row tensor with
  zeros, add the K rows into it, then add that to the shortcut's gradient: three launches and two N-row
  temporaries.
* :class:`Regather`: while the branch runs, its saves of the gathered rows become ``(x, rows)``, gathered
  again when backward needs them, so the K-row copy is freed after the forward. Only where ``x`` is kept for
  backward anyway (:func:`sdepth_ext.functional.keeps_output`: a ReLU's output, such as a ResNet stem's;
  or the input of the unit's own projection shortcut, a convolution that keeps it for its weight's
  gradient): there the copy is pure extra memory, bought back with one gather in backward. Elsewhere the
  K-row copy is the cheaper of the two and stays: units without an activation, whose input nothing else
  keeps, and ReLU units after a row-mode ReLU unit, whose epilogue keeps its mask's bits rather than its
  output (so that the output is freed once the next branch has gathered its rows). On the CPU's torch path it
  stays too (the units decide: there the gather again would be a memory-bound pass of the step's time, and
  one launch more than a mask-multiply costs).
"""

from __future__ import annotations

import torch

from .kernels.torch_epilogue import TorchEpilogue, gather_rows

__all__ = ["Regather", "SplitRows", "can_regather"]


class SplitRows(torch.autograd.Function):
    """``apply(x, rows, slot, kernels) -> (x, x[rows])``: the shortcut's input and the branch's, one node.

    The first output shares ``x``'s memory (``x.detach()``: a fresh tensor for autograd, so it is no view
    that in-place ops would have to refuse). ``kernels`` are the epilogue's launchers for ``x``
    (:func:`sdepth_ext.functional.epilogue_kernels`); ``slot`` is the row map of ``rows`` from the plan.
    Saves only ``rows`` and ``slot`` (views of the plan's one buffer).
    """

    @staticmethod
    def forward(ctx, x, rows, slot, kernels):
        ctx.save_for_backward(rows, slot)
        ctx.kernels = kernels
        return x.detach(), gather_rows(x, rows)

    @staticmethod
    def backward(ctx, grad_x, grad_rows):
        rows, slot = ctx.saved_tensors
        # create_graph=True runs backward in grad mode: differentiable torch ops then, on any device.
        if ctx.kernels is TorchEpilogue or torch.is_grad_enabled():
            return TorchEpilogue.add_rows(grad_x, grad_rows, rows), None, None, None
        grad = ctx.kernels.gated_residual_add_forward(grad_x, grad_rows, 1.0, rows, slot, relu=False)[0]
        return grad, None, None, None


# torch >= 2.8 tells which saved-tensor hooks are active (the top of the stack); older versions cannot, and
# there a hook of ours would hide the user's (activation offloading, non-reentrant checkpointing) from the
# branch, so the gathered rows are kept as before.
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_saved_tensors_hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
REGATHER_SUPPORTED = _top_saved_tensors_hooks is not None and _saved_tensors_hooks_enabled is not None


def can_regather() -> bool:
    """Whether saved-tensor hooks can be pushed here and now, composed with any already active."""
    return REGATHER_SUPPORTED and torch.is_grad_enabled() and _saved_tensors_hooks_enabled()


class Regather:
    """Saved-tensor hooks for a unit's branch: saves of ``gathered`` (= ``x[rows]``) become ``(x, rows)``.

    ``with Regather(x, rows, gathered):`` around the branch. ``x`` must be kept for backward anyway (the
    caller checks). Under saved-tensor hooks already active (an outer ``saved_tensors_hooks``: offloading, a
    counter) the composition is theirs: they pack every save of the branch as before, and ``x`` in place of
    the gathered rows, which they never see; otherwise saves are kept as they are and ``x`` is held. In
    backward the rows are gathered again once for all of the branch's saves of them (a save of a view of them
    is rebuilt with its sizes and strides). An in-place change of a held ``x`` between forward and backward
    raises, as autograd raises for a tensor it saved.
    """

    __slots__ = ("x", "rows", "key", "version", "outer", "packed_x", "again", "context")

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, gathered: torch.Tensor):
        self.x, self.rows = x, rows
        self.key = (gathered.untyped_storage().data_ptr(), gathered.dtype, gathered.device)
        self.version = x._version
        self.outer = _top_saved_tensors_hooks(False)
        self.packed_x = None
        self.again: torch.Tensor | None = None
        self.context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> Regather:
        self.context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.context.__exit__(*exc)
        self.context = None
        if self.outer is not None:
            self.x = None  # the outer hooks hold what they packed of it; holding it here could undo that

    def pack(self, t: torch.Tensor):
        if (t.untyped_storage().data_ptr(), t.dtype, t.device) == self.key:
            if self.outer is not None and self.packed_x is None:
                self.packed_x = self.outer[0](self.x)
            return _GatheredSave(self, t.size(), t.stride(), t.storage_offset())
        return t if self.outer is None else _OuterSave(self.outer[1], self.outer[0](t))

    @staticmethod
    def unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()

    def gathered(self) -> torch.Tensor:
        if self.again is None:
            if self.outer is None:
                x = self.x
                if x._version != self.version:
                    raise RuntimeError(
                        "one of the variables needed for gradient computation has been modified by an "
                        f"inplace operation: a stochastic-depth unit's input (version {x._version}, expected "
                        f"{self.version}), whose surviving rows its branch gathers again in backward")
            else:
                x = self.outer[1](self.packed_x)
            self.again = gather_rows(x, self.rows)
        return self.again


class _GatheredSave:
    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: Regather, size, stride, offset):
        self.source, self.size, self.stride, self.offset = source, size, stride, offset

    def unpack(self) -> torch.Tensor:
        again = self.source.gathered()
        if again.size() == self.size and again.stride() == self.stride and self.offset == 0:
            return again
        return again.as_strided(self.size, self.stride, self.offset)


class _OuterSave:
    __slots__ = ("unpack_hook", "packed")

    def __init__(self, unpack_hook, packed):
        self.unpack_hook, self.packed = unpack_hook, packed

    def unpack(self) -> torch.Tensor:
        return self.unpack_hook(self.packed)
