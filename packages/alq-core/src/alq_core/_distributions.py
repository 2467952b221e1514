"""Truncated normal and mixture-of-truncated-normal models of normalized coordinates.

Everything is closed form in the standard normal's ``Phi`` (``scipy.special.ndtr``)
and ``phi``, evaluated so that tails keep their relative precision: a difference
``Phi(b) - Phi(a)`` is taken on the side of zero where both values are small
(reflection), and the interval variance uses a series where the closed form
would cancel (narrow intervals). Let ``xi = (x - mu)/sigma`` and ``[a, b]`` the
standardized truncation interval, ``Z = Phi(b) - Phi(a)``. On ``[alpha, beta]``
the partial moments of the standard normal are::

    M0 = Phi(beta) - Phi(alpha)
    M1 = phi(alpha) - phi(beta)
    M2 = M0 + alpha phi(alpha) - beta phi(beta)
    J  = int (xi - alpha)(beta - xi) phi = beta phi(alpha) - alpha phi(beta) - (1 + alpha beta) M0

and those of a component are ``int x^k f = E[(mu + sigma xi)^k; alpha..beta] / Z``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtr, ndtri

F64 = NDArray[np.float64]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Even terms of the narrow-interval series for ``J`` (enough for |m h| <= 2, h <= 1).
_SERIES_TERMS = 48


def _phi(x: F64) -> F64:
    """Standard normal pdf."""
    return np.exp(-0.5 * x * x) * _INV_SQRT_2PI  # type: ignore[no-any-return]


def std_mass(lo: F64, hi: F64) -> F64:
    """``Phi(hi) - Phi(lo)`` for ``lo <= hi``, accurate in both tails (reflects to the lower one)."""
    flip = (lo + hi) > 0.0
    a = np.where(flip, -hi, lo)
    b = np.where(flip, -lo, hi)
    return ndtr(b) - ndtr(a)  # type: ignore[no-any-return]


def std_interval_var(lo: F64, hi: F64) -> F64:
    """``J(lo, hi) = int_lo^hi (x - lo)(hi - x) phi(x) dx`` for ``lo <= hi`` (standard normal)."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
    h = 0.5 * (hi - lo)
    m = 0.5 * (hi + lo)
    with np.errstate(invalid="ignore", over="ignore"):
        closed = hi * _phi(lo) - lo * _phi(hi) - (1.0 + lo * hi) * std_mass(lo, hi)
        closed = np.where(np.isfinite(lo) & np.isfinite(hi), closed, np.nan)
    # The closed form cancels when the interval is narrow (J ~ h^3 against terms ~ (1 + m^2) h);
    # there, expand phi around the midpoint: J = phi(m) sum_{k even} He_k(m) 4 h^(k+3) / (k! (k+1)(k+3)).
    narrow = (h * np.maximum(1.0, np.abs(m)) <= 0.5) & np.isfinite(m)
    if np.any(narrow):
        hn, mn = h[narrow], m[narrow]
        u_prev = np.zeros_like(hn)
        u = np.ones_like(hn)  # u_k = He_k(m) h^k / k!
        total = np.zeros_like(hn)
        for k in range(2 * _SERIES_TERMS):
            if k % 2 == 0:
                term = u * (4.0 / ((k + 1) * (k + 3)))
                total += term
                if k >= 4 and np.all(np.abs(term) <= 1e-18 * np.abs(total)):
                    break
            u_prev, u = u, (mn * hn * u - hn * hn * u_prev) / (k + 1)
        closed = closed.copy()
        closed[narrow] = _phi(mn) * hn**3 * total
    return np.maximum(closed, 0.0)  # type: ignore[no-any-return]


def _check_interval(low: object, high: object) -> tuple[float, float]:
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            msg = f"`{name}` must be a finite number; got {v!r}"
            raise TypeError(msg) if not isinstance(v, (int, float, np.integer, np.floating)) else ValueError(msg)
    lo, hi = float(low), float(high)  # type: ignore[arg-type]
    if not lo < hi:
        msg = f"`low` must be below `high`; got low={lo}, high={hi}"
        raise ValueError(msg)
    return lo, hi


