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

Options set on the shared state by the helpers of :mod:`sdepth_ext.distributed` and :mod:`sdepth_ext.compiled`
(all off by default; see the README section "Running where users run"):

* ``dropped_grads="zero"`` (``sd.ddp_ready`` / ``sd.set_dropped_grads``): a dropped block's residual
  parameters get exact zero gradients through autograd (:class:`_ZeroGradTouch`, no activation work), so
  DDP's default ``find_unused_parameters=False`` sees every parameter each step. BatchNorm layers of the
  dropped branch still do not run: running statistics and ``num_batches_tracked`` are untouched.
* ``shard=(rank, world_size)`` (row mode, ``sd.ddp_ready``): every rank draws its own samples' gates, as
  samples ``i * world_size + rank`` of the global batch (same seed and step on every rank).
* ``row_multiple=k`` (row mode, ``sd.compile_blocks``): survivor counts are rounded up to a multiple of k by
  promoting dropped samples to survivors (:func:`~sdepth_ext.scheduler.round_plan_rows`), so compiled
  regions see few shapes.
* ``checkpoint`` (``sd.checkpoint_blocks``): each surviving block runs under ``torch.utils.checkpoint`` with
  the plan bound at forward time, so recomputation uses the same gates even if another forward drew a new plan
  in between; BatchNorm running statistics are not updated a second time by the recomputation.
* compiled regions (``sd.compile_blocks``): ``f`` and the projection shortcut run through ``torch.compile``d
  functions; the gate decisions, the row gather and the epilogue stay in eager Python.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock, Bottleneck

