"""What a dropped unit's branch parameters get: the dropped-gradient policies and the zero-gradient node.

``"zero"`` (the default everywhere: the paper's code, timm's DropPath and torchvision's StochasticDepth, whose
zero gate still hands every parameter a gradient): exact zero gradients, so optimizers apply weight decay and
momentum to dropped units too and DDP's default ``find_unused_parameters=False`` sees every parameter each
step. ``"none"``: no gradient (frozen that step). Set with :func:`sdepth_ext.set_dropped_grads`.

How the zeros arrive: where something may watch a parameter's gradient arrive (DDP's and FSDP's hooks, a
tensor hook, ``autograd.grad``), through autograd (:class:`ZeroGradTouch`); in a plain single-process
``backward()`` of the whole graph, written to ``.grad`` directly by the step's one node
(:class:`StepZeroGrads`), which is what autograd would have left there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import distributed, nn
from torch._dynamo import compiled_autograd  # already loaded: torch.compiler.disable imports torch._dynamo
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the pure-Python install (SDEPTH_SKIP_BUILD=1): the Python loop
    _C = None

__all__ = ["DROPPED_GRADS", "DEFAULT_DROPPED_GRADS", "ZeroGradTouch", "StepZeroGrads", "PendingZeroGrads",
           "zero_grads", "is_plain_tensor", "ParameterSlots"]

DROPPED_GRADS = ("zero", "none")
DEFAULT_DROPPED_GRADS = "zero"

# Parameter types whose zero gradients come from one foreach fill (not DTensors and other subclasses).
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def is_plain_tensor(t: torch.Tensor) -> bool:
    """True for a plain tensor or parameter; False for a subclass (FSDP2's sharded DTensor, ...)."""
    return type(t) in _PLAIN_TENSORS


def _all_plain(params) -> bool:
    """:func:`is_plain_tensor` of every parameter (its test inlined: no call per parameter and step)."""
    return all(type(p) in _PLAIN_TENSORS for p in params)


class ZeroGradTouch(torch.autograd.Function):
    """``out`` unchanged in forward; in backward, exact zero gradients for ``params`` (a dropped unit's).

    The parameters thereby take part in autograd, as they do in a model whose stochastic depth multiplies the
    residual by a zero gate (timm's DropPath, torchvision's StochasticDepth): optimizers apply weight decay
    and momentum to them, and DDP's per-parameter hooks fire with ``find_unused_parameters=False``. No
    activation work; in backward the zeros of :func:`zero_grads` (autograd keeps a fresh gradient tensor as
    ``.grad`` without a copy). One node carries all dropped units of a step (:class:`PendingZeroGrads`). A
    parameter that already has a gradient (``zero_grad(set_to_none=False)``, gradient accumulation) gets
    ``None``, which leaves it as it is -- the same as adding zero, with no launch -- unless every parameter
    must reach autograd's hooks (``every_param``: DDP).

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
    def backward(ctx, grad):  # differentiable: ``grad`` passes through, the zeros are constants
        params = ctx.params
        if ctx.every_param:
            return (grad, None, *zero_grads(params))
        return (grad, None, *_zeros_where_missing(params))


def zero_grads(params: list) -> list[torch.Tensor]:
    """Zero tensors shaped, strided and typed like ``params``: uninitialised allocations (no launch each) and
    one ``_foreach_zero_`` (one fused launch per few hundred tensors on a GPU, one C++ call on a CPU).

    About 2 us of host time per parameter, against 10 for views of one flat fill (a slice and a view each),
    and the parameter's own layout (channels_last) with no case apart. A tensor subclass (FSDP2's sharded
    DTensor) gets ``zeros_like`` of itself: a zero gradient of its local shard, with no communication.
    """
    if _all_plain(params):
        zeros = [torch.empty_like(p) for p in params]
        if zeros:
            torch._foreach_zero_(zeros)
        return zeros
    return [torch.zeros_like(p) for p in params]


def _zeros_where_missing(params) -> list:
    """Per parameter, a zero gradient where it has none and requires one, else None (an existing gradient
    stays as it is: the same as adding zero, with no launch)."""
    wanted = [p.grad is None and p.requires_grad for p in params]
    zeros = iter(zero_grads([p for p, w in zip(params, wanted) if w]))
    return [next(zeros) if w else None for w in wanted]


# csrc/grads.cpp: the same in one C++ call (None: not built, or a build from before it existed).
_COMPILED_SET_MISSING_ZERO_GRADS = getattr(_C, "set_missing_zero_grads", None)
# csrc/grads.cpp: the same when the running backward ends, unless a parameter is hooked (None: not built).
_COMPILED_QUEUE_MISSING_ZERO_GRADS = getattr(_C, "queue_missing_zero_grads", None)
# csrc/grads.cpp: lets the engine skip the AccumulateGrad nodes StepZeroGrads hands no gradient (None: not
# built; the engine then runs them, a no-op each).
_COMPILED_SKIP_IDLE_ACCUMULATORS = getattr(_C, "skip_idle_accumulators", None)


def _set_missing_zero_grads(params) -> None:
    """``.grad`` = zeros where a parameter has none and requires one: what autograd would leave there.

    Plain tensors go to one C++ call (``sdepth_ext._C``, csrc/grads.cpp) when it is built: the same
    allocations, fill and ``.grad`` sets without a Python round trip per parameter (``bench_host``'s
    host-bound step times the policy). Under Dynamo, and without the build, the Python loop."""
    if (_COMPILED_SET_MISSING_ZERO_GRADS is not None and not torch.compiler.is_compiling()
            and _all_plain(params)):
        _COMPILED_SET_MISSING_ZERO_GRADS(params)
        return
    fresh = [p for p in params if p.grad is None and p.requires_grad]
    for p, zero in zip(fresh, zero_grads(fresh)):
        p.grad = zero


# A leaf tensor no caller can name in ``autograd.grad(..., inputs)`` or ``backward(inputs=...)``: the engine
# will run its AccumulateGrad only in a backward of the whole graph, where every parameter's runs too.
_WHOLE_GRAPH_PROBE = torch.zeros((), requires_grad=True)
# That AccumulateGrad, held so that every graph links the same node: the backward asks the engine about it
# directly (``ctx.next_functions`` would build a Python object per edge: one per dropped parameter).
_WHOLE_GRAPH_PROBE_NODE = _WHOLE_GRAPH_PROBE.view_as(_WHOLE_GRAPH_PROBE).grad_fn.next_functions[0][0]


def _compiled_autograd() -> bool:
    """Whether this backward runs in compiled autograd's graph, which wants a tensor for every input that
    requires grad (a None for the probe fails there at run time)."""
    region = getattr(compiled_autograd, "in_compiled_autograd_region", None)  # torch >= 2.5
    return bool(compiled_autograd.compiled_autograd_enabled if region is None else region)


def _watched(p: torch.Tensor) -> bool:
    """Whether a hook on the parameter itself waits for its gradient to arrive through autograd."""
    return bool(p._backward_hooks) or p._post_accumulate_grad_hooks is not None


def _write_missing_zero_grads_unless_watched(params) -> bool:
    """From :class:`StepZeroGrads`'s backward: :func:`_set_missing_zero_grads`, unless a hook on a parameter
    waits for its gradient to arrive through autograd (then nothing, and False).

    The C++ build writes them when the backward ends (csrc/grads.cpp says why) and looks for the hooks in
    C++ (one call, not two attribute reads per parameter); the fallback writes them at once."""
    if _COMPILED_QUEUE_MISSING_ZERO_GRADS is not None and _all_plain(params):
        return _COMPILED_QUEUE_MISSING_ZERO_GRADS(params)
    if any(_watched(p) for p in params):
        return False
    _set_missing_zero_grads(params)
    return True


class StepZeroGrads(torch.autograd.Function):
    """The step's one zero-gradient node (:class:`PendingZeroGrads`) where nothing watches gradients arrive.

    In a ``backward()`` of the whole graph (a probe leaf tells: :data:`_WHOLE_GRAPH_PROBE`) it writes the
    zeros to ``.grad`` itself, where ``.grad`` is None when that backward ends (the C++ build; the fallback
    at once), and returns no gradient for the parameters: the ``.grad`` autograd would have left, without
    the engine accumulating one gradient tensor per parameter
    (most of what the "zero" policy cost over "none" on the host; ``benchmarks/bench_host.py`` times both).
    The engine would still run each parameter's AccumulateGrad node with nothing to accumulate; where that
    node is reachable only from here, has no hook and the graph is not retained, the node's edge to it is
    cleared during the backward so the engine skips it (``sdepth_ext._C.skip_idle_accumulators``,
    csrc/grads.cpp, attached in :meth:`PendingZeroGrads.attach`).

    The zeros go through autograd instead, as :class:`ZeroGradTouch` gives them, where something watches
    them arrive: ``autograd.grad`` and ``backward(inputs=...)``, a parameter with a hook of its own
    (``register_hook``, ``register_post_accumulate_grad_hook``), and compiled autograd, whose graph
    accumulates what the node returns (the probe then gets a zero too). Chosen only in one process without
    ``torch.distributed`` (:meth:`PendingZeroGrads.attach`): DDP's reducer and other data-parallel engines
    hook the AccumulateGrad nodes, which Python cannot see.
    """

    @staticmethod
    def forward(ctx, out, probe, *params):
        ctx.params = params
        return out.detach()  # see ZeroGradTouch

    @staticmethod
    def backward(ctx, grad):  # differentiable (as ZeroGradTouch's)
        params = ctx.params
        if _compiled_autograd():
            return (grad, torch.zeros_like(_WHOLE_GRAPH_PROBE), *zero_grads(params))
        if not torch._C._will_engine_execute_node(_WHOLE_GRAPH_PROBE_NODE):
            return (grad, None, *zero_grads(params))  # autograd.grad / backward(inputs=...): the asked ones
        if not _write_missing_zero_grads_unless_watched(params):
            return (grad, None, *_zeros_where_missing(params))
        return (grad, None) + (None,) * len(params)


class PendingZeroGrads:
    """Dropped units' parameters of a step, waiting for the one node (:class:`StepZeroGrads`, or
    :class:`ZeroGradTouch` under data parallelism) that gives them their zero gradients.

    A Python autograd node costs about 60 us of host time (forward and backward) whatever it carries, as much
    as a third of a small unit's own step, so the dropped units of a step share one: each dropped unit adds
    its parameters here, and the block that ran last in the previous forward (``flush_unit``, its last unit's
    index) attaches them all to its output, which every later result depends on. Where that block is not
    known, or not reached, each block attaches its own (:meth:`flush_at`).
    """

    def __init__(self):
        self.params: list = []
        self.flush_unit: int | None = None  # None: each block attaches what its units added
        self.per_block = False  # for good, after a forward ended before ``flush_unit``
        self.last_exit = -1  # the last unit of the block that returned last in this forward
        self.root_forward = False  # inside a training forward that started at the converted root

    def flush_at(self, last_unit: int) -> bool:
        """Whether the block whose last unit is ``last_unit`` attaches the pending parameters."""
        # Outside a forward from the root (a block called alone, or recomputed in backward by checkpointing):
        # each block its own.
        return self.flush_unit is None or last_unit >= self.flush_unit or not self.root_forward

    def attach(self, x: torch.Tensor, every_param: bool, sharded: bool) -> torch.Tensor:
        """Attach the pending parameters' zero gradients to ``x``: through autograd where a data-parallel
        engine may watch them arrive (DDP's ``every_param``, FSDP2 (``sharded``), any process with
        ``torch.distributed`` initialized), else :class:`StepZeroGrads`."""
        params, self.params = self.params, []
        if every_param or sharded or _distributed():
            return ZeroGradTouch.apply(x, every_param, *params)
        out = StepZeroGrads.apply(x, _WHOLE_GRAPH_PROBE, *params)
        if _COMPILED_SKIP_IDLE_ACCUMULATORS is not None:
            _COMPILED_SKIP_IDLE_ACCUMULATORS(out)
        return out

    def start_root_forward(self) -> None:
        self.params = []  # left by a forward that raised: nothing can backpropagate through it
        self.root_forward = True

    def end_root_forward(self, renumbered: bool) -> None:
        """After a training forward from the root: learn where the next one attaches; rescue what it missed.

        Parameters still pending here belong to units that ran after the block expected to be last (the
        forward stopped elsewhere): they get their zero gradient directly (``.grad`` where it is None: what
        the optimizer sees is the same, autograd's hooks do not see it), and each block attaches its own from
        now on.
        """
        self.root_forward = False
        if self.params:
            _set_missing_zero_grads(self.params)
            self.params = []
            self.per_block = True
        self.flush_unit = None if self.per_block or renumbered else self.last_exit


def _distributed() -> bool:
    return distributed.is_available() and distributed.is_initialized()


# Parameters' registration anywhere in the process bumps this; a cache of where a unit's parameters live is
# rebuilt when it changes (a submodule replaced after conversion, a parameter added).
_registrations = [0]


def _count_registration(*_args) -> None:
    _registrations[0] += 1


register_module_module_registration_hook(_count_registration)
register_module_parameter_registration_hook(_count_registration)


class ParameterSlots:
    """Where each unit's branch parameters live, as ``(module, name)``: looked up once, read per step.

    Reading ``module._parameters[name]`` per step (not caching the tensors) follows what replaces a
    parameter object in place: ``load_state_dict(assign=True)``, FSDP2's swaps between sharded and unsharded
    parameters. A submodule or parameter registered anywhere since the lookup rebuilds it.
    """

    def __init__(self, find: Callable[[int], Iterable[tuple[nn.Module, str]]], num_units: int):
        self.find = find  # unit -> (module, name) of its branch parameters
        self.slots: list = [None] * num_units
        self.seen = _registrations[0]

    def __call__(self, l: int) -> list[nn.Parameter]:
        if self.seen != _registrations[0]:
            self.slots, self.seen = [None] * len(self.slots), _registrations[0]
        slots = self.slots[l]
        if slots is None:
            slots = self.slots[l] = tuple(self.find(l))
        params = []
        for module, name in slots:  # a loop, not a comprehension with :=, which Dynamo cannot trace
            p = module._parameters.get(name)
            if p is not None:
                params.append(p)
        return params
