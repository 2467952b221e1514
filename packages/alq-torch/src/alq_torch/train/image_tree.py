"""CIFAR-10 as a class-folder image tree: scan, decode once with Pillow, cache as uint8.

The layout is torchvision's ``ImageFolder`` convention, one tree per split::

    DIR/train/<class>/*.png|*.jpg|*.jpeg
    DIR/test/<class>/*.png|*.jpg|*.jpeg

(as in the public ``CIFAR-10-images`` repository). Decoding 60000 small images
takes seconds, so the result is cached as one uint8 ``.npz`` beside the data
(``DIR/.alq-cache/cifar10-uint8.npz``), or in the user cache directory when
``DIR`` is not writable. The cache carries a fingerprint of the file list, the
file sizes and the Pillow version; a changed tree is decoded again.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: CIFAR-10's class names in label order (``batches.meta``); folders with exactly these names get these labels.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: The two split folders of a tree.
SPLITS = ("train", "test")

#: Name of the cache file inside ``DIR/.alq-cache/``.
CACHE_NAME = "cifar10-uint8.npz"

_CACHE_FORMAT = "alq-image-tree-v1"
_TREE_HINT = "DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg"


@dataclass(frozen=True)
class ImageTree:
    """A scanned and checked class-folder tree.

    Attributes
    ----------
    root : str
        The directory holding ``train/`` and ``test/``.
    classes : tuple of str
        Class folder names in label order.
    files : dict of str to list of (str, int, int)
        Per split: ``(relative POSIX path, size in bytes, label)``, ordered by label then file name.
    """

    root: str
    classes: tuple[str, ...]
    files: dict[str, list[tuple[str, int, int]]]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the cache format, the Pillow version, the classes and every file's path and size."""
        from PIL import __version__ as pil_version

        h = hashlib.sha256(f"{_CACHE_FORMAT}\npillow {pil_version}\n{','.join(self.classes)}\n".encode())
        for split in SPLITS:
            for rel, size, label in self.files[split]:
                h.update(f"{rel}\t{size}\t{label}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class ImageArrays:
    """Decoded splits of an :class:`ImageTree`.

    Attributes
    ----------
    x_train, x_test : ndarray of uint8, shape (N, 3, 32, 32)
        Channel-major, like CIFAR-10's python batches.
    y_train, y_test : ndarray of int64, shape (N,)
    classes : tuple of str
        Label ``i`` is ``classes[i]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def _has_split_dir(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, s)) for s in SPLITS)


def find_image_tree(root: str | os.PathLike[str]) -> str | None:
    """The tree at ``root``: ``root`` itself if it has ``train/`` or ``test/``, else its only child that does.

    Returns None when neither ``root`` nor any child looks like a tree; raises
    ValueError when several children do (the caller cannot guess which one).
    """
    path = os.fspath(root)
    if _has_split_dir(path):
        return path
    children = sorted(
        e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".") and _has_split_dir(e.path)
    )
    if len(children) > 1:
        msg = (
            f"{path!r} holds {len(children)} image trees ({', '.join(map(os.path.basename, children))}); "
            "expected one; fix: --data-dir <the one to use>"
        )
        raise ValueError(msg)
    return children[0] if children else None


def _visible_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _class_files(root: str, split: str, cls: str) -> list[tuple[str, int]]:
    folder = os.path.join(root, split, cls)
    images: list[tuple[str, int]] = []
    other: list[str] = []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES):
            images.append((f"{split}/{cls}/{e.name}", e.stat().st_size))
        else:
            other.append(e.name + ("/" if e.is_dir() else ""))
    if other:
        shown = ", ".join(sorted(other)[:3]) + (", ..." if len(other) > 3 else "")
        msg = (
            f"class folder {folder!r} holds {len(other)} entries that are not {'/'.join(IMAGE_SUFFIXES)} files "
            f"({shown}); expected only images; fix: move them out of the tree"
        )
        raise ValueError(msg)
    if not images:
        msg = (
            f"class folder {folder!r} holds no images; expected at least one {'/'.join(IMAGE_SUFFIXES)} file; "
            "fix: fill it or remove the class from both train/ and test/"
        )
        raise ValueError(msg)
    return sorted(images)


def scan_image_tree(root: str | os.PathLike[str], num_classes: int = 10) -> ImageTree:
    """List and check the tree at ``root`` (holding ``train/`` and ``test/``) without decoding.

    Labels follow :data:`CIFAR10_CLASSES` when the class folders are exactly those
    names, else the sorted folder names. Raises FileNotFoundError for a missing
    split and ValueError for a wrong class count, mismatched or empty classes and
    non-image files.
    """
    path = os.fspath(root)
    for split in SPLITS:
        if not os.path.isdir(os.path.join(path, split)):
            msg = (
                f"image tree {path!r} has no {split}/ folder; expected {_TREE_HINT}; "
                f"fix: add {split}/ with one folder of images per class"
            )
            raise FileNotFoundError(msg)
    per_split = {split: _visible_dirs(os.path.join(path, split)) for split in SPLITS}
    if per_split["train"] != per_split["test"]:
        only_train = sorted(set(per_split["train"]) - set(per_split["test"]))
        only_test = sorted(set(per_split["test"]) - set(per_split["train"]))
        msg = (
            f"image tree {path!r}: train/ and test/ must hold the same class folders; only in train/: "
            f"{only_train}, only in test/: {only_test}; fix: give both splits the same classes"
        )
        raise ValueError(msg)
    names = per_split["train"]
    if len(names) != num_classes:
        msg = (
            f"image tree {path!r} has {len(names)} class folders in train/ ({', '.join(names) or 'none'}); "
            f"expected {num_classes}; fix: one folder per class under train/ and test/"
        )
        raise ValueError(msg)
    classes = CIFAR10_CLASSES if set(names) == set(CIFAR10_CLASSES) else tuple(names)
    files = {
        split: [(rel, size, label) for label, cls in enumerate(classes) for rel, size in _class_files(path, split, cls)]
        for split in SPLITS
    }
    return ImageTree(path, classes, files)


def _decode_chunk(root: str, rels: Sequence[str]) -> np.ndarray:
    """Decode images ``rels`` (relative to ``root``) into uint8 ``(len(rels), 3, 32, 32)``; each must be 32x32 RGB."""
    from PIL import Image

    out = np.empty((len(rels), 3, 32, 32), dtype=np.uint8)
    for i, rel in enumerate(rels):
        file = os.path.join(root, rel)
        with open(file, "rb") as fh:
            raw = fh.read()
        try:
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                size, mode = im.size, im.mode
                if size == (32, 32) and mode == "RGB":
                    out[i] = np.asarray(im).transpose(2, 0, 1)
        except Exception as exc:
            msg = f"image {file!r} could not be decoded ({type(exc).__name__}: {exc}); fix: replace or remove it"
            raise ValueError(msg) from None
        if size != (32, 32) or mode != "RGB":
            msg = (
                f"image {file!r} is {size[0]}x{size[1]} {mode}; expected 32x32 RGB (CIFAR-10); "
                "fix: convert it, e.g. Image.open(p).convert('RGB').resize((32, 32))"
            )
            raise ValueError(msg)
    return out


def default_workers(num_images: int) -> int:
    """Decoding processes: 1 for small trees, else the CPUs shared among the local ranks of a torchrun job."""
    if num_images < 4096:
        return 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(16, (os.cpu_count() or 1) // ranks))


def decode_images(root: str, rels: Sequence[str], *, workers: int = 1, progress: bool | None = None) -> np.ndarray:
    """Decode the images ``rels`` under ``root`` in order, on ``workers`` processes.

    Parameters
    ----------
    root : str
    rels : sequence of str
        Paths relative to ``root``.
    workers : int
        Above 1: a process pool (forked, where the platform can fork; threads
        elsewhere, since spawned workers would import torch first).
    progress : bool, optional
        Show a tqdm bar; default: only when stderr is a terminal.

    Returns
    -------
    ndarray of uint8, shape (len(rels), 3, 32, 32)
    """
    from tqdm.auto import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    out = np.empty((len(rels), 3, 32, 32), dtype=np.uint8)
    step = max(64, min(2048, len(rels) // max(1, 8 * workers) or 1))
    starts = range(0, len(rels), step)
    bar = tqdm(total=len(rels), desc="decoding images", unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1:
            for s in starts:
                out[s : s + step] = _decode_chunk(root, rels[s : s + step])
                bar.update(len(rels[s : s + step]))
            return out
        pool: cf.Executor
        if "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
            pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        else:
            pool = cf.ThreadPoolExecutor(workers)
        with pool:
            chunks = pool.map(_decode_chunk, [root] * len(starts), [rels[s : s + step] for s in starts])
            for s, chunk in zip(starts, chunks):
                out[s : s + len(chunk)] = chunk
                bar.update(len(chunk))
        return out
    finally:
        bar.close()


def user_cache_dir() -> str:
    """``$ALQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/alq``, else ``~/.cache/alq``."""
    if os.environ.get("ALQ_CACHE_DIR"):
        return os.environ["ALQ_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alq")


def cache_paths(tree: ImageTree, fingerprint: str) -> list[str]:
    """Where the decoded tree is cached, in order of preference: beside the data, then the user cache."""
    return [
        os.path.join(tree.root, ".alq-cache", CACHE_NAME),
        os.path.join(user_cache_dir(), f"cifar10-uint8-{fingerprint[:16]}.npz"),
    ]


def _read_cache(path: str, tree: ImageTree, fingerprint: str) -> ImageArrays | None:
    """The cached arrays at ``path`` if it exists and matches ``fingerprint``; None otherwise (a miss)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            arrays = ImageArrays(z["x_train"], z["y_train"], z["x_test"], z["y_test"], tree.classes)
    except Exception:  # damaged or foreign file: decode again and overwrite it
        return None
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        n = len(tree.files[split])
        if x.dtype != np.uint8 or x.shape != (n, 3, 32, 32) or y.shape != (n,):
            return None
    return arrays


def _write_cache(paths: Sequence[str], arrays: ImageArrays, fingerprint: str) -> str | None:
    """Write the cache to the first writable of ``paths`` (atomically); the path written, or None."""
    errors = []
    for path in paths:
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cifar10-", suffix=".tmp")
        except OSError as exc:
            errors.append(f"{folder}: {exc.strerror or exc}")
            continue
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the data
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    x_train=arrays.x_train,
                    y_train=arrays.y_train,
                    x_test=arrays.x_test,
                    y_test=arrays.y_test,
                    classes=np.array(arrays.classes),
                    fingerprint=np.array(fingerprint),
                )
            os.replace(tmp, path)
            return path
        except OSError as exc:
            errors.append(f"{folder}: {exc.strerror or exc}")
            if os.path.exists(tmp):
                os.remove(tmp)
    warnings.warn(
        f"decoded images not cached (no writable cache folder: {'; '.join(errors)}); they will be decoded "
        "again next time; fix: make the data folder writable or set ALQ_CACHE_DIR",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def load_image_tree(
    root: str | os.PathLike[str],
    *,
    num_classes: int = 10,
    workers: int | None = None,
    cache: bool = True,
    progress: bool | None = None,
) -> ImageArrays:
    """Decode the tree at ``root`` (holding ``train/`` and ``test/``), or read it from the cache.

    Parameters
    ----------
    root : path
    num_classes : int
        Expected number of class folders.
    workers : int, optional
        Decoding processes; default :func:`default_workers`.
    cache : bool
        Read and write the uint8 cache (see the module docstring).
    progress : bool, optional
        Progress bar while decoding; default only when stderr is a terminal.

    Returns
    -------
    ImageArrays
    """
    tree = scan_image_tree(root, num_classes)
    fingerprint = tree.fingerprint()
    paths = cache_paths(tree, fingerprint)
    if cache:
        for path in paths:
            hit = _read_cache(path, tree, fingerprint)
            if hit is not None:
                return hit
    rels = [rel for split in SPLITS for rel, _, _ in tree.files[split]]
    labels = np.array([label for split in SPLITS for _, _, label in tree.files[split]], dtype=np.int64)
    n_workers = default_workers(len(rels)) if workers is None else max(1, int(workers))
    x = decode_images(tree.root, rels, workers=n_workers, progress=progress)
    n = len(tree.files["train"])
    arrays = ImageArrays(x[:n], labels[:n], x[n:], labels[n:], tree.classes)
    if cache:
        _write_cache(paths, arrays, fingerprint)
    return arrays


__all__ = [
    "CACHE_NAME",
    "CIFAR10_CLASSES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "ImageArrays",
    "ImageTree",
    "cache_paths",
    "decode_images",
    "default_workers",
    "find_image_tree",
    "load_image_tree",
    "scan_image_tree",
    "user_cache_dir",
]
