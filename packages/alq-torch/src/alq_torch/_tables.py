"""Level tables and payload headers, validated on the host and cached per device.

Level tables are tiny (at most 256 float32 values) but every op needs them on
the input's device, together with their CRC-32 for the payload header. A cache
keyed by the table's bytes and the device avoids re-validating and re-uploading
the same table at every call (the DDP hook calls once per bucket per step).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from alq_core import QuantizerConfig, encode_header, table_checksum, validate_levels
from alq_core._quantize import inverse_gaps
from numpy.typing import NDArray

_LOCK = threading.Lock()
_MAX_ENTRIES = 64


@dataclass(frozen=True, eq=False)
class LevelTable:
    """A validated level table and what the kernels derive from it.

    Attributes
    ----------
    host : ndarray of float32, shape (L,)
        The validated table.
    crc : int
        :func:`alq_core.table_checksum` of ``host``.
    levels : Tensor of float32, shape (L,)
        ``host`` on the target device.
    lookup : Tensor of float32, shape (2**code_bits,)
        ``levels`` padded with NaN up to every code value (an out-of-range code
        decodes to NaN, never to a wrong finite number).
    pairs : Tensor of int64, shape (2**code_bits,)
        For the kernels' rounding step: entry ``j`` (``0 <= j <= L-2``) holds the
        float32 bits of ``levels[j]`` in its low 32 bits and those of
        ``inv_gap[j] = float32(1 / (levels[j+1] - levels[j]))`` in its high 32 bits
        (one 8-byte load gives both); zero beyond.
    code_pairs : Tensor of int64, shape (2**(2 * code_bits),)
        For decoding two codes with one load (``code_bits <= 4``; empty above):
        entry ``a | (b << code_bits)`` holds the float32 bits of ``lookup[a]``
        in its low 32 bits and those of ``lookup[b]`` in its high 32 bits.
    """

    host: NDArray[np.float32]
    crc: int
    levels: torch.Tensor
    lookup: torch.Tensor
    pairs: torch.Tensor
    code_pairs: torch.Tensor


_TABLES: OrderedDict[tuple[bytes, int, str], LevelTable] = OrderedDict()
_HEADERS: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()


def host_levels(levels: object, config: QuantizerConfig) -> NDArray[np.float32]:
    """Validate ``levels`` (ndarray, sequence or tensor) against ``config`` on the host."""
    if levels is None:
        msg = f"method {config.method!r} needs a level table; got None"
        raise ValueError(msg)
    if isinstance(levels, torch.Tensor):
        arr: Any = levels.detach().to("cpu", torch.float64).numpy()
    else:
        arr = levels
    table: NDArray[np.float32] = validate_levels(arr, num_levels=config.num_levels)
    return table


def _fast_key(levels: object, config: QuantizerConfig, device: torch.device) -> tuple[bytes, int, str] | None:
    """A cache key computed without validation, for float32 tables already seen."""
    if isinstance(levels, np.ndarray) and levels.dtype == np.float32 and levels.ndim == 1:
        raw = levels.tobytes()
    elif isinstance(levels, torch.Tensor) and levels.device.type == "cpu" and levels.dtype == torch.float32:
        raw = levels.detach().contiguous().numpy().tobytes()
    else:
        return None
    if len(raw) != 4 * config.num_levels:
        return None
    return (raw, config.code_bits, str(device))


def level_table(levels: object, config: QuantizerConfig, device: torch.device) -> LevelTable:
    """The cached :class:`LevelTable` of ``levels`` for ``config`` on ``device``.

    A float32 NumPy array or CPU tensor already seen costs a dictionary lookup;
    anything else (including a CUDA tensor, copied to the host) is validated.
    """
    fast = _fast_key(levels, config, device)
    if fast is not None:
        with _LOCK:
            hit = _TABLES.get(fast)
            if hit is not None:
                _TABLES.move_to_end(fast)
                return hit
    host = host_levels(levels, config)
    key = (host.tobytes(), config.code_bits, str(device))
    with _LOCK:
        hit = _TABLES.get(key)
        if hit is not None:
            _TABLES.move_to_end(key)
            return hit
    lookup = np.full(1 << config.code_bits, np.nan, dtype=np.float32)
    lookup[: host.size] = host
    table = LevelTable(
        host=host,
        crc=table_checksum(host),
        levels=torch.from_numpy(host.copy()).to(device),
        lookup=torch.from_numpy(lookup).to(device),
        pairs=torch.from_numpy(level_pairs(host, config.code_bits)).to(device),
        code_pairs=torch.from_numpy(code_pairs(lookup, config.code_bits)).to(device),
    )
    with _LOCK:
        _TABLES[key] = table
        while len(_TABLES) > _MAX_ENTRIES:
            _TABLES.popitem(last=False)
    return table


def level_pairs(host: NDArray[np.float32], code_bits: int) -> NDArray[np.int64]:
    """``levels[j]`` (low 32 bits) and ``inv_gap[j]`` (high 32 bits) as int64 ``(2**code_bits,)``."""
    inv = inverse_gaps(host)
    lo = host[:-1].view(np.uint32).astype(np.uint64)
    hi = inv.view(np.uint32).astype(np.uint64)
    out = np.zeros(1 << code_bits, dtype=np.uint64)
    out[: host.size - 1] = lo | (hi << np.uint64(32))
    return out.view(np.int64)


#: Largest code width with a two-code decode table (2**(2*4) entries = 2 KiB).
MAX_PAIR_BITS = 4


def code_pairs(lookup: NDArray[np.float32], code_bits: int) -> NDArray[np.int64]:
    """Two-code decode table (see :class:`LevelTable`); empty when ``code_bits > MAX_PAIR_BITS``."""
    if code_bits > MAX_PAIR_BITS:
        return np.zeros(0, dtype=np.int64)
    bits = lookup.view(np.uint32).astype(np.uint64)
    lo = np.tile(bits, bits.size)  # entry a | (b << code_bits): a varies fastest
    hi = np.repeat(bits, bits.size)
    out: NDArray[np.int64] = (lo | (hi << np.uint64(32))).view(np.int64)
    return out


def header_tensor(
    config: QuantizerConfig, n: int, table_version: int, table_crc: int, device: torch.device
) -> torch.Tensor:
    """The 40-byte payload header as a uint8 tensor on ``device`` (cached)."""
    key = (
        config.method,
        config.bits,
        config.bucket_size,
        config.norm,
        config.tail,
        n,
        table_version,
        table_crc,
        str(device),
    )
    with _LOCK:
        hit = _HEADERS.get(key)
        if hit is not None:
            _HEADERS.move_to_end(key)
            return hit
    raw = encode_header(config, n, table_version=table_version, table_crc=table_crc)
    head = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    with _LOCK:
        _HEADERS[key] = head
        while len(_HEADERS) > _MAX_ENTRIES:
            _HEADERS.popitem(last=False)
    return head


class LevelsInForce:
    """The level table in force of a communication object that owns an adaptive quantizer.

    Mixed into the DDP hook's state and the FSDP2 comms; they set ``quantizer`` (an
    ``alq_core.AdaptiveQuantizer``) and start ``_table_key`` / ``_table_host`` at None.
    """

    quantizer: Any
    _table_key: int | None
    _table_host: NDArray[np.float32] | None

    @property
    def levels(self) -> NDArray[np.float32] | None:
        """The level table in force, float32 ``(L,)`` (None for ``fp32``)."""
        lv = self.quantizer.levels
        return None if lv is None else np.asarray(lv, dtype=np.float32)

    @property
    def table_version(self) -> int:
        """Version of the level table in force (written into every payload)."""
        return int(self.quantizer.version)

    def _table(self) -> tuple[NDArray[np.float32], int]:
        """The table in force as contiguous host float32 (the ops cache its device copy by value) and its
        version; a new table calls :meth:`_table_changed`."""
        version = self.table_version
        if self._table_key != version or self._table_host is None:
            host = self.levels
            assert host is not None
            self._table_host = np.ascontiguousarray(host, dtype=np.float32)
            self._table_key = version
            self._table_changed()
        return self._table_host, version

    def _table_changed(self) -> None:
        """Drop what was built for the previous table (nothing here)."""
