"""convert(): stochastic depth for torchvision ResNets in place; revert, survival_probs, lesion, cifar_resnet.

Design, in short:

* Blocks are every torchvision ``BasicBlock``/``Bottleneck`` of the model in module registration order,
  taken as forward order (true for torchvision's ResNets, ``cifar_resnet`` and any ``nn.Sequential`` stack);
  block ``l`` (1-based) gets ``p_l`` from the survival rule. Downsampling blocks are included.
* Each block's ``__class__`` becomes a subclass of its own class (:mod:`sdepth_ext.blocks`): no new
  parameters, buffers or submodules, so weights and ``state_dict`` keys are the original model's.
* The root holds one :class:`~sdepth_ext.blocks.StochasticDepthState` (a plain attribute, not a submodule)
  with the Scheduler, mode, scaling and the current Plan. A forward pre-hook on the root draws one Plan per
  training-mode call, before any block runs, and moves it to the input's device with one copy.
* The scheduler's state (RNG state, seed, survival, mode) travels in the state_dict's *metadata*
  (``state_dict._metadata[prefix]["sdepth_scheduler"]``, where PyTorch keeps module versions), not under a
  key. So both directions load with ``strict=True`` and identical keys: a plain model ignores the metadata,
  a converted model restores its scheduler from it when present and keeps its own stream when absent. The
  metadata survives ``torch.save``/``torch.load`` (also ``weights_only=True``) but not a conversion of the
  state_dict to a plain ``dict`` or to safetensors; pass such checkpoints the scheduler state separately
  (``sd.get_scheduler(model).state_dict()`` / ``.load_state_dict()``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .blocks import (
    RESIDUAL_BLOCK_TYPES,
    StochasticDepthState,
    check_convertible,
    is_stochastic_depth_block,
    lesioned_class,
    stochastic_depth_class,
)
from .rules import check_probability, linear_decay, uniform
from .scheduler import Scheduler, check_u64

__all__ = ["convert", "revert", "survival_probs", "lesion", "cifar_resnet", "CifarResNet", "get_state",
           "get_scheduler", "find_residual_blocks"]

RULES = ("linear", "uniform")
MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")
METADATA_KEY = "sdepth_scheduler"
_ROOT_ATTR = "_sdepth_controller"


def find_residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Every torchvision ``BasicBlock``/``Bottleneck`` in ``model``, in module registration order."""
    return [m for m in model.modules() if isinstance(m, RESIDUAL_BLOCK_TYPES)]


