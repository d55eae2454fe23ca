"""Fused epilogue ``relu(shortcut + scale * residual)``: sdepth_ext vs eager, torchvision and torch.compile.

For ResNet-50 (batch 256) and CIFAR ResNet-110 (batch 128) feature-map shapes, fp32 and bf16, times forward,
backward and forward+backward of:

* ``sdepth``      -- ``sdepth_ext.gated_residual_relu`` (Triton on CUDA; the torch path on CPU),
* ``eager``       -- ``torch.relu(shortcut + scale * residual)``,
* ``torchvision`` -- ``torch.relu(shortcut + torchvision.ops.stochastic_depth(residual, p, "row", True))``,
  the mask-multiply stochastic depth most code uses (it skips no work),
* ``compiled``    -- ``torch.compile(dynamic=False)`` of the eager expression (inductor fuses it too),
  compiled afresh for each shape and dtype; the run stops with an error if a timed call recompiled.

Bandwidth is the bytes the op must move, whatever an implementation actually moves: forward reads shortcut and
residual and writes out (3 tensors), backward reads grad and out and writes both gradients (4 tensors). It is
also shown as a percentage of the copy bandwidth (``dst.copy_(src)``) measured in the same run. Inputs rotate
over as many buffer sets as it takes for the tensors each call reads to total at least 4x the L2 cache (dozens
for CIFAR maps on a 50 MB L2, one for the largest ResNet-50 map); every row records the sets and bytes
rotated. Timing is printed, never asserted.

On a CPU, ``compiled`` is not a fair peer (:data:`CPU_COMPILED_NOTE`): the rows and the output say so, and the
``make bench`` summary leaves its ratio out there.

Run: ``python -m benchmarks.bench_epilogue [--smoke | --full]``. On CPU the batch is reduced (the torch path
runs there) so the default finishes in about a minute; ``--smoke`` takes seconds.
"""

from __future__ import annotations

import contextlib
import math

import torch

import sdepth_ext

from .common import (
    best_device,
    copy_bandwidth,
    environment,
    format_table,
    median,
    parse_size_args,
    print_environment,
    size_suffix,
    time_interleaved,
    write_results,
)

SCALE = 0.5  # inverted scaling 1 / p_l at p_l = 2/3 would do as well: one multiply either way
DROP_P = 0.5  # torchvision's p is the drop probability (1 - p_L at the paper's p_L = 0.5)

