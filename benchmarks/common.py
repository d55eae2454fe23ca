"""Shared measurement and reporting helpers for the sdepth_ext benchmarks.

Every result file written through :func:`write_results` carries the same stamp (device, versions,
date, exact command), so a number in the README can always be traced back to the run that made it.
Timing is never asserted anywhere: benchmarks print ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import sdepth_ext.environment as _library_environment
from sdepth_ext.environment import best_device, device_name, device_slug
from sdepth_ext.train.files import atomic_write_csv, atomic_write_text

from .cpu_malloc import cpu_allocator, keep_freed_cpu_memory

__all__ = ["CSV_STAMP", "RESULTS_DIR", "best_device", "configure_cpu_malloc", "copy_bandwidth", "device_name",
           "device_slug", "environment", "format_table", "median", "parse_args", "parse_size_args",
           "print_environment", "ratio_text", "size_parser", "size_suffix", "synchronize", "time_fn",
           "time_interleaved", "trimmed_mean", "use_triton_interpreter_without_cuda", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The stamp keys repeated on every CSV row (the JSON files carry the whole stamp).
CSV_STAMP = ("device", "torch", "triton", "torchvision", "cpu_allocator", "dropped_grads", "date", "command")


def configure_cpu_malloc(choice: str) -> None:
    """Apply ``--cpu-malloc`` before anything is allocated; the result files' stamp records it."""
    if choice == "keep":
        keep_freed_cpu_memory()


def use_triton_interpreter_without_cuda() -> None:
    """Without CUDA, sdepth_ext's Triton kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` (a
    value already set is kept). ``@triton.jit`` reads it when a kernel is defined, which sdepth_ext does when
    it first loads its kernels (at the first Triton call, :func:`sdepth_ext.kernels.load_epilogue`): call
    this before. bench_host times the Python above the interpreter's launch; bench_footprint counts the
    launches of the GPU path on CPU tensors. On a CPU nothing else reads it (the other benchmarks run the
    torch path)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def size_parser(description: str, smoke_help: str, full_help: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's command line with its sizes: ``--smoke`` or ``--full`` (else the default size, what
    ``make bench`` runs); without ``full_help``, ``--smoke`` only (one size besides it). The benchmark adds
    its own options, then parses with :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help=smoke_help)
    if full_help is not None:
        size.add_argument("--full", action="store_true", help=full_help)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments and ``--cpu-malloc keep|default`` (every benchmark entry point takes it; ``make
    bench`` passes it on), which is applied before anything is allocated."""
    parser.add_argument(
        "--cpu-malloc", choices=("keep", "default"), default="keep",
        help="keep (default): glibc malloc keeps freed memory for reuse, as jemalloc/tcmalloc do "
             "(benchmarks.cpu_malloc.keep_freed_cpu_memory); default: the system allocator as it is, "
             "which can page-fault freed activations back in at each step")
    args = parser.parse_args(argv)
    configure_cpu_malloc(args.cpu_malloc)
    return args


def parse_size_args(argv: list[str] | None, description: str, smoke_help: str,
                    full_help: str | None = None) -> argparse.Namespace:
    """The command line of a benchmark with no options of its own: its sizes and ``--cpu-malloc``."""
    return parse_args(size_parser(description, smoke_help, full_help), argv)


def size_suffix(smoke: bool, full: bool = False) -> str:
    """The result files' name suffix for a run's size: ``_smoke``, ``_full``, none at the default size."""
    return "_smoke" if smoke else "_full" if full else ""


