"""`make bench` in --smoke mode: runs end to end and writes well-formed, stamped result files.

No timing is asserted anywhere: speed claims live in the benchmark output, measured side by side.
The in-process runs pass ``--cpu-malloc default`` so the pytest process keeps its allocator; the ``keep``
setting is tested in subprocesses.
"""

import collections
import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_host, common, report, workers
from benchmarks import run as bench_run

STAMP = common.CSV_STAMP  # on every CSV row; cpu_allocator included


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_run, "RESULTS_DIR", tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``make bench --smoke`` once for this module: (results, output folder, printed text)."""
    tmp = tmp_path_factory.mktemp("results")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "RESULTS_DIR", tmp)
        mp.setattr(bench_run, "RESULTS_DIR", tmp)
        with contextlib.redirect_stdout(printed):
            results = bench_run.main(["--smoke", "--cpu-malloc", "default"])
    return results, tmp / common.device_slug(common.best_device()), printed.getvalue()


def test_a_partial_rerun_keeps_the_other_benchmarks_in_summary_and_log(smoke_run, tmp_path, monkeypatch):
    """``--only scheduler`` after a whole run: its summary still holds every benchmark's rows (the others'
    from their result files), and the log keeps their tables with this run's appended."""
    _, out_dir, _ = smoke_run
    copied = tmp_path / out_dir.name
    shutil.copytree(out_dir, copied)
    before_log = (copied / "bench_smoke.log").read_text()
    before = json.loads((copied / "summary_smoke.json").read_text())["rows"]
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_run, "RESULTS_DIR", tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        bench_run.main(["--smoke", "--only", "scheduler", "--cpu-malloc", "default"])
    summary = json.loads((copied / "summary_smoke.json").read_text())
    assert summary["rerun"] == ["scheduler"]
    assert [r["what"] for r in summary["rows"]] == [r["what"] for r in before]
    log = (copied / "bench_smoke.log").read_text()
    assert log.startswith(before_log) and "===== rerun of scheduler (" in log[len(before_log):]
    assert "[scheduler: " in log[len(before_log):]


OWN_SD = ("convnext_tiny", "swin_t", "efficientnet_b0")
try:
    import timm  # noqa: F401
except ImportError:
    TIMM_SD: tuple[str, ...] = ()
else:
    TIMM_SD = ("timm deit_small", "timm resnet50")  # timed at their highest rate only in a smoke run
try:
    import transformers  # noqa: F401
except ImportError:
    HF_SD: tuple[str, ...] = ()  # the oldest venv (make test-oldest): the benchmarks leave them out
else:
    HF_SD = ("hf dinov2", "hf convnextv2")  # Dinov2 / ConvNextV2ForImageClassification, tiny in a smoke run
NO_TRANSFORMERS = "transformers is not installed (pip install sdepth_ext[hf]): no HF rows are benchmarked"
FAMILIES = {"torchvision ResNet", "torchvision ConvNeXt", "torchvision Swin", "torchvision EfficientNet",
            *({"timm ViT", "timm ResNet"} if TIMM_SD else ()),
            *({"Hugging Face Dinov2", "Hugging Face ConvNext"} if HF_SD else ())}


