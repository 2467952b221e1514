"""The DDP hook's level-update protocol: every rank's statistics gathered, rank 0 fits, all receive.

At a level-update round each rank summarizes its DDP buckets on its device (:func:`local_stats`,
no synchronization) while they are exchanged. At the end of the round :func:`sync_levels` runs the
protocol, the same on every rank:

1. all-gather every rank's statistics: the per-bucket ``(norm, mean, std, size)`` rows
   (ALQ, AMQ and their ``-N`` variants), or, for ``alq-e`` / ``alq-einf``, the sums of the rank's
   level sketch, a fixed ``3 * NUM_BINS + 3`` float64 vector summed over its DDP buckets;
2. rank 0 merges them (sketch sums added in rank order) and fits the new table with the core's
   :class:`alq_core.AdaptiveQuantizer`; a failed or degenerate fit keeps the old table and says why;
3. rank 0 broadcasts the quantizer's whole state, so every rank holds the same table, version and
   optimizer state.

The result is the round's :class:`LevelUpdateRecord`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import alq_core
import numpy as np
import torch
import torch.distributed as dist
from alq_core import QuantizerConfig
from alq_core._sketch import NUM_BINS

from ._sketch import _sketch_parts
from ._stats import bucket_stats
from ._telemetry import LevelUpdateRecord

#: ``gather(out, inp, async_op)``: an all-gather of flat tensors over the hook's process group.
Gather = Callable[[torch.Tensor, torch.Tensor, bool], Any]


def local_stats(flat: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """This rank's statistics of one DDP bucket for the level update, on its device (no sync).

    For ``alq-e`` / ``alq-einf`` the sketch sums, then the counts of quantized coordinates, non-finite
    buckets and buckets: float64 ``(3 * NUM_BINS + 3,)``. For the other adaptive methods the
    per-bucket ``(norm, mean, std, size)`` rows: float64 ``(4, K)``.
    """
    if config.spec.stats == "empirical":
        sums, bad = _sketch_parts(flat, config)
        n = flat.numel()
        counts = torch.tensor([config.num_quantized(n), 0.0, config.num_buckets(n)], dtype=torch.float64)
        counts = counts.to(flat.device, non_blocking=True)
        counts[1] = bad.sum()
        return torch.cat([sums.reshape(-1), counts])
    norms, means, stds, sizes = bucket_stats(flat, config.bucket_size)
    return torch.stack([norms, means, stds, sizes.to(torch.float64)])


def sync_levels(
    quantizer: Any,
    config: QuantizerConfig,
    stats: list[torch.Tensor],
    *,
    step: int,
    rank: int,
    world: int,
    group: Any,
    device: torch.device,
    gather: Gather,
    dist_num: int,
    stats_weights: str,
) -> LevelUpdateRecord:
    """Run one level update across the ranks (every rank calls it at the same round).

    Parameters
    ----------
    quantizer : alq_core.AdaptiveQuantizer
        This rank's; updated on rank 0, loaded from rank 0's state elsewhere.
    config : QuantizerConfig
    stats : list of Tensor
        This rank's :func:`local_stats` of the round's DDP buckets, in bucket order.
    step : int
        The round (the fit's step).
    rank, world : int
        This rank and the group's size.
    group : ProcessGroup or None
    device : torch.device
        Where the collectives run (the buckets' device).
    gather : callable
        The all-gather of flat tensors over ``group``.
    dist_num, stats_weights
        The norm-based model's settings (SPEC section 5).
    """
    t0 = time.perf_counter()
    before = int(quantizer.version)
    if config.spec.stats == "empirical":
        payload = _fit_sketch(quantizer, config, stats, step, rank, world, device, gather)
    else:
        payload = _fit_buckets(quantizer, stats, step, rank, world, device, gather, dist_num, stats_weights)
    if world > 1:  # every rank took part in the all-gather; only rank 0 fitted
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(payload, src=src, group=group, device=device)
        if rank != 0:
            quantizer.load_state_dict(payload[0])
    reason, used = str(payload[1]), int(payload[2])
    after = int(quantizer.version)
    lv = quantizer.levels
    return LevelUpdateRecord(
        step=step,
        updated=after != before,
        reason=reason,
        version=after,
        previous_version=before,
        num_buckets=used,
        seconds=time.perf_counter() - t0,
        levels=tuple(float(v) for v in np.asarray(lv, dtype=np.float32)) if lv is not None else (),
    )


def _fit_buckets(
    quantizer: Any,
    stats: list[torch.Tensor],
    step: int,
    rank: int,
    world: int,
    device: torch.device,
    gather: Gather,
    dist_num: int,
    stats_weights: str,
) -> list[Any]:
    """All-gather every rank's per-bucket statistics; rank 0 fits. Returns ``[state, reason, buckets used]``
    on rank 0 (the broadcast payload), ``[None, "", 0]`` elsewhere."""
    if stats:
        local = torch.cat(stats, dim=1).contiguous()  # (4, K) float64
    else:
        local = torch.zeros(4, 0, dtype=torch.float64, device=device)
    k = local.shape[1]
    # Ranks may hold different bucket counts (FSDP shards; DDP's are equal): gather the counts, pad to the largest.
    counts = torch.empty(world, dtype=torch.int64, device=device)
    gather(counts, torch.tensor([k], dtype=torch.int64, device=device), False)
    kmax = int(counts.max().item())
    padded = torch.zeros(4, kmax, dtype=torch.float64, device=device)
    padded[:, :k] = local
    gathered = torch.empty(world * 4 * kmax, dtype=torch.float64, device=device)
    if kmax:
        gather(gathered, padded.reshape(-1), False)
    if rank != 0:
        return [None, "", 0]
    per = gathered.reshape(world, 4, kmax).cpu().numpy()
    sizes_by_rank = counts.cpu().numpy()
    rows = np.concatenate([per[r][:, : sizes_by_rank[r]] for r in range(world)], axis=1)  # rank order
    reason = ""
    norms, means, stds, sizes = rows
    ok = np.isfinite(norms) & np.isfinite(means) & np.isfinite(stds) & (norms > 0)
    try:
        merged = alq_core.GradientStats.from_buckets(
            norms[ok],
            means[ok],
            stds[ok],
            sizes[ok].astype(np.int64),
            dist_num=dist_num,
            weights=stats_weights,  # type: ignore[arg-type]
        )
        report = quantizer.update(merged, step)
        reason = str(getattr(report, "reason", "") or "updated")
    except Exception as exc:  # a failed fit must never stop training
        reason = f"level update failed, levels kept: {type(exc).__name__}: {exc}"
    if not ok.all():
        reason += f" ({int((~ok).sum())} non-finite or zero buckets left out)"
    return [quantizer.state_dict(), reason, int(ok.sum())]


def _fit_sketch(
    quantizer: Any,
    config: QuantizerConfig,
    stats: list[torch.Tensor],
    step: int,
    rank: int,
    world: int,
    device: torch.device,
    gather: Gather,
) -> list[Any]:
    """``alq-e`` / ``alq-einf``: all-gather every rank's sketch sums (fixed size), sum them on rank 0 in rank
    order and fit the table to the merged :class:`alq_core.LevelSketch`. Returns what :func:`_fit_buckets` does."""
    size = 3 * NUM_BINS + 3
    if stats:
        local = torch.stack(stats).sum(dim=0)  # this rank's DDP buckets, in order
    else:
        local = torch.zeros(size, dtype=torch.float64, device=device)
    gathered = torch.empty(world * size, dtype=torch.float64, device=device)
    gather(gathered, local.contiguous(), False)
    rows = gathered.reshape(world, size).cpu().numpy()
    if rank != 0:
        return [None, "", 0]
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    count, skipped, buckets = (round(float(v)) for v in total[3 * NUM_BINS :])
    try:
        sketch = alq_core.LevelSketch.from_sums(
            total[: 3 * NUM_BINS].reshape(3, NUM_BINS), config, count=count, skipped=skipped
        )
        report = quantizer.update(sketch, step)
        reason = str(getattr(report, "reason", "") or "updated")
    except Exception as exc:  # a failed fit must never stop training
        reason = f"level update failed, levels kept: {type(exc).__name__}: {exc}"
    if skipped:
        reason += f" ({skipped} non-finite buckets left out)"
    return [quantizer.state_dict(), reason, buckets - skipped]
