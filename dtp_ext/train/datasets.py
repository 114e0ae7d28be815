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
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

PACKAGED_MNIST = Path(__file__).resolve().parent.parent / "data" / "mnist"


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # the paper's random crop (pad 4, edge) + horizontal flip by default
    where: str  # what to put in --data-dir, for the error message
    source: str = ""  # where the official files come from, for the error messages


INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        1,
        28,
        10,
        (0.1307,),
        (0.3081,),
        False,
        "the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
        "the official files are at https://yann.lecun.com/exdb/mnist/ (torchvision's "
        "datasets.MNIST(DIR, download=True) fetches them into DIR/MNIST/raw); dtp_ext "
        "ships a copy, used when --data-dir is not given",
    ),
    "fashion-mnist": DatasetInfo(
        1,
        28,
        10,
        (0.2860,),
        (0.3530,),
        False,
        "the four Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
        "the official files are listed at https://github.com/zalandoresearch/fashion-mnist "
        "(torchvision's datasets.FashionMNIST(DIR, download=True) fetches them)",
    ),
    "cifar10": DatasetInfo(
        3,
        32,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        "torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch)",
        "the official file is cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "(unpack it in DIR; torchvision's datasets.CIFAR10(DIR, download=True) does both)",
    ),
    "imagenet32": DatasetInfo(
        3,
        32,
        1000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        True,
        "the downsampled ImageNet 32x32 files train_data_batch_1..10 and "
        "val_data (official pickles or .npz), e.g. Imagenet32_train/ and Imagenet32_val/",
        "the official files are Imagenet32_train.zip and Imagenet32_val.zip (pickles) or "
        "their _npz versions, from https://image-net.org/download-images (Downsampled "
        "ImageNet 32x32, free account needed; Chrabaszcz et al. 2017)",
    ),
}


