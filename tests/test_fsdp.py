"""FSDP2: two gloo processes train converted models under ``fully_shard``, equal to one process, never hang.

Workers run in spawned processes with a bounded process-group timeout and a bounded join (a hang fails the
test instead of blocking CI); one spawn runs every scenario (module-scoped fixture) and the tests compare its
results with single-process references computed here. Rank r trains on samples ``r, r + WORLD, ...`` of each
global batch (the order in which row mode interleaves ranks).

The reference of a scenario is its ranks' work done in one process (:func:`emulate`): per step, for each rank,
that rank's plan (``shard=(r, WORLD)`` and the scheduler rewound to the step), its local batch, its own
BatchNorm buffers (FSDP2 keeps them per rank), ``loss / WORLD`` backpropagated (FSDP2 averages gradients);
then one optimizer step. With per-sample normalisation and equal batches that is one process over the
global batch, which ``test_row_mode_equals_one_process_over_the_global_batch`` checks as well.

Scenarios: sharded by hand (torchtitan's loop, nothing else called) and by ``sd.fully_shard``; batch, row
and subset mode; both dropped-gradient policies; unequal batches; BatchNorm; explicit prefetching; HSDP (a
2-D mesh); bf16 mixed precision; ``checkpoint_blocks`` with ``compile_blocks``; every block family.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

import sdepth_ext as sd
from sdepth_ext.fsdp import CollectiveCount, count_collectives
from sdepth_ext.state import get_state
from tests import distributed_common as common
from tests.conftest import single_thread
from tests.distributed_common import (
    WORLD,
    assert_close_dicts,
    bn_model,
    full_params,
    gn_model,
    local_slice,
    loss_of,
    needs_fsdp2,
)

LOCAL_BATCH = 4
STEPS = 4  # >= 3: the row-mode hang this guards against showed at the third step
SEED = 100  # rank r converts with SEED + r: the installation broadcasts rank 0's stream
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3
TIMEOUT_S = 420  # the whole spawn; the process group itself times out after 60 s
TOL = {"rtol": 1e-4, "atol": 1e-5}  # reduce-scatter sums in another order than one process


# ============================================================================================================
# Models, data
# ============================================================================================================
PROJECTION_BLOCKS = {"gn": {2}, "bn": {1, 2}}  # blocks whose shortcut has parameters


def image_batch(step, batch=WORLD * LOCAL_BATCH, size=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, 3, size, size, generator=g)


def family_cases():
    from tests.families.test_suite import CASES

    return {case.name: case for case in CASES}


def make_model(spec):
    if spec["model"] == "gn":
        return gn_model()
    if spec["model"] == "bn":
        return bn_model()
    return family_cases()[spec["model"]].make()


def global_input(spec, step):
    if spec["model"] in ("gn", "bn"):
        return image_batch(step)
    return family_cases()[spec["model"]].input(WORLD * LOCAL_BATCH, 1000 + step)


def local_input(spec, step, rank):
    x = local_slice(global_input(spec, step), rank)
    if step == spec.get("uneven_step") and rank == 1:
        x = x[:-1]  # a last partial batch: rank 1 one sample short
    return x


def convert(spec, seed):
    kwargs = {k: spec[k] for k in ("p_last", "rule", "scaling") if k in spec}
    if spec["model"] not in ("gn", "bn") and not family_cases()[spec["model"]].own_rates:
        kwargs.setdefault("scaling", "inverted")
    return sd.convert(make_model(spec), mode=spec["mode"], seed=seed, **kwargs).train()


# Every scenario: model, mode, how it is sharded ("hand": fully_shard per converted block, then the root, and
# nothing else; "helper": sd.fully_shard), dropped-gradient policy, and options.
SCENARIOS = {
    "batch_hand_none_uneven": {"model": "gn", "mode": "batch", "pattern": "hand", "policy": "none",
                               "p_last": 0.5, "rule": "uniform", "uneven_step": 1},
    "batch_helper_zero_prefetch": {"model": "gn", "mode": "batch", "pattern": "helper", "policy": "zero",
                                   "p_last": 0.5, "rule": "uniform", "prefetch": True},
    "batch_bn_helper_none": {"model": "bn", "mode": "batch", "pattern": "helper", "policy": "none",
                             "p_last": 0.5, "rule": "uniform"},
    "row_helper_none_clear": {"model": "gn", "mode": "row", "pattern": "helper", "policy": "none",
                              "p_last": 0.3, "rule": "uniform", "clear": True},
    "row_hand_zero_uneven": {"model": "gn", "mode": "row", "pattern": "hand", "policy": "zero",
                             "p_last": 0.3, "rule": "uniform", "uneven_step": 1},
    "row_bn_helper_zero": {"model": "bn", "mode": "row", "pattern": "helper", "policy": "zero",
                           "p_last": 0.3, "rule": "uniform"},
    "subset_helper_none_uneven": {"model": "gn", "mode": "subset", "pattern": "helper", "policy": "none",
                                  "p_last": 0.3, "rule": "uniform", "uneven_step": 2},
    "row_hsdp_hand_zero": {"model": "gn", "mode": "row", "pattern": "hand", "policy": "zero",
                           "p_last": 0.3, "rule": "uniform", "mesh": (2, 1)},
    "batch_helper_zero_kept": {"model": "gn", "mode": "batch", "pattern": "helper", "policy": "zero",
                               "p_last": 0.5, "rule": "uniform", "reshard_after_forward": False},
    # bf16 compute (mp_policy) against the fp32 emulation: 1e-3 apart after four steps
    "batch_bf16_helper_zero": {"model": "gn", "mode": "batch", "pattern": "helper", "policy": "zero",
                               "p_last": 0.5, "rule": "uniform", "param_dtype": torch.bfloat16,
                               "tol": {"rtol": 2e-2, "atol": 5e-3}},
    "row_helper_checkpoint_compile": {"model": "gn", "mode": "row", "pattern": "helper", "policy": "zero",
                                      "p_last": 0.3, "rule": "uniform", "checkpoint": True,
                                      "compile": True},
}
FAMILY_MODES = ("batch", "row", "subset")


def family_scenarios():
    """Every family case under the helper, modes in turn, two steps each."""
    out = {}
    for i, name in enumerate(family_cases()):
        out[f"family_{name}"] = {"model": name, "mode": FAMILY_MODES[i % 3], "pattern": "helper",
                                 "policy": "zero", "steps": 2}
    return out


# ============================================================================================================
# The worker (one per rank)
# ============================================================================================================
def buffers(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def fully_shard_kwargs(spec):
    kwargs = {k: spec[k] for k in ("reshard_after_forward",) if k in spec}
    if "mesh" in spec:  # HSDP: (replicas, shards)
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cpu", spec["mesh"], mesh_dim_names=("replicate", "shard"))
    if "param_dtype" in spec:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=spec["param_dtype"],
                                                   reduce_dtype=torch.float32)
    return kwargs


def shard(model, spec):
    from torch.distributed.fsdp import fully_shard

    kwargs = fully_shard_kwargs(spec)
    if spec["pattern"] == "hand":  # torchtitan's loop; the first training forward installs the gates
        for block in get_state(model).blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    else:
        sd.fully_shard(model, **kwargs)


def direct_block_calls(rank):
    """A sharded block called on its own (a training forward that skips the root) draws a fresh plan in its
    FSDP gate, so that the gate and the forward agree: dropped, its group stays sharded and silent."""
    spec = SCENARIOS["batch_helper_zero_prefetch"]
    model = convert(spec, SEED)
    sd.fully_shard(model)
    loss_of(model(local_input(spec, 0, rank))).backward()  # one step through the root first
    block = get_state(model).blocks[1]
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(7))
    out = []
    for _ in range(4):
        with count_collectives() as counted:
            block(x).sum().backward()
        plan = get_state(model).host_plan
        out.append((plan.step, plan.counts[1], dict(counted.counts)))
    return out


def revert_refused(rank):
    """revert on a sharded model would drop FSDP2's class from the blocks: refused, the model intact."""
    model = convert(SCENARIOS["batch_hand_none_uneven"], SEED)
    sd.fully_shard(model)
    try:
        sd.revert(model)
    except ValueError as err:
        model(local_input(SCENARIOS["batch_hand_none_uneven"], 0, rank)).sum().backward()  # still trains
        return str(err)
    return None


