"""The figures of a training command: test error per epoch (the paper's Figure 3) and the lesion study.

Drawn with matplotlib's Agg backend (no display needed) and written atomically, like every output file.
"""

from __future__ import annotations

import io
from pathlib import Path

from .files import atomic_write

__all__ = ["plot_error_curves", "plot_lesion", "plot_frontier"]

STYLES = {"constant": ("tab:blue", "constant depth"), "stochastic": ("tab:red", "stochastic depth")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_error_curves(logs: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, log in logs.items():
        color, label = STYLES[name]
        epochs = [r["epoch"] for r in log]
        ax.plot(epochs, [100 * r["test_error"] for r in log], color=color, label=f"{label}: test")
        ax.plot(epochs, [100 * r["train_error"] for r in log], color=color, ls="--", alpha=0.6,
                label=f"{label}: train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_lesion(studies: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, st in studies.items():
        color = STYLES[name][0]
        blocks = list(range(1, len(st["single"]) + 1))
        left.plot(blocks, [100 * e for e in st["single"]], "o-", ms=3, color=color, label=name)
        left.axhline(100 * st["base_error"], color=color, ls=":", alpha=0.7)
        for l in st["downsampling"]:
            left.plot(l + 1, 100 * st["single"][l], "s", ms=7, mfc="none", color=color)
        ks = sorted(st["random_k"], key=int)
        means = [100 * sum(st["random_k"][k]) / len(st["random_k"][k]) for k in ks]
        lo = [100 * min(st["random_k"][k]) for k in ks]
        hi = [100 * max(st["random_k"][k]) for k in ks]
        right.plot([int(k) for k in ks], means, "o-", ms=3, color=color, label=name)
        right.fill_between([int(k) for k in ks], lo, hi, color=color, alpha=0.15)
    left.set_xlabel("deleted block (squares: downsampling blocks; dotted: no deletion)")
    left.set_ylabel("test error (%)")
    left.set_title("deleting one block")
    right.set_xlabel("number of random blocks deleted")
    right.set_ylabel("test error (%)")
    right.set_title("deleting k random blocks (mean, min-max)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_frontier(frontiers: dict[str, list[dict]], path: Path) -> None:
    """Test error against measured latency of the pruned models, per run, with and without BatchNorm
    re-estimation (solid and dashed), each point labelled with the number of units removed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in frontiers.items():
        color, label = STYLES[name]
        latency = [r["latency_ratio"] for r in rows]
        ax.plot(latency, [100 * r["error"] for r in rows], "o-", ms=3, color=color, label=f"{label}")
        recalibrated = [r["error_recalibrated"] for r in rows]
        if all(e is not None for e in recalibrated):
            ax.plot(latency, [100 * e for e in recalibrated], "s--", ms=3, color=color, alpha=0.7,
                    label=f"{label}, BatchNorm re-estimated")
        for r in rows[1::2]:
            ax.annotate(str(r["k"]), (r["latency_ratio"], 100 * r["error"]), fontsize=7, color=color,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency of the pruned model / full model (measured)")
    ax.set_ylabel("test error (%)")
    ax.set_title("depth pruning: units removed, least harmful first (labels: k)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
