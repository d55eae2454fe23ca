"""FSDP2 on 2-D meshes, four gloo processes: which rows each rank draws in row mode.

* **HSDP on a 2x2 mesh** (replicas x shards), sharded by hand: the data-parallel rank is the flattened mesh
  coordinate, so the four ranks draw four distinct slices of the global batch, and training equals one
  process over the global batch. (On 1-D and (2, 1) meshes a wrong flattening gives the same numbers.)
* **Tensor parallelism** (a 2x2 mesh, data-parallel x tensor-parallel; the stem is a tensor-parallel
  ``Linear``, so the first parameter lies on both dimensions), with ``sd.fully_shard(model, mesh=dp_mesh)``
  and sharded by hand with ``mesh=dp_mesh``: the data-parallel rank is the coordinate on the mesh FSDP2 was
  given, tensor-parallel peers see the same samples and draw the same rows, and training equals one
  process over the global batch. Under DDP the data-parallel group goes to
  ``sd.ddp_ready(process_group=...)`` after an ``sd.sync_scheduler`` over every rank.

Rows are observed from outside: a hook on each block records its input, one on the first layer of its
branch the sub-batch the branch ran on, and the test maps the sub-batch back to sample indices. Helpers
(the FSDP2 skip, parameters, loss) are tests/test_fsdp.py's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from tests.distributed_common import full_params, loss_of, needs_fsdp2, run_ranks

WORLD = 4
MESH = (2, 2)
LOCAL_BATCH = 4
STEPS = 3
SEED = 100  # rank r converts with SEED + r: the installation broadcasts rank 0's stream to every rank
LR = 0.1
P = 0.5  # uniform survival, row mode
TIMEOUT_S = 300  # the whole spawn; the process group itself times out after 60 s
TOL = {"rtol": 1e-4, "atol": 1e-5}


# ============================================================================================================
# Model, data, rows
# ============================================================================================================
def _gn(channels):
    return nn.GroupNorm(2, channels)


def make_model(tp_stem: bool):
    """ResNet blocks with GroupNorm (per-sample normalisation: row mode equals one process over the global
    batch); with ``tp_stem``, a ``Linear`` over the image's last dimension first (tensor-parallel in TP)."""
    torch.manual_seed(0)
    stem = [nn.Linear(8, 8)] if tp_stem else []
    return nn.Sequential(
        *stem, nn.Conv2d(3, 8, 3, padding=1, bias=False), _gn(8), nn.ReLU(),
        BasicBlock(8, 8, norm_layer=_gn), BasicBlock(8, 8, norm_layer=_gn), BasicBlock(8, 8, norm_layer=_gn),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def convert(model, seed):
    return sd.convert(model, p_last=P, rule="uniform", mode="row", scaling="inverted", seed=seed).train()


def global_input(step, dp_size):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(dp_size * LOCAL_BATCH, 3, 8, 8, generator=g)


class RowRecorder:
    """Per forward, per converted block: the sample indices its branch ran on (matched by value; none where
    the branch did not run, or ran on an empty sub-batch)."""

    def __init__(self, model):
        self.steps: list[list[list[int]]] = []
        self._x = None
        self._blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        for i, block in enumerate(self._blocks):
            block.register_forward_pre_hook(self._block_input)
            block.conv1.register_forward_pre_hook(lambda module, args, i=i: self._branch_input(i, args))

    def start_step(self):
        self.steps.append([[] for _ in self._blocks])

    def _block_input(self, module, args):
        self._x = args[0].detach()

    def _branch_input(self, i, args):
        x, sub = self._x, args[0].detach()
        self.steps[-1][i] = [n for n in range(x.shape[0]) if any(torch.equal(x[n], s) for s in sub)]


def train(model, dp_rank, dp_size, record: RowRecorder):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x = global_input(step, dp_size)[dp_rank::dp_size]
        opt.zero_grad(set_to_none=True)
        record.start_step()
        loss_of(model(x)).backward()
        opt.step()


# ============================================================================================================
# Scenarios (one per rank, in the spawned workers)
# ============================================================================================================
def hsdp_by_hand(rank, mesh):
    """torchtitan's loop on a (replicas, shards) mesh; the first training forward installs the gates."""
    from torch.distributed.fsdp import fully_shard

    model = convert(make_model(tp_stem=False), SEED + rank)
    record = RowRecorder(model)
    for block in (m for m in model.modules() if isinstance(m, BasicBlock)):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    coordinate = mesh.get_coordinate()
    train(model, coordinate[0] * MESH[1] + coordinate[1], WORLD, record)
    return {"rows": record.steps, "params": full_params(model), "seed": sd.get_scheduler(model).seed}


def tensor_parallel(model, mesh):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(model[0], mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
    return model


def tp_train(rank, mesh, by_hand):
    """The stem tensor-parallel, the rest data-parallel: ``sd.fully_shard(model, mesh=dp_mesh)``, or by hand
    (torchtitan's loop with ``mesh=dp_mesh``; the first training forward installs the gates)."""
    from torch.distributed.fsdp import fully_shard

    model = convert(tensor_parallel(make_model(tp_stem=True), mesh), SEED + rank)
    record = RowRecorder(model)
    if by_hand:
        for block in (m for m in model.modules() if isinstance(m, BasicBlock)):
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        sd.fully_shard(model, mesh=mesh["dp"])
    first = next(model.parameters())
    train(model, mesh.get_coordinate()[0], MESH[0], record)
    return {"rows": record.steps, "params": full_params(model), "seed": sd.get_scheduler(model).seed,
            "first_param_mesh_ndim": first.device_mesh.ndim}


def ddp_tp(rank, mesh):
    """DDP over the data-parallel group of a (dp, tp) mesh: tensor-parallel peers draw the same rows."""
    model = convert(make_model(tp_stem=False), SEED + rank)
    record = RowRecorder(model)
    group = mesh["dp"].get_group()
    sd.sync_scheduler(model)  # every rank: tensor-parallel peers too
    sd.ddp_ready(model, process_group=group, sync=False)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
    record.start_step()
    dp_rank = mesh.get_coordinate()[0]
    loss_of(ddp(global_input(0, MESH[0])[dp_rank::MESH[0]])).backward()
    return {"rows": record.steps, "seed": sd.get_scheduler(model).seed}


def _work(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))  # HSDP: (replicate, shard)
    return {"coordinate": mesh.get_coordinate(), "hsdp": hsdp_by_hand(rank, mesh),
            "tp": tp_train(rank, mesh, by_hand=False),
            "tp_by_hand": tp_train(rank, mesh, by_hand=True), "ddp_tp": ddp_tp(rank, mesh)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("fsdp_mesh"))
    return run_ranks(_work, out_dir, TIMEOUT_S, "FSDP mesh", world_size=WORLD)


# ============================================================================================================
# Single-process references
# ============================================================================================================
def expected_rows(dp_rank, dp_size, steps=STEPS, units=3):
    scheduler = sd.Scheduler([P] * units, mode="row", seed=SEED)
    return [[scheduler.draw(step, LOCAL_BATCH, rank=dp_rank, world_size=dp_size).survivors(l)
             for l in range(units)] for step in range(steps)]


def one_process(dp_size):
    """The model trained in one process over the global batch (row mode interleaves ranks' samples)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = convert(make_model(tp_stem=dp_size == MESH[0]), SEED)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss_of(model(global_input(step, dp_size))).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_close_dicts(got, expected):
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


# ============================================================================================================
# Tests
# ============================================================================================================
@needs_fsdp2
def test_hsdp_2x2_ranks_draw_distinct_rows_and_equal_one_process(ranks):
    rows = [ranks[r]["hsdp"]["rows"] for r in range(WORLD)]
    for r in range(WORLD):
        replica, shard = ranks[r]["coordinate"]
        assert ranks[r]["hsdp"]["seed"] == SEED
        assert rows[r] == expected_rows(replica * MESH[1] + shard, WORLD), r
    assert len({repr(r) for r in rows}) == WORLD  # four distinct slices of the global batch
    expected = one_process(WORLD)
    for r in range(WORLD):
        assert_close_dicts(ranks[r]["hsdp"]["params"], expected)


@needs_fsdp2
@pytest.mark.parametrize("name", ["tp", "tp_by_hand"])
def test_tensor_parallel_peers_draw_the_same_rows_and_equal_one_process(ranks, name):
    assert ranks[0][name]["first_param_mesh_ndim"] == 2  # the case: the first parameter is on dp x tp
    for r in range(WORLD):
        dp_rank, _ = ranks[r]["coordinate"]
        assert ranks[r][name]["seed"] == SEED
        assert ranks[r][name]["rows"] == expected_rows(dp_rank, MESH[0]), r
    # ranks 0, 1, 2 are (dp, tp) = (0, 0), (0, 1), (1, 0)
    assert ranks[0][name]["rows"] == ranks[1][name]["rows"] != ranks[2][name]["rows"]
    expected = one_process(MESH[0])
    for r in range(WORLD):
        assert_close_dicts(ranks[r][name]["params"], expected)


@needs_fsdp2
def test_ddp_over_the_data_parallel_group_of_a_tensor_parallel_mesh(ranks):
    for r in range(WORLD):
        dp_rank, _ = ranks[r]["coordinate"]
        assert ranks[r]["ddp_tp"]["seed"] == SEED
        assert ranks[r]["ddp_tp"]["rows"] == expected_rows(dp_rank, MESH[0], steps=1), r
