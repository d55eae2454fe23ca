"""Row mode's pieces (sdepth_ext.rows, the torch path's epilogue Function) against plain references.

* SplitRows: forward ``(x, x[rows])``; backward ``grad_shortcut + scatter(grad_rows)`` in one pass, equal to
  what autograd gives through ``index_select`` (fresh random inputs; rows of several Triton programs and a
  tail; contiguous and channels_last; float64 gradcheck on both kernels).
* TorchEpilogue through GatedResidualAddFunction: bit for bit the torch path's values and autograd gradients,
  which keep the residual alive besides; differentiable twice.
* Regather: the same gradients with and without it; saved-tensor hooks of the user's see the unit's input
  where the branch saved its gathered rows; an in-place change of the input raises.
* A converted model on the GPU's path (Triton, interpreted) equals the torch path, row and batch mode.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import pytest
import torch

import sdepth_ext as sd
import sdepth_ext.functional as F
import sdepth_ext.rows as rows_module
import sdepth_ext.units as units_module
from sdepth_ext.functional import GatedResidualAddFunction, TorchEpilogue, keeps_output
from sdepth_ext.kernels.torch_epilogue import gated_residual_add_torch
from sdepth_ext.rows import SplitRows
from sdepth_ext.state import get_state, is_gated

CAN_RUN_TRITON_ON_CPU = (importlib.util.find_spec("triton") is not None
                         and os.environ.get("TRITON_INTERPRET") == "1")
needs_triton_cpu = pytest.mark.skipif(not CAN_RUN_TRITON_ON_CPU,
                                      reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1")
needs_regather = pytest.mark.skipif(
    not rows_module.REGATHER_SUPPORTED,
    reason="re-gathering in backward needs torch >= 2.8 (torch._C._autograd._top_saved_tensors_default_hooks)"
)


def kernels_of(name: str):
    if name == "triton":
        if not CAN_RUN_TRITON_ON_CPU:
            pytest.skip("Triton on CPU tensors needs triton and TRITON_INTERPRET=1")
        return F._kernels()
    return TorchEpilogue


def plan_rows(n: int, survivors: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    plan = sd.Plan.from_survivors("row", n, [survivors])
    return plan.rows(0), plan.slot(0)


@pytest.fixture(autouse=True)
def torch_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ============================================================================================================
# SplitRows
# ============================================================================================================
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_split_rows_backward_is_the_index_select_gradient(kernels, layout):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    # 3 * 33 * 63 = 6237 elements per sample: four fp32 programs of 2048 per row, the last one a tail
    x = torch.randn(5, 3, 33, 63).to(memory_format=fmt).requires_grad_()
    rows, slot = plan_rows(5, [0, 2, 3])
    x_all, gathered = SplitRows.apply(x, rows, slot, kernels_of(kernels))
    assert torch.equal(x_all, x) and x_all.data_ptr() == x.data_ptr()
    assert torch.equal(gathered, x.detach()[rows]) and gathered.stride() == x[rows].contiguous(
        memory_format=fmt).stride()
    grad_all = torch.randn(5, 3, 33, 63).to(memory_format=fmt)
    grad_rows = torch.randn(3, 3, 33, 63).to(memory_format=fmt)
    (got,) = torch.autograd.grad((x_all, gathered), x, (grad_all, grad_rows))
    reference = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((reference * 1.0, reference.index_select(0, rows)), reference,
                                      (grad_all, grad_rows))
    assert torch.equal(got, expected)  # one addition per element either way: equal to the bit


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_split_rows_gradcheck(kernels):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    rows, slot = plan_rows(4, [1, 3])
    k = kernels_of(kernels)
    assert torch.autograd.gradcheck(lambda t: SplitRows.apply(t, rows, slot, k), (x,))


def test_split_rows_is_differentiable_twice():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rows, slot = plan_rows(4, [0, 3])
    assert torch.autograd.gradgradcheck(lambda t: SplitRows.apply(t, rows, slot, TorchEpilogue), (x,))


# ============================================================================================================
# The torch path's epilogue Function
# ============================================================================================================
def _residual_in(layout: str, k: int) -> torch.Tensor:
    if layout == "nhwc_permuted":  # ConvNeXt's branch ends in a permute: NHWC memory, NCHW shape
        return torch.randn(k, 5, 4, 6).permute(0, 3, 1, 2)
    t = torch.randn(k, 6, 5, 4)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc_permuted"])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("relu", [False, True])
def test_torch_epilogue_equals_the_torch_path_bit_for_bit(relu, scale, layout):
    torch.manual_seed(2)
    shortcut = torch.randn(7, 6, 5, 4)
    if layout == "channels_last":
        shortcut = shortcut.to(memory_format=torch.channels_last)
    rows, slot = plan_rows(7, [0, 1, 4, 6])
    residual = _residual_in(layout, 4)
    grad = torch.randn(7, 6, 5, 4)
    a = (shortcut.clone().requires_grad_(), residual.detach().clone().requires_grad_())
    b = (shortcut.clone().requires_grad_(), residual.detach().clone().requires_grad_())
    got = GatedResidualAddFunction.apply(*a, scale, rows, slot, relu, TorchEpilogue)
    expected = gated_residual_add_torch(*b, scale, rows, relu)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    # what it keeps for backward: the output (ReLU) and the rows, never the residual
    saved = {t.untyped_storage().data_ptr() for t in got.grad_fn.saved_tensors}
    kept = {got.untyped_storage().data_ptr()} if relu else set()
    assert saved == kept | {rows.untyped_storage().data_ptr()}
    got_grads = torch.autograd.grad(got, a, grad)
    expected_grads = torch.autograd.grad(expected, b, grad)
    assert all(torch.equal(g, e) for g, e in zip(got_grads, expected_grads))


@pytest.mark.parametrize("relu", [False, True])
def test_torch_epilogue_gradcheck_and_gradgradcheck(relu):
    torch.manual_seed(3)
    shortcut = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    rows, slot = plan_rows(5, [1, 4])

    def fn(s, r):
        return GatedResidualAddFunction.apply(s, r, 0.37, rows, slot, relu, TorchEpilogue)

    assert torch.autograd.gradcheck(fn, (shortcut, residual))
    assert torch.autograd.gradgradcheck(fn, (shortcut, residual))


def test_keeps_output():
    leaf = torch.randn(4, 3, requires_grad=True)
    assert keeps_output(torch.relu(leaf * 2).grad_fn) and keeps_output((leaf * 2).relu_().grad_fn)
    assert not keeps_output((leaf * 2).grad_fn) and not keeps_output(None)
    rows, slot = plan_rows(4, [0, 2])
    residual = torch.randn(2, 3, requires_grad=True)
    for relu in (False, True):
        out = GatedResidualAddFunction.apply(leaf * 1.0, residual, 1.0, rows, slot, relu, TorchEpilogue)
        assert keeps_output(out.grad_fn) is relu


# ============================================================================================================
# Regather, on a converted ResNet's GPU path
# ============================================================================================================
def resnet_row_model(seed=3):
    torch.manual_seed(0)
    model = sd.convert(sd.cifar_resnet(8), p_last=0.5, rule="uniform", mode="row", seed=seed).train()
    return model, torch.randn(4, 3, 8, 8)


def step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@needs_triton_cpu
@needs_regather
def test_regather_changes_no_value_and_no_gradient(monkeypatch):
    model, x = resnet_row_model()
    twin = copy.deepcopy(model)
    with F.gpu_path_on_cpu():
        out, grads = step(model, x)
        assert any(0 < c < 4 for c in get_state(model).host_plan.counts)
        monkeypatch.setattr(units_module, "can_regather", lambda: False)
        twin_out, twin_grads = step(twin, x)
    assert torch.equal(out, twin_out) and all(torch.equal(a, b) for a, b in zip(grads, twin_grads))
    assert None not in grads  # row mode: every unit ran on some samples


@needs_triton_cpu
@needs_regather
def test_regather_composes_with_the_users_saved_tensor_hooks():
    """An outer saved_tensors_hooks (offloading, a counter) packs every save of the branch as before, and the
    unit's input where the branch saved its gathered rows: it never sees those rows."""
    model, x = resnet_row_model()
    twin = copy.deepcopy(model)
    gathered, packed = [], []
    for block in model.modules():
        if hasattr(block, "conv1") and is_gated(block):
            block.conv1.register_forward_pre_hook(lambda m, args: gathered.append(args[0]))

    def pack(t):
        packed.append(t)
        return ("boxed", t.clone())

    with F.gpu_path_on_cpu():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box[1]):
            out = model(x)
        out.square().sum().backward()
        twin_out, twin_grads = step(twin, x)
    partial = [g for g in gathered if 0 < g.shape[0] < 4]
    assert partial, "the plan must split some unit's rows"
    seen = {t.untyped_storage().data_ptr() for t in packed}
    assert not seen & {g.untyped_storage().data_ptr() for g in partial}
    assert torch.equal(out.detach(), twin_out)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), twin_grads))


