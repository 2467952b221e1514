"""Host-side payload header checks: the same checks, order and messages as ``alq_core.decode``.

Device payloads are checked from a small host copy of their 40-byte headers
before any kernel reads them; everything here is pure Python.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from alq_core import HEADER_SIZE, Header, PayloadError, QuantizerConfig, encode_header, payload_size
from alq_core import check_header as alq_check_header

__all__ = ["check_header", "header_bytes", "payload_offsets"]


@lru_cache(maxsize=256)
def header_bytes(config: QuantizerConfig, n: int, table_version: int, table_crc: int) -> bytes:
    """``alq_core.encode_header`` (cached: the hot path reuses the same few headers)."""
    head: bytes = encode_header(config, n, table_version=table_version, table_crc=table_crc)
    return head


def payload_offsets(config: QuantizerConfig, n: int) -> tuple[int, int, int, int]:
    """Byte offsets of (scales, packed codes, exact tail, end) in a payload of ``n`` coordinates."""
    if not config.quantized:
        return HEADER_SIZE, HEADER_SIZE, HEADER_SIZE, HEADER_SIZE + 4 * n
    m = config.num_quantized(n)
    off_codes = HEADER_SIZE + 4 * config.num_buckets(n)
    off_tail = off_codes + (-(-m // 8)) * config.code_bits
    end = off_tail + 4 * (n - m)
    if end != payload_size(config, n):  # pragma: no cover - guards the layout against the core
        msg = f"internal error: layout ends at {end}, core says {payload_size(config, n)}"
        raise AssertionError(msg)
    return HEADER_SIZE, off_codes, off_tail, end


def check_header(
    head: bytes | bytearray | np.ndarray,
    length: int,
    *,
    config: QuantizerConfig | None = None,
    table_crc: int | None = None,
    table_version: int | None = None,
    count: int | None = None,
) -> tuple[Header, QuantizerConfig]:
    """:func:`alq_core.check_header`, plus the element count the reader expects.

    Parameters
    ----------
    head : bytes or uint8 ndarray
        The first ``min(length, 40)`` bytes of the payload.
    length : int
        The payload's total length in bytes.
    config : QuantizerConfig, optional
        Expected wire fields (method, bits, bucket size, norm, tail); when given
        it is also the configuration returned (like ``alq_core.decode``).
    table_crc : int, optional
        Checksum of the reader's level table (``alq_core.table_checksum``).
    table_version : int, optional
        The reader's level-table version.
    count : int, optional
        The element count the reader expects.

    Returns
    -------
    (Header, QuantizerConfig)

    Raises
    ------
    alq_core.PayloadError
        With the core's message for the same defect.
    """
    raw = head.tobytes() if isinstance(head, np.ndarray) else bytes(head)
    hdr, cfg = alq_check_header(raw, length, config=config, table_version=table_version, table_crc=table_crc)
    n = hdr.count
    if count is not None and n != count:
        msg = f"payload holds {n} elements, expected {count}: sender and reader disagree on the tensor size"
        raise PayloadError(msg)
    return hdr, cfg
