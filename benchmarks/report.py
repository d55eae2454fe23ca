"""Markdown tables from committed result files, for the README and docs/benchmarks.md.

    python -m benchmarks.report benchmarks/results/cpu      # summary, model and host tables of that device
    python -m benchmarks.report . --update-pages README.md docs/benchmarks.md docs/reproduction.md

Reads ``summary.json``, ``models.json`` (``resnet.json`` of runs before bench_models covered the other
families), ``host.json``, ``prune.json``, ``break_even.json`` and ``footprint.json`` (all written by
``make bench``) and
``ddp.json`` (``python -m benchmarks.bench_ddp``) and ``models_compiled.json`` (``python -m
benchmarks.bench_models --compiled``), and prints what they hold, with the stamp (device,
versions, allocator, date, command) of the run, so a README number can always be traced to a file
(``tests/test_readme.py`` checks that the tables pasted in the docs still match their files). The notes
the files carry (why a peer is left out, a smoke run's numbers) come along.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sdepth_ext.train.files import atomic_write_text

from .common import ratio_text


def _stamp(env: dict) -> str:
    allocator = f"; CPU malloc: {env['cpu_allocator']}" if env.get("cpu_allocator") else ""
    return (f"{env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"torchvision {env['torchvision']}{allocator}; {env['date']}; `{env['command']}`")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(path: Path) -> str:
    data = json.loads(path.read_text())
    header = ["what", "sdepth_ext", "peers", "ratio", "ideal / limit"]
    rows = [[r["what"], r["sdepth_ext"], r["peers"], r["ratio"], r["ideal/limit"]] for r in data["rows"]]
    text = f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"
    notes = [*([data["note"]] if data.get("note") else []),
             *dict.fromkeys(r["note"] for r in data["rows"] if r.get("note"))]
    return text + "".join(f"\n\nNote: {n}" for n in notes)


def _num(r: dict, key: str, default: str = "-") -> str:
    return f"{r[key]:.3f}" if r.get(key) is not None else default


def models_markdown(path: Path) -> str:
    """bench_models' rows (or an older run's ResNet rows): every variant, its ratio to its reference (ResNets:
    ``plain``; the others: the original model at the same rate), to the full network, over its comparator on
    the same plans, and the ideals."""
    data = json.loads(path.read_text())
    header = ["model", "variant", "mean step (trimmed)", "ratio [95% CI]", "to", "x full network",
              "x by-hand, same plans [95% CI]", "ideal (FLOPs)", "ideal, drawn plans (FLOPs)",
              "ideal, drawn plans (unit times)", "steps"]
    rows = []
    for r in data["rows"]:
        by_hand = ratio_text(r, "over_hand") if "over_hand" in r else "-"
        rows.append([f"{r['model']} b{r['batch']}@{r['size']}", r["variant"], f"{r['mean_ms']:.0f} ms",
                     ratio_text(r), r.get("reference", "plain"), _num(r, "full_ratio", _num(r, "ratio")),
                     by_hand, f"{r['ideal_ratio']:.3f}", _num(r, "drawn_ideal_ratio", "1.000"),
                     _num(r, "drawn_time_ideal_ratio", "1.000"), str(r["steps"])])
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def compiled_markdown(path: Path) -> str:
    """``bench_models --compiled``'s rows: ``torch.compile`` of the whole model, converted in each mode, over
    the compiled unconverted model with its own mask-multiply, in the same timed rounds."""
    data = json.loads(path.read_text())
    # The compiled rows carry no ideal of their own; the eager batch-mode row of the same model and rate has
    # the FLOP ideal of the same survival probabilities.
    ideals = {(r["model"], r["variant"].removeprefix("sdepth batch ")): r["ideal_ratio"]
              for r in data["rows"] if r["variant"].startswith("sdepth batch ")}
    header = ["model", "variant", "mean step (trimmed)", "ratio [95% CI]", "to", "FLOP ideal (its eager row)",
              "steps"]
    rows = []
    for r in data["rows"]:
        if not r["variant"].startswith("compiled"):
            continue
        # the compiled unconverted model computes everything: 1 by definition
        ideal = ideals.get((r["model"], r["variant"].split()[-1])) if " sdepth " in r["variant"] else 1.0
        rows.append([f"{r['model']} b{r['batch']}@{r['size']}", r["variant"], f"{r['mean_ms']:.0f} ms",
                     ratio_text(r), r.get("reference", "plain"), "-" if ideal is None else f"{ideal:.3f}",
                     str(r["steps"])])
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def _headline_rows(rows: list[dict]) -> list[dict]:
    """bench_models' sdepth rows timed beside a hand-written comparator on the same plans (``over_hand``):
    the README's headline table and its findings."""
    return [r for r in rows if "over_hand" in r and r["variant"].startswith("sdepth")]


