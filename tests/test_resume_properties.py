"""Exact resume, as properties: every piece of state that a checkpoint or a collective carries round-trips,
for any value, into an object in any prior state, with no call in between.

Where each piece of state travels (what these tests establish):

* ``Scheduler.state_dict()`` -- and so ``model.state_dict()``'s metadata, the one place a converted model
  keeps it -- carries the gate stream: seed (64 bits), step (64 bits), drop scale, with mode and survival to
  check against. ``sync_scheduler`` broadcasts seed, step and drop scale.
* The settings code makes (the dropped-gradient policy, ``checkpoint_blocks``, ``compile_blocks``,
  ``row_multiple``, a lesion in force) are not in the state_dict: a resumed script sets them again, and
  loading a state_dict leaves the target's own settings alone. ``torch.save(model)`` / ``copy.deepcopy``
  carry all of them with the scheduler.

The property every test checks: the loaded object's next plans (step, counts, surviving rows) equal the
original's, at once and after calls that are no-ops (``set_drop_scale`` with the scale in force, a repeated
load or sync). Scheduler properties run over ``sdepth_ext.scheduler.MODES`` and both backends, so a new mode
is covered by adding it there. Examples are bounded by the hypothesis profile of tests/conftest.py ("ci";
``make test-deep`` runs the "deep" one). The cross-process parts: one subprocess loads pickled models in a
fresh interpreter; two gloo processes, spawned once for the module, serve the ``sync_scheduler`` examples
that hypothesis generates here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import os
import pickle
import queue
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sdepth_ext as sd
from sdepth_ext.grads import DROPPED_GRADS
from sdepth_ext.scheduler import MODES
from sdepth_ext.state import SCALINGS, get_state
from tests.conftest import child_env, package_root, property_examples

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (requirements.txt)")
from hypothesis import given  # noqa: E402 - after the skip above
from hypothesis import strategies as st  # noqa: E402

BACKENDS = ["python"] + (["cpp"] if sd.has_compiled_scheduler() else [])
U64 = 1 << 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny forwards: intra-op threads cost far more than they bring on a loaded 2-core machine,
    and one thread, here and in the fresh process, runs the same kernels (outputs compare exactly).
    Module-scoped: hypothesis runs every example of a test inside one call of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================================================
# Strategies: the full range of every value, its edges drawn on purpose
# ============================================================================================================
u64s = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, U64 - 2, U64 - 1]), st.integers(0, U64 - 1))
# Subnormal rates are left out of the random draws: a library that sets the CPU's flush-to-zero mode in the
# process (one does in the torch 2.4 environment of `make test-oldest`) makes hypothesis refuse them.
probabilities = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, allow_subnormal=False))
# -0.0 is a valid drop scale (it compares equal to 0) whose float64 bits are 2**63: a word sync_scheduler
# must carry like any other.
drop_scales = st.one_of(st.sampled_from([-0.0, 0.0, 1.0]), st.floats(0.0, 1.0, allow_subnormal=False))
survivals = st.lists(probabilities, min_size=1, max_size=8)
modes = st.sampled_from(MODES)
backends = st.sampled_from(BACKENDS)
batch_sizes = st.integers(1, 24)


def scheduler_ops(mode: str):
    """A history that takes a scheduler to "any state": draws (sharded too in row mode), drop scales, steps
    set anywhere in [0, 2**64), reseeds."""
    ops = [st.tuples(st.just("sample"), batch_sizes),
           st.tuples(st.just("scale"), drop_scales),
           st.tuples(st.just("step"), u64s),
           st.tuples(st.just("reseed"), u64s, u64s)]
    if mode == "row":  # (op, batch, world_size, rank)
        ops.append(st.integers(1, 4).flatmap(lambda world: st.tuples(
            st.just("shard"), st.integers(1, 6), st.just(world), st.integers(0, world - 1))))
    return st.lists(st.one_of(ops), max_size=6)


def apply_ops(scheduler: sd.Scheduler, ops) -> None:
    for op, *args in ops:
        if op == "sample":
            scheduler.sample(args[0])
        elif op == "shard":
            scheduler.sample(args[0], rank=args[2], world_size=args[1])
        elif op == "scale":
            scheduler.set_drop_scale(args[0])
        elif op == "step":
            scheduler.step = args[0]
        elif op == "reseed":
            scheduler.reseed(*args)
        else:  # pragma: no cover - a strategy/op mismatch is a bug of this file
            raise AssertionError(op)


def plan_key(plan: sd.Plan) -> tuple:
    """Everything a plan says: mode, batch, step, and every unit's surviving samples."""
    return (plan.mode, plan.batch_size, plan.step, list(plan.active), list(plan.counts),
            [plan.survivors(l) for l in range(plan.num_units)])


