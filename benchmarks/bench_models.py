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
to back in every round (``time_interleaved``'s ``pairs``), so a drift of the machine's load over seconds
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

    python -m benchmarks.bench_models            # ~6 minutes on a 2-core CPU (sizes: _configs)
    python -m benchmarks.bench_models --full     # more timed steps; larger inputs for the non-ResNets
    python -m benchmarks.bench_models --smoke    # seconds: tiny sizes, checks that everything runs
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.swin_transformer import SwinTransformer

import sdepth_ext as sd
from sdepth_ext.families import ACTIVATION_RELU
from sdepth_ext.flops import compute_fraction, unit_macs
from sdepth_ext.state import get_state, units_of

from .common import (
    best_device,
    environment,
    format_table,
    median,
    parse_size_args,
    print_environment,
    time_fn,
    time_interleaved,
    trimmed_mean,
    write_results,
)

# ResNets: p_last values swept (the ratio-vs-p_last plot); 1.0 measures pure overhead (ideal 1.0).
P_LASTS = {"smoke": (0.5,), "quick": (0.2, 0.5, 1.0), "full": (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)}
# Mask-multiply peers run every block whatever p_last is; two points show the flat line.
PEER_P_LASTS = {"smoke": (0.5,), "quick": (0.2, 0.5), "full": (0.2, 0.5, 0.8)}
# Hand-written comparators on sdepth_ext's own plans: at the rate the targets are stated for.
HAND_P_LASTS = {"smoke": (0.5,), "quick": (0.5,), "full": (0.2, 0.5)}
# Models with their own stochastic depth: stochastic_depth_prob values besides the model's default.
RATES = {"smoke": (0.5,), "quick": (0.5,), "full": (0.3, 0.5)}
HAND_RATES = {"smoke": (0.5,), "quick": (0.5,), "full": None}  # None: every rate
HAND_MODES = {"batch": "hand-written skip", "row": "contiguous sub-batches"}
SDEPTH_MODES = ("batch", "row")


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------
def swin_t(*, stochastic_depth_prob: float = 0.2, **kwargs) -> nn.Module:
    """torchvision's Swin-T architecture at any ``stochastic_depth_prob`` (``torchvision.models.swin_t``
    fixes it at 0.2 and refuses the keyword)."""
    return SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                           window_size=[7, 7], stochastic_depth_prob=stochastic_depth_prob, **kwargs)


def _timm(name: str) -> Callable[..., nn.Module]:
    """A builder of timm model ``name`` at ``stochastic_depth_prob`` (timm's ``drop_path_rate``)."""
    def build(*, stochastic_depth_prob: float, num_classes: int, **kwargs) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, drop_path_rate=stochastic_depth_prob,
                                 num_classes=num_classes, **kwargs)
    return build


# name -> (builder taking stochastic_depth_prob= and num_classes=, the rate its recipe builds it with)
OWN_SD_MODELS: dict[str, tuple[Callable[..., nn.Module], float]] = {
    "convnext_tiny": (torchvision.models.convnext_tiny, 0.1),
    "swin_t": (swin_t, 0.2),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 0.2),
    # timm (optional): DeiT-S's recipe trains at drop_path_rate 0.1; timm's ResNet-50 at 0.05 (a1 recipe)
    "timm deit_small": (_timm("deit_small_patch16_224"), 0.1),
    "timm resnet50": (_timm("resnet50"), 0.05),
}
# timm models at the rates the issue names (its drop_path_rate 0.1 and 0.4), and the ViT at more rates for
# the break-even drop rate of subset computation (DINOv2's claim: it pays only above 0.1).
TIMM_RATES = {"timm deit_small": (0.05, 0.1, 0.2, 0.4), "timm resnet50": (0.1, 0.4)}


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _resnet(name: str, make: Callable[[], nn.Module], batch: int, size: int) -> dict:
    return {"name": name, "kind": "resnet", "make": make, "batch": batch, "size": size}


def _own_sd(name: str, batch: int, size: int, num_classes: int = 1000, **build_kwargs) -> dict:
    builder, default_rate = OWN_SD_MODELS[name]
    return {"name": name, "kind": "own-sd", "batch": batch, "size": size, "default_rate": default_rate,
            "rates": TIMM_RATES.get(name),
            "make": lambda rate: builder(stochastic_depth_prob=rate, num_classes=num_classes, **build_kwargs)}