def fsdp_train(spec, rank):
    model = convert(spec, SEED + rank)
    sd.set_dropped_grads(model, spec["policy"])
    if spec.get("checkpoint"):
        sd.checkpoint_blocks(model)
    shard(model, spec)
    if spec.get("compile"):
        sd.compile_blocks(model, backend="aot_eager")
    blocks = get_state(model).blocks
    if spec.get("prefetch"):
        model.set_modules_to_forward_prefetch([blocks[0]])  # the root's: before any plan-aware hook
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
            block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    record = {"local_counts": [], "steps": [], "collectives": [], "calls": [], "dropped": []}
    for step in range(spec.get("steps", STEPS)):
        x = local_input(spec, step, rank)
        opt.zero_grad(set_to_none=True)
        # Dynamo runs compiled regions eagerly while a dispatch mode (the counter) is active: not counted
        counting = contextlib.nullcontext(CollectiveCount()) if spec.get("compile") else count_collectives()
        with counting as counted:
            loss_of(model(x)).backward()
        if spec.get("clear"):
            sd.clear_dropped_grads(model)  # row mode: a collective (all-reduce of the survivor counts)
            record["dropped"].append(sd.dropped_blocks(model))
        opt.step()
        plan = get_state(model).host_plan
        record["local_counts"].append(list(plan.counts))
        record["steps"].append(plan.step)
        record["collectives"].append(dict(counted.counts))
        record["calls"].append(counted.calls)
    record["params"] = full_params(model)
    record["buffers"] = buffers(model)
    if spec.get("compile"):  # the compiled regions ran (rather than a silent eager fallback)
        record["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return record


def dcp_resume(rank, directory):
    """Train 2 steps, save with torch.distributed.checkpoint, train 2 more; a fresh model (another seed)
    loads the checkpoint and trains the same 2 steps: its gates and parameters must be the first run's."""
    import torch.distributed.checkpoint as dcp

    spec = SCENARIOS["row_helper_none_clear"]

    def run(model, steps):
        opt = torch.optim.SGD(model.parameters(), lr=LR)  # no optimizer state: the model's is the whole state
        counts = []
        for step in steps:
            opt.zero_grad(set_to_none=True)
            loss_of(model(local_input(spec, step, rank))).backward()
            opt.step()
            counts.append(list(get_state(model).host_plan.counts))
        return counts

    first = convert(spec, SEED)
    sd.fully_shard(first)
    run(first, range(2))
    dcp.save({"model": first.state_dict(), "sdepth": sd.get_scheduler(first).state_dict()},
             checkpoint_id=directory)
    expected = run(first, range(2, 4))
    resumed = convert(spec, SEED + 7)
    sd.fully_shard(resumed)
    state = {"model": resumed.state_dict(), "sdepth": sd.get_scheduler(resumed).state_dict()}
    dcp.load(state, checkpoint_id=directory)
    resumed.load_state_dict(state["model"])
    sd.get_scheduler(resumed).load_state_dict(state["sdepth"])
    got = run(resumed, range(2, 4))
    return {"expected_counts": expected, "counts": got, "expected": full_params(first),
            "params": full_params(resumed)}


def _work(rank, out_dir):
    results = {name: fsdp_train(spec, rank) for name, spec in {**SCENARIOS, **family_scenarios()}.items()}
    results["dcp_resume"] = dcp_resume(rank, os.path.join(out_dir, "dcp"))
    results["revert_error"] = revert_refused(rank)
    results["direct_block_calls"] = direct_block_calls(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return common.run_ranks(_work, str(tmp_path_factory.mktemp("fsdp")), TIMEOUT_S, "FSDP")


# ============================================================================================================
# Single-process references
# ============================================================================================================
# One thread, as the workers run: a convolution sums in another order with more threads, and a BatchNorm over
# two values per channel (a two-sample sub-batch at 1x1) turns that last-bit difference into 1e-3.
@single_thread()
def emulate(spec):
    """The ranks' work in one process (module docstring); local counts per rank and step too."""
    model = convert(spec, SEED)
    sd.set_dropped_grads(model, spec["policy"])
    state = get_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rank_buffers = [buffers(model) for _ in range(WORLD)]
    counts = [[] for _ in range(WORLD)]
    for step in range(spec.get("steps", STEPS)):
        opt.zero_grad(set_to_none=True)
        for rank in range(WORLD):
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(rank_buffers[rank][name])
            state.shard = (rank, WORLD) if spec["mode"] != "batch" else None
            state.scheduler.step = step
            (loss_of(model(local_input(spec, step, rank))) / WORLD).backward()
            rank_buffers[rank] = buffers(model)
            counts[rank].append(list(state.host_plan.counts))
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": rank_buffers, "counts": counts}


def spec_of(name):
    return SCENARIOS.get(name) or family_scenarios()[name]


# ============================================================================================================
# Tests
# ============================================================================================================
ALL = [*SCENARIOS, *family_scenarios()]


@needs_fsdp2
@pytest.mark.parametrize("name", ALL)
def test_ranks_run_the_same_collectives_and_equal_one_process(ranks, name):
    spec = spec_of(name)
    r0, r1 = ranks[0][name], ranks[1][name]
    # SPMD: both ranks dispatched the same collectives, of the same sizes, in the same order, every step.
    assert r0["calls"] == r1["calls"]
    assert r0["steps"] == r1["steps"] == list(range(spec.get("steps", STEPS)))  # lockstep, uneven or not
    expected = emulate(spec)
    assert r0["local_counts"] == expected["counts"][0] and r1["local_counts"] == expected["counts"][1]
    tol = spec.get("tol", TOL)
    assert_close_dicts(r0["params"], expected["params"], tol)
    assert_close_dicts(r1["params"], r0["params"])  # the same full parameters on both ranks
    for rank in range(WORLD):  # FSDP2 keeps buffers (BatchNorm statistics) per rank
        assert_close_dicts(ranks[rank][name]["buffers"], expected["buffers"][rank], tol)


@needs_fsdp2
def test_the_scenarios_exercise_what_they_claim(ranks):
    """The hang case happened (a unit with survivors on one rank only), units were dropped before the last
    step in batch mode, and subset mode kept its fixed counts."""
    def counts(name, rank):
        return ranks[rank][name]["local_counts"]

    for name in ("row_helper_none_clear", "row_hand_zero_uneven", "row_bn_helper_zero", "row_hsdp_hand_zero"):
        one_rank_only = [(step, l) for step in range(STEPS - 1) for l in range(len(counts(name, 0)[0]))
                         if (counts(name, 0)[step][l] == 0) != (counts(name, 1)[step][l] == 0)]
        assert one_rank_only, name
    for name in ("batch_hand_none_uneven", "batch_helper_zero_prefetch", "batch_bn_helper_none"):
        assert any(0 in c for c in counts(name, 0)[:-1]), name
    assert ranks[0]["row_helper_checkpoint_compile"]["graphs"] > 0
    subset = counts("subset_helper_none_uneven", 1)
    survival = sd.uniform(4, 0.3)
    for step, step_counts in enumerate(subset):
        n = LOCAL_BATCH - (step == 2)
        assert step_counts == [max(int(n * p), 1) for p in survival]


@needs_fsdp2
@single_thread()
def test_row_mode_equals_one_process_over_the_global_batch(ranks):
    """GroupNorm, equal batches: the FSDP2 run is one process over the interleaved global batch."""
    spec = SCENARIOS["row_helper_none_clear"]
    model = convert(spec, SEED)
    sd.set_dropped_grads(model, "none")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    dropped = []
    for step in range(STEPS):
        x = global_input(spec, step)
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        opt.step()
        dropped.append([l for l, c in enumerate(get_state(model).host_plan.counts) if c == 0])
    got = ranks[0]["row_helper_none_clear"]
    assert_close_dicts(got["params"], {n: p.detach() for n, p in model.named_parameters()}, TOL)
    # clear_dropped_grads cleared the units without a survivor in the global batch, and some there were
    assert got["dropped"] == ranks[1]["row_helper_none_clear"]["dropped"] == dropped
    assert any(dropped[:-1]), dropped


def expected_collectives(counts, model, pattern, reshard=True):
    """All-gathers and reduce-scatters of one batch-mode step: the root gathers in forward only (it keeps its
    parameters for backward) and reduce-scatters; every other group that runs gathers in forward, again in
    backward (unless ``reshard_after_forward=False`` keeps it), and reduce-scatters. A dropped block's group
    runs only if it also holds a projection shortcut (sharding by hand); the helper shards the projection on
    its own, and that group always runs."""
    projection = PROJECTION_BLOCKS[model]
    groups = sum(1 for l, c in enumerate(counts) if c > 0 or (pattern == "hand" and l in projection))
    if pattern == "helper":
        groups += len(projection)
    return {"all_gather": 1 + (2 if reshard else 1) * groups, "reduce_scatter": 1 + groups}


@needs_fsdp2
@pytest.mark.parametrize("name", ["batch_hand_none_uneven", "batch_helper_zero_prefetch",
                                  "batch_bn_helper_none", "batch_helper_zero_kept", "batch_bf16_helper_zero"])
def test_batch_mode_communicates_for_the_units_that_ran_only(ranks, name):
    spec = SCENARIOS[name]
    for rank in range(WORLD):
        got = ranks[rank][name]
        for step, (counts, collectives) in enumerate(zip(got["local_counts"], got["collectives"])):
            collectives = {k: v for k, v in collectives.items() if k != "broadcast"}  # the first step's sync
            expected = expected_collectives(counts, spec["model"], spec["pattern"],
                                            spec.get("reshard_after_forward", True))
            assert collectives == expected, (step, counts)


@needs_fsdp2
def test_a_block_called_alone_gathers_only_when_it_runs(ranks):
    calls = ranks[0]["direct_block_calls"]
    assert calls == ranks[1]["direct_block_calls"]
    assert [step for step, _, _ in calls] == [1, 2, 3, 4]  # a fresh plan per call
    assert {count for _, count, _ in calls} == {0, 2}  # dropped in some calls, run in others
    for _, count, collectives in calls:  # its group: gather forward and backward, reduce-scatter; or nothing
        assert collectives == ({"all_gather": 2, "reduce_scatter": 1} if count else {}), calls


@needs_fsdp2
def test_revert_of_a_sharded_model_is_refused(ranks):
    for rank in range(WORLD):
        assert ranks[rank]["revert_error"] is not None and "FSDP2" in ranks[rank]["revert_error"]


@needs_fsdp2
def test_checkpoint_resumes_gates_and_parameters_exactly(ranks):
    for rank in range(WORLD):
        got = ranks[rank]["dcp_resume"]
        assert got["counts"] == got["expected_counts"]
        assert_close_dicts(got["params"], got["expected"])


# ============================================================================================================
# A rank dies mid-run: the other fails fast instead of hanging
# ============================================================================================================
def _killed_rank_setup(rank, mode):
    spec = {**SCENARIOS["row_helper_none_clear"], "mode": mode}
    model = convert(spec, SEED)
    sd.fully_shard(model)
    return model, lambda step: loss_of(model(local_input(spec, step % STEPS, rank)))


@needs_fsdp2
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_a_killed_rank_makes_the_other_fail_fast(tmp_path, mode):
    common.assert_the_other_fails_fast(_killed_rank_setup, tmp_path, mode, LR, join_timeout_s=120)


# ============================================================================================================
# Single process: arguments and the torch requirement
# ============================================================================================================
def test_fully_shard_arguments():
    with pytest.raises(ValueError, match="model.*not converted"):
        sd.fully_shard(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        sd.fully_shard("model")


@needs_fsdp2
def test_fully_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        sd.fully_shard(sd.convert(gn_model(), seed=0))


def test_fully_shard_needs_torch_2_7(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(RuntimeError, match=r"torch >= 2\.7.*2\.6\.0"):
        sd.fully_shard(sd.convert(gn_model(), seed=0))