def next_plans(scheduler: sd.Scheduler, sizes) -> list[tuple]:
    return [plan_key(scheduler.sample(n)) for n in sizes]


def reference_plans(survival, mode, state, sizes) -> list[tuple]:
    """The plans of ``state`` by definition: a new scheduler on its seed, moved to its step, at its scale
    (no load_state_dict, no broadcast: the paths under test)."""
    scheduler = sd.Scheduler(survival, mode=mode, seed=state["seed"], backend="python")
    scheduler.step = state["step"]
    scheduler.set_drop_scale(state["drop_scale"])
    return next_plans(scheduler, sizes)


def carry(state: dict, how: str) -> dict:
    """A scheduler state_dict as a checkpoint brings it back."""
    if how == "pickle":
        return pickle.loads(pickle.dumps(state))
    if how == "torch.save":  # what a checkpoint file holds; weights_only: plain ints of 64 bits and floats
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)
    return state


# ============================================================================================================
# Scheduler: state_dict / load_state_dict, pickle and deepcopy, both backends, every mode
# ============================================================================================================
@st.composite
def scheduler_cases(draw):
    mode = draw(modes)
    return {"survival": draw(survivals), "mode": mode,
            "original": (draw(u64s), draw(backends), draw(scheduler_ops(mode))),
            "target": (draw(u64s), draw(backends), draw(scheduler_ops(mode))),
            "sizes": draw(st.lists(batch_sizes, min_size=1, max_size=4)),
            "carry": draw(st.sampled_from(["dict", "pickle", "torch.save"]))}


def make_scheduler(survival, mode, seed, backend, ops) -> sd.Scheduler:
    scheduler = sd.Scheduler(survival, mode=mode, seed=seed, backend=backend)
    apply_ops(scheduler, ops)
    return scheduler


@given(scheduler_cases())
def test_a_loaded_scheduler_draws_the_originals_next_plans(case):
    """Save from any state, load into a scheduler in any other state (another seed, step, scale, backend):
    the original's next plans at once, after no-ops, and by definition from the saved numbers."""
    survival, mode, sizes = case["survival"], case["mode"], case["sizes"]
    original = make_scheduler(survival, mode, *case["original"])
    saved = carry(original.state_dict(), case["carry"])
    at_once = make_scheduler(survival, mode, *case["target"])
    at_once.load_state_dict(saved)
    after_no_ops = make_scheduler(survival, mode, *case["target"])
    after_no_ops.load_state_dict(saved)
    after_no_ops.load_state_dict(saved)
    after_no_ops.set_drop_scale(after_no_ops.drop_scale)  # what a constant drop schedule calls every step
    after_no_ops.step = after_no_ops.step
    assert at_once.state_dict() == after_no_ops.state_dict() == original.state_dict()

    expected = next_plans(original, sizes)
    assert next_plans(at_once, sizes) == expected
    assert next_plans(after_no_ops, sizes) == expected
    assert reference_plans(survival, mode, saved, sizes) == expected


