"""Activation checkpointing (same plan on recomputation), autocast, channels_last, and the shortcut dtype."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from sdepth_ext.state import get_state
from tests.conftest import drops_some_keeps_some, seed_where

# Timing is irrelevant here: one thread keeps CPU results stable on a loaded 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def cifar8(num_classes=4):
    torch.manual_seed(0)
    model = sd.cifar_resnet(8, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def batch(n=6, seed=1, size=16):
    torch.manual_seed(seed)
    return torch.randn(n, 3, size, size), torch.randint(0, 4, (n,))


# ============================================================================================================
# Activation checkpointing
# ============================================================================================================
def manual_layers(model, use_reentrant):
    """The user's own wrapping: each stage under torch.utils.checkpoint (instance forward replaced)."""
    for layer in (model.layer1, model.layer2, model.layer3):
        layer.forward = functools.partial(checkpoint, nn.Sequential.forward.__get__(layer),
                                          use_reentrant=use_reentrant)


HOW = ["blocks", "blocks_reentrant", "layers", "layers_reentrant", "root"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_checkpointed_gradients_equal_plain(mode, how):
    # uniform 0.5; a seed whose first plan drops a block, keeps another (row: some samples)
    seed = seed_where(drops_some_keeps_some, sd.uniform(3, 0.5), mode, 6)
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode=mode, seed=seed).train()
    twin = copy.deepcopy(model)
    reentrant = how.endswith("reentrant")
    if how.startswith("blocks"):
        sd.checkpoint_blocks(model, use_reentrant=reentrant)
    elif how.startswith("layers"):
        manual_layers(model, reentrant)
    x, y = batch()
    for step in range(3):  # plans change every step; recomputation must follow each
        outs = []
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            out = checkpoint(m, x, use_reentrant=False) if (m is model and how == "root") else m(x)
            F.cross_entropy(out, y).backward()
            outs.append(out.detach())
        counts = get_state(model).host_plan.counts
        assert counts == get_state(twin).host_plan.counts
        if step == 0:
            assert 0 in counts and any(counts)
            if mode == "row":
                assert any(0 < c < x.shape[0] for c in counts)
        # Recomputation runs the same kernels on the same data in the same order: bit-identical.
        assert torch.equal(outs[0], outs[1])
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), name
    if how.startswith("blocks"):
        # checkpoint_blocks does not update BatchNorm statistics again when recomputing.
        for (name, a), b in zip(model.named_buffers(), twin.buffers()):
            assert torch.equal(a, b), name


def test_checkpoint_blocks_binds_the_plan_of_each_forward():
    """Two forwards (two plans) before one backward: each recomputation uses its own forward's plan."""
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode="row", seed=8).train()
    twin = copy.deepcopy(model)
    sd.checkpoint_blocks(model)
    x, y = batch()
    for m in (model, twin):
        (F.cross_entropy(m(x), y) + F.cross_entropy(m(x.flip(0)), y)).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    sd.checkpoint_blocks(model, enabled=False)
    assert get_state(model).checkpoint is None
    with pytest.raises(TypeError, match="use_reentrant"):
        sd.checkpoint_blocks(model, use_reentrant="no")


# ============================================================================================================
# autocast (bf16 on CPU) and channels_last
# ============================================================================================================
def train_steps(model, steps, autocast_dtype=None, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for step in range(steps):
        x, y = batch(seed=10 + step)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_p_last_1_trains_like_plain(dtype, channels_last):
    """At p_last=1 every block runs: same numbers as torchvision's blocks, under autocast and channels_last.

    Tolerance: bf16 has 8 significant bits (unit roundoff 2^-9); our epilogue computes relu(sc + 1.0 * res)
    where torchvision does out += identity; relu: the same single rounding, so outputs agree to the bit in
    the first step and can only drift through the SGD updates of 3 steps. rtol 2^-7 (two bf16 ulps) and the
    fp32 1e-5 bound leave room for that, and are far below the effect of a wrong gate (O(1))."""
    plain = cifar8()
    model = sd.convert(copy.deepcopy(plain), p_last=1.0, seed=0).train()
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    got = train_steps(model, 3, dtype, channels_last)
    expected = train_steps(plain.train(), 3, dtype, channels_last)
    tol = {"rtol": 2**-7, "atol": 1e-3} if dtype is not None else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=name)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_blocks_keep_channels_last(mode):
    model = sd.convert(cifar8(), p_last=0.5, rule="uniform", mode=mode, seed=5).train()
    model = model.to(memory_format=torch.channels_last)
    layouts = []
    for block in get_state(model).blocks:
        block.register_forward_hook(
            lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(memory_format=torch.channels_last))
    F.cross_entropy(out.float(), y).backward()
    assert len(layouts) == 3 and all(layouts)