def headline_markdown(path: Path) -> str:
    """The README's headline: per model and mode, the train step at the drop rate the hand-written comparators
    ran (ResNets: p_last 0.5; the others: 0.5 or timm's 0.4), against what the user would run otherwise and
    against the same plans skipped by hand, next to the FLOP ideal of the plans drawn."""
    data = json.loads(path.read_text())
    rows = []
    for r in _headline_rows(data["rows"]):
        rate = f"p_last {r['p_last']:g}" if r.get("p_last") is not None else f"{r['stochastic_depth_prob']:g}"
        reference = ("plain model (every block)" if r.get("reference", "plain") == "plain"
                     else "the model's own mask-multiply")
        rows.append([f"{r['model']} b{r['batch']}@{r['size']}", r["mode"], rate, ratio_text(r), reference,
                     ratio_text(r, "over_hand"), _num(r, "drawn_ideal_ratio")])
    header = ["model (CPU size)", "mode", "drop rate", "train step [95% CI]", "x of", "x same plans by hand",
              "FLOP ideal (plans drawn)"]
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def training_markdown(path: Path) -> str:
    """A ``python -m sdepth_ext.train`` run's ``summary.json``: both runs' errors and epoch times, the time
    ratio next to its ideal, and (with ``--frontier``) the depth-pruning frontier of each trained model."""
    data = json.loads(path.read_text())
    header = ["run", "final test error", "best test error", "final train error", "seconds per epoch (mean)"]
    runs = _table(header,
                  [[name.replace("constant", "constant depth").replace("stochastic", "stochastic depth"),
                    f"{r['final_test_error']:.2%}", f"{r['best_test_error']:.2%}",
                    f"{r['final_train_error']:.2%}", f"{r['mean_epoch_time_s']:.2f}"]
                   for name, r in data["runs"].items()])
    text = f"Run: {_stamp(data['environment'])}\n\n{runs}"
    if data.get("measured_time_ratio") is not None:
        text += (f"\n\nTime per epoch, stochastic / constant: {data['measured_time_ratio']:.3f} (mean), "
                 f"{data['median_time_ratio']:.3f} (median); ideal {data['ideal_time_ratio']:.3f} "
                 f"(the expected share of FLOPs that runs).")
    if data.get("frontier"):
        rows = [[name, str(r["k"]), " ".join(map(str, r["dropped"])) or "-", f"{r['macs_ratio']:.3f}",
                 f"{r['latency_ratio']:.3f}", f"{r['error']:.2%}",
                 "-" if r["error_recalibrated"] is None else f"{r['error_recalibrated']:.2%}"]
                for name, frontier in data["frontier"].items() for r in frontier]
        text += "\n\n" + _table(["run", "units removed", "which", "MACs x full", "latency x full",
                                   "test error", "test error, BatchNorm re-estimated"], rows)
    return text