@given(scheduler_cases(), st.sampled_from(["pickle", "deepcopy"]))
def test_a_pickled_or_copied_scheduler_draws_the_originals_next_plans(case, how):
    """Pickling (torch.save of anything holding a scheduler) and deepcopy keep the stream and the backend."""
    original = make_scheduler(case["survival"], case["mode"], *case["original"])
    twin = pickle.loads(pickle.dumps(original)) if how == "pickle" else copy.deepcopy(original)
    assert twin.backend == original.backend and twin.state_dict() == original.state_dict()
    twin.set_drop_scale(twin.drop_scale)
    assert next_plans(twin, case["sizes"]) == next_plans(original, case["sizes"])


# -- regression: load_state_dict set seed/step before the saved drop scale (the sampler kept the old rates) --
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("saved_scale,prior_scale", [(0.0, 1.0), (1.0, 0.0), (0.5, 0.0)])
def test_load_state_dict_draws_with_the_saved_drop_scale(backend, mode, saved_scale, prior_scale):
    """A unit with p = 0 survives exactly when the scale is 0 (p(s) = 1 - s); p = 1 always survives. A
    scheduler that loaded scale s must draw with s at once, and after set_drop_scale(s), the no-op a
    constant drop schedule makes every step: the bug kept drawing with the scale it had before loading."""
    survival = [0.0, 1.0, 0.0, 0.5]
    original = sd.Scheduler(survival, mode=mode, seed=11, backend=backend)
    original.set_drop_scale(saved_scale)
    original.sample(4)
    target = sd.Scheduler(survival, mode=mode, seed=12, backend=backend)
    target.set_drop_scale(prior_scale)
    target.load_state_dict(original.state_dict())
    target.set_drop_scale(saved_scale)
    plans = [target.sample(4) for _ in range(3)]
    expected = [original.sample(4) for _ in range(3)]
    assert [plan_key(p) for p in plans] == [plan_key(p) for p in expected]
    if saved_scale in (0.0, 1.0):  # p(s) is 0 or 1 for every unit but the last: the plans are certain
        # (subset mode keeps at least one sample of a unit at p = 0)
        p0_survivors = 4 if saved_scale == 0.0 else (1 if mode == "subset" else 0)
        assert all(p.counts[0] == p.counts[2] == p0_survivors and p.counts[1] == 4 for p in plans)


