"""NCCL collectives through ``cupy.cuda.nccl``: one process per GPU, quantized all-reduce.

Two quantized algorithms (SPEC section 10), both returning the same values on
every rank:

* ``"allgather"``: every rank quantizes its whole array into one fixed-size
  payload, the payloads are all-gathered, and every rank decodes and averages
  all ``W`` of them (volume grows with ``W``; best for small worlds);
* ``"reduce_scatter"``: the array is cut into ``W`` bucket-aligned chunks;
  rank ``r`` quantizes every chunk and sends chunk ``j`` to rank ``j``
  (all-to-all through grouped send/recv), decodes and averages the ``W``
  payloads of its own chunk, requantizes the average with the same levels
  (fresh noise) and all-gathers the results (volume independent of ``W``).

Every payload header carries the level-table version and checksum; a rank
whose table differs fails with ``alq_core.PayloadError`` instead of averaging
garbage. The quantizer runs with ``nonfinite="propagate"``: when any payload
marks a non-finite bucket, every rank sees it (they all decode the same bytes)
and the step falls back to an exact float32 all-reduce. ``fp32`` is always the
exact all-reduce.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from alq_core import QuantizerConfig, payload_size, table_checksum, validate_levels

from ._backend import INSTALL_HINT, as_cupy, require_cupy
from ._header import payload_offsets
from ._noise import check_seed, fresh_seed, seed_key
from ._quantize import _check_config, _flat32, decode_sum_async, level_table, quantize_encode, raise_decode_flags

ALGORITHMS = ("allgather", "reduce_scatter")
_MASK = (1 << 64) - 1
_MAX_LEVELS = 256  # codes are at most 8 bits


def require_nccl() -> Any:
    """``cupy.cuda.nccl`` if CuPy can load NCCL; else an ImportError that says how to get it."""
    require_cupy()
    nccl = importlib.import_module("cupy.cuda.nccl")
    if not getattr(nccl, "available", False):
        msg = (
            "CuPy cannot load the NCCL library, which alq_cupy's collectives need; install it with "
            "pip install nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13 (CUDA 13), next to " + INSTALL_HINT
        )
        raise ImportError(msg)
    return nccl


#: Size of an NCCL unique id (``NCCL_UNIQUE_ID_BYTES``).
UNIQUE_ID_BYTES = 128


def unique_id_bytes(unique_id: object) -> bytes:
    """Normalize an NCCL unique id to its 128 bytes.

    Accepts ``bytes`` (what ``cupy.cuda.nccl.get_unique_id`` returns in CuPy 14)
    or a sequence of 128 integers (older CuPy: signed chars; unsigned bytes also fine).
    """
    if isinstance(unique_id, (bytes, bytearray, memoryview)):
        raw = bytes(unique_id)
    elif isinstance(unique_id, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and -128 <= int(v) <= 255 for v in unique_id
    ):
        raw = bytes(int(v) & 0xFF for v in unique_id)
    else:
        msg = (
            f"`unique_id` must be the {UNIQUE_ID_BYTES} bytes from nccl_unique_id() (or a sequence of "
            f"{UNIQUE_ID_BYTES} byte values); got {type(unique_id).__name__}"
        )
        raise TypeError(msg)
    if len(raw) != UNIQUE_ID_BYTES:
        msg = f"`unique_id` must hold {UNIQUE_ID_BYTES} bytes; got {len(raw)}: pass nccl_unique_id() made on one rank"
        raise ValueError(msg)
    return raw


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id, 128 bytes (made on one rank, shipped to the others by any channel)."""
    return unique_id_bytes(require_nccl().get_unique_id())


def _new_nccl_comm(nccl: Any, world_size: int, uid: bytes, rank: int) -> Any:
    """``NcclCommunicator(ndev, commId, rank)``: commId is bytes in CuPy 14, a tuple of signed chars before."""
    try:
        return nccl.NcclCommunicator(world_size, uid, rank)
    except TypeError:
        signed = tuple(b - 256 if b > 127 else b for b in uid)
        return nccl.NcclCommunicator(world_size, signed, rank)


