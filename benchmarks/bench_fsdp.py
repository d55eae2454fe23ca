"""FSDP2 train-step time and collectives per step: plain FSDP2 vs ``sd.fully_shard``.

Two processes (gloo on this machine's CPU; ``--backend nccl`` on a machine with several GPUs, one GPU per
rank). Every variant is a CIFAR ResNet with the same weights, sharded into the same groups (one per block,
projection shortcuts on their own, then the root); steps run round-robin over the variants (a barrier before
each) so load drifts hit all alike:

* ``plain``:     the unconverted model, ``fully_shard`` per block by hand (what every layer costs)
* ``all_units``: converted at p_last = 1 (nothing dropped): the cost of the machinery itself
* ``batch``, ``row``, ``subset``: converted at p_last = 0.5 in that mode, ``sd.fully_shard``

Collectives per step, and the elements they move, are counted (exact: ``sdepth_ext.fsdp.count_collectives``)
in extra steps after the timed ones, so that the counting itself does not slow the timed steps. The helper's
groups cost more collectives than one group per block (a projection shortcut is a group of its own) and move
fewer elements (a dropped block's branch stays sharded). In batch mode a unit dropped on every
rank skips its three collectives; row and subset mode run every unit on some rank, so they save compute only.

Run: ``python -m benchmarks.bench_fsdp [--smoke | --full] [--count-only] [--backend gloo|nccl]
[--cpu-malloc keep|default]``. ``--count-only`` skips the timed steps: exact counts on any machine, no times.
Prints median step times, ratios and collectives; writes JSON + CSV (``benchmarks.common.write_results``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sdepth_ext as sd
from sdepth_ext.fsdp import count_collectives
from sdepth_ext.state import units_of

from . import common
from .workers import WORLD, group_environment, process_group, run_workers, save_measured

VARIANTS = ("plain", "all_units", "batch", "row", "subset")
CONFIGS = {  # depth, batch per rank, image size, timed steps, warm-up steps, counted steps
    "smoke": (8, 4, 16, 2, 1, 2),
    "default": (20, 32, 32, 15, 3, 10),
    "full": (56, 64, 32, 30, 5, 20),
}


def _shard_by_block(model: torch.nn.Module) -> None:
    """``sd.fully_shard``'s groups for a model that is not converted: per block its parts outside the
    residual branch (a projection shortcut) first, then the block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block, _, adapter in units_of(model):
        branch = {id(m) for m in adapter.branch_modules(block, 0)}
        for child in block.children():
            if id(child) not in branch and next(child.parameters(), None) is not None:
                fully_shard(child)
        fully_shard(block)
    fully_shard(model)


