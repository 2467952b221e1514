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

quantize + pack (``_qpack_kernel``): one program per bucket (several small
buckets per program), the bucket read once into registers as two
``(ROWS, G, 4)`` halves of the same layout: group ``g`` (elements ``8g .. 8g+7``)
lives in one thread, so its noise, rounding and packing need no exchange
between threads; only the per-bucket reduction crosses threads (after each
thread has reduced its own groups). Programs holding only full buckets take an
unmasked path (vectorized loads); the last, partial bucket a masked one. At
16384 elements per program (one 512-thread program per SM fits) the programs
loop over blocks of buckets and issue the next block's loads before the
current block's arithmetic, so one block's memory traffic overlaps the other's
arithmetic (``TUNING["qpack_loop_*"]``). The level bracket ``j`` of a coordinate
is the count of interior levels ``<= v``: with 8 levels (3 bits) a three-step
binary search over the levels held in registers (``TUNING["qpack_bsearch"]``),
otherwise a scan; then one 8-byte gather of ``(l_j, inv_gap_j)``.

Device noise: one Philox4x32 call (``tl.randint4x``, ``PHILOX_ROUNDS`` rounds)
per 8-code group, counter = the group's index; each 32-bit output gives two
16-bit uniforms ``(k + 1/2) / 2**16``, kept as ``1 + u`` (bit patterns ORed into
the exponent of 1.0: exact, no integer-to-float conversion) and compared with
``fma(v - l_j, inv_gap_j, 1)``, one rounding of ``1 + p``. Rounding up then happens
with a probability within ``2**-17 + 2**-24`` of ``p`` (a bias that small of a
level gap per coordinate, far below the quantization variance). The noise depends on
the seed and the element index only: deterministic for a seed, never compared
to the core.

``decode_sum`` reads, for a block of 8-code groups, the packed bytes and the
scale of every payload (the scale straight from the payload bytes: no copy;
compiled, both as one or two aligned 32-bit words and a funnel shift,
``TUNING["decode_words"]``), looks the levels up (two codes per 8-byte lookup
when ``code_bits <= 4``, with each thread on its own groups for all payloads),
sums ``s_w * l`` in float32 in payload order, and writes the (scaled) sum once.
Given an expected header and a flag, it also compares every payload's header
on the device and writes NaN (and sets the flag) on a mismatch.

Both kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
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

#: Launch parameters; benchmarks may override them.
TUNING: dict[str, Any] = {
    # quantize + pack: one program per bucket (several small buckets per program)
    "qpack_elems": 4096,  # minimum elements per program
    "qpack_warps_8k": 8,  # num_warps for buckets of <= 8192 elements per program
    "qpack_warps_16k": 16,  # num_warps for 16384 elements per program
    "qpack_maxnreg_8k": 72,  # register cap per thread, <= 8192 elements per program (0: the compiler's choice)
    "qpack_maxnreg_16k": 128,  # same, 16384 (looping: one program per SM, no spills; H200 sweep)
    "qpack_loop_8k": False,  # <= 8192 elements per program: programs walk several blocks (prefetching the next)
    "qpack_loop_16k": True,  # same, 16384
    "qpack_loop_per_sm": 1,  # looping programs per multiprocessor
    "qpack_bsearch": True,  # 8 levels, compiled: find the level bracket by binary search, else by a scan (H200 sweep)
    # decode_sum
    "decode_block": 2048,  # elements per program (power of two, >= 8)
    "decode_warps": 4,
    "decode_pairs_min_w": 4,  # from this many payloads on, look two codes up at once (code_bits <= 4; H200 sweep)
    "decode_words": True,  # read code bytes and scales as one or two aligned words (compiled only; H200 sweep)
    # both: after a signature's first launch, launch the compiled kernel directly (_launch)
    "direct_launch": True,
}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


#: Compiled kernels by launch signature (see :func:`_launch`); cleared when it reaches ``_MAX_LAUNCHES``.
_LAUNCHES: dict[tuple[Any, ...], Any] = {}
_MAX_LAUNCHES = 4096


def _arg_key(arg: Any, specialize: bool) -> Any:
    """What Triton specializes a run-time argument on, or finer: a tensor's dtype and 16-byte alignment; an
    int's value (its width class where not specialized); a float's type."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg)
    if specialize:
        return arg
    return -(2**31) <= arg < 2**31, arg < 2**63


def _launch_hooks_active() -> bool:
    """Whether Triton launch hooks (its profiling knobs) are set; Triton < 3.4 has no knobs: assume so."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return True
    return any(
        h is not None and getattr(h, "calls", True)
        for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    )


def _launch_env() -> tuple[Any, ...] | None:
    """What a direct launch depends on beyond its arguments: the current device and Triton's debug and
    instrumentation modes (its dispatch reads them at every launch). None where every launch takes
    Triton's dispatch: the interpreter, launch hooks set (profilers), ``TUNING["direct_launch"]`` off."""
    if _interpret() or not TUNING["direct_launch"] or _launch_hooks_active():
        return None
    knobs = triton.knobs
    return (
        torch.cuda.current_device(),
        getattr(knobs.runtime, "debug", None),
        getattr(knobs.compilation, "instrumentation_mode", None),
    )


def _launch(
    fn: Any, grid: tuple[int], args: tuple[Any, ...], consts: dict[str, Any], options: dict[str, Any]
) -> Any | None:
    """``fn[grid](*args, **consts, **options)``. Compiled, the first launch of a signature goes through
    Triton's dispatch and keeps the compiled kernel; later ones launch it directly on the current stream.
    Returns the compiled kernel when it may be launched directly (see :class:`Launch`), else None.

    Triton's dispatch (binding, specialization key, cache lookup, device and stream look-ups, launch
    metadata) costs tens of microseconds of host time per call: in a DDP step replayed as CUDA graphs,
    with the hook running between the replays, that host time is step time
    (``benchmarks/host_overhead.py``). The key holds everything Triton specializes on (or finer: int
    values), the constants, the launch options and :func:`_launch_env`, so a direct launch runs the
    kernel the dispatch would pick. With launch hooks set, every launch takes the dispatch.
    """
    env = _launch_env()
    if env is None:
        fn[grid](*args, **consts, **options)
        return None
    nospec = fn.do_not_specialize
    key = (
        fn,
        env,
        tuple(_arg_key(a, i not in nospec and n not in nospec) for i, (a, n) in enumerate(zip(args, fn.arg_names))),
        tuple(consts.items()),
        tuple(options.items()),
    )
    kernel = _LAUNCHES.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **consts, **options)
        if not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return None
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        _LAUNCHES[key] = kernel
        return kernel
    _run(kernel, grid, env, [*args, *(consts[name] for name in fn.arg_names[len(args) :])])
    return kernel


def _run(kernel: Any, grid: tuple[int], env: tuple[Any, ...], values: list[Any]) -> None:
    """Launch compiled ``kernel`` directly on the current stream of ``env``'s device (see :func:`_launch`)."""
    stream = torch._C._cuda_getCurrentRawStream(env[0])
    kernel.run(grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *values)