def environment(device: torch.device | None = None) -> dict:
    """The library's stamp (:func:`sdepth_ext.environment.environment`), with the ``cpu_allocator`` this
    process runs with: the ``--cpu-malloc`` setting once :func:`configure_cpu_malloc` applied it."""
    return _library_environment.environment(device, cpu_allocator=cpu_allocator())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeat: int = 20,
            min_time_s: float = 0.0, calls: int = 1) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls; each sample times ``calls`` back-to-back calls.

    On CUDA a sample is bracketed by events. With ``calls=1`` (a train step: milliseconds) the GPU may be
    idle when timing starts, so the host's time to issue the first launch is included. ``calls > 1``
    measures throughput for short ops: one untimed call runs ahead of the first event, so the GPU is busy
    while the timed calls are issued, and as long as the host issues them faster than the GPU runs them the
    events measure device time, not launch overhead (a single call on an idle GPU adds its launch in full:
    tens of microseconds for a Python op, as long as a 10 MB epilogue runs on an H100). When the host is
    the slower one, it measures what back-to-back calls really achieve. On CPU ``perf_counter`` around the
    calls. Returns every sample so callers can keep them all in the result files.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start_all < min_time_s:
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if calls > 1:
                fn()  # lead-in: keeps the GPU busy while the timed calls are issued
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) / calls)
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                     repeat: int = 20, calls: int = 1,
                     groups: Sequence[Sequence[str]] = ()) -> dict[str, list[float]]:
    """Time several variants round-robin, so drifts in clock or load hit all of them alike.

    Each round runs the variants in a new (seeded) random order, so no variant always runs first or always
    right after the same other one (whose leftover cache or allocator state would then bias only it).
    ``groups``: variants compared sample by sample (a step and its comparators on the same plans), two or
    more each, run back to back in every round, in a random order within the group, so that the load of a
    shared machine, which drifts over seconds, hits a group's samples alike. ``calls``: back-to-back calls
    per sample (:func:`time_fn`).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    grouped = [name for group in groups for name in group]
    if (len(set(grouped)) != len(grouped) or not set(grouped) <= set(fns)
            or any(len(group) < 2 for group in groups)):
        raise ValueError("groups: expected disjoint groups of two or more of the variants' names, "
                         f"got {[list(group) for group in groups]}")
    order_groups = [list(group) for group in groups] + [[name] for name in fns if name not in grouped]
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeat):
        order.shuffle(order_groups)
        for group in order_groups:
            order.shuffle(group)
            for name in group:
                samples[name].extend(time_fn(fns[name], device, warmup=0, repeat=1, calls=calls))
    return samples


def copy_bandwidth(device: torch.device, smoke: bool = False) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write) on a buffer far larger than the cache: the practical
    ceiling for any memory-bound kernel on this device, measured rather than taken from a spec sheet."""
    if device.type == "cuda":
        numel = 2**26 if smoke else 2**28  # 256 MiB / 1 GiB of fp32
    else:
        numel = 2**22 if smoke else 2**24
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    calls = 3 if device.type == "cuda" else 1  # device time, as the epilogue's is measured (time_fn)
    samples = time_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=2, repeat=5 if smoke else 20,
                               calls=calls)
    return 2 * src.numel() * src.element_size() / median(samples["copy"])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def trimmed_mean(xs: Sequence[float], fraction: float = 0.1) -> float:
    """Mean without the ``fraction`` slowest and fastest samples (at least one each from 10 samples on).

    A shared VM now and then stalls a process for a second or more (seen here: 2.7 s steps among 0.35 s ones,
    in a few consecutive rounds, for some variants and not others); one such sample moves a 10-sample mean by
    more than half. Trimming both ends symmetrically keeps an estimate of the mean for the symmetric spread of
    step times that random plans give.
    """
    ordered = sorted(xs)
    cut = int(len(ordered) * fraction)
    return statistics.fmean(ordered[cut:len(ordered) - cut])


