"""The models bench_models times and bench_footprint counts, and the variants built from them.

* :func:`model_configs`: the models and sizes per device (``--smoke``, default, ``--full``);
* builders of torchvision's and timm's models with their own stochastic depth at any rate
  (:data:`OWN_SD_MODELS`), and of Hugging Face transformers' (:data:`HF_MODELS`: small configs built offline,
  called on pixels for their logits, :class:`HFLogits`);
* the ResNets' mask-multiply peers (:func:`with_peer`: every block always runs);
* the hand-written comparators (:func:`with_hand_skip`): the plain model skipping by hand the work of the
  plans sdepth_ext draws, written around the family adapter's pieces, with no sdepth_ext unit forward;
* :func:`build_variants`: every variant of one model that bench_models times side by side;
* :func:`compiled_variants` (``bench_models --compiled``): the whole model under ``torch.compile``, converted
  in each mode and unconverted with its own mask-multiply.

What each variant measures is told in :mod:`benchmarks.bench_models`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.swin_transformer import SwinTransformer

import sdepth_ext as sd
from sdepth_ext.families import ACTIVATION_RELU
from sdepth_ext.state import get_state, units_of

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
# bench_models --compiled: torch.compile(model) of the converted model in each mode, at this rate (ResNets:
# p_last; the others: stochastic_depth_prob), against the compiled unconverted model with its mask-multiply.
COMPILED_MODES = ("batch", "row", "subset")
COMPILED_RATE = 0.5
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
    # bench_models --compiled on a CPU only (compiled_configs): DeiT-S's recipe, DeiT-Ti's width
    "timm deit_tiny": (_timm("deit_tiny_patch16_224"), 0.1),
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


# ------------------------------------------------------------------------------------------------------------
# Hugging Face transformers (optional): image classifiers built from configs (no hub access)
# ------------------------------------------------------------------------------------------------------------
class HFLogits(nn.Module):
    """An HF image classifier called as the other models are: ``forward(x)`` is its logits on pixels ``x``
    (the Hugging Face family tests wrap their models in it too)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf(config_name: str, model_name: str, **arch) -> Callable[..., nn.Module]:
    """A builder of the transformers model ``model_name`` from a ``config_name`` of sizes ``arch``, at
    ``stochastic_depth_prob`` (the config's ``drop_path_rate``: Dinov2's rate of every layer, ConvNextV2's
    last layer's, linear from 0)."""
    def build(*, stochastic_depth_prob: float, num_classes: int, **kwargs) -> nn.Module:
        import transformers

        sizes = {**arch, **kwargs}
        config = getattr(transformers, config_name)(drop_path_rate=stochastic_depth_prob, **sizes)
        config.num_labels = num_classes
        return HFLogits(getattr(transformers, model_name)(config))
    return build


# name -> (builder, rate), as OWN_SD_MODELS. transformers' configs default to drop_path_rate 0: the models
# are built at 0.1, a common fine-tuning rate. Sizes: facebook/dinov2-small's width, depth and heads with
# 16-pixel patches (at 64x64: 16 patches and the class token, as timm's DeiT-S); ConvNeXt V2-Femto's widths
# and depths (~0.8 GFLOPs at 224x224, about twice EfficientNet-B0's). --smoke: HF_SMOKE.
HF_MODELS: dict[str, tuple[Callable[..., nn.Module], float]] = {
    "hf dinov2": (_hf("Dinov2Config", "Dinov2ForImageClassification", hidden_size=384, num_hidden_layers=12,
                      num_attention_heads=6, patch_size=16), 0.1),
    "hf convnextv2": (_hf("ConvNextV2Config", "ConvNextV2ForImageClassification",
                          hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 6, 2]), 0.1),
}
# --smoke: the same layers at tiny widths and depths (checks that they run, in seconds).
HF_SMOKE = {"hf dinov2": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                          "patch_size": 8},
            "hf convnextv2": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 2, 1]}}


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _resnet(name: str, make: Callable[[], nn.Module], batch: int, size: int) -> dict:
    return {"name": name, "kind": "resnet", "make": make, "batch": batch, "size": size}


def _own_sd(name: str, batch: int, size: int, num_classes: int = 1000, **build_kwargs) -> dict:
    builder, default_rate = OWN_SD_MODELS[name] if name in OWN_SD_MODELS else HF_MODELS[name]
    return {"name": name, "kind": "own-sd", "batch": batch, "size": size, "default_rate": default_rate,
            "rates": TIMM_RATES.get(name),
            "make": lambda rate: builder(stochastic_depth_prob=rate, num_classes=num_classes, **build_kwargs)}


