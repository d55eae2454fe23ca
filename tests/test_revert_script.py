"""``sd.revert`` takes back every ``__prepare_scriptable__`` hook ``convert`` installed (on the root and on
every module above a converted block), so that ``torch.jit.script`` of a reverted model scripts the model
itself, sharing its parameter storage, as for a model that was never converted, instead of a plain copy."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sdepth_ext as sd

HOOK = "__prepare_scriptable__"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


class Wrapper(nn.Module):
    """Converted blocks three levels down (``body.1.layer1.0``, ...)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), sd.cifar_resnet(8, num_classes=5))

    def forward(self, x):
        return self.body(x)


def hooked(model):
    return [name for name, m in model.named_modules() if HOOK in m.__dict__]


def storages(module):
    return {name: p.untyped_storage().data_ptr() for name, p in module.named_parameters()}


@pytest.mark.parametrize("make", [lambda: sd.cifar_resnet(8, num_classes=5), Wrapper],
                         ids=["cifar_resnet8", "nested"])
def test_revert_removes_every_script_hook_and_script_shares_the_parameters(make):
    model = make()
    plain = hooked(model)  # torchvision's modules answer nothing themselves
    sd.convert(model, p_last=0.5, seed=0)
    assert len(hooked(model)) - len(plain) >= 4  # the root and every module above a block
    sd.revert(model)
    assert hooked(model) == plain
    model.eval()
    modules, before = list(model.modules()), storages(model)
    scripted = torch.jit.script(model)
    # The model itself, not a copy; and the model keeps its own submodules (TorchScript writes what a
    # child's hook returns into its parent: a hook left on a stage would swap the stage for a copy)
    assert storages(scripted) == before == storages(model)
    assert all(a is b for a, b in zip(model.modules(), modules, strict=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        next(model.parameters()).mul_(2.0)  # an edit of the model shows in its scripted form
        torch.testing.assert_close(scripted(x), model(x))
