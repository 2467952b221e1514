"""The wire format on torch tensors: bit packing, payloads, and the fused paths.

Same bytes as :mod:`alq_core._wire`: ``header (40 B) | float32 scales |
LSB-first packed codes | float32 exact tail``. Headers are built and checked on
the host (every field derives from the configuration and the level table), so
decoding a CUDA payload copies only its header bytes to the host.

:func:`quantize_encode` and :func:`decode_sum` are what the DDP hook calls; on
CUDA they run the Triton kernels of :mod:`alq_torch._kernels` when the
configuration has a fast path, and a composition of vectorized torch ops
otherwise (always on CPU).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import alq_core
import numpy as np
import torch
from alq_core import HEADER_SIZE, PayloadError, QuantizerConfig, packed_size, payload_size

from ._quantize import (
    QuantizedTensor,
    check_config,
    check_noise,
    check_tensor,
    quantize_flat,
)
from ._tables import LevelTable, header_tensor, level_table

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    msg = "alq_torch needs a little-endian host: payload floats are written in native byte order"
    raise ImportError(msg)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        msg = f"`bits` must be in 1..8; got {bits!r}"
        raise ValueError(msg)
    return bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes into an LSB-first bit stream (same bytes as :func:`alq_core.pack_codes`).

    Parameters
    ----------
    codes : Tensor of uint8, shape (m,)
        Values in ``[0, 2**bits)`` (not checked; higher bits are masked off).
    bits : int
        1..8.

    Returns
    -------
    Tensor of uint8, shape (packed_size(m, bits),), on ``codes``' device
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.ndim != 1:
        msg = f"codes must be a 1-D uint8 tensor; got {getattr(codes, 'shape', type(codes).__name__)}"
        raise ValueError(msg)
    m = codes.numel()
    groups = -(-m // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:m] = codes.to(torch.int64) & ((1 << bits) - 1)
    if bits == 8:
        return padded.to(torch.uint8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(groups, 8) << shifts).sum(dim=1, keepdim=True)  # at most 56 bits: no overflow
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes from ``packed_size(count, bits)`` bytes."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        msg = f"`packed` must be a uint8 tensor; got {getattr(packed, 'dtype', type(packed).__name__)}"
        raise TypeError(msg)
    p = packed.reshape(-1)
    if p.numel() != packed_size(count, bits):
        msg = f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes; got {p.numel()}"
        raise ValueError(msg)
    if bits == 8:
        return p[:count].clone()
    groups = p.numel() // bits
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    words = (p.view(groups, bits).to(torch.int64) << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    return ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:count]


def _f32_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=t.device)
    return t.to(torch.float32).contiguous().view(torch.uint8)


def _bytes_f32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float32 values of a byte range (copied: the range may be unaligned)."""
    if b.numel() == 0:
        return torch.zeros((*b.shape[:-1], 0), dtype=torch.float32, device=b.device)
    dense = torch.empty(b.shape, dtype=torch.uint8, device=b.device)
    dense.copy_(b)
    return dense.view(torch.float32)


def _check_table_version(table_version: object) -> int:
    if isinstance(table_version, bool) or not isinstance(table_version, (int, np.integer)):
        msg = f"`table_version` must be a non-negative integer; got {table_version!r}"
        raise TypeError(msg)
    return int(table_version)


