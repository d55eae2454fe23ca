"""What an adapter is: :class:`UnitAdapter`, the base class every family adapter derives from, and the helpers
adapters share.

A *unit* is one residual addition ``out = act(shortcut(x) + scale * residual(x))``: a ResNet, ConvNeXt or
MBConv block has one, a Swin or ViT block two (attention, then MLP). An adapter (a :class:`UnitAdapter`
subclass in a file of its own, e.g. :mod:`sdepth_ext.families.tv_resnet`) declares, for its block classes:
how many units a block has and whether it is gated at all, how to compute each unit's residual (layer scale
included) and shortcut, what follows the add, the names of each unit's branch (its parameters get the
dropped-unit gradient policy, its modules are what a dropped unit skips), and where the model keeps its own
drop rate. Adapters do not copy upstream forwards: they call the block's own modules. The registry that maps
block classes to adapters is :mod:`sdepth_ext.families.registry`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..kernels import ACTIVATION_RELU

__all__ = ["ACTIVATION_RELU", "Defaults", "ResNetAdapter", "UnitAdapter", "last_linear", "scale_affine"]


class Defaults:
    """What ``sd.convert(model)`` uses for a family when an argument is None (the model's own settings)."""

    def __init__(self, p_last: float | None, rule: str | None, mode: str | None, scaling: str):
        self.p_last, self.rule, self.mode, self.scaling = p_last, rule, mode, scaling

    def __repr__(self) -> str:
        return (f"Defaults(p_last={self.p_last}, rule={self.rule!r}, mode={self.mode!r}, "
                f"scaling={self.scaling!r})")


class UnitAdapter:
    """How to run the blocks of one family as gated residual units. Subclasses override what differs.

    Class attributes:
        family: a readable name ("torchvision ResNet", ...), used in errors and docs.
        block_types: set by :func:`~sdepth_ext.families.register_adapter`.
        defaults: the family's :class:`Defaults`. ``rule=None`` means "the model's own rates".
        projection: the attribute of the block that holds its shortcut's projection (``downsample``), where
            the block may also hold None or ``nn.Identity`` (or nothing) for an identity shortcut; None when
            the shortcut is always ``x``.
    """

    family: str = "?"
    block_types: tuple[type, ...] = ()
    defaults = Defaults(0.5, "linear", "batch", "paper")
    projection: str | None = None
    # Call arguments (:meth:`bind_arguments`): False = a converted block takes only its input in training.
    takes_arguments: bool = False
    batched_arguments: tuple[str, ...] = ()  # arguments with a batch dimension (dim 0), gathered in row mode
    unbatched_arguments: tuple[str, ...] = ()  # tensor arguments without one (passed as they are)

    # -- structure ---------------------------------------------------------------------------------------
    @staticmethod
    def num_units(block: nn.Module) -> int:
        """Residual additions in ``block``, in forward order; 0 = the block has no gated residual."""
        return 1

    @classmethod
    def residual(cls, block: nn.Module, unit: int, x: torch.Tensor) -> torch.Tensor:
        """The unit's residual branch on ``x`` (layer scale included), before any gate.

        By default the modules :meth:`branch` names, applied in that order: adapters whose branch is such a
        chain of the block's modules declare only :meth:`branch`; the others override this.
        """
        for name in cls.branch(block, unit):
            x = getattr(block, name)(x)
        return x

    @classmethod
    def projection_of(cls, block: nn.Module) -> nn.Module | None:
        """The module in the block's :attr:`projection` attribute (possibly ``nn.Identity``), or None."""
        return None if cls.projection is None else getattr(block, cls.projection, None)

    @classmethod
    def shortcut(cls, block: nn.Module, unit: int, x: torch.Tensor) -> torch.Tensor:
        """The unit's shortcut: ``x`` itself, or the block's projection of it."""
        projection = cls.projection_of(block)
        return x if projection is None else projection(x)

    @classmethod
    def has_projection(cls, block: nn.Module, unit: int) -> bool:
        """True when the shortcut computes something (it then runs even when the unit is dropped)."""
        projection = cls.projection_of(block)
        return projection is not None and not isinstance(projection, nn.Identity)

    @staticmethod
    def enter(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the block does before its first unit (a layout change, e.g. MaxViT's window partition)."""
        return x

    @staticmethod
    def exit(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the block does after its last unit (the inverse of :meth:`enter`)."""
        return x

    @staticmethod
    def activation(block: nn.Module):
        """What follows the add: None, ``"relu"`` (fused into the epilogue), or a module applied after it."""
        return None

    @staticmethod
    def branch(block: nn.Module, unit: int) -> tuple[str, ...]:
        """Attribute names (submodules or parameters of ``block``) that make up the unit's residual branch, in
        the order the branch uses them."""
        raise NotImplementedError

    @classmethod
    def dropped(cls, block: nn.Module, unit: int, x: torch.Tensor) -> torch.Tensor:
        """A dropped unit's output, ``act(shortcut(x))``: nothing of the branch runs."""
        out = cls.shortcut(block, unit, x)
        act = cls.activation(block)
        if act is None:
            return out
        return torch.relu(out) if act == ACTIVATION_RELU else act(out)

    # -- call arguments ------------------------------------------------------------------------------------
    @classmethod
    def bind_arguments(cls, block: nn.Module, args: tuple, kwargs: dict) -> dict:
        """The block's extra call arguments (those after its input) by name, for :meth:`residual`.

        Adapters with :attr:`takes_arguments` pass them to their branches: positional ones are named after the
        original forward's signature. Arguments of the block's forward that are not passed stay out.
        """
        own = next(c for c in type(block).__mro__ if c in cls.block_types)
        params = list(inspect.signature(own.forward).parameters.values())[2:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(positional):
            raise TypeError(f"{type(block).__name__}: takes {len(positional)} arguments after its input, got "
                            f"{len(args)}")
        call = dict(zip(positional, args))
        for name in kwargs:
            if name in call:
                raise TypeError(f"{type(block).__name__}: got multiple values for argument {name!r}")
        call.update(kwargs)
        return call

    @classmethod
    def gather_arguments(cls, block: nn.Module, call: dict, rows: torch.Tensor, batch_size: int) -> dict:
        """``call`` for the unit's branch on the samples ``rows`` of a batch of ``batch_size`` (row, subset).

        Tensors named in :attr:`batched_arguments` are gathered along dim 0 (a size-1 dim 0 broadcasts and
        passes as is); other arguments pass through as they are, except a tensor not named in
        :attr:`unbatched_arguments` whose dim 0 is the batch size: whether that is a batch dimension cannot be
        told, so it is refused (ValueError naming it).
        """
        out = {}
        for name, value in call.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if name in cls.batched_arguments:
                    if value.shape[0] == batch_size:
                        value = value.index_select(0, rows)
                    elif value.shape[0] != 1:
                        raise ValueError(f"{name}: dim 0 is {value.shape[0]}, neither the batch size "
                                         f"({batch_size}) nor 1")
                elif value.shape[0] == batch_size and name not in cls.unbatched_arguments:
                    raise ValueError(
                        f"{name}: a converted {cls.family} unit runs on some samples of the batch in row "
                        f"and subset mode, and cannot tell whether this argument's dim 0 (size "
                        f"{batch_size}) is the batch; pass it without a batch dimension, or convert with "
                        "mode='batch'")
            out[name] = value
        return out

    # -- the model's own stochastic depth -----------------------------------------------------------------
    @staticmethod
    def own_drop(block: nn.Module, unit: int) -> tuple[float, str] | None:
        """``(drop probability, mode)`` of the model's own stochastic-depth module for this unit, if any."""
        return None

    @staticmethod
    def drop_module(block: nn.Module, unit: int) -> str | None:
        """The attribute of ``block`` holding its own stochastic-depth module for the unit (timm's
        ``drop_path1``), if its forward applies it to the residual just before the add; else None."""
        return None

    @staticmethod
    def own_scaling(block: nn.Module, unit: int) -> str | None:
        """The scaling the model's own module applies ("inverted", "none"), if its family defers to it."""
        return None

    # -- deployment (sdepth_ext.prune) ----------------------------------------------------------------------
    @classmethod
    def fold_scale(cls, block: nn.Module, unit: int, scale: float) -> None:
        """Multiply the unit's residual by ``scale`` inside its weights (its branch's last affine layer).

        What "paper" scaling's eval-time ``p_l`` becomes in a pruned model. Families whose branch ends in a
        non-linear layer cannot fold it: they raise ``ValueError``.
        """
        raise ValueError(f"{type(block).__name__}: {cls.family} units cannot fold a 'paper' scale into their "
                         "weights; convert with scaling='inverted' to prune them")

    @classmethod
    def removed(cls, block: nn.Module) -> nn.Module:
        """A plain torch module for the block with all its units removed, ``act(shortcut(x))``: the block's
        :attr:`projection` module, or ``nn.Identity``. A block with an activation after the add, or with a
        projection that is not one module of its own, has none (ValueError)."""
        if cls.activation(block) is not None or (cls.projection is None and cls.has_projection(block, 0)):
            raise ValueError(f"{type(block).__name__}: {cls.family} has no plain form of a removed block")
        projection = cls.projection_of(block)
        return nn.Identity() if projection is None else projection

    # -- helpers --------------------------------------------------------------------------------------------
    @classmethod
    def branch_parameters(cls, block: nn.Module, unit: int) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the unit's branch (names relative to ``block``)."""
        for attr in cls.branch(block, unit):
            value = getattr(block, attr)
            if isinstance(value, nn.Parameter):
                yield attr, value
            elif isinstance(value, nn.Module):
                for name, p in value.named_parameters():
                    yield f"{attr}.{name}", p

    @classmethod
    def branch_modules(cls, block: nn.Module, unit: int) -> list[nn.Module]:
        return [m for m in (getattr(block, a) for a in cls.branch(block, unit)) if isinstance(m, nn.Module)]


class ResNetAdapter(UnitAdapter):
    """A ResNet block (torchvision's, timm's): one unit, the shortcut ``downsample`` (None: the identity),
    and an activation after the add.

    Every block input of a ResNet is a ReLU output (the stem's ReLU / max-pool, or the previous block's
    activation), so where that activation is a ReLU a dropped identity unit is ``x`` itself (``relu(x) ==
    x``) and no kernel runs. A hand-made model that feeds a block negative values would see ``x``, not
    ``relu(x)``, from a dropped identity block (documented in docs/semantics.md).
    """

    projection = "downsample"

    @classmethod
    def dropped(cls, block: nn.Module, unit: int, x: torch.Tensor) -> torch.Tensor:
        if cls.activation(block) == ACTIVATION_RELU and not cls.has_projection(block, unit):
            return x  # relu(x) == x: the input is a ReLU output (class docstring)
        return super().dropped(block, unit, x)

    @classmethod
    def removed(cls, block: nn.Module) -> nn.Module:
        act = cls.activation(block)
        layers = [cls.projection_of(block)] if cls.has_projection(block, 0) else []
        if act != ACTIVATION_RELU:
            layers.append(act)
        elif layers:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers) if layers else nn.Identity()  # relu of a ReLU output: the identity


@torch.no_grad()
def scale_affine(module: nn.Module, scale: float) -> None:
    """Multiply an affine layer's output by ``scale`` through its weight and bias (BatchNorm, LayerNorm,
    Linear, Conv): ``(w x + b) * s = (s w) x + (s b)``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None:
        raise ValueError(f"{type(module).__name__}: no affine weight to fold a scale into")
    weight.mul_(scale)
    if bias is not None:
        bias.mul_(scale)


def last_linear(layers: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` among a sequential MLP's children (the affine layer a scale folds into)."""
    return [m for m in layers if isinstance(m, nn.Linear)][-1]
