"""sdepth_ext: Stochastic Depth for PyTorch ResNets, with dropped blocks never computed."""

from .convert import cifar_resnet, convert, lesion, revert, survival_probs
from .functional import gated_residual_relu
from .rules import linear_decay, uniform
from .scheduler import Plan, Scheduler, has_compiled_scheduler

__version__ = "0.1.0"

__all__ = ["gated_residual_relu", "linear_decay", "uniform", "Plan", "Scheduler", "has_compiled_scheduler",
           "convert", "revert", "survival_probs", "lesion", "cifar_resnet"]
