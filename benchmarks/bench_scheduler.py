"""Gate scheduler: time of ``Scheduler.sample(128)`` for ResNet-110's 54 blocks, C++ vs Python fallback.

Each training step calls ``sample`` once, so its time is pure overhead on the step. Both backends draw the
identical plans (tested), so this compares like with like. Run: ``python -m benchmarks.bench_scheduler``.
"""

from __future__ import annotations

import argparse
import time

import sdepth_ext as sd

from .common import (
    environment,
    format_table,
    median,
    parse_args,
    print_environment,
    size_suffix,
    write_results,
)

NUM_BLOCKS = 54  # ResNet-110: 3 stages x 18 BasicBlocks
BATCH = 128


def _time_calls(fn, calls: int, repeats: int) -> list[float]:
    """Per-call seconds, averaged over ``calls`` back-to-back calls, ``repeats`` times."""
    fn()  # warm-up: first call allocates the scratch buffers
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls)
    return out


def run(quick: bool = True, smoke: bool = False) -> list[dict]:
    survival = sd.linear_decay(NUM_BLOCKS, 0.5)
    backends = ["cpp", "python"] if sd.has_compiled_scheduler() else ["python"]
    repeats = 3 if smoke else (15 if quick else 41)
    rows, samples = [], {}
    for mode in ("row", "batch"):
        times = {}
        for backend in backends:
            sched = sd.Scheduler(survival, mode=mode, seed=0, backend=backend)
            slow = backend == "python" and mode == "row"
            calls = (2 if smoke else 20) if slow else (200 if smoke else 2000)
            ts = _time_calls(lambda s=sched: s.sample(BATCH), calls, repeats)
            samples[f"{mode}/{backend}"] = ts
            times[backend] = median(ts)
        row = {"bench": "scheduler", "mode": mode, "num_blocks": NUM_BLOCKS, "batch_size": BATCH,
               "python_us": times["python"] * 1e6}
        if "cpp" in times:
            row["cpp_us"] = times["cpp"] * 1e6
            row["speedup_cpp_vs_python"] = times["python"] / times["cpp"]
        rows.append(row)
    return rows, samples


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run, for CI")
    parser.add_argument("--full", action="store_true", help="more repeats")
    args = parse_args(parser, argv)
    env = environment()
    print_environment(env)
    rows, samples = run(quick=not args.full, smoke=args.smoke)
    print(format_table(rows, ["mode", "num_blocks", "batch_size", "cpp_us", "python_us",
                              "speedup_cpp_vs_python"]))
    paths = write_results("scheduler" + size_suffix(args.smoke, args.full), rows, env, samples=samples)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
