import math

import pytest

import sdepth_ext as sd
from sdepth_ext.rules import expected_depth


def test_linear_decay_exact_values():
    # p_l = 1 - (l / L) (1 - p_L), l = 1..L
    assert sd.linear_decay(4, 0.5) == [0.875, 0.75, 0.625, 0.5]
    assert sd.linear_decay(1, 0.2) == [0.2]
    assert sd.linear_decay(5, 0.0) == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0], abs=1e-15)
    assert sd.linear_decay(3, 1.0) == [1.0, 1.0, 1.0]


def test_linear_decay_default_is_half():
    probs = sd.linear_decay(54)
    assert probs[-1] == 0.5
    assert probs[0] == pytest.approx(1 - 0.5 / 54, abs=1e-15)


@pytest.mark.parametrize("L", [1, 3, 8, 16, 27, 54, 100])
def test_expected_depth_at_half(L):
    # The paper's (3L - 1) / 4 expected active blocks at p_L = 0.5: ResNet-110 (L=54) keeps ~40.25.
    assert expected_depth(sd.linear_decay(L, 0.5)) == pytest.approx((3 * L - 1) / 4, rel=1e-12)


def test_uniform():
    assert sd.uniform(3, 0.3) == [0.3, 0.3, 0.3]
    assert sd.uniform(2) == [0.5, 0.5]


@pytest.mark.parametrize("fn", [sd.linear_decay, sd.uniform])
@pytest.mark.parametrize("num_blocks", [0, -3])
def test_rejects_bad_num_blocks(fn, num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        fn(num_blocks, 0.5)


@pytest.mark.parametrize("fn", [sd.linear_decay, sd.uniform])
def test_rejects_non_int_num_blocks(fn):
    with pytest.raises(TypeError, match="num_blocks"):
        fn(3.0, 0.5)


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan, math.inf])
def test_rejects_bad_probabilities(p):
    with pytest.raises(ValueError, match="p_last"):
        sd.linear_decay(4, p)
    with pytest.raises(ValueError, match=r"\bp\b"):
        sd.uniform(4, p)


def test_rejects_non_numeric_probability():
    with pytest.raises(TypeError, match="p_last"):
        sd.linear_decay(4, "0.5")
