"""The generic forward of a converted block: its units read their gates from the step's plan.

:func:`sdepth_ext.convert` swaps each block's ``__class__`` to a class made here (:func:`gated_class`): the
block's own class with :class:`GatedUnits` in front and the family adapter as a class attribute. It adds no
parameters, buffers or submodules, so ``isinstance``, ``state_dict`` keys, object identity (optimizers, DDP
hooks) and weights stay those of the original block; only ``forward`` changes. Nothing here knows a family:
the adapter (:mod:`sdepth_ext.families`) says where each unit's branch and shortcut are and what follows the
add.

A unit never samples its own gate. The root module draws one :class:`~sdepth_ext.scheduler.Plan` per
training step (a forward pre-hook, outside every unit) into the shared :class:`UnitsState`, and unit ``l``
reads ``plan.counts[l]`` / ``plan.rows(l)`` / ``plan.slot(l)``. In training mode, per unit:

* no survivor (dropped): nothing of the branch runs (no module call, nothing in the autograd graph); the
  output is ``act(shortcut(x))`` (the adapter's :meth:`~sdepth_ext.families.UnitAdapter.dropped`);
* every sample survives: ``act(shortcut + scale * residual(x))``, one fused epilogue;
* some samples survive (row and subset mode): the branch runs on ``x.index_select(0, rows)`` only and the
  epilogue scatters the result back (:mod:`sdepth_ext.rows`: one backward node sums both gradients of the
  input; the gathered copy is not kept for backward where the input is kept anyway). Normalisation layers in
  the branch see the survivors alone: exact for LayerNorm (per sample), survivors' statistics for BatchNorm.

``scale`` is 1 ("paper" and "none" scaling) or, "inverted", ``1 / p_l`` (batch and row mode) or ``N / K``
(subset mode: K of the N samples kept, a count fixed by the plan). In eval mode every unit runs:
"paper" fuses ``act(shortcut + p_l * residual)``; "inverted" and "none" call the original block's forward, so
the network is bit-identical to the unconverted one.

A training forward that does not go through the root (a sub-model built from the root's children, a
feature extractor) still gets a fresh plan: a unit that finds the plan already used by itself draws the
next one. Recomputation by activation checkpointing (inside backward) reuses the plan it ran with.

Options on the shared state, set by the helpers of :mod:`sdepth_ext.distributed`, :mod:`sdepth_ext.compiled`
and :mod:`sdepth_ext.checkpointing`:

* ``dropped_grads`` (default ``"zero"``): a dropped unit's branch parameters get exact zero gradients through
  autograd (:class:`_ZeroGradTouch`, no activation work), so optimizers apply weight decay and momentum to
  them as in the paper's code and in models with their own stochastic depth, and DDP's default
  ``find_unused_parameters=False`` sees every parameter each step. Normalisation layers of the dropped branch
  still do not run. ``"none"``: they get no gradient (frozen that step).
* ``shard=(rank, world_size)`` (row and subset mode): the rank draws its own samples' gates, as samples
  ``i * world_size + rank`` of the global batch.
* ``fsdp`` (:mod:`sdepth_ext.fsdp`, set once the model runs under FSDP2's ``fully_shard``): each plan tells it
  which sharded blocks skip their collectives; in row mode a unit without a survivor on this rank still runs
  its branch on an empty sub-batch, because another rank may run it (its all-gathers and reduce-scatter
  must happen on every rank).
* ``row_multiple=k`` (row mode): survivor counts rounded up to a multiple of k by promoting dropped samples
  (:func:`~sdepth_ext.scheduler.round_plan_rows`), so compiled regions see few shapes.
* ``checkpoint``: each surviving unit's branch runs under ``torch.utils.checkpoint`` with the plan bound at
  forward time; BatchNorm running statistics are not updated a second time by the recomputation.
* compiled regions (``compile_blocks``): a unit's residual and projection shortcut run through compiled
  functions kept in ``regions``; the gate decisions, the row gather and the epilogue stay in eager Python.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import pickle
import warnings
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .families import ACTIVATION_RELU, UnitAdapter
from .functional import (
    TorchEpilogue,
    _is_compiling,
    epilogue_kernels,
    fused_epilogue,
    gather_rows,
    keeps_output,
)
from .rows import Regather, SplitRows, can_regather
from .scheduler import MODES, Plan, Scheduler, mix64, round_plan_rows

__all__ = ["GatedUnits", "UnitsState", "gated_class", "is_gated", "gather_rows", "SCALINGS", "MODES"]

# What a dropped unit's branch parameters get (sdepth_ext.set_dropped_grads): zero gradients, as in the
# paper's code and in models with their own stochastic depth.
DEFAULT_DROPPED_GRADS = "zero"

# "paper": train act(id + f), evaluate act(id + p f); "inverted": train act(id + f / p), evaluate the plain
# network; "none": neither (timm's DropPath with scale_by_keep=False): train act(id + f), evaluate plain.
SCALINGS = ("paper", "inverted", "none")


# Bound once (both exist on torch >= 2.4): every unit's forward asks, and a module attribute lookup per call
# adds up over the 50-100 units of a network on a host-bound step.
_current_graph_task_id = torch._C._current_graph_task_id
_Proxy = torch.fx.Proxy


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return _current_graph_task_id() != -1


class UnitsState:
    """What all converted blocks of one model share: the scheduler, mode, scaling and the current plan.

    Held by the root module as a plain attribute (not a submodule, so it adds no ``state_dict`` keys) and by
    every converted block. ``units[l] = (block, u)``: unit ``l`` (forward order) is unit ``u`` of ``block``.
    ``p_l`` lives in the scheduler (:attr:`survival`); blocks hold only their first unit's index.
    """

    def __init__(self, units: list[tuple[nn.Module, int]], scheduler: Scheduler, scaling: str,
                 rates_from_model: bool):
        self.units = units
        self.scheduler = scheduler
        self.scaling = scaling
        self.rates_from_model = rates_from_model  # the survival list came from the model's own modules
        self.plan: Plan | None = None
        self.host_plan: Plan | None = None
        self.consumed = bytearray(len(units))  # which units already ran on the current plan
        self.hook_handles: list = []
        self.script_hooked: list[nn.Module] = []  # modules whose torch.jit.script compiles a plain copy
        self.cleanups: list[Callable[[], None]] = []  # run by revert (compiled regions register theirs)
        self.lesioned: frozenset = frozenset()
        self.call_order: list[nn.Module] | None = []  # blocks in call order during the first forward
        # Options (module docstring); the defaults reproduce the plain converted model.
        self.dropped_grads = DEFAULT_DROPPED_GRADS  # "zero" | "none"
        self.every_param = False  # DDP: every parameter's gradient must reach autograd's hooks each step
        self.shard: tuple[int, int] | None = None  # (rank, world_size), row and subset mode only
        self.fsdp = None  # sdepth_ext.fsdp.FsdpGates under FSDP2
        self.fsdp_seen: int | None = None  # id of the root's class when FSDP2 was last looked for
        self.row_multiple = 1
        self.checkpoint: dict | None = None  # kwargs of torch.utils.checkpoint.checkpoint, or None
        self.compile_kwargs: dict | None = None  # compile_blocks' torch.compile kwargs (copies recompile)
        self.tally = WorkTally(len(units))  # what ran, for sdepth_ext.compute_stats
        self.input_meta: tuple | None = None  # (shape without the batch, dtype, device) of the last step
        self.macs_cache: dict = {}

    @property
    def mode(self) -> str:
        return self.scheduler.mode

    @property
    def survival(self) -> list[float]:
        return self.scheduler.survival

    @property
    def blocks(self) -> list[nn.Module]:
        """The converted blocks in unit order (a two-unit block appears once)."""
        seen: dict[int, nn.Module] = {}
        for block, _ in self.units:
            seen.setdefault(id(block), block)
        return list(seen.values())

    def sample(self, batch_size: int, device: torch.device) -> Plan:
        """Draw the plan of one step and move it to ``device`` (one copy of the packed buffer).

        The buffer is allocated pinned only when it is going to a GPU (decided here, per draw: nothing about
        pinning is stored, so a model pickled on a GPU machine trains on a CPU-only one).
        """
        pin = device.type == "cuda"
        if self.shard is not None and self.mode != "batch":
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
        self.consumed = bytearray(len(self.units))
        self.tally.add(host_plan)
        if self.fsdp is not None:
            self.fsdp.on_plan(host_plan)
        return self.plan

    def reset_tally(self) -> None:
        self.tally = WorkTally(len(self.units))

    def plan_for(self, l: int, x: torch.Tensor) -> Plan:
        """The plan unit ``l`` runs on: the step's, or a fresh one if this unit already used it."""
        if in_backward() and self.plan is not None:
            return self.plan  # recomputation (checkpointing) reruns the forward it belongs to
        if self.plan is None or self.consumed[l]:
            # A training forward that did not start at the root (whose pre-hook draws the step's plan): a
            # sub-model of the root's children, a feature extractor, a block called alone.
            self.sample(int(x.shape[0]), x.device)
        self.consumed[l] = 1
        return self.plan

    @property
    def effective_survival(self) -> list[float]:
        """``p_l(s)``: the rates the gates are drawn with under the scheduler's drop scale ``s``."""
        return self.scheduler.effective_survival

    def train_scale(self, l: int, count: int | None = None, batch_size: int | None = None) -> float:
        """Unit ``l``'s residual factor in training; subset mode needs its ``count`` of ``batch_size``."""
        if self.scaling != "inverted":
            return 1.0
        if self.mode == "subset":
            return batch_size / count  # exactly K of the N samples kept: an unbiased residual
        p = self.effective_survival[l]  # the rate the gate was drawn with: an unbiased residual
        # p_l = 0 means the unit never survives a training step, so its scale is never used.
        return 1.0 / p if p > 0.0 else 0.0

    def eval_scale(self, l: int) -> float:
        return self.effective_survival[l] if self.scaling == "paper" else 1.0

    def unit_parameters(self, l: int) -> list[nn.Parameter]:
        block, u = self.units[l]
        return [p for _, p in block._sd_adapter.branch_parameters(block, u)]

    # -- numbering in forward order -------------------------------------------------------------------------
    def record_call(self, block: nn.Module) -> None:
        if self.call_order is not None and not any(block is b for b in self.call_order):
            self.call_order.append(block)

    def finish_first_forward(self) -> None:
        """After the root's first forward: renumber the units in the order they ran, if that differs."""
        order, self.call_order = self.call_order, None
        if not order:
            return
        blocks = self.blocks
        ran = [b for b in order if any(b is c for c in blocks)]
        ran += [b for b in blocks if not any(b is c for c in ran)]
        if all(a is b for a, b in zip(ran, blocks)):
            return
        old = {(id(block), u): l for l, (block, u) in enumerate(self.units)}
        units = [(block, u) for block in ran for u in range(block._sd_num_units)]
        survival = self.survival
        if self.rates_from_model:  # each unit keeps its own rate
            survival = [survival[old[(id(b), u)]] for b, u in units]
        warnings.warn(
            "sdepth_ext.convert: the model registers its residual blocks in another order than its forward "
            "runs them; units are renumbered in forward order (survival_probs, lesion and prune indices "
            "follow the forward)", UserWarning, stacklevel=3)
        first: dict[int, int] = {}
        for l, (block, _) in enumerate(units):
            first.setdefault(id(block), l)
        for block in ran:
            block._sd_index = first[id(block)]
        self.units = units
        scheduler = self.scheduler
        self.scheduler = Scheduler(survival, mode=scheduler.mode, seed=scheduler.seed,
                                   backend=scheduler.backend)
        self.scheduler.step = scheduler.step
        self.scheduler.set_drop_scale(scheduler.drop_scale)
        self.reset_tally()
        self.macs_cache = {}
        self.plan = self.host_plan = None

    def __repr__(self) -> str:
        return (f"UnitsState(units={len(self.units)}, mode={self.mode!r}, scaling={self.scaling!r}, "
                f"scheduler={self.scheduler!r})")


