"""The level sketch: an exactly mergeable, fixed-size summary of the normalized coordinates.

The methods ``alq-e`` (L2 bucket scale) and ``alq-einf`` (max-abs scale) fit their levels
to the *empirical* distribution of the normalized coordinates ``v = x / s`` that the
quantizer rounds, each weighted by its bucket's ``s^2`` (a bucket's variance scales with
``s^2``). The sketch holds, per bin of a fixed grid on ``[-1, 1]``, the sums
``S0 = sum s^2``, ``S1 = sum s^2 v``, ``S2 = sum s^2 v^2`` in float64: sums merge across
workers by addition, and the objective of any table whose levels sit on grid edges is exact
(:mod:`alq_core._empirical`).

The grid is dense near zero, like a float with a 5-bit mantissa: magnitudes
``2^e (1 + k/32)`` for ``e = -20 .. -1`` and ``k = 0 .. 31``, plus ``0`` and ``1``, with both
signs: 1283 edges, 1282 bins, adjacent edges at most 3.2 % apart. A coordinate's bin comes
from the bits of ``float32(|v|)`` alone (exponent and the top 5 mantissa bits), so every
backend bins identically::

    bits = float32_bits(|v|);  e = bits >> 23
    m = 0 if e < 107 else min(1 + (e - 107) * 32 + ((bits >> 18) & 31), 640)
    bin = 641 + m if v >= 0 else 640 - m        (v = -0.0 counts as >= 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._quantize import normalized_coordinates

#: Octaves of the grid below 1 and bins per octave.
OCTAVES = 20
PER_OCTAVE = 32
#: Magnitude bins: one underflow bin [0, 2^-20) and OCTAVES * PER_OCTAVE above.
MAG_BINS = 1 + OCTAVES * PER_OCTAVE
#: Signed bins of the sketch.
NUM_BINS = 2 * MAG_BINS
#: Biased float32 exponent of 2^-OCTAVES.
_EXP0 = 127 - OCTAVES


def _magnitude_edges() -> NDArray[np.float64]:
    e = np.arange(-OCTAVES, 0, dtype=np.float64).repeat(PER_OCTAVE)
    k = np.tile(np.arange(PER_OCTAVE, dtype=np.float64), OCTAVES)
    return np.concatenate([[0.0], np.ldexp(1.0 + k / PER_OCTAVE, e.astype(np.int64)), [1.0]])


_MAG = _magnitude_edges()
#: The grid's 1283 edges, float64 (each exactly a float32), from -1 to 1.
EDGES: NDArray[np.float64] = np.concatenate([-_MAG[:0:-1], _MAG])


def sketch_bins(v: NDArray[np.float32]) -> NDArray[np.int64]:
    """Bin index in ``0 .. NUM_BINS-1`` of each normalized coordinate (float32, any shape)."""
    a = np.abs(np.asarray(v, dtype=np.float32)).view(np.int32).astype(np.int64)
    e = a >> 23
    m = np.where(e < _EXP0, 0, np.minimum(1 + (e - _EXP0) * PER_OCTAVE + ((a >> 18) & (PER_OCTAVE - 1)), MAG_BINS - 1))
    neg = np.asarray(v) < 0
    return np.where(neg, MAG_BINS - 1 - m, MAG_BINS + m)


@dataclass(frozen=True, eq=False)
class LevelSketch:
    """Weighted sums of normalized coordinates per grid bin: the statistics of ``alq-e`` / ``alq-einf``.

    Attributes
    ----------
    sums : ndarray of float64, shape (3, NUM_BINS)
        Per bin: ``sum s^2``, ``sum s^2 v``, ``sum s^2 v^2`` over the coordinates in it.
    norm : {"l2", "linf"}
        The bucket scale the coordinates were normalized by.
    bucket_size : int
        Coordinates per bucket.
    count : int
        Coordinates summarized.
    skipped : int
        Buckets left out (NaN or Inf).
    """

    sums: NDArray[np.float64]
    norm: str
    bucket_size: int
    count: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        sums = np.asarray(self.sums, dtype=np.float64)
        if sums.shape != (3, NUM_BINS):
            msg = f"`sums` must have shape (3, {NUM_BINS}); got {sums.shape}"
            raise ValueError(msg)
        object.__setattr__(self, "sums", sums)
        if self.norm not in ("l2", "linf"):
            msg = f"`norm` must be 'l2' or 'linf'; got {self.norm!r}"
            raise ValueError(msg)

    @classmethod
    def from_sums(
        cls, sums: ArrayLike, config: QuantizerConfig, *, count: int = 0, skipped: int = 0
    ) -> LevelSketch:
        """A sketch from per-bin sums computed elsewhere (a GPU backend), for ``config``'s scale."""
        return cls(np.asarray(sums, dtype=np.float64).reshape(3, NUM_BINS), config.norm, config.bucket_size, count, skipped)

    @property
    def key(self) -> tuple[str, int]:
        """``(norm, bucket_size)``: sketches merge and fit only within one key."""
        return (self.norm, self.bucket_size)

    @property
    def total_weight(self) -> float:
        """``sum s^2`` over all coordinates (0 when nothing usable was seen)."""
        return float(self.sums[0].sum())

    def check(self, config: QuantizerConfig) -> None:
        """Raise ``ValueError`` when this sketch was built for another scale or bucket size than ``config``."""
        if self.key != (config.norm, config.bucket_size):
            msg = (
                f"the sketch was built with norm={self.norm!r}, bucket_size={self.bucket_size}; "
                f"the quantizer uses norm={config.norm!r}, bucket_size={config.bucket_size}: "
                "build the statistics with compute_stats(g, config) for this config"
            )
            raise ValueError(msg)

    def to_dict(self) -> dict[str, object]:
        """Plain data that :meth:`from_dict` restores exactly."""
        return {
            "kind": "sketch",
            "sums": self.sums.tolist(),
            "norm": self.norm,
            "bucket_size": self.bucket_size,
            "count": self.count,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LevelSketch:
        """Inverse of :meth:`to_dict`."""
        return cls(
            np.asarray(data["sums"], dtype=np.float64),
            str(data["norm"]),
            int(data["bucket_size"]),  # type: ignore[call-overload]
            int(data["count"]),  # type: ignore[call-overload]
            int(data["skipped"]),  # type: ignore[call-overload]
        )


def bin_sums(v: NDArray[np.float32], weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per-bin ``sum w``, ``sum w v``, ``sum w v^2``: float64 ``(3, NUM_BINS)``.

    Parameters
    ----------
    v : ndarray of float32, shape (m,)
        Normalized coordinates in ``[-1, 1]``.
    weights : ndarray of float64, shape (m,)
    """
    idx = sketch_bins(v)
    v64 = v.astype(np.float64)
    wv = weights * v64
    return np.stack(
        [
            np.bincount(idx, weights, NUM_BINS),
            np.bincount(idx, wv, NUM_BINS),
            np.bincount(idx, wv * v64, NUM_BINS),
        ]
    )


def element_weights(scales: NDArray[np.float32], bucket_size: int, m: int) -> tuple[NDArray[np.float64], int]:
    """``s^2`` per coordinate (float64 ``(m,)``, 0 in non-finite buckets) and the count of those buckets."""
    s = scales.astype(np.float64)
    bad = ~np.isfinite(s)
    s[bad] = 0.0
    return np.repeat(s * s, bucket_size)[:m], int(bad.sum())


def compute_sketch(samples: ArrayLike | Sequence[ArrayLike], config: QuantizerConfig) -> LevelSketch:
    """The sketch of one or several flat gradient samples, normalized as ``config`` quantizes them.

    Each sample is bucketed on its own (like :func:`alq_core.compute_stats`); every quantized
    coordinate counts, the tail bucket included unless ``config.tail == 'full'``. Buckets
    holding NaN or Inf are left out and counted in ``skipped``.
    """
    parts = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    sums = np.zeros((3, NUM_BINS), dtype=np.float64)
    count = skipped = 0
    for part in parts:
        x = np.asarray(part)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            msg = f"samples must be real numbers; got dtype {x.dtype}"
            raise TypeError(msg)
        v, scales = normalized_coordinates(x, config)
        w, bad = element_weights(scales, config.bucket_size, v.size)
        sums += bin_sums(v, w)
        count += v.size
        skipped += bad
    return LevelSketch(sums, config.norm, config.bucket_size, count, skipped)


def merge_sketches(parts: Sequence[LevelSketch]) -> LevelSketch:
    """Sum the sketches of several workers; equals the sketch of the concatenated samples."""
    parts = list(parts)
    first = parts[0]
    for p in parts[1:]:
        if p.key != first.key:
            msg = f"sketches must share norm and bucket size to merge; got {first.key} and {p.key}"
            raise ValueError(msg)
    return LevelSketch(
        np.sum([p.sums for p in parts], axis=0),
        first.norm,
        first.bucket_size,
        sum(p.count for p in parts),
        sum(p.skipped for p in parts),
    )


#: Candidate edges of the coarse dynamic program that starts a fit (the descent then uses all).
COARSE = 256


def sketch_variance(sketch: LevelSketch, levels: ArrayLike) -> float:
    """Normalized objective ``Var / sum s^2 v^2`` of a level table on the sketch.

    Exact when every level sits on a grid edge (tables fitted from sketches do); a bin that
    straddles a level is counted as a point at its weighted mean.
    """
    lv = np.asarray(levels, dtype=np.float64)
    s0, s1, s2 = sketch.sums
    energy = float(s2.sum())
    if not energy > 0:
        return float("nan")
    lo_e, hi_e = EDGES[:-1], EDGES[1:]
    j = np.clip(np.searchsorted(lv, lo_e, side="right") - 1, 0, lv.size - 2)
    inside = hi_e <= lv[j + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(s0 > 0, s1 / np.where(s0 > 0, s0, 1.0), 0.0)
    jc = np.clip(np.searchsorted(lv, c, side="right") - 1, 0, lv.size - 2)
    jj = np.where(inside, j, jc)
    lo, hi = lv[jj], lv[jj + 1]
    exact = -s2 + (lo + hi) * s1 - lo * hi * s0
    approx = s0 * (hi - c) * (c - lo)
    return float(np.maximum(np.where(inside, exact, approx), 0.0).sum() / energy)


def _edge_index(levels: NDArray[np.float64]) -> NDArray[np.int64] | None:
    idx = np.searchsorted(EDGES, levels)
    if np.all(idx < EDGES.size) and np.array_equal(EDGES[np.minimum(idx, EDGES.size - 1)], levels):
        return idx.astype(np.int64)
    return None


def fit_sketch(
    sketch: LevelSketch, num_levels: int, previous: ArrayLike | None = None
) -> tuple[NDArray[np.float32], float]:
    """The level table of ``num_levels`` levels (ends ±1, on grid edges) fitted to a sketch.

    A dynamic program over at most :data:`COARSE` candidate edges (the edges next to a
    non-empty bin, thinned evenly) finds the best coarse table; exact coordinate descent
    over every edge refines it, and refines ``previous`` too when it sits on edges; the
    better result is returned. Empty runs of bins need no candidates inside: a level there
    is never better than at the run's ends (the objective is linear across it).

    Returns
    -------
    levels : ndarray of float32, shape (num_levels,)
    variance : float
        Its normalized objective on the sketch.

    Raises
    ------
    ValueError
        When the sketch holds no weight (nothing to fit).
    """
    from ._empirical import Prefix, descend_levels, dp_levels

    s0 = sketch.sums[0]
    if not (np.all(np.isfinite(sketch.sums)) and s0.sum() > 0 and sketch.sums[2].sum() > 0):
        msg = "the sketch holds no finite, nonzero coordinates; a level update needs some"
        raise ValueError(msg)
    prefix = Prefix(EDGES, sketch.sums)
    last = EDGES.size - 1
    busy = s0 > 0
    active = np.zeros(EDGES.size, dtype=bool)
    active[:-1] |= busy
    active[1:] |= busy
    active[[0, last]] = True
    cand = np.flatnonzero(active)
    if cand.size < num_levels:  # too few distinct places: any edges will do
        cand = np.arange(EDGES.size)
    if cand.size > COARSE:
        inner = cand[1:-1]
        pick = np.unique(np.linspace(0, inner.size - 1, COARSE - 2).round().astype(np.int64))
        coarse = np.concatenate([[0], inner[pick], [last]])
    else:
        coarse = cand
    starts = [dp_levels(prefix, num_levels, coarse)]
    if previous is not None:
        prev = _edge_index(np.asarray(previous, dtype=np.float64))
        if prev is not None and prev.size == num_levels:
            starts.append(prev)
    results = [descend_levels(prefix, s) for s in starts]
    values = [prefix.variance(r) for r in results]
    best = results[int(np.argmin(values))]
    return EDGES[best].astype(np.float32), min(values) / prefix.energy
