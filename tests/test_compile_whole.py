"""torch.compile(converted_model): bounded graphs in every mode, results equal eager, other models unharmed.

Each compiled model is checked against an eager twin (a deepcopy taken before compiling: same weights, same
scheduler state, hence the same plan every step). Graphs are counted by a counting backend around aot_eager
(one call per graph Dynamo hands over), graph breaks and eager fallbacks by Dynamo's counters. The models
are the architectures of the issue at test size: cifar_resnet (BatchNorm, ReLU units), torchvision's
ConvNeXt (CNBlock: depthwise conv, LayerNorm) and timm's ViT (attention and MLP units).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import sdepth_ext as sd
from sdepth_ext.state import get_state

timm = pytest.importorskip("timm")

# Dynamo of torch 2.4 (make test-oldest) does not inline nn.Modules by default and has no torch.cond: the
# whole-model path is built and measured on torch >= 2.6.
pytestmark = [pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
                                 reason="whole-model torch.compile of converted models needs torch >= 2.6"),
              pytest.mark.usefixtures("fresh_dynamo")]

STEPS = 20
BATCH = 4
# aot_eager runs the eager ATen kernels: differences only from op order (and, in row mode, the branch run
# on all rows and masked instead of on the gathered rows: matmuls of another size).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def cifar():
    return sd.cifar_resnet(8, num_classes=4), (3, 8, 8), {"p_last": 0.5, "rule": "uniform"}


def convnext():
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5,
                    layer_scale=0.5, num_classes=4), (3, 32, 32), {}


def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=4,
                             drop_path_rate=0.5), (3, 32, 32), {}


MODELS = {"cifar_resnet": cifar, "convnext": convnext, "vit": vit}


class CountingBackend:
    """aot_eager, and the step at which each graph was compiled."""

    def __init__(self):
        self.inner = lookup_backend("aot_eager")
        self.step = 0
        self.compiled_at: list[int] = []

    def __call__(self, gm, example_inputs):
        self.compiled_at.append(self.step)
        return self.inner(gm, example_inputs)


def converted(name: str, mode: str, seed: int):
    torch.manual_seed(0)
    model, shape, kwargs = MODELS[name]()
    return sd.convert(model, mode=mode, seed=seed, **kwargs).train(), shape


def breaks() -> int:
    return sum(counters["graph_break"].values())


def no_eager_fallback() -> bool:
    return counters["frames"]["total"] == counters["frames"]["ok"]


def train_both(compiled, twin, backend, shape, steps=STEPS, batch=BATCH, compare=True):
    """Forward and backward of both models on the same inputs; loss and gradients compared each step.
    Returns each step's plan counts."""
    plans = []
    for step in range(steps):
        backend.step = step
        torch.manual_seed(100 + step)
        x, y = torch.randn(batch, *shape), torch.randint(0, 4, (batch,))
        results = []
        for m in (compiled, twin):
            m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            results.append(loss.detach())
        counts = get_state(compiled).host_plan.counts
        assert counts == get_state(twin).host_plan.counts
        plans.append(list(counts))
        if compare:
            torch.testing.assert_close(results[0], results[1], **TOL)
            for (name, p), q in zip(compiled.named_parameters(), twin.parameters()):
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, **TOL, msg=f"step {step} {name}")
    return plans


@pytest.mark.parametrize("mode", ["subset", "batch", "row"])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_compile_is_bounded_and_equals_eager(name, mode):
    """fullgraph=True in every mode: no graph break anywhere. Subset mode: one training graph, compiled at
    step 0, for 20 steps. Batch and row mode: the first step's graph (its gates constants), then one graph
    with the gates as inputs for every later pattern. Losses and gradients equal the eager twin's, except
    row mode with BatchNorm in the branch (compiled, the branch's statistics see every sample)."""
    model, shape = converted(name, mode, seed=3)
    twin = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    exact = not (mode == "row" and name == "cifar_resnet")
    plans = train_both(compiled, twin, backend, shape, compare=exact)
    if mode == "subset":
        assert backend.compiled_at == [0]
    else:
        assert backend.compiled_at == [0, 1]
        assert len({tuple(p) for p in plans[1:]}) > 1  # the patterns did vary
    if mode == "batch":
        assert any(0 in p for p in plans[1:])
    assert breaks() == 0 and no_eager_fallback()


