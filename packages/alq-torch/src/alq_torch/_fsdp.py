"""Quantized gradients for FSDP2 (``torch.distributed.fsdp.fully_shard``) and for the slow link of hybrid sharding.

Two ways in, both through hooks FSDP2 offers (torch 2.13,
``torch/distributed/fsdp/_fully_shard/_fully_shard.py``: ``set_custom_reduce_scatter``,
``set_all_reduce_hook``; called from ``foreach_reduce`` in ``_fsdp_collectives.py``):

* :class:`ALQReduceScatter`, a ``ReduceScatter`` comm for ``FSDPModule.set_custom_reduce_scatter``.
  FSDP hands it the flat reduce-scatter input (``W`` equal chunks of ``S`` elements, chunk ``k``
  owned by rank ``k``, in the reduce dtype: float32, bfloat16 or float16) and the ``S``-element
  output. Each rank quantizes its ``W`` chunks, every chunk its own payload whose quantization
  buckets start at the chunk's first element (a chunk ends in its own tail bucket: FSDP's chunk
  edges fall where they fall), the payloads go to their owners by one ``all_to_all_single`` of
  uint8, and the owner decodes and averages the ``W`` payloads of its chunk into the output.
  A rank transmits ``(W - 1) * payload_size(config, S)`` bytes instead of ``(W - 1) * S * itemsize``.
  The protocol leaves the wire to the comm: FSDP reads only ``output_tensor`` after the call and
  ignores the return value, so the payload sizes are free.
* :class:`ALQAllReduceHook`, a hook for ``FSDPModule.set_all_reduce_hook``, for hybrid sharding:
  FSDP2 shards within a group (its own full-precision reduce-scatter, on the fast link) and the
  hook averages the reduce-scattered shard across the groups with quantized payloads (all-gather
  of payloads over the replicate group, decode and average: every rank of a replicate group ends
  with the same bytes). Only inter-group traffic is compressed.

  FSDP2's native HSDP (``fully_shard`` on a 2-D mesh) runs its own full-precision all-reduce over
  the replicate dimension and calls the hook *after* it (``foreach_reduce``: "If native HSDP is used,
  this is executed after the HSDP all reduce"), so the hook could not replace it. Hybrid ALQ
  therefore shards with ``fully_shard(..., mesh=mesh["shard"])`` (1-D: FSDP within a group) and
  the hook is the replicate dimension's all-reduce; :func:`register_fsdp` refuses a native-HSDP
  module with that explanation. The replicas start equal (``register_fsdp`` broadcasts every
  parameter shard from replicate rank 0) and stay equal because they receive equal gradients.

:func:`register_fsdp` installs one of them on every FSDP module of a model that owns parameters
and returns it: the object holds the level table, telemetry and ``state_dict`` /
``load_state_dict``.

Rounds, levels, noise. A *round* is one synchronized backward pass: the comm is called once per
FSDP module (in the same order on every rank), numbered ``0, 1, ...`` in call order; the round
ends at the end of backward (an autograd final callback queued by the round's first call; called
outside backward, end it with :meth:`end_round`). The first ``warmup_steps`` rounds and calls
with fewer than ``exact_below`` elements are exact. At a level-update round each rank's statistics
of the tensors it quantizes (its chunks; in hybrid mode its shard) are all-gathered over the
statistics group (default: the world), rank 0 fits the new table with the core's
:class:`alq_core.AdaptiveQuantizer` and broadcasts the quantizer's state: every rank holds the
same table and version, used from the next round. Every payload carries the table version and
checksum; a payload from another version, or with a corrupted header, raises
:class:`alq_core.PayloadError` naming the step, the call (bucket) and the sending rank (on CUDA the
headers are compared on the device and read back without a stall, raising at a later call or at
:meth:`check`). Noise derives from ``(seed, step, bucket, rank, phase, chunk)`` only, so a job
resumed from ``state_dict()`` continues bit-identically.

Setup for ``torchrun --nnodes N --nproc_per_node G`` (``N`` nodes of ``G`` GPUs; every process runs)::

    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from alq_core import QuantizerConfig
    from alq_torch import register_fsdp

    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    cfg = QuantizerConfig("alq", bits=3, bucket_size=8192)

    # FSDP2 over all N*G ranks, quantized reduce-scatter:
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    alq = register_fsdp(model, cfg, warmup_steps=100)

    # or hybrid: shard within a node (NVLink, exact), quantize across nodes (the network):
    mesh = init_device_mesh("cuda", (N, G), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    alq = register_fsdp(model, cfg, hybrid=True, mesh=mesh)

    ...train as usual; save alq.state_dict() with the checkpoint, alq.load_state_dict(...) on resume.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import deque
from typing import Any

import alq_core
import numpy as np
import torch
import torch.distributed as dist
from alq_core import PayloadError, QuantizerConfig, payload_size

from ._exchange import _FLOAT_DTYPES, _all_gather_flat, _derive_seed, record_own_error, variance_every
from ._levels_sync import local_stats, sync_levels
from ._tables import LevelsInForce, header_tensor, level_table
from ._telemetry import BucketRecord, LevelUpdateRecord, RecordHistory, StepRecord, current_stream
from ._wire import decode_sum, quantize_encode

__all__ = ["ALQAllReduceHook", "ALQReduceScatter", "register_fsdp"]

_STATE_FORMAT = 1
_HEADER = alq_core.HEADER_SIZE
#: Calls per round and ranks per group with their own device-side header flags (higher ones share the last).
_MAX_CALLS, _MAX_RANKS = 256, 1024


def _reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, op: Any, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None)
    if fn is not None:
        fn(output=out, input=inp, op=op, group=group)
    else:  # pragma: no cover - torch < 2.12
        dist.reduce_scatter_tensor(out, inp, op=op, group=group)


def _op_scale(op: Any, world: int) -> float:
    """The factor FSDP's reduce op applies to the sum: ``1/W`` (AVG), 1 (SUM), ``f`` (PREMUL_SUM(f))."""
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.PREMUL_SUM and isinstance(getattr(op, "factor", None), float):
        return float(op.factor)
    msg = f"ALQReduceScatter supports FSDP's AVG, SUM and PREMUL_SUM reductions; got {op!r}"
    raise ValueError(msg)


