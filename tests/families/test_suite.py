"""One suite for every block family, parametrized over the cases the family test files provide.

For each case: eval with "inverted" scaling is bit-identical to the original; training with nothing
dropped equals the original with its drop probabilities at 0; batch and row mode equal the hand-written
reference for the gates the model drew (and, for per-sample-normalised families, row mode equals the
original's own masked forward with its mask set to those gates); a dropped unit runs nothing; state_dict
keys are unchanged and load strictly both ways; revert restores; lesion; checkpointing and compiled regions
give the eager gradients. A completeness test checks that every registered adapter has a case.
"""

from __future__ import annotations

import copy
import io
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdepth_ext as sd
from sdepth_ext.families import registered_adapters
from sdepth_ext.state import get_state

from . import test_tv_convnext, test_tv_maxvit, test_tv_mbconv, test_tv_resnet, test_tv_swin
from .common import (
    branch_modules,
    masked_original,
    masks_of,
    reference_forward,
    unit_gates,
)

CASES = [*test_tv_resnet.CASES, *test_tv_convnext.CASES, *test_tv_mbconv.CASES, *test_tv_swin.CASES,
         *test_tv_maxvit.CASES]
try:  # timm is optional: its families join the suite where it is installed
    import timm  # noqa: F401
except ImportError:
    HAS_TIMM = False
else:
    HAS_TIMM = True
    from . import test_timm_convnext, test_timm_resnet, test_timm_vit

    CASES += [*test_timm_resnet.CASES, *test_timm_convnext.CASES, *test_timm_vit.CASES]
try:  # so is transformers (>= 5.0; not in make test-oldest, whose torch it does not support)
    import transformers  # noqa: F401
except ImportError:
    HAS_HF = False
else:
    HAS_HF = True
    from . import test_hf_beit, test_hf_convnext, test_hf_dinov2, test_hf_swin

    CASES += [*test_hf_dinov2.CASES, *test_hf_convnext.CASES, *test_hf_swin.CASES, *test_hf_beit.CASES]
CASE_IDS = [c.name for c in CASES]


# Results stay bit-stable on a loaded 2-core machine with one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_adapter_has_a_case():
    covered = {t for case in CASES for t in case.block_types}
    libraries = ("torchvision",) + (("timm",) if HAS_TIMM else ()) + (("transformers",) if HAS_HF else ())
    missing = [f"{cls.__module__}.{cls.__qualname__}" for cls in registered_adapters() if cls not in covered
               and cls.__module__.startswith(libraries)]
    assert not missing, f"adapters without a test case: {missing}"
    for case in CASES:  # and each case's model really holds the classes it claims
        found = {type(m) for m in case.make().modules()}
        assert set(case.block_types) <= found, case.name


def convert_case(case, **kwargs):
    kwargs.setdefault("seed", 0)
    if not case.own_rates:
        kwargs.setdefault("scaling", "inverted")
    return sd.convert(case.make(), **kwargs)


def set_own_drop_to_zero(model):
    from torchvision.ops import StochasticDepth

    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.p = 0.0
        elif type(m).__name__.endswith("DropPath"):  # timm's, and each Hugging Face model's own
            m.drop_prob = 0.0
    return model


def param_grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def assert_grads(got: nn.Module, want: nn.Module, exact: bool = False):
    """Gradients equal. Where the reference never ran a dropped branch (no gradient), the converted model's
    default dropped-gradient policy ("zero") gave exact zeros; where the reference multiplied it by a zero
    gate, both are zeros."""
    expected = param_grads(want)
    state = get_state(got)
    in_units = {id(p) for l in range(len(state.units)) for p in state.unit_parameters(l)}
    for name, param in got.named_parameters():
        grad = param.grad
        if expected[name] is None and grad is None and id(param) not in in_units:
            continue  # outside every unit and used by neither model (HF Dinov2's mask_token)
        if expected[name] is None:
            assert grad is not None and not grad.any(), name
        elif exact:
            assert grad is not None and torch.equal(grad, expected[name]), name
        else:
            assert grad is not None, name
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_matches(converted: nn.Module, plain: nn.Module, out: torch.Tensor, expected: torch.Tensor,
                   exact: bool = False, atol: float = 1e-5):
    """``out`` (of ``converted``) equals ``expected`` (of ``plain``): bit for bit if ``exact``, else to
    rtol 1e-5 and ``atol``; then both backpropagate ``square().sum()`` and the gradients compare as
    :func:`assert_grads` says."""
    if exact:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=atol)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_grads(converted, plain, exact=exact)


