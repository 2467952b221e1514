# mypy: disable-error-code="no-untyped-def,untyped-decorator,no-any-return"
# (Triton JIT functions take and return untyped tensors by design.)
"""Fused Triton kernels: quantize + pack, and decode + sum of W payloads.

Imported lazily (never at ``import alq_torch``): defining the kernels imports
Triton but compiles nothing; compilation happens at the first launch.

Arithmetic is the core's contract (``alq_core._quantize``): per bucket the
scale ``s`` (float64 sum of squares, correctly rounded float64 square root) and
its reciprocal ``r = float32(1 / s)`` (``div_rn``, 0 where not finite); per
coordinate only ``v = x * r``, a clamp, comparisons with the interior levels,
``p = (v - l_j) * inv_gap_j`` and ``u < p``. Compiled with
``enable_fp_fusion=False`` so no multiply-add is contracted.

quantize + pack has two launch modes (``TUNING["qpack_mode"]``):

``"split"`` (configurations without clipping)
    1. ``_scale_partial_kernel``: many small programs, each reduces one chunk of
       one bucket to a float64 partial (sum of squares, or max ``|x|``);
    2. ``_scale_finalize_kernel``: per bucket, sums its partials in a fixed
       order, writes the scale bytes and the header into the payload and
       ``r`` (NaN for a non-finite bucket) into a small device buffer;
    3. ``_quant_kernel``: a wide grid of small element blocks (walked in reverse
       so the first blocks hit what the scale pass left in L2) rounds with
       ``r`` and packs 8 codes into ``bits`` bytes.
    ``x`` is read twice, but every program is short, light on registers and
    many run per SM, so the loads stay in flight.

``"single"`` (default; always used with clipping)
    one program per bucket (several small buckets per program): the bucket is
    read once into registers, reduced, clipped if asked, rounded and packed.

Device noise: Philox4x32 (``tl.randint4x``, ``PHILOX_ROUNDS`` rounds) on one
counter per 4 coordinates, all 4 outputs used (a block is processed as 4
contiguous quarters; output ``k`` feeds quarter ``k``). A 32-bit output ``w``
becomes ``u = bitcast((w >> 9) | 0x3F800000) - 1``: uniform on the multiples
of ``2**-23`` in [0, 1), without an integer-to-float conversion. The noise
depends on the seed, the element index, the launch mode and block size: it is
deterministic for a seed and a tuning, and never compared to the core.

``decode_sum`` reads, for a block of 8-code groups, the packed bytes and the
scale of every payload (the scale straight from the payload bytes: no copy),
looks the level up and accumulates ``acc + s * l`` in float32, and writes the
(scaled) sum once.

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
#: Largest bucket (rounded up to a power of two) held in one program's registers ("single" mode).
MAX_FUSED_BUCKET = 16384
#: Philox rounds of the device noise (Philox4x32-7 passes BigCrush; 10 is Random123's default).
PHILOX_ROUNDS = 7

#: Launch parameters; benchmarks may override them.
TUNING: dict[str, Any] = {
    "qpack_mode": "single",  # "single" (one program per bucket) or "split" (scale pass + wide quantize pass)
    # "single" mode
    "qpack_elems": 4096,  # minimum elements per program (several small buckets per program)
    "qpack_warps_8k": 8,  # num_warps for buckets of <= 8192 elements per program
    "qpack_warps_16k": 16,  # num_warps for 16384 elements per program
    # "split" mode
    "scale_block": 4096,  # elements per program of the scale pass (power of two)
    "scale_warps": 8,
    "quant_block": 2048,  # elements per program of the quantize pass (power of two, >= 32)
    "quant_warps": 4,
    "quant_reverse": 1,  # walk the quantize pass backwards (L2 reuse of the scale pass's last reads)
    # decode_sum
    "decode_block": 2048,  # elements per program (power of two, >= 8)
    "decode_warps": 4,
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

HEADER: tl.constexpr = tl.constexpr(HEADER_BYTES)


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
def _uniform(w):
    """23 random bits of a uint32 as a float32 in [0, 1): exponent of 1.0 ORed in, minus 1 (exact)."""
    return ((w >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0


@triton.jit
def _reciprocal(s):
    """``float32(1 / s)`` correctly rounded, 0 where not finite; NaN where ``s`` is not finite (bad bucket)."""
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    r = tl.where(r < float("inf"), r, 0.0)
    return tl.where(s < float("inf"), r, float("nan"))


@triton.jit
def _codes(v, u, lv_ptr, pair_ptr, L: tl.constexpr, BITS: tl.constexpr, LIB: tl.constexpr):
    """Codes of clamped ``v`` with noise ``u``: ``j + (u < (v - l_j) * inv_gap_j)``."""
    if L <= 16 and LIB:
        # j = number of interior levels <= v (scalar levels), then one 8-byte gather of (l_j, inv_gap_j)
        # from the tiny L1-resident table; the gather is inline PTX so that it keeps the tensor's layout
        # (a tl.load gather gets a layout of its own and a shared-memory conversion)
        j = tl.zeros(v.shape, tl.int32)
        for k in tl.static_range(1, L - 1):
            j += (v >= tl.load(lv_ptr + k)).to(tl.int32)
        lo_b, g_b = tl.inline_asm_elementwise(
            "ld.global.nc.v2.b32 {$0, $1}, [$2];",
            "=r,=r,l",
            [pair_ptr + j],
            dtype=(tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
        p = (v - lo_b.to(tl.float32, bitcast=True)) * g_b.to(tl.float32, bitcast=True)
        return j + (u < p).to(tl.int32)
    if L <= 16:
        # one ascending pass, one predicate per interior level (scalars): the last level <= v sets
        # j, l_j and inv_gap_j (selects in registers: no gather, no layout change)
        p0 = tl.load(pair_ptr)
        j = tl.zeros(v.shape, tl.int32)
        lo = tl.zeros(v.shape, tl.float32) + (p0 & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        g = tl.zeros(v.shape, tl.float32) + (p0 >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        for k in tl.static_range(1, L - 1):
            pk = tl.load(pair_ptr + k)
            ge = v >= (pk & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            j = tl.where(ge, k, j)
            lo = tl.where(ge, (pk & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), lo)
            g = tl.where(ge, (pk >> 32).to(tl.int32).to(tl.float32, bitcast=True), g)
        p = (v - lo) * g
        return j + (u < p).to(tl.int32)
    else:
        # branchless binary search over the NaN-padded table (NaN compares false)
        pos = tl.zeros(v.shape, tl.int32)
        for i in tl.static_range(BITS):
            cand = pos + ((1 << BITS) >> (i + 1))
            t = tl.load(lv_ptr + cand - 1)
            pos = tl.where(t <= v, cand, pos)
        j = tl.minimum(pos - 1, L - 2)
    # one 8-byte gather (tiny table, L1-resident) gives l_j (low half) and inv_gap_j (high half)
    pair = tl.load(pair_ptr + j)
    lo = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    g = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    p = (v - lo) * g
    return j + (u < p).to(tl.int32)


@triton.jit
def _round_quarter(x, mask, good, r, u, lv_ptr, pair_ptr, L: tl.constexpr, BITS: tl.constexpr, LIB: tl.constexpr):
    v = x * r[:, None]
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    code = _codes(v, u, lv_ptr, pair_ptr, L, BITS, LIB)
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
def _store_scales(out_ptr, b, bmask, s, good):
    """Scales as 4 little-endian bytes each (the payload may be unaligned); NaN marks a bad bucket."""
    sb = tl.where(good, s.to(tl.int32, bitcast=True), 0x7FC00000)
    b4 = tl.arange(0, 4)
    sbytes = ((sb[:, None] >> (b4 * 8)[None, :]) & 255).to(tl.uint8)
    tl.store(out_ptr + HEADER + b.to(tl.int64)[:, None] * 4 + b4[None, :], sbytes, mask=bmask[:, None])


@triton.jit
def _store_header(out_ptr, head_ptr, pid):
    hb = tl.arange(0, 64)
    hmask = (hb < HEADER) & (pid == 0)
    tl.store(out_ptr + hb, tl.load(head_ptr + hb, mask=hmask, other=0), mask=hmask)


# The seed changes at every call: specializing on it (divisible by 16, equal to 1) would
# compile new variants mid-training whenever a seed first falls into another class.
@triton.jit(do_not_specialize=["seed", "clip_bits"])
def _qpack_kernel(
    x_ptr,
    u_ptr,
    lv_ptr,
    pair_ptr,
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
    """Single mode: ROWS whole buckets per program, each as four quarters of Q coordinates."""
    pid = tl.program_id(0)
    _store_header(out_ptr, head_ptr, pid)

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
    r = _reciprocal(s)

    if NOISE:
        u0 = tl.load(u_ptr + i0, mask=m0, other=0.0)
        u1 = tl.load(u_ptr + i1, mask=m1, other=0.0)
        u2 = tl.load(u_ptr + i2, mask=m2, other=0.0)
        u3 = tl.load(u_ptr + i3, mask=m3, other=0.0)
    else:
        ctr = rows[:, None] * Q + tl.arange(0, Q)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, ctr, ROUNDS)
        u0 = _uniform(w0)
        u1 = _uniform(w1)
        u2 = _uniform(w2)
        u3 = _uniform(w3)

    c0 = _round_quarter(x0, m0, good, r, u0, lv_ptr, pair_ptr, L, BITS, LIB)
    c1 = _round_quarter(x1, m1, good, r, u1, lv_ptr, pair_ptr, L, BITS, LIB)
    c2 = _round_quarter(x2, m2, good, r, u2, lv_ptr, pair_ptr, L, BITS, LIB)
    c3 = _round_quarter(x3, m3, good, r, u3, lv_ptr, pair_ptr, L, BITS, LIB)

    base_g = rows.to(tl.int64) * (D // 8)
    _store_quarter(out_ptr, codes_off, c0, i0, base_g, rmask, ngroups, 0, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c1, i1, base_g, rmask, ngroups, 1, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c2, i2, base_g, rmask, ngroups, 2, Q, D, ROWS, BITS)
    _store_quarter(out_ptr, codes_off, c3, i3, base_g, rmask, ngroups, 3, Q, D, ROWS, BITS)
    _store_scales(out_ptr, rows, rmask, s, good)


@triton.jit
def _scale_partial_kernel(
    x_ptr,
    part_ptr,
    m,
    nb,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    C: tl.constexpr,
    LINF: tl.constexpr,
):
    """Split mode, pass 1: chunk ``c`` of buckets ``rows`` -> float64 partial (sum of squares or max |x|)."""
    pid = tl.program_id(0)
    rg = pid // C
    c = pid % C
    rows = rg * ROWS + tl.arange(0, ROWS)
    cols = c * COLS + tl.arange(0, COLS)
    idx = rows.to(tl.int64)[:, None] * D + cols[None, :]
    rmask = rows < nb
    mask = rmask[:, None] & (cols < D)[None, :] & (idx < m)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if LINF:
        part = _absmax_rows(x).to(tl.float64)
    else:
        part = _sumsq_rows(x)
    tl.store(part_ptr + rows * C + c, part, mask=rmask)


@triton.jit
def _scale_finalize_kernel(
    part_ptr,
    head_ptr,
    out_ptr,
    r_ptr,
    nb,
    C: tl.constexpr,
    CP: tl.constexpr,
    FB: tl.constexpr,
    LINF: tl.constexpr,
    LIB: tl.constexpr,
):
    """Split mode, pass 2: per bucket, partials -> scale (payload bytes) and reciprocal (device buffer)."""
    pid = tl.program_id(0)
    _store_header(out_ptr, head_ptr, pid)
    b = pid * FB + tl.arange(0, FB)
    bmask = b < nb
    cc = tl.arange(0, CP)
    pm = bmask[:, None] & (cc < C)[None, :]
    pv = tl.load(part_ptr + b[:, None] * C + cc[None, :], mask=pm, other=0.0)
    if LINF:
        s = tl.max(pv, axis=1).to(tl.float32)
    else:
        s = _sqrt64(tl.sum(pv, axis=1), LIB).to(tl.float32)
    good = s < float("inf")
    _store_scales(out_ptr, b, bmask, s, good)
    tl.store(r_ptr + b, _reciprocal(s), mask=bmask)


@triton.jit
def _pack_groups(out_ptr, codes_off, code, gidx, ngroups, BITS: tl.constexpr):
    """Pack (G, 8) codes of the 8-code groups ``gidx`` LSB-first: ``BITS`` bytes per group."""
    sh = tl.arange(0, 8) * BITS
    if BITS <= 3:
        word = tl.sum(code << sh[None, :], axis=1)
    else:
        word = tl.sum(code.to(tl.int64) << sh.to(tl.int64)[None, :], axis=1)
    dst = out_ptr + codes_off + gidx * BITS
    gmask = gidx < ngroups
    for i in tl.static_range(BITS):
        tl.store(dst + i, ((word >> (8 * i)) & 255).to(tl.uint8), mask=gmask)


@triton.jit
def _quant_part(
    x_ptr, u_ptr, r_ptr, lv_ptr, pair_ptr, out_ptr, rb, w, e0, m, ngroups, codes_off,
    D: tl.constexpr, Q: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr,
    NOISE: tl.constexpr, SCALAR: tl.constexpr, LIB: tl.constexpr,
):  # fmt: skip
    """Quarter ``e0 .. e0 + Q`` as (Q/8, 8) groups: round, then pack (no layout change before the sum)."""
    G: tl.constexpr = Q // 8
    gidx = e0 // 8 + tl.arange(0, G)
    e = e0 + (tl.arange(0, G)[:, None] * 8 + tl.arange(0, 8)[None, :])
    em = e < m
    x = tl.load(x_ptr + e, mask=em, other=0.0).to(tl.float32)
    if SCALAR:
        r = rb
    else:
        r = tl.load(r_ptr + e // D, mask=em, other=0.0)
    v = tl.minimum(tl.maximum(x * r, -1.0), 1.0)
    if NOISE:
        u = tl.load(u_ptr + e, mask=em, other=0.0)
    else:
        u = _uniform(w)
    code = _codes(v, u, lv_ptr, pair_ptr, L, BITS, LIB)
    code = tl.where(em, tl.where(r == r, code, 0), 0)  # NaN r: non-finite bucket -> code 0
    if BITS == 8:
        tl.store(out_ptr + codes_off + e, code.to(tl.uint8), mask=e < ngroups * 8)
    else:
        _pack_groups(out_ptr, codes_off, code, gidx, ngroups, BITS)


@triton.jit(do_not_specialize=["seed"])
def _quant_kernel(
    x_ptr,
    u_ptr,
    r_ptr,
    lv_ptr,
    pair_ptr,
    out_ptr,
    m,
    ngroups,
    nblocks,
    seed,
    codes_off,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    L: tl.constexpr,
    NOISE: tl.constexpr,
    ROUNDS: tl.constexpr,
    REVERSE: tl.constexpr,
    LIB: tl.constexpr,
):
    """Split mode, pass 3: BLOCK coordinates (four quarters) -> codes -> packed bytes."""
    pid = tl.program_id(0)
    if REVERSE:
        blk = nblocks - 1 - pid
    else:
        blk = pid
    Q: tl.constexpr = BLOCK // 4
    SCALAR: tl.constexpr = D % BLOCK == 0
    base = blk.to(tl.int64) * BLOCK
    if SCALAR:
        rb = tl.load(r_ptr + base // D)
    else:
        rb = 0.0
    if NOISE:
        w0 = 0
        w1 = 0
        w2 = 0
        w3 = 0
    else:
        ctr = blk * Q + tl.arange(0, Q // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, ctr, ROUNDS)
    _quant_part(x_ptr, u_ptr, r_ptr, lv_ptr, pair_ptr, out_ptr, rb, w0, base, m, ngroups, codes_off,
                D, Q, BITS, L, NOISE, SCALAR, LIB)  # fmt: skip
    _quant_part(x_ptr, u_ptr, r_ptr, lv_ptr, pair_ptr, out_ptr, rb, w1, base + Q, m, ngroups, codes_off,
                D, Q, BITS, L, NOISE, SCALAR, LIB)  # fmt: skip
    _quant_part(x_ptr, u_ptr, r_ptr, lv_ptr, pair_ptr, out_ptr, rb, w2, base + 2 * Q, m, ngroups, codes_off,
                D, Q, BITS, L, NOISE, SCALAR, LIB)  # fmt: skip
    _quant_part(x_ptr, u_ptr, r_ptr, lv_ptr, pair_ptr, out_ptr, rb, w3, base + 3 * Q, m, ngroups, codes_off,
                D, Q, BITS, L, NOISE, SCALAR, LIB)  # fmt: skip


def _qpack_params(d: int) -> tuple[int, int, int]:
    """(ROWS, Q, num_warps) of the "single" mode for bucket size ``d``."""
    dp2 = _next_pow2(d)
    rows = max(1, TUNING["qpack_elems"] // dp2)
    elems = rows * dp2
    warps = TUNING["qpack_warps_16k"] if elems > 8192 else TUNING["qpack_warps_8k"]
    if elems <= 2048:
        warps = min(warps, 4)
    return rows, dp2 // 4, warps


def _split_params(d: int) -> dict[str, int]:
    """Launch shapes of the "split" mode for bucket size ``d``."""
    dp2 = _next_pow2(d)
    sblock = int(TUNING["scale_block"])
    cols = min(dp2, sblock)
    rows = max(1, sblock // dp2)
    chunks = -(-d // cols)
    return {"ROWS": rows, "COLS": cols, "C": chunks, "CP": _next_pow2(chunks)}


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
    ngroups = -(-m // 8)
    codes_off = HEADER_BYTES + 4 * nb
    u = noise if noise is not None else src  # dummy pointer when unused
    interp = _interpret()
    linf = config.norm == "linf"
    if TUNING["qpack_mode"] == "split" and config.clip is None and nb:
        sp = _split_params(d)
        part = torch.empty(nb * sp["C"], dtype=torch.float64, device=src.device)
        recip = torch.empty(nb, dtype=torch.float32, device=src.device)
        extra1: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["scale_warps"])}
        _scale_partial_kernel[(-(-nb // sp["ROWS"]) * sp["C"],)](
            src, part, m, nb, D=d, ROWS=sp["ROWS"], COLS=sp["COLS"], C=sp["C"], LINF=linf, **extra1
        )
        fb = 128
        extra2: dict[str, Any] = {} if interp else {"num_warps": 4}
        _scale_finalize_kernel[(-(-nb // fb),)](
            part, head, out, recip, nb, C=sp["C"], CP=sp["CP"], FB=fb, LINF=linf, LIB=not interp, **extra2
        )
        block = int(TUNING["quant_block"])
        nblocks = -(-m // block)
        extra3: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["quant_warps"]), "enable_fp_fusion": False}
        _quant_kernel[(nblocks,)](
            src, u, recip, table.levels, table.pairs, out,
            m, ngroups, nblocks, seed, codes_off,
            D=d, BLOCK=block, BITS=config.code_bits, L=config.num_levels, NOISE=noise is not None,
            ROUNDS=PHILOX_ROUNDS, REVERSE=bool(TUNING["quant_reverse"]), LIB=not interp,
            **extra3,
        )  # fmt: skip
    else:
        rows, q, warps = _qpack_params(d)
        clip = float(config.clip) if config.clip is not None else 0.0
        clip_bits = int(torch.tensor(clip, dtype=torch.float64).view(torch.int64).item())
        extra: dict[str, Any] = {} if interp else {"num_warps": warps, "enable_fp_fusion": False}
        grid = (max(1, -(-nb // rows)),)
        _qpack_kernel[grid](
            src, u, table.levels, table.pairs, head, out,
            m, nb, ngroups, seed, clip_bits, codes_off,
            D=d, Q=q, ROWS=rows, BITS=config.code_bits, L=config.num_levels,
            LINF=linf, CLIP=config.clip is not None, NOISE=noise is not None,
            LIB=not interp, ROUNDS=PHILOX_ROUNDS,
            **extra,
        )  # fmt: skip
    if n > m:
        off = codes_off + packed_size(m, config.code_bits)
        out[off:].copy_(src[m:].to(torch.float32).view(torch.uint8))


# ----------------------------------------------------------------------------------------------
# decode + sum


@triton.jit
def _decode_one(
    row, bucket, g, gm, e, em, lut_ptr, codes_off, D: tl.constexpr, BITS: tl.constexpr, SCALAR: tl.constexpr
):
    """``s_w * l[c_w]`` for the (G, 8) coordinates ``e`` of one payload starting at ``row``."""
    if BITS == 8:
        c = tl.load(row + codes_off + e, mask=em, other=0).to(tl.int32)
    else:
        gb = row + codes_off + g * BITS
        if BITS <= 4:
            word = tl.load(gb, mask=gm, other=0).to(tl.int32)
            for i in tl.static_range(1, BITS):
                word = word | (tl.load(gb + i, mask=gm, other=0).to(tl.int32) << (8 * i))
            c = (word[:, None] >> (tl.arange(0, 8) * BITS)[None, :]) & ((1 << BITS) - 1)
        else:
            word = tl.load(gb, mask=gm, other=0).to(tl.int64)
            for i in tl.static_range(1, BITS):
                word = word | (tl.load(gb + i, mask=gm, other=0).to(tl.int64) << (8 * i))
            c = ((word[:, None] >> (tl.arange(0, 8) * BITS).to(tl.int64)[None, :]) & ((1 << BITS) - 1)).to(tl.int32)
    # the scale straight from its 4 payload bytes (little-endian; the payload may be unaligned)
    sp = row + HEADER + bucket * 4
    if SCALAR:
        sb = tl.load(sp).to(tl.int32)
        for i in tl.static_range(1, 4):
            sb = sb | (tl.load(sp + i).to(tl.int32) << (8 * i))
    else:
        sb = tl.load(sp, mask=em, other=0).to(tl.int32)
        for i in tl.static_range(1, 4):
            sb = sb | (tl.load(sp + i, mask=em, other=0).to(tl.int32) << (8 * i))
    s = sb.to(tl.float32, bitcast=True)
    return s * tl.load(lut_ptr + c)


@triton.jit
def _decode_sum_kernel(
    p_ptr,
    stride_w,
    lut_ptr,
    out_ptr,
    m,
    ngroups,
    codes_off,
    scale,
    n_w,
    D: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    G: tl.constexpr = BLOCK // 8
    SCALAR: tl.constexpr = D % BLOCK == 0
    g = pid.to(tl.int64) * G + tl.arange(0, G)
    gm = g < ngroups
    e = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    em = e < m
    if SCALAR:
        bucket = (pid.to(tl.int64) * BLOCK) // D
    else:
        bucket = e // D
    stride = stride_w.to(tl.int64)
    acc = tl.zeros((G, 8), tl.float32)
    if UNROLL > 0:
        for w in tl.static_range(UNROLL):
            acc = acc + _decode_one(p_ptr + w * stride, bucket, g, gm, e, em, lut_ptr, codes_off, D, BITS, SCALAR)
    else:
        for w in range(n_w):
            acc = acc + _decode_one(p_ptr + w * stride, bucket, g, gm, e, em, lut_ptr, codes_off, D, BITS, SCALAR)
    if HAS_SCALE:
        acc = acc * scale
    tl.store(out_ptr + e, acc, mask=em)


#: W up to this is unrolled at compile time (one compilation per W); larger W loops at run time
#: (compiled only: the interpreter always unrolls).
MAX_UNROLL = 16


def decode_sum(
    payloads: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    m: int,
    codes_off: int,
    out: torch.Tensor,
    scale: float,
) -> None:
    """Write ``scale * sum_w s_w * l[c_w]`` of the ``m`` quantized coordinates into ``out[:m]``.

    ``payloads`` uint8 (W, P) with checked headers (rows may start at any byte).
    """
    w_count = payloads.shape[0]
    if payloads.stride(1) != 1:
        payloads = payloads.contiguous()
    stride = payloads.stride(0)
    block = int(TUNING["decode_block"])
    interp = _interpret()
    extra: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["decode_warps"]), "enable_fp_fusion": False}
    grid = (-(-m // block),)
    _decode_sum_kernel[grid](
        payloads, stride, table.lookup, out,
        m, -(-m // 8), codes_off, scale, w_count,
        D=config.bucket_size, BITS=config.code_bits, BLOCK=block,
        UNROLL=w_count if w_count <= MAX_UNROLL or interp else 0, HAS_SCALE=scale != 1.0,
        **extra,
    )  # fmt: skip
