"""Slow reference implementations: plain loops, one coordinate at a time.

They follow SPEC.md literally and share no code with the fast paths, so the
fast NumPy core (and every backend) can be compared against them.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import QuantizerConfig


def _f32(v: float) -> np.float32:
    return np.float32(v)


def reference_quantize(
    x: ArrayLike, levels: ArrayLike, config: QuantizerConfig, noise: ArrayLike
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.float32]]:
    """Quantize coordinate by coordinate.

    Returns
    -------
    codes : uint8 (m,), scales : float32 (num_buckets,), tail : float32 (n - m,)
    """
    flat = np.asarray(x).reshape(-1).astype(np.float32)
    table = [np.float32(v) for v in np.asarray(levels, dtype=np.float32)]
    u = np.asarray(noise, dtype=np.float32).reshape(-1)
    d = config.bucket_size
    m = config.num_quantized(flat.size)
    codes: list[int] = []
    scales: list[np.float32] = []
    for start in range(0, m, d):
        bucket = [flat[i] for i in range(start, min(m, start + d))]
        if config.clip is not None:
            mean = math.fsum(float(b) for b in bucket) / len(bucket)
            var = math.fsum((float(b) - mean) ** 2 for b in bucket) / len(bucket)
            t = _f32(float(config.clip) * math.sqrt(var))
            bucket = [min(max(b, -t), t) for b in bucket]
        if config.norm == "linf":
            s = max(abs(b) for b in bucket)
        else:
            s = _f32(math.sqrt(math.fsum(float(b) ** 2 for b in bucket)))
        if not math.isfinite(float(s)):
            scales.append(_f32(math.nan))
            codes.extend([0] * len(bucket))
            continue
        scales.append(_f32(s))
        with np.errstate(over="ignore"):  # float64 results rounded to float32 are correctly rounded
            r = _f32(1.0 / float(s)) if s != 0 else np.float32(0.0)
        if not math.isfinite(float(r)):
            r = np.float32(0.0)
        for k, b in enumerate(bucket):
            v = _f32(float(b) * float(r))  # the float64 product of two float32 is exact: one rounding
            v = min(max(v, table[0]), table[-1])
            j = 0
            while j + 2 < len(table) and table[j + 1] <= v:
                j += 1
            gap = _f32(float(table[j + 1]) - float(table[j]))
            with np.errstate(over="ignore"):
                inv_gap = _f32(1.0 / float(gap))
            p = _f32(float(_f32(float(v) - float(table[j]))) * float(inv_gap))
            codes.append(j + 1 if u[start + k] < p else j)
    return (
        np.array(codes, dtype=np.uint8),
        np.array(scales, dtype=np.float32),
        flat[m:].copy(),
    )


def reference_pack(codes: ArrayLike, bits: int) -> bytes:
    """Pack codes bit by bit: bit ``t`` of code ``k`` goes to stream bit ``bits*k + t``."""
    c = [int(v) for v in np.asarray(codes).reshape(-1)]
    nbytes = -(-len(c) // 8) * bits
    out = bytearray(nbytes)
    for k, code in enumerate(c):
        for t in range(bits):
            if code >> t & 1:
                pos = bits * k + t
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


def reference_unpack(packed: bytes, bits: int, count: int) -> NDArray[np.uint8]:
    """Inverse of :func:`reference_pack`, bit by bit."""
    codes = []
    for k in range(count):
        code = 0
        for t in range(bits):
            pos = bits * k + t
            code |= (packed[pos // 8] >> (pos % 8) & 1) << t
        codes.append(code)
    return np.array(codes, dtype=np.uint8)
