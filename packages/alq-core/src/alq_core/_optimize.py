"""Level optimizers: ALQ coordinate descent (SPEC section 7) and AMQ's multiplier (section 8).

ALQ's exact update of a free level ``x`` between its neighbours ``c < x < e`` minimizes the
convex ``h(x) = V(c, x) + V(x, e)``: ``h'(x) = int_c^x (r - c) f - int_x^e (e - r) f`` and
``h'' = (e - c) f >= 0``, so the minimizer solves

    F(x) - F(c) = tau,    tau = int_c^e (e - r) f(r) dr / (e - c),

a monotone equation solved by safeguarded Newton inside the bracket ``[c, e]`` (mass is
measured from ``c`` so tails keep their precision). The three initializations run together,
vectorized, so one sweep costs ``L - 2`` small array evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from scipy.special import ndtr

from ._distributions import TruncatedNormal, TruncatedNormalMixture, _bracketed_inverse
from ._levels import _check_bits, min_multiplier
from ._variance import expected_variance, variance_gradient

F64 = NDArray[np.float64]
Model = TruncatedNormal | TruncatedNormalMixture
AlqUpdate = Literal["exact", "gd"]
AmqUpdate = Literal["bounded", "gd"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: The reference's finite-difference update: steps per level, learning rate, eps fraction.
GD_STEPS, GD_LR, GD_EPS = 10, 1.0, 1e-3
#: The reference's AMQ gradient descent: learning rate, steps, starting points.
AMQ_GD_LR, AMQ_GD_STEPS = 0.7, 40
AMQ_GD_STARTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9)
#: AMQ keeps p inside (eps, 1 - eps).
AMQ_EPS = 1e-6


@dataclass(frozen=True)
class AlqResult:
    """What :func:`alq_levels` found.

    Attributes
    ----------
    levels : ndarray of float64, shape (L,)
        The best table (lowest final variance), ``levels[0] = -1``, ``levels[-1] = 1``.
    variance : float
        Its expected variance under the model.
    init : str
        The initialization it came from (``"quantile"``, ``"uniform"``, ``"exponential"``).
    history : ndarray of float64, shape (epochs + 1, n_inits)
        Variance before the first sweep and after every sweep, per initialization.
    inits : tuple of str
        Names of the columns of ``history``.
    """

    levels: F64
    variance: float
    init: str
    history: F64
    inits: tuple[str, ...]


@dataclass(frozen=True)
class AmqResult:
    """What :func:`amq_multiplier` found: the multiplier ``p``, its variance and its float64 levels."""

    p: float
    variance: float
    levels: F64


def _check_model(model: object) -> Model:
    if not isinstance(model, (TruncatedNormal, TruncatedNormalMixture)):
        msg = f"`model` must be a TruncatedNormal or TruncatedNormalMixture; got {type(model).__name__}"
        raise TypeError(msg)
    if (model.low, model.high) != (-1.0, 1.0):
        msg = f"level optimization needs a model on [-1, 1]; got [{model.low}, {model.high}]"
        raise ValueError(msg)
    return model


def exponential_table(bits: int, p: float | F64) -> F64:
    """Float64 exponential levels (magnitudes ``1, p, ..., p**s`` with both signs), shape ``p.shape + (L,)``."""
    s = 2 ** (bits - 1) - 1
    pa = np.asarray(p, dtype=np.float64)[..., None]
    mags = pa ** np.arange(s, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[..., ::-1], mags], axis=-1)  # type: ignore[no-any-return]


def _uniform_table(bits: int) -> F64:
    n = 2**bits
    return -1.0 + 2.0 * np.arange(n, dtype=np.float64) / (n - 1)  # type: ignore[no-any-return]


def _quantile_table(bits: int, model: Model, mx: _Mixture | None = None) -> F64:
    n = 2**bits
    q = np.arange(n, dtype=np.float64) / (n - 1)
    if mx is None:
        lv = model.ppf(q)
    else:
        lv = _bracketed_inverse(model, q, np.interp(q, mx.grid_f, mx.grid_x))
    lv[0], lv[-1] = -1.0, 1.0
    return _repair(lv)


def _repair(lv: F64) -> F64:
    """Make a table strictly increasing (quantiles of a very peaked model can tie)."""
    out = lv.copy()
    for i in range(1, out.size - 1):
        out[i] = min(max(out[i], np.nextafter(out[i - 1], 2.0)), 1.0)
    for i in range(out.size - 2, 0, -1):
        out[i] = max(min(out[i], np.nextafter(out[i + 1], -2.0)), -1.0)
    if not np.all(np.diff(out) > 0):
        return _uniform_table(round(math.log2(out.size)))
    return out


class _Mixture:
    """Flat arrays of a model for the hot loop."""

    def __init__(self, model: Model) -> None:
        self.mu = model._mu
        self.inv = 1.0 / model._sigma
        self.coef = model._coef
        self.cs = model._coef * model._sigma
        self.cpdf = model._coef * self.inv * _INV_SQRT_2PI
        # A cdf table for Newton's first guess: uniform points plus points around every component.
        offsets = np.linspace(-6.0, 6.0, 13)
        pts = (model._mu[:, None] + model._sigma[:, None] * offsets).ravel()
        grid = np.unique(np.concatenate([np.linspace(-1.0, 1.0, 65), np.clip(pts, -1.0, 1.0)]))
        self.grid_x = grid
        self.grid_f = np.maximum.accumulate(model.cdf(grid))


def _solve_level(mx: _Mixture, c: F64, e: F64, old: F64, warm: bool) -> F64:
    """Exact coordinate update of one free level for every row: minimize V(c, x) + V(x, e)."""
    mu, inv, coef = mx.mu, mx.inv, mx.coef
    al = (c[:, None] - mu) * inv
    be = (e[:, None] - mu) * inv
    pa = np.exp(-0.5 * al * al) * _INV_SQRT_2PI
    pb = np.exp(-0.5 * be * be) * _INV_SQRT_2PI
    # Mass from c to xi, accurate in both tails, with one ndtr per evaluation: T(t) = Phi(-|t|),
    # D = T(xi) - T(al) for xi <= 0, else P - T(xi) with P = Phi(-al) (al >= 0) or 1 - Phi(al).
    t_al = ndtr(-np.abs(al))
    p_al = np.where(al >= 0, t_al, 1.0 - t_al)
    t_be = ndtr(-np.abs(be))
    m0 = np.where(be <= 0, t_be - t_al, p_al - t_be)
    width = e - c
    tau = (mx.cs * np.maximum(be * m0 - pa + pb, 0.0)).sum(axis=1) / width
    total = (coef * m0).sum(axis=1)
    tau = np.minimum(tau, total)
    if warm:
        x = old.copy()
    else:
        fc = np.interp(c, mx.grid_x, mx.grid_f)
        x = np.clip(np.interp(fc + tau, mx.grid_f, mx.grid_x), c, e)
    lo, hi = c.copy(), e.copy()
    tol = 1e-14 * width
    for _ in range(100):
        xi = (x[:, None] - mu) * inv
        t_xi = ndtr(-np.abs(xi))
        left = xi <= 0
        big = np.where(left, t_xi, p_al)
        g = (coef * (big - np.where(left, t_al, t_xi))).sum(axis=1) - tau
        # g is a difference of terms of size ~gtol / 4e-16: smaller residuals are rounding noise.
        gtol = 4e-16 * (coef * big).sum(axis=1)
        d = (mx.cpdf * np.exp(-0.5 * xi * xi)).sum(axis=1)
        lo = np.where(g <= 0, x, lo)
        hi = np.where(g >= 0, x, hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # guarded: bisection below
            newton = x - g / d
        ok = (newton >= lo) & (newton <= hi)
        converged = np.abs(g) <= gtol
        nxt = np.where(converged, x, np.where(ok, newton, 0.5 * (lo + hi)))
        done = converged | (np.abs(nxt - x) <= tol) | (hi - lo <= tol)
        x = nxt
        if done.all():
            break
    # No mass between the neighbours: h is flat, any x is optimal; keep the old level.
    flat = ~(total > 0) | (x <= c) | (x >= e)
    if flat.any():
        x = np.where(flat, np.where((old > c) & (old < e), old, 0.5 * (c + e)), x)
    return x


def _h(model: Model, c: F64, x: F64, e: F64) -> F64:
    return model.interval_variance(c, x) + model.interval_variance(x, e)  # type: ignore[no-any-return]


def _gd_level(model: Model, c: F64, e: F64, x: F64) -> F64:
    """The reference's update: finite-difference gradient steps, projected into (c, e)."""
    eps = GD_EPS * (e - c)
    margin = 1e-6 * (e - c)
    for _ in range(GD_STEPS):
        eps = np.minimum(eps, 0.5 * np.minimum(x - c, e - x))
        grad = (_h(model, c, x + eps, e) - _h(model, c, x - eps, e)) / (2.0 * eps)
        x = np.clip(x - GD_LR * grad, c + margin, e - margin)
    return x


