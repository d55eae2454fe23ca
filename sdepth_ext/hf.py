"""Hugging Face ``transformers.Trainer`` integration: :class:`GateStateCallback`.

A converted model draws its gates from a counter-based stream (:class:`~sdepth_ext.Scheduler`: seed, step,
drop scale). ``model.state_dict()`` carries that state in its metadata, but a Trainer checkpoint stores the
weights as safetensors, which keep no metadata: a resumed run would restart the gate stream. The callback
keeps it::

    from sdepth_ext.hf import GateStateCallback

    model = sd.convert(AutoModelForImageClassification.from_config(config))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GateStateCallback()])
    trainer.train()                                   # later: trainer.train(resume_from_checkpoint=True)

At each checkpoint it writes the scheduler state into the checkpoint folder, ``sdepth_gate_state.json``
(written to a temporary file first and renamed, so a crash leaves the old file or the new one), and into
the folder's ``trainer_state.json`` (as the callback's exported state, which travels with the folder wherever
it is resumed from). When a Trainer resumes from a checkpoint, it restores that state before the first step:
the resumed run draws the gates the uninterrupted run would have drawn. Every rank restores the same state.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .convert import get_scheduler

__all__ = ["GateStateCallback", "GATE_STATE_NAME", "save_gate_state", "load_gate_state"]

GATE_STATE_NAME = "sdepth_gate_state.json"


def save_gate_state(model, folder: str) -> str:
    """Write the converted ``model``'s scheduler state to ``folder/sdepth_gate_state.json`` atomically."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, GATE_STATE_NAME)
    fd, tmp = tempfile.mkstemp(prefix=f".{GATE_STATE_NAME}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(get_scheduler(model).state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_gate_state(model, folder: str) -> None:
    """Restore the scheduler state :func:`save_gate_state` wrote into ``folder``."""
    with open(os.path.join(folder, GATE_STATE_NAME)) as f:
        get_scheduler(model).load_state_dict(json.load(f))


class GateStateCallback(TrainerCallback, ExportableState):
    """Saves the converted model's gate state with every Trainer checkpoint and restores it on resume.

    The model passed to the Trainer must be converted (``sd.convert``) before the Trainer is made.
    """

    def __init__(self):
        self.gate_state: dict | None = None  # the scheduler state after the last step

    def state(self) -> dict:
        """What the Trainer stores in ``trainer_state.json`` at a checkpoint: the last step's gate state."""
        return {"args": {}, "attributes": {"gate_state": self.gate_state}}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Before the Trainer saves a checkpoint of this step (which calls state()).
        self.gate_state = get_scheduler(model).state_dict()

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_gate_state(model, folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return  # not a resumed run
        exported = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = exported.get("attributes", {}).get("gate_state") if isinstance(exported, dict) else None
        if saved is not None:
            get_scheduler(model).load_state_dict(saved)
            self.gate_state = saved
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isfile(os.path.join(folder, GATE_STATE_NAME)):
            load_gate_state(model, folder)
            return
        warnings.warn(f"GateStateCallback: the checkpoint resumed at step {state.global_step} holds no gate "
                      "state (saved without this callback); the gate stream goes on from the model's own",
                      UserWarning, stacklevel=2)
