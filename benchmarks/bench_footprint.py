"""Footprint of a train step, counted (not timed): activation memory kept for backward, kernel launches.

On a GPU, memory decides the batch a user can fit and on small steps launches decide the time. Both are
counted exactly, on any machine (:mod:`benchmarks.counting`), for bench_models' models and sizes at the
headline drop rates (ResNets p_last 0.5; torchvision models stochastic_depth_prob 0.5; timm models at
bench_models' highest drop_path_rate, 0.4; Hugging Face transformers' Dinov2 and ConvNextV2, where
installed, at drop_path_rate 0.5). Variants per model:

* ``full``: every unit runs, nothing dropped (the plain ResNet; the model built at rate 0);
* ``original``: what users run today, a mask-multiply stochastic depth that computes every unit (the
  model's own StochasticDepth/DropPath, HF's ``<Model>DropPath``, at the rate; ResNets:
  ``torchvision.ops.stochastic_depth`` on the residual of the same blocks, bench_models' peer);
* ``sdepth batch`` / ``sdepth row``: ``sd.convert`` in that mode at the same rates (seed 0), with the
  dropped-unit gradient policy set explicitly (``sd.set_dropped_grads``), ``"none"`` and ``"zero"`` on the
  same plans: their difference is what ``"zero"`` costs (counted again only where a plan has a unit
  without survivors, the only units the policy touches).

Each sdepth configuration of a step replays the same plan (the scheduler's step is set back), after a
warm-up step that fills the caches of first calls (launch geometry, fp32 scales). Per row (means over the
counted steps; forward + backward, no optimizer step, which is the same for every variant):

* ``saved_bytes`` (``saved_mib``): bytes of the distinct storages autograd saves for backward on the path a
  GPU takes, parameters and buffers left out; ``saved_bytes_cpu``: the same on the CPU's torch path (more
  for ReLU units in row mode: there the branch keeps its gathered rows instead of gathering them again);
* ``launches_gpu``: kernel launches on the path a GPU takes, ATen ops that launch a kernel plus Triton
  launches (without a GPU the units take that path on CPU tensors through
  ``sdepth_ext.functional.gpu_path_on_cpu``, each Triton launch counted, its grid not executed);
  ``launches_cpu``: the same on the CPU's torch path (not counted on a GPU machine);
* ideals of the plans drawn (means over the steps), each next to what the row saves above it (minus the
  ideal: plan-independent, so batch and row mode compare on it though they draw different plans):

  - ``saved_ideal_x_full`` / ``saved_over_ideal``, the memory ideal: ``(outside + sum_l (K_l / N *
    unit_bytes_l + (1 - K_l / N) * dropped_bytes_l)) / full`` with K_l of N samples surviving unit l.
    ``unit_bytes_l`` is the full network's saved bytes attributed to unit l (each storage to the unit whose
    forward first saved it: a one-unit block's whole forward, shortcut and ReLU after the add included; a
    ViT or Swin unit's branch modules; ``benchmarks.counting.unit_parts``), ``outside`` the rest (stem,
    head), and ``dropped_bytes_l`` what the unit's dropped form still saves (``relu(downsample(x))`` for a
    ResNet stage's first unit, nothing for an identity shortcut), all counted on the full row's step
    (``saved_unit_bytes``, ``saved_outside_units_bytes``, ``saved_dropped_unit_bytes``). It is the bound a
    skip reaches: a batch plan skipped by hand saves exactly the ideal, as tests check on every batch plan
    of small models;
  - ``flop_ideal_x_full`` / ``saved_over_flop_ideal``, the share of the full network's multiply-accumulates
    the plans run (:func:`sdepth_ext.flops.compute_fraction`), the ideal the issue named. It is no memory
    bound a skip can reach: units' memory is not proportional to their FLOPs (early ResNet stages keep more
    activation per FLOP and survive more often under the linear-decay rule), so even a skip of exactly the
    plan's units sits above it;
  - ``launches_ideal``, the full network less the work of the units the plan dropped entirely (those units
    skipped by hand, every other unit run whole, eager);
* ``by_hand_saved_bytes`` / ``by_hand_launches``: bench_models' comparators on the same plan (batch mode:
  the units skipped by hand, equal to ``launches_ideal``; row mode: each unit's survivors run as the first K
  samples, a view, and concatenated back: the row gather and scatter for free);
* ``x_full`` / ``x_original`` ratios to the ``full`` / ``original`` rows; ``peak_mib``: the step's peak
  allocation above its start (``torch.cuda.max_memory_allocated``), CUDA only.

    python -m benchmarks.bench_footprint            # about 2 minutes on a 2-core CPU
    python -m benchmarks.bench_footprint --smoke    # seconds: two models at tiny sizes (and the HF ones)
"""