def _sym_solve(model: Model, p: F64, i: int, lv: F64) -> F64:
    """Exact update of positive level ``i`` of a symmetric table (mirror images move with it).

    ``h(x)`` collects the intervals touching ``+-x``; for the innermost level that includes
    ``[-x, x]`` whose both ends move. ``h`` is convex; solve ``h'(x) = 0`` by bisection+secant.
    """
    L = lv.shape[1]
    half = L // 2
    e = lv[:, i + 1]
    inner = i == half

    def dh(x: F64) -> F64:
        _up_e, down_e = model.rounding_gradients(x, e)
        up_m, _down_m = model.rounding_gradients(-e, -x)
        if inner:
            # d/dx int_{-x}^{x} (x + r)(x - r) f = 2x int_{-x}^{x} f
            m0 = model.partial_moments(-x, x)[0]
            return 2.0 * x * m0 - down_e - up_m  # type: ignore[no-any-return]
        c = lv[:, i - 1]
        up_c, _ = model.rounding_gradients(c, x)
        _, down_cm = model.rounding_gradients(-x, -c)
        return up_c + down_cm - down_e - up_m  # type: ignore[no-any-return]

    lo = np.zeros_like(e) if inner else lv[:, i - 1].copy()
    hi = e.copy()
    x = lv[:, i].copy()
    tol = 1e-14 * (hi - lo)
    for _ in range(200):
        g = dh(x)
        lo = np.where(g <= 0, x, lo)
        hi = np.where(g >= 0, x, hi)
        nxt = 0.5 * (lo + hi)
        done = (hi - lo <= tol) | (g == 0)
        x = nxt
        if np.all(done):
            break
    bad = (x <= lo) & (x <= 0)
    return np.where(bad, lv[:, i], x)


