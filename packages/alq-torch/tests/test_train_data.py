"""Data of the harness: digits split, CIFAR-10 python batches (generated in the exact format) and image
trees (tiny PNG/JPEG trees written here), synthetic."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from alq_torch.train import image_tree
from alq_torch.train.data import CIFAR_MEAN, WorkerSampler, load_cifar10, load_data, load_digits_data, make_synthetic
from alq_torch.train.image_tree import CACHE_NAME, CIFAR10_CLASSES, load_image_tree
from PIL import Image


def _write_batch(path: str, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(path, "wb") as fh:
        # The official files: dicts with bytes keys, written by Python 2's cPickle.
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}, fh, protocol=2)
    return data, labels


@pytest.fixture
def cifar_dir(tmp_path):  # type: ignore[no-untyped-def]
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    parts = [_write_batch(str(root / f"data_batch_{i}"), 6, i) for i in range(1, 6)]
    test = _write_batch(str(root / "test_batch"), 4, 99)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane"] * 10}, fh, protocol=2)
    return root, parts, test


def test_cifar_loader_reads_the_python_batches(cifar_dir) -> None:  # type: ignore[no-untyped-def]
    root, parts, test = cifar_dir
    ds = load_cifar10(root)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_val.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train[:6].reshape(6, -1).numpy(), parts[0][0])
    assert ds.y_train[6:12].tolist() == parts[1][1]
    assert ds.y_val.tolist() == test[1]
    # channel-major rows: first 1024 bytes are the red plane
    np.testing.assert_array_equal(ds.x_val[0, 0].reshape(-1).numpy(), test[0][0, :1024])
    # the parent directory works too
    assert load_cifar10(root.parent).x_train.shape[0] == 30


def test_cifar_transform_normalizes_and_augments_deterministically(cifar_dir) -> None:  # type: ignore[no-untyped-def]
    ds = load_cifar10(cifar_dir[0])
    x = ds.x_train[:8]
    plain = ds.prepare(x, None, False)
    expected = (x[:, 0].float() / 255 - CIFAR_MEAN[0]) / 0.2470
    torch.testing.assert_close(plain[:, 0], expected)
    a = ds.prepare(x, torch.Generator().manual_seed(1), True)
    b = ds.prepare(x, torch.Generator().manual_seed(1), True)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, plain)
    # each augmented image is a (flipped) shifted copy: its values come from the image or the zero padding
    pad_value = (0 - torch.tensor(CIFAR_MEAN)) / torch.tensor((0.2470, 0.2435, 0.2616))
    for i in range(8):
        vals = {round(float(v), 4) for v in a[i, 0].reshape(-1)} - {round(float(pad_value[0]), 4)}
        assert vals <= {round(float(v), 4) for v in plain[i, 0].reshape(-1)}


def test_cifar_missing_directory_says_what_was_expected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match=r"does not exist. Expected the extracted 'python version'"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"holds neither layout; expected the extracted 'python version'"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"--data cifar10 needs --data-dir"):
        load_data("cifar10")


def test_cifar_malformed_files_are_rejected(cifar_dir) -> None:  # type: ignore[no-untyped-def]
    root = cifar_dir[0]
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"b'data' must be uint8 of shape \(N, 3072\)"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(ValueError, match=r"must hold keys b'data' and b'labels'"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as fh:
        fh.write(b"not a pickle")
    with pytest.raises(ValueError, match=r"is not a readable pickle"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, fh)
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        load_cifar10(root)


def test_digits_split_is_fixed_and_standardized() -> None:
    a, b = load_digits_data(), load_digits_data()
    assert a.x_train.shape == (1438, 64) and a.x_val.shape == (359, 64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert abs(float(a.x_train.mean())) < 1e-3
    assert set(a.y_train.tolist()) == set(range(10))


def test_synthetic_is_learnable_shape() -> None:
    ds = make_synthetic(num_train=50, num_val=10)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.y_train.max() < 10
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'"):
        load_data("mnist")


def test_worker_sampler_gives_disjoint_batches_and_resumes() -> None:
    s = WorkerSampler(100, workers=4, batch_size=10, seed=0)
    first = s.next()
    assert first.shape == (4, 10) and len(set(first.reshape(-1).tolist())) == 40
    state = s.state_dict()
    t = WorkerSampler(100, workers=4, batch_size=10, seed=123)
    t.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(s.next(), t.next())


# --------------------------------------------------------------------------- class-folder image trees
def _write_tree(root, classes=CIFAR10_CLASSES, n_train=2, n_test=1, fmt="PNG", seed=0):  # type: ignore[no-untyped-def]
    """Random 32x32 RGB images in ``root/{train,test}/<class>/``; returns {split: [(chw uint8, class name)]}."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[np.ndarray, str]]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                hwc = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(hwc).save(folder / f"{i:04d}.{fmt.lower()}", fmt)
                written[split].append((hwc.transpose(2, 0, 1), cls))
    return written