from __future__ import annotations

import copy
import statistics
import types

import torch
from torch import nn

import sdepth_ext as sd
from sdepth_ext.flops import compute_fraction, unit_macs
from sdepth_ext.state import get_state, units_of

from .common import (
    best_device,
    environment,
    format_table,
    parse_size_args,
    print_environment,
    size_suffix,
    use_triton_interpreter_without_cuda,
    write_results,
)
from .counting import count_step
from .models import HF_MODELS, model_configs, num_classes_of, skip_by_hand, with_peer

# The units' GPU path runs on CPU tensors through Triton's interpreter: set on import, before kernels load.
use_triton_interpreter_without_cuda()

RESNET_P_LAST = 0.5
OWN_SD_RATE = 0.5  # torchvision and HF models; timm models: the highest rate bench_models times (TIMM_RATES)
POLICIES = ("none", "zero")
MODES = ("batch", "row")
STEPS = {"smoke": 1, "quick": 1, "full": 3}
MIB = 2**20


def _rate(config: dict) -> float:
    if config["kind"] == "resnet":
        return RESNET_P_LAST
    return max(config["rates"]) if config.get("rates") else OWN_SD_RATE


def _models(config: dict, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module, dict]:
    """(full network, masked original at the rate, the model sd.convert takes, its keyword arguments)."""
    rate = _rate(config)
    if config["kind"] == "resnet":
        full = config["make"]().to(device)
        original = with_peer(copy.deepcopy(full), "torchvision", rate)  # its blocks' forward replaced
        return full, original, full, {"p_last": rate}
    full = config["make"](0.0).to(device)
    original = config["make"](rate).to(device)
    original.load_state_dict(full.state_dict())
    return full, original, original, {}  # converted with the model's own rates


