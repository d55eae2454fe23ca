"""End-to-end train-step time of stochastic-depth models: sdepth_ext against what users run today.

One train step = forward + backward + SGD step, with the plan drawn inside the step (the converted model's
forward pre-hook). Variants are timed round-robin in one run (so load drifts hit all alike), per model.

ResNets (``cifar_resnet110``, ``resnet50``: torchvision blocks with no stochastic depth of their own; the
ratio is to ``plain``, the unconverted network):

* ``plain``; ``sdepth batch`` / ``sdepth row`` at p_last 0.2, 0.5 and 1.0 (``--full``: 6 values; linear
  decay, the paper's rule and batch mode): dropped work is never launched;
* mask-multiply peers at p_last 0.2 and 0.5, which run every block: ``torchvision stochastic_depth``
  (``torchvision.ops.stochastic_depth(f(x), 1 - p_l, "row")`` on the residual) and ``timm-style DropPath``
  (a per-sample Bernoulli mask, ``f(x) * mask / p_l``, written inline).

Models with their own stochastic depth (``convnext_tiny``, ``swin_t``, ``efficientnet_b0``: torchvision's
``StochasticDepth``, a per-sample mask multiply; the ratio is to ``original`` at the same rate):

* ``original p<rate>``: the torchvision model built with ``stochastic_depth_prob=<rate>``, trained as is;
  ``original p0`` (no unit ever dropped) is the cost of the full network, for reference (``full_ratio``);
* ``sdepth batch p<rate>`` / ``sdepth row p<rate>``: the same model through ``sd.convert(model, mode=...)``
  (the model's own rates and "inverted" scaling), at torchvision's default rate and at 0.5.

timm's models (``timm deit_small``, ``timm resnet50``, where timm is installed) and Hugging Face
transformers' (``hf dinov2``: ``Dinov2ForImageClassification``, ``hf convnextv2``:
``ConvNextV2ForImageClassification``, built from small configs with no hub access where transformers is
installed; :data:`~benchmarks.models.HF_MODELS`) are timed the same way, their ``drop_path_rate`` as the
rate: HF's own ``<Model>DropPath`` (a per-sample mask multiply) is ``original``; timm's at 0.05 to 0.4, the
HF models at 0.1 and 0.5 (``--full``: also 0.3).

Comparators on sdepth_ext's own plans, for both kinds (at the rate the targets are stated for, 0.5;
``--full``: also p_last 0.2 and every stochastic_depth_prob): the model skipping by hand the work of the *same
plans* sdepth_ext draws, written around the model's own modules (the family adapter's residual, shortcut and
layout pieces; no sdepth_ext unit forward, plan compaction or fused epilogue). They draw from their own
:class:`sdepth_ext.Scheduler` (same survival, mode and seed), once per forward in a root pre-hook, so step i
of both runs plan i.

* ``hand-written skip batch``: a dropped unit returns its shortcut (through the activation), a kept one
  ``act(shortcut + scale * residual)`` in eager PyTorch;
* ``contiguous sub-batches row``: a unit with K of N survivors runs its residual on the first K samples (a
  view: no gather), adds the shortcut's first K rows and concatenates the rest: the cost of those sub-batch
  sizes on this device with gather and scatter for free (not stochastic depth itself: the same samples
  always survive).

Every variant's train step is ``zero_grad(set_to_none=False)``, forward, backward, SGD step: a unit skipped by
any variant has a zero gradient and every parameter is updated, the paper's semantics and that of the
default ``dropped_grads="zero"`` (the stamp's ``zero_grad_set_to_none``).

``sdepth`` over its comparator (``over_hand``, paired step by step; ``hand_gap`` = the difference of their
ratios) is sdepth_ext's own overhead; the comparator against the FLOP ideal is the device's. The two run back
to back in every round (``time_interleaved``'s ``groups``), so a drift of the machine's load over seconds
hits both steps of a pair alike.

Printed: mean step time (10%-trimmed: :func:`~benchmarks.common.trimmed_mean`), the ratio of mean step times
to the reference (total time, as the paper compares) with a 95% bootstrap interval over the interleaved
rounds (:func:`ratio_interval`), the ratio of medians, and ideal ratios (variants that run every unit: 1.0):

* ``ideal_ratio``: the expected FLOP fraction ``(F_total - sum_l (1 - p_l) F_l) / F_total`` with ``F_l`` the
  MACs of unit l's residual branch (:func:`sdepth_ext.flops.unit_macs`, any family);
* ``drawn_ideal_ratio``: the same for the plans actually drawn in the timed steps (``p_l`` replaced by unit
  l's realised survivor fraction). A few dozen steps are a small sample of random plans;
* ``time_ideal_ratio``: the full network's step time less the *measured* time of the units expected to be
  dropped, ``(T_full - sum_l (1 - p_l) t_l) / T_ref``, with ``t_l`` the forward+backward time of unit l's
  residual branch and add alone (:func:`unit_times`, every family) and ``T_full`` the step of ``plain`` /
  ``original p0``. It differs from the FLOP ideal where the device runs some units' FLOPs faster than
  others': on a CPU the 16-channel blocks of a CIFAR ResNet cost more per FLOP than the 64-channel ones,
  and linear decay drops mostly the cheap late blocks;
* ``drawn_time_ideal_ratio``: the time ideal of the plans drawn, each unit priced at the sub-batch size it
  ran (a device's kernels are not linear in the batch). ``ratio - drawn_time_ideal_ratio`` is sdepth_ext's
  own overhead (plan draw, gathers, scatter epilogue) plus what the step does besides its units.

    python -m benchmarks.bench_models            # ~6 minutes on a 2-core CPU (sizes: models.model_configs)
    python -m benchmarks.bench_models --full     # more timed steps; larger inputs for the non-ResNets
    python -m benchmarks.bench_models --smoke    # seconds: tiny sizes, checks that everything runs
    python -m benchmarks.bench_models --compiled # the compiled rows (below): ~12 minutes on a 2-core CPU
    python -m benchmarks.bench_models --smoke --compiled aot_eager --models cifar_resnet20  # their plumbing

``--compiled [BACKEND]`` adds, per model, ``torch.compile(model)`` (inductor unless named) of the whole
model at rate 0.5: the converted model in batch, row and subset mode (``compiled sdepth <mode>``) against
the compiled unconverted model with its own mask-multiply (``compiled timm-style DropPath`` for the ResNets,
``compiled original`` for the others), the reference of their ratios and intervals. On a CPU the
compiled run takes its own models (CIFAR ResNet-20 b32@32, DeiT-Ti b16@64: ``models.compiled_configs``),
which inductor compiles in minutes there. Each is stepped
:data:`COMPILED_WARMUP` times before timing (batch and row mode compile a second graph at their second
step). What each mode compiles and skips: docs/training.md.
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from sdepth_ext.flops import compute_fraction, unit_macs
from sdepth_ext.state import get_state, units_of

from .common import (
    best_device,
    environment,
    format_table,
    median,
    parse_args,
    print_environment,
    ratio_interval,
    size_parser,
    size_suffix,
    time_fn,
    time_interleaved,
    trimmed_mean,
    write_results,
)
from .models import (
    SDEPTH_MODES,
    activate,
    add_residual,
    build_variants,
    call_arguments,
    compiled_configs,
    compiled_variants,
    model_configs,
    num_classes_of,
    patch_units,
    unpatch_units,
)


# ------------------------------------------------------------------------------------------------------------
# Measured unit times (the time ideal)
# ------------------------------------------------------------------------------------------------------------
def _recording_forward(block: nn.Module, adapter, first: int, inputs: list, x: torch.Tensor, *args,
                       **kwargs) -> torch.Tensor:
    call = call_arguments(block, adapter, args, kwargs)
    x = adapter.enter(block, x)
    for u in range(adapter.num_units(block)):
        inputs[first + u] = x.detach()
        x = activate(adapter.activation(block), add_residual(adapter.residual(block, u, x, **call),
                                                      adapter.shortcut(block, u, x), 1.0), fresh=True)
    return adapter.exit(block, x)


def unit_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each unit's input in a train-mode forward of plain ``model`` on ``x`` with every unit kept."""
    inputs: list = [None] * len(units_of(model))
    patch_units(model, _recording_forward, inputs)
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        unpatch_units(model)
    return inputs