def test_a_resumed_model_trains_at_the_saved_drop_scale():
    """The user-facing form of the bug: resume a run whose constant drop scale is 0 (nothing dropped yet,
    a "late" schedule before its start) into a freshly converted model; its next steps must drop nothing."""
    x = batch(2)[0]
    model = sd.convert(tiny_resnet(), p_last=0.0, rule="uniform", mode="batch", seed=1).train()
    sd.set_drop_scale(model, 0.0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = sd.convert(tiny_resnet(), p_last=0.0, rule="uniform", mode="batch", seed=2).train()
    resumed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    sd.set_drop_scale(resumed, 0.0)
    with torch.no_grad():
        for _ in range(3):
            resumed(x)
            assert get_state(resumed).host_plan.counts == [2, 2, 2]


# ============================================================================================================
# A converted model: state_dict metadata (the scheduler) and the settings it does not carry
# ============================================================================================================
def tiny_resnet():
    """cifar_resnet(8): 3 BasicBlocks with BatchNorm, two projection shortcuts; the same weights every call,
    without touching torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return sd.cifar_resnet(8, num_classes=4)


def batch(n: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * salt + n)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def model_ops(mode: str):
    """A converted model's history: training forwards, drop scales, steps set, eval forwards (no draw)."""
    ops = [st.tuples(st.just("forward"), st.integers(2, 6)),
           st.tuples(st.just("scale"), drop_scales),
           st.tuples(st.just("step"), u64s),
           st.tuples(st.just("eval"), st.integers(2, 4))]
    return st.lists(st.one_of(ops), max_size=4)


def apply_model_ops(model, ops) -> None:
    with torch.no_grad():
        for op, arg in ops:
            if op == "forward":
                model.train()(batch(arg)[0])
            elif op == "eval":
                model.eval()(batch(arg)[0])
                model.train()
            elif op == "scale":
                sd.set_drop_scale(model, arg)
            elif op == "step":
                sd.get_scheduler(model).step = arg
            else:  # pragma: no cover
                raise AssertionError(op)


@st.composite
def model_settings(draw, mode):
    """What code sets on a converted model; both dropped-gradient policies named explicitly (never the
    default, which is changing)."""
    return {"dropped_grads": draw(st.sampled_from(DROPPED_GRADS)),
            "checkpoint": draw(st.sampled_from([None, {"use_reentrant": False}])),
            "row_multiple": draw(st.sampled_from([1, 2, 3])) if mode == "row" else 1}


def apply_settings(model, settings) -> None:
    sd.set_dropped_grads(model, settings["dropped_grads"])
    sd.checkpoint_blocks(model, settings["checkpoint"] is not None, **(settings["checkpoint"] or {}))
    sd.set_row_multiple(model, settings["row_multiple"])


def settings_of(model) -> dict:
    state = get_state(model)
    return {"dropped_grads": state.dropped_grads, "checkpoint": state.checkpoint,
            "row_multiple": state.row_multiple, "lesioned": state.lesioned, "shard": state.shard,
            "scaling": state.scaling, "compile_kwargs": state.compile_kwargs}


def model_plans(model, sizes) -> list[tuple]:
    """The next training forwards' plans (and outputs, exactly: same weights, same plan, same kernels)."""
    out = []
    with torch.no_grad():
        for n in sizes:
            y = model.train()(batch(n, salt=1)[0])
            out.append((plan_key(get_state(model).host_plan), y))
    return out


def assert_same_steps(got, expected) -> None:
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert torch.equal(a, b)


@st.composite
def model_cases(draw):
    mode = draw(modes)
    return {"mode": mode, "p_last": draw(probabilities), "rule": draw(st.sampled_from(["linear", "uniform"])),
            "scaling": draw(st.sampled_from(SCALINGS)),
            "original": (draw(u64s), draw(model_ops(mode)), draw(model_settings(mode))),
            "target": (draw(u64s), draw(model_ops(mode)), draw(model_settings(mode))),
            "sizes": draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))}


def make_model(case, seed, ops, settings):
    model = sd.convert(tiny_resnet(), p_last=case["p_last"], rule=case["rule"], mode=case["mode"],
                       scaling=case["scaling"], seed=seed).train()
    apply_settings(model, settings)
    apply_model_ops(model, ops)
    return model


@property_examples(0.5)
@given(model_cases())
def test_a_loaded_model_state_dict_draws_the_originals_next_plans(case):
    """Through a checkpoint file (torch.save of model.state_dict(), torch.load with weights_only=True) the
    scheduler state rides in the metadata. A target that its script set up like the original draws the
    original's next plans at once; one with other settings keeps them through the load (they are not in
    the state_dict), and draws the original's plans once given the original's settings and a no-op scale."""
    original = make_model(case, *case["original"])
    seed, ops, own_settings = case["target"]
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)

    def load(model):
        buffer.seek(0)
        model.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        assert sd.get_scheduler(model).state_dict() == sd.get_scheduler(original).state_dict()
        return model

    at_once = load(make_model(case, seed, ops, case["original"][2]))
    later = load(make_model(case, seed, ops, own_settings))
    assert settings_of(later) == {**settings_of(original), **own_settings}
    apply_settings(later, case["original"][2])
    sd.set_drop_scale(later, sd.get_scheduler(later).drop_scale)
    expected = model_plans(original, case["sizes"])
    assert_same_steps(model_plans(at_once, case["sizes"]), expected)
    assert_same_steps(model_plans(later, case["sizes"]), expected)


def train_steps(model, sizes) -> list[tuple]:
    """Training steps with backward: plan, output and every parameter's gradient (None stays None:
    the dropped-gradient policy shows in which gradients exist), and the number of tensors autograd saved
    (checkpointing shows there)."""
    out = []
    for n in sizes:
        x, y = batch(n, salt=2)
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model.train()(x)
        F.cross_entropy(logits, y).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        out.append((plan_key(get_state(model).host_plan), logits.detach(), grads, saved[0]))
    return out