def _counted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gpu_path: bool,
             by_unit: bool = False) -> dict:
    """One counted step; the peak allocation above the step's start where the device tells it. ``by_unit``:
    its saved bytes split among the units as well (:func:`benchmarks.counting.count_step`)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        start = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    counts = count_step(model, x, y, gpu_path=gpu_path and not x.is_cuda, run_triton=x.is_cuda,
                        by_unit=by_unit)
    counts["peak_bytes"] = torch.cuda.max_memory_allocated(x.device) - start if x.is_cuda else None
    return counts


def _by_hand(full: nn.Module, scales: list[float]) -> tuple[nn.Module, dict]:
    """A copy of ``full`` running by hand whatever plan counts ``current["plan"].counts`` says (bench_models'
    comparators: a unit with no survivor skipped, all survivors run whole and eager, K of N run on the first
    K samples, a view, and concatenated): ``(model, current)``."""
    model = copy.deepcopy(full).train()
    return model, skip_by_hand(model, scales)


def memory_ideal(outside_bytes: int, unit_bytes: list[int], counts: list[int], batch: int,
                 dropped_bytes: list[int]) -> float:
    """Bytes a step of the plan ``counts`` (K_l of ``batch`` samples through unit l) would save if each unit
    kept its share of what it keeps in the full network, and its dropped samples what the unit's dropped
    form keeps (a projection shortcut still runs for them): ``outside + sum_l (K_l / N * unit_bytes_l +
    (1 - K_l / N) * dropped_bytes_l)``."""
    if not len(counts) == len(unit_bytes) == len(dropped_bytes):
        raise ValueError(f"counts has {len(counts)} units, the full network {len(unit_bytes)} "
                         f"({len(dropped_bytes)} dropped forms)")
    return outside_bytes + sum(k / batch * b + (1 - k / batch) * d
                               for k, b, d in zip(counts, unit_bytes, dropped_bytes))


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _sdepth_rows(model: nn.Module, full: nn.Module, full_run: dict, x: torch.Tensor, y: torch.Tensor,
                 steps: int, per_unit: list[float], total: float) -> list[dict]:
    """Rows of one converted model (one mode), one per dropped-gradient policy, over ``steps`` plans;
    ``full_run``: the full network's step counted ``by_unit``."""
    on_gpu = x.is_cuda
    state = get_state(model)
    batch = x.shape[0]
    scales = [state.train_scale(l) for l in range(len(state.units))]
    by_hand, by_hand_plan = _by_hand(full, scales)
    skipping, skipping_plan = _by_hand(full, scales)
    _counted(model, x, y, gpu_path=True)  # warm-up: first calls fill caches (launch geometry, fp32 scales)
    first = state.scheduler.step
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for s in range(steps):
        # Every configuration of this step runs the same plan: the scheduler's step is set back.
        sd.set_dropped_grads(model, POLICIES[0])
        state.scheduler.step = first + s
        base = _counted(model, x, y, gpu_path=True)
        plan = state.host_plan
        if not on_gpu:  # the CPU's torch path
            state.scheduler.step = first + s
            cpu = _counted(model, x, y, gpu_path=False)
            base["cpu"], base["cpu_saved"] = cpu["launches"], cpu["saved_bytes"]
        runs[POLICIES[0]].append(base)
        for policy in POLICIES[1:]:
            # The policies differ only for units without a survivor (row mode at these batch sizes: rarely).
            if 0 in plan.counts:
                sd.set_dropped_grads(model, policy)
                state.scheduler.step = first + s
                runs[policy].append(_counted(model, x, y, gpu_path=True))
            else:
                runs[policy].append({k: v for k, v in base.items() if k not in ("cpu", "cpu_saved")})
        # The comparators, on the same plan.
        base["flop_ideal"] = compute_fraction(per_unit, total, [c / batch for c in plan.counts])
        base["saved_ideal"] = memory_ideal(full_run["saved_outside_units"], full_run["saved_by_unit"],
                                           plan.counts, batch, full_run["saved_dropped_by_unit"])
        by_hand_plan["plan"] = types.SimpleNamespace(counts=list(plan.counts))
        hand = _counted(by_hand, x, y, gpu_path=False)
        base["by_hand_saved"], base["by_hand_launches"] = hand["saved_bytes"], hand["launches"]
        if all(c in (0, batch) for c in plan.counts):
            base["ideal_launches"] = hand["launches"]  # batch plans: the same comparator
        elif 0 not in plan.counts:
            base["ideal_launches"] = full_run["launches"]  # no unit dropped entirely: the full network's
        else:
            skipping_plan["plan"] = types.SimpleNamespace(counts=[batch if c else 0 for c in plan.counts])
            base["ideal_launches"] = _counted(skipping, x, y, gpu_path=False)["launches"]
    rows = []
    for policy in POLICIES:
        same = runs[policy]
        default = runs[POLICIES[0]]  # the plan's ideals and comparators do not depend on the policy
        rows.append({"variant": f"sdepth {state.mode}", "mode": state.mode, "dropped_grads": policy,
                     "steps": len(same), "saved_bytes": _mean(same, "saved_bytes"),
                     "launches_gpu": _mean(same, "launches"), "peak_bytes": _mean(same, "peak_bytes"),
                     "launches_cpu": _mean(same, "cpu"), "saved_bytes_cpu": _mean(same, "cpu_saved"),
                     "saved_ideal_bytes": _mean(default, "saved_ideal"),
                     "flop_ideal_x_full": _mean(default, "flop_ideal"),
                     "by_hand_saved_bytes": _mean(default, "by_hand_saved"),
                     "by_hand_launches": _mean(default, "by_hand_launches"),
                     "launches_ideal": _mean(default, "ideal_launches")})
    return rows


