import copy
import math
import pickle
import threading

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

import sdepth_ext as sd
from sdepth_ext.gates import mix64
from sdepth_ext.plan import round_plan_rows, shard_plan

BACKENDS = ["python"] + (["cpp"] if sd.has_compiled_scheduler() else [])
RESNET110 = sd.linear_decay(54, 0.5)


def plans_equal(a: sd.Plan, b: sd.Plan) -> bool:
    if (a.mode, a.batch_size, a.active, a.counts) != (b.mode, b.batch_size, b.active, b.counts):
        return False
    return all(a.survivors(l) == b.survivors(l) for l in range(a.num_units))


# -- the gate function itself ---------------------------------------------------------------------------
G = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def mix64_by_hand(z):
    """SplitMix64's output function, written out again independently of the library."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform_by_hand(seed, step, unit, sample):
    """The 32-bit uniform of (seed, step, unit, sample) as csrc/scheduler.h defines it."""
    step_key = mix64_by_hand(seed + (step + 1) * G)
    unit_key = mix64_by_hand(step_key + (unit + 1) * G)
    word = mix64_by_hand(unit_key + (sample // 2 + 1) * G)
    return word >> 32 if sample % 2 else word & 0xFFFFFFFF


def test_splitmix64_known_answer():
    # SplitMix64 from state 0 yields 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (the published reference
    # sequence): its output function applied to G and 2G.
    assert [mix64(G), mix64(2 * G)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert mix64_by_hand(G) == mix64(G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_gate_threshold_is_exact(backend, mode):
    """u < ceil(p 2^32): p = u / 2^32 must drop the sample whose uniform is u, p = (u + 1) / 2^32 keep it
    (a `<=` comparison, or a rounding of p, passes every random test and fails this one)."""
    seed = 2024
    u = uniform_by_hand(seed, 0, 0, 0)
    for p, kept in ((u / 2**32, False), ((u + 1) / 2**32, True)):
        plan = sd.Scheduler([p], mode=mode, seed=seed, backend=backend).sample(1)
        assert plan.counts == [1 if kept else 0], (p, u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_gates_match_the_definition(backend):
    seed, survival = 77, [0.3, 0.5, 0.9]
    sched = sd.Scheduler(survival, mode="row", seed=seed, backend=backend)
    for step in range(4):
        plan = sched.sample(9)
        for unit, p in enumerate(survival):
            threshold = math.ceil(p * 2**32)
            expected = [g for g in range(9) if uniform_by_hand(seed, step, unit, g) < threshold]
            assert plan.survivors(unit) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 3)])
def test_subset_gates_match_the_definition(backend, rank, world_size):
    """Each unit keeps exactly K = max(int(N p), 1) samples: the K with the smallest keys (u << 32) | i, u the
    uniform of the sample's global index (csrc/scheduler.h), listed in index order."""
    seed, survival = 78, [0.0, 0.3, 0.5, 0.9, 1.0]
    sched = sd.Scheduler(survival, mode="subset", seed=seed, backend=backend)
    for step, n in enumerate([9, 9, 4, 1, 16]):
        plan = sched.sample(n, rank=rank, world_size=world_size)
        for unit, p in enumerate(survival):
            count = min(n, max(int(n * p), 1))
            keys = sorted((uniform_by_hand(seed, step, unit, i * world_size + rank) << 32) | i
                          for i in range(n))
            expected = sorted(key & 0xFFFFFFFF for key in keys[:count])
            assert plan.counts[unit] == count and plan.survivors(unit) == expected, (step, unit)
        assert plan.active == list(range(len(survival)))  # never dropped: at least one sample each


def test_subset_count_truncates_like_the_compiled_sampler():
    assert [sd.gates.subset_count(10, p) for p in (0.0, 0.05, 0.15, 0.29, 0.3, 0.999, 1.0)] == \
        [1, 1, 1, 2, 3, 9, 10]
    assert sd.gates.subset_count(3, 0.7) == 2  # 3 * 0.7 = 2.0999...: truncated, not rounded