from .functional import fused_epilogue
from .scheduler import Plan, Scheduler, mix64, round_plan_rows

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
        # Options (module docstring); the defaults reproduce the plain converted model.
        self.dropped_grads = "none"  # "none" | "zero"
        self.shard: tuple[int, int] | None = None  # (rank, world_size), row mode only
        self.row_multiple = 1
        self.checkpoint: dict | None = None  # kwargs of torch.utils.checkpoint.checkpoint, or None

    def sample(self, batch_size: int, device: torch.device) -> Plan:
        """Draw the plan of one step and move it to ``device`` (one copy of the packed buffer).

        The buffer is allocated pinned only when it is going to a GPU (decided here, per draw: nothing about
        pinning is stored, so a model pickled on a GPU machine trains on a CPU-only one).
        """
        pin = device.type == "cuda"
        if self.shard is not None and self.mode == "row":
            rank, world_size = self.shard  # this rank's samples of the global batch
            host_plan = self.scheduler.sample(batch_size, rank=rank, world_size=world_size, pin_memory=pin)
        else:
            # Batch mode's gate does not depend on the batch size: every rank draws the same gates.
            host_plan = self.scheduler.sample(batch_size, pin_memory=pin)
        if self.row_multiple > 1 and self.mode == "row":
            # The salt is derived from the seed and step: deterministic (resumes exactly), the same on every
            # rank, but different each step, so the promoted samples rotate.
            salt = mix64(self.scheduler.seed ^ mix64(host_plan.step))
            host_plan = round_plan_rows(host_plan, self.row_multiple, salt)
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
            if state.scaling == "inverted" and not self._sd_is_compiled():
                return self._sd_base.forward(self, x)
            scale = 1.0 if state.scaling == "inverted" else self.sd_survival
            shortcut = self._sd_shortcut(x)
            residual = self._sd_residual(x)
            return fused_epilogue(_like(shortcut, residual), residual, scale, relu=True)

        plan = state.plan
        if plan is None:
            raise RuntimeError(
                "stochastic-depth block called in training mode before any plan was drawn: call the "
                "converted root model (its forward pre-hook draws one plan per step), not a block directly")
        l = self.sd_index
        if plan.counts[l] == 0:
            # A dropped block is relu(shortcut): the input itself (no kernel) when the shortcut is the
            # identity, as every block input of a ResNet is a ReLU output (stem ReLU/max-pool, or the previous
            # block's epilogue). A user model feeding a block a possibly negative tensor would see x, not
            # relu(x), from a dropped identity block (README).
            out = x if self.downsample is None else torch.relu(self._sd_shortcut(x))
            if state.dropped_grads == "zero":
                out = self._sd_touch_residual_params(out)
            return out
        host_plan = state.host_plan if state.host_plan is not None else plan
        if state.checkpoint is not None and torch.is_grad_enabled():
            return self._sd_checkpointed(x, plan, host_plan, state)
        return self._sd_active(x, plan, host_plan, state)

    def _sd_active(self, x: torch.Tensor, plan: Plan, host_plan: Plan,
                   state: StochasticDepthState) -> torch.Tensor:
        """A block with at least one survivor under ``plan`` (an argument: recomputation passes the same)."""
        l = self.sd_index
        count = plan.counts[l]
        scale = state.train_scale(l)
        if count == plan.batch_size:
            # Batch mode's survivors, or row mode with every sample kept: no gather, no scatter.
            shortcut = self._sd_shortcut(x)
            residual = self._sd_residual(x)
            return fused_epilogue(_like(shortcut, residual), residual, scale, relu=True)

        if x.shape[0] != plan.batch_size:
            raise RuntimeError(
                f"row-mode plan was drawn for a batch of {plan.batch_size} samples but block {l} got "
                f"{x.shape[0]}: the root model's first tensor argument must carry the batch in dimension 0")
        rows = plan.rows(l)
        shortcut = self._sd_shortcut(x)
        if count == 1 and self._bn_needs_two_samples(x):
            residual = self._single_survivor_residual(x, host_plan, l)
        else:
            residual = self._sd_residual(x.index_select(0, rows))
        # Scheduler rows are sorted, unique and in range by construction, and the plan carries their map.
        return fused_epilogue(_like(shortcut, residual), residual, scale, rows, plan.slot(l), relu=True)

    # -- compiled regions (sdepth_ext.compile_blocks) ------------------------------------------------------
    def _sd_is_compiled(self) -> bool:
        return self.__dict__.get("_sd_compiled_residual") is not None

    def _sd_residual(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__.get("_sd_compiled_residual")
        return residual_branch(self, x) if compiled is None else compiled(x)

    def _sd_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        compiled = self.__dict__.get("_sd_compiled_shortcut")
        return self.downsample(x) if compiled is None else compiled(x)

    # -- dropped blocks under DDP / zero-gradient semantics -------------------------------------------------
    def _sd_touch_residual_params(self, out: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return out
        params = [p for name, p in self.named_parameters()
                  if p.requires_grad and not name.startswith("downsample.")]
        return _ZeroGradTouch.apply(out, *params) if params else out

    # -- activation checkpointing (sdepth_ext.checkpoint_blocks) -------------------------------------------
    def _sd_checkpointed(self, x: torch.Tensor, plan: Plan, host_plan: Plan,
                         state: StochasticDepthState) -> torch.Tensor:
        calls = [0]

        def run(inp: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return self._sd_active(inp, plan, host_plan, state)
            # Recomputation: same plan (bound above); BatchNorm must not update its running statistics a
            # second time (plain torch.utils.checkpoint would apply the momentum twice per step).
            with _frozen_batchnorm_stats(self):
                return self._sd_active(inp, plan, host_plan, state)

        return torch.utils.checkpoint.checkpoint(run, x, **state.checkpoint)

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

    def _single_survivor_residual(self, x: torch.Tensor, host_plan: Plan, l: int) -> torch.Tensor:
        """``f`` of the single survivor, computed on a 2-sample sub-batch: the survivor and a dropped sample.

        BatchNorm cannot normalise one value per channel. Rather than change the gate (treating the block as
        dropped would lower its survival rate below ``p_l`` for small batches), the survivor is normalised
        together with the lowest-index dropped sample, as if the sub-batch were one sample wider. Only the
        survivor's residual reaches the output; the extra sample's residual feeds the BatchNorm statistics
        alone (so, as in batch mode, its input gets gradient only through those statistics).
        """
        survivor = int(host_plan.rows(l)[0])
        extra = 1 if survivor == 0 else 0
        pair = sorted((survivor, extra))
        pair_rows = torch.tensor(pair, dtype=torch.int64, pin_memory=x.is_cuda)  # pinned: a truly async copy
        pair_rows = pair_rows.to(x.device, non_blocking=True)
        residual_pair = self._sd_residual(x.index_select(0, pair_rows))
        return residual_pair.narrow(0, pair.index(survivor), 1)


def _like(shortcut: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The shortcut in the residual's dtype, as torchvision's ``out += identity`` (in place on the residual).

    Under autocast the two can differ (e.g. an fp32 identity with a bf16 residual); the fused epilogue needs
    one dtype. torchvision adds in fp32 and rounds once; casting the shortcut first rounds it once more, so
    the result can differ from torchvision's by one unit in the last place of the residual's dtype (tested).
    """
    return shortcut if shortcut.dtype == residual.dtype else shortcut.to(residual.dtype)


class _ZeroGradTouch(torch.autograd.Function):
    """``out`` unchanged in forward; in backward, exact zero gradients for ``params`` (a dropped block's).

    The parameters thereby take part in autograd, so DDP's per-parameter hooks fire with
    ``find_unused_parameters=False``, at the cost of one parameter-sized zero fill each in backward and no
    activation work. ``out.detach()`` (not ``out`` itself) is returned so that autograd treats the result as a
    fresh tensor: an input returned as-is becomes a view that may not be modified in place. It still shares
    memory and version counter with ``out``, exactly like the un-touched dropped block returning its input.
    """

    @staticmethod
    def forward(ctx, out, *params):
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        zeros = (torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.param_meta)
        return (grad, *zeros)


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module):
    """Inside, BatchNorm layers of ``module`` update stand-in copies of their buffers; originals untouched.

    Swapping in clones (rather than restoring values with ``copy_`` afterwards) leaves the originals' version
    counters alone: the recomputed graph saves the running statistics for BatchNorm's backward, and an
    in-place restore would make autograd reject that graph.
    """
    swapped = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            for name, buf in list(m._buffers.items()):
                if buf is not None:
                    swapped.append((m, name, buf))
                    m._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for m, name, buf in swapped:
            m._buffers[name] = buf


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
