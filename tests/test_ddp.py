"""DDP: two gloo processes on CPU train a converted model with DDP's default flags, equal to one process.

The workers run in spawned processes (``torch.multiprocessing``) with a bounded process-group timeout and a
bounded join, so a hang fails the test instead of blocking CI. One spawn runs every scenario (module-scoped
fixture); the tests below check its results against single-process references computed here. Rank r trains
on samples ``r, r + WORLD, ...`` of each global batch: the order in which row mode's gates interleave ranks,
so that a single process over the global batch draws exactly the ranks' gates.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from sdepth_ext.plan import shard_plan
from sdepth_ext.state import get_state
from tests import distributed_common as common
from tests.conftest import drops_some_keeps_some, seed_where
from tests.distributed_common import WORLD, assert_close_dicts, bn_model, gn_model, local_slice

LOCAL_BATCH = 4
STEPS = 4  # >= 3, and drops must happen before the last step: DDP fails at the step *after* a drop
SEED = 100  # rank r converts with SEED + r; ddp_ready broadcasts rank 0's stream, so SEED is the reference's
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3
TIMEOUT_S = 240  # the whole spawn; the process group itself times out after 60 s


# ============================================================================================================
# Models, data, one training run (shared by the workers and the single-process references)
# ============================================================================================================
MODELS = {"gn": gn_model, "bn": bn_model}


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (WORLD * LOCAL_BATCH,), generator=g)
    return x, y


def snapshot(model):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def global_counts(model):
    """Survivors per unit in the global batch (row mode: the ranks' plans together; no communication)."""
    state = get_state(model)
    plan = state.host_plan
    if state.shard is None:
        return list(plan.counts)
    return list(state.scheduler.draw(plan.step, plan.batch_size * WORLD).counts)


# ============================================================================================================
# The worker (one per rank)
# ============================================================================================================
def ddp_train(kind, mode, rank, ready=True, clear=False, uneven_step=None):
    """``uneven_step``: at that step rank 1 trains on one sample fewer (a last partial batch, an uneven
    sampler): the ranks' gate streams must stay in lockstep and their parameters equal."""
    model = sd.convert(MODELS[kind](), p_last=0.5, rule="uniform", mode=mode, seed=SEED + rank).train()
    if ready:
        sd.ddp_ready(model)
    else:  # dropped blocks without a gradient: what DDP's default flags cannot take
        sd.set_dropped_grads(model, "none")
    ddp = DistributedDataParallel(model)  # default flags: find_unused_parameters=False
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    counts, local_counts, dropped, steps = [], [], [], []
    for step in range(STEPS):
        x, y = (local_slice(t, rank) for t in global_batch(step))
        if step == uneven_step and rank == 1:
            x, y = x[:-1], y[:-1]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        if clear:
            sd.clear_dropped_grads(ddp)  # row mode: a collective (all-reduce of the survivor counts)
            dropped.append(sd.dropped_blocks(ddp))
        opt.step()
        if uneven_step is None:
            counts.append(global_counts(model))
        local_counts.append(list(get_state(model).host_plan.counts))
        steps.append(get_state(model).host_plan.step)
    return {**snapshot(model), "counts": counts, "local_counts": local_counts, "dropped": dropped,
            "steps": steps}


def _work(rank, out_dir):
    results = {
        # batch mode, BatchNorm, "no gradient" semantics restored after the all-reduce
        "batch_bn": ddp_train("bn", "batch", rank, clear=True),
        # batch mode, BatchNorm, the default "zero" semantics (decay and momentum on dropped blocks)
        "batch_bn_zero": ddp_train("bn", "batch", rank),
        # row mode, GroupNorm: equal to one process over the concatenated batch
        "row_gn": ddp_train("gn", "row", rank),
        # row mode, BatchNorm: trains without errors (statistics are per rank, so no exact reference)
        "row_bn": ddp_train("bn", "row", rank),
        # row mode, "no gradient" semantics: the ranks agree on the globally dropped units
        "row_gn_clear": ddp_train("gn", "row", rank, clear=True),
        # row mode, unequal per-rank batches at step 1
        "row_gn_uneven": ddp_train("gn", "row", rank, clear=True, uneven_step=1),
    }
    # sync_scheduler gives every rank rank 0's seed, step and drop scale (a schedule's value)
    synced = sd.convert(gn_model(), mode="row", seed=SEED + rank)
    sd.set_drop_scale(synced, 0.25 if rank == 0 else 0.75)
    sd.get_scheduler(synced).step = 10 + rank
    sd.sync_scheduler(synced)
    results["synced_state"] = sd.get_scheduler(synced).state_dict()
    # SyncBatchNorm in row mode would hang (a rank without survivors skips the collective): refused on
    # every rank, before any collective of the model runs.
    try:
        sync = sd.convert(nn.SyncBatchNorm.convert_sync_batchnorm(bn_model()), mode="row", seed=0)
        sd.ddp_ready(sync)
        results["sync_bn_error"] = None
    except ValueError as err:
        results["sync_bn_error"] = str(err)
    # Negative control: the same batch-mode run without ddp_ready fails at the step after a drop.
    try:
        ddp_train("bn", "batch", rank, ready=False)
        results["unready_error"] = None
    except RuntimeError as err:
        results["unready_error"] = str(err)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return common.run_ranks(_work, str(tmp_path_factory.mktemp("ddp")), TIMEOUT_S, "DDP")


# ============================================================================================================
# Single-process references
# ============================================================================================================
def reference_batch_bn(policy):
    """What DDP computes for a BatchNorm model in batch mode, in one process.

    Each rank normalises with its own batch statistics: run the two halves separately, with the plan of the
    step (batch-mode gates do not depend on the batch size: rewind the stream for the second half) and add
    the gradients / 2 (DDP averages). DDP broadcasts rank 0's buffers before every forward, so the running
    statistics are rank 0's: run rank 1's half first and restore the buffers after it. ``policy``: the
    dropped-gradient policy ("none": what the DDP run restores with clear_dropped_grads).
    """
    model = sd.convert(bn_model(), p_last=0.5, rule="uniform", mode="batch", seed=SEED).train()
    sd.set_dropped_grads(model, policy)
    scheduler = get_state(model).scheduler
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        F.cross_entropy(model(local_slice(x, 1)), local_slice(y, 1)).backward()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        scheduler.step = step  # rewind: rank 0 draws the same step
        F.cross_entropy(model(local_slice(x, 0)), local_slice(y, 0)).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(WORLD)
        opt.step()
    return snapshot(model)


def reference_row_gn(clear=False):
    """One process over the global batch; zero gradients for blocks without any survivor (as DDP), or no
    gradient (``clear``: what clear_dropped_grads restores)."""
    model = sd.convert(gn_model(), p_last=0.5, rule="uniform", mode="row", seed=SEED).train()
    sd.set_dropped_grads(model, "none" if clear else "zero")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    counts = []
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        counts.append(list(get_state(model).host_plan.counts))
    return {**snapshot(model), "counts": counts}


# gloo's all-reduce may sum in another order than the reference: a few float32 ulps after 4 SGD steps.
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ============================================================================================================
# Tests
# ============================================================================================================
@pytest.mark.parametrize("scenario", ["batch_bn", "batch_bn_zero", "row_gn", "row_bn", "row_gn_clear",
                                      "row_gn_uneven"])
def test_ranks_agree_and_drop_before_the_last_step(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["counts"] == r1["counts"]  # the same (global) plan on both ranks, seeds SEED and SEED + 1
    assert r0["steps"] == r1["steps"] == list(range(STEPS))  # in lockstep, unequal batches or not
    assert r0["dropped"] == r1["dropped"]
    # Some block ran on no sample of some rank before the last step (what breaks default DDP).
    assert any(0 in counts for r in (r0, r1) for counts in r["local_counts"][:-1]), r0["local_counts"]
    if scenario.startswith("row"):  # the ranks' slices differ: independent gates per sample
        assert r0["local_counts"] != r1["local_counts"]
    assert_close_dicts(r0["params"], r1["params"])
    for p in r0["params"].values():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("scenario, policy", [("batch_bn", "none"), ("batch_bn_zero", "zero")])
def test_batch_mode_with_batchnorm_equals_single_process(ranks, scenario, policy):
    """SGD with momentum and weight decay: the DDP run equals one process under either dropped-gradient
    policy (the "zero" run moves dropped blocks' weights by weight decay, the "none" run does not)."""
    expected = reference_batch_bn(policy)
    assert_close_dicts(ranks[0][scenario]["params"], expected["params"], TOL)
    # Running statistics and num_batches_tracked: those of rank 0 (DDP broadcasts them), undisturbed by the
    # dropped blocks that ddp_ready made take part in autograd.
    assert_close_dicts(ranks[0][scenario]["buffers"], expected["buffers"], TOL)
    # The two policies really differ on this run (some block was dropped before the last step).
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["batch_bn"]["params"].values(),
                                                     ranks[0]["batch_bn_zero"]["params"].values()))


