"""Datasets for `fop-train`: sklearn's bundled digits, MNIST from IDX files, and long-tailed variants.

Everything is held in memory as float32 image tensors of shape (N, C, H, W), standardized with the
training set's mean and standard deviation, and int64 labels. Nothing is downloaded.

- `digits`: sklearn's bundled 8x8 digits (1797 images), split 80/20 stratified with a fixed seed.
- `mnist`: the IDX files (gzipped or not) in a directory, 60000 train / 10000 test 28x28 images.
- `text`: next-byte prediction on the source text of a fixed list of Python standard-library modules
  (`TEXT_MODULES`, read with `inspect.getsource` from the running interpreter, so nothing is downloaded; the
  corpus therefore depends on the Python version, which results.json records). Bytes are the tokens (vocabulary
  256); the first 90% of the stream trains, the last 10% tests; each sample is a window of `TEXT_CONTEXT` bytes
  (x) and the same window shifted by one (y), windows taken every `TEXT_CONTEXT` bytes.
- `long_tailed(...)`: the CIFAR-LT protocol (Cao et al. 2019, used by the FOP paper): class c keeps
  `n_c = floor(n_max * imbalance ** (-c / (C - 1)))` training samples, so the first class keeps
  `n_max` and the last `n_max / imbalance`; the test set stays balanced.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "ImageDataset",
    "MNIST_FILES",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_text",
    "long_tailed",
    "long_tailed_counts",
    "read_idx",
    "write_idx",
]

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}

# The four MNIST files by role; each may be named with a dash or a dot before "idx", gzipped or not.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class ImageDataset:
    """An in-memory classification dataset: images (N, C, H, W) float32 and labels (N,) int64; for `text`, token
    windows (N, T) int64 and their next tokens (N, T) int64 (every position is a classification)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.train_y.reshape(-1), minlength=self.num_classes).tolist()


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped when the name ends in .gz): magic 0x0000TTDD, D big-endian int32 dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; valid: {sorted(hex(c) for c in _IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX dims {dims} need {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzipped when the name ends in .gz); the inverse of `read_idx`."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"array: dtype {array.dtype} has no IDX code; use uint8, int8, int16, int32, float32, float64")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = array.astype(_IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + data)


def _find_idx(data_dir: str, stem: str) -> str | None:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, dotted):
        for suffix in (".gz", ""):
            path = os.path.join(data_dir, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-8)
    return (train_x - mean) / std, (test_x - mean) / std


def _as_images(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if t.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"images must have 3 (N, H, W) or 4 (N, C, H, W) dimensions, got shape {tuple(t.shape)}")
    return t


def load_mnist(data_dir: str, name: str = "mnist") -> ImageDataset:
    """MNIST (or any dataset in the same four-IDX-file layout) from `data_dir`; pixel values scaled to [0, 1]."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data dir {data_dir!r} does not exist; expected a directory with the IDX files "
            + ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
        )
    paths = {role: _find_idx(data_dir, stem) for role, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[role] for role, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"data dir {data_dir!r} lacks {', '.join(missing)}; expected the four IDX files "
            + ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
            + " (a dot may replace the dash before 'idx', e.g. train-images.idx3-ubyte.gz)"
        )
    arrays = {role: read_idx(p) for role, p in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            images, labels = paths[f"{split}_images"], paths[f"{split}_labels"]
            raise ValueError(f"{images}: {n_img} images but {labels}: {n_lab} labels")
    scale = 255.0 if arrays["train_images"].dtype == np.uint8 else 1.0
    train_x = _as_images(arrays["train_images"]) / scale
    test_x = _as_images(arrays["test_images"]) / scale
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    if train_y.min() < 0 or test_y.min() < 0:
        raise ValueError(f"{data_dir}: labels must be non-negative class indices")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = _standardize(train_x, test_x)
    return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """sklearn's bundled 8x8 digits (embedded, no files): a stratified train/test split with a fixed seed."""
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
    train_x, test_x = _standardize(_as_images(x_tr), _as_images(x_te))
    return ImageDataset("digits", train_x, torch.from_numpy(y_tr), test_x, torch.from_numpy(y_te), 10)


def long_tailed_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class counts `floor(n_max * imbalance ** (-c / (C - 1)))`, c = 0..C-1 (CIFAR-LT)."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (largest class / smallest class), got {imbalance}")
    if num_classes < 2:
        return [n_max] * num_classes
    return [max(1, int(n_max * imbalance ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tailed(data: ImageDataset, imbalance: float, seed: int = 0, n_max: int | None = None) -> ImageDataset:
    """A long-tailed copy of `data`: class c keeps `long_tailed_counts(n_max, C, imbalance)[c]` random
    training samples (`n_max` defaults to the smallest class count, so every class can supply it);
    the test set is unchanged (balanced evaluation, as in CIFAR-LT)."""
    available = data.class_counts()
    if n_max is None:
        n_max = min(available)
    counts = long_tailed_counts(n_max, data.num_classes, imbalance)
    short = [(c, n, a) for c, (n, a) in enumerate(zip(counts, available)) if n > a]
    if short:
        raise ValueError(
            "long-tailed sampling needs more samples than a class has: "
            + ", ".join(f"class {c} needs {n}, has {a}" for c, n, a in short)
        )
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = torch.nonzero(data.train_y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    keep = torch.cat(keep).sort().values
    return ImageDataset(
        f"{data.name}-lt{imbalance:g}",
        data.train_x[keep],
        data.train_y[keep],
        data.test_x,
        data.test_y,
        data.num_classes,
    )


# Modules whose source is the `text` corpus: pure-Python modules present in every CPython since 3.10.
TEXT_MODULES = ("argparse", "textwrap", "string", "json.decoder", "json.encoder", "dataclasses", "functools",
                "heapq", "bisect", "calendar", "fractions", "shlex", "difflib", "pprint", "configparser")
TEXT_CONTEXT = 32


def load_text(context: int = TEXT_CONTEXT, modules: tuple[str, ...] = TEXT_MODULES) -> ImageDataset:
    """Next-byte prediction on the concatenated source of `modules` (see the module docstring)."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    stream = "\n".join(inspect.getsource(importlib.import_module(m)) for m in modules).encode("utf-8")
    tokens = torch.frombuffer(bytearray(stream), dtype=torch.uint8).long()
    split = int(0.9 * len(tokens))

    def windows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(t) - 1) // context
        x = t[: n * context].view(n, context)
        y = t[1: n * context + 1].view(n, context)
        return x.clone(), y.clone()

    train_x, train_y = windows(tokens[:split])
    test_x, test_y = windows(tokens[split:])
    return ImageDataset("text", train_x, train_y, test_x, test_y, 256)


DATASETS = ("digits", "mnist", "text")


def load_dataset(
    name: str,
    data_dir: str | None = None,
    imbalance: float | None = None,
    train_limit: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by name ('digits', 'mnist' or 'text'), optionally long-tailed and/or limited to
    `train_limit` training samples (a stratified-by-chance random subset drawn with `seed`)."""
    if name == "digits":
        data = load_digits()
    elif name == "mnist":
        if data_dir is None:
            raise ValueError(
                "dataset 'mnist' needs --data-dir: a directory with "
                + ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
            )
        data = load_mnist(data_dir)
    elif name == "text":
        if imbalance is not None:
            raise ValueError("--imbalance applies to the image datasets, not to 'text'")
        data = load_text()
    else:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if train_limit is not None:
        if train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {train_limit}")
        if train_limit < len(data.train_y):
            keep = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:train_limit]
            keep = keep.sort().values
            data = ImageDataset(data.name, data.train_x[keep], data.train_y[keep], data.test_x, data.test_y,
                                data.num_classes)
    if imbalance is not None:
        data = long_tailed(data, imbalance, seed=seed)
    return data
