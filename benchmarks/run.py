"""``make bench``: every sdepth_ext microbenchmark on the best device present, one command.

Prints an environment report, then runs with a progress bar: the gate scheduler, the fused epilogue, the host
cost of the epilogue and of a host-bound train step (``bench_host``), the end-to-end train-step benchmark
of ResNets, ConvNeXt, Swin and EfficientNet (``bench_models``), pruned models (``bench_prune``) and the
counted footprint of a train step, saved bytes and launches (``bench_footprint``). Each writes JSON + CSV
with every sample under ``benchmarks/results/<device-slug>/`` (stamped with device, versions, allocator,
date and command); their detailed tables go to ``bench.log`` there. Then two PNG plots, and a compact
summary table printed last (within 120 columns; ``summary.json`` has the long form).

    python -m benchmarks.run            # default: ~15 minutes on a 2-core CPU (models: ~12; bench.log)
    python -m benchmarks.run --full     # large shapes, more steps, the whole p_last sweep
    python -m benchmarks.run --smoke    # seconds; what CI runs (checks that it runs: no measurements)
    python -m benchmarks.run --only host    # rerun some; the summary and plots keep the others' results
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import textwrap
import time

from sdepth_ext.train.files import atomic_write_text

from . import (
    bench_epilogue,
    bench_footprint,
    bench_host,
    bench_models,
    bench_prune,
    bench_scheduler,
)
from .common import (
    RESULTS_DIR,
    best_device,
    copy_bandwidth,
    device_slug,
    environment,
    format_table,
    parse_args,
    ratio_text,
    size_parser,
    size_suffix,
    use_triton_interpreter_without_cuda,
)
from .plots import plot_epilogue, plot_models

# Set on import, before any benchmark loads the Triton kernels (none of them does so when imported).
use_triton_interpreter_without_cuda()

BENCHES = {
    "scheduler": bench_scheduler,
    "epilogue": bench_epilogue,
    "host": bench_host,
    "models": bench_models,
    "prune": bench_prune,
    "footprint": bench_footprint,
}
NO_FULL = {"host", "prune"}  # benchmarks with one size besides --smoke: --full is not passed on to them

SMOKE_NOTE = ("SMOKE RUN: tiny sizes and a few samples, to check that every benchmark runs end to end; "
              "its numbers are not measurements")
TABLE_WIDTH = 120
BRIEF_COLUMNS = ["what", "sdepth_ext", "ratio", "ideal/limit"]


def environment_report(env: dict, device) -> list[str]:
    lines = [f"device:      {env['device']}"]
    if device.type == "cuda":
        lines.append(f"memory:      {env['device_memory_gib']} GiB")
        bandwidth = copy_bandwidth(device) / 1e9
        lines.append(f"copy b/w:    {bandwidth:.0f} GB/s (dst.copy_(src) of 1 GiB, measured now)")
    lines.append(f"versions:    torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
                 f"torchvision {env['torchvision']}, python {env['python']}")
    compiled = "compiled C++ (sdepth_ext._C)" if env["compiled_scheduler"] else \
        "pure-Python fallback (sdepth_ext._C not built: pip install --no-build-isolation -e .)"
    lines.append(f"scheduler:   {compiled}")
    epilogue = "Triton" if device.type == "cuda" else "torch path (no GPU; the Triton kernels need CUDA)"
    lines.append(f"epilogue:    {epilogue}")
    lines.append(f"CPU malloc:  {env['cpu_allocator']}")
    return lines


# --------------------------------------------------------------------------------------------------------
# The summary table: one line per headline measurement
# --------------------------------------------------------------------------------------------------------
def _short_dtype(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _brief_ratio(row: dict, key: str = "ratio") -> str:
    """``x0.911 [0.851,0.969]``: :func:`ratio_text`, tighter, for the printed table."""
    text = f"x{row[key]:.3f}"
    if f"{key}_ci95_low" in row:
        text += f" [{row[f'{key}_ci95_low']:.3f},{row[f'{key}_ci95_high']:.3f}]"
    return text


def _row(what: str, ours: str, peers: str, ratio: str, limit: str, brief: dict,
         note: str | None = None) -> dict:
    """A summary row: the long form (summary.json, the README via benchmarks.report) and the ``brief`` cells
    of the printed table (what, ratio, ideal/limit; sdepth_ext is shared)."""
    row = {"what": what, "sdepth_ext": ours, "peers": peers, "ratio": ratio, "ideal/limit": limit,
           "brief": {"sdepth_ext": ours, **brief}}
    if note:
        row["note"] = note
    return row


def _epilogue_rows(rows: list[dict], device_type: str) -> list[dict]:
    out = []
    epi = [r for r in rows if r["pass"] == "fwd+bwd"]
    # On a CPU inductor's code for this expression is slow for a reason of its own (the epilogue rows' note):
    # a ratio over it would be no win of ours, so the CPU headline compares with eager only.
    compared = ("eager",) if device_type == "cpu" else ("eager", "compiled")
    for dtype in ("float32", "bfloat16"):
        sel = [r for r in epi if r["dtype"] == dtype]
        if not sel:
            continue
        r = max(sel, key=lambda r: r["bytes"])  # the largest shape: bandwidth-bound, the honest case
        peers = ", ".join(f"{v} {r[f'{v}_ms']:.3g} ms" for v in ("eager", "torchvision", "compiled")
                          if f"{v}_ms" in r)
        if device_type == "cpu" and "compiled_ms" in r:
            peers += " (compiled: no fair CPU peer, see note)"
        ratios = ", ".join(f"{r[f'x_vs_{v}']:.2f}x vs {v}" for v in compared if f"x_vs_{v}" in r)
        limit = f"{r['sdepth_pct_copy']:.0f}% of copy b/w"
        out.append(_row(f"epilogue fwd+bwd {r['shape']} {dtype} ({r['sdepth_backend']})",
                        f"{r['sdepth_ms']:.3g} ms", peers, ratios, limit,
                        {"what": f"epilogue fwd+bwd {r['shape']} {_short_dtype(dtype)}", "ratio": ratios,
                         "ideal/limit": limit}, r.get("note")))
    return out


def _ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:.0f} ms"  # no 1.23e+03


def _host_rows(rows: list[dict]) -> list[dict]:
    out = []
    calls = [r for r in rows if r["part"] == "call"]
    for what in ("fwd", "fwd+bwd", "rows fwd+bwd"):
        by_variant = {r["variant"]: r for r in calls if r["what"] == what}
        ours = by_variant.pop("sdepth", None)
        if ours is None:
            continue
        peers = ", ".join(f"{v} {r['us']:.3g} us" for v, r in by_variant.items())
        ratio = brief_ratio = f"x{ours['x_eager']:.2f} of eager"
        hand = by_variant.get("eager rows (by hand)")
        if hand is not None:
            ratio += f"; x{ours['us'] / hand['us']:.2f} of eager rows by hand"
            brief_ratio += f"; x{ours['us'] / hand['us']:.2f} by hand"
        stubbed = ours["launch"] == "stubbed"
        limit = "Triton launch stubbed: the Python above it only" if stubbed else "real launches"
        out.append(_row(f"epilogue host {what} {ours['shape']} ({ours['launch']} launch)",
                        f"{ours['us']:.3g} us", peers, ratio, limit,
                        {"what": f"epilogue host {what}", "ratio": brief_ratio,
                         "ideal/limit": "launch stubbed" if stubbed else ""}))
    steps = [r for r in rows if r["part"] == "step"]
    plains = {r["what"]: r for r in steps if r["variant"] == "plain"}
    for r in steps:
        plain = plains.get(r["what"])
        if r["p_last"] is None or plain is None:
            continue
        ratio = f"x{r['ratio']:.3f} of plain"
        if "ratio_ci95_low" in r:
            ratio += f" [{r['ratio_ci95_low']:.3f}, {r['ratio_ci95_high']:.3f}]"
        limit = f"x{r['block_ideal']:.3f} blocks (ran x{r['blocks_ran']:.3f})"
        policy = r.get("dropped_grads", "zero")
        over = r["ratio"] - r["block_ideal"]
        ideal = (f"x{r['block_ideal']:.3f} of the blocks expected to run (ratio {over:+.3f} over it); "
                 f"ran x{r['blocks_ran']:.3f}")
        if "step_ideal" in r:
            ideal += f"; step ideal x{r['step_ideal']:.3f} (the part no drop removes counted)"
        if "over_none" in r:
            gap = f"{ratio_text(r, 'over_none', '+.3f')} over none"
            ratio += f"; {gap}"
            limit += f"; {gap}"
        brief = f"host step {r['what'].replace('cifar_', '')} {r['mode']} p{r['p_last']} {policy}"
        brief = brief.replace(" fwd+bwd", "") + (" fwd+bwd" if "fwd+bwd" in r["what"] else "")
        out.append(_row(f"host step {r['what']}, {r['mode']} p_last={r['p_last']}, dropped_grads={policy}",
                        _ms(r["ms"]), f"plain {_ms(plain['ms'])}", ratio, ideal,
                        {"what": brief, "ratio": ratio, "ideal/limit": limit}))
    return out


# The issue's targets for the models with their own stochastic depth, at stochastic_depth_prob 0.5: sdepth's
# ratio at most this far above its comparator's on the same plans, and below the original masked model's.
HAND_TARGETS = {"batch": 0.03, "row": 0.05}
HEADLINE_P_LASTS = (0.2, 0.5)  # ResNets: the paper's two headline points
HEADLINE_RATE = 0.5  # the others: stochastic_depth_prob
HEADLINE_RATES = {"timm deit_small": 0.4, "timm resnet50": 0.4}  # timm: the higher drop_path_rate timed


def headline_rate(r: dict) -> float:
    return HEADLINE_RATES.get(r["model"], HEADLINE_RATE)


def target_text(r: dict) -> str | None:
    """``met`` / ``missed (...)`` for a row the targets are stated for (HAND_TARGETS), else None."""
    if r.get("stochastic_depth_prob") != headline_rate(r) or "hand_gap" not in r:
        return None
    limit = HAND_TARGETS[r["mode"]]
    missed = []
    if r["hand_gap"] > limit:
        missed.append(f"{r['hand_gap']:+.3f} over by-hand")
    if r["ratio"] >= 1.0:
        missed.append("not faster than original")
    return "met" if not missed else f"missed ({', '.join(missed)})"


def _model_rows(rows: list[dict]) -> list[dict]:
    """Headline rows of bench_models: each model's sdepth batch and row mode at the headline rates."""
    out = []
    for r in rows:
        if r["mode"] not in ("batch", "row"):
            continue
        resnet = r.get("stochastic_depth_prob") is None
        headline = (r["p_last"] in HEADLINE_P_LASTS if resnet
                    else r["stochastic_depth_prob"] == headline_rate(r))
        if not headline:
            continue
        same = [p for p in rows if p["model"] == r["model"]]
        if resnet:
            rate, short, reference = f"p_last={r['p_last']}", f"p{r['p_last']}", "plain"
            peers = ", ".join(f"{p['mode']} x{p['ratio']:.2f}" for p in same
                              if p["p_last"] == r["p_last"] and p["mode"] in ("torchvision", "droppath"))
        else:
            rate, short, reference = (f"stochastic_depth_prob={r['stochastic_depth_prob']:g}",
                                      f"p{r['stochastic_depth_prob']:g}", "original")
            full = next(p for p in same if p["variant"] == r["reference"])
            peers = (f"original (its own mask) {_ms(full['mean_ms'])}; original p0 (nothing dropped) x"
                     f"{1.0 / full['full_ratio']:.2f} of that")
        what = f"{r['model']} b{r['batch']}@{r['size']} train step, {r['mode']} {rate}"
        ratio = f"x{ratio_text(r)} of {reference}"
        brief_ratio = _brief_ratio(r)
        limit = f"x{r['ideal_ratio']:.3f} FLOPs (drawn plans x{r['drawn_ideal_ratio']:.3f})"
        brief_limit = limit
        if "hand_ratio" in r:
            by_hand = "skipped by hand" if r["mode"] == "batch" else "as contiguous sub-batches"
            ratio += f"; x{ratio_text(r, 'over_hand')} of by-hand"
            brief_ratio += f"; x{r['over_hand']:.3f} by hand"
            limit += f"; same plans {by_hand} x{r['hand_ratio']:.3f}"
        target = target_text(r)
        if target is not None:
            limit += (f"; target (<= by-hand +{HAND_TARGETS[r['mode']]}, < 1 of original): {target}")
            brief_limit += f"; target {target.split(' (')[0]}"
        out.append(_row(what, _ms(r["mean_ms"]), peers, ratio, limit,
                        {"what": f"{r['model']} b{r['batch']}@{r['size']} {r['mode']} {short}",
                         "ratio": brief_ratio, "ideal/limit": brief_limit}))
    return out


