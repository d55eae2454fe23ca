"""The Triton kernels compile for real GPUs, on a machine without one.

CI has no GPU: the interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but it executes them
as NumPy and never sees the GPU compiler. Here every kernel variant is compiled ahead of time, through
Triton's own front end, LLVM and ``ptxas``, to a cubin for Ampere (sm_80) and Hopper (sm_90), with the
argument specialisation a real launch on that shape would get. That catches what only the GPU path can get
wrong (types the interpreter tolerates, a kernel ptxas rejects) and checks the precondition of the bandwidth
target: the bulk loads and stores of an aligned shape are 16-byte vector instructions (``ld.global.v4.b32``,
``v2.b64`` for fp64), not one scalar access per element.
"""

from __future__ import annotations

import collections
import inspect
import math

import pytest
import torch

triton = pytest.importorskip("triton")

# The ahead-of-time compile API changed shape across Triton 3.x: from 3.3 on, arguments by name, constexpr
# values in `constexprs` and attributes as a dict; in 3.0 and 3.1, non-constexpr arguments by index,
# `constants` by index and an AttrsDescriptor dataclass. 3.2 has a third shape, not covered (skipped).
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    AOT_API = None
else:
    try:
        from triton.compiler.compiler import AttrsDescriptor
    except ImportError:
        AttrsDescriptor = None
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        AOT_API = "named"
    elif "divisible_by_16" in getattr(AttrsDescriptor, "__dataclass_fields__", {}):
        AOT_API = "indexed"
    else:
        AOT_API = None

pytestmark = pytest.mark.skipif(
    AOT_API is None, reason=f"triton {triton.__version__}: no ahead-of-time compile API this test knows")

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
CONSTEXPRS = ("HAS_ROWS", "IS_FP64", "RELU", "PACKED_MASK", "BLOCK")
# Elements per sample of shapes the library launches on: ResNet-50 layer1 (256x56x56) and a CIFAR ResNet's
# first stage (16x32x32), both multiples of 16; and an odd one (3x5x7x11 = 1155) that cannot vectorise.
SAMPLES = {"resnet50-layer1": 256 * 56 * 56, "cifar-stage1": 16 * 32 * 32, "odd": 3 * 5 * 7 * 11}


def _jit_function(kernel):
    """The compilable ``JITFunction`` of a kernel, also when it was defined under the interpreter."""
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    return triton.runtime.jit.JITFunction(kernel.fn)  # an InterpretedFunction keeps the Python function


def _compile(kernel, dtype: torch.dtype, has_rows: bool, samples: int, batch: int, arch: int,
             relu: bool = True, packed_mask: bool = False):
    """Compile ``kernel`` as the launcher would launch it on ``batch`` samples of ``samples`` elements."""
    from sdepth_ext.kernels import epilogue

    fn = _jit_function(kernel)
    n_rows, m = (batch, samples) if has_rows else (1, batch * samples)  # the launcher's _geometry
    block, num_warps = epilogue._launch_config(m, torch.empty((), dtype=dtype).element_size())
    ints = {"M": m, "blocks_per_row": triton.cdiv(m, block)}
    constexprs = {"HAS_ROWS": has_rows, "IS_FP64": dtype == torch.float64, "RELU": relu,
                  "PACKED_MASK": packed_mask, "BLOCK": block}
    types, aligned = {}, set()  # argument index -> type; indices Triton would specialise as 16-divisible
    for i, name in enumerate(fn.arg_names):
        if name in CONSTEXPRS:
            continue
        if name.startswith("scale"):
            types[i] = "fp32"
        elif name in ints:
            types[i] = "i32"
            if ints[name] % 16 == 0:  # Triton specialises integer arguments divisible by 16
                aligned.add(i)
        else:  # tensors: PyTorch's allocations are aligned far beyond 16 bytes, as Triton specialises them
            types[i] = {"SLOT": "*i32", "MASK": "*u8"}.get(name, f"*{TYPES[dtype]}")
            aligned.add(i)
    if AOT_API == "named":
        names = fn.arg_names
        signature = {name: types.get(i, "constexpr") for i, name in enumerate(names)}
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    else:
        constants = {fn.arg_names.index(name): value for name, value in constexprs.items()}
        source = ASTSource(fn=fn, signature=types, constants=constants,
                           attrs=AttrsDescriptor(divisible_by_16=aligned, equal_to_1=set()))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _global_memory_ops(ptx: str) -> collections.Counter:
    ops = collections.Counter()
    for line in ptx.splitlines():
        words = line.split()
        if words and words[0].startswith("@"):  # predicated: "@%p1 ld.global.v4.b32 ..."
            words = words[1:]
        if words and words[0].startswith(("ld.global", "st.global")):
            ops[words[0]] += 1
    return ops