@needs_triton_cpu
@needs_regather
def test_which_units_gather_their_rows_again():
    """Exactly the units whose input is kept anyway gather their branch's rows again in backward: the first
    (its input is the stem ReLU's output) and those with a projection shortcut (a convolution keeps its
    input). A unit after a row-mode ReLU unit keeps the gathered rows: that epilogue keeps its mask's bits,
    not its output, which is then freed."""
    from tests.conftest import seed_where

    torch.manual_seed(0)
    survival = [0.5] * 6  # cifar_resnet(14): three stages of two blocks
    seed = seed_where(lambda plan: all(0 < c < 4 for c in plan.counts), survival, "row", 4)
    model = sd.convert(sd.cifar_resnet(14), p_last=0.5, rule="uniform", mode="row", seed=seed).train()
    gathered = []
    for block in model.modules():
        if is_gated(block):
            block.conv1.register_forward_pre_hook(lambda m, args: gathered.append(args[0]))
    packed = []
    with F.gpu_path_on_cpu():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = model(torch.randn(4, 3, 8, 8))
        out.sum().backward()
    assert all(0 < c < 4 for c in get_state(model).host_plan.counts)
    seen = {t.untyped_storage().data_ptr() for t in packed}
    kept = [g.untyped_storage().data_ptr() in seen for g in gathered]
    projection = [block.downsample is not None for block, _ in get_state(model).units]
    assert kept == [not (unit == 0 or projection[unit]) for unit in range(6)]
    assert kept == [False, True, False, True, False, True]