def _make(variant: str, depth: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = sd.cifar_resnet(depth).to(device).train()
    if variant == "plain":
        _shard_by_block(model)
        return model
    mode = "batch" if variant == "all_units" else variant
    sd.convert(model, p_last=1.0 if variant == "all_units" else 0.5, mode=mode, seed=1234)
    sd.set_dropped_grads(model, "zero")  # the default from now on; both policies skip the same collectives
    return sd.fully_shard(model)


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _measure(rank: int, config: tuple, device: torch.device) -> tuple[dict, dict]:
    """Each variant's step times on this rank, and the collectives of its counted steps."""
    depth, batch, size, steps, warmup, counted = config
    models = {v: _make(v, depth, device) for v in VARIANTS}
    opts = {v: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for v, m in models.items()}
    g = torch.Generator().manual_seed(rank)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    collectives: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for step in range(warmup + steps + counted):
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        for v, model in models.items():
            dist.barrier()
            if step >= warmup + steps:  # counted, not timed
                with count_collectives() as c:
                    _step(model, opts[v], x, y)
                # elements moved: what the all-gathers produce and what the reduce-scatters reduce (their
                # first argument is the output: the full tensor, the shard)
                moved = sum(n * (WORLD if kind == "reduce_scatter" else 1) for kind, n in c.calls)
                collectives[v].append({**c.counts, "elements": moved})
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _step(model, opts[v], x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                samples[v].append(time.perf_counter() - t0)
    return samples, collectives


def _worker(rank: int, out_path: str, port: int, config: tuple, backend: str, cpu_malloc: str) -> None:
    with process_group(rank, port, backend, cpu_malloc) as device:
        # the sharded models live in _measure only: see workers.process_group
        samples, collectives = _measure(rank, config, device)
        save_measured(rank, out_path, samples=samples, collectives=collectives)


def run(size: str = "default", backend: str = "gloo", timeout_s: float = 1800.0,
        cpu_malloc: str = "keep", count_only: bool = False) -> tuple[list[dict], dict, str]:
    """Rows, samples, and the ``cpu_allocator`` the workers ran with (their timing is what the rows hold)."""
    config = CONFIGS[size]
    if count_only:
        config = (*config[:3], 0, 0, config[5])
    saved = run_workers(_worker, (config, backend, cpu_malloc), "bench_fsdp", timeout_s)
    samples, collectives = saved["samples"], saved["collectives"]
    depth, batch, image, steps, _, counted = config

    def per_step(v: str, kind: str | None) -> float:
        return statistics.mean(
            sum(n for k, n in c.items() if k != "elements") if kind is None else c.get(kind, 0)
            for c in collectives[v])

    def median_ms(v: str) -> float | None:
        return statistics.median(samples[v]) * 1e3 if samples[v] else None

    ref_ms = median_ms("plain")
    ref_comm = per_step("plain", None)
    rows = []
    for v in VARIANTS:
        ms = median_ms(v)
        rows.append({"bench": "fsdp", "variant": v, "mode": {"plain": "", "all_units": "batch"}.get(v, v),
                     "p_last": 1.0 if v in ("plain", "all_units") else 0.5, "depth": depth,
                     "batch_per_rank": batch, "image": image, "world_size": WORLD, "backend": backend,
                     "steps": steps, "step_ms": ms, "ratio_vs_plain": None if ms is None else ms / ref_ms,
                     "counted_steps": counted, "all_gather_per_step": per_step(v, "all_gather"),
                     "reduce_scatter_per_step": per_step(v, "reduce_scatter"),
                     "collectives_per_step": per_step(v, None),
                     "collectives_vs_plain": per_step(v, None) / ref_comm,
                     "elements_per_step": per_step(v, "elements"),
                     "elements_vs_plain": per_step(v, "elements") / per_step("plain", "elements")})
    return rows, {"step_s": samples, "collectives": collectives}, saved["cpu_allocator"]


def main(argv=None) -> list[dict]:
    parser = common.size_parser(__doc__.splitlines()[0],
                                smoke_help="seconds-long run, for CI (not a measurement)",
                                full_help="ResNet-56, batch 64 per rank, more steps")
    parser.add_argument("--count-only", action="store_true",
                        help="no timed steps: collectives and elements per step only (exact anywhere)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="gloo on CPUs (default); nccl with one GPU per rank")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write fsdp*.json/csv (default: benchmarks/results/<device>)")
    # --cpu-malloc: this process's stamp; the workers apply it themselves
    args = common.parse_args(parser, argv)
    size = "smoke" if args.smoke else "full" if args.full else "default"
    env = group_environment(args.backend)
    common.print_environment(env)
    rows, samples, env["cpu_allocator"] = run(size, args.backend, cpu_malloc=args.cpu_malloc,
                                              count_only=args.count_only)
    columns = ["variant", "mode", "step_ms", "ratio_vs_plain", "all_gather_per_step",
               "reduce_scatter_per_step", "collectives_vs_plain", "elements_vs_plain"]
    print(common.format_table(rows, columns))
    name = "fsdp" + common.size_suffix(args.smoke, args.full) + ("_counts" if args.count_only else "")
    paths = common.write_results(name, rows, env, samples=samples, out_dir=args.out_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
