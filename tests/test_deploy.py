"""sd.prune, sd.recalibrate_bn, sd.depth_frontier: deploying a trained model with units removed."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import sdepth_ext as sd
from tests.families import test_tv_convnext, test_tv_mbconv, test_tv_resnet, test_tv_swin

MODELS = {
    "cifar_resnet20": (lambda: sd.cifar_resnet(20, num_classes=5), 16),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 32),
    "resnet_custom": (test_tv_resnet.custom_model, 16),
    "convnext": (test_tv_convnext.small_convnext, 32),
    "efficientnet": (test_tv_mbconv.small_efficientnet, 32),
    "swin": (test_tv_swin.small_swin, 32),
    "swin_v2": (lambda: test_tv_swin.small_swin(v2=True), 32),
}
try:
    from tests.families import test_timm_vit
except Exception:  # noqa: BLE001 - timm not installed: its model is not covered here
    pass
else:
    MODELS["timm_vit"] = (test_timm_vit.small_vit, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(name, **convert_kwargs):
    """A converted model whose BatchNorm statistics are not the identity (as after training)."""
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = sd.convert(make(), seed=0, **convert_kwargs)
    model.train()
    with torch.no_grad():
        for step in range(3):
            model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(step)))
    return model.eval(), size


def drops(num_units):
    return [[], [0], [num_units - 1], sorted({1, num_units // 2, num_units - 1})]


def original_classes(model):
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_equals_lesion(name, scaling):
    model, size = trained_like(name, p_last=0.5, scaling=scaling)
    before = copy.deepcopy(model.state_dict())
    classes = {type(m) for m in sd.revert(copy.deepcopy(model)).modules()}
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(9))
    for drop in drops(len(sd.survival_probs(model))):
        pruned = sd.prune(model, drop)
        with torch.no_grad(), sd.lesion(model, drop):
            expected = model(x)
        with torch.no_grad():
            got = pruned(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name} drop={drop}")
        for module_name, module in pruned.named_modules():
            cls = type(module)
            assert cls in classes or cls.__module__.startswith(("torch.", "torchvision.", "timm.")), \
                (module_name, cls)
            assert not [k for k in vars(module) if k.startswith(("_sd", "sd_"))], module_name
            assert not module._forward_pre_hooks and not module._forward_hooks, module_name
    # the given model is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    assert sd.survival_probs(model)


def test_prune_of_nothing_is_the_converted_eval_model():
    model, size = trained_like("resnet_custom", p_last=0.5, scaling="paper")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(sd.prune(model, [])(x), model(x), rtol=1e-6, atol=1e-6)


def test_removed_units_are_plain_modules():
    model, _ = trained_like("resnet_custom", p_last=0.5)
    pruned = sd.prune(model, [0, 1])  # an identity block and a downsampling block
    assert isinstance(pruned[3], nn.Identity)
    assert isinstance(pruned[4], nn.Sequential) and isinstance(pruned[4][-1], nn.ReLU)
    assert pruned[4][0] is not model[4].downsample  # copies: the given model keeps its own
    swin, _ = trained_like("swin")
    half = sd.prune(swin, [0])  # the first block loses its attention unit, keeps its MLP
    block = half.features[1][0]
    assert isinstance(block, torch.fx.GraphModule) and not hasattr(block, "attn") and hasattr(block, "mlp")


def test_prune_exports_scripts_and_reloads():
    model, size = trained_like("cifar_resnet20", p_last=0.5)
    pruned = sd.prune(model, [2, 5])
    x = torch.randn(2, 3, size, size)
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), pruned(x))
    scripted = torch.jit.script(pruned)
    torch.testing.assert_close(scripted(x), pruned(x))
    twin = sd.prune(sd.convert(sd.cifar_resnet(20, num_classes=5), seed=1), [2, 5])
    twin.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(twin(x), pruned(x))
    swin, _ = trained_like("swin")
    torch.export.export(sd.prune(swin, [0, 3]), (torch.randn(1, 3, 32, 32),))


def test_prune_of_a_plain_model():
    torch.manual_seed(0)
    plain = sd.cifar_resnet(20, num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), sd.lesion(plain, [1, 4]):
        expected = plain(x)
    torch.testing.assert_close(sd.prune(plain, [1, 4])(x), expected)


def test_paper_scaling_that_cannot_fold_is_multiplied_in_the_generated_forward():
    """EfficientNetV2's FusedMBConv with expand ratio 1 ends in its SiLU: no scale folds through it, so the
    pruned block is a generated forward that multiplies its residual by p_l; still plain torch, and equal to
    the converted eval model (and to its TorchScript)."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig

    torch.manual_seed(0)
    model = EfficientNet([FusedMBConvConfig(1, 3, 1, 16, 16, 2)], dropout=0.0, stochastic_depth_prob=0.5)
    sd.convert(model, p_last=0.5, scaling="paper", seed=0).eval()
    x = torch.randn(2, 3, 16, 16)
    pruned = sd.prune(model, [])
    assert not any(type(m).__module__.startswith("sdepth_ext") for m in pruned.modules())
    assert any(isinstance(m, torch.fx.GraphModule) for m in pruned.modules())
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-6)
    sd.convert(model, p_last=0.5, scaling="inverted", seed=0)
    assert sd.prune(model, [0])  # nothing to fold with inverted scaling