def get_state(model: nn.Module) -> StochasticDepthState:
    """The shared state of a converted model (scheduler, mode, scaling, the current ``plan``).

    ``model`` is the root given to :func:`convert`, or a wrapper of it: DDP (``.module``) or ``torch.compile``
    (``._orig_mod``). Raises ``TypeError`` for a non-module, ``ValueError`` if it was not converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = model
    while _ROOT_ATTR not in root.__dict__:
        inner = getattr(root, "module", None) or getattr(root, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"model: {type(model).__name__} is not converted by sdepth_ext.convert "
                             "(pass the module convert() was called on, or its DDP / torch.compile wrapper)")
        root = inner
    return root.__dict__[_ROOT_ATTR]


def get_scheduler(model: nn.Module) -> Scheduler:
    """The :class:`~sdepth_ext.Scheduler` of a converted model (or of its DDP / torch.compile wrapper).

    Its ``state_dict()`` is the RNG state that ``model.state_dict()`` carries in its metadata; save it beside
    checkpoints that lose that metadata (a plain ``dict`` copy, safetensors).
    """
    return get_state(model).scheduler


def _is_converted_root(model: nn.Module) -> bool:
    return model.__dict__.get(_ROOT_ATTR) is not None


# ------------------------------------------------------------------------------------------------------------
# Hooks (module-level functions that look the state up on the module: they stay right after deepcopy)
# ------------------------------------------------------------------------------------------------------------
def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _draw_plan_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    if state is None or not module.training:
        return None
    x = _first_tensor(args, kwargs)
    if x is None or x.dim() == 0:
        raise RuntimeError("stochastic depth: the converted model's forward needs a tensor argument whose "
                           "dimension 0 is the batch, to draw the step's plan")
    if _in_backward() and state.plan is not None and state.plan.batch_size == int(x.shape[0]):
        # The whole root runs inside torch.utils.checkpoint and is being recomputed during backward: the
        # recomputation must see the step's plan, not draw a new one (gradients would be wrong).
        return None
    state.sample(int(x.shape[0]), x.device)
    return None


def _save_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str,
                               local_metadata: dict) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    if state is not None:
        local_metadata[METADATA_KEY] = state.scheduler.state_dict()


def _load_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                               strict: bool, missing_keys: list, unexpected_keys: list,
                               error_msgs: list) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    saved = local_metadata.get(METADATA_KEY) if isinstance(local_metadata, dict) else None
    if state is None or saved is None:
        return  # a plain checkpoint: keep this model's own gate stream
    try:
        state.scheduler.load_state_dict(saved)
    except (ValueError, TypeError) as err:
        # Weights still load: e.g. fine-tuning a checkpoint at another p_last is legitimate.
        warnings.warn(f"sdepth_ext: scheduler state in the checkpoint not restored ({err}); "
                      "the model keeps its own gate stream", UserWarning, stacklevel=2)


def _install_hooks(model: nn.Module) -> list:
    handles = [model.register_forward_pre_hook(_draw_plan_pre_hook, with_kwargs=True)]
    # Public names where they exist (torch >= 2.5); the private ones (same signatures) on torch 2.4.
    if hasattr(model, "register_state_dict_post_hook"):
        handles.append(model.register_state_dict_post_hook(_save_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_state_dict_hook(_save_scheduler_state_hook))
    if hasattr(model, "register_load_state_dict_pre_hook"):
        handles.append(model.register_load_state_dict_pre_hook(_load_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_load_state_dict_pre_hook(_load_scheduler_state_hook, with_module=True))
    return handles


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def _check_choice(value, name: str, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def convert(model: nn.Module, p_last: float = 0.5, rule: str = "linear", mode: str = "batch",
            scaling: str = "paper", seed: int | None = None) -> nn.Module:
    """Turn every residual block of ``model`` into a stochastic-depth block, in place; returns ``model``.

    Args:
        model: a torchvision ResNet-family model (resnet18..152, wide_resnet, resnext), :func:`cifar_resnet`,
            or any module built from torchvision ``BasicBlock``/``Bottleneck`` (subclasses that override
            ``forward`` are rejected with ``TypeError``). Blocks are numbered l = 1..L in registration order.
        p_last: survival probability ``p_L`` of the last block, in [0, 1].
        rule: ``"linear"`` (``p_l = 1 - l/L (1 - p_L)``, the paper's) or ``"uniform"`` (``p_l = p_L``).
        mode: ``"batch"`` (one gate per block and step; a dropped block runs no residual at all) or ``"row"``
            (one gate per block and sample; the residual runs on the surviving samples only, so BatchNorm
            statistics are those of the survivors. A block with a single survivor whose BatchNorm would see
            one value per channel is normalised together with one dropped sample; see
            :mod:`sdepth_ext.blocks`).
        scaling: ``"paper"`` (train with ``relu(id + f)``, evaluate ``relu(id + p_l f)``) or ``"inverted"``
            (train with ``relu(id + f / p_l)``, evaluate the plain network, bit-identical to the original).
        seed: int for a reproducible gate stream; ``None`` takes one from torch's default generator.

    Converting a converted model re-converts it: the old settings and scheduler state are replaced (as if
    :func:`revert` ran first). One plan is drawn per training-mode call of ``model`` (the root); state_dict
    keys stay the original model's, and the scheduler state rides in the state_dict metadata (see the module
    docstring), so checkpoints load both ways with ``strict=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    p_last = check_probability(p_last, "p_last")
    _check_choice(rule, "rule", RULES)
    _check_choice(mode, "mode", MODES)
    _check_choice(scaling, "scaling", SCALINGS)
    if seed is not None:
        seed = check_u64(seed, "seed")

    if _is_converted_root(model):
        revert(model)
    blocks = find_residual_blocks(model)
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no residual blocks (torchvision BasicBlock or "
                         "Bottleneck) to convert")
    for block in blocks:  # validate everything before mutating anything
        if is_stochastic_depth_block(block):
            raise ValueError("model: contains blocks already converted as part of another module; "
                             "sdepth_ext.revert() that module first")
        check_convertible(block)

    L = len(blocks)
    survival = linear_decay(L, p_last) if rule == "linear" else uniform(L, p_last)
    state = StochasticDepthState(blocks, survival, mode, scaling, Scheduler(survival, mode=mode, seed=seed))
    for index, block in enumerate(blocks):
        block.__class__ = stochastic_depth_class(type(block))
        block.sd_index = index
        block.sd_survival = survival[index]
        block._sdepth_state = state
    model.__dict__[_ROOT_ATTR] = state
    state.hook_handles = _install_hooks(model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: original block classes and forward, hooks removed; returns ``model``.

    Weights and state_dict keys are unchanged (they never changed). Raises ``ValueError`` if ``model`` is not
    a converted root.
    """
    state = get_state(model)
    for block in state.blocks:
        block.__class__ = type(block)._sd_base
        # The last two are set by sdepth_ext.compile_blocks.
        for attr in ("sd_index", "sd_survival", "_sdepth_state", "_sd_compiled_residual",
                     "_sd_compiled_shortcut"):
            block.__dict__.pop(attr, None)
    for handle in state.hook_handles:
        handle.remove()
    del model.__dict__[_ROOT_ATTR]
    return model


def survival_probs(model: nn.Module) -> list[float]:
    """``[p_1, ..., p_L]`` of a converted model, in block (forward) order."""
    return list(get_state(model).survival)


@contextlib.contextmanager
def lesion(model: nn.Module, drop: Iterable[int]) -> Iterator[nn.Module]:
    """Evaluate ``model`` with the residual blocks in ``drop`` (0-based, forward order) removed.

    Inside the context the model is in eval mode and each removed block returns ``relu(x)`` (identity
    shortcut) or ``relu(downsample(x))``; the other blocks run as usual (a converted model's eval forward).
    Works on converted and plain models. On exit -- also when the body raises -- the block classes and every
    module's train/eval flag are restored.

    >>> with sd.lesion(model, drop=[3, 7]):
    ...     logits = model(images)
    """
    blocks = list(get_state(model).blocks) if _is_converted_root(model) else find_residual_blocks(model)
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no residual blocks to lesion")
    try:
        drop_list = list(drop)
    except TypeError:
        raise ValueError(f"drop must be an iterable of block indices, got {type(drop).__name__}") from None
    for index in drop_list:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
            raise ValueError(f"drop must hold distinct int block indices in [0, {len(blocks)}), "
                             f"got {index!r}")
    if len(set(drop_list)) != len(drop_list):
        raise ValueError(f"drop must hold distinct int block indices in [0, {len(blocks)}), got duplicates "
                         f"in {drop_list}")

    training_flags = [(m, m.training) for m in model.modules()]
    swapped: list[tuple[nn.Module, type]] = []
    try:
        model.eval()
        for index in drop_list:
            block = blocks[index]
            swapped.append((block, type(block)))
            block.__class__ = lesioned_class(type(block))
        yield model
    finally:
        for block, cls in reversed(swapped):
            block.__class__ = cls
        for module, flag in training_flags:
            module.training = flag


# ------------------------------------------------------------------------------------------------------------
# The paper's CIFAR ResNet
# ------------------------------------------------------------------------------------------------------------
class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2) from torchvision ``BasicBlock``: the network of the paper.

    Stem 3x3 conv (16) + BN + ReLU; three stages of n blocks with 16/32/64 channels (stages 2 and 3 start with
    stride 2 and a 1x1-conv + BN projection shortcut); global average pool; linear classifier.
    """

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be an int of the form 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), "
                             f"got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        # torchvision's ResNet initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers.extend(BasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 110, num_classes: int = 10) -> CifarResNet:
    """The paper's CIFAR ResNet: ``(depth - 2) / 6`` torchvision BasicBlocks per stage (depth 110: 54 blocks).

    ``depth`` must be 6n+2 with n >= 1 (else ``ValueError``). Kaiming-normal (fan_out) conv init, BN weight 1
    and bias 0, as in torchvision's ResNets.
    """
    return CifarResNet(depth=depth, num_classes=num_classes)

