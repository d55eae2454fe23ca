"""``Scheduler.load_state_dict`` of state dicts without a ``"drop_scale"`` key: written before drop schedules
existed (format version 2 without the key, or no version at all) or by hand. A missing scale means 1.0 (the
configured rates), whatever the loading scheduler's scale was, and the scheduler then draws exactly what a
fresh one at that seed and step draws."""

from __future__ import annotations

import pytest

import sdepth_ext as sd

SURVIVAL = [1.0, 0.0, 0.5, 0.8]  # p = 0 and p = 1 units make a wrong scale show in every plan
BACKENDS = ["python", *(["cpp"] if sd.has_compiled_scheduler() else [])]
SEED, STEP = 9, 3


def key(plan):
    return plan.mode, plan.step, plan.active, plan.counts, plan.buffer.tolist()


def old_state_dicts(mode):
    full = sd.Scheduler(SURVIVAL, mode=mode, seed=SEED).state_dict()
    full["step"] = STEP
    without_scale = {k: v for k, v in full.items() if k != "drop_scale"}
    return {"version 2 without drop_scale": without_scale,
            "by hand": {"seed": SEED, "step": STEP}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "row", "subset"])
@pytest.mark.parametrize("prior_scale", [0.0, 0.3])
def test_a_state_dict_without_drop_scale_loads_scale_one(backend, mode, prior_scale):
    fresh = sd.Scheduler(SURVIVAL, mode=mode, seed=SEED, backend=backend)
    fresh.step = STEP
    expected = [key(fresh.sample(6)) for _ in range(3)]
    for name, state in old_state_dicts(mode).items():
        target = sd.Scheduler(SURVIVAL, mode=mode, seed=1, backend=backend)
        target.set_drop_scale(prior_scale)
        target.sample(6)
        target.load_state_dict(state)
        assert target.drop_scale == 1.0, name
        assert target.state_dict() == fresh.state_dict() | {"step": STEP}, name
        assert [key(target.sample(6)) for _ in range(3)] == expected, name


def test_a_model_loading_a_state_dict_without_drop_scale_trains_at_the_configured_rates():
    """The same through a converted model's scheduler, after a drop schedule set another scale."""
    model = sd.convert(sd.cifar_resnet(8), p_last=0.0, rule="uniform", seed=2)
    sd.set_drop_scale(model, 0.0)  # a "late" schedule before its start: nothing dropped
    sd.get_scheduler(model).load_state_dict({"seed": SEED, "step": STEP})
    plan = sd.get_scheduler(model).sample(2)
    assert plan.counts == [0, 0, 0]  # p = 0 at scale 1: every unit dropped