def host_markdown(path: Path) -> str:
    """bench_host's rows: per-call cost of the epilogue next to eager, and the host-bound train step."""
    data = json.loads(path.read_text())
    calls = [r for r in data["rows"] if r["part"] == "call"]
    steps = [r for r in data["rows"] if r["part"] == "step"]
    call_table = _table(["per call", "variant", "shape", "median", "x eager", "Triton launch"],
                        [[r["what"], r["variant"], r["shape"], f"{r['us']:.1f} us", f"{r['x_eager']:.2f}",
                          r["launch"] if r["variant"] == "sdepth" else "-"] for r in calls])

    def over(r: dict, key: str) -> str:
        return f"{r['ratio'] - r[key]:+.3f}" if key in r else "-"

    def with_interval(r: dict, key: str, fmt: str = ".3f") -> str:
        return ratio_text(r, key, fmt) if key in r else "-"

    def by_process(r: dict) -> str:  # the step part's processes, each alone (bench_host.STEP_PROCESSES)
        gaps = r.get("over_none_by_process")
        return " / ".join(f"{gap:+.3f}" for gap in gaps) if gaps else "-"

    step_table = _table(["host step", "variant", "mean step (trimmed)", "ratio to plain [95% CI]",
                         "blocks expected (ideal)", "ratio - ideal", "step ideal (fixed part counted)",
                         "ratio - step ideal", "minus none [95% CI]", "minus none, each process",
                         "blocks ran"],
                        [[r["what"], r["variant"], f"{r['ms']:.1f} ms", with_interval(r, "ratio"),
                          _num(r, "block_ideal"), over(r, "block_ideal"), _num(r, "step_ideal"),
                          over(r, "step_ideal"), with_interval(r, "over_none", "+.3f"), by_process(r),
                          _num(r, "blocks_ran")] for r in steps])
    return f"Run: {_stamp(data['environment'])}\n\n{call_table}\n\n{step_table}"


def prune_markdown(path: Path) -> str:
    """bench_prune's rows: the pruned model's eval latency, its FLOP ratio, the same depth built by hand."""
    data = json.loads(path.read_text())
    rows = [[f"{r['model']} b{r['batch']}", str(r["removed_blocks"]), str(r["depth"]),
             f"{r['pruned_ms']:.1f} ms", f"{r['latency_ratio']:.3f}", f"{r['flop_ratio']:.3f}",
             f"{r['by_hand_ms']:.1f} ms", f"{r['over_hand']:.3f}"] for r in data["rows"]]
    header = ["pruned model", "blocks removed", "depth", "latency", "x full", "FLOPs x full",
              "same depth by hand", "pruned x by hand"]
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def break_even_markdown(path: Path) -> str:
    """bench_models' break-even drop rates: where skipping starts to beat the model's own drop path."""
    data = json.loads(path.read_text())
    rows = [[r["model"], r["mode"], "-" if r["break_even_rate"] is None else f"{r['break_even_rate']:.3f}",
             r["status"], ", ".join(f"{p:g}: {q:.3f}" for p, q in zip(r["rates"], r["ratios"]))]
            for r in data["rows"]]
    header = ["model", "mode", "break-even drop rate", "", "ratio to the original at each drop_path_rate"]
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def ddp_markdown(path: Path) -> str:
    """bench_ddp's rows: DDP step time with ``sd.ddp_ready`` next to ``find_unused_parameters=True``."""
    data = json.loads(path.read_text())
    env = data["environment"]
    rows = [[r["mode"], r["variant"], f"{r['step_ms']:.1f} ms", f"{r['ratio_vs_find_unused']:.3f}"]
            for r in data["rows"]]
    first = data["rows"][0]
    setup = (f"cifar_resnet{first['depth']}, batch {first['batch_per_rank']} per rank at {first['image']}x"
             f"{first['image']}, {env.get('world_size', first['world_size'])} {env.get('backend', '')} "
             f"processes, median of {first['steps']} steps")
    header = ["mode", "variant", "median step", "x find_unused_parameters=True"]
    return f"Run: {_stamp(env)}\n\n{setup}\n\n{_table(header, rows)}"


def _has_memory_ideal(data: dict) -> bool:
    """Whether a footprint file holds the memory ideal (files from before bench_footprint counted it do
    not: their tables render as they did, without its columns)."""
    return any(r.get("saved_ideal_x_full") is not None for r in data["rows"])