class _TruncatedNormals:
    """Shared machinery: a weighted mixture of ``K`` normals truncated to ``[low, high]``."""

    low: float
    high: float
    _w: F64
    _mu: F64
    _sigma: F64

    def _setup(self, weights: ArrayLike, means: ArrayLike, stds: ArrayLike, low: object, high: object) -> None:
        self.low, self.high = _check_interval(low, high)
        arrays = []
        for name, v in (("weights", weights), ("means", means), ("stds", stds)):
            try:
                arr = np.array(v, dtype=np.float64, ndmin=1)
            except (TypeError, ValueError) as exc:
                msg = f"`{name}` must be real numbers; got {v!r}"
                raise TypeError(msg) from exc
            if arr.ndim != 1 or arr.size == 0:
                msg = f"`{name}` must be a non-empty 1-D array; got shape {arr.shape}"
                raise ValueError(msg)
            if not np.all(np.isfinite(arr)):
                msg = f"`{name}` must be finite; got {arr.tolist()}"
                raise ValueError(msg)
            arrays.append(arr)
        w, mu, sigma = arrays
        if not w.shape == mu.shape == sigma.shape:
            msg = f"`weights`, `means` and `stds` must have one length; got {w.size}, {mu.size}, {sigma.size}"
            raise ValueError(msg)
        if np.any(w < 0) or not w.sum() > 0:
            msg = f"`weights` must be non-negative with a positive sum; got {w.tolist()}"
            raise ValueError(msg)
        if not np.all(sigma > 0):
            msg = f"`stds` must be positive (a zero std is a point mass, not a model); got {sigma.tolist()}"
            raise ValueError(msg)
        a = (self.low - mu) / sigma
        b = (self.high - mu) / sigma
        z = std_mass(a, b)
        if not np.all(z > 0):
            bad = int(np.argmin(z))
            msg = (
                f"component {bad} (mean {mu[bad]}, std {sigma[bad]}) has no representable mass on "
                f"[{self.low}, {self.high}]; move its mean inside the interval or widen its std"
            )
            raise ValueError(msg)
        self._w = w / w.sum()
        self._mu, self._sigma = mu, sigma
        self._a, self._b, self._z = a, b, z
        self._coef = self._w / z  # weight / mass of each component

    # -- evaluation -------------------------------------------------------------------------------------
    def _xi(self, x: F64) -> F64:
        return (x[..., None] - self._mu) / self._sigma  # type: ignore[no-any-return]

    def _clip(self, x: ArrayLike) -> F64:
        arr = np.asarray(x, dtype=np.float64)
        return np.clip(arr, self.low, self.high)

    def pdf(self, x: ArrayLike) -> F64:
        """Density at ``x`` (any shape, float64 result of the same shape; 0 outside ``[low, high]``)."""
        arr = np.asarray(x, dtype=np.float64)
        inside = (arr >= self.low) & (arr <= self.high)
        val = (_phi(self._xi(arr)) * (self._coef / self._sigma)).sum(axis=-1)
        return np.where(inside, val, 0.0)  # type: ignore[no-any-return]

    def cdf(self, x: ArrayLike) -> F64:
        """Cumulative distribution at ``x`` (any shape; float64 in [0, 1])."""
        xi = self._xi(self._clip(x))
        val = (std_mass(np.broadcast_to(self._a, xi.shape), xi) * self._coef).sum(axis=-1)
        return np.clip(val, 0.0, 1.0)  # type: ignore[no-any-return]

    def _check_bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[F64, F64]:
        lo_a = np.asarray(lo, dtype=np.float64)
        hi_a = np.asarray(hi, dtype=np.float64)
        if np.any(np.isnan(lo_a)) or np.any(np.isnan(hi_a)) or np.any(lo_a > hi_a):
            msg = "interval bounds must satisfy lo <= hi (no NaN); got lo > hi somewhere"
            raise ValueError(msg)
        lo_a, hi_a = np.broadcast_arrays(self._clip(lo_a), self._clip(hi_a))
        return lo_a, hi_a

    def partial_moments(self, lo: ArrayLike, hi: ArrayLike) -> tuple[F64, F64, F64]:
        """``int_lo^hi x^k f(x) dx`` for ``k = 0, 1, 2`` in closed form.

        Parameters
        ----------
        lo, hi : array_like of float
            Interval bounds, broadcast together, ``lo <= hi``; clipped to ``[low, high]``.

        Returns
        -------
        m0, m1, m2 : ndarray of float64, the broadcast shape
        """
        lo_a, hi_a = self._check_bounds(lo, hi)
        al, be = self._xi(lo_a), self._xi(hi_a)
        pa, pb = _phi(al), _phi(be)
        with np.errstate(invalid="ignore"):
            big0 = std_mass(al, be)
            big1 = pa - pb
            big2 = big0 + np.where(pa > 0, al * pa, 0.0) - np.where(pb > 0, be * pb, 0.0)
        mu, s, c = self._mu, self._sigma, self._coef
        m0 = (c * big0).sum(axis=-1)
        m1 = (c * (mu * big0 + s * big1)).sum(axis=-1)
        m2 = (c * (mu * mu * big0 + 2.0 * mu * s * big1 + s * s * big2)).sum(axis=-1)
        return m0, m1, m2

    def interval_variance(self, lo: ArrayLike, hi: ArrayLike) -> F64:
        """``V(lo, hi) = int_lo^hi (x - lo)(hi - x) f(x) dx``: stochastic-rounding variance of one interval.

        Bounds broadcast together, ``lo <= hi``, clipped to ``[low, high]`` for the density only
        (the weight ``(x - lo)(hi - x)`` keeps the given bounds when they lie outside).
        """
        lo_a = np.asarray(lo, dtype=np.float64)
        hi_a = np.asarray(hi, dtype=np.float64)
        if np.any(lo_a < self.low) or np.any(hi_a > self.high):
            # Weight with the true bounds over the clipped support: expand around the clipped ones.
            lo_c, hi_c = self._check_bounds(lo_a, hi_a)
            m0, m1, m2 = self.partial_moments(lo_c, hi_c)
            return -m2 + (lo_a + hi_a) * m1 - lo_a * hi_a * m0  # type: ignore[no-any-return]
        lo_c, hi_c = self._check_bounds(lo_a, hi_a)
        val = std_interval_var(self._xi(lo_c), self._xi(hi_c))
        return (val * (self._coef * self._sigma * self._sigma)).sum(axis=-1)  # type: ignore[no-any-return]

    def rounding_gradients(self, lo: ArrayLike, hi: ArrayLike) -> tuple[F64, F64]:
        """``(int (x - lo) f, int (hi - x) f)`` over ``[lo, hi]``: the two one-sided derivative pieces.

        ``d V(lo, hi) / d hi`` is the first, ``-d V(lo, hi) / d lo`` the second.
        """
        lo_a, hi_a = self._check_bounds(lo, hi)
        al, be = self._xi(lo_a), self._xi(hi_a)
        big0 = std_mass(al, be)
        big1 = _phi(al) - _phi(be)
        cs = self._coef * self._sigma
        up = (cs * np.maximum(big1 - al * big0, 0.0)).sum(axis=-1)
        down = (cs * np.maximum(be * big0 - big1, 0.0)).sum(axis=-1)
        return up, down

    def ppf(self, q: ArrayLike) -> F64:
        """Inverse cdf at probabilities ``q`` in [0, 1] (any shape; float64 in ``[low, high]``)."""
        qa = np.asarray(q, dtype=np.float64)
        if np.any(~((qa >= 0) & (qa <= 1))):
            msg = "`q` must be probabilities in [0, 1]"
            raise ValueError(msg)
        return _bracketed_inverse(self, qa)

    @property
    def weights(self) -> F64:
        """Normalized component weights, float64 ``(K,)``."""
        return self._w.copy()

    @property
    def means(self) -> F64:
        """Component means (of the untruncated normals), float64 ``(K,)``."""
        return self._mu.copy()

    @property
    def stds(self) -> F64:
        """Component standard deviations (of the untruncated normals), float64 ``(K,)``."""
        return self._sigma.copy()

    def sample(self, n: int, rng: np.random.Generator) -> F64:
        """``n`` independent draws (inverse-transform per component), float64 ``(n,)``."""
        comp = rng.choice(self._w.size, size=n, p=self._w)
        u = rng.random(n)
        a, b = self._a[comp], self._b[comp]
        # Sample in the lower tail of the reflected interval for precision.
        flip = (a + b) > 0
        lo = np.where(flip, -b, a)
        hi = np.where(flip, -a, b)
        plo, phi_ = ndtr(lo), ndtr(hi)
        xi = ndtri(plo + u * (phi_ - plo))
        xi = np.clip(np.where(flip, -xi, xi), a, b)
        return np.clip(self._mu[comp] + self._sigma[comp] * xi, self.low, self.high)  # type: ignore[no-any-return]


