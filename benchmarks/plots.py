"""PNG plots of the benchmark results (matplotlib, no display needed).

1. ``epilogue_bandwidth.png``: achieved GB/s of the fused epilogue and its peers against tensor size, with
   the copy bandwidth measured in the same run as the ceiling, and the rows' note (if any) below.
2. ``resnet_ratio.png``: train-step time relative to the plain network against p_last, for sdepth_ext batch
   and row mode and the mask-multiply peers, with the ideal (expected FLOP fraction) line, the paper's
   measured point, and the hand-written comparators on the same plans (hollow circles).
"""

from __future__ import annotations

from pathlib import Path

# Huang et al. 2016, Table 2: CIFAR-10 110-layer training time 20h42m (constant) vs 15h07m (p_L = 0.5).
PAPER_POINT = (0.5, (15 * 60 + 7) / (20 * 60 + 42))

_COLORS = {"sdepth": "tab:red", "eager": "tab:gray", "torchvision": "tab:blue", "compiled": "tab:green",
           "batch": "tab:red", "row": "tab:orange", "droppath": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_epilogue(rows: list[dict], path: Path, title: str) -> Path | None:
    """GB/s vs MB per tensor, one panel per pass (fwd, bwd), solid fp32 and dashed bf16."""
    if not rows:
        return None
    plt = _pyplot()
    import matplotlib.ticker  # after _pyplot() chose the Agg backend

    passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
    variants = [v for v in ("sdepth", "eager", "torchvision", "compiled") if f"{v}_GBps" in rows[0]]
    copy_gbps = rows[0].get("copy_GBps")
    for ax, pas in zip(axes[0], passes):
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            sel = sorted((r for r in rows if r["pass"] == pas and r["dtype"] == dtype),
                         key=lambda r: r["bytes"])
            if not sel:
                continue
            # x: the size of one tensor, so fp32 and bf16 points of one shape sit apart
            per_tensor_mb = [r["bytes"] / {"fwd": 3, "bwd": 4, "fwd+bwd": 7}[pas] / 1e6 for r in sel]
            for v in variants:
                ax.plot(per_tensor_mb, [r[f"{v}_GBps"] for r in sel], style, marker="o", ms=3,
                        color=_COLORS[v], label=f"{v} {dtype}")
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", ls=":", label=f"copy bandwidth {copy_gbps:.0f} GB/s")
        ax.set_xscale("log")
        # Ticks at 1-2-5 per decade, labelled as plain numbers; matplotlib's own minor-tick labels (shown
        # when a range spans < 2 decades) overlap at this width.
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("MB per tensor")
        ax.set_ylabel("GB/s (bytes the op must move / time)")
        ax.set_title(f"{pas}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    note = rows[0].get("note")  # e.g. why "compiled" is no fair peer on a CPU (bench_epilogue)
    if note:
        import textwrap

        fig.text(0.01, 0.01, textwrap.fill(note, 200), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1) if note else (0, 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_resnet(rows: list[dict], path: Path, title: str) -> Path | None:
    """Step-time ratio to the plain model vs p_last, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    labels = {"batch": "sdepth_ext batch mode", "row": "sdepth_ext row mode",
              "torchvision": "torchvision stochastic_depth", "droppath": "timm-style DropPath"}
    for ax, model in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == model and r["p_last"] is not None]
        for mode, label in labels.items():
            pts = sorted((r["p_last"], r["ratio"]) for r in sel if r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=_COLORS[mode], label=label)
        for mode, label in (("hand-batch", "same plans, skipped by hand (batch)"),
                            ("hand-row", "same sub-batch sizes, contiguous (row)")):
            pts = sorted((r["p_last"], r["ratio"]) for r in sel if r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), ls="none", marker="o", mfc="none", ms=9,
                        color=_COLORS[mode.removeprefix("hand-")], label=label)
        ideal = sorted({(r["p_last"], r["ideal_ratio"]) for r in sel if r["mode"] in ("batch", "row")})
        if ideal:
            # The expected FLOP fraction is linear in p_last (p_l is), through (1, 1): draw the whole line.
            p0, f0 = ideal[0]
            slope = (1.0 - f0) / (1.0 - p0) if p0 < 1.0 else 0.0
            ax.plot([0.0, 1.0], [1.0 - slope, 1.0], "k--", lw=1, label="ideal: expected FLOP fraction")
        measured = sorted({(r["p_last"], r["time_ideal_ratio"]) for r in sel
                           if r["mode"] in ("batch", "row") and "time_ideal_ratio" in r})
        if measured:
            ax.plot(*zip(*measured), ls=":", color="gray", marker="x",
                    label="ideal: measured block times (this device)")
        if model.startswith("cifar_resnet"):  # the paper's point is a CIFAR ResNet-110 measurement
            ax.plot(*PAPER_POINT, "k*", ms=11, label="paper, CIFAR-10 110-layer (Table 2)")
        ax.axhline(1.0, color="gray", lw=0.8)
        batch, size = (sel[0]["batch"], sel[0]["size"]) if sel else ("?", "?")
        ax.set_title(f"{model}, batch {batch} at {size}x{size}")
        ax.set_xlabel("p_last (survival probability of the last block)")
        ax.set_ylabel("train-step time / plain model")
        ax.set_xlim(0.1, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
