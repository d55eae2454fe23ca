"""``make bench``: every sdepth_ext microbenchmark on the best device present, one command.

Prints an environment report, then runs with a progress bar: the gate scheduler, the fused epilogue and the
end-to-end ResNet train-step benchmarks. Each writes JSON + CSV with every sample under
``benchmarks/results/<device-slug>/`` (stamped with device, versions, date and command); their detailed
tables go to ``bench.log`` there. Then two PNG plots, and a compact summary table printed last.

    python -m benchmarks.run            # default: ~5 minutes on a 2-core CPU or one H100
    python -m benchmarks.run --full     # large shapes, more steps, the whole p_last sweep
    python -m benchmarks.run --smoke    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time

from . import bench_epilogue, bench_resnet, bench_scheduler
from .common import (
    RESULTS_DIR,
    add_cpu_malloc_option,
    best_device,
    configure_cpu_malloc,
    copy_bandwidth,
    device_slug,
    environment,
    format_table,
    ratio_text,
)
from .plots import plot_epilogue, plot_resnet

BENCHES = {
    "scheduler": bench_scheduler,
    "epilogue": bench_epilogue,
    "resnet": bench_resnet,
}


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
def _summary(results: dict[str, list[dict]]) -> list[dict]:
    out = []
    for r in results.get("scheduler", []):
        if "cpp_us" in r:
            out.append({"what": f"scheduler sample({r['batch_size']}), {r['num_blocks']} blocks, {r['mode']}",
                        "sdepth_ext": f"{r['cpp_us']:.1f} us", "peers": f"python {r['python_us']:.0f} us",
                        "ratio": f"{r['speedup_cpp_vs_python']:.0f}x faster",
                        "ideal/limit": "< 20 us" if r["mode"] == "row" else ""})
    epi = [r for r in results.get("epilogue", []) if r["pass"] == "fwd+bwd"]
    for dtype in ("float32", "bfloat16"):
        sel = [r for r in epi if r["dtype"] == dtype]
        if not sel:
            continue
        r = max(sel, key=lambda r: r["bytes"])  # the largest shape: bandwidth-bound, the honest case
        peers = ", ".join(f"{v} {r[f'{v}_ms']:.3g} ms" for v in ("eager", "torchvision", "compiled")
                          if f"{v}_ms" in r)
        ratios = ", ".join(f"{r[f'x_vs_{v}']:.2f}x vs {v}" for v in ("eager", "compiled") if f"x_vs_{v}" in r)
        out.append({"what": f"epilogue fwd+bwd {r['shape']} {dtype} ({r['sdepth_backend']})",
                    "sdepth_ext": f"{r['sdepth_ms']:.3g} ms", "peers": peers, "ratio": ratios,
                    "ideal/limit": f"{r['sdepth_pct_copy']:.0f}% of copy b/w"})
    for r in results.get("resnet", []):
        if r["mode"] not in ("batch", "row") or r["p_last"] not in (0.2, 0.5):
            continue
        peers = [p for p in results["resnet"] if p["model"] == r["model"] and p["p_last"] == r["p_last"]
                 and p["mode"] in ("torchvision", "droppath")]
        what = f"{r['model']} b{r['batch']}@{r['size']} train step, {r['mode']} p_last={r['p_last']}"
        ratio = f"x{ratio_text(r)} of plain"
        limit = f"x{r['ideal_ratio']:.3f} FLOPs (drawn plans x{r['drawn_ideal_ratio']:.3f})"
        if "hand_ratio" in r:
            by_hand = "skipped by hand" if r["mode"] == "batch" else "as contiguous sub-batches"
            ratio += f"; x{ratio_text(r, 'over_hand')} of by-hand"
            limit += f"; same plans {by_hand} x{r['hand_ratio']:.3f}"
        out.append({"what": what,
                    "sdepth_ext": f"{r['mean_ms']:.0f} ms",
                    "peers": ", ".join(f"{p['mode']} x{p['ratio']:.2f}" for p in peers),
                    "ratio": ratio,
                    "ideal/limit": limit})
    return out


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds each (CI)")
    size.add_argument("--full", action="store_true", help="large shapes, more steps")
    parser.add_argument("--only", choices=sorted(BENCHES), action="append",
                        help="run only these benchmarks (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="print each benchmark's own tables too")
    add_cpu_malloc_option(parser)
    args = parser.parse_args(argv)
    configure_cpu_malloc(args.cpu_malloc)

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
            print(f"\n===== {name} {' '.join(flags)} =====", flush=True)
            results[name] = BENCHES[name].main(flags)
        log.write(f"[{name}: {time.perf_counter() - t0:.1f} s]\n")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    suffix = "_smoke" if args.smoke else ("_full" if args.full else "")
    (out_dir / f"bench{suffix}.log").write_text(log.getvalue())

    title = f"{env['device']} | torch {env['torch']}, triton {env['triton']} | {env['date']}"
    plots = [
        plot_epilogue(results.get("epilogue", []), out_dir / f"epilogue_bandwidth{suffix}.png", title),
        plot_resnet(results.get("resnet", []), out_dir / f"resnet_ratio{suffix}.png", title),
    ]
    summary = _summary(results)
    with open(out_dir / f"summary{suffix}.json", "w") as f:
        json.dump({"environment": env, "rows": summary}, f, indent=1)
    print(f"\nall benchmarks done in {time.perf_counter() - started:.0f} s; results, plots and bench.log in "
          f"{out_dir}")
    for p in plots:
        if p is not None:
            print(f"plot: {p}")
    print()
    print(format_table(summary, ["what", "sdepth_ext", "peers", "ratio", "ideal/limit"]))
    return results


if __name__ == "__main__":
    main()
