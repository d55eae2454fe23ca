"""Host cost: what our Python costs per epilogue call and per train step, where the host is the bottleneck.

On a fast GPU a CIFAR-sized epilogue is a few microseconds of HBM time, so every Python layer above the
launch shows in the step time. Two measurements:

* **Per call** of ``sd.gated_residual_relu(..., backend="triton")`` at a tiny shape: forward (inputs that
  require grad, as in training), forward+backward, and forward+backward with ``rows``, next to eager
  ``torch.relu(a + s * b)`` at the same shape (the comparator: what a user would write), and eager's row-mode
  equivalent ``relu(a.index_add(0, rows, s * b))`` (hand-written). Row mode twice: as the library's units
  call it (rows and their slot map from a :class:`~sdepth_ext.Plan`, trusted: the autograd.Function with the
  plan's tensors), and as a user calls the public function with rows of their own (validated: sortedness and
  range are checked on the values, one device sync on a GPU, and the slot map is built by three small
  kernels). Without a GPU the kernels run under
  ``TRITON_INTERPRET=1`` and the interpreter's launch is replaced by a no-op (:func:`stubbed_triton_launch`),
  so only the Python above the launch is timed: our checks, the autograd.Function, the launcher and
  Triton's own call path up to the interpreter. Eager pays its real (tiny) CPU kernels, so the ratio is an
  upper bound on ours. On a GPU nothing is stubbed: back-to-back calls are timed with CUDA events, the
  figure that matters there (eager then pays 5-6 real launches against our 2).
  Beside them, a bare ``autograd.Function`` with the same arguments whose forward and backward only allocate
  their outputs: what any fused op pays to be an autograd node, the floor under ours.
* **Train step** of ``cifar_resnet(56)`` at batch 2 and 8x8 input (the convolutions are tiny, so module
  calls and launches dominate, as on a fast GPU): converted at ``p_last=1`` (every block through the
  converted code), and at ``p_last`` 0.5 and 0.2 in batch mode under both dropped-gradient policies
  (``"zero"``, the default: exact zero gradients for dropped units; ``"none"``) and in row mode, over the
  plain model, next to two ideals: the block-count ideal (the expected fraction of residual blocks that run,
  ``mean(p_l)``; ``over_ideal`` is the ratio minus it) and the step ideal, which also counts what no drop
  removes (``fixed``: the plain model with every residual branch skipped, timed in the same rounds: stem,
  projection shortcuts, head, loss, the optimizer's share): ``fixed + (1 - fixed) * mean(p_l)``, what a
  converted model that cost nothing above the blocks it runs would reach. Also the fraction of blocks
  that ran in the timed steps. A sample is
  ``STEP_CALLS`` back-to-back steps of one model (after the other variants ran: the first step finds cold
  caches, the others warm ones, as in training, where one model steps again and again). The ``"zero"``
  and ``"none"`` twins of a ``p_last`` draw the same plans (same seed, same number of steps) and run back
  to back in every round, so their difference (``over_none``, with a bootstrap 95% interval) is
  what the zero gradients cost, with the machine's drift paired out. The step part runs in
  ``STEP_PROCESSES`` fresh processes, one after another, whose samples are pooled; its intervals resample
  the processes, then the rounds within each, and ``over_none_by_process`` holds each process's gap alone.
  Each process draws its plans from a seed of its own (``plan_seeds``), so the pooled steps run a fraction
  of blocks nearer the expected one than one repeated plan sequence would (``blocks_ran``, and each
  process's in ``blocks_ran_by_process``).
  With them in the same rounds, the hand-written comparator of "zero" (``+ zeros by hand``): the "none" model
  with the zeros written after its backward from Python (:func:`zero_grads_by_hand`; no autograd node): its
  ``over_none`` is what materializing the zeros costs written by hand (on a CPU that includes filling them,
  real memory work that a GPU does on the device; sdepth_ext's compiled writer clears small CPU tensors with
  memset, below this fill, so "zero" can come out under it). On a CPU the model runs the torch epilogue
  (the default there). SGD with momentum runs ``foreach=True`` (its default on a GPU). Each variant is also
  timed without the optimizer's step (``fwd+bwd``): under the "zero" policy the optimizer updates the dropped
  units' parameters too (weight decay and momentum, as in the plain model), which "none" skips; on a CPU each
  updated tensor costs its own C++ op calls (``foreach`` falls back to a loop over tensors), where a GPU's
  multi-tensor kernels update all of them in a few launches. The fwd+bwd rows isolate what the policies'
  mechanisms cost.

    python -m benchmarks.bench_host            # ~2 minutes on a 2-core CPU
    python -m benchmarks.bench_host --smoke    # seconds; checks that it runs (its numbers mean nothing)
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from .common import (
    best_device,
    bootstrap_interval,
    configure_cpu_malloc,
    environment,
    format_table,
    median,
    parse_size_args,
    print_environment,
    ratio_interval,
    size_suffix,
    time_interleaved,
    trimmed_mean,
    use_triton_interpreter_without_cuda,
    write_results,
)
from .cpu_malloc import cpu_allocator
from .workers import run_spawned

SHAPE = (4, 16, 8, 8)  # 4096 elements: a few microseconds of eager CPU kernels, nothing on a GPU
SCALE = 0.5
ROWS = (0, 2)  # two of four samples survive
STEP_DEPTH, STEP_BATCH, STEP_SIZE = 56, 2, 8
STEP_CALLS = 5  # back-to-back steps of one model per sample (module docstring)
# The step part runs in this many fresh processes, one after another, each with its share of the rounds;
# their samples are pooled. One process's step times keep a bias of their own for its whole life (where
# its memory landed, the allocator's history): in five single-process runs of this part on the 2-core CPU
# VM, "zero" - "none" (fwd+bwd, p_last 0.5) ranged over +0.011 to +0.027, each with a 95% interval over its
# rounds of about +-0.007. Pooling processes averages that bias, and the intervals resample processes too.
STEP_PROCESSES = 3
# (p_last, mode, dropped_grads): every block through the converted code, then both policies in batch mode
# (their gap is what a dropped unit's zero gradients cost the host) and row mode, at two drop rates.
STEP_VARIANTS = ((1.0, "batch", "zero"),
                 (0.5, "batch", "zero"), (0.5, "batch", "none"), (0.5, "row", "zero"),
                 (0.2, "batch", "zero"), (0.2, "batch", "none"), (0.2, "row", "zero"))
# Each variant is timed twice in the same rounds: the whole train step, and without the optimizer's step
# (what the forward and backward cost, where the dropped-gradient policies differ in mechanism only).
STEP_PARTS = ((True, ""), (False, " fwd+bwd"))
FIXED = "plain, residual branches skipped"
# The hand-written comparator of the "zero" policy: each batch-mode "none" variant again, with the zeros
# written after its backward by :func:`zero_grads_by_hand`.
BY_HAND = " + zeros by hand"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def stubbed_triton_launch():
    """Inside, a launch of an interpreted Triton kernel does nothing (its outputs stay as allocated).

    ``InterpretedFunction.run`` is where the interpreter starts executing the grid; everything above it --
    our wrappers and ``kernel[grid](...)`` -- still runs. Outside the interpreter this is a no-op context.
    """
    if not _interpreting():
        yield False
        return
    from triton.runtime import interpreter

    # triton >= 3.1 launches through InterpretedFunction.run; triton 3.0 builds a GridExecutor in
    # ``kernel[grid]`` and runs the grid in its __call__ (its InterpretedFunction has no class-level run).
    if hasattr(interpreter.InterpretedFunction, "run"):
        owner, name = interpreter.InterpretedFunction, "run"
    else:
        owner, name = interpreter.GridExecutor, "__call__"
    original = getattr(owner, name)
    setattr(owner, name, lambda self, *args, **kwargs: None)
    try:
        yield True
    finally:
        setattr(owner, name, original)


# ------------------------------------------------------------------------------------------------------------
# Per call
# ------------------------------------------------------------------------------------------------------------
def _call_variants(device: torch.device) -> dict:
    import sdepth_ext as sd
    from sdepth_ext.functional import GatedResidualAddFunction
    from sdepth_ext.kernels import load_epilogue

    kernels = load_epilogue()

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(SHAPE, device=device, generator=gen).requires_grad_()
    b = torch.randn(SHAPE, device=device, generator=gen).requires_grad_()
    g = torch.randn(SHAPE, device=device, generator=gen)
    survivors = [list(ROWS)]
    plan = sd.Plan.from_survivors("row", SHAPE[0], survivors).to(device)
    rows, slot = plan.rows(0), plan.slot(0)
    b_rows = torch.randn((len(ROWS), *SHAPE[1:]), device=device, generator=gen).requires_grad_()

    def ours(x, y, r=None):
        return sd.gated_residual_relu(x, y, SCALE, rows=r, backend="triton")

    def units_call(x, y):  # what a converted unit runs on CUDA (sdepth_ext.functional.fused_epilogue)
        return GatedResidualAddFunction.apply(x, y, SCALE, rows, slot, True, kernels)

    def eager(x, y):
        return torch.relu(x + SCALE * y)

    def eager_rows(x, y, r):
        return torch.relu(x.index_add(0, r, SCALE * y))

    def bare(x, y, r=None, s=None):
        return _BareFunction.apply(x, y, SCALE, r, s, True, kernels)

    return {
        "fwd": {"sdepth": lambda: ours(a, b), "eager": lambda: eager(a, b)},
        "fwd+bwd": {"sdepth": lambda: torch.autograd.grad(ours(a, b), (a, b), g),
                    "bare Function (allocates only)": lambda: torch.autograd.grad(bare(a, b), (a, b), g),
                    "eager": lambda: torch.autograd.grad(eager(a, b), (a, b), g)},
        "rows fwd+bwd": {"sdepth": lambda: torch.autograd.grad(units_call(a, b_rows), (a, b_rows), g),
                         "bare Function (allocates only)": lambda: torch.autograd.grad(
                             bare(a, b_rows, rows, slot), (a, b_rows), g),
                         "sdepth, user rows (validated)": lambda: torch.autograd.grad(
                             ours(a, b_rows, rows), (a, b_rows), g),
                         "eager": lambda: torch.autograd.grad(eager(a, b), (a, b), g),
                         "eager rows (by hand)": lambda: torch.autograd.grad(
                             eager_rows(a, b_rows, rows), (a, b_rows), g)},
    }


class _BareFunction(torch.autograd.Function):
    """The floor: an autograd node with the epilogue's arguments that only allocates its outputs."""

    @staticmethod
    def forward(ctx, shortcut, residual, scale, rows, slot, relu, kernels):
        out = torch.empty_like(shortcut)
        ctx.save_for_backward(out, slot)
        ctx.residual_shape = residual.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        out, _ = ctx.saved_tensors
        return (torch.empty_like(out), out.new_empty(ctx.residual_shape), None, None, None, None, None)


