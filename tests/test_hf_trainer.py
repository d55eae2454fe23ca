"""sdepth_ext.hf.GateStateCallback with transformers.Trainer: checkpoints keep the gate stream, resume
continues it, and HF gradient checkpointing gives the same gradients."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (Trainer needs it; sdepth_ext[hf])")

from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import sdepth_ext as sd  # noqa: E402
from sdepth_ext.hf import GATE_STATE_NAME, GateStateCallback  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Images(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def make_model(seed=7, drop_scale=None, family="dinov2", mode=None):
    torch.manual_seed(0)
    if family == "dinov2":
        model = Dinov2ForImageClassification(Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            mlp_ratio=2, drop_path_rate=0.4, num_labels=5))
    else:
        model = ConvNextForImageClassification(ConvNextConfig(
            hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=0.5, num_labels=5,
            image_size=32))
    model = sd.convert(model, seed=seed, mode=mode)
    if drop_scale is not None:
        sd.set_drop_scale(model, drop_scale)
    return model


def train_args(out, **kw):
    settings = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                    logging_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
                    learning_rate=1e-3, disable_tqdm=True)
    return TrainingArguments(output_dir=str(out), **{**settings, **kw})


@pytest.mark.parametrize("family", ["convnext", "dinov2"])
def test_resume_from_a_checkpoint_continues_the_gate_stream(tmp_path, family):
    full = make_model(seed=7, drop_scale=0.5, family=family)
    Trainer(model=full, args=train_args(tmp_path / "full"), train_dataset=Images(),
            callbacks=[GateStateCallback()]).train()
    want = sd.get_scheduler(full).state_dict()
    assert (want["seed"], want["step"], want["drop_scale"]) == (7, 4, 0.5)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    with open(checkpoint / GATE_STATE_NAME) as f:
        saved = json.load(f)
    assert (saved["seed"], saved["step"], saved["drop_scale"]) == (7, 2, 0.5)
    assert not [n for n in os.listdir(checkpoint) if n.startswith(f".{GATE_STATE_NAME}")]  # no temporary left

    # A new process's model: another seed and drop scale; resumed from the checkpoint in another output_dir.
    resumed = make_model(seed=123, family=family)
    Trainer(model=resumed, args=train_args(tmp_path / "resumed"), train_dataset=Images(),
            callbacks=[GateStateCallback()]).train(resume_from_checkpoint=str(checkpoint))
    assert sd.get_scheduler(resumed).state_dict() == want
    if family == "convnext":  # transformers 5.x's Trainer reloads a Dinov2 checkpoint without its attention
        # weights (renamed keys; unconverted models too), so only ConvNext resumes to the same weights
        for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)  # the same gates: the same steps

    # Without the callback the stream is not continued (what the test above guards against).
    plain = make_model(seed=123, family=family)
    Trainer(model=plain, args=train_args(tmp_path / "plain"), train_dataset=Images()).train(
        resume_from_checkpoint=str(checkpoint))
    assert sd.get_scheduler(plain).state_dict() != want


def test_evaluate_gives_the_plain_models_loss(tmp_path):
    plain = make_model(seed=1)
    sd.revert(plain)
    converted = make_model(seed=1)
    losses = [Trainer(model=m, args=train_args(tmp_path / str(i), per_device_eval_batch_size=4)).evaluate(
        Images(8, seed=3))["eval_loss"] for i, m in enumerate((converted, plain))]
    assert losses[0] == losses[1]


class Grads(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: None if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()})


def test_gradient_checkpointing_gives_equal_gradients(tmp_path):
    runs = []
    for checkpointing in (False, True):
        model, grads = make_model(seed=5), Grads()
        Trainer(model=model, args=train_args(tmp_path / str(checkpointing), max_steps=2, save_strategy="no",
                                             gradient_checkpointing=checkpointing),
                train_dataset=Images(), callbacks=[grads]).train()
        assert all(layer.gradient_checkpointing == checkpointing for layer in model.dinov2.encoder.layer)
        runs.append(grads.grads)
    assert len(runs[0]) == len(runs[1]) == 2
    for step, (plain, checkpointed) in enumerate(zip(*runs)):
        for name, grad in plain.items():
            assert (grad is None) == (checkpointed[name] is None), (step, name)
            if grad is not None:
                torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{step} {name}")


class Steps(TrainerCallback):
    """Each step's loss and plan, and how many graphs Dynamo had compiled by the end of the step."""

    def __init__(self):
        self.losses, self.plans, self.graphs = [], [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.plans.append(list(get_state(model).host_plan.counts))
        self.graphs.append(counters["stats"]["unique_graphs"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="whole-model torch.compile of converted models needs torch >= 2.6")
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_torch_compile_trains_like_eager(tmp_path, mode):
    """Trainer(torch_compile=True) compiles the converted model whole (accelerate's torch.compile of the
    root): 0 graph breaks, no graph after the second step, the same plans, losses and weights as an eager
    twin, and GateStateCallback's checkpoints hold the gate state. Dinov2's units are transformer units, so
    batch mode skips a dropped unit inside the graph (torch.cond) and subset mode runs each branch on its
    kept rows."""
    runs = {}
    for compiled in (False, True):
        model, steps = make_model(seed=7, mode=mode), Steps()
        before = [p.detach().clone() for p in model.parameters()]
        options = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = Trainer(model=model, args=train_args(tmp_path / str(compiled), max_steps=4, logging_steps=1,
                                                       logging_strategy="steps", **options),
                          train_dataset=Images(), callbacks=[GateStateCallback(), steps])
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
        assert sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before)) > 0.9 * len(before)
        runs[compiled] = model, steps
    (eager, eager_steps), (model, steps) = runs[False], runs[True]
    assert len(steps.losses) == 4 and all(torch.isfinite(torch.tensor(steps.losses)))
    torch.testing.assert_close(steps.losses, eager_steps.losses, rtol=1e-5, atol=1e-6)
    assert steps.plans == eager_steps.plans
    if mode == "batch":
        assert any(0 in plan for plan in steps.plans)  # a unit was dropped: the compiled skip ran
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert sd.get_scheduler(model).state_dict() == sd.get_scheduler(eager).state_dict()
    with open(tmp_path / "True" / "checkpoint-2" / GATE_STATE_NAME) as f:
        assert json.load(f)["step"] == 2

    # Two graphs, both by step 2: HF's loss sets config.problem_type at the first call (a guard), and batch
    # mode's first traced step has its gates as constants; from then on one graph serves every plan.
    assert steps.graphs[0] >= 1 and steps.graphs[1:] == [steps.graphs[1]] * 3 and steps.graphs[-1] <= 2
    assert sum(counters["graph_break"].values()) == 0
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame fell back to eager