class Launch:
    """One kernel launch with its arguments bound, to be repeated: ``fn[grid](*args, **consts, **options)``.

    The first call, and any call after :func:`_launch_env` changed, goes through :func:`_launch`; later
    calls launch the kept kernel directly on the current stream with the arguments read once (a tensor
    as its data pointer, which also skips Triton's per-pointer driver query: the tensors are held here
    and must keep their storage). The DDP hook keeps one per bucket: a launch then costs little more
    than the driver call. ``seed_at``: the index in ``args`` of an argument given at each call.
    """

    __slots__ = ("_args", "_consts", "_env", "_fn", "_grid", "_kernel", "_options", "_seed_at", "_values", "_width")

    def __init__(
        self,
        fn: Any,
        grid: tuple[int],
        args: tuple[Any, ...],
        consts: dict[str, Any],
        options: dict[str, Any],
        seed_at: int | None = None,
    ) -> None:
        self._fn, self._grid, self._args, self._consts, self._options = fn, grid, args, consts, options
        self._seed_at = seed_at
        self._kernel: Any = None
        self._env: tuple[Any, ...] | None = None
        self._width: Any = None
        self._values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        self._values.extend(consts[name] for name in fn.arg_names[len(args) :])

    def __call__(self, seed: int = 0) -> None:
        at = self._seed_at
        kernel = self._kernel
        if kernel is not None and (at is None or _arg_key(seed, False) == self._width):
            env = _launch_env()
            if env is not None and env == self._env:
                if at is not None:
                    self._values[at] = seed
                _run(kernel, self._grid, env, self._values)
                return
        args = self._args if at is None else (*self._args[:at], seed, *self._args[at + 1 :])
        self._kernel = _launch(self._fn, self._grid, args, self._consts, self._options)
        self._env = _launch_env()
        self._width = None if at is None else _arg_key(seed, False)


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
def _row_scales(a, b, LINF: tl.constexpr, LIB: tl.constexpr):
    """Per-row scale of two (ROWS, G, 4) halves: max |x| (NaN as +inf), or float32(sqrt(sum of x**2 in float64)).

    Each thread first reduces its own groups (axis 2, then the two halves), so
    only one value per group enters the reduction across threads.
    """
    if LINF:
        grp = tl.maximum(tl.max(_absmax3(a), axis=2), tl.max(_absmax3(b), axis=2))
        s = tl.max(grp, axis=1)
    else:
        # x**2 is exact in float64: fma(a, a, b * b) is a**2 + b**2 rounded once, as in a plain float64 sum
        a64 = a.to(tl.float64)
        b64 = b.to(tl.float64)
        grp = tl.sum(tl.fma(a64, a64, b64 * b64), axis=2)
        s = _sqrt64(tl.sum(grp, axis=1), LIB).to(tl.float32)
    return s


@triton.jit
def _absmax3(x):
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _sum64_groups(x, mask):
    return tl.sum(tl.where(mask, x.to(tl.float64), 0.0), axis=2)


@triton.jit
def _sqdev_groups(x, mask, mean):
    dev = x.to(tl.float64) - mean[:, None, None]
    return tl.sum(tl.where(mask, dev * dev, 0.0), axis=2)


@triton.jit
def _clip_half(x, mask, t):
    return tl.where(mask, tl.minimum(tl.maximum(x, -t[:, None, None]), t[:, None, None]), 0.0)