def _kernels():
    from sdepth_ext.kernels import epilogue

    return {"forward": epilogue._gated_residual_add_forward_kernel,
            "backward": epilogue._gated_residual_add_backward_kernel}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "add"])
@pytest.mark.parametrize("has_rows", [False, True], ids=["flat", "rows"])
@pytest.mark.parametrize("dtype", list(TYPES), ids=lambda d: TYPES[d])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_kernels_compile_to_vectorised_cubin(which, dtype, has_rows, relu, arch):
    compiled = _compile(_kernels()[which], dtype, has_rows, SAMPLES["resnet50-layer1"], batch=4, arch=arch,
                        relu=relu)
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    ops = _global_memory_ops(compiled.asm["ptx"])
    vector = "v2.b64" if dtype == torch.float64 else "v4.b32"  # 16 bytes either way
    bulk = {op: n for op, n in ops.items() if op != "ld.global.b32"}  # the scalar load is the row's slot
    assert bulk and all(op.endswith(vector) for op in bulk), ops
    # Each program moves 8 KiB per operand: 4 x 16 B per thread (128 threads) for each tensor read or written.
    # Backward without an activation reads only the gradient and writes only grad_residual.
    if which == "forward":
        operands_read, operands_written = 2, 1
    else:
        operands_read, operands_written = (2, 2) if relu else (1, 1)
    per_thread = 8192 // (16 * 128)
    assert sum(n for op, n in bulk.items() if op.startswith("ld")) == operands_read * per_thread
    assert sum(n for op, n in bulk.items() if op.startswith("st")) == operands_written * per_thread
    assert ops.get("ld.global.b32", 0) == (1 if has_rows else 0)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(TYPES), ids=lambda d: TYPES[d])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_packed_relu_mask_kernels_compile_to_vectorised_cubin(which, dtype, arch):
    """Row mode's ReLU units: the forward also stores the mask's bits, the backward reads them in place of the
    output. The data keeps its 16-byte vectors and counts; the bits are one small access per thread."""
    compiled = _compile(_kernels()[which], dtype, True, SAMPLES["resnet50-layer1"], batch=4, arch=arch,
                        relu=True, packed_mask=True)
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    ops = _global_memory_ops(compiled.asm["ptx"])
    vector = "v2.b64" if dtype == torch.float64 else "v4.b32"
    data = {op: n for op, n in ops.items() if op.endswith(vector)}
    operands_read, operands_written = (2, 1) if which == "forward" else (1, 2)  # backward: grad in, 2 out
    per_thread = 8192 // (16 * 128)
    assert sum(n for op, n in data.items() if op.startswith("ld")) == operands_read * per_thread, ops
    assert sum(n for op, n in data.items() if op.startswith("st")) == operands_written * per_thread, ops
    bits = collections.Counter({op: n for op, n in ops.items() if not op.endswith(vector)})
    bits["ld.global.b32"] -= 1  # the row's slot
    bits = +bits
    assert sum(bits.values()) == 1 and next(iter(bits)).startswith("st" if which == "forward" else "ld"), ops


@pytest.mark.parametrize("sample", ["cifar-stage1", "odd"])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_kernels_compile_for_other_shapes(which, sample):
    """Small and odd per-sample sizes compile too; only aligned ones can use vector accesses."""
    compiled = _compile(_kernels()[which], torch.float32, True, SAMPLES[sample], batch=3, arch=90)
    ops = _global_memory_ops(compiled.asm["ptx"])
    vectorised = all(op.endswith("v4.b32") for op in ops if op != "ld.global.b32")
    assert vectorised == (math.gcd(SAMPLES[sample], 16) == 16), ops