def bench_model(config: dict, device: torch.device, steps: int) -> list[dict]:
    torch.manual_seed(0)
    full, original, to_convert, convert_kwargs = _models(config, device)
    batch, size = config["batch"], config["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes_of(full, x), (batch,), device=device)
    per_unit, total = unit_macs(full, x[:1])
    head = {"model": config["name"], "family": units_of(full)[0][2].family, "batch": batch, "size": size,
            "rate_kind": "p_last" if config["kind"] == "resnet" else "stochastic_depth_prob",
            "rate": _rate(config)}
    rows, runs = [], {}
    for name, model in (("full", full), ("original", original)):
        # No converted unit: one path. The full network's step also splits what it saves among the units,
        # which prices them in the memory ideal.
        run = runs[name] = _counted(model.train(), x, y, gpu_path=False, by_unit=name == "full")
        on_cpu = not x.is_cuda
        rows.append({"variant": name, "mode": None, "dropped_grads": None, "steps": 1,
                     "saved_bytes": run["saved_bytes"], "launches_gpu": run["launches"],
                     "launches_cpu": run["launches"] if on_cpu else None,
                     "saved_bytes_cpu": run["saved_bytes"] if on_cpu else None,
                     "peak_bytes": run["peak_bytes"]})
    rows[0]["saved_outside_units_bytes"] = runs["full"]["saved_outside_units"]
    rows[0]["saved_unit_bytes"] = runs["full"]["saved_by_unit"]
    rows[0]["saved_dropped_unit_bytes"] = runs["full"]["saved_dropped_by_unit"]
    for mode in MODES:
        model = sd.convert(copy.deepcopy(to_convert), mode=mode, seed=0, **convert_kwargs).train()
        rows += _sdepth_rows(model, full, runs["full"], x, y, steps, per_unit, total)

    full_row, original_row = rows[0], rows[1]
    out = []
    for r in rows:
        r = {**head, **r, "saved_mib": r["saved_bytes"] / MIB,
             "saved_x_full": r["saved_bytes"] / full_row["saved_bytes"],
             "saved_x_original": r["saved_bytes"] / original_row["saved_bytes"],
             "launches_gpu_x_original": r["launches_gpu"] / original_row["launches_gpu"],
             "peak_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / MIB}
        if r["launches_cpu"] is not None:
            r["launches_cpu_x_original"] = r["launches_cpu"] / original_row["launches_cpu"]
        if r["saved_bytes_cpu"] is not None:
            r["saved_cpu_x_full"] = r["saved_bytes_cpu"] / full_row["saved_bytes"]
        if r.get("by_hand_saved_bytes") is not None:
            r["by_hand_saved_x_full"] = r["by_hand_saved_bytes"] / full_row["saved_bytes"]
        if r.get("saved_ideal_bytes") is not None:
            r["saved_ideal_x_full"] = r["saved_ideal_bytes"] / full_row["saved_bytes"]
            r["saved_over_ideal"] = r["saved_x_full"] - r["saved_ideal_x_full"]
        if r.get("flop_ideal_x_full") is not None:
            r["saved_over_flop_ideal"] = r["saved_x_full"] - r["flop_ideal_x_full"]
        out.append(r)
    return out


TABLE_COLUMNS = ["model", "variant", "dropped_grads", "saved_mib", "saved_x_full", "saved_ideal_x_full",
                 "saved_over_ideal", "flop_ideal_x_full", "saved_over_flop_ideal", "by_hand_saved_x_full",
                 "saved_x_original", "launches_gpu", "launches_ideal", "by_hand_launches",
                 "launches_gpu_x_original", "saved_cpu_x_full", "launches_cpu", "launches_cpu_x_original",
                 "peak_mib"]


def main(argv: list[str] | None = None) -> list[dict]:
    """Count on the best device; print the tables, write the results; return the rows."""
    args = parse_size_args(argv, __doc__.split("\n")[0],
                           smoke_help="tiny sizes, one step: checks that it runs",
                           full_help="bench_models' --full sizes, more steps")
    device = best_device()
    env = environment(device)
    env["gpu_path"] = ("CUDA tensors, Triton kernels executed" if device.type == "cuda" else
                       "CPU tensors through sdepth_ext.functional.gpu_path_on_cpu: Triton launches counted, "
                       "their grids not executed")
    print_environment(env)
    configs, _, _ = model_configs(device, quick=not args.full, smoke=args.smoke)
    if args.smoke:  # checks that it runs: a ResNet and a (small) model with its own stochastic depth do,
        # and the Hugging Face layers (their own call arguments), at tiny widths
        configs = [configs[0], min((c for c in configs if c["kind"] == "own-sd"),
                                   key=lambda c: c["name"] != "efficientnet_b0"),
                   *(c for c in configs if c["name"] in HF_MODELS)]
    steps = STEPS["smoke" if args.smoke else ("full" if args.full else "quick")]
    rows: list[dict] = []
    for config in configs:
        model_rows = bench_model(config, device, steps)
        print(format_table(model_rows, TABLE_COLUMNS))
        print(flush=True)
        rows.extend(model_rows)
    name = "footprint" + size_suffix(args.smoke, args.full)
    json_path, _ = write_results(name, rows, env)
    print(f"results: {json_path}")
    return rows


if __name__ == "__main__":
    main()
