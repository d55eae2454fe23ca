"""Tests of sd.convert / revert / survival_probs / lesion / cifar_resnet (CPU, small inputs).

Every stochastic-depth forward is checked against a hand-written PyTorch reference (section below) that
uses only torch.nn.functional on the blocks' parameters, given the same Plan the converted model drew.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import subprocess
import sys
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy.stats import binomtest
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import sdepth_ext as sd
from sdepth_ext.plan import Plan
from sdepth_ext.state import get_state, is_gated
from tests.conftest import child_env, drops_some_keeps_some, seed_where
from tests.families.test_tv_resnet import custom_model


@pytest.fixture(autouse=True)
def torch_rng():
    """Tests seed torch's global generator; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ============================================================================================================
# PyTorch reference (independent of sdepth_ext: functional ops on the blocks' own parameters)
# ============================================================================================================
def ref_conv(conv: nn.Conv2d, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def ref_bn(bn: nn.BatchNorm2d, x):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum,
                        bn.eps)


def ref_convs(block):
    names = ("conv1", "conv2", "conv3") if isinstance(block, Bottleneck) else ("conv1", "conv2")
    return [getattr(block, n) for n in names]


def ref_residual(block, x):
    """f(x) of a torchvision BasicBlock (conv-bn-relu-conv-bn) or Bottleneck (three conv-bn, relu between)."""
    if isinstance(block, Bottleneck):
        out = torch.relu(ref_bn(block.bn1, ref_conv(block.conv1, x)))
        out = torch.relu(ref_bn(block.bn2, ref_conv(block.conv2, out)))
        return ref_bn(block.bn3, ref_conv(block.conv3, out))
    out = torch.relu(ref_bn(block.bn1, ref_conv(block.conv1, x)))
    return ref_bn(block.bn2, ref_conv(block.conv2, out))


def ref_shortcut(block, x):
    if block.downsample is None:
        return x
    conv, bn = block.downsample[0], block.downsample[1]
    return ref_bn(bn, ref_conv(conv, x))


def ref_bn_sees_one_value(block, x_one):
    """Whether some conv output of f has 1x1 spatial size for a one-sample input (BatchNorm would raise)."""
    with torch.no_grad():
        out = x_one
        for conv in ref_convs(block):
            out = ref_conv(conv, out)
            if out[0, 0].numel() == 1:
                return True
    return False


def ref_block(block, x, rows=None, scale=1.0):
    """relu(shortcut + scale * f(x)) for the samples in ``rows`` (None = all), relu(shortcut) for the others.

    Row mode runs f on the gathered survivors only. The specified exception: a single survivor whose
    BatchNorm would see one value per channel is normalised together with the lowest-index dropped sample,
    and only the survivor's residual is used.
    """
    identity = ref_shortcut(block, x)
    if rows is None:
        return torch.relu(identity + scale * ref_residual(block, x))
    if len(rows) == 0:
        return torch.relu(identity)
    if len(rows) == 1 and block.training and ref_bn_sees_one_value(block, x[:1]):
        survivor = rows[0]
        pair = sorted([survivor, 1 if survivor == 0 else 0])
        residual = ref_residual(block, x[torch.tensor(pair)])[pair.index(survivor)].unsqueeze(0)
    else:
        residual = ref_residual(block, x[torch.tensor(rows)])
    return torch.relu(identity.index_add(0, torch.tensor(rows), scale * residual))


def ref_lesioned_block(block, x):
    return torch.relu(ref_shortcut(block, x))


def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def reference_forward(model, x, rows_per_block, scales):
    """``model`` (a plain copy) with every block's forward replaced by :func:`ref_block`."""
    blocks = blocks_of(model)
    assert len(blocks) == len(rows_per_block) == len(scales)
    try:
        for block, rows, scale in zip(blocks, rows_per_block, scales):
            block.forward = functools.partial(ref_block, block, rows=rows, scale=scale)
        return model(x)
    finally:
        for block in blocks:
            del block.forward


def plan_rows(plan: Plan):
    """Per block: None (all survive) or the list of surviving sample indices (possibly empty)."""
    out = []
    for l in range(plan.num_blocks):
        rows = plan.rows(l)
        out.append(None if rows is None else rows.cpu().tolist())
    return out


# ============================================================================================================
# Models
# ============================================================================================================
class PlainBasic(BasicBlock):
    """A user subclass that keeps torchvision's forward (converted through a generated class)."""


