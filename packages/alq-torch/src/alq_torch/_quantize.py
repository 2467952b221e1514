"""Quantize and dequantize torch tensors, bit-exact with :mod:`alq_core`.

The arithmetic is the core's contract (``alq_core._quantize``): float32 input,
L2 scale ``float32(sqrt(sum(float64(x)**2)))`` or L-inf scale ``max|x|``,
optional clipping at ``float32(clip * std64)``, per bucket ``r = float32(1 / s)``
(0 where not finite), ``v = clamp(x * r, -1, 1)``, ``j`` = number of interior
levels ``<= v``, ``p = (v - l_j) * inv_gap_j`` with ``inv_gap_j = float32(1 /
(l_{j+1} - l_j))``, ``code = j + (u < p)``. The functions here are vectorized torch ops and run on
any device; on CUDA the fused paths of :mod:`alq_torch._wire` use Triton
kernels (:mod:`alq_torch._kernels`) with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import alq_core
import numpy as np
import torch
from alq_core import QuantizerConfig

from ._tables import level_table

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor before packing; the torch analogue of :class:`alq_core.QuantizedTensor`.

    Attributes
    ----------
    codes : Tensor of uint8, shape (m,)
        Level indices of the ``m = config.num_quantized(n)`` quantized coordinates.
    scales : Tensor of float32, shape (config.num_buckets(n),)
        One scale per quantized bucket; NaN marks a non-finite bucket.
    tail : Tensor of float32, shape (n - m,)
        Coordinates sent exactly.
    n : int
        Element count.
    config : QuantizerConfig
        How it was quantized.
    shape : tuple of int
        Shape of the original tensor.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    tail: torch.Tensor
    n: int
    config: QuantizerConfig
    shape: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.codes.device

    @property
    def nonfinite_buckets(self) -> int:
        """Number of buckets marked non-finite (NaN scale); synchronizes on CUDA."""
        return int(torch.isnan(self.scales).sum().item())

    def to_core(self) -> alq_core.QuantizedTensor:
        """A NumPy copy as :class:`alq_core.QuantizedTensor`, for comparisons with the core."""
        return alq_core.QuantizedTensor(
            self.codes.detach().cpu().numpy().astype(np.uint8),
            self.scales.detach().cpu().numpy().astype(np.float32),
            self.tail.detach().cpu().numpy().astype(np.float32),
            self.n,
            self.config,
            tuple(self.shape),
        )


def check_config(config: object) -> QuantizerConfig:
    """Raise ``TypeError`` unless ``config`` is a :class:`alq_core.QuantizerConfig`."""
    if not isinstance(config, QuantizerConfig):
        msg = f"`config` must be an alq_core.QuantizerConfig; got {type(config).__name__}"
        raise TypeError(msg)
    return config


def check_tensor(x: object, name: str = "x") -> torch.Tensor:
    """Raise unless ``x`` is a float16/bfloat16/float32/float64 tensor."""
    if not isinstance(x, torch.Tensor):
        msg = f"`{name}` must be a torch.Tensor; got {type(x).__name__} (use alq_core for NumPy arrays)"
        raise TypeError(msg)
    if x.dtype not in _FLOAT_DTYPES:
        msg = f"`{name}` must be float16, bfloat16, float32 or float64; got {x.dtype}"
        raise TypeError(msg)
    return x


def flat_float32(x: object, name: str = "x") -> torch.Tensor:
    """``x`` flattened (C order) and converted to float32 (float64 rounds to nearest)."""
    return check_tensor(x, name).detach().reshape(-1).to(torch.float32)


def check_noise(noise: object, m: int, device: torch.device) -> torch.Tensor:
    """Validate given noise: float32 ``(m,)`` in [0, 1), moved to ``device``."""
    if isinstance(noise, np.ndarray):
        u = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32).reshape(-1))
    elif isinstance(noise, torch.Tensor):
        u = noise.detach().reshape(-1)
        if u.dtype != torch.float32:
            u = u.to(torch.float32)
    else:
        msg = f"`noise` must be a float32 tensor or ndarray of shape ({m},); got {type(noise).__name__}"
        raise TypeError(msg)
    if u.numel() != m:
        msg = f"`noise` must hold one uniform value per quantized coordinate ({m}); got {u.numel()}"
        raise ValueError(msg)
    u = u.to(device)
    if m and not bool(((u >= 0) & (u < 1)).all()):
        msg = "`noise` values must lie in [0, 1); draw them with torch.rand(m, dtype=torch.float32)"
        raise ValueError(msg)
    return u.contiguous()


def _bucket_rows(body: torch.Tensor, d: int) -> list[torch.Tensor]:
    """The full buckets as a (k, d) view, then the shorter last bucket as (1, r)."""
    full = body.numel() // d
    rows = []
    if full:
        rows.append(body[: full * d].view(full, d))
    if body.numel() % d:
        rows.append(body[full * d :].view(1, -1))
    return rows


def _scale_rows(rows: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        # max propagates NaN like numpy.max
        return rows.abs().amax(dim=1)
    r64 = rows.to(torch.float64)
    return (r64 * r64).sum(dim=1).sqrt().to(torch.float32)


def _clip_rows(rows: torch.Tensor, clip: float) -> torch.Tensor:
    r64 = rows.to(torch.float64)
    std = (r64 - r64.mean(dim=1, keepdim=True)).square().mean(dim=1, keepdim=True).sqrt()
    t = (clip * std).to(torch.float32)
    return torch.minimum(torch.maximum(rows, -t), t)


def bucket_scales(body: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Per-bucket scales of a flat float32 tensor (the shorter last bucket counts), before clipping."""
    rows = _bucket_rows(body, config.bucket_size)
    if not rows:
        return torch.zeros(0, dtype=torch.float32, device=body.device)
    return torch.cat([_scale_rows(r, config.norm) for r in rows])


