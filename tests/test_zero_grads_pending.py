"""The "zero" policy's one node per step (sdepth_ext.grads.PendingZeroGrads): the dropped units of a step
get their exact zero gradients from one node, attached by the block that ran last in the previous forward;
forwards that end elsewhere, start below the root, or are recomputed in backward still give every dropped
unit that ran its zero gradient. In a plain backward the node writes the zeros to .grad itself
(StepZeroGrads); whatever watches gradients arrive (autograd.grad, backward(inputs=...), hooks,
torch.distributed) gets them through autograd."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from conftest import child_env, seed_where
from torch import nn
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from sdepth_ext.grads import PendingZeroGrads
from sdepth_ext.state import get_state

NUM_BLOCKS, BATCH = 6, 4


class Chain(nn.Module):
    """A stem, six BasicBlocks and a head, whose forward may stop early or checkpoint each block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(BasicBlock(8, 8) for _ in range(NUM_BLOCKS))
        self.head = nn.Linear(8, 10)

    def forward(self, x, stop=None, reentrant=None):
        x = self.stem(x)
        for block in self.blocks[:stop]:
            if reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
        return self.head(x.mean((2, 3)))


def _drops_several(plan):
    return sum(c == 0 for c in plan.counts) >= 2 and any(plan.counts)


SEED = seed_where(_drops_several, sd.uniform(NUM_BLOCKS, 0.5), "batch", BATCH)


def _walk(loss: torch.Tensor):
    """The nodes of ``loss``'s backward graph, each once; a node's inputs are looked at only after it is
    yielded (a Python object made for an AccumulateGrad node holds it, see the skip tests)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        stack.extend(next_fn for next_fn, _ in fn.next_functions)


def _graph_nodes(loss: torch.Tensor, *names: str) -> int:
    """How many nodes of ``loss``'s backward graph have one of these type names."""
    return sum(type(fn).__name__ in names for fn in _walk(loss))


def _touch_nodes(loss: torch.Tensor) -> int:
    return _graph_nodes(loss, "ZeroGradTouchBackward", "StepZeroGradsBackward")


def _models():
    """The converted chain under "zero" and a copy under "none" (the reference for the kept units)."""
    torch.manual_seed(0)
    zero = sd.convert(Chain(), p_last=0.5, rule="uniform", mode="batch", seed=SEED).train()
    none = copy.deepcopy(zero)
    sd.set_dropped_grads(none, "none")
    return zero, none


def _step(model, x, y, step, **kwargs):
    """Forward and backward on the plan of scheduler step ``step``; the loss (its graph kept)."""
    model.zero_grad(set_to_none=True)
    sd.get_scheduler(model).step = step
    loss = F.cross_entropy(model(x, **kwargs), y)
    loss.backward(retain_graph=True)
    return loss


def _check_grads(zero, none, ran):
    """Dropped units that ran (indices < ``ran``): zero gradients; the others: as under "none"."""
    state = get_state(zero)
    dropped = [l for l, c in enumerate(state.host_plan.counts) if c == 0]
    assert len([l for l in dropped if l < ran]) >= 1
    dropped_params = {id(p) for l in dropped if l < ran for p in state.unit_parameters(l)}
    for (name, p), q in zip(zero.named_parameters(), none.parameters()):
        if id(p) in dropped_params:
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name
        elif q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_one_node_per_step_after_the_first_forward():
    zero, none = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    first = _step(zero, x, y, 0)
    dropped = sum(c == 0 for c in get_state(zero).host_plan.counts)
    assert _touch_nodes(first) == dropped  # where the forward ends is not known yet: one per block
    loss = _step(zero, x, y, 0)
    _step(none, x, y, 0)
    assert _touch_nodes(loss) == 1
    _check_grads(zero, none, NUM_BLOCKS)


def test_a_forward_that_ends_earlier_still_zeroes_every_dropped_unit_that_ran():
    """Learned on one forward, the last block is not reached by the next: the units the node would have
    carried get their zero gradients directly, and from then on each block attaches its own."""
    zero, none = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    _step(zero, x, y, 0)
    _step(zero, x, y, 0)  # the end is known now
    for _ in range(2):
        loss = _step(zero, x, y, 0, stop=3)
        _step(none, x, y, 0, stop=3)
        _check_grads(zero, none, 3)
    dropped_blocks = sum(c == 0 for c in get_state(zero).host_plan.counts[:3])
    assert _touch_nodes(loss) == dropped_blocks  # each block its own, for good