def test_smoke_run_writes_stamped_results_and_plots(smoke_run):
    results, out_dir, printed = smoke_run
    assert set(results) == {"scheduler", "epilogue", "host", "models", "prune", "footprint"}
    for name in ("scheduler_smoke", "epilogue_smoke", "host_smoke", "models_smoke", "prune_smoke"):
        data = json.loads((out_dir / f"{name}.json").read_text())
        assert all(data["environment"][k] for k in ("device", "torch", "date", "command", "cpu_allocator"))
        assert data["rows"], name
        assert data["samples"] and all(len(v) >= 1 for v in data["samples"].values())
        with open(out_dir / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(data["rows"])
        assert all(k in rows[0] for k in STAMP)
    footprint = json.loads((out_dir / "footprint_smoke.json").read_text())  # counted: no timing samples
    assert all(footprint["environment"][k] for k in ("device", "torch", "date", "command", "gpu_path"))
    assert {(r["variant"], r["dropped_grads"]) for r in footprint["rows"]} == {
        ("full", None), ("original", None),
        *((f"sdepth {mode}", policy) for mode in ("batch", "row") for policy in ("none", "zero"))}
    assert {r["model"] for r in footprint["rows"]} == {"cifar_resnet20", "efficientnet_b0", *HF_SD}
    for r in results["epilogue"]:  # every row says how much it rotated, and that covers 4x the L2 (by reads)
        tensor = r["bytes"] // {"fwd": 3, "bwd": 4, "fwd+bwd": 7}[r["pass"]]
        assert r["rotation_bytes"] == r["rotation_sets"] * 3 * tensor
        assert r["rotation_read_bytes"] == r["rotation_sets"] * 2 * tensor >= 4 * r["l2_bytes"]
    for png in ("epilogue_bandwidth_smoke.png", "models_ratio_smoke.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out_dir / "summary_smoke.json").read_text())
    assert summary["smoke"] is True and "not measurements" in summary["note"]
    whats = [r["what"] for r in summary["rows"]]
    assert {w.split()[0] for w in whats} >= {"scheduler", "epilogue", "host"}
    assert {w.split(" 4x")[0] for w in whats if w.startswith("epilogue host")} == {
        "epilogue host fwd", "epilogue host fwd+bwd", "epilogue host rows fwd+bwd"}
    host_calls = [r for r in summary["rows"] if r["what"].startswith("epilogue host")]
    assert all("of eager" in r["ratio"] for r in host_calls)
    host_steps = [r for r in summary["rows"] if r["what"].startswith("host step")]
    # every converted variant, and the hand-written comparator of each batch-mode "none" one
    comparators = sum((mode, policy) == ("batch", "none") for _, mode, policy in bench_host.STEP_VARIANTS)
    assert len(host_steps) == (len(bench_host.STEP_VARIANTS) + comparators) * len(bench_host.STEP_PARTS)
    assert sum("zeros by hand" in r["what"] for r in host_steps) == comparators * len(bench_host.STEP_PARTS)
    assert all("of plain" in r["ratio"] and "blocks expected" in r["ideal/limit"] for r in host_steps)
    # One headline row per model and mode at rate 0.5 (the smoke run has no ResNet p_last 0.2), with the
    # ratio and its interval, sdepth over its by-hand comparator, the FLOP ideal, and for the models with
    # their own stochastic depth the target.
    models = [r for r in summary["rows"] if " train step, " in r["what"]]
    heads = {re.match(r"(.*) b\d+@\d+ train step, (\w+)", r["what"]).groups() for r in models}
    assert heads == {(m, mode) for m in ("cifar_resnet20", "resnet50", *OWN_SD, *TIMM_SD, *HF_SD)
                     for mode in ("batch", "row")}
    assert len(models) == len(heads)
    for r in models:
        reference = "plain" if r["what"].startswith(("cifar_resnet", "resnet")) else "original"
        assert f"of {reference}" in r["ratio"] and "of by-hand" in r["ratio"] and "[" in r["brief"]["ratio"]
        assert "FLOPs" in r["ideal/limit"] and "same plans" in r["ideal/limit"]
        assert ("target" in r["ideal/limit"]) == ("stochastic_depth_prob=" in r["what"])
    lines = printed.strip().splitlines()
    assert "device:" in printed and "ideal/limit" in printed  # environment report and the summary table
    assert lines[0] == lines[-1] == bench_run.SMOKE_NOTE  # a smoke run says so first and last
    table = lines[lines.index(next(line for line in lines if line.startswith("what "))):-1]
    assert len(table) >= len(summary["rows"]) + 2 and all(len(line) <= 120 for line in table)

    markdown = report.main([str(out_dir), "--suffix", "_smoke"])
    assert summary["environment"]["device"] in markdown and summary["environment"]["date"] in markdown
    assert markdown.count("| what |") == 1 and markdown.count("| model |") == 1
    assert markdown.count("| per call |") == 1 and markdown.count("| host step |") == 1
    assert "not measurements" in markdown
    assert all(f"| {m} b4@32 | sdepth row p0.5 |" in markdown for m in (*OWN_SD, *HF_SD))
    assert markdown.count("| model, drop rate |") == 1 and "| original (mask-multiply) |" in markdown


def test_model_rows_carry_ratio_comparators_and_ideals(smoke_run):
    from benchmarks.models import HAND_MODES, HF_MODELS, OWN_SD_MODELS

    rows = smoke_run[0]["models"]
    assert {r["family"] for r in rows} == FAMILIES
    assert all(r["ratio_ci95_low"] <= r["ratio"] <= r["ratio_ci95_high"] for r in rows)
    assert all(r["full_ratio_ci95_low"] <= r["full_ratio"] <= r["full_ratio_ci95_high"] for r in rows)
    for model in ("cifar_resnet20", "resnet50", *OWN_SD, *TIMM_SD, *HF_SD):
        sel = {r["variant"]: r for r in rows if r["model"] == model}
        if model in (*OWN_SD, *TIMM_SD, *HF_SD):
            default = {**OWN_SD_MODELS, **HF_MODELS}[model][1]
            top = "p0.4" if model in TIMM_SD else "p0.5"
            rates = [top] if model in TIMM_SD else [f"p{default:g}", top]
            expected = {"original p0", *(f"{v} {p}" for p in rates for v in
                                         ("original", "sdepth batch", "sdepth row")),
                        f"hand-written skip batch {top}", f"contiguous sub-batches row {top}"}
            assert set(sel) == expected
            # The ratio is to the original model at the same rate; original p0 is the full network.
            for name, r in sel.items():
                assert r["reference"] == f"original {name.split()[-1]}" and r["p_last"] is None
                assert r["stochastic_depth_prob"] == float(name.split()[-1][1:])
            assert sel["original p0"]["full_ratio"] == 1.0
            assert all(sel[f"original {p}"]["ratio"] == 1.0 for p in ["p0", *rates])
        else:
            assert sel["plain"]["ratio"] == 1.0 and all(r["reference"] == "plain" for r in sel.values())
            assert {r["mode"] for r in sel.values()} == {"-", "batch", "row", "torchvision", "droppath",
                                                        "hand-batch", "hand-row"}
            assert all(r["ideal_ratio"] == 1.0 for r in sel.values()
                       if r["mode"] in ("torchvision", "droppath"))
        sdepth = [r for r in sel.values() if r["mode"] in ("batch", "row")]
        assert len(sdepth) == (4 if model in (*OWN_SD, *HF_SD) else 2)  # ResNets, timm: one rate in smoke
        # FLOP ideals, expected and of the plans drawn (a tiny smoke run may skip nothing). The unit-time
        # ideal is built from measured times, which a smoke run's few noisy samples can put on either side
        # of 1: only its presence is checked, never a timing.
        assert all(0.0 < r["ideal_ratio"] < 1.0 and 0.0 < r["drawn_ideal_ratio"] <= 1.0
                   and math.isfinite(r["time_ideal_ratio"]) and math.isfinite(r["drawn_time_ideal_ratio"])
                   for r in sdepth)
        # Each sdepth row at rate 0.5 carries its hand-written comparator, which ran on the same plans.
        for r in sdepth:
            rate = r["p_last"] if r["p_last"] is not None else r["stochastic_depth_prob"]
            if rate != (0.4 if model in TIMM_SD else 0.5):
                assert "hand_ratio" not in r
                continue
            twin = sel[f"{HAND_MODES[r['mode']]} {r['mode']} {r['variant'].split()[-1]}"]
            assert twin["mode"] == f"hand-{r['mode']}" and twin["reference"] == r["reference"]
            assert r["hand_ratio"] == twin["ratio"] and r["drawn_ideal_ratio"] == twin["drawn_ideal_ratio"]
            assert r["over_hand"] == pytest.approx(r["ratio"] / r["hand_ratio"])
            assert r["hand_gap"] == pytest.approx(r["ratio"] - r["hand_ratio"])
            assert r["over_hand_ci95_low"] <= r["over_hand"] <= r["over_hand_ci95_high"]


@pytest.mark.skipif(not HF_SD, reason=NO_TRANSFORMERS)
def test_smoke_run_has_the_hugging_face_rows(smoke_run):
    """Dinov2 and ConvNextV2 (transformers' classifiers, built offline) are timed against HF's own
    mask-multiply at the same drop_path_rate, with the same plans skipped by hand; counted in the footprint;
    headlined in the summary with the issue's target."""
    results, _, _ = smoke_run
    for model, family in zip(HF_SD, ("Hugging Face Dinov2", "Hugging Face ConvNext")):
        rows = {r["variant"]: r for r in results["models"] if r["model"] == model}
        assert {r["family"] for r in rows.values()} == {family}
        for mode in ("batch", "row"):
            r = rows[f"sdepth {mode} p0.5"]
            assert r["reference"] == "original p0.5" and r["stochastic_depth_prob"] == 0.5
            assert "over_hand" in r
        footprint = [r for r in results["footprint"] if r["model"] == model]
        assert {r["variant"] for r in footprint} == {"full", "original", "sdepth batch", "sdepth row"}
        assert all(r["rate"] == 0.5 and r["saved_over_ideal"] >= -1e-9 and r["launches_ideal"] > 0
                   for r in footprint if r["variant"].startswith("sdepth"))
        summary = [r for r in bench_run._summary(results, "cpu") if r["what"].startswith(f"{model} b4@32 ")]
        assert len(summary) == 2 and all("target" in r["ideal/limit"] for r in summary)


def test_without_transformers_the_benchmarks_leave_the_hf_models_out(monkeypatch, capsys):
    from benchmarks import models

    monkeypatch.setattr(models, "_has_transformers", lambda: False)
    for smoke, quick in ((True, True), (False, True), (False, False)):
        configs, _, _ = models.model_configs(torch.device("cpu"), quick=quick, smoke=smoke)
        assert configs and not any(c["name"] in models.HF_MODELS for c in configs)
    assert "transformers is not installed" in capsys.readouterr().out


def test_block_cost_interpolates_measured_sizes_through_zero():
    from benchmarks.bench_models import block_cost

    times = {8: 2.0, 16: 3.0, 32: 7.0}
    assert block_cost(times, 0) == 0.0
    assert block_cost(times, 4) == pytest.approx(1.0)  # between (0, 0) and (8, 2)
    assert block_cost(times, 12) == pytest.approx(2.5)
    assert block_cost(times, 24) == pytest.approx(5.0)
    assert block_cost(times, 32) == pytest.approx(7.0)


def test_ratio_interval_pairs_rounds_and_contains_the_ratio():
    from benchmarks.common import ratio_interval

    plain = [1.0, 2.0, 1.5, 3.0, 1.2, 2.2]
    # A variant at exactly 0.8x of plain in every round: every paired resample gives 0.8, whatever the drift.
    low, high = ratio_interval([0.8 * t for t in plain], plain)
    assert low == pytest.approx(0.8) and high == pytest.approx(0.8)
    noisy = [0.8 * t + d for t, d in zip(plain, (0.1, -0.1, 0.05, -0.05, 0.2, -0.2))]
    low, high = ratio_interval(noisy, plain)
    ratio = sum(noisy) / sum(plain)
    assert low < ratio < high and high - low < 0.5
    assert ratio_interval(noisy, plain) == (low, high)  # seeded


def test_ratio_interval_over_several_processes_resamples_the_processes():
    """Rounds from two processes whose ratios differ (0.7 in one, 0.9 in the other, steady within each):
    resampling rounds alone mixes the two in about equal parts every time, a narrow interval around 0.8;
    resampling the processes first (``runs``) also draws both rounds' sets from one process, and the
    interval reaches either process's ratio. One process (all labels equal) is the plain resampling."""
    from benchmarks.common import ratio_interval

    plain = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0] * 2
    ours = [0.7 * t for t in plain[:6]] + [0.9 * t for t in plain[6:]]
    runs = [0] * 6 + [1] * 6
    low, high = ratio_interval(ours, plain)
    assert 0.72 < low < 0.8 < high < 0.88
    low, high = ratio_interval(ours, plain, runs=runs)
    assert low == pytest.approx(0.7) and high == pytest.approx(0.9)
    assert ratio_interval(ours, plain, runs=[3] * 12) == ratio_interval(ours, plain)


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], stochastic_depth_prob=0.5, num_classes=10)