TV = torchvision.models
ARCHS = {
    "cifar_resnet20": (lambda: sd.cifar_resnet(20), 32),
    "custom": (functools.partial(custom_model, PlainBasic), 16),
    "resnet18": (lambda: TV.resnet18(num_classes=10), 64),
    "resnet34": (lambda: TV.resnet34(num_classes=10), 64),
    "resnet50": (lambda: TV.resnet50(num_classes=10), 64),
    "resnet101": (lambda: TV.resnet101(num_classes=10), 64),
    "resnet152": (lambda: TV.resnet152(num_classes=10), 64),
    "wide_resnet50_2": (lambda: TV.wide_resnet50_2(num_classes=10), 64),
    "resnext50_32x4d": (lambda: TV.resnext50_32x4d(num_classes=10), 64),
}
# Training tests (forward + backward twice) on the deepest/widest only where it adds coverage: resnet50
# already covers Bottleneck, resnext its grouped conv; 101/152/wide add depth and width, not new code paths.
TRAIN_ARCHS = ["cifar_resnet20", "custom", "resnet18", "resnet34", "resnet50", "resnext50_32x4d",
               "wide_resnet50_2"]

_BASE_MODELS: dict[str, nn.Module] = {}


def fresh_model(arch: str) -> nn.Module:
    """A deepcopy of one cached, randomly initialised instance per architecture (same weights each call)."""
    if arch not in _BASE_MODELS:
        torch.manual_seed(1234)
        model = ARCHS[arch][0]()
        # Non-trivial BN affine parameters and running stats, so scale / statistics errors show.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
        _BASE_MODELS[arch] = model
    return copy.deepcopy(_BASE_MODELS[arch])


def make_input(arch: str, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    size = ARCHS[arch][1]
    return torch.randn(batch, 3, size, size)


def assert_grads_match(model, reference, exact=False):
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = ref_params[name].grad
        if expected is None:  # a dropped branch: exact zeros under the default dropped-gradient policy
            assert param.grad is not None and not param.grad.any(), name
        else:
            assert param.grad is not None, name
            if exact:
                assert torch.equal(param.grad, expected), name
            else:
                torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-5, msg=name)