def test_a_forward_that_ends_later_attaches_after_the_learned_end_and_learns_the_new_one():
    zero, none = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    _step(zero, x, y, 0, stop=3)
    _step(zero, x, y, 0, stop=3)  # the end is known now: block 2
    loss = _step(zero, x, y, 0)
    _step(none, x, y, 0)
    _check_grads(zero, none, NUM_BLOCKS)
    counts = get_state(zero).host_plan.counts
    after = sum(c == 0 for c in counts[3:])
    assert _touch_nodes(loss) == min(1, sum(c == 0 for c in counts[:3])) + after
    loss = _step(zero, x, y, 0)
    _check_grads(zero, none, NUM_BLOCKS)
    assert _touch_nodes(loss) == 1


def test_a_forward_below_the_root_attaches_per_block():
    zero, none = _models()
    x = torch.randn(BATCH, 8, 8, 8)
    for model in (zero, none):
        _step(model, torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,)), 0)  # learn the end
        model.zero_grad(set_to_none=True)
        sd.get_scheduler(model).step = 0
        out = x
        for block in model.blocks[:4]:  # the root's pre-hook does not run: the first unit draws the plan
            out = block(out)
        out.square().mean().backward()
    _check_grads(zero, none, 4)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_blocks_checkpointed_by_the_user(reentrant):
    """The user checkpoints each converted block: the recomputation in backward (a reentrant checkpoint's
    forward runs without grad, its recomputation is what backpropagates) still zeroes the dropped units."""
    zero, none = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    for _ in range(2):
        _step(zero, x, y, 0, reentrant=reentrant)
        _step(none, x, y, 0, reentrant=reentrant)
        _check_grads(zero, none, NUM_BLOCKS)


def test_the_parameters_follow_a_module_replaced_after_conversion():
    """A submodule swapped in after conversion (and a parameter assigned by load_state_dict(assign=True))
    is what gets the zero gradient, not the object the unit had when it was converted."""
    zero, _ = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    _step(zero, x, y, 0)
    state = get_state(zero)
    dropped = [l for l, c in enumerate(state.host_plan.counts) if c == 0]
    block = zero.blocks[dropped[0]]
    old_bn = block.bn1
    old_bn.zero_grad(set_to_none=True)
    block.bn1 = nn.BatchNorm2d(8)
    zero.load_state_dict(copy.deepcopy(zero.state_dict()), assign=True)
    _step(zero, x, y, 0)
    assert block.bn1 is not old_bn and old_bn.weight.grad is None
    for p in state.unit_parameters(dropped[0]):
        assert p.grad is not None and not p.grad.any()
    assert any(p is block.bn1.weight for p in state.unit_parameters(dropped[0]))
    assert any(p is block.conv1.weight for p in state.unit_parameters(dropped[0]))


def test_copies_and_pickles_rebuild_the_step_bookkeeping(tmp_path):
    zero, none = _models()
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    _step(zero, x, y, 0)
    _step(zero, x, y, 0)
    for copied in (copy.deepcopy(zero), _saved_and_loaded(zero, tmp_path / "m.pt")):
        state = get_state(copied)
        assert state.zero_pending is not get_state(zero).zero_pending and not state.zero_pending.params
        assert all(p is q for p, q in zip(state.unit_parameters(0), copied.blocks[0].parameters()))
        _step(copied, x, y, 0)
        _step(none, x, y, 0)
        _check_grads(copied, none, NUM_BLOCKS)


