"""``python -m sdepth_ext.train``: constant depth vs stochastic depth on a CIFAR ResNet, and a lesion study.

Trains :func:`sdepth_ext.cifar_resnet` once with constant depth and once with stochastic depth (or either
alone, ``--runs``), as in Huang et al. 2016: SGD with Nesterov momentum 0.9, weight decay 1e-4, a step
(lr / 10 at 50% and 75% of training) or cosine schedule, random 4-pixel-padded crops and horizontal flips.
Writes under ``--out``: per run ``log.csv`` (one row per epoch), ``steps.csv`` (one row per step) and
``checkpoint.pt``; and for the pair ``error_curves.png`` (test error per epoch, like the paper's Figure 3),
``lesion.png`` and ``summary.json`` (final errors, wall-clock per epoch, measured time ratio next to the
ideal). ``--resume`` continues every run from its checkpoint, bit-identically on the CPU.

The package:

* :mod:`.config`: :class:`TrainConfig`, the checks of every setting, the lr schedule, what --resume keeps;
* :mod:`.loop`: one run (:func:`train_run`), :func:`evaluate`, the checkpoint and the logs it governs;
* :mod:`.lesion`: :func:`lesion_study`; :mod:`.plots`: the figures;
* :mod:`.files`: atomic file replacement; :mod:`.interrupts`: Ctrl-C / SIGTERM handling;
* :mod:`.cli`: the options and :func:`main`; ``__main__`` runs it.
"""

from .cli import build_parser, main, parse_args
from .config import (
    LOG_FIELDS,
    RUNS,
    SCHEDULES,
    STEP_FIELDS,
    TrainConfig,
    check_config,
    default_milestones,
    lr_at,
)
from .lesion import lesion_study
from .loop import ResumeError, build_model, evaluate, load_checkpoint, plan_resume, train_run
from .plots import plot_error_curves, plot_lesion

__all__ = ["TrainConfig", "train_run", "lesion_study", "main", "evaluate", "build_model", "LOG_FIELDS",
           "STEP_FIELDS", "RUNS", "SCHEDULES", "ResumeError", "check_config", "default_milestones", "lr_at",
           "load_checkpoint", "plan_resume", "parse_args", "build_parser", "plot_error_curves", "plot_lesion"]
