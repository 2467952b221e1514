"""The paper's simulated data parallelism: K workers quantize independently, then average."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._quantize import dequantize, quantize


def simulate_workers(
    grads: Sequence[ArrayLike],
    levels: ArrayLike | None,
    config: QuantizerConfig,
    *,
    rng: np.random.Generator | None = None,
) -> NDArray[np.float32]:
    """Average of K independently quantized gradients (shared levels, fresh noise each).

    Parameters
    ----------
    grads : sequence of K arrays, each of the same shape
        One gradient per simulated worker.
    levels : array_like, shape (L,), or None for ``fp32``
    config : QuantizerConfig
    rng : numpy.random.Generator, optional
        Source of every worker's noise, drawn in worker order.

    Returns
    -------
    ndarray of float32, the common shape: ``mean_k dequantize(quantize(grads[k]))``.
    """
    if len(grads) == 0:
        msg = "simulate_workers needs at least one worker gradient; got none"
        raise ValueError(msg)
    shapes = {np.shape(g) for g in grads}
    if len(shapes) != 1:
        msg = f"every worker's gradient must have the same shape; got {sorted(shapes)}"
        raise ValueError(msg)
    gen = rng if rng is not None else np.random.default_rng()
    total = np.zeros(np.shape(grads[0]), dtype=np.float32)
    for g in grads:
        total += dequantize(quantize(g, levels, config, rng=gen), levels)
    return total / np.float32(len(grads))