def encode(q: QuantizedTensor, levels: object = None, *, table_version: int = 0) -> torch.Tensor:
    """Serialize ``q`` to a payload (same bytes as :func:`alq_core.encode`).

    Returns
    -------
    Tensor of uint8, shape (payload_size(q.config, q.n),), on ``q``'s device
    """
    if not isinstance(q, QuantizedTensor):
        msg = f"`q` must be an alq_torch.QuantizedTensor; got {type(q).__name__}"
        raise TypeError(msg)
    config = q.config
    version = _check_table_version(table_version)
    device = q.tail.device
    crc = 0
    if config.quantized:
        if levels is None:
            msg = f"encode needs the level table of method {config.method!r} for its checksum; got None"
            raise ValueError(msg)
        crc = level_table(levels, config, device).crc
    parts = [header_tensor(config, q.n, version, crc, device)]
    if config.quantized:
        parts.append(_f32_bytes(q.scales))
        parts.append(pack_codes(q.codes, config.code_bits))
    parts.append(_f32_bytes(q.tail))
    out = torch.cat(parts)
    if out.numel() != payload_size(config, q.n):  # pragma: no cover - internal invariant
        msg = f"internal error: encoded {out.numel()} bytes, expected {payload_size(config, q.n)}"
        raise AssertionError(msg)
    return out


def check_header(
    head: bytes,
    length: int,
    *,
    config: QuantizerConfig | None,
    levels: object,
    table_version: int | None,
    crc: int | None = None,
) -> tuple[QuantizerConfig, int]:
    """:func:`alq_core.check_header` with the reader's table given as levels (or its ``crc``).

    Returns the configuration to decode with and the element count; raises
    :class:`alq_core.PayloadError` with the core's messages.
    """
    if levels is not None and crc is None:
        crc = alq_core.table_checksum(alq_core.validate_levels(_host_array(levels)))
    header, cfg = alq_core.check_header(
        head, length, config=config, table_version=table_version, table_crc=crc if levels is not None else None
    )
    return cfg, header.count


def _host_array(levels: object) -> Any:
    if isinstance(levels, torch.Tensor):
        return levels.detach().to("cpu", torch.float64).numpy()
    return levels


def _check_payload_tensor(payload: object, name: str = "payload", shape: str = "") -> torch.Tensor:
    """``payload`` as a uint8 tensor of ``1 + shape.count(",")`` dimensions (``shape`` names them), or TypeError."""
    ndim = 1 + shape.count(",")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.ndim != ndim:
        got = (
            f"{payload.dtype} with shape {tuple(payload.shape)}"
            if isinstance(payload, torch.Tensor)
            else type(payload).__name__
        )
        msg = f"`{name}` must be a {ndim}-D uint8 tensor{f' ({shape})' if shape else ''}; got {got}"
        raise TypeError(msg)
    return payload


def decode(
    payload: torch.Tensor,
    *,
    config: QuantizerConfig | None = None,
    levels: object = None,
    table_version: int | None = None,
) -> QuantizedTensor:
    """Parse a payload tensor into a :class:`QuantizedTensor` of shape ``(n,)`` on its device.

    Same checks, order and messages as :func:`alq_core.decode` (every failure
    raises :class:`alq_core.PayloadError`). The header is checked on the host
    from a 40-byte copy; the body checks (negative scales, codes out of range)
    synchronize once.
    """
    payload = _check_payload_tensor(payload)
    head = payload[:HEADER_SIZE].cpu().numpy().tobytes()
    cfg, n = check_header(head, payload.numel(), config=config, levels=levels, table_version=table_version)
    off = HEADER_SIZE
    m = cfg.num_quantized(n)
    device = payload.device
    if cfg.quantized:
        nb = cfg.num_buckets(n)
        scales = _bytes_f32(payload[off : off + 4 * nb])
        off += 4 * nb
        nbytes = packed_size(m, cfg.code_bits)
        codes = unpack_codes(payload[off : off + nbytes], cfg.code_bits, m)
        off += nbytes
        neg = bool((scales < 0).any()) if nb else False
        if neg:
            msg = "payload holds a negative scale: the body is corrupted"
            raise PayloadError(msg)
        top = int(codes.max().item()) if m else 0
        if top >= cfg.num_levels:
            msg = f"payload holds code {top} but the table has {cfg.num_levels} levels"
            raise PayloadError(msg)
    else:
        scales = torch.zeros(0, dtype=torch.float32, device=device)
        codes = torch.zeros(0, dtype=torch.uint8, device=device)
    tail = _bytes_f32(payload[off:])
    return QuantizedTensor(codes, scales, tail, n, cfg, (n,))