def _bracketed_inverse(model: _TruncatedNormals, q: F64, guess: F64 | None = None) -> F64:
    """Vectorized safeguarded Newton on ``cdf(x) = q`` inside the bracket ``[low, high]``."""
    shape = q.shape
    qf = q.ravel()
    lo = np.full(qf.shape, model.low)
    hi = np.full(qf.shape, model.high)
    x = _initial_guess(model, qf) if guess is None else np.clip(np.ravel(guess), model.low, model.high)
    tol = 1e-15 * (model.high - model.low)
    for _ in range(200):
        g = model.cdf(x) - qf
        lo = np.where(g <= 0, x, lo)
        hi = np.where(g >= 0, x, hi)
        d = model.pdf(x)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # guarded: bisection below
            newton = x - g / d
        ok = (d > 0) & (newton > lo) & (newton < hi)
        nxt = np.where(ok, newton, 0.5 * (lo + hi))
        step = np.abs(nxt - x)
        x = nxt
        if np.all((step <= tol) | (hi - lo <= tol) | (g == 0)):
            break
    x = np.where(qf <= 0, model.low, np.where(qf >= 1, model.high, x))
    return x.reshape(shape)


def _initial_guess(model: _TruncatedNormals, q: F64) -> F64:
    """Inverse of the most massive component (exact for a single truncated normal)."""
    k = int(np.argmax(model._w))
    a, b, mu, s = model._a[k], model._b[k], model._mu[k], model._sigma[k]
    if a + b > 0:  # reflect into the lower tail for precision
        pa = ndtr(-b)
        xi = -ndtri(pa + (1.0 - q) * model._z[k])
    else:
        pa = ndtr(a)
        xi = ndtri(pa + q * model._z[k])
    return np.clip(mu + s * xi, model.low, model.high)  # type: ignore[no-any-return]


