"""Quantize, pack, encode, decode and dequantize CuPy arrays, byte-compatible with ``alq_core``.

Every function mirrors the function of the same name in ``alq_core`` (same
arguments, same arithmetic, same payload bytes, same error messages), with
CuPy arrays in place of NumPy arrays. Inputs may be CuPy arrays, any GPU array
that speaks DLPack (torch, JAX: used without a copy), or host arrays (copied).
Noise is an input: pass ``noise`` (float32 uniforms in [0, 1), one per quantized
coordinate) to compare with the core code for code, or a ``seed`` for the
device's counter-based stream (:func:`alq_cupy.counter_noise_host` reproduces it
on the host).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from alq_core import (
    HEADER_SIZE,
    PayloadError,
    QuantizerConfig,
    packed_size,
    payload_size,
    table_checksum,
    validate_levels,
)
from alq_core import QuantizedTensor as CoreQuantizedTensor
from numpy.typing import NDArray

from . import _kernels as K
from ._backend import as_cupy, require_cupy
from ._header import check_header, header_bytes, payload_offsets
from ._noise import check_seed, fresh_seed


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized array on the GPU: the CuPy twin of ``alq_core.QuantizedTensor``.

    Attributes
    ----------
    codes : cupy.ndarray of uint8, shape (m,)
        Level indices of the ``m = config.num_quantized(n)`` quantized coordinates.
    scales : cupy.ndarray of float32, shape (config.num_buckets(n),)
        One scale per quantized bucket; NaN marks a non-finite bucket.
    tail : cupy.ndarray of float32, shape (n - m,)
        Coordinates sent exactly.
    n : int
        Element count.
    config : alq_core.QuantizerConfig
    shape : tuple of int
        Shape of the original array.
    """

    codes: Any
    scales: Any
    tail: Any
    n: int
    config: QuantizerConfig
    shape: tuple[int, ...]

    @property
    def nonfinite_buckets(self) -> int:
        """Number of buckets marked non-finite (NaN scale); synchronizes."""
        cp = require_cupy()
        return int(cp.count_nonzero(cp.isnan(self.scales)))

    def to_core(self) -> CoreQuantizedTensor:
        """A host copy as an ``alq_core.QuantizedTensor`` (for comparisons and CPU decoding)."""
        return CoreQuantizedTensor(
            self.codes.get(), self.scales.get(), self.tail.get(), self.n, self.config, tuple(self.shape)
        )


# ----------------------------------------------------------------------------------------------- inputs


def _check_config(config: object) -> QuantizerConfig:
    if not isinstance(config, QuantizerConfig):
        msg = f"`config` must be a QuantizerConfig; got {type(config).__name__}"
        raise TypeError(msg)
    return config


def _flat32(x: Any, name: str = "x") -> tuple[Any, tuple[int, ...]]:
    """Flat, contiguous float32 CuPy view (a copy only when needed) and the original shape."""
    cp = require_cupy()
    arr = as_cupy(x)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        msg = f"`{name}` must be a real floating-point array (float16/32/64); got dtype {arr.dtype}"
        raise TypeError(msg)
    shape = tuple(int(s) for s in arr.shape)
    flat = arr.reshape(-1)
    if flat.dtype != cp.float32:
        flat = flat.astype(cp.float32)
    return cp.ascontiguousarray(flat), shape


def _to_host(a: Any) -> NDArray[Any]:
    cp = require_cupy()
    if isinstance(a, cp.ndarray):
        return np.asarray(a.get())
    if hasattr(a, "__dlpack_device__") and int(a.__dlpack_device__()[0]) in (2, 13):
        return np.asarray(as_cupy(a).get())
    if hasattr(a, "detach"):
        return np.asarray(a.detach().cpu().numpy())
    return np.asarray(a)


_table_lock = threading.Lock()
_tables: OrderedDict[tuple[int, bytes], Any] = OrderedDict()
_headers: OrderedDict[tuple[int, bytes], Any] = OrderedDict()
_CACHE = 64


def _cached_device_bytes(cache: OrderedDict[tuple[int, bytes], Any], data: bytes, dtype: Any) -> Any:
    cp = require_cupy()
    key = (int(cp.cuda.runtime.getDevice()), data)
    with _table_lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    dev = cp.asarray(np.frombuffer(data, dtype=dtype))
    with _table_lock:
        cache[key] = dev
        while len(cache) > _CACHE:
            cache.popitem(last=False)
    return dev