def _check_out(
    out: object, size: int, device: torch.device, dtypes: tuple[torch.dtype, ...], what: str
) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        msg = f"`out` must be a tensor; got {type(out).__name__}"
        raise TypeError(msg)
    if out.dtype not in dtypes or out.ndim != 1 or out.numel() != size or not out.is_contiguous():
        kinds = " or ".join(str(d) for d in dtypes)
        msg = (
            f"`out` must be a contiguous 1-D {kinds} tensor of {size} elements ({what}); "
            f"got {out.dtype} with shape {tuple(out.shape)}"
        )
        raise ValueError(msg)
    if out.device != device:
        msg = f"`out` must be on {device}; got {out.device}"
        raise ValueError(msg)
    return out


def _seed_value(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        msg = f"`seed` must be a non-negative integer below 2**63, or None; got {seed!r}"
        raise ValueError(msg)
    return int(seed)


def quantize_encode(
    x: torch.Tensor,
    levels: object,
    config: QuantizerConfig,
    *,
    table_version: int = 0,
    noise: torch.Tensor | np.ndarray | None = None,
    seed: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and encode in one call: the sender's fused path.

    Parameters
    ----------
    x : Tensor of float16, bfloat16, float32 or float64, shape (n,) (any shape is flattened)
    levels : Tensor or ndarray of float32, shape (L,), or None for ``fp32``
    config : QuantizerConfig
    table_version : int
        Written into the header.
    noise : Tensor or ndarray of float32, shape (config.num_quantized(n),), optional
        Given noise: the bytes equal ``alq_core.encode(alq_core.quantize(x, levels,
        config, noise=noise), levels, table_version=table_version)``.
    seed : int, optional
        Without ``noise``, the noise is generated on the device from ``seed``
        (deterministic for a given seed, device and path; a fresh seed from
        torch's default generator when None). CUDA fast path: counter-based
        Philox4x32-7 (``tl.randint4x``, one counter per 8-code group, 16-bit
        uniforms ``(k + 1/2) / 2**16``); elsewhere ``torch.rand`` with a
        generator seeded by ``seed``.
    out : Tensor of uint8, shape (payload_size(config, n),), optional
        Written in place (a view into a bigger buffer is fine) and returned.

    Returns
    -------
    Tensor of uint8, shape (payload_size(config, n),), on ``x``'s device
    """
    if noise is not None and seed is not None:
        msg = "pass either `noise` or `seed`, not both"
        raise ValueError(msg)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:  # the prepared call reads float32 or half
        x = x.detach().to(torch.float32)
    return prepare_quantize_encode(x, levels, config, table_version=table_version, noise=noise, out=out)(seed)


def prepare_quantize_encode(
    x: torch.Tensor,
    levels: object,
    config: QuantizerConfig,
    *,
    table_version: int = 0,
    noise: torch.Tensor | np.ndarray | None = None,
    out: torch.Tensor | None = None,
) -> Callable[[int | None], torch.Tensor]:
    """:func:`quantize_encode` with everything but the seed checked and resolved once, for a sender that
    encodes the same tensor again and again (the DDP hook, once per bucket and step).

    ``x``: float16, bfloat16 or float32 (convert float64 first), read at each call: keep it alive
    and in place, and ``out`` (allocated here when None) too. The returned function takes the seed
    (see :func:`quantize_encode`; ignored with ``noise``, which is bound) and returns the payload.
    """
    config = check_config(config)
    version = _check_table_version(table_version)
    src = check_tensor(x).detach().reshape(-1)
    if src.dtype == torch.float64:
        msg = "prepare_quantize_encode reads `x` at every call: give float32, float16 or bfloat16, not float64"
        raise ValueError(msg)
    n = src.numel()
    device = src.device
    size = payload_size(config, n)
    if out is not None:
        dst = _check_out(out, size, device, (torch.uint8,), "the payload")
    else:
        dst = torch.empty(size, dtype=torch.uint8, device=device)
    if not config.quantized:
        head = header_tensor(config, n, version, 0, device)

        def exact(seed: int | None) -> torch.Tensor:
            dst[:HEADER_SIZE].copy_(head)
            dst[HEADER_SIZE:].copy_(_f32_bytes(src))
            return dst

        return exact
    table = level_table(levels, config, device)
    m = config.num_quantized(n)
    u = None if noise is None else check_noise(noise, m, device)
    head = header_tensor(config, n, version, table.crc, device)
    if device.type == "cuda" or _force_kernels():
        from . import _kernels

        if _kernels.fused_supported(config):
            launch = _kernels.prepare_quantize_pack(src, table, config, head, dst, noise=u)
            nb = config.num_buckets(n)
            check_finite = config.nonfinite == "raise" and nb > 0

            def fused(seed: int | None) -> torch.Tensor:
                launch(_seed_value(seed) if u is None else 0)
                if check_finite:
                    bad = torch.isnan(_bytes_f32(dst[HEADER_SIZE : HEADER_SIZE + 4 * nb]))
                    if bool(bad.any()):
                        raise ValueError(_nonfinite_message(bad, m, config.bucket_size))
                return dst

            return fused

    def composed(seed: int | None) -> torch.Tensor:
        noise_u = u
        if noise_u is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_seed_value(seed))
            noise_u = torch.rand(m, dtype=torch.float32, device=device, generator=gen)
        flat32 = src.to(torch.float32)
        codes, scales = quantize_flat(flat32, table.levels, config, noise_u)
        off = HEADER_SIZE
        dst[:off].copy_(head)
        dst[off : off + 4 * scales.numel()].copy_(_f32_bytes(scales))
        off += 4 * scales.numel()
        packed = pack_codes(codes, config.code_bits)
        dst[off : off + packed.numel()].copy_(packed)
        off += packed.numel()
        dst[off:].copy_(_f32_bytes(flat32[m:]))
        return dst

    return composed


def _nonfinite_message(bad: torch.Tensor, m: int, d: int) -> str:
    from ._quantize import _nonfinite_message as message

    return message(bad, m, d)


def _force_kernels() -> bool:
    """True when Triton kernels should run on CPU tensors (``TRITON_INTERPRET=1``, tests only)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ALQ_TORCH_KERNELS_ON_CPU") == "1"


#: Headers already checked against (length, wire fields, table version, crc, n).
_GOOD_HEADERS: set[tuple[object, ...]] = set()


def decode_sum(
    payloads: torch.Tensor,
    levels: object,
    config: QuantizerConfig,
    n: int,
    *,
    table_version: int | None = None,
    out: torch.Tensor | None = None,
    scale: float = 1.0,
    check_headers: bool | torch.Tensor = True,
) -> torch.Tensor:
    """Decode ``W`` payloads and sum them: ``scale * sum_w dequantize(decode(payloads[w]))``.

    Parameters
    ----------
    payloads : Tensor of uint8, shape (W, payload_size(config, n))
    levels : Tensor or ndarray of float32, shape (L,), or None for ``fp32``
    config : QuantizerConfig
        Expected wire fields; every header is checked against it, ``n``,
        ``table_version`` (when given) and the table's checksum, on the host,
        before anything is summed (mismatch: :class:`alq_core.PayloadError`).
    n : int
        Element count of each payload.
    out : Tensor of float32, float16 or bfloat16, shape (n,), optional
        Written in place and returned; in half precision, the float32 result
        rounded to nearest even (as ``.to(out.dtype)`` would).
    scale : float
        Factor applied to the sum in float32 (``1/W`` averages).
    check_headers : bool or Tensor
        True (default): the W headers are copied to the host and checked (a
        device synchronization on CUDA). False: not checked; the caller vouches
        for them. A *flag*, an int32 tensor of shape (1,) on the payloads'
        device: the headers are compared on the device with the expected one
        (``table_version`` required) and nothing synchronizes; if any differs,
        the whole result is NaN and ``flag[0]`` is set to 1 (never cleared
        here). The DDP hook reads its flags once per round.

    Returns
    -------
    Tensor of float32 (or ``out``'s dtype), shape (n,), on the payloads' device

    Notes
    -----
    The sum runs in float32 in payload order, ``acc = acc + s_w * l[c_w]``,
    then ``acc * scale``. Body corruption is not checked here (that would
    synchronize on the whole payload): an out-of-range code decodes to NaN.
    """
    return prepare_decode_sum(
        payloads, levels, config, n, table_version=table_version, out=out, scale=scale, check_headers=check_headers
    )()


def prepare_decode_sum(
    payloads: torch.Tensor,
    levels: object,
    config: QuantizerConfig,
    n: int,
    *,
    table_version: int | None = None,
    out: torch.Tensor | None = None,
    scale: float = 1.0,
    check_headers: bool | torch.Tensor = True,
) -> Callable[[], torch.Tensor]:
    """:func:`decode_sum` checked and resolved once, for a receiver that decodes into the same buffers
    again and again (the DDP hook, once per bucket and step).

    ``payloads`` is read at each call (headers checked then, as ``check_headers`` says): keep it alive
    and in place, and ``out`` (allocated here when None) too. The returned function takes no
    arguments and returns the sum.
    """
    config = check_config(config)
    payloads = _check_payload_tensor(payloads, "payloads", "W, payload_size")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        msg = f"`n` must be a non-negative integer element count; got {n!r}"
        raise ValueError(msg)
    n = int(n)
    w_count, length = payloads.shape
    device = payloads.device
    table: LevelTable | None = level_table(levels, config, device) if config.quantized else None
    if w_count == 0:
        msg = "`payloads` must hold at least one payload; got W = 0"
        raise ValueError(msg)
    device_check: tuple[torch.Tensor, torch.Tensor] | None = None
    if isinstance(check_headers, torch.Tensor):
        device_check = (_expected_header(config, table, n, table_version, device), _check_flag(check_headers, device))
    host_check = not isinstance(check_headers, torch.Tensor) and bool(check_headers)
    if not host_check:
        _check_length(length, config, n)
    if out is not None:
        dst = _check_out(out, n, device, (torch.float32, torch.float16, torch.bfloat16), "the sum")
    else:
        dst = torch.empty(n, dtype=torch.float32, device=device)
    scale32 = float(np.float32(scale))
    m = config.num_quantized(n)
    nb = config.num_buckets(n) if config.quantized else 0
    off_codes = HEADER_SIZE + 4 * nb
    off_tail = off_codes + packed_size(m, config.code_bits)
    if config.quantized and m and (device.type == "cuda" or _force_kernels()):
        from . import _kernels

        if _kernels.decode_supported(config):
            assert table is not None
            copy_rows = payloads.stride(1) != 1  # the kernel reads rows of unit stride: copy them at each call
            rows = torch.empty(payloads.shape, dtype=torch.uint8, device=device) if copy_rows else payloads
            launch = _kernels.prepare_decode_sum(rows, table, config, m, off_codes, dst, scale32, device_check)
            dst_tail = dst[m:]

            def fused() -> torch.Tensor:
                if host_check:
                    _check_headers(payloads, config, table, n, table_version)
                if copy_rows:
                    rows.copy_(payloads)
                launch()
                if n > m:
                    tails = _bytes_f32(payloads[:, off_tail:])
                    tsum = tails[0].clone()
                    for w in range(1, w_count):
                        tsum = tsum + tails[w]
                    dst_tail.copy_(tsum * scale32 if scale32 != 1.0 else tsum)
                    if device_check is not None:
                        _poison_if_bad(payloads, device_check, dst_tail)
                return dst

            return fused

    def composed() -> torch.Tensor:
        if host_check:
            _check_headers(payloads, config, table, n, table_version)
        acc: torch.Tensor | None = None
        for w in range(w_count):
            part = _dequantize_payload(payloads[w], config, table, n, m, nb, off_codes, off_tail)
            acc = part if acc is None else acc + part
        assert acc is not None
        dst.copy_(acc * scale32 if scale32 != 1.0 else acc)
        if device_check is not None:
            _poison_if_bad(payloads, device_check, dst)
        return dst

    return composed


def _check_length(length: int, config: QuantizerConfig, n: int) -> None:
    if length != payload_size(config, n):
        kind = "truncated" if length < payload_size(config, n) else "oversized"
        msg = f"payloads {kind}: {length} bytes each, but n = {n} elements need {payload_size(config, n)}"
        raise PayloadError(msg)


def _expected_header(
    config: QuantizerConfig, table: LevelTable | None, n: int, table_version: int | None, device: torch.device
) -> torch.Tensor:
    if table_version is None:
        msg = "checking headers on the device (`check_headers` given a flag tensor) needs `table_version`; got None"
        raise ValueError(msg)
    return header_tensor(config, n, _check_table_version(table_version), table.crc if table else 0, device)


def _check_flag(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    if flag.dtype != torch.int32 or flag.numel() != 1 or flag.device != device or not flag.is_contiguous():
        msg = (
            f"a header-check flag must be a contiguous int32 tensor of one element on {device}; "
            f"got {flag.dtype} with shape {tuple(flag.shape)} on {flag.device}"
        )
        raise ValueError(msg)
    return flag


def _poison_if_bad(payloads: torch.Tensor, check: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
    """Device-side header comparison with torch ops (no synchronization): NaN ``out`` and set the flag on mismatch."""
    head, flag = check
    bad = (payloads[:, :HEADER_SIZE] != head).any()
    flag.view(()).masked_fill_(bad, 1)
    out.masked_fill_(bad, float("nan"))


def _check_headers(
    payloads: torch.Tensor, config: QuantizerConfig, table: LevelTable | None, n: int, table_version: int | None
) -> None:
    """Check the W headers on the host (one small device-to-host copy); raise :class:`PayloadError`."""
    w_count, length = payloads.shape
    heads = payloads[:, :HEADER_SIZE].cpu().numpy()
    seen: set[bytes] = set()
    for w in range(w_count):
        head = heads[w].tobytes()
        if head in seen:
            continue
        crc = table.crc if table is not None else None
        key = (head, length, config, table_version, crc, n)
        if key in _GOOD_HEADERS:
            seen.add(head)
            continue
        try:
            _, count = check_header(
                head,
                length,
                config=config,
                levels=table.host if table is not None else None,
                table_version=table_version,
                crc=crc,
            )
        except PayloadError as exc:
            msg = f"payload {w} of {w_count}: {exc}"
            raise PayloadError(msg) from exc
        if count != n:
            msg = f"payload {w} of {w_count}: it holds {count} elements, expected n = {n}"
            raise PayloadError(msg)
        seen.add(head)
        if len(_GOOD_HEADERS) > 256:
            _GOOD_HEADERS.clear()
        _GOOD_HEADERS.add(key)


def _dequantize_payload(
    payload: torch.Tensor,
    config: QuantizerConfig,
    table: LevelTable | None,
    n: int,
    m: int,
    nb: int,
    off_codes: int,
    off_tail: int,
) -> torch.Tensor:
    res = torch.empty(n, dtype=torch.float32, device=payload.device)
    if m:
        assert table is not None
        scales = _bytes_f32(payload[HEADER_SIZE:off_codes])
        codes = unpack_codes(payload[off_codes:off_tail], config.code_bits, m)
        d = config.bucket_size
        counts = torch.full((nb,), d, dtype=torch.int64, device=payload.device)
        if m % d:
            counts[-1] = m % d
        s_el = torch.repeat_interleave(scales, counts, output_size=m)
        res[:m] = s_el * table.lookup[codes.long()]
    res[m:] = _bytes_f32(payload[off_tail:])
    return res
