"""Readers for the datasets `dtp-ext train` knows, from folders on disk (never downloaded).

Each reader returns an ImageSet of uint8 images (N, C, H, W) and int64 labels, kept on the CPU;
batches are normalised (and augmented) on the fly by batches.py.

Layouts accepted (DIR is --data-dir; the first match wins):
- MNIST / Fashion-MNIST: the four IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, gzipped (`.gz`) or not, in DIR, DIR/raw,
  or torchvision's DIR/MNIST/raw (DIR/FashionMNIST/raw).
- CIFAR-10: torchvision's `cifar-10-batches-py` (data_batch_1..5, test_batch), as DIR or DIR/cifar-10-batches-py.
- ImageNet 32x32 (downsampled ImageNet): `train_data_batch_1..10` and `val_data`, official
  pickles or their `.npz` versions, in DIR or any folder one level below (Imagenet32_train,
  Imagenet32_val, ...). Labels 1..1000 become 0..999.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

PACKAGED_MNIST = Path(__file__).resolve().parent.parent / "data" / "mnist"


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int
    classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: bool          # the paper's random crop (pad 4, edge) + horizontal flip by default
    where: str             # what to put in --data-dir, for the error message


INFO: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,), False,
                         "the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...)"),
    "fashion-mnist": DatasetInfo(1, 28, 10, (0.2860,), (0.3530,), False,
                                 "the four Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)"),
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
                           "torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch)"),
    "imagenet32": DatasetInfo(3, 32, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True,
                              "the downsampled ImageNet 32x32 files train_data_batch_1..10 and "
                              "val_data (official pickles or .npz), e.g. Imagenet32_train/ and Imagenet32_val/"),
}


class DatasetNotFound(FileNotFoundError):
    """Missing or malformed dataset files; the message says what to put where."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self):
        return self.labels.shape[0]

    def subset(self, count: Optional[int]) -> "ImageSet":
        if count is None or count >= len(self):
            return self
        return ImageSet(self.images[:count], self.labels[:count])


def _missing(name: str, root: Path, detail: str) -> DatasetNotFound:
    return DatasetNotFound(f"{name}: {detail} under {root}. Put {INFO[name].where} in a folder "
                           f"and pass it as --data-dir (datasets are never downloaded)")


# -- MNIST / Fashion-MNIST (IDX) --------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or raw, told apart by the gzip magic bytes) as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetNotFound(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DatasetNotFound(f"{path}: header says shape {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _find_idx(name: str, folders: List[Path], stem: str) -> Optional[Path]:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_mnist_like(name: str, root: Path, split: str) -> ImageSet:
    sub = "MNIST" if name == "mnist" else "FashionMNIST"
    folders = [root, root / "raw", root / sub / "raw", root / sub, root / name]
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(name, folders, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(name, folders, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise _missing(name, root, f"no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetNotFound(f"{name}: {images_path.name} {images.shape} and {labels_path.name} "
                              f"{labels.shape} do not form an image/label pair")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


# -- CIFAR-10 ---------------------------------------------------------------------------------
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _rows_to_images(rows: np.ndarray, channels: int, size: int) -> torch.Tensor:
    # Both CIFAR-10 and ImageNet32 store each image as 3072 bytes: R plane, G plane, B plane.
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, channels, size, size))


def read_cifar10(root: Path, split: str) -> ImageSet:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing("cifar10", root, f"missing {missing}")
    parts = [_unpickle(folder / n) for n in names]
    images = torch.cat([_rows_to_images(p["data"], 3, 32) for p in parts])
    labels = torch.cat([torch.as_tensor(np.asarray(p["labels"]), dtype=torch.int64) for p in parts])
    return ImageSet(images, labels)


# -- ImageNet 32x32 ---------------------------------------------------------------------------
def _find_file(root: Path, stem: str) -> Optional[Path]:
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.npz"):
            if candidate.is_file():
                return candidate
    return None


def _read_imagenet_part(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["data"], z["labels"]
    part = _unpickle(path)
    return part["data"], part["labels"]


def read_imagenet32(root: Path, split: str) -> ImageSet:
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    paths = [_find_file(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise _missing("imagenet32", root, f"missing {missing}")
    images, labels = [], []
    for path in paths:
        data, lab = _read_imagenet_part(path)
        images.append(_rows_to_images(data, 3, 32))
        labels.append(torch.as_tensor(np.asarray(lab), dtype=torch.int64) - 1)  # 1..1000 -> 0..999
    labels = torch.cat(labels)
    if labels.numel() and (labels.min() < 0 or labels.max() > 999):
        raise DatasetNotFound(f"imagenet32: labels under {root} are outside 1..1000")
    return ImageSet(torch.cat(images), labels)


@lru_cache(maxsize=2)
def _packaged_mnist(split: str) -> ImageSet:
    # The shipped files never change: read them once per process (tests run many tiny runs).
    return read_mnist_like("mnist", PACKAGED_MNIST, split)


def load_split(name: str, data_dir: Optional[str], split: str) -> ImageSet:
    """`split` is "train" or "test" (ImageNet32's val_data serves as its test set)."""
    if name == "mnist" and data_dir is None:
        return _packaged_mnist(split)
    if name not in INFO:
        raise DatasetNotFound(f"unknown dataset {name!r}; known: {sorted(INFO)}")
    if data_dir is None:
        if name != "mnist":
            raise DatasetNotFound(f"{name}: no --data-dir given. Put {INFO[name].where} in a folder "
                                  f"and pass it as --data-dir (datasets are never downloaded)")
        root = PACKAGED_MNIST
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DatasetNotFound(f"{name}: --data-dir {root} is not a folder. Put {INFO[name].where} "
                                  "there (datasets are never downloaded)")
    if name in ("mnist", "fashion-mnist"):
        data = read_mnist_like(name, root, split)
    elif name == "cifar10":
        data = read_cifar10(root, split)
    else:
        data = read_imagenet32(root, split)
    info = INFO[name]
    if tuple(data.images.shape[1:]) != (info.channels, info.size, info.size):
        raise DatasetNotFound(f"{name}: images under {root} have shape {tuple(data.images.shape[1:])}, "
                              f"expected {(info.channels, info.size, info.size)}")
    return data