def assert_same_training(got, expected) -> None:
    for (plan_a, out_a, grads_a, saved_a), (plan_b, out_b, grads_b, saved_b) in zip(got, expected):
        assert plan_a == plan_b and saved_a == saved_b
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        assert [g is None for g in grads_a] == [g is None for g in grads_b]
        for a, b in zip(grads_a, grads_b):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(got) == len(expected)


def round_trip(model, how: str):
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@property_examples(0.5)
@given(model_cases(), st.sampled_from(["torch.save", "deepcopy"]),
       st.lists(st.integers(0, 2), max_size=2, unique=True))
def test_a_pickled_model_carries_every_setting_and_trains_on(case, how, lesioned):
    """torch.save(model) / deepcopy carry the scheduler and every setting: the copy's next training steps
    (plans, outputs, which gradients exist and their values, what autograd saves) are the original's. Saved
    inside ``sd.lesion``, the copy evaluates with the same units removed."""
    original = make_model(case, *case["original"])
    if lesioned:
        x = batch(3, salt=3)[0]
        with sd.lesion(original, lesioned), torch.no_grad():
            twin = round_trip(original, how)
            assert get_state(twin).lesioned == frozenset(lesioned) and not twin.training
            assert torch.equal(twin(x), original(x))
    twin = round_trip(original, how)
    assert settings_of(twin) == settings_of(original)
    assert sd.get_scheduler(twin).state_dict() == sd.get_scheduler(original).state_dict()
    assert_same_training(train_steps(twin, case["sizes"]), train_steps(original, case["sizes"]))


# ============================================================================================================
# A whole converted model, torch.save'd here and loaded in a fresh interpreter
# ============================================================================================================
def fresh_process_cases() -> list[dict]:
    """One model per kind of state, each saved right after reaching it."""
    cases = []

    def add(name, model, lesioned=()):
        cases.append({"name": name, "model": model, "lesioned": list(lesioned)})

    wraps = sd.convert(tiny_resnet(), p_last=0.5, mode="batch", seed=U64 - 1).train()
    sd.set_dropped_grads(wraps, "none")
    sd.set_drop_scale(wraps, 0.3)
    sd.get_scheduler(wraps).step = U64 - 2  # its next steps: 2**64 - 2, 2**64 - 1, then 0
    add("batch, policy none, scale 0.3, seed and step at the top of 64 bits", wraps)

    zero = sd.convert(tiny_resnet(), p_last=0.2, rule="uniform", mode="batch", seed=5).train()
    sd.set_dropped_grads(zero, "zero")
    sd.checkpoint_blocks(zero)
    apply_model_ops(zero, [("forward", 3), ("forward", 2)])
    add("batch, policy zero, checkpointed", zero)

    row = sd.convert(tiny_resnet(), p_last=0.5, rule="uniform", mode="row", scaling="inverted",
                     seed=2**63).train()
    sd.set_dropped_grads(row, "zero")
    sd.set_row_multiple(row, 2)
    apply_model_ops(row, [("forward", 4), ("scale", 0.7), ("forward", 5)])
    add("row, policy zero, row_multiple 2, inverted, scale 0.7", row)

    compiled = sd.convert(tiny_resnet(), p_last=0.5, rule="uniform", mode="row", seed=9).train()
    sd.set_dropped_grads(compiled, "none")
    sd.compile_blocks(compiled, backend="eager", dynamic=False)
    add("row, compiled", compiled)

    lesion = sd.convert(tiny_resnet(), p_last=0.5, mode="batch", seed=3)
    add("batch, saved inside sd.lesion([1])", lesion, lesioned=[1])
    return cases