def bench_calls(device: torch.device, smoke: bool) -> tuple[list[dict], dict]:
    calls, repeat = (20, 3) if smoke else (500, 45)
    rows, samples = [], {}
    with stubbed_triton_launch() as stubbed:
        for what, fns in _call_variants(device).items():
            times = time_interleaved(fns, device, warmup=3, repeat=repeat, calls=calls)
            eager = median(times["eager"])
            for name, ts in times.items():
                samples[f"call/{what}/{name}"] = ts
                rows.append({"bench": "host", "part": "call", "what": what, "variant": name,
                             "shape": "x".join(map(str, SHAPE)), "us": median(ts) * 1e6,
                             "x_eager": median(ts) / eager, "launch": "stubbed" if stubbed else "real"})
    return rows, samples


# ------------------------------------------------------------------------------------------------------------
# Train step
# ------------------------------------------------------------------------------------------------------------
class ShortcutOnly(nn.Module):
    """A ResNet basic block with its residual branch skipped: what runs of it when it is dropped."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A dropped block's output is relu(shortcut): x itself (a block's output, already >= 0) or the
        # projection.
        return x if self.downsample is None else torch.relu(self.downsample(x))


def branches_skipped(model: nn.Module) -> nn.Module:
    """``model`` with every basic block's residual branch skipped: the part of a step no drop removes."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BasicBlock):
                setattr(parent, name, ShortcutOnly(child))
    return model