def _timm_configs(batch: int, size: int, resnet_batch: int, resnet_size: int, num_classes: int) -> list[dict]:
    if not _has_timm():
        print("timm is not installed: its models are left out (pip install sdepth_ext[timm])", flush=True)
        return []
    return [_own_sd("timm deit_small", batch, size, num_classes=num_classes, img_size=size),
            _own_sd("timm resnet50", resnet_batch, resnet_size, num_classes=num_classes)]


def _hf_configs(batch: int, size: int, num_classes: int, smoke: bool = False,
                dinov2_batch: int | None = None) -> list[dict]:
    if not _has_transformers():
        print("transformers is not installed: its models are left out (pip install sdepth_ext[hf])",
              flush=True)
        return []
    arch = HF_SMOKE if smoke else {}
    return [_own_sd("hf dinov2", dinov2_batch or batch, size, num_classes=num_classes, image_size=size,
                    **arch.get("hf dinov2", {})),
            _own_sd("hf convnextv2", batch, size, num_classes=num_classes, **arch.get("hf convnextv2", {}))]


def model_configs(device: torch.device, quick: bool, smoke: bool) -> tuple[list[dict], int, int]:
    """(model configs, warmup steps, timed steps per variant)."""
    own_sd = [name for name in OWN_SD_MODELS if not name.startswith("timm")]
    if smoke:
        return ([_resnet("cifar_resnet20", lambda: sd.cifar_resnet(20), 4, 32),
                 _resnet("resnet50", lambda: torchvision.models.resnet50(num_classes=10), 2, 64),
                 *(_own_sd(name, 4, 32, num_classes=10) for name in own_sd),
                 *_timm_configs(4, 32, 2, 64, 10), *_hf_configs(4, 32, 10, smoke=True)], 1, 2)
    if device.type == "cuda":
        configs = [_resnet("cifar_resnet110", lambda: sd.cifar_resnet(110), 128, 32),
                   _resnet("resnet50", lambda: torchvision.models.resnet50(), 64, 224),
                   *(_own_sd(name, 64, 224) for name in own_sd), *_timm_configs(128, 224, 64, 224, 1000),
                   *_hf_configs(64, 224, 1000)]
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
               *_timm_configs(16, size, 8, size, 100),
               # transformers: Dinov2 at DeiT-S's size and tokens at b8 (timm deit_small b16@64 steps took
               # ~0.5 s in the last make bench), ConvNeXt V2-Femto at b16@64 (~1/6 of convnext_tiny's FLOPs)
               *_hf_configs(16, size, 100, dinov2_batch=8)]
    return configs, 2, (14 if quick else 30)


def compiled_configs(device: torch.device) -> list[dict] | None:
    """The models of ``bench_models --compiled`` where its default set is too slow to compile; None: the
    default set.

    CPU inductor builds a forward and a backward graph per mode and model, each in minutes for a CIFAR
    ResNet-110 or a DeiT-S on the 2-core CI machine (a smoke run of DeiT-S did not finish its compiles in 25
    minutes there), so a CPU runs a CIFAR ResNet-20 (BatchNorm and convolutions: the gate multiply in batch
    mode) and a DeiT-Ti (transformer units: ``torch.cond``) at the quick sizes' batch.
    """
    if device.type == "cuda":
        return None
    deit = ([_own_sd("timm deit_tiny", 16, 64, num_classes=100, img_size=64)] if _has_timm() else [])
    return [_resnet("cifar_resnet20", lambda: sd.cifar_resnet(20), 32, 32), *deit]


def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model.eval()(x[:1]).shape[1])


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
def activate(act, out: torch.Tensor, fresh: bool) -> torch.Tensor:
    """What follows a unit's add (the adapter's ``activation``); in place on a ``fresh`` tensor."""
    if act is None:
        return out
    if act == ACTIVATION_RELU:
        return out.relu_() if fresh else torch.relu(out)
    return act(out)


def add_residual(residual: torch.Tensor, shortcut: torch.Tensor, scale: float) -> torch.Tensor:
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


def call_arguments(block: nn.Module, adapter, args: tuple, kwargs: dict) -> dict:
    """The block's call arguments after its input, by name, for the adapter's ``residual`` (Hugging Face
    layers: masks, output flags); none for the other families, which take only their input."""
    if not (args or kwargs):
        return {}
    if not adapter.takes_arguments:
        raise TypeError(f"{type(block).__name__}: takes only its input, got also {len(args) + len(kwargs)}")
    return adapter.bind_arguments(block, args, kwargs)


def _first_rows(adapter, call: dict, n: int, run: int) -> dict:
    """``call`` for a branch on the first ``run`` of ``n`` samples: the batched arguments sliced (a view)."""
    return {k: v[:run] if k in adapter.batched_arguments and isinstance(v, torch.Tensor) and v.dim() > 0
            and v.shape[0] == n else v for k, v in call.items()}


