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

This module holds the state object and the hook function. The state's parts live beside it, one job
each: :mod:`alq_torch._exchange` (choosing and running a bucket's collective),
:mod:`alq_torch._plans` (per-bucket buffers and prepared launches), :mod:`alq_torch._levels_sync`
(the level-update protocol across ranks), :mod:`alq_torch._checks` (device-side payload-header
checks) and :mod:`alq_torch._telemetry` (the records).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import alq_core
import numpy as np
import torch
import torch.distributed as dist
from alq_core import QuantizerConfig

from ._checks import _MAX_FLAGS
from ._exchange import _all_gather_flat, _derive_seed, _Exchange, _run_after, variance_every
from ._levels_sync import sync_levels
from ._plans import _GatherPlan, _ScatterPlan
from ._telemetry import LevelUpdateRecord, StepRecord

# Names that tests and the host-time benchmarks reach through this module (``_all_gather_flat`` is
# looked up here at every call, so replacing it here replaces every all-gather the hook makes).
__all__ = ["_MAX_FLAGS", "_all_gather_flat", "_derive_seed", "_run_after", "ALQState", "alq_hook"]

_COLLECTIVES = ("auto", "allgather", "reduce_scatter")
_STATE_FORMAT = 1


def _check_options(collective: str, stats_weights: str, measure_variance: bool | int, **counts: int) -> int:
    """Validate :class:`ALQState`'s options; returns ``measure_variance`` as "every k rounds" (0: never)."""
    if collective not in _COLLECTIVES:
        msg = f"`collective` must be one of {', '.join(map(repr, _COLLECTIVES))}; got {collective!r}"
        raise ValueError(msg)
    lows = {"dist_num": 1, "allgather_max_world": 1, "telemetry_history": 1}
    for name, value in counts.items():
        low = lows.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            msg = f"`{name}` must be an integer >= {low}; got {value!r}"
            raise ValueError(msg)
    every = variance_every(measure_variance)
    if stats_weights not in ("norm", "norm2"):
        msg = f"`stats_weights` must be 'norm' or 'norm2'; got {stats_weights!r}"
        raise ValueError(msg)
    return every


class ALQState(_Exchange):
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
        every = _check_options(
            collective, stats_weights, measure_variance, warmup_steps=warmup_steps, exact_below=exact_below,
            seed=seed, dist_num=dist_num, allgather_max_world=allgather_max_world,
            telemetry_history=telemetry_history,
        )  # fmt: skip
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
            kwargs: dict[str, Any] = {} if schedule is None else {"schedule": schedule}
            quantizer = alq_core.AdaptiveQuantizer(self.config, **kwargs)
        self.quantizer = quantizer
        self.step = 0
        self._records: deque[StepRecord] = deque(maxlen=telemetry_history)
        self._unresolved: list[StepRecord] = []  # kept records with GPU timings or variances not yet read
        self._current: StepRecord | None = None
        self._in_round = False
        self._update_due = False
        self._stats: list[torch.Tensor] = []
        self._init_checks()
        self._world, self._rank = 1, 0  # the group's, read at the start of every round
        self._table_key: int | None = None
        self._table_host: np.ndarray | None = None
        self._plans: dict[int, _GatherPlan | _ScatterPlan] = {}  # prepared exchanges by DDP bucket index

    # ------------------------------------------------------------- properties
    @property
    def world_size(self) -> int:
        """Ranks in the process group."""
        return int(dist.get_world_size(self.process_group))

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return int(dist.get_rank(self.process_group))

    # -------------------------------------------------------------- checkpoint
    def _config_key(self) -> dict[str, Any]:
        cfg = self.config
        return {"method": cfg.method, "bits": cfg.bits, "bucket_size": cfg.bucket_size, "norm": cfg.norm,
                "tail": cfg.tail}  # fmt: skip

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
        return {
            "format": _STATE_FORMAT,
            "config": self._config_key(),
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
        mine = self._config_key()
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
            self._update_due = bool(self.config.quantized and self._world > 1 and self.quantizer.due(self.step))
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

    def _update_levels(self, device: torch.device) -> LevelUpdateRecord:
        """The level-update protocol (:func:`alq_torch._levels_sync.sync_levels`) on this round's statistics."""
        return sync_levels(
            self.quantizer, self.config, self._stats, step=self.step, rank=self._rank, world=self._world,
            group=self.process_group, device=device, gather=self._all_gather, dist_num=self.dist_num,
            stats_weights=self.stats_weights,
        )  # fmt: skip

    def _all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool) -> Any:
        """Every all-gather the hook makes over its group (through this module's ``_all_gather_flat``)."""
        return _all_gather_flat(out, inp, self.process_group, async_op)


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
