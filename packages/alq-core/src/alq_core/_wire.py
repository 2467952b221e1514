"""The wire format (SPEC section 4): bit packing and the payload.

A payload is ``header | scales | packed codes | exact tail``:

* header: 40 bytes, little-endian, layout :data:`HEADER` (see :func:`encode_header`);
* scales: float32, one per quantized bucket;
* packed codes: an LSB-first bit stream, code ``k`` in bits ``[b*k, b*k + b)``,
  padded with zero codes to a multiple of 8 codes (each 8 codes are ``b`` bytes);
* exact tail: float32 (``tail='full'``, or every coordinate for ``fp32``).

The size depends on the configuration and the element count only
(:func:`payload_size`), so collectives can use fixed-size buffers.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._config import QuantizerConfig
from ._levels import validate_levels
from ._methods import METHODS_BY_WIRE_ID
from ._quantize import QuantizedTensor

MAGIC = b"ALQW"
FORMAT_VERSION = 1
#: magic, version, method id, bits, norm, tail, flags, reserved, bucket size,
#: element count, level-table version, level-table crc32, header crc32.
HEADER = struct.Struct("<4sBBBBBBHIQQII")
HEADER_SIZE = HEADER.size
_NORM_IDS = {"l2": 0, "linf": 1}
_TAIL_IDS = {"quantize": 0, "full": 1}
#: Largest element count a payload may declare (2**48); guards allocations.
MAX_COUNT = 1 << 48


class PayloadError(ValueError):
    """A payload is truncated, oversized, corrupted, or does not match what the reader expects."""


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits: ``ceil(count / 8) * bits``."""
    return -(-count // 8) * bits


def pack_codes(codes: ArrayLike, bits: int) -> NDArray[np.uint8]:
    """Pack codes into an LSB-first bit stream.

    Parameters
    ----------
    codes : array_like of uint8, shape (m,)
        Values in ``[0, 2**bits)``.
    bits : int
        1..8.

    Returns
    -------
    ndarray of uint8, shape (packed_size(m, bits),)
    """
    c = np.asarray(codes)
    if c.ndim != 1:
        msg = f"codes must be 1-D; got shape {c.shape}"
        raise ValueError(msg)
    if not 1 <= bits <= 8:
        msg = f"`bits` must be in 1..8; got {bits!r}"
        raise ValueError(msg)
    if c.size and int(c.max()) >= (1 << bits):
        msg = f"codes must be < 2**bits = {1 << bits}; got max {int(c.max())}"
        raise ValueError(msg)
    groups = -(-c.size // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[: c.size] = c
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits)).reshape(1, 8)
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << shifts, axis=1)
    return np.ascontiguousarray(words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]).reshape(-1)


def unpack_codes(packed: ArrayLike, bits: int, count: int) -> NDArray[np.uint8]:
    """Inverse of :func:`pack_codes`: ``count`` codes from ``packed_size(count, bits)`` bytes."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if not 1 <= bits <= 8:
        msg = f"`bits` must be in 1..8; got {bits!r}"
        raise ValueError(msg)
    if p.size != packed_size(count, bits):
        msg = f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes; got {p.size}"
        raise ValueError(msg)
    groups = p.size // bits if bits else 0
    words8 = np.zeros((groups, 8), dtype=np.uint8)
    words8[:, :bits] = p.reshape(groups, bits)
    words = words8.view("<u8").reshape(groups, 1)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits)).reshape(1, 8)
    mask = np.uint64((1 << bits) - 1)
    codes: NDArray[np.uint8] = ((words >> shifts) & mask).astype(np.uint8).reshape(-1)[:count]
    return codes


def table_checksum(levels: ArrayLike | None) -> int:
    """CRC-32 of a level table's float32 little-endian bytes (0 when there is none)."""
    if levels is None:
        return 0
    return zlib.crc32(np.asarray(levels, dtype="<f4").tobytes())