def _footprint_rows(rows: list[dict]) -> list[dict]:
    """bench_footprint's headline: per model, row mode's saved bytes and launches per step against the
    model's own mask-multiply stochastic depth, next to batch mode's and the ideals (counted, not timed)."""
    out = []
    for r in rows:
        if r["variant"] != "sdepth row" or r["dropped_grads"] != "none":
            continue
        original = next(o for o in rows if o["model"] == r["model"] and o["variant"] == "original")
        batch = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "sdepth batch"
                     and b["dropped_grads"] == "none")
        ratio = f"saved x{r['saved_x_original']:.3f}, launches x{r['launches_gpu_x_original']:.3f}"
        # The memory ideal is the bound a skip reaches; the FLOP ideal, the issue's, stays beside it.
        limit = (f"saved over ideal {r['saved_over_ideal']:+.3f} (batch {batch['saved_over_ideal']:+.3f}), "
                 f"over FLOP ideal {r['saved_over_flop_ideal']:+.3f} "
                 f"(batch {batch['saved_over_flop_ideal']:+.3f}); "
                 f"launches x{r['launches_gpu'] / r['launches_ideal']:.3f} of ideal")
        out.append(_row(f"footprint {r['model']} b{r['batch']}@{r['size']} row mode, {r['rate_kind']} "
                        f"{r['rate']:g} (GPU path, counted)",
                        f"{r['saved_mib']:.1f} MiB, {r['launches_gpu']:.0f} launches",
                        f"original {original['saved_mib']:.1f} MiB, {original['launches_gpu']:.0f} launches",
                        ratio, limit,
                        {"what": f"footprint {r['model']} row", "sdepth_ext": f"{r['saved_mib']:.3g} MiB",
                         "ratio": ratio, "ideal/limit": f"batch saved x{batch['saved_x_original']:.3f}"}))
    return out