def _timm_configs(batch: int, size: int, resnet_batch: int, resnet_size: int, num_classes: int) -> list[dict]:
    if not _has_timm():
        print("timm is not installed: its models are left out (pip install sdepth_ext[timm])", flush=True)
        return []
    return [_own_sd("timm deit_small", batch, size, num_classes=num_classes, img_size=size),
            _own_sd("timm resnet50", resnet_batch, resnet_size, num_classes=num_classes)]


def _configs(device: torch.device, quick: bool, smoke: bool) -> tuple[list[dict], int, int]:
    """(model configs, warmup steps, timed steps per variant)."""
    own_sd = [name for name in OWN_SD_MODELS if not name.startswith("timm")]
    if smoke:
        return ([_resnet("cifar_resnet20", lambda: sd.cifar_resnet(20), 4, 32),
                 _resnet("resnet50", lambda: torchvision.models.resnet50(num_classes=10), 2, 64),
                 *(_own_sd(name, 4, 32, num_classes=10) for name in own_sd),
                 *_timm_configs(4, 32, 2, 64, 10)], 1, 2)
    if device.type == "cuda":
        configs = [_resnet("cifar_resnet110", lambda: sd.cifar_resnet(110), 128, 32),
                   _resnet("resnet50", lambda: torchvision.models.resnet50(), 64, 224),
                   *(_own_sd(name, 64, 224) for name in own_sd), *_timm_configs(128, 224, 64, 224, 1000)]
        return configs, 5, (30 if quick else 100)
    # CPU: the bulk of make bench (its time per benchmark is in bench.log), the ResNets about 40%. A full
    # step on one thread: cifar_resnet110 b32 ~0.9 s, resnet50 b8@112 ~0.9 s, convnext_tiny b16@64 ~0.65 s,
    # swin_t ~1.25 s, efficientnet_b0 ~0.3 s; 16 steps of each variant (9 per non-ResNet) and the unit
    # times. --full: 112x112 inputs for the non-ResNets, 30 timed steps, more rates (~40 minutes).
    size = 64 if quick else 112
    configs = [_resnet("cifar_resnet110", lambda: sd.cifar_resnet(110), 32, 32),
               _resnet("resnet50", lambda: torchvision.models.resnet50(num_classes=100), 8, 112),
               _own_sd("convnext_tiny", 16, size, num_classes=100),
               _own_sd("swin_t", 16, size, num_classes=100),
               _own_sd("efficientnet_b0", 16, size, num_classes=100),
               # timm: DeiT-S at 64x64 (16 patches: a step of ~0.2 s), ResNet-50 at b8@64
               *_timm_configs(16, size, 8, size, 100)]
    return configs, 2, (14 if quick else 30)


def _rate_text(kind: str, rate: float) -> str:
    # ResNet variants keep the names of earlier result files (p0.5, p1.0); the others read p0, p0.1, p0.5.
    return f"p{rate}" if kind == "resnet" else f"p{rate:g}"


def _hand_variant(kind: str, mode: str, rate: float) -> str:
    """The name of the hand-written comparator of ``sdepth <mode> p<rate>``."""
    return f"{HAND_MODES[mode]} {mode} {_rate_text(kind, rate)}"


# ------------------------------------------------------------------------------------------------------------
# ResNet peers: mask-multiply stochastic depth (every block always runs)
# ------------------------------------------------------------------------------------------------------------
def _resnet_units(model: nn.Module) -> list[tuple[nn.Module, type]]:
    return [(block, adapter) for block, _, adapter in units_of(model)]