def _tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5,
                    num_classes=10)


def _efficientnet_b0():
    import torchvision

    return torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5, num_classes=10)


def _cifar_resnet20():
    import sdepth_ext as sd

    return sd.cifar_resnet(20)


def _hf_model(name: str, rate: float = 0.5, **sizes):
    """A tiny Hugging Face classifier as bench_models builds them (``benchmarks.models.HF_MODELS``)."""
    pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    from benchmarks.models import HF_MODELS, HF_SMOKE

    return HF_MODELS[name][0](stochastic_depth_prob=rate, num_classes=5, **{**HF_SMOKE[name], **sizes})


def _hf_dinov2():  # called by the encoder with the layer's attention_mask (None) and kwargs
    return _hf_model("hf dinov2", image_size=32)


def _hf_convnextv2():
    return _hf_model("hf convnextv2")


# (model, batch): a batch of 2 makes one-survivor units common; at 32x32 EfficientNet's last stage is 1x1,
# where BatchNorm needs a second sample (sdepth_ext and the comparator both run the branch on 2).
HAND_CASES = {"cifar_resnet20": (_cifar_resnet20, 8), "swin": (_tiny_swin, 4),
              "convnext": (_tiny_convnext, 4), "efficientnet_b0": (_efficientnet_b0, 2),
              "hf_dinov2": (_hf_dinov2, 4), "hf_convnextv2": (_hf_convnextv2, 4)}


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_comparator_runs_the_converted_models_plans(case, mode):
    """The hand-written comparator must skip the work of the very plans sdepth_ext draws (same scheduler
    stream): every unit's branch runs on as many samples in both, step after step (counted by a hook on the
    first module of each unit's branch). In batch mode it must also compute the same function, bit for bit
    (its eager add against the fused epilogue's torch path on CPU), with paper and inverted scaling."""
    import copy

    import sdepth_ext as sd
    from benchmarks.models import with_hand_skip
    from sdepth_ext.state import units_of

    make, batch = HAND_CASES[case]
    torch.manual_seed(0)
    base = make()
    resnet = case.startswith("cifar")
    if resnet:
        converted = sd.convert(copy.deepcopy(base), p_last=0.5, mode=mode, seed=7).train()
        hand = with_hand_skip(copy.deepcopy(base), mode, sd.linear_decay(len(units_of(base)), 0.5), seed=7)
    else:  # the model's own rates, inverted scaling
        converted = sd.convert(copy.deepcopy(base), mode=mode, seed=7).train()
        hand = with_hand_skip(copy.deepcopy(base), mode, sd.survival_probs(converted), seed=7,
                              scaling="inverted")
    hand.train()
    runs = {"converted": [], "hand": []}
    for name, model in (("converted", converted), ("hand", hand)):
        for l, (block, u, adapter) in enumerate(units_of(model)):
            adapter.branch_modules(block, u)[0].register_forward_pre_hook(
                lambda _, args, l=l, log=runs[name]: log.append((l, args[0].shape[0])))
    x = torch.rand(batch, 3, 32, 32)
    steps = 8
    for step in range(steps):
        torch.manual_seed(step)  # EfficientNet's classifier dropout draws the same mask in both
        out_converted = converted(x)
        torch.manual_seed(step)
        out_hand = hand(x)
        if mode == "batch":
            torch.testing.assert_close(out_hand, out_converted, rtol=0, atol=0)
    assert runs["hand"] == runs["converted"]
    units = len(units_of(base))
    sizes = [k for _, k in runs["converted"]]
    assert len(sizes) < steps * units if mode == "batch" else min(sizes) < batch  # something was skipped


def test_own_sd_builders_are_torchvisions_models_at_any_rate():
    """convnext_tiny / swin_t / efficientnet_b0 as bench_models builds them: torchvision's architectures,
    at torchvision's default rate when given it (torchvision's swin_t takes no stochastic_depth_prob)."""
    import torchvision
    from torchvision.ops import StochasticDepth

    from benchmarks.models import OWN_SD_MODELS

    def rates(model):
        return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    for name, (builder, default) in OWN_SD_MODELS.items():
        if name.startswith("timm"):
            continue  # timm's own builders (drop_path_rate): tested in test_timm_builders_take_the_rate
        ours = builder(stochastic_depth_prob=default, num_classes=10)
        theirs = getattr(torchvision.models, name)(num_classes=10)
        assert type(ours) is type(theirs) and shapes(ours) == shapes(theirs)
        assert rates(ours) == pytest.approx(rates(theirs)) and max(rates(theirs)) > 0
        half = builder(stochastic_depth_prob=0.5, num_classes=10)
        assert rates(half) == pytest.approx([p * 0.5 / default for p in rates(theirs)])