# ------------------------------------------------------------------------------------------------------------
# Eval and "nothing dropped"
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eval_inverted_is_bit_identical(case):
    plain = case.make().eval()
    converted = convert_case(case, scaling="inverted").eval()
    x = case.input(case.batch, 1)
    with torch.no_grad():
        assert torch.equal(converted(x), plain(x))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eval_paper_scales_each_residual_by_its_survival(case):
    plain = case.make().eval()
    converted = convert_case(case, p_last=0.5, scaling="paper").eval()
    x = case.input(case.batch, 2)
    with torch.no_grad():
        got = converted(x)
        gates = [(None, p) for p in sd.survival_probs(converted)]
        expected = reference_forward(case, converted, plain, x, gates)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_nothing_dropped_equals_the_original_at_drop_zero(case):
    plain = set_own_drop_to_zero(case.make()).train()
    converted = convert_case(case, p_last=1.0, scaling="inverted").train()
    x = case.input(case.batch, 3)
    assert_matches(converted, plain, converted(x), plain(x), exact=True)


# ------------------------------------------------------------------------------------------------------------
# Training against the references
# ------------------------------------------------------------------------------------------------------------
def drawn_gates(case, mode, seed_offset=0):
    """A converted model and a seed whose first plan drops a unit, keeps another (row: some samples)."""
    probe = convert_case(case, p_last=0.5, rule="uniform", mode=mode)
    survival = sd.survival_probs(probe)
    from tests.conftest import drops_some_keeps_some, seed_where

    seed = seed_where(drops_some_keeps_some, survival, mode, case.batch) + seed_offset
    return seed


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_matches_the_reference(case, mode, scaling):
    seed = drawn_gates(case, mode)
    converted = convert_case(case, p_last=0.5, rule="uniform", mode=mode, scaling=scaling, seed=seed).train()
    plain = case.make().train()
    x = case.input(case.batch, 4)
    out = converted(x)
    gates = unit_gates(converted, get_state(converted).host_plan)
    assert any(rows == [] for rows, _ in gates) and any(rows != [] for rows, _ in gates)
    assert_matches(converted, plain, out, reference_forward(case, converted, plain, x, gates))


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_subset_mode_keeps_a_fixed_count_and_matches_the_reference(case, scaling):
    """Each unit runs on exactly max(int(N p_l), 1) samples; "inverted" scales their residual by N / kept.
    The plan state rides in the state_dict: a model loading it draws the same next plan."""
    converted = convert_case(case, p_last=0.5, mode="subset", scaling=scaling, seed=3).train()
    plain = case.make().train()
    n = case.batch
    x = case.input(n, 4)
    out = converted(x)
    plan = get_state(converted).host_plan
    gates = []
    for l, p in enumerate(sd.survival_probs(converted)):
        kept = max(int(n * p), 1)
        assert plan.counts[l] == kept, l
        rows = plan.rows(l)
        gates.append((None if rows is None else rows.tolist(), n / kept if scaling == "inverted" else 1.0))
    assert any(rows is not None for rows, _ in gates)  # some unit ran on a strict subset
    assert_matches(converted, plain, out, reference_forward(case, converted, plain, x, gates))
    resumed = convert_case(case, p_last=0.5, mode="subset", scaling=scaling, seed=99).train()
    resumed.load_state_dict(converted.state_dict())
    converted(x), resumed(x)
    assert get_state(resumed).host_plan.counts == get_state(converted).host_plan.counts
    assert all(get_state(resumed).host_plan.survivors(l) == get_state(converted).host_plan.survivors(l)
               for l in range(len(gates)))