def _settings_of(module: nn.Module) -> tuple:
    """Plain settings (ints, floats, strings, their lists) of a module and its submodules: e.g. a Swin
    attention's shift, a convolution's stride. Units alike in these, shapes and parameters cost alike."""
    out = []
    for name, m in module.named_modules():
        for key, value in sorted(vars(m).items()):
            if key != "training" and not key.startswith("_") and isinstance(
                    value, (bool, int, float, str, tuple, list)):
                out.append((name, key, repr(value)))
    return tuple(out)


def _unit_signature(block: nn.Module, adapter, u: int, x: torch.Tensor) -> tuple:
    return (type(block).__name__, u, tuple(x.shape), adapter.has_projection(block, u),
            tuple((n, tuple(p.shape)) for n, p in adapter.branch_parameters(block, u)),
            tuple(_settings_of(m) for m in adapter.branch_modules(block, u)))


def unit_times(model: nn.Module, x: torch.Tensor, device: torch.device, warmup: int,
               repeat: int) -> list[dict[int, float]]:
    """Per unit: {sub-batch size k: seconds per forward+backward of its residual branch and add}.

    What a unit costs when k of the N samples survive (batch mode: k = N or 0; row mode: any k), timed on the
    first k samples of its input in plain ``model``, at k = N, 3N/4, N/2 and N/4: a device's kernels are not
    linear in the batch (on a 2-core CPU a 64-channel 8x8 CIFAR block at batch 16 takes ~70% of its batch-32
    time), so row mode's ideal is priced at the sizes it runs. Units of the same signature (block type, unit,
    input shape, parameter shapes, the branch's settings) are timed once: a ResNet has a handful, a Swin a
    dozen. Train mode, input requiring grad; the shortcut is computed outside the timed call (a dropped unit
    still runs its projection).
    """
    units = units_of(model)
    inputs = unit_inputs(model, x)
    n = x.shape[0]
    sizes = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    by_signature: dict[tuple, dict[int, float]] = {}
    times = []
    for (block, u, adapter), inp in zip(units, inputs):
        key = _unit_signature(block, adapter, u, inp)
        if key not in by_signature:
            state = copy.deepcopy(block.state_dict())  # BatchNorm running stats move while timing
            by_signature[key] = {}
            act = adapter.activation(block)
            for k in sizes:
                leaf = inp[:k].clone().requires_grad_(True)
                try:
                    with torch.no_grad():
                        shortcut = adapter.shortcut(block, u, inp[:k])

                    def fwd_bwd(block=block, u=u, adapter=adapter, act=act, leaf=leaf,
                                shortcut=shortcut) -> None:
                        out = add_residual(adapter.residual(block, u, leaf), shortcut, 1.0)
                        activate(act, out, fresh=True).sum().backward()

                    by_signature[key][k] = median(time_fn(fwd_bwd, device, warmup=warmup, repeat=repeat))
                except ValueError:  # BatchNorm cannot train on one value per channel (k = 1 at 1x1)
                    continue
            block.load_state_dict(state)
            block.zero_grad(set_to_none=True)
        times.append(by_signature[key])
    return times