def branch_parameters(model: nn.Module) -> list[tuple[nn.Parameter, ...]]:
    """Each basic block's residual-branch parameters (conv1, bn1, conv2, bn2), block by block."""
    return [tuple(p for name in ("conv1", "bn1", "conv2", "bn2") for p in getattr(block, name).parameters())
            for block in model.modules() if isinstance(block, BasicBlock)]


def zero_grads_by_hand(branches: list[tuple[nn.Parameter, ...]]) -> None:
    """After a ``"none"`` backward, what ``"zero"`` leaves, written by hand in the fewest Python steps: a
    zero ``.grad`` for every parameter of the blocks that did not run (their first parameter got no
    gradient), from uninitialised allocations and one ``_foreach_zero_``. No autograd node, no edges: the
    cost of the zero gradients themselves, as a policy that materializes them from Python pays it."""
    fresh = [p for params in branches if params[0].grad is None for p in params]
    zeros = [torch.empty_like(p) for p in fresh]
    if zeros:
        torch._foreach_zero_(zeros)
    for p, zero in zip(fresh, zeros):
        p.grad = zero


def _gap_to_plain(ours: list[float], twin: list[float], plain: list[float]) -> float:
    return (trimmed_mean(ours) - trimmed_mean(twin)) / trimmed_mean(plain)


