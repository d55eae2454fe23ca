"""What the model libraries' own checks ask of any model, asked of converted models of every family.

timm's and torchvision's model tests (written again here, not copied) check that a model trains with a
gradient on every parameter, traces with torch.fx (forward, backward, then TorchScript), scripts, exports,
and serves feature extraction. A converted model must pass them at drop rates where units really are dropped
(p = 0.5, batch and row mode), with:

* training: every parameter gets a gradient (the default "zero" policy gives dropped units exact zeros); a
  traced graph keeps the converted blocks as leaves that draw the gates of each step;
* eval: fx, TorchScript, torch.export and ONNX give the plain equivalent, ``sd.prune(model, [])`` (the
  original network for "inverted" scaling; ``p_l`` folded in for "paper"), and never change the model.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import sdepth_ext as sd
from sdepth_ext.state import get_state, is_gated

from .test_suite import CASE_IDS, CASES, convert_case, drawn_gates

# fp32 reductions in another order (pruned weights, a traced or scripted graph): a few ulps.
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread_quiet():
    """Bit-stable results on a loaded 2-core machine; torchvision warns that train and eval graphs differ
    (training keeps the units as leaves) and torch that TorchScript is deprecated: both expected here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*train mode are different to those obtained in eval")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        yield
    torch.set_num_threads(threads)


def tracer_kwargs() -> dict:
    """torch.fx tracer settings as timm's own helpers use them (its leaf modules and functions), if timm is
    installed; torchvision's tracer with nothing registered otherwise. Nothing of sdepth_ext is registered."""
    try:
        from timm.models import get_notrace_functions, get_notrace_modules
    except ImportError:
        return {}
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model traced in train and eval mode (torchvision's feature extraction), returning its output."""
    kwargs = tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=train_nodes[-1:],
                                    eval_return_nodes=eval_nodes[-1:], tracer_kwargs=kwargs)


def only_output(outputs: dict) -> torch.Tensor:
    (out,) = outputs.values()
    return out


def gated_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_gated(m)]


