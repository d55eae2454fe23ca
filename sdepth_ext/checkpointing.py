"""Activation checkpointing of stochastic-depth blocks: ``checkpoint_blocks``.

The plan of a step is drawn once, by the root's forward pre-hook, outside every block; blocks only read it.
So checkpointing blocks or stages by hand (``torch.utils.checkpoint.checkpoint(model.layer1, x)``,
``checkpoint_sequential``) recomputes with the same gates, as long as no other training forward of the model
runs between a forward and its backward. A checkpoint around the whole root works too: a recomputation
happens inside backward, where the pre-hook reuses the step's plan instead of drawing one.

``checkpoint_blocks(model)`` is the robust form: each surviving block runs under
``torch.utils.checkpoint`` with its plan bound at forward time (correct even with several forwards before
one backward), dropped blocks are not checkpointed (they save nothing), and BatchNorm running statistics are
not updated a second time by the recomputation (plain checkpointing applies the momentum twice).
"""

from __future__ import annotations

from torch import nn

from .convert import get_state

__all__ = ["checkpoint_blocks"]


def checkpoint_blocks(model: nn.Module, enabled: bool = True, *, use_reentrant: bool = False,
                      **checkpoint_kwargs) -> nn.Module:
    """Run every surviving block under ``torch.utils.checkpoint.checkpoint`` in training; returns ``model``.

    ``use_reentrant`` and ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``. With
    ``use_reentrant=True`` a block only gets parameter gradients when its input requires grad (true inside a
    ResNet whose stem trains). ``enabled=False`` switches checkpointing off again.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if not isinstance(use_reentrant, bool):
        raise TypeError(f"use_reentrant must be a bool, got {type(use_reentrant).__name__}")
    get_state(model).checkpoint = {"use_reentrant": use_reentrant, **checkpoint_kwargs} if enabled else None
    return model