def reciprocal_scales(scales: torch.Tensor) -> torch.Tensor:
    """``float32(1 / s)`` per bucket, 0 where not finite (the core's :func:`alq_core._quantize.reciprocal_scales`)."""
    r = torch.reciprocal(scales)
    return torch.where(torch.isfinite(r), r, torch.zeros_like(r))


def inverse_gaps(levels: torch.Tensor) -> torch.Tensor:
    """``float32(1 / float32(levels[j+1] - levels[j]))``; float32 ``(L-1,)``."""
    return torch.reciprocal(levels[1:] - levels[:-1])


def _nonfinite_message(bad: torch.Tensor, m: int, d: int) -> str:
    idx = torch.nonzero(bad).reshape(-1)
    first = int(idx[0].item())
    return (
        f"bucket {first} (coordinates {first * d}..{min(m, (first + 1) * d) - 1}) holds NaN or Inf "
        f"({idx.numel()} such buckets); pass nonfinite='propagate' to mark them instead"
    )


def quantize_flat(
    flat: torch.Tensor, levels: torch.Tensor, config: QuantizerConfig, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of the first ``m`` coordinates of ``flat`` (vectorized torch, any device).

    Parameters
    ----------
    flat : Tensor of float32, shape (n,)
    levels : Tensor of float32, shape (L,), validated, on ``flat``'s device
    config : QuantizerConfig (quantized method)
    u : Tensor of float32, shape (m,), noise in [0, 1)

    Returns
    -------
    codes : Tensor of uint8, shape (m,)
    scales : Tensor of float32, shape (config.num_buckets(n),)
    """
    n = flat.numel()
    m = config.num_quantized(n)
    d = config.bucket_size
    body = flat[:m]
    scales = bucket_scales(body, config)
    bad = ~torch.isfinite(scales)
    if config.nonfinite == "raise" and scales.numel() and bool(bad.any()):
        raise ValueError(_nonfinite_message(bad, m, d))
    if config.clip is not None and m:
        clip = float(config.clip)
        body = torch.cat([_clip_rows(r, clip).reshape(-1) for r in _bucket_rows(body, d)])
        scales = bucket_scales(body, config)
    nb = scales.numel()
    counts = torch.full((nb,), d, dtype=torch.int64, device=flat.device)
    if nb and m % d and config.tail == "quantize":
        counts[-1] = m % d
    recip = reciprocal_scales(scales)
    r_el = torch.repeat_interleave(recip, counts, output_size=m) if nb else recip
    bad_el = torch.repeat_interleave(bad, counts, output_size=m) if nb else bad
    v = (body * r_el).clamp_(levels[0], levels[-1])
    interior = levels[1:-1].contiguous()
    if interior.numel():
        j = torch.searchsorted(interior, v, right=True)
    else:
        j = torch.zeros(m, dtype=torch.int64, device=flat.device)
    p = (v - levels[j]) * inverse_gaps(levels)[j]
    codes = (j + (u < p)).to(torch.uint8)
    codes = codes.masked_fill_(bad_el, 0)
    scales = scales.masked_fill(bad, float("nan"))
    return codes, scales


def _draw_noise(m: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and not isinstance(generator, torch.Generator):
        msg = f"`generator` must be a torch.Generator; got {type(generator).__name__}"
        raise TypeError(msg)
    if generator is not None and generator.device.type != device.type:
        msg = f"`generator` is on {generator.device}, but the tensor is on {device}; create it with torch.Generator(device={str(device)!r})"
        raise ValueError(msg)
    return torch.rand(m, dtype=torch.float32, device=device, generator=generator)


def quantize(
    x: torch.Tensor,
    levels: object,
    config: QuantizerConfig,
    *,
    noise: torch.Tensor | np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize a tensor bucket by bucket with unbiased stochastic rounding.

    Parameters
    ----------
    x : Tensor of float16, bfloat16, float32 or float64, any shape, any device
        Flattened in C order.
    levels : Tensor or ndarray of float32, shape (L,), or None
        The level table (validated); ignored (may be None) for ``fp32``.
    config : QuantizerConfig
    noise : Tensor or ndarray of float32, shape (config.num_quantized(x.numel()),), optional
        Uniform noise in [0, 1), one value per quantized coordinate. With the
        same noise, codes and scales equal :func:`alq_core.quantize` exactly.
    generator : torch.Generator, optional
        Draws the noise with ``torch.rand`` when ``noise`` is not given.

    Returns
    -------
    QuantizedTensor
        ``codes`` uint8 (m,), ``scales`` float32 (num_buckets,), ``tail`` float32
        (n - m,), all on ``x``'s device.
    """
    config = check_config(config)
    flat = flat_float32(x)
    shape = tuple(x.shape)
    n = flat.numel()
    device = flat.device
    if not config.quantized:
        empty = torch.zeros(0, dtype=torch.uint8, device=device)
        return QuantizedTensor(
            empty, torch.zeros(0, dtype=torch.float32, device=device), flat.clone(), n, config, shape
        )
    table = level_table(levels, config, device)
    m = config.num_quantized(n)
    if noise is not None:
        if generator is not None:
            msg = "pass either `noise` or `generator`, not both"
            raise ValueError(msg)
        u = check_noise(noise, m, device)
    else:
        u = _draw_noise(m, device, generator)
    codes, scales = quantize_flat(flat, table.levels, config, u)
    return QuantizedTensor(codes, scales, flat[m:].clone(), n, config, shape)


def dequantize(q: QuantizedTensor, levels: object) -> torch.Tensor:
    """Rebuild the tensor: ``scale * levels[code]`` per coordinate, exact tail appended.

    Returns
    -------
    Tensor of float32, shape ``q.shape``, on ``q``'s device
    """
    if not isinstance(q, QuantizedTensor):
        msg = f"`q` must be an alq_torch.QuantizedTensor; got {type(q).__name__}"
        raise TypeError(msg)
    config = q.config
    if not config.quantized:
        return q.tail.reshape(q.shape).clone()
    if levels is None:
        msg = f"method {config.method!r} needs the level table to dequantize; got None"
        raise ValueError(msg)
    table = level_table(levels, config, q.codes.device)
    m = q.codes.numel()
    out = torch.empty(q.n, dtype=torch.float32, device=q.codes.device)
    if m:
        d = config.bucket_size
        counts = torch.full((q.scales.numel(),), d, dtype=torch.int64, device=out.device)
        if m % d:
            counts[-1] = m % d
        s_el = torch.repeat_interleave(q.scales, counts, output_size=m)
        out[:m] = s_el * table.lookup[q.codes.long()]
    out[m:] = q.tail
    return out.reshape(q.shape)