def test_image_tree_decodes_pixels_with_canonical_labels_and_caches(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "cifar"
    # write the classes in reverse to show that labels follow CIFAR-10's order, not the folder order
    written = _write_tree(root, classes=CIFAR10_CLASSES[::-1])
    ds = load_cifar10(root)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8 and ds.x_val.shape == (10, 3, 32, 32)
    assert ds.y_train.tolist() == [c for c in range(10) for _ in range(2)] and ds.y_val.tolist() == list(range(10))
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_val, ds.y_val)):
        for img, cls in written[split]:
            rows = [i for i in range(len(y)) if CIFAR10_CLASSES[int(y[i])] == cls]
            assert any(np.array_equal(x[i].numpy(), img) for i in rows), (split, cls)
    assert (root / ".alq-cache" / CACHE_NAME).is_file()
    # the second load reads the cache; the parent of exactly one tree works too
    monkeypatch.setattr(image_tree, "decode_images", _no_decoding)
    again = load_cifar10(tmp_path)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_val, ds.y_val)
    # a changed tree is decoded again
    monkeypatch.undo()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "extra.png")
    assert load_cifar10(root).x_train.shape[0] == 21


def _no_decoding(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("decoded although the cache is current")


def test_image_tree_jpeg_other_class_names_and_no_cache(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _write_tree(tmp_path, classes=("zebra", "ant", "mole"), fmt="JPEG")
    arrays = load_image_tree(tmp_path, num_classes=3, cache=False, progress=None)
    assert arrays.classes == ("ant", "mole", "zebra")  # sorted folder names
    assert arrays.y_train.tolist() == [0, 0, 1, 1, 2, 2]
    with Image.open(tmp_path / "train" / "mole" / "0001.jpeg") as im:
        np.testing.assert_array_equal(arrays.x_train[3], np.asarray(im).transpose(2, 0, 1))
    assert not (tmp_path / ".alq-cache").exists()


def test_image_tree_cache_falls_back_to_the_user_cache(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "tree"
    _write_tree(root, classes=("a", "b"), n_train=1)
    (root / ".alq-cache").write_text("a file where the cache folder would go, like a read-only data folder")
    monkeypatch.setenv("ALQ_CACHE_DIR", str(tmp_path / "user"))
    first = load_image_tree(root, num_classes=2)
    assert len(list((tmp_path / "user").glob("cifar10-uint8-*.npz"))) == 1
    monkeypatch.setattr(image_tree, "decode_images", _no_decoding)
    assert np.array_equal(load_image_tree(root, num_classes=2).x_test, first.x_test)


def test_image_tree_parallel_decoding_keeps_the_order(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _write_tree(tmp_path, classes=("a", "b"), n_train=70, n_test=0)
    rels = [f"train/{c}/{i:04d}.png" for c in "ab" for i in range(70)]
    one = image_tree.decode_images(str(tmp_path), rels, workers=1)
    two = image_tree.decode_images(str(tmp_path), rels, workers=2)
    np.testing.assert_array_equal(one, two)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no progress bar


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("no-test", FileNotFoundError, r"has no test/ folder; expected DIR/train/<class>/\*.png\|jpg .*fix: add test/"),
        ("nine", ValueError, r"has 9 class folders in train/ \(airplane, .*\); expected 10; fix: one folder per class"),
        ("mismatch", ValueError, r"only in train/: \['truck'\], only in test/: \['lorry'\]; fix: give both splits"),
        ("empty", ValueError, r"test/ship' holds no images; expected at least one .png/.jpg/.jpeg file; fix:"),
        ("stray", ValueError, r"train/dog' holds 1 entries that are not .* \(notes.txt\); .*fix: move them out"),
        ("size", ValueError, r"0000.png' is 32x30 RGB; expected 32x32 RGB \(CIFAR-10\); fix: convert it"),
        ("gray", ValueError, r"0001.png' is 32x32 L; expected 32x32 RGB"),
        ("broken", ValueError, r"0000.png' could not be decoded \(.*\); fix: replace or remove it"),
    ],
)
def test_image_tree_errors_name_the_fix(tmp_path, damage, error, match) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "tree"
    _write_tree(root, n_train=2, n_test=1)
    if damage == "no-test":
        shutil.rmtree(root / "test")
    elif damage == "nine":
        for split in ("train", "test"):
            shutil.rmtree(root / split / "truck")
    elif damage == "mismatch":
        (root / "test" / "truck").rename(root / "test" / "lorry")
    elif damage == "empty":
        (root / "test" / "ship" / "0000.png").unlink()
    elif damage == "stray":
        (root / "train" / "dog" / "notes.txt").write_text("hi")
    elif damage == "size":
        Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(root / "train" / "bird" / "0000.png")
    elif damage == "gray":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "test" / "frog" / "0001.png")
    elif damage == "broken":
        (root / "train" / "cat" / "0000.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(error, match=match):
        load_cifar10(root, cache=False)


def test_a_parent_of_two_trees_is_ambiguous(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("one", "two"):
        (tmp_path / name / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds 2 image trees \(one, two\); expected one; fix: --data-dir"):
        load_cifar10(tmp_path)