def hand_unit(block: nn.Module, adapter, u: int, x: torch.Tensor, kept: int, scale: float,
              call: dict | None = None) -> torch.Tensor:
    """Unit ``u`` of ``block`` with its first ``kept`` samples surviving, written by hand; ``call``: the
    block's call arguments (:func:`call_arguments`)."""
    if kept == 0:
        return adapter.dropped(block, u, x)  # act(shortcut(x)); nothing of the branch runs
    call = call or {}
    act = adapter.activation(block)
    shortcut = adapter.shortcut(block, u, x)
    if kept == x.shape[0]:
        return activate(act, add_residual(adapter.residual(block, u, x, **call), shortcut, scale), fresh=True)
    # Row mode, 0 < K < N: the residual of the first K samples (a view: no gather), one concatenation.
    run = 2 if kept == 1 and _bn_sees_one_value(block, adapter, u, x, shortcut) else kept
    residual = adapter.residual(block, u, x[:run], **_first_rows(adapter, call, x.shape[0], run))
    residual = residual if run == kept else residual[:kept]
    head = activate(act, add_residual(residual, shortcut[:kept], scale), fresh=True)
    return torch.cat([head, activate(act, shortcut[kept:], fresh=False)])


def _hand_forward(block: nn.Module, adapter, first: int, scales: list[float], current: dict,
                  x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    counts = current["plan"].counts
    call = call_arguments(block, adapter, args, kwargs)
    x = adapter.enter(block, x)
    for u in range(adapter.num_units(block)):
        x = hand_unit(block, adapter, u, x, counts[first + u], scales[first + u], call)
    return adapter.exit(block, x)


def patch_units(model: nn.Module, forward: Callable, *args) -> None:
    """Give each block with units ``forward(block, adapter, first_unit, *args, x, *call_args, **call_kwargs)``
    (instance attribute): the block's own call arguments follow its input (Hugging Face layers')."""
    first: dict[int, int] = {}
    for l, (block, _, adapter) in enumerate(units_of(model)):
        if id(block) not in first:
            first[id(block)] = l
            block.forward = functools.partial(forward, block, adapter, l, *args)


def unpatch_units(model: nn.Module) -> None:
    for block, _, _ in units_of(model):
        block.__dict__.pop("forward", None)


def skip_by_hand(model: nn.Module, scales: list[float]) -> dict:
    """Make ``model`` (plain: not converted) run by hand whatever plan ``current["plan"]`` holds, kept units
    scaled by ``scales``: returns ``current``, for the caller to put each step's plan in."""
    current: dict = {}
    patch_units(model, _hand_forward, scales, current)
    return current


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
    current = skip_by_hand(model, scales)

    def draw(module: nn.Module, args: tuple) -> None:
        if module.training:
            current["plan"] = scheduler.sample(args[0].shape[0])

    model.register_forward_pre_hook(draw)
    return model


# ------------------------------------------------------------------------------------------------------------
# The variants of one model, timed side by side
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


def build_variants(config: dict, base: nn.Module, size_key: str) -> tuple[dict[str, Variant], str]:
    """Every variant of ``config``'s model (``base``: the full network) at size ``size_key`` ("smoke",
    "quick", "full"), and the name of the full network's variant."""
    make = _resnet_variants if config["kind"] == "resnet" else _own_sd_variants
    return make(config, base, size_key)


def compiled_variants(config: dict, base: nn.Module, backend: str = "inductor") -> dict[str, Variant]:
    """``torch.compile(backend=backend)`` of the whole model at :data:`COMPILED_RATE`: the unconverted
    model with its own mask-multiply (ResNets: the timm-style DropPath peer; the others: the model's own
    StochasticDepth/DropPath), the reference, and the model converted in each of :data:`COMPILED_MODES`.
    Compiled lazily: the first steps (bench_models' warm-up) compile."""
    kind, rate = config["kind"], COMPILED_RATE
    if kind == "resnet":
        source, kwargs = base, {"p_last": rate}
        peer = with_peer(copy.deepcopy(base), "droppath", rate)
        reference = f"compiled timm-style DropPath {_rate_text(kind, rate)}"
    else:
        source, kwargs = config["make"](rate).to(next(base.parameters()).device), {}
        source.load_state_dict(base.state_dict())
        peer = copy.deepcopy(source)
        reference = f"compiled original {_rate_text(kind, rate)}"
    variants = {reference: Variant(torch.compile(peer, backend=backend), "compiled", rate, reference)}
    for mode in COMPILED_MODES:
        model = sd.convert(copy.deepcopy(source), mode=mode, seed=0, **kwargs)
        variants[f"compiled sdepth {mode} {_rate_text(kind, rate)}"] = Variant(
            torch.compile(model, backend=backend), f"compiled-{mode}", rate, reference,
            sd.survival_probs(model))
    return variants