class _PendingFlags:
    """Device-side header flags of one round, copied to pinned memory and read back without stalling."""

    __slots__ = ("_event", "_flags", "step")

    def __init__(self, flags: torch.Tensor, step: int) -> None:
        self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        self._flags.copy_(flags, non_blocking=True)
        self._event: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._event.record(current_stream(flags.device))
        self.step = step

    def failed(self, block: bool) -> list[tuple[int, int]] | None:
        """``(call, rank)`` pairs whose header differed; None if not known yet and ``block`` is False."""
        if not block and not self._event.query():
            return None
        self._event.synchronize()
        return [(int(i), int(r)) for i, r in torch.nonzero(self._flags).tolist()]


class _ALQComm(LevelsInForce, RecordHistory):
    """What :class:`ALQReduceScatter` and :class:`ALQAllReduceHook` share: levels, rounds, telemetry, state."""

    _kind = ""

    def __init__(
        self,
        config: QuantizerConfig,
        *,
        stats_group: Any = None,
        warmup_steps: int = 0,
        exact_below: int = 16384,
        quantizer: Any = None,
        schedule: Any = None,
        seed: int = 0,
        dist_num: int = 50,
        stats_weights: str = "norm",
        timing: bool = True,
        telemetry: bool = True,
        telemetry_history: int = 1000,
        measure_variance: bool | int = False,
    ) -> None:
        if not isinstance(config, QuantizerConfig):
            msg = f"`config` must be an alq_core.QuantizerConfig; got {type(config).__name__}"
            raise TypeError(msg)
        for name, value, low in (
            ("warmup_steps", warmup_steps, 0),
            ("exact_below", exact_below, 0),
            ("seed", seed, 0),
            ("dist_num", dist_num, 1),
            ("telemetry_history", telemetry_history, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                msg = f"`{name}` must be an integer >= {low}; got {value!r}"
                raise ValueError(msg)
        if stats_weights not in ("norm", "norm2"):
            msg = f"`stats_weights` must be 'norm' or 'norm2'; got {stats_weights!r}"
            raise ValueError(msg)
        self.config = dataclasses.replace(config, nonfinite="propagate") if config.quantized else config
        self.stats_group = stats_group
        self.warmup_steps = warmup_steps
        self.exact_below = exact_below
        self.seed = seed
        self.dist_num = dist_num
        self.stats_weights = stats_weights
        self.timing = timing
        self.keep_telemetry = telemetry
        self.measure_variance_every = variance_every(measure_variance)
        if quantizer is None:
            kwargs: dict[str, Any] = {}
            if schedule is not None:
                kwargs["schedule"] = schedule
            quantizer = alq_core.AdaptiveQuantizer(self.config, **kwargs)
        self.quantizer = quantizer
        self.step = 0
        self._records: deque[StepRecord] = deque(maxlen=telemetry_history)
        self._current: StepRecord | None = None
        self._in_round = False
        self._auto_end = False
        self._calls = 0
        self._update_due = False
        self._stats: list[tuple[torch.Tensor, Any]] = []
        self._stats_device: torch.device | None = None
        self._table_key: int | None = None
        self._table_host: np.ndarray | None = None
        self._flags: torch.Tensor | None = None  # int32 (_MAX_CALLS, _MAX_RANKS) on the GPU
        self._poison: torch.Tensor | None = None  # int32 (_MAX_CALLS,): decode_sum's own flags (NaN output)
        self._flags_used = False
        self._pending: list[_PendingFlags] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ rounds
    def _begin_call(self) -> tuple[int, StepRecord | None]:
        if not self._in_round:
            self._in_round = True
            self._calls = 0
            self._queue_flags(self.step - 1)
            self._raise_failed(block=False)
            self._stats = []
            cfg = self.config
            self._update_due = bool(cfg.quantized and self.quantizer.due(self.step))
            self._current = StepRecord(self.step) if self.keep_telemetry else None
            self._auto_end = False
            try:  # end the round when autograd finishes this backward pass
                torch.autograd.Variable._execution_engine.queue_callback(self._end_round_callback)  # type: ignore[attr-defined]
                self._auto_end = True
            except RuntimeError:  # not inside backward: the caller ends the round (end_round)
                pass
        index = self._calls
        self._calls += 1
        return index, self._current

    def _end_round_callback(self) -> None:
        if self._in_round:
            self.end_round()

    def end_round(self) -> None:
        """End the current round: the level update if one is due, the telemetry record, ``step += 1``.

        Called automatically at the end of the backward pass that made the round's first call; call it
        yourself after driving the comm by hand (outside autograd). Collective when a level update is
        due: every rank must call it.
        """
        if not self._in_round:
            return
        try:
            if self._update_due:
                update = self._update_levels()
                if self._current is not None:
                    self._current.level_update = update
            if self._current is not None:
                self._records.append(self._current)
        finally:
            self._current = None
            self._in_round = False
            self._update_due = False
            self._stats = []
            self.step += 1

    def _collect_stats(self, parts: list[torch.Tensor]) -> None:
        """This call's statistics (one tensor per quantization domain), kept for the round's level update."""
        cfg = self.config
        rows: list[torch.Tensor] = []
        for x in parts:
            rows.append(local_stats(x, cfg))
        if not rows:
            return
        stat = torch.stack(rows).sum(dim=0) if cfg.spec.stats == "empirical" else torch.cat(rows, dim=1)
        event = None
        if stat.device.type == "cuda":  # computed on FSDP's reduce-scatter stream: the update waits for it
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(current_stream(stat.device))
        self._stats.append((stat, event))
        self._stats_device = stat.device

    # ------------------------------------------------------------ level update
    def _update_levels(self) -> LevelUpdateRecord:
        group = self.stats_group
        device = self._stats_device or torch.device("cpu")
        for _, event in self._stats:
            if event is not None:
                current_stream(device).wait_event(event)

        def gather(out: torch.Tensor, inp: torch.Tensor, async_op: bool) -> None:
            _all_gather_flat(out, inp, group, False)

        return sync_levels(
            self.quantizer,
            self.config,
            [s for s, _ in self._stats],
            step=self.step,
            rank=dist.get_rank(group),
            world=dist.get_world_size(group),
            group=group,
            device=device,
            gather=gather,
            dist_num=self.dist_num,
            stats_weights=self.stats_weights,
        )

    # ------------------------------------------------------------ header checks
    def _decode(
        self,
        recv: torch.Tensor,
        levels: np.ndarray,
        version: int,
        n: int,
        out: torch.Tensor,
        scale: float,
        index: int,
        ranks: list[int],
    ) -> None:
        """``decode_sum`` of the ``W`` received payloads into ``out``; a bad header names the sending rank."""
        cfg = self.config
        if out.device.type != "cuda":
            try:
                decode_sum(recv, levels, cfg, n, table_version=version, out=out, scale=scale, check_headers=True)
            except PayloadError as exc:
                text = str(exc)
                m = re.match(r"payload (\d+) of \d+: (.*)", text, re.S)
                who = f"the payload from rank {ranks[int(m.group(1))]}" if m else "a received payload"
                msg = f"{self._kind} step {self.step}, bucket {index}: {who}: {m.group(2) if m else text}"
                raise PayloadError(msg) from exc
            return
        flags, poison = self._device_flags(out.device)
        i = min(index, _MAX_CALLS - 1)
        head = header_tensor(cfg, n, version, level_table(levels, cfg, out.device).crc, out.device)
        w = min(recv.shape[0], _MAX_RANKS)
        bad = (recv[:w, :_HEADER] != head).any(dim=1).to(torch.int32)
        flags[i, :w].bitwise_or_(bad)
        decode_sum(recv, levels, cfg, n, table_version=version, out=out, scale=scale, check_headers=poison[i : i + 1])
        self._flags_used = True

    def _device_flags(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._flags is None or self._flags.device != device or self._poison is None:
            self._flags = torch.zeros(_MAX_CALLS, _MAX_RANKS, dtype=torch.int32, device=device)
            self._poison = torch.zeros(_MAX_CALLS, dtype=torch.int32, device=device)
            self._ranks_of: dict[int, list[int]] = {}
        return self._flags, self._poison

    def _queue_flags(self, step: int) -> None:
        if self._flags is not None and self._flags_used:
            with self._lock:
                self._pending.append(_PendingFlags(self._flags, step))
                self._flags.zero_()
                self._flags_used = False

    def _raise_failed(self, block: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep: list[_PendingFlags] = []
        for i, p in enumerate(pending):
            failed = p.failed(block)
            if failed is None:
                keep = pending[i:]
                break
            if failed:
                where = ", ".join(f"bucket {c} from rank {self._sender(c, r)}" for c, r in failed[:8])
                msg = (
                    f"{self._kind} step {p.step}: payload header(s) did not match this rank's ({where}): level-table"
                    " version, table checksum, configuration or element count differ (or the header is corrupted)."
                    " The averaged gradient of those buckets was replaced by NaN."
                )
                raise PayloadError(msg)
        with self._lock:
            self._pending = keep + self._pending

    def _sender(self, call: int, row: int) -> int:
        ranks = getattr(self, "_ranks_of", {}).get(call)
        return ranks[row] if ranks and row < len(ranks) else row

    def check(self) -> None:
        """Raise :class:`alq_core.PayloadError` if a GPU header check of this or an earlier round failed (synchronizes)."""
        self._queue_flags(self.step if self._in_round else self.step - 1)
        self._raise_failed(block=True)

    # -------------------------------------------------------------- checkpoint
    def _config_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": cfg.method,
            "bits": cfg.bits,
            "bucket_size": cfg.bucket_size,
            "norm": cfg.norm,
            "tail": cfg.tail,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from: step counter, seed, level table and quantizer state (identical on every rank).

        Save it with the model and optimizer state; :meth:`load_state_dict` it on every rank before
        training resumes: the next round continues bit-identically (the calls of a round are numbered in
        FSDP's reduce order, which a restarted job repeats).
        """
        self.check()
        return {
            "format": _STATE_FORMAT,
            "kind": self._kind,
            "config": self._config_dict(),
            "step": self.step,
            "seed": self.seed,
            "quantizer": self.quantizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or state.get("kind") != self._kind:
            got = (state.get("format"), state.get("kind")) if isinstance(state, dict) else type(state).__name__
            msg = f"expected a {self._kind}.state_dict() of format {_STATE_FORMAT}; got {got!r}"
            raise ValueError(msg)
        if state["config"] != self._config_dict():
            msg = (
                f"checkpoint was saved with {state['config']}, this object is configured with {self._config_dict()};"
                " build it with the saved configuration"
            )
            raise ValueError(msg)
        self.quantizer.load_state_dict(state["quantizer"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._table_key = None
        self._in_round = False
        self._stats = []

    def _record(
        self,
        step_rec: StepRecord | None,
        index: int,
        x: torch.Tensor,
        mode: str,
        reason: str | None,
        sent: int,
        exact: int,
    ) -> BucketRecord:
        rec = BucketRecord(
            index=index,
            numel=x.numel(),
            dtype=str(x.dtype).replace("torch.", ""),
            mode=mode,
            reason=reason,
            table_version=None,
            bytes_sent=sent,
            bytes_exact=exact,
        )
        if step_rec is not None:
            step_rec.buckets.append(rec)
        return rec

    def _exact_reason(self, x: torch.Tensor, world: int) -> str | None:
        if world == 1:
            return "world_size_1"
        if not self.config.quantized:
            return "fp32"
        if x.dtype not in _FLOAT_DTYPES:
            return "dtype"
        if self.step < self.warmup_steps:
            return "warmup"
        if x.numel() < max(self.exact_below, 1):
            return "small"
        return None

    def _span(self, rec: BucketRecord, name: str, device: torch.device) -> Any:
        if not self.timing:
            return None
        span = rec._span(name, device)
        span.start()
        return span

    def _exchange(self, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
        """The collective moving the payloads (all-to-all: FSDP; all-gather: hybrid). Tests override it."""
        raise NotImplementedError

    def _exchange_and_decode(
        self,
        rec: BucketRecord,
        send: torch.Tensor,
        recv: torch.Tensor,
        group: Any,
        levels: np.ndarray,
        version: int,
        n: int,
        out: torch.Tensor,
        scale: float,
        index: int,
    ) -> None:
        """Move the payloads (``send``, uint8) into ``recv`` (uint8 ``W * size``), then decode-average them into ``out`` (``n``)."""
        device = out.device
        span = self._span(rec, "communicate", device)
        self._exchange(recv, send, group)
        if span is not None:
            span.stop()
        span = self._span(rec, "decode", device)
        world = dist.get_world_size(group)
        ranks = [dist.get_global_rank(group, r) for r in range(world)]
        if device.type == "cuda":
            self._device_flags(device)
            self._ranks_of[min(index, _MAX_CALLS - 1)] = ranks
        self._decode(recv.view(world, -1), levels, version, n, out, scale, index, ranks)
        if span is not None:
            span.stop()


class ALQReduceScatter(_ALQComm):
    """A quantized reduce-scatter for FSDP2: ``fsdp_module.set_custom_reduce_scatter(ALQReduceScatter(config))``.

    One object serves every FSDP module of a model (:func:`register_fsdp` installs it on all of them)
    and holds the level table, step counter, telemetry and :meth:`state_dict`. See the module notes.

    Parameters
    ----------
    config : alq_core.QuantizerConfig
        Method, bits, bucket size, norm, tail, clipping (``nonfinite`` becomes ``"propagate"``: a chunk
        holding NaN or Inf decodes to NaN, so AMP's scaler skips the step).
    **kwargs
        The keyword options below, shared with :class:`ALQAllReduceHook`.

    Other Parameters
    ----------------
    stats_group : ProcessGroup, optional
        Ranks whose statistics are merged for a level update and which share one table (default: the world).
    warmup_steps : int
        Rounds at the start reduced exactly (FSDP's own reduce-scatter).
    exact_below : int
        Reduce-scatter inputs with fewer elements are reduced exactly (default 16384).
    quantizer : alq_core.AdaptiveQuantizer, optional
        Owns the table and its schedule; built from ``config`` (and ``schedule``) when None.
    schedule : optional
        Passed to :class:`alq_core.AdaptiveQuantizer`.
    seed : int
        Base of every noise seed (with step, call index, rank and chunk).
    dist_num, stats_weights :
        The norm-based statistics model (SPEC section 5).
    timing : bool
        Record quantize / communicate / decode times.
    telemetry : bool
        Keep a :class:`StepRecord` per round (its buckets are the round's calls, in order).
    telemetry_history : int
        Rounds kept.
    measure_variance : bool or int
        Every ``k`` rounds (True: every round; default never), decode this rank's own payloads and record
        ``||Q(g) - g||^2 / ||g||^2`` over the round's quantized calls (``StepRecord.variance``); costs one
        decode per payload.

    Notes
    -----
    ``__call__`` runs synchronously in stream order (on FSDP's reduce-scatter stream) and returns None,
    as FSDP's default comm does with ``async_op=False``. Telemetry: ``bytes_sent`` is
    ``(W - 1) * payload_size(config, S)``, ``bytes_exact`` ``(W - 1) * S * itemsize``.
    """

    _kind = "ALQReduceScatter"

    def __init__(self, config: QuantizerConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        _register_comm_type()

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """FSDP's buffers: plain ``torch.empty`` (the payload buffers are this object's own)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        op: Any = dist.ReduceOp.AVG,
        async_op: bool = False,
    ) -> None:
        """Reduce-scatter ``input_tensor`` (``W * S`` elements, chunk ``k`` for rank ``k``) into ``output_tensor`` (``S``)."""
        index, step_rec = self._begin_call()
        world = dist.get_world_size(group)
        n = output_tensor.numel()
        if input_tensor.numel() != world * n:
            msg = f"reduce-scatter input must hold W * S = {world} * {n} elements; got {input_tensor.numel()}"
            raise ValueError(msg)
        flat = input_tensor.view(-1)
        item = flat.element_size()
        exact_bytes = (world - 1) * n * item
        reason = self._exact_reason(flat, world)
        chunks = [flat[k * n : (k + 1) * n] for k in range(world)]
        if self._update_due and reason in (None, "warmup") and flat.numel() >= max(self.exact_below, 1):
            self._collect_stats(chunks)
        if reason is not None:
            rec = self._record(step_rec, index, flat, "exact", reason, exact_bytes, exact_bytes)
            span = self._span(rec, "communicate", flat.device)
            _reduce_scatter_flat(output_tensor, input_tensor, op, group)
            if span is not None:
                span.stop()
            return
        scale = _op_scale(op, world)
        cfg = self.config
        levels, version = self._table()
        size = payload_size(cfg, n)
        rec = self._record(step_rec, index, flat, "quantized", None, (world - 1) * size, exact_bytes)
        rec.table_version = version
        device = flat.device
        send = torch.empty(world * size, dtype=torch.uint8, device=device)
        recv = torch.empty(world * size, dtype=torch.uint8, device=device)
        me = dist.get_rank()
        span = self._span(rec, "quantize", device)
        for k in range(world):
            quantize_encode(
                chunks[k], levels, cfg, table_version=version, seed=_derive_seed(self.seed, self.step, index, me, 1, k),
                out=send[k * size : (k + 1) * size],
            )  # fmt: skip
        if span is not None:
            span.stop()
        if self._measure_now():
            for k in range(world):
                record_own_error(rec, send[k * size : (k + 1) * size], chunks[k], levels, cfg)
        self._exchange_and_decode(rec, send, recv, group, levels, version, n, output_tensor.view(-1), scale, index)

    def _exchange(self, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
        dist.all_to_all_single(recv, send, group=group)


class ALQAllReduceHook(_ALQComm):
    """The replicate dimension of hybrid sharding, quantized: ``fsdp_module.set_all_reduce_hook(hook)``.

    Called by FSDP2 on each module's reduce-scattered shard (already averaged within the shard group,
    exactly); averages it across ``replicate_group`` with quantized payloads, in place: every rank
    quantizes its shard, the payloads are all-gathered over the replicate group and each rank decodes
    and averages all ``R`` of them (in rank order: identical bytes on every replica). A rank transmits
    ``(R - 1) * payload_size(config, S)`` bytes (``bytes_sent``) instead of an all-reduce's
    ``2 (R - 1) S itemsize / R``. Use with ``fully_shard(..., mesh=mesh["shard"])``, not native HSDP
    (see the module notes). Parameters as :class:`ALQReduceScatter`, plus ``replicate_group``.
    """

    _kind = "ALQAllReduceHook"

    def __init__(self, config: QuantizerConfig, replicate_group: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.replicate_group = replicate_group

    def __call__(self, tensor: torch.Tensor) -> None:
        """Average ``tensor`` (a flat shard, float32 / bfloat16 / float16) over the replicate group, in place."""
        index, step_rec = self._begin_call()
        group = self.replicate_group
        world = dist.get_world_size(group)
        flat = tensor.view(-1)
        n = flat.numel()
        exact_bytes = (2 * (world - 1) * n * flat.element_size()) // world
        reason = self._exact_reason(flat, world)
        if self._update_due and reason in (None, "warmup", "world_size_1") and n >= max(self.exact_below, 1):
            self._collect_stats([flat])
        if reason is not None:
            rec = self._record(step_rec, index, flat, "exact", reason, exact_bytes if world > 1 else 0, exact_bytes)
            if world > 1:
                span = self._span(rec, "communicate", flat.device)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                flat.div_(world)
                if span is not None:
                    span.stop()
            return
        cfg = self.config
        levels, version = self._table()
        size = payload_size(cfg, n)
        rec = self._record(step_rec, index, flat, "allgather", None, (world - 1) * size, exact_bytes)
        rec.table_version = version
        device = flat.device
        send = torch.empty(size, dtype=torch.uint8, device=device)
        recv = torch.empty(world * size, dtype=torch.uint8, device=device)
        span = self._span(rec, "quantize", device)
        quantize_encode(
            flat, levels, cfg, table_version=version, seed=_derive_seed(self.seed, self.step, index, dist.get_rank(), 1, 0),
            out=send,
        )  # fmt: skip
        if span is not None:
            span.stop()
        if self._measure_now():
            record_own_error(rec, send, flat, levels, cfg)
        self._exchange_and_decode(rec, send, recv, group, levels, version, n, flat, 1.0 / world, index)

    def _exchange(self, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
        _all_gather_flat(recv, send, group, False)


def _register_comm_type() -> None:
    """Make :class:`ALQReduceScatter` a (virtual) subclass of FSDP2's ``ReduceScatter`` comm interface.

    Registered on first use rather than subclassed at import: importing FSDP2 costs over a second, and
    ``import alq_torch`` must stay cheap. FSDP2 itself only calls ``allocate`` and ``__call__``.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    if not issubclass(ALQReduceScatter, ReduceScatter):
        ReduceScatter.register(ALQReduceScatter)


def _param_groups(m: Any) -> list[Any]:
    """The FSDP parameter groups of one FSDP module: a list in torch 2.13, one group or None in torch 2.11."""
    state = m._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    one = getattr(state, "_fsdp_param_group", None)
    return [] if one is None else [one]


def _fsdp_modules(module: torch.nn.Module) -> list[Any]:
    """FSDP modules of ``module`` (itself included) that own parameters."""
    from torch.distributed.fsdp import FSDPModule

    found = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            groups = _param_groups(m)
            if any(g.fsdp_params for g in groups):
                found.append(m)
    return found


def register_fsdp(
    module: torch.nn.Module,
    config: QuantizerConfig,
    *,
    hybrid: bool = False,
    mesh: Any = None,
    replicate_group: Any = None,
    sync_replicas: bool = True,
    **kwargs: Any,
) -> ALQReduceScatter | ALQAllReduceHook:
    """Install ALQ on every FSDP module of ``module`` that owns parameters; return the object holding its state.

    Parameters
    ----------
    module : torch.nn.Module
        A model whose submodules (and/or itself) went through ``fully_shard``.
    config : alq_core.QuantizerConfig
    hybrid : bool
        False: quantize FSDP's reduce-scatter (:class:`ALQReduceScatter`). True: keep FSDP's exact
        reduce-scatter within the shard group and quantize the average across groups
        (:class:`ALQAllReduceHook`); the model must be sharded on the shard dimension only
        (``fully_shard(m, mesh=mesh["shard"])``).
    mesh : DeviceMesh, optional
        Hybrid: a 2-D mesh; its first dimension (or the one named ``"replicate"``) is the replicate group.
    replicate_group : ProcessGroup, optional
        Hybrid: the replicate group itself (instead of ``mesh``).
    sync_replicas : bool
        Hybrid: broadcast every parameter shard from replicate rank 0 first, so the replicas start equal.
    **kwargs
        Passed to the comm (``warmup_steps``, ``exact_below``, ``schedule``, ``seed``, ...).

    Returns
    -------
    ALQReduceScatter or ALQAllReduceHook
    """
    mods = _fsdp_modules(module)
    if not mods:
        msg = "`module` has no FSDP module owning parameters: apply torch.distributed.fsdp.fully_shard first"
        raise ValueError(msg)
    if not hybrid:
        if mesh is not None or replicate_group is not None:
            msg = "`mesh` / `replicate_group` apply to hybrid=True only"
            raise ValueError(msg)
        comm = ALQReduceScatter(config, **kwargs)
        for m in mods:
            m.set_custom_reduce_scatter(comm)
        return comm
    if replicate_group is None:
        if mesh is None or mesh.ndim != 2:
            msg = "hybrid=True needs a 2-D DeviceMesh (`mesh`, dims (replicate, shard)) or `replicate_group`"
            raise ValueError(msg)
        names = mesh.mesh_dim_names or ()
        replicate_group = mesh.get_group("replicate" if "replicate" in names else 0)
    for m in mods:
        for g in _param_groups(m):
            if g._is_hsdp:
                msg = (
                    "hybrid=True quantizes the replicate dimension itself, but this module uses FSDP2's native HSDP "
                    "(a 2-D mesh), whose full-precision all-reduce runs before any all-reduce hook; shard it with "
                    "fully_shard(module, mesh=mesh['shard']) instead"
                )
                raise ValueError(msg)
    hook = ALQAllReduceHook(config, replicate_group, **kwargs)
    if sync_replicas and dist.get_world_size(replicate_group) > 1:
        src = dist.get_global_rank(replicate_group, 0)
        with torch.no_grad():
            for p in module.parameters():
                local = getattr(p, "_local_tensor", p)
                dist.broadcast(local, src=src, group=replicate_group)
    for m in mods:
        m.set_all_reduce_hook(hook)
    return hook
