"""End-to-end train-step time of stochastic-depth ResNets: sdepth_ext vs mask-multiply peers.

One train step = forward + backward + SGD step, with the plan drawn inside the step (the converted model's
forward pre-hook). Variants, timed round-robin in one run (so load drifts hit all alike), per model:

* ``plain``: the unconverted network (the 1.0 of every ratio);
* ``sdepth batch`` / ``sdepth row`` at p_last 0.2, 0.5 and 1.0 (``--full``: 6 values; linear decay): dropped
  work is never launched;
* ``torchvision stochastic_depth``: ``torchvision.ops.stochastic_depth(f(x), 1 - p_l, "row")`` on the
  residual, linear-decay probabilities at p_last 0.2 and 0.5;
* ``timm-style DropPath``: per-sample Bernoulli mask multiply (``f(x) * mask / p_l``), written inline;
* ``hand-written skip batch`` / ``contiguous sub-batches row`` at p_last 0.5 (``--full``: also 0.2): the plain
  torchvision model skipping, by hand, the work of the *same plans* sdepth_ext draws (its own Scheduler, same
  seed and survival). Batch: a dropped block returns its shortcut, every other block runs torchvision's own
  forward. Row: a block with K of N survivors runs its residual on the first K samples, a view, and
  concatenates: the cost of those sub-batch sizes on this device with gather and scatter for free (not
  stochastic depth itself: the same samples always survive). ``sdepth`` over these (``over_hand``, paired
  step by step) is sdepth_ext's own overhead; these against the FLOP ideal is the device's.

Printed: mean step time (10%-trimmed: :func:`~benchmarks.common.trimmed_mean`), the ratio of mean step
times to plain (total time, as the paper compares) with a 95% bootstrap interval over the interleaved rounds
(:func:`ratio_interval`), the ratio of medians, and ideal ratios (the mask-multiply peers run every block:
all 1.0):

* ``ideal_ratio``: the expected active FLOP fraction ``(F_total - sum_l (1 - p_l) F_l) / F_total`` with
  ``F_l`` the conv MACs of block l's residual branch, counted by :mod:`sdepth_ext.flops`;
* ``time_ideal_ratio``: the same with each block's *measured* time, ``1 - sum_l (1 - p_l) t_l / T_plain``,
  ``t_l`` the forward+backward time of block l's residual branch and epilogue alone in the plain model, and
  ``T_plain`` the plain step time, both measured in this run. It differs from the FLOP ideal where the
  device runs some blocks' FLOPs faster than others': on a CPU the 16-channel blocks of a CIFAR ResNet
  cost more per FLOP than the 64-channel ones, and linear decay drops mostly the cheap late blocks;
* ``drawn_ideal_ratio``: the FLOP ideal of the plans actually drawn in the timed steps (``p_l`` replaced by
  block l's realised survivor fraction). A few dozen steps of a 16-block network are a small sample of
  random plans (the expected ideal is ±0.03 away at p_last=0.5);
* ``drawn_time_ideal_ratio``: the time ideal of the plans drawn, each block priced at the sub-batch size it
  ran (:func:`residual_times` times each block at several sizes; a device's convolutions are not linear in
  the batch). ``ratio - drawn_time_ideal_ratio`` is sdepth_ext's own overhead (plan draw, gathers, scatter
  epilogue); the rest of the distance to the FLOP ideal is the device's.

    python -m benchmarks.bench_resnet            # GPU: cifar_resnet(110) b128@32, resnet50 b64@224
    python -m benchmarks.bench_resnet --full     # more timed steps
    python -m benchmarks.bench_resnet --smoke    # seconds: tiny sizes, checks that everything runs
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import statistics

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import sdepth_ext as sd
from sdepth_ext.convert import get_state
from sdepth_ext.families.tv_resnet import TorchvisionResNet
from sdepth_ext.flops import compute_fraction, unit_macs

from .common import (
    add_cpu_malloc_option,
    best_device,
    configure_cpu_malloc,
    environment,
    format_table,
    median,
    print_environment,
    time_fn,
    time_interleaved,
    trimmed_mean,
    write_results,
)

# p_last values swept (the ratio-vs-p_last plot of `make bench`); 1.0 measures pure overhead (ideal 1.0).
P_LASTS = {"smoke": (0.5,), "quick": (0.2, 0.5, 1.0), "full": (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)}
# Mask-multiply peers run every block whatever p_last is; two points show the flat line.
PEER_P_LASTS = {"smoke": (0.5,), "quick": (0.2, 0.5), "full": (0.2, 0.5, 0.8)}
# Hand-written comparators on sdepth_ext's own plans: at the p_last the targets are stated for.
HAND_P_LASTS = {"smoke": (0.5,), "quick": (0.5,), "full": (0.2, 0.5)}
HAND_MODES = {"batch": "hand-written skip", "row": "contiguous sub-batches"}


def _hand_variant(mode: str, p_last: float) -> str:
    """The name of the hand-written comparator of ``sdepth <mode> p<p_last>``."""
    return f"{HAND_MODES[mode]} {mode} p{p_last}"


def residual_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's residual branch, as sdepth_ext's ResNet adapter computes it (torchvision's modules)."""
    return TorchvisionResNet.residual(block, 0, x)