def bootstrap_interval(statistic: Callable[..., float], *samples: Sequence[float], rounds: int = 2000,
                       level: float = 0.95, runs: Sequence[int] | None = None) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(*samples)``, resampling the rounds.

    Sample i of every list ran in the same round (:func:`time_interleaved`), so rounds are resampled
    together: a load drift that slowed one round slows every side of it. ``runs``: the process each round
    ran in, when the rounds come from several (one label per round): the processes are resampled first,
    then the rounds within each (a cluster bootstrap), so the interval also covers how much one process's
    timings differ from the next one's. Seeded: same samples, same interval.
    """
    n = min(len(s) for s in samples)
    labels = [0] * n if runs is None else list(runs[:n])
    groups = [[i for i in range(n) if labels[i] == label] for label in dict.fromkeys(labels)]
    rng = random.Random(0)
    values = []
    for _ in range(rounds):
        chosen = groups if len(groups) == 1 else [groups[rng.randrange(len(groups))] for _ in groups]
        idx = [group[rng.randrange(len(group))] for group in chosen for _ in group]
        values.append(statistic(*([s[i] for i in idx] for s in samples)))
    values.sort()
    tail = (1.0 - level) / 2
    return values[int(tail * rounds)], values[min(rounds - 1, int((1.0 - tail) * rounds))]


def ratio_interval(samples: Sequence[float], reference: Sequence[float], rounds: int = 2000,
                   level: float = 0.95, runs: Sequence[int] | None = None) -> tuple[float, float]:
    """The :func:`bootstrap_interval` of ``trimmed_mean(samples) / trimmed_mean(reference)``."""
    return bootstrap_interval(lambda s, r: trimmed_mean(s) / trimmed_mean(r), samples, reference,
                              rounds=rounds, level=level, runs=runs)


def write_results(name: str, rows: list[dict], env: dict, *, samples: dict | None = None,
                  out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (stamp + rows + raw samples) and ``<name>.csv`` (stamp on every row).

    Files go to ``benchmarks/results/<device-slug>/`` unless ``out_dir`` is given. The stamp must hold every
    :data:`CSV_STAMP` key (``cpu_allocator`` included): a file without it could not be traced to its run.
    """
    missing = [k for k in CSV_STAMP if not env.get(k) and k not in ("triton", "torchvision")]
    if missing:  # triton/torchvision may be absent (None); the rest must be known
        raise ValueError(f"write_results({name!r}): the stamp lacks {missing}; build it with "
                         "benchmarks.common.environment()")
    if out_dir is None:
        out_dir = RESULTS_DIR / env["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    csv_path = out_dir / f"{name}.csv"
    # Atomic replacement: a benchmark killed while writing leaves the previous result files whole.
    atomic_write_text(json_path, json.dumps({"environment": env, "rows": rows, "samples": samples or {}},
                                            indent=1))
    stamp = {k: env.get(k) for k in CSV_STAMP}
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    atomic_write_csv(csv_path, [*fields, *stamp], ({**row, **stamp} for row in rows))
    return json_path, csv_path


def ratio_text(row: dict, key: str = "ratio", fmt: str = ".3f") -> str:
    """``0.787 [0.771, 0.803]``: a row's ratio ``key`` with its 95% interval (when it has one), each number
    formatted by ``fmt`` (``"+.3f"`` for a difference)."""
    text = format(row[key], fmt)
    if f"{key}_ci95_low" in row:
        text += f" [{format(row[f'{key}_ci95_low'], fmt)}, {format(row[f'{key}_ci95_high'], fmt)}]"
    return text


def format_table(rows: list[dict], columns: Sequence[str], max_width: int | None = None) -> str:
    """A plain fixed-width table of ``columns`` (floats get 4 significant digits).

    ``max_width``: lines no longer than this; the widest columns are narrowed and their cells wrapped onto
    continuation lines as needed (never below 8 characters a column).
    """

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    gaps = 2 * (len(columns) - 1)
    while max_width is not None and sum(widths) + gaps > max_width and max(widths) > 8:
        widest = widths.index(max(widths))
        widths[widest] = max(8, widths[widest] - (sum(widths) + gaps - max_width))

    def lines_of(cells: list[str]) -> list[str]:
        wrapped = [[v] if len(v) <= w else textwrap.wrap(v, w) for v, w in zip(cells, widths)]
        height = max(len(w) for w in wrapped)
        return ["  ".join((w[k] if k < len(w) else "").ljust(n) for w, n in zip(wrapped, widths)).rstrip()
                for k in range(height)]

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([*lines_of(list(columns)), sep, *(line for b in body for line in lines_of(b))])


def print_environment(env: dict) -> None:
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
