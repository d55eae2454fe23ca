"""What a converted unit keeps for backward and launches, counted exactly (benchmarks.counting).

A ResNet unit (torchvision BasicBlock behind a ReLU, as in every ResNet) and a ViT unit pair (timm Block),
in row mode with some samples surviving and in batch mode (kept, dropped), on the path a GPU takes (the
Triton epilogue, interpreted on CPU tensors) and on the CPU's torch path. Expected counts are exact: the
same network unconverted plus the launches the unit adds or removes, op by op (a regression that adds a
launch or a saved tensor fails here, naming it), and saved bytes from the tensors' sizes.

Then the pieces of sdepth_ext.rows that give those counts, against references: the row split's one-pass
backward, the re-gather of the branch's rows in backward, the torch path's epilogue Function; and the
benchmark's shortcut (Triton launches counted without executing them) against executed kernels.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import os

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
import sdepth_ext.rows as rows_module
from benchmarks.counting import LaunchCounter, SavedBytes, count_step, launches_kernel
from sdepth_ext.state import get_state, is_gated
from tests.conftest import seed_where

needs_triton_cpu = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the GPU's path on CPU tensors needs triton and TRITON_INTERPRET=1")
needs_regather = pytest.mark.skipif(
    not rows_module.REGATHER_SUPPORTED,
    reason="re-gathering in backward needs torch >= 2.8 (torch._C._autograd._top_saved_tensors_default_hooks)"
)
PATHS = [pytest.param(True, id="gpu_path", marks=needs_triton_cpu), pytest.param(False, id="torch_path")]
F32 = 4


@pytest.fixture(autouse=True)
def torch_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def op_counts(result: dict) -> dict[str, collections.Counter]:
    """Per phase, launches by op; in backward autograd's own sum of two gradients may run in place or not
    (``add`` / ``add_``, by torch version): merged as ``add``."""
    out = {}
    for phase in ("forward", "backward"):
        counts = collections.Counter(result["ops"].get(phase, {}))
        if phase == "backward":
            counts["add.Tensor"] += counts.pop("add_.Tensor", 0)
        out[phase] = +counts
    return out


def expected_counts(plain: dict, **delta: dict[str, int]) -> dict[str, collections.Counter]:
    """``plain``'s op counts changed by ``delta`` (``forward={op: +n}``, ``backward={...}``)."""
    out = {}
    for phase, counts in op_counts(plain).items():
        counts = counts.copy()
        counts.update(delta.get(phase, {}))
        out[phase] = +counts
    return out


def plan_bytes(model: nn.Module) -> int:
    """The bytes of the plan's one buffer (rows, row maps) on the device: saved once by every row unit."""
    return get_state(model).plan.buffer.untyped_storage().nbytes()


# ============================================================================================================
# A ResNet unit: BasicBlock with an identity shortcut, behind a 1x1 convolution and a ReLU
# ============================================================================================================
C, N, H = 8, 6, 5
M = C * H * H  # elements per sample


def resnet_case(mode: str, predicate):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(C, C, 1), nn.ReLU(), BasicBlock(C, C)).train()
    seed = seed_where(predicate, [0.5], mode, N)
    model = sd.convert(copy.deepcopy(plain), p_last=0.5, rule="uniform", mode=mode, seed=seed).train()
    x = torch.randn(N, C, H, H)
    return plain, model, x


def counted(model, x, gpu_path):
    """One counted step after one uncounted (first calls fill caches: launch geometry, fp32 scales) on the
    same plan: the plan a converted model draws first."""
    state = get_state(model) if any(map(is_gated, model.modules())) else None
    count_step(model, x, gpu_path=gpu_path)
    if state is not None:
        state.scheduler.step = 0
    return count_step(model, x, gpu_path=gpu_path)