@pytest.mark.parametrize("case", [c for c in CASES if c.exact_row_mode], ids=lambda c: c.name)
def test_row_mode_equals_the_masked_original(case):
    """Per-sample normalisation: the branch on the survivors alone is the original's masked forward, outputs
    and gradients, for the same gates (fp32 to ~1e-6; sub-batch GEMMs may round differently)."""
    seed = drawn_gates(case, "row")
    converted = convert_case(case, mode="row", seed=seed).train()
    plain = case.make().train()
    x = case.input(case.batch, 5)
    out = converted(x)
    gates = unit_gates(converted, get_state(converted).host_plan)
    expected = masked_original(case, converted, plain, x, masks_of(gates, case.batch))
    assert_matches(converted, plain, out, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_dropped_unit_runs_nothing_of_its_branch(case, mode):
    seed = drawn_gates(case, mode)
    converted = convert_case(case, p_last=0.5, rule="uniform", mode=mode, seed=seed).train()
    calls: dict[int, int] = defaultdict(int)
    branches = branch_modules(converted)
    for modules in branches:
        for module in modules:
            for m in module.modules():
                m.register_forward_hook(lambda m, *_: calls.__setitem__(id(m), calls[id(m)] + 1))
    converted(case.input(case.batch, 6)).sum().backward()
    plan = get_state(converted).host_plan
    for l, modules in enumerate(branches):
        ran = any(calls[id(m)] for module in modules for m in module.modules())
        assert ran == (plan.counts[l] > 0), l
        if plan.counts[l] == 0:  # nothing ran, and the default policy gave exact zero gradients
            params = get_state(converted).unit_parameters(l)
            assert all(p.grad is not None and not p.grad.any() for p in params), l


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, revert, lesion
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_keys_unchanged_and_strict_both_ways(case):
    plain = case.make()
    converted = convert_case(case)
    assert list(converted.state_dict()) == list(plain.state_dict())
    other = case.make()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    converted.load_state_dict(other.state_dict(), strict=True)
    plain.load_state_dict(converted.state_dict(), strict=True)
    for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    resumed = convert_case(case, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert sd.get_scheduler(resumed).state_dict() == sd.get_scheduler(converted).state_dict()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_revert_restores_the_original(case):
    plain = case.make().train()
    model = sd.revert(convert_case(case))
    for name, module in model.named_modules():
        assert not [k for k in vars(module) if k.startswith(("_sd", "sd_"))], name
        assert type(module).__module__ != "sdepth_ext.units", name
    set_own_drop_to_zero(plain)
    set_own_drop_to_zero(model)
    x = case.input(case.batch, 7)
    assert torch.equal(model.train()(x), plain(x))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lesion_removes_the_units_given(case):
    converted = convert_case(case, scaling="inverted")
    plain = case.make().eval()
    num_units = len(sd.survival_probs(converted))
    drop = sorted({0, num_units // 2, num_units - 1})
    x = case.input(case.batch, 8)
    with torch.no_grad(), sd.lesion(converted, drop):
        got = converted(x)
    gates = [([] if l in drop else None, 1.0) for l in range(num_units)]
    with torch.no_grad():
        expected = reference_forward(case, converted, plain, x, gates)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), sd.lesion(case.make(), drop) as lesioned_plain:  # a plain model works too
        torch.testing.assert_close(lesioned_plain(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Where users train: activation checkpointing, compiled regions, autocast, DDP's zero gradients
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_checkpoint_blocks_gives_the_eager_gradients(case):
    seed = drawn_gates(case, "row")
    model = convert_case(case, p_last=0.5, rule="uniform", mode="row", seed=seed).train()
    twin = copy.deepcopy(model)
    sd.checkpoint_blocks(model)
    x = case.input(case.batch, 9)
    for m in (model, twin):
        m(x).square().sum().backward()
    assert_grads(model, twin, exact=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compile_blocks_gives_the_eager_results(case):
    seed = drawn_gates(case, "batch")
    model = convert_case(case, p_last=0.5, rule="uniform", mode="batch", seed=seed).train()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    sd.compile_blocks(model, backend="aot_eager")
    x = case.input(case.batch, 10)
    outs = [m(x) for m in (model, twin)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for out in outs:
        out.square().sum().backward()
    assert_grads(model, twin)
    sd.revert(model)
    assert not any("_sd_regions" in vars(m) for m in model.modules())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bf16_autocast_at_p_last_1_matches_the_original(case):
    plain = set_own_drop_to_zero(case.make()).train()
    converted = convert_case(case, p_last=1.0, scaling="inverted").train()
    x = case.input(case.batch, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = converted(x), plain(x)
    # the converted unit casts the shortcut to the residual's dtype before the add: one rounding more
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * 2**-7, atol=2 * 2**-7)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zero_gradients_for_dropped_units(case):
    seed = drawn_gates(case, "batch")
    model = convert_case(case, p_last=0.5, rule="uniform", mode="batch", seed=seed).train()
    sd.set_dropped_grads(model, "zero")
    F.relu(model(case.input(case.batch, 12))).sum().backward()
    state = get_state(model)
    dropped = sd.dropped_blocks(model)
    assert dropped
    for l in dropped:
        assert all(p.grad is not None and not p.grad.any() for p in state.unit_parameters(l)), l
    assert sd.clear_dropped_grads(model) > 0
    assert all(p.grad is None for l in dropped for p in state.unit_parameters(l))