def test_timm_builders_take_the_rate():
    pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")
    from benchmarks.models import OWN_SD_MODELS

    builder, default = OWN_SD_MODELS["timm deit_small"]
    model = builder(stochastic_depth_prob=0.4, num_classes=10, img_size=32)
    assert max(m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath") == pytest.approx(0.4)


def test_hf_builders_take_the_rate():
    """bench_models' HF classifiers: built from a config (no hub access) at drop_path_rate, called on pixels
    for their logits; the default sizes are dinov2-small's and ConvNeXt V2-Femto's."""
    pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    from benchmarks.models import HF_MODELS

    def drop_probs(model):
        return [m.drop_prob for m in model.modules() if type(m).__name__.endswith("DropPath")]

    dinov2 = HF_MODELS["hf dinov2"][0](stochastic_depth_prob=0.4, num_classes=10, image_size=32)
    assert type(dinov2.model).__name__ == "Dinov2ForImageClassification"
    assert (dinov2.model.config.hidden_size, dinov2.model.config.num_hidden_layers) == (384, 12)
    assert drop_probs(dinov2) == pytest.approx([0.4] * 12)
    assert dinov2.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    convnext = HF_MODELS["hf convnextv2"][0](stochastic_depth_prob=0.4, num_classes=10)
    assert type(convnext.model).__name__ == "ConvNextV2ForImageClassification"
    assert convnext.model.config.hidden_sizes == [48, 96, 192, 384]
    assert max(drop_probs(convnext)) == pytest.approx(0.4)  # linear from 0 (an Identity) to the last layer


def test_break_even_rate():
    from benchmarks.bench_models import break_even

    crossed = break_even([(0.05, 1.1), (0.1, 1.02), (0.2, 0.94), (0.4, 0.8)])
    assert crossed == (pytest.approx(0.125), "crossed")
    assert break_even([(0.1, 0.9), (0.4, 0.7)]) == (0.1, "faster at every rate")
    assert break_even([(0.1, 1.2), (0.4, 1.1)]) == (None, "slower at every rate")


def test_summary_headline_of_a_model_row_states_the_target():
    row = {"model": "convnext_tiny", "family": "torchvision ConvNeXt", "batch": 16, "size": 64,
           "variant": "sdepth row p0.5", "mode": "row", "p_last": None, "stochastic_depth_prob": 0.5,
           "reference": "original p0.5", "mean_ms": 700.0, "ratio": 0.8, "ratio_ci95_low": 0.78,
           "ratio_ci95_high": 0.82, "full_ratio": 0.75, "ideal_ratio": 0.7, "drawn_ideal_ratio": 0.69,
           "hand_ratio": 0.77, "hand_gap": 0.03, "over_hand": 0.8 / 0.77, "over_hand_ci95_low": 1.0,
           "over_hand_ci95_high": 1.08}
    original = {**row, "variant": "original p0.5", "mode": "original", "ratio": 1.0, "full_ratio": 1.1}
    for gap, ratio, verdict in ((0.03, 0.8, "met"), (0.06, 0.8, "missed (+0.060 over by-hand)"),
                                (0.01, 1.01, "missed (not faster than original)")):
        r = {**row, "hand_gap": gap, "ratio": ratio}
        assert bench_run.target_text(r) == verdict
        [head] = bench_run._summary({"models": [original, r]}, "cpu")
        assert f"target {verdict.split(' (')[0]}" in head["brief"]["ideal/limit"]
        assert verdict in head["ideal/limit"] and "of original" in head["ratio"]
        assert "x0.91 of that" in head["peers"]  # the full network runs in 1 / 1.1 of the original's time
    assert bench_run.target_text({**row, "mode": "batch", "hand_gap": 0.031}).startswith("missed")
    assert bench_run.target_text({**row, "stochastic_depth_prob": 0.2}) is None
    table = bench_run.summary_table(bench_run._summary({"models": [original, row]}, "cpu"))
    assert all(len(line) <= bench_run.TABLE_WIDTH for line in table.splitlines())


def _page_faults_of_reused_blocks(cpu_malloc: str) -> tuple[int, str]:
    """Minor page faults of 5 allocate-fill-free cycles of a 64 MB tensor after 15 others (new process), and
    the ``cpu_allocator`` that process's result files would be stamped with."""
    script = textwrap.dedent(f"""
        import resource, torch
        from benchmarks.common import configure_cpu_malloc, environment
        configure_cpu_malloc({cpu_malloc!r})
        for _ in range(15):  # glibc's aligned allocations take a few cycles to settle into a reusable chunk
            torch.ones(2**24)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(2**24)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(environment()["cpu_allocator"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    faults, allocator = out.stdout.strip().splitlines()[-2:]
    return int(faults), allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")
def test_keep_freed_cpu_memory_stops_page_faults_on_reuse():
    # 5 x 64 MB = 81920 pages of 4 KiB. glibc's default serves a block this big with mmap and unmaps it when
    # freed, so every cycle faults every page in again; keeping freed memory reuses the same pages.
    faults, allocator = _page_faults_of_reused_blocks("default")
    assert faults > 0.9 * 81920 and allocator == "system default"
    faults, allocator = _page_faults_of_reused_blocks("keep")
    assert faults < 1000 and allocator.startswith("glibc malloc keeping freed memory")


def test_cpu_malloc_helper_lives_in_benchmarks_and_is_stamped():
    import sdepth_ext.environment as library_env
    from benchmarks import cpu_malloc

    assert not hasattr(library_env, "keep_freed_cpu_memory") and not hasattr(library_env, "cpu_allocator")
    assert "cpu_allocator" in STAMP
    # The library stamps what it is told, else the allocator as the process found it.
    assert library_env.environment(cpu_allocator="my allocator")["cpu_allocator"] == "my allocator"
    assert library_env.environment()["cpu_allocator"] == library_env.default_cpu_allocator()
    # The benchmarks' stamp reports their --cpu-malloc setting (None here: this process never applied it).
    assert cpu_malloc.cpu_allocator() is None
    assert common.environment()["cpu_allocator"] == library_env.default_cpu_allocator()


def test_write_results_refuses_a_stamp_without_cpu_allocator(tmp_path):
    env = common.environment()
    common.write_results("ok", [{"x": 1}], env, out_dir=tmp_path)
    with open(tmp_path / "ok.csv", newline="") as f:
        assert next(csv.DictReader(f))["cpu_allocator"] == env["cpu_allocator"]
    del env["cpu_allocator"]
    with pytest.raises(ValueError, match="cpu_allocator"):
        common.write_results("bad", [{"x": 1}], env, out_dir=tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")
def test_ddp_results_carry_the_workers_cpu_allocator(tmp_path):
    """bench_ddp times in spawned workers: they apply --cpu-malloc themselves; the stamp reports theirs."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.bench_ddp", "--smoke", "--cpu-malloc", "keep",
                    "--out-dir", str(tmp_path)], cwd=root, check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "ddp_smoke.json").read_text())
    assert data["environment"]["cpu_allocator"].startswith("glibc malloc keeping freed memory")
    assert data["rows"] and {r["variant"] for r in data["rows"]} == {"ddp_ready", "find_unused", "all_blocks"}
    with open(tmp_path / "ddp_smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["cpu_allocator"] == data["environment"]["cpu_allocator"] for r in rows)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7),
                    reason="FSDP2 on a CPU with gloo needs torch >= 2.7 (CPU stream events)")