@pytest.mark.parametrize("gpu_path", PATHS)
def test_resnet_unit_row_mode(gpu_path):
    plain, model, x = resnet_case("row", lambda plan: 0 < plan.counts[0] < N)
    base = counted(plain, x, False)
    got = counted(model, x, gpu_path)
    k = get_state(model).host_plan.counts[0]
    regather = gpu_path and rows_module.REGATHER_SUPPORTED
    if gpu_path:
        # Forward: the gather; one fused epilogue for the residual add and its ReLU. Backward: one epilogue
        # launch for the ReLU's mask; the rows' gradient added into the shortcut's in one launch (for
        # autograd's sum); the branch's input rows gathered again (not kept).
        expected = expected_counts(
            base, forward={"index_select.default": 1, "add_.Tensor": -1, "relu_.default": -1,
                           "triton:forward": 1},
            backward={"threshold_backward.default": -1, "add.Tensor": -1, "triton:backward": 1,
                      "triton:forward": 1, "index_select.default": int(regather)})
    else:
        # index_add into a copy of the shortcut replaces the add; the mask's gradient rows are gathered;
        # the rows' gradient is added into the shortcut's in one op (autograd's sum is gone).
        expected = expected_counts(
            base, forward={"index_select.default": 1, "index_add.out": 1, "add_.Tensor": -1},
            backward={"index_select.default": 1, "index_add.out": 1, "add.Tensor": -1})
    assert op_counts(got) == expected
    # Saved in the forward: the 1x1 convolution's input, the unit's input (the ReLU keeps it), three
    # activations of the survivors, the epilogue's ReLU mask, two statistics per BatchNorm, the plan; the
    # gathered input only where it is not gathered again. The mask: on the GPU's path its bits (M = 200
    # elements per sample is one 256-element block, 32 bytes), on the torch path the output itself.
    mask_bytes = N * 256 // 8 if gpu_path else F32 * M * N
    assert got["saved_bytes"] == (F32 * M * (N + N + 3 * k + (0 if regather else k)) + mask_bytes
                                  + F32 * 4 * C + plan_bytes(model))
    assert base["saved_bytes"] == F32 * M * 6 * N + F32 * 4 * C


@pytest.mark.parametrize("gpu_path", PATHS)
def test_resnet_unit_batch_mode_kept_saves_what_the_plain_block_saves(gpu_path):
    plain, model, x = resnet_case("batch", lambda plan: plan.counts[0] == N)
    base = counted(plain, x, False)
    got = counted(model, x, gpu_path)
    if gpu_path:
        expected = expected_counts(
            base, forward={"add_.Tensor": -1, "relu_.default": -1, "triton:forward": 1},
            backward={"threshold_backward.default": -1, "triton:backward": 1})
    else:  # an out-of-place add (the residual is not the unit's own temporary), then relu_ in place
        expected = expected_counts(base, forward={"add_.Tensor": -1, "add.Tensor": 1})
    assert op_counts(got) == expected
    assert got["saved_bytes"] == base["saved_bytes"] == F32 * M * 6 * N + F32 * 4 * C


@pytest.mark.parametrize("policy", ["none", "zero"])
@pytest.mark.parametrize("gpu_path", PATHS)
def test_resnet_unit_batch_mode_dropped_runs_nothing(gpu_path, policy):
    plain, model, x = resnet_case("batch", lambda plan: plan.counts[0] == 0)
    sd.set_dropped_grads(model, policy)
    stem_only = counted(plain[:2], x, False)
    got = counted(model, x, gpu_path)
    assert got["saved_bytes"] == stem_only["saved_bytes"] == 2 * F32 * M * N  # the conv's input, relu's
    got_ops, stem_ops = op_counts(got), op_counts(stem_only)
    assert got_ops["forward"] == stem_ops["forward"]
    if policy == "none":
        assert got_ops["backward"] == stem_ops["backward"]
    else:  # zero gradients for the branch's parameters: fills only, at most one per parameter
        extra = got_ops["backward"] - stem_ops["backward"]
        assert stem_ops["backward"] - got_ops["backward"] == collections.Counter()
        assert 1 <= sum(extra.values()) <= len(list(plain[2].parameters()))
        assert set(extra) <= {"zeros.default", "zero_.default", "_foreach_zero_.default", "fill_.Scalar"}


# ============================================================================================================
# A ViT unit pair: timm's Block (attention, then MLP), inverted scaling (DropPath's scale_by_keep)
# ============================================================================================================
T, D = 5, 16