def test_row_mode_with_batchnorm_trains_compiled_with_eager_gates():
    """What the compiled row mode of a BatchNorm model does differently from eager (statistics over every
    sample): the same forward as eager where every sample survives, and gradients that only flow through
    the survivors' residuals."""
    model, shape = converted("cifar_resnet", "row", seed=3)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for step in range(3):
        backend.step = step
        x = torch.randn(BATCH, *shape)
        F.cross_entropy(compiled(x), torch.zeros(BATCH, dtype=torch.long)).backward()
    assert backend.compiled_at == [0, 1] and breaks() == 0


def mm_calls(model, x) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    return sum(1 for e in prof.events() if e.name in ("aten::addmm", "aten::mm"))


def test_a_dropped_unit_runs_nothing_under_compile():
    """Batch mode ViT (torch.cond on the gate): matmuls launched per step (profiler, forward and backward)
    are an affine function of the number of kept units, and with no unit kept they would be exactly those
    the eager model launches outside its units: a dropped unit runs none."""
    model, shape = converted("vit", "batch", seed=5)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for m in (compiled, twin):  # the two compiles (first plan, then gates as inputs), both models in step
        for _ in range(2):
            m(torch.randn(BATCH, *shape)).sum().backward()
    seen = {"compiled": {}, "eager": {}}
    for _ in range(12):
        x = torch.randn(BATCH, *shape)
        for key, m in (("compiled", compiled), ("eager", twin)):
            calls = mm_calls(m, x)
            kept = sum(c > 0 for c in get_state(m).host_plan.counts)
            assert seen[key].setdefault(kept, calls) == calls
    assert len(seen["compiled"]) >= 2

    def line(points):
        (k0, c0), (k1, c1) = sorted(points.items())[:2]
        slope = (c1 - c0) // (k1 - k0)
        assert all(c == c0 + slope * (k - k0) for k, c in points.items()), points
        return slope, c0 - slope * k0

    slope, outside = line(seen["compiled"])
    eager_slope, eager_outside = line(seen["eager"])
    assert slope > 0 and eager_slope > 0
    assert outside == eager_outside


@pytest.mark.parametrize("name,mode", [("cifar_resnet", "batch"), ("cifar_resnet", "row"),
                                       ("vit", "batch"), ("convnext", "subset")])
def test_a_plain_model_compiled_after_a_converted_one_is_one_graph(name, mode):
    """Dynamo must not stop tracing shared code (the root forward, nn.Sequential's loop) because a
    converted model ran through it (it did once the converted model's graph breaks and recompiles had run
    for some steps)."""
    model, shape = converted(name, mode, seed=1)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(STEPS):
        compiled(torch.randn(BATCH, *shape)).sum().backward()
    counters.clear()
    torch.manual_seed(0)
    plain = MODELS[name]()[0].train()
    backend = CountingBackend()
    compiled_plain = torch.compile(plain, backend=backend)
    for _ in range(3):
        compiled_plain(torch.randn(BATCH, *shape)).sum().backward()
    assert backend.compiled_at == [0] and breaks() == 0 and no_eager_fallback()


def test_subset_mode_recompiles_boundedly_on_batch_size_and_drop_scale():
    """A new batch size or drop scale changes each unit's fixed count: a graph each, then none again."""
    model, shape = converted("vit", "subset", seed=2)
    twin = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    train_both(compiled, twin, backend, shape, steps=3, batch=4)
    train_both(compiled, twin, backend, shape, steps=3, batch=6)
    train_both(compiled, twin, backend, shape, steps=3, batch=4)
    for m in (model, twin):
        sd.set_drop_scale(m, 0.5)
    train_both(compiled, twin, backend, shape, steps=3, batch=4)
    assert len(backend.compiled_at) <= 3
    assert breaks() == 0 and no_eager_fallback()


def test_eval_after_training_compiled():
    """Evaluation through the same compiled wrapper: its own graph, the plain forward's result."""
    model, shape = converted("vit", "batch", seed=1)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for m in (compiled, twin):
        m(torch.randn(BATCH, *shape)).sum().backward()
        m.eval()
    x = torch.randn(BATCH, *shape)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), **TOL)
    assert breaks() == 0


def test_subset_mode_single_batchnorm_survivor_compiles_in_one_graph():
    """Batches of 2 at p 0.5 keep one sample per unit, and at a 1x1 map BatchNorm needs two: the survivor is
    normalised with a dropped sample, paired from the rows tensor inside the graph (no host read)."""
    torch.manual_seed(0)
    model = sd.convert(sd.cifar_resnet(8, num_classes=4), p_last=0.5, rule="uniform", mode="subset",
                       seed=3).train()
    twin = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    plans = train_both(compiled, twin, backend, (3, 4, 4), steps=6, batch=2)
    assert all(c == 1 for p in plans for c in p)
    assert backend.compiled_at == [0] and breaks() == 0