def payload_size(config: QuantizerConfig, n: int) -> int:
    """Exact payload bytes for ``n`` coordinates under ``config``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        msg = f"element count must be a non-negative integer; got {n!r}"
        raise ValueError(msg)
    n = int(n)
    if not config.quantized:
        return HEADER_SIZE + 4 * n
    m = config.num_quantized(n)
    return HEADER_SIZE + 4 * config.num_buckets(n) + packed_size(m, config.code_bits) + 4 * (n - m)


@dataclass(frozen=True)
class Header:
    """The decoded payload header."""

    config: QuantizerConfig
    count: int
    table_version: int
    table_crc: int


def encode_header(config: QuantizerConfig, n: int, *, table_version: int = 0, table_crc: int = 0) -> bytes:
    """The 40-byte header for a payload of ``n`` coordinates."""
    if not 0 <= n < MAX_COUNT:
        msg = f"element count must be in 0..{MAX_COUNT - 1}; got {n}"
        raise ValueError(msg)
    if not 0 <= table_version < 1 << 64:
        msg = f"`table_version` must be a non-negative 64-bit integer; got {table_version}"
        raise ValueError(msg)
    body = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        config.spec.wire_id,
        config.bits,
        _NORM_IDS[config.norm],
        _TAIL_IDS[config.tail],
        0,
        0,
        config.bucket_size,
        n,
        table_version,
        table_crc,
        0,
    )
    crc = zlib.crc32(body[:-4])
    return body[:-4] + struct.pack("<I", crc)


def decode_header(payload: bytes | bytearray | memoryview | NDArray[np.uint8]) -> Header:
    """Parse and check the header; raises :class:`PayloadError` on any inconsistency."""
    buf = _as_bytes(payload)
    if len(buf) < HEADER_SIZE:
        msg = f"payload truncated: {len(buf)} bytes, shorter than the {HEADER_SIZE}-byte header"
        raise PayloadError(msg)
    head = buf[:HEADER_SIZE]
    magic, version, method_id, bits, norm_id, tail_id, flags, reserved, d, n, tver, tcrc, hcrc = HEADER.unpack(head)
    if magic != MAGIC:
        msg = f"not an ALQ payload: magic {magic!r}, expected {MAGIC!r}"
        raise PayloadError(msg)
    if version != FORMAT_VERSION:
        msg = f"unsupported payload format version {version}; this build reads version {FORMAT_VERSION}"
        raise PayloadError(msg)
    if zlib.crc32(head[:-4]) != hcrc:
        msg = "payload header checksum mismatch: the header is corrupted"
        raise PayloadError(msg)
    if method_id not in METHODS_BY_WIRE_ID:
        msg = f"unknown method id {method_id} in payload header"
        raise PayloadError(msg)
    norms = {v: k for k, v in _NORM_IDS.items()}
    tails = {v: k for k, v in _TAIL_IDS.items()}
    if norm_id not in norms or tail_id not in tails or flags or reserved:
        msg = f"invalid payload header fields: norm={norm_id}, tail={tail_id}, flags={flags}, reserved={reserved}"
        raise PayloadError(msg)
    if n >= MAX_COUNT:
        msg = f"payload declares {n} elements, more than the limit {MAX_COUNT - 1}"
        raise PayloadError(msg)
    try:
        config = QuantizerConfig(
            method=METHODS_BY_WIRE_ID[method_id].name,
            bits=bits,
            bucket_size=d,
            norm=norms[norm_id],
            tail=tails[tail_id],
            clip=None,
        )
    except ValueError as exc:
        msg = f"invalid payload header: {exc}"
        raise PayloadError(msg) from exc
    return Header(config, n, tver, tcrc)


def _as_bytes(payload: bytes | bytearray | memoryview | NDArray[np.uint8]) -> bytes:
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            msg = f"payload array must be 1-D uint8; got {payload.dtype} with shape {payload.shape}"
            raise TypeError(msg)
        return payload.tobytes()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    msg = f"payload must be bytes or a 1-D uint8 array; got {type(payload).__name__}"
    raise TypeError(msg)


def _wire_fields(config: QuantizerConfig) -> tuple[object, ...]:
    return (config.method, config.bits, config.bucket_size, config.norm, config.tail)


def encode(q: QuantizedTensor, levels: ArrayLike | None = None, *, table_version: int = 0) -> bytes:
    """Serialize a :class:`QuantizedTensor` to a payload of ``payload_size(q.config, q.n)`` bytes.

    ``levels`` is the table ``q`` was quantized with (its checksum goes in the
    header so a reader with another table fails loudly); None for ``fp32``.
    """
    config = q.config
    crc = 0
    if config.quantized:
        if levels is None:
            msg = f"encode needs the level table of method {config.method!r} for its checksum; got None"
            raise ValueError(msg)
        crc = table_checksum(validate_levels(levels, num_levels=config.num_levels))
    parts = [encode_header(config, q.n, table_version=table_version, table_crc=crc)]
    if config.quantized:
        parts.append(np.asarray(q.scales, dtype="<f4").tobytes())
        parts.append(pack_codes(q.codes, config.code_bits).tobytes())
    parts.append(np.asarray(q.tail, dtype="<f4").tobytes())
    out = b"".join(parts)
    if len(out) != payload_size(config, q.n):
        msg = f"internal error: encoded {len(out)} bytes, expected {payload_size(config, q.n)}"
        raise AssertionError(msg)
    return out


def check_header(
    head: bytes | bytearray | memoryview | NDArray[np.uint8],
    length: int,
    *,
    config: QuantizerConfig | None = None,
    table_version: int | None = None,
    table_crc: int | None = None,
) -> tuple[Header, QuantizerConfig]:
    """Every check :func:`decode` makes before reading the body, from the header and the length.

    Backends that keep payloads on a device copy only the 40 header bytes to the
    host and call this, so their errors are the core's, word for word.

    Parameters
    ----------
    head : bytes or uint8 array
        At least the payload's first 40 bytes (fewer means a truncated payload).
    length : int
        The whole payload's length in bytes.
    config : QuantizerConfig, optional
        Expected wire fields (method, bits, bucket size, norm, tail); when given it
        is also the configuration returned.
    table_version : int, optional
        The reader's level-table version.
    table_crc : int, optional
        :func:`table_checksum` of the reader's level table.

    Returns
    -------
    (Header, QuantizerConfig)
        The decoded header and the configuration to decode the body with.

    Raises
    ------
    PayloadError
    """
    header = decode_header(_as_bytes(head)[: min(HEADER_SIZE, length)])
    cfg, n = header.config, header.count
    if config is not None and _wire_fields(config) != _wire_fields(cfg):
        msg = f"payload was encoded with {_wire_fields(cfg)}, expected {_wire_fields(config)} (method, bits, bucket, norm, tail)"
        raise PayloadError(msg)
    if config is not None:
        cfg = config
    if table_version is not None and header.table_version != table_version:
        msg = f"level-table version mismatch: payload has {header.table_version}, reader has {table_version}"
        raise PayloadError(msg)
    if table_crc is not None and cfg.quantized and table_crc != header.table_crc:
        msg = (
            f"level-table checksum mismatch (payload {header.table_crc:#010x}): sender and reader use different levels"
        )
        raise PayloadError(msg)
    expected = payload_size(cfg, n)
    if length != expected:
        kind = "truncated" if length < expected else "oversized"
        msg = f"payload {kind}: {length} bytes, header says {n} elements which need {expected}"
        raise PayloadError(msg)
    return header, cfg


def decode(
    payload: bytes | bytearray | memoryview | NDArray[np.uint8],
    *,
    config: QuantizerConfig | None = None,
    levels: ArrayLike | None = None,
    table_version: int | None = None,
) -> QuantizedTensor:
    """Parse a payload back into a :class:`QuantizedTensor` of shape ``(n,)``.

    Every check raises :class:`PayloadError` (a ``ValueError``): wrong magic,
    version or header checksum; a length other than ``payload_size``; codes out
    of range; negative scales; and, when given, a ``config`` whose wire fields
    (method, bits, bucket size, norm, tail) differ, a ``levels`` table whose
    checksum differs, or a different ``table_version``.
    """
    buf = _as_bytes(payload)
    crc = table_checksum(validate_levels(levels)) if levels is not None else None
    head, cfg = check_header(buf[:HEADER_SIZE], len(buf), config=config, table_version=table_version, table_crc=crc)
    n = head.count
    off = HEADER_SIZE
    m = cfg.num_quantized(n)
    if cfg.quantized:
        nb = cfg.num_buckets(n)
        scales = np.frombuffer(buf, dtype="<f4", count=nb, offset=off).astype(np.float32)
        off += 4 * nb
        if np.any(scales < 0):
            msg = "payload holds a negative scale: the body is corrupted"
            raise PayloadError(msg)
        nbytes = packed_size(m, cfg.code_bits)
        codes = unpack_codes(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=off), cfg.code_bits, m)
        off += nbytes
        if m and int(codes.max()) >= cfg.num_levels:
            msg = f"payload holds code {int(codes.max())} but the table has {cfg.num_levels} levels"
            raise PayloadError(msg)
    else:
        scales = np.zeros(0, dtype=np.float32)
        codes = np.zeros(0, dtype=np.uint8)
    tail = np.frombuffer(buf, dtype="<f4", count=n - m, offset=off).astype(np.float32)
    return QuantizedTensor(codes, scales, tail, n, cfg, (n,))