# (network, batch, (C, H, W)): stage outputs of torchvision's ResNet-50 and of the paper's CIFAR ResNet-110.
RESNET50 = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
RESNET110 = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
VARIANTS = ["sdepth", "eager", "torchvision", "compiled"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
TENSORS_MOVED = {"fwd": 3, "bwd": 4, "fwd+bwd": 7}

# Buffer sets are rotated until the tensors that calls read from them total this multiple of the L2 cache.
L2_MULTIPLE = 4
# Each set holds shortcut, residual and the incoming gradient; a forward reads 2 of them (the backward reads
# the gradient and what its graph saved), so sets are counted by the 2 a forward reads.
SET_TENSORS, READ_TENSORS = 3, 2

CPU_COMPILED_NOTE = (
    "CPU: 'compiled' is not a fair epilogue peer here. inductor's CPU code stores the bool mask that relu's "
    "backward saves with a slow vectorised store (measured on the 2-core CI machine: 1.6M elements in "
    "7.7-12 ms, 0.34-0.49 ms with torch._inductor.config.cpp.simdlen=1), so its ratio is no win of ours "
    "and the make bench summary leaves it out on CPU.")


def _shapes(device: torch.device, smoke: bool) -> list[tuple[str, tuple[int, ...]]]:
    if device.type == "cuda":
        b50, b110 = (32, 32) if smoke else (256, 128)
    else:  # the CPU runs the torch path; small batches keep the default run near a minute
        b50, b110 = (1, 4) if smoke else (2, 16)
    r50 = RESNET50[:1] if smoke else RESNET50
    r110 = RESNET110[:1] if smoke else RESNET110
    return ([("resnet50", (b50, *chw)) for chw in r50] + [("resnet110", (b110, *chw)) for chw in r110])


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    return 32 * 2**20  # a typical server last-level cache share; only sets the rotation count


def rotation_sets(tensor_bytes: int, l2_bytes: int) -> int:
    """Buffer sets to rotate through so that the tensors calls read total at least ``L2_MULTIPLE`` x L2.

    No cap on the count: a CIFAR stage-3 map at batch 128 (2 MiB in fp32) needs 50 sets on a 50 MiB L2, where
    a cap of 8 would leave the whole working set (48 MiB) inside the cache. The count is the least that
    covers the multiple, so memory stays near ``L2_MULTIPLE`` x L2 for small maps, and a map that is alone
    larger than that gets one set.
    """
    return max(1, math.ceil(L2_MULTIPLE * l2_bytes / (READ_TENSORS * tensor_bytes)))


def _compile_events() -> dict[str, int]:
    """Dynamo's and inductor's compile counters (they only grow, across ``torch._dynamo.reset()`` too)."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            "aot_autograd": counters["aot_autograd"]["total"],
            "inductor": sum(v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache"))}


def _timed(fns: dict, device: torch.device, repeat: int, calls: int, what: str) -> dict[str, list[float]]:
    """Warm every variant up (the compiled peer compiles here), then time them, and raise if a timed call
    compiled anything: the compiled peer's time would then include compilation (or a fall-back to eager)."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    before = _compile_events()
    samples = time_interleaved(fns, device, warmup=1, repeat=repeat, calls=calls)
    after = _compile_events()
    if after != before:
        raise RuntimeError(f"bench_epilogue: torch.compile recompiled during the timed calls ({what}): "
                           f"compile counters {before} -> {after}; its times would include compilation")
    return samples


def _no_donated_buffers():
    """The backward-only timing replays one graph (retain_graph=True), which a compiled backward with donated
    buffers refuses; donation only saves memory, not time."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is not None and hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def _eager(sc, res):
    return torch.relu(sc + SCALE * res)


def _torchvision(sc, res):
    from torchvision.ops import stochastic_depth

    return torch.relu(sc + stochastic_depth(res, DROP_P, "row", training=True))


def _sdepth(sc, res):
    return sdepth_ext.gated_residual_relu(sc, res, SCALE)


def _bench_shape(shape, dtype, device, compiled_fn, repeat: int, cache: int, variants) -> tuple[dict, dict]:
    """Seconds per call of each (variant, pass), rotating over buffer sets: ({(variant, pass): samples},
    {"rotation_sets", "rotation_bytes", "rotation_read_bytes", "l2_bytes"})."""
    numel = math.prod(shape)
    tensor_bytes = numel * torch.tensor([], dtype=dtype).element_size()
    n_sets = rotation_sets(tensor_bytes, cache)
    rotation = {"rotation_sets": n_sets, "rotation_bytes": n_sets * SET_TENSORS * tensor_bytes,  # allocated
                "rotation_read_bytes": n_sets * READ_TENSORS * tensor_bytes,  # read by one round of forwards
                "l2_bytes": cache}
    gen = torch.Generator(device=device).manual_seed(0)  # generated where used: ResNet-50 tensors are ~1 GB

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    sets = [(randn(), randn(), randn()) for _ in range(n_sets)]  # shortcut, residual, grad: never zeros
    fns = {"sdepth": _sdepth, "eager": _eager, "torchvision": _torchvision, "compiled": compiled_fn}
    fns = {k: v for k, v in fns.items() if k in variants}
    counter = [0]
    what = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"

    def next_set():
        counter[0] = (counter[0] + 1) % n_sets
        return counter[0]

    # On CUDA each sample times a round of the buffer sets back to back (common.time_fn): device time of the
    # kernels, not the launch of one call on an idle GPU, which for the CIFAR shapes would outlast the kernel.
    calls = max(2, n_sets) if device.type == "cuda" else 1
    samples = {}
    # forward: no autograd graph, pure kernel time
    fwd = {}
    for name, fn in fns.items():
        def run_fwd(fn=fn):
            sc, res, _ = sets[next_set()]
            with torch.no_grad():
                return fn(sc, res)
        fwd[name] = run_fwd
    for name, ts in _timed(fwd, device, repeat, calls, f"{what} fwd").items():
        samples[(name, "fwd")] = ts

    # backward: one retained graph per buffer set, replayed with autograd.grad
    leaves = [(sc.requires_grad_(), res.requires_grad_(), g) for sc, res, g in sets]
    bwd = {}
    for name, fn in fns.items():
        outs = [fn(sc, res) for sc, res, _ in leaves]

        def run_bwd(outs=outs):
            i = next_set()
            sc, res, g = leaves[i]
            return torch.autograd.grad(outs[i], (sc, res), g, retain_graph=True)
        bwd[name] = run_bwd
    for name, ts in _timed(bwd, device, repeat, calls, f"{what} bwd").items():
        samples[(name, "bwd")] = ts
    del bwd

    both = {}
    for name, fn in fns.items():
        def run_both(fn=fn):
            sc, res, g = leaves[next_set()]
            return torch.autograd.grad(fn(sc, res), (sc, res), g)
        both[name] = run_both
    for name, ts in _timed(both, device, repeat, calls, f"{what} fwd+bwd").items():
        samples[(name, "fwd+bwd")] = ts
    return samples, rotation


def run(quick: bool = True, smoke: bool = False, samples: dict | None = None) -> list[dict]:
    """One row per (shape, dtype, pass) with times, GB/s and ratios; raw samples go into ``samples``."""
    device = best_device()
    dtypes = [torch.float32] if smoke else [torch.float32, torch.bfloat16]
    variants = [v for v in VARIANTS if not (smoke and v == "compiled")]  # compiling takes longer than smoke
    repeat = 3 if smoke else (10 if quick or device.type != "cuda" else 50)
    cache = _cache_bytes(device)
    copy_bw = copy_bandwidth(device, smoke)
    backend = "triton" if device.type == "cuda" and sdepth_ext.kernels.triton_available() else "torch"
    note = cpu_compiled_note(device, variants)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s; sdepth backend: {backend}; L2 {cache / 2**20:.0f} MiB",
          flush=True)
    if note:
        print(f"note: {note}", flush=True)
    rows = []
    for dtype in dtypes:
        for net, shape in _shapes(device, smoke):
            compiled_fn = None
            if "compiled" in variants:  # a fresh compiled function per shape and dtype, static shapes
                torch._dynamo.reset()
                compiled_fn = torch.compile(_eager, dynamic=False)
            graphs = _compile_events()["graphs"]
            with _no_donated_buffers():
                res, rotation = _bench_shape(shape, dtype, device, compiled_fn, repeat, cache, variants)
            graphs = _compile_events()["graphs"] - graphs
            numel = math.prod(shape)
            esize = torch.tensor([], dtype=dtype).element_size()
            for pas in PASSES:
                moved = TENSORS_MOVED[pas] * numel * esize
                row = {"bench": "epilogue", "net": net, "shape": "x".join(map(str, shape)),
                       "dtype": str(dtype).replace("torch.", ""), "pass": pas, "sdepth_backend": backend,
                       "bytes": moved, **rotation}
                if compiled_fn is not None:
                    row["compiled_graphs"] = graphs  # compiled during warm-up; none in timed calls (checked)
                if note:
                    row["note"] = note
                for v in variants:
                    t = median(res[(v, pas)])
                    row[f"{v}_ms"] = t * 1e3
                    row[f"{v}_GBps"] = moved / t / 1e9
                    if samples is not None:
                        samples[f"{net}/{row['shape']}/{row['dtype']}/{pas}/{v}"] = res[(v, pas)]
                row["sdepth_pct_copy"] = 100 * row["sdepth_GBps"] * 1e9 / copy_bw
                row["copy_GBps"] = copy_bw / 1e9
                for v in variants[1:]:
                    row[f"x_vs_{v}"] = row[f"{v}_ms"] / row["sdepth_ms"]  # > 1: sdepth is faster
                rows.append(row)
            print(format_table(rows[-len(PASSES):], _columns(variants)) + "\n", flush=True)
    return rows


def cpu_compiled_note(device: torch.device, variants) -> str | None:
    """:data:`CPU_COMPILED_NOTE` where it applies: a CPU run with the compiled peer."""
    return CPU_COMPILED_NOTE if device.type == "cpu" and "compiled" in variants else None


def _columns(variants) -> list[str]:
    return ["net", "shape", "dtype", "pass", *(f"{v}_ms" for v in variants), "sdepth_GBps",
            "sdepth_pct_copy", *(f"x_vs_{v}" for v in variants[1:]), "rotation_sets"]


def main(argv=None) -> list[dict]:
    args = parse_size_args(argv, __doc__.splitlines()[0],
                           smoke_help="seconds-long CI run: 2 shapes, fp32, no compile",
                           full_help="more repeats")
    env = environment()
    print_environment(env)
    samples: dict = {}
    rows = run(quick=not args.full, smoke=args.smoke, samples=samples)
    variants = [v for v in VARIANTS if f"{v}_ms" in rows[0]] if rows else VARIANTS
    print()
    print(format_table(rows, _columns(variants)))
    if rows and rows[0].get("note"):
        print(f"note: {rows[0]['note']}")
    paths = write_results("epilogue" + size_suffix(args.smoke, args.full), rows, env, samples=samples)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
