"""Assertion helpers that say what differs, where, and by how much."""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    elif hasattr(a, "get") and not isinstance(a, (np.ndarray, dict)):
        a = a.get()
    return np.asarray(a)


def assert_quantized_equal(actual: Any, expected: Any) -> None:
    """Codes, scales (NaN == NaN) and exact tails equal, element for element.

    Accepts any objects with ``codes``, ``scales``, ``tail`` and ``n`` (NumPy,
    torch or CuPy arrays).
    """
    if actual.n != expected.n:
        msg = f"element counts differ: {actual.n} != {expected.n}"
        raise AssertionError(msg)
    for name in ("codes", "scales", "tail"):
        a, e = _np(getattr(actual, name)), _np(getattr(expected, name))
        if a.shape != e.shape:
            msg = f"{name} shapes differ: {a.shape} != {e.shape}"
            raise AssertionError(msg)
        same = (a == e) | (np.isnan(a) & np.isnan(e)) if a.dtype.kind == "f" else a == e
        if not np.all(same):
            bad = np.flatnonzero(~same)
            msg = (
                f"{name} differ at {bad.size} of {a.size} positions; first {bad[:5].tolist()}: "
                f"actual {a[bad[:5]].tolist()} expected {e[bad[:5]].tolist()}"
            )
            raise AssertionError(msg)


def assert_payloads_equal(actual: Any, expected: Any) -> None:
    """Two payloads are the same bytes; the message names the first differing offset."""
    a = np.frombuffer(bytes(actual), dtype=np.uint8) if isinstance(actual, (bytes, bytearray)) else _np(actual)
    e = np.frombuffer(bytes(expected), dtype=np.uint8) if isinstance(expected, (bytes, bytearray)) else _np(expected)
    a, e = a.reshape(-1).astype(np.uint8), e.reshape(-1).astype(np.uint8)
    if a.size != e.size:
        msg = f"payload sizes differ: {a.size} != {e.size} bytes"
        raise AssertionError(msg)
    diff = np.flatnonzero(a != e)
    if diff.size:
        i = int(diff[0])
        msg = f"payloads differ in {diff.size} bytes; first at offset {i}: {a[i]:#04x} != {e[i]:#04x}"
        raise AssertionError(msg)