def derive_seed(seed: int, k: int) -> int:
    """The seed of noise stream ``k`` derived from a call's seed (chunk ``k`` of the reduce-scatter path)."""
    return seed_key((check_seed(seed) + (k + 1) * 0xD1B54A32D192ED03) & _MASK)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A bucket-aligned slice ``[start, stop)`` of the flat array owned by one rank."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        """Coordinates in the chunk."""
        return self.stop - self.start


def chunks(n: int, bucket_size: int, world_size: int) -> list[Chunk]:
    """Split ``n`` coordinates into ``world_size`` bucket-aligned chunks (trailing ones may be empty)."""
    buckets = -(-n // bucket_size)
    per = -(-buckets // world_size) if buckets else 0
    step = per * bucket_size
    return [Chunk(min(n, r * step), min(n, (r + 1) * step)) for r in range(world_size)]


def _out_f32(out: Any, n: int) -> Any:
    cp = require_cupy()
    res = as_cupy(out)
    if res.dtype != cp.float32 or res.size != n or not res.flags.c_contiguous:
        msg = f"`out` must be a contiguous float32 array of {n} elements; got dtype {res.dtype}, shape {res.shape}"
        raise ValueError(msg)
    return res.reshape(-1)


class Communicator:
    """An NCCL communicator over ``world_size`` processes, one GPU each.

    Parameters
    ----------
    world_size : int
    rank : int
        This process's rank in ``0 .. world_size - 1``.
    unique_id : bytes
        :func:`nccl_unique_id` made on one rank and shared (the same on every rank);
        a sequence of 128 byte values is accepted too.
    device : int, optional
        CUDA device to bind (made current); default: the current device.

    Notes
    -----
    Collectives run on CuPy's current stream. The quantized all-reduce
    synchronizes with the host once (to check payload headers and the
    non-finite fallback).
    """

    def __init__(self, world_size: int, rank: int, unique_id: object, *, device: int | None = None) -> None:
        cp = require_cupy()
        nccl = require_nccl()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            msg = f"`world_size` must be a positive integer; got {world_size!r}"
            raise ValueError(msg)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            msg = f"`rank` must be in 0..{world_size - 1}; got {rank!r}"
            raise ValueError(msg)
        uid = unique_id_bytes(unique_id)
        if device is not None:
            cp.cuda.Device(device).use()
        self.device = int(cp.cuda.runtime.getDevice())
        self.world_size = world_size
        self.rank = rank
        self._nccl = nccl
        self._comm = _new_nccl_comm(nccl, world_size, uid, rank)
        #: Why the last quantized all-reduce fell back to the exact one (None: it did not).
        self.last_fallback: str | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        world_size: int,
        rank: int,
        *,
        device: int | None = None,
        timeout: float = 120.0,
    ) -> Communicator:
        """Bootstrap through a shared file: rank 0 writes the unique id, the others wait for it."""
        p = Path(path)
        if rank == 0:
            tmp = p.with_suffix(p.suffix + f".tmp{os.getpid()}")
            tmp.write_text(nccl_unique_id().hex())
            tmp.replace(p)
        deadline = time.monotonic() + timeout
        while not p.exists():
            if time.monotonic() > deadline:
                msg = f"rank {rank}: no NCCL unique id appeared at {p} within {timeout} s; is rank 0 running?"
                raise TimeoutError(msg)
            time.sleep(0.01)
        return cls(world_size, rank, bytes.fromhex(p.read_text().strip()), device=device)

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _stream() -> int:
        return int(require_cupy().cuda.get_current_stream().ptr)

    def close(self) -> None:
        """Destroy the NCCL communicator (idempotent)."""
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ exact collectives

    def allreduce(self, x: Any, *, average: bool = False, out: Any = None) -> Any:
        """Exact float32 all-reduce (NCCL sum; ``average`` divides by the world size).

        Returns
        -------
        cupy.ndarray of float32, the shape of ``x``
        """
        cp = require_cupy()
        flat, shape = _flat32(x)
        res = cp.empty_like(flat) if out is None else _out_f32(out, int(flat.size))
        if flat.size:
            self._comm.allReduce(
                flat.data.ptr, res.data.ptr, flat.size, self._nccl.NCCL_FLOAT32, self._nccl.NCCL_SUM, self._stream()
            )
        if average and self.world_size > 1:
            res /= cp.float32(self.world_size)
        return res.reshape(shape)

    def allgather_bytes(self, send: Any, out: Any = None) -> Any:
        """All-gather a 1-D uint8 buffer of the same size on every rank into ``(W, size)``.

        ``send`` may be ``out[rank]`` (in place).
        """
        cp = require_cupy()
        size = int(send.size)
        res = cp.empty((self.world_size, size), dtype=cp.uint8) if out is None else out
        if size:
            self._comm.allGather(send.data.ptr, res.data.ptr, size, self._nccl.NCCL_UINT8, self._stream())
        return res

    def alltoall_bytes(self, send: Any, out: Any = None) -> Any:
        """All-to-all of ``(W, size)`` uint8 rows: row ``j`` goes to rank ``j``; row ``i`` of the result came from rank ``i``."""
        cp = require_cupy()
        w, size = int(send.shape[0]), int(send.shape[1])
        res = cp.empty((w, size), dtype=cp.uint8) if out is None else out
        res[self.rank] = send[self.rank]
        if size and w > 1:
            stream = self._stream()
            self._nccl.groupStart()
            for peer in range(w):
                if peer != self.rank:
                    self._comm.send(send[peer].data.ptr, size, self._nccl.NCCL_UINT8, peer, stream)
                    self._comm.recv(res[peer].data.ptr, size, self._nccl.NCCL_UINT8, peer, stream)
            self._nccl.groupEnd()
        return res

    def broadcast_levels(self, levels: Any, table_version: int, *, root: int = 0) -> tuple[np.ndarray, int]:
        """Send ``root``'s level table and version to every rank; returns them (float32 table, int).

        Only ``root``'s ``levels`` and ``table_version`` are read (the others may pass
        anything, e.g. their stale table); the message has a fixed size, so ranks
        holding tables of different lengths cannot desynchronize NCCL.
        """
        cp = require_cupy()
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.world_size:
            msg = f"`root` must be in 0..{self.world_size - 1}; got {root!r}"
            raise ValueError(msg)
        size = 16 + 4 * _MAX_LEVELS
        host = np.zeros(size, dtype=np.uint8)
        if self.rank == root:
            table = validate_levels(levels)
            if table.size > _MAX_LEVELS:
                msg = f"`levels` must hold at most {_MAX_LEVELS} levels; got {table.size}"
                raise ValueError(msg)
            host[:16] = np.array([int(table_version), table.size], dtype="<u8").view(np.uint8)
            host[16 : 16 + 4 * table.size] = np.frombuffer(table.astype("<f4").tobytes(), dtype=np.uint8)
        buf = cp.asarray(host)
        self._comm.bcast(buf.data.ptr, size, self._nccl.NCCL_UINT8, root, self._stream())
        got = buf.get()
        version, count = (int(v) for v in got[:16].view("<u8"))
        return validate_levels(got[16 : 16 + 4 * count].view("<f4")), version

    def check_levels(self, levels: Any, table_version: int) -> None:
        """Raise ValueError unless every rank holds the same level table and version."""
        cp = require_cupy()
        crc = table_checksum(validate_levels(levels)) if levels is not None else 0
        mine = cp.asarray(np.array([table_version, crc], dtype="<u8").view(np.uint8))
        allv = self.allgather_bytes(mine).get().reshape(self.world_size, 16)
        pairs = [tuple(int(v) for v in row.view("<u8")) for row in allv]
        if len(set(pairs)) != 1:
            desc = ", ".join(f"rank {r}: version {v} crc {c:#010x}" for r, (v, c) in enumerate(pairs))
            msg = f"ranks hold different level tables ({desc}); broadcast them with broadcast_levels()"
            raise ValueError(msg)

    # ------------------------------------------------------------------ quantized all-reduce

    def quantized_allreduce(
        self,
        x: Any,
        levels: Any,
        config: QuantizerConfig,
        *,
        table_version: int = 0,
        algorithm: str = "allgather",
        seed: int | None = None,
        average: bool = True,
        out: Any = None,
    ) -> Any:
        """All-reduce ``x`` through quantized payloads; every rank gets the same result.

        Parameters
        ----------
        x : CuPy/DLPack array of float16/32/64, any shape (same size on every rank)
        levels : array_like (L,), or None for ``fp32``
            The level table; every rank must hold the same one (checked through
            the payload headers).
        config : alq_core.QuantizerConfig
            Its ``nonfinite`` setting is replaced by ``"propagate"``.
        table_version : int
            The table's version, written into and checked against every header.
        algorithm : {"allgather", "reduce_scatter"}
        seed : int, optional
            This rank's noise seed for the call (fresh random when None; give
            every rank a different one).
        average : bool
            Divide by the world size (default) or return the sum.
        out : float32 array of x.size elements, optional

        Returns
        -------
        cupy.ndarray of float32, the shape of ``x``

        Raises
        ------
        alq_core.PayloadError
            A rank's payload was made with another config, size or level table.
        """
        cp = require_cupy()
        config = _check_config(config)
        if algorithm not in ALGORITHMS:
            msg = f"`algorithm` must be one of {ALGORITHMS}; got {algorithm!r}"
            raise ValueError(msg)
        flat, shape = _flat32(x)
        n = int(flat.size)
        self.last_fallback = None
        if not config.quantized:
            return self.allreduce(flat, average=average, out=out).reshape(shape)
        cfg = dataclasses.replace(config, nonfinite="propagate") if config.nonfinite != "propagate" else config
        seed_val = fresh_seed() if seed is None else check_seed(seed)
        level_table(levels, cfg)  # validate once, up front
        res = cp.empty(n, dtype=cp.float32) if out is None else _out_f32(out, n)
        scale = 1.0 / self.world_size if average else 1.0
        if algorithm == "allgather":
            bad, err = self._allgather_path(flat, levels, cfg, table_version, seed_val, scale, res)
        else:
            bad, err = self._reduce_scatter_path(flat, levels, cfg, table_version, seed_val, scale, res)
        flags = cp.stack([bad.astype(cp.int32).reshape(()), err.reshape(())]).get()
        if int(flags[0]):
            self.last_fallback = "a payload marked a non-finite bucket: sent this step exactly in float32"
            return self.allreduce(flat, average=average, out=res).reshape(shape)
        raise_decode_flags(int(flags[1]))
        return res.reshape(shape)

    def _allgather_path(
        self, flat: Any, levels: Any, cfg: QuantizerConfig, version: int, seed: int, scale: float, res: Any
    ) -> tuple[Any, Any]:
        cp = require_cupy()
        n = int(flat.size)
        size = payload_size(cfg, n)
        recv = cp.empty((self.world_size, size), dtype=cp.uint8)
        quantize_encode(flat, levels, cfg, table_version=version, seed=seed, out=recv[self.rank])
        self.allgather_bytes(recv[self.rank], out=recv)
        _, err = decode_sum_async(recv, levels, cfg, n, table_version=version, out=res, scale=scale)
        off_s, off_c, _, _ = payload_offsets(cfg, n)
        scales = cp.ascontiguousarray(recv[:, off_s:off_c]).view(cp.float32)
        return cp.isnan(scales).any(), err

    def _reduce_scatter_path(
        self, flat: Any, levels: Any, cfg: QuantizerConfig, version: int, seed: int, scale: float, res: Any
    ) -> tuple[Any, Any]:
        cp = require_cupy()
        n, w = int(flat.size), self.world_size
        parts = chunks(n, cfg.bucket_size, w)
        sizes = [payload_size(cfg, c.size) for c in parts]
        width = max(sizes)
        send = cp.zeros((w, width), dtype=cp.uint8)
        for j, c in enumerate(parts):
            quantize_encode(
                flat[c.start : c.stop],
                levels,
                cfg,
                table_version=version,
                seed=derive_seed(seed, j),
                out=send[j, : sizes[j]],
            )
        recv = self.alltoall_bytes(send)
        mine = parts[self.rank]
        avg, err1 = decode_sum_async(
            recv[:, : sizes[self.rank]], levels, cfg, mine.size, table_version=version, scale=scale
        )
        gathered = cp.zeros((w, width), dtype=cp.uint8)
        quantize_encode(
            avg,
            levels,
            cfg,
            table_version=version,
            seed=derive_seed(seed, w + self.rank),
            out=gathered[self.rank, : sizes[self.rank]],
        )
        self.allgather_bytes(gathered[self.rank], out=gathered)
        errs = [err1]
        bads = []
        for j, c in enumerate(parts):
            _, e = decode_sum_async(
                gathered[j : j + 1, : sizes[j]], levels, cfg, c.size, table_version=version, out=res[c.start : c.stop]
            )
            errs.append(e)
            off_s, off_c, _, _ = payload_offsets(cfg, c.size)
            if off_c > off_s:
                bads.append(cp.isnan(gathered[j, off_s:off_c].copy().view(cp.float32)).any())
        bad = cp.stack(bads).any() if bads else cp.zeros((), dtype=cp.bool_)
        err = errs[0]
        for e in errs[1:]:
            err = err | e
        return bad, err