def footprint_markdown(path: Path) -> str:
    """bench_footprint's rows: per model, what batch and row mode save for backward and launch per step,
    next to the model's own mask-multiply stochastic depth (``original``) and the ideals of the plans
    drawn (memory: the bound a skip reaches; FLOPs: the issue's); the launches the ``"zero"``
    dropped-gradient policy adds on the same plans."""
    data = json.loads(path.read_text())
    memory = _has_memory_ideal(data)
    rows = []
    for original in (r for r in data["rows"] if r["variant"] == "original"):
        model = original["model"]
        same = {(r["variant"], r["dropped_grads"]): r for r in data["rows"] if r["model"] == model}
        rate = f"{original['rate_kind']} {original['rate']:g}"
        cpu = "-" if original.get("launches_cpu") is None else f"{original['launches_cpu']:.0f}"
        rows.append([f"{model} b{original['batch']}@{original['size']}, {rate}", "original (mask-multiply)",
                     f"{original['saved_mib']:.1f} MiB", *(["-"] if memory else []), "-", "-", "-",
                     f"{original['launches_gpu']:.0f}", "-", cpu, "-"])
        for mode in ("batch", "row"):
            r, zero = same[(f"sdepth {mode}", "none")], same[(f"sdepth {mode}", "zero")]
            cpu_saved = "-" if r.get("saved_bytes_cpu") is None else \
                f"{r['saved_bytes_cpu'] / original['saved_bytes']:.3f}"
            cpu_launches = "-" if r.get("launches_cpu") is None else f"{r['launches_cpu_x_original']:.3f}"
            memory_ideal = [f"{r['saved_ideal_x_full']:.3f} ({r['saved_over_ideal']:+.3f})"] if memory else []
            rows.append(["", f"sdepth {mode}", f"{r['saved_x_original']:.3f}", *memory_ideal,
                         f"{r['flop_ideal_x_full']:.3f} ({r['saved_over_flop_ideal']:+.3f})",
                         f"{r['by_hand_saved_x_full']:.3f}", cpu_saved, f"{r['launches_gpu_x_original']:.3f}",
                         f"{r['launches_gpu'] / r['launches_ideal']:.3f}", cpu_launches,
                         f"{zero['launches_gpu'] - r['launches_gpu']:+.0f}"])
    header = ["model, drop rate", "variant", "saved for backward, GPU path (x original)",
              *(["memory ideal of the plans (saved over it), x full"] if memory else []),
              "FLOP ideal of the plans (saved over it), x full", "same plans by hand, x full",
              "saved, CPU path (x original)", "launches, GPU path (x original)", "launches x ideal",
              "launches, CPU path (x original)", "launches added by dropped grads \"zero\""]
    steps = max(r["steps"] for r in data["rows"])
    note = (f"Counted, not timed; forward + backward of one train step, {steps} plan(s) per mode, dropped "
            f"grads \"none\" unless stated. GPU path: {data['environment'].get('gpu_path', 'CUDA')}.")
    if memory:
        note += (" Memory ideal: the full network's saved bytes, each unit's share scaled by the fraction of "
                 "the samples the plan runs through it, and for the others what the unit's dropped form "
                 "keeps (a ResNet stage's first unit still runs its projection shortcut): what a skip of the "
                 "plan keeps. The FLOP ideal weighs the units by their FLOPs, which their memory does not "
                 "follow.")
    return f"Run: {_stamp(data['environment'])}\n\n{note}\n\n{_table(header, rows)}"


def footprint_row_markdown(path: Path) -> str:
    """The README's view of ``footprint.json``: per model, row mode (and batch mode) against the model's own
    mask-multiply stochastic depth, on the GPU's path and the CPU's; saved bytes over the memory ideal of
    the plans (where the file holds it) and over their FLOP ideal."""
    data = json.loads(path.read_text())
    memory = _has_memory_ideal(data)

    def saved(r: dict) -> str:
        over = f"{r['saved_over_ideal']:+.3f}; " if memory else ""
        return f"{r['saved_x_original']:.3f} ({over}{r['saved_over_flop_ideal']:+.3f})"

    rows = []
    for original in (r for r in data["rows"] if r["variant"] == "original"):
        same = {(r["variant"], r["dropped_grads"]): r for r in data["rows"]
                if r["model"] == original["model"]}
        row, batch = same[("sdepth row", "none")], same[("sdepth batch", "none")]
        cpu = "-" if row.get("launches_cpu") is None else f"{row['launches_cpu_x_original']:.3f}"
        rows.append([f"{original['model']} b{original['batch']}@{original['size']}",
                     f"{original['rate_kind']} {original['rate']:g}",
                     f"{original['saved_mib']:.1f} MiB, {original['launches_gpu']:.0f}",
                     saved(row), saved(batch),
                     f"{row['launches_gpu_x_original']:.3f}", cpu, f"{batch['launches_gpu_x_original']:.3f}"])
    over = "over memory ideal; over FLOP ideal" if memory else "over FLOP ideal"
    header = ["model (CPU size)", "drop rate", "original: saved, launches",
              f"row: saved x original ({over})", f"batch: saved x original ({over})",
              "row: launches x original, GPU path", "CPU path", "batch: launches x original, GPU path"]
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def _span(values: list[float]) -> str:
    """``0.74-0.89``: the range of ``values`` to 2 decimals (one number when they round alike; "-": none)."""
    if not values:
        return "-"
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


