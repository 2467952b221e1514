"""Per-step telemetry of the DDP communication hook.

One :class:`StepRecord` per communication round (one optimizer step, whatever
the gradient accumulation), holding one :class:`BucketRecord` per DDP bucket
and, at update steps, a :class:`LevelUpdateRecord`.

Byte counts are the bytes *this rank transmits* under the usual ring /
pairwise algorithms, so that the figures compare like with like:

* exact all-reduce of ``N`` bytes: ``2 (W-1)/W * N``;
* all-gather of a ``P``-byte payload: ``(W-1) * P``;
* reduce-scatter style: all-to-all ``(W-1) * P_chunk`` plus all-gather ``(W-1) * P_chunk``.

``bytes_exact`` is what an exact all-reduce of the bucket (in its own dtype)
would have transmitted; ``compression_ratio = bytes_exact / bytes_sent``.

Times are seconds. On CUDA they come from CUDA events (resolved lazily, when
the records are read); on CPU from ``time.perf_counter``. ``communicate_s``
runs from the launch of the collective to the start of its callback, so it
includes waiting behind earlier collectives.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass
class LevelUpdateRecord:
    """What happened at a level-update step.

    Attributes
    ----------
    step : int
        The communication round whose statistics were used; the new table
        applies from the next round on.
    updated : bool
        Whether the level table changed.
    reason : str
        Why (the core's report, or why the update was skipped / failed).
    version : int
        Table version after the update.
    previous_version : int
        Table version before.
    num_buckets : int
        Quantization buckets (over every rank) whose statistics were merged.
    seconds : float
        Wall time of the whole update (gather, fit, broadcast) on this rank.
    levels : tuple of float
        The table in force after the update.
    """

    step: int
    updated: bool
    reason: str
    version: int
    previous_version: int
    num_buckets: int
    seconds: float
    levels: tuple[float, ...]


#: torch Stream objects by (stream id, device index, device type): building one in Python costs more
#: host time than the event record it serves (and the hook records up to six per bucket).
_STREAMS: dict[tuple[int, int, int], torch.cuda.Stream] = {}


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """``torch.cuda.current_stream(device)`` from a cache of Stream objects (``device``: a CUDA device)."""
    lookup = getattr(torch._C, "_cuda_getCurrentStream", None)
    if lookup is None:  # a torch without that private call: the public one
        return torch.cuda.current_stream(device)
    key = lookup(torch.cuda.current_device() if device.index is None else device.index)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= 1024:
            _STREAMS.clear()
        stream = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])  # type: ignore[no-untyped-call]
        _STREAMS[key] = stream
    return stream


class _Span:
    """Start/stop marks on the host clock or on a CUDA stream."""

    __slots__ = ("_cuda", "_device", "_start", "_stop")

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._start: object = None
        self._stop: object = None

    def start(self) -> None:
        self._start = self._mark()

    def stop(self) -> None:
        self._stop = self._mark()

    def _mark(self) -> object:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            ev.record(current_stream(self._device))
            return ev
        return time.perf_counter()

    def ready(self) -> bool:
        if self._start is None or self._stop is None:
            return False
        if self._cuda:
            assert isinstance(self._stop, torch.cuda.Event)
            return bool(self._stop.query())  # type: ignore[no-untyped-call]
        return True

    def seconds(self, block: bool) -> float | None:
        if self._start is None or self._stop is None:
            return None
        if self._cuda:
            start, stop = self._start, self._stop
            assert isinstance(start, torch.cuda.Event) and isinstance(stop, torch.cuda.Event)
            if not block and not stop.query():  # type: ignore[no-untyped-call]
                return None
            stop.synchronize()
            return float(start.elapsed_time(stop)) / 1e3
        assert isinstance(self._start, float) and isinstance(self._stop, float)
        return self._stop - self._start


@dataclass
class BucketRecord:
    """One DDP bucket in one communication round.

    Attributes
    ----------
    index : int
        DDP bucket index.
    numel : int
        Gradient elements in the bucket.
    dtype : str
        The bucket's dtype (``"float32"``, ``"float16"``, ``"bfloat16"``...).
    mode : {"allgather", "reduce_scatter", "allreduce", "local"}
        How it was communicated (``allreduce``: exact average; ``local``: world size 1).
    reason : str or None
        Why it went exact: ``"fp32"``, ``"warmup"``, ``"small"``, ``"dtype"``,
        ``"world_size_1"``; None when quantized.
    table_version : int or None
        Level-table version in the payloads (None when exact).
    bytes_sent : int
        Bytes this rank transmits for the bucket (see the module notes).
    bytes_exact : int
        Bytes an exact all-reduce would have transmitted.
    quantize_s, communicate_s, decode_s : float or None
        Time in quantize+encode, in the collective(s), in decode+average
        (None until measured; the reduce-scatter path sums its two phases).
    variance : float or None
        Measured ``||Q(g) - g||^2 / ||g||^2`` of this rank's own quantization of
        the bucket (first quantization only), when ``measure_variance`` asks.
    """

    index: int
    numel: int
    dtype: str
    mode: str
    reason: str | None
    table_version: int | None
    bytes_sent: int
    bytes_exact: int
    quantize_s: float | None = None
    communicate_s: float | None = None
    decode_s: float | None = None
    variance: float | None = None
    _spans: dict[str, list[_Span]] = field(default_factory=dict, repr=False, compare=False)
    _variance_parts: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    _variance_sums: tuple[float, float] | None = field(default=None, repr=False, compare=False)

    def _span(self, name: str, device: torch.device) -> _Span:
        span = _Span(device)
        self._spans.setdefault(name, []).append(span)
        return span

    def _resolve(self, block: bool) -> bool:
        """Turn pending events into numbers; True when nothing is pending."""
        done = True
        for name, spans in list(self._spans.items()):
            if not block and not all(s.ready() for s in spans):
                done = False
                continue
            vals = [s.seconds(block=True) for s in spans]
            total = sum(v for v in vals if v is not None)
            setattr(self, f"{name}_s", total)
            del self._spans[name]
        if self._variance_parts:
            if block:
                num = sum(float(p[0]) for p in self._variance_parts)
                den = sum(float(p[1]) for p in self._variance_parts)
                self.variance = num / den if den > 0 else float("nan")
                self._variance_sums = (num, den)
                self._variance_parts.clear()
            else:
                done = False
        return done


@dataclass
class StepRecord:
    """Telemetry of one communication round (one optimizer step).

    Attributes
    ----------
    step : int
        Round counter of the hook (0-based; counts synchronized backward passes).
    buckets : list of BucketRecord
        In hook-call order.
    level_update : LevelUpdateRecord or None
        Set at level-update rounds.
    """

    step: int
    buckets: list[BucketRecord] = field(default_factory=list)
    level_update: LevelUpdateRecord | None = None

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank transmitted in the round."""
        return sum(b.bytes_sent for b in self.buckets)

    @property
    def bytes_exact(self) -> int:
        """Bytes an exact all-reduce of every bucket would have transmitted."""
        return sum(b.bytes_exact for b in self.buckets)

    @property
    def compression_ratio(self) -> float:
        """``bytes_exact / bytes_sent`` (1.0 for an empty round)."""
        sent = self.bytes_sent
        return self.bytes_exact / sent if sent else 1.0

    def _total(self, name: str) -> float | None:
        vals = [getattr(b, name) for b in self.buckets]
        known = [v for v in vals if v is not None]
        return sum(known) if known else None

    @property
    def quantize_s(self) -> float | None:
        """Sum over buckets of the quantize+encode time (None when not measured)."""
        return self._total("quantize_s")

    @property
    def communicate_s(self) -> float | None:
        """Sum over buckets of the collective time (they overlap: not wall time)."""
        return self._total("communicate_s")

    @property
    def decode_s(self) -> float | None:
        """Sum over buckets of the decode+average time."""
        return self._total("decode_s")

    @property
    def variance(self) -> float | None:
        """Measured ``sum ||Q(g) - g||^2 / sum ||g||^2`` over the round's measured buckets (None if none)."""
        sums = [b._variance_sums for b in self.buckets if b._variance_sums is not None]
        den = sum(d for _, d in sums)
        return sum(n for n, _ in sums) / den if den > 0 else None

    def _resolve(self, block: bool) -> bool:
        done = True
        for b in self.buckets:
            done = b._resolve(block) and done
        return done


class RecordHistory:
    """The kept per-round records of a communication object (the DDP hook's state, the FSDP comms).

    Subclasses keep their :class:`StepRecord` s in ``self._records`` (a bounded deque, oldest first),
    their round counter in ``self.step`` and how often they measure the variance in
    ``self.measure_variance_every`` (every k rounds; 0: never).
    """

    _records: deque[StepRecord]
    step: int
    measure_variance_every: int

    def _measure_now(self) -> bool:
        """Whether this round measures the quantization variance of the rank's own payloads."""
        k = self.measure_variance_every
        return k > 0 and self.step % k == 0

    @property
    def telemetry(self) -> list[StepRecord]:
        """The kept :class:`StepRecord` s, oldest first (pending GPU timings are resolved: this synchronizes)."""
        records = list(self._records)
        for r in records:
            r._resolve(block=True)
        return records

    @property
    def last_record(self) -> StepRecord | None:
        """The most recent completed round's record (resolved), or None."""
        if not self._records:
            return None
        rec = self._records[-1]
        rec._resolve(block=True)
        return rec
