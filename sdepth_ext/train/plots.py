"""The figures of a training command: test error per epoch (the paper's Figure 3) and the lesion study.

Drawn with matplotlib's Agg backend (no display needed) and written atomically, like every output file.
"""

from __future__ import annotations

import io
from pathlib import Path

from .files import atomic_write

__all__ = ["plot_error_curves", "plot_lesion"]

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