def _saved_and_loaded(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------------------------------------
# How the zeros arrive: written to .grad by the step's node in a plain backward, through autograd where
# something watches them arrive.
# ----------------------------------------------------------------------------------------------------------
def _learned(x, y):
    """Both models after one step (where forwards end is known) and their plans on scheduler step 0."""
    zero, none = _models()
    _step(zero, x, y, 0)
    _step(none, x, y, 0)
    for model in (zero, none):
        model.zero_grad(set_to_none=True)
        sd.get_scheduler(model).step = 0
    return zero, none


def _dropped_and_kept(model):
    state = get_state(model)
    dropped = [p for l, c in enumerate(state.host_plan.counts) if c == 0 for p in state.unit_parameters(l)]
    kept = [p for l, c in enumerate(state.host_plan.counts) if c > 0 for p in state.unit_parameters(l)]
    return dropped, kept


def test_a_plain_backward_writes_the_zeros_without_one_accumulate_grad_per_parameter():
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _models()
    _step(zero, x, y, 0)
    dropped, kept = _dropped_and_kept(zero)
    arrived = {}  # parameter -> what its AccumulateGrad node received (None: no gradient tensor)
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in dropped + kept]
    for p, node in zip(dropped + kept, accumulators):
        node.register_prehook(lambda grads, p=p: arrived.setdefault(id(p), []).append(grads[0]))
    loss = _step(zero, x, y, 0)
    _step(none, x, y, 0)
    _check_grads(zero, none, NUM_BLOCKS)
    assert _graph_nodes(loss, "StepZeroGradsBackward") == 1
    assert _graph_nodes(loss, "ZeroGradTouchBackward") == 0
    assert all(g is None for p in dropped for g in arrived.get(id(p), []))
    assert all(arrived[id(p)][0] is not None for p in kept)  # the probe works: these arrive as tensors
    # Accumulation (no zero_grad): the dropped units' gradients stay the tensors they are, zeros.
    grads = [p.grad for p in dropped]
    loss.backward()
    assert all(p.grad is g and not g.any() for p, g in zip(dropped, grads))


def _step_zero_grads_node(loss: torch.Tensor):
    """The StepZeroGrads node of ``loss``'s graph (its inputs not looked at)."""
    found = next((fn for fn in _walk(loss) if type(fn).__name__ == "StepZeroGradsBackward"), None)
    assert found is not None, "no StepZeroGrads node in the graph"
    return found


def _parameter_edges(node) -> list:
    """Where the node's parameter edges lead (after its input's and the probe's): an AccumulateGrad node, or
    None where the engine was let skip it."""
    return [fn for fn, _ in node.next_functions[2:]]


_skips = pytest.mark.skipif(sd.grads._COMPILED_SKIP_IDLE_ACCUMULATORS is None,
                            reason="sdepth_ext._C is not built: the engine runs every accumulator")


@_skips
@pytest.mark.parametrize("retain_graph", [False, True])
def test_a_plain_backward_lets_the_engine_skip_the_accumulators_it_hands_nothing(retain_graph):
    """After the node wrote the zeros to .grad, the dropped parameters' AccumulateGrad nodes would run with
    no gradient: their edges are cleared and the engine skips them, with the same gradients. A retained graph
    keeps them, and autograd.grad through it still gives a dropped parameter its zeros. (An AccumulateGrad
    node that Python has looked at is held by its Python object for a while, and so is not skipped: the
    test looks at the edges only after the backward.)"""
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    dropped, _ = _dropped_and_kept(zero)
    loss = F.cross_entropy(zero(x), y)
    node = _step_zero_grads_node(loss)  # (a Python object of an AccumulateGrad node holds it: none made)
    loss.backward(retain_graph=retain_graph)
    F.cross_entropy(none(x), y).backward()
    _check_grads(zero, none, NUM_BLOCKS)
    if not retain_graph:
        assert _parameter_edges(node) == [None] * len(dropped)
        return
    assert len(_parameter_edges(node)) == len(dropped) and None not in _parameter_edges(node)
    again = torch.autograd.grad(loss, dropped[0])[0]
    assert again.shape == dropped[0].shape and not again.any()


