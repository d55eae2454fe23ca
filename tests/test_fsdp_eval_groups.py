"""FSDP2, two gloo processes: a sharded converted model in eval, and a two-unit block sharded as one group.

* **Eval after training.** After batch-mode training steps (the last one dropping units whose groups it
  bypassed), ``model.eval()`` and no-grad forwards: the scheduler's step does not move, every group gathers
  its parameters (nothing bypassed on a stale plan), and the outputs equal the unsharded model's with the
  same parameters. With ``sd.fully_shard``'s groups (one per unit) and with
  two-unit blocks sharded by hand as one group.
* **A two-unit block sharded by hand as one group** (torchtitan's loop over Swin blocks), batch mode: with
  one unit dropped and the other kept, the group gathers (forward and backward) and reduce-scatters; with
  both dropped it issues no collective. Training equals one process over the global batch (LayerNorm:
  per-sample normalisation).

Helpers (spawn, the FSDP2 skip, parameters, loss) are tests/test_fsdp.py's.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock

import sdepth_ext as sd
from sdepth_ext.fsdp import count_collectives
from tests.conftest import single_thread
from tests.distributed_common import WORLD, full_params, gn_model, loss_of, needs_fsdp2, run_ranks

LOCAL_BATCH = 4
STEPS = 3
LR = 0.1
TIMEOUT_S = 300
TOL = {"rtol": 1e-4, "atol": 1e-5}
# Seeds whose plans exercise the cases (checked by test_the_scenarios_exercise_what_they_claim)
RESNET_SEED, SWIN_SEED = 3, 5


def small_swin():
    """Four Swin v1 blocks (two units each) at 32x32."""
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], stochastic_depth_prob=0.5, num_classes=5)


MODELS = {"resnet": (gn_model, RESNET_SEED), "swin": (small_swin, SWIN_SEED)}


def convert(name):
    make, seed = MODELS[name]
    return sd.convert(make(), p_last=0.5, rule="uniform", mode="batch", seed=seed).train()


def global_input(step, size=32):
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(WORLD * LOCAL_BATCH, 3, size, size, generator=g)


def eval_input():
    return global_input(99)[:LOCAL_BATCH]


# ============================================================================================================
# The worker (one per rank)
# ============================================================================================================
def train_and_eval(name, rank):
    """Train STEPS batch-mode steps (collectives and dropped units per step), then two eval forwards."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = convert(name)
    if name == "swin":  # by hand, torchtitan's loop: each two-unit block one group, then the root
        for block in (m for m in model.modules() if isinstance(m, SwinTransformerBlock)):
            fully_shard(block)
        fully_shard(model)
    else:
        sd.fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    record = {"collectives": [], "dropped": []}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with count_collectives() as counted:
            loss_of(model(global_input(step)[rank::WORLD])).backward()
        opt.step()
        record["collectives"].append({k: v for k, v in counted.counts.items() if k != "broadcast"})
        record["dropped"].append(sd.dropped_blocks(model))
    record["groups"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    record["step_before_eval"] = sd.get_scheduler(model).step
    model.eval()
    record["eval"] = []
    with torch.no_grad():
        for _ in range(2):
            with count_collectives() as counted:
                out = model(eval_input())
            record["eval"].append((out.clone(), dict(counted.counts)))
    record["step_after_eval"] = sd.get_scheduler(model).step
    record["params"] = full_params(model)
    return record


def run(name, rank):
    """:func:`train_and_eval`, or what it raised (both ranks raise alike: they run the same plans), so that
    a test reports it instead of the spawn failing as a whole."""
    try:
        return train_and_eval(name, rank)
    except RuntimeError as err:  # e.g. a unit run with its parameters still sharded (a wrong bypass)
        return {"error": f"{type(err).__name__}: {err}"}


def _work(rank, out_dir):
    return {name: run(name, rank) for name in MODELS}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_work, str(tmp_path_factory.mktemp("fsdp_eval_groups")), TIMEOUT_S, "FSDP eval")


# ============================================================================================================
# Single-process references
# ============================================================================================================
@single_thread()
def unsharded(name, params):
    model = convert(name)
    model.load_state_dict({**dict(model.named_buffers()), **params})  # buffers: the same constants
    return model


@single_thread()
def one_process(name):
    model = convert(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(model(global_input(step))).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def units_of_groups(name):
    """The units each FSDP group other than the root holds (Swin by hand: a block's two)."""
    num_units = len(sd.survival_probs(convert(name)))
    return [(2 * b, 2 * b + 1) for b in range(num_units // 2)] if name == "swin" else None


# ============================================================================================================
# Tests
# ============================================================================================================
@needs_fsdp2
def test_the_scenarios_exercise_what_they_claim(ranks):
    """The last training step bypassed some group (a stale plan would bypass it in eval too), and the Swin
    run had blocks with one unit dropped and the other kept, and blocks with both dropped."""
    for rank in range(WORLD):
        for name in MODELS:
            assert "error" not in ranks[rank][name], ranks[rank][name]["error"]
    assert ranks[0]["resnet"]["dropped"][-1]  # one group per unit
    last = ranks[0]["swin"]["dropped"][-1]
    assert any(all(u in last for u in group) for group in units_of_groups("swin")), last
    pairs = [sum(u in dropped for u in group) for dropped in ranks[0]["swin"]["dropped"]
             for group in units_of_groups("swin")]
    assert 1 in pairs and 2 in pairs, pairs


@needs_fsdp2
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_after_training_gathers_every_group_keeps_the_step_and_equals_unsharded(ranks, name):
    for rank in range(WORLD):
        got = ranks[rank][name]
        assert "error" not in got, got["error"]
        assert got["step_after_eval"] == got["step_before_eval"] == STEPS
        # Every group gathers its parameters, each unit's too; the root (resharded by the last backward)
        # keeps its own after the first forward, as FSDP2 keeps a root's (reshard_after_forward=False)
        assert [collectives for _, collectives in got["eval"]] == [{"all_gather": got["groups"]},
                                                                   {"all_gather": got["groups"] - 1}]
    reference = unsharded(name, ranks[0][name]["params"]).eval()
    with torch.no_grad(), single_thread():
        expected = reference(eval_input())
    for rank in range(WORLD):
        for out, _ in ranks[rank][name]["eval"]:
            torch.testing.assert_close(out, expected, **TOL)


@needs_fsdp2
def test_a_two_unit_block_group_gathers_unless_both_units_drop(ranks):
    groups = units_of_groups("swin")
    for rank in range(WORLD):
        got = ranks[rank]["swin"]
        assert "error" not in got, got["error"]
        for step, (dropped, collectives) in enumerate(zip(got["dropped"], got["collectives"])):
            running = sum(1 for group in groups if not all(u in dropped for u in group))
            # the root: one all-gather (it keeps its parameters for backward) and one reduce-scatter; a block
            # group that runs: all-gathers in forward and backward, one reduce-scatter; both units dropped:
            # nothing
            expected = {"all_gather": 1 + 2 * running, "reduce_scatter": 1 + running}
            assert collectives == expected, (step, dropped)
    assert ranks[0]["swin"]["dropped"] == ranks[1]["swin"]["dropped"]
    reference = one_process("swin")
    for rank in range(WORLD):
        params = ranks[rank]["swin"]["params"]
        assert params.keys() == reference.keys()
        for n in params:
            torch.testing.assert_close(params[n], reference[n], **TOL, msg=n)
