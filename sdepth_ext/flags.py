"""The train/eval flags of a model's modules, restored after a block of code that changes them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["restored_train_flags"]


@contextlib.contextmanager
def restored_train_flags(model: nn.Module) -> Iterator[nn.Module]:
    """On exit -- also when the body raises -- every module of ``model`` has its ``training`` flag back
    (``model.train()``/``eval()`` inside set them all; a model may hold modules in either mode)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
