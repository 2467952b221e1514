"""Gradient statistics on the GPU, handed to ``alq_core`` for the level update.

The device reduces each *full* bucket ``B`` of the flat gradient to ``||B||_2``
and the mean and population standard deviation of ``w = B / ||B||`` (SPEC
section 5), all in float64; ``alq_core.GradientStats.from_buckets`` builds the
models and the level optimizers run on the host.

For ``alq-e`` / ``alq-einf`` the device computes the level sketch instead
(:func:`sketch_sums`): per bin of ``alq_core``'s fixed grid the float64 sums of
``s^2``, ``s^2 v``, ``s^2 v^2`` over the normalized coordinates ``v`` the
quantizer rounds (same scale, clipping and reciprocal as the quantize kernel, so
the same ``v`` and the same bins as ``alq_core.compute_sketch``; the sums agree to
float64 rounding, the order of the additions differs).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any

from . import _kernels as K
from ._backend import as_cupy, require_cupy
from ._quantize import _check_config, _clip, _flat32


def bucket_stats(x: Any, bucket_size: int) -> tuple[Any, Any, Any, Any]:
    """Statistics of every full bucket of ``x`` (a shorter last bucket is left out).

    Parameters
    ----------
    x : CuPy/DLPack/host array of float16, float32 or float64, any shape
        Flattened in C order (converted to float32 first, like the quantizer).
    bucket_size : int
        Coordinates per bucket ``d``.

    Returns
    -------
    norms : cupy.ndarray of float64, shape (k,)
        ``sqrt(sum(B**2))``, ``k = x.size // bucket_size``.
    means : cupy.ndarray of float64, shape (k,)
        Mean of ``w = B / ||B||`` (0 for a zero bucket).
    stds : cupy.ndarray of float64, shape (k,)
        Population standard deviation of ``w`` (0 for a zero bucket).
    sizes : cupy.ndarray of int64, shape (k,)
        ``bucket_size`` for every bucket.

    Non-finite buckets give non-finite statistics (the core skips them).
    """
    cp = require_cupy()
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        msg = f"`bucket_size` must be a positive integer; got {bucket_size!r}"
        raise ValueError(msg)
    flat, _ = _flat32(x)
    norms, means, stds = K.launch_bucket_stats(flat, bucket_size)
    sizes = cp.full(norms.size, bucket_size, dtype=cp.int64)
    return norms, means, stds, sizes


def gradient_stats(
    samples: Any | Sequence[Any],
    bucket_size: int,
    *,
    dist_num: int = 50,
    weights: str = "norm",
) -> Any:
    """``alq_core.GradientStats`` of one gradient or a list of gradients, reduced on the GPU.

    Parameters
    ----------
    samples : array or sequence of arrays
        Each flattened and bucketed separately (like ``alq_core.compute_stats``).
    bucket_size : int
    dist_num, weights
        Passed to ``alq_core.GradientStats.from_buckets``.

    Returns
    -------
    alq_core.GradientStats
    """
    cp = require_cupy()
    core = importlib.import_module("alq_core")
    stats_cls = getattr(core, "GradientStats", None)
    if stats_cls is None:
        msg = "this alq-core has no GradientStats; install the alq-core release that matches alq-cupy"
        raise ImportError(msg)
    items = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    if not items:
        msg = "`samples` must hold at least one gradient; got an empty sequence"
        raise ValueError(msg)
    parts = [bucket_stats(s, bucket_size) for s in items]
    cols = [cp.concatenate([p[i] for p in parts]).get() for i in range(4)]
    stats = stats_cls.from_buckets(cols[0], cols[1], cols[2], cols[3], dist_num=dist_num, weights=weights)
    # like alq_core.compute_stats: each sample's shorter tail bucket counts as one skipped bucket
    sizes = [int(as_cupy(s).size) for s in items]
    tails = sum(1 for k in sizes if k % bucket_size) if bucket_size >= 2 else sum(sizes)
    return dataclasses.replace(stats, skipped=stats.skipped + tails)


def _sketch_parts(x: Any, config: Any) -> tuple[Any, Any]:
    config = _check_config(config)
    if not config.quantized:
        msg = f"`config` must be a quantized method (the sketch summarizes what is rounded); got {config.method!r}"
        raise ValueError(msg)
    flat, _ = _flat32(x)
    m = config.num_quantized(int(flat.size))
    if m >= 2**31 - 1:
        msg = f"the sketch kernel handles fewer than 2**31 coordinates per call; got {m}"
        raise ValueError(msg)
    return K.launch_sketch(flat, m, config.bucket_size, config.norm == "linf", _clip(config))


def sketch_sums(x: Any, config: Any) -> Any:
    """Per-bin sums of the level sketch of one flat gradient (``alq_core.compute_sketch``'s ``sums``).

    Parameters
    ----------
    x : CuPy/DLPack/host array of float16, float32 or float64, any shape
        One gradient sample, flattened in C order and bucketed as ``config`` quantizes it.
    config : alq_core.QuantizerConfig
        A quantized method; its bucket size, norm, tail policy and clipping apply.

    Returns
    -------
    cupy.ndarray of float64, shape (3, 1282)
        Per bin ``sum s^2``, ``sum s^2 v``, ``sum s^2 v^2``; buckets holding NaN or Inf add nothing.
        Equal to the core's up to float64 summation order (the bins are identical).
    """
    return _sketch_parts(x, config)[0]


def level_sketch(x: Any, config: Any) -> Any:
    """``alq_core.LevelSketch`` of one flat gradient, summed on the GPU (copies ``(3, 1282)`` floats to the host).

    Parameters
    ----------
    x : CuPy/DLPack/host array of float16, float32 or float64, any shape
    config : alq_core.QuantizerConfig
        A quantized method.

    Returns
    -------
    alq_core.LevelSketch
        ``count`` the quantized coordinates, ``skipped`` the buckets holding NaN or Inf.
    """
    cp = require_cupy()
    core = importlib.import_module("alq_core")
    hist, scales = _sketch_parts(x, config)
    n = int(as_cupy(x).size)
    skipped = int(cp.count_nonzero(cp.isnan(scales))) if scales.size else 0
    return core.LevelSketch.from_sums(hist.get(), config, count=config.num_quantized(n), skipped=skipped)