@_skips
def test_an_accumulator_reached_otherwise_or_hooked_is_not_skipped():
    """Only an AccumulateGrad that nothing else can see is skipped: one that another edge of the graph leads
    to (a parameter also used elsewhere) gets its gradient there; one with a hook of its own runs."""
    alone, shared, hooked = (nn.Parameter(torch.randn(5)) for _ in range(3))
    pending = PendingZeroGrads()
    pending.params = [alone, shared, hooked]
    out = pending.attach(torch.randn(5, requires_grad=True), every_param=False, sharded=False)
    arrived = []  # the hook is registered through a node object that is not kept
    hooked.view_as(hooked).grad_fn.next_functions[0][0].register_prehook(lambda grads: arrived.append(grads))
    (out.sum() + (3 * shared).sum()).backward()
    assert torch.equal(alone.grad, torch.zeros(5)) and torch.equal(hooked.grad, torch.zeros(5))
    assert torch.equal(shared.grad, torch.full((5,), 3.0))
    assert arrived == [(None,)]
    skipped = [fn is None for fn in _parameter_edges(out.grad_fn)]
    assert skipped == [True, False, False]


@pytest.mark.skipif(sd.grads._COMPILED_QUEUE_MISSING_ZERO_GRADS is None,
                    reason="sdepth_ext._C is not built: the fallback writes the zeros at the node")
def test_a_plain_backward_writes_the_zeros_when_it_ends():
    """The zeros are allocated after the rest of the backward (not while its activations and gradients
    are): during it, a dropped parameter has no .grad yet; a hook on the input, whose gradient comes last,
    sees none; after backward() returns, every one has its zeros."""
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    dropped, _ = _dropped_and_kept(zero)
    image = x.clone().requires_grad_()
    seen = []
    image.register_hook(lambda g: seen.append([p.grad is None for p in dropped]))
    F.cross_entropy(zero(image), y).backward()
    F.cross_entropy(none(x), y).backward()
    assert seen == [[True] * len(dropped)]
    _check_grads(zero, none, NUM_BLOCKS)


@pytest.mark.parametrize("node", ["StepZeroGrads", "ZeroGradTouch"])
def test_a_gradient_penalty_differentiates_through_the_dropped_units(tmp_path, node):
    """Double backward (``create_graph=True``: a gradient penalty, as in WGAN-GP or R1): the node's backward
    is differentiable (its input's gradient passes through; the zeros are constants), so the penalty's
    gradients equal those of the "none" model, which has no node, and dropped parameters get zeros."""
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    images = []
    for model in (zero, none):
        image = x.clone().requires_grad_()
        if node == "ZeroGradTouch" and model is zero:  # what a process group selects (see the test above)
            torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                                 world_size=1)
        try:
            loss = F.cross_entropy(model(image), y)
            assert _graph_nodes(loss, node + "Backward") == (model is zero)
            (grad,) = torch.autograd.grad(loss, image, create_graph=True)
            (loss + grad.pow(2).sum()).backward()
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        images.append(image)
    _check_grads(zero, none, NUM_BLOCKS)
    assert images[0].grad.any()
    torch.testing.assert_close(images[0].grad, images[1].grad, rtol=0, atol=0)


