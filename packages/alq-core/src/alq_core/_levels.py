"""Level sets: uniform, exponential, ternary, quantile; and their validation.

A level table is a float32 array of shape ``(L,)``, strictly increasing, with
``levels[0] == -1`` and ``levels[-1] == 1``. Level arithmetic in the quantizer
is float32, so tables are validated after rounding to float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig

MIN_LEVELS = 2
MAX_LEVELS = 256
#: Smallest innermost level an exponential table may have (float32's smallest normal number).
_TINY = float(np.finfo(np.float32).tiny)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        msg = f"`bits` must be an integer in 1..8; got {bits!r}"
        raise ValueError(msg)
    return int(bits)


def uniform_levels(bits: int) -> NDArray[np.float32]:
    """``L = 2**bits`` evenly spaced levels ``-1 + 2k/(L-1)``; float32 ``(L,)``, no zero level."""
    n = 2 ** _check_bits(bits)
    k = np.arange(n, dtype=np.float64)
    return validate_levels(-1.0 + 2.0 * k / (n - 1))


def exponential_levels(bits: int, p: float) -> NDArray[np.float32]:
    """Signed powers of ``p``: magnitudes ``1, p, ..., p**s`` with ``s = 2**(bits-1) - 1``.

    Returns float32 ``(2**bits,)``, sorted; the innermost interval is ``[-p**s, p**s]``.
    """
    bits = _check_bits(bits)
    if not isinstance(p, (int, float, np.floating)) or not 0.0 < float(p) < 1.0:
        msg = f"`p` must be a multiplier in the open interval (0, 1); got {p!r}"
        raise ValueError(msg)
    s = 2 ** (bits - 1) - 1
    mags = float(p) ** np.arange(s, -1, -1, dtype=np.float64)  # p**s ... 1, ascending
    try:
        return validate_levels(np.concatenate([-mags[::-1], mags]))
    except ValueError:
        msg = (
            f"`p` = {p!r} is too small for {bits} bits: p**{s} = {float(p) ** s:.3g} underflows float32 "
            f"and levels collide; use p >= {min_multiplier(bits):.4g}"
        )
        raise ValueError(msg) from None


def min_multiplier(bits: int) -> float:
    """A ``p`` above which the exponential table at ``bits`` stays in float32's normal range.

    Smaller multipliers may still work (subnormal levels, as NUQSGD's ``p = 1/2``
    at 8 bits) until levels round to the same float32 value.
    """
    s = 2 ** (_check_bits(bits) - 1) - 1
    return float(_TINY ** (1.0 / s) * (1 + 1e-12)) if s else 0.0


def ternary_levels() -> NDArray[np.float32]:
    """TernGrad's ``{-1, 0, 1}``; float32 ``(3,)``."""
    return validate_levels(np.array([-1.0, 0.0, 1.0]))


def quantile_levels(bits: int, ppf: Callable[[NDArray[np.float64]], NDArray[np.float64]]) -> NDArray[np.float32]:
    """Levels at the quantiles ``ppf(k/(L-1))`` of a distribution, end points forced to -1 and +1.

    Parameters
    ----------
    bits : int
        1..8; ``L = 2**bits``.
    ppf : callable
        Inverse cdf of the model distribution on [-1, 1], vectorized over float64 arrays.
    """
    n = 2 ** _check_bits(bits)
    q = np.arange(n, dtype=np.float64) / (n - 1)
    levels = np.asarray(ppf(q), dtype=np.float64).copy()
    levels[0], levels[-1] = -1.0, 1.0
    return validate_levels(levels)


def validate_levels(levels: ArrayLike, *, num_levels: int | None = None) -> NDArray[np.float32]:
    """Check a level table and return it as a contiguous float32 array ``(L,)``.

    Raises ``ValueError`` unless the table is one-dimensional with 2..256 entries
    (exactly ``num_levels`` if given), finite, strictly increasing after rounding
    to float32, inside [-1, 1], with ``levels[0] == -1`` and ``levels[-1] == 1``.
    """
    arr = np.asarray(levels)
    if arr.ndim != 1 or not MIN_LEVELS <= arr.shape[0] <= MAX_LEVELS:
        msg = f"levels must be a 1-D array of {MIN_LEVELS}..{MAX_LEVELS} values; got shape {arr.shape}"
        raise ValueError(msg)
    if num_levels is not None and arr.shape[0] != num_levels:
        msg = f"expected {num_levels} levels for this configuration; got {arr.shape[0]}"
        raise ValueError(msg)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        msg = f"levels must be real numbers; got dtype {arr.dtype}"
        raise ValueError(msg)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        msg = f"levels must be finite; got {arr.tolist()}"
        raise ValueError(msg)
    if out[0] != -1.0 or out[-1] != 1.0:
        msg = f"levels must start at -1 and end at 1; got first={float(out[0])}, last={float(out[-1])}"
        raise ValueError(msg)
    if not np.all(np.diff(out) > 0):
        msg = f"levels must be strictly increasing in float32; got {out.tolist()}"
        raise ValueError(msg)
    return out


def default_levels(config: QuantizerConfig) -> NDArray[np.float32]:
    """The level table a method starts with.

    Fixed methods keep it; adaptive methods start from NUQSGD's exponential
    levels (``p = 1/2``) until their first level update, or from QSGDinf's uniform
    levels when they fit the empirical distribution with the max-abs scale (``alq-einf``).
    """
    family = config.spec.levels
    if family == "none":
        msg = "the 'fp32' method has no level table; it sends full precision"
        raise ValueError(msg)
    if family == "uniform" or (config.spec.stats == "empirical" and config.norm == "linf"):
        return uniform_levels(config.bits)
    if family == "ternary":
        return ternary_levels()
    return exponential_levels(config.bits, 0.5)
