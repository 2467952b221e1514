"""Data sets of the harness: built-in digits, CIFAR-10 from local files, synthetic.

CIFAR-10 is read from its "python version" batches or from a class-folder image
tree (decoded and cached by :mod:`alq_torch.train.image_tree`).

Every data set is held as tensors on the training device; mini-batches are drawn
by :class:`WorkerSampler` from a seeded ``torch.Generator`` so that a run is
reproducible and a resumed run continues identically.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .image_tree import find_image_tree, load_image_tree

#: Names accepted by :func:`load_data`.
DATA_NAMES = ("digits", "cifar10", "synthetic")

#: CIFAR-10 per-channel mean and standard deviation of the training images.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_ROW = 3 * 32 * 32


@dataclass
class Dataset:
    """A train/validation split held as tensors.

    Attributes
    ----------
    name : str
    x_train, x_val : Tensor
        Inputs, float32 ``(N, *input_shape)``, or uint8 ``(N, 3, 32, 32)`` for
        CIFAR-10 (normalized per batch by :attr:`transform`).
    y_train, y_val : Tensor of int64, shape (N,)
    input_shape : tuple of int
    num_classes : int
    transform : callable or None
        ``transform(x, generator, train) -> float32 batch``: augmentation (train only)
        and normalization. None means the inputs are used as they are.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    transform: Callable[[Tensor, torch.Generator | None, bool], Tensor] | None = None

    def prepare(self, x: Tensor, generator: torch.Generator | None, train: bool) -> Tensor:
        """Apply :attr:`transform` (if any) to a batch of inputs."""
        return x if self.transform is None else self.transform(x, generator, train)

    def to(self, device: torch.device) -> Dataset:
        """Move every tensor to ``device``."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.input_shape,
            self.num_classes,
            self.transform,
        )


def load_digits_data(val_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, 64 features scaled to [0, 1], then standardized.

    The split is fixed (a permutation with seed 0; ``val_fraction`` of the 1797
    images, stratification not needed at this size) and the standardization uses
    the training part's per-feature mean and std.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - declared dependency
        msg = "the built-in digits data needs scikit-learn; fix: pip install scikit-learn"
        raise ImportError(msg) from exc
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    n_val = round(val_fraction * len(y))
    val, train = perm[:n_val], perm[n_val:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0) + np.float32(1e-2)
    x = (x - mean) / std
    return Dataset(
        "digits",
        torch.from_numpy(x[train].copy()),
        torch.from_numpy(y[train].copy()),
        torch.from_numpy(x[val].copy()),
        torch.from_numpy(y[val].copy()),
        (64,),
        10,
    )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        msg = (
            f"CIFAR-10 batch file {path!r} is missing. Expected the 'python version' of CIFAR-10 "
            f"(cifar-10-python.tar.gz extracted): a directory holding {', '.join(_CIFAR_TRAIN)}, "
            f"{_CIFAR_TEST} (and batches.meta)"
        )
        raise FileNotFoundError(msg)
    try:
        with open(path, "rb") as fh:
            obj: Any = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        msg = f"CIFAR-10 batch file {path!r} is not a readable pickle ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    if not isinstance(obj, dict):
        msg = f"CIFAR-10 batch file {path!r} must hold a dict with b'data' and b'labels'; got {type(obj).__name__}"
        raise ValueError(msg)
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        msg = f"CIFAR-10 batch file {path!r} must hold keys b'data' and b'labels'; got keys {sorted(map(str, obj))}"
        raise ValueError(msg)
    arr = np.asarray(data)
    lab = np.asarray(labels)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != _CIFAR_ROW:
        msg = (
            f"CIFAR-10 batch file {path!r}: b'data' must be uint8 of shape (N, {_CIFAR_ROW}); "
            f"got {arr.dtype} {arr.shape}"
        )
        raise ValueError(msg)
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        msg = f"CIFAR-10 batch file {path!r}: b'labels' must list {arr.shape[0]} labels; got shape {lab.shape}"
        raise ValueError(msg)
    if lab.size and (lab.min() < 0 or lab.max() > 9):
        msg = f"CIFAR-10 batch file {path!r}: labels must be in 0..9; got {int(lab.min())}..{int(lab.max())}"
        raise ValueError(msg)
    return arr.reshape(-1, 3, 32, 32), lab.astype(np.int64)


def _cifar_transform(x: Tensor, generator: torch.Generator | None, train: bool) -> Tensor:
    """uint8 (N, 3, 32, 32) -> normalized float32; training adds pad-4 random crop and flip."""
    xf = x.float().div_(255.0)
    if train and xf.shape[0]:
        n = xf.shape[0]
        dev = xf.device
        padded = torch.nn.functional.pad(xf, (4, 4, 4, 4))
        off = torch.randint(0, 9, (2, n), generator=generator, device=dev)
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        ar = torch.arange(32, device=dev)
        rows = (off[0][:, None] + ar)[:, None, :, None]
        cols = off[1][:, None] + ar
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        idx_n = torch.arange(n, device=dev)[:, None, None, None]
        idx_c = torch.arange(3, device=dev)[None, :, None, None]
        xf = padded[idx_n, idx_c, rows, cols]
    mean = torch.tensor(CIFAR_MEAN, device=xf.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=xf.device).view(1, 3, 1, 1)
    return (xf - mean) / std


_CIFAR_LAYOUTS = (
    "the extracted 'python version' (cifar-10-batches-py/ with data_batch_1..5 and test_batch) or a "
    "class-folder image tree (train/<class>/*.png|jpg and test/<class>/*.png|jpg)"
)


def load_cifar10(root: str | os.PathLike[str], *, workers: int | None = None, cache: bool = True) -> Dataset:
    """CIFAR-10 from a local directory: the "python version" batches or a class-folder image tree.

    Parameters
    ----------
    root : path
        Either a directory holding ``data_batch_1`` ... ``data_batch_5`` and
        ``test_batch`` (each a pickled dict with ``b'data'`` uint8 (N, 3072) and
        ``b'labels'``), or its parent holding ``cifar-10-batches-py/``; or an
        image tree ``train/<class>/*.png|jpg`` and ``test/<class>/*.png|jpg`` of
        32x32 RGB images (torchvision's ``ImageFolder`` layout), or the parent of
        exactly one such tree. Class folders named as CIFAR-10's classes get the
        canonical labels (airplane 0 ... truck 9), others their sorted order.
    workers : int, optional
        Processes decoding an image tree; default: the CPUs per local rank, 1 for small trees
        (:func:`alq_torch.train.image_tree.default_workers`).
    cache : bool
        Cache a decoded image tree as uint8 ``.npz`` (``root/.alq-cache/``, or the
        user cache directory when ``root`` is read-only; see
        :func:`alq_torch.train.image_tree.load_image_tree`).

    Returns
    -------
    Dataset
        Inputs stay uint8 (N, 3, 32, 32) on the device; batches get the paper's
        augmentation (random crop with 4-pixel zero padding, horizontal flip) and
        per-channel normalization.
    """
    if root is None or str(root) == "":
        msg = "CIFAR-10 needs a directory; fix: pass --data-dir /path/to/cifar-10-batches-py (or an image tree)"
        raise ValueError(msg)
    path = os.fspath(root)
    if not os.path.isdir(path):
        msg = f"CIFAR-10 directory {path!r} does not exist. Expected {_CIFAR_LAYOUTS}; fix: --data-dir <that directory>"
        raise FileNotFoundError(msg)
    nested = os.path.join(path, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(path, _CIFAR_TRAIN[0])) and os.path.isdir(nested):
        path = nested
    if not os.path.exists(os.path.join(path, _CIFAR_TRAIN[0])):
        tree = find_image_tree(path)
        if tree is not None:
            a = load_image_tree(tree, num_classes=10, workers=workers, cache=cache)
            return _cifar_dataset(a.x_train, a.y_train, a.x_test, a.y_test)
        msg = f"CIFAR-10 directory {path!r} holds neither layout; expected {_CIFAR_LAYOUTS}; fix: --data-dir <one of them>"
        raise FileNotFoundError(msg)
    parts = [_read_cifar_batch(os.path.join(path, f)) for f in _CIFAR_TRAIN]
    xt = np.concatenate([p[0] for p in parts])
    yt = np.concatenate([p[1] for p in parts])
    xv, yv = _read_cifar_batch(os.path.join(path, _CIFAR_TEST))
    return _cifar_dataset(xt, yt, xv, yv)


def _cifar_dataset(xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> Dataset:
    """uint8 (N, 3, 32, 32) images and int64 labels -> the CIFAR-10 :class:`Dataset` (augmented, normalized)."""
    return Dataset(
        "cifar10",
        torch.from_numpy(xt),
        torch.from_numpy(yt),
        torch.from_numpy(xv),
        torch.from_numpy(yv),
        (3, 32, 32),
        10,
        _cifar_transform,
    )


def make_synthetic(
    num_train: int = 10000,
    num_val: int = 2000,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Learnable synthetic data for speed tests: Gaussian inputs labelled by a random linear teacher."""
    if num_train < 1 or num_val < 1:
        msg = f"synthetic data needs at least one train and one val example; got {num_train}, {num_val}"
        raise ValueError(msg)
    g = torch.Generator().manual_seed(seed)
    features = int(np.prod(input_shape))
    teacher = torch.randn(features, num_classes, generator=g)
    x = torch.randn(num_train + num_val, *input_shape, generator=g)
    y = (x.reshape(x.shape[0], -1) @ teacher).argmax(dim=1)
    return Dataset(
        "synthetic",
        x[:num_train].contiguous(),
        y[:num_train].contiguous(),
        x[num_train:].contiguous(),
        y[num_train:].contiguous(),
        tuple(input_shape),
        num_classes,
    )


def load_data(name: str, *, data_dir: str | None = None, synthetic_size: int = 10000) -> Dataset:
    """Load a data set by name: ``digits`` (built in), ``cifar10`` (needs ``data_dir``) or ``synthetic``."""
    if name == "digits":
        return load_digits_data()
    if name == "cifar10":
        if data_dir is None:
            msg = (
                "--data cifar10 needs --data-dir pointing at the extracted cifar-10-batches-py directory "
                "or at a class-folder image tree (train/<class>/, test/<class>/)"
            )
            raise ValueError(msg)
        return load_cifar10(data_dir)
    if name == "synthetic":
        return make_synthetic(num_train=synthetic_size, num_val=max(1, synthetic_size // 5))
    msg = f"unknown data set {name!r}; expected one of {', '.join(DATA_NAMES)}"
    raise ValueError(msg)


class WorkerSampler:
    """Draws ``K`` disjoint mini-batches per step from shuffled epochs of the training set.

    Parameters
    ----------
    num_examples : int
        Size of the training set.
    workers : int
        ``K``; each worker gets its own mini-batch.
    batch_size : int
        Per worker.
    seed : int
        Seeds the shuffling generator (CPU), whose state is part of a checkpoint.
    """

    def __init__(self, num_examples: int, workers: int, batch_size: int, seed: int) -> None:
        if num_examples < 1:
            msg = f"the training set is empty; got {num_examples} examples"
            raise ValueError(msg)
        self.num_examples = num_examples
        self.workers = workers
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._buffer = torch.empty(0, dtype=torch.int64)
        self.epoch = 0

    def next(self) -> Tensor:
        """Indices of the next step's batches, int64 ``(K, batch_size)`` on the CPU."""
        need = self.workers * self.batch_size
        while self._buffer.numel() < need:
            perm = torch.randperm(self.num_examples, generator=self.generator)
            self._buffer = torch.cat([self._buffer, perm])
            self.epoch += 1
        idx, self._buffer = self._buffer[:need], self._buffer[need:]
        return idx.view(self.workers, self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Generator state, pending indices and epoch count."""
        return {"generator": self.generator.get_state(), "buffer": self._buffer.clone(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.generator.set_state(state["generator"])
        self._buffer = state["buffer"].clone()
        self.epoch = int(state["epoch"])


__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATA_NAMES",
    "Dataset",
    "WorkerSampler",
    "load_cifar10",
    "load_data",
    "load_digits_data",
    "make_synthetic",
]
