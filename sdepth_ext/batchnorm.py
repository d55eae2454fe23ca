"""BatchNorm and stochastic depth: statistics frozen on recomputation, the one-sample case, SyncBatchNorm.

Three facts about BatchNorm in a unit's branch that the units and the distributed helpers need:

* a branch run a second time for the same step (activation checkpointing's recomputation, FSDP2's empty
  sub-batch) must not update the running statistics again: :func:`frozen_batchnorm_stats`;
* in training mode BatchNorm refuses one value per channel, which a row-mode sub-batch of one sample reaches
  at a 1x1 spatial size (resnet18's layer4 at 32x32 input): :func:`needs_two_samples` tells from the branch's
  convolution geometry alone, on the host;
* a branch that a compiled graph runs whatever the gate (a model compiled whole, where the gate is a tensor)
  must leave the statistics as a skipped branch would when the gate is off: :func:`batchnorm_stats_where`;
* SyncBatchNorm in a branch cannot run in row mode under DDP/FSDP: a unit without a survivor on one rank and
  with some on another would skip the collective on the first rank only (a hang):
  :func:`refuse_sync_batchnorm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_stats", "batchnorm_stats_where", "frozen_batchnorm_stats", "has_batchnorm",
           "needs_two_samples", "refuse_sync_batchnorm"]


@contextlib.contextmanager
def frozen_batchnorm_stats(*modules: nn.Module):
    """Inside, BatchNorm layers of ``modules`` update stand-in copies of their buffers; originals untouched.

    Swapping in clones (rather than restoring values with ``copy_`` afterwards) leaves the originals' version
    counters alone: the recomputed graph saves the running statistics for BatchNorm's backward, and an
    in-place restore would make autograd reject that graph.
    """
    swapped = batchnorm_stats(*modules)
    try:
        yield
    finally:
        for m, name, buf in swapped:
            m._buffers[name] = buf


def has_batchnorm(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` is or contains a BatchNorm layer."""
    return any(isinstance(m, _BatchNorm) for module in modules for m in module.modules())


def batchnorm_stats(*modules: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Give the BatchNorm layers of ``modules`` stand-in copies of their buffers to update (as
    :func:`frozen_batchnorm_stats` does); :func:`batchnorm_stats_where` puts the originals back."""
    swapped = []
    for m in (m for module in modules for m in module.modules()):
        if isinstance(m, _BatchNorm):
            for name, buf in list(m._buffers.items()):
                if buf is not None:
                    swapped.append((m, name, buf))
                    m._buffers[name] = buf.clone()
    return swapped


def batchnorm_stats_where(keep: torch.Tensor, swapped: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """The original buffers back (:func:`batchnorm_stats`), updated from their stand-ins where the 0-dim
    bool tensor ``keep`` is true.

    For compiled code that runs a branch whatever its gate (no host decision): the running statistics end
    as if the branch had been skipped when the gate is off. The stand-ins are what the branch's BatchNorm
    saved for backward; the originals, written in place here, were not.
    """
    for m, name, buf in swapped:
        buf.copy_(torch.where(keep, m._buffers[name], buf))
        m._buffers[name] = buf


def needs_two_samples(branch: Iterable[nn.Module], x: torch.Tensor) -> bool:
    """True when a training-mode BatchNorm in ``branch`` would see one value per channel for one sample of
    ``x``: BatchNorm raises on that (e.g. resnet18's layer4 at 1x1 for 32x32 inputs).

    Host arithmetic on the geometry of the branch's convolutions (in registration order, which is their
    order of use in every supported family); no tensor is touched.
    """
    if x.dim() != 4:
        return False
    modules = [m for part in branch for m in part.modules()]
    if not any(isinstance(m, _BatchNorm) and m.training for m in modules):
        return False
    size = tuple(x.shape[-2:])
    for m in modules:
        if isinstance(m, nn.Conv2d):
            size = _conv_output_size(m, size)
            if size[0] * size[1] == 1:
                return True
    return False


def _conv_output_size(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same" keeps the size (stride 1 only), "valid" pads nothing
        if conv.padding == "same":
            return size
        padding = (0, 0)
    else:
        padding = conv.padding
    return tuple(
        (size[d] + 2 * padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d] + 1
        for d in range(2))


def refuse_sync_batchnorm(units: Iterable[tuple[str, Iterable[nn.Module]]]) -> None:
    """``units``: ``(name, branch modules)`` of each row-mode unit. ValueError naming the first whose branch
    holds SyncBatchNorm (the module docstring says why)."""
    for name, branch in units:
        if any(isinstance(m, nn.SyncBatchNorm) for part in branch for m in part.modules()):
            raise ValueError(
                f"model: {name} has SyncBatchNorm in its residual branch, which row mode cannot run under "
                "DDP: a unit with no survivor on one rank and some on another would skip the collective on "
                "the first rank only (a hang). Use mode='batch' (every rank drops the same units), or plain "
                "BatchNorm per rank")
