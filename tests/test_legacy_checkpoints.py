"""Converted models pickled by sdepth_ext 0.2.0 before the layered-package redesign still load and continue.

tests/data/make_legacy_checkpoints.py wrote the files with the code of commit 4ffdfb0: a whole converted
model (``torch.save(model)``, which names our classes, hooks and the state object by their qualified names at
that time) and its ``state_dict`` (the scheduler state in its metadata), with what the model does next.
"""

from pathlib import Path

import pytest
import torch

import sdepth_ext as sd
from sdepth_ext.state import get_state

DATA = Path(__file__).parent / "data"
FILES = {"legacy_cifar8_batch.pt": None, "legacy_vit_row.pt": "timm"}


def _load(name):
    needs = FILES[name]
    if needs is not None:
        library = pytest.importorskip(needs)
    try:
        return torch.load(DATA / name, weights_only=False)
    except ModuleNotFoundError as err:
        # A whole-model pickle names the library's own classes too: an older release (make test-oldest's
        # timm 1.0.8) may not have the module they were pickled from. That is the library's pickle, not ours.
        if needs is None or not (err.name or "").startswith(needs + "."):
            raise
        pytest.skip(f"{name} pickles {needs} classes from {err.name}, which {needs} {library.__version__} "
                    "does not have")


@pytest.mark.parametrize("name", sorted(FILES))
def test_whole_model_pickle_loads_and_continues_its_stream(name):
    saved = _load(name)
    model, x, expected = saved["model"], saved["x"], saved["expected"]
    assert sd.survival_probs(model) == expected["survival"]
    assert sd.get_scheduler(model).state_dict() == expected["scheduler"]
    with torch.no_grad():
        # float32 defaults, not bit equality: the files were written on another CPU, and the convolution and
        # matmul kernels chosen for this one's ISA may sum in another order (seen: 5e-8 on logits of 0.24, a
        # few ulp). A model that loaded wrong weights or hooks is off by far more.
        torch.testing.assert_close(model.eval()(x), expected["eval"])
    model.train()
    for plan in expected["plans"]:  # the next training steps draw the plans the saved model would have
        model(x).float().sum().backward()
        drawn = get_state(model).host_plan
        assert list(drawn.counts) == plan["counts"]
        assert [drawn.survivors(l) for l in range(drawn.num_units)] == plan["survivors"]
    assert torch.jit.script(model.eval()) is not None  # the pickled script hooks still resolve
    sd.revert(model)
    assert not any(type(m).__name__.startswith("Gated_") for m in model.modules())


@pytest.mark.parametrize("name", sorted(FILES))
def test_legacy_state_dict_loads_strictly_with_its_scheduler_state(name):
    saved = _load(name)
    model = saved["model"]
    fresh_scheduler = sd.get_scheduler(model)
    fresh_scheduler.reseed(123, 0)  # a different stream, which the checkpoint's metadata must replace
    model.load_state_dict(saved["state_dict"], strict=True)
    assert sd.get_scheduler(model).state_dict() == saved["expected"]["scheduler"]
    sd.revert(model)
    model.load_state_dict(saved["state_dict"], strict=True)  # and into the plain model
