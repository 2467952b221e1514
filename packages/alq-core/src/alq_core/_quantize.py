"""Bucketing, scales, stochastic rounding with injected noise, and dequantization.

The arithmetic here is the contract every backend reproduces bit for bit:

* input is converted to float32 (float16 exactly; float64 rounds to nearest);
* a bucket's L2 scale is ``float32(sqrt(sum(float64(x)**2)))``; its L-inf scale
  is ``max(|x|)`` (exact in float32);
* clipping (optional): ``t = float32(clip * std64(x))`` with the population std
  computed in float64, ``x = min(max(x, -t), t)``, then the scale of the clipped
  bucket;
* per bucket, the reciprocal ``r = float32(1 / s)`` (one correctly rounded
  float32 division per bucket), replaced by ``r = 0`` where it is not finite
  (``s == 0``, or ``s`` so small that ``1 / s`` overflows float32);
* ``v = float32(x * r)`` (one rounding, no fused multiply-add), clamped to
  ``[-1, 1]`` (so ``v = 0`` in a zero bucket);
* ``j`` = number of interior levels ``levels[1:-1] <= v``;
* per table, ``inv_gap[j] = float32(1 / float32(levels[j+1] - levels[j]))``
  (float32 subtraction, then one correctly rounded float32 division);
* ``p = float32(float32(v - levels[j]) * inv_gap[j])`` (two roundings, no fused
  multiply-add);
* ``code = j + 1`` if ``u < p`` else ``j``, with ``u`` the float32 noise in [0, 1);
* a non-finite bucket (NaN or Inf scale) gets code 0 everywhere;
* dequantized value ``s * levels[code]`` in float32.

Only two divisions per bucket and ``L - 1`` per table remain: per coordinate
the arithmetic is multiplications, subtractions and comparisons, so every
backend (NumPy, torch, Triton, CUDA) reproduces it bit for bit cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._levels import validate_levels

#: Elements processed per block, so intermediates stay in cache.
_BLOCK = 1 << 16


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized gradient: what goes on the wire, before packing.

    Attributes
    ----------
    codes : ndarray of uint8, shape (m,)
        Level indices in ``[0, L)`` of the ``m = config.num_quantized(n)``
        quantized coordinates.
    scales : ndarray of float32, shape (config.num_buckets(n),)
        One scale per quantized bucket; NaN marks a non-finite bucket.
    tail : ndarray of float32, shape (n - m,)
        Coordinates sent exactly (``tail='full'`` or the ``fp32`` method).
    n : int
        Element count.
    config : QuantizerConfig
        How it was quantized.
    shape : tuple of int
        Shape of the original array (``(n,)`` after :func:`alq_core.decode`).
    """

    codes: NDArray[np.uint8]
    scales: NDArray[np.float32]
    tail: NDArray[np.float32]
    n: int
    config: QuantizerConfig
    shape: tuple[int, ...]

    @property
    def nonfinite_buckets(self) -> int:
        """Number of buckets marked non-finite (NaN scale)."""
        return int(np.count_nonzero(np.isnan(self.scales)))


def _as_float32(x: ArrayLike, name: str = "x") -> NDArray[np.float32]:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        msg = f"`{name}` must be a real floating-point array (float16/32/64); got dtype {arr.dtype}"
        raise TypeError(msg)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.float32)


