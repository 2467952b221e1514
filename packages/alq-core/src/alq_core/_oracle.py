"""The level-table oracle: the best table possible for a given gradient, and exact table variances.

For a gradient, a bucket size and a bucket scale, every table of ``L`` levels with ±1 ends
has an exact expected quantization variance ``sum_i s_i^2 (l_{j+1} - v_i)(v_i - l_j)``
(``v_i`` the normalized coordinate the quantizer rounds, ``s_i`` its bucket's scale).
:func:`optimal_levels` finds the table that minimizes it: the physical limit every adaptive
method is measured against. It is exact when the gradient has at most ``grid`` distinct
normalized values and otherwise certified: it returns a table together with a lower bound
on the variance of *every* table, so ``gap`` bounds how far from the optimum it can be.

Cost, for ``n`` coordinates, ``K`` distinct values and ``G = grid``: a sort (``O(n log n)``),
a dynamic program on ``G`` candidates (``O(L G^2)`` time, ``8 G^2`` bytes), exact coordinate
descent over all ``K`` values (``O(K)`` per sweep), and the lower-bound program on ``2G``
positions (``O(L G^2)``, ``32 G^2`` bytes). One CPU core, 3 bits, ``G = 2048``: about 3 s for
a 1M-coordinate gradient.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._empirical import Prefix, descend_levels, dp_levels, dp_lower_bound
from ._levels import validate_levels
from ._quantize import normalized_coordinates
from ._sketch import EDGES, element_weights


@dataclass(frozen=True)
class OptimalLevels:
    """What :func:`optimal_levels` found.

    Attributes
    ----------
    levels : ndarray of float32, shape (L,)
        The best table found; ±1 ends, free levels on normalized coordinates of the data.
    variance : float
        Its exact normalized variance ``E||Q(g) - g||^2 / ||g||^2``.
    lower_bound : float
        No table of ``L`` levels has a lower normalized variance on this data.
    exact : bool
        True when the search covered every distinct value (``variance`` is the optimum).
    seconds : float
        Wall time.
    """

    levels: NDArray[np.float32]
    variance: float
    lower_bound: float
    exact: bool
    seconds: float

    @property
    def gap(self) -> float:
        """``variance / lower_bound - 1``: the certified relative distance from the optimum."""
        if self.lower_bound <= 0:
            return 0.0 if self.variance <= 0 else float("inf")
        return self.variance / self.lower_bound - 1.0


def _weighted_points(
    samples: ArrayLike | Sequence[ArrayLike], config: QuantizerConfig
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    if not isinstance(config, QuantizerConfig) or not config.quantized:
        msg = f"`config` must be a QuantizerConfig of a quantized method; got {config!r}"
        raise ValueError(msg)
    parts: list[ArrayLike] = list(samples) if isinstance(samples, (list, tuple)) else [samples]  # type: ignore[list-item]
    vs, ws = [], []
    for part in parts:
        v, scales = normalized_coordinates(part, config)
        w, _ = element_weights(scales, config.bucket_size, v.size)
        vs.append(v)
        ws.append(w)
    return np.concatenate(vs), np.concatenate(ws)


def _distinct(v: NDArray[np.float32], w: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Distinct values (with the ±1 ends) as edges, their weight sums as bins, and ``sum w v^2``."""
    vals, inv = np.unique(np.concatenate([v, np.array([-1.0, 1.0], np.float32)]), return_inverse=True)
    wv = np.concatenate([w, [0.0, 0.0]])
    v64 = vals.astype(np.float64)
    s0 = np.bincount(inv, wv, vals.size)
    sums = np.stack([s0, s0 * v64, s0 * v64 * v64])
    energy = float(sums[2].sum())
    return v64, sums[:, :-1], energy  # the point at +1 sits on the last edge: it never costs


def empirical_variance(samples: ArrayLike | Sequence[ArrayLike], levels: ArrayLike, config: QuantizerConfig) -> float:
    """Exact normalized variance ``E||Q(g) - g||^2 / ||g||^2`` of a table on a gradient.

    Parameters
    ----------
    samples : array_like, or a list of array_like
        Gradient(s), each flattened and bucketed as ``config`` quantizes it.
    levels : array_like, shape (L,)
        A valid table (ends ±1).
    config : QuantizerConfig
        Bucket size, scale, tail policy and clipping.

    Returns
    -------
    float
        ``sum_i s_i^2 (l_{j+1} - v_i)(v_i - l_j) / sum_i s_i^2 v_i^2`` (NaN for a zero gradient).
    """
    lv = validate_levels(levels).astype(np.float64)
    v, w = _weighted_points(samples, config)
    v64 = v.astype(np.float64)
    j = np.clip(np.searchsorted(lv, v64, side="right") - 1, 0, lv.size - 2)
    var = float(np.dot(w, (lv[j + 1] - v64) * (v64 - lv[j])))
    energy = float(np.dot(w, v64 * v64))
    return var / energy if energy > 0 else float("nan")