def test_fsdp_smoke_counts_the_collectives_of_the_units_that_ran(tmp_path):
    """bench_fsdp's collectives are exact: with nothing dropped (and in row and subset mode, where every unit
    runs on some rank) the converted model communicates as the plain one; in batch mode less."""
    root = Path(__file__).resolve().parents[1]
    # Without TRITON_INTERPRET, as a user runs bench_fsdp on a CPU (the units run the torch epilogue)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.bench_fsdp", "--smoke", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "fsdp_smoke.json").read_text())["rows"]}
    assert set(rows) == {"plain", "all_units", "batch", "row", "subset"}
    # cifar_resnet(8): 3 blocks and 2 projection shortcuts, each its own group, then the root
    assert (rows["plain"]["all_gather_per_step"], rows["plain"]["reduce_scatter_per_step"]) == (11, 6)
    for v in ("all_units", "row", "subset"):
        assert rows[v]["collectives_per_step"] == rows["plain"]["collectives_per_step"], v
    assert rows["batch"]["collectives_per_step"] < rows["plain"]["collectives_per_step"]
    assert rows["batch"]["elements_per_step"] < rows["plain"]["elements_per_step"]
    assert rows["row"]["elements_per_step"] == rows["plain"]["elements_per_step"]
    assert all(r["step_ms"] > 0 for r in rows.values())


def test_rotation_covers_four_times_l2_in_every_size():
    from benchmarks.bench_epilogue import L2_MULTIPLE, READ_TENSORS, _shapes, rotation_sets

    l2 = 50 * 2**20  # an H200's L2
    # CIFAR ResNet-110 stage 3 at batch 128: 2 MiB per fp32 tensor. The old cap of 8 sets rotated 48 MiB of
    # buffers in all, inside the cache; now the forwards of one round read 200 MiB.
    tensor = 128 * 64 * 8 * 8 * 4
    assert rotation_sets(tensor, l2) == 50 and 50 * READ_TENSORS * tensor == 4 * l2
    assert 8 * 3 * tensor < l2
    for smoke in (False, True):
        for _, shape in _shapes(torch.device("cuda"), smoke):  # only the device type is read
            for esize in (4, 2):
                tensor = math.prod(shape) * esize
                n = rotation_sets(tensor, l2)
                assert n * READ_TENSORS * tensor >= L2_MULTIPLE * l2
                assert n == 1 or (n - 1) * READ_TENSORS * tensor < L2_MULTIPLE * l2  # no more than needed
    assert rotation_sets(256 * 256 * 56 * 56 * 4, l2) == 1  # ResNet-50 stage 1 at batch 256: one 822 MB set


def test_compiled_peer_is_timed_without_recompiling():
    from benchmarks import bench_epilogue as be

    torch._dynamo.reset()
    compiled = torch.compile(be._eager, dynamic=False)
    with be._no_donated_buffers():
        samples, rotation = be._bench_shape((2, 16, 8, 8), torch.float32, torch.device("cpu"), compiled,
                                            repeat=1, cache=2**16, variants=["eager", "compiled"])
    assert set(samples) == {(v, p) for v in ("eager", "compiled") for p in be.PASSES}
    assert rotation["rotation_sets"] == 16 and rotation["rotation_read_bytes"] == 4 * 2**16


def test_a_recompile_during_timed_calls_is_an_error():
    from benchmarks import bench_epilogue as be

    calls = [0]

    @torch.compile(backend="eager", dynamic=False)
    def scaled(sc, res, k):
        return torch.relu(sc + k * res)

    def recompiling(sc, res):  # a new Python int each call: a new specialisation each call
        calls[0] += 1
        return scaled(sc, res, calls[0])

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="recompiled during the timed calls"):
        be._bench_shape((2, 16, 8, 8), torch.float32, torch.device("cpu"), recompiling, repeat=1,
                        cache=2**16, variants=["compiled"])
    torch._dynamo.reset()


def test_summary_leaves_compiled_out_of_the_cpu_epilogue_headline():
    from benchmarks.bench_epilogue import CPU_COMPILED_NOTE

    row = {"pass": "fwd+bwd", "dtype": "float32", "bytes": 7 * 2**20, "shape": "16x64x8x8", "sdepth_ms": 1.0,
           "eager_ms": 2.0, "torchvision_ms": 2.5, "compiled_ms": 9.0, "x_vs_eager": 2.0,
           "x_vs_torchvision": 2.5, "x_vs_compiled": 9.0, "sdepth_pct_copy": 50.0}
    cpu_row = {**row, "sdepth_backend": "torch", "note": CPU_COMPILED_NOTE}
    cpu = bench_run._summary({"epilogue": [cpu_row]}, "cpu")
    cuda = bench_run._summary({"epilogue": [{**row, "sdepth_backend": "triton"}]}, "cuda")
    assert cpu[0]["ratio"] == cpu[0]["brief"]["ratio"] == "2.00x vs eager"
    assert cpu[0]["note"] == CPU_COMPILED_NOTE and "no fair CPU peer" in cpu[0]["peers"]
    assert cuda[0]["ratio"] == "2.00x vs eager, 9.00x vs compiled" and "note" not in cuda[0]
    table = bench_run.summary_table(cpu)  # the note is printed under the table, within its width
    assert "inductor" in table and all(len(line) <= bench_run.TABLE_WIDTH for line in table.splitlines())


def test_run_turns_the_triton_interpreter_on_without_cuda():
    """bench_host needs TRITON_INTERPRET=1 before the kernels are defined: benchmarks.run sets it on import,
    and importing the benchmarks does not define them."""
    script = ("import os, sys, torch, benchmarks.run; print(torch.cuda.is_available(), "
              "os.environ.get('TRITON_INTERPRET'), 'sdepth_ext.kernels.epilogue' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out in (["True", "None", "False"], ["False", "1", "False"])


# ------------------------------------------------------------------------------------------------------------
# bench_footprint's memory ideal: the full network's saved bytes split among its units
# ------------------------------------------------------------------------------------------------------------
def _cifar_resnet8():
    import sdepth_ext as sd

    return sd.cifar_resnet(8)


def _tiny_vit(rate: float):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, drop_path_rate=rate)


def _one_stage_swin(rate: float):
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[4, 4], stochastic_depth_prob=rate, num_classes=5)


# bench_footprint configs (kind, make) and an input size: one-unit blocks with identity and projection
# shortcuts (ResNet), two-unit blocks (timm ViT, torchvision Swin, HF Dinov2: with call arguments), HF
# ConvNextV2.
def _footprint_hf_dinov2(rate: float):
    return _hf_model("hf dinov2", rate, num_hidden_layers=1, image_size=16)


def _footprint_hf_convnextv2(rate: float):
    return _hf_model("hf convnextv2", rate, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)


FOOTPRINT_CASES = {
    "cifar_resnet8": ({"kind": "resnet", "make": _cifar_resnet8}, 8),
    "timm_vit": ({"kind": "own-sd", "rates": None, "make": _tiny_vit}, 16),
    "swin": ({"kind": "own-sd", "rates": None, "make": _one_stage_swin}, 16),
    "hf_dinov2": ({"kind": "own-sd", "rates": None, "make": _footprint_hf_dinov2}, 16),
    "hf_convnextv2": ({"kind": "own-sd", "rates": None, "make": _footprint_hf_convnextv2}, 16),
}


def _footprint_case(case: str):
    """(full network, model to convert, convert kwargs, x, y) as bench_footprint builds them, batch 2."""
    from benchmarks.bench_footprint import _models

    config, size = FOOTPRINT_CASES[case]
    torch.manual_seed(0)
    full, _, to_convert, convert_kwargs = _models(config, torch.device("cpu"))
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 1])
    return full.train(), to_convert, convert_kwargs, x, y