def vit_case(mode: str, predicate):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D, D), Block(D, num_heads=2, mlp_ratio=2.0)).train()
    with_drop = nn.Sequential(nn.Linear(D, D), Block(D, num_heads=2, mlp_ratio=2.0, drop_path=0.5))
    with_drop.load_state_dict(plain.state_dict())
    seed = seed_where(predicate, [0.5, 0.5], mode, N)
    model = sd.convert(with_drop, mode=mode, seed=seed).train()
    assert timm is not None and get_state(model).scaling == "inverted"
    return plain, model, torch.randn(N, T, D)


def branch_saved_bytes(block, unit: int, k: int) -> int:
    """Bytes the plain block's branch ``unit`` saves on ``k`` samples of its own (input included)."""
    t = torch.randn(k, T, D, requires_grad=True)
    with SavedBytes([*block.parameters(), *block.buffers()]) as saved:
        block.ls1(block.attn(block.norm1(t))) if unit == 0 else block.ls2(block.mlp(block.norm2(t)))
    return saved.total


@pytest.mark.parametrize("gpu_path", PATHS)
def test_vit_units_row_mode(gpu_path):
    plain, model, x = vit_case("row", lambda plan: all(0 < c < N for c in plan.counts))
    base = counted(plain, x, False)
    got = counted(model, x, gpu_path)
    if gpu_path:  # per unit: the gather, the epilogue forward and backward, the rows added back in one launch
        expected = expected_counts(
            base, forward={"index_select.default": 2, "add.Tensor": -2, "triton:forward": 2},
            backward={"add.Tensor": -2, "triton:backward": 2, "triton:forward": 2})
    else:  # per unit also the inverted scale, forward and backward (the Triton kernels take it along)
        expected = expected_counts(
            base, forward={"index_select.default": 2, "mul.Tensor": 2, "index_add.out": 2, "add.Tensor": -2},
            backward={"index_select.default": 2, "mul.Tensor": 2, "index_add.out": 2, "add.Tensor": -2})
    assert op_counts(got) == expected
    # Each branch keeps what it keeps on its survivors alone (its gathered input among them: nothing else
    # keeps the unit's input, and nothing follows the add); plus the Linear's input and the plan.
    counts = get_state(model).host_plan.counts
    block = plain[1]
    branches = branch_saved_bytes(block, 0, counts[0]) + branch_saved_bytes(block, 1, counts[1])
    assert got["saved_bytes"] == branches + F32 * N * T * D + plan_bytes(model)


@pytest.mark.parametrize("gpu_path", PATHS)
def test_vit_units_batch_mode_kept(gpu_path):
    plain, model, x = vit_case("batch", lambda plan: all(c == N for c in plan.counts))
    base = counted(plain, x, False)
    got = counted(model, x, gpu_path)
    if gpu_path:
        expected = expected_counts(base, forward={"add.Tensor": -2, "triton:forward": 2},
                                   backward={"triton:backward": 2})
    else:  # the scaled residual (a fresh tensor) takes the shortcut in place; its gradient is scaled back
        expected = expected_counts(base, forward={"mul.Tensor": 2, "add.Tensor": -2, "add_.Tensor": 2},
                                   backward={"mul.Tensor": 2})
    assert op_counts(got) == expected
    assert got["saved_bytes"] == base["saved_bytes"]


# ============================================================================================================
# The counters themselves
# ============================================================================================================
def test_views_allocations_and_metadata_launch_nothing():
    aten = torch.ops.aten
    for op in (aten.view.default, aten.permute.default, aten.detach.default, aten.expand.default,
               aten.empty.memory_format, aten.empty_like.default, aten.slice.Tensor, aten.t.default):
        assert not launches_kernel(op), op
    for op in (aten.add.Tensor, aten.add_.Tensor, aten.clone.default, aten.copy_.default,
               aten.index_select.default, aten.zeros.default, aten.convolution.default):
        assert launches_kernel(op), op


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    with SavedBytes([w]) as saved:
        y = x @ w  # saves x (and w: left out)
        (y.t() @ y).sum()  # saves y twice, through a view and itself
    assert saved.total == F32 * (3 * 4 + 3 * 4)


def test_launch_counter_pauses_and_phases():
    counter, t = LaunchCounter(), torch.ones(3)
    with counter:
        t.add(1)
        with counter.paused():
            t.mul(2)
        counter.phase = "backward"
        t.view(3, 1)
        t.mul(3)
    assert counter.by_phase == {"forward": {"add.Tensor": 1}, "backward": {"mul.Tensor": 1}}


