"""Dataset readers on small synthetic files written in the real formats, and the batch pipeline."""

import pickle

import numpy as np
import pytest
import torch

from dtp_ext.train.batches import epoch_order, random_crop_flip, train_batches
from dtp_ext.train.datasets import DatasetNotFound, load_split, read_idx
from tests.helpers.datasets import fake_mnist


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_gzip_or_raw(tmp_path, compress):
    data = fake_mnist(tmp_path, compress=compress)
    train = load_split("mnist", str(tmp_path), "train")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), data["train"][0])
    assert np.array_equal(train.labels.numpy(), data["train"][1].astype(np.int64))
    assert len(load_split("mnist", str(tmp_path), "test")) == 5


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    fake_mnist(tmp_path / "FashionMNIST" / "raw")
    assert len(load_split("fashion-mnist", str(tmp_path), "train")) == 12


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DatasetNotFound, match="magic"):
        read_idx(tmp_path / "bad")


def test_missing_files_say_where_to_put_them(tmp_path):
    for name in ("mnist", "fashion-mnist", "cifar10", "imagenet32"):
        with pytest.raises(DatasetNotFound, match="--data-dir"):
            load_split(name, str(tmp_path), "train")
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        load_split("cifar10", None, "train")


def test_cifar10_batches_py_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 3))
        with open(folder / name, "wb") as f:  # the python-2 pickles torchvision reads: bytes keys
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        expected.append((data, labels))
    train = load_split("cifar10", str(tmp_path), "train")
    assert train.images.shape == (15, 3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert train.images[0, 1, 0, 5] == expected[0][0][0, 1024 + 5]
    assert train.labels.tolist()[:3] == [int(v) for v in expected[0][1]]
    assert len(load_split("cifar10", str(folder), "test")) == 3


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32_official_layout(tmp_path, npz):
    rng = np.random.default_rng(1)
    train_dir, val_dir = tmp_path / "Imagenet32_train", tmp_path / "Imagenet32_val"
    train_dir.mkdir()
    val_dir.mkdir()
    parts = [(train_dir, f"train_data_batch_{i}") for i in range(1, 11)] + [(val_dir, "val_data")]
    for folder, name in parts:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [1, 1000]  # the official files number classes 1..1000
        if npz:
            np.savez(folder / f"{name}.npz", data=data, labels=np.array(labels))
        else:
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "labels": labels, "mean": np.zeros(3072)}, f)
    train = load_split("imagenet32", str(tmp_path), "train")
    assert train.images.shape == (20, 3, 32, 32)
    assert train.labels.min() == 0 and train.labels.max() == 999
    assert len(load_split("imagenet32", str(tmp_path), "test")) == 2


def test_batch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 4, 1))


def test_resumed_batches_match_uninterrupted(tmp_path):
    fake_mnist(tmp_path, n_train=10)
    data = load_split("mnist", str(tmp_path), "train")
    args = (0.1, 0.3, True, "cpu")
    full = list(train_batches(data, 3, 7, 2, 0, *args))
    resumed = list(train_batches(data, 3, 7, 2, 2, *args))
    assert [s for s, _, _ in full] == [0, 1, 2, 3]  # the last, smaller batch is kept
    for (s1, x1, y1), (s2, x2, y2) in zip(full[2:], resumed):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for n in range(2):  # every output image is some crop of the padded one, maybe flipped
        found = any(
            torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1))
            for i in range(5)
            for j in range(5)
            for w in [padded[n, :, i : i + 6, j : j + 6]]
        )
        assert found