def test_subset_samples_are_uniform():
    """Every sample index is kept equally often (K / N) over many steps: no index is favoured."""
    n, p, steps = 8, 0.4, 3000
    sched = sd.Scheduler([p], mode="subset", seed=21)
    kept = np.zeros(n, dtype=np.int64)
    for _ in range(steps):
        kept[sched.sample(n).survivors(0)] += 1
    count = max(int(n * p), 1)
    assert kept.sum() == steps * count
    for i in range(n):
        assert binomtest(int(kept[i]), steps, count / n).pvalue > 1e-4, (i, kept)


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
def test_has_compiled_scheduler_uses_cpp_by_default():
    assert sd.Scheduler([0.5], seed=0).backend == "cpp"


# -- determinism --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sd.scheduler.MODES)
def test_same_seed_same_plans(backend, mode):
    a = sd.Scheduler(RESNET110, mode=mode, seed=123, backend=backend)
    b = sd.Scheduler(RESNET110, mode=mode, seed=123, backend=backend)
    c = sd.Scheduler(RESNET110, mode=mode, seed=124, backend=backend)
    pa = [a.sample(16) for _ in range(20)]
    pb = [b.sample(16) for _ in range(20)]
    pc = [c.sample(16) for _ in range(20)]
    assert all(plans_equal(x, y) for x, y in zip(pa, pb))
    assert not all(plans_equal(x, y) for x, y in zip(pa, pc))
    # successive steps differ (the step advances)
    assert not all(plans_equal(pa[0], p) for p in pa[1:])
    assert [p.step for p in pa] == list(range(20)) and a.step == 20


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
@pytest.mark.parametrize("mode", sd.scheduler.MODES)
@pytest.mark.parametrize("batch_size", [1, 2, 7, 128])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2), (2, 3)])
def test_cpp_equals_python_fallback(mode, batch_size, seed, rank, world_size):
    survival = [0.0, 1.0, *sd.linear_decay(20, 0.2), 0.999, 0.001]
    cpp = sd.Scheduler(survival, mode=mode, seed=seed, backend="cpp")
    py = sd.Scheduler(survival, mode=mode, seed=seed, backend="python")
    for step in range(10):
        # vary the batch size too: the last batch of an epoch is often smaller
        bs = batch_size if step % 3 else max(1, batch_size - step)
        a = cpp.sample(bs, rank=rank, world_size=world_size)
        b = py.sample(bs, rank=rank, world_size=world_size)
        assert plans_equal(a, b) and a.step == b.step == step
        # the whole packed buffer, slot maps and padding included, is identical
        assert a._offsets == b._offsets and torch.equal(a.buffer, b.buffer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_maps_equal_the_inverse_of_rows(backend):
    """The scheduler ships each partial unit's inverse map; it equals the one built from rows by hand."""
    sched = sd.Scheduler(RESNET110, mode="row", seed=5, backend=backend)
    seen_partial = 0
    for batch in (1, 2, 7, 64):
        plan = sched.sample(batch)
        for l in range(54):
            rows, slot = plan.rows(l), plan.slot(l)
            if rows is None:
                assert slot is None and plan.counts[l] == batch
                continue
            expected = torch.full((batch,), -1, dtype=torch.int32)
            expected[rows] = torch.arange(rows.numel(), dtype=torch.int32)
            assert slot.dtype == torch.int32 and torch.equal(slot, expected)
            seen_partial += 0 < rows.numel() < batch
    assert seen_partial > 50


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sd.scheduler.MODES)
def test_batch_size_does_not_move_later_steps(backend, mode):
    """Counter-based gates: step t's gates do not depend on how many samples earlier steps drew, so ranks (or
    epochs) with unequal batches stay in lockstep."""
    a = sd.Scheduler(RESNET110, mode=mode, seed=9, backend=backend)
    b = sd.Scheduler(RESNET110, mode=mode, seed=9, backend=backend)
    a.sample(5)
    b.sample(31)
    assert plans_equal(a.sample(8), b.sample(8))
    assert plans_equal(a.draw(7, 12), b.draw(7, 12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_draw_slices_of_the_global_plan(backend):
    """Rank r's sample i is global sample i * W + r: the ranks' plans are exactly the global plan's slices."""
    world_size, n = 3, 5
    global_plan = sd.Scheduler(RESNET110, mode="row", seed=4, backend=backend).draw(2, world_size * n)
    for rank in range(world_size):
        local = sd.Scheduler(RESNET110, mode="row", seed=4, backend=backend).draw(
            2, n, rank=rank, world_size=world_size)
        assert plans_equal(local, shard_plan(global_plan, rank, world_size))
        for l in range(54):
            assert local.survivors(l) == [g // world_size for g in global_plan.survivors(l)
                                          if g % world_size == rank]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_share_one_scheduler(backend):
    """Each draw claims its step atomically: no duplicated or missing plans (the old sampler duplicated 124
    of 6,000 row draws from two threads)."""
    sched = sd.Scheduler(RESNET110, mode="row", seed=6, backend=backend)
    draws = 3000 if backend == "cpp" else 150
    results = [[], []]

    def worker(out):
        for _ in range(draws):
            out.append(sched.sample(16))

    threads = [threading.Thread(target=worker, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plans = results[0] + results[1]
    assert sorted(p.step for p in plans) == list(range(2 * draws))
    reference = sd.Scheduler(RESNET110, mode="row", seed=6, backend=backend)
    for plan in plans[::37]:
        assert plans_equal(plan, reference.draw(plan.step, 16))


def test_seed_none_follows_torch_manual_seed(restore_rng_state):
    torch.manual_seed(7)
    a = sd.Scheduler(RESNET110, mode="row")
    torch.manual_seed(7)
    b = sd.Scheduler(RESNET110, mode="row")
    torch.manual_seed(8)
    c = sd.Scheduler(RESNET110, mode="row")
    assert a.seed == b.seed != c.seed
    assert plans_equal(a.sample(32), b.sample(32))


def test_seed_none_is_the_documented_hash_of_the_generator_state(restore_rng_state):
    import hashlib

    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    seed = sd.Scheduler([0.5]).seed
    assert seed == int.from_bytes(hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest(), "little")
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn


def test_seed_none_under_a_meta_default_device(restore_rng_state):
    with torch.device("meta"):
        sched = sd.Scheduler([0.5, 0.5], mode="row")
    assert sched.sample(4).counts is not None


def test_numpy_scalars_are_numbers():
    sched = sd.Scheduler([np.float32(0.5), np.float64(0.25)], seed=np.int64(3))
    assert sched.seed == 3 and sched.sample(np.int64(2)).batch_size == 2
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            sd.Scheduler([0.5], seed=bad)


# -- checkpointing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sd.scheduler.MODES)
def test_state_dict_resume(backend, mode):
    original = sd.Scheduler(RESNET110, mode=mode, seed=99, backend=backend)
    for _ in range(5):
        original.sample(8)
    # through pickle, as torch.save would carry it
    state = pickle.loads(pickle.dumps(original.state_dict()))
    assert state["step"] == 5 and state["version"] == 2
    expected = [original.sample(8) for _ in range(5)]

    resumed = sd.Scheduler(RESNET110, mode=mode, seed=0, backend=backend)
    resumed.load_state_dict(state)
    assert all(plans_equal(e, resumed.sample(8)) for e in expected)
    assert resumed.seed == 99


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
def test_state_dict_portable_between_backends():
    cpp = sd.Scheduler(RESNET110, mode="row", seed=5, backend="cpp")
    cpp.sample(4)
    py = sd.Scheduler(RESNET110, mode="row", backend="python")
    py.load_state_dict(cpp.state_dict())
    assert plans_equal(cpp.sample(4), py.sample(4))


def test_load_state_dict_rejects_mismatch():
    sched = sd.Scheduler(RESNET110, mode="batch", seed=1)
    with pytest.raises(ValueError, match="mode"):
        sched.load_state_dict(sd.Scheduler(RESNET110, mode="row", seed=1).state_dict())
    with pytest.raises(ValueError, match="survival"):
        sched.load_state_dict(sd.Scheduler(sd.linear_decay(54, 0.2), seed=1).state_dict())
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({})
    with pytest.raises(TypeError, match="state_dict"):
        sched.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="version 1"):
        sched.load_state_dict({"version": 1, "rng_state": 5, "seed": 1})
    with pytest.raises(ValueError, match="step"):
        sched.step = -1


@pytest.mark.parametrize("bad_step,exc", [(1.5, TypeError), ("abc", TypeError), (-3, ValueError),
                                          (2**64, ValueError), (True, TypeError)])
def test_load_state_dict_is_atomic_and_strict(bad_step, exc):
    """A bad value leaves the scheduler exactly as it was (validated before anything changes)."""
    sched = sd.Scheduler(RESNET110, mode="row", seed=1)
    sched.sample(4)
    state = {**sd.Scheduler(RESNET110, mode="row", seed=42).state_dict(), "step": bad_step}
    with pytest.raises(exc, match="step"):
        sched.load_state_dict(state)
    assert (sched.seed, sched.step) == (1, 1)
    good = {**state, "step": np.int64(7)}
    sched.load_state_dict(good)
    assert (sched.seed, sched.step) == (42, 7)


# -- plan structure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_plan_structure(backend):
    sched = sd.Scheduler(RESNET110, mode="row", seed=3, backend=backend)
    for _ in range(10):
        plan = sched.sample(64)
        assert plan.active == [l for l in range(54) if plan.counts[l] > 0]
        for l in range(54):
            rows = plan.rows(l)
            if rows is None:
                assert plan.counts[l] == 64
                continue
            assert rows.dtype == torch.int64 and rows.dim() == 1
            assert rows.numel() == plan.counts[l] < 64
            if rows.numel():
                assert bool((rows[1:] > rows[:-1]).all()), "rows must be sorted and unique"
                assert 0 <= int(rows.min()) and int(rows.max()) < 64
        # one packed buffer holds exactly the partially surviving units' rows and their slot maps
        partial = [c for c in plan.counts if 0 < c < 64]
        assert plan.buffer.numel() == sum(partial) + len(partial) * 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_plan_structure(backend):
    sched = sd.Scheduler(RESNET110, mode="batch", seed=3, backend=backend)
    plan = sched.sample(32)
    assert plan.buffer.numel() == 0
    for l in range(54):
        if l in plan.active:
            assert plan.counts[l] == 32 and plan.rows(l) is None and plan.survives(l)
        else:
            assert plan.counts[l] == 0 and plan.rows(l).numel() == 0 and not plan.survives(l)
            assert torch.equal(plan.slot(l), torch.full((32,), -1, dtype=torch.int32))
    with pytest.raises(IndexError, match="unit index"):
        plan.rows(54)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_probability_edges(backend, mode):
    sched = sd.Scheduler([1.0, 0.0, 1.0, 0.0], mode=mode, seed=11, backend=backend)
    for _ in range(200):
        plan = sched.sample(9)
        assert plan.active == [0, 2]
        assert plan.counts == [9, 0, 9, 0]
        assert plan.rows(0) is None and plan.rows(1).numel() == 0


def test_plan_from_survivors_is_the_one_layout():
    """Plans built by hand (tests, transforms) and drawn plans share one layout."""
    drawn = sd.Scheduler(RESNET110, mode="row", seed=12, backend="python").sample(6)
    rebuilt = sd.Plan.from_survivors("row", 6, [drawn.survivors(l) for l in range(54)])
    assert plans_equal(drawn, rebuilt) and torch.equal(drawn.buffer, rebuilt.buffer)


def test_plan_to_same_device_is_free():
    plan = sd.Scheduler(RESNET110, mode="row", seed=0).sample(8)
    assert plan.to("cpu") is plan


def test_no_pinning_state_is_stored_or_pickled():
    """Pinning is decided per copy (Plan.to / the caller's pin_memory): nothing about it is stored, so a
    scheduler pickled on a GPU machine samples on a CPU-only one, and CPU runs pin nothing."""
    sched = sd.Scheduler(RESNET110, mode="row", seed=0)
    assert not any("pin" in key for key in sched.__getstate__())
    assert not sched.sample(16).buffer.is_pinned()


@pytest.mark.needs_cuda
def test_plan_to_cuda_pins_pageable_plans_first(monkeypatch):
    """Rounded (row_multiple) plans live in pageable memory; Plan.to pins them so that the copy stays
    asynchronous, and the values arrive unchanged."""
    plan = round_plan_rows(sd.Scheduler(RESNET110, mode="row", seed=0).sample(32), 8, salt=1)
    assert not plan.buffer.is_pinned()
    pinned = []
    original = torch.Tensor.pin_memory

    def counting_pin_memory(t, *args, **kwargs):
        pinned.append(1)
        return original(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", counting_pin_memory)
    moved = plan.to("cuda")
    assert pinned == [1]
    torch.cuda.synchronize()
    assert torch.equal(moved.buffer.cpu(), plan.buffer)


@pytest.mark.needs_cuda
def test_plan_to_cuda_one_copy():
    sched = sd.Scheduler(RESNET110, mode="row", seed=0)
    plan = sched.sample(32, pin_memory=True)
    assert plan.buffer.is_pinned()
    moved = plan.to("cuda")
    torch.cuda.synchronize()
    for l in range(54):
        r, m = plan.rows(l), moved.rows(l)
        assert (r is None) == (m is None)
        if r is not None:
            assert m.device.type == "cuda" and torch.equal(r, m.cpu())
            assert torch.equal(plan.slot(l), moved.slot(l).cpu())
    # every row view shares the one device buffer
    storages = {moved.rows(l).untyped_storage().data_ptr() for l in range(54)
                if moved.rows(l) is not None and 0 < moved.rows(l).numel()}
    assert len(storages) <= 1


# -- drop rates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_drop_rate_matches_survival_binomial(mode):
    # Fixed seed, so the test is deterministic; p-value > 1e-3 per block as a sanity bound on the draws.
    survival = sd.linear_decay(12, 0.2)
    sched = sd.Scheduler(survival, mode=mode, seed=2024)
    steps, batch = 3000, 4
    kept = [0] * len(survival)
    for _ in range(steps):
        plan = sched.sample(batch)
        for l, c in enumerate(plan.counts):
            kept[l] += c
    trials = steps * batch
    for l, p in enumerate(survival):
        if mode == "batch":
            assert kept[l] % batch == 0
            result = binomtest(kept[l] // batch, steps, p)
        else:
            result = binomtest(kept[l], trials, p)
        assert result.pvalue > 1e-3, f"block {l}: kept {kept[l]} of {trials}, p_l={p}"


def test_row_gates_independent_across_blocks():
    # Two blocks with p = 0.5: a sample survives both about a quarter of the time.
    sched = sd.Scheduler([0.5, 0.5], mode="row", seed=77)
    both = total = 0
    for _ in range(500):
        plan = sched.sample(16)
        a = set(range(16)) if plan.rows(0) is None else set(plan.rows(0).tolist())
        b = set(range(16)) if plan.rows(1) is None else set(plan.rows(1).tolist())
        both += len(a & b)
        total += 16
    assert binomtest(both, total, 0.25).pvalue > 1e-3


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("survival", [[0.5, 1.2], [-0.01], [float("nan")]])
def test_rejects_bad_probabilities(survival):
    with pytest.raises(ValueError, match=r"survival\[\d\]"):
        sd.Scheduler(survival)


def test_rejects_empty_survival():
    with pytest.raises(ValueError, match="survival"):
        sd.Scheduler([])


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        sd.Scheduler([0.5], mode="sample")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        sd.Scheduler([0.5]).sample(batch_size)


def test_rejects_non_int_batch_size_and_seed():
    with pytest.raises(TypeError, match="batch_size"):
        sd.Scheduler([0.5]).sample(2.0)
    with pytest.raises(TypeError, match="seed"):
        sd.Scheduler([0.5], seed=1.5)
    with pytest.raises(ValueError, match="backend"):
        sd.Scheduler([0.5], backend="cuda")


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
def test_compiled_sampler_checks_its_arguments():
    from sdepth_ext import _C

    with pytest.raises(ValueError, match=r"survival\[1\]"):
        _C.GateSampler([0.5, 2.0], "row", 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        _C.GateSampler([0.5], "rows", 0)
    sampler = _C.GateSampler([0.5], "subset", 0)
    assert sampler.mode == "subset"
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0)
    with pytest.raises(ValueError, match="rank"):
        sampler.sample(4, 2, 2)
    assert sampler.step == 0  # a rejected call claims no step


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduler_deepcopy_and_pickle_keep_stream(backend):
    a = sd.Scheduler(RESNET110, mode="row", seed=4, backend=backend)
    a.sample(8)
    b = copy.deepcopy(a)
    c = pickle.loads(pickle.dumps(a))
    assert b.backend == c.backend == backend
    pa = a.sample(8)
    assert plans_equal(pa, b.sample(8)) and plans_equal(pa, c.sample(8))


def test_fallback_warns_once_and_says_how_to_build(monkeypatch):
    import sdepth_ext.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "_C", None)
    monkeypatch.setattr(scheduler_module, "_warned_fallback", False)
    assert not scheduler_module.has_compiled_scheduler()
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        sched = sd.Scheduler([0.5], seed=0)
    assert sched.backend == "python"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second scheduler must not warn again
        sd.Scheduler([0.5], seed=0)
    with pytest.raises(RuntimeError, match="not built.*pip install --no-build-isolation -e ."):
        sd.Scheduler([0.5], backend="cpp")