@pytest.mark.parametrize("scenario", ["row_gn", "row_gn_clear"])
def test_row_mode_equals_single_process_over_the_global_batch(ranks, scenario):
    expected = reference_row_gn(clear=scenario.endswith("clear"))
    got = ranks[0][scenario]
    assert got["counts"] == expected["counts"]
    # Some block has survivors on one rank only (else sharding would be untested).
    assert any(0 < c < WORLD * LOCAL_BATCH for counts in got["counts"] for c in counts)
    assert_close_dicts(got["params"], expected["params"], TOL)
    if scenario.endswith("clear"):  # the units cleared are those without a survivor on any rank
        assert got["dropped"] == [[l for l, c in enumerate(counts) if c == 0] for counts in got["counts"]]


def test_unequal_batches_keep_the_ranks_in_lockstep(ranks):
    """Rank 1 trained one step on 3 samples instead of 4: every later step's gates are still the ones the
    stream defines for that step (nothing shifted), and the parameters stay equal on both ranks."""
    for rank in range(WORLD):
        got = ranks[rank]["row_gn_uneven"]
        scheduler = sd.Scheduler(sd.uniform(4, 0.5), mode="row", seed=SEED)
        for step, counts in enumerate(got["local_counts"]):
            n = LOCAL_BATCH - 1 if (step == 1 and rank == 1) else LOCAL_BATCH
            assert counts == scheduler.draw(step, n, rank=rank, world_size=WORLD).counts
    assert_close_dicts(ranks[0]["row_gn_uneven"]["params"], ranks[1]["row_gn_uneven"]["params"])


