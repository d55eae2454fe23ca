"""Datasets for ``python -m sdepth_ext.train``: CIFAR-10/100 from local archives, and an offline default.

Everything is held as one normalized float tensor in memory (CIFAR-10's 60,000 images are 740 MB as
float32), on the training device when that is a GPU (:meth:`Dataset.to`), so batches are sliced and
augmented with tensor ops on that device and a dedicated ``torch.Generator`` (a CPU one for CPU data, a
CUDA one for CUDA data): the data order and the augmentation of a run are then part of its checkpoint, a
resumed run sees exactly the same batches, and no step waits for a host-side loader.

The offline default is scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes),
upsampled to 32x32 RGB, so any fresh machine can train and test without a download.

CIFAR files are checked as they are read: each must hold a dict with uint8 ``data`` of shape (N, 3072) and
N integer labels in range; anything else is a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_dataset", "augment", "DATASETS"]

DATASETS = ("digits", "cifar10", "cifar100")

# Per-channel mean and std of the training images (0..1 scale), the usual CIFAR normalization.
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # (N, 3, 32, 32) float32, normalized
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def subset(self, n_train: int | None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` images (for smoke runs); None keeps all."""
        return Dataset(self.name, self.train_x[:n_train], self.train_y[:n_train],
                       self.test_x[:n_test], self.test_y[:n_test], self.num_classes)

    def to(self, device: torch.device | str) -> Dataset:
        """The same images on ``device`` (returns ``self`` when they are there already)."""
        device = torch.device(device)
        if self.train_x.device == device:
            return self
        return Dataset(self.name, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x,
                                                           self.test_y)), self.num_classes)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


def _load_digits(test_fraction: float = 0.25) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in requirements.txt
        raise RuntimeError("--data digits needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), 0..1
    y = torch.tensor(digits.target, dtype=torch.int64)
    # 8x8 -> 32x32 so the CIFAR network (two stride-2 stages down to 8x8) applies unchanged.
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    # A fixed split, independent of any run's seed: permutation from a generator seeded with 0.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean = x[train_idx].mean(dim=(0, 2, 3)).tolist()
    std = x[train_idx].std(dim=(0, 2, 3)).tolist()
    x = _normalize(x, mean, std)
    return Dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError) as err:
        raise ValueError(f"malformed CIFAR file {path}: not a CIFAR python pickle ({err})") from err


def _cifar_arrays(path: Path, batch, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8 values as float, 0..1) and labels of one CIFAR file, checked."""
    def bad(why: str) -> ValueError:
        return ValueError(f"malformed CIFAR file {path}: {why}")

    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        got = sorted(map(str, batch)) if isinstance(batch, dict) else f"a {type(batch).__name__}"
        raise bad(f"expected a dict with keys 'data' and {label_key!r}, got {got}")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise bad(f"'data' or {label_key!r} is not an array ({err})") from None
    if data.dtype != np.uint8:
        raise bad(f"'data' has dtype {data.dtype}, expected uint8 pixel values 0..255")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise bad(f"'data' has shape {data.shape}, expected (N, 3072)")
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise bad(f"{label_key!r} must be a list of integers, got dtype {labels.dtype} shape {labels.shape}")
    if len(labels) != len(data):
        raise bad(f"{len(data)} images but {len(labels)} labels in {label_key!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise bad(f"labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()})")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32).float() / 255.0
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """Reads the standard python archives, extracted: cifar-10-batches-py/ or cifar-100-python/."""
    root = Path(data_dir)
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"--data-dir {root} does not exist; expected the extracted {sub}/ folder "
                                "of the CIFAR python archive (no download is attempted)")
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files = [folder / "test_batch"]
        label_key, num_classes, mean, std = "labels", 10, _CIFAR10_MEAN, _CIFAR10_STD
    else:
        train_files, test_files = [folder / "train"], [folder / "test"]
        label_key, num_classes, mean, std = "fine_labels", 100, _CIFAR100_MEAN, _CIFAR100_STD

    def read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_cifar_arrays(path, _unpickle(path), label_key, num_classes) for path in files]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return Dataset(name, _normalize(train_x, mean, std), train_y, _normalize(test_x, mean, std), test_y,
                   num_classes)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """``digits`` (offline default), or ``cifar10`` / ``cifar100`` read from ``data_dir``."""
    if name not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return _load_digits()
    if data_dir is None:
        raise ValueError(f"--data {name} needs --data-dir: the folder holding the extracted CIFAR python "
                         "archive (no download is attempted)")
    return _load_cifar(name, data_dir)


def augment(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation: a random 32x32 crop of the zero-padded image, random h-flip.

    Random numbers come from ``generator`` on its own device (a CPU generator for CPU images, a CUDA one
    for CUDA images: then nothing leaves the GPU), so a checkpoint of it replays the same crops.
    """
    n, _, h, w = x.shape
    gdev = generator.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    # Gather the crops with one advanced index instead of a Python loop over the batch.
    rows = (dy.view(n, 1) + torch.arange(h, device=gdev).view(1, h)).to(x.device)      # (n, h)
    cols = dx.view(n, 1) + torch.arange(w, device=gdev).view(1, w)                       # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()