class TruncatedNormal(_TruncatedNormals):
    """A normal ``N(mean, std**2)`` truncated to ``[low, high]`` (the norm-less "-N" model).

    Parameters
    ----------
    mean, std : float
        Of the untruncated normal; ``std > 0``. Means outside ``[low, high]`` work while
        the interval keeps representable mass.
    low, high : float
        The support, ``low < high`` (default ``[-1, 1]``).
    """

    def __init__(self, mean: float, std: float, low: float = -1.0, high: float = 1.0) -> None:
        for name, v in (("mean", mean), ("std", std)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                msg = f"`{name}` must be a real number; got {v!r}"
                raise TypeError(msg)
        self._setup([1.0], [mean], [std], low, high)

    @property
    def mean(self) -> float:
        """Mean of the untruncated normal."""
        return float(self._mu[0])

    @property
    def std(self) -> float:
        """Standard deviation of the untruncated normal."""
        return float(self._sigma[0])

    def __repr__(self) -> str:
        return f"TruncatedNormal(mean={self.mean!r}, std={self.std!r}, low={self.low!r}, high={self.high!r})"


class TruncatedNormalMixture(_TruncatedNormals):
    """A weighted mixture of normals, each truncated to ``[low, high]`` (the norm-based model).

    Parameters
    ----------
    weights : array_like of float, shape (K,)
        Non-negative, positive sum; normalized to sum 1.
    means, stds : array_like of float, shape (K,)
        Of the untruncated normals; ``stds > 0``.
    low, high : float
        The common support, default ``[-1, 1]``.
    """

    def __init__(
        self, weights: ArrayLike, means: ArrayLike, stds: ArrayLike, low: float = -1.0, high: float = 1.0
    ) -> None:
        self._setup(weights, means, stds, low, high)

    @property
    def num_components(self) -> int:
        """``K``."""
        return int(self._w.size)

    def __repr__(self) -> str:
        return f"TruncatedNormalMixture(K={self._w.size}, low={self.low!r}, high={self.high!r})"


Model = TruncatedNormal | TruncatedNormalMixture