def test_sync_scheduler_broadcasts_seed_step_and_drop_scale(ranks):
    a, b = ranks[0]["synced_state"], ranks[1]["synced_state"]
    assert a == b and (a["seed"], a["step"], a["drop_scale"]) == (SEED, 10, 0.25)


def test_sync_batchnorm_in_row_mode_is_refused_on_every_rank(ranks):
    for r in ranks:
        assert r["sync_bn_error"] is not None and "SyncBatchNorm" in r["sync_bn_error"]


def test_without_ddp_ready_default_ddp_fails(ranks):
    """The pitfall the helper fixes (proves the scenario really drops blocks under DDP)."""
    for r in ranks:
        assert r["unready_error"] is not None and "reduction" in r["unready_error"]


# ============================================================================================================
# A rank dies mid-run: the survivor fails fast with an error instead of hanging
# ============================================================================================================
def _killed_rank_setup(rank, mode):
    model = sd.convert(gn_model(), p_last=0.5, rule="uniform", mode=mode, seed=SEED).train()
    sd.ddp_ready(model)
    ddp = DistributedDataParallel(model)

    def loss_at(step):
        x, y = (local_slice(t, rank) for t in global_batch(step))
        return F.cross_entropy(ddp(x), y)

    return ddp, loss_at


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_a_killed_rank_makes_the_other_fail_fast(tmp_path, mode):
    common.assert_the_other_fails_fast(_killed_rank_setup, tmp_path, mode, LR, join_timeout_s=90)