def _check_epochs(epochs: object) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        msg = f"`epochs` must be a non-negative integer (the paper uses 30); got {epochs!r}"
        raise ValueError(msg)
    return int(epochs)


def alq_levels(
    model: Model,
    bits: int,
    *,
    epochs: int = 30,
    update: AlqUpdate = "exact",
    inits: tuple[str, ...] = ("quantile", "uniform", "exponential"),
    init_model: Model | None = None,
    sym: bool = False,
    order: Literal["sequential", "red-black"] = "red-black",
    return_result: bool = False,
) -> F64 | AlqResult:
    """ALQ: coordinate descent on the free levels, from several starts; keep the lowest variance.

    Parameters
    ----------
    model : TruncatedNormal or TruncatedNormalMixture
        The distribution of normalized coordinates on [-1, 1].
    bits : int
        1..8, ``L = 2**bits`` levels; ``levels[0] = -1`` and ``levels[-1] = 1`` stay fixed.
    epochs : int
        Gauss-Seidel sweeps over ``l_1 ... l_{L-2}`` (default 30).
    update : {"exact", "gd"}
        Exact minimization of each coordinate (default), or the paper's 10 finite-difference
        gradient steps (lr 1, eps ``(e - c)/1000``), projected into the open interval.
    inits : tuple of str
        Starting tables among ``"quantile"`` (of ``init_model``), ``"uniform"``, ``"exponential"`` (p = 1/2).
    init_model : model, optional
        Distribution whose quantiles start the ``"quantile"`` run (the norm-based mixture in
        training, even for ALQ-N, as in the paper); default ``model``.
    sym : bool
        Keep the table symmetric (``l_{L-1-i} = -l_i``) and optimize the positive half, with
        the innermost interval ``[-l, l]`` counted as one interval (no zero level).
    order : {"sequential", "red-black"}
        Sweep ``i = 1 ... L-2`` in order (SPEC wording), or (default) update all odd levels at once,
        then all even ones (each is still an exact coordinate minimization given its
        neighbours, so the variance still never increases; much faster at many bits).
        Only for ``update="exact"`` without ``sym``.
    return_result : bool
        Return an :class:`AlqResult` (with the per-sweep variance history, computed only
        then, and the chosen start) instead of the levels.

    Returns
    -------
    ndarray of float64, shape (L,), or AlqResult
    """
    model = _check_model(model)
    bits = _check_bits(bits)
    epochs = _check_epochs(epochs)
    if update not in ("exact", "gd"):
        msg = f"`update` must be 'exact' or 'gd'; got {update!r}"
        raise ValueError(msg)
    if order not in ("sequential", "red-black"):
        msg = f"`order` must be 'sequential' or 'red-black'; got {order!r}"
        raise ValueError(msg)
    known = ("quantile", "uniform", "exponential")
    if not inits or any(name not in known for name in inits):
        msg = f"`inits` must be a non-empty tuple of {known}; got {inits!r}"
        raise ValueError(msg)
    L = 2**bits
    mx = _Mixture(model) if update == "exact" and not sym else None
    starts = []
    for name in inits:
        if name == "quantile":
            if init_model is None:
                starts.append(_quantile_table(bits, model, mx))
            else:
                starts.append(_quantile_table(bits, _check_model(init_model)))
        elif name == "uniform":
            starts.append(_uniform_table(bits))
        else:
            starts.append(exponential_table(bits, 0.5))
    lv = np.stack(starts)
    if sym:
        lv = 0.5 * (lv - lv[:, ::-1])  # symmetrize the starts
    track = return_result
    history = np.full((epochs + 1, lv.shape[0]), np.nan)
    if track:
        history[0] = expected_variance(lv, model)
    free = range(L // 2, L - 1) if sym else range(1, L - 1)
    if order == "red-black" and mx is not None:
        odd, even = np.arange(1, L - 1, 2), np.arange(2, L - 1, 2)
        for ep in range(epochs):
            before = lv.copy()
            for idx in (odd, even):
                if idx.size:
                    c, e, old = lv[:, idx - 1].ravel(), lv[:, idx + 1].ravel(), lv[:, idx].ravel()
                    lv[:, idx] = _solve_level(mx, c, e, old, ep > 0).reshape(lv.shape[0], idx.size)
            if track:
                history[ep + 1] = expected_variance(lv, model)
            if ep > 0 and np.array_equal(before, lv):  # a fixed point: later sweeps change nothing
                history[ep + 1 :] = history[ep + 1]
                break
        free = range(0)
        epochs = 0
    for ep in range(epochs):
        before = lv.copy()
        for i in free:
            c, e, old = lv[:, i - 1], lv[:, i + 1], lv[:, i]
            if sym:
                x = _sym_solve(model, lv[:, i], i, lv) if update == "exact" else _sym_gd(model, i, lv)
                lv[:, i] = x
                lv[:, L - 1 - i] = -x
            elif mx is not None:
                lv[:, i] = _solve_level(mx, c, e, old, ep > 0)
            else:
                lv[:, i] = _gd_level(model, c, e, old)
        if track:
            history[ep + 1] = expected_variance(lv, model)
        if mx is not None and ep > 0 and np.array_equal(before, lv):  # exact fixed point: nothing moves again
            history[ep + 1 :] = history[ep + 1]
            break
    if not track:
        history[-1] = expected_variance(lv, model)
    best = int(np.argmin(history[-1]))
    result = AlqResult(
        levels=lv[best].copy(),
        variance=float(history[-1, best]),
        init=inits[best],
        history=history,
        inits=tuple(inits),
    )
    return result if return_result else result.levels


def _sym_gd(model: Model, i: int, lv: F64) -> F64:
    """Finite-difference steps on a symmetric pair ``+-x``, projected into the open interval."""
    L = lv.shape[1]
    lo = np.zeros(lv.shape[0]) if i == L // 2 else lv[:, i - 1]
    e = lv[:, i + 1]
    x = lv[:, i].copy()
    eps = GD_EPS * (e - lo)
    margin = 1e-6 * (e - lo)

    def full(xv: F64) -> F64:
        t = lv.copy()
        t[:, i], t[:, L - 1 - i] = xv, -xv
        return expected_variance(t, model)  # type: ignore[return-value]

    for _ in range(GD_STEPS):
        eps = np.minimum(eps, 0.5 * np.minimum(x - lo, e - x))
        grad = (full(x + eps) - full(x - eps)) / (2.0 * eps)
        x = np.clip(x - GD_LR * grad, lo + margin, e - margin)
    return x


def _p_bounds(bits: int) -> tuple[float, float]:
    return max(AMQ_EPS, min_multiplier(bits)), 1.0 - AMQ_EPS


def amq_multiplier(
    model: Model,
    bits: int,
    *,
    update: AmqUpdate = "bounded",
    previous: float | None = None,
    grid: int = 64,
    return_result: bool = False,
) -> float | AmqResult:
    """AMQ: the exponential multiplier ``p`` in (0, 1) of lowest expected variance.

    Parameters
    ----------
    model : TruncatedNormal or TruncatedNormalMixture
    bits : int
        1..8. The full signed table ``+-1, +-p, ..., +-p**s`` is scored, innermost
        interval ``[-p**s, p**s]`` included. ``p`` stays at or above
        :func:`alq_core._levels.min_multiplier` so the float32 table stays valid.
    update : {"bounded", "gd"}
        A coarse grid to bracket, then bounded Brent on the closed form (default); or the
        paper's gradient descent (lr 0.7, 40 steps from 0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9 and
        ``previous``), projected into the bounds, best final variance kept.
    previous : float, optional
        The previous best ``p`` (an extra start for ``"gd"``; a grid point for ``"bounded"``).
    grid : int
        Points of the bracketing grid (default 64).
    return_result : bool
        Return an :class:`AmqResult` instead of ``p``.
    """
    model = _check_model(model)
    bits = _check_bits(bits)
    if update not in ("bounded", "gd"):
        msg = f"`update` must be 'bounded' or 'gd'; got {update!r}"
        raise ValueError(msg)
    if previous is not None and not (isinstance(previous, (int, float)) and 0.0 < previous < 1.0):
        msg = f"`previous` must be a multiplier in (0, 1) or None; got {previous!r}"
        raise ValueError(msg)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3:
        msg = f"`grid` must be an integer >= 3; got {grid!r}"
        raise ValueError(msg)
    lo, hi = _p_bounds(bits)

    def var(p: float | F64) -> float | F64:
        return expected_variance(exponential_table(bits, p), model)

    if bits == 1:  # the table is {-1, 1} whatever p is
        p = 0.5 if previous is None else float(previous)
    elif update == "bounded":
        ps = np.linspace(lo, hi, grid)
        # Peaked components make narrow basins where a level p**j sits on a component's mean:
        # add those multipliers (for the heaviest components) to the bracketing grid.
        s = 2 ** (bits - 1) - 1
        heavy = np.argsort(-model._w, kind="stable")[:8]
        mags = np.abs(model._mu[heavy])
        mags = mags[(mags > 0) & (mags < 1)]
        if mags.size and s <= 15:
            cand = (mags[:, None] ** (1.0 / np.arange(1, s + 1))).ravel()
            ps = np.unique(np.concatenate([ps, cand[(cand > lo) & (cand < hi)]]))
        if previous is not None:
            ps = np.unique(np.append(ps, np.clip(previous, lo, hi)))
        vs = np.asarray(var(ps))
        k = int(np.argmin(vs))
        a, b = ps[max(k - 1, 0)], ps[min(k + 1, ps.size - 1)]
        res = minimize_scalar(lambda t: float(var(t)), bounds=(a, b), method="bounded", options={"xatol": 1e-12})
        p = float(res.x) if float(res.fun) <= vs[k] else float(ps[k])
    else:
        ps = np.array([*AMQ_GD_STARTS, *([] if previous is None else [previous])], dtype=np.float64)
        ps = np.clip(ps, lo, hi)
        s = 2 ** (bits - 1) - 1
        powers = np.arange(s, -1, -1, dtype=np.float64)
        for _ in range(AMQ_GD_STEPS):
            table = exponential_table(bits, ps)
            g = variance_gradient(table, model)
            # d l / d p for magnitudes p**j (both signs): j p**(j-1), sign of the level
            dmag = powers * ps[:, None] ** np.maximum(powers - 1, 0.0)
            dl = np.concatenate([-dmag[:, ::-1], dmag], axis=1)
            ps = np.clip(ps - AMQ_GD_LR * (g * dl).sum(axis=1), lo, hi)
        vs = np.asarray(var(ps))
        p = float(ps[int(np.argmin(vs))])
    result = AmqResult(p=p, variance=float(var(p)), levels=exponential_table(bits, p))
    return result if return_result else result.p
