"""What a trained run is worth with units removed: the lesion study of Veit, Wilber, Belongie 2016, and the
depth-pruning frontier.

The lesion study deletes each single residual unit in turn, then ``k`` random units at once (k = 1..L/2,
``draws`` draws each), with :func:`sdepth_ext.lesion`, which removes units for evaluation only. The frontier
(:func:`sdepth_ext.depth_frontier`) removes them for good (:func:`sdepth_ext.prune`), least harmful first,
and measures each pruned model's test error (with and without BatchNorm re-estimation), MACs and latency.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .. import depth_frontier, lesion
from ..convert import units_of
from ..data import Dataset
from .files import atomic_write_csv
from .loop import evaluate

__all__ = ["lesion_study", "frontier_study", "FRONTIER_FIELDS"]

FRONTIER_FIELDS = ["run", "k", "dropped", "error", "error_recalibrated", "macs", "macs_ratio", "latency_s",
                   "latency_ratio"]


def lesion_study(model: torch.nn.Module, data: Dataset, draws: int, seed: int) -> dict:
    """Test error with each single unit deleted, and with k random units deleted (k = 1..L/2).

    Returns ``{"base_error", "single": [error per unit], "random_k": {k: [error per draw]},
    "downsampling": [0-based indices of the units with a projection shortcut]}``.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws (--lesion-draws) must be an integer >= 1, got {draws!r}")
    units = units_of(model)
    num_units = len(units)
    downsampling = [l for l, (block, u, adapter) in enumerate(units) if adapter.has_projection(block, u)]
    _, base_error = evaluate(model, data.test_x, data.test_y)
    single = []
    for l in range(num_units):
        with lesion(model, drop=[l]):
            single.append(evaluate(model, data.test_x, data.test_y)[1])
    rng = random.Random(seed)
    by_k = {}
    for k in range(1, num_units // 2 + 1):
        errors = []
        for _ in range(draws):
            with lesion(model, drop=sorted(rng.sample(range(num_units), k))):
                errors.append(evaluate(model, data.test_x, data.test_y)[1])
        by_k[k] = errors
    return {"base_error": base_error, "single": single, "random_k": by_k, "downsampling": downsampling}


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int) -> list:
    return [(x[i:i + size], None if y is None else y[i:i + size]) for i in range(0, len(x), size)]


def frontier_study(models: dict[str, torch.nn.Module], data: Dataset, out_dir: Path, cfg) -> dict:
    """:func:`sdepth_ext.depth_frontier` of every trained run: ``frontier.csv`` and ``frontier.png`` in
    ``out_dir`` (error against measured latency, with and without BatchNorm re-estimation, per run), and the
    rows per run for ``summary.json``. BatchNorm is re-estimated on up to 8 training batches, without
    augmentation; latency is the median of 5 forwards of one test batch."""
    from .plots import plot_frontier

    test = _batches(data.test_x, data.test_y, 500)
    train = [x for x, _ in _batches(data.train_x, None, cfg.batch_size)][:8]
    results = {}
    for name, model in models.items():
        results[name] = depth_frontier(model, test, recalibrate=train, latency_repeat=15)
    rows = [{"run": name, **row, "dropped": " ".join(map(str, row["dropped"]))}
            for name, frontier in results.items() for row in frontier]
    atomic_write_csv(Path(out_dir) / "frontier.csv", FRONTIER_FIELDS, rows)
    plot_frontier(results, Path(out_dir) / "frontier.png")
    return results
