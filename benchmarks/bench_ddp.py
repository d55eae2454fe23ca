"""DDP train-step time: ``sd.ddp_ready`` (default flags) vs ``find_unused_parameters=True``, side by side.

Two gloo processes on this machine (CPU; the same code runs on GPUs with gloo). Every variant is a
converted CIFAR ResNet with the same weights and the same gate stream, so all variants drop the same blocks in
the same step; steps run round-robin over the variants (a barrier before each) so load drifts hit all alike.

* ``ddp_ready``:   ``sd.ddp_ready(model)``; ``DistributedDataParallel(model)`` (find_unused_parameters=False)
* ``find_unused``: ``DistributedDataParallel(model, find_unused_parameters=True)`` (an autograd-graph
  traversal after every forward to find the parameters that got no gradient)
* ``all_blocks``:  p_last = 1 (nothing dropped), default flags: the cost of the full network, for scale

Run: ``python -m benchmarks.bench_ddp [--smoke | --full] [--cpu-malloc keep|default]``. Prints median step
times and ratios; writes JSON + CSV through ``benchmarks.common.write_results``, stamped with the CPU
allocator the worker processes ran with (``--cpu-malloc`` is applied in each of them).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import sdepth_ext as sd

from . import common
from .workers import WORLD, group_environment, process_group, run_workers, save_measured

VARIANTS = ("ddp_ready", "find_unused", "all_blocks")
CONFIGS = {  # depth, batch per rank, image size, timed steps, warm-up steps
    "smoke": (8, 4, 16, 3, 1),
    "default": (20, 32, 32, 15, 3),
    "full": (56, 64, 32, 30, 5),
}


def _make(variant: str, mode: str, depth: int):
    torch.manual_seed(0)
    model = sd.cifar_resnet(depth)
    sd.convert(model, p_last=1.0 if variant == "all_blocks" else 0.5, mode=mode, seed=1234).train()
    sd.ddp_ready(model)  # the broadcast is a no-op here: every rank already has seed 1234
    if variant == "find_unused":
        # Same plans as ddp_ready (row mode: each rank's slice of the global plan), but dropped blocks get
        # no gradient and DDP searches the graph for them.
        sd.set_dropped_grads(model, "none")
        return DistributedDataParallel(model, find_unused_parameters=True)
    return DistributedDataParallel(model)


def _time_steps(rank: int, config: tuple) -> dict[str, list[float]]:
    """Each variant's step times on this rank, keyed ``mode/variant``."""
    depth, batch, size, steps, warmup = config
    samples: dict[str, list[float]] = {}
    for mode in ("batch", "row"):
        models = {v: _make(v, mode, depth) for v in VARIANTS}
        opts = {v: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for v, m in models.items()}
        g = torch.Generator().manual_seed(rank)
        for step in range(warmup + steps):
            x = torch.randn(batch, 3, size, size, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            for v, model in models.items():
                dist.barrier()
                t0 = time.perf_counter()
                opts[v].zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opts[v].step()
                elapsed = time.perf_counter() - t0
                if step >= warmup:
                    samples.setdefault(f"{mode}/{v}", []).append(elapsed)
    return samples


def _worker(rank: int, out_path: str, port: int, config: tuple, cpu_malloc: str) -> None:
    with process_group(rank, port, "gloo", cpu_malloc):
        # the DDP models live in _time_steps only: see workers.process_group
        save_measured(rank, out_path, samples=_time_steps(rank, config))


def run(size: str = "default", timeout_s: float = 1800.0,
        cpu_malloc: str = "keep") -> tuple[list[dict], dict, str]:
    """Rows, samples, and the ``cpu_allocator`` the workers ran with (their timing is what the rows hold)."""
    config = CONFIGS[size]
    saved = run_workers(_worker, (config, cpu_malloc), "bench_ddp", timeout_s)
    samples, workers_allocator = saved["samples"], saved["cpu_allocator"]
    depth, batch, image, steps, _ = config
    rows = []
    for mode in ("batch", "row"):
        ref = statistics.median(samples[f"{mode}/find_unused"])
        for v in VARIANTS:
            ms = statistics.median(samples[f"{mode}/{v}"])
            rows.append({"bench": "ddp", "mode": mode, "variant": v, "depth": depth, "batch_per_rank": batch,
                         "image": image, "world_size": WORLD, "steps": steps, "step_ms": ms * 1e3,
                         "ratio_vs_find_unused": ms / ref,
                         "dropped_grads": "none" if v == "find_unused" else "zero"})
    return rows, samples, workers_allocator


def main(argv=None) -> list[dict]:
    parser = common.size_parser(__doc__.splitlines()[0], smoke_help="seconds-long run, for CI",
                         full_help="ResNet-56, batch 64 per rank, more steps")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write ddp*.json/csv (default: benchmarks/results/cpu)")
    # --cpu-malloc: this process's stamp; the workers apply it themselves
    args = common.parse_args(parser, argv)
    size = "smoke" if args.smoke else "full" if args.full else "default"
    env = group_environment("gloo")
    common.print_environment(env)
    rows, samples, env["cpu_allocator"] = run(size, cpu_malloc=args.cpu_malloc)
    columns = ["mode", "variant", "depth", "batch_per_rank", "step_ms", "ratio_vs_find_unused"]
    print(common.format_table(rows, columns))
    paths = common.write_results("ddp" + common.size_suffix(args.smoke, args.full), rows, env,
                                 samples=samples, out_dir=args.out_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
