"""Stochastic-depth forward for torchvision ``BasicBlock`` / ``Bottleneck`` (and subclasses of them).

:func:`sdepth_ext.convert` swaps each residual block's ``__class__`` to a subclass made here
(:func:`stochastic_depth_class`). The subclass adds no parameters, buffers or submodules, so
``isinstance``, ``state_dict`` keys and weights stay those of the original block; only ``forward`` changes.

A block never samples its own gate. The root module draws one :class:`~sdepth_ext.scheduler.Plan` per
training step (a forward pre-hook, outside every block) into the shared :class:`StochasticDepthState`, and
each block reads its slice ``plan.counts[l]`` / ``plan.rows(l)``. Activation checkpointing (recomputation
reads the same plan) and DDP rely on this single place.

What a block does in training mode, with ``l = self.sd_index``:

* ``counts[l] == 0`` (dropped): the residual branch is not run at all (no module call, nothing in the
  autograd graph). Identity shortcut: the input is returned as is -- no kernel -- because in a ResNet every
  block input is a ReLU output, so ``relu(x) == x``. Projection shortcut: ``relu(downsample(x))``.
* every sample survives: ``gated_residual_relu(shortcut, f(x), scale)``, one fused epilogue.
* some samples survive (row mode): ``f`` runs on ``x.index_select(0, rows)`` only and the epilogue scatters
  the result back (``rows=``). BatchNorm layers inside ``f`` therefore compute their batch statistics over
  the surviving samples of that block only.

``scale`` is 1 ("paper" scaling) or ``1 / p_l`` ("inverted"). In eval mode every block runs: "paper" fuses
``relu(shortcut + p_l * f(x))`` into one epilogue call; "inverted" calls the original block's forward, so the
network is bit-identical to the unconverted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock, Bottleneck

from .functional import gated_residual_relu
from .scheduler import Plan, Scheduler

__all__ = [
    "RESIDUAL_BLOCK_TYPES",
    "StochasticDepthState",
    "StochasticDepthBasicBlock",
    "StochasticDepthBottleneck",
    "stochastic_depth_class",
    "lesioned_class",
    "is_stochastic_depth_block",
    "check_convertible",
    "residual_branch",
    "dropped_block_output",
]

RESIDUAL_BLOCK_TYPES = (BasicBlock, Bottleneck)

# The convolutions of each residual branch in forward order; used to predict BatchNorm input sizes.
_RESIDUAL_CONVS = {BasicBlock: ("conv1", "conv2"), Bottleneck: ("conv1", "conv2", "conv3")}


class StochasticDepthState:
    """What all converted blocks of one model share: gates' source, mode, scaling and the current plan.

    Held by the root module as a plain attribute (not a submodule, so it adds no ``state_dict`` keys) and by
    every converted block. ``plan`` is the plan of the current training step on the input's device;
    ``host_plan`` the same plan with its row indices on the host (read only in the rare BatchNorm case, see
    :meth:`StochasticDepthMixin._bn_needs_two_samples`).
    """

    def __init__(self, blocks: list[nn.Module], survival: list[float], mode: str, scaling: str,
                 scheduler: Scheduler):
        self.blocks = blocks
        self.survival = survival
        self.mode = mode
        self.scaling = scaling
        self.scheduler = scheduler
        self.plan: Plan | None = None
        self.host_plan: Plan | None = None
        self.hook_handles: list = []

    def sample(self, batch_size: int, device: torch.device) -> Plan:
        """Draw the plan of one step and move it to ``device`` (one copy of the packed row indices)."""
        host_plan = self.scheduler.sample(batch_size)
        self.host_plan = host_plan
        self.plan = host_plan.to(device)
        return self.plan

    def train_scale(self, l: int) -> float:
        if self.scaling == "paper":
            return 1.0
        p = self.survival[l]
        # p_l = 0 means the block never survives a training step, so its scale is never used.
        return 1.0 / p if p > 0.0 else 0.0

    def __repr__(self) -> str:
        return (f"StochasticDepthState(blocks={len(self.blocks)}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}, scheduler={self.scheduler!r})")


# ------------------------------------------------------------------------------------------------------------
# Pieces of a torchvision block, written once for both block types
# ------------------------------------------------------------------------------------------------------------
def _base_block_type(block: nn.Module) -> type:
    return BasicBlock if isinstance(block, BasicBlock) else Bottleneck


def residual_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``f(x)``: the residual branch of a torchvision ``BasicBlock``/``Bottleneck``, without add and ReLU.

    The same module calls, in the same order, as torchvision's ``forward`` (so outputs are bit-identical).
    """
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


