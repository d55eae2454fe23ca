"""The "zero" policy's one node per step (sdepth_ext.grads.PendingZeroGrads): the dropped units of a step get
their exact zero gradients from one ZeroGradTouch node, attached by the block that ran last in the previous
forward; forwards that end elsewhere, start below the root, or are recomputed in backward still give every
dropped unit that ran its zero gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from conftest import seed_where
from torch import nn
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
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


def _touch_nodes(loss: torch.Tensor) -> int:
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "ZeroGradTouchBackward"
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return count


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