def block_cost(times: dict[int, float], k: float) -> float:
    """Seconds of a unit run on k samples: linear between the measured sizes, through (0, 0)."""
    points = [(0, 0.0), *sorted(times.items())]
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k <= k1:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    return points[-1][1]


# ------------------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------------------
# Gradients are zeroed in place, as the paper's reference implementation does: a unit skipped by any variant
# (ours, its hand-written comparator) then has a zero gradient and SGD updates every parameter in every
# variant, the semantics of the default dropped_grads="zero". With set_to_none=True a hand-written skip would
# leave its skipped blocks' gradients None (not updated: the "none" policy) and be compared with a model that
# updates them. What "zero" costs with set_to_none=True (a fill per dropped unit) is counted by
# bench_footprint.
ZERO_GRAD_SET_TO_NONE = False


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                drawn: list | None = None):
    """One train step; for a converted model, each step's per-unit survivor fractions go to ``drawn``."""
    state = get_state(model) if drawn is not None else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=ZERO_GRAD_SET_TO_NONE)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if state is not None:  # after the step: bookkeeping outside the timed work would be the same
            plan = state.host_plan
            drawn.append([c / plan.batch_size for c in plan.counts])
    return step


# Steps each compiled variant runs before the timed rounds: its compiles (two graphs in batch and row mode).
COMPILED_WARMUP = 3