def shortcut_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if block.downsample is None else block.downsample(x)


def dropped_block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A dropped block: ``relu(shortcut)``; the input itself (no kernel) when the shortcut is the identity.

    ``relu(x) == x`` holds because every block input of a ResNet is a ReLU output (stem ReLU/max-pool, or the
    previous block's epilogue). A user model feeding a block a possibly negative tensor would see ``x``, not
    ``relu(x)``, from a dropped identity block.
    """
    if block.downsample is None:
        return x
    return torch.relu(block.downsample(x))


def _conv_output_size(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same" keeps the size (stride 1 only), "valid" pads nothing
        if conv.padding == "same":
            return size
        padding = (0, 0)
    else:
        padding = conv.padding
    return tuple(
        (size[d] + 2 * padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d] + 1
        for d in range(2))


# ------------------------------------------------------------------------------------------------------------
# The converted block
# ------------------------------------------------------------------------------------------------------------
class StochasticDepthMixin:
    """``forward`` of a converted block; mixed in front of the block's own class.

    Per-block attributes set by :func:`sdepth_ext.convert`: ``sd_index`` (0-based position in forward order),
    ``sd_survival`` (``p_l``) and ``_sdepth_state`` (the shared :class:`StochasticDepthState`).
    """

    _sd_base: type  # the block's original class, restored by sdepth_ext.revert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: StochasticDepthState = self._sdepth_state
        if not self.training:
            if state.scaling == "inverted":
                return self._sd_base.forward(self, x)
            return gated_residual_relu(shortcut_branch(self, x), residual_branch(self, x), self.sd_survival)

        plan = state.plan
        if plan is None:
            raise RuntimeError(
                "stochastic-depth block called in training mode before any plan was drawn: call the "
                "converted root model (its forward pre-hook draws one plan per step), not a block directly")
        l = self.sd_index
        count = plan.counts[l]
        if count == 0:
            return dropped_block_output(self, x)
        scale = state.train_scale(l)
        if count == plan.batch_size:
            # Batch mode's survivors, or row mode with every sample kept: no gather, no scatter.
            return gated_residual_relu(shortcut_branch(self, x), residual_branch(self, x), scale)

        if x.shape[0] != plan.batch_size:
            raise RuntimeError(
                f"row-mode plan was drawn for a batch of {plan.batch_size} samples but block {l} got "
                f"{x.shape[0]}: the root model's first tensor argument must carry the batch in dimension 0")
        rows = plan.rows(l)
        shortcut = shortcut_branch(self, x)
        if count == 1 and self._bn_needs_two_samples(x):
            residual = self._single_survivor_residual(x, state, l)
        else:
            residual = residual_branch(self, x.index_select(0, rows))
        # Scheduler rows are sorted, unique and in range by construction: skip the checking device sync.
        return gated_residual_relu(shortcut, residual, scale, rows=rows, _trusted_rows=True)

    # -- the one-survivor BatchNorm case ----------------------------------------------------------------
    def _bn_needs_two_samples(self, x: torch.Tensor) -> bool:
        """True when a training-mode BatchNorm in ``f`` would see one value per channel for one sample.

        BatchNorm raises on that (e.g. resnet18's layer4 at 1x1 for 32x32 inputs). Host arithmetic on the
        conv geometry only; no tensor is touched.
        """
        if x.dim() != 4:
            return False
        if not any(isinstance(m, _BatchNorm) and m.training for m in self.modules()
                   if m is not self.downsample and not _is_inside(m, self.downsample)):
            return False
        size = tuple(x.shape[-2:])
        for name in _RESIDUAL_CONVS[_base_block_type(self)]:
            size = _conv_output_size(getattr(self, name), size)
            if size[0] * size[1] == 1:
                return True
        return False

    def _single_survivor_residual(self, x: torch.Tensor, state: StochasticDepthState, l: int) -> torch.Tensor:
        """``f`` of the single survivor, computed on a 2-sample sub-batch: the survivor and a dropped sample.

        BatchNorm cannot normalise one value per channel. Rather than change the gate (treating the block as
        dropped would lower its survival rate below ``p_l`` for small batches), the survivor is normalised
        together with the lowest-index dropped sample, as if the sub-batch were one sample wider. Only the
        survivor's residual reaches the output; the extra sample's residual feeds the BatchNorm statistics
        alone (so, as in batch mode, its input gets gradient only through those statistics).
        """
        host_plan = state.host_plan if state.host_plan is not None else state.plan
        survivor = int(host_plan.rows(l)[0])
        extra = 1 if survivor == 0 else 0
        pair = sorted((survivor, extra))
        pair_rows = torch.tensor(pair, dtype=torch.int64).to(x.device, non_blocking=True)
        residual_pair = residual_branch(self, x.index_select(0, pair_rows))
        return residual_pair.narrow(0, pair.index(survivor), 1)


def _is_inside(module: nn.Module, container: nn.Module | None) -> bool:
    return container is not None and any(module is m for m in container.modules())


class StochasticDepthBasicBlock(StochasticDepthMixin, BasicBlock):
    """A torchvision ``BasicBlock`` after :func:`sdepth_ext.convert` (same parameters and keys)."""

    _sd_base = BasicBlock


class StochasticDepthBottleneck(StochasticDepthMixin, Bottleneck):
    """A torchvision ``Bottleneck`` after :func:`sdepth_ext.convert` (same parameters and keys)."""

    _sd_base = Bottleneck


_SD_CLASSES: dict[type, type] = {BasicBlock: StochasticDepthBasicBlock, Bottleneck: StochasticDepthBottleneck}


def _register_generated(cls: type) -> type:
    # Module-level names let pickle (torch.save(model)) find generated classes within this process.
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls
    return cls


def check_convertible(block: nn.Module) -> None:
    """Raise ``TypeError`` unless ``block`` computes torchvision's ``BasicBlock``/``Bottleneck`` forward.

    A subclass that overrides ``forward`` computes something :func:`residual_branch` cannot know.
    """
    if not isinstance(block, RESIDUAL_BLOCK_TYPES):
        raise TypeError(f"expected a torchvision BasicBlock or Bottleneck, got {type(block).__name__}")
    base = _base_block_type(block)
    if type(block).forward is not base.forward:
        raise TypeError(
            f"{type(block).__qualname__} subclasses torchvision's {base.__name__} but overrides forward; "
            "sdepth_ext can only convert blocks that compute torchvision's residual forward")


def stochastic_depth_class(cls: type) -> type:
    """The converted subclass of block class ``cls`` (cached; module-level classes for torchvision's own)."""
    converted = _SD_CLASSES.get(cls)
    if converted is None:
        base = BasicBlock if issubclass(cls, BasicBlock) else Bottleneck
        name = f"StochasticDepth_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        converted = _register_generated(type(name, (StochasticDepthMixin, cls), {"_sd_base": cls}))
        assert issubclass(converted, base)
        _SD_CLASSES[cls] = converted
    return converted


def is_stochastic_depth_block(module: nn.Module) -> bool:
    return isinstance(module, StochasticDepthMixin)


# ------------------------------------------------------------------------------------------------------------
# Lesioned blocks (sdepth_ext.lesion)
# ------------------------------------------------------------------------------------------------------------
class LesionedMixin:
    """``forward`` of a block removed by :func:`sdepth_ext.lesion`: ``relu(identity or downsample(x))``.

    The ReLU is applied literally here (unlike a dropped training block) because lesion also serves plain
    user models whose block inputs need not be non-negative, and evaluation cost is not the point.
    """

    _lesion_base: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(shortcut_branch(self, x))


_LESIONED_CLASSES: dict[type, type] = {}


def lesioned_class(cls: type) -> type:
    """The subclass of ``cls`` (a plain or converted block class) whose forward skips the residual branch."""
    lesioned = _LESIONED_CLASSES.get(cls)
    if lesioned is None:
        name = f"Lesioned_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        lesioned = _register_generated(type(name, (LesionedMixin, cls), {"_lesion_base": cls}))
        _LESIONED_CLASSES[cls] = lesioned
    return lesioned