def assert_still_converted(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """Tracing, scripting and exporting leave the converted model as it was: same blocks, same classes."""
    assert [m for m in model.modules() if is_gated(m)] == blocks
    assert get_state(model).blocks == blocks


def needs_fx_and_script(case) -> None:
    if not case.extra.get("fx_and_script", True):
        pytest.skip(f"{case.name}: the unconverted model cannot be traced by torch.fx or scripted either")


def dropping_model(case, mode: str, scaling: str | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """A converted model in training mode whose first plan drops a unit entirely and keeps another."""
    kwargs = {} if scaling is None else {"scaling": scaling}
    model = convert_case(case, p_last=0.5, rule="uniform", mode=mode, seed=drawn_gates(case, mode), **kwargs)
    return model.train(), case.input(case.batch, 21)


def eval_model(case, scaling: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model = convert_case(case, p_last=0.5, rule="uniform", scaling=scaling).eval()
    return model, case.input(2, 22)


# ------------------------------------------------------------------------------------------------------------
# Training: a gradient on every parameter, traced graphs that keep skipping
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_parameter_gets_a_gradient(case, mode):
    model, x = dropping_model(case, mode)
    model(x).square().mean().backward()
    state = get_state(model)
    dropped = [l for l, c in enumerate(state.host_plan.counts) if c == 0]
    assert dropped
    plain = case.make().train()  # what the unconverted model leaves without a gradient (HF's mask_token)
    plain(x).square().mean().backward()
    unused = {n for n, p in plain.named_parameters() if p.grad is None}
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not missing, f"no gradient for {missing}"
    for l in dropped:  # exact zeros, and nothing of the branch ran
        assert all(not p.grad.any() for p in state.unit_parameters(l)), l


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fx_train_graph_keeps_units_as_leaves_that_draw_each_steps_gates(case, mode):
    needs_fx_and_script(case)
    model, x = dropping_model(case, mode)
    blocks = [m for m in model.modules() if is_gated(m)]
    traced = fx_model(model).train()
    leaves = {n.target for n in traced.train_graph.nodes if n.op == "call_module"}
    assert set(gated_names(model)) <= leaves
    scheduler = sd.get_scheduler(model)
    out = only_output(traced(x))  # draws step 0: the plan with a dropped unit
    assert scheduler.step == 1 and 0 in get_state(model).host_plan.counts
    out.square().mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    scheduler.step = 0  # the model itself on the same gates: the same output
    torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    only_output(traced(x))
    assert scheduler.step == 2  # the graph drew the next step, not the frozen first one
    assert_still_converted(model, blocks)


# ------------------------------------------------------------------------------------------------------------
# Evaluation: fx, TorchScript, torch.export, ONNX give the plain equivalent
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fx_eval_graph_is_the_eval_forward_in_plain_ops(case, scaling):
    needs_fx_and_script(case)
    model, x = eval_model(case, scaling)
    blocks = [m for m in model.modules() if is_gated(m)]
    traced = fx_model(model).eval()
    # Traced through, unless the model passes a block traced arguments whose values only the run will know
    # (timm's ViT forwards its attn_mask): such a block stays a leaf and checks them when the graph runs.
    leaves = [n for n in traced.eval_graph.nodes if n.op == "call_module" and n.target in gated_names(model)]
    assert all(len(n.args) + len(n.kwargs) > 1 for n in leaves)
    assert not leaves or scaling == "paper"
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(only_output(traced(x)), expected)  # the same ops in the same order
        torch.testing.assert_close(sd.prune(model, [])(x), expected, **TOL)
    assert_still_converted(model, blocks)


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fx_graph_then_script(case, scaling):
    """timm's fx + TorchScript check: the traced model (train graph with converted leaves included) scripts
    in eval mode and computes the eval forward (whose graph may call any member of a converted block)."""
    needs_fx_and_script(case)
    model, x = eval_model(case, scaling)
    blocks = [m for m in model.modules() if is_gated(m)]
    scripted = torch.jit.script(fx_model(model).eval())
    with torch.no_grad():
        torch.testing.assert_close(only_output(scripted(x)), model(x), **TOL)
    assert_still_converted(model, blocks)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_script_compiles_the_plain_eval_equivalent(case):
    needs_fx_and_script(case)
    model, x = eval_model(case, "paper")
    blocks = [m for m in model.modules() if is_gated(m)]
    scripted = torch.jit.script(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, **TOL)
        torch.testing.assert_close(scripted(x), sd.prune(model, [])(x), **TOL)
    assert_still_converted(model, blocks)
    block = blocks[0]
    torch.jit.script(block)  # a block alone too
    assert is_gated(block)
    model.train()
    with pytest.raises(TypeError, match="training mode.*torch.compile.*torch.export.*sd.prune"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="training mode"):
        torch.jit.script(block)
    assert_still_converted(model, blocks)


def test_script_of_a_part_of_a_converted_model_leaves_the_model_converted():
    """TorchScript writes what a child's __prepare_scriptable__ returns into its parent: scripting a stage
    of a converted model must not swap the stage's converted blocks for plain copies."""
    model = sd.convert(sd.cifar_resnet(20, num_classes=5), p_last=0.5, seed=0).eval()
    blocks = [m for m in model.modules() if is_gated(m)]
    x = torch.randn(2, 16, 8, 8)
    scripted = torch.jit.script(model.layer1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model.layer1(x), **TOL)
    assert_still_converted(model, blocks)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        full = torch.jit.script(model)(images)
        with sd.lesion(model, [1]):  # a lesioned unit scripts as removed
            expected = model(images)
            got = torch.jit.script(model)(images)
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, full)


@functools.cache
def strict_export_takes_root_hooks() -> bool:
    """Whether this torch's strict ``torch.export`` accepts a model whose root has a forward pre-hook (a
    converted model's root draws the step's plan in one). torch 2.4's traces the hook as a frame of its own
    and refuses any such model, a plain one with a no-op hook too; non-strict export takes it."""
    probe = torch.nn.Linear(2, 2)
    probe.register_forward_pre_hook(lambda module, args: None)
    try:
        torch.export.export(probe, (torch.randn(1, 2),), strict=True)
    except (AssertionError, torch._dynamo.exc.UserError):  # "whole graph export entails exactly one guard
        return False  # export", or the hook's frame seen as referring to tensors that are not inputs
    return True


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_export_gives_the_plain_eval_equivalent(case, scaling):
    model, x = eval_model(case, scaling)
    blocks = [m for m in model.modules() if is_gated(m)]
    try:
        torch.export.export(case.make().eval(), (x,))
    except Exception as err:  # noqa: BLE001 - whatever stops the plain model stops the test
        pytest.skip(f"torch.export cannot export the plain {case.name} on this torch: {type(err).__name__}")
    strict = {} if strict_export_takes_root_hooks() else {"strict": False}  # torch's default where it can
    exported = torch.export.export(model, (x,), **strict).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), sd.prune(model, [])(x), **TOL)
    assert_still_converted(model, blocks)


