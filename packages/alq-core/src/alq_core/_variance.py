"""The objective of SPEC section 6: expected stochastic-rounding variance of a level table.

    Var(l) = sum_j int_{l_j}^{l_{j+1}} (x - l_j)(l_{j+1} - x) f(x) dx

in closed form for the truncated-normal models, and its derivative with respect to
each level::

    dVar/dl_i = int_{l_{i-1}}^{l_i} (x - l_{i-1}) f(x) dx - int_{l_i}^{l_{i+1}} (l_{i+1} - x) f(x) dx

(the first term is absent for ``i = 0``, the second for ``i = L - 1``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._distributions import TruncatedNormal, TruncatedNormalMixture

Model = TruncatedNormal | TruncatedNormalMixture


def _check(levels: ArrayLike, model: object) -> NDArray[np.float64]:
    if not isinstance(model, (TruncatedNormal, TruncatedNormalMixture)):
        msg = f"`model` must be a TruncatedNormal or TruncatedNormalMixture; got {type(model).__name__}"
        raise TypeError(msg)
    arr = np.asarray(levels, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] < 2:
        msg = f"`levels` must have shape (..., L) with L >= 2; got shape {arr.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)) or np.any(np.diff(arr, axis=-1) < 0):
        msg = "`levels` must be finite and non-decreasing along the last axis"
        raise ValueError(msg)
    if np.any(arr[..., 0] != model.low) or np.any(arr[..., -1] != model.high):
        msg = (
            f"`levels` must start at the model's low end {model.low} and stop at its high end {model.high}; "
            f"got first={arr[..., 0].min()}, last={arr[..., -1].max()}"
        )
        raise ValueError(msg)
    return arr


def expected_variance(levels: ArrayLike, model: Model) -> NDArray[np.float64] | float:
    """Expected variance of unbiased stochastic rounding of ``x ~ model`` to ``levels``.

    Parameters
    ----------
    levels : array_like of float, shape (L,) or (..., L)
        Non-decreasing, from the model's ``low`` to its ``high`` (``-1`` and ``1`` by
        default). A batch of tables is evaluated at once.
    model : TruncatedNormal or TruncatedNormalMixture

    Returns
    -------
    float for one table, else float64 ndarray of shape ``levels.shape[:-1]``.
    """
    arr = _check(levels, model)
    per = model.interval_variance(arr[..., :-1], arr[..., 1:])
    out = per.sum(axis=-1)
    return float(out) if arr.ndim == 1 else out


def variance_gradient(levels: ArrayLike, model: Model) -> NDArray[np.float64]:
    """Derivative of :func:`expected_variance` with respect to every level.

    Parameters
    ----------
    levels : array_like of float, shape (L,) or (..., L)
    model : TruncatedNormal or TruncatedNormalMixture

    Returns
    -------
    ndarray of float64, the shape of ``levels``
        Entries for the fixed end levels are included (they are rarely zero).
    """
    arr = _check(levels, model)
    up, down = model.rounding_gradients(arr[..., :-1], arr[..., 1:])
    grad = np.zeros_like(arr)
    grad[..., 1:] += up
    grad[..., :-1] -= down
    return grad
