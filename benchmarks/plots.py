"""PNG plots of the benchmark results (matplotlib, no display needed).

1. ``epilogue_bandwidth.png``: achieved GB/s of the fused epilogue and its peers against tensor size, with
   the copy bandwidth measured in the same run as the ceiling, and the rows' note (if any) below.
2. ``models_ratio.png``: one panel per model of bench_models: train-step time relative to the full network
   (ResNets: the plain model, against p_last; ConvNeXt, Swin, EfficientNet: the original model at
   stochastic_depth_prob 0, against that rate) for sdepth_ext batch and row mode, the mask-multiply peers
   (ResNets) or the original model with its own StochasticDepth, the hand-written comparators on the same
   plans (hollow circles), the ideals (expected FLOP fraction line, FLOP fraction of the plans drawn, measured
   unit times) and, for CIFAR ResNet-110, the paper's measured point.
"""

from __future__ import annotations

from pathlib import Path

# Huang et al. 2016, Table 2: CIFAR-10 110-layer training time 20h42m (constant) vs 15h07m (p_L = 0.5).
PAPER_POINT = (0.5, (15 * 60 + 7) / (20 * 60 + 42))

_COLORS = {"sdepth": "tab:red", "eager": "tab:gray", "torchvision": "tab:blue", "compiled": "tab:green",
           "batch": "tab:red", "row": "tab:orange", "droppath": "tab:purple", "original": "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_epilogue(rows: list[dict], path: Path, title: str) -> Path | None:
    """GB/s vs MB per tensor, one panel per pass (fwd, bwd, fwd+bwd): implementations by colour, dtypes by
    marker and line (fp32: circles, solid; bf16: triangles, dashed), the legend below the panels, where it
    covers no point."""
    if not rows:
        return None
    plt = _pyplot()
    import matplotlib.ticker  # after _pyplot() chose the Agg backend

    passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
    variants = [v for v in ("sdepth", "eager", "torchvision", "compiled") if f"{v}_GBps" in rows[0]]
    copy_gbps = rows[0].get("copy_GBps")
    for ax, pas in zip(axes[0], passes):
        for dtype, style, marker in (("float32", "-", "o"), ("bfloat16", "--", "^")):
            sel = sorted((r for r in rows if r["pass"] == pas and r["dtype"] == dtype),
                         key=lambda r: r["bytes"])
            if not sel:
                continue
            # x: the size of one tensor, so fp32 and bf16 points of one shape sit apart
            per_tensor_mb = [r["bytes"] / {"fwd": 3, "bwd": 4, "fwd+bwd": 7}[pas] / 1e6 for r in sel]
            for v in variants:
                ax.plot(per_tensor_mb, [r[f"{v}_GBps"] for r in sel], style, marker=marker, ms=4,
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
    fig.suptitle(title, fontsize=9)
    note = rows[0].get("note")  # e.g. why "compiled" is no fair peer on a CPU (bench_epilogue)
    note_height = 0.06 if note else 0.0
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, note_height))
    if note:
        import textwrap

        fig.text(0.01, 0.01, textwrap.fill(note, 200), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, note_height + 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_MODE_LABELS = {"batch": "sdepth_ext batch mode", "row": "sdepth_ext row mode",
                "original": "original (torchvision's own StochasticDepth, a mask)",
                "torchvision": "torchvision stochastic_depth", "droppath": "timm-style DropPath"}
_HAND_LABELS = {"hand-batch": "same plans, skipped by hand (batch)",
                "hand-row": "same sub-batch sizes, contiguous (row)"}


def _panel(ax, sel: list[dict], resnet: bool) -> None:
    """One model: time relative to the full network against the rate (ResNets: p_last, the others:
    stochastic_depth_prob), the variants as lines, the comparators as hollow circles, the ideals in black
    and gray."""
    key = "p_last" if resnet else "stochastic_depth_prob"
    # y: time over the full network's step (ResNets: plain; the others: original p0, no unit dropped). For
    # ResNets that is the rows' ratio; the others' ratio is to the original at the same rate.
    y = "ratio" if resnet else "full_ratio"
    rated = [r for r in sel if r[key] is not None]
    for mode, label in _MODE_LABELS.items():
        pts = sorted((r[key], r[y]) for r in rated if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=_COLORS[mode], label=label)
    for mode, label in _HAND_LABELS.items():
        pts = sorted((r[key], r[y]) for r in rated if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), ls="none", marker="o", mfc="none", ms=9,
                    color=_COLORS[mode.removeprefix("hand-")], label=label)
    sdepth = [r for r in rated if r["mode"] in ("batch", "row")]
    ideal = sorted({(r[key], r["ideal_ratio"]) for r in sdepth})
    if ideal:
        # The expected FLOP fraction is linear in the rate (each p_l is): draw the whole line, through
        # (1, 1) for p_last and through (0, 1) for a drop rate.
        x0, f0 = ideal[0] if resnet else ideal[-1]
        anchor = 1.0 if resnet else 0.0
        slope = (f0 - 1.0) / (x0 - anchor) if x0 != anchor else 0.0
        xs = [0.0, 1.0] if resnet else [0.0, max(x for x, _ in ideal)]
        ax.plot(xs, [1.0 + slope * (x - anchor) for x in xs], "k--", lw=1,
                label="ideal: expected FLOP fraction")
    drawn = sorted((r[key], r["drawn_ideal_ratio"]) for r in sdepth if "drawn_ideal_ratio" in r)
    if drawn:
        ax.plot(*zip(*drawn), ls="none", marker="+", color="black", ms=8,
                label="ideal: FLOP fraction of the plans drawn")
    # The time ideal is relative to the row's reference; on this panel's axis it is scaled by the
    # reference's own time over the full network's (1 for ResNets).
    scale = {r["variant"]: r.get("full_ratio", 1.0) for r in sel}
    measured = sorted({(r[key], r["time_ideal_ratio"] * scale.get(r.get("reference"), 1.0)) for r in sdepth
                       if "time_ideal_ratio" in r})
    if measured:
        ax.plot(*zip(*measured), ls=":", color="gray", marker="x",
                label="ideal: measured unit times (this device)")
    if resnet and sel[0]["model"].startswith("cifar_resnet"):  # the paper's point: CIFAR ResNet-110
        ax.plot(*PAPER_POINT, "k*", ms=11, label="paper, CIFAR-10 110-layer (Table 2)")
    ax.axhline(1.0, color="gray", lw=0.8)
    family = f", {sel[0]['family']}" if sel[0].get("family") else ""
    ax.set_title(f"{sel[0]['model']}{family}: batch {sel[0]['batch']} at {sel[0]['size']}x{sel[0]['size']}",
                 fontsize=9)
    if resnet:
        ax.set_xlabel("p_last (survival probability of the last block)")
        ax.set_ylabel("train-step time / plain model")
        ax.set_xlim(0.1, 1.05)
    else:
        ax.set_xlabel("stochastic_depth_prob (the model's drop rate)")
        ax.set_ylabel("train-step time / original p0 (no unit dropped)")
        ax.set_xlim(-0.03, max(r[key] for r in rated) + 0.05)
    ax.grid(alpha=0.3)


def plot_models(rows: list[dict], path: Path, title: str) -> Path | None:
    """bench_models' rows: one panel per model (three a row), one legend for all under the panels (it covers
    no data)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    plt = _pyplot()
    ncols = min(3, len(models))
    nrows = -(-len(models) // ncols)
    spare = nrows * ncols > len(models)  # an empty cell holds the legend; else it goes under the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows + (0 if spare else 1.2)),
                             squeeze=False)
    for ax, model in zip(axes.flat, models):
        sel = [r for r in rows if r["model"] == model]
        _panel(ax, sel, resnet=all(r.get("stochastic_depth_prob") is None for r in sel))
    labels: dict[str, object] = {}
    for ax in list(axes.flat)[:len(models)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.suptitle(title, fontsize=9)
    if spare:
        for ax in list(axes.flat)[len(models):]:
            ax.axis("off")
        axes.flat[len(models)].legend(list(labels.values()), list(labels), loc="center", fontsize=8,
                                      frameon=False)
        fig.tight_layout()
    else:
        legend_rows = -(-len(labels) // 3)
        fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, (0.25 + 0.22 * legend_rows) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