def shortcut_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return TorchvisionResNet.shortcut(block, 0, x)


# ------------------------------------------------------------------------------------------------------------
# Peers: mask-multiply stochastic depth (every block always runs)
# ------------------------------------------------------------------------------------------------------------
def _torchvision_sd_forward(block: nn.Module, x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    out = torchvision.ops.stochastic_depth(residual_branch(block, x), drop_prob, "row", block.training)
    return torch.relu(out + shortcut_branch(block, x))


def _drop_path_forward(block: nn.Module, x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    # timm's drop_path: a per-sample Bernoulli(keep) mask, scaled by 1 / keep, multiplied in.
    out = residual_branch(block, x)
    if block.training and drop_prob > 0.0:
        keep = 1.0 - drop_prob
        mask = out.new_empty((out.shape[0],) + (1,) * (out.dim() - 1)).bernoulli_(keep)
        out = out * mask.div_(keep)
    return torch.relu(out + shortcut_branch(block, x))


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def with_peer(model: nn.Module, kind: str, p_last: float) -> nn.Module:
    """``model`` with each block's forward replaced by a mask-multiply peer (instance attribute)."""
    blocks = _blocks(model)
    forward = _torchvision_sd_forward if kind == "torchvision" else _drop_path_forward
    for block, p in zip(blocks, sd.linear_decay(len(blocks), p_last)):
        block.forward = functools.partial(forward, block, drop_prob=1.0 - p)
    return model


# ------------------------------------------------------------------------------------------------------------
# Comparators: the same plans, skipped by hand in the plain model (no sdepth_ext code in the blocks)
# ------------------------------------------------------------------------------------------------------------
def _hand_skip_forward(block: nn.Module, l: int, current: dict, x: torch.Tensor) -> torch.Tensor:
    plan = current["plan"]
    kept = plan.counts[l]
    if kept == x.shape[0]:
        return block.__class__.forward(block, x)  # torchvision's own forward: in-place add, then ReLU
    shortcut = shortcut_branch(block, x)
    if kept == 0:
        return x if block.downsample is None else torch.relu(shortcut)
    # Row mode, 0 < K < N: the residual of the first K samples (a view: no gather), one concatenation.
    out = residual_branch(block, x[:kept])
    out += shortcut[:kept]
    return torch.cat([torch.relu(out), torch.relu(shortcut[kept:])])


def with_hand_skip(model: nn.Module, mode: str, p_last: float, seed: int) -> nn.Module:
    """``model`` skipping by hand the work of the plans ``sd.convert(model, p_last, mode=mode, seed=seed)``
    would draw: its own :class:`sdepth_ext.Scheduler` with the same survival and seed, sampled once per
    forward (a root pre-hook, as in the converted model), so step i of both draws the same plan."""
    blocks = _blocks(model)
    scheduler = sd.Scheduler(sd.linear_decay(len(blocks), p_last), mode=mode, seed=seed)
    current: dict = {}
    model.register_forward_pre_hook(
        lambda _, args: current.__setitem__("plan", scheduler.sample(args[0].shape[0])))
    for l, block in enumerate(blocks):
        block.forward = functools.partial(_hand_skip_forward, block, l, current)
    return model


def ratio_interval(samples: list[float], reference: list[float], rounds: int = 2000,
                   level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of ``trimmed_mean(samples) / trimmed_mean(reference)``, resampling the rounds.

    Sample i of both lists ran in the same round (:func:`time_interleaved`), so rounds are resampled as
    pairs: a load drift that slowed one round slows both sides of it. Seeded: same samples, same interval.
    """
    n = min(len(samples), len(reference))
    rng = random.Random(0)
    ratios = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(trimmed_mean([samples[i] for i in idx]) / trimmed_mean([reference[i] for i in idx]))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * rounds)], ratios[min(rounds - 1, int((1.0 - tail) * rounds))]


# ------------------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------------------
def _configs(device: torch.device, quick: bool, smoke: bool) -> tuple[list[dict], int, int]:
    """(model configs, warmup steps, timed steps per variant)."""
    if smoke:
        return ([{"name": "cifar_resnet20", "make": lambda: sd.cifar_resnet(20), "batch": 4, "size": 32},
                 {"name": "resnet50", "make": lambda: torchvision.models.resnet50(num_classes=10),
                  "batch": 2, "size": 64}], 1, 2)
    if device.type == "cuda":
        configs = [
            {"name": "cifar_resnet110", "make": lambda: sd.cifar_resnet(110), "batch": 128, "size": 32},
            {"name": "resnet50", "make": lambda: torchvision.models.resnet50(), "batch": 64, "size": 224}]
        return configs, 5, (30 if quick else 100)
    # CPU: sizes for a few minutes on 2 cores (a cifar_resnet(110) b32 step is ~0.5 s there).
    configs = [{"name": "cifar_resnet110", "make": lambda: sd.cifar_resnet(110), "batch": 32, "size": 32},
               {"name": "resnet50", "make": lambda: torchvision.models.resnet50(num_classes=100),
                "batch": 8, "size": 112}]
    return configs, 2, (14 if quick else 30)


def _block_signature(block: nn.Module, x: torch.Tensor) -> tuple:
    return (type(block).__name__, tuple(x.shape), block.downsample is not None,
            tuple(p.shape for p in block.parameters()))


def residual_times(model: nn.Module, x: torch.Tensor, device: torch.device, warmup: int,
                   repeat: int) -> list[dict[int, float]]:
    """Per block: {sub-batch size k: seconds per forward+backward of its residual branch and epilogue}.

    What a block costs when k of the N samples survive (batch mode: k = N or 0; row mode: any k), timed on
    the first k samples of its input in ``model``, at k = N, 3N/4, N/2 and N/4: a device's convolutions are
    not linear in the batch (on a 2-core CPU a 64-channel 8x8 CIFAR block at batch 16 takes ~70% of its
    batch-32 time), so row mode's ideal is priced at the sizes it runs. Blocks of the same signature (type,
    input shape, parameter shapes) are timed once: a ResNet has a handful. Train mode, input requiring grad.
    """
    inputs: dict[nn.Module, torch.Tensor] = {}
    blocks = _blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].detach()))
               for b in blocks]
    model.train()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    n = x.shape[0]
    sizes = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    by_signature: dict[tuple, dict[int, float]] = {}
    times = []
    for block in blocks:
        inp = inputs[block]
        key = _block_signature(block, inp)
        if key not in by_signature:
            state = copy.deepcopy(block.state_dict())  # BatchNorm running stats move while timing
            by_signature[key] = {}
            for k in sizes:
                leaf = inp[:k].clone().requires_grad_(True)
                try:
                    # Outside the timed call: a dropped block still runs its projection shortcut.
                    shortcut = shortcut_branch(block, inp[:k]).detach()

                    def fwd_bwd(block=block, leaf=leaf, shortcut=shortcut) -> None:
                        torch.relu(shortcut + residual_branch(block, leaf)).sum().backward()

                    by_signature[key][k] = median(time_fn(fwd_bwd, device, warmup=warmup, repeat=repeat))
                except ValueError:  # BatchNorm cannot train on one value per channel (k = 1 at 1x1)
                    continue
            block.load_state_dict(state)
            block.zero_grad(set_to_none=True)
        times.append(by_signature[key])
    return times


def block_cost(times: dict[int, float], k: float) -> float:
    """Seconds of a block run on k samples: linear between the measured sizes, through (0, 0)."""
    points = [(0, 0.0), *sorted(times.items())]
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k <= k1:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    return points[-1][1]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                drawn: list | None = None):
    """One train step; for a converted model, each step's per-block survivor fractions go to ``drawn``."""
    state = get_state(model) if drawn is not None else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if state is not None:  # after the step: bookkeeping outside the timed work would be the same
            plan = state.host_plan
            drawn.append([c / plan.batch_size for c in plan.counts])
    return step


def bench_model(config: dict, device: torch.device, warmup: int, repeat: int, quick: bool = True,
                smoke: bool = False) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    base = config["make"]().to(device)
    batch, size = config["batch"], config["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    num_classes = base.fc.out_features
    y = torch.randint(0, num_classes, (batch,), device=device)
    per_block, total = unit_macs(base, x[:1])
    L = len(per_block)

    # name -> (model, mode, p_last, ideal ratio)
    size_key = "smoke" if smoke else ("quick" if quick else "full")
    variants: dict[str, tuple[nn.Module, str, float | None, float]] = {
        "plain": (copy.deepcopy(base), "-", None, 1.0)}
    for p_last in P_LASTS[size_key]:
        ideal = compute_fraction(per_block, total, sd.linear_decay(L, p_last))
        for mode in ("batch", "row"):
            model = sd.convert(copy.deepcopy(base), p_last=p_last, mode=mode, seed=0)
            variants[f"sdepth {mode} p{p_last}"] = (model, mode, p_last, ideal)
    for p_last in PEER_P_LASTS[size_key]:
        variants[f"torchvision stochastic_depth p{p_last}"] = (
            with_peer(copy.deepcopy(base), "torchvision", p_last), "torchvision", p_last, 1.0)
        variants[f"timm-style DropPath p{p_last}"] = (
            with_peer(copy.deepcopy(base), "droppath", p_last), "droppath", p_last, 1.0)
    for p_last in HAND_P_LASTS[size_key]:
        ideal = compute_fraction(per_block, total, sd.linear_decay(L, p_last))
        for mode in HAND_MODES:
            variants[_hand_variant(mode, p_last)] = (
                with_hand_skip(copy.deepcopy(base), mode, p_last, seed=0), f"hand-{mode}", p_last, ideal)

    steps, drawn = {}, {}
    for name, (model, mode, _, _) in variants.items():
        model.train()
        drawn[name] = [] if mode in ("batch", "row") else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = _train_step(model, optimizer, x, y, drawn[name])
    samples = time_interleaved(steps, device, warmup=warmup, repeat=repeat)
    block_times = residual_times(base, x, device, warmup=1, repeat=max(3, repeat))

    full = [t[batch] for t in block_times]

    def time_ideal(survival: list[float]) -> float:
        """Expected: block l saves (1 - p_l) of its full-batch time."""
        return 1.0 - sum((1.0 - p) * t for p, t in zip(survival, full)) / plain_mean

    def drawn_time_ideal(steps: list[list[float]]) -> float:
        """The drawn plans, each block priced at the sub-batch size it ran."""
        saved = [sum(f - block_cost(t, frac * batch) for f, t, frac in zip(full, block_times, step))
                 for step in steps]
        return 1.0 - statistics.fmean(saved) / plain_mean

    # The ideal is an expectation over random plans, and the paper compares total training time: so the
    # ratio is of mean step times (total time over the same number of steps), trimmed of the rare stalls of
    # a shared machine (common.trimmed_mean). Medians ride along.
    plain_mean, plain_median = trimmed_mean(samples["plain"]), median(samples["plain"])
    ratios = {name: trimmed_mean(samples[name]) / plain_mean for name in variants}
    rows, ideals = [], {}
    for name, (_, mode, p_last, ideal) in variants.items():
        mean, med = trimmed_mean(samples[name]), median(samples[name])
        low, high = ratio_interval(samples[name], samples["plain"])
        expected_time, drawn_flops, drawn_time = 1.0, 1.0, 1.0
        if mode in ("batch", "row"):
            expected_time = time_ideal(sd.linear_decay(L, p_last))
            timed = drawn[name][-len(samples[name]):]  # the warm-up steps drew plans too
            realised = [statistics.fmean(col) for col in zip(*timed)]
            drawn_flops = compute_fraction(per_block, total, realised)
            drawn_time = drawn_time_ideal(timed)
            ideals[(mode, p_last)] = expected_time, drawn_flops, drawn_time
        elif mode.startswith("hand-"):  # the same plans as its sdepth twin, whose row came first
            expected_time, drawn_flops, drawn_time = ideals[(mode.removeprefix("hand-"), p_last)]
        row = {"model": config["name"], "batch": batch, "size": size, "variant": name, "mode": mode,
               "p_last": p_last, "mean_ms": mean * 1e3, "median_ms": med * 1e3,
               "ratio": ratios[name], "ratio_ci95_low": low, "ratio_ci95_high": high,
               "median_ratio": med / plain_median, "ideal_ratio": ideal,
               "time_ideal_ratio": expected_time, "drawn_ideal_ratio": drawn_flops,
               "drawn_time_ideal_ratio": drawn_time, "steps": len(samples[name])}
        hand = _hand_variant(mode, p_last) if mode in HAND_MODES else None
        if hand in ratios:  # the same plans skipped by hand: the device's part of the distance to the ideal
            row["hand_ratio"] = ratios[hand]
            # sdepth_ext's own overhead, paired step by step: step i of both ran plan i, so the plans' spread
            # of costs cancels and only the machine's noise is left in the interval.
            row["over_hand"] = ratios[name] / ratios[hand]
            interval = ratio_interval(samples[name], samples[hand])
            row["over_hand_ci95_low"], row["over_hand_ci95_high"] = interval
        rows.append(row)
    return rows, {f"{config['name']}/{k}": v for k, v in samples.items()}


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """Run the benchmark on the best device; print the table, write the results; return the rows."""
    device = best_device()
    env = environment(device)
    print_environment(env)
    configs, warmup, repeat = _configs(device, quick, smoke)
    rows: list[dict] = []
    all_samples: dict = {}
    for config in configs:
        model_rows, samples = bench_model(config, device, warmup, repeat, quick, smoke)
        print(format_table(model_rows, ["model", "batch", "size", "variant", "mean_ms", "ratio",
                                        "ratio_ci95_low", "ratio_ci95_high", "median_ratio", "hand_ratio",
                                        "over_hand", "over_hand_ci95_low", "over_hand_ci95_high",
                                        "ideal_ratio", "time_ideal_ratio", "drawn_ideal_ratio",
                                        "drawn_time_ideal_ratio"]))
        print()
        rows.extend(model_rows)
        all_samples.update(samples)
    name = "resnet" + ("_smoke" if smoke else "" if quick else "_full")
    json_path, _ = write_results(name, rows, env, samples=all_samples)
    print(f"results: {json_path}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps: checks that it runs")
    size.add_argument("--full", action="store_true", help="more timed steps")
    add_cpu_malloc_option(parser)
    args = parser.parse_args(argv)
    configure_cpu_malloc(args.cpu_malloc)
    return run(quick=not args.full, smoke=args.smoke)


if __name__ == "__main__":
    main()
