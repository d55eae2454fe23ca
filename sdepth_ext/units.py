"""The generic forward of a converted block: its units read their gates from the step's plan.

:func:`sdepth_ext.convert` swaps each block's ``__class__`` to a class made here (:func:`gated_class`): the
block's own class with :class:`GatedUnits` in front and the family adapter as a class attribute. It adds no
parameters, buffers or submodules, so ``isinstance``, ``state_dict`` keys, object identity (optimizers, DDP
hooks) and weights stay those of the original block; only ``forward`` changes. Nothing here knows a family:
the adapter (:mod:`sdepth_ext.families`) says where each unit's branch and shortcut are and what follows the
add.

A unit never samples its own gate. The root module draws one :class:`~sdepth_ext.plan.Plan` per training
step (a forward pre-hook, outside every unit) into the shared :class:`~sdepth_ext.state.SdepthState`, and
unit ``l``
reads ``plan.counts[l]`` / ``plan.rows(l)`` / ``plan.slot(l)``. In training mode, per unit:

* no survivor (dropped): nothing of the branch runs (no module call, nothing in the autograd graph); the
  output is ``act(shortcut(x))`` (the adapter's :meth:`~sdepth_ext.families.UnitAdapter.dropped`);
* every sample survives: ``act(shortcut + scale * residual(x))``, one fused epilogue;
* some samples survive (row and subset mode): the branch runs on ``x.index_select(0, rows)`` only and the
  epilogue scatters the result back (:mod:`sdepth_ext.rows`: one backward node sums both gradients of the
  input; the gathered copy is not kept for backward where the input is kept anyway). Normalisation layers in
  the branch see the survivors alone: exact for LayerNorm (per sample), survivors' statistics for BatchNorm.

``scale`` is 1 ("paper" and "none" scaling) or, "inverted", ``1 / p_l`` (batch and row mode) or ``N / K``
(subset mode: K of the N samples kept, a count fixed by the plan). In eval mode every unit runs
(:func:`sdepth_ext.plain.eval_units`): "paper" fuses ``act(shortcut + p_l * residual)``; "inverted" and
"none" call the original block's forward, so the network is bit-identical to the unconverted one.

A training forward that does not go through the root (a sub-model built from the root's children, a
feature extractor) still gets a fresh plan: a unit that finds the plan already used by itself draws the
next one. Recomputation by activation checkpointing (inside backward) reuses the plan it ran with.

Call arguments: a block whose adapter ``takes_arguments`` (the Hugging Face layers: masks, output flags,
``**kwargs``) gets them by name in every unit's residual; in row and subset mode the adapter gathers those
with a batch dimension to the unit's survivors (:meth:`~sdepth_ext.families.UnitAdapter.gather_arguments`).
Other blocks take only their input in training (extra arguments raise TypeError naming them).

Options on the shared state, set by the helpers of :mod:`sdepth_ext.distributed`, :mod:`sdepth_ext.compiled`
and :mod:`sdepth_ext.checkpointing`:

* ``dropped_grads`` (default ``"zero"``): a dropped unit's branch parameters get exact zero gradients
  through autograd (:class:`~sdepth_ext.grads.ZeroGradTouch`, no activation work; one node for all dropped
  units of a step, attached by the block that ran last: :class:`~sdepth_ext.grads.PendingZeroGrads`), so
  optimizers apply
  weight decay and momentum to them as in the paper's code and in models with their own stochastic depth,
  and DDP's default ``find_unused_parameters=False`` sees every parameter each step. Normalisation layers
  of the dropped branch still do not run. ``"none"``: they get no gradient (frozen that step).
* ``shard=(rank, world_size)`` (row and subset mode): the rank draws its own samples' gates, as samples
  ``i * world_size + rank`` of the global batch.
* ``fsdp`` (:mod:`sdepth_ext.fsdp`, set once the model runs under FSDP2's ``fully_shard``): each plan tells it
  which sharded blocks skip their collectives; in row mode a unit without a survivor on this rank still runs
  its branch on an empty sub-batch, because another rank may run it (its all-gathers and reduce-scatter
  must happen on every rank).
* ``row_multiple=k`` (row mode): survivor counts rounded up to a multiple of k by promoting dropped samples
  (:func:`~sdepth_ext.plan.round_plan_rows`), so compiled regions see few shapes.
* ``checkpoint``: each surviving unit's branch runs under ``torch.utils.checkpoint`` with the plan bound at
  forward time; BatchNorm running statistics are not updated a second time by the recomputation.
* compiled regions (``compile_blocks``): a unit's residual and projection shortcut run through compiled
  functions kept in ``regions``; the gate decisions, the row gather and the epilogue stay in eager Python.

Compiled whole (``torch.compile(model)``, Dynamo tracing the units): the plan is drawn outside the graph
(the root's hooks run eagerly) and the units read it without bookkeeping. Subset mode runs the code above
(fixed counts; the rows are graph inputs). Batch and row mode read the plan's gates as a tensor
(:meth:`GatedUnits._sd_gated_in_graph`), so one graph serves every drop pattern.
"""