def optimal_levels(
    samples: ArrayLike | Sequence[ArrayLike],
    config: QuantizerConfig,
    *,
    grid: int = 2048,
    num_levels: int | None = None,
    refine: int = 3,
) -> OptimalLevels:
    """The variance-minimizing level table for a gradient under ``config``'s bucketing and scale.

    One table is shared by all buckets and each coordinate counts with its bucket's
    ``scale^2``, as in training. Levels are free in ``[-1, 1]`` (ends ±1, unbiased stochastic
    rounding).

    Parameters
    ----------
    samples : array_like, or a list of array_like
        The gradient(s); each flattened and bucketed on its own.
    config : QuantizerConfig
        Bucket size, scale (``norm``), bits, tail policy and clipping. The method itself only
        matters through these.
    grid : int
        Candidate values of the dynamic programs (default 2048); more tightens the bound and
        costs ``O(grid^2)`` memory.
    num_levels : int, optional
        Table size; default ``2**config.bits``.
    refine : int
        Rounds of the lower bound, each adding candidates where the previous bound placed its
        levels (default 3).

    Returns
    -------
    OptimalLevels
        ``exact`` is True when every distinct value was a candidate; otherwise ``gap`` bounds
        the distance from the optimum.

    Raises
    ------
    ValueError
        For a gradient without a finite nonzero coordinate, or ``grid < 16``.
    """
    t0 = time.perf_counter()
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 16:
        msg = f"`grid` must be an integer >= 16 (default 2048); got {grid!r}"
        raise ValueError(msg)
    big_l = int(2**config.bits) if num_levels is None else int(num_levels)
    if big_l < 2:
        msg = f"`num_levels` must be at least 2; got {num_levels!r}"
        raise ValueError(msg)
    v, w = _weighted_points(samples, config)
    edges, sums, energy = _distinct(v, w)
    if not (energy > 0 and np.isfinite(energy)):
        msg = "the gradient has no finite nonzero coordinate; every table has zero variance"
        raise ValueError(msg)
    prefix = Prefix(edges, sums)
    last = edges.size - 1
    if edges.size < big_l:  # fewer distinct values than levels: zero variance
        extra = np.setdiff1d(EDGES, edges)
        fill = extra[np.linspace(0, extra.size - 1, big_l - edges.size).round().astype(np.int64)]
        table = np.unique(np.concatenate([edges, fill])).astype(np.float32)
        return OptimalLevels(table, 0.0, 0.0, True, time.perf_counter() - t0)
    exact = edges.size <= grid
    if exact:
        cand = np.arange(edges.size, dtype=np.int64)
    else:
        cum = np.cumsum(sums[0])
        quant = np.searchsorted(cum, np.linspace(0, cum[-1], grid // 2))
        near_grid = np.searchsorted(edges, EDGES)
        pool = np.unique(np.concatenate([quant, near_grid, [0, last]]))
        pool = pool[(pool >= 0) & (pool <= last)]
        if pool.size > grid:
            inner = pool[1:-1]
            inner = inner[np.unique(np.linspace(0, inner.size - 1, grid - 2).round().astype(np.int64))]
            pool = np.concatenate([[0], inner, [last]])
        cand = pool.astype(np.int64)
    idx = descend_levels(prefix, dp_levels(prefix, big_l, cand))
    variance = prefix.variance(idx) / energy
    lower = variance
    if not exact:  # bound on thinned candidates plus the values next to the levels, refined where it is loose
        half = cand[np.unique(np.linspace(0, cand.size - 1, grid // 2).round().astype(np.int64))]
        width = max(1, (grid - half.size) // (4 * max(1, big_l - 2)))
        window = np.arange(-width, width + 1)
        focus = idx[1:-1]
        for _ in range(refine):
            near = (focus[:, None] + window[None, :]).ravel()
            bound_cand = np.unique(np.concatenate([half, np.clip(near, 0, last), idx[1:-1]]))
            bound, at = dp_lower_bound(prefix, big_l, bound_cand)
            lower = min(variance, bound / energy)
            if lower >= variance * (1 - 1e-9):
                break
            focus = np.concatenate([idx[1:-1], at])
    return OptimalLevels(edges[idx].astype(np.float32), variance, lower, exact, time.perf_counter() - t0)