def _intervals(rows: list[dict]) -> str:
    """Whether the rows' ``over_hand`` intervals contain 1, each one that does not named."""
    if not rows:
        return "no rows"
    outside = [r for r in rows if not r["over_hand_ci95_low"] <= 1.0 <= r["over_hand_ci95_high"]]
    if not outside:
        return f"every interval contains 1 ({len(rows)} row{'s' if len(rows) != 1 else ''})"
    named = "; ".join(f"{r['model']} {ratio_text(r, 'over_hand')}" for r in outside)
    return f"{len(rows) - len(outside)} of {len(rows)} intervals contain 1 (not: {named})"


def models_findings_markdown(path: Path) -> str:
    """The README's findings of a ``make bench`` run, from bench_models' rows: what skipping saves against
    the reference and the FLOP ideal, what the models' own mask-multiply costs, sdepth_ext's overhead over
    the same plans skipped by hand per mode (each interval that excludes 1 named), and what row mode gains.
    Generated, so that no figure of the prose outlives the run it came from."""
    rows = json.loads(path.read_text())["rows"]
    headline = _headline_rows(rows)
    batch = [r for r in headline if r["mode"] == "batch"]
    row = [r for r in headline if r["mode"] == "row"]
    # bench_models.Variant.mode: the ResNets' mask-multiply peers, and row mode's comparator
    masks = [r["ratio"] for r in rows if r.get("mode") in ("torchvision", "droppath")]
    contiguous = [r["ratio"] for r in rows if r.get("mode") == "hand-row"]
    skipping = (f"- **Skipping saves time; masking does not.** In batch mode a step at these drop rates "
                f"takes {_span([r['ratio'] for r in batch])} of the reference (the plain ResNet; the other "
                "models with their own mask-multiply stochastic depth), close to the FLOP ideal of the "
                f"plans drawn ({_span([r['drawn_ideal_ratio'] for r in batch])}).")
    if masks:
        skipping += (f" The mask-multiply stochastic depth that ResNet code uses today costs {_span(masks)} "
                     "of the plain model (`docs/benchmarks.md`).")
    overhead = ("- **sdepth_ext's own overhead.** Against the same plans skipped by hand in eager code (each "
                f"step and its comparator run back to back, on the same plan), batch mode takes "
                f"{_span([r['over_hand'] for r in batch])}: {_intervals(batch)}. Row mode takes "
                f"{_span([r['over_hand'] for r in row])} of contiguous sub-batches, which get their rows "
                "without a gather or scatter (a slice of the batch), so this is what those cost, ours "
                f"included: {_intervals(row)}. Repeated runs on a shared machine move a ratio by a few "
                "points.")
    row_mode = (f"- **Row mode gains less on a CPU** ({_span([r['ratio'] for r in row])}): a CPU does not "
                "run a convolution on K of N samples in K/N of the time")
    row_mode += (f', as the "contiguous sub-batches" comparator shows (gather and scatter for free: '
                 f"{_span(contiguous)}, `docs/benchmarks.md`)." if contiguous else ".")
    return "\n".join([skipping, overhead, row_mode])