@pytest.mark.parametrize("drop,error", [([-1], ValueError), ([99], ValueError), ([1, 1], ValueError),
                                        ([0.5], ValueError), (3, TypeError)])
def test_prune_rejects_bad_indices(drop, error):
    model, _ = trained_like("cifar_resnet20")
    with pytest.raises(error, match="drop"):
        sd.prune(model, drop)


# ------------------------------------------------------------------------------------------------------------
# recalibrate_bn
# ------------------------------------------------------------------------------------------------------------
def test_recalibrate_bn_changes_only_batchnorm_buffers_and_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).train()
    batches = [torch.randn(5, 3, 8, 8) for _ in range(3)]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd.recalibrate_bn(model, [(b, None) for b in batches])
    assert model.training and model[1].momentum == 0.1  # flags and momentum restored
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 3
    sd.recalibrate_bn(model, batches, num_batches=1)
    torch.testing.assert_close(model[1].running_mean, features[0].mean(dim=(0, 2, 3)))


def test_recalibrate_bn_runs_every_unit_of_a_converted_model():
    model = sd.convert(sd.cifar_resnet(8), p_last=0.0, rule="uniform", seed=0).train()  # training drops all
    before = model.layer3[0].bn1.running_mean.clone()
    sd.recalibrate_bn(model, [torch.randn(4, 3, 16, 16)])
    assert not torch.equal(model.layer3[0].bn1.running_mean, before)  # the unit ran: it was not dropped


def test_recalibrate_bn_errors():
    with pytest.raises(ValueError, match="BatchNorm"):
        sd.recalibrate_bn(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="num_batches"):
        sd.recalibrate_bn(sd.cifar_resnet(8), [torch.randn(1, 3, 8, 8)], num_batches=0)
    with pytest.raises(ValueError, match="batches"):
        sd.recalibrate_bn(sd.cifar_resnet(8), [])


# ------------------------------------------------------------------------------------------------------------
# depth_frontier
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remeasure", [False, True])
def test_depth_frontier_rows(remeasure):
    model, size = trained_like("cifar_resnet20", p_last=0.5)
    g = torch.Generator().manual_seed(3)
    test = [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 5, (8,), generator=g))]
    train = [torch.randn(8, 3, size, size, generator=g) for _ in range(2)]
    rows = sd.depth_frontier(model, test, max_drop=3, recalibrate=train, remeasure=remeasure,
                             latency_repeat=2)
    assert [r["k"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dropped"] == [] and rows[0]["macs_ratio"] == 1.0
    assert all(len(r["dropped"]) == r["k"] for r in rows)
    assert all(set(a["dropped"]) <= set(b["dropped"]) for a, b in zip(rows, rows[1:]))  # nested deletions
    assert all(b["macs"] < a["macs"] for a, b in zip(rows, rows[1:]))
    assert all(0 <= r["error"] <= 1 and 0 <= r["error_recalibrated"] <= 1 for r in rows)
    with torch.no_grad():  # k = 0 is the model itself
        expected = (model(test[0][0]).argmax(1) != test[0][1]).float().mean().item()
    assert rows[0]["error"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="max_drop"):
        sd.depth_frontier(model, test, max_drop=99)
