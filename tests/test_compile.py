"""sd.compile_blocks: compiled residual regions, gates in eager Python; bounded recompiles; same numbers.

Each compiled model is checked against an eager twin (a deepcopy taken before compiling: same weights, same
scheduler state, hence the same plan every step). Recompiles are counted with Dynamo's counters.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import nn
from torch._dynamo.utils import counters
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from sdepth_ext.compiled import _inlines_nn_modules, _shape_key
from sdepth_ext.state import get_state

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEPS = 20
# torch >= 2.5 shares a compiled graph among blocks of one shape; torch 2.4 (Dynamo without nn.Module
# inlining) compiles one per block instance. Graph counts below are per "graph key" accordingly.
PER_INSTANCE = not _inlines_nn_modules()


def graph_key(blocks, l):
    return l if PER_INSTANCE else _shape_key(blocks[l])


def tiny_model():
    """Stem + 3 identical BasicBlocks: one block shape, so one compiled graph (cheap for inductor on CPU)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         *(BasicBlock(8, 8) for _ in range(3)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def cifar8():
    torch.manual_seed(0)
    return sd.cifar_resnet(8, num_classes=4)  # 3 blocks, 3 distinct shapes, two projection shortcuts


def run_steps(model, twin, batch, tol):
    """STEPS forward/backward passes of both models on fresh inputs; outputs and grads compared each step.

    Returns each step's plan (counts) of the compiled model."""
    plans = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 4, (batch,))
        outs = []
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            out = m(x)
            F.cross_entropy(out, y).backward()
            outs.append(out)
        plan = get_state(model).host_plan
        assert plan.counts == get_state(twin).host_plan.counts
        plans.append(list(plan.counts))
        torch.testing.assert_close(outs[0], outs[1], **tol)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"step {step} {name}")
    return plans


def graphs():
    return counters["stats"]["unique_graphs"]


def no_eager_fallback():
    return counters["frames"]["total"] == counters["frames"]["ok"]


# inductor reorders reductions (BatchNorm statistics, conv epilogues): a few float32 ulps, amplified by the
# backward; 1e-4 relative is ~1000 ulps, far below any real error (a wrong plan changes outputs by O(1)).
INDUCTOR_TOL = {"rtol": 1e-4, "atol": 1e-5}
# aot_eager runs the same ATen kernels as eager (after functionalisation): differences only from op order.
AOT_TOL = {"rtol": 1e-6, "atol": 1e-7}


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_inductor_matches_eager_and_compiles_once(mode):
    model = sd.convert(tiny_model(), p_last=0.5, rule="uniform", mode=mode, seed=4).train()
    twin = copy.deepcopy(model)
    # Row mode with a fixed row count per sub-batch size bucket: N = 4, k = 2 -> sub-batches of 2 or 4.
    sd.compile_blocks(model, backend="inductor", dynamic=False, row_multiple=2 if mode == "row" else None)
    if mode == "row":
        sd.set_row_multiple(twin, 2)
    plans = run_steps(model, twin, batch=4, tol=INDUCTOR_TOL)
    assert any(0 in p for p in plans) and any(c > 0 for p in plans for c in p)
    sizes = {c for p in plans for c in p if c > 0}
    if mode == "row":
        assert sizes <= {2, 4}
        assert 2 in sizes  # a proper sub-batch ran through the compiled region
    # One block shape: one training graph per sub-batch size, whatever the drop patterns of 20 steps.
    blocks = get_state(model).blocks
    assert graphs() == len({(graph_key(blocks, l), c) for p in plans for l, c in enumerate(p) if c > 0})
    assert no_eager_fallback()


