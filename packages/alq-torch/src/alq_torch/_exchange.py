"""The DDP hook's per-bucket exchange: which collective a bucket takes, and running it.

A bucket goes one of four ways (:meth:`_Exchange._mode`): kept as is (one rank), the exact all-reduce
average (``fp32``, unsupported dtypes, warm-up rounds, buckets below ``exact_below``), the all-gather
exchange, or the reduce-scatter style exchange (SPEC section 10). The quantized exchanges run on the
bucket's kept plan (:mod:`alq_torch._plans`) with noise seeds derived from
``(seed, step, bucket, rank, phase, chunk)`` only (:func:`_derive_seed`), so a resumed job repeats
the original bit for bit. Each piece is timed into the bucket's :class:`BucketRecord` when asked.

:class:`_Exchange` is the part of :class:`alq_torch.ALQState` that does this; the state supplies its
configuration, level table, group shape and the all-gather over its group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from alq_core import QuantizerConfig

from ._checks import _HeaderChecks
from ._levels_sync import local_stats
from ._plans import _GatherPlan, _Plan, _ScatterPlan
from ._tables import LevelsInForce
from ._telemetry import BucketRecord, RecordHistory, StepRecord, _Span
from ._wire import decode_sum

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


def variance_every(measure_variance: bool | int) -> int:
    """``measure_variance`` (a bool, or every k rounds) as "every k rounds" (0: never); ValueError otherwise."""
    if isinstance(measure_variance, bool):
        return 1 if measure_variance else 0
    if isinstance(measure_variance, int) and measure_variance >= 0:
        return measure_variance
    msg = f"`measure_variance` must be a bool or a non-negative integer (every k rounds); got {measure_variance!r}"
    raise ValueError(msg)


def record_own_error(
    rec: BucketRecord, payload: torch.Tensor, x: torch.Tensor, levels: np.ndarray, config: QuantizerConfig
) -> None:
    """Add ``(||Q(x) - x||^2, ||x||^2)`` of this rank's own ``payload`` (float32 sums in float64, on ``x``'s
    device, not synchronized) to ``rec``'s variance parts."""
    deq = decode_sum(payload.view(1, -1), levels, config, x.numel(), check_headers=False)
    ref = x.to(torch.float32)
    err = (deq - ref).double().square().sum()
    rec._variance_parts.append(torch.stack([err, ref.double().square().sum()]))


class _Exchange(_HeaderChecks, LevelsInForce, RecordHistory):
    """Choosing and running one DDP bucket's exchange, on kept plans (one per DDP bucket index).

    :meth:`_communicate` is the hook's entry per bucket; the state opens and closes the round around it.
    """

    config: QuantizerConfig
    process_group: Any
    collective: str
    warmup_steps: int
    exact_below: int
    allgather_max_world: int
    measure_variance_every: int
    timing: bool
    seed: int
    _world: int
    _rank: int
    _plans: dict[int, _GatherPlan | _ScatterPlan]
    _update_due: bool  # this round updates the levels: collect the buckets' statistics
    _stats: list[torch.Tensor]
    #: ``_begin_bucket()``: opens the round at its first bucket; the round's record (None: not kept).
    _begin_bucket: Callable[[], StepRecord | None]
    #: ``_end_round(device)``: closes the round after its last bucket (level update, record, step + 1).
    _end_round: Callable[[torch.device], None]
    #: ``_all_gather(out, inp, async_op)``: an all-gather of flat tensors over the state's group.
    _all_gather: Callable[[torch.Tensor, torch.Tensor, bool], Any]

    def _table_changed(self) -> None:
        """A new level table: the plans built for the old one go."""
        self._plans.clear()

    def _communicate(self, buf: torch.Tensor, index: int, is_last: bool) -> torch.futures.Future[torch.Tensor]:
        """One bucket of the round: its record, its statistics at an update round, its exchange; the last
        bucket closes the round."""
        step_rec = self._begin_bucket()
        flat = buf.view(-1)
        mode, reason = self._mode(flat)
        world = self._world
        exact_bytes = (2 * (world - 1) * flat.numel() * flat.element_size()) // world
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
            self._stats.append(local_stats(flat, self.config))
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

    def _mode(self, buf: torch.Tensor) -> tuple[str, str | None]:
        """The bucket's exchange (``local``, ``allreduce``, ``allgather``, ``reduce_scatter``) and, for an
        exact one, why."""
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

    def _timed(self, rec: BucketRecord, name: str, device: torch.device) -> _Span | None:
        if not self.timing:
            return None
        span = rec._span(name, device)
        span.start()
        return span

    def _plan(self, kind: type[_Plan], flat: torch.Tensor, index: int) -> _Plan:
        """Bucket ``index``'s kept exchange of ``kind``, rebuilt when its buffer, size, dtype, level table or
        group changed."""
        levels, version = self._table()
        key = (kind, flat.data_ptr(), flat.numel(), flat.dtype, flat.device, version, self._world, self._rank)
        plan = self._plans.get(index)
        if not isinstance(plan, kind) or plan.key != key:
            check = self._flag(flat.device, index)
            plan = kind(self.config, flat, self._world, self._rank, levels, version, key, check)
            self._plans[index] = plan
        return plan

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
            levels, _ = self._table()
            record_own_error(rec, plan.payload, flat, levels, self.config)
        span_c = self._timed(rec, "communicate", device)
        work = self._all_gather(plan.gathered, plan.payload, True)

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
            levels, _ = self._table()
            offset = 0
            for k in range(world):
                part = plan.send[offset : offset + sizes[k]]
                record_own_error(rec, part, plan.out[k], levels, self.config)
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
            work2 = self._all_gather(plan.gathered, plan.send2, True)

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