class WorkTally:
    """Samples each unit ran on, for the last step and in all, and the samples seen (compute_stats)."""

    def __init__(self, num_units: int):
        self.last = [0] * num_units
        self.total = [0] * num_units
        self.last_batch = 0
        self.samples = 0
        self.steps = 0

    def add(self, plan: Plan) -> None:
        self.last = list(plan.counts)
        self.total = [t + c for t, c in zip(self.total, plan.counts)]
        self.last_batch = plan.batch_size
        self.samples += plan.batch_size
        self.steps += 1


class GatedUnits:
    """``forward`` of a converted block; mixed in front of the block's own class.

    Set by :func:`sdepth_ext.convert` on the instance: ``_sd_index`` (its first unit's index, forward order),
    ``_sd_num_units`` and ``_sd_state`` (the shared :class:`UnitsState`); on the class: ``_sd_adapter``,
    ``_sd_base`` (the original class, restored by :func:`sdepth_ext.revert`) and ``_sd_reshapes`` (the
    adapter has an ``enter``/``exit``; the others skip the two identity calls on every forward).
    """

    _sd_adapter: type[UnitAdapter]
    _sd_base: type
    _sd_reshapes: bool

    def __reduce_ex__(self, protocol):
        # The generated class exists only in a process that converted a model of its kind, so pickle
        # (torch.save(model), deepcopy) names the original block class and the adapter instead, and loading
        # rebuilds the generated class: a model saved in one process loads in a fresh one.
        reduced = super().__reduce_ex__(protocol)
        if reduced[0] is not copyreg.__newobj__ or reduced[1] != (type(self),):
            raise pickle.PicklingError(f"{type(self).__name__}: pickle protocol 2 or higher is needed "
                                       f"(torch.save's default), got protocol {protocol}")
        return (_new_gated_block, (self._sd_base, self._sd_adapter), *reduced[2:])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state: UnitsState = self._sd_state
        if isinstance(x, _Proxy):
            return self._sd_symbolic(x, args, kwargs)
        if args or kwargs:
            # Extra arguments of the block's own forward (timm ViT's attn_mask): the plain network accepts
            # them; a gated unit would have to gather them with the survivors. Unset values are fine.
            extra = [repr(a) for a in args if a is not None and a is not False] + [
                k for k, v in kwargs.items() if v is not None and v is not False]
            if extra and (self.training or state.scaling == "paper" or state.lesioned):
                raise TypeError(f"{type(self).__name__}: a converted unit takes only its input, got also "
                                f"{', '.join(extra)}; call it without them (or revert the model)")
            if not self.training and state.scaling != "paper" and not state.lesioned:
                return self._sd_base.forward(self, x, *args, **kwargs)
        if state.call_order is not None:
            state.record_call(self)
        adapter = self._sd_adapter
        first = self._sd_index
        if not self.training:
            lesioned = state.lesioned
            if state.scaling != "paper" and not self.__dict__.get("_sd_regions") and not (
                    lesioned and any(first + u in lesioned for u in range(self._sd_num_units))):
                return self._sd_base.forward(self, x)
            if self._sd_reshapes:
                x = adapter.enter(self, x)
            for u in range(self._sd_num_units):
                l = first + u
                if l in lesioned:
                    x = adapter.dropped(self, u, x)
                else:
                    x = self._sd_epilogue(u, self._sd_shortcut(u, x), self._sd_residual(u, x),
                                          state.eval_scale(l))
            return adapter.exit(self, x) if self._sd_reshapes else x

        if self._sd_reshapes:
            x = adapter.enter(self, x)
        for u in range(self._sd_num_units):
            l = first + u
            plan = state.plan_for(l, x)
            if plan.counts[l] == 0:
                if state.fsdp is not None and plan.mode == "row":
                    x = self._sd_empty_rows(u, x, plan)  # another rank may run it (module docstring)
                    continue
                x = adapter.dropped(self, u, x)
                if state.dropped_grads == "zero" and torch.is_grad_enabled():
                    params = state.unit_parameters(l)
                    x = _ZeroGradTouch.apply(x, state.every_param, *params) if params else x
            elif state.checkpoint is not None and torch.is_grad_enabled():
                x = self._sd_checkpointed(u, x, plan, state.host_plan, state)
            else:
                x = self._sd_active(u, x, plan, state.host_plan, state)
        return adapter.exit(self, x) if self._sd_reshapes else x

    # -- torch.fx tracing -----------------------------------------------------------------------------------
    def _sd_symbolic(self, x: _Proxy, args: tuple, kwargs: dict):
        """The block under a torch.fx tracer (any: ``symbolic_trace``, torchvision's and timm's).

        Training: the block becomes a leaf (a ``call_module`` node), so the traced graph calls this module,
        which draws the gates of each step as it runs; inlining it would freeze one step's gates into the
        graph. Evaluation: traced through, as the plain ops of the eval forward (the original block's own
        forward for "inverted"/"none" scaling, ``act(shortcut + p_l * residual)`` with lesioned units as
        their shortcut for "paper"), so the graph equals ``sd.prune(model, lesioned)`` and scripts. Extra
        arguments whose values the trace cannot know (timm's ViT passes its traced ``attn_mask`` on): with
        "paper" scaling the block's own forward is traced, its drop modules standing for the ``p_l`` scales,
        where the adapter names them (:meth:`~sdepth_ext.families.UnitAdapter.drop_module`); otherwise, and
        with lesioned units, the block stays a leaf and checks them when the graph runs.
        """
        state: UnitsState = self._sd_state
        first, count = self._sd_index, self._sd_num_units
        lesioned = [first + u in state.lesioned for u in range(count)]
        plain = state.scaling != "paper" and not any(lesioned)
        extra = any(a is not None and a is not False for a in (*args, *kwargs.values()))
        adapter = self._sd_adapter
        if not self.training and extra and state.scaling == "paper" and not any(lesioned):
            slots = [adapter.drop_module(self, u) for u in range(count)]
            if all(slots):  # the block's own forward, its drop modules standing for the p_l scales
                return self._sd_trace_with_eval_scales(x, args, kwargs, slots)
        if self.training or (extra and not plain):
            tracer = x.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (x, *args), kwargs)
        if plain:
            return self._sd_base.forward(self, x, *args, **kwargs)
        x = adapter.enter(self, x)
        for u in range(count):
            if lesioned[u]:
                x = adapter.dropped(self, u, x)
                continue
            residual = adapter.residual(self, u, x)
            # The eager eval path's arithmetic (functional._gated_residual_add_torch): p * residual, then one
            # add, after the same cast of an autocast shortcut to the residual's dtype.
            scale = state.eval_scale(first + u)
            scaled = residual if scale == 1.0 else scale * residual
            x = adapter.shortcut(self, u, x).to(residual.dtype) + scaled
            act = adapter.activation(self)
            if act is not None:
                x = torch.relu(x) if act == ACTIVATION_RELU else act(x)
        return adapter.exit(self, x)

    def _sd_trace_with_eval_scales(self, x: _Proxy, args: tuple, kwargs: dict, slots: list[str]):
        """Trace the block's own forward (with the extra arguments it takes) in eval, each unit's drop module
        shadowed, for the trace only, by a multiplication by its ``p_l``: "paper" scaling's eval forward.

        A plain function in the instance ``__dict__`` shadows the submodule (a module put in its place would
        have to be known to the tracer's module table); the graph holds the multiplication.
        """
        state: UnitsState = self._sd_state
        try:
            for u, name in enumerate(slots):
                self.__dict__[name] = functools.partial(_eval_scale, state.eval_scale(self._sd_index + u))
            return self._sd_base.forward(self, x, *args, **kwargs)
        finally:
            for name in slots:
                self.__dict__.pop(name, None)

    # -- TorchScript -----------------------------------------------------------------------------------------
    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles the block's plain eval equivalent (:func:`sdepth_ext.deploy.
        scriptable_copy`); a block in training mode raises TypeError naming what works instead."""
        from .deploy import scriptable_copy  # deploy imports this module

        return scriptable_copy(self)

    def _sd_active(self, u: int, x: torch.Tensor, plan: Plan, host_plan: Plan | None,
                   state: UnitsState) -> torch.Tensor:
        """A unit with at least one survivor under ``plan`` (an argument: recomputation passes the same)."""
        l = self._sd_index + u
        count = plan.counts[l]
        scale = state.train_scale(l, count, plan.batch_size)
        if count == plan.batch_size:
            # Batch mode's survivors, or row mode with every sample kept: no gather, no scatter.
            return self._sd_epilogue(u, self._sd_shortcut(u, x), self._sd_residual(u, x), scale)
        if x.shape[0] != plan.batch_size:
            raise RuntimeError(
                f"row-mode plan was drawn for a batch of {plan.batch_size} samples but unit {l} "
                f"({type(self).__name__}) got {x.shape[0]}: the converted model's first tensor argument must "
                "carry the batch in dimension 0, and the blocks must keep it")
        # Scheduler rows are sorted, unique and in range by construction, and the plan carries their map.
        rows, slot = plan.rows(l), plan.slot(l)
        if count == 1 and self._sd_bn_needs_two_samples(u, x):
            shortcut = self._sd_shortcut(u, x)
            residual = self._sd_single_survivor_residual(u, x, host_plan or plan, l)
        elif _is_compiling():  # plain ops for the compiler, which decides itself what to save and fuse
            shortcut = self._sd_shortcut(u, x)
            residual = self._sd_residual(u, gather_rows(x, rows))
        else:
            # One node for the input's two consumers: its backward adds the rows' gradient into the
            # shortcut's in one pass (sdepth_ext.rows).
            kernels = epilogue_kernels(x)
            x_all, gathered = SplitRows.apply(x, rows, slot, kernels)
            shortcut = self._sd_shortcut(u, x_all)
            # Where x is kept for backward anyway (a ReLU output, or the input of a projection shortcut,
            # which its weight's gradient needs), the branch's copy of its rows need not be. On the GPU's
            # path only: on a CPU the gather again is a memory-bound pass of the step's time, and the torch
            # path would launch more than the model's own mask-multiply does.
            if (kernels is not TorchEpilogue and state.checkpoint is None and can_regather()
                    and (keeps_output(x.grad_fn) or self._sd_adapter.has_projection(self, u))):
                with Regather(x, rows, gathered):
                    residual = self._sd_residual(u, gathered)
            else:
                residual = self._sd_residual(u, gathered)
        return self._sd_epilogue(u, shortcut, residual, scale, rows, slot)

    def _sd_empty_rows(self, u: int, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """A unit without a survivor on this rank, run on an empty sub-batch: ``act(shortcut(x))``.

        Under FSDP2 in row mode another rank may have survivors: this rank must take part in the unit's
        collectives (the all-gathers of any sharded module inside the branch, the reduce-scatter of the
        branch's gradients). Running the branch on zero rows does that, and gives its parameters exact zero
        gradients. BatchNorm layers of the branch keep their statistics (an empty batch would count a step).
        """
        l = self._sd_index + u
        rows = plan.rows(l)
        shortcut = self._sd_shortcut(u, x)
        with _frozen_batchnorm_stats(*self._sd_adapter.branch_modules(self, u)):
            residual = self._sd_residual(u, gather_rows(x, rows))
        return self._sd_epilogue(u, shortcut, residual, 1.0, rows, plan.slot(l))

    def _sd_epilogue(self, u: int, shortcut: torch.Tensor, residual: torch.Tensor, scale: float,
                     rows: torch.Tensor | None = None, slot: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut.dtype != residual.dtype:
            # Autocast: e.g. an fp32 identity with a bf16 residual, and the fused epilogue needs one dtype.
            # torchvision adds in place on the residual (fp32 add, one rounding); casting the shortcut first
            # rounds once more, so results can differ from torchvision's by one ulp of the residual's dtype
            # (tested).
            shortcut = shortcut.to(residual.dtype)
        act = self._sd_adapter.activation(self)
        relu = act == ACTIVATION_RELU
        out = fused_epilogue(shortcut, residual, scale, rows, slot, relu)
        return out if relu or act is None else act(out)

    # -- compiled regions (sdepth_ext.compile_blocks) ------------------------------------------------------
    def _sd_residual(self, u: int, x: torch.Tensor) -> torch.Tensor:
        regions = self.__dict__.get("_sd_regions")
        if regions is not None:
            return regions[u][0](x)
        return self._sd_adapter.residual(self, u, x)

    def _sd_shortcut(self, u: int, x: torch.Tensor) -> torch.Tensor:
        regions = self.__dict__.get("_sd_regions")
        if regions is not None and regions[u][1] is not None:
            return regions[u][1](x)
        return self._sd_adapter.shortcut(self, u, x)

    # -- activation checkpointing (sdepth_ext.checkpoint_blocks) -------------------------------------------
    def _sd_checkpointed(self, u: int, x: torch.Tensor, plan: Plan, host_plan: Plan | None,
                         state: UnitsState) -> torch.Tensor:
        calls = [0]

        def run(inp: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return self._sd_active(u, inp, plan, host_plan, state)
            # Recomputation: same plan (bound above); BatchNorm must not update its running statistics a
            # second time (plain torch.utils.checkpoint would apply the momentum twice per step).
            with _frozen_batchnorm_stats(self):
                return self._sd_active(u, inp, plan, host_plan, state)

        return torch.utils.checkpoint.checkpoint(run, x, **state.checkpoint)

    # -- the one-survivor BatchNorm case ----------------------------------------------------------------
    def _sd_bn_needs_two_samples(self, u: int, x: torch.Tensor) -> bool:
        """True when a training-mode BatchNorm in the unit's branch would see one value per channel for one
        sample: BatchNorm raises on that (e.g. resnet18's layer4 at 1x1 for 32x32 inputs).

        Host arithmetic on the geometry of the branch's convolutions (in registration order, which is their
        order of use in every supported family); no tensor is touched.
        """
        if x.dim() != 4:
            return False
        modules = [m for branch in self._sd_adapter.branch_modules(self, u) for m in branch.modules()]
        if not any(isinstance(m, _BatchNorm) and m.training for m in modules):
            return False
        size = tuple(x.shape[-2:])
        for m in modules:
            if isinstance(m, nn.Conv2d):
                size = _conv_output_size(m, size)
                if size[0] * size[1] == 1:
                    return True
        return False

    def _sd_single_survivor_residual(self, u: int, x: torch.Tensor, host_plan: Plan, l: int) -> torch.Tensor:
        """The single survivor's branch, computed on a 2-sample sub-batch: the survivor and a dropped one.

        BatchNorm cannot normalise one value per channel. Rather than change the gate (treating the unit as
        dropped would lower its survival rate below ``p_l`` for small batches), the survivor is normalised
        together with the lowest-index dropped sample, as if the sub-batch were one sample wider. Only the
        survivor's residual reaches the output; the extra sample's residual feeds the BatchNorm statistics
        alone (so, as in batch mode, its input gets gradient only through those statistics).
        """
        survivor = host_plan.survivors(l)[0]
        extra = 1 if survivor == 0 else 0
        pair = sorted((survivor, extra))
        pair_rows = torch.tensor(pair, dtype=torch.int64, pin_memory=x.is_cuda)  # pinned: a truly async copy
        pair_rows = pair_rows.to(x.device, non_blocking=True)
        residual_pair = self._sd_residual(u, gather_rows(x, pair_rows))
        return residual_pair.narrow(0, pair.index(survivor), 1)


def _eval_scale(p: float, t: torch.Tensor) -> torch.Tensor:
    """``p * t``: what a block's own drop module stands for while torch.fx traces its "paper" eval forward."""
    return t if p == 1.0 else p * t


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


# Parameter types whose zero gradients may be views of one shared fill (not DTensors and other subclasses).
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


class _ZeroGradTouch(torch.autograd.Function):
    """``out`` unchanged in forward; in backward, exact zero gradients for ``params`` (a dropped unit's).

    The parameters thereby take part in autograd, as they do in a model whose stochastic depth multiplies the
    residual by a zero gate (timm's DropPath, torchvision's StochasticDepth): optimizers apply weight decay
    and momentum to them, and DDP's per-parameter hooks fire with ``find_unused_parameters=False``. No
    activation work; in backward one zero fill per dtype and device for the whole unit, whose views become
    the gradients (autograd keeps a fresh gradient tensor as ``.grad`` without a copy), not one per parameter.
    A parameter that already has a gradient (``zero_grad(set_to_none=False)``, gradient accumulation) gets
    ``None``, which leaves it as it is -- the same as adding zero, with no launch -- unless every parameter
    must reach autograd's hooks (``every_param``: DDP).

    A parameter that is a tensor subclass (FSDP2's sharded DTensor, of a block whose collectives were skipped)
    gets ``zeros_like`` of itself: a zero gradient of its local shard, with no communication.

    ``out.detach()`` (not ``out`` itself) is returned so that autograd treats the result as a fresh tensor:
    an input returned as-is becomes a view that may not be modified in place. It still shares memory and
    version counter with ``out``, exactly like the un-touched dropped unit returning its input.
    """

    @staticmethod
    def forward(ctx, out, every_param, *params):
        ctx.every_param = every_param
        ctx.params = params
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        params = ctx.params
        wanted = [p for p in params if ctx.every_param or p.grad is None]
        zeros = dict(zip(map(id, wanted), _zero_views(wanted)))
        return (grad, None, *(zeros.get(id(p)) for p in params))


def _zero_views(params: list) -> list[torch.Tensor]:
    """Zero tensors shaped (and strided) like ``params``: views of one zero fill per (dtype, device)."""
    views: list = [None] * len(params)
    groups: dict = {}
    for i, p in enumerate(params):
        if type(p) in _PLAIN_TENSORS and p.is_contiguous():
            groups.setdefault((p.dtype, p.device), []).append(i)
        else:  # a channels_last conv weight, a sharded DTensor: a gradient of the parameter's own kind
            views[i] = torch.zeros_like(p)
    for (dtype, device), members in groups.items():
        flat = torch.zeros(sum(params[i].numel() for i in members), dtype=dtype, device=device)
        start = 0
        for i in members:
            views[i] = flat[start:start + params[i].numel()].view(params[i].shape)
            start += params[i].numel()
    return views



@contextlib.contextmanager
def _frozen_batchnorm_stats(*modules: nn.Module):
    """Inside, BatchNorm layers of ``modules`` update stand-in copies of their buffers; originals untouched.

    Swapping in clones (rather than restoring values with ``copy_`` afterwards) leaves the originals' version
    counters alone: the recomputed graph saves the running statistics for BatchNorm's backward, and an
    in-place restore would make autograd reject that graph.
    """
    swapped = []
    for m in (m for module in modules for m in module.modules()):
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


# ------------------------------------------------------------------------------------------------------------
# Generated classes
# ------------------------------------------------------------------------------------------------------------
_GATED_CLASSES: dict[type, type] = {}


def _register_generated(cls: type) -> type:
    # A module-level name for readable reprs and for pickling the class object itself (within the process;
    # instances pickle through GatedUnits.__reduce_ex__, which works across processes).
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls
    return cls


def gated_class(cls: type, adapter: type[UnitAdapter]) -> type:
    """The converted subclass of block class ``cls``: :class:`GatedUnits` first, the adapter attached."""
    gated = _GATED_CLASSES.get(cls)
    if gated is None:
        name = f"Gated_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        reshapes = adapter.enter is not UnitAdapter.enter or adapter.exit is not UnitAdapter.exit
        gated = _register_generated(type(name, (GatedUnits, cls), {
            "_sd_adapter": adapter, "_sd_base": cls, "_sd_reshapes": reshapes}))
        _GATED_CLASSES[cls] = gated
    return gated


def _new_gated_block(base: type, adapter: type[UnitAdapter]) -> GatedUnits:
    """Unpickling: an empty instance of the generated class of ``base``; pickle then restores its state."""
    cls = gated_class(base, adapter)
    return cls.__new__(cls)


def is_gated(module: nn.Module) -> bool:
    return isinstance(module, GatedUnits)