@triton.jit
def _uniform_pair(w):
    """Two uniforms in (1, 2) from the 16-bit halves of a uint32: ``1 + (k + 1/2) / 2**16`` (bit patterns, exact).

    Kept in (1, 2): the caller compares them with ``fma(v - l_j, inv_gap_j, 1)`` (saves a subtraction per code).
    """
    hi = (((w >> 9) & 0x7FFF80) | 0x3F800040).to(tl.float32, bitcast=True)
    lo = (((w << 7) & 0x7FFF80) | 0x3F800040).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _join4(a, b, c, d, ROWS: tl.constexpr, G: tl.constexpr):
    """Four (ROWS, G) tensors as one (ROWS, G, 4) tensor, ``[..., k]`` from the k-th argument (in registers)."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (ROWS, G, 4))


@triton.jit
def _reciprocal(s):
    """``float32(1 / s)`` correctly rounded, 0 where not finite; NaN where ``s`` is not finite (bad bucket)."""
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    r = tl.where(r < float("inf"), r, 0.0)
    return tl.where(s < float("inf"), r, float("nan"))


@triton.jit
def _gather_pair(table_ptr, idx, LIB: tl.constexpr):
    """Entry ``idx`` (int32 >= 0, any shape) of an int64 table as its (low, high) int32 halves.

    Compiled: inline PTX, one ``mad.wide.u32`` for the address and one 8-byte
    read-only load; it keeps the tensor's layout (a ``tl.load`` gather gets a
    layout of its own) and needs no 64-bit pointer arithmetic per element.
    """
    if LIB:
        base = tl.full(idx.shape, 0, tl.int64) + table_ptr.to(tl.int64, bitcast=True)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .u64 a; mad.wide.u32 a, $2, 8, $3; ld.global.nc.v2.b32 {$0, $1}, [a]; }",
            "=r,=r,r,l",
            [idx, base],
            dtype=(tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    else:
        v = tl.load(table_ptr + idx)
        lo = (v & 0xFFFFFFFF).to(tl.int32)
        hi = (v >> 32).to(tl.int32)
    return lo, hi


@triton.jit
def _prob(v, lo, g, ONE: tl.constexpr):
    """``p = (v - l_j) * inv_gap_j``; with ``ONE``, ``fma(v - l_j, inv_gap_j, 1)`` (one rounding of ``p + 1``)."""
    if ONE:
        p = tl.fma(v - lo, g, 1.0)
    else:
        p = (v - lo) * g
    return p


@triton.jit
def _codes(
    v, u, lv_ptr, pair_ptr, L: tl.constexpr, BITS: tl.constexpr, LIB: tl.constexpr, ONE: tl.constexpr,
    BSEARCH: tl.constexpr,
):  # fmt: skip
    """Codes of clamped ``v`` with noise ``u``: ``j + (u < (v - l_j) * inv_gap_j)``.

    ``ONE``: ``u`` is the noise plus 1, compared with ``fma(v - l_j, inv_gap_j, 1)`` (device noise).
    """
    if L == 8 and LIB and BSEARCH:
        # j = number of the six interior levels <= v, by a three-step binary search over the scalar levels
        # (each step's threshold selected in registers by the earlier steps; l_7 stands in as +inf):
        # 3 compares and 7 selects instead of 6 + 6 (sm_90 SASS: about 2 instructions fewer per coordinate);
        # a NaN v compares false everywhere: j = 0, as in the scan
        p1 = v >= tl.load(lv_ptr + 4)
        p2 = v >= tl.where(p1, tl.load(lv_ptr + 6), tl.load(lv_ptr + 2))
        p3 = v >= tl.where(
            p1, tl.where(p2, float("inf"), tl.load(lv_ptr + 5)), tl.where(p2, tl.load(lv_ptr + 3), tl.load(lv_ptr + 1))
        )
        j = p1.to(tl.int32) * 4 + p2.to(tl.int32) * 2 + p3.to(tl.int32)
        lo_b, g_b = _gather_pair(pair_ptr, j, LIB)
        return j + (u < _prob(v, lo_b.to(tl.float32, bitcast=True), g_b.to(tl.float32, bitcast=True), ONE)).to(tl.int32)
    if L <= 16 and LIB:
        # j = number of interior levels <= v: levels ascend, so the last one <= v sets j (one compare and
        # one select per level, scalar levels); then one 8-byte gather of (l_j, inv_gap_j) from the tiny
        # L1-resident table (_gather_pair: inline PTX, keeps the tensor's layout)
        j = tl.zeros(v.shape, tl.int32)
        for k in tl.static_range(1, L - 1):
            j = tl.where(v >= tl.load(lv_ptr + k), k, j)
        lo_b, g_b = _gather_pair(pair_ptr, j, LIB)
        return j + (u < _prob(v, lo_b.to(tl.float32, bitcast=True), g_b.to(tl.float32, bitcast=True), ONE)).to(tl.int32)
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
        return j + (u < _prob(v, lo, g, ONE)).to(tl.int32)
    else:
        # branchless binary search over the NaN-padded table (NaN compares false)
        pos = tl.zeros(v.shape, tl.int32)
        for i in tl.static_range(BITS):
            cand = pos + ((1 << BITS) >> (i + 1))
            t = tl.load(lv_ptr + cand - 1)
            pos = tl.where(t <= v, cand, pos)
        j = tl.maximum(tl.minimum(pos - 1, L - 2), 0)  # 0 for a NaN v (its p is NaN: code 0)
    # one 8-byte gather (tiny table, L1-resident) gives l_j (low half) and inv_gap_j (high half)
    pair = tl.load(pair_ptr + j)
    lo = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    g = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return j + (u < _prob(v, lo, g, ONE)).to(tl.int32)


@triton.jit
def _round_half(
    x, r, u, lv_ptr, pair_ptr, L: tl.constexpr, BITS: tl.constexpr, LIB: tl.constexpr, CLAMP: tl.constexpr,
    BSEARCH: tl.constexpr,
):  # fmt: skip
    """Codes of a (ROWS, G, 4) half. A NaN ``r`` (non-finite bucket) gives code 0 everywhere.

    ``CLAMP`` (given noise: bit-exact with the core) clamps ``v`` to [-1, 1]. The
    device-noise path skips it: ``|v| <= 1`` up to an ulp of rounding, and an
    unclamped ``v`` past +-1 still rounds into the outer bracket's end level.
    """
    v = x * r[:, None, None]
    if CLAMP:
        v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    return _codes(v, u, lv_ptr, pair_ptr, L, BITS, LIB, not CLAMP, BSEARCH)


@triton.jit
def _store_codes(out_ptr, codes_off, lo, hi, e, gidx, gmask, BITS: tl.constexpr):
    """Codes of (ROWS, G, 4) halves (elements ``8g + k`` and ``8g + 4 + k``): ``BITS`` bytes per 8-code group.

    Whole groups are written (codes past the end are 0: the padding bytes of the last group).
    """
    if BITS == 8:
        m3 = tl.broadcast_to(gmask[:, :, None], lo.shape)
        tl.store(out_ptr + codes_off + e, lo.to(tl.uint8), mask=m3)
        tl.store(out_ptr + codes_off + e + 4, hi.to(tl.uint8), mask=m3)
    else:
        sh = tl.arange(0, 4) * BITS
        if BITS <= 3:
            word = tl.sum(lo << sh[None, None, :], axis=2) | tl.sum(hi << (sh + 4 * BITS)[None, None, :], axis=2)
        else:
            sh64 = sh.to(tl.int64)
            word = tl.sum(lo.to(tl.int64) << sh64[None, None, :], axis=2) | tl.sum(
                hi.to(tl.int64) << (sh64 + 4 * BITS)[None, None, :], axis=2
            )
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


@triton.jit
def _group_tile(rows, m, row_end, ngroups, D: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr):
    """The ``G`` groups of buckets ``rows``: global group index and masks.

    Returns ``gidx`` (ROWS, G) int64, ``e`` (ROWS, G, 4) the low-half elements
    (the high half is ``e + 4``), their masks, and the group mask for stores.
    ``MASKED`` adds element masks (a partial last bucket); otherwise masks are
    per row and group, so loads stay vectorized.
    """
    g = tl.arange(0, G)
    gmask = (rows < row_end)[:, None] & (g < D // 8)[None, :]
    gidx = rows.to(tl.int64)[:, None] * (D // 8) + g[None, :]
    e = gidx[:, :, None] * 8 + tl.arange(0, 4)[None, None, :]
    if MASKED:
        mlo = gmask[:, :, None] & (e < m)
        mhi = gmask[:, :, None] & (e + 4 < m)
        gmask = gmask & (gidx < ngroups)
    else:
        mlo = tl.broadcast_to(gmask[:, :, None], e.shape)
        mhi = mlo
    return gidx, e, mlo, mhi, gmask


@triton.jit
def _quantize_store(
    a, b, r, u_ptr, lv_ptr, pair_ptr, out_ptr, seed, codes_off, gidx, e, mlo, mhi, gmask,
    BITS: tl.constexpr, L: tl.constexpr, NOISE: tl.constexpr, LIB: tl.constexpr, ROUNDS: tl.constexpr,
    MASKED: tl.constexpr, BSEARCH: tl.constexpr,
):  # fmt: skip
    """Round two (ROWS, G, 4) halves with the rows' reciprocal scales ``r`` and store their packed codes.

    Every group lives in one thread (both halves have the same layout), so its
    noise (one Philox call), rounding and packing need no exchange between threads.
    """
    if NOISE:
        ua = tl.load(u_ptr + e, mask=mlo, other=0.0)
        ub = tl.load(u_ptr + e + 4, mask=mhi, other=0.0)
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, gidx.to(tl.int32), ROUNDS)
        h0, l0 = _uniform_pair(w0)
        h1, l1 = _uniform_pair(w1)
        h2, l2 = _uniform_pair(w2)
        h3, l3 = _uniform_pair(w3)
        ua = _join4(h0, h1, h2, h3, a.shape[0], a.shape[1])
        ub = _join4(l0, l1, l2, l3, a.shape[0], a.shape[1])
    # a non-finite bucket has r = NaN: v is NaN or clamped to -1, and every code is 0 (NaN compares false)
    ca = _round_half(a, r, ua, lv_ptr, pair_ptr, L, BITS, LIB, NOISE, BSEARCH)
    cb = _round_half(b, r, ub, lv_ptr, pair_ptr, L, BITS, LIB, NOISE, BSEARCH)
    if MASKED:
        ca = tl.where(mlo, ca, 0)
        cb = tl.where(mhi, cb, 0)
    _store_codes(out_ptr, codes_off, ca, cb, e, gidx, gmask, BITS)


@triton.jit
def _qpack_tile(
    a, b, u_ptr, lv_ptr, pair_ptr, out_ptr, rows, m, row_end, ngroups, seed, clip_bits, codes_off,
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr,
    LINF: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr, LIB: tl.constexpr, ROUNDS: tl.constexpr,
    MASKED: tl.constexpr, BSEARCH: tl.constexpr,
):  # fmt: skip
    """Quantize and store buckets ``rows`` given their two loaded (ROWS, G, 4) halves ``a``, ``b`` (float32)."""
    gidx, e, mlo, mhi, gmask = _group_tile(rows, m, row_end, ngroups, D, G, MASKED)
    s = _row_scales(a, b, LINF, LIB)
    if CLIP:
        clip = clip_bits.to(tl.int64).to(tl.float64, bitcast=True)
        cnt = tl.sum(tl.sum(mlo.to(tl.int32) + mhi.to(tl.int32), axis=2), axis=1)
        cnt64 = tl.maximum(cnt, 1).to(tl.float64)
        mean = _div64(tl.sum(_sum64_groups(a, mlo) + _sum64_groups(b, mhi), axis=1), cnt64, LIB)
        sq = tl.sum(_sqdev_groups(a, mlo, mean) + _sqdev_groups(b, mhi, mean), axis=1)
        t = (clip * _sqrt64(_div64(sq, cnt64, LIB), LIB)).to(tl.float32)
        a = _clip_half(a, mlo, t)
        b = _clip_half(b, mhi, t)
        s = _row_scales(a, b, LINF, LIB)
    _quantize_store(a, b, _reciprocal(s), u_ptr, lv_ptr, pair_ptr, out_ptr, seed, codes_off, gidx, e, mlo, mhi,
                    gmask, BITS, L, NOISE, LIB, ROUNDS, MASKED, BSEARCH)  # fmt: skip
    _store_scales(out_ptr, rows, rows < row_end, s, s < float("inf"))


@triton.jit
def _load_tile(x_ptr, rows, m, row_end, ngroups, D: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr):
    """Buckets ``rows`` as two float32 (ROWS, G, 4) halves (group ``g``: elements ``8g .. 8g+7``); 0 where masked."""
    _, e, mlo, mhi, _ = _group_tile(rows, m, row_end, ngroups, D, G, MASKED)
    a = tl.load(x_ptr + e, mask=mlo, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + e + 4, mask=mhi, other=0.0).to(tl.float32)
    return a, b


# The seed changes at every call: specializing on it (divisible by 16, equal to 1) would
# compile new variants mid-training whenever a seed first falls into another class.
@triton.jit(do_not_specialize=["seed", "clip_bits"])
def _qpack_kernel(
    x_ptr, u_ptr, lv_ptr, pair_ptr, head_ptr, out_ptr, m, nb, n_even, ngroups, seed, clip_bits, codes_off, n_loop,
    D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr,
    LINF: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr, LIB: tl.constexpr, ROUNDS: tl.constexpr,
    LOOP: tl.constexpr, BSEARCH: tl.constexpr,
):  # fmt: skip
    """ROWS whole buckets per block of rows; blocks below ``n_even`` hold only full buckets.

    ``LOOP``: programs below ``n_loop`` each walk the full blocks ``pid, pid + n_loop, ...`` and issue
    the next block's loads before the current block's arithmetic (the memory traffic of one block
    overlaps the arithmetic of the other); program ``n_loop + i`` takes the partial block ``n_even + i``.
    Otherwise program ``pid`` takes block ``pid``. The split is static: where other kernels hold SMs
    (NCCL in a DDP step), a program that starts late still walks its whole share (not measured).
    """
    pid = tl.program_id(0)
    _store_header(out_ptr, head_ptr, pid)
    rng = tl.arange(0, ROWS)
    if LOOP:
        blk_tail = n_even + pid - n_loop
        if pid < n_loop:
            full_end = n_even * ROWS
            a, b = _load_tile(x_ptr, pid * ROWS + rng, m, full_end, ngroups, D, G, False)
            blk = pid
            while blk < n_even:  # (not a range: the interpreter cannot bound one by run-time values)
                an, bn = _load_tile(x_ptr, (blk + n_loop) * ROWS + rng, m, full_end, ngroups, D, G, False)
                _qpack_tile(a, b, u_ptr, lv_ptr, pair_ptr, out_ptr, blk * ROWS + rng, m, nb, ngroups, seed,
                            clip_bits, codes_off, D, G, BITS, L, LINF, CLIP, NOISE, LIB, ROUNDS, False, BSEARCH)  # fmt: skip
                a = an
                b = bn
                blk += n_loop
    else:
        blk_tail = pid
        if pid < n_even:
            a, b = _load_tile(x_ptr, pid * ROWS + rng, m, nb, ngroups, D, G, False)
            _qpack_tile(a, b, u_ptr, lv_ptr, pair_ptr, out_ptr, pid * ROWS + rng, m, nb, ngroups, seed,
                        clip_bits, codes_off, D, G, BITS, L, LINF, CLIP, NOISE, LIB, ROUNDS, False, BSEARCH)  # fmt: skip
    if blk_tail >= n_even:
        rows = blk_tail * ROWS + rng
        a, b = _load_tile(x_ptr, rows, m, nb, ngroups, D, G, True)
        _qpack_tile(a, b, u_ptr, lv_ptr, pair_ptr, out_ptr, rows, m, nb, ngroups, seed, clip_bits,
                    codes_off, D, G, BITS, L, LINF, CLIP, NOISE, LIB, ROUNDS, True, BSEARCH)  # fmt: skip


def _qpack_params(d: int) -> tuple[int, int, int, int, bool]:
    """(ROWS, G, num_warps, maxnreg, LOOP) of :func:`quantize_pack` for bucket size ``d`` (G groups of 8 per row)."""
    dp2 = _next_pow2(d)
    rows = max(1, TUNING["qpack_elems"] // dp2)
    elems = rows * dp2
    big = elems > 8192
    warps = int(TUNING["qpack_warps_16k"] if big else TUNING["qpack_warps_8k"])
    if elems <= 2048:
        warps = min(warps, 4)
    cap = int(TUNING["qpack_maxnreg_16k"] if big else TUNING["qpack_maxnreg_8k"])
    return rows, dp2 // 8, warps, cap, bool(TUNING["qpack_loop_16k"] if big else TUNING["qpack_loop_8k"])


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 2 elsewhere (the interpreter: looping programs then walk several blocks)."""
    if device.type != "cuda":
        return 2
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def prepare_quantize_pack(
    src: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    head: torch.Tensor,
    out: torch.Tensor,
    *,
    noise: torch.Tensor | None,
) -> Callable[[int], None]:
    """The launch that writes the whole payload of ``src`` (flat float16/bfloat16/float32) into ``out``;
    call it with the noise seed, as often as ``src`` changes.

    ``head`` is the 40-byte header on the device; ``noise`` float32 (m,) or None
    for Philox noise from the seed. Non-finite buckets get a NaN scale and zero
    codes whatever ``config.nonfinite`` says (the caller raises). The tensors
    are bound (see :class:`Launch`): keep them alive and in place.
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
    rows, g, warps, cap, loop = _qpack_params(d)
    n_blocks = -(-nb // rows)
    n_even = (m // d) // rows  # blocks of full buckets only
    n_loop = min(n_even, _num_sms(src.device) * int(TUNING["qpack_loop_per_sm"])) if loop else 0
    clip = float(config.clip) if config.clip is not None else 0.0
    clip_bits = struct.unpack("<q", struct.pack("<d", clip))[0]  # the float64's bits, as the kernel reads them
    extra: dict[str, Any] = {} if interp else {"num_warps": warps, "enable_fp_fusion": False}
    if cap and not interp:
        extra["maxnreg"] = cap
    launch = Launch(
        _qpack_kernel,
        (max(1, n_loop + n_blocks - n_even if loop else n_blocks),),
        (src, u, table.levels, table.pairs, head, out, m, nb, n_even, ngroups, 0, clip_bits, codes_off, n_loop),
        dict(D=d, G=g, ROWS=rows, BITS=config.code_bits, L=config.num_levels,
             LINF=linf, CLIP=config.clip is not None, NOISE=noise is not None,
             LIB=not interp, ROUNDS=PHILOX_ROUNDS, LOOP=loop, BSEARCH=bool(TUNING["qpack_bsearch"])),
        extra,
        seed_at=_QPACK_SEED_ARG,
    )  # fmt: skip
    if n == m:
        return launch
    tail_out = out[codes_off + packed_size(m, config.code_bits) :]
    tail_src = src[m:]

    def with_tail(seed: int) -> None:
        launch(seed)
        tail_out.copy_(tail_src.to(torch.float32).view(torch.uint8))

    return with_tail


#: Position of ``seed`` in :func:`prepare_quantize_pack`'s kernel arguments.
_QPACK_SEED_ARG = 10


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
    """:func:`prepare_quantize_pack` launched once with ``seed``."""
    prepare_quantize_pack(src, table, config, head, out, noise=noise)(seed)


# ----------------------------------------------------------------------------------------------
# decode + sum


@triton.jit
def _payload_scale(row, bucket, mask, SCALAR: tl.constexpr, WORDS: tl.constexpr):
    """The float32 scale of ``bucket`` straight from its 4 payload bytes (little-endian; may be unaligned)."""
    if WORDS:
        sb = _load_le(row.to(tl.int64, bitcast=True) + HEADER + bucket * 4, bucket >= 0 if SCALAR else mask, 4)
    else:
        sp = row + HEADER + bucket * 4
        if SCALAR:
            sb = tl.load(sp).to(tl.int32)
            for i in tl.static_range(1, 4):
                sb = sb | (tl.load(sp + i).to(tl.int32) << (8 * i))
        else:
            sb = tl.load(sp, mask=mask, other=0).to(tl.int32)
            for i in tl.static_range(1, 4):
                sb = sb | (tl.load(sp + i, mask=mask, other=0).to(tl.int32) << (8 * i))
    return sb.to(tl.float32, bitcast=True)


@triton.jit
def _load_le(addr, mask, NBYTES: tl.constexpr):
    """The ``NBYTES`` (1..4) bytes at byte addresses ``addr`` (int64, any shape; any alignment) as a
    little-endian int32 (higher bits undefined; 0 where ``mask`` is false). Compiled only.

    Inline PTX reads the aligned 32-bit word holding the first byte, and the next one only when the
    bytes run into it, and funnel-shifts them: one or two loads instead of ``NBYTES`` byte loads. An
    aligned word that holds a wanted byte never leaves that byte's page.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .u64 a; .reg .u32 o, w0, w1; .reg .pred p, q;"
        " and.b64 a, $1, -4; cvt.u32.u64 o, $1; and.b32 o, o, 3;"
        " setp.ne.s32 p, $2, 0; setp.gt.u32 q, o, $3; and.pred q, q, p;"
        " mov.u32 w0, 0; mov.u32 w1, 0;"
        " @p ld.global.nc.u32 w0, [a]; @q ld.global.nc.u32 w1, [a+4];"
        " shl.b32 o, o, 3; shf.r.clamp.b32 $0, w0, w1, o; }",
        "=r,l,r,r",
        [addr, mask.to(tl.int32), tl.full(addr.shape, 4 - NBYTES, tl.int32)],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _group_word(row, codes_off, g, gm, BITS: tl.constexpr, WORDS: tl.constexpr):
    """The ``BITS`` code bytes of 8-code groups ``g`` (int64, any shape; masked by ``gm``) in the low bits
    of an int32 (``BITS <= 4``; higher bits undefined with ``WORDS``: aligned-word loads, compiled only)."""
    if WORDS:
        word = _load_le(row.to(tl.int64, bitcast=True) + codes_off + g * BITS, gm, BITS)
    else:
        gb = row + codes_off + g * BITS
        word = tl.load(gb, mask=gm, other=0).to(tl.int32)
        for i in tl.static_range(1, BITS):
            word = word | (tl.load(gb + i, mask=gm, other=0).to(tl.int32) << (8 * i))
    return word