# ============================================================================================================
# Eval mode
# ============================================================================================================
@pytest.mark.parametrize("arch", list(ARCHS))
def test_eval_inverted_is_bit_identical_to_original(arch):
    plain = fresh_model(arch).eval()
    converted = sd.convert(fresh_model(arch), p_last=0.5, scaling="inverted", seed=0).eval()
    x = make_input(arch)
    with torch.no_grad():
        assert torch.equal(converted(x), plain(x))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eval_paper_matches_reference(arch):
    reference = fresh_model(arch).eval()
    converted = sd.convert(fresh_model(arch), p_last=0.5, seed=0).eval()
    probs = sd.survival_probs(converted)
    x = make_input(arch)
    with torch.no_grad():
        out = converted(x)
        expected = reference_forward(reference, x, [None] * len(probs), probs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_draws_no_plan():
    model = sd.convert(fresh_model("cifar_resnet20"), seed=3).eval()
    state = get_state(model)
    before = state.scheduler.step
    with torch.no_grad():
        model(make_input("cifar_resnet20"))
    assert state.scheduler.step == before and state.plan is None


# ============================================================================================================
# Training mode
# ============================================================================================================
@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_p_last_1_equals_original(arch):
    plain = fresh_model(arch).train()
    converted = sd.convert(fresh_model(arch), p_last=1.0, seed=0).train()
    x = make_input(arch)
    out, expected = converted(x), plain(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_match(converted, plain, exact=True)


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_batch_mode_matches_reference(arch, scaling):
    reference = fresh_model(arch).train()
    num_blocks = len(blocks_of(reference))
    seed = seed_where(drops_some_keeps_some, sd.linear_decay(num_blocks, 0.5), "batch", 2)
    converted = sd.convert(fresh_model(arch), p_last=0.5, mode="batch", scaling=scaling, seed=seed).train()
    probs = sd.survival_probs(converted)
    x = make_input(arch, seed=1)
    out = converted(x)
    plan = get_state(converted).host_plan
    assert 0 < len(plan.active) < len(probs)
    scales = [1.0 if scaling == "paper" else 1.0 / p for p in probs]
    expected = reference_forward(reference, x, plan_rows(plan), scales)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_match(converted, reference)


@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_row_mode_matches_reference(arch):
    batch = 4 if arch in ("cifar_resnet20", "custom") else 2
    reference = fresh_model(arch).train()
    converted = sd.convert(fresh_model(arch), p_last=0.5, mode="row", seed=11).train()
    probs = sd.survival_probs(converted)
    x = make_input(arch, batch=batch, seed=2)
    out = converted(x)
    rows = plan_rows(get_state(converted).host_plan)
    # The draw gathers a proper subset somewhere (all-rows and no-rows cases: the forced-plan test below).
    assert any(r for r in rows if r is not None)
    expected = reference_forward(reference, x, rows, [1.0] * len(probs))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_match(converted, reference)


def count_module_calls(model):
    calls: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_dropped_blocks_run_nothing_and_get_no_gradient(mode):
    # uniform 0.3: a block has no survivor with probability 0.7 (batch) or 0.49 (row, 2 samples)
    seed = seed_where(drops_some_keeps_some, sd.uniform(8, 0.3), mode, 2)
    model = sd.convert(fresh_model("resnet18"), p_last=0.3, rule="uniform", mode=mode, seed=seed).train()
    calls = count_module_calls(model)
    x = make_input("resnet18", batch=2, seed=3)
    model(x).sum().backward()
    plan = get_state(model).host_plan
    dropped = [l for l in range(plan.num_blocks) if plan.counts[l] == 0]
    assert dropped and len(dropped) < plan.num_blocks
    for l, block in enumerate(blocks_of(model)):
        for name, module in block.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                continue
            full = next(n for n, m in model.named_modules() if m is module)
            in_shortcut = name.startswith("downsample")
            assert calls[full] == (1 if l not in dropped or in_shortcut else 0), full
            for p in module.parameters():  # a dropped branch: the default policy's zero gradient
                assert bool(p.grad.any()) == (l not in dropped or in_shortcut), full


def make_row_plan(rows_per_block, batch_size):
    """A row-mode Plan with the given survivors per block (the one Plan layout of sdepth_ext.scheduler)."""
    return Plan.from_survivors("row", batch_size, rows_per_block)


class FixedPlans:
    """Stands in for the Scheduler: hands out one fixed plan."""

    def __init__(self, plan):
        self.plan = plan

    def sample(self, batch_size, **_):
        assert batch_size == self.plan.batch_size
        return self.plan


def test_row_mode_single_survivor_at_1x1_batchnorm():
    """resnet18 at 32x32: layer4 runs at 1x1, where BatchNorm rejects a sub-batch of one sample.

    The block is run on the survivor plus the lowest-index dropped sample (for the statistics only); the
    output takes only the survivor's residual (the reference's rule)."""
    arch = "resnet18"
    batch = 3
    rows = [[0, 1, 2], [0, 2], [1], [], [0, 1], [2], [1], [0]]  # blocks 6, 7 (layer4): one survivor each
    reference = fresh_model(arch).train()
    converted = sd.convert(fresh_model(arch), p_last=0.5, mode="row", seed=0).train()
    get_state(converted).scheduler = FixedPlans(make_row_plan(rows, batch))
    torch.manual_seed(4)
    x = torch.randn(batch, 3, 32, 32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # the pitfall, unhandled
        reference.layer4[1].bn1.train()(torch.randn(1, 512, 1, 1))
    out = converted(x)
    expected = reference_forward(reference, x, [None, *rows[1:]], [1.0] * len(rows))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_match(converted, reference)


def test_single_survivor_is_paired_with_the_lowest_dropped_sample():
    """Survivors 3 and 2 of 4 at 1x1: each is normalised with sample 0, the lowest-index dropped one (pairing
    with `survivor - 1` instead, or any other sample, changes the BatchNorm statistics and the output)."""
    arch, batch = "resnet18", 4
    rows = [[0, 1, 2, 3], [0, 2], [1, 3], [], [0, 1], [2, 3], [3], [2]]  # layer4's blocks: one survivor each
    reference = fresh_model(arch).train()
    converted = sd.convert(fresh_model(arch), p_last=0.5, mode="row", seed=0).train()
    get_state(converted).scheduler = FixedPlans(make_row_plan(rows, batch))
    torch.manual_seed(5)
    x = torch.randn(batch, 3, 32, 32)
    out = converted(x)
    expected = reference_forward(reference, x, [None, *rows[1:]], [1.0] * len(rows))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the control: pairing 3 with 2 (and 2 with 1) gives another output
    neighbours = copy.deepcopy(reference)
    blocks = blocks_of(neighbours)
    forwards = [functools.partial(ref_block, b, rows=r) for b, r in zip(blocks, [None, *rows[1:]])]
    for l, survivor in ((6, 3), (7, 2)):
        def paired_with_neighbour(x, block=blocks[l], survivor=survivor):
            pair = [survivor - 1, survivor]
            residual = ref_residual(block, x[torch.tensor(pair)])[1:]
            return torch.relu(ref_shortcut(block, x).index_add(0, torch.tensor([survivor]), residual))
        forwards[l] = paired_with_neighbour
    for block, forward in zip(blocks, forwards):
        block.forward = forward
    assert not torch.allclose(neighbours(x), out, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads_match(converted, reference)


def test_row_mode_rejects_other_batch_in_block():
    model = sd.convert(fresh_model("cifar_resnet20"), mode="row", seed=0).train()
    get_state(model).plan = make_row_plan([[0]] * 9, 3)  # drawn for 3 samples, the block gets 2
    with pytest.raises(RuntimeError, match="batch of 3"):
        model.layer1(torch.randn(2, 16, 8, 8))


def test_sub_models_train_on_a_fresh_plan_every_step():
    """The feature-extractor idiom runs the root's children without the root: each of its training forwards
    must still draw a new plan (it reused the root's last plan forever before); a block called alone too."""
    model = sd.convert(fresh_model("cifar_resnet20"), p_last=0.5, mode="batch", seed=0).train()
    x = make_input("cifar_resnet20", batch=2)
    model(x)
    scheduler = sd.get_scheduler(model)
    features = nn.Sequential(*list(model.children())[:-1])
    patterns = set()
    for step in range(1, 13):
        features(x)
        assert scheduler.step == step + 1  # one fresh draw per forward, never a reuse
        patterns.add(tuple(get_state(model).host_plan.counts))
    assert len(patterns) > 1
    model.layer1(torch.randn(2, 16, 8, 8))  # a block alone: its own fresh plan
    assert scheduler.step == 14


def test_feature_extractor_traces_units_as_leaves_that_keep_skipping():
    """torchvision's create_feature_extractor, with nothing registered: in training the converted blocks are
    leaves of the traced graph, and each call draws the next step's gates (inlining them would freeze one
    step's gates into the graph)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = sd.convert(fresh_model("cifar_resnet20"), p_last=0.5, mode="row", seed=0).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision: train and eval graphs differ (leaves)
        extractor = create_feature_extractor(model, ["layer3"])
    leaves = {n.target for n in extractor.train_graph.nodes if n.op == "call_module"}
    assert {name for name, m in model.named_modules() if is_gated(m)} <= leaves
    x = make_input("cifar_resnet20", batch=4)
    scheduler = sd.get_scheduler(model)
    before = scheduler.step
    for _ in range(3):
        extractor(x)["layer3"].sum().backward()
    assert scheduler.step == before + 3


# ============================================================================================================
# Survival rates, through the model
# ============================================================================================================
def count_block_runs(model):
    """Per block: how many samples its first conv saw (forward hooks)."""
    runs = [0] * len(blocks_of(model))
    for l, block in enumerate(blocks_of(model)):
        block.conv1.register_forward_hook(
            lambda _m, inputs, _o, l=l: runs.__setitem__(l, runs[l] + inputs[0].shape[0]))
    return runs


def tiny_stack(num_blocks):
    """Stem + ``num_blocks`` 4-channel BasicBlocks: cheap enough for thousands of training forwards."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         *(BasicBlock(4, 4) for _ in range(num_blocks)))


def test_batch_mode_drop_rate_matches_survival(one_thread):
    model = sd.convert(tiny_stack(6), p_last=0.2, mode="batch", seed=21).train()
    runs = count_block_runs(model)
    steps = 3000
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    for l, p in enumerate(sd.survival_probs(model)):
        assert binomtest(runs[l] // 2, steps, p).pvalue > 1e-3, (l, runs[l] // 2, p)


def test_row_mode_drop_rate_matches_survival(one_thread):
    model = sd.convert(fresh_model("cifar_resnet20"), p_last=0.2, mode="row", seed=22).train()
    runs = count_block_runs(model)
    torch.manual_seed(0)
    x = torch.randn(500, 3, 4, 4)
    with torch.no_grad():
        for _ in range(4):
            model(x)
    for l, p in enumerate(sd.survival_probs(model)):
        assert binomtest(runs[l], 2000, p).pvalue > 1e-3, (l, runs[l], p)


# ============================================================================================================
# Activations saved for backward
# ============================================================================================================
def saved_bytes(model, x, attribute=False):
    """Bytes of distinct storages saved for backward in one forward; optionally per owner.

    Owners: ("block", l) while block l runs, ("shortcut", l) while its downsample runs, "other" outside
    blocks. A storage counts once, for the owner that saved it first (the next block's conv saves the
    previous block's output again: same storage). Also returns each block's output bytes."""
    seen: set[int] = set()
    per_owner: dict = defaultdict(int)
    out_bytes: dict = {}
    owner = ["other"]
    handles = []

    def enter(tag):
        return lambda *_: owner.append(tag)

    def leave(tag):
        def hook(_module, _inputs, out):
            owner.pop()
            if tag[0] == "block":
                out_bytes[tag[1]] = out.numel() * out.element_size()
        return hook

    if attribute:
        for l, block in enumerate(blocks_of(model)):
            for tag, module in ((("block", l), block), (("shortcut", l), block.downsample)):
                if module is not None:
                    handles += [module.register_forward_pre_hook(enter(tag)),
                                module.register_forward_hook(leave(tag))]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            per_owner[owner[-1]] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sum(per_owner.values()), per_owner, out_bytes


def test_batch_mode_saves_activations_of_active_blocks_only():
    """Saved-for-backward bytes follow the plan: a dropped block saves nothing but its projection shortcut.

    From the plain model: B_l = bytes block l saves (downsample included); S_l = what a dropped projection
    block still saves: its downsample's tensors plus its output relu(downsample(x)) (0 for identity blocks).
    Per plan, the converted model must save total - sum_{dropped} (B_l - S_l); the epilogue's only extra is
    a 0-d wrapped scalar (4-8 B of ~3 MB), hence rel 1e-3. Averaged over 8 seeds, the ratio to the plain
    model must approach the expected fraction 1 - sum (1 - p_l)(B_l - S_l) / total within 4 standard errors
    (Bernoulli variance of the gates with these per-block weights; 4 sigma ~ 6e-5 false-alarm rate).
    """
    arch = "cifar_resnet20"
    x = make_input(arch, batch=2, seed=5)
    total, per_owner, out_bytes = saved_bytes(fresh_model(arch).train(), x, attribute=True)
    blocks = blocks_of(fresh_model(arch))
    saving = []
    for l, block in enumerate(blocks):
        saved_by_block = per_owner[("block", l)] + per_owner[("shortcut", l)]
        kept_when_dropped = 0 if block.downsample is None else per_owner[("shortcut", l)] + out_bytes[l]
        saving.append(saved_by_block - kept_when_dropped)
    assert min(saving) > 0
    ratios = []
    probs = sd.linear_decay(len(blocks), 0.5)
    for seed in range(8):
        model = sd.convert(fresh_model(arch), p_last=0.5, mode="batch", seed=seed).train()
        measured, _, _ = saved_bytes(model, x)
        plan = get_state(model).host_plan
        expected_bytes = total - sum(saving[l] for l in range(len(blocks)) if plan.counts[l] == 0)
        assert measured == pytest.approx(expected_bytes, rel=1e-3), seed
        ratios.append(measured / total)
    expected_fraction = 1 - sum((1 - p) * s for p, s in zip(probs, saving)) / total
    std_one = sum(p * (1 - p) * (s / total) ** 2 for p, s in zip(probs, saving)) ** 0.5
    mean_ratio = sum(ratios) / len(ratios)
    assert abs(mean_ratio - expected_fraction) < 4 * std_one / len(ratios) ** 0.5
    assert expected_fraction < 0.9  # not vacuous: dropping saves a visible share


# ============================================================================================================
# state_dict, resume, revert, re-convert, copies
# ============================================================================================================
def test_state_dict_round_trips_both_ways_strict():
    plain = fresh_model("resnet18")
    converted = sd.convert(fresh_model("resnet18"), seed=3)
    assert list(converted.state_dict()) == list(plain.state_dict())
    # plain checkpoint -> converted model (strict), and converted checkpoint -> plain model (strict)
    torch.manual_seed(0)
    other = TV.resnet18(num_classes=10)
    assert not converted.load_state_dict(other.state_dict(), strict=True).missing_keys
    for (k, a), b in zip(converted.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    result = plain.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def draw_plans(model, steps, x):
    plans = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            plan = get_state(model).host_plan
            plans.append((plan.counts, plan_rows(plan)))
    return plans


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resume_draws_the_same_gates(mode):
    x = make_input("cifar_resnet20", batch=4)[:, :, :8, :8]
    model = sd.convert(fresh_model("cifar_resnet20"), mode=mode, seed=5).train()
    draw_plans(model, 3, x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    after_save = draw_plans(model, 4, x)

    buffer.seek(0)
    resumed = sd.convert(fresh_model("cifar_resnet20"), mode=mode, seed=999).train()
    resumed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert draw_plans(resumed, 4, x) == after_save

    # A plain checkpoint carries no scheduler state: the converted model keeps its own stream.
    keeps = sd.convert(fresh_model("cifar_resnet20"), mode=mode, seed=5).train()
    draw_plans(keeps, 3, x)
    keeps.load_state_dict(fresh_model("cifar_resnet20").state_dict(), strict=True)
    assert draw_plans(keeps, 4, x) == after_save


def test_scheduler_state_saved_beside_a_plain_dict_checkpoint_resumes():
    # A checkpoint copied into a plain dict loses the state_dict metadata; get_scheduler's state rides beside.
    x = make_input("cifar_resnet20", batch=4)[:, :, :8, :8]
    model = sd.convert(fresh_model("cifar_resnet20"), mode="row", seed=5).train()
    draw_plans(model, 2, x)
    weights, sched = dict(model.state_dict()), sd.get_scheduler(model).state_dict()
    after_save = draw_plans(model, 3, x)

    resumed = sd.convert(fresh_model("cifar_resnet20"), mode="row", seed=999).train()
    resumed.load_state_dict(weights, strict=True)
    sd.get_scheduler(resumed).load_state_dict(sched)
    assert draw_plans(resumed, 3, x) == after_save


def test_get_scheduler_through_wrappers_and_errors():
    model = sd.convert(fresh_model("cifar_resnet20"), seed=3)
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like from outside
    assert sd.get_scheduler(wrapper) is sd.get_scheduler(model) is get_state(model).scheduler
    with pytest.raises(ValueError, match="model: .* not converted"):
        sd.get_scheduler(fresh_model("cifar_resnet20"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sd.get_scheduler("resnet")


def test_mismatched_scheduler_state_warns_and_loads_weights():
    x = make_input("cifar_resnet20", batch=2)[:, :, :8, :8]
    source = sd.convert(fresh_model("cifar_resnet20"), p_last=0.5, seed=1)
    target = sd.convert(fresh_model("cifar_resnet20"), p_last=0.2, seed=2)
    with pytest.warns(UserWarning, match="not restored"):
        target.load_state_dict(source.state_dict(), strict=True)
    assert draw_plans(target.train(), 1, x)


def test_revert_restores_plain_model():
    plain = fresh_model("resnet50").eval()
    model = sd.revert(sd.convert(fresh_model("resnet50"), seed=0)).eval()
    assert all(type(b) in (BasicBlock, Bottleneck) for b in blocks_of(model))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert_no_sdepth_attributes(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = make_input("resnet50")
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    with pytest.raises(ValueError, match="model"):
        sd.revert(model)
    with pytest.raises(ValueError, match="model"):
        sd.survival_probs(model)


def assert_no_sdepth_attributes(model):
    """After revert nothing of sdepth_ext is left on any module (instance attributes included)."""
    for name, module in model.named_modules():
        left = [key for key in vars(module) if key.startswith(("_sd", "sd_"))]
        assert not left, (name, left)
        assert type(module).__module__ != "sdepth_ext.units", name  # no generated class left


def test_convert_twice_reconverts():
    model = sd.convert(fresh_model("cifar_resnet20"), p_last=0.5, seed=0)
    sd.convert(model, p_last=0.2, rule="uniform", mode="row", seed=1)
    assert sd.survival_probs(model) == [0.2] * 9
    assert len(model._forward_pre_hooks) == 1
    assert get_state(model).mode == "row"
    model.train()(make_input("cifar_resnet20"))
    assert get_state(model).host_plan.mode == "row"
    with pytest.raises(ValueError, match="model"):  # a sub-module of a converted model
        sd.convert(model.layer1)


def test_survival_probs_follow_rule():
    model = sd.convert(fresh_model("resnet34"), p_last=0.5)
    assert sd.survival_probs(model) == sd.linear_decay(16, 0.5)
    # p_l lives in the scheduler's state only; a block holds its unit index and the shared state
    assert get_state(model).survival is sd.get_scheduler(model).survival
    assert not any("surviv" in key for b in blocks_of(model) for key in vars(b))
    assert [b._sd_index for b in blocks_of(model)] == list(range(16))
    assert isinstance(model.layer1[0], BasicBlock)
    sd.convert(model, p_last=0.3, rule="uniform")
    assert sd.survival_probs(model) == [0.3] * 16


def test_deepcopy_and_pickle_of_converted_model():
    model = sd.convert(fresh_model("custom"), mode="row", seed=4).train()
    twin = copy.deepcopy(model)
    assert get_state(twin) is not get_state(model)
    assert get_state(twin).blocks[0] is blocks_of(twin)[0]
    x = make_input("custom", batch=4)
    torch.testing.assert_close(twin(x), model(x))  # same weights, same scheduler state -> same plan
    sd.revert(twin)
    assert sd.survival_probs(model) and type(blocks_of(model)[0]).__name__.startswith("Gated")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert draw_plans(restored, 2, x) == draw_plans(model, 2, x)


_UNPICKLE_WITHOUT_CUDA = """
import json, sys
import torch
from sdepth_ext.state import get_state
assert not torch.cuda.is_available()
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
torch.nn.functional.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
plan = get_state(model).host_plan
print(json.dumps({"counts": plan.counts, "pinned": plan.buffer.is_pinned()}))
"""


def test_a_pickled_model_trains_where_cuda_is_hidden(tmp_path):
    """A converted model trained a step (on the GPU where there is one: its plans were then pinned), moved to
    the CPU and saved, loads and trains in a process that sees no CUDA, and draws the gates the original
    would draw next: nothing about pinning or the device was pickled."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = sd.convert(fresh_model("cifar_resnet20"), mode="row", seed=7).train().to(device)
    x = make_input("cifar_resnet20", batch=4)[:, :, :8, :8]
    F.cross_entropy(model(x.to(device)), torch.zeros(4, dtype=torch.long, device=device)).backward()
    model.cpu()
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    env = child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _UNPICKLE_WITHOUT_CUDA, str(tmp_path / "model.pt"),
                             str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    model(x)  # the original's next step, on the CPU as in the child
    assert child == {"counts": get_state(model).host_plan.counts, "pinned": False}


# ============================================================================================================
# lesion
# ============================================================================================================
@pytest.mark.parametrize("converted", [False, True])
def test_lesion_removes_blocks_and_restores(converted):
    arch = "resnet18"
    model = fresh_model(arch)
    if converted:
        sd.convert(model, scaling="inverted", seed=0)
    reference = fresh_model(arch).eval()
    model.train()
    x = make_input(arch)
    drop = [1, 2]  # an identity block and a downsampling block (layer2[0])
    with torch.no_grad(), sd.lesion(model, drop=drop):
        out = model(x)
        assert not model.training
    blocks = blocks_of(reference)
    try:
        for l in drop:
            blocks[l].forward = functools.partial(ref_lesioned_block, blocks[l])
        with torch.no_grad():
            expected = reference(x)
    finally:
        for l in drop:
            del blocks[l].forward
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert model.training and all(m.training for m in model.modules())
    expected_type = "Gated_torchvision_models_resnet_BasicBlock" if converted else "BasicBlock"
    assert {type(b).__name__ for b in blocks_of(model)} == {expected_type}
    if not converted:
        assert_no_sdepth_attributes(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_lesion_restores_on_exception():
    model = sd.cifar_resnet(20).train()
    classes = [type(b) for b in blocks_of(model)]
    with pytest.raises(KeyError), sd.lesion(model, drop=[0, 4]):
        assert get_state(model).lesioned == {0, 4}  # a plain model is converted for the duration
        raise KeyError("body failed")
    assert [type(b) for b in blocks_of(model)] == classes and model.training
    assert_no_sdepth_attributes(model)


@pytest.mark.parametrize("drop,error", [([-1], ValueError), ([9], ValueError), ([1.0], ValueError),
                                        (["a"], ValueError), ([True], ValueError), ([2, 2], ValueError),
                                        (3, TypeError)])
def test_lesion_rejects_bad_indices(drop, error):
    model = sd.cifar_resnet(20)
    with pytest.raises(error, match="drop"), sd.lesion(model, drop=drop):
        pass
    assert_no_sdepth_attributes(model)


# ============================================================================================================
# cifar_resnet and argument errors
# ============================================================================================================
def test_cifar_resnet_structure():
    model = sd.cifar_resnet(20, num_classes=7)
    blocks = blocks_of(model)
    assert len(blocks) == 9 and all(type(b) is BasicBlock for b in blocks)
    assert [b.conv1.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.downsample is not None for b in blocks] == [False, False, False, True, False, False] + [
        True, False, False]
    assert len(blocks_of(sd.cifar_resnet())) == 54
    torch.manual_seed(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("depth", [21, 2, 0, -4, 20.0, True])
def test_cifar_resnet_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        sd.cifar_resnet(depth)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"p_last": 1.5}, ValueError, "p_last"),
    ({"p_last": -0.1}, ValueError, "p_last"),
    ({"p_last": "0.5"}, TypeError, "p_last"),
    ({"rule": "cosine"}, ValueError, "rule.*linear.*uniform"),
    ({"mode": "sample"}, ValueError, "mode.*batch.*row"),
    ({"scaling": "sqrt"}, ValueError, "scaling.*paper.*inverted"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": "1"}, TypeError, "seed"),
])
def test_convert_rejects_bad_arguments(kwargs, error, name):
    model = sd.cifar_resnet(20)
    with pytest.raises(error, match=name):
        sd.convert(model, **kwargs)
    assert type(model.layer1[0]) is BasicBlock  # nothing was changed


def test_convert_rejects_models_without_blocks_and_custom_forwards():
    with pytest.raises(ValueError, match="model.*no residual units.*supported blocks.*BasicBlock"):
        sd.convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))

    class OwnForward(BasicBlock):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="overrides forward"):
        sd.convert(nn.Sequential(OwnForward(4, 4)))
    with pytest.raises(TypeError, match="model"):
        sd.convert("resnet18")


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_cuda_train_step_never_waits_for_the_device(mode):
    # The design's point: the plan is drawn on the host, so every sub-batch size is known without reading
    # anything back from the GPU. A synchronising call (.item(), nonzero, a blocking device->host copy)
    # inside the converted forward/backward raises under sync debug mode "error".
    model = sd.convert(sd.cifar_resnet(20), p_last=0.5, mode=mode, seed=0).cuda().train()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    F.cross_entropy(model(x), y).backward()  # warm-up: cuDNN/Triton autotuning and allocator growth
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert any(p.grad is not None for p in model.parameters())


# ============================================================================================================
# Inputs a user passes: NumPy scalars, meta-device construction, registration order, corrupt metadata
# ============================================================================================================
def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    model = sd.convert(sd.cifar_resnet(8), p_last=np.float32(0.5), seed=np.int64(3))
    assert sd.survival_probs(model) == sd.linear_decay(3, 0.5) and sd.get_scheduler(model).seed == 3
    for bad in (-1, 2**64, np.int64(-5)):
        with pytest.raises(ValueError, match="seed"):
            sd.convert(sd.cifar_resnet(8), seed=bad)


def test_convert_under_a_meta_default_device(torch_rng):
    with torch.device("meta"):
        model = sd.cifar_resnet(8)
        sd.convert(model)  # seed=None draws from torch's CPU generator, not on the default device
    assert sd.get_scheduler(model).seed >= 0
    assert next(model.parameters()).is_meta


class RunsInReverse(nn.Module):
    """Registers its blocks in one order and runs them in the other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.late = BasicBlock(4, 4)
        self.early = BasicBlock(4, 4)

    def forward(self, x):
        return self.late(self.early(torch.relu(self.stem(x))))


def test_units_are_numbered_in_forward_order():
    model = sd.convert(RunsInReverse(), p_last=0.2, seed=0)
    assert get_state(model).blocks[0] is model.late  # registration order until the model has run
    with pytest.warns(UserWarning, match="renumbered in forward order"):
        model.eval()(torch.randn(1, 3, 8, 8))
    blocks = get_state(model).blocks
    assert blocks[0] is model.early and model.early._sd_index == 0 and model.late._sd_index == 1
    assert sd.survival_probs(model) == sd.linear_decay(2, 0.2)  # the decay follows the forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 8, 8))  # once only


def test_corrupt_scheduler_metadata_warns_and_loads_the_weights():
    model = sd.convert(fresh_model("cifar_resnet20"), seed=1)
    state_dict = model.state_dict()
    state_dict._metadata[""]["sdepth_scheduler"] = {"version": 2, "seed": "abc", "step": 1}
    other = sd.convert(fresh_model("cifar_resnet20"), seed=2)
    with pytest.warns(UserWarning, match="not restored"):
        other.load_state_dict(state_dict, strict=True)
    assert sd.get_scheduler(other).seed == 2


def test_row_mode_sub_batches_keep_the_memory_layout():
    """A unit's survivors reach its branch in the batch's own layout (index_select alone returns row-major
    tensors: a channels_last batch would run its sub-batch convolutions as NCHW)."""
    from sdepth_ext.kernels.torch_epilogue import gather_rows

    x = torch.randn(6, 3, 5, 4).to(memory_format=torch.channels_last)
    rows = torch.tensor([0, 2, 5])
    gathered = gather_rows(x, rows)
    assert gathered.is_contiguous(memory_format=torch.channels_last) and torch.equal(gathered, x[rows])
    nhwc = torch.randn(6, 4, 5, 3).permute(0, 3, 1, 2)  # ConvNeXt's activations after its permutes
    assert gathered_strides_equal(gather_rows(nhwc, rows), nhwc) and torch.equal(gather_rows(nhwc, rows),
                                                                                 nhwc[rows])
    model = sd.convert(fresh_model("cifar_resnet20"), p_last=0.5, rule="uniform", mode="row", seed=0)
    model = model.to(memory_format=torch.channels_last).train()
    seen = []
    for block in blocks_of(model):
        block.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(make_input("cifar_resnet20", batch=8).to(memory_format=torch.channels_last))
    partial = [t for t in seen if 0 < t.shape[0] < 8]
    assert partial and all(t.is_contiguous(memory_format=torch.channels_last) for t in partial)


def gathered_strides_equal(a, b):
    return a.stride()[1:] == b.stride()[1:]