def _summary(results: dict[str, list[dict]], device_type: str) -> list[dict]:
    """The headline rows of ``results`` measured on a ``device_type`` ("cpu" or "cuda") device."""
    out = []
    for r in results.get("scheduler", []):
        if "cpp_us" in r:
            what = f"scheduler sample({r['batch_size']}), {r['num_blocks']} blocks, {r['mode']}"
            limit = "< 20 us" if r["mode"] == "row" else ""
            out.append(_row(what, f"{r['cpp_us']:.1f} us", f"python {r['python_us']:.0f} us",
                            f"{r['speedup_cpp_vs_python']:.0f}x faster", limit,
                            {"what": f"scheduler sample({r['batch_size']}), L={r['num_blocks']}, {r['mode']}",
                             "ratio": f"{r['speedup_cpp_vs_python']:.0f}x faster than python",
                             "ideal/limit": limit}))
    out += _epilogue_rows(results.get("epilogue", []), device_type)
    out += _host_rows(results.get("host", []))
    out += _model_rows(results.get("models", []))
    out += _prune_rows(results.get("prune", []))
    out += _footprint_rows(results.get("footprint", []))
    return out


def _prune_rows(rows: list[dict]) -> list[dict]:
    """bench_prune: the pruned model's eval latency next to its FLOP ratio and the same depth by hand."""
    out = []
    for r in rows:
        if not r["removed_blocks"]:
            continue
        what = (f"prune {r['model']} b{r['batch']}: {r['removed_blocks']} of 54 blocks removed "
                f"(depth {r['depth']}), eval latency")
        ratio = f"x{r['latency_ratio']:.3f} of full; x{r['over_hand']:.3f} of depth {r['depth']} by hand"
        limit = f"x{r['flop_ratio']:.3f} FLOPs"
        out.append(_row(what, _ms(r["pruned_ms"]), f"by hand {_ms(r['by_hand_ms'])}", ratio, limit,
                        {"what": f"prune {r['model']} -{r['removed_blocks']} blocks, latency",
                         "ratio": ratio, "ideal/limit": limit}))
    return out