class DatasetNotFound(FileNotFoundError):
    """Missing or malformed dataset files; the message says what to put where."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self):
        return self.labels.shape[0]

    def subset(self, count: int | None) -> ImageSet:
        if count is None or count >= len(self):
            return self
        return ImageSet(self.images[:count], self.labels[:count])


def _missing(name: str, root: Path, detail: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"{name}: {detail} under {root}. Put {INFO[name].where} in a folder "
        f"and pass it as --data-dir (datasets are never downloaded; "
        f"{INFO[name].source})"
    )


def _damaged(name: str, path: Path, what: str) -> DatasetNotFound:
    """A data file that exists but cannot be used: names the file, what is wrong, and where a
    good copy comes from."""
    return DatasetNotFound(f"{path}: {what}. Replace it with a good copy ({INFO[name].source})")


def _check_labels(name: str, path: Path, labels: np.ndarray, low: int = 0):
    """Labels must be class indices of `name` (numbered from `low` in the file)."""
    classes = INFO[name].classes
    labels = np.asarray(labels)
    if labels.size and (labels.min() < low or labels.max() > low + classes - 1):
        bad = labels[(labels < low) | (labels > low + classes - 1)]
        raise _damaged(
            name,
            path,
            f"{bad.size} label(s) outside the {classes} classes {low}..{low + classes - 1} "
            f"(e.g. {bad.flat[0]})",
        )


# -- MNIST / Fashion-MNIST (IDX) --------------------------------------------------------------
def read_idx(path: Path, name: str = "mnist") -> np.ndarray:
    """An IDX file (gzip or raw, told apart by the gzip magic bytes) as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise _damaged(
                name,
                path,
                "truncated gzip file (it ends before the end of its compressed "
                "data: a download cut short?)",
            ) from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise _damaged(name, path, f"corrupt gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise _damaged(name, path, "not an unsigned-byte IDX file (bad magic number)")
    dims = raw[3]
    if len(raw) < 4 + 4 * dims:
        raise _damaged(
            name, path, f"truncated IDX file ({len(raw)} bytes, shorter than its header)"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise _damaged(
            name,
            path,
            f"its header says shape {shape} ({int(np.prod(shape))} values), the file "
            f"holds {data.size} values (truncated or not an IDX file)",
        )
    return data.reshape(shape)


def _find_idx(name: str, folders: list[Path], stem: str) -> Path | None:
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
        raise _missing(
            name, root, f"no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]"
        )
    images, labels = read_idx(images_path, name), read_idx(labels_path, name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetNotFound(
            f"{name}: {images_path} {images.shape} and {labels_path.name} "
            f"{labels.shape} do not form an image/label pair ({INFO[name].source})"
        )
    _check_labels(name, labels_path, labels)
    return ImageSet(
        torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    )


# -- CIFAR-10 ---------------------------------------------------------------------------------
def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... on damaged bytes
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise _damaged(
                name,
                path,
                "truncated pickle (the file ends before its data: a download or "
                "unpacking cut short?)",
            ) from None
        raise _damaged(
            name, path, f"not a readable {name} pickle ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(data, dict):
        raise _damaged(
            name, path, f"a {name} pickle holds a dict, this one a {type(data).__name__}"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _part(name: str, path: Path, data, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of one CIFAR-10 / ImageNet32 file. Both store each image as one row of
    3072 bytes: R plane, G plane, B plane (32x32 each)."""
    try:
        rows = np.asarray(data)
    except Exception:
        rows = None
    if rows is None or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        shape = getattr(rows, "shape", None)
        raise _damaged(
            name,
            path,
            f"its 'data' has shape {shape}, expected rows of 3072 bytes (3 x 32 x 32 images)",
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != rows.shape[0]:
        raise _damaged(name, path, f"{rows.shape[0]} images but labels of shape {labels.shape}")
    if rows.dtype != np.uint8 and rows.size and (rows.min() < 0 or rows.max() > 255):
        raise _damaged(name, path, f"pixel values outside 0..255 (dtype {rows.dtype})")
    _check_labels(name, path, labels, low=1 if name == "imagenet32" else 0)
    images = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.as_tensor(labels.astype(np.int64))


def _field(name: str, path: Path, data: dict, key: str):
    if key not in data:
        raise _damaged(name, path, f"it has no '{key}' entry (it has {sorted(map(str, data))[:8]})")
    return data[key]


def read_cifar10(root: Path, split: str) -> ImageSet:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing("cifar10", root, f"missing {missing}")
    parts = []
    for n in names:
        data = _unpickle(folder / n, "cifar10")
        parts.append(
            _part(
                "cifar10",
                folder / n,
                _field("cifar10", folder / n, data, "data"),
                _field("cifar10", folder / n, data, "labels"),
            )
        )
    return ImageSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


# -- ImageNet 32x32 ---------------------------------------------------------------------------
def _find_file(root: Path, stem: str) -> Path | None:
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.npz"):
            if candidate.is_file():
                return candidate
    return None


def _read_imagenet_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                part = {k: z[k] for k in z.files}
        except Exception as exc:  # BadZipFile, EOFError, ValueError, ...
            raise _damaged(
                "imagenet32",
                path,
                f"not a readable .npz file ({type(exc).__name__}: {str(exc)[:200]})",
            ) from None
    else:
        part = _unpickle(path, "imagenet32")
    return _field("imagenet32", path, part, "data"), _field("imagenet32", path, part, "labels")


def read_imagenet32(root: Path, split: str) -> ImageSet:
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    paths = [_find_file(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise _missing("imagenet32", root, f"missing {missing}")
    images, labels = [], []
    for path in paths:
        x, y = _part("imagenet32", path, *_read_imagenet_part(path))
        images.append(x)
        labels.append(y - 1)  # 1..1000 -> 0..999
    return ImageSet(torch.cat(images), torch.cat(labels))


@lru_cache(maxsize=2)
def _packaged_mnist(split: str) -> ImageSet:
    # The shipped files never change: read them once per process (tests run many tiny runs).
    return read_mnist_like("mnist", PACKAGED_MNIST, split)


def load_split(name: str, data_dir: str | None, split: str) -> ImageSet:
    """`split` is "train" or "test" (ImageNet32's val_data serves as its test set)."""
    if name == "mnist" and data_dir is None:
        return _packaged_mnist(split)
    if name not in INFO:
        raise DatasetNotFound(f"unknown dataset {name!r}; known: {sorted(INFO)}")
    if data_dir is None:
        if name != "mnist":
            raise DatasetNotFound(
                f"{name}: no --data-dir given. Put {INFO[name].where} in a folder "
                f"and pass it as --data-dir (datasets are never downloaded; "
                f"{INFO[name].source})"
            )
        root = PACKAGED_MNIST
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DatasetNotFound(
                f"{name}: --data-dir {root} is not a folder. Put {INFO[name].where} "
                f"there (datasets are never downloaded; {INFO[name].source})"
            )
    if name in ("mnist", "fashion-mnist"):
        data = read_mnist_like(name, root, split)
    elif name == "cifar10":
        data = read_cifar10(root, split)
    else:
        data = read_imagenet32(root, split)
    info = INFO[name]
    if tuple(data.images.shape[1:]) != (info.channels, info.size, info.size):
        raise DatasetNotFound(
            f"{name}: images under {root} have shape {tuple(data.images.shape[1:])}, "
            f"expected {(info.channels, info.size, info.size)}"
        )
    return data