def _time_steps(device: torch.device, warmup: int, repeat: int, seed: int = 0) -> dict:
    """The step part's measurements in this process: every variant's step times (``repeat`` rounds), the
    fraction of blocks that ran, the parameters one more step leaves without a gradient, and each
    variant's ``(p_last, mode, policy, block_ideal)``. Every converted variant draws its plans from
    ``seed`` (the model, its weights and the batch do not depend on it)."""
    import sdepth_ext as sd
    from sdepth_ext.state import get_state

    torch.manual_seed(0)
    base = sd.cifar_resnet(STEP_DEPTH).to(device)
    x = torch.randn(STEP_BATCH, 3, STEP_SIZE, STEP_SIZE, device=device)
    y = torch.randint(0, 10, (STEP_BATCH,), device=device)
    variants = {"plain": (copy.deepcopy(base), None, "-", None),
                FIXED: (branches_skipped(copy.deepcopy(base)), None, "-", None)}
    for p_last, mode, policy in STEP_VARIANTS:
        by_hand = [""] + ([BY_HAND] if (mode, policy) == ("batch", "none") else [])
        for hand in by_hand:  # the same seed: every variant of a p_last draws the same plans
            model = sd.convert(copy.deepcopy(base), p_last=p_last, mode=mode, seed=seed)
            sd.set_dropped_grads(model, policy)
            variants[f"sdepth {mode} p{p_last} {policy}{hand}"] = (model, p_last, mode, policy + hand)
    ran: dict[str, list[float]] = {}

    def make_step(name, model, optimize, by_hand):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        state = get_state(model) if name.startswith("sdepth") else None
        branches = branch_parameters(model) if by_hand else None
        ran[name] = []

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if branches is not None:
                zero_grads_by_hand(branches)
            if optimize:
                optimizer.step()
            if state is not None:
                counts = state.host_plan.counts
                ran[name].append(sum(c / state.host_plan.batch_size for c in counts) / len(counts))
        return step

    steps, groups = {}, {}
    for name, (model, *_) in variants.items():
        model.train()
        other = _twin(name, variants)
        for optimize, suffix in STEP_PARTS:
            steps[name + suffix] = make_step(name + suffix, model, optimize, name.endswith(BY_HAND))
            if other:  # a "none" variant, its "zero" twin and its comparator: back to back in every round
                groups.setdefault(other + suffix, [other + suffix]).append(name + suffix)
    times = time_interleaved(steps, device, warmup=warmup, repeat=repeat, calls=STEP_CALLS,
                             groups=list(groups.values()))
    # the fraction of blocks that ran, over the timed steps only (warmup steps before, the check below after)
    blocks_ran = {name: statistics.fmean(r[-len(times[name]) * STEP_CALLS:]) for name, r in ran.items() if r}
    # After the timed rounds, one more step of each: the parameters it leaves without a gradient (0 for
    # "zero" and its hand-written comparator, the dropped units' for "none"), the check that each variant
    # did what its name says.
    missing = {}
    for name, (model, *_) in variants.items():
        for _, suffix in STEP_PARTS:
            steps[name + suffix]()
            missing[name + suffix] = sum(p.grad is None for p in model.parameters())
    meta = {name: (p_last, mode, policy,
                   None if p_last is None else statistics.fmean(sd.survival_probs(model)))
            for name, (model, p_last, mode, policy) in variants.items()}
    return {"times": times, "blocks_ran": blocks_ran, "missing": missing, "variants": meta}