@pytest.mark.parametrize("case", list(FOOTPRINT_CASES))
def test_saved_bytes_split_among_units_sum_to_the_step(case):
    """Every distinct storage the full network's step saves goes to exactly one unit or to what lies outside
    the units (stem, head), so the parts sum to the step's saved bytes; splitting changes nothing counted."""
    from benchmarks.counting import count_step, unit_parts

    full, _, _, x, y = _footprint_case(case)
    split = count_step(full, x, y, by_unit=True)
    plain = count_step(full, x, y)
    assert split["saved_outside_units"] + sum(split["saved_by_unit"]) == split["saved_bytes"]
    assert (split["saved_bytes"], split["launches"]) == (plain["saved_bytes"], plain["launches"])
    assert len(split["saved_by_unit"]) == len(unit_parts(full))
    assert all(b > 0 for b in split["saved_by_unit"]) and split["saved_outside_units"] > 0


@pytest.mark.parametrize("case", list(FOOTPRINT_CASES))
def test_memory_ideal_of_a_batch_plan_is_what_skipping_it_by_hand_saves(case):
    """On every batch plan (each unit kept by all N samples or dropped), the same plan skipped by hand
    (bench_footprint's comparator) saves exactly the memory ideal: the kept units' share of the full network
    and what the dropped units still compute, nothing for an identity shortcut (ViT, Swin, a ResNet's inner
    units), a projection shortcut's activations and the ReLU after it for a ResNet stage's first unit."""
    import itertools
    import types

    from benchmarks.bench_footprint import _by_hand, memory_ideal
    from benchmarks.counting import count_step

    full, _, _, x, y = _footprint_case(case)
    batch = x.shape[0]
    split = count_step(full, x, y, by_unit=True)
    dropped = split["saved_dropped_by_unit"]
    if case.startswith("cifar"):  # unit 0: identity shortcut; units 1, 2: a stage's projection
        assert dropped[0] == 0 and min(dropped[1:]) > 0
    else:
        assert dropped == [0] * len(dropped)
    hand, current = _by_hand(full, [1.0] * len(dropped))
    for plan in itertools.product((0, batch), repeat=len(dropped)):
        current["plan"] = types.SimpleNamespace(counts=list(plan))
        ideal = memory_ideal(split["saved_outside_units"], split["saved_by_unit"], list(plan), batch, dropped)
        assert count_step(hand, x, y)["saved_bytes"] == ideal, plan


@pytest.mark.parametrize("case", list(FOOTPRINT_CASES))
def test_full_networks_units_are_the_converted_models_plan_order(case):
    """bench_footprint prices unit l of ``units_of(full)`` at ``host_plan.counts[l]`` of the converted
    model: the same block and unit, and counts[l] the samples that unit's branch ran on."""
    import copy

    import sdepth_ext as sd
    from benchmarks.counting import unit_parts
    from sdepth_ext.state import get_state, units_of

    full, to_convert, convert_kwargs, x, _ = _footprint_case(case)
    converted = sd.convert(copy.deepcopy(to_convert), mode="batch", seed=0, **convert_kwargs).train()
    state = get_state(converted)

    def names(model, units):
        name_of = {id(m): n for n, m in model.named_modules()}
        return [(name_of[id(block)], u) for block, u in units]

    assert names(full, [(b, u) for b, u, _ in units_of(full)]) == names(converted, state.units)
    assert [l for l, _ in unit_parts(full)] == list(range(len(state.units)))
    ran = collections.Counter()
    for l, (block, u) in enumerate(state.units):
        block._sd_adapter.branch_modules(block, u)[0].register_forward_pre_hook(
            lambda _, args, l=l: ran.update({l: args[0].shape[0]}))
    plans = []
    for _ in range(4):  # batch mode: some units dropped, the others run on every sample
        ran.clear()
        converted(x)
        plans.append(list(state.host_plan.counts))
        assert [ran[l] for l in range(len(state.units))] == plans[-1]
    assert any(0 in p and x.shape[0] in p for p in plans)  # a plan that tells units apart


def _write_rows(path: Path, rows: list[dict]) -> Path:
    """A result file holding ``rows``, stamped with this machine, as ``benchmarks.report`` reads one."""
    path.write_text(json.dumps({"environment": common.environment(torch.device("cpu")), "rows": rows}))
    return path


def test_footprint_rows_and_tables_carry_the_memory_ideal(tmp_path):
    """bench_footprint's rows hold the memory ideal beside the FLOP ideal; the report's tables show both,
    and a file from before the memory ideal still renders, as it did (the pages cite such files)."""
    from benchmarks import bench_footprint

    config = {**FOOTPRINT_CASES["cifar_resnet8"][0], "name": "cifar_resnet8", "batch": 2, "size": 8}
    torch.manual_seed(0)
    rows = bench_footprint.bench_model(config, torch.device("cpu"), steps=2)
    full = rows[0]
    assert full["variant"] == "full"
    assert full["saved_outside_units_bytes"] + sum(full["saved_unit_bytes"]) == full["saved_bytes"]
    for r in (r for r in rows if r["variant"].startswith("sdepth")):
        assert r["saved_ideal_x_full"] == r["saved_ideal_bytes"] / full["saved_bytes"] < 1
        assert r["saved_over_ideal"] == r["saved_x_full"] - r["saved_ideal_x_full"]
        assert r["saved_over_flop_ideal"] == r["saved_x_full"] - r["flop_ideal_x_full"]
        if r["mode"] == "batch":  # the hand-written skip of the same plans, at or above the ideal
            assert r["saved_bytes"] == r["by_hand_saved_bytes"] >= r["saved_ideal_bytes"]
    assert {"saved_ideal_x_full", "saved_over_ideal"} <= set(bench_footprint.TABLE_COLUMNS)

    def tables(rows: list[dict]) -> tuple[str, str]:
        path = _write_rows(tmp_path / "footprint.json", rows)
        return report.footprint_markdown(path), report.footprint_row_markdown(path)

    full_table, row_view = tables(rows)
    batch = next(r for r in rows if r["variant"] == "sdepth batch" and r["dropped_grads"] == "none")
    assert "| memory ideal of the plans (saved over it), x full | FLOP ideal of the plans" in full_table
    assert (f"| {batch['saved_ideal_x_full']:.3f} ({batch['saved_over_ideal']:+.3f}) "
            f"| {batch['flop_ideal_x_full']:.3f} ({batch['saved_over_flop_ideal']:+.3f}) |") in full_table
    assert "batch: saved x original (over memory ideal; over FLOP ideal)" in row_view
    assert (f"| {batch['saved_x_original']:.3f} ({batch['saved_over_ideal']:+.3f}; "
            f"{batch['saved_over_flop_ideal']:+.3f}) |") in row_view
    new_keys = {"saved_ideal_bytes", "saved_ideal_x_full", "saved_over_ideal", "saved_unit_bytes",
                "saved_outside_units_bytes"}
    old_table, old_view = tables([{k: v for k, v in r.items() if k not in new_keys} for r in rows])
    assert "memory ideal" not in old_table + old_view
    assert len({len(line.split("|")) for line in old_table.splitlines() if line.startswith("|")}) == 1
    assert "| FLOP ideal of the plans (saved over it), x full |" in old_table
    assert "batch: saved x original (over FLOP ideal)" in old_view


