"""Deploying the ensemble: depth pruning, BatchNorm re-estimation and the compute-accuracy frontier.

Residual networks behave like ensembles of shallow paths (Veit et al. 2016): removing a unit at test time
costs little, and a network trained with stochastic depth degrades more gracefully still. :func:`prune` turns
that into a model to ship: a new, plain model (only torch / torchvision / timm classes, nothing of
sdepth_ext) with the listed units removed, "paper" scaling folded into the remaining units' weights.
:func:`recalibrate_bn` re-estimates BatchNorm statistics after removing units (the usual repair), and
:func:`depth_frontier` measures, for k removed units, the test error, FLOPs and latency of the pruned model.

How a removed unit becomes plain torch: :mod:`sdepth_ext.plain`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .flags import restored_train_flags
from .flops import total_macs
from .plain import pruned_copy
from .state import check_drop, units_of

__all__ = ["prune", "recalibrate_bn", "depth_frontier"]


# ------------------------------------------------------------------------------------------------------------
# prune
# ------------------------------------------------------------------------------------------------------------
def prune(model: nn.Module, drop: Iterable[int]) -> nn.Module:
    """A new, plain model equal to ``model`` in eval mode with the residual units in ``drop`` removed.

    Args:
        model: a converted model (its scaling decides whether ``p_l`` is folded in), or a plain model of a
            supported family (evaluated as the plain network).
        drop: unit indices, 0-based, forward order (:func:`sdepth_ext.survival_probs` order).

    The given model is untouched. With "paper" scaling, each remaining unit's ``p_l`` is multiplied into its
    branch's last affine layer (for ResNets the last BatchNorm's weight and bias; a branch that ends in a
    non-linear layer, such as an SE gate, gets the multiply in the block's generated forward), so
    ``prune(model, [])`` equals the converted eval model and ``prune(model, drop)`` equals
    ``with sd.lesion(model, drop): model.eval()(x)`` up to float rounding. The result is in eval mode and
    exports with ``torch.export`` (and scripts with ``torch.jit.script`` where the original architecture
    does); its ``state_dict`` loads into the same pruned architecture. Bad ``drop`` indices raise
    ``ValueError``/``TypeError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    units = units_of(model)
    if not units:
        raise ValueError(f"model: {type(model).__name__} has no residual units to prune")
    return pruned_copy(model, set(check_drop(drop, len(units))))


# ------------------------------------------------------------------------------------------------------------
# recalibrate_bn
# ------------------------------------------------------------------------------------------------------------
def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from ``batches``; returns ``model``.

    The running mean and variance become the cumulative (equal-weight) averages of the batch statistics of
    the first ``num_batches`` batches (all of them when None): BatchNorm with ``momentum=None`` after a
    reset. No gradient; nothing but BatchNorm buffers changes: every other module runs in eval mode (a
    converted model runs all its units), and each module's train/eval flag and momentum are restored.
    ``batches`` yields input tensors or ``(inputs, targets)`` pairs on the model's device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be an int >= 1 or None, got {num_batches!r}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError(f"model: {type(model).__name__} has no BatchNorm with running statistics")
    momenta = [(m, m.momentum) for m in norms]
    with restored_train_flags(model):
        try:
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: every batch weighs the same
                m.train()
            seen = 0
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                model(_inputs(batch))
                seen += 1
            if seen == 0:
                raise ValueError("batches: got no batch to estimate the statistics from")
        finally:
            for m, momentum in momenta:
                m.momentum = momentum
    return model


# ------------------------------------------------------------------------------------------------------------
# depth_frontier
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _error(model: nn.Module, batches: Sequence) -> float:
    wrong = total = 0
    for x, y in batches:
        wrong += int((model(x).argmax(1) != y).sum())
        total += int(y.numel())
    return wrong / max(1, total)


@torch.no_grad()
def _latencies(models: list[nn.Module], x: torch.Tensor, repeat: int) -> list[float]:
    """Median seconds of an eval forward on ``x`` per model, timed in interleaved rounds (one forward of each
    model per round, after one warm-up call each), so that a drift in the machine's speed hits every model
    alike instead of biasing the ratios between them."""
    for model in models:
        model(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeat):
        for model, samples in zip(models, times):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def _as_batches(data) -> list:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    return list(data)


def depth_frontier(model: nn.Module, data, max_drop: int | None = None, recalibrate=None, *,
                   remeasure: bool = False, latency_repeat: int = 5) -> list[dict]:
    """The compute-accuracy frontier of depth pruning: for k = 0..max_drop removed units, the error, MACs
    and measured latency of the pruned model, with and without BatchNorm re-estimation.

    Args:
        model: a trained model (converted or plain), evaluated as it is (its scaling, in eval mode).
        data: test batches, ``(inputs, targets)`` pairs (or one such pair).
        max_drop: the largest number of removed units (default: half of them).
        recalibrate: training batches for :func:`recalibrate_bn` on each pruned model (None: not done).
        remeasure: the deletion order. False (default): by the single-unit lesion errors, least harmful
            first (one evaluation per unit). True: greedy, re-measuring every remaining unit after each
            deletion (one evaluation per remaining unit and step: quadratic in the depth).
        latency_repeat: timed forwards per pruned model (median; on the first test batch), in rounds that
            interleave the models.

    Returns one row per k: ``{"k", "dropped", "error", "error_recalibrated", "macs", "macs_ratio",
    "latency_s", "latency_ratio"}`` (``error_recalibrated`` None without ``recalibrate``). The first row
    (k = 0) is the full model, pruned of nothing.
    """
    batches = _as_batches(data)
    if not batches:
        raise ValueError("data: got no test batch")
    num_units = len(units_of(model))
    if max_drop is None:
        max_drop = num_units // 2
    if isinstance(max_drop, bool) or not isinstance(max_drop, int) or not 0 <= max_drop <= num_units:
        raise ValueError(f"max_drop must be an int in [0, {num_units}], got {max_drop!r}")
    train_batches = None if recalibrate is None else _as_batches(recalibrate)
    x0 = batches[0][0]

    def evaluate(drop):
        return _error(prune(model, drop), batches)

    order: list[int] = []
    if not remeasure:
        single = [(evaluate([l]), l) for l in range(num_units)]
        order = [l for _, l in sorted(single)][:max_drop]
    else:
        remaining = list(range(num_units))
        while len(order) < max_drop:
            best = min((evaluate(order + [l]), l) for l in remaining)[1]
            order.append(best)
            remaining.remove(best)

    pruned_models = [prune(model, sorted(order[:k])) for k in range(max_drop + 1)]
    latencies = _latencies(pruned_models, x0, latency_repeat)
    rows = []
    for k, (pruned, latency) in enumerate(zip(pruned_models, latencies)):
        macs = total_macs(pruned, x0[:1])
        if k == 0:
            full_macs = macs
        row = {"k": k, "dropped": sorted(order[:k]), "error": _error(pruned, batches),
               "error_recalibrated": None, "macs": macs, "macs_ratio": macs / full_macs,
               "latency_s": latency, "latency_ratio": latency / latencies[0]}
        if train_batches is not None and any(isinstance(m, _BatchNorm) for m in pruned.modules()):
            recalibrate_bn(pruned, train_batches)
            row["error_recalibrated"] = _error(pruned, batches)
        rows.append(row)
    return rows