def observe(case) -> dict:
    """What the saved model does next: two training steps, or, saved inside a lesion, its eval output."""
    model = case["model"]
    settings = settings_of(model)
    settings["scheduler"] = sd.get_scheduler(model).state_dict()
    if case["lesioned"]:
        with torch.no_grad():
            return {"settings": settings, "eval": model(batch(3, salt=4)[0])}
    return {"settings": settings, "steps": train_steps(model, [4, 3])}


def observe_saved_cases(cases_path: str, out_path: str) -> None:
    """The fresh process's side (tests/test_resume_properties.py run as a script)."""
    torch.set_num_threads(1)
    cases = torch.load(cases_path, weights_only=False)
    torch.save([observe(case) for case in cases], out_path)


def test_a_saved_model_continues_exactly_in_a_fresh_process(tmp_path):
    cases = fresh_process_cases()
    with contextlib.ExitStack() as lesions:
        for case in cases:
            if case["lesioned"]:
                lesions.enter_context(sd.lesion(case["model"], case["lesioned"]))
        torch.save(cases, tmp_path / "cases.pt")
    env = child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=package_root())
    assert result.returncode == 0, result.stderr[-3000:]
    child = torch.load(tmp_path / "out.pt", weights_only=False)
    assert len(child) == len(cases)
    for case, got in zip(cases, child):
        if case["lesioned"]:
            with sd.lesion(case["model"], case["lesioned"]):
                expected = observe(case)
            torch.testing.assert_close(got["eval"], expected["eval"], rtol=0, atol=0, msg=case["name"])
        else:
            expected = observe(case)
            assert_same_training(got["steps"], expected["steps"])
        assert got["settings"] == expected["settings"], case["name"]



# ============================================================================================================
# sync_scheduler between two gloo processes, ranks starting from different states
# ============================================================================================================
WORLD = 2
REPLY_TIMEOUT_S = 90  # one example on both ranks; the process group itself times out after 30 s


def sync_job(job: dict, rank: int) -> dict:
    """One example on one rank: this rank's model in its own state (its seed, backend and history), then
    ``sync_scheduler`` from ``job["src"]``, then the next plans; then no-ops (the scale in force, a second
    sync) and the plans after them."""
    seed, backend, ops = job["ranks"][rank]
    model = sd.convert(tiny_resnet(), p_last=job["p_last"], rule="uniform", mode=job["mode"], seed=seed)
    # The backend is the rank's own choice (a rank without the compiled scheduler uses the NumPy one).
    get_state(model).scheduler = sd.Scheduler(sd.survival_probs(model), mode=job["mode"], seed=seed,
                                              backend=backend)
    apply_ops(sd.get_scheduler(model), ops)
    before = sd.get_scheduler(model).state_dict()
    sd.sync_scheduler(model, src=job["src"])
    after = sd.get_scheduler(model).state_dict()
    plans = [key for key, _ in model_plans(model, job["sizes"])]
    sd.set_drop_scale(model, sd.get_scheduler(model).drop_scale)
    sd.sync_scheduler(model, src=job["src"])
    plans_after_no_ops = [key for key, _ in model_plans(model, job["sizes"])]
    return {"before": before, "after": after, "plans": plans, "plans_after_no_ops": plans_after_no_ops}


