"""Activation checkpointing of stochastic-depth blocks: ``checkpoint_blocks``.

The plan of a step is drawn once, by the root's forward pre-hook, outside every block; blocks only read it.
So checkpointing blocks or stages by hand (``torch.utils.checkpoint.checkpoint(model.layer1, x)``,
``checkpoint_sequential``) recomputes with the same gates, as long as no other training forward of the model
runs between a forward and its backward. A checkpoint around the whole root works too: a recomputation
happens inside backward, where the pre-hook reuses the step's plan instead of drawing one.

``checkpoint_blocks(model)`` is the robust form: each surviving unit runs under ``torch.utils.checkpoint``
with its plan bound at forward time (correct even with several forwards before one backward;
:func:`run_checkpointed`), dropped units are not checkpointed (they save nothing), and BatchNorm running
statistics are not updated a second time by the recomputation (plain checkpointing applies the momentum
twice).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .batchnorm import frozen_batchnorm_stats
from .state import get_state

__all__ = ["checkpoint_blocks", "run_checkpointed"]


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


def run_checkpointed(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: nn.Module,
                     checkpoint_kwargs: dict) -> torch.Tensor:
    """``run(x)`` (a unit, its plan bound by the caller) under ``torch.utils.checkpoint``; in the
    recomputation ``block``'s BatchNorm layers keep their running statistics."""
    calls = [0]

    def once(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return run(inp)
        with frozen_batchnorm_stats(block):
            return run(inp)

    return torch.utils.checkpoint.checkpoint(once, x, **checkpoint_kwargs)
