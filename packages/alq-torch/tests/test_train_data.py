"""Data of the harness: digits split, CIFAR-10 python batches (generated in the exact format), synthetic."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from alq_torch.train.data import CIFAR_MEAN, WorkerSampler, load_cifar10, load_data, load_digits_data, make_synthetic


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
    with pytest.raises(FileNotFoundError, match=r"data_batch_1' is missing"):
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