@triton.jit
def _decode_one(
    row,
    bucket,
    g,
    gm,
    e,
    em,
    lut_ptr,
    codes_off,
    D: tl.constexpr,
    BITS: tl.constexpr,
    SCALAR: tl.constexpr,
    WORDS: tl.constexpr,
):
    """``s_w * l[c_w]`` for the (G, 8) coordinates ``e`` of one payload starting at ``row`` (one lookup per code)."""
    if BITS == 8:
        c = tl.load(row + codes_off + e, mask=em, other=0).to(tl.int32)
    else:
        if BITS <= 4:
            word = _group_word(row, codes_off, g, gm, BITS, WORDS)
            c = (word[:, None] >> (tl.arange(0, 8) * BITS)[None, :]) & ((1 << BITS) - 1)
        else:
            gb = row + codes_off + g * BITS
            word = tl.load(gb, mask=gm, other=0).to(tl.int64)
            for i in tl.static_range(1, BITS):
                word = word | (tl.load(gb + i, mask=gm, other=0).to(tl.int64) << (8 * i))
            c = ((word[:, None] >> (tl.arange(0, 8) * BITS).to(tl.int64)[None, :]) & ((1 << BITS) - 1)).to(tl.int32)
    return _payload_scale(row, bucket, em, SCALAR, WORDS) * tl.load(lut_ptr + c)