def _torchvision_sd_forward(block: nn.Module, adapter, x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    out = torchvision.ops.stochastic_depth(adapter.residual(block, 0, x), drop_prob, "row", block.training)
    return torch.relu(out + adapter.shortcut(block, 0, x))


def _drop_path_forward(block: nn.Module, adapter, x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    # timm's drop_path: a per-sample Bernoulli(keep) mask, scaled by 1 / keep, multiplied in.
    out = adapter.residual(block, 0, x)
    if block.training and drop_prob > 0.0:
        keep = 1.0 - drop_prob
        mask = out.new_empty((out.shape[0],) + (1,) * (out.dim() - 1)).bernoulli_(keep)
        out = out * mask.div_(keep)
    return torch.relu(out + adapter.shortcut(block, 0, x))


def with_peer(model: nn.Module, kind: str, p_last: float) -> nn.Module:
    """ResNet ``model`` with each block's forward replaced by a mask-multiply peer (instance attribute)."""
    units = _resnet_units(model)
    forward = _torchvision_sd_forward if kind == "torchvision" else _drop_path_forward
    for (block, adapter), p in zip(units, sd.linear_decay(len(units), p_last)):
        block.forward = functools.partial(forward, block, adapter, drop_prob=1.0 - p)
    return model


# ------------------------------------------------------------------------------------------------------------
# Comparators: the same plans, skipped by hand in the plain model (no sdepth_ext code in the units)
# ------------------------------------------------------------------------------------------------------------
def _activate(act, out: torch.Tensor, fresh: bool) -> torch.Tensor:
    """What follows a unit's add (the adapter's ``activation``); in place on a ``fresh`` tensor."""
    if act is None:
        return out
    if act == ACTIVATION_RELU:
        return out.relu_() if fresh else torch.relu(out)
    return act(out)


def _add(residual: torch.Tensor, shortcut: torch.Tensor, scale: float) -> torch.Tensor:
    """``shortcut + scale * residual``, added in place on a fresh tensor: at scale 1 the residual itself
    (torchvision's ResNet forward, ``out += identity``), else the scaled residual (as torchvision's own
    stochastic depth scales, then adds)."""
    return (residual if scale == 1.0 else residual * scale).add_(shortcut)


def _bn_sees_one_value(block: nn.Module, adapter, u: int, x: torch.Tensor, shortcut: torch.Tensor) -> bool:
    """True when the unit's branch, on one sample, would hand a training BatchNorm one value per channel
    (which raises): a 1x1 map at the unit's input or output. sdepth_ext then normalises the single survivor
    together with a second sample; the comparator does the same, so both run the same sub-batch sizes."""
    if x.dim() != 4 or min(x.shape[-2] * x.shape[-1], shortcut.shape[-2] * shortcut.shape[-1]) != 1:
        return False
    return any(isinstance(m, _BatchNorm) and m.training
               for branch in adapter.branch_modules(block, u) for m in branch.modules())


def hand_unit(block: nn.Module, adapter, u: int, x: torch.Tensor, kept: int, scale: float) -> torch.Tensor:
    """Unit ``u`` of ``block`` with its first ``kept`` samples surviving, written by hand."""
    if kept == 0:
        return adapter.dropped(block, u, x)  # act(shortcut(x)); nothing of the branch runs
    act = adapter.activation(block)
    shortcut = adapter.shortcut(block, u, x)
    if kept == x.shape[0]:
        return _activate(act, _add(adapter.residual(block, u, x), shortcut, scale), fresh=True)
    # Row mode, 0 < K < N: the residual of the first K samples (a view: no gather), one concatenation.
    run = 2 if kept == 1 and _bn_sees_one_value(block, adapter, u, x, shortcut) else kept
    residual = adapter.residual(block, u, x[:run])
    residual = residual if run == kept else residual[:kept]
    head = _activate(act, _add(residual, shortcut[:kept], scale), fresh=True)
    return torch.cat([head, _activate(act, shortcut[kept:], fresh=False)])


def _hand_forward(block: nn.Module, adapter, first: int, scales: list[float], current: dict,
                  x: torch.Tensor) -> torch.Tensor:
    counts = current["plan"].counts
    x = adapter.enter(block, x)
    for u in range(adapter.num_units(block)):
        x = hand_unit(block, adapter, u, x, counts[first + u], scales[first + u])
    return adapter.exit(block, x)


def _patch_units(model: nn.Module, forward: Callable, *args) -> None:
    """Give each block with units ``forward(block, adapter, first_unit, *args, x)`` (instance attribute)."""
    first: dict[int, int] = {}
    for l, (block, _, adapter) in enumerate(units_of(model)):
        if id(block) not in first:
            first[id(block)] = l
            block.forward = functools.partial(forward, block, adapter, l, *args)


def _unpatch_units(model: nn.Module) -> None:
    for block, _, _ in units_of(model):
        block.__dict__.pop("forward", None)


def with_hand_skip(model: nn.Module, mode: str, survival: list[float], seed: int,
                   scaling: str = "paper") -> nn.Module:
    """``model`` (plain: not converted) skipping by hand the work of the plans a converted twin with this
    ``survival``, ``mode`` and ``seed`` draws: its own :class:`sdepth_ext.Scheduler`, sampled once per
    forward (a root pre-hook, as in the converted model), so step i of both runs the same plan. Kept units
    are scaled as ``scaling`` trains ("paper": 1, "inverted": 1 / p_l)."""
    if len(survival) != len(units_of(model)):
        raise ValueError(f"survival has {len(survival)} rates, the model {len(units_of(model))} units")
    scheduler = sd.Scheduler(survival, mode=mode, seed=seed)
    scales = [1.0 if scaling == "paper" or p == 0.0 else 1.0 / p for p in survival]
    current: dict = {}

    def draw(module: nn.Module, args: tuple) -> None:
        if module.training:
            current["plan"] = scheduler.sample(args[0].shape[0])

    model.register_forward_pre_hook(draw)
    _patch_units(model, _hand_forward, scales, current)
    return model


# ------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------
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
# Measured unit times (the time ideal)
# ------------------------------------------------------------------------------------------------------------
def _recording_forward(block: nn.Module, adapter, first: int, inputs: list, x: torch.Tensor) -> torch.Tensor:
    x = adapter.enter(block, x)
    for u in range(adapter.num_units(block)):
        inputs[first + u] = x.detach()
        x = _activate(adapter.activation(block), _add(adapter.residual(block, u, x),
                                                      adapter.shortcut(block, u, x), 1.0), fresh=True)
    return adapter.exit(block, x)


def unit_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each unit's input in a train-mode forward of plain ``model`` on ``x`` with every unit kept."""
    inputs: list = [None] * len(units_of(model))
    _patch_units(model, _recording_forward, inputs)
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        _unpatch_units(model)
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
                        out = _add(adapter.residual(block, u, leaf), shortcut, 1.0)
                        _activate(act, out, fresh=True).sum().backward()

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
@dataclasses.dataclass
class Variant:
    model: nn.Module
    mode: str  # "-" (plain), "original", "batch", "row", "hand-batch", "hand-row", "torchvision", "droppath"
    rate: float | None  # ResNets: p_last; the others: stochastic_depth_prob
    reference: str  # the variant whose mean step time is the ratio's 1.0
    survival: list[float] | None = None  # sdepth and its comparators: per unit (their ideals)
    hand: str | None = None  # an sdepth variant's comparator on the same plans, if timed


def _resnet_variants(config: dict, base: nn.Module, size_key: str) -> tuple[dict[str, Variant], str]:
    """ResNet variants and the name of the full network's (``plain``)."""
    kind, L = config["kind"], len(units_of(base))
    variants = {"plain": Variant(copy.deepcopy(base), "-", None, "plain")}
    hand_rates = HAND_P_LASTS[size_key]
    for p_last in P_LASTS[size_key]:
        survival = sd.linear_decay(L, p_last)
        for mode in SDEPTH_MODES:
            model = sd.convert(copy.deepcopy(base), p_last=p_last, mode=mode, seed=0)
            hand = _hand_variant(kind, mode, p_last) if p_last in hand_rates else None
            variants[f"sdepth {mode} p{p_last}"] = Variant(model, mode, p_last, "plain", survival, hand)
    for p_last in PEER_P_LASTS[size_key]:
        variants[f"torchvision stochastic_depth p{p_last}"] = Variant(
            with_peer(copy.deepcopy(base), "torchvision", p_last), "torchvision", p_last, "plain")
        variants[f"timm-style DropPath p{p_last}"] = Variant(
            with_peer(copy.deepcopy(base), "droppath", p_last), "droppath", p_last, "plain")
    for p_last in hand_rates:
        survival = sd.linear_decay(L, p_last)
        for mode in SDEPTH_MODES:
            variants[_hand_variant(kind, mode, p_last)] = Variant(
                with_hand_skip(copy.deepcopy(base), mode, survival, seed=0), f"hand-{mode}", p_last, "plain",
                survival)
    return variants, "plain"


def _own_sd_variants(config: dict, base: nn.Module, size_key: str) -> tuple[dict[str, Variant], str]:
    """Variants of a model with its own stochastic depth and the name of the full network's (``original
    p0``). ``base`` is the model built at rate 0; the others load its weights."""
    kind = config["kind"]
    full = f"original {_rate_text(kind, 0.0)}"
    variants = {full: Variant(copy.deepcopy(base), "original", 0.0, full)}
    rates = tuple(dict.fromkeys((config["default_rate"], *(config.get("rates") or RATES[size_key]))))
    if config.get("rates") and size_key == "smoke":  # timm's rate sweep: its highest rate only
        rates = rates[-1:]
    hand_rates = HAND_RATES[size_key] or rates
    if config.get("rates"):  # timm: the comparators at the highest rate (the others are for the break-even)
        hand_rates = rates[-1:]
    hands = []
    for rate in rates:
        original = config["make"](rate).to(next(base.parameters()).device)
        original.load_state_dict(base.state_dict())
        reference = f"original {_rate_text(kind, rate)}"
        variants[reference] = Variant(original, "original", rate, reference)
        for mode in SDEPTH_MODES:
            model = sd.convert(copy.deepcopy(original), mode=mode, seed=0)  # the model's own rates
            survival = sd.survival_probs(model)
            hand = _hand_variant(kind, mode, rate) if rate in hand_rates else None
            name = f"sdepth {mode} {_rate_text(kind, rate)}"
            variants[name] = Variant(model, mode, rate, reference, survival, hand)
            if hand is not None:
                comparator = with_hand_skip(copy.deepcopy(original), mode, survival, seed=0,
                                            scaling=get_state(model).scaling)
                hands.append((hand, Variant(comparator, f"hand-{mode}", rate, reference, survival)))
    variants.update(hands)  # after every sdepth row: a comparator's row takes its twin's drawn ideals
    return variants, full


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


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model.eval()(x[:1]).shape[1])


def bench_model(config: dict, device: torch.device, warmup: int, repeat: int, quick: bool = True,
                smoke: bool = False) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    kind = config["kind"]
    base = (config["make"]() if kind == "resnet" else config["make"](0.0)).to(device)
    batch, size = config["batch"], config["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, _num_classes(base, x), (batch,), device=device)
    per_unit, total = unit_macs(base, x[:1])
    family = units_of(base)[0][2].family

    size_key = "smoke" if smoke else ("quick" if quick else "full")
    make_variants = _resnet_variants if kind == "resnet" else _own_sd_variants
    variants, full = make_variants(config, base, size_key)

    steps, drawn = {}, {}
    for name, v in variants.items():
        v.model.train()
        drawn[name] = [] if v.mode in SDEPTH_MODES else None
        optimizer = torch.optim.SGD(v.model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = _train_step(v.model, optimizer, x, y, drawn[name])
    pairs = [(name, v.hand) for name, v in variants.items() if v.hand is not None]
    samples = time_interleaved(steps, device, warmup=warmup, repeat=repeat, pairs=pairs)
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


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """Run the benchmark on the best device; print the tables, write the results; return the rows."""
    device = best_device()
    env = {**environment(device), "zero_grad_set_to_none": ZERO_GRAD_SET_TO_NONE}
    print_environment(env)
    configs, warmup, repeat = _configs(device, quick, smoke)
    rows: list[dict] = []
    all_samples: dict = {}
    for config in configs:
        model_rows, samples = bench_model(config, device, warmup, repeat, quick, smoke)
        print(format_table(model_rows, TABLE_COLUMNS))
        print()
        rows.extend(model_rows)
        all_samples.update(samples)
    name = "models" + ("_smoke" if smoke else "" if quick else "_full")
    json_path, _ = write_results(name, rows, env, samples=all_samples)
    print(f"results: {json_path}")
    crossings = break_even_rows(rows)
    if crossings:
        print("Drop rate above which skipping beats the model's own drop path (DINOv2: subset computation "
              "pays only above 0.1):")
        print(format_table(crossings, ["model", "mode", "break_even_rate", "status", "rates", "ratios"]))
        write_results(name.replace("models", "break_even"), crossings, env)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_size_args(argv, __doc__.split("\n")[0],
                           smoke_help="tiny sizes, a few steps: checks that it runs",
                           full_help="more timed steps, larger non-ResNet inputs")
    return run(quick=not args.full, smoke=args.smoke)


if __name__ == "__main__":
    main()
