"""Drop schedules over training time (sd.drop_schedule, sd.set_drop_scale) and sd.compute_stats."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from scipy.stats import binomtest

import sdepth_ext as sd
from sdepth_ext.flops import unit_macs
from sdepth_ext.state import get_state


def test_schedule_values():
    assert [sd.drop_schedule("constant")(t) for t in (0, 9)] == [1.0, 1.0]
    assert sd.drop_schedule("constant", scale=0.25)(3) == 0.25
    warmup = sd.drop_schedule("warmup", steps=2000)
    assert [warmup(t) for t in (0, 500, 2000, 5000)] == [0.0, 0.25, 1.0, 1.0]
    pld = sd.drop_schedule("pld", gamma=0.001)
    assert pld(0) == 0.0 and pld(1000) == pytest.approx(1 - math.exp(-1.0))
    late = sd.drop_schedule("late", start=100)
    assert [late(t) for t in (0, 99, 100, 10**6)] == [0.0, 0.0, 1.0, 1.0]
    # PLD's keep probability theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar, theta_bar the configured p
    theta_bar, t = 0.5, 700
    assert 1 - pld(t) * (1 - theta_bar) == pytest.approx((1 - theta_bar) * math.exp(-0.001 * t) + theta_bar)
    assert repr(warmup) == "drop_schedule('warmup', steps=2000)"
    assert pickle.loads(pickle.dumps(pld))(1000) == pld(1000)


@pytest.mark.parametrize("kind,kwargs,match", [
    ("cosine", {}, "kind"), ("warmup", {}, "missing.*steps"), ("warmup", {"steps": 0}, "steps"),
    ("warmup", {"steps": 2.5}, "steps"), ("pld", {"gamma": -1}, "gamma"),
    ("pld", {"gamma": math.inf}, "gamma"),
    ("late", {"start": -1}, "start"), ("late", {"start": 5, "steps": 3}, "unknown.*steps"),
    ("constant", {"scale": 1.5}, "scale"),
])
def test_schedule_errors_name_the_argument(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd.drop_schedule(kind, **kwargs)


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="step"):
        sd.drop_schedule("warmup", steps=10)(-1)


def test_set_drop_scale_rates_and_errors():
    model = sd.convert(sd.cifar_resnet(8), p_last=0.2, seed=0)
    sd.set_drop_scale(model, 0.5)
    state = get_state(model)
    assert sd.survival_probs(model) == sd.linear_decay(3, 0.2)  # the configured rates do not change
    assert state.scaled_survival == pytest.approx([1 - 0.5 * (1 - p) for p in sd.linear_decay(3, 0.2)])
    sd.set_drop_scale(model, 0.0)
    assert state.scaled_survival == [1.0, 1.0, 1.0]
    sd.set_drop_scale(model, 1.0)
    assert state.scaled_survival == sd.linear_decay(3, 0.2)  # exactly, not 1 - 1 * (1 - p)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            sd.set_drop_scale(model, bad)
    with pytest.raises(TypeError, match="scale"):
        sd.set_drop_scale(model, "0.5")


SCHEDULES = [sd.drop_schedule("constant", scale=0.6), sd.drop_schedule("warmup", steps=8),
             sd.drop_schedule("pld", gamma=0.3), sd.drop_schedule("late", start=4)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_drop_rates_follow_the_schedule(schedule):
    """At each step, every unit's survivors ~ Binomial(N, p_l(s(step))): row mode with a large batch.

    30 tests per schedule: each at p > 1e-4 keeps the chance of a false alarm for a correct sampler at 0.3%
    (the seed is fixed, so the test is deterministic; a wrong rate of 0.01 is a 3-7 sigma error at N=4000).
    """
    survival = [0.9, 0.6, 0.3]
    scheduler = sd.Scheduler(survival, mode="row", seed=11)
    n = 4000
    for step in range(10):
        s = schedule(step)
        scheduler.set_drop_scale(s)
        plan = scheduler.sample(n)
        for l, p in enumerate(survival):
            expected = 1 - s * (1 - p)
            if expected == 1.0:
                assert plan.counts[l] == n
            else:
                result = binomtest(plan.counts[l], n, expected)
                assert result.pvalue > 1e-4, (step, l, plan.counts[l], expected)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resume_with_a_schedule_is_bit_exact(mode):
    schedule = sd.drop_schedule("warmup", steps=6)

    def run(model, steps, start=0):
        plans = []
        for step in range(start, start + steps):
            sd.set_drop_scale(model, schedule(step))
            model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)))
            plans.append(list(get_state(model).host_plan.counts))
        return plans

    model = sd.convert(sd.cifar_resnet(8), p_last=0.2, mode=mode, seed=5).train()
    straight = run(model, 10)
    first = sd.convert(sd.cifar_resnet(8), p_last=0.2, mode=mode, seed=5).train()
    run(first, 4)
    checkpoint = pickle.loads(pickle.dumps(first.state_dict()))
    assert checkpoint._metadata[""]["sdepth_scheduler"]["drop_scale"] == schedule(3)
    resumed = sd.convert(sd.cifar_resnet(8), p_last=0.2, mode=mode, seed=99).train()
    resumed.load_state_dict(checkpoint)
    assert sd.get_scheduler(resumed).drop_scale == schedule(3)
    assert run(resumed, 6, start=4) == straight[4:]


def test_inverted_scale_uses_the_rate_in_force():
    model = sd.convert(sd.cifar_resnet(8), p_last=0.5, rule="uniform", scaling="inverted", seed=0)
    state = get_state(model)
    assert state.train_scale(0) == 2.0
    sd.set_drop_scale(model, 0.5)
    assert state.train_scale(0) == pytest.approx(1 / 0.75)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_compute_stats_against_a_count_by_hand(mode):
    model = sd.convert(sd.cifar_resnet(20), p_last=0.5, mode=mode, seed=3).train()
    x = torch.randn(6, 3, 16, 16)
    per_unit, total = unit_macs(sd.cifar_resnet(20), x[:1])
    counts = []
    for _ in range(5):
        model(x)
        counts.append(list(get_state(model).host_plan.counts))
    stats = sd.compute_stats(model)
    branch = sum(per_unit)
    by_hand_last = sum(m * c / 6 for m, c in zip(per_unit, counts[-1])) / branch
    by_hand_all = sum(m * sum(c[l] for c in counts) / 30 for l, m in enumerate(per_unit)) / branch
    expected = sum(m * p for m, p in zip(per_unit, sd.linear_decay(9, 0.5))) / branch
    assert stats["steps"] == 5
    assert stats["last_step"] == pytest.approx(by_hand_last)
    assert stats["cumulative"] == pytest.approx(by_hand_all)
    assert stats["expected"] == pytest.approx(expected)
    assert stats["model_expected"] == pytest.approx(1 - (branch - expected * branch) / total)
    sd.compute_stats(model, reset=True)
    model(x)
    assert sd.compute_stats(model)["steps"] == 1


def test_compute_stats_before_any_step_needs_an_example():
    model = sd.convert(sd.cifar_resnet(8), seed=0)
    with pytest.raises(ValueError, match="example_input"):
        sd.compute_stats(model)
    stats = sd.compute_stats(model, example_input=torch.randn(2, 3, 8, 8))
    assert stats["steps"] == 0 and 0 < stats["expected"] < 1