def test_time_interleaved_runs_groups_back_to_back():
    """Grouped variants (a step and its comparators) run adjacent in every round, in every order over the
    rounds; the others still in a random order; groups that overlap, name no variant or hold one variant
    are refused."""
    from benchmarks.common import time_interleaved

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcdefg"}
    groups = [("a", "b", "c"), ("d", "e")]
    samples = time_interleaved(fns, torch.device("cpu"), warmup=0, repeat=30, groups=groups)
    assert all(len(samples[name]) == 30 for name in fns)
    rounds = [calls[i:i + 7] for i in range(0, len(calls), 7)]
    for group in groups:
        spans = [sorted(r.index(name) for name in group) for r in rounds]
        assert all(s[-1] - s[0] == len(group) - 1 for s in spans)  # adjacent
        assert len({tuple(name for name in r if name in group) for r in rounds}) > len(group) - 1
    assert len({tuple(r) for r in rounds}) > 1
    for bad in ([("a", "b"), ("b", "c")], [("a", "z")], [("a",)]):
        with pytest.raises(ValueError, match="groups"):
            time_interleaved(fns, torch.device("cpu"), warmup=0, repeat=1, groups=bad)


def test_compiled_table_shows_the_compiled_rows_with_their_reference(tmp_path):
    """report's table of ``bench_models --compiled``: the compiled rows only (the file holds the eager ones
    too), each over the compiled unconverted model it was timed against."""
    def row(variant, ratio, reference):
        return {"model": "cifar_resnet20", "batch": 32, "size": 32, "variant": variant, "mean_ms": 10 * ratio,
                "ratio": ratio, "ratio_ci95_low": ratio - 0.05, "ratio_ci95_high": ratio + 0.05,
                "reference": reference, "ideal_ratio": 0.7286, "steps": 14}
    rows = [row("plain", 1.0, "plain"), row("sdepth batch p0.5", 0.8, "plain"),
            row("compiled timm-style DropPath p0.5", 1.0, "compiled timm-style DropPath p0.5"),
            row("compiled sdepth batch p0.5", 0.98, "compiled timm-style DropPath p0.5"),
            row("compiled sdepth subset p0.5", 0.75, "compiled timm-style DropPath p0.5")]
    rows[1]["ideal_ratio"] = 0.7  # the eager batch row's FLOP ideal is the compiled rows' of the same rate
    path = _write_rows(tmp_path / "models_compiled.json", rows)
    table = report.render_cited(str(path.relative_to(tmp_path)), tmp_path)
    assert "| cifar_resnet20 b32@32 | compiled sdepth subset p0.5 | 8 ms | 0.750 [0.700, 0.800] | compiled " \
           "timm-style DropPath p0.5 | 0.700 | 14 |" in table
    assert "| compiled timm-style DropPath p0.5 | 10 ms | 1.000 [0.950, 1.050] |" in table
    assert "| plain |" not in table and "| sdepth batch p0.5 |" not in table


def test_the_models_findings_are_computed_from_the_rows_and_name_each_interval_that_excludes_one(tmp_path):
    """The README's prose about a run is rendered from its file (no figure outlives its run): ranges over
    the headline rows, the peers' rows, and sdepth_ext's overhead per mode with every interval that excludes 1
    named (or "every interval contains 1" when none does)."""
    def row(model, mode, ratio, over, low, high, ideal):
        return {"model": model, "variant": f"sdepth {mode} p0.5", "mode": mode, "ratio": ratio,
                "over_hand": over, "over_hand_ci95_low": low, "over_hand_ci95_high": high,
                "drawn_ideal_ratio": ideal}
    rows = [row("a", "batch", 0.80, 1.00, 0.98, 1.02, 0.74), row("a", "row", 0.90, 1.04, 1.01, 1.07, 0.75),
            row("b", "batch", 0.70, 0.99, 0.97, 1.01, 0.66),
            {"model": "a", "variant": "sdepth batch p0.2", "mode": "batch", "ratio": 0.5},  # no comparator
            {"model": "a", "variant": "timm-style DropPath p0.5", "mode": "droppath", "ratio": 1.05},
            {"model": "a", "variant": "contiguous sub-batches row p0.5", "mode": "hand-row", "ratio": 0.88}]
    _write_rows(tmp_path / "models.json", rows)
    text = report.render_cited("models.json (findings)", tmp_path)
    assert "takes 0.70-0.80 of the reference" in text and "plans drawn (0.66-0.74)" in text
    assert "costs 1.05 of the plain model" in text
    assert "batch mode takes 0.99-1.00: every interval contains 1 (2 rows)" in text
    assert "Row mode takes 1.04 of contiguous sub-batches" in text
    assert "ours included: 0 of 1 intervals contain 1 (not: a 1.040 [1.010, 1.070])" in text
    assert "Row mode gains less on a CPU** (0.90)" in text and "gather and scatter for free: 0.88" in text
    rows[1]["over_hand_ci95_low"] = 0.99
    _write_rows(tmp_path / "models.json", rows)
    assert "ours included: every interval contains 1 (1 row)" in report.render_cited(
        "models.json (findings)", tmp_path)
    _write_rows(tmp_path / "models.json", [r for r in rows if r.get("mode") != "row"])  # batch mode alone
    text = report.render_cited("models.json (findings)", tmp_path)
    assert "Row mode takes - of contiguous sub-batches" in text and "ours included: no rows" in text


def test_the_host_and_prune_findings_are_computed_from_the_rows(tmp_path):
    def call(what, variant, x_eager):
        return {"part": "call", "what": what, "variant": variant, "x_eager": x_eager, "launch": "stubbed"}

    def step(variant, ratio, **extra):
        return {"part": "step", "what": "cifar_resnet56 b2@8 fwd+bwd", "variant": variant, "ratio": ratio,
                **extra}
    _write_rows(tmp_path / "host.json", [
        call("fwd+bwd", "sdepth", 0.934), call("rows fwd+bwd", "sdepth", 1.016),
        step("sdepth batch p1.0 zero", 1.0312),
        step("sdepth batch p0.5 zero", 0.79, ratio_ci95_low=0.77, ratio_ci95_high=0.81, over_none=0.0214,
             block_ideal=0.7407),
        step("sdepth batch p0.5 none", 0.7686),
        {"part": "step", "what": "cifar_resnet56 b2@8", "variant": "sdepth batch p0.5 zero", "ratio": 0.9}])
    text = report.render_cited("host.json (findings)", tmp_path)
    assert "a forward+backward call costs 0.93x eager" in text and "1.02x with rows" in text
    assert "nothing dropped costs 1.031x" in text and "0.790 [0.770, 0.810] with exact zero" in text
    assert "(the default; +0.021 over none), 0.769 without, against 0.741 of the blocks" in text
    assert "with Triton's launch stubbed" in text and "GPU launch cost: not measured." in text
    _write_rows(tmp_path / "prune.json", [
        {"model": "m", "removed_blocks": n, "depth": 20 - 2 * n, "latency_ratio": 1 - n / 10,
         "flop_ratio": 1 - n / 9, "over_hand": 1 + n / 100} for n in (0, 3, 1)])
    assert "`sd.prune` of 3 blocks of m (depth 20 to 14) runs in 0.700 of the full model's latency (FLOPs " \
           "0.667), x1.030 of the same depth built by hand." in report.render_cited("prune.json (findings)",
                                                                                      tmp_path)
    _write_rows(tmp_path / "ddp.json", [])
    with pytest.raises(ValueError, match="no findings view for ddp"):
        report.render_cited("ddp.json (findings)", tmp_path)


