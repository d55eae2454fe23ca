"""sdepth_ext: stochastic depth for PyTorch residual networks, with dropped units never computed.

Supported: torchvision ResNets, ConvNeXt, EfficientNet / EfficientNetV2, Swin v1/v2 and MaxViT (and timm's
ResNet, ConvNeXt and ViT families where timm is installed); see :func:`convert`.
"""

from .checkpointing import checkpoint_blocks
from .cifar import cifar_resnet
from .compiled import compile_blocks, effective_survival, set_row_multiple
from .convert import convert, get_scheduler, lesion, revert, set_drop_scale, survival_probs
from .deploy import depth_frontier, prune, recalibrate_bn
from .distributed import clear_dropped_grads, ddp_ready, dropped_blocks, set_dropped_grads, sync_scheduler
from .flops import compute_stats
from .fsdp import fully_shard
from .functional import gated_residual_add, gated_residual_relu
from .plan import Plan
from .rules import drop_schedule, linear_decay, uniform
from .scheduler import Scheduler, has_compiled_scheduler

__version__ = "0.2.0"

__all__ = ["gated_residual_add", "gated_residual_relu", "linear_decay", "uniform", "Plan", "Scheduler",
           "has_compiled_scheduler", "convert", "revert", "survival_probs", "lesion", "cifar_resnet",
           "get_scheduler", "set_drop_scale", "drop_schedule", "compute_stats", "prune", "recalibrate_bn",
           "depth_frontier",
           # where users train: DDP, FSDP2, torch.compile, activation checkpointing, dropped-unit grads
           "ddp_ready", "sync_scheduler", "set_dropped_grads", "clear_dropped_grads", "dropped_blocks",
           "fully_shard",
           "compile_blocks", "set_row_multiple", "effective_survival", "checkpoint_blocks"]
