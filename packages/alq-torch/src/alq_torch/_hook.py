"""The DDP communication hook: quantized gradients packed and sent between processes.

Register it with ``ddp_model.register_comm_hook(ALQState(config), alq_hook)``.
Every DDP bucket is quantized into a fixed-size payload (SPEC section 4),
exchanged, decoded and averaged in place into ``bucket.buffer()``.

Two collectives (SPEC section 10):

* ``"allgather"``: each rank quantizes its bucket once; the payloads are
  all-gathered and every rank decodes and averages all ``W`` of them. A rank
  transmits ``(W-1) * P`` bytes: the volume grows with the world size, the
  error is that of averaging ``W`` independent quantizations.
* ``"reduce_scatter"``: the bucket is split into ``W`` chunks on quantization
  bucket boundaries; chunk ``k`` of every rank goes to rank ``k``
  (all-to-all), which decodes and averages it, requantizes the average with
  the same levels, and all-gathers it. A rank transmits about ``2 P (W-1)/W``
  bytes whatever ``W``; the second quantization adds the variance of one
  quantization of the averaged chunk.

``collective="auto"`` takes ``allgather`` up to ``allgather_max_world`` ranks
(default 4) and ``reduce_scatter`` above.

Level tables are identical on all ranks: at a level-update round, every rank's
per-bucket statistics are all-gathered (for ``alq-e`` / ``alq-einf``: the sums
of its level sketch, computed on the device, a fixed ``3 x 1282`` float64 array
summed over its DDP buckets; rank 0 adds the ranks' sums in rank order), rank 0
fits the new table with the core's :class:`alq_core.AdaptiveQuantizer` and
broadcasts the quantizer's whole state, so every rank holds the same table,
version and optimizer state. A failed or degenerate fit keeps the old table and
says why in the round's :class:`LevelUpdateRecord`. Every
payload carries the table version and checksum; a mismatch raises
:class:`alq_core.PayloadError`.

Noise is derived from ``(seed, step, bucket, rank, phase, chunk)`` only, so a
job resumed from :meth:`ALQState.state_dict` continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import alq_core
import numpy as np
import torch
import torch.distributed as dist
from alq_core import PayloadError, QuantizerConfig, payload_size
from alq_core._sketch import NUM_BINS

from ._sketch import _sketch_parts
from ._stats import bucket_stats
from ._telemetry import BucketRecord, LevelUpdateRecord, StepRecord, _Span, current_stream
from ._wire import decode_sum, prepare_decode_sum, prepare_quantize_encode

Collective = Literal["auto", "allgather", "reduce_scatter"]
_COLLECTIVES = ("auto", "allgather", "reduce_scatter")
_STATE_FORMAT = 1
_M64 = (1 << 64) - 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic, order-sensitive)."""
    h = 0x5AD5EED
    for p in parts:
        h = _mix64(h ^ (p & _M64))
    return h >> 1


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any, async_op: bool) -> Any:
    """``all_gather_single`` (torch >= 2.12) or ``all_gather_into_tensor`` into a flat output."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _run_after(fut: torch.futures.Future[Any], fn: Callable[[torch.futures.Future[Any]], Any]) -> Any:
    """Run ``fn(fut)`` now, in this thread, synchronized with ``fut`` (its streams on CUDA).

    Collectives launched by ``fn`` are then issued in the same order on every
    rank (a callback running in a backend thread could interleave with the next
    bucket's collectives). A not-yet-complete future (Gloo) is waited for first.
    """
    if not fut.done():
        fut.wait()
    box: list[Any] = []
    errors: list[BaseException] = []

    def call(f: torch.futures.Future[Any]) -> None:
        try:
            box.append(fn(f))
        except BaseException as exc:  # re-raised below with its own type (PayloadError...)
            errors.append(exc)

    fut.then(call)
    if errors:
        raise errors[0]
    if not box:
        msg = "internal error: a completed future did not run its callback inline"
        raise RuntimeError(msg)
    return box[0]


#: Header-check flags kept per round (one per DDP bucket index; higher indices share the last).
_MAX_FLAGS = 256


class _PendingCheck:
    """A round's device-side header-check flags, read back without stalling (pinned copy + event)."""

    __slots__ = ("_event", "_flags", "step")

    def __init__(self, flags: torch.Tensor, step: int) -> None:
        self._event: Any = None
        if flags.device.type == "cuda":
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record(current_stream(flags.device))
        else:  # host flags (tests): nothing to wait for
            self._flags = flags.clone()
        self.step = step

    def failed(self, block: bool) -> list[int] | None:
        """Bucket indices whose headers differed (empty if none); None if not yet known and ``block`` is False."""
        if self._event is not None:
            if not block and not self._event.query():
                return None
            self._event.synchronize()
        return [int(i) for i in torch.nonzero(self._flags).flatten().tolist()]


class _GatherPlan:
    """One DDP bucket's all-gather exchange, prepared once per buffer, size, dtype and level table.

    DDP hands the hook the same bucket buffers every step, so the payload and gather buffers are kept
    (no allocation, no ``record_stream``) and the encode and decode are prepared launches
    (:func:`alq_torch._wire.prepare_quantize_encode`, :func:`~alq_torch._wire.prepare_decode_sum`):
    a step pays little more host time than the kernel launches themselves. Reusing the buffers is
    ordered by the streams: the next step's quantize (compute stream) and all-gather (which waits for
    the compute stream) come after DDP waited for this step's future, whose decode read ``gathered``
    after the all-gather that read ``payload``.
    """

    __slots__ = ("decode", "encode", "gathered", "key", "payload", "version")

    def __init__(
        self,
        state: ALQState,
        flat: torch.Tensor,
        index: int,
        world: int,
        rank: int,
        levels: np.ndarray,
        version: int,
        key: tuple[Any, ...],
    ) -> None:
        cfg, n, device = state.config, flat.numel(), flat.device
        size = payload_size(cfg, n)
        self.key, self.version = key, version
        self.payload = torch.empty(size, dtype=torch.uint8, device=device)
        self.gathered = torch.empty(world * size, dtype=torch.uint8, device=device)
        self.encode = prepare_quantize_encode(flat, levels, cfg, table_version=version, out=self.payload)
        self.decode = prepare_decode_sum(
            self.gathered.view(world, size),
            levels,
            cfg,
            n,
            table_version=version,
            out=flat,  # half-precision buckets: the float32 average rounded at the store
            scale=1.0 / world,
            check_headers=state._flag(device, index),
        )


class _ScatterPlan:
    """One DDP bucket's reduce-scatter style exchange, prepared once (see :class:`_GatherPlan`).

    ``encode[k]`` quantizes chunk ``k`` into ``send``; ``decode_owned`` averages the W received
    payloads of this rank's chunk into ``owned``; ``encode_owned`` requantizes it into ``send2``; and
    ``decode[k]`` writes chunk ``k`` of the all-gathered payloads back into the bucket.
    """

    __slots__ = (
        "decode",
        "decode_owned",
        "encode",
        "encode_owned",
        "gathered",
        "key",
        "out",
        "recv",
        "send",
        "send2",
        "sizes",
        "version",
    )

    def __init__(
        self,
        state: ALQState,
        flat: torch.Tensor,
        index: int,
        world: int,
        rank: int,
        levels: np.ndarray,
        version: int,
        key: tuple[Any, ...],
    ) -> None:
        cfg, n, device = state.config, flat.numel(), flat.device
        nb = -(-n // cfg.bucket_size)
        edges = [min(n, (k * nb // world) * cfg.bucket_size) for k in range(world + 1)]
        counts = [edges[k + 1] - edges[k] for k in range(world)]
        self.sizes = [payload_size(cfg, c) for c in counts]
        offsets = [sum(self.sizes[:k]) for k in range(world)]
        own, pmax = self.sizes[rank], max(self.sizes)
        check = state._flag(device, index)
        self.key, self.version = key, version
        self.send = torch.empty(sum(self.sizes), dtype=torch.uint8, device=device)
        self.encode = [
            prepare_quantize_encode(
                flat[edges[k] : edges[k + 1]],
                levels,
                cfg,
                table_version=version,
                out=self.send[offsets[k] : offsets[k] + self.sizes[k]],
            )
            for k in range(world)
        ]
        self.recv = torch.empty(world * own, dtype=torch.uint8, device=device)
        owned = torch.empty(counts[rank], dtype=torch.float32, device=device)
        self.decode_owned = prepare_decode_sum(
            self.recv.view(world, own), levels, cfg, counts[rank], table_version=version, out=owned,
            scale=1.0 / world, check_headers=check,
        )  # fmt: skip
        self.send2 = torch.zeros(pmax, dtype=torch.uint8, device=device)
        self.encode_owned = prepare_quantize_encode(owned, levels, cfg, table_version=version, out=self.send2[:own])
        self.gathered = torch.empty(world * pmax, dtype=torch.uint8, device=device)
        rows = self.gathered.view(world, pmax)
        self.out = [flat[edges[k] : edges[k + 1]] for k in range(world)]
        self.decode = [
            prepare_decode_sum(
                rows[k : k + 1, : self.sizes[k]],
                levels,
                cfg,
                counts[k],
                table_version=version,
                out=self.out[k],
                scale=1.0,
                check_headers=check,
            )
            for k in range(world)
        ]


_Plan = TypeVar("_Plan", _GatherPlan, _ScatterPlan)


class ALQState:
    """State of :func:`alq_hook`: configuration, level table, step counter, telemetry.

    Parameters
    ----------
    config : alq_core.QuantizerConfig
        Method, bits, bucket size, norm, tail, clipping. Its ``nonfinite`` field
        is overridden with ``"propagate"``: a bucket holding NaN or Inf decodes
        to NaN on every rank, so AMP's ``GradScaler`` sees the overflow and skips
        the step exactly as it would without the hook.
    process_group : ProcessGroup, optional
        The group DDP reduces over (default: the world group).
    collective : {"auto", "allgather", "reduce_scatter"}
        See the module notes. ``"reduce_scatter"`` falls back to ``"allgather"``
        for a bucket with fewer quantization buckets than ranks.
    warmup_steps : int
        Communication rounds at the start that use the exact all-reduce average.
    exact_below : int
        DDP buckets with fewer elements are sent exactly (default 16384 = 64 KB
        of float32: below that, latency dominates and quantizing saves nothing).
    quantizer : alq_core.AdaptiveQuantizer, optional
        Owns the level table and its update schedule; built from ``config`` (and
        ``schedule``) when not given. Fixed methods never update.
    schedule : optional
        Passed to :class:`alq_core.AdaptiveQuantizer` when ``quantizer`` is None.
    seed : int
        Base of every noise seed (combined with step, bucket, rank, phase).
    dist_num : int
        Buckets kept by the norm-based statistics model (SPEC section 5).
    stats_weights : {"norm", "norm2"}
        Mixture weights of the norm-based model.
    allgather_max_world : int
        Largest world size that ``collective="auto"`` sends by all-gather.
    measure_variance : bool or int
        Measure ``||Q(g) - g||^2 / ||g||^2`` of this rank's quantization: every
        round (True) or every ``k`` rounds (an int). Costs one extra local decode.
    timing : bool
        Record quantize / communicate / decode times (CUDA events on the GPU).
    telemetry : bool
        Keep :class:`StepRecord` s (the last ``telemetry_history`` rounds).
    telemetry_history : int
        Rounds kept.

    Attributes
    ----------
    step : int
        Communication rounds completed (one per synchronized backward pass).
    """

    def __init__(
        self,
        config: QuantizerConfig,
        *,
        process_group: Any = None,
        collective: str = "auto",
        warmup_steps: int = 0,
        exact_below: int = 16384,
        quantizer: Any = None,
        schedule: Any = None,
        seed: int = 0,
        dist_num: int = 50,
        stats_weights: str = "norm",
        allgather_max_world: int = 4,
        measure_variance: bool | int = False,
        timing: bool = True,
        telemetry: bool = True,
        telemetry_history: int = 1000,
    ) -> None:
        if not isinstance(config, QuantizerConfig):
            msg = f"`config` must be an alq_core.QuantizerConfig; got {type(config).__name__}"
            raise TypeError(msg)
        if collective not in _COLLECTIVES:
            msg = f"`collective` must be one of {', '.join(map(repr, _COLLECTIVES))}; got {collective!r}"
            raise ValueError(msg)
        for name, value, low in (
            ("warmup_steps", warmup_steps, 0),
            ("exact_below", exact_below, 0),
            ("seed", seed, 0),
            ("dist_num", dist_num, 1),
            ("allgather_max_world", allgather_max_world, 1),
            ("telemetry_history", telemetry_history, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                msg = f"`{name}` must be an integer >= {low}; got {value!r}"
                raise ValueError(msg)
        if isinstance(measure_variance, bool):
            every = 1 if measure_variance else 0
        elif isinstance(measure_variance, int) and measure_variance >= 0:
            every = measure_variance
        else:
            msg = f"`measure_variance` must be a bool or a non-negative integer (every k rounds); got {measure_variance!r}"
            raise ValueError(msg)
        if stats_weights not in ("norm", "norm2"):
            msg = f"`stats_weights` must be 'norm' or 'norm2'; got {stats_weights!r}"
            raise ValueError(msg)
        self.config = dataclasses.replace(config, nonfinite="propagate") if config.quantized else config
        self.process_group = process_group
        self.collective = collective
        self.warmup_steps = warmup_steps
        self.exact_below = exact_below
        self.seed = seed
        self.dist_num = dist_num
        self.stats_weights = stats_weights
        self.allgather_max_world = allgather_max_world
        self.measure_variance_every = every
        self.timing = timing
        self.keep_telemetry = telemetry
        if quantizer is None:
            kwargs: dict[str, Any] = {}
            if schedule is not None:
                kwargs["schedule"] = schedule
            quantizer = alq_core.AdaptiveQuantizer(self.config, **kwargs)
        self.quantizer = quantizer
        self.step = 0
        self._records: deque[StepRecord] = deque(maxlen=telemetry_history)
        self._unresolved: list[StepRecord] = []  # kept records with GPU timings or variances not yet read
        self._current: StepRecord | None = None
        self._in_round = False
        self._update_due = False
        self._stats: list[torch.Tensor] = []
        self._pending: list[_PendingCheck] = []
        self._flags: torch.Tensor | None = None  # int32 (_MAX_FLAGS,) on the GPU: header mismatches this round
        self._flags_used = False
        self._lock = threading.Lock()
        self._world, self._rank = 1, 0  # the group's, read at the start of every round
        self._table_key: int | None = None
        self._table_host: np.ndarray | None = None
        self._plans: dict[int, _GatherPlan | _ScatterPlan] = {}  # prepared exchanges by DDP bucket index

    # ------------------------------------------------------------------ group
    @property
    def world_size(self) -> int:
        """Ranks in the process group."""
        return int(dist.get_world_size(self.process_group))

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return int(dist.get_rank(self.process_group))

    # ------------------------------------------------------------------ levels
    @property
    def levels(self) -> np.ndarray | None:
        """The level table in force, float32 ``(L,)`` (None for ``fp32``)."""
        lv = self.quantizer.levels
        return None if lv is None else np.asarray(lv, dtype=np.float32)

    @property
    def table_version(self) -> int:
        """Version of the level table in force (written into every payload)."""
        return int(self.quantizer.version)

    def _table(self) -> tuple[np.ndarray, int]:
        """Level table (host float32: the ops cache its device copy by value) and its version."""
        version = self.table_version
        if self._table_key != version or self._table_host is None:
            host = self.levels
            assert host is not None
            self._table_host = np.ascontiguousarray(host, dtype=np.float32)
            self._table_key = version
            self._plans.clear()
        return self._table_host, version

    # --------------------------------------------------------------- telemetry
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

    def check(self) -> None:
        """Raise :class:`alq_core.PayloadError` if a GPU header check of this or an earlier round failed.

        On CUDA the decode kernels compare payload headers on the device (no
        stall) and set a flag per bucket; the hook reads a round's flags back
        asynchronously and raises at a later hook call (within two rounds).
        Calling this after ``optimizer.step()`` checks now (synchronizes).
        """
        self._collect_flags(self.step if self._in_round else self.step - 1)
        self._raise_failed_checks(block=True)

    def _collect_flags(self, step: int) -> None:
        """Queue the read-back of the flags of round ``step`` and clear them (stream-ordered after its decodes)."""
        if self._flags is not None and self._flags_used:
            with self._lock:
                self._pending.append(_PendingCheck(self._flags, step))
                self._flags.zero_()
                self._flags_used = False

    def _flag(self, device: torch.device, index: int) -> torch.Tensor | bool:
        """The header-check flag of bucket ``index`` on ``device`` (CUDA), or True (check on the host)."""
        if device.type != "cuda":
            return True
        if self._flags is None or self._flags.device != device:
            self._flags = torch.zeros(_MAX_FLAGS, dtype=torch.int32, device=device)
        self._flags_used = True
        i = min(index, _MAX_FLAGS - 1)
        return self._flags[i : i + 1]

    def _raise_failed_checks(self, block: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep: list[_PendingCheck] = []
        for i, p in enumerate(pending):
            failed = p.failed(block)
            if failed is None:  # rounds complete in order: the later ones are not known either
                keep = pending[i:]
                break
            if failed:
                last = "" if failed[-1] < _MAX_FLAGS - 1 else f" (index {_MAX_FLAGS - 1} stands for all higher ones)"
                msg = (
                    f"step {p.step}, bucket(s) {failed}{last}: a payload header did not match this rank's"
                    " (level-table version, table checksum, configuration or element count): the ranks' level"
                    " tables diverged. The averaged gradient of those buckets was replaced by NaN."
                )
                raise PayloadError(msg)
        with self._lock:
            self._pending = keep + self._pending

    # ------------------------------------------------------------------ rounds
    def _begin_bucket(self) -> StepRecord | None:
        if not self._in_round:
            self._in_round = True
            self._collect_flags(self.step - 1)
            self._raise_failed_checks(block=False)
            while self._unresolved and self._unresolved[0]._resolve(block=False):  # rounds finish in order
                del self._unresolved[0]
            self._stats = []
            self._world, self._rank = self.world_size, self.rank  # fixed for the group; read once per round
            cfg = self.config
            self._update_due = bool(cfg.quantized and self._world > 1 and self.quantizer.due(self.step))
            self._current = StepRecord(self.step) if self.keep_telemetry else None
        return self._current

    def _end_round(self, device: torch.device) -> None:
        if self._update_due:
            update = self._update_levels(device)
            if self._current is not None:
                self._current.level_update = update
        if self._current is not None:
            self._records.append(self._current)
            if any(b._spans or b._variance_parts for b in self._current.buckets):  # GPU numbers to read later
                self._unresolved.append(self._current)
                if len(self._unresolved) > (self._records.maxlen or 1):  # older ones left the history
                    del self._unresolved[0]
        self._current = None
        self._in_round = False
        self._update_due = False
        self._stats = []
        self.step += 1

    def _measure_now(self) -> bool:
        k = self.measure_variance_every
        return k > 0 and self.step % k == 0

    # ------------------------------------------------------------ level update
    def _update_levels(self, device: torch.device) -> LevelUpdateRecord:
        t0 = time.perf_counter()
        before = self.table_version
        group = self.process_group
        world = self._world
        fit = self._fit_sketch if self.config.spec.stats == "empirical" else self._fit_buckets
        payload = fit(device)  # every rank takes part in the all-gather; only rank 0 fits
        if world > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast_object_list(payload, src=src, group=group, device=device)
            if self._rank != 0:
                self.quantizer.load_state_dict(payload[0])
        reason, used = str(payload[1]), int(payload[2])
        after = self.table_version
        lv = self.levels
        return LevelUpdateRecord(
            step=self.step,
            updated=after != before,
            reason=reason,
            version=after,
            previous_version=before,
            num_buckets=used,
            seconds=time.perf_counter() - t0,
            levels=tuple(float(v) for v in lv) if lv is not None else (),
        )

    def _fit_buckets(self, device: torch.device) -> list[Any]:
        """All-gather every rank's per-bucket statistics; rank 0 fits. Returns ``[state, reason, buckets used]``
        on rank 0 (the broadcast payload), ``[None, "", 0]`` elsewhere."""
        if self._stats:
            local = torch.cat(self._stats, dim=1).contiguous()  # (4, K) float64
        else:
            local = torch.zeros(4, 0, dtype=torch.float64, device=device)
        world = self._world
        k = local.shape[1]
        gathered = torch.empty(world * 4 * k, dtype=torch.float64, device=device)
        if k:
            _all_gather_flat(gathered, local.reshape(-1), self.process_group, async_op=False)
        rows = gathered.reshape(world, 4, k).permute(1, 0, 2).reshape(4, world * k).cpu().numpy()
        if self._rank != 0:
            return [None, "", 0]
        reason = ""
        norms, means, stds, sizes = rows
        ok = np.isfinite(norms) & np.isfinite(means) & np.isfinite(stds) & (norms > 0)
        try:
            stats = alq_core.GradientStats.from_buckets(
                norms[ok],
                means[ok],
                stds[ok],
                sizes[ok].astype(np.int64),
                dist_num=self.dist_num,
                weights=self.stats_weights,  # type: ignore[arg-type]
            )
            report = self.quantizer.update(stats, self.step)
            reason = str(getattr(report, "reason", "") or "updated")
        except Exception as exc:  # a failed fit must never stop training
            reason = f"level update failed, levels kept: {type(exc).__name__}: {exc}"
        if not ok.all():
            reason += f" ({int((~ok).sum())} non-finite or zero buckets left out)"
        return [self.quantizer.state_dict(), reason, int(ok.sum())]

    def _fit_sketch(self, device: torch.device) -> list[Any]:
        """``alq-e`` / ``alq-einf``: all-gather every rank's sketch sums (fixed size), sum them on rank 0 in rank
        order and fit the table to the merged :class:`alq_core.LevelSketch`. Returns what :meth:`_fit_buckets` does."""
        size = 3 * NUM_BINS + 3
        if self._stats:
            local = torch.stack(self._stats).sum(dim=0)  # this rank's DDP buckets, in order
        else:
            local = torch.zeros(size, dtype=torch.float64, device=device)
        world = self._world
        gathered = torch.empty(world * size, dtype=torch.float64, device=device)
        _all_gather_flat(gathered, local.contiguous(), self.process_group, async_op=False)
        rows = gathered.reshape(world, size).cpu().numpy()
        if self._rank != 0:
            return [None, "", 0]
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        count, skipped, buckets = (round(float(v)) for v in total[3 * NUM_BINS :])
        try:
            sketch = alq_core.LevelSketch.from_sums(
                total[: 3 * NUM_BINS].reshape(3, NUM_BINS), self.config, count=count, skipped=skipped
            )
            report = self.quantizer.update(sketch, self.step)
            reason = str(getattr(report, "reason", "") or "updated")
        except Exception as exc:  # a failed fit must never stop training
            reason = f"level update failed, levels kept: {type(exc).__name__}: {exc}"
        if skipped:
            reason += f" ({skipped} non-finite buckets left out)"
        return [self.quantizer.state_dict(), reason, buckets - skipped]

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from: step counter, seed, level table, quantizer state.

        Identical on every rank; save it from rank 0 with the model and the
        optimizer, and :meth:`load_state_dict` it on every rank before training
        resumes. Checks pending GPU header comparisons first (synchronizes).

        Notes
        -----
        The noise of every payload is a function of ``(seed, step, bucket index,
        rank)``, so the resumed job repeats the original bit for bit *when DDP
        presents the same buckets*. DDP rebuilds its buckets after its first
        backward pass (by gradient-ready order) unless ``find_unused_parameters=True``;
        a restarted job's first round then quantizes another layout than the
        original run did at that step: statistically equivalent, not identical.
        For bitwise reproducibility across restarts, build DDP with
        ``find_unused_parameters=True`` (its layout is then fixed at construction).
        """
        self._raise_failed_checks(block=True)
        cfg = self.config
        return {
            "format": _STATE_FORMAT,
            "config": {
                "method": cfg.method,
                "bits": cfg.bits,
                "bucket_size": cfg.bucket_size,
                "norm": cfg.norm,
                "tail": cfg.tail,
            },
            "step": self.step,
            "seed": self.seed,
            "quantizer": self.quantizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next round continues bit-identically."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            msg = f"expected an ALQState.state_dict() of format {_STATE_FORMAT}; got {got!r}"
            raise ValueError(msg)
        cfg = self.config
        mine = {
            "method": cfg.method,
            "bits": cfg.bits,
            "bucket_size": cfg.bucket_size,
            "norm": cfg.norm,
            "tail": cfg.tail,
        }
        if state["config"] != mine:
            msg = f"checkpoint was saved with {state['config']}, this state is configured with {mine}; build the state with the saved configuration"
            raise ValueError(msg)
        self.quantizer.load_state_dict(state["quantizer"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._table_key = None
        self._plans.clear()
        self._in_round = False
        self._stats = []

    # ------------------------------------------------------------ collectives
    def _mode(self, buf: torch.Tensor) -> tuple[str, str | None]:
        world = self._world
        if world == 1:
            return "local", "world_size_1"
        if not self.config.quantized:
            return "allreduce", "fp32"
        if buf.dtype not in _FLOAT_DTYPES:
            return "allreduce", "dtype"
        if self.step < self.warmup_steps:
            return "allreduce", "warmup"
        if buf.numel() < max(self.exact_below, 1):
            return "allreduce", "small"
        want = self.collective
        if want == "auto":
            want = "allgather" if world <= self.allgather_max_world else "reduce_scatter"
        if want == "reduce_scatter" and -(-buf.numel() // self.config.bucket_size) < world:
            want = "allgather"
        return want, None

    def _communicate(self, buf: torch.Tensor, index: int, is_last: bool) -> torch.futures.Future[torch.Tensor]:
        step_rec = self._begin_bucket()
        flat = buf.view(-1)
        mode, reason = self._mode(flat)
        world = self._world
        itemsize = flat.element_size()
        exact_bytes = (2 * (world - 1) * flat.numel() * itemsize) // world
        rec = BucketRecord(
            index=index,
            numel=flat.numel(),
            dtype=str(flat.dtype).replace("torch.", ""),
            mode=mode,
            reason=reason,
            table_version=None,
            bytes_sent=exact_bytes,
            bytes_exact=exact_bytes,
        )
        if step_rec is not None:
            step_rec.buckets.append(rec)
        if (
            self._update_due
            and reason in (None, "warmup")
            and flat.numel() >= max(self.exact_below, 1)
            and flat.numel() >= self.config.bucket_size
        ):
            self._stats.append(self._local_stats(flat))
        try:
            if mode == "local":
                fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
                fut.set_result(buf)
            elif mode == "allreduce":
                fut = self._allreduce(buf, rec)
            elif mode == "allgather":
                fut = self._allgather(buf, flat, index, rec)
            else:
                fut = self._reduce_scatter(buf, flat, index, rec)
        finally:
            if is_last:
                for stale in [k for k in self._plans if k > index]:  # DDP rebuilt fewer buckets: free their buffers
                    del self._plans[stale]
                self._end_round(flat.device)
        return fut

    def _local_stats(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's statistics of one DDP bucket for the level update, on its device (no sync): the sketch
        sums, then quantized coordinates, non-finite buckets and buckets, float64 ``(3 * NUM_BINS + 3,)``, for
        ``alq-e`` / ``alq-einf``; the per-bucket ``(norm, mean, std, size)`` rows, float64 ``(4, K)``, else."""
        cfg = self.config
        if cfg.spec.stats == "empirical":
            sums, bad = _sketch_parts(flat, cfg)
            n = flat.numel()
            counts = torch.tensor([cfg.num_quantized(n), 0.0, cfg.num_buckets(n)], dtype=torch.float64)
            counts = counts.to(flat.device, non_blocking=True)
            counts[1] = bad.sum()
            return torch.cat([sums.reshape(-1), counts])
        norms, means, stds, sizes = bucket_stats(flat, cfg.bucket_size)
        return torch.stack([norms, means, stds, sizes.to(torch.float64)])

    def _timed(self, rec: BucketRecord, name: str, device: torch.device) -> _Span | None:
        if not self.timing:
            return None
        span = rec._span(name, device)
        span.start()
        return span

    def _allreduce(self, buf: torch.Tensor, rec: BucketRecord) -> torch.futures.Future[torch.Tensor]:
        span = self._timed(rec, "communicate", buf.device)
        buf.div_(self._world)
        work = dist.all_reduce(buf, group=self.process_group, async_op=True)

        def done(f: torch.futures.Future[Any]) -> torch.Tensor:
            f.value()  # re-raises a failed collective
            if span is not None:
                span.stop()
            return buf

        fut: torch.futures.Future[torch.Tensor] = work.get_future().then(done)
        return fut

    def _local_variance(
        self, payload: torch.Tensor, x: torch.Tensor, levels: np.ndarray, version: int, rec: BucketRecord
    ) -> None:
        n = x.numel()
        deq = decode_sum(payload.view(1, -1), levels, self.config, n, check_headers=False)  # our own payload
        ref = x.to(torch.float32)
        err = (deq - ref).double().square().sum()
        rec._variance_parts.append(torch.stack([err, ref.double().square().sum()]))

    def _plan(self, kind: type[_Plan], flat: torch.Tensor, index: int) -> _Plan:
        """Bucket ``index``'s kept exchange of ``kind``, rebuilt when its buffer, size, dtype, level table or
        group changed."""
        levels, version = self._table()
        key = (kind, flat.data_ptr(), flat.numel(), flat.dtype, flat.device, version, self._world, self._rank)
        plan = self._plans.get(index)
        if not isinstance(plan, kind) or plan.key != key:
            plan = kind(self, flat, index, self._world, self._rank, levels, version, key)
            self._plans[index] = plan
        return plan

    def _allgather(
        self, buf: torch.Tensor, flat: torch.Tensor, index: int, rec: BucketRecord
    ) -> torch.futures.Future[torch.Tensor]:
        world, rank, step = self._world, self._rank, self.step
        device = flat.device
        plan = self._plan(_GatherPlan, flat, index)
        if device.type == "cuda":
            self._flags_used = True  # the plan's decode checks headers into this round's flags
        rec.table_version = plan.version
        rec.bytes_sent = (world - 1) * plan.payload.numel()
        span_q = self._timed(rec, "quantize", device)
        plan.encode(_derive_seed(self.seed, step, index, rank, 1, 0))
        if span_q is not None:
            span_q.stop()
        if self._measure_now():
            levels, version = self._table()
            self._local_variance(plan.payload, flat, levels, version, rec)
        span_c = self._timed(rec, "communicate", device)
        work = _all_gather_flat(plan.gathered, plan.payload, self.process_group, async_op=True)

        def finish(f: torch.futures.Future[Any]) -> torch.Tensor:
            f.value()  # re-raises a failed collective
            if span_c is not None:
                span_c.stop()
            span_d = self._timed(rec, "decode", device)
            plan.decode()
            if span_d is not None:
                span_d.stop()
            return buf

        fut: torch.futures.Future[torch.Tensor] = work.get_future().then(finish)
        return fut

    def _reduce_scatter(
        self, buf: torch.Tensor, flat: torch.Tensor, index: int, rec: BucketRecord
    ) -> torch.futures.Future[torch.Tensor]:
        world, rank, step = self._world, self._rank, self.step
        device = flat.device
        plan = self._plan(_ScatterPlan, flat, index)
        if device.type == "cuda":
            self._flags_used = True  # the plan's decodes check headers into this round's flags
        sizes = plan.sizes
        rec.table_version = plan.version
        rec.bytes_sent = (sum(sizes) - sizes[rank]) + (world - 1) * plan.send2.numel()

        span_q = self._timed(rec, "quantize", device)
        for k in range(world):
            plan.encode[k](_derive_seed(self.seed, step, index, rank, 1, k))
        if span_q is not None:
            span_q.stop()
        if self._measure_now():
            levels, version = self._table()
            offset = 0
            for k in range(world):
                part = plan.send[offset : offset + sizes[k]]
                self._local_variance(part, plan.out[k], levels, version, rec)
                offset += sizes[k]
        span_c1 = self._timed(rec, "communicate", device)
        work = dist.all_to_all_single(
            plan.recv,
            plan.send,
            output_split_sizes=[sizes[rank]] * world,
            input_split_sizes=sizes,
            group=self.process_group,
            async_op=True,
        )

        def phase2(f: torch.futures.Future[Any]) -> torch.futures.Future[torch.Tensor]:
            f.value()  # re-raises a failed collective
            if span_c1 is not None:
                span_c1.stop()
            span_d1 = self._timed(rec, "decode", device)
            plan.decode_owned()
            if span_d1 is not None:
                span_d1.stop()
            span_q2 = self._timed(rec, "quantize", device)
            plan.encode_owned(_derive_seed(self.seed, step, index, rank, 2, rank))
            if span_q2 is not None:
                span_q2.stop()
            span_c2 = self._timed(rec, "communicate", device)
            work2 = _all_gather_flat(plan.gathered, plan.send2, self.process_group, async_op=True)

            def finish(f2: torch.futures.Future[Any]) -> torch.Tensor:
                f2.value()  # re-raises a failed collective
                if span_c2 is not None:
                    span_c2.stop()
                span_d2 = self._timed(rec, "decode", device)
                for decode in plan.decode:
                    decode()
                if span_d2 is not None:
                    span_d2.stop()
                return buf

            fut2: torch.futures.Future[torch.Tensor] = work2.get_future().then(finish)
            return fut2

        result: torch.futures.Future[torch.Tensor] = _run_after(work.get_future(), phase2)
        return result


def alq_hook(state: ALQState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: quantize, exchange, decode and average one bucket.

    Parameters
    ----------
    state : ALQState
    bucket : torch.distributed.GradBucket
        DDP's bucket; its flat ``buffer()`` (float32, float16 or bfloat16, shape
        ``(n,)``) is overwritten with the average over ranks, in its own dtype.

    Returns
    -------
    torch.futures.Future of Tensor
        Completes with ``bucket.buffer()`` holding the averaged gradient.

    Notes
    -----
    Per bucket index the state keeps the payload and receive buffers and prepared kernel launches
    (rebuilt when the bucket's buffer, size, dtype or level table changes; dropped when DDP has fewer
    buckets). Their reuse is ordered by waiting on the returned future before the same bucket is
    communicated again, as DDP does; a caller driving the hook by hand must do the same.

    Examples
    --------
    >>> state = ALQState(QuantizerConfig("alq", bits=3, bucket_size=8192))  # doctest: +SKIP
    >>> ddp_model.register_comm_hook(state, alq_hook)  # doctest: +SKIP
    """
    if not isinstance(state, ALQState):
        msg = (
            f"`state` must be an ALQState; got {type(state).__name__} (register_comm_hook(ALQState(config), alq_hook))"
        )
        raise TypeError(msg)
    return state._communicate(bucket.buffer(), int(bucket.index()), bool(bucket.is_last()))


# DDP checks the hook's annotations by identity (``dist.GradBucket``), not as strings.
alq_hook.__annotations__.update({"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]})  # type: ignore[attr-defined]