def test_compiled_models_on_a_cpu_are_the_small_ones():
    from benchmarks.models import compiled_configs

    names = [c["name"] for c in compiled_configs(torch.device("cpu"))]
    assert names[0] == "cifar_resnet20" and set(names) <= {"cifar_resnet20", "timm deit_tiny"}
    assert compiled_configs(torch.device("cuda")) is None  # a GPU compiles the default set


# ------------------------------------------------------------------------------------------------------------
# bench_host's train step: the fixed part and the paired policies
# ------------------------------------------------------------------------------------------------------------
def test_branches_skipped_is_the_model_with_every_unit_removed():
    """bench_host's fixed part runs what sd.lesion runs with every unit removed (a dropped block's output:
    relu of its shortcut, projections included), and nothing of the branches."""
    import sdepth_ext as sd

    torch.manual_seed(0)
    model = sd.cifar_resnet(14).eval()
    x = torch.randn(3, 3, 16, 16)
    skipped = bench_host.branches_skipped(copy.deepcopy(model)).eval()
    with sd.lesion(model, drop=range(len(sd.survival_probs(sd.convert(copy.deepcopy(model)))))):
        expected = model(x)
    torch.testing.assert_close(skipped(x), expected, rtol=0, atol=0)
    names = {n for n, _ in skipped.named_parameters()}
    assert names and not any(".conv" in n or ".bn" in n for n in names)  # only stem, projections, head


def test_zero_grads_by_hand_leaves_what_the_zero_policy_leaves():
    """bench_host's comparator is the "zero" policy written by hand: after a "none" backward on the same
    plan, every parameter's gradient equals what "zero" leaves (exact zeros for the dropped units'), and no
    gradient is left missing."""
    import sdepth_ext as sd

    torch.manual_seed(0)
    base = sd.cifar_resnet(20)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    zero, none = (sd.set_dropped_grads(sd.convert(copy.deepcopy(base), p_last=0.5, seed=0), policy)
                  for policy in ("zero", "none"))
    dropped_steps = 0
    for _ in range(4):  # p_last 0.5 over 9 blocks: some step drops a block (checked below)
        for model in (zero, none):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        missing = sum(p.grad is None for p in none.parameters())
        dropped_steps += missing > 0
        bench_host.zero_grads_by_hand(bench_host.branch_parameters(none))
        for (name, p), q in zip(zero.named_parameters(), none.parameters()):
            assert q.grad is not None and q.grad.stride() == p.grad.stride(), name
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert dropped_steps > 0
    assert len(bench_host.branch_parameters(none)) == 9  # every basic block of cifar_resnet(20)


def test_a_failed_host_step_process_fails_the_benchmark():
    """The step part's processes are spawned: one that dies (here on a device this machine lacks) raises in
    the parent, naming the benchmark, instead of leaving rows out."""
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(RuntimeError, match="bench_host: a step process failed"):
        bench_host._in_fresh_process(torch.device("cuda", 7), warmup=0, repeat=1)


def _saving_worker(index: int, out_path: str, value: int) -> None:
    if index == 1:
        torch.save({"value": value, "index": index}, out_path)


def _raising_worker(index: int, out_path: str) -> None:
    raise ValueError("worker broke on purpose")


def _hanging_worker(index: int, out_path: str, pid_dir: str) -> None:
    Path(pid_dir, f"{index}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def test_run_spawned_returns_what_a_worker_saved():
    saved = workers.run_spawned(_saving_worker, (7,), "probe", timeout_s=120, nprocs=2)
    assert saved == {"value": 7, "index": 1}


def test_run_spawned_names_the_work_when_a_worker_raises():
    with pytest.raises(RuntimeError, match=r"probe failed(.|\n)*worker broke on purpose"):
        workers.run_spawned(_raising_worker, (), "probe", timeout_s=120)


def test_run_spawned_kills_the_workers_past_its_deadline(tmp_path):
    """Fault injection: workers that never finish. The call raises at its deadline, and no worker is left
    running (killed and reaped)."""
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="probe did not finish within 15 s"):
        workers.run_spawned(_hanging_worker, (str(tmp_path),), "probe", timeout_s=15, nprocs=2)
    assert time.monotonic() - started < 15 + 10
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2  # both had started (a spawned process imports torch in a few seconds)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_host_step_pairs_the_policies_on_the_same_plans(smoke_run):
    results, _, _ = smoke_run
    steps = [r for r in results["host"] if r["part"] == "step"]
    by_name = {(r["what"], r["variant"]): r for r in steps}
    paired = [r for r in steps if "over_none" in r]
    # batch mode at p_last 0.5 and 0.2: "zero" and the comparator, each over "none"
    assert len(paired) == 2 * 2 * len(bench_host.STEP_PARTS)
    assert sum(r["variant"].endswith(bench_host.BY_HAND) for r in paired) == 2 * len(bench_host.STEP_PARTS)
    for r in paired:
        twin = by_name[(r["what"], r["variant"].removesuffix(bench_host.BY_HAND).replace(" zero", " none"))]
        assert r["blocks_ran"] == twin["blocks_ran"]  # the same plans, step for step
        assert r["blocks_ran_by_process"] == twin["blocks_ran_by_process"]  # in each process
        # each variant did what its name says, in each step part: "none" left the dropped units' parameters
        # without a gradient, "zero" and the comparator gave every parameter one
        assert r["grads_missing"] == 0 and twin["grads_missing"] > 0
        assert r["over_none"] == pytest.approx(r["ratio"] - twin["ratio"])
        assert r["over_none_ci95_low"] <= r["over_none_ci95_high"]
        # the step part ran in fresh processes (two in a smoke run), each with its own "zero" - "none"
        assert r["processes"] == 2 and len(r["over_none_by_process"]) == 2
        assert all(math.isfinite(gap) for gap in r["over_none_by_process"])
    # each process drew plans of its own (a seed each, deterministic): some converted variant ran another
    # fraction of its blocks in one process than in the other; the pooled fraction is their mean
    dropping = [r for r in steps if r["p_last"] is not None and r["p_last"] < 1.0]
    assert all(r["plan_seeds"] == list(range(r["processes"])) for r in dropping)
    assert any(len(set(r["blocks_ran_by_process"])) > 1 for r in dropping)
    for r in dropping:
        assert r["blocks_ran"] == pytest.approx(statistics.fmean(r["blocks_ran_by_process"]))
    for r in steps:
        if r["p_last"] is not None:
            assert r["block_ideal"] <= r["step_ideal"] <= 1.0
            assert r["step_ideal"] > r["block_ideal"] or r["block_ideal"] == 1.0  # the fixed part costs
            assert r["ratio_ci95_low"] <= r["ratio_ci95_high"]
    fixed = [r for r in steps if r["variant"] == bench_host.FIXED]
    assert len(fixed) == len(bench_host.STEP_PARTS) and all(0 < r["ratio"] < 1 for r in fixed)