def bench_model(config: dict, device: torch.device, warmup: int, repeat: int, quick: bool = True,
                smoke: bool = False, compiled: str | None = None) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    kind = config["kind"]
    base = (config["make"]() if kind == "resnet" else config["make"](0.0)).to(device)
    batch, size = config["batch"], config["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes_of(base, x), (batch,), device=device)
    per_unit, total = unit_macs(base, x[:1])
    family = units_of(base)[0][2].family

    size_key = "smoke" if smoke else ("quick" if quick else "full")
    variants, full = build_variants(config, base, size_key)
    if compiled:
        variants.update(compiled_variants(config, base, backend=compiled))

    steps, drawn = {}, {}
    for name, v in variants.items():
        v.model.train()
        drawn[name] = [] if v.mode in SDEPTH_MODES else None
        optimizer = torch.optim.SGD(v.model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = _train_step(v.model, optimizer, x, y, drawn[name])
        if v.mode.startswith("compiled"):
            for _ in range(COMPILED_WARMUP):
                steps[name]()
    pairs = [(name, v.hand) for name, v in variants.items() if v.hand is not None]
    samples = time_interleaved(steps, device, warmup=warmup, repeat=repeat, groups=pairs)
    times = unit_times(base, x, device, warmup=1, repeat=max(3, repeat))
    whole = [t[batch] for t in times]
    means = {name: trimmed_mean(samples[name]) for name in variants}

    def time_ideal(reference: str, saved: float) -> float:
        """The full network's step less ``saved`` seconds of units, over the reference step."""
        return (means[full] - saved) / means[reference]

    def drawn_time_saved(plans: list[list[float]]) -> float:
        """Mean seconds the drawn plans skip, each unit priced at the sub-batch size it ran."""
        return statistics.fmean(sum(w - block_cost(t, frac * batch) for w, t, frac in zip(whole, times, plan))
                                for plan in plans)

    # The ideal is an expectation over random plans, and the paper compares total training time: so the
    # ratio is of mean step times (total time over the same number of steps), trimmed of the rare stalls of
    # a shared machine (common.trimmed_mean). Medians ride along.
    ratios = {name: means[name] / means[v.reference] for name, v in variants.items()}
    rows, ideals = [], {}
    for name, v in variants.items():
        ref = v.reference
        med = median(samples[name])
        low, high = ratio_interval(samples[name], samples[ref])
        full_low, full_high = ratio_interval(samples[name], samples[full])
        ideal = expected_time = drawn_flops = drawn_time = 1.0
        if v.mode in SDEPTH_MODES:
            ideal = compute_fraction(per_unit, total, v.survival)
            expected_time = time_ideal(ref, sum((1.0 - p) * w for p, w in zip(v.survival, whole)))
            timed = drawn[name][-len(samples[name]):]  # the warm-up steps drew plans too
            realised = [statistics.fmean(col) for col in zip(*timed)]
            drawn_flops = compute_fraction(per_unit, total, realised)
            drawn_time = time_ideal(ref, drawn_time_saved(timed))
            ideals[(v.mode, v.rate)] = ideal, expected_time, drawn_flops, drawn_time
        elif v.mode.startswith("hand-"):  # the same plans as its sdepth twin, whose row came first
            ideal, expected_time, drawn_flops, drawn_time = ideals[(v.mode.removeprefix("hand-"), v.rate)]
        row = {"model": config["name"], "family": family, "batch": batch, "size": size, "variant": name,
               "mode": v.mode, "p_last": v.rate if kind == "resnet" else None,
               "stochastic_depth_prob": None if kind == "resnet" else v.rate, "reference": ref,
               "mean_ms": means[name] * 1e3, "median_ms": med * 1e3,
               "ratio": ratios[name], "ratio_ci95_low": low, "ratio_ci95_high": high,
               "median_ratio": med / median(samples[ref]),
               "full_ratio": means[name] / means[full], "full_ratio_ci95_low": full_low,
               "full_ratio_ci95_high": full_high, "ideal_ratio": ideal, "time_ideal_ratio": expected_time,
               "drawn_ideal_ratio": drawn_flops, "drawn_time_ideal_ratio": drawn_time,
               "steps": len(samples[name])}
        if v.hand is not None:  # the same plans skipped by hand: the device's share of the distance to ideal
            row["hand_ratio"] = ratios[v.hand]
            row["hand_gap"] = ratios[name] - ratios[v.hand]
            # sdepth_ext's own overhead, paired step by step: step i of both ran plan i, so the plans' spread
            # of costs cancels and only the machine's noise is left in the interval.
            row["over_hand"] = ratios[name] / ratios[v.hand]
            row["over_hand_ci95_low"], row["over_hand_ci95_high"] = ratio_interval(samples[name],
                                                                                   samples[v.hand])
        rows.append(row)
    return rows, {f"{config['name']}/{k}": v for k, v in samples.items()}


def break_even(points: list[tuple[float, float]]) -> tuple[float | None, str]:
    """The drop rate above which sdepth's step is faster than the masked original (ratio below 1).

    Linear between the last measured rate at or above 1 and the first below. Returns ``(rate, "crossed")``,
    ``(lowest rate, "faster at every rate")`` or ``(None, "slower at every rate")``.
    """
    points = sorted(points)
    if points[0][1] < 1.0:
        return points[0][0], "faster at every rate"
    for (r0, q0), (r1, q1) in zip(points, points[1:]):
        if q0 >= 1.0 > q1:
            return r0 + (q0 - 1.0) * (r1 - r0) / (q0 - q1), "crossed"
    return None, "slower at every rate"


def break_even_rows(rows: list[dict]) -> list[dict]:
    """Per model timed at three rates or more, and mode: the drop rate where skipping starts to pay."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in SDEPTH_MODES:
            points = [(r["stochastic_depth_prob"], r["ratio"]) for r in rows if r["model"] == model
                      and r["mode"] == mode and r["stochastic_depth_prob"] is not None]
            if len(points) < 3:
                continue
            rate, status = break_even(points)
            out.append({"bench": "break-even", "model": model, "mode": mode, "break_even_rate": rate,
                        "status": status, "rates": [p for p, _ in sorted(points)],
                        "ratios": [round(q, 4) for _, q in sorted(points)]})
    return out


TABLE_COLUMNS = ["model", "batch", "size", "variant", "mean_ms", "ratio", "ratio_ci95_low", "ratio_ci95_high",
                 "median_ratio", "full_ratio", "hand_ratio", "over_hand", "over_hand_ci95_low",
                 "over_hand_ci95_high", "ideal_ratio", "time_ideal_ratio", "drawn_ideal_ratio",
                 "drawn_time_ideal_ratio"]


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark on the best device; print the tables, write the results; return the rows."""
    parser = size_parser(__doc__.split("\n")[0], smoke_help="tiny sizes, a few steps: checks that it runs",
                         full_help="more timed steps, larger non-ResNet inputs")
    parser.add_argument("--compiled", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="add torch.compile(model) rows (backend: inductor unless named): converted in "
                             "each mode vs the compiled original")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names to run (default: all of the size's models)")
    args = parse_args(parser, argv)
    device = best_device()
    env = {**environment(device), "zero_grad_set_to_none": ZERO_GRAD_SET_TO_NONE}
    print_environment(env)
    configs, warmup, repeat = model_configs(device, quick=not args.full, smoke=args.smoke)
    if args.compiled and not args.smoke:
        configs = compiled_configs(device) or configs
    if args.models:
        wanted = args.models.split(",")
        configs = [c for c in configs if c["name"] in wanted]
    rows: list[dict] = []
    all_samples: dict = {}
    for config in configs:
        model_rows, samples = bench_model(config, device, warmup, repeat, quick=not args.full,
                                          smoke=args.smoke, compiled=args.compiled)
        print(format_table(model_rows, TABLE_COLUMNS))
        print()
        rows.extend(model_rows)
        all_samples.update(samples)
    name = "models" + ("_compiled" if args.compiled else "") + size_suffix(args.smoke, args.full)
    json_path, _ = write_results(name, rows, env, samples=all_samples)
    print(f"results: {json_path}")
    crossings = break_even_rows(rows)
    if crossings:
        print("Drop rate above which skipping beats the model's own drop path (DINOv2: subset computation "
              "pays only above 0.1):")
        print(format_table(crossings, ["model", "mode", "break_even_rate", "status", "rates", "ratios"]))
        write_results(name.replace("models", "break_even"), crossings, env)
    return rows


if __name__ == "__main__":
    main()