def _sync_server(rank: int, port: int, jobs, replies) -> None:
    """A spawned rank: serves jobs until told to stop (None), or until one fails: then the ranks'
    collectives may be out of step, so it reports the error and stops."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        while True:
            job = jobs[rank].get(timeout=600)  # the parent went away without a word: stop
            if job is None:
                break
            try:
                replies.put((rank, sync_job(job, rank)))
            except Exception as err:  # noqa: BLE001 - the parent fails the test with this message
                replies.put((rank, f"{type(err).__name__}: {err}"))
                return
    finally:
        dist.destroy_process_group()
    # Told to stop, so the parent has read every reply: skip the interpreter's teardown (seconds of a
    # shared CPU, every make test).
    os._exit(0)


class SyncRanks:
    """Two gloo ranks, spawned once; ``run(job)`` gives both the job and returns their results."""

    def __init__(self):
        context = mp.get_context("spawn")
        self.jobs = [context.Queue() for _ in range(WORLD)]
        self.replies = context.Queue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.processes = mp.start_processes(_sync_server, args=(port, self.jobs, self.replies), nprocs=WORLD,
                                            join=False, start_method="spawn")
        self.stopped: str | None = None

    def run(self, job: dict) -> list[dict]:
        if self.stopped:
            raise AssertionError(f"the gloo ranks stopped at an earlier example: {self.stopped}")
        for q in self.jobs:
            q.put(job)
        results: dict = {}
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while len(results) < WORLD:
            try:
                rank, result = self.replies.get(timeout=1)
                results[rank] = result
            except queue.Empty:
                dead = [p.exitcode for p in self.processes.processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.stopped = (f"ranks exited (codes {dead}): {self._exit_error()}" if dead else
                                    f"no reply from ranks {sorted(set(range(WORLD)) - set(results))} "
                                    f"within {REPLY_TIMEOUT_S} s")
                    raise AssertionError(self.stopped) from None
        errors = [f"rank {r}: {v}" for r, v in sorted(results.items()) if isinstance(v, str)]
        if errors:
            self.stopped = "; ".join(errors)
            raise AssertionError(self.stopped)
        return [results[r] for r in range(WORLD)]

    def _exit_error(self) -> str:
        try:
            self.processes.join(timeout=1)  # raises with the traceback of a rank that raised
        except Exception as err:  # noqa: BLE001 - the message is what the test reports
            return str(err)[-2000:]
        return "no error reported"

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.processes.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def sync_ranks():
    ranks = SyncRanks()
    try:
        yield ranks
    finally:
        ranks.close()


def check_sync(job: dict, results: list[dict]) -> None:
    """Every rank ends with the source rank's stream, and draws what that stream draws by definition."""
    source = results[job["src"]]["before"]
    for rank, result in enumerate(results):
        assert result["after"] == source, f"rank {rank}"
    survival = sd.uniform(3, job["p_last"])  # tiny_resnet has 3 units
    sizes = job["sizes"]
    expected = reference_plans(survival, job["mode"], source, sizes + sizes)
    for rank, result in enumerate(results):
        assert result["plans"] == expected[:len(sizes)], f"rank {rank}"
        assert result["plans_after_no_ops"] == expected[len(sizes):], f"rank {rank}"


@st.composite
def sync_jobs(draw):
    mode = draw(modes)
    return {"mode": mode, "p_last": draw(probabilities), "src": draw(st.integers(0, WORLD - 1)),
            "ranks": [(draw(u64s), draw(backends), draw(scheduler_ops(mode))) for _ in range(WORLD)],
            "sizes": draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))}


@property_examples(0.5)
@given(job=sync_jobs())
def test_sync_scheduler_gives_every_rank_the_sources_next_plans(sync_ranks, job):
    check_sync(job, sync_ranks.run(job))


def test_sync_scheduler_carries_words_of_64_bits(sync_ranks):
    """Regression: seed, step and the drop scale's float64 bits travel as int64 words, and a word >= 2**63
    (half of all seed=None seeds; the bits of the drop scale -0.0) came back negative without the
    conversion back to unsigned. Each rank starts elsewhere; rank 1 without the compiled scheduler."""
    job = {"mode": "row", "p_last": 0.5, "src": 0, "sizes": [4, 5],
           "ranks": [(U64 - 1, BACKENDS[-1], [("step", 2**63 + 5), ("scale", -0.0)]),
                     (7, "python", [("sample", 4), ("scale", 0.5)])]}
    results = sync_ranks.run(job)
    assert results[1]["after"]["seed"] == U64 - 1 and results[1]["after"]["step"] == 2**63 + 5
    check_sync(job, results)

if __name__ == "__main__":
    observe_saved_cases(sys.argv[1], sys.argv[2])
    os._exit(0)  # the results are on disk: skip the interpreter's teardown (seconds of a shared CPU)
