"""Gradient statistics for level updates (SPEC section 5): per-bucket triples, pooled stats, merge.

Per full bucket ``B`` of ``m >= 2`` coordinates with ``n = ||B||_2 > 0`` the statistics are
``n`` and the mean ``mu_B`` and population standard deviation ``sigma_B`` of ``w = B / n``,
all in float64. Buckets that are all zero, non-finite or shorter than 2 are skipped (and
counted). Statistics keep every usable bucket, so merging the parts of several workers
(concatenation in worker order) gives exactly the statistics of the concatenated samples;
the norm-based model picks its ``dist_num`` largest-norm buckets only when it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._distributions import TruncatedNormal, TruncatedNormalMixture
from ._sketch import LevelSketch, compute_sketch, merge_sketches

Weights = Literal["norm", "norm2"]
_WEIGHTS = ("norm", "norm2")
#: Rows processed at a time by :func:`compute_stats` (bounds the float64 temporaries).
_ROWS = 1 << 20


class DegenerateStatsError(ValueError):
    """The statistics cannot define a model (no usable bucket, zero spread, non-finite values)."""


def _check_options(dist_num: object, weights: object) -> tuple[int, Weights]:
    if isinstance(dist_num, bool) or not isinstance(dist_num, (int, np.integer)) or int(dist_num) < 1:
        msg = f"`dist_num` must be a positive integer (the paper uses 50); got {dist_num!r}"
        raise ValueError(msg)
    if weights not in _WEIGHTS:
        msg = f"`weights` must be 'norm' (the paper's choice) or 'norm2'; got {weights!r}"
        raise ValueError(msg)
    return int(dist_num), weights  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class GradientStats:
    """Per-bucket statistics of gradient samples, the input of a level update.

    Attributes
    ----------
    norms : ndarray of float64, shape (N,)
        L2 norm of each usable bucket.
    means, stds : ndarray of float64, shape (N,)
        Mean and population standard deviation of the bucket's normalized coordinates.
    sizes : ndarray of int64, shape (N,)
        Coordinates per bucket.
    dist_num : int
        Components of the norm-based mixture: the ``dist_num`` largest-norm buckets
        (ties broken by position, earlier first).
    weights : {"norm", "norm2"}
        Mixture weights proportional to the norm (the paper's choice) or its square.
    skipped : int
        Buckets left out (zero norm, non-finite, shorter than 2).
    """

    norms: NDArray[np.float64]
    means: NDArray[np.float64]
    stds: NDArray[np.float64]
    sizes: NDArray[np.int64]
    dist_num: int = 50
    weights: Weights = "norm"
    skipped: int = field(default=0)

    @classmethod
    def from_buckets(
        cls,
        norms: ArrayLike,
        means: ArrayLike,
        stds: ArrayLike,
        sizes: ArrayLike,
        *,
        dist_num: int = 50,
        weights: Weights = "norm",
    ) -> GradientStats:
        """Build statistics from per-bucket arrays (e.g. computed on a GPU), skipping unusable buckets.

        Parameters
        ----------
        norms, means, stds : array_like of float, shape (N,)
            L2 norms and mean / population std of the normalized coordinates ``w = B / ||B||``.
        sizes : array_like of int, shape (N,)
            Coordinates per bucket.
        """
        dist_num, weights = _check_options(dist_num, weights)
        arrays = [np.array(v, dtype=np.float64, ndmin=1).ravel() for v in (norms, means, stds, sizes)]
        n = arrays[0].size
        if any(a.size != n for a in arrays):
            msg = f"`norms`, `means`, `stds` and `sizes` must have one length; got {[a.size for a in arrays]}"
            raise ValueError(msg)
        nrm, mu, sd, sz = arrays
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(nrm) & np.isfinite(mu) & np.isfinite(sd) & (nrm > 0) & (sd >= 0) & (sz >= 2)
        return cls(
            norms=nrm[usable],
            means=mu[usable],
            stds=sd[usable],
            sizes=sz[usable].astype(np.int64),
            dist_num=dist_num,
            weights=weights,
            skipped=int(n - usable.sum()),
        )

    @property
    def num_buckets(self) -> int:
        """Usable buckets ``N``."""
        return int(self.norms.size)

    def pooled(self) -> tuple[float, float]:
        """Norm-less statistics: pooled mean of all ``w`` and pooled within-bucket std.

        ``mean = sum_B m_B mu_B / sum_B m_B``, ``std = sqrt(sum_B m_B sigma_B^2 / sum_B m_B)``.
        Raises :class:`DegenerateStatsError` when there is no usable bucket.
        """
        if self.num_buckets == 0:
            msg = "no usable bucket (all zero, non-finite or shorter than 2 coordinates)"
            raise DegenerateStatsError(msg)
        m = self.sizes.astype(np.float64)
        total = m.sum()
        return float((m * self.means).sum() / total), float(np.sqrt((m * self.stds**2).sum() / total))

    def top_buckets(self) -> NDArray[np.int64]:
        """Indices of the ``dist_num`` largest-norm buckets, largest first, ties by position."""
        order = np.argsort(-self.norms, kind="stable")
        return order[: self.dist_num].astype(np.int64)

    def norm_less_model(self) -> TruncatedNormal:
        """One normal with the pooled mean and within-bucket std, truncated to [-1, 1] (ALQ-N, AMQ-N).

        Raises :class:`DegenerateStatsError` (a ``ValueError``) for no usable bucket or zero spread.
        """
        mean, std = self.pooled()
        if not std > 0 or not np.isfinite(std) or not np.isfinite(mean):
            msg = f"pooled within-bucket std is {std} (mean {mean}); a level update needs spread"
            raise DegenerateStatsError(msg)
        try:
            return TruncatedNormal(mean, std)
        except ValueError as exc:
            raise DegenerateStatsError(str(exc)) from exc

    def norm_based_model(self) -> TruncatedNormalMixture:
        """Mixture of the ``dist_num`` largest-norm buckets' truncated normals (ALQ, AMQ).

        Weights are proportional to the bucket norm (``weights="norm"``) or its square.
        Buckets with zero spread (point masses) are left out of the mixture. Raises
        :class:`DegenerateStatsError` (a ``ValueError``) when nothing usable remains.
        """
        if self.num_buckets == 0:
            msg = "no usable bucket (all zero, non-finite or shorter than 2 coordinates)"
            raise DegenerateStatsError(msg)
        idx = self.top_buckets()
        idx = idx[self.stds[idx] > 0]
        if idx.size == 0:
            msg = "every selected bucket has zero spread (std 0); a level update needs spread"
            raise DegenerateStatsError(msg)
        nrm = self.norms[idx]
        w = nrm / nrm.max()  # scale first: huge norms must not overflow when squared
        if self.weights == "norm2":
            w = w * w
        try:
            return TruncatedNormalMixture(w, self.means[idx], self.stds[idx])
        except ValueError as exc:
            raise DegenerateStatsError(str(exc)) from exc

    def model(self, kind: Literal["norm-based", "norm-less"]) -> TruncatedNormal | TruncatedNormalMixture:
        """The model named by a method's ``spec.stats``."""
        if kind == "norm-based":
            return self.norm_based_model()
        if kind == "norm-less":
            return self.norm_less_model()
        msg = f"`kind` must be 'norm-based' or 'norm-less'; got {kind!r}"
        raise ValueError(msg)

    def to_dict(self) -> dict[str, object]:
        """Plain data (lists, ints, strings) that :meth:`from_dict` restores exactly."""
        return {
            "norms": self.norms.tolist(),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "sizes": self.sizes.tolist(),
            "dist_num": self.dist_num,
            "weights": self.weights,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> GradientStats:
        """Inverse of :meth:`to_dict`."""
        dist_num, weights = _check_options(data["dist_num"], data["weights"])
        return cls(
            norms=np.asarray(data["norms"], dtype=np.float64).reshape(-1),
            means=np.asarray(data["means"], dtype=np.float64).reshape(-1),
            stds=np.asarray(data["stds"], dtype=np.float64).reshape(-1),
            sizes=np.asarray(data["sizes"], dtype=np.int64).reshape(-1),
            dist_num=dist_num,
            weights=weights,
            skipped=int(data["skipped"]),  # type: ignore[call-overload]
        )


def _bucket_stats(
    x: NDArray[np.float64], bucket_size: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], int]:
    rows = x.size // bucket_size
    norms, means, stds = [], [], []
    for start in range(0, rows, max(1, _ROWS // bucket_size)):
        stop = min(rows, start + max(1, _ROWS // bucket_size))
        b = x[start * bucket_size : stop * bucket_size].reshape(stop - start, bucket_size)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            amax = np.max(np.abs(b), axis=1)
            safe = np.where((amax > 0) & np.isfinite(amax), amax, 1.0)
            r = b / safe[:, None]  # scale first: huge values must not overflow when squared
            nrm_r = np.sqrt(np.einsum("ij,ij->i", r, r))
            w = r / nrm_r[:, None]
            mu = w.mean(axis=1)
            dev = w - mu[:, None]
            sd = np.sqrt(np.einsum("ij,ij->i", dev, dev) / bucket_size)
        norms.append(np.where(amax > 0, nrm_r * amax, 0.0))
        means.append(mu)
        stds.append(sd)
    if not norms:
        empty = np.zeros(0)
        return empty, empty, empty, x.size
    return np.concatenate(norms), np.concatenate(means), np.concatenate(stds), x.size - rows * bucket_size


@overload
def compute_stats(
    samples: ArrayLike | Sequence[ArrayLike], bucket_size: int, *, dist_num: int = ..., weights: Weights = ...
) -> GradientStats: ...
@overload
def compute_stats(
    samples: ArrayLike | Sequence[ArrayLike], bucket_size: QuantizerConfig, *, dist_num: int = ..., weights: Weights = ...
) -> GradientStats | LevelSketch: ...
def compute_stats(
    samples: ArrayLike | Sequence[ArrayLike],
    bucket_size: int | QuantizerConfig,
    *,
    dist_num: int = 50,
    weights: Weights = "norm",
) -> GradientStats | LevelSketch:
    """Statistics of the full buckets of one or several flat gradient samples.

    Parameters
    ----------
    samples : array_like, or a list of array_like
        One gradient (any shape, flattened) or a list of them (e.g. several steps or
        workers), each split into buckets of ``bucket_size`` consecutive coordinates.
        The shorter tail bucket of each sample is not used (counted in ``skipped`` as one).
    bucket_size : int or QuantizerConfig
        ``d``; at least 2 for any bucket to be usable. A config instead makes the statistics
        follow its method: a :class:`alq_core.LevelSketch` normalized by the config's bucket
        scale for the empirical-distribution methods (``alq-e``, ``alq-einf``), the paper's
        per-bucket statistics at ``config.bucket_size`` for every other method.
    dist_num : int
        Components of the norm-based model (default 50).
    weights : {"norm", "norm2"}
        Mixture weights proportional to the bucket norm (default) or its square.

    Returns
    -------
    GradientStats, or LevelSketch for a config of an empirical-distribution method
    """
    if isinstance(bucket_size, QuantizerConfig):
        if bucket_size.spec.stats == "empirical":
            return compute_sketch(samples, bucket_size)
        bucket_size = bucket_size.bucket_size
    dist_num, weights = _check_options(dist_num, weights)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)) or bucket_size < 1:
        msg = f"`bucket_size` must be a positive integer; got {bucket_size!r}"
        raise ValueError(msg)
    parts = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    norms, means, stds, sizes, skipped = [], [], [], [], 0
    for part in parts:
        x = np.asarray(part)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            msg = f"samples must be real numbers; got dtype {x.dtype}"
            raise TypeError(msg)
        x = x.astype(np.float64, copy=False).reshape(-1)
        if bucket_size < 2:
            skipped += x.size
            continue
        n, mu, sd, tail = _bucket_stats(x, int(bucket_size))
        norms.append(n)
        means.append(mu)
        stds.append(sd)
        sizes.append(np.full(n.size, int(bucket_size), dtype=np.int64))
        skipped += 1 if tail else 0
    cat = [np.concatenate(v) if v else np.zeros(0) for v in (norms, means, stds, sizes)]
    stats = GradientStats.from_buckets(*cat, dist_num=dist_num, weights=weights)
    return GradientStats(stats.norms, stats.means, stats.stds, stats.sizes, dist_num, weights, stats.skipped + skipped)


@overload
def merge_stats(parts: Sequence[GradientStats]) -> GradientStats: ...
@overload
def merge_stats(parts: Sequence[LevelSketch]) -> LevelSketch: ...
def merge_stats(parts: Sequence[GradientStats] | Sequence[LevelSketch]) -> GradientStats | LevelSketch:
    """Merge the statistics of several workers (in order); exact.

    ``merge_stats([compute_stats(a, d), compute_stats(b, d)])`` equals
    ``compute_stats([a, b], d)``. All parts must share ``dist_num`` and ``weights``
    (per-bucket statistics, concatenated) or norm and bucket size (sketches, summed).
    """
    items = list(parts)
    if items and all(isinstance(p, LevelSketch) for p in items):
        return merge_sketches(items)  # type: ignore[arg-type]
    if not items or not all(isinstance(p, GradientStats) for p in items):
        msg = f"`parts` must be a non-empty list of GradientStats, or of LevelSketch; got {items!r}"
        raise TypeError(msg)
    stats: list[GradientStats] = items  # type: ignore[assignment]
    first = stats[0]
    for p in stats[1:]:
        if (p.dist_num, p.weights) != (first.dist_num, first.weights):
            msg = (
                "all parts must share dist_num and weights; got "
                f"{(first.dist_num, first.weights)} and {(p.dist_num, p.weights)}"
            )
            raise ValueError(msg)
    return GradientStats(
        norms=np.concatenate([p.norms for p in stats]),
        means=np.concatenate([p.means for p in stats]),
        stds=np.concatenate([p.stds for p in stats]),
        sizes=np.concatenate([p.sizes for p in stats]).astype(np.int64),
        dist_num=first.dist_num,
        weights=first.weights,
        skipped=sum(p.skipped for p in stats),
    )