def test_row_mode_recompiles_at_most_once_per_shape_and_bucket():
    """dynamic=None (torch's default): compile_blocks marks the row batch dimension dynamic, so per shape
    one graph serves all sub-batch sizes >= 2 and one the size 1 (Dynamo specialises 0 and 1). Never more,
    whatever the 20 plans: at most one graph per (block shape, bucket) seen."""
    batch = 8
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode="row", seed=9).train()
    twin = copy.deepcopy(model)
    sd.compile_blocks(model, backend="aot_eager")
    plans = run_steps(model, twin, batch=batch, tol=AOT_TOL)
    blocks = get_state(model).blocks
    seen = {(graph_key(blocks, l), "one" if c == 1 else "many")
            for p in plans for l, c in enumerate(p) if c > 0}
    sizes = {c for p in plans for c in p if c > 1}
    assert len(sizes) >= 4  # the plans did vary the sub-batch sizes (static shapes would recompile each)
    # Residual regions: <= one graph per (shape, bucket) seen; shortcut regions (2 projection blocks; they
    # always see the full batch): <= one graph each.
    num_shortcuts = sum(b.downsample is not None for b in get_state(model).blocks)
    assert graphs() <= len(seen) + num_shortcuts
    assert no_eager_fallback()


def test_batch_mode_compiles_once_per_block_shape():
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode="batch", seed=2).train()
    twin = copy.deepcopy(model)
    sd.compile_blocks(model, backend="aot_eager")
    plans = run_steps(model, twin, batch=4, tol=AOT_TOL)
    active = {l for p in plans for l, c in enumerate(p) if c > 0}
    assert any(0 in p for p in plans[:-1])
    blocks = get_state(model).blocks
    shapes = {graph_key(blocks, l) for l in active}
    shortcuts = {l if PER_INSTANCE else _shape_key(b.downsample) for l, b in enumerate(blocks)
                 if b.downsample is not None}
    assert graphs() <= len(shapes) + len(shortcuts)
    assert no_eager_fallback()