class FP32Stem(nn.Module):
    """A stem outside autocast and blocks inside: the first block adds an fp32 identity to a bf16 residual."""

    def __init__(self, blocks):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = blocks

    def forward(self, x):
        x = self.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.blocks(x)


def test_fp32_shortcut_with_bf16_residual_matches_torchvision():
    """torchvision's ``out += identity`` keeps the residual's dtype (bf16); so do the converted blocks. They
    cast the shortcut to bf16 before the add (the fused epilogue takes one dtype): one more rounding than
    torchvision's single rounding of the fp32 sum. bf16 has 8 significant bits: rounding errs by at most half
    an ulp, <= 2^-8 |v|, and one ulp is <= 2^-7 |v|. So |ours - torchvision| <= 2^-8 |shortcut| (the extra
    rounding) + 2^-7 |out| (the final roundings may land one ulp apart), element by element, also where the
    sum cancels."""
    torch.manual_seed(0)
    plain = FP32Stem(nn.Sequential(BasicBlock(8, 8))).train()
    model = sd.convert(copy.deepcopy(plain), p_last=1.0, seed=0).train()
    x = torch.randn(4, 3, 8, 8)
    got, expected = model(x), plain(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    with torch.no_grad():
        shortcut = plain.stem(x)
    assert shortcut.dtype == torch.float32
    bound = 2**-8 * shortcut.abs() + 2**-7 * torch.maximum(got.float().abs(), expected.float().abs())
    assert ((got.float() - expected.float()).abs() <= bound).all()
    assert not torch.equal(got, expected)  # the double rounding is real: the bound is what we promise
    got.float().square().sum().backward()
    assert model.stem[0].weight.grad.dtype == torch.float32  # gradient flows back into the fp32 stem
    # Row mode with dropped samples: survivors and dropped samples come out in one dtype, bf16.
    row = sd.convert(copy.deepcopy(plain), p_last=0.5, rule="uniform", mode="row", seed=1).train()
    out = row(x)
    assert out.dtype == torch.bfloat16
    assert any(0 < c < 4 for c in get_state(row).host_plan.counts)


# ============================================================================================================
# The Triton path (interpreter on CPU) keeps channels_last without layout copies
# ============================================================================================================
class OpLog(TorchDispatchMode):
    """ATen ops issued by the launcher before its kernel runs.

    The kernel launch itself is cut off (``in_kernel``, set by :func:`launch`): under TRITON_INTERPRET=1 the
    interpreter moves the arguments in and out with its own ATen ops (``set_`` in newer Triton, ``copy_`` in
    Triton 3.0), which are not the launcher's.
    """

    COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def copies(self):
        return [op for op in self.ops if op.startswith(self.COPIES)]


class _MarkLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` first tells the log the kernel runs."""

    def __init__(self, kernel, log: OpLog):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch_marked(*args, **kwargs):
            self.log.in_kernel = True
            return run(*args, **kwargs)

        return launch_marked


KERNELS = ("_gated_residual_add_forward_kernel", "_gated_residual_add_backward_kernel")


def launch(fn, *args):
    from sdepth_ext.kernels import load_epilogue

    epilogue = load_epilogue()
    log = OpLog()
    originals = {name: getattr(epilogue, name) for name in KERNELS}
    try:
        for name, kernel in originals.items():
            setattr(epilogue, name, _MarkLaunch(kernel, log))
        with log:
            out = fn(*args)
    finally:
        for name, kernel in originals.items():
            setattr(epilogue, name, kernel)
    assert log.in_kernel, "the launcher ran no kernel"
    return out, log


@pytest.mark.parametrize("row_mode", [False, True])
def test_triton_epilogue_keeps_channels_last_without_copies(row_mode):
    from sdepth_ext.kernels import load_epilogue

    epilogue = load_epilogue()
    if not epilogue.is_interpreted() and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = "cpu" if epilogue.is_interpreted() else "cuda"  # compiled kernels take CUDA tensors only
    cl = torch.channels_last
    torch.manual_seed(0)
    shortcut = torch.randn(4, 8, 5, 5, device=device).relu().to(memory_format=cl)
    rows = torch.tensor([0, 2], device=device) if row_mode else None
    residual = torch.randn(2 if row_mode else 4, 8, 5, 5, device=device).to(memory_format=cl)
    slot = None if rows is None else epilogue.inverse_map(rows, 4)

    def forward(*args, **kwargs):
        return epilogue.gated_residual_add_forward(*args, relu=True, **kwargs)

    def backward(*args, **kwargs):
        return epilogue.gated_residual_add_backward(*args, relu=True, **kwargs)

    (out, _, _), log = launch(forward, shortcut, residual, 0.5, rows, slot)
    assert out.stride() == shortcut.stride() and not log.copies(), log.ops
    expected = sd.gated_residual_relu(shortcut, residual, 0.5, rows=rows, backend="torch")
    torch.testing.assert_close(out, expected)
    grad = torch.randn(4, 8, 5, 5, device=device).to(memory_format=cl)
    (grad_sc, grad_res), log = launch(backward, grad, out, 0.5, slot, None if rows is None else 2)
    assert not log.copies(), log.ops
    assert grad_sc.is_contiguous(memory_format=cl) and grad_res.is_contiguous(memory_format=cl)
    if row_mode:  # the ReLU mask as bits (row mode's units): no copy either way
        (out, _, mask), log = launch(lambda *a: forward(*a, packed_mask=True), shortcut, residual, 0.5, rows,
                                     slot)
        assert out.stride() == shortcut.stride() and not log.copies(), log.ops
        (grad_sc, _), log = launch(lambda *a: backward(*a, mask=mask, out_strides=out.stride()), grad, None,
                                   0.5, slot, 2)
        assert not log.copies() and grad_sc.is_contiguous(memory_format=cl), log.ops
    # Control: a residual in another layout than the shortcut is copied, and the log sees it.
    _, log = launch(forward, shortcut, residual.contiguous(), 0.5, rows, slot)
    assert log.copies()


# ============================================================================================================
# CUDA: fp16 / bf16 autocast with the Triton epilogue, channels_last
# ============================================================================================================
@pytest.mark.needs_cuda
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_channels_last(dtype, mode):
    """p_last=1 equals the plain model (fp16: 11 significant bits, bf16: 8; one rounding difference at most
    per epilogue -> rtol of two ulps); p_last=0.5 trains with finite gradients and keeps channels_last."""
    cl = torch.channels_last
    plain = cifar8().cuda().to(memory_format=cl).train()
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    x, y = batch()
    x, y = x.cuda().to(memory_format=cl), y.cuda()
    model = sd.convert(copy.deepcopy(plain), p_last=1.0, mode=mode, seed=0).train()
    with torch.autocast("cuda", dtype=dtype):
        got, expected = model(x), plain(x)
    torch.testing.assert_close(got, expected, rtol=2 * ulp, atol=2 * ulp)
    dropping = sd.convert(copy.deepcopy(plain), p_last=0.5, rule="uniform", mode=mode, seed=5).train()
    with torch.autocast("cuda", dtype=dtype):
        out = dropping(x)
    F.cross_entropy(out.float(), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in dropping.parameters() if p.grad is not None)