def _writer_cases():
    """Parameters of every kind the writer meets: fresh ones (channels_last, bfloat16, float64, float16, an
    empty one, two above ATen's GRAIN_SIZE of 32768 elements, and one above 1 MiB: csrc/grads.cpp clears
    the others with memset and leaves that one to _foreach_zero_), one whose gradient exists (random values)
    and a frozen one."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last))
    half = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    double = nn.Parameter(torch.randn(3, 7, dtype=torch.float64))
    float16 = nn.Parameter(torch.randn(2, 9, dtype=torch.float16))
    empty = nn.Parameter(torch.randn(0, 3))
    large = nn.Parameter(torch.randn(64, 64, 3, 3).to(memory_format=torch.channels_last))
    larger = [nn.Parameter(torch.randn(40_001)), nn.Parameter(torch.randn(3, 70_001, dtype=torch.float64))]
    accumulated = nn.Parameter(torch.randn(6))
    accumulated.grad = torch.randn(6)
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    return [conv, half, double, float16, large, empty, *larger, accumulated, frozen]


def _write_and_check() -> None:
    """The writer (``grads._set_missing_zero_grads``) on :func:`_writer_cases`, into freed memory full of NaN
    where the allocator reuses it: zeros shaped, strided and typed like each parameter without a gradient; an
    existing gradient is the same tensor with the same values; a frozen parameter gets none."""
    import sdepth_ext.grads as grads

    *fresh, accumulated, frozen = params = _writer_cases()
    existing, values = accumulated.grad, accumulated.grad.clone()
    poison = [torch.full_like(p, float("nan")) for p in params for _ in range(4)]
    del poison  # freed memory of the right sizes, full of NaN: an allocation left unfilled shows
    grads._set_missing_zero_grads(params)
    for p in fresh:
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape and p.grad.stride() == p.stride()
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert accumulated.grad is existing and torch.equal(existing, values)
    assert frozen.grad is None
    grads._set_missing_zero_grads(params)  # a second call: every gradient exists now, nothing changes
    assert accumulated.grad is existing


@pytest.mark.parametrize("writer", ["compiled", "python"])
def test_the_zero_writer_fills_what_is_missing_and_nothing_else(monkeypatch, writer):
    """sdepth_ext._C's writer (csrc/grads.cpp) and the Python loop it replaces (the fallback without the
    build)."""
    import sdepth_ext.grads as grads

    if writer == "compiled" and grads._COMPILED_SET_MISSING_ZERO_GRADS is None:
        pytest.skip("sdepth_ext._C is not built")
    if writer == "python":
        monkeypatch.setattr(grads, "_COMPILED_SET_MISSING_ZERO_GRADS", None)
    _write_and_check()


# The compiled writer's check in a process whose malloc reuses freed memory of every size: glibc's default
# hands large blocks (the cases above GRAIN_SIZE) back to the kernel, whose fresh pages are zero, so a part
# the writer left unfilled would pass unseen.
_WRITER_IN_REUSED_MEMORY = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
assert libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD
sys.path.insert(0, sys.argv[1])
import test_zero_grads_pending
test_zero_grads_pending._write_and_check()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt sets the allocator")
def test_the_compiled_zero_writer_clears_reused_memory():
    """The compiled writer's check where every zero gradient's memory held NaN before (above)."""
    import sdepth_ext.grads as grads

    if grads._COMPILED_SET_MISSING_ZERO_GRADS is None:
        pytest.skip("sdepth_ext._C is not built")
    tests_dir = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _WRITER_IN_REUSED_MEMORY, tests_dir],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# Three "zero"-policy steps of a converted cifar_resnet(20); saves every parameter's gradient after each.
_THREE_STEPS = """
import sys
import torch, torch.nn.functional as F
import sdepth_ext as sd
torch.manual_seed(0)
model = sd.convert(sd.cifar_resnet(20), p_last=0.5, mode="batch", seed=3)
x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
grads = []
for _ in range(3):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
torch.save(grads, sys.argv[1])
"""


def test_without_the_compiled_extension_the_package_falls_back_with_the_same_gradients(tmp_path):
    """A pure-Python install (SDEPTH_SKIP_BUILD=1, or a build that does not load): ``from . import _C``
    fails, the scheduler falls back to NumPy, the zero writer to its Python loop (and the engine runs the idle
    accumulators), and three training steps leave the same gradients as with the extension (the same plans:
    the samplers are one function)."""
    import sdepth_ext.grads as grads

    if grads._COMPILED_SET_MISSING_ZERO_GRADS is None:
        pytest.skip("sdepth_ext._C is not built: nothing to compare the fallback with")
    env = child_env()
    without = ('import sys; sys.modules["sdepth_ext._C"] = None\n'  # what a missing build is to the import
               'import sdepth_ext as sd, sdepth_ext.grads as g\n'
               'assert not sd.has_compiled_scheduler() and g._COMPILED_SET_MISSING_ZERO_GRADS is None\n'
               'assert g._COMPILED_SKIP_IDLE_ACCUMULATORS is None\n')
    for name, prelude in (("with", ""), ("without", without)):
        subprocess.run([sys.executable, "-c", prelude + _THREE_STEPS, str(tmp_path / f"{name}.pt")], env=env,
                       check=True, capture_output=True, timeout=300)
    compiled, fallback = (torch.load(tmp_path / f"{name}.pt") for name in ("with", "without"))
    zeros = 0
    assert len(compiled) == len(fallback) == 3
    for step_compiled, step_fallback in zip(compiled, fallback):
        assert len(step_compiled) == len(step_fallback)
        for a, b in zip(step_compiled, step_fallback):
            assert a is not None and b is not None  # "zero": every parameter has a gradient
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            zeros += not a.any()
    assert zeros > 0  # some unit was dropped: the writers were compared


def test_autograd_grad_gets_the_zeros_and_leaves_dot_grad_alone():
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    dropped, kept = _dropped_and_kept(zero)
    loss = F.cross_entropy(zero(x), y)
    reference = F.cross_entropy(none(x), y)
    got = torch.autograd.grad(loss, [dropped[0], kept[0]], retain_graph=True)
    want = torch.autograd.grad(reference, [_dropped_and_kept(none)[1][0]])
    assert got[0].shape == dropped[0].shape and not got[0].any()
    torch.testing.assert_close(got[1], want[0], rtol=0, atol=0)
    image = x.clone().requires_grad_()
    torch.autograd.grad(F.cross_entropy(zero(image), y), image)
    assert all(p.grad is None for p in zero.parameters())


def test_backward_with_inputs_accumulates_only_those():
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    dropped, kept = _dropped_and_kept(zero)
    F.cross_entropy(zero(x), y).backward(inputs=[dropped[0], kept[0]])
    F.cross_entropy(none(x), y).backward(inputs=[_dropped_and_kept(none)[1][0]])
    assert dropped[0].grad is not None and not dropped[0].grad.any()
    torch.testing.assert_close(kept[0].grad, _dropped_and_kept(none)[1][0].grad, rtol=0, atol=0)
    assert sum(p.grad is not None for p in zero.parameters()) == 2


def test_hooks_on_dropped_parameters_see_their_zeros():
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    dropped, _ = _dropped_and_kept(zero)
    seen = []
    dropped[0].register_hook(lambda g: seen.append(("hook", g.clone())))
    dropped[1].register_post_accumulate_grad_hook(lambda p: seen.append(("post", p.grad.clone())))
    F.cross_entropy(zero(x), y).backward()
    F.cross_entropy(none(x), y).backward()
    assert [kind for kind, _ in seen] == ["hook", "post"] and not any(g.any() for _, g in seen)
    _check_grads(zero, none, NUM_BLOCKS)


def test_frozen_parameters_of_dropped_units_get_no_gradient():
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, _ = _learned(x, y)
    dropped, _ = _dropped_and_kept(zero)
    for p in dropped[:3]:
        p.requires_grad_(False)
    F.cross_entropy(zero(x), y).backward()
    assert all(p.grad is None for p in dropped[:3])
    assert all(p.grad is not None and not p.grad.any() for p in dropped[3:])


def test_with_torch_distributed_initialized_the_zeros_go_through_autograd(tmp_path):
    """A process group may mean a data-parallel engine hooked on the parameters' AccumulateGrad nodes
    (DDP's reducer without ddp_ready, Horovod, DeepSpeed), which Python cannot see."""
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                         world_size=1)
    try:
        loss = F.cross_entropy(zero(x), y)
        loss.backward()
    finally:
        torch.distributed.destroy_process_group()
    F.cross_entropy(none(x), y).backward()
    assert _graph_nodes(loss, "ZeroGradTouchBackward") == 1
    assert _graph_nodes(loss, "StepZeroGradsBackward") == 0
    _check_grads(zero, none, NUM_BLOCKS)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="compiled autograd of a converted model is checked on torch >= 2.6")
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_autograd_accumulates_the_zeros_itself():
    """Compiled autograd's graph accumulates every gradient the node returns (a None for an input that
    requires grad fails there at run time): the node returns the zeros through autograd."""
    from torch._dynamo import compiled_autograd

    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 10, (BATCH,))
    zero, none = _learned(x, y)
    loss = F.cross_entropy(zero(x), y)
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        loss.backward()
    F.cross_entropy(none(x), y).backward()
    assert _graph_nodes(loss, "StepZeroGradsBackward") == 1
    _check_grads(zero, none, NUM_BLOCKS)