# ============================================================================================================
# row_multiple: what it does to the plan and to survival rates
# ============================================================================================================
def test_row_multiple_only_promotes_dropped_samples():
    plain = sd.convert(cifar8(), p_last=0.3, rule="uniform", mode="row", seed=5).train()
    rounded = sd.set_row_multiple(copy.deepcopy(plain), 4)
    n = 10
    promoted = [0] * n
    for _ in range(300):
        a = get_state(plain).sample(n, torch.device("cpu"))
        b = get_state(rounded).sample(n, torch.device("cpu"))
        for l in range(a.num_blocks):
            k = a.counts[l]
            assert b.counts[l] == (0 if k == 0 else min(n, 4 * -(-k // 4)))
            rows_a = set(range(n)) if a.rows(l) is None else set(a.rows(l).tolist())
            rows_b = set(range(n)) if b.rows(l) is None else set(b.rows(l).tolist())
            assert rows_a <= rows_b and len(rows_b) == b.counts[l]
            for i in rows_b - rows_a:
                promoted[i] += 1
            if b.rows(l) is not None and b.counts[l]:
                assert torch.equal(b.rows(l), torch.sort(b.rows(l)).values)
    # The promoted samples rotate: no index is favoured (lowest-index-first would give index 0 several times
    # the promotions of index 9). Each index's share is within a factor 2 of the mean.
    mean = sum(promoted) / n
    assert mean > 50 and min(promoted) > mean / 2 and max(promoted) < 2 * mean, promoted


def test_row_multiple_effective_survival_rate():
    p, n, k, draws = 0.3, 8, 4, 1500
    model = sd.set_row_multiple(sd.convert(cifar8(), p_last=p, rule="uniform", mode="row", seed=6), k)
    state = get_state(model)
    runs = [0] * 3
    for _ in range(draws):
        plan = state.sample(n, torch.device("cpu"))
        for l in range(3):
            runs[l] += plan.counts[l]
    expected = sd.effective_survival(p, n, k)
    assert expected > p + 0.1  # rounding to multiples of 4 out of 8 raises the rate a lot here
    for l in range(3):
        assert binomtest(runs[l], draws * n, expected).pvalue > 1e-3, (runs[l] / (draws * n), expected)
    assert sd.effective_survival(p, n, 1) == pytest.approx(p)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_row_multiple_rejects_bad_values(bad):
    model = sd.convert(cifar8(), mode="row", seed=0)
    with pytest.raises(ValueError, match="multiple"):
        sd.set_row_multiple(model, bad)
    with pytest.raises(ValueError, match="multiple"):
        sd.compile_blocks(model, row_multiple=bad)
    with pytest.raises(ValueError, match="batch_size"):
        sd.effective_survival(0.5, 0, 2)


def test_revert_drops_compiled_regions():
    model = sd.compile_blocks(sd.convert(cifar8(), seed=0), backend="aot_eager")
    keys = list(model.state_dict())
    assert keys == list(cifar8().state_dict())  # compiled wrappers are not submodules
    sd.revert(model)
    for name, module in model.named_modules():  # nothing of sdepth_ext is left on any module
        assert not [k for k in vars(module) if k.startswith(("_sd", "sd_"))], name
    model.train()(torch.randn(2, 3, 16, 16))  # and the plain forward runs


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_a_compiled_model_compiles_and_trains_its_own_blocks(how):
    """A compiled region is bound to its block: a copy that carried it ran the original's blocks (gradients
    went to the original's parameters, none to the copy's residual branches). A copy recompiles its own,
    with the settings of the original, and trains exactly like an eager model in the same state."""
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode="row", seed=3).train()
    eager = copy.deepcopy(model)
    sd.compile_blocks(model, backend="eager", dynamic=False)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert get_state(twin).compile_kwargs == {"backend": "eager", "dynamic": False}
    for step in range(2):
        torch.manual_seed(200 + step)
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
        for m in (model, twin, eager):
            m.zero_grad(set_to_none=True)
        outs = [m(x) for m in (twin, eager)]
        for out in outs:
            F.cross_entropy(out, y).backward()
        torch.testing.assert_close(outs[0], outs[1], **AOT_TOL)
        assert all(p.grad is None for p in model.parameters()), "the copy trained the original"
        for (name, p), q in zip(twin.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **AOT_TOL, msg=f"step {step} {name}")
    for block in get_state(twin).blocks:
        assert block.__dict__["_sd_regions"].block is block  # compiled for the copy's own blocks


def test_recompile_limit_is_raised_for_every_block_shape():
    """The small test models need fewer than 8 graphs; a deep one in row mode with dynamic=False needs a graph
    per block shape and sub-batch size: compile_blocks must raise Dynamo's limit, not fall back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # config.patch, not pytest's monkeypatch: on torch 2.4 the latter deletes the setting when it undoes
    with config.patch(**{name: 8}):
        model = sd.convert(sd.cifar_resnet(20), mode="row", seed=0)
        sd.compile_blocks(model, backend="aot_eager", dynamic=False)
        blocks = get_state(model).blocks
        keys = {graph_key(blocks, l) for l in range(len(blocks))}
        assert len(keys) == (9 if PER_INSTANCE else 5)  # layer1 x1, layer2/3 first + rest
        assert getattr(config, name) >= 64 * len(keys)  # every sub-batch size of a 64-sample batch, per shape
    assert hasattr(config, name)


def test_set_row_multiple_on_a_batch_mode_model_is_an_error():
    with pytest.raises(ValueError, match="multiple.*batch mode"):
        sd.set_row_multiple(sd.convert(cifar8(), mode="batch", seed=0), 4)


def test_effective_survival_stays_a_probability():
    assert sd.effective_survival(1.0, 10, 4) == pytest.approx(1.0)  # rounding up never exceeds the batch
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        for n in (1, 3, 10, 33):
            for k in (1, 2, 4, 8, 64):
                value = sd.effective_survival(p, n, k)
                assert 0.0 <= value <= 1.0 + 1e-12 and value >= p - 1e-12, (p, n, k, value)