def level_table(
    levels: Any, config: QuantizerConfig, *, what: str = "needs a level table"
) -> tuple[NDArray[np.float32], Any, int]:
    """Validate a level table; return (host float32 table, cached device copy, CRC-32).

    ``levels`` may be NumPy, CuPy, DLPack or a list; a device table is copied to
    the host to be validated (pass NumPy tables on hot paths).
    """
    if levels is None:
        msg = f"method {config.method!r} {what}; got None"
        raise ValueError(msg)
    table = validate_levels(_to_host(levels), num_levels=config.num_levels)
    dev = _cached_device_bytes(_tables, table.astype("<f4").tobytes(), np.float32)
    return table, dev, table_checksum(table)


def device_header(config: QuantizerConfig, n: int, table_version: int, table_crc: int) -> Any:
    """The 40-byte header as a cached device array (uint8)."""
    return _cached_device_bytes(_headers, header_bytes(config, n, int(table_version), int(table_crc)), np.uint8)


def _noise_arg(m: int, noise: Any, seed: Any) -> tuple[Any, int | None]:
    """(device noise array, None) or (None, seed)."""
    cp = require_cupy()
    if noise is not None:
        if seed is not None:
            msg = "pass either `noise` or `seed`, not both"
            raise ValueError(msg)
        u = as_cupy(noise)
        if u.dtype != cp.float32:
            u = u.astype(cp.float32)
        u = cp.ascontiguousarray(u.reshape(-1))
        if u.size != m:
            msg = f"`noise` must hold one uniform value per quantized coordinate ({m}); got {u.size}"
            raise ValueError(msg)
        if m:
            lo, hi = (float(v) for v in cp.stack([u.min(), u.max()]).get())
            if not (lo >= 0.0 and hi < 1.0):
                msg = "`noise` values must lie in [0, 1); draw them with rng.random(n, dtype=np.float32)"
                raise ValueError(msg)
        return u, None
    return None, (fresh_seed() if seed is None else check_seed(seed))


def _raise_nonfinite(scales: Any, config: QuantizerConfig, m: int) -> None:
    """alq_core's ``nonfinite='raise'`` error, from the NaN-marked scales (synchronizes)."""
    cp = require_cupy()
    bad = cp.isnan(scales)
    count = int(cp.count_nonzero(bad))
    if count:
        first = int(cp.argmax(bad))
        d = config.bucket_size
        msg = (
            f"bucket {first} (coordinates {first * d}.."
            f"{min(m, (first + 1) * d) - 1}) holds NaN or Inf "
            f"({count} such buckets); pass nonfinite='propagate' to mark them instead"
        )
        raise ValueError(msg)


def _out_bytes(out: Any, size: int) -> Any:
    cp = require_cupy()
    if out is None:
        return cp.empty(size, dtype=cp.uint8)
    buf = as_cupy(out)
    if buf.dtype != cp.uint8 or buf.ndim != 1 or buf.size != size or (size and buf.strides[0] != 1):
        msg = (
            f"`out` must be a contiguous 1-D uint8 array of payload_size = {size} bytes; "
            f"got dtype {buf.dtype}, shape {buf.shape}"
        )
        raise ValueError(msg)
    return buf


# ----------------------------------------------------------------------------------------------- ops


def bucket_scales(x: Any, config: QuantizerConfig) -> Any:
    """Per-bucket scales of a flat float32 array, before clipping (``alq_core.bucket_scales``).

    Returns
    -------
    cupy.ndarray of float32, shape (ceil(x.size / config.bucket_size),)
    """
    _check_config(config)
    flat, _ = _flat32(x)
    return K.launch_bucket_scales(flat, config.bucket_size, config.norm == "linf")


def quantize(
    x: Any, levels: Any, config: QuantizerConfig, *, noise: Any = None, seed: int | None = None
) -> QuantizedTensor:
    """Quantize bucket by bucket with unbiased stochastic rounding (``alq_core.quantize``).

    Parameters
    ----------
    x : CuPy/DLPack/host array of float16, float32 or float64, any shape
        Flattened in C order.
    levels : array_like, shape (L,), or None for ``fp32``
    config : alq_core.QuantizerConfig
    noise : array of float32, shape (config.num_quantized(x.size),), optional
        Uniforms in [0, 1), one per quantized coordinate: the codes then equal
        ``alq_core.quantize(x, levels, config, noise=noise)``'s exactly.
    seed : int, optional
        Seed of the device's counter-based noise when ``noise`` is not given
        (a fresh random seed when neither is).

    Returns
    -------
    QuantizedTensor
        With CuPy arrays on the current device.
    """
    cp = require_cupy()
    config = _check_config(config)
    flat, shape = _flat32(x)
    n = int(flat.size)
    m = config.num_quantized(n)
    if not config.quantized:
        return QuantizedTensor(cp.zeros(0, cp.uint8), cp.zeros(0, cp.float32), flat.copy(), n, config, shape)
    _, dev, _ = level_table(levels, config)
    u, seed_val = _noise_arg(m, noise, seed)
    scales = cp.empty(config.num_buckets(n), dtype=cp.float32)
    codes = cp.empty(m, dtype=cp.uint8)
    K.launch_quantize(
        flat,
        m,
        config.bucket_size,
        dev,
        config.num_levels,
        config.norm == "linf",
        _clip(config),
        config.code_bits,
        u,
        seed_val,
        scales=scales,
        codes=codes,
    )
    if config.nonfinite == "raise":
        _raise_nonfinite(scales, config, m)
    return QuantizedTensor(codes, scales, flat[m:].copy(), n, config, shape)


