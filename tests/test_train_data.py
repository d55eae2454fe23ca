"""The CIFAR loader checks what it reads (one-line errors naming the file), and data can live on the device
with augmentation drawn there."""

import pickle

import numpy as np
import pytest
import torch

from sdepth_ext.data import augment, load_dataset


def write_cifar10(folder, n=4, broken=None):
    """A fake cifar-10-batches-py/ of ``n`` images per file; ``broken`` replaces data_batch_3's content."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        if name == "data_batch_3" and broken is not None:
            batch = broken(batch)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def _with(**changes):
    return lambda batch: {**batch, **changes}


@pytest.mark.parametrize("broken, message", [
    (_with(labels=[1, 2, 3, 4, 5]), "4 images but 5 labels"),
    (lambda b: {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 5}, "20 images but 5 labels"),
    (lambda b: 7, "expected a dict with keys 'data' and 'labels', got a int"),
    (lambda b: {"pixels": b["data"]}, "expected a dict with keys 'data' and 'labels', got ['pixels']"),
    (_with(data=np.zeros((4, 3072), np.float32)), "'data' has dtype float32, expected uint8"),
    (_with(data=np.zeros((4, 3072), np.int64)), "'data' has dtype int64, expected uint8"),
    (_with(data=np.zeros((4, 3000), np.uint8)), "'data' has shape (4, 3000), expected (N, 3072)"),
    (_with(data=np.zeros((4, 3, 32, 32), np.uint8)), "expected (N, 3072)"),
    (_with(labels=[0, 1, 2, 10]), "labels outside 0..9"),
    (_with(labels=[0, -1, 2, 3]), "labels outside 0..9"),
    (_with(labels=[0.5, 1.0, 2.0, 3.0]), "'labels' must be a list of integers"),
    (_with(labels=[[0], [1], [2], [3]]), "'labels' must be a list of integers"),
])
def test_cifar_file_checks_name_the_file(tmp_path, broken, message):
    write_cifar10(tmp_path / "cifar-10-batches-py", broken=broken)
    with pytest.raises(ValueError) as exc:
        load_dataset("cifar10", tmp_path)
    text = str(exc.value)
    assert "\n" not in text and "data_batch_3" in text and "malformed CIFAR file" in text
    assert message in text


def test_cifar_pixels_are_scaled_from_uint8(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)["data"]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (torch.from_numpy(raw).view(-1, 3, 32, 32).float() / 255 - mean.view(1, 3, 1, 1)) / \
        std.view(1, 3, 1, 1)
    assert torch.allclose(data.train_x[:4], expected)


def test_dataset_to_moves_all_tensors_and_is_free_in_place():
    data = load_dataset("digits").subset(8, 4)
    assert data.to("cpu") is data


@pytest.mark.needs_cuda
def test_dataset_and_augmentation_on_cuda_stay_there_and_replay():
    data = load_dataset("digits").subset(64, 16).to("cuda")
    assert data.train_x.is_cuda and data.test_y.is_cuda
    g = torch.Generator(device="cuda").manual_seed(3)
    state = g.get_state()
    a = augment(data.train_x[:32], g)
    g.set_state(state)
    b = augment(data.train_x[:32], g)
    assert a.is_cuda and torch.equal(a, b)
    # each image is a crop of its padded self (or the mirrored crop)
    padded = torch.nn.functional.pad(data.train_x[:32], (4, 4, 4, 4))
    for i in range(4):
        crops = [padded[i, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(-1)) for c in crops)
