# mypy: disable-error-code="no-untyped-def,untyped-decorator,no-any-return"
# (Triton JIT functions take and return untyped tensors by design.)
"""Fused Triton kernels: quantize + pack in one pass, and decode + sum of W payloads.

Imported lazily (never at ``import alq_torch``): defining the kernels imports
Triton but compiles nothing; compilation happens at the first launch.

``quantize_pack`` runs one program per bucket (several per program for small
buckets): the bucket is read once into registers, its scale (and clipping
threshold) reduced in float64, then every coordinate is rounded and the codes
are packed into whole bytes (each 8 codes -> ``bits`` bytes), so the only HBM
traffic is reading ``x`` and writing the payload. The bucket is processed as
four contiguous quarters so that one counter-based Philox call (``randint4x``)
feeds four coordinates. Arithmetic is the core's contract: correctly rounded
float32 division (``div_rn``), float64 square root and division through
libdevice, no fused multiply-add (``enable_fp_fusion=False``).

``decode_sum`` reads the codes and scales of all W payloads for a block of
coordinates and writes their (scaled) float32 sum once.

Both kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from alq_core import QuantizerConfig, packed_size
from triton.language.extra import libdevice

from ._tables import LevelTable

HEADER_BYTES = 40
#: Largest bucket (rounded up to a power of two) held in one program's registers.
MAX_FUSED_BUCKET = 16384
#: Philox rounds of the device noise (Philox4x32-7 passes BigCrush; 10 is Random123's default).
PHILOX_ROUNDS = 7

#: Launch parameters; benchmarks may override them (keys: see :func:`_qpack_params`).
TUNING: dict[str, int] = {
    "qpack_elems": 4096,  # minimum elements per program (several small buckets per program)
    "qpack_warps_8k": 8,  # num_warps for buckets of <= 8192 elements per program
    "qpack_warps_16k": 16,  # num_warps for 16384 elements per program
    "decode_block": 4096,
    "decode_warps": 8,
}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def fused_supported(config: QuantizerConfig) -> bool:
    """Whether :func:`quantize_pack` handles ``config`` (else the torch ops run)."""
    d = config.bucket_size
    return config.quantized and d % 8 == 0 and 32 <= _next_pow2(d) <= MAX_FUSED_BUCKET


def decode_supported(config: QuantizerConfig) -> bool:
    """Whether :func:`decode_sum` handles ``config``."""
    return config.quantized


# ----------------------------------------------------------------------------------------------
# quantize + pack


@triton.jit
def _sqrt64(x, LIB: tl.constexpr):
    if LIB:
        r = libdevice.sqrt_rn(x)
    else:
        r = tl.sqrt(x)  # interpreter: numpy sqrt, correctly rounded
    return r


@triton.jit
def _div64(a, b, LIB: tl.constexpr):
    if LIB:
        r = libdevice.div_rn(a, b)
    else:
        r = a / b
    return r


@triton.jit
def _load_quarter(x_ptr, base, rmask, m, R: tl.constexpr, Q: tl.constexpr, D: tl.constexpr):
    cols = R * Q + tl.arange(0, Q)
    idx = base[:, None] + cols[None, :]
    mask = rmask[:, None] & (cols < D)[None, :] & (idx < m)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return x, mask, idx


@triton.jit
def _absmax_rows(x):
    # NaN counts as +inf so that a NaN bucket is always marked non-finite
    return tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1)


@triton.jit
def _sumsq_rows(x):
    x64 = x.to(tl.float64)
    return tl.sum(x64 * x64, axis=1)


@triton.jit
def _row_scales(x0, x1, x2, x3, LINF: tl.constexpr, LIB: tl.constexpr):
    if LINF:
        a = tl.maximum(tl.maximum(_absmax_rows(x0), _absmax_rows(x1)), tl.maximum(_absmax_rows(x2), _absmax_rows(x3)))
        s = a
    else:
        ss = (_sumsq_rows(x0) + _sumsq_rows(x1)) + (_sumsq_rows(x2) + _sumsq_rows(x3))
        s = _sqrt64(ss, LIB).to(tl.float32)
    return s


@triton.jit
def _sum64_rows(x, mask):
    return tl.sum(tl.where(mask, x.to(tl.float64), 0.0), axis=1)


@triton.jit
def _sqdev_rows(x, mask, mean):
    dev = x.to(tl.float64) - mean[:, None]
    return tl.sum(tl.where(mask, dev * dev, 0.0), axis=1)


@triton.jit
def _clip_quarter(x, mask, t):
    return tl.where(mask, tl.minimum(tl.maximum(x, -t[:, None]), t[:, None]), 0.0)


@triton.jit
def _round_quarter(x, mask, good, ok, s_safe, u, lv_ptr, L: tl.constexpr, BITS: tl.constexpr):
    v = tl.math.div_rn(x, s_safe[:, None])
    v = tl.where(ok[:, None], v, 0.0)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    if L <= 16:
        # one ascending pass, one predicate per level: the last level <= v sets j, lo and hi
        j = tl.zeros(v.shape, tl.int32)
        lo = tl.full(v.shape, -1.0, tl.float32)
        hi = tl.zeros(v.shape, tl.float32) + tl.load(lv_ptr + 1)
        for k in tl.static_range(1, L - 1):
            lk = tl.load(lv_ptr + k)
            lk1 = tl.load(lv_ptr + k + 1)
            ge = v >= lk
            j = tl.where(ge, k, j)
            lo = tl.where(ge, lk, lo)
            hi = tl.where(ge, lk1, hi)
    else:
        # branchless binary search over levels[0 .. L-2] (L is a power of two here)
        pos = tl.zeros(v.shape, tl.int32)
        for i in tl.static_range(BITS):
            cand = pos + (L >> (i + 1))
            t = tl.load(lv_ptr + cand - 1)
            pos = tl.where(t <= v, cand, pos)
        j = pos - 1
        lo = tl.load(lv_ptr + j)
        hi = tl.load(lv_ptr + j + 1)
    p = tl.math.div_rn(v - lo, hi - lo)
    code = j + (u < p).to(tl.int32)
    return tl.where(mask & good[:, None], code, 0)


@triton.jit
def _store_quarter(
    out_ptr,
    codes_off,
    code,
    idx,
    base_g,
    rmask,
    ngroups,
    R: tl.constexpr,
    Q: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BITS: tl.constexpr,
):
    if BITS == 8:
        cols = R * Q + tl.arange(0, Q)
        bmask = rmask[:, None] & (cols < D)[None, :] & (idx < ngroups * 8)
        tl.store(out_ptr + codes_off + idx, code.to(tl.uint8), mask=bmask)
    else:
        G: tl.constexpr = Q // 8
        gl = R * G + tl.arange(0, G)
        gidx = base_g[:, None] + gl[None, :]
        gmask = rmask[:, None] & (gl < D // 8)[None, :] & (gidx < ngroups)
        c3 = tl.reshape(code, (ROWS, G, 8))
        sh = tl.arange(0, 8) * BITS
        if BITS <= 3:
            word = tl.sum(c3 << sh[None, None, :], axis=2)
        else:
            word = tl.sum(c3.to(tl.int64) << sh.to(tl.int64)[None, None, :], axis=2)
        dst = out_ptr + codes_off + gidx * BITS
        for i in tl.static_range(BITS):
            tl.store(dst + i, ((word >> (8 * i)) & 255).to(tl.uint8), mask=gmask)


@triton.jit
def _qpack_kernel(
    x_ptr,
    u_ptr,
    lv_ptr,
    head_ptr,
    out_ptr,
    m,
    nb,
    ngroups,
    seed,
    clip_bits,
    codes_off,
    D: tl.constexpr,
    Q: tl.constexpr,
    ROWS: tl.constexpr,
    BITS: tl.constexpr,
    L: tl.constexpr,
    LINF: tl.constexpr,
    CLIP: tl.constexpr,
    NOISE: tl.constexpr,
    LIB: tl.constexpr,
    ROUNDS: tl.constexpr,
):
    pid = tl.program_id(0)
    # header (40 bytes) by program 0
    hb = tl.arange(0, 64)
    hmask = (hb < 40) & (pid == 0)
    tl.store(out_ptr + hb, tl.load(head_ptr + hb, mask=hmask, other=0), mask=hmask)

    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < nb
    base = rows.to(tl.int64) * D
    x0, m0, i0 = _load_quarter(x_ptr, base, rmask, m, 0, Q, D)
    x1, m1, i1 = _load_quarter(x_ptr, base, rmask, m, 1, Q, D)
    x2, m2, i2 = _load_quarter(x_ptr, base, rmask, m, 2, Q, D)
    x3, m3, i3 = _load_quarter(x_ptr, base, rmask, m, 3, Q, D)

    s = _row_scales(x0, x1, x2, x3, LINF, LIB)
    good = s < float("inf")  # False for NaN and Inf
    if CLIP:
        clip = clip_bits.to(tl.int64).to(tl.float64, bitcast=True)
        cnt = (tl.sum(m0.to(tl.int32), axis=1) + tl.sum(m1.to(tl.int32), axis=1)) + (
            tl.sum(m2.to(tl.int32), axis=1) + tl.sum(m3.to(tl.int32), axis=1)
        )
        cnt64 = tl.maximum(cnt, 1).to(tl.float64)
        tot = (_sum64_rows(x0, m0) + _sum64_rows(x1, m1)) + (_sum64_rows(x2, m2) + _sum64_rows(x3, m3))
        mean = _div64(tot, cnt64, LIB)
        sq = (_sqdev_rows(x0, m0, mean) + _sqdev_rows(x1, m1, mean)) + (
            _sqdev_rows(x2, m2, mean) + _sqdev_rows(x3, m3, mean)
        )
        std = _sqrt64(_div64(sq, cnt64, LIB), LIB)
        t = (clip * std).to(tl.float32)
        x0 = _clip_quarter(x0, m0, t)
        x1 = _clip_quarter(x1, m1, t)
        x2 = _clip_quarter(x2, m2, t)
        x3 = _clip_quarter(x3, m3, t)
        s = _row_scales(x0, x1, x2, x3, LINF, LIB)
    ok = good & (s != 0.0)
    s_safe = tl.where(ok, s, 1.0)

    if NOISE:
        u0 = tl.load(u_ptr + i0, mask=m0, other=0.0)
        u1 = tl.load(u_ptr + i1, mask=m1, other=0.0)
        u2 = tl.load(u_ptr + i2, mask=m2, other=0.0)
        u3 = tl.load(u_ptr + i3, mask=m3, other=0.0)
    else:
        ctr = rows[:, None] * Q + tl.arange(0, Q)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, ctr, ROUNDS)
        u0 = tl.uint_to_uniform_float(r0)
        u1 = tl.uint_to_uniform_float(r1)
        u2 = tl.uint_to_uniform_float(r2)
        u3 = tl.uint_to_uniform_float(r3)

    c0 = _round_quarter(x0, m0, good, ok, s_safe, u0, lv_ptr, L, BITS)
    c1 = _round_quarter(x1, m1, good, ok, s_safe, u1, lv_ptr, L, BITS)
    c2 = _round_quarter(x2, m2, good, ok, s_safe, u2, lv_ptr, L, BITS)
    c3 = _round_quarter(x3, m3, good, ok, s_safe, u3, lv_ptr, L, BITS)

    base_g = rows.to(tl.int64) * (D // 8)
    _store_quarter(out_ptr, codes_off, c0, i0, base_g, rmask, ngroups, 0, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c1, i1, base_g, rmask, ngroups, 1, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c2, i2, base_g, rmask, ngroups, 2, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c3, i3, base_g, rmask, ngroups, 3, Q, D, ROWS, BITS)

    # scales as 4 little-endian bytes each (the payload may be unaligned); NaN marks a bad bucket
    sb = tl.where(good, s.to(tl.int32, bitcast=True), 0x7FC00000)
    b4 = tl.arange(0, 4)
    sbytes = ((sb[:, None] >> (b4 * 8)[None, :]) & 255).to(tl.uint8)
    tl.store(out_ptr + HEADER + rows.to(tl.int64)[:, None] * 4 + b4[None, :], sbytes, mask=rmask[:, None])


HEADER: tl.constexpr = tl.constexpr(HEADER_BYTES)


def _qpack_params(d: int) -> tuple[int, int, int]:
    """(ROWS, Q, num_warps) for bucket size ``d``."""
    dp2 = _next_pow2(d)
    rows = max(1, TUNING["qpack_elems"] // dp2)
    elems = rows * dp2
    warps = TUNING["qpack_warps_16k"] if elems > 8192 else TUNING["qpack_warps_8k"]
    if elems <= 2048:
        warps = min(warps, 4)
    return rows, dp2 // 4, warps


def quantize_pack(
    src: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    head: torch.Tensor,
    out: torch.Tensor,
    *,
    noise: torch.Tensor | None,
    seed: int,
) -> None:
    """Write the whole payload of ``src`` (flat float16/bfloat16/float32) into ``out``.

    ``head`` is the 40-byte header on the device; ``noise`` float32 (m,) or None
    for Philox noise from ``seed``. Non-finite buckets get a NaN scale and zero
    codes whatever ``config.nonfinite`` says (the caller raises).
    """
    n = src.numel()
    m = config.num_quantized(n)
    nb = config.num_buckets(n)
    if m >= 2**31:
        msg = f"the fused kernel handles fewer than 2**31 coordinates per call; got {m}"
        raise ValueError(msg)
    d = config.bucket_size
    rows, q, warps = _qpack_params(d)
    ngroups = -(-m // 8)
    codes_off = HEADER_BYTES + 4 * nb
    clip = float(config.clip) if config.clip is not None else 0.0
    clip_bits = int(torch.tensor(clip, dtype=torch.float64).view(torch.int64).item())
    u = noise if noise is not None else src  # dummy pointer when unused
    interp = _interpret()
    extra: dict[str, Any] = {} if interp else {"num_warps": warps, "enable_fp_fusion": False}
    grid = (max(1, -(-nb // rows)),)
    _qpack_kernel[grid](
        src, u, table.lookup, head, out,
        m, nb, ngroups, seed, clip_bits, codes_off,
        D=d, Q=q, ROWS=rows, BITS=config.code_bits, L=config.num_levels,
        LINF=config.norm == "linf", CLIP=config.clip is not None, NOISE=noise is not None,
        LIB=not interp, ROUNDS=PHILOX_ROUNDS,
        **extra,
    )  # fmt: skip
    if n > m:
        off = codes_off + packed_size(m, config.code_bits)
        out[off:].copy_(src[m:].to(torch.float32).view(torch.uint8))


# ----------------------------------------------------------------------------------------------
# decode + sum


@triton.jit
def _decode_sum_kernel(
    p_ptr,
    stride_w,
    sc_ptr,
    lut_ptr,
    out_ptr,
    m,
    ngroups,
    nb,
    codes_off,
    scale,
    W: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    BP: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    G: tl.constexpr = BLOCK // 8
    g = pid.to(tl.int64) * G + tl.arange(0, G)
    gm = g < ngroups
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    em = e < m
    bucket = e // D
    bi = tl.arange(0, BP)
    acc = tl.zeros((BLOCK,), tl.float32)
    for w in tl.static_range(W):
        row = p_ptr + w * stride_w.to(tl.int64) + codes_off
        if BITS == 8:
            c = tl.load(row + e, mask=em, other=0).to(tl.int32)
        else:
            raw = tl.load(row + g[:, None] * BITS + bi[None, :], mask=gm[:, None] & (bi < BITS)[None, :], other=0)
            if BITS <= 3:
                word = tl.sum(raw.to(tl.int32) << (bi * 8)[None, :], axis=1)
                c8 = (word[:, None] >> (tl.arange(0, 8) * BITS)[None, :]) & ((1 << BITS) - 1)
            else:
                word = tl.sum(raw.to(tl.int64) << (bi * 8).to(tl.int64)[None, :], axis=1)
                c8 = ((word[:, None] >> (tl.arange(0, 8) * BITS).to(tl.int64)[None, :]) & ((1 << BITS) - 1)).to(
                    tl.int32
                )
            c = tl.reshape(c8, (BLOCK,))
        s = tl.load(sc_ptr + w * nb + bucket, mask=em, other=0.0)
        lv = tl.load(lut_ptr + c, mask=em, other=0.0)
        acc = acc + s * lv
    if HAS_SCALE:
        acc = acc * scale
    tl.store(out_ptr + e, acc, mask=em)


def decode_sum(
    payloads: torch.Tensor,
    scales: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    m: int,
    codes_off: int,
    out: torch.Tensor,
    scale: float,
) -> None:
    """Write ``scale * sum_w s_w * l[c_w]`` of the ``m`` quantized coordinates into ``out[:m]``.

    ``payloads`` uint8 (W, P) with checked headers; ``scales`` float32 (W, nb) contiguous.
    """
    w_count, stride = payloads.shape
    if payloads.stride(1) != 1:
        payloads = payloads.contiguous()
        stride = payloads.stride(0)
    else:
        stride = payloads.stride(0)
    block = TUNING["decode_block"]
    bits = config.code_bits
    interp = _interpret()
    extra: dict[str, Any] = {} if interp else {"num_warps": TUNING["decode_warps"], "enable_fp_fusion": False}
    grid = (-(-m // block),)
    _decode_sum_kernel[grid](
        payloads, stride, scales, table.lookup, out,
        m, -(-m // 8), scales.shape[1], codes_off, scale,
        W=w_count, D=config.bucket_size, BITS=bits, BP=_next_pow2(bits), BLOCK=block, HAS_SCALE=scale != 1.0,
        **extra,
    )  # fmt: skip
