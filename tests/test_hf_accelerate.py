"""A converted Hugging Face model under transformers.Trainer on 2 CPU processes (accelerate, gloo): every rank
draws the same gates each step."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers", minversion="5.0",
                    reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (Trainer needs it; sdepth_ext[hf])")

import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sdepth_ext.state import get_state  # noqa: E402
from tests import distributed_common as common  # noqa: E402
from tests.test_hf_trainer import Images, Trainer, make_model, train_args  # noqa: E402

TIMEOUT_S = 240


class Plans(TrainerCallback):
    """Each step's survivor counts per unit."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts.append(list(get_state(model).host_plan.counts))


def _work(rank, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(dist.get_world_size()),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # the process group exists already

    results = {}
    for mode in ("batch", "row"):
        model, plans = make_model(seed=None, family="convnext", mode=mode), Plans()
        args = train_args(os.path.join(out_dir, mode, str(rank)), max_steps=3, save_strategy="no",
                          ddp_backend="gloo")
        trainer = Trainer(model=model, args=args, train_dataset=Images(16), callbacks=[plans])
        trainer.train()
        results[mode] = (plans.counts, trainer.args.world_size)
    return results


@pytest.mark.slow
def test_every_rank_draws_the_same_gates(tmp_path):
    ranks = common.run_ranks(_work, str(tmp_path), TIMEOUT_S, "HF Trainer")
    for mode in ("batch", "row"):
        (counts0, world0), (counts1, world1) = ranks[0][mode], ranks[1][mode]
        assert world0 == world1 == 2, mode  # the Trainer ran data parallel over both processes
        assert len(counts0) == 3 and counts0 == counts1, mode
        assert any(0 < c < max(row) or c == 0 for row in counts0 for c in row), mode  # something was dropped