@needs_triton_cpu
@needs_regather
def test_regather_refuses_an_input_changed_in_place():
    model, x = resnet_row_model()
    inputs = []
    for block in model.modules():
        if is_gated(block):
            block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with F.gpu_path_on_cpu():
        out = model(x)
        counts = get_state(model).host_plan.counts
        changed = next(t for t, c in zip(inputs, counts) if 0 < c < 4)
        with torch.no_grad():
            changed.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


# ============================================================================================================
# A converted model: the GPU's path (Triton, interpreted) equals the torch path
# ============================================================================================================
def small_vit():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, drop_path_rate=0.5)


@needs_triton_cpu
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_gpu_path_equals_the_torch_path(family, mode):
    torch.manual_seed(0)
    if family == "resnet":
        model = sd.convert(sd.cifar_resnet(8), p_last=0.5, rule="uniform", mode=mode, seed=3)
        x = torch.randn(4, 3, 8, 8)
    else:
        model = sd.convert(small_vit(), mode=mode, seed=3)
        x = torch.randn(4, 3, 16, 16)
    model.train()
    twin = copy.deepcopy(model)
    with F.gpu_path_on_cpu():
        out, grads = step(model, x)
    twin_out, twin_grads = step(twin, x)
    assert get_state(model).host_plan.counts == get_state(twin).host_plan.counts
    # fp32; the Triton kernels add in fp32 as the torch ops do, but the branch's own ops may reorder sums
    torch.testing.assert_close(out, twin_out, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, twin_grads):
        assert (g is None) == (t is None)  # batch mode: a dropped unit's branch gets none on both paths
        if g is not None:
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-5)


@needs_triton_cpu
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_a_gradient_penalty_through_a_converted_model_on_the_gpu_path(mode):
    """Double backward (``create_graph=True``, a gradient penalty on the input) through the units' Triton
    epilogues, dropped units (batch mode) and split rows (row mode: the ReLU masks kept as bits) included:
    the gradients of the torch path (the CPU's) on the same plan. float64, whose Triton kernels keep about 48
    of the 53 mantissa bits of the scale product, hence a tolerance of 1e-12, not 0."""
    torch.manual_seed(0)
    model = sd.convert(sd.cifar_resnet(8), p_last=0.5, rule="uniform", mode=mode, seed=3).train().double()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = []
    for net, gpu_path in ((model, True), (twin, False)):
        image = x.clone().requires_grad_()
        with F.gpu_path_on_cpu() if gpu_path else contextlib.nullcontext():
            loss = net(image).logsumexp(1).sum()
            (grad,) = torch.autograd.grad(loss, image, create_graph=True)
            (loss + grad.pow(2).sum()).backward()
        grads.append([image.grad, *(p.grad for p in net.parameters())])
    counts = get_state(model).host_plan.counts
    assert 0 in counts if mode == "batch" else any(0 < c < 4 for c in counts)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