def _twin(name: str, variants) -> str | None:
    """The "none" variant a batch-mode "zero" or its comparator goes with (None for the others)."""
    other = name.removesuffix(BY_HAND).replace(" zero", " none")
    return other if other != name and other in variants else None


def _step_process(index: int, out_path: str, device: str, warmup: int, repeat: int, seed: int,
                  keep_freed_memory: bool) -> None:
    """A spawned process's part of the step measurements (:func:`_time_steps`), saved to ``out_path``."""
    configure_cpu_malloc("keep" if keep_freed_memory else "default")  # a spawned process starts without it
    torch.save(_time_steps(torch.device(device), warmup, repeat, seed), out_path)


def _in_fresh_process(device: torch.device, warmup: int, repeat: int, seed: int = 0,
                      timeout_s: float = 900) -> dict:
    """:func:`_time_steps` in a spawned process (one at a time: two would share the cores); what it saved."""
    return run_spawned(_step_process, (str(device), warmup, repeat, seed, cpu_allocator() is not None),
                       "bench_host: a step process", timeout_s)


def bench_step(device: torch.device, smoke: bool) -> tuple[list[dict], dict]:
    # 80 rounds on the shared 2-core CPU VM, 40 on a GPU machine, whose dedicated host is steadier and whose
    # whole session (suite and make bench) has minutes; shared among the processes (STEP_PROCESSES).
    warmup, repeat = (1, 2) if smoke else (3, 40 if device.type == "cuda" else 80)
    processes = 2 if smoke else STEP_PROCESSES
    # Process k draws its plans from seed k: one plan sequence repeated in every process would carry its own
    # luck into every sample (the committed run of 9a73b2b, one seed: 0.749 of the blocks ran at p_last 0.5
    # against 0.741 expected).
    seeds = list(range(processes))
    measured = [_in_fresh_process(device, warmup, -(-repeat // processes), seed=seed) for seed in seeds]
    times = {name: [t for m in measured for t in m["times"][name]] for name in measured[0]["times"]}
    runs = [k for k, m in enumerate(measured) for _ in m["times"]["plain"]]  # the process of each round
    blocks_ran_by_process = {name: [m["blocks_ran"][name] for m in measured]
                             for name in measured[0]["blocks_ran"]}
    # each process ran as many steps: the pooled fraction is the processes' mean
    blocks_ran = {name: statistics.fmean(fractions) for name, fractions in blocks_ran_by_process.items()}
    # each process's plans differ: the largest count (a "zero" variant must leave none in every process)
    missing = {name: max(m["missing"][name] for m in measured) for name in measured[0]["missing"]}
    variants = measured[0]["variants"]
    rows, samples = [], {"step/process": runs}
    for optimize, suffix in STEP_PARTS:
        plain_ts = times["plain" + suffix]
        plain = trimmed_mean(plain_ts)
        fixed = trimmed_mean(times[FIXED + suffix]) / plain
        for name, (p_last, mode, policy, block_ideal) in variants.items():
            ts = times[name + suffix]
            samples[f"step/{name}{suffix}"] = ts
            row = {"bench": "host", "part": "step",
                   "what": f"cifar_resnet{STEP_DEPTH} b{STEP_BATCH}@{STEP_SIZE}{suffix}",
                   "variant": name, "mode": mode, "p_last": p_last, "dropped_grads": policy,
                   "optimizer": "SGD foreach" if optimize else "none", "steps_per_sample": STEP_CALLS,
                   "processes": processes, "ms": trimmed_mean(ts) * 1e3, "ratio": trimmed_mean(ts) / plain,
                   "grads_missing": missing[name + suffix]}
            if name != "plain":
                row["ratio_ci95_low"], row["ratio_ci95_high"] = ratio_interval(ts, plain_ts, runs=runs)
            if p_last is not None:
                row["block_ideal"] = block_ideal
                row["over_ideal"] = row["ratio"] - row["block_ideal"]
                row["step_ideal"] = fixed + (1.0 - fixed) * row["block_ideal"]
                row["over_step_ideal"] = row["ratio"] - row["step_ideal"]
                row["blocks_ran"] = blocks_ran[name + suffix]
                row["blocks_ran_by_process"] = blocks_ran_by_process[name + suffix]
                row["plan_seeds"] = seeds
            other = _twin(name, variants)
            if other:
                none_ts = times[other + suffix]
                row["over_none"] = _gap_to_plain(ts, none_ts, plain_ts)
                row["over_none_ci95_low"], row["over_none_ci95_high"] = bootstrap_interval(
                    _gap_to_plain, ts, none_ts, plain_ts, runs=runs)
                row["over_none_by_process"] = [
                    _gap_to_plain(*([t for t, k in zip(series, runs) if k == run] for series in
                                    (ts, none_ts, plain_ts)))
                    for run in range(processes)]
            rows.append(row)
    return rows, samples


def run(smoke: bool = False) -> tuple[list[dict], dict]:
    device = best_device()
    use_triton_interpreter_without_cuda()
    call_rows, call_samples = bench_calls(device, smoke)
    print(format_table(call_rows, ["what", "variant", "shape", "us", "x_eager", "launch"]) + "\n", flush=True)
    step_rows, step_samples = bench_step(device, smoke)
    columns = ["what", "variant", "ms", "ratio", "block_ideal", "over_ideal", "step_ideal", "over_none",
               "blocks_ran"]
    print(format_table(step_rows, columns) + "\n", flush=True)
    return call_rows + step_rows, {**call_samples, **step_samples}


def main(argv=None) -> list[dict]:
    args = parse_size_args(argv, __doc__.splitlines()[0],
                           smoke_help="seconds-long run; its numbers mean nothing")
    use_triton_interpreter_without_cuda()
    device = best_device()
    env = environment(device)
    print_environment(env)
    rows, samples = run(smoke=args.smoke)
    paths = write_results("host" + size_suffix(args.smoke), rows, env, samples=samples)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