# ============================================================================================================
# Single process: what ddp_ready does to gradients and BatchNorm; optimizer semantics
# ============================================================================================================
def _dropped_step(policy, seed=None):
    """One training step of cifar_resnet(8) where some block is dropped; returns (model, dropped, before)."""
    if seed is None:
        seed = seed_where(drops_some_keeps_some, sd.uniform(3, 0.3), "batch", 4)
    torch.manual_seed(0)
    model = sd.convert(sd.cifar_resnet(8), p_last=0.3, rule="uniform", mode="batch", seed=seed).train()
    if policy == "ddp_ready":
        sd.ddp_ready(model)  # no process group: only the zero-gradient part
    elif policy is not None:
        sd.set_dropped_grads(model, policy)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    dropped = sd.dropped_blocks(model)
    assert dropped and len(dropped) < 3  # the seed drops some blocks and keeps others
    return model, dropped, before


def residual_params(block):
    return [(n, p) for n, p in block.named_parameters() if not n.startswith("downsample.")]


@pytest.mark.parametrize("policy", [None, "none", "zero", "ddp_ready"])
def test_dropped_block_gradients_and_batchnorm_buffers(policy):
    model, dropped, before = _dropped_step(policy)
    blocks = get_state(model).blocks
    zero = policy in (None, "zero", "ddp_ready")  # "zero" is the default
    for l in dropped:
        for name, p in residual_params(blocks[l]):
            if zero:
                assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
            else:
                assert p.grad is None, name
        # Its BatchNorm layers never ran: running stats and num_batches_tracked are those before the step.
        prefix = next(n for n, m in model.named_modules() if m is blocks[l])
        for name, buf in blocks[l].named_buffers():
            if not name.startswith("downsample."):
                assert torch.equal(buf, before[f"{prefix}.{name}"]), name
    kept = [l for l in range(len(blocks)) if l not in dropped]
    for l in kept:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in residual_params(blocks[l]))


class _FillCounter(TorchDispatchMode):
    """Counts the aten ops that write zeros (``zeros``, ``zero_``, ``_foreach_zero_``, ``fill_``, ...)."""

    def __init__(self):
        super().__init__()
        self.fills = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("zeros", "zero_", "_foreach_zero_", "fill_", "new_zeros", "zeros_like"):
            self.fills += 1
        return func(*args, **(kwargs or {}))


def _drops_several(plan):
    return sum(c == 0 for c in plan.counts) >= 2 and any(plan.counts)