def _clip(config: QuantizerConfig) -> float | None:
    return None if config.clip is None else float(config.clip)


def dequantize(q: QuantizedTensor, levels: Any) -> Any:
    """Rebuild the array: ``scale * levels[code]`` per coordinate, exact tail appended.

    Returns
    -------
    cupy.ndarray of float32, shape ``q.shape``
    """
    cp = require_cupy()
    config = q.config
    if not config.quantized:
        return q.tail.reshape(q.shape).copy()
    _, dev, _ = level_table(levels, config, what="needs the level table to dequantize")
    m = int(q.codes.size)
    out = cp.empty(q.n, dtype=cp.float32)
    K.launch_dequantize(
        cp.ascontiguousarray(q.codes), cp.ascontiguousarray(q.scales), config.bucket_size, dev, config.num_levels, out
    )
    out[m:] = q.tail
    return out.reshape(q.shape)


def pack_codes(codes: Any, bits: int) -> Any:
    """Pack codes into an LSB-first bit stream (``alq_core.pack_codes``).

    Parameters
    ----------
    codes : array of uint8, shape (m,)
        Values in ``[0, 2**bits)``.
    bits : int
        1..8.

    Returns
    -------
    cupy.ndarray of uint8, shape (packed_size(m, bits),)
    """
    cp = require_cupy()
    c = as_cupy(codes)
    if c.ndim != 1:
        msg = f"codes must be 1-D; got shape {c.shape}"
        raise ValueError(msg)
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        msg = f"`bits` must be in 1..8; got {bits!r}"
        raise ValueError(msg)
    if c.size and int(c.max()) >= (1 << bits):
        msg = f"codes must be < 2**bits = {1 << bits}; got max {int(c.max())}"
        raise ValueError(msg)
    c = cp.ascontiguousarray(c.astype(cp.uint8, copy=False))
    out = cp.empty(packed_size(int(c.size), int(bits)), dtype=cp.uint8)
    K.launch_pack(c, int(bits), out)
    return out


def unpack_codes(packed: Any, bits: int, count: int) -> Any:
    """Inverse of :func:`pack_codes`: ``count`` codes from ``packed_size(count, bits)`` bytes."""
    cp = require_cupy()
    p = cp.ascontiguousarray(as_cupy(packed).reshape(-1).astype(cp.uint8, copy=False))
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        msg = f"`bits` must be in 1..8; got {bits!r}"
        raise ValueError(msg)
    if p.size != packed_size(count, bits):
        msg = f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes; got {p.size}"
        raise ValueError(msg)
    out = cp.empty(int(count), dtype=cp.uint8)
    K.launch_unpack(p, int(bits), int(count), out)
    return out


def encode(q: QuantizedTensor, levels: Any = None, *, table_version: int = 0) -> Any:
    """Serialize to a payload on the device: the same bytes as ``alq_core.encode``.

    Returns
    -------
    cupy.ndarray of uint8, shape (payload_size(q.config, q.n),)
    """
    cp = require_cupy()
    config = q.config
    crc = 0
    if config.quantized:
        if levels is None:
            msg = f"encode needs the level table of method {config.method!r} for its checksum; got None"
            raise ValueError(msg)
        _, _, crc = level_table(levels, config)
    n = q.n
    off_s, off_c, off_t, end = payload_offsets(config, n)
    out = cp.empty(end, dtype=cp.uint8)
    out[:HEADER_SIZE] = device_header(config, n, table_version, crc)
    if config.quantized:
        out[off_s:off_c] = cp.ascontiguousarray(q.scales.astype(cp.float32, copy=False)).view(cp.uint8)
        K.launch_pack(cp.ascontiguousarray(q.codes), config.code_bits, out[off_c:off_t])
    if end > off_t:
        out[off_t:end] = cp.ascontiguousarray(q.tail.astype(cp.float32, copy=False)).view(cp.uint8)
    return out


