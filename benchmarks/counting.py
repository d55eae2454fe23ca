"""Counting what a train step keeps for backward and how many kernels it launches: exact on any machine.

Counts do not depend on the machine's speed or load, so tests assert them exactly and
``benchmarks/bench_footprint.py`` reports them from a CPU for the GPU path as well.

* :class:`SavedBytes`: bytes of the distinct storages autograd saves for backward, recorded by a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook (each storage once however many saved tensors view
  it); storages of given tensors (the model's parameters and buffers) are left out: what remains is the
  activation memory a step holds between its forward and its backward. Each storage also goes to the
  ``part`` of the model that was running when it was first saved; :func:`unit_parts` names the residual
  units' parts, and ``count_step(..., by_unit=True)`` splits a step's saved bytes among them.
* :class:`LaunchCounter`: a ``TorchDispatchMode`` that counts the ATen ops that launch a kernel -- views,
  metadata and allocation ops (``empty*``) launch none and are left out -- plus every launch of
  sdepth_ext's Triton epilogue kernels (its launchers' one launch site, ``_launch``). The ATen ops that
  Triton's interpreter runs to execute a kernel on CPU tensors are the kernel's, not the step's: not counted.
* The path a GPU takes, on a CPU: :func:`sdepth_ext.functional.gpu_path_on_cpu` routes the units through
  the Triton kernels for CPU tensors (``TRITON_INTERPRET=1`` must be set before they are first loaded).
  ``LaunchCounter(run_triton=False)`` counts each launch without executing the grid: the interpreter takes
  ~2 ms per program, minutes for one ResNet-110 step, and what a step saves and launches does not depend on
  the values (tests check that the counts equal those of the executed kernels).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sdepth_ext.functional as sd_functional
from sdepth_ext.kernels import load_epilogue, triton_available
from sdepth_ext.state import units_of

__all__ = ["LaunchCounter", "SavedBytes", "count_step", "dropped_form_bytes", "launches_kernel", "unit_parts"]

# ATen ops that allocate or only change metadata: no kernel runs on any device. Views are recognised by their
# schema (every output aliases an input, none written), see launches_kernel.
NO_KERNEL_OPS = frozenset({
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
    "aten.new_empty.default", "aten.new_empty_strided.default", "aten._unsafe_view.default",
    "aten.resize_.default", "aten.set_.source_Storage", "aten.set_.source_Storage_storage_offset",
    "aten.set_.source_Tensor", "aten.lift_fresh.default", "aten.is_same_size.default",
})


def launches_kernel(func) -> bool:
    """Whether the ATen op ``func`` runs a kernel: not a view (outputs that alias an input without writing
    it: view, permute, detach, slice, expand, ...) and not an allocation or metadata op."""
    if str(func) in NO_KERNEL_OPS:
        return False
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class LaunchCounter(TorchDispatchMode):
    """Kernel launches while active: ``aten`` (ATen ops), ``triton`` (epilogue launches), per phase.

    ``phase`` names the part of the step being counted (``"forward"`` unless set; :func:`count_step` sets
    ``"backward"``); ``by_phase[phase]`` is a Counter of op names (``"triton:forward"`` /
    ``"triton:backward"`` for the epilogue's two kernels). ``run_triton=False``: Triton launches are counted
    but their grid is not executed (outputs stay as allocated).
    """

    def __init__(self, run_triton: bool = True):
        super().__init__()
        self.run_triton = run_triton
        self.phase = "forward"
        self.by_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._in_kernel = False
        self._patched: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_kernel and launches_kernel(func):
            self.by_phase[self.phase][str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if triton_available():
            epilogue = load_epilogue()
            launch = epilogue._launch

            forward_kernel = epilogue._gated_residual_add_forward_kernel

            def counted_launch(geo, device, *args):
                kernel = "forward" if geo.kernel is forward_kernel else "backward"
                self.by_phase[self.phase]["triton:" + kernel] += 1
                if not self.run_triton:
                    return None
                self._in_kernel = True
                try:
                    return launch(geo, device, *args)
                finally:
                    self._in_kernel = False

            epilogue._launch = counted_launch
            self._patched.append((epilogue, launch))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            while self._patched:
                module, launch = self._patched.pop()
                module._launch = launch

    @contextlib.contextmanager
    def paused(self):
        """Inside, nothing is counted (set-up work that is not the step's, e.g. a loss weight)."""
        previous, self._in_kernel = self._in_kernel, True
        try:
            yield
        finally:
            self._in_kernel = previous

    def count(self, phase: str | None = None, kind: str = "all") -> int:
        """Launches in ``phase`` (None: all phases); ``kind``: "all", "aten" or "triton"."""
        counters = self.by_phase.values() if phase is None else [self.by_phase[phase]]
        return sum(n for c in counters for op, n in c.items()
                   if kind == "all" or (kind == "triton") == op.startswith("triton:"))


class SavedBytes:
    """``with SavedBytes(exclude):`` records every tensor autograd saves while active; ``total`` is the bytes
    of their distinct storages, those of the ``exclude`` tensors left out (parameters and buffers).

    ``part`` labels the code running now (None unless set; :meth:`attribute` sets it from module hooks):
    each storage goes to the part during which it was first saved, so ``by_part()`` sums to ``total``."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.part = None
        self.part_of: dict[int, object] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.excluded:  # every saved storage stays alive until backward: pointers are unique
            self.storages[ptr] = storage.nbytes()
            # The first to save a storage is the part that made it (or took it in); later savers read it.
            self.part_of.setdefault(ptr, self.part)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def by_part(self) -> dict:
        """Bytes per part (None: saved while no part was running); the values sum to ``total``."""
        parts: dict = collections.defaultdict(int)
        for ptr, nbytes in self.storages.items():
            parts[self.part_of[ptr]] += nbytes
        return dict(parts)

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @contextlib.contextmanager
    def attribute(self, parts: Sequence[tuple[object, Sequence[nn.Module]]]):
        """Inside, whatever is saved during a forward of one of a part's modules goes to that part (a part
        entered inside another, e.g. a module called from a block's forward, holds until it returns)."""
        outer: list = []

        def enter(part):
            def pre_hook(module, args):
                outer.append(self.part)
                self.part = part
            return pre_hook

        def leave(module, args, output):
            self.part = outer.pop()

        handles = []
        try:
            for part, modules in parts:
                for module in modules:
                    handles.append(module.register_forward_pre_hook(enter(part)))
                    handles.append(module.register_forward_hook(leave))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.part = None


def unit_parts(model: nn.Module) -> list[tuple[int, list[nn.Module]]]:
    """``(l, modules)`` for unit l of ``units_of(model)``: the modules whose forward is the unit's work.

    A block with one unit: the whole block (its shortcut and what follows the add included, e.g. the ReLU
    that torchvision's BasicBlock runs through the same ``self.relu`` as its branch's). A block with several
    units (ViT, Swin: attention, then MLP): each unit's branch modules (``adapter.branch_modules``); what
    the block does around them (adds, layout changes) is no unit's.
    """
    units = units_of(model)
    per_block = collections.Counter(id(block) for block, _, _ in units)
    return [(l, [block] if per_block[id(block)] == 1 else adapter.branch_modules(block, u))
            for l, (block, u, adapter) in enumerate(units)]


def count_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
               gpu_path: bool = False, run_triton: bool = True, by_unit: bool = False) -> dict:
    """Forward and backward of one train step of ``model`` on ``x``, counted.

    The loss is cross-entropy against ``y``, or (``y`` None) the sum of the output times a fixed random
    tensor. Gradients are reset first (``set_to_none``); no optimizer step. ``gpu_path``: the units take the
    GPU's path (Triton epilogue) on CPU tensors. Returns ``{"saved_bytes", "forward", "backward",
    "triton", "launches", "ops": {phase: {op: count}}}`` (launches: ATen ops that launch a kernel + Triton
    launches). ``by_unit``: also ``"saved_by_unit"``, the saved bytes split among the units of
    :func:`unit_parts` (a list, unit order), and ``"saved_outside_units"``, the rest (stem, head); the
    parts sum to ``"saved_bytes"``. And ``"saved_dropped_by_unit"``: what each unit's dropped form
    (:func:`dropped_form_bytes`) saves on the input the unit got in this step.
    """
    model.zero_grad(set_to_none=True)
    saved = SavedBytes([*model.parameters(), *model.buffers()])
    counter = LaunchCounter(run_triton=run_triton)
    parts = unit_parts(model) if by_unit else []
    inputs: dict[int, torch.Tensor] = {}
    handles = [modules[0].register_forward_pre_hook(lambda _, args, l=l: inputs.setdefault(l, args[0]))
               for l, modules in parts]
    with sd_functional.gpu_path_on_cpu() if gpu_path else contextlib.nullcontext():
        with counter:
            with saved, saved.attribute(parts):
                try:
                    out = model(x)
                finally:
                    for handle in handles:
                        handle.remove()
            if y is None:
                with counter.paused():
                    weight = _fixed_like(out)
                loss = (out * weight).sum()
            else:
                loss = F.cross_entropy(out, y)
            counter.phase = "backward"
            loss.backward()
    counts = {"saved_bytes": saved.total, "forward": counter.count("forward"),
              "backward": counter.count("backward"), "triton": counter.count(kind="triton"),
              "launches": counter.count(), "ops": {k: dict(v) for k, v in counter.by_phase.items()}}
    if by_unit:
        by_part = saved.by_part()
        counts["saved_by_unit"] = [by_part.get(l, 0) for l, _ in parts]
        counts["saved_outside_units"] = by_part.get(None, 0)
        counts["saved_dropped_by_unit"] = dropped_form_bytes(model, [inputs[l] for l, _ in parts])
    return counts


def dropped_form_bytes(model: nn.Module, unit_inputs: Sequence[torch.Tensor]) -> list[int]:
    """What each unit of ``model`` saves when dropped (``adapter.dropped``: ``act(shortcut(x))``, none of
    the branch) on its own, given the input it sees; that input, parameters and buffers left out (a step
    keeps them anyway). Nothing for an identity shortcut; for a projection (a ResNet stage's first unit) its
    activations and the ReLU after it, which a skip of the unit must still compute."""
    kept = [*model.parameters(), *model.buffers()]
    out = []
    for (block, u, adapter), x in zip(units_of(model), unit_inputs):
        x = x.detach().requires_grad_()
        with SavedBytes([*kept, x]) as saved:
            adapter.dropped(block, u, x)
        out.append(saved.total)
    return out


def _fixed_like(t: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=t.device).manual_seed(0)
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