@triton.jit
def _pair_values(word, k: tl.constexpr, s, pair_ptr, BITS: tl.constexpr, LIB: tl.constexpr):
    """``s * l[c]`` of codes ``2k`` and ``2k + 1`` of the 8-code groups ``word`` (int32, any shape): one
    8-byte lookup in the two-code table."""
    lo, hi = _gather_pair(pair_ptr, (word >> (2 * BITS * k)) & ((1 << (2 * BITS)) - 1), LIB)
    return s * lo.to(tl.float32, bitcast=True), s * hi.to(tl.float32, bitcast=True)


@triton.jit
def _decode_pairs(
    row,
    bucket,
    g,
    gm,
    pair_ptr,
    codes_off,
    BITS: tl.constexpr,
    SCALAR: tl.constexpr,
    LIB: tl.constexpr,
    WORDS: tl.constexpr,
):
    """``s_w * l[c]`` of one payload's 8-code groups ``g`` (G,) as eight (G,) tensors: codes ``8g + 2k``
    and ``8g + 2k + 1`` for k = 0..3 (``BITS <= 4``, buckets of whole groups: one scale per group).

    Everything stays in the layout of ``g`` (each thread its own groups): no exchange between threads
    per payload; the caller joins the eight into (G, 8) once.
    """
    word = _group_word(row, codes_off, g, gm, BITS, WORDS)
    s = _payload_scale(row, bucket, gm, SCALAR, WORDS)
    a0, b0 = _pair_values(word, 0, s, pair_ptr, BITS, LIB)
    a1, b1 = _pair_values(word, 1, s, pair_ptr, BITS, LIB)
    a2, b2 = _pair_values(word, 2, s, pair_ptr, BITS, LIB)
    a3, b3 = _pair_values(word, 3, s, pair_ptr, BITS, LIB)
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def _add8(x, y):
    return x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3], x[4] + y[4], x[5] + y[5], x[6] + y[6], x[7] + y[7]


@triton.jit
def _join8(v, G: tl.constexpr):
    """(G, 8) of the eight (G,) pair halves of :func:`_decode_pairs`: column ``2k + t`` is ``v[2k + t]``.

    Each ``join`` adds a trailing axis; the result is indexed [g, k // 2, k % 2, t] before the reshape.
    """
    even = tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6]))  # t = 0: [g, k // 2, k % 2] = v[2k]
    odd = tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7]))  # t = 1
    return tl.reshape(tl.join(even, odd), (G, 8))


@triton.jit
def _header_mismatches(p_ptr, stride, want, hb, hm, w0, n_w, HW: tl.constexpr):
    rows = w0 + tl.arange(0, HW)
    m2 = (rows < n_w)[:, None] & hm[None, :]
    got = tl.load(p_ptr + rows.to(tl.int64)[:, None] * stride + hb[None, :], mask=m2, other=0)
    return tl.sum(tl.sum((m2 & (got != want[None, :])).to(tl.int32), axis=1), axis=0)


