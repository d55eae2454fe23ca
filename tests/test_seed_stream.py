"""``sd.convert(model)`` with ``seed=None`` leaves torch's global random stream where it was, and stays
reproducible under ``torch.manual_seed`` (docs/semantics.md, "Plans and randomness").

The seed is derived from the default generator's state without drawing from it: a seeded pipeline draws
the same data order, augmentation and dropout whether or not its model was converted (torchvision's own
model tests, run on converted models, compare outputs of a model built after ``torch.manual_seed`` with
inputs drawn after building it).
"""

from __future__ import annotations

import pytest
import torch

import sdepth_ext as sd

BATCH = 4


@pytest.fixture(autouse=True)
def _restore(restore_rng_state):
    yield


def build():
    return sd.cifar_resnet(8, num_classes=5)


def plans(model, steps=4):
    """The dropped units (batch mode: the whole plan) of ``steps`` training forwards."""
    model.train()
    x = torch.zeros(BATCH, 3, 8, 8)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            out.append(sd.dropped_blocks(model))
    return out


def test_convert_leaves_the_global_stream_where_it_was():
    torch.manual_seed(0)
    build()
    expected = torch.rand(8)  # what a seeded pipeline draws next without stochastic depth
    torch.manual_seed(0)
    model = build()
    state = torch.random.get_rng_state()
    sd.convert(model, p_last=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(torch.rand(8), expected)


def test_a_converted_model_sees_the_inputs_the_plain_one_saw():
    """torchvision's model-test pattern: seed, build, draw an input; the converted model in eval (inverted
    scaling: the plain network) gives the plain model's output bit for bit on the input drawn after it."""
    torch.manual_seed(1)
    plain = build().eval()
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    converted = sd.convert(build(), scaling="inverted").eval()
    y = torch.randn(2, 3, 8, 8)
    assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(converted(y), plain(x))


def test_the_same_manual_seed_gives_the_same_gates():
    torch.manual_seed(3)
    first = sd.convert(build(), p_last=0.5, rule="uniform")
    torch.manual_seed(3)
    again = sd.convert(build(), p_last=0.5, rule="uniform")
    torch.manual_seed(4)
    other = sd.convert(build(), p_last=0.5, rule="uniform")
    assert sd.get_scheduler(first).seed == sd.get_scheduler(again).seed != sd.get_scheduler(other).seed
    assert plans(first) == plans(again)


def test_a_model_built_after_another_gets_its_own_seed():
    """Building the second model drew its initial weights from the generator: a new state, a new seed."""
    torch.manual_seed(5)
    first = sd.convert(build(), p_last=0.5)
    second = sd.convert(build(), p_last=0.5)
    assert sd.get_scheduler(first).seed != sd.get_scheduler(second).seed