def host_findings_markdown(path: Path) -> str:
    """The README's host-cost finding, from bench_host's rows: the epilogue call against eager (its launch
    stubbed without a GPU), and the host-bound forward+backward with nothing dropped and at p_last 0.5 under
    both dropped-gradient policies, against the block-count ideal."""
    rows = json.loads(path.read_text())["rows"]
    calls = {(r["what"], r["variant"]): r for r in rows if r["part"] == "call"}
    steps = {r["variant"]: r for r in rows if r["part"] == "step" and r["what"].endswith("fwd+bwd")}
    stubbed = calls[("fwd+bwd", "sdepth")]["launch"] == "stubbed"
    text = "- **Host cost** (for GPUs, where launches dominate small steps): "
    text += "with Triton's launch stubbed, " if stubbed else ""
    text += (f"a forward+backward call costs {calls[('fwd+bwd', 'sdepth')]['x_eager']:.2f}x eager PyTorch's "
             f"`relu(a + s*b)`, {calls[('rows fwd+bwd', 'sdepth')]['x_eager']:.2f}x with rows")
    full, zero, none = (steps.get(f"sdepth batch {v}") for v in ("p1.0 zero", "p0.5 zero", "p0.5 none"))
    if full and zero and none:
        text += (f"; a host-bound forward+backward with nothing dropped costs {full['ratio']:.3f}x the plain "
                 f"model's, and at p_last 0.5 {ratio_text(zero)} with exact zero gradients for the dropped "
                 f"units (the default; {zero['over_none']:+.3f} over none), {none['ratio']:.3f} without, "
                 f"against {zero['block_ideal']:.3f} of the blocks expected to run")
    return text + " (`docs/benchmarks.md`)." + (" GPU launch cost: not measured." if stubbed else "")


def prune_findings_markdown(path: Path) -> str:
    """The README's pruning finding, from bench_prune's rows: the most pruned model against the full one and
    against the same depth built by hand."""
    rows = json.loads(path.read_text())["rows"]
    full, most = min(rows, key=lambda r: r["removed_blocks"]), max(rows, key=lambda r: r["removed_blocks"])
    return (f"- **Pruned models cost what their depth costs:** `sd.prune` of {most['removed_blocks']} blocks "
            f"of {most['model']} (depth {full['depth']} to {most['depth']}) runs in "
            f"{most['latency_ratio']:.3f} of the full model's latency (FLOPs {most['flop_ratio']:.3f}), "
            f"x{most['over_hand']:.3f} of the same depth built by hand.")


def findings_markdown(path: Path) -> str:
    """The ``(findings)`` view of a result file: the README's prose about it, generated from it."""
    stem = path.stem.removesuffix("_full")
    render = {"models": models_findings_markdown, "host": host_findings_markdown,
              "prune": prune_findings_markdown}.get(stem)
    if render is None:
        raise ValueError(f"{path}: no findings view for {stem} results (models, host, prune)")
    return render(path)


def _models_path(results_dir: Path, suffix: str) -> Path:
    """``models{suffix}.json``; a results folder from before bench_models has ``resnet{suffix}.json``."""
    path = results_dir / f"models{suffix}.json"
    legacy = results_dir / f"resnet{suffix}.json"
    return legacy if not path.exists() and legacy.exists() else path


def _host_path(results_dir: Path, suffix: str) -> Path:
    """``host{suffix}.json``; a ``--full`` run has none of its own (bench_host has one size besides --smoke)
    and reads ``host.json``."""
    path = results_dir / f"host{suffix}.json"
    return results_dir / "host.json" if suffix == "_full" and not path.exists() else path


# A table pasted into a page: "<!-- from <path>[ (<view>)] -->", then the table, up to the next heading,
# marker or image. tests/test_readme.py checks every such block against its file; --update-pages rewrites
# them.
CITED_BLOCK = re.compile(r"<!-- from (?P<cited>[^\n]*?) -->\n(?P<body>.*?)(?=\n(?:#|<!-- |!\[)|\Z)", re.S)
RENDERERS = {"summary": summary_markdown, "models": models_markdown, "resnet": models_markdown,
             "host": host_markdown, "prune": prune_markdown, "break_even": break_even_markdown,
             "ddp": ddp_markdown, "footprint": footprint_markdown, "models_compiled": compiled_markdown}
VIEWS = {"(headline)": headline_markdown, "(training)": training_markdown,
         "(row mode)": footprint_row_markdown, "(findings)": findings_markdown}