def _payload_bytes(payload: Any) -> Any:
    cp = require_cupy()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return cp.asarray(np.frombuffer(bytes(payload), dtype=np.uint8))
    buf = as_cupy(payload)
    if buf.dtype != cp.uint8 or buf.ndim != 1:
        msg = f"payload array must be 1-D uint8; got {buf.dtype} with shape {buf.shape}"
        raise TypeError(msg)
    return buf


def decode(
    payload: Any,
    *,
    config: QuantizerConfig | None = None,
    levels: Any = None,
    table_version: int | None = None,
) -> QuantizedTensor:
    """Parse a device payload into a :class:`QuantizedTensor` of shape ``(n,)`` (``alq_core.decode``).

    Every check of the core raises the same :class:`alq_core.PayloadError`; the
    header is checked on the host from a 40-byte copy, the body on the device.
    """
    cp = require_cupy()
    buf = _payload_bytes(payload)
    length = int(buf.size)
    head = buf[: min(length, HEADER_SIZE)].get()
    crc = None
    if levels is not None:
        crc = table_checksum(validate_levels(_to_host(levels)))
    hdr, cfg = check_header(head, length, config=config, table_crc=crc, table_version=table_version)
    n = hdr.count
    m = cfg.num_quantized(n)
    off_s, off_c, off_t, end = payload_offsets(cfg, n)
    if cfg.quantized:
        scales = buf[off_s:off_c].copy().view(cp.float32)
        if bool(cp.any(scales < 0)):
            msg = "payload holds a negative scale: the body is corrupted"
            raise PayloadError(msg)
        codes = unpack_codes(buf[off_c:off_t], cfg.code_bits, m)
        if m:
            top = int(codes.max())
            if top >= cfg.num_levels:
                msg = f"payload holds code {top} but the table has {cfg.num_levels} levels"
                raise PayloadError(msg)
    else:
        scales = cp.zeros(0, dtype=cp.float32)
        codes = cp.zeros(0, dtype=cp.uint8)
    tail = buf[off_t:end].copy().view(cp.float32)
    return QuantizedTensor(codes, scales, tail, n, cfg, (n,))


def quantize_encode(
    x: Any,
    levels: Any,
    config: QuantizerConfig,
    *,
    table_version: int = 0,
    noise: Any = None,
    seed: int | None = None,
    out: Any = None,
) -> Any:
    """Quantize and serialize in one pass (the fused hot path).

    Parameters
    ----------
    x : CuPy/DLPack/host array, any shape, float16/32/64
    levels : array_like (L,) or None for ``fp32``
    config : alq_core.QuantizerConfig
    table_version : int
        Level-table version written in the header.
    noise, seed
        As in :func:`quantize`.
    out : uint8 array of payload_size bytes, optional
        Written in place (a view into a bigger buffer is fine, any alignment).

    Returns
    -------
    cupy.ndarray of uint8, shape (payload_size(config, x.size),)
        With ``noise``: the bytes of ``alq_core.encode(alq_core.quantize(x, levels, config,
        noise=noise), levels, table_version=table_version)``.
    """
    cp = require_cupy()
    config = _check_config(config)
    flat, _ = _flat32(x)
    n = int(flat.size)
    size = payload_size(config, n)
    if isinstance(table_version, bool) or not isinstance(table_version, (int, np.integer)) or table_version < 0:
        msg = f"`table_version` must be a non-negative integer; got {table_version!r}"
        raise ValueError(msg)
    if not config.quantized:
        buf = _out_bytes(out, size)
        buf[:HEADER_SIZE] = device_header(config, n, int(table_version), 0)
        if n:
            buf[HEADER_SIZE:] = flat.view(cp.uint8)
        return buf
    _, dev, crc = level_table(levels, config)
    m = config.num_quantized(n)
    u, seed_val = _noise_arg(m, noise, seed)
    buf = _out_bytes(out, size)
    hdr = device_header(config, n, int(table_version), crc)
    off_s, off_c, off_t, end = payload_offsets(config, n)
    d = config.bucket_size
    common = (flat, m, d, dev, config.num_levels, config.norm == "linf", _clip(config), config.code_bits, u, seed_val)
    if d % 8 == 0:
        K.launch_quantize(*common, scale_bytes=buf[off_s:], packed=buf[off_c:], header_src=hdr, header_dst=buf)
    else:
        codes = cp.empty(m, dtype=cp.uint8)
        K.launch_quantize(*common, scale_bytes=buf[off_s:], codes=codes, header_src=hdr, header_dst=buf)
        K.launch_pack(codes, config.code_bits, buf[off_c:off_t])
    if end > off_t:
        buf[off_t:end] = flat[m:].view(cp.uint8)
    if config.nonfinite == "raise" and off_c > off_s:
        _raise_nonfinite(buf[off_s:off_c].copy().view(cp.float32), config, m)
    return buf


