"""Tests of sdepth_ext.gated_residual_add / gated_residual_relu: Triton kernels (interpreter on CPU) and torch
path vs a reference, with and without the ReLU.

Layout: a "PyTorch reference" section (the oracle), input makers, then forward/backward matrices, numerics
(NaN/Inf), gradcheck, opcheck, torch.compile, input errors, backend selection, and CUDA-only cases.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # the lead's conftest does this too; it must precede the first kernel call
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sdepth_ext  # noqa: E402
from sdepth_ext import functional as F  # noqa: E402
from sdepth_ext.functional import (  # noqa: E402
    GatedResidualAddFunction,
    gated_residual_add,
    gated_residual_relu,
    keeps_output,
)
from sdepth_ext.kernels import triton_available  # noqa: E402

HAS_TRITON = triton_available()
CAN_RUN_TRITON_ON_CPU = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

needs_triton_cpu = pytest.mark.skipif(
    not CAN_RUN_TRITON_ON_CPU, reason="Triton kernels on CPU tensors need triton and TRITON_INTERPRET=1")


def needs_cuda(fn):
    """CUDA-only case: tagged for the conftest's `needs_cuda` marker, and skipped here without a GPU."""
    return pytest.mark.needs_cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


IMPLS = [pytest.param("triton", marks=needs_triton_cpu), "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 3x5x31x29 and 4x16x32x32 span several programs per sample (fp32 blocks hold 2048 elements) and end in a
# masked tail (4495 = 2 * 2048 + 399); flat launches of every shape span several programs too.
LAYOUTS = ["1x1x1x1", "3x5x7x11", "3x5x31x29", "4x16x32x32", "channels_last", "channels_last_big",
           "non_contiguous", "mixed"]
ACTIVATIONS = [None, "relu"]
ROWS = [None, "none_kept", "all_kept", "some"]


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------
def _oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(shortcut, residual, scale, rows, activation="relu"):
    """act(shortcut + scale * residual) computed in fp32 (fp64 for fp64) and rounded once to the dtype."""
    hi = _oracle_dtype(shortcut.dtype)
    act = torch.relu if activation == "relu" else (lambda t: t)
    out = act(shortcut.to(hi) + scale * residual.to(hi)) if rows is None else None
    if rows is not None:
        out = act(shortcut.to(hi))
        out[rows] = act(shortcut.to(hi)[rows] + scale * residual.to(hi))
    return out.to(shortcut.dtype)


def reference_backward(grad, out, scale, rows, activation="relu"):
    """Gradients of the epilogue given the output it produced (relu's mask is torch's threshold_backward:
    `out <= 0 ? 0 : grad`, so a NaN output passes its gradient), in fp32 then rounded once."""
    hi = _oracle_dtype(out.dtype)
    grad_shortcut = grad.to(hi)
    if activation == "relu":
        grad_shortcut = torch.where(out.to(hi) <= 0, torch.zeros((), dtype=hi), grad_shortcut)
    kept = grad_shortcut if rows is None else grad_shortcut[rows]
    return grad_shortcut.to(out.dtype), (scale * kept).to(out.dtype)


def tolerances(dtype, impl, scale, residual):
    """(atol, rtol) for comparing an implementation with the oracle above.

    * fp64: both compute in fp64.
    * fp32: the oracle is eager fp32; a GPU kernel may contract `sc + s*r` into one FMA (one rounding fewer),
      a difference of at most one fp32 ulp of |s*r| (|s*r| < ~10 here: ~1e-6).
    * fp16/bf16, Triton: computes in fp32 and rounds once, so it is within 1 ulp of the once-rounded oracle
      (1 ulp only at near-ties; the interpreter's fp32->bf16 cast truncates instead of rounding to nearest,
      also < 1 ulp): rtol = eps. atol covers fp16 subnormals.
    * fp16/bf16, torch: eager rounds `s*r` to the dtype before the add, an extra error of up to half an ulp of
      |s*r| that is absolute, not relative to the (possibly cancelled) result: atol = eps * max|s*r|. This is
      the error PyTorch's own low-precision eager computation has.
    """
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.float32:
        return 1e-6, 1e-6
    eps = torch.finfo(dtype).eps
    if impl == "torch" and residual.numel() > 0:
        return eps * max(1.0, abs(scale) * residual.float().abs().max().item()), eps
    return 1e-6, eps


def assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


# --------------------------------------------------------------------------------------------------
# Inputs: fresh randn with a fixed seed, never zeros
# --------------------------------------------------------------------------------------------------
def _layout(t, layout, is_residual):
    if layout.startswith("channels_last") or (layout == "mixed" and is_residual):
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":  # every other element of the last dim: not dense, the kernels copy it
        wide = torch.repeat_interleave(t, 2, dim=-1)
        return wide[..., ::2]
    return t


def make_rows(rows_case, n, generator, device="cpu"):
    if rows_case is None:
        return None
    if rows_case == "none_kept":
        rows = torch.empty(0, dtype=torch.int64)
    elif rows_case == "all_kept":
        rows = torch.arange(n)
    else:  # a random, sorted subset of about half the samples
        rows = torch.randperm(n, generator=generator)[: max(1, n // 2)].sort().values
    return rows.to(device)


def make_inputs(layout, dtype, rows_case, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    shape = {"1x1x1x1": (1, 1, 1, 1), "3x5x7x11": (3, 5, 7, 11), "3x5x31x29": (3, 5, 31, 29),
             "4x16x32x32": (4, 16, 32, 32), "channels_last_big": (3, 5, 31, 29)}.get(layout, (4, 6, 5, 3))
    # The layout is made on the target device: a copy to another device makes a non-dense tensor dense.
    shortcut = _layout(torch.randn(shape, generator=g).to(dtype).to(device), layout, False)
    rows = make_rows(rows_case, shape[0], g)
    k = shape[0] if rows is None else rows.numel()
    residual = _layout(torch.randn((k, *shape[1:]), generator=g).to(dtype).to(device), layout, True)
    if layout == "non_contiguous":
        assert not shortcut.is_contiguous() and (k == 0 or not residual.is_contiguous())
    return shortcut, residual, None if rows is None else rows.to(device)


def run_forward_backward(impl, shortcut, residual, scale, rows, grad_seed=1, activation="relu"):
    sc = shortcut.detach().clone().requires_grad_()
    res = residual.detach().clone().requires_grad_()
    out = gated_residual_add(sc, res, scale, rows, activation, backend=impl)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    out.backward(grad)
    return out.detach(), grad, sc.grad, res.grad


# --------------------------------------------------------------------------------------------------
# Forward / backward vs the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows_case", ROWS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward_matches_reference(impl, dtype, layout, rows_case, activation):
    scale = 0.37
    shortcut, residual, rows = make_inputs(layout, dtype, rows_case)
    out, grad, grad_sc, grad_res = run_forward_backward(impl, shortcut, residual, scale, rows,
                                                        activation=activation)
    atol, rtol = tolerances(dtype, impl, scale, residual)
    assert_close(out, reference_forward(shortcut, residual, scale, rows, activation), atol, rtol)
    exp_sc, exp_res = reference_backward(grad, out, scale, rows, activation)
    assert_close(grad_sc, exp_sc, 0.0, 0.0)  # a pure select (or the gradient itself): exact
    # grad_residual = scale * masked grad: one rounding on either side, so the kernel tolerance applies
    assert_close(grad_res, exp_res, *tolerances(dtype, "triton", scale, residual))
    assert grad_res.shape == residual.shape
    if layout.startswith("channels_last"):  # the output keeps the input layout, no copy
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("rows_case", [None, "some"])
@pytest.mark.parametrize("scale", [0.0, 0.37, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_scales(impl, dtype, scale, rows_case):
    shortcut, residual, rows = make_inputs("3x5x7x11", dtype, rows_case, seed=2)
    out, grad, grad_sc, grad_res = run_forward_backward(impl, shortcut, residual, scale, rows)
    atol, rtol = tolerances(dtype, impl, scale, residual)
    assert_close(out, reference_forward(shortcut, residual, scale, rows), atol, rtol)
    exp_sc, exp_res = reference_backward(grad, out, scale, rows)
    assert_close(grad_sc, exp_sc, 0.0, 0.0)
    assert_close(grad_res, exp_res, *tolerances(dtype, "triton", scale, residual))


@needs_triton_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows_case", ROWS)
@pytest.mark.parametrize("layout", ["3x5x7x11", "3x5x31x29", "channels_last", "channels_last_big", "1x1x1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_launchers_write_every_element(dtype, layout, rows_case, activation):
    """Outputs poisoned with NaN before the kernels run: any element left unwritten shows up as NaN."""
    epi = sdepth_ext.kernels.load_epilogue()
    scale, relu = 0.37, activation == "relu"
    shortcut, residual, rows = make_inputs(layout, dtype, rows_case, seed=3)
    out = torch.full_like(shortcut, float("nan"))
    _, slot, _ = epi.gated_residual_add_forward(shortcut, residual, scale, rows, relu=relu, out=out)
    atol, rtol = tolerances(dtype, "triton", scale, residual)
    assert not out.isnan().any()
    assert_close(out, reference_forward(shortcut, residual, scale, rows, activation), atol, rtol)

    # in the output's layout, as autograd hands it over (without an activation grad sets the layout)
    grad = torch.empty_like(out).copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    grad_sc = torch.full_like(out, float("nan"))
    grad_res = torch.full_like(residual.contiguous(memory_format=torch.channels_last)
                               if layout.startswith("channels_last") else residual, float("nan"))
    num_rows = None if rows is None else rows.numel()
    got_sc, got_res = epi.gated_residual_add_backward(
        grad, out if relu else None, scale, slot, num_rows, relu=relu,
        grad_shortcut=grad_sc if relu else None, grad_residual=grad_res)
    assert got_res is grad_res and not grad_res.isnan().any()
    if relu:
        assert got_sc is grad_sc and not grad_sc.isnan().any()
    else:
        assert got_sc is grad  # no activation: the incoming gradient itself, no copy
    exp_sc, exp_res = reference_backward(grad, out, scale, rows, activation)
    assert_close(got_sc, exp_sc, 0.0, 0.0)
    assert_close(grad_res, exp_res, atol, rtol)


def packed_mask_reference(out: torch.Tensor, row_mode: bool, block: int) -> torch.Tensor:
    """The packed ReLU mask as the kernels lay it out, from the stored output: ``out`` in memory order, one
    row per sample in row mode (the whole tensor otherwise), each row padded to whole blocks; bit j of byte g
    of a block is threshold_backward's `out > 0` (NaN passes) for element 8g + j."""
    order = sorted(range(out.dim()), key=lambda d: (out.shape[d] != 1, out.stride(d)), reverse=True)
    flat = out.permute(order).reshape(out.shape[0] if row_mode else 1, -1)
    passes = ~(flat <= 0)
    blocks = -(-flat.shape[1] // block)
    padded = torch.zeros(flat.shape[0], blocks * block, dtype=torch.int32)
    padded[:, : flat.shape[1]] = passes.int()
    return (padded.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


@needs_triton_cpu
@pytest.mark.parametrize("rows_case", ROWS)
@pytest.mark.parametrize("layout", ["3x5x7x11", "3x5x31x29", "channels_last", "channels_last_big", "1x1x1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_packed_relu_mask_is_the_saved_outputs_mask(dtype, layout, rows_case):
    """Row mode's ReLU units keep the mask's bits instead of the output: the bits are exactly
    threshold_backward's mask of the stored output (a NaN output, a sum that rounds to 0 in the output's
    dtype, the tail of the last block), and the backward from them is bit for bit the one from the output,
    also for a gradient in another layout than the output's. Outputs poisoned before the kernels write."""
    epi = sdepth_ext.kernels.load_epilogue()
    scale = 0.37
    shortcut, residual, rows = make_inputs(layout, dtype, rows_case, seed=5)
    first = (0,) * shortcut.dim()
    shortcut[first] = float("nan")
    if residual.shape[0] > 0 and shortcut[0].numel() > 1:
        second = tuple(int(i) for i in torch.unravel_index(torch.tensor(1), shortcut.shape[1:]))
        shortcut[(rows[0].item() if rows is not None else 0, *second)] = 0.0
        residual[(0, *second)] = 1e-9  # 3.7e-10 in fp32: 0 in fp16, kept in bf16
    out = torch.full_like(shortcut, float("nan"))
    got, slot, mask = epi.gated_residual_add_forward(shortcut, residual, scale, rows, relu=True,
                                                     packed_mask=True, out=out)
    kept, _, none = epi.gated_residual_add_forward(shortcut, residual, scale, rows, relu=True)
    assert got is out and none is None and got.stride() == kept.stride()
    assert torch.equal(got.isnan(), kept.isnan()) and torch.equal(got.nan_to_num(), kept.nan_to_num())
    block = epi._launch_config(out[0].numel() if rows is not None else out.numel(), out.element_size())[0]
    assert mask.dtype == torch.uint8
    assert torch.equal(mask, packed_mask_reference(kept, rows is not None, block))

    num_rows = None if rows is None else rows.numel()
    g = torch.Generator().manual_seed(6)
    for grad in (torch.empty_like(kept).copy_(torch.randn(kept.shape, generator=g)),
                 torch.randn(kept.shape, generator=g).to(dtype)):  # contiguous: another layout for some
        grad_sc = torch.full_like(kept, float("nan"))
        grad_res = torch.full_like(residual.contiguous(memory_format=torch.channels_last)
                                   if layout.startswith("channels_last") else residual, float("nan"))
        from_bits = epi.gated_residual_add_backward(grad, None, scale, slot, num_rows, relu=True, mask=mask,
                                                    out_strides=got.stride(), grad_shortcut=grad_sc,
                                                    grad_residual=grad_res)
        from_output = epi.gated_residual_add_backward(grad, kept, scale, slot, num_rows, relu=True)
        assert from_bits[0] is grad_sc and from_bits[1] is grad_res
        assert torch.equal(from_bits[0], from_output[0]) and torch.equal(from_bits[1], from_output[1])
    with pytest.raises(ValueError, match="mask: expected"):
        epi.gated_residual_add_backward(grad, None, scale, slot, num_rows, relu=True, mask=mask[1:],
                                        out_strides=got.stride())
    with pytest.raises(ValueError, match="out_strides: expected"):
        epi.gated_residual_add_backward(grad, None, scale, slot, num_rows, relu=True, mask=mask)


@needs_triton_cpu
def test_row_mode_relu_keeps_the_mask_bits_not_the_output():
    """What the Function saves: in row mode the bits (1/32 of the fp32 output) and the row map; without rows
    the output, which the next layer keeps anyway (sdepth_ext.functional.keeps_output tells them apart)."""
    epi = sdepth_ext.kernels.load_epilogue()
    shortcut, residual, rows = make_inputs("4x16x32x32", torch.float32, "some", seed=7)
    sc, res = shortcut.requires_grad_(), residual.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = GatedResidualAddFunction.apply(sc, res, 0.5, rows, None, True, epi)
    assert [t.dtype for t in saved] == [torch.uint8, torch.int32]
    assert saved[0].numel() == out.numel() // 8 and not keeps_output(out.grad_fn)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        full = GatedResidualAddFunction.apply(sc, torch.randn_like(sc), 0.5, None, None, True, epi)
    assert len(saved) == 1 and saved[0].data_ptr() == full.data_ptr() and keeps_output(full.grad_fn)


@needs_triton_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cached_launches_follow_shape_stride_and_dtype_changes(activation):
    """The launchers cache their layout analysis per (shape, strides, dtype, device): going back and forth
    between shapes, layouts, row counts and dtypes must give the reference every time."""
    calls = [("3x5x31x29", torch.float32, None), ("channels_last_big", torch.float32, None),
             ("3x5x31x29", torch.bfloat16, "some"), ("3x5x31x29", torch.float32, "some"),
             ("channels_last_big", torch.float32, "all_kept"), ("3x5x31x29", torch.float32, "none_kept"),
             ("4x16x32x32", torch.float16, "some")]
    for layout, dtype, rows_case in calls + calls[::-1] + calls:
        shortcut, residual, rows = make_inputs(layout, dtype, rows_case, seed=len(layout))
        out, grad, grad_sc, grad_res = run_forward_backward("triton", shortcut, residual, 1.5, rows,
                                                            activation=activation)
        atol, rtol = tolerances(dtype, "triton", 1.5, residual)
        assert_close(out, reference_forward(shortcut, residual, 1.5, rows, activation), atol, rtol)
        exp_sc, exp_res = reference_backward(grad, out, 1.5, rows, activation)
        assert_close(grad_sc, exp_sc, 0.0, 0.0)
        assert_close(grad_res, exp_res, atol, rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,rows", [((0, 3, 4, 4), []), ((0, 3, 4, 4), None), ((2, 0, 4), [1]),
                                        ((2, 0, 4), None)])
def test_zero_size(impl, shape, rows):
    rows = None if rows is None else torch.tensor(rows, dtype=torch.int64)
    shortcut = torch.randn(shape, requires_grad=True)
    k = shape[0] if rows is None else rows.numel()
    residual = torch.randn((k, *shape[1:]), requires_grad=True)
    out = gated_residual_relu(shortcut, residual, 0.5, rows, backend=impl)
    assert out.shape == shortcut.shape
    out.sum().backward()
    assert shortcut.grad.shape == shortcut.shape and residual.grad.shape == residual.shape


@needs_triton_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows_case", [None, "some"])
def test_registered_op_autograd_matches_reference(rows_case, activation):
    """The custom op's own register_autograd path (what torch.compile traces; also torch.ops.sdepth_ext)."""
    shortcut, residual, rows = make_inputs("channels_last_big", torch.float32, rows_case, seed=5)
    sc, res = shortcut.clone().requires_grad_(), residual.clone().requires_grad_()
    out = torch.ops.sdepth_ext.gated_residual_add(sc, res, 2.0, rows, None, activation == "relu")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(grad)
    assert_close(out, reference_forward(shortcut, residual, 2.0, rows, activation), 1e-6, 1e-6)
    exp_sc, exp_res = reference_backward(grad, out.detach(), 2.0, rows, activation)
    assert_close(sc.grad, exp_sc, 0.0, 0.0)
    assert_close(res.grad, exp_res, 1e-6, 1e-6)


# --------------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------------
# numpy (the interpreter's backend) warns on inf - inf; the NaN it makes is the point of these tests
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_propagate_like_reference(impl, dtype):
    nan, inf = float("nan"), float("inf")
    shortcut = torch.tensor([[nan, 1.0, -1.0, 2.0, -inf, inf, 0.5, -3.0]], dtype=dtype).repeat(3, 1)
    residual = torch.tensor([[0.5, nan, inf, -inf, 1.0, -inf, inf, -inf]], dtype=dtype).repeat(3, 1)
    for scale in (0.0, 0.37, 1.0):  # scale 0 with an inf residual is NaN, as 0 * inf is in the reference
        sc, res = shortcut.clone().requires_grad_(), residual.clone().requires_grad_()
        out = gated_residual_relu(sc, res, scale, backend=impl)
        sc_ref, res_ref = shortcut.clone().requires_grad_(), residual.clone().requires_grad_()
        ref = torch.relu(sc_ref + scale * res_ref)
        assert_close(out, ref, 0.0, 0.0)
        grad = torch.ones_like(out)
        out.backward(grad)
        ref.backward(grad)
        assert_close(sc.grad, sc_ref.grad, 0.0, 0.0)
        assert_close(res.grad, res_ref.grad, 0.0, 0.0)
    # NaN + 0.5 -> NaN, inf - inf -> NaN, -1 + inf -> inf
    assert out[0, 0].isnan() and out[0, 5].isnan() and out[0, 2] == float("inf")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_dropped_rows_never_see_the_residual(impl):
    """Survivors with an inf residual and scale 0 are NaN (0 * inf); dropped samples stay relu(shortcut)."""
    shortcut = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    full_residual = torch.full((4, 3, 2, 2), float("inf"))
    rows = torch.tensor([1, 2])
    out = gated_residual_relu(shortcut, full_residual[rows], 0.0, rows, backend=impl)
    assert torch.isfinite(out[[0, 3]]).all()
    assert_close(out[[0, 3]], torch.relu(shortcut[[0, 3]]), 0.0, 0.0)
    assert out[rows].isnan().all()


# --------------------------------------------------------------------------------------------------
# gradcheck (float64), opcheck, torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows", [None, [0, 2]])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl, rows, activation, check):
    """First and second order. Second (create_graph=True: a gradient penalty through a converted model):
    the Triton path's backward runs as the torch path's ops then, its ReLU mask read from the saved
    output, or in row mode from the forward's packed bits; gradgradcheck differentiates the backward with
    respect to the incoming gradient too, the path a gradient penalty takes."""
    g = torch.Generator().manual_seed(8)
    rows = None if rows is None else torch.tensor(rows)
    shortcut = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    k = 3 if rows is None else 2
    residual = torch.randn(k, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    assert check(lambda s, r: gated_residual_add(s, r, 0.37, rows, activation, backend=impl),
                 (shortcut, residual))


@needs_triton_cpu
def test_fp64_computes_in_fp64():
    g = torch.Generator().manual_seed(9)
    shortcut, residual = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    out = gated_residual_relu(shortcut, residual, 0.1, backend="triton")  # 0.1 is not an fp32 number
    assert_close(out, torch.relu(shortcut + 0.1 * residual), 1e-14, 1e-14)


@needs_triton_cpu
@pytest.mark.parametrize("rows", [None, [1, 2]])
def test_second_order_gradients_of_the_triton_path_are_the_torch_paths(rows):
    """A gradient penalty's gradients: the same through either backend, bit for bit (the same ops), in a
    channels_last layout whose packed mask follows the output's memory order. The loss is not linear in the
    output, so the incoming gradient depends on the inputs and the penalty's gradient goes through the
    ReLU's mask (through a linear loss it would be zero whatever the mask)."""
    g = torch.Generator().manual_seed(3)
    rows = None if rows is None else torch.tensor(rows)
    k = 3 if rows is None else 2
    shortcut, residual = (torch.randn(n, 4, 5, 6, generator=g).to(memory_format=torch.channels_last)
                          for n in (3, k))
    weight = torch.randn(3, 4, 5, 6, generator=g)
    got = {}
    for impl in ("triton", "torch"):
        sc, res = shortcut.clone().requires_grad_(), residual.clone().requires_grad_()
        out = gated_residual_relu(sc, res, 0.37, rows, backend=impl)
        loss = ((out + 1).pow(2) * weight).sum()  # its gradient is not 0 where the ReLU gives 0
        grad_sc, grad_res = torch.autograd.grad(loss, (sc, res), create_graph=True)
        penalty = grad_sc.pow(2).sum() + grad_res.pow(2).sum() + loss
        got[impl] = (grad_sc, grad_res, *torch.autograd.grad(penalty, (sc, res)))
    for a, b in zip(got["triton"], got["torch"]):
        assert a.any() and not a.all()  # some elements masked, some not
        assert_close(a, b, 0.0, 0.0)


@needs_triton_cpu
def test_the_compiled_op_is_first_order_only():
    """torch.compile's op (a registered backward with no autograd formula) raises on differentiation."""
    x, y = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = torch.ops.sdepth_ext.gated_residual_add(x, y, 0.5, None, None, True)
    (gx,) = torch.autograd.grad(out, x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()


@needs_triton_cpu
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rows_case", [None, "some", "none_kept"])
@pytest.mark.parametrize("layout", ["3x5x7x11", "channels_last"])
def test_opcheck(layout, rows_case, relu):
    shortcut, residual, rows = make_inputs(layout, torch.float32, rows_case, seed=10)
    shortcut.requires_grad_()
    residual.requires_grad_()
    slot = None if rows is None else sdepth_ext.kernels.load_epilogue().inverse_map(rows, shortcut.shape[0])
    for s in (None, slot):
        torch.library.opcheck(torch.ops.sdepth_ext.gated_residual_add.default,
                              (shortcut, residual, 0.37, rows, s, relu))
    if relu:
        out = gated_residual_relu(shortcut, residual, 0.37, rows, backend="triton").detach()
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
        torch.library.opcheck(torch.ops.sdepth_ext.gated_residual_relu_backward.default,
                              (grad, out, 0.37, rows, slot))


def _compiled_matches_reference(backend_arg, rows_list, device="cpu", activation="relu"):
    """torch.compile(fullgraph=True) of a block around the epilogue, for each rows in ``rows_list`` in turn
    (the number of rows varies as in row mode), against the reference."""
    def block(x, shortcut, residual, rows):
        out = gated_residual_add(shortcut, residual * x, 0.37, rows, activation, backend=backend_arg)
        return out.sum(dim=(2, 3))

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: any graph break is an error
    for rows in rows_list:
        g = torch.Generator().manual_seed(12)
        x = torch.randn(1, 3, 1, 1, generator=g).to(device)
        shortcut = torch.randn(4, 3, 5, 5, generator=g).to(device).to(memory_format=torch.channels_last)
        k = 4 if rows is None else rows.numel()
        residual = torch.randn(k, 3, 5, 5, generator=g).to(device).to(memory_format=torch.channels_last)
        rows = None if rows is None else rows.to(device)
        results = []
        for use_compiled in (True, False):
            x_, sc_, res_ = (t.clone().requires_grad_() for t in (x, shortcut, residual))
            if use_compiled:
                out = compiled(x_, sc_, res_, rows)
            else:
                out = F.gated_residual_add_reference(sc_, res_ * x_, 0.37, rows, activation).sum(dim=(2, 3))
            out.backward(torch.ones_like(out))
            results.append([out.detach(), x_.grad, sc_.grad, res_.grad])
        for got, want in zip(*results):
            assert_close(got, want, 1e-5, 1e-5)


@needs_triton_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_compile_fullgraph_triton_path(activation):
    """Inductor on CPU: the custom ops stay opaque nodes (Triton runs under the interpreter inside them),
    also as the number of rows changes from call to call."""
    _compiled_matches_reference("triton", [torch.tensor([0, 2, 3]), torch.tensor([1]), torch.tensor([0, 3]),
                                           None], activation=activation)


def test_torch_compile_fullgraph_auto_backend():
    """backend=None on CPU is the torch path: inductor traces and fuses the plain ops itself."""
    _compiled_matches_reference(None, [None])


# --------------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------------
def _err_inputs():
    sc = torch.randn(4, 3, 2, 2)
    return sc, torch.randn(4, 3, 2, 2), torch.randn(2, 3, 2, 2)


T = torch.tensor
ERROR_CASES = [
    # (id, (shortcut, residual, residual_of_2_rows) -> kwargs, exception, match)
    ("shortcut_type", lambda sc, r, r2: dict(shortcut=sc.tolist(), residual=r), TypeError, "shortcut"),
    ("residual_type", lambda sc, r, r2: dict(shortcut=sc, residual=1.0), TypeError, "residual"),
    ("scale_type", lambda sc, r, r2: dict(shortcut=sc, residual=r, scale=T(0.5)), TypeError, "scale"),
    ("scale_bool", lambda sc, r, r2: dict(shortcut=sc, residual=r, scale=True), TypeError, "scale"),
    ("scale_nan", lambda sc, r, r2: dict(shortcut=sc, residual=r, scale=float("nan")), ValueError, "scale"),
    ("scale_inf", lambda sc, r, r2: dict(shortcut=sc, residual=r, scale=math.inf), ValueError, "scale"),
    ("shape", lambda sc, r, r2: dict(shortcut=sc, residual=r[:, :2]), ValueError, "residual.*shape"),
    ("batch", lambda sc, r, r2: dict(shortcut=sc, residual=r2), ValueError, "residual.*batch"),
    ("ndim", lambda sc, r, r2: dict(shortcut=sc, residual=r.flatten(1)), ValueError, "residual.*shape"),
    ("dtype", lambda sc, r, r2: dict(shortcut=sc, residual=r.double()), TypeError, "residual.*dtype"),
    ("int_dtype", lambda sc, r, r2: dict(shortcut=sc.long(), residual=r.long()), TypeError, "shortcut"),
    ("zero_dim", lambda sc, r, r2: dict(shortcut=sc[0, 0, 0, 0], residual=r[0, 0, 0, 0]), ValueError,
     "shortcut"),
    ("device", lambda sc, r, r2: dict(shortcut=sc, residual=r.to("meta")), ValueError,
     "residual.*device meta"),
    ("rows_type", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=[0, 1]), TypeError, "rows"),
    ("rows_dtype", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([0, 1], dtype=torch.int32)),
     TypeError, "rows.*int64"),
    ("rows_2d", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([[0, 1]])), ValueError, "rows.*1-D"),
    ("rows_unsorted", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([2, 1])), ValueError,
     "rows.*sorted"),
    ("rows_duplicate", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([1, 1])), ValueError,
     "rows.*duplicate"),
    ("rows_negative", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([-1, 1])), ValueError,
     "rows.*range"),
    ("rows_too_big", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([1, 4])), ValueError,
     "rows.*range"),
    ("rows_shape", lambda sc, r, r2: dict(shortcut=sc, residual=r2[:, :2], rows=T([0, 1])), ValueError,
     "residual.*shape.*beyond the batch"),
    ("rows_zero_dim", lambda sc, r, r2: dict(shortcut=sc[0, 0, 0, 0], residual=r2, rows=T([0, 1])),
     ValueError, "shortcut.*0-d"),
    ("rows_length", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([0, 1, 2])), ValueError,
     "residual.*len\\(rows\\)"),
    ("rows_device", lambda sc, r, r2: dict(shortcut=sc, residual=r2, rows=T([0, 1], device="meta")),
     ValueError, "rows.*device meta"),
    ("backend", lambda sc, r, r2: dict(shortcut=sc, residual=r, backend="cuda"), ValueError,
     "backend.*'triton', 'torch'"),
    ("activation", lambda sc, r, r2: dict(shortcut=sc, residual=r, activation="gelu"), ValueError,
     "activation.*None, 'relu'"),
]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_input_errors(build, exc, match):
    kwargs = build(*_err_inputs())
    with pytest.raises(exc, match=match):
        gated_residual_add(**kwargs)
    if "activation" not in kwargs:
        with pytest.raises(exc, match=match):
            gated_residual_relu(**kwargs)


def test_trusted_rows_skips_value_checks():
    """_trusted_rows: the library's own callers skip the (syncing) value checks; metadata is still checked."""
    sc, _, rr = _err_inputs()
    out = gated_residual_relu(sc, rr, 1.0, torch.tensor([3, 1]), backend="torch", _trusted_rows=True)
    assert out.shape == sc.shape
    with pytest.raises(TypeError, match="rows.*int64"):
        gated_residual_relu(sc, rr, 1.0, torch.tensor([1, 3], dtype=torch.int32), _trusted_rows=True)


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------
def test_auto_backend_on_cpu_is_torch():
    sc, r, _ = _err_inputs()
    out = gated_residual_relu(sc.requires_grad_(), r, 0.5)
    assert "GatedResidualAdd" not in type(out.grad_fn).__name__


@needs_triton_cpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_backend_is_one_function_above_the_launchers(activation):
    """Eager calls go Function -> launcher (no custom-op dispatch in between)."""
    sc, r, _ = _err_inputs()
    out = gated_residual_add(sc.requires_grad_(), r, 0.5, activation=activation, backend="triton")
    assert type(out.grad_fn).__name__ == "GatedResidualAddFunctionBackward"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"


@needs_triton_cpu
def test_no_activation_backward_saves_nothing():
    sc, r, _ = _err_inputs()
    out = gated_residual_add(sc.requires_grad_(), r.requires_grad_(), 0.5, backend="triton")
    assert out.grad_fn.saved_tensors == ()
    rows = torch.tensor([0, 3])
    out = gated_residual_add(sc, r[:2].clone().requires_grad_(), 0.5, rows, backend="triton")
    assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.int32]  # only the row map


@needs_triton_cpu
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    epi = sdepth_ext.kernels.load_epilogue()
    monkeypatch.setattr(epi, "is_interpreted", lambda: False)
    monkeypatch.setattr(epi, "_FORWARD_GEOMETRY", {})  # the check runs when a layout is first analysed
    sc, r, _ = _err_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='torch'"):
        gated_residual_relu(sc, r, 0.5, backend="triton")


def test_without_triton(monkeypatch):
    """No triton: backend=None still works on CPU (torch path); backend='triton' says what is missing."""
    monkeypatch.setattr(sdepth_ext.kernels, "triton_available", lambda: False)
    monkeypatch.setattr(F, "_triton_installed", lambda: False)
    sc, r, _ = _err_inputs()
    assert_close(gated_residual_relu(sc, r, 0.5), torch.relu(sc + 0.5 * r), 0.0, 0.0)
    with pytest.raises(RuntimeError, match="triton.*not installed.*backend='torch'"):
        gated_residual_relu(sc, r, 0.5, backend="triton")


# --------------------------------------------------------------------------------------------------
# CUDA (backend=None -> Triton compiled for the GPU)
# --------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("rows_case", ROWS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_cuda_forward_backward(dtype, layout, rows_case):
    scale = 0.37
    shortcut, residual, rows = make_inputs(layout, dtype, rows_case, device="cuda")
    out, grad, grad_sc, grad_res = run_forward_backward(None, shortcut, residual, scale, rows)
    atol, rtol = tolerances(dtype, "triton", scale, residual)
    assert_close(out, reference_forward(shortcut, residual, scale, rows), atol, rtol)
    exp_sc, exp_res = reference_backward(grad, out, scale, rows)
    assert_close(grad_sc, exp_sc, 0.0, 0.0)
    assert_close(grad_res, exp_res, atol, rtol)


@needs_cuda
@pytest.mark.parametrize("rows_case", [None, "some"])
def test_cuda_gradcheck_opcheck_compile(rows_case):
    g = torch.Generator().manual_seed(13)
    rows = make_rows(rows_case, 3, g, device="cuda")
    k = 3 if rows is None else rows.numel()
    shortcut = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).cuda().requires_grad_()
    residual = torch.randn(k, 2, 2, 2, generator=g, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, r: gated_residual_relu(s, r, 0.37, rows), (shortcut, residual))
    sc32, res32 = (t.detach().float().requires_grad_() for t in (shortcut, residual))
    for relu in (False, True):
        torch.library.opcheck(torch.ops.sdepth_ext.gated_residual_add.default,
                              (sc32, res32, 0.37, rows, None, relu))
    for activation in ACTIVATIONS:
        _compiled_matches_reference(None, [rows], device="cuda", activation=activation)


@needs_cuda
def test_cuda_int64_offsets():
    """More than 2**31 elements: offsets must be int64 (a wrapped int32 offset corrupts memory or faults)."""
    n, m = 3, (2**31) // 3 + 4096  # 3 * m > 2**31
    if torch.cuda.mem_get_info()[0] < 4 * n * m * 2 + 2**30:
        pytest.skip("not enough free GPU memory")
    shortcut = torch.empty(n, m, dtype=torch.bfloat16, device="cuda").normal_()
    residual = torch.empty(1, m, dtype=torch.bfloat16, device="cuda").normal_()
    rows = torch.tensor([2], device="cuda")
    out = gated_residual_relu(shortcut, residual, 0.5, rows)
    tail = slice(m - 4096, m)
    assert_close(out[2, tail], reference_forward(shortcut[2:, tail], residual[:, tail], 0.5, None)[0],
                 1e-6, torch.finfo(torch.bfloat16).eps)
    assert_close(out[0, tail], torch.relu(shortcut[0, tail]), 0.0, 0.0)