def onnx_export(model: torch.nn.Module, x: torch.Tensor, path: str, dynamo: bool) -> None:
    """torch.onnx.export with the exporter asked for: the dynamo one (torch.export based, the default of new
    torch) or the TorchScript-tracing one (the default of old torch; a few times faster)."""
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        torch.onnx.export(model, (x,), path, dynamo=dynamo)
    elif dynamo:
        pytest.skip("this torch's torch.onnx.export has no dynamo exporter")
    else:
        torch.onnx.export(model, (x,), path)


def check_onnx(case, tmp_path, dynamo: bool) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is an optional dependency (pip install sdepth_ext[onnx])")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional (sdepth_ext[onnx])")
    model, x = eval_model(case, "paper")
    path = str(tmp_path / "model.onnx")
    try:
        onnx_export(model, x, path, dynamo)
    except Exception:
        try:  # whatever stops the plain model stops the test
            onnx_export(case.make().eval(), x, str(tmp_path / "plain.onnx"), dynamo)
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"torch.onnx cannot export the plain {case.name} here: {type(err).__name__}")
        raise
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), sd.prune(model, [])(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_onnx_export_runs_the_plain_eval_equivalent(case, tmp_path):
    check_onnx(case, tmp_path, dynamo=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("cifar_resnet20", "timm_vit")],
                         ids=lambda c: c.name)
def test_onnx_dynamo_export_runs_the_plain_eval_equivalent(case, tmp_path):
    check_onnx(case, tmp_path, dynamo=True)


# ------------------------------------------------------------------------------------------------------------
# torchvision feature extraction skips in training
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_feature_extractor_skips_dropped_units_in_training(arch):
    """create_feature_extractor(model, {node: name}) on a converted torchvision model, nothing registered:
    the train graph runs fewer FLOPs than the same graph of the plain model (dropped units never run), and
    the eval graph equals the converted eval model."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    plain = getattr(torchvision.models, arch)(num_classes=10)
    model = copy.deepcopy(plain)
    kwargs = {"p_last": 0.5} if arch.startswith("resnet") else {}
    sd.convert(model, mode="batch", seed=0, **kwargs).train()
    nodes = {"avgpool": "pooled"}
    x = torch.randn(2, 3, 64, 64)

    def flops(extractor) -> int:
        with FlopCounterMode(display=False) as counter:
            extractor(x)["pooled"].sum().backward()
        return counter.get_total_flops()

    extractor = create_feature_extractor(model, nodes)
    steps = 8  # plans differ per step: compare the sums over several steps
    converted_flops = sum(flops(extractor) for _ in range(steps))
    plain_flops = flops(create_feature_extractor(plain.train(), nodes)) * steps
    assert converted_flops < 0.95 * plain_flops
    model.eval()
    extractor.eval()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["pooled"], model.avgpool(
            torch.nn.Sequential(*list(model.children())[:-2])(x)), **TOL)


# ------------------------------------------------------------------------------------------------------------
# timm's model API on converted models
# ------------------------------------------------------------------------------------------------------------
TIMM_MODELS = {"resnet18": {}, "convnext_atto": {}, "vit_tiny_patch16_224": {"img_size": 32}}


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_model_api_on_converted_models(name, mode):
    """What timm's tests ask of every model: pretrained cfg kept, reset_classifier, forward_features /
    forward_head, forward_intermediates and features_only, with a gradient for every parameter."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")
    torch.manual_seed(0)
    kwargs = {"drop_path_rate": 0.5, "num_classes": 5, **TIMM_MODELS[name]}
    model = timm.create_model(name, **kwargs)
    cfg = dict(model.pretrained_cfg)
    sd.convert(model, mode=mode, seed=1).train()
    assert dict(model.pretrained_cfg) == cfg and model.default_cfg == cfg
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(7)
    out = model.forward_head(model.forward_features(x))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    if hasattr(model, "forward_intermediates"):
        final, intermediates = model.forward_intermediates(x)
        assert len(intermediates) >= 3 and all(t.shape[0] == 2 for t in intermediates)
    features = sd.convert(timm.create_model(name, features_only=True, **kwargs), mode=mode, seed=1).train()
    maps = features(x)
    assert isinstance(maps, list) and all(m.shape[0] == 2 for m in maps)
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in features.parameters())