def bucket_scales(x: NDArray[np.float32], config: QuantizerConfig) -> NDArray[np.float32]:
    """Per-bucket scales of a flat float32 array, before clipping.

    Parameters
    ----------
    x : ndarray of float32, shape (k * config.bucket_size + r,)
        Coordinates to be quantized (the tail bucket of ``r`` coordinates counts
        when ``r > 0``).

    Returns
    -------
    ndarray of float32, shape (ceil(len(x) / bucket_size),)
    """
    d = config.bucket_size
    out = np.empty(-(-x.size // d), dtype=np.float32)
    for b0 in range(0, out.size, max(1, _BLOCK // d)):
        b1 = min(out.size, b0 + max(1, _BLOCK // d))
        seg = x[b0 * d : b1 * d]
        full = seg.size // d
        parts = [seg[: full * d].reshape(full, d)] if full else []
        vals = [_scale_rows(p, config.norm) for p in parts]
        if seg.size % d:
            vals.append(_scale_rows(seg[full * d :].reshape(1, -1), config.norm))
        out[b0:b1] = np.concatenate(vals)
    return out


def _scale_rows(rows: NDArray[np.float32], norm: str) -> NDArray[np.float32]:
    if norm == "linf":
        return np.asarray(np.max(np.abs(rows), axis=1), dtype=np.float32)
    r64 = rows.astype(np.float64)
    with np.errstate(over="ignore"):
        return np.asarray(np.sqrt(np.einsum("ij,ij->i", r64, r64)), dtype=np.float32)


def _clip_rows(rows: NDArray[np.float32], clip: float) -> NDArray[np.float32]:
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite bucket is marked by its scale
        std = rows.astype(np.float64).std(axis=1, keepdims=True)
        t = (clip * std).astype(np.float32)
    return np.asarray(np.minimum(np.maximum(rows, -t), t), dtype=np.float32)


def reciprocal_scales(s: NDArray[np.float32]) -> NDArray[np.float32]:
    """``float32(1 / s)`` per bucket, 0 where that is not finite (zero, tiny or non-finite ``s``).

    Parameters
    ----------
    s : ndarray of float32, shape (k,)

    Returns
    -------
    ndarray of float32, shape (k,)
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = np.asarray(np.float32(1) / np.asarray(s, dtype=np.float32), dtype=np.float32)
    r[~np.isfinite(r)] = np.float32(0)
    return r


def inverse_gaps(levels: NDArray[np.float32]) -> NDArray[np.float32]:
    """``float32(1 / float32(levels[j+1] - levels[j]))`` for ``j`` in ``0 .. L-2``; float32 ``(L-1,)``."""
    gaps = np.diff(np.asarray(levels, dtype=np.float32))
    with np.errstate(divide="ignore", over="ignore"):
        return np.asarray(np.float32(1) / gaps, dtype=np.float32)


def _round_block(
    v: NDArray[np.float32], u: NDArray[np.float32], levels: NDArray[np.float32], inv_gaps: NDArray[np.float32]
) -> NDArray[np.uint8]:
    j = np.searchsorted(levels[1:-1], v, side="right")
    with np.errstate(invalid="ignore", over="ignore"):
        p = (v - levels[j]) * inv_gaps[j]
    return (j + (u < p)).astype(np.uint8)


def _noise(m: int, noise: ArrayLike | None, rng: np.random.Generator | None) -> NDArray[np.float32]:
    if noise is not None:
        if rng is not None:
            msg = "pass either `noise` or `rng`, not both"
            raise ValueError(msg)
        u = np.asarray(noise)
        if u.dtype != np.float32:
            u = u.astype(np.float32)
        u = u.reshape(-1)
        if u.size != m:
            msg = f"`noise` must hold one uniform value per quantized coordinate ({m}); got {u.size}"
            raise ValueError(msg)
        if m and not (float(u.min()) >= 0.0 and float(u.max()) < 1.0):
            msg = "`noise` values must lie in [0, 1); draw them with rng.random(n, dtype=np.float32)"
            raise ValueError(msg)
        return u
    gen = rng if rng is not None else np.random.default_rng()
    if not isinstance(gen, np.random.Generator):
        msg = f"`rng` must be a numpy.random.Generator; got {type(gen).__name__}"
        raise TypeError(msg)
    return gen.random(m, dtype=np.float32)


def quantize(
    x: ArrayLike,
    levels: ArrayLike | None,
    config: QuantizerConfig,
    *,
    noise: ArrayLike | None = None,
    rng: np.random.Generator | None = None,
) -> QuantizedTensor:
    """Quantize an array bucket by bucket with unbiased stochastic rounding.

    Parameters
    ----------
    x : array_like of float16, float32 or float64, any shape
        The gradient; flattened in C order.
    levels : array_like, shape (L,), or None
        The level table (validated); ignored (may be None) for ``fp32``.
    config : QuantizerConfig
    noise : array_like of float32, shape (config.num_quantized(x.size),), optional
        Uniform noise in [0, 1), one value per quantized coordinate, in order.
    rng : numpy.random.Generator, optional
        Draws the noise as ``rng.random(m, dtype=np.float32)`` when ``noise`` is
        not given; a fresh unseeded generator when neither is.

    Returns
    -------
    QuantizedTensor
    """
    if not isinstance(config, QuantizerConfig):
        msg = f"`config` must be a QuantizerConfig; got {type(config).__name__}"
        raise TypeError(msg)
    arr = np.asarray(x)
    shape = tuple(arr.shape)
    flat = _as_float32(arr)
    n = flat.size
    m = config.num_quantized(n)
    if not config.quantized:
        empty_c = np.zeros(0, dtype=np.uint8)
        return QuantizedTensor(empty_c, np.zeros(0, np.float32), flat.copy(), n, config, shape)
    table = validate_levels(levels, num_levels=config.num_levels) if levels is not None else None
    if table is None:
        msg = f"method {config.method!r} needs a level table; got None"
        raise ValueError(msg)
    u = _noise(m, noise, rng)
    body = flat[:m]
    scales = bucket_scales(body, config)
    bad = ~np.isfinite(scales)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        if config.nonfinite == "raise":
            msg = (
                f"bucket {first} (coordinates {first * config.bucket_size}.."
                f"{min(m, (first + 1) * config.bucket_size) - 1}) holds NaN or Inf "
                f"({int(bad.sum())} such buckets); pass nonfinite='propagate' to mark them instead"
            )
            raise ValueError(msg)
    codes = np.empty(m, dtype=np.uint8)
    inv_gaps = inverse_gaps(table)
    for lo, hi, v, bad_el in _normalized_blocks(body, scales, bad, config, table):
        codes[lo:hi] = _round_block(v, u[lo:hi], table, inv_gaps)
        codes[lo:hi][bad_el] = 0
    scales[bad] = np.float32(np.nan)
    tail = flat[m:].copy()
    return QuantizedTensor(codes, scales, tail, n, config, shape)


def _normalized_blocks(
    body: NDArray[np.float32],
    scales: NDArray[np.float32],
    bad: NDArray[np.bool_],
    config: QuantizerConfig,
    table: NDArray[np.float32],
) -> Iterator[tuple[int, int, NDArray[np.float32], NDArray[np.bool_]]]:
    """Yield ``(lo, hi, v, bad_el)`` block by block: the clamped normalized coordinates of ``body[lo:hi]``.

    Applies clipping (rewriting ``scales`` of the clipped buckets in place) and the pinned
    arithmetic of the module docstring; ``bad_el`` marks coordinates of non-finite buckets.
    """
    d = config.bucket_size
    m = body.size
    per = max(1, _BLOCK // d)
    for b0 in range(0, scales.size, per):
        b1 = min(scales.size, b0 + per)
        lo, hi = b0 * d, min(m, b1 * d)
        seg = body[lo:hi]
        s = scales[b0:b1]
        if config.clip is not None:
            seg = _clip_segment(seg, d, float(config.clip))
            s = bucket_scales(seg, config)
            scales[b0:b1] = s
        bad_el = np.repeat(bad[b0:b1], d)[: seg.size]
        r_el = np.repeat(reciprocal_scales(s), d)[: seg.size]
        with np.errstate(invalid="ignore", over="ignore"):
            v = seg * r_el
        np.clip(v, table[0], table[-1], out=v)
        yield lo, hi, v, bad_el


def normalized_coordinates(
    x: ArrayLike, config: QuantizerConfig
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The normalized coordinates the quantizer rounds, and their bucket scales.

    Exactly the ``v`` of the module docstring (clipping applied, clamped to ``[-1, 1]``),
    so statistics and the level-table oracle see what :func:`quantize` sees.

    Parameters
    ----------
    x : array_like of float16, float32 or float64, any shape
        Flattened in C order.
    config : QuantizerConfig
        A quantized method; its bucket size, norm, tail policy and clipping apply.

    Returns
    -------
    v : ndarray of float32, shape (config.num_quantized(x.size),)
        Normalized coordinates in ``[-1, 1]``; 0 in zero buckets and in non-finite buckets.
    scales : ndarray of float32, shape (config.num_buckets(x.size),)
        Each bucket's scale (after clipping); NaN for a bucket holding NaN or Inf.
    """
    if not isinstance(config, QuantizerConfig) or not config.quantized:
        msg = f"`config` must be a QuantizerConfig of a quantized method; got {config!r}"
        raise ValueError(msg)
    flat = _as_float32(np.asarray(x))
    m = config.num_quantized(flat.size)
    body = flat[:m]
    scales = bucket_scales(body, config)
    bad = ~np.isfinite(scales)
    out = np.empty(m, dtype=np.float32)
    unit = np.array([-1.0, 1.0], dtype=np.float32)
    for lo, hi, v, bad_el in _normalized_blocks(body, scales, bad, config, unit):
        v[bad_el] = 0
        out[lo:hi] = v
    scales[bad] = np.float32(np.nan)
    return out, scales


def _clip_segment(seg: NDArray[np.float32], d: int, clip: float) -> NDArray[np.float32]:
    full = seg.size // d
    out = np.empty_like(seg)
    if full:
        out[: full * d] = _clip_rows(seg[: full * d].reshape(full, d), clip).reshape(-1)
    if seg.size % d:
        out[full * d :] = _clip_rows(seg[full * d :].reshape(1, -1), clip).reshape(-1)
    return out


def dequantize(q: QuantizedTensor, levels: ArrayLike | None) -> NDArray[np.float32]:
    """Rebuild the array: ``scale * levels[code]`` per coordinate, exact tail appended.

    Returns
    -------
    ndarray of float32, shape ``q.shape``
    """
    config = q.config
    if not config.quantized:
        return q.tail.reshape(q.shape).copy()
    table = validate_levels(levels, num_levels=config.num_levels) if levels is not None else None
    if table is None:
        msg = f"method {config.method!r} needs the level table to dequantize; got None"
        raise ValueError(msg)
    m = q.codes.size
    s_el = np.repeat(q.scales, config.bucket_size)[:m]
    out = np.empty(q.n, dtype=np.float32)
    out[:m] = s_el * table[q.codes]
    out[m:] = q.tail
    return out.reshape(q.shape)