def test_dropped_gradients_cost_one_fill_per_step_not_per_unit_or_parameter():
    """The default "zero" policy's backward: one zero fill per step (all dropped units' gradients come out of
    it), however many units were dropped and parameters they have; a second backward before zero_grad
    (gradient accumulation) leaves the existing zero gradients alone with no fill at all, unless DDP needs
    every gradient (ddp_ready)."""
    seed = seed_where(_drops_several, sd.uniform(9, 0.5), "batch", 4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for ready in (False, True):
        torch.manual_seed(0)
        model = sd.convert(sd.cifar_resnet(20), p_last=0.5, rule="uniform", mode="batch", seed=seed).train()
        if ready:
            sd.ddp_ready(model)
        F.cross_entropy(model(x), y).backward()  # the first forward: where the forward ends is learned
        model.zero_grad(set_to_none=True)
        sd.get_scheduler(model).step -= 1
        loss = F.cross_entropy(model(x), y)
        dropped = sd.dropped_blocks(model)
        assert len(dropped) >= 2
        params = [p for l in dropped for p in get_state(model).unit_parameters(l)]
        assert len(params) >= 6 * len(dropped)  # two convs and two BatchNorms (weight, bias) per unit
        with _FillCounter() as counter:
            loss.backward()
        assert counter.fills == 1
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
        sd.get_scheduler(model).step -= 1  # the same plan again: accumulate into the existing gradients
        loss = F.cross_entropy(model(x), y)
        assert sd.dropped_blocks(model) == dropped
        grads = [p.grad for p in params]
        with _FillCounter() as counter:
            loss.backward()
        assert counter.fills == (1 if ready else 0)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
        if not ready:
            assert all(p.grad is g for p, g in zip(params, grads))  # untouched, not replaced


@pytest.mark.parametrize("policy", ["none", "zero", "zero+clear"])
def test_optimizer_semantics_of_dropped_blocks(policy):
    """"none": no gradient, so SGD with momentum and weight decay leaves a dropped block's weights as they
    were; "zero": weight decay (and momentum) still move them; clear_dropped_grads restores "none"."""
    model, dropped, _ = _dropped_step("zero" if policy.startswith("zero") else "none")
    if policy == "zero+clear":
        assert sd.clear_dropped_grads(model) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    blocks = get_state(model).blocks
    before = {id(p): p.detach().clone() for l in dropped for _, p in residual_params(blocks[l])}
    opt.step()
    for l in dropped:
        for name, p in residual_params(blocks[l]):
            if policy == "zero":
                # p <- p - lr * wd * p for a zero gradient (momentum buffer starts at wd * p)
                torch.testing.assert_close(p.detach(), before[id(p)] * (1 - 0.1 * 0.1), msg=name)
                assert p in opt.state and "momentum_buffer" in opt.state[p]
            else:
                assert torch.equal(p.detach(), before[id(p)]), name
                assert p not in opt.state or not opt.state[p], name


def test_dropped_grads_arguments():
    model = sd.convert(sd.cifar_resnet(8), seed=0)
    with pytest.raises(ValueError, match="policy.*zero.*none"):
        sd.set_dropped_grads(model, "skip")
    with pytest.raises(ValueError, match="model"):
        sd.ddp_ready(sd.cifar_resnet(8))  # not converted
    with pytest.raises(TypeError, match="model"):
        sd.clear_dropped_grads("model")
    with pytest.raises(RuntimeError, match="process group"):
        sd.sync_scheduler(model)


def test_dropped_identity_block_output_may_be_modified_in_place():
    """The zero-gradient node returns a fresh autograd tensor, not a view (autograd forbids in-place ops on a
    custom Function's view output): an in-place ReLU after a dropped block works as without the node. (The
    block input is a conv output, which no backward needs, so modifying it in place is legal.)"""
    model = sd.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4, 4), nn.ReLU(inplace=True)),
                       p_last=0.0, rule="uniform", seed=0).train()
    sd.set_dropped_grads(model, "zero")
    torch.manual_seed(0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert sd.dropped_blocks(model) == [0]
    assert torch.equal(model[1].conv1.weight.grad, torch.zeros_like(model[1].conv1.weight))
    assert model[0].weight.grad.abs().sum() > 0


def test_shard_plan_slices_the_global_plan():
    scheduler = sd.Scheduler(sd.uniform(6, 0.5), mode="row", seed=5)
    for _ in range(20):
        plan = scheduler.sample(8)
        for rank in range(2):
            local = shard_plan(plan, rank, 2)
            assert local.batch_size == 4
            for l in range(6):
                expected = [g // 2 for g in plan.survivors(l) if g % 2 == rank]
                assert local.survivors(l) == expected and local.counts[l] == len(expected)
            assert local.active == [l for l in range(6) if local.counts[l]]
    with pytest.raises(ValueError, match="world_size"):
        shard_plan(scheduler.sample(7), 0, 2)
    with pytest.raises(ValueError, match="row-mode"):
        shard_plan(sd.Scheduler([0.5], seed=0).sample(4), 0, 2)


def test_dropped_blocks_of_a_shard_are_the_global_plans():
    """Without a process group, a sharded model's dropped units are those of the global plan (zero survivors
    in the whole batch), not of its own slice: clearing the local ones would drop gradients that other
    ranks' samples produced."""
    model = sd.convert(gn_model(), p_last=0.3, rule="uniform", mode="row", seed=3).train()
    get_state(model).shard = (0, 2)
    scheduler = sd.Scheduler(sd.uniform(4, 0.3), mode="row", seed=3)
    differs = 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for step in range(60):
            model(x)
            global_plan = scheduler.draw(step, 4)
            local = get_state(model).host_plan
            assert sd.dropped_blocks(model) == [l for l, c in enumerate(global_plan.counts) if c == 0]
            differs += [l for l, c in enumerate(local.counts) if c == 0] != sd.dropped_blocks(model)
    assert differs > 0

