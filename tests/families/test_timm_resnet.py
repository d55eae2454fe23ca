"""timm ResNet blocks (BasicBlock, Bottleneck with SE): shared-suite fixtures, and family specifics."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")

from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

import sdepth_ext as sd  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import FamilyCase, cached_maker, gated_add, image_input  # noqa: E402


def timm_resnet_reference(block, x, units):
    (rows, scale), = units

    def branch(t):
        if isinstance(block, BasicBlock):
            t = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(t)))))
            t = block.bn2(block.conv2(t))
        else:
            t = block.act1(block.bn1(block.conv1(t)))
            t = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(t)))))
            t = block.bn3(block.conv3(t))
        return t if block.se is None else block.se(t)

    shortcut = x if block.downsample is None else block.downsample(x)
    act = block.act3 if isinstance(block, Bottleneck) else block.act2
    return act(gated_add(shortcut, x, branch, rows, scale))


def small_resnet(bottleneck: bool):
    if bottleneck:  # squeeze-excitation inside the branch, as in seresnet*
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, drop_path_rate=0.3,
                      block_args={"attn_layer": "se"})
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, drop_path_rate=0.3)


CASES = [
    FamilyCase("timm_resnet_basic", cached_maker(lambda: small_resnet(False)), image_input(32),
               timm_resnet_reference, (BasicBlock,), own_rates=True, exact_row_mode=False),
    FamilyCase("timm_resnet_se_bottleneck", cached_maker(lambda: small_resnet(True)), image_input(32),
               timm_resnet_reference, (Bottleneck,), own_rates=True, exact_row_mode=False),
]


def test_timm_resnet_defaults_follow_drop_path_rate_and_scale_by_keep():
    model = timm.create_model("resnet18", drop_path_rate=0.2, num_classes=5)
    own = [0.0 if b.drop_path is None else b.drop_path.drop_prob for b in model.modules()
           if isinstance(b, BasicBlock)]
    sd.convert(model, seed=0)
    state = get_state(model)
    assert sd.survival_probs(model) == [1.0 - p for p in own] and own[-1] == pytest.approx(0.2)
    assert (state.mode, state.scaling) == ("row", "inverted")
    for b in model.modules():
        if isinstance(b, BasicBlock) and b.drop_path is not None:
            b.drop_path.scale_by_keep = False
    sd.convert(model, seed=0)
    assert get_state(model).scaling == "none"


def test_timm_resnet_without_drop_path_warns_that_nothing_drops():
    with pytest.warns(UserWarning, match="drop rates are all 0.*p_last"):
        sd.convert(timm.create_model("resnet18", num_classes=5), seed=0)


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_timm_resnet_family_converts(name):
    model = sd.convert(timm.create_model(name, drop_path_rate=0.1, num_classes=5), seed=0)
    assert len(sd.survival_probs(model)) == 16
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_other_timm_blocks_are_refused_naming_the_class():
    with pytest.raises(TypeError, match="InvertedResidual.*no adapter"):
        sd.convert(timm.create_model("efficientnet_b0", drop_path_rate=0.2))