# ============================================================================================================
# The benchmark's shortcut, and what DDP, checkpointing and compiled regions do to the counts
# ============================================================================================================
def small_models():
    torch.manual_seed(0)
    yield "resnet", sd.cifar_resnet(8), torch.randn(4, 3, 8, 8), {"p_last": 0.5, "rule": "uniform"}
    timm = pytest.importorskip("timm", reason="timm is not installed")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2,
                                                           num_heads=2, num_classes=5, drop_path_rate=0.5)
    yield "vit", vit, torch.randn(4, 3, 16, 16), {}


def converted(model, mode, seed=3, **kw):
    return sd.convert(copy.deepcopy(model), mode=mode, seed=seed, **kw).train()


@needs_triton_cpu
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_triton_launches_counted_without_running_them_count_the_same(mode):
    """bench_footprint counts the GPU path without executing the interpreted grids: the counts are those of
    the executed kernels (no count depends on the values)."""
    for _, model, x, kw in small_models():
        model = converted(model, mode, **kw)
        # A first step before (as bench_footprint does): the first forward learns which block ends it, and
        # until then each block attaches its dropped units' zero gradients itself (grads.PendingZeroGrads).
        count_step(model, x, gpu_path=True)
        executed = count_step(model, x, gpu_path=True)
        get_state(model).scheduler.step -= 1
        skipped = count_step(model, x, gpu_path=True, run_triton=False)
        assert skipped["ops"] == executed["ops"] and skipped["saved_bytes"] == executed["saved_bytes"]
        assert executed["triton"] > 0


def _row_ops(result: dict) -> dict:
    """The launches of the row machinery: gathers, Triton launches, index_add (any variant), zero fills."""
    keep = ("index_select", "triton:", "index_add", "new_zeros", "zeros")
    return {phase: {op: n for op, n in ops.items() if op.startswith(keep)}
            for phase, ops in result["ops"].items()}


@needs_triton_cpu
def test_checkpointing_keeps_one_pass_backward_of_the_rows():
    for _, model, x, kw in small_models():
        plain = converted(model, "row", **kw)
        checkpointed = sd.checkpoint_blocks(converted(model, "row", **kw), use_reentrant=False)
        base = counted(plain, x, True)
        got = counted(checkpointed, x, True)
        assert got["saved_bytes"] < base["saved_bytes"]
        # Backward recomputes the units' forwards (as far as their saved tensors need: checkpoint's early
        # stop) and still adds each unit's rows' gradient back in one pass: no zero-filled N-row tensor, no
        # out-of-place index_add.
        assert got["ops"]["backward"]["triton:forward"] >= base["ops"]["backward"]["triton:forward"] > 0
        assert not {"new_zeros.default", "index_add.default"} & set(got["ops"]["backward"])


@needs_triton_cpu
def test_compiled_regions_keep_the_savings():
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        pytest.skip(f"torch {torch.__version__}: dynamo cannot compile a region under the counter's "
                    "TorchDispatchMode (fake tensors reach the real convolution)")
    for _, model, x, kw in small_models():
        eager = converted(model, "row", **kw)
        compiled = sd.compile_blocks(converted(model, "row", **kw), backend="aot_eager")
        base, got = counted(eager, x, True), counted(compiled, x, True)
        # the compiled branch keeps no more than the eager one (nor its gathered rows); equal on torch 2.14
        assert got["saved_bytes"] <= base["saved_bytes"]
        assert _row_ops(got) == _row_ops(base)


@needs_triton_cpu
def test_ddp_keeps_the_savings(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for _, model, x, kw in small_models():
            single = sd.set_dropped_grads(converted(model, "row", **kw), "zero")  # what ddp_ready sets
            wrapped = DistributedDataParallel(sd.ddp_ready(converted(model, "row", **kw)))
            base, got = counted(single, x, True), counted(wrapped, x, True)
            assert got["saved_bytes"] == base["saved_bytes"]
            assert _row_ops(got) == _row_ops(base)
    finally:
        dist.destroy_process_group()