def summary_table(summary: list[dict]) -> str:
    """The printed table (at most :data:`TABLE_WIDTH` columns), then the rows' notes, wrapped to fit."""
    lines = [format_table([r["brief"] for r in summary], BRIEF_COLUMNS, max_width=TABLE_WIDTH)]
    for note in dict.fromkeys(r["note"] for r in summary if r.get("note")):
        lines.append(textwrap.fill(f"note: {note}", TABLE_WIDTH, subsequent_indent="      "))
    return "\n".join(lines)


def main(argv=None) -> dict[str, list[dict]]:
    parser = size_parser(__doc__.splitlines()[0], smoke_help="tiny sizes, seconds each (CI)",
                         full_help="large shapes, more steps")
    parser.add_argument("--only", choices=sorted(BENCHES), action="append",
                        help="run only these benchmarks (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="print each benchmark's own tables too")
    args = parse_args(parser, argv)

    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    device = best_device()
    env = environment(device)
    print("\n".join(environment_report(env, device)), flush=True)
    out_dir = RESULTS_DIR / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["--smoke"] if args.smoke else (["--full"] if args.full else [])
    flags += ["--cpu-malloc", args.cpu_malloc]
    chosen = [name for name in BENCHES if not args.only or name in args.only]

    results: dict[str, list[dict]] = {}
    log = io.StringIO()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        tqdm = None
    bar = tqdm(total=len(chosen), desc="benchmarks", file=sys.stderr, dynamic_ncols=True) if tqdm else None
    started = time.perf_counter()
    for name in chosen:
        if bar is not None:
            bar.set_postfix_str(name)
        t0 = time.perf_counter()
        sink = sys.stdout if args.verbose else log
        with contextlib.redirect_stdout(sink):
            bench_flags = [f for f in flags if not (f == "--full" and name in NO_FULL)]
            print(f"\n===== {name} {' '.join(bench_flags)} =====", flush=True)
            results[name] = BENCHES[name].main(bench_flags)
        log.write(f"[{name}: {time.perf_counter() - t0:.1f} s]\n")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    suffix = size_suffix(args.smoke, args.full)
    log.write(f"[total: {time.perf_counter() - started:.0f} s]\n")  # the figure the README states
    log_path = out_dir / f"bench{suffix}.log"
    if args.only:
        # A partial rerun: the other benchmarks' rows come from their result files (the summary and plots
        # cover every benchmark), and their tables stay in the log, this run's appended after them.
        for name in BENCHES:
            path = out_dir / f"{name}{'' if args.full and name in NO_FULL else suffix}.json"
            if name not in results and path.exists():
                results[name] = json.loads(path.read_text())["rows"]
        previous = log_path.read_text() if log_path.exists() else ""
        header = f"\n===== rerun of {', '.join(chosen)} ({env['date']}, {env['command']}) =====\n"
        atomic_write_text(log_path, previous + header + log.getvalue())
    else:
        atomic_write_text(log_path, log.getvalue())

    title = f"{env['device']} | torch {env['torch']}, triton {env['triton']} | {env['date']}"
    plots = [
        plot_epilogue(results.get("epilogue", []), out_dir / f"epilogue_bandwidth{suffix}.png", title),
        plot_models(results.get("models", []), out_dir / f"models_ratio{suffix}.png", title),
    ]
    summary = _summary(results, device.type)
    head = {"environment": env, "smoke": args.smoke}
    if args.smoke:
        head["note"] = SMOKE_NOTE
    if args.only:
        head["rerun"] = chosen  # the others' rows are their last run's, each stamped in its own file
    atomic_write_text(out_dir / f"summary{suffix}.json", json.dumps({**head, "rows": summary}, indent=1))
    print(f"\nall benchmarks done in {time.perf_counter() - started:.0f} s; results, plots and bench.log in "
          f"{out_dir}")
    for p in plots:
        if p is not None:
            print(f"plot: {p}")
    print()
    print(summary_table(summary))
    if args.smoke:
        print(SMOKE_NOTE)
    return results


if __name__ == "__main__":
    main()