# A machine named in a page's prose or heading: "<!-- machine from <path> -->NAME<!-- /machine -->", where
# NAME is the device of the run the file holds (its stamp's first part). --update-pages rewrites NAME, and
# tests/test_readme.py checks it with the tables: a heading cannot name another machine than its tables.
CITED_MACHINE = re.compile(r"<!-- machine from (?P<cited>[^\n]*?) -->(?P<name>[^\n]*?)<!-- /machine -->")


def cited_machines(text: str) -> list[tuple[str, str]]:
    """The ``(cited path, machine name)`` pairs of a page."""
    return [(m["cited"].strip(), m["name"]) for m in CITED_MACHINE.finditer(text)]


def machine_of(cited: str, root: Path) -> str:
    """The machine a committed result file (a path relative to ``root``) was measured on."""
    file = root / cited
    if not file.exists():
        raise FileNotFoundError(f"{cited} is cited but not committed")
    return json.loads(file.read_text())["environment"]["device"]


def cited_blocks(text: str) -> list[tuple[str, str]]:
    """The ``(cited, table)`` blocks of a page; ``cited`` is "path" or "path (view)"."""
    return [(m["cited"].strip(), m["body"].strip()) for m in CITED_BLOCK.finditer(text)]


def render_cited(cited: str, root: Path) -> str:
    """What a block citing ``cited`` (a path relative to ``root``, maybe a view) must hold."""
    path, _, view = cited.partition(" ")
    file = root / path
    if not file.exists():
        raise FileNotFoundError(f"{path} is cited but not committed")
    render = VIEWS[view] if view else RENDERERS[file.stem.removesuffix("_full")]
    return render(file).strip()


def update_pages(pages: list[Path], root: Path) -> list[Path]:
    """Rewrite every cited block and every cited machine name of ``pages`` with what its file holds now
    (atomically, page by page); returns the pages that changed."""
    changed = []
    for page in pages:
        text = page.read_text()

        def fresh(m: re.Match) -> str:
            trailing = m["body"][len(m["body"].rstrip()):]
            return f"<!-- from {m['cited']} -->\n{render_cited(m['cited'].strip(), root)}{trailing}"

        def machine(m: re.Match) -> str:
            name = machine_of(m["cited"].strip(), root)
            return f"<!-- machine from {m['cited']} -->{name}<!-- /machine -->"

        new = CITED_MACHINE.sub(machine, CITED_BLOCK.sub(fresh, text))
        if new != text:
            atomic_write_text(page, new)
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="e.g. benchmarks/results/cpu")
    parser.add_argument("--suffix", default="", help="'_full' or '_smoke' for those runs' files")
    parser.add_argument("--update-pages", nargs="+", type=Path, metavar="PAGE",
                        help="instead: rewrite the tables and machine names these pages cite from their "
                             "files (paths relative to the current directory, the repository root)")
    args = parser.parse_args(argv)
    if args.update_pages:
        changed = update_pages(args.update_pages, Path.cwd())
        print("updated: " + (", ".join(map(str, changed)) or "nothing"))
        return ""
    parts = []
    # older runs, without timm; bench_ddp and bench_models --compiled are not part of make bench
    optional = {"prune", "break_even", "ddp", "footprint", "models_compiled"}
    # (file, renderer, view): the headline is a second view of models.json, cited as such
    for name, render, view in (("models", headline_markdown, " (headline)"),
                               ("summary", summary_markdown, ""), ("models", models_markdown, ""),
                               ("host", host_markdown, ""),
                               ("prune", prune_markdown, ""), ("break_even", break_even_markdown, ""),
                               ("footprint", footprint_row_markdown, " (row mode)"),
                               ("footprint", footprint_markdown, ""), ("ddp", ddp_markdown, ""),
                               ("models_compiled", compiled_markdown, "")):
        path = args.results_dir / f"{name}{args.suffix}.json"
        if name == "models":
            path = _models_path(args.results_dir, args.suffix)
        elif name == "host":
            path = _host_path(args.results_dir, args.suffix)
        if not path.exists():
            if name in optional:
                continue
            raise SystemExit(f"results_dir: {path} not found (run `make bench` first)")
        parts.append(f"<!-- from {path}{view} -->\n{render(path)}")
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