@triton.jit
def _headers_differ(p_ptr, stride, head_ptr, n_w, UNROLL: tl.constexpr, HW: tl.constexpr):
    """Whether any of the ``n_w`` payload headers differs from the expected 40 bytes (``HW`` rows at a time)."""
    hb = tl.arange(0, 64)
    hm = hb < HEADER
    want = tl.load(head_ptr + hb, mask=hm, other=0)
    nbad = 0
    if UNROLL > 0:
        for w0 in tl.static_range(0, UNROLL, HW):
            nbad += _header_mismatches(p_ptr, stride, want, hb, hm, w0, n_w, HW)
    else:
        for w0 in range(0, n_w, HW):
            nbad += _header_mismatches(p_ptr, stride, want, hb, hm, w0, n_w, HW)
    return nbad > 0


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (float32, float16 or bfloat16) to nearest even, as torch rounds;
    bfloat16 by integer arithmetic on the bits (Triton's interpreter truncates that conversion)."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)  # NaN stays NaN (the add could carry it into the sign or Inf)
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _decode_sum_kernel(
    p_ptr,
    stride_w,
    lut_ptr,
    pair_ptr,
    out_ptr,
    head_ptr,
    flag_ptr,
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
    PAIR: tl.constexpr,
    LIB: tl.constexpr,
    CHECK: tl.constexpr,
    HW: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Sum over payloads in order ``w = 0 .. W-1`` in float32 (``acc = s_0 * l``, then ``acc + s_w * l``), then ``* scale``."""
    pid = tl.program_id(0)
    G: tl.constexpr = BLOCK // 8
    SCALAR: tl.constexpr = D % BLOCK == 0
    g = pid.to(tl.int64) * G + tl.arange(0, G)
    gm = g < ngroups
    e = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    em = e < m
    stride = stride_w.to(tl.int64)
    if CHECK:
        bad = _headers_differ(p_ptr, stride, head_ptr, n_w, UNROLL, HW)
        tl.store(flag_ptr, 1, mask=bad & (pid == 0))
    else:
        bad = False
    if SCALAR:  # the block lies in one bucket
        bucket = (pid.to(tl.int64) * BLOCK) // D
    elif PAIR:  # buckets of whole groups: one per group
        bucket = (g * 8) // D
    else:
        bucket = e // D
    if PAIR:
        v = _decode_pairs(p_ptr, bucket, g, gm, pair_ptr, codes_off, BITS, SCALAR, LIB, WORDS)
        if UNROLL > 0:
            for w in tl.static_range(1, UNROLL):
                v = _add8(
                    v, _decode_pairs(p_ptr + w * stride, bucket, g, gm, pair_ptr, codes_off, BITS, SCALAR, LIB, WORDS)
                )
        else:
            for w in range(1, n_w):
                v = _add8(
                    v, _decode_pairs(p_ptr + w * stride, bucket, g, gm, pair_ptr, codes_off, BITS, SCALAR, LIB, WORDS)
                )
        acc = _join8(v, G)
    else:
        acc = _decode_one(p_ptr, bucket, g, gm, e, em, lut_ptr, codes_off, D, BITS, SCALAR, WORDS)
        if UNROLL > 0:
            for w in tl.static_range(1, UNROLL):
                acc = acc + _decode_one(
                    p_ptr + w * stride, bucket, g, gm, e, em, lut_ptr, codes_off, D, BITS, SCALAR, WORDS
                )
        else:
            for w in range(1, n_w):
                acc = acc + _decode_one(
                    p_ptr + w * stride, bucket, g, gm, e, em, lut_ptr, codes_off, D, BITS, SCALAR, WORDS
                )
    if HAS_SCALE:
        acc = acc * scale
    if CHECK:
        acc = tl.where(bad, float("nan"), acc)
    tl.store(out_ptr + e, _round_to(acc, out_ptr.dtype.element_ty), mask=em)


#: W up to this is unrolled at compile time (one compilation per W); larger W loops at run time
#: (compiled only: the interpreter always unrolls).
MAX_UNROLL = 16


def prepare_decode_sum(
    payloads: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    m: int,
    codes_off: int,
    out: torch.Tensor,
    scale: float,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Launch:
    """The launch that writes ``scale * sum_w s_w * l[c_w]`` of the ``m`` quantized coordinates into
    ``out[:m]`` (float32; float16 / bfloat16: the float32 value rounded to nearest even by the store);
    call it (no arguments) as often as ``payloads`` change.

    ``payloads`` uint8 (W, P), rows of unit stride (they may start at any byte). ``check``: None
    (headers checked by the caller), or ``(head, flag)``: the expected 40-byte
    header (uint8) and an int32 flag, both on the device; if any payload's
    header differs, every output is NaN and ``flag[0]`` is set to 1. The tensors
    are bound (see :class:`Launch`): keep them alive and in place.
    """
    if payloads.stride(1) != 1:
        msg = f"payload rows must have unit stride; got strides {payloads.stride()}"
        raise ValueError(msg)
    w_count = payloads.shape[0]
    stride = payloads.stride(0)
    block = int(TUNING["decode_block"])
    interp = _interpret()
    extra: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["decode_warps"]), "enable_fp_fusion": False}
    grid = (-(-m // block),)
    # pair lookups take one scale per group of 8 codes: buckets must be whole groups
    pair = table.code_pairs.numel() > 0 and config.bucket_size % 8 == 0 and w_count >= int(TUNING["decode_pairs_min_w"])
    head, flag = check if check is not None else (payloads, table.lookup)  # dummies when unchecked
    return Launch(
        _decode_sum_kernel,
        grid,
        (payloads, stride, table.lookup, table.code_pairs if pair else table.lookup, out, head, flag,
         m, -(-m // 8), codes_off, scale, w_count),
        dict(D=config.bucket_size, BITS=config.code_bits, BLOCK=block,
             UNROLL=w_count if w_count <= MAX_UNROLL or interp else 0, HAS_SCALE=scale != 1.0,
             PAIR=pair, LIB=not interp, CHECK=check is not None, HW=min(16, _next_pow2(w_count)),
             WORDS=not interp and bool(TUNING["decode_words"])),
        extra,
    )  # fmt: skip


def decode_sum(
    payloads: torch.Tensor,
    table: LevelTable,
    config: QuantizerConfig,
    m: int,
    codes_off: int,
    out: torch.Tensor,
    scale: float,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """:func:`prepare_decode_sum` launched once."""
    prepare_decode_sum(payloads, table, config, m, codes_off, out, scale, check)()


# ----------------------------------------------------------------------------------------------
# level sketch (alq-e / alq-einf statistics): per-bin sums of s^2, s^2 v, s^2 v^2
#
# Two kernels. ``_sketch_fused_kernel`` (buckets the quantize kernel handles, ``TUNING["sketch_fused"]``):
# each program takes whole buckets; a first pass computes their scales exactly as the quantize kernel
# does (its tile loads, ``_row_scales``, clipping and ``_reciprocal``), a second pass walks the same
# coordinates again in chunks (the re-read hits L1/L2) and adds their sums into histograms with
# float64 atomics: one launch, no torch scale ops. ``_sketch_kernel`` (any bucket size) takes the
# reciprocals and weights from torch (``alq_torch._sketch._normalize_inputs``).
#
# Histogram layouts (``TUNING["sketch_layout"]``), each in ``COPIES`` private copies (``pid % COPIES``)
# summed at the end: "planes" ``(COPIES, 3, NB)``, three scattered atomic adds per coordinate, one
# 32-byte sector each; "interleaved" ``(COPIES, NB, 4)``, a bin's three sums (and a spare slot) in one
# aligned 32-byte sector, added by one atomic instruction whose lanes hold (coordinate, sum) pairs:
# 8 coordinates per warp instruction, one sector each instead of three (fewer L2 requests, if the L2
# serves a sector's lanes together). ``TUNING["sketch_s0"] == "histogram"`` (fused, one bucket per
# program): the ``sum s^2`` of a bucket is ``s^2 * count`` per bin, counts from ``tl.histogram``
# (a register histogram per program, one dense atomic add per bin), so only ``S1``, ``S2`` are
# scattered.

# Launch parameters of the sketch kernels (benchmarks/gpu_sketch.py sweeps them; not yet tuned on a GPU).
TUNING.setdefault("sketch_kernel", True)  # alq_torch.sketch_sums on CUDA: the Triton kernels (False: the torch ops)
TUNING.setdefault("sketch_fused", True)  # scales inside the sketch kernel where the quantize kernel takes the bucket
TUNING.setdefault("sketch_layout", "interleaved")  # histogram layout: "interleaved" or "planes" (see above)
TUNING.setdefault("sketch_s0", "atomic")  # "atomic" or "histogram" (fused, one bucket per program; else atomic)
TUNING.setdefault("sketch_copies", 256)  # histogram copies the programs spread their atomic adds over (pid % copies)
TUNING.setdefault("sketch_block", 4096)  # _sketch_kernel: elements per program (power of two)
TUNING.setdefault("sketch_warps", 8)  # _sketch_kernel: num_warps
TUNING.setdefault("sketch_fused_elems", 4096)  # fused: minimum elements per program (whole buckets, as qpack_elems)
TUNING.setdefault("sketch_fused_warps", 8)  # fused: num_warps
TUNING.setdefault("sketch_chunk", 1024)  # coordinates per step (fused: of the second pass; power of two)

#: ``tl.histogram`` size for the per-program counts (a power of two >= NUM_BINS; the last bin collects the unused).
_SKETCH_HBINS = 2048
_SKETCH_LAYOUTS = ("planes", "interleaved")


@triton.jit
def _sketch_add(
    h_ptr, v, w, use, NB: tl.constexpr, MAG: tl.constexpr, EXP0: tl.constexpr, PER: tl.constexpr,
    LAYOUT: tl.constexpr, S0: tl.constexpr,
):  # fmt: skip
    """Add ``(w, w v, w v^2)`` of the 1-D coordinates ``v`` (float32, clamped; 0 where not ``use``) into
    the histogram copy at ``h_ptr`` (float64 atomics); ``w`` float64, same shape. ``S0``: also the ``w``
    (else the caller adds the counts). Returns the bins (NUM_BINS - 1 ... as ``alq_core.sketch_bins``).

    The bin from the bits of ``|v|`` exactly as ``alq_core.sketch_bins``; coordinates with ``v == 0``
    add nothing to ``S1``, ``S2``.
    """
    a = tl.abs(v).to(tl.int32, bitcast=True)
    e = a >> 23
    mag = tl.minimum(1 + (e - EXP0) * PER + ((a >> 18) & (PER - 1)), MAG - 1)
    mag = tl.where(e < EXP0, 0, mag)
    bins = tl.where(v < 0, MAG - 1 - mag, MAG + mag)
    v64 = v.to(tl.float64)
    wv = w * v64
    nz = use & (v != 0)
    if LAYOUT == 0:  # planes: (3, NB)
        base = h_ptr + bins
        if S0:
            tl.atomic_add(base, w, mask=use, sem="relaxed")
        tl.atomic_add(base + NB, wv, mask=nz, sem="relaxed")
        tl.atomic_add(base + 2 * NB, wv * v64, mask=nz, sem="relaxed")
    else:  # interleaved: (NB, 4), a bin's sums in one 32-byte sector; lanes take (coordinate, slot) pairs
        if S0:
            q = tl.arange(0, 4)[None, :]
            val = tl.where(q == 0, w[:, None], tl.where(q == 1, wv[:, None], (wv * v64)[:, None]))
            qm = tl.where(q == 0, use[:, None], nz[:, None] & (q < 3))
            tl.atomic_add(h_ptr + bins[:, None] * 4 + q, val, mask=qm, sem="relaxed")
        else:
            q = 1 + tl.arange(0, 2)[None, :]
            val = tl.where(q == 1, wv[:, None], (wv * v64)[:, None])
            tl.atomic_add(h_ptr + bins[:, None] * 4 + q, val, mask=nz[:, None] & (q > 0), sem="relaxed")
    return bins


@triton.jit
def _sketch_kernel(
    x_ptr, r_ptr, w_ptr, hist_ptr, m,
    D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, MAG: tl.constexpr,
    EXP0: tl.constexpr, PER: tl.constexpr, COPIES: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    """Add the sketch sums of ``BLOCK`` coordinates (``CHUNK`` at a time) into histogram copy ``pid % COPIES``.

    ``r`` float32 (nb,): the buckets' reciprocal scales (the core's ``reciprocal_scales``); ``w`` float64
    (nb,): ``s^2``, 0 in non-finite buckets. ``v = clamp(x * r, -1, 1)`` (one float32 rounding), and the
    bin from the bits of ``|v|`` exactly as ``alq_core.sketch_bins``. Coordinates of weight 0 add nothing.
    """
    pid = tl.program_id(0)
    h_ptr = hist_ptr + (pid % COPIES) * (4 * NB if LAYOUT else 3 * NB)
    for c in tl.range(0, BLOCK // CHUNK):
        offs = pid * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < m
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = offs // D
        r = tl.load(r_ptr + b, mask=mask, other=0.0)
        w = tl.load(w_ptr + b, mask=mask, other=0.0)
        use = mask & (w > 0)
        v = tl.where(use, tl.minimum(tl.maximum(x * r, -1.0), 1.0), 0.0)
        _sketch_add(h_ptr, v, w, use, NB, MAG, EXP0, PER, LAYOUT, True)


@triton.jit
def _sketch_block(
    x_ptr, r_ptr, w_ptr, t_ptr, bad_ptr, h_ptr, rows, m, nb, ngroups, clip_bits,
    D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, LINF: tl.constexpr, CLIP: tl.constexpr,
    LIB: tl.constexpr, MASKED: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, MAG: tl.constexpr,
    EXP0: tl.constexpr, PER: tl.constexpr, LAYOUT: tl.constexpr, S0HIST: tl.constexpr, HBINS: tl.constexpr,
):  # fmt: skip
    """The sketch of buckets ``rows`` (whole buckets, ``ROWS`` of them): scales, then sums.

    Pass 1 is the quantize kernel's (``_qpack_tile``): the tile as two (ROWS, G, 4) halves, the scale
    ``s`` (before clipping: non-finite marks a bad bucket, stored in ``bad``), the clip threshold ``t``
    and the scale after clipping, ``r = float32(1 / s)``, ``w = float64(s)^2`` (0 in bad buckets).
    Pass 2 reads the coordinates again, ``CHUNK`` at a time in 1-D, clips them with ``t``, and adds
    ``v = clamp(x * r, -1, 1)``. With one bucket (``ROWS == 1``) ``r``, ``w``, ``t`` stay scalars;
    otherwise they go through ``r_ptr``, ``w_ptr``, ``t_ptr`` (per bucket) and a barrier.
    """
    a, b = _load_tile(x_ptr, rows, m, nb, ngroups, D, G, MASKED)
    rmask = rows < nb
    s = _row_scales(a, b, LINF, LIB)
    good = s < float("inf")  # NaN and Inf (and overflow) mark a bad bucket, as the core's isfinite
    tl.store(bad_ptr + rows, (~good).to(tl.int8), mask=rmask)
    if CLIP:
        _, _, mlo, mhi, _ = _group_tile(rows, m, nb, ngroups, D, G, MASKED)
        clip = clip_bits.to(tl.int64).to(tl.float64, bitcast=True)
        cnt = tl.sum(tl.sum(mlo.to(tl.int32) + mhi.to(tl.int32), axis=2), axis=1)
        cnt64 = tl.maximum(cnt, 1).to(tl.float64)
        mean = _div64(tl.sum(_sum64_groups(a, mlo) + _sum64_groups(b, mhi), axis=1), cnt64, LIB)
        sq = tl.sum(_sqdev_groups(a, mlo, mean) + _sqdev_groups(b, mhi, mean), axis=1)
        t = (clip * _sqrt64(_div64(sq, cnt64, LIB), LIB)).to(tl.float32)
        s = _row_scales(_clip_half(a, mlo, t), _clip_half(b, mhi, t), LINF, LIB)
    else:
        t = tl.zeros(s.shape, tl.float32)
    ok = rmask & good & (s < float("inf"))
    r = tl.where(ok, _reciprocal(s), 0.0)
    s64 = s.to(tl.float64)
    w = tl.where(ok, s64 * s64, 0.0)
    lo = tl.program_id(0) * (ROWS * D)  # the block's first coordinate
    NCH: tl.constexpr = (ROWS * D + CHUNK - 1) // CHUNK
    ar = tl.arange(0, CHUNK)
    if ROWS == 1:
        r1 = tl.sum(r, axis=0)
        w1 = tl.sum(w, axis=0)
        t1 = tl.sum(t, axis=0)
        if w1 > 0:
            if S0HIST:
                counts = tl.zeros((HBINS,), tl.int32)
            for c in tl.range(0, NCH):
                k = c * CHUNK + ar
                offs = lo + k
                mask = (k < D) & (offs < m)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if CLIP:
                    x = tl.minimum(tl.maximum(x, -t1), t1)
                v = tl.where(mask, tl.minimum(tl.maximum(x * r1, -1.0), 1.0), 0.0)
                wel = tl.zeros((CHUNK,), tl.float64) + w1
                bins = _sketch_add(h_ptr, v, wel, mask, NB, MAG, EXP0, PER, LAYOUT, not S0HIST)
                if S0HIST:
                    counts += tl.histogram(tl.where(mask, bins, HBINS - 1), HBINS)
            if S0HIST:
                hb = tl.arange(0, HBINS)
                hs = hb * 4 if LAYOUT else hb
                tl.atomic_add(h_ptr + hs, w1 * counts.to(tl.float64), mask=(hb < NB) & (counts > 0), sem="relaxed")
    else:
        tl.store(r_ptr + rows, r, mask=rmask)
        tl.store(w_ptr + rows, w, mask=rmask)
        if CLIP:
            tl.store(t_ptr + rows, t, mask=rmask)
        tl.debug_barrier()  # the block's own global writes are visible to all its threads after the barrier
        for c in tl.range(0, NCH):
            k = c * CHUNK + ar
            offs = lo + k
            mask = (k < ROWS * D) & (offs < m)
            bk = offs // D
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if CLIP:
                tt = tl.load(t_ptr + bk, mask=mask, other=0.0)
                x = tl.minimum(tl.maximum(x, -tt), tt)
            wel = tl.load(w_ptr + bk, mask=mask, other=0.0)
            use = mask & (wel > 0)
            v = tl.where(use, tl.minimum(tl.maximum(x * tl.load(r_ptr + bk, mask=mask, other=0.0), -1.0), 1.0), 0.0)
            _sketch_add(h_ptr, v, wel, use, NB, MAG, EXP0, PER, LAYOUT, True)


@triton.jit(do_not_specialize=["clip_bits"])
def _sketch_fused_kernel(
    x_ptr, r_ptr, w_ptr, t_ptr, bad_ptr, hist_ptr, m, nb, n_even, ngroups, clip_bits,
    D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, LINF: tl.constexpr, CLIP: tl.constexpr,
    LIB: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, MAG: tl.constexpr, EXP0: tl.constexpr,
    PER: tl.constexpr, COPIES: tl.constexpr, LAYOUT: tl.constexpr, S0HIST: tl.constexpr, HBINS: tl.constexpr,
):  # fmt: skip
    """Program ``pid``: buckets ``pid * ROWS ..`` (blocks below ``n_even`` hold only full buckets: unmasked
    tile loads), into histogram copy ``pid % COPIES``. See :func:`_sketch_block`."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    h_ptr = hist_ptr + (pid % COPIES) * (4 * NB if LAYOUT else 3 * NB)
    if pid < n_even:
        _sketch_block(x_ptr, r_ptr, w_ptr, t_ptr, bad_ptr, h_ptr, rows, m, nb, ngroups, clip_bits, D, G, ROWS,
                      LINF, CLIP, LIB, False, CHUNK, NB, MAG, EXP0, PER, LAYOUT, S0HIST, HBINS)  # fmt: skip
    else:
        _sketch_block(x_ptr, r_ptr, w_ptr, t_ptr, bad_ptr, h_ptr, rows, m, nb, ngroups, clip_bits, D, G, ROWS,
                      LINF, CLIP, LIB, True, CHUNK, NB, MAG, EXP0, PER, LAYOUT, S0HIST, HBINS)  # fmt: skip


def _sketch_hist(copies: int, layout: int, device: torch.device) -> torch.Tensor:
    from alq_core._sketch import NUM_BINS

    shape = (copies, NUM_BINS, 4) if layout else (copies, 3, NUM_BINS)
    return torch.zeros(shape, dtype=torch.float64, device=device)


def _sketch_total(hist: torch.Tensor, layout: int) -> torch.Tensor:
    """The copies summed: float64 ``(3, NUM_BINS)``, contiguous."""
    if layout:
        return hist.sum(dim=0)[:, :3].t().contiguous()
    return hist.sum(dim=0)


def _sketch_layout() -> int:
    name = TUNING["sketch_layout"]
    if name not in _SKETCH_LAYOUTS:
        msg = f"TUNING['sketch_layout'] must be one of {_SKETCH_LAYOUTS}; got {name!r}"
        raise ValueError(msg)
    return _SKETCH_LAYOUTS.index(name)


def _sketch_consts() -> dict[str, int]:
    from alq_core._sketch import MAG_BINS, NUM_BINS, OCTAVES, PER_OCTAVE

    return {"NB": NUM_BINS, "MAG": MAG_BINS, "EXP0": 127 - OCTAVES, "PER": PER_OCTAVE}


def _check_sketch_size(m: int, span: int) -> None:
    """Offsets stay int32: ``m`` plus what a program may read past it."""
    if m >= 2**31 - 2 * max(span, MAX_FUSED_BUCKET):
        msg = f"the sketch kernel handles fewer than 2**31 coordinates per call; got {m}"
        raise ValueError(msg)


def sketch_sums(body: torch.Tensor, recip: torch.Tensor, weights: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """Per-bin sums ``(sum w, sum w v, sum w v^2)`` of the coordinates ``body``: float64 ``(3, NUM_BINS)``.

    Parameters
    ----------
    body : Tensor of float16, bfloat16 or float32, shape (m,), contiguous
        The quantized coordinates (clipped already where the config clips).
    recip : Tensor of float32, shape (ceil(m / bucket_size),)
        ``float32(1 / s)`` per bucket, 0 where not finite.
    weights : Tensor of float64, same shape as ``recip``
        ``s^2`` per bucket, 0 in non-finite buckets.
    bucket_size : int

    The summation order depends on the scheduling of the atomic adds: results agree with
    :func:`alq_core.compute_sketch` to float64 rounding, not bit for bit.
    """
    m = body.numel()
    block = int(TUNING["sketch_block"])
    _check_sketch_size(m, block)
    copies = int(TUNING["sketch_copies"])
    layout = _sketch_layout()
    hist = _sketch_hist(copies, layout, body.device)
    if m:
        interp = _interpret()
        extra: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["sketch_warps"]), "enable_fp_fusion": False}
        _launch(
            _sketch_kernel,
            (-(-m // block),),
            (body, recip, weights, hist, m),
            dict(D=bucket_size, BLOCK=block, CHUNK=min(block, int(TUNING["sketch_chunk"])), COPIES=copies,
                 LAYOUT=layout, **_sketch_consts()),
            extra,
        )  # fmt: skip
    return _sketch_total(hist, layout)


def sketch_fused(body: torch.Tensor, config: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch sums of the quantized coordinates ``body`` with the scales computed in the kernel.

    Parameters
    ----------
    body : Tensor of float16, bfloat16 or float32, shape (m,), contiguous
        The first ``config.num_quantized(n)`` coordinates, unclipped (the kernel clips as the
        quantize kernel does).
    config : QuantizerConfig
        A quantized method with :func:`fused_supported`.

    Returns
    -------
    sums : Tensor of float64, shape (3, NUM_BINS)
        As :func:`sketch_sums` (agree with :func:`alq_core.compute_sketch` to float64 rounding).
    bad : Tensor of bool, shape (ceil(m / bucket_size),)
        Buckets whose scale is not finite (NaN or Inf inside, or overflow); they add nothing.
    """
    m = body.numel()
    d = config.bucket_size
    nb = -(-m // d)
    copies = int(TUNING["sketch_copies"])
    layout = _sketch_layout()
    chunk = int(TUNING["sketch_chunk"])
    dp2 = _next_pow2(d)
    rows = max(1, int(TUNING["sketch_fused_elems"]) // dp2)
    _check_sketch_size(m, rows * d + chunk)
    s0 = TUNING["sketch_s0"]
    if s0 not in ("atomic", "histogram"):
        msg = f"TUNING['sketch_s0'] must be 'atomic' or 'histogram'; got {s0!r}"
        raise ValueError(msg)
    hist = _sketch_hist(copies, layout, body.device)
    bad = torch.empty(nb, dtype=torch.int8, device=body.device)
    if m:
        interp = _interpret()
        clip = float(config.clip) if config.clip is not None else 0.0
        # per-bucket r, w, t pass through memory only when a program holds several buckets
        scratch = rows > 1
        r = torch.empty(nb if scratch else 1, dtype=torch.float32, device=body.device)
        w = torch.empty(nb if scratch else 1, dtype=torch.float64, device=body.device)
        t = torch.empty(nb if scratch and config.clip is not None else 1, dtype=torch.float32, device=body.device)
        extra: dict[str, Any] = {} if interp else {"num_warps": int(TUNING["sketch_fused_warps"]),
                                                   "enable_fp_fusion": False}  # fmt: skip
        _launch(
            _sketch_fused_kernel,
            (-(-nb // rows),),
            (body, r, w, t, bad, hist, m, nb, (m // d) // rows, -(-m // 8),
             struct.unpack("<q", struct.pack("<d", clip))[0]),
            dict(D=d, G=dp2 // 8, ROWS=rows, LINF=config.norm == "linf", CLIP=config.clip is not None,
                 LIB=not interp, CHUNK=chunk, COPIES=copies, LAYOUT=layout,
                 S0HIST=s0 == "histogram" and rows == 1, HBINS=_SKETCH_HBINS, **_sketch_consts()),
            extra,
        )  # fmt: skip
    return _sketch_total(hist, layout), bad.bool()