def decode_sum_async(
    payloads: Any,
    levels: Any,
    config: QuantizerConfig,
    n: int,
    *,
    table_version: int | None = None,
    out: Any = None,
    scale: float = 1.0,
    check_headers: bool = True,
) -> tuple[Any, Any]:
    """:func:`decode_sum` without the final synchronization: returns (out, error flags int32 (1,)).

    Error flag bits: 1 a negative scale, 2 a code outside the table.
    """
    cp = require_cupy()
    config = _check_config(config)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        msg = f"`n` must be a non-negative integer; got {n!r}"
        raise ValueError(msg)
    n = int(n)
    pay = as_cupy(payloads)
    if pay.ndim == 1:
        pay = pay.reshape(1, -1)
    size = payload_size(config, n)
    if pay.dtype != cp.uint8 or pay.ndim != 2 or pay.shape[1] != size:
        msg = f"`payloads` must be uint8 of shape (W, payload_size = {size}); got dtype {pay.dtype}, shape {pay.shape}"
        raise ValueError(msg)
    if pay.strides[1] != 1 or pay.strides[0] < size:
        pay = cp.ascontiguousarray(pay)
    w = int(pay.shape[0])
    if w < 1:
        msg = "`payloads` must hold at least one payload; got 0 rows"
        raise ValueError(msg)
    dev = None
    crc = 0
    if config.quantized:
        _, dev, crc = level_table(levels, config, what="needs the level table to dequantize")
    if check_headers:
        heads = pay[:, :HEADER_SIZE].get()
        for row in heads:
            check_header(row, size, config=config, table_crc=crc, table_version=table_version, count=n)
    if out is None:
        res = cp.empty(n, dtype=cp.float32)
    else:
        res = as_cupy(out)
        if res.dtype != cp.float32 or res.size != n or not res.flags.c_contiguous:
            msg = f"`out` must be a contiguous float32 array of {n} elements; got dtype {res.dtype}, shape {res.shape}"
            raise ValueError(msg)
    err = cp.zeros(1, dtype=cp.int32)
    m = config.num_quantized(n)
    off_s, off_c, off_t, _ = payload_offsets(config, n)
    bits = config.code_bits if config.quantized else 8
    K.launch_decode_sum(
        pay,
        int(pay.strides[0]),
        w,
        n,
        m,
        config.bucket_size,
        bits,
        config.num_levels,
        (off_s, off_c, off_t),
        dev,
        None if float(scale) == 1.0 else float(scale),
        res,
        err,
    )
    return res, err


def raise_decode_flags(flags: int) -> None:
    """Turn :func:`decode_sum_async`'s error bits into the core's PayloadError."""
    if flags & 1:
        msg = "payload holds a negative scale: the body is corrupted"
        raise PayloadError(msg)
    if flags & 2:
        msg = "payload holds a code outside the level table: the body is corrupted"
        raise PayloadError(msg)


def decode_sum(
    payloads: Any,
    levels: Any,
    config: QuantizerConfig,
    n: int,
    *,
    table_version: int | None = None,
    out: Any = None,
    scale: float = 1.0,
) -> Any:
    """Decode W payloads and add them up: ``scale * sum_w dequantize(decode(payloads[w]))``.

    Parameters
    ----------
    payloads : uint8 array, shape (W, payload_size(config, n)) or (payload_size,)
        Rows may be a strided view (row stride >= payload size).
    levels : array_like (L,) or None for ``fp32``
    config : alq_core.QuantizerConfig
    n : int
        Element count of every payload.
    table_version : int, optional
        Checked against every header.
    out : float32 array of n elements, optional
    scale : float
        ``1 / W`` averages.

    Returns
    -------
    cupy.ndarray of float32, shape (n,)
        Summed in float32 in payload order from 0, then multiplied by
        ``float32(scale)`` (skipped when it is 1).

    Raises
    ------
    alq_core.PayloadError
        A header that does not match (checked before the kernel runs), or a body
        with a negative scale or an out-of-table code (checked after).
    """
    res, err = decode_sum_async(payloads, levels, config, n, table_version=table_version, out=out, scale=scale)
    raise_decode_flags(int(err.get()[0]))
    return res
