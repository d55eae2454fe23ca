"""What a dropped unit's branch parameters get: the dropped-gradient policies and the zero-gradient node.

``"zero"`` (the default everywhere: the paper's code, timm's DropPath and torchvision's StochasticDepth, whose
zero gate still hands every parameter a gradient): exact zero gradients through autograd, so optimizers apply
weight decay and momentum to dropped units too and DDP's default ``find_unused_parameters=False`` sees every
parameter each step. ``"none"``: no gradient (frozen that step). Set with
:func:`sdepth_ext.set_dropped_grads`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DROPPED_GRADS", "DEFAULT_DROPPED_GRADS", "ZeroGradTouch", "zero_views", "is_plain_tensor"]

DROPPED_GRADS = ("zero", "none")
DEFAULT_DROPPED_GRADS = "zero"

# Parameter types whose zero gradients may be views of one shared fill (not DTensors and other subclasses).
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def is_plain_tensor(t: torch.Tensor) -> bool:
    """True for a plain tensor or parameter; False for a subclass (FSDP2's sharded DTensor, ...)."""
    return type(t) in _PLAIN_TENSORS


class ZeroGradTouch(torch.autograd.Function):
    """``out`` unchanged in forward; in backward, exact zero gradients for ``params`` (a dropped unit's).

    The parameters thereby take part in autograd, as they do in a model whose stochastic depth multiplies the
    residual by a zero gate (timm's DropPath, torchvision's StochasticDepth): optimizers apply weight decay
    and momentum to them, and DDP's per-parameter hooks fire with ``find_unused_parameters=False``. No
    activation work; in backward one zero fill per dtype and device for the whole unit, whose views become
    the gradients (autograd keeps a fresh gradient tensor as ``.grad`` without a copy), not one per parameter.
    A parameter that already has a gradient (``zero_grad(set_to_none=False)``, gradient accumulation) gets
    ``None``, which leaves it as it is -- the same as adding zero, with no launch -- unless every parameter
    must reach autograd's hooks (``every_param``: DDP).

    A parameter that is a tensor subclass (FSDP2's sharded DTensor, of a block whose collectives were skipped)
    gets ``zeros_like`` of itself: a zero gradient of its local shard, with no communication.

    ``out.detach()`` (not ``out`` itself) is returned so that autograd treats the result as a fresh tensor:
    an input returned as-is becomes a view that may not be modified in place. It still shares memory and
    version counter with ``out``, exactly like the un-touched dropped unit returning its input.
    """

    @staticmethod
    def forward(ctx, out, every_param, *params):
        ctx.every_param = every_param
        ctx.params = params
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        params = ctx.params
        wanted = [p for p in params if ctx.every_param or p.grad is None]
        zeros = dict(zip(map(id, wanted), zero_views(wanted)))
        return (grad, None, *(zeros.get(id(p)) for p in params))


def zero_views(params: list) -> list[torch.Tensor]:
    """Zero tensors shaped (and strided) like ``params``: views of one zero fill per (dtype, device)."""
    views: list = [None] * len(params)
    groups: dict = {}
    for i, p in enumerate(params):
        if is_plain_tensor(p) and p.is_contiguous():
            groups.setdefault((p.dtype, p.device), []).append(i)
        else:  # a channels_last conv weight, a sharded DTensor: a gradient of the parameter's own kind
            views[i] = torch.zeros_like(p)
    for (dtype, device), members in groups.items():
        flat = torch.zeros(sum(params[i].numel() for i in members), dtype=dtype, device=device)
        start = 0
        for i in members:
            views[i] = flat[start:start + params[i].numel()].view(params[i].shape)
            start += params[i].numel()
    return views
