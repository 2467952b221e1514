"""Measured quantization error of simulated workers: where the error lands, and what the optimizer sees.

The normalized variance ``||Q(g) - g||^2 / ||g||^2`` alone does not predict
accuracy: an L2-scaled quantizer with tiny levels can have a low variance and
still wreck the few largest coordinates (which carry much of the gradient's
energy), while a max-abs-scaled one keeps them. :func:`error_metrics` measures,
on one step's worker gradients ``(K, n)`` and their dequantized versions:

* ``variance``: ``mean_k ||Q(g_k) - g_k||^2 / ||g_k||^2``;
* ``top_error``: the same ratio restricted to the largest ``fraction`` (1%) of
  each worker's coordinates by magnitude;
* ``top_share``: the share of each worker's error energy on those coordinates;
* ``avg_error``: ``||mean_k Q(g_k) - mean_k g_k||^2 / ||mean_k g_k||^2``, the
  error of the averaged update the optimizer actually applies;
* per-layer ratios when the flat layout ``[(name, numel), ...]`` is given.

Everything is vectorized torch (one ``topk`` and a few reductions over the
``(K, n)`` arrays; per-layer sums through one ``index_add_``), cheap enough for
log steps on a GPU. Per-worker ratios average over the workers whose
denominator is nonzero; with none, a ratio is 0 when there is no error and NaN
otherwise (undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Default share of coordinates counted as "top" (largest magnitudes) per worker.
TOP_FRACTION = 0.01


def top_count(n: int, fraction: float = TOP_FRACTION) -> int:
    """Coordinates in the top set of an ``n``-vector: ``max(1, ceil(fraction * n))`` (0 when ``n == 0``)."""
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) <= 1.0):
        msg = f"`fraction` must be a number in (0, 1]; got {fraction!r}"
        raise ValueError(msg)
    if n <= 0:
        return 0
    return max(1, math.ceil(float(fraction) * n))


def top_mask(grads: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """Boolean mask of each row's largest-magnitude coordinates.

    Parameters
    ----------
    grads : Tensor, shape (K, n)
    fraction : float in (0, 1]
        Row ``k`` marks its :func:`top_count` ``(n, fraction)`` coordinates of
        largest ``|grads[k]|`` (ties broken by ``torch.topk``).

    Returns
    -------
    Tensor of bool, shape (K, n)
    """
    if grads.ndim != 2:
        msg = f"`grads` must have shape (K, n); got {tuple(grads.shape)}"
        raise ValueError(msg)
    m = top_count(int(grads.shape[1]), fraction)
    mask = torch.zeros(grads.shape, dtype=torch.bool, device=grads.device)
    if m > 0:
        idx = torch.topk(grads.abs(), m, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def _ratio(num: Tensor, den: Tensor) -> float:
    """Mean of ``num / den`` over entries with ``den > 0``; 0 (no error) or NaN when there are none."""
    ok = den > 0
    if bool(ok.any()):
        return float((num[ok] / den[ok]).mean())
    return 0.0 if not bool((num != 0).any()) else float("nan")


@dataclass(frozen=True, eq=False)
class ErrorMetrics:
    """What :func:`error_metrics` measured on one step.

    Attributes
    ----------
    variance : float
        ``mean_k ||Q(g_k) - g_k||^2 / ||g_k||^2`` (workers with ``g_k != 0``).
    top_error : float
        ``mean_k ||(Q(g_k) - g_k)[T_k]||^2 / ||g_k[T_k]||^2`` with ``T_k`` the top
        ``fraction`` of worker ``k``'s coordinates by magnitude.
    top_share : float
        ``mean_k ||(Q(g_k) - g_k)[T_k]||^2 / ||Q(g_k) - g_k||^2`` (workers with a
        nonzero error; NaN when no worker has any error).
    avg_error : float
        ``||mean_k Q(g_k) - mean_k g_k||^2 / ||mean_k g_k||^2``.
    fraction : float
        The top fraction used.
    layer_names : tuple of str
        Names of the layers (empty when no layout was given).
    layer_error_sq : numpy.ndarray of float64, shape (K, len(layer_names))
        ``||(Q(g_k) - g_k)[layer]||^2`` per worker and layer.
    layer_norm_sq : numpy.ndarray of float64, shape (K, len(layer_names))
        ``||g_k[layer]||^2`` per worker and layer.
    """

    variance: float
    top_error: float
    top_share: float
    avg_error: float
    fraction: float = TOP_FRACTION
    layer_names: tuple[str, ...] = ()
    layer_error_sq: np.ndarray | None = None
    layer_norm_sq: np.ndarray | None = None

    @property
    def layers(self) -> dict[str, float]:
        """Layer name -> ``mean_k ||(Q(g_k) - g_k)[layer]||^2 / ||g_k[layer]||^2`` (empty without a layout)."""
        return {name: self.group_error([name]) for name in self.layer_names}

    def group_error(self, names: Sequence[str]) -> float:
        """Relative error of the union of the named layers, pooled within each worker, averaged over workers.

        ``mean_k sum_{l in names} ||(Q(g_k) - g_k)[l]||^2 / sum_{l in names} ||g_k[l]||^2``;
        NaN for an empty selection.
        """
        if self.layer_error_sq is None or self.layer_norm_sq is None:
            msg = "no per-layer data: pass `layers=[(name, numel), ...]` to error_metrics"
            raise ValueError(msg)
        pos = {name: i for i, name in enumerate(self.layer_names)}
        missing = [nm for nm in names if nm not in pos]
        if missing:
            msg = f"unknown layer names {missing[:5]}; expected names from the layout ({len(pos)} layers)"
            raise KeyError(msg)
        if not names:
            return float("nan")
        cols = [pos[nm] for nm in names]
        num = torch.from_numpy(self.layer_error_sq[:, cols].sum(axis=1))
        den = torch.from_numpy(self.layer_norm_sq[:, cols].sum(axis=1))
        return _ratio(num, den)

    def worst_layer(self) -> tuple[str, float]:
        """The layer with the largest finite relative error and that error (``("", nan)`` if none)."""
        finite = [(val, name) for name, val in self.layers.items() if math.isfinite(val)]
        if not finite:
            return "", float("nan")
        val, name = max(finite, key=lambda t: t[0])
        return name, val


def _check_layout(layers: Sequence[tuple[str, int]], n: int) -> tuple[tuple[str, ...], list[int]]:
    names: list[str] = []
    sizes: list[int] = []
    for item in layers:
        try:
            name, size = item
        except (TypeError, ValueError):
            msg = f"`layers` must be a sequence of (name, numel) pairs; got item {item!r}"
            raise TypeError(msg) from None
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 0:
            msg = f"`layers` sizes must be non-negative integers; got {size!r} for {name!r}"
            raise ValueError(msg)
        names.append(str(name))
        sizes.append(int(size))
    if sum(sizes) != n:
        msg = (
            f"`layers` sizes must add up to the gradient length n={n}; got {sum(sizes)} over {len(sizes)} layers "
            "(pass every parameter tensor in flat order)"
        )
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = "`layers` names must be unique"
        raise ValueError(msg)
    return tuple(names), sizes


def error_metrics(
    dequantized: Tensor,
    grads: Tensor,
    *,
    fraction: float = TOP_FRACTION,
    layers: Sequence[tuple[str, int]] | None = None,
) -> ErrorMetrics:
    """Measured quantization error of K workers' dequantized gradients against the exact ones.

    Parameters
    ----------
    dequantized : Tensor of float32, shape (K, n)
        ``Q(g_k)``: each worker's gradient quantized and dequantized.
    grads : Tensor of float32, shape (K, n)
        ``g_k``: the exact gradients, same device.
    fraction : float in (0, 1]
        Share of each worker's coordinates (largest magnitudes) in the top set.
    layers : sequence of (str, int), optional
        The flat layout: ``(name, numel)`` of every parameter tensor in order,
        sizes adding up to ``n``; enables per-layer errors.

    Returns
    -------
    ErrorMetrics
        Sums in float64; see its attributes for the definitions.
    """
    if dequantized.shape != grads.shape or grads.ndim != 2:
        msg = (
            "`dequantized` and `grads` must have the same shape (K, n); "
            f"got {tuple(dequantized.shape)} and {tuple(grads.shape)}"
        )
        raise ValueError(msg)
    g = grads.double()
    err = dequantized.double() - g
    err_sq = err.pow(2)
    g_sq = g.pow(2)
    err_tot = err_sq.sum(dim=1)
    g_tot = g_sq.sum(dim=1)
    top = top_mask(grads, fraction)
    err_top = (err_sq * top).sum(dim=1)
    g_top = (g_sq * top).sum(dim=1)
    avg_num = err.mean(dim=0).pow(2).sum().reshape(1)
    avg_den = g.mean(dim=0).pow(2).sum().reshape(1)
    out_layers: tuple[str, ...] = ()
    layer_err = layer_norm = None
    if layers is not None:
        out_layers, sizes = _check_layout(layers, int(grads.shape[1]))
        ids = torch.repeat_interleave(
            torch.arange(len(sizes), device=grads.device), torch.tensor(sizes, device=grads.device)
        )
        k = int(grads.shape[0])
        e = torch.zeros(k, len(sizes), dtype=torch.float64, device=grads.device).index_add_(1, ids, err_sq)
        s = torch.zeros(k, len(sizes), dtype=torch.float64, device=grads.device).index_add_(1, ids, g_sq)
        layer_err, layer_norm = e.cpu().numpy(), s.cpu().numpy()
    top_share = _ratio(err_top, err_tot)
    if not bool((err_tot > 0).any()):
        top_share = float("nan")
    return ErrorMetrics(
        variance=_ratio(err_tot, g_tot),
        top_error=_ratio(err_top, g_top),
        top_share=top_share,
        avg_error=_ratio(avg_num, avg_den),
        fraction=float(fraction),
        layer_names=out_layers,
        layer_error_sq=layer_err,
        layer_norm_sq=layer_norm,
    )


__all__ = ["TOP_FRACTION", "ErrorMetrics", "error_metrics", "top_count", "top_mask"]