from __future__ import annotations

import copyreg
import pickle

import torch
from torch import nn

from .batchnorm import (
    batchnorm_stats,
    batchnorm_stats_where,
    frozen_batchnorm_stats,
    has_batchnorm,
    needs_two_samples,
)
from .checkpointing import run_checkpointed
from .families import UnitAdapter
from .functional import epilogue_kernels, fused_epilogue, is_compiling, keeps_output
from .grads import ZeroGradTouch
from .kernels import ACTIVATION_RELU
from .kernels.torch_epilogue import TorchEpilogue, gather_rows
from .plain import eval_units, kept_units, scriptable_copy, symbolic_forward
from .plan import Plan
from .rows import Regather, SplitRows, can_regather
from .state import SdepthState, WorkTally, record_call

__all__ = ["GatedUnits", "gated_class"]

_Proxy = torch.fx.Proxy
COND = getattr(torch, "cond", None)  # torch >= 2.5 (a prototype in torch 2.4's torch._higher_order_ops)


class GatedUnits:
    """``forward`` of a converted block; mixed in front of the block's own class.

    Set by :func:`sdepth_ext.convert` on the instance: ``_sd_index`` (its first unit's index, forward order),
    ``_sd_num_units`` and ``_sd_state`` (the shared :class:`~sdepth_ext.state.SdepthState`); on the class:
    ``_sd_adapter``, ``_sd_base`` (the original class, restored by :func:`sdepth_ext.revert`) and
    ``_sd_reshapes`` (the adapter has an ``enter``/``exit``; the others skip the two identity calls on every
    training forward).
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

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles the block's plain eval equivalent
        (:func:`sdepth_ext.plain.scriptable_copy`); a block in training mode raises TypeError naming what
        works instead."""
        return scriptable_copy(self)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state: SdepthState = self._sd_state
        if isinstance(x, _Proxy):
            return symbolic_forward(self, x, args, kwargs)
        call = None
        if (args or kwargs) and self._sd_adapter.takes_arguments:
            # Arguments the adapter passes to its branches (Hugging Face layers: masks, output flags); in row
            # and subset mode it gathers those with a batch dimension to the survivors' rows.
            if not self.training and state.scaling != "paper" and not state.lesioned:
                return self._sd_base.forward(self, x, *args, **kwargs)
            call = self._sd_adapter.bind_arguments(self, args, kwargs)
        elif args or kwargs:
            # Extra arguments of the block's own forward (timm ViT's attn_mask): the plain network accepts
            # them; a gated unit would have to gather them with the survivors. Unset values are fine.
            extra = [repr(a) for a in args if a is not None and a is not False] + [
                k for k, v in kwargs.items() if v is not None and v is not False]
            if extra and (self.training or state.scaling == "paper" or state.lesioned):
                raise TypeError(f"{type(self).__name__}: a converted unit takes only its input, got also "
                                f"{', '.join(extra)}; call it without them (or revert the model)")
            if not self.training and state.scaling != "paper" and not state.lesioned:
                return self._sd_base.forward(self, x, *args, **kwargs)
        compiling = is_compiling()
        if not compiling and state.call_order is not None:
            record_call(state, self)
        if not self.training:
            return self._sd_eval(x, state, call)
        adapter = self._sd_adapter
        first = self._sd_index
        if self._sd_reshapes:
            x = adapter.enter(self, x)
        for u in range(self._sd_num_units):
            l = first + u
            plan = state.plan_for(l, x)
            if compiling and plan.mode != "subset" and state.checkpoint is None:
                if plan.gates is not None:
                    x = self._sd_gated_in_graph(u, x, plan.gates[l], state, call)
                    continue
                # The first traced step: its gates are constants of that graph; later plans carry tensors.
                state.gate_tensors = True
            if plan.counts[l] == 0:
                if state.fsdp is not None and plan.mode == "row":
                    x = self._sd_empty_rows(u, x, plan, call)  # another rank may run it (module docstring)
                    continue
                x = adapter.dropped(self, u, x)
                if state.dropped_grads == "zero" and torch.is_grad_enabled():
                    if compiling:  # one node per unit: no state mutated inside a compiled graph
                        params = state.unit_parameters(l)
                        x = ZeroGradTouch.apply(x, state.every_param, *params) if params else x
                    else:
                        state.defer_zero_grads(l)
            elif state.checkpoint is not None and torch.is_grad_enabled():
                x = self._sd_checkpointed(u, x, plan, state, call)
            else:
                x = self._sd_active(u, x, plan, state.host_plan, state, call)
        if not compiling:  # the step's zero-gradient node (grads.PendingZeroGrads), eager only
            pending = state.zero_pending
            pending.last_exit = last = first + self._sd_num_units - 1
            if pending.params and pending.flush_at(last):
                x = pending.attach(x, state.every_param, state.fsdp is not None)
        return adapter.exit(self, x) if self._sd_reshapes else x

    def _sd_gated_in_graph(self, u: int, x: torch.Tensor, gate: torch.Tensor, state: SdepthState,
                           call: dict | None) -> torch.Tensor:
        """Unit ``u`` traced by Dynamo (the model compiled whole), its gate a graph input: one graph for
        every drop pattern.

        Batch mode, no BatchNorm and no convolution in the branch (transformer units): ``torch.cond`` on the
        0-dim bool ``gate``, so a dropped unit runs nothing of its branch at run time. Otherwise (BatchNorm,
        which ``torch.cond`` refuses because the branch mutates its running statistics; convolutions, whose
        weight gradients torch.cond's backward rejects when a size-1 dimension gives the two branches
        different strides, e.g. a depthwise [C, 1, k, k] weight; row mode, whose sub-batch sizes vary): the
        branch runs on every sample and its residual is multiplied by the gate
        (``[N]`` in row mode), as the unconverted model's own mask-multiply does; BatchNorm statistics are
        kept where no sample survives. Nothing is saved that way: docs/training.md.
        """
        l = self._sd_index + u
        scale = state.train_scale(l)
        adapter = self._sd_adapter
        branch = adapter.branch_modules(self, u)
        if gate.dim() == 0 and COND is not None and not has_batchnorm(branch) and not _has_conv(branch):
            # torch.cond wants both branches' outputs (and so their gradients) with the same strides, and no
            # output that is an input: both outputs as fresh tensors with the input's strides.
            def kept(x: torch.Tensor) -> torch.Tensor:
                out = self._sd_epilogue(u, self._sd_shortcut(u, x), self._sd_residual(u, x, call), scale)
                return _strided_like(out, x)

            def dropped(x: torch.Tensor) -> torch.Tensor:
                return _strided_like(adapter.dropped(self, u, x), x)

            return COND(gate, kept, dropped, (x,))
        saved = batchnorm_stats(*branch)
        residual = self._sd_residual(u, x, call)
        batchnorm_stats_where(gate.any(), saved)
        mask = gate.reshape(-1, *(1,) * (residual.dim() - 1)).to(residual.dtype)
        return self._sd_epilogue(u, self._sd_shortcut(u, x), residual * mask, scale)

    def _sd_checkpointed(self, u: int, x: torch.Tensor, plan: Plan, state: SdepthState,
                         call: dict | None) -> torch.Tensor:
        host_plan = state.host_plan

        def run(inp: torch.Tensor) -> torch.Tensor:  # the plan bound now: recomputation runs the same
            return self._sd_active(u, inp, plan, host_plan, state, call)

        return run_checkpointed(run, x, self, state.checkpoint)

    def _sd_eval(self, x: torch.Tensor, state: SdepthState, call: dict | None = None) -> torch.Tensor:
        """Every unit runs (lesioned ones removed), the "paper" scale fused into the epilogue."""
        first, lesioned = self._sd_index, state.lesioned
        if state.scaling != "paper" and not self.__dict__.get("_sd_regions") and not (
                lesioned and any(first + u in lesioned for u in range(self._sd_num_units))):
            return self._sd_base.forward(self, x, **(call or {}))
        kept, scales = kept_units(self)
        if call is None:
            return eval_units(self, self._sd_adapter, x, kept, scales, GatedUnits._sd_eval_unit)
        return eval_units(self, self._sd_adapter, x, kept, scales,
                          lambda block, u, t, scale: block._sd_eval_unit(u, t, scale, call))

    def _sd_eval_unit(self, u: int, x: torch.Tensor, scale: float, call: dict | None = None) -> torch.Tensor:
        return self._sd_epilogue(u, self._sd_shortcut(u, x), self._sd_residual(u, x, call), scale)

    def _sd_active(self, u: int, x: torch.Tensor, plan: Plan, host_plan: Plan | None,
                   state: SdepthState, call: dict | None = None) -> torch.Tensor:
        """A unit with at least one survivor under ``plan`` (an argument: recomputation passes the same)."""
        l = self._sd_index + u
        count = plan.counts[l]
        scale = state.train_scale(l, count, plan.batch_size)
        if count == plan.batch_size:
            # Batch mode's survivors, or row mode with every sample kept: no gather, no scatter.
            return self._sd_epilogue(u, self._sd_shortcut(u, x), self._sd_residual(u, x, call), scale)
        if x.shape[0] != plan.batch_size:
            raise RuntimeError(
                f"row-mode plan was drawn for a batch of {plan.batch_size} samples but unit {l} "
                f"({type(self).__name__}) got {x.shape[0]}: the converted model's first tensor argument must "
                "carry the batch in dimension 0, and the blocks must keep it")
        # Scheduler rows are sorted, unique and in range by construction, and the plan carries their map.
        rows, slot = plan.rows(l), plan.slot(l)
        call_rows = call
        if call is not None:  # the arguments with a batch dimension, gathered to the same rows
            call_rows = self._sd_adapter.gather_arguments(self, call, rows, plan.batch_size)
        if count == 1 and needs_two_samples(self._sd_adapter.branch_modules(self, u), x):
            shortcut = self._sd_shortcut(u, x)
            residual = self._sd_single_survivor_residual(u, x, host_plan or plan, l, call)
        elif is_compiling():  # plain ops for the compiler, which decides itself what to save and fuse
            shortcut = self._sd_shortcut(u, x)
            residual = self._sd_residual(u, gather_rows(x, rows), call_rows)
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
                    residual = self._sd_residual(u, gathered, call_rows)
            else:
                residual = self._sd_residual(u, gathered, call_rows)
        return self._sd_epilogue(u, shortcut, residual, scale, rows, slot)

    def _sd_empty_rows(self, u: int, x: torch.Tensor, plan: Plan, call: dict | None = None) -> torch.Tensor:
        """A unit without a survivor on this rank, run on an empty sub-batch: ``act(shortcut(x))``.

        Under FSDP2 in row mode another rank may have survivors: this rank must take part in the unit's
        collectives (the all-gathers of any sharded module inside the branch, the reduce-scatter of the
        branch's gradients). Running the branch on zero rows does that, and gives its parameters exact zero
        gradients. BatchNorm layers of the branch keep their statistics (an empty batch would count a step).
        """
        l = self._sd_index + u
        rows = plan.rows(l)
        shortcut = self._sd_shortcut(u, x)
        if call is not None:
            call = self._sd_adapter.gather_arguments(self, call, rows, plan.batch_size)
        with frozen_batchnorm_stats(*self._sd_adapter.branch_modules(self, u)):
            residual = self._sd_residual(u, gather_rows(x, rows), call)
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
    def _sd_residual(self, u: int, x: torch.Tensor, call: dict | None = None) -> torch.Tensor:
        """The unit's residual on ``x``; ``call``: the block's extra arguments (adapters that take them)."""
        regions = self.__dict__.get("_sd_regions")
        if regions is not None:
            return regions[u][0](x) if call is None else regions[u][0](x, **call)
        if call is None:
            return self._sd_adapter.residual(self, u, x)
        return self._sd_adapter.residual(self, u, x, **call)

    def _sd_shortcut(self, u: int, x: torch.Tensor) -> torch.Tensor:
        regions = self.__dict__.get("_sd_regions")
        if regions is not None and regions[u][1] is not None:
            return regions[u][1](x)
        return self._sd_adapter.shortcut(self, u, x)

    # -- the one-survivor BatchNorm case ----------------------------------------------------------------
    def _sd_single_survivor_residual(self, u: int, x: torch.Tensor, host_plan: Plan, l: int,
                                     call: dict | None = None) -> torch.Tensor:
        """The single survivor's branch, computed on a 2-sample sub-batch: the survivor and a dropped one.

        BatchNorm cannot normalise one value per channel. Rather than change the gate (treating the unit as
        dropped would lower its survival rate below ``p_l`` for small batches), the survivor is normalised
        together with the lowest-index dropped sample, as if the sub-batch were one sample wider. Only the
        survivor's residual reaches the output; the extra sample's residual feeds the BatchNorm statistics
        alone (so, as in batch mode, its input gets gradient only through those statistics).
        """
        if is_compiling():  # the same pair from the rows tensor: no host read, no graph break
            survivor = host_plan.rows(l).to(x.device)
            extra = (survivor == 0).long()
            pair_rows = torch.cat([torch.minimum(survivor, extra), torch.maximum(survivor, extra)])
            residual_pair = self._sd_residual(u, gather_rows(x, pair_rows))
            return residual_pair.index_select(0, (survivor > extra).long())
        survivor = host_plan.survivors(l)[0]
        extra = 1 if survivor == 0 else 0
        pair = sorted((survivor, extra))
        pair_rows = torch.tensor(pair, dtype=torch.int64, pin_memory=x.is_cuda)  # pinned: a truly async copy
        pair_rows = pair_rows.to(x.device, non_blocking=True)
        if call is not None:
            call = self._sd_adapter.gather_arguments(self, call, pair_rows, host_plan.batch_size)
        residual_pair = self._sd_residual(u, gather_rows(x, pair_rows), call)
        return residual_pair.narrow(0, pair.index(survivor), 1)


def _has_conv(modules: list[nn.Module]) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for module in modules for m in module.modules())


def _strided_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor of its own with the strides of ``x`` (same shape): a copy unless it is one."""
    if out is not x and out.stride() == x.stride():
        return out
    return x.new_empty_strided(x.shape, x.stride(), dtype=out.dtype).copy_(out)


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


# Names that sdepth_ext <= 0.2.0 pickled (torch.save(model)) and that now live elsewhere.
_LEGACY_NAMES = {"UnitsState": SdepthState, "WorkTally": WorkTally}


def __getattr__(name: str):
    try:
        return _LEGACY_NAMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
