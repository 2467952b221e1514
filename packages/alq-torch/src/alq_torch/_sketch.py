"""The level sketch of ``alq-e`` / ``alq-einf`` on the device: per-bin sums for :class:`alq_core.LevelSketch`.

The sketch (``alq_core._sketch``) holds, per bin of a fixed grid on ``[-1, 1]``, the float64
sums ``S0 = sum s^2``, ``S1 = sum s^2 v``, ``S2 = sum s^2 v^2`` of the normalized coordinates
``v`` the quantizer rounds, ``s`` the bucket scale. Here ``v`` comes from the torch quantize
path's own scale and reciprocal code (:mod:`alq_torch._quantize`), so it is bit-identical to
:func:`alq_core.normalized_coordinates`, and the bin from the bits of ``float32(|v|)`` by the
integer recipe of :func:`alq_core.sketch_bins`: bin indices equal the core's exactly; the sums
equal :func:`alq_core.compute_sketch`'s up to float64 summation order.

Implementations: vectorized torch ops (any device; ``torch.bincount`` with float64 weights)
and, on CUDA, Triton kernels (float64 atomic adds spread over private histogram copies):
where the fused quantize kernel takes the bucket size (``_kernels.fused_supported``), one
launch computes the scales exactly as that kernel does and then the sums
(:func:`alq_torch._kernels.sketch_fused`); other bucket sizes take the torch scales and
:func:`alq_torch._kernels.sketch_sums`. ``_kernels.TUNING`` selects the variant. Buckets
holding NaN or Inf (and buckets whose scale overflows) contribute nothing;
:func:`level_sketch` counts them.
"""

from __future__ import annotations

import alq_core
import torch
from alq_core import QuantizerConfig
from alq_core._sketch import MAG_BINS, NUM_BINS, OCTAVES, PER_OCTAVE

from ._quantize import (
    _bucket_rows,
    _clip_rows,
    bucket_scales,
    check_config,
    check_tensor,
    flat_float32,
    reciprocal_scales,
)

#: Biased float32 exponent of the grid's smallest nonzero edge ``2^-OCTAVES``.
_EXP0 = 127 - OCTAVES
#: Elements per step of the torch implementation (bounds its float64 temporaries).
_CHUNK = 1 << 22


def sketch_bins(v: torch.Tensor) -> torch.Tensor:
    """Bin index in ``0 .. NUM_BINS-1`` of each float32 normalized coordinate (the core's :func:`alq_core.sketch_bins`).

    Parameters
    ----------
    v : Tensor of float32, any shape, values in ``[-1, 1]``

    Returns
    -------
    Tensor of int64, same shape and device
    """
    a = v.abs().view(torch.int32)
    e = a >> 23
    mag = torch.clamp_max(1 + (e - _EXP0) * PER_OCTAVE + ((a >> 18) & (PER_OCTAVE - 1)), MAG_BINS - 1)
    mag = torch.where(e < _EXP0, torch.zeros_like(mag), mag)
    return torch.where(v < 0, (MAG_BINS - 1) - mag, MAG_BINS + mag).long()


def _check_sketch_config(config: object) -> QuantizerConfig:
    config = check_config(config)
    if not config.quantized:
        msg = f"`config` must be a quantized method (the sketch summarizes what is rounded); got {config.method!r}"
        raise ValueError(msg)
    return config


