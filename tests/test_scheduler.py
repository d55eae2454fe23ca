import copy
import pickle

import pytest
import torch
from scipy.stats import binomtest

import sdepth_ext as sd
from sdepth_ext.scheduler import _PythonGateSampler

BACKENDS = ["python"] + (["cpp"] if sd.has_compiled_scheduler() else [])
RESNET110 = sd.linear_decay(54, 0.5)


def plans_equal(a: sd.Plan, b: sd.Plan) -> bool:
    if (a.mode, a.batch_size, a.active, a.counts) != (b.mode, b.batch_size, b.active, b.counts):
        return False
    for l in range(a.num_blocks):
        ra, rb = a.rows(l), b.rows(l)
        if (ra is None) != (rb is None):
            return False
        if ra is not None and not torch.equal(ra.cpu(), rb.cpu()):
            return False
    return True


# -- the random stream itself -----------------------------------------------------------------------
def test_splitmix64_known_answer():
    # SplitMix64 from state 0 yields 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (the published reference
    # sequence); each word is split into two 32-bit uniforms, low half first.
    sampler = _PythonGateSampler([0.5], row_mode=False, state=0)
    assert sampler._uniforms(4) == [0x7B1DCDAF, 0xE220A839, 0xA1B965F4, 0x6E789E6A]


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
def test_has_compiled_scheduler_uses_cpp_by_default():
    assert sd.Scheduler([0.5], seed=0).backend == "cpp"


# -- determinism --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_same_seed_same_plans(backend, mode):
    a = sd.Scheduler(RESNET110, mode=mode, seed=123, backend=backend)
    b = sd.Scheduler(RESNET110, mode=mode, seed=123, backend=backend)
    c = sd.Scheduler(RESNET110, mode=mode, seed=124, backend=backend)
    pa = [a.sample(16) for _ in range(20)]
    pb = [b.sample(16) for _ in range(20)]
    pc = [c.sample(16) for _ in range(20)]
    assert all(plans_equal(x, y) for x, y in zip(pa, pb))
    assert not all(plans_equal(x, y) for x, y in zip(pa, pc))
    # successive steps differ (the state advances)
    assert not all(plans_equal(pa[0], p) for p in pa[1:])


@pytest.mark.skipif(not sd.has_compiled_scheduler(), reason="sdepth_ext._C not built")
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("batch_size", [1, 2, 7, 128])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345])
def test_cpp_equals_python_fallback(mode, batch_size, seed):
    survival = [0.0, 1.0, *sd.linear_decay(20, 0.2), 0.999, 0.001]
    cpp = sd.Scheduler(survival, mode=mode, seed=seed, backend="cpp")
    py = sd.Scheduler(survival, mode=mode, seed=seed, backend="python")
    for step in range(10):
        # vary the batch size too: the last batch of an epoch is often smaller
        bs = batch_size if step % 3 else max(1, batch_size - step)
        assert plans_equal(cpp.sample(bs), py.sample(bs))
        assert cpp.get_rng_state() == py.get_rng_state()


def test_seed_none_follows_torch_manual_seed(restore_rng_state):
    torch.manual_seed(7)
    a = sd.Scheduler(RESNET110, mode="row")
    torch.manual_seed(7)
    b = sd.Scheduler(RESNET110, mode="row")
    torch.manual_seed(8)
    c = sd.Scheduler(RESNET110, mode="row")
    assert a.seed == b.seed != c.seed
    assert plans_equal(a.sample(32), b.sample(32))


# -- checkpointing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_state_dict_resume(backend, mode):
    original = sd.Scheduler(RESNET110, mode=mode, seed=99, backend=backend)
    for _ in range(5):
        original.sample(8)
    # through pickle, as torch.save would carry it
    state = pickle.loads(pickle.dumps(original.state_dict()))
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
    with pytest.raises(ValueError, match="rng_state"):
        sched.load_state_dict({})
    with pytest.raises(ValueError, match="state"):
        sched.set_rng_state(-1)


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
        # one packed buffer holds exactly the partially surviving blocks' rows
        partial = sum(c for c in plan.counts if 0 < c < 64)
        assert plan.indices.numel() == partial


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_plan_structure(backend):
    sched = sd.Scheduler(RESNET110, mode="batch", seed=3, backend=backend)
    plan = sched.sample(32)
    assert plan.indices.numel() == 0
    for l in range(54):
        if l in plan.active:
            assert plan.counts[l] == 32 and plan.rows(l) is None and plan.survives(l)
        else:
            assert plan.counts[l] == 0 and plan.rows(l).numel() == 0 and not plan.survives(l)
    with pytest.raises(IndexError, match="block index"):
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


def test_plan_to_same_device_is_free():
    plan = sd.Scheduler(RESNET110, mode="row", seed=0).sample(8)
    assert plan.to("cpu") is plan


@pytest.mark.needs_cuda
def test_plan_to_cuda_pins_pageable_plans_first(monkeypatch):
    """Sharded (DDP) and rounded (row_multiple) plans live in pageable memory; Plan.to pins them so that the
    copy stays asynchronous, and the values arrive unchanged."""
    from sdepth_ext.blocks import round_plan_rows

    plan = round_plan_rows(sd.Scheduler(RESNET110, mode="row", seed=0).sample(32), 8, salt=1)
    assert not plan.indices.is_pinned()
    pinned = []
    original = torch.Tensor.pin_memory

    def counting_pin_memory(t, *args, **kwargs):
        pinned.append(1)
        return original(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", counting_pin_memory)
    moved = plan.to("cuda")
    assert pinned == [1]
    torch.cuda.synchronize()
    assert torch.equal(moved.indices.cpu(), plan.indices)


@pytest.mark.needs_cuda
def test_plan_to_cuda_one_copy():
    sched = sd.Scheduler(RESNET110, mode="row", seed=0)
    plan = sched.sample(32)
    assert plan.indices.is_pinned()
    moved = plan.to("cuda")
    torch.cuda.synchronize()
    for l in range(54):
        r, m = plan.rows(l), moved.rows(l)
        assert (r is None) == (m is None)
        if r is not None:
            assert m.device.type == "cuda" and torch.equal(r, m.cpu())
    # every row view shares the one device buffer
    storages = {moved.rows(l).untyped_storage().data_ptr() for l in range(54)
                if moved.rows(l) is not None and moved.rows(l).numel()}
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
        _C.GateSampler([0.5, 2.0], True, 0)
    with pytest.raises(ValueError, match="batch_size"):
        _C.GateSampler([0.5], True, 0).sample(0)


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
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        sd.Scheduler([0.5], backend="cpp")