def _normalize_inputs(
    x: torch.Tensor, config: QuantizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(body, recip, weights, bad)``: the quantized coordinates (clipped where the config clips), float32 ``(m,)``;
    per bucket ``float32(1 / s)`` (0 where not finite), ``float64(s)^2`` (0 in non-finite buckets) and the
    non-finite mask, each ``(config.num_buckets(n),)`` -- exactly as :func:`alq_torch._quantize.quantize_flat`."""
    config = _check_sketch_config(config)
    flat = flat_float32(x)
    m = config.num_quantized(flat.numel())
    body = flat[:m]
    scales = bucket_scales(body, config)
    bad = ~torch.isfinite(scales)
    if config.clip is not None and m:
        clip = float(config.clip)
        body = torch.cat([_clip_rows(r, clip).reshape(-1) for r in _bucket_rows(body, config.bucket_size)])
        scales = bucket_scales(body, config)
    s64 = scales.to(torch.float64)
    weights = torch.where(bad, torch.zeros_like(s64), s64 * s64)
    return body.contiguous(), reciprocal_scales(scales), weights, bad


def _sums_torch(body: torch.Tensor, recip: torch.Tensor, weights: torch.Tensor, d: int) -> torch.Tensor:
    """The torch implementation: per chunk of whole buckets, ``v``, bins and three weighted ``bincount`` s."""
    out = torch.zeros(3, NUM_BINS, dtype=torch.float64, device=body.device)
    m = body.numel()
    step = max(1, _CHUNK // d) * d
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        b0 = lo // d
        for rows in _bucket_rows(body[lo:hi], d):
            k = rows.shape[0]
            r, w = recip[b0 : b0 + k], weights[b0 : b0 + k]
            b0 += k
            v = (rows * r[:, None]).clamp_(-1.0, 1.0)
            v = torch.where(w[:, None] > 0, v, torch.zeros_like(v)).reshape(-1)  # NaN/Inf buckets: weight 0, v 0
            idx = sketch_bins(v)
            v64 = v.to(torch.float64)
            w_el = w.repeat_interleave(rows.shape[1])
            wv = w_el * v64
            out[0] += torch.bincount(idx, w_el, NUM_BINS)
            out[1] += torch.bincount(idx, wv, NUM_BINS)
            out[2] += torch.bincount(idx, wv * v64, NUM_BINS)
    return out


def _kernel_body(x: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """The quantized coordinates as the fused kernel reads them: float16 / bfloat16 / float32 as given
    (converted exactly in the kernel), float64 rounded to float32; contiguous ``(m,)``."""
    flat = check_tensor(x).detach().reshape(-1)
    if flat.dtype == torch.float64:
        flat = flat.to(torch.float32)
    return flat[: config.num_quantized(flat.numel())].contiguous()


def _use_kernel(device: torch.device) -> bool:
    from ._wire import _force_kernels

    if device.type != "cuda" and not _force_kernels():
        return False
    try:
        from . import _kernels
    except ImportError:  # no triton: the torch ops
        return False
    return bool(_kernels.TUNING["sketch_kernel"])


def _sketch_parts(x: torch.Tensor, config: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, bad)``: float64 ``(3, NUM_BINS)`` and the non-finite bucket mask, on ``x``'s device, no sync."""
    config = _check_sketch_config(config)
    if _use_kernel(check_tensor(x).device) and config.num_quantized(x.numel()) < 2**30:
        from . import _kernels

        if _kernels.TUNING["sketch_fused"] and _kernels.fused_supported(config):
            return _kernels.sketch_fused(_kernel_body(x, config), config)
        body, recip, weights, bad = _normalize_inputs(x, config)
        return _kernels.sketch_sums(body, recip, weights, config.bucket_size), bad
    body, recip, weights, bad = _normalize_inputs(x, config)
    return _sums_torch(body, recip, weights, config.bucket_size), bad


def sketch_sums(x: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Per-bin sums of the level sketch of one flat gradient, on its device.

    Parameters
    ----------
    x : Tensor of float16, bfloat16, float32 or float64, any shape, CPU or CUDA
        One gradient sample, flattened in C order and bucketed as ``config`` quantizes it
        (the tail bucket counts unless ``config.tail == 'full'``).
    config : QuantizerConfig
        A quantized method; its bucket size, norm, tail policy and clipping apply.

    Returns
    -------
    Tensor of float64, shape (3, NUM_BINS), on ``x``'s device
        Per bin ``sum s^2``, ``sum s^2 v``, ``sum s^2 v^2``: the ``sums`` of
        :func:`alq_core.compute_sketch` up to float64 rounding (summation order). Buckets
        holding NaN or Inf contribute nothing. Build the core's sketch with
        :func:`level_sketch`, or ``alq_core.LevelSketch.from_sums(sums.cpu().numpy(), config)``.
    """
    return _sketch_parts(x, config)[0]


def level_sketch(x: torch.Tensor, config: QuantizerConfig) -> alq_core.LevelSketch:
    """The :class:`alq_core.LevelSketch` of one flat gradient (host copy; synchronizes on CUDA).

    Parameters
    ----------
    x : Tensor of float16, bfloat16, float32 or float64, any shape, CPU or CUDA
    config : QuantizerConfig
        A quantized method.

    Returns
    -------
    alq_core.LevelSketch
        ``sums`` from :func:`sketch_sums`, ``count`` the quantized coordinates, ``skipped`` the
        buckets holding NaN or Inf: what :func:`alq_core.compute_sketch` returns for ``x`` (its
        sums up to float64 rounding), ready for ``AdaptiveQuantizer.update``.
    """
    sums, bad = _sketch_parts(x, config)
    count = config.num_quantized(x.numel())
    return alq_core.LevelSketch.from_sums(
        sums.cpu().numpy(), config, count=count, skipped=int(bad.sum().item()) if bad.numel() else 0
    )
