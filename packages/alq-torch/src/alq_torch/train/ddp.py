"""The harness under ``torchrun``: real DDP with the ALQ communication hook, or FSDP2 with ALQ's FSDP comms.

Each rank is one worker: it draws its own mini-batch (row ``rank`` of the
same seeded ``(W, batch)`` index draw the simulated mode uses), DDP's buckets
are quantized, exchanged and averaged by :func:`alq_torch.alq_hook`, and the
hook's telemetry gives the time spent quantizing/decoding, the level-update
time, the bytes sent and the normalized quantization variance. Gloo on CPU,
NCCL on CUDA. Rank 0 writes the reports.

With ``--fsdp`` (and ``--shard-size N``) the model is sharded with FSDP2 instead
(:mod:`alq_torch.train.fsdp`): the quantized reduce-scatter, or the hybrid layout
(exact within groups of ``N`` ranks, quantized across them). Every rank runs the
evaluation forward passes (FSDP all-gathers the parameters collectively), the
checkpoints hold each rank's local shards, and the variance is measured by the FSDP
comm on this rank's own payloads (the chunks of its unsharded gradient; in the hybrid
layout its reduce-scattered shard). Bits per step are then the bytes this rank actually sent in the last round
(telemetry): the quantized reduce-scatter's, or in the hybrid layout only the
traffic across groups.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import alq_core
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .data import Dataset, WorkerSampler, load_data
from .loop import (
    RunConfig,
    RunResult,
    _new_state,
    _restore,
    _save_checkpoint,
    _snapshot,
    _sync,
    evaluate,
    make_quantizer,
    resolve_steps,
)
from .models import build_model, num_parameters
from .settings import Layout, layout_of, resolve, run_config, versions


def _mean_over_ranks(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def train_run_ddp(
    run: RunConfig,
    data: Dataset,
    *,
    device: torch.device,
    checkpoint: str | None,
    resume: bool,
    stop_at: int | None,
    progress: bool,
    desc: str,
    layout: Layout | None = None,
) -> RunResult | None:
    """Train one (method, seed) over the initialized process group: DDP, or FSDP2 for a sharded ``layout``."""
    from .. import ALQState, alq_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = layout or Layout("ddp", world, 1)
    mode = layout.mode(dist.get_backend())
    torch.manual_seed(run.seed)
    net = build_model(run.model, data.input_shape, data.num_classes).to(device)
    net.train()
    n = num_parameters(net)
    qcfg = run.quantizer_config()
    log_every = run.interval(run.log_every, 40)
    eval_every = run.interval(run.eval_every, 20)
    comm_kwargs: dict[str, Any] = {
        "quantizer": make_quantizer(run),
        "seed": 10_000 + run.seed,
        "exact_below": 0,
        "dist_num": run.dist_num,
        "measure_variance": log_every,
    }
    model: torch.nn.Module
    state_hook: Any  # ALQState, or the FSDP comm (the same telemetry, levels and state_dict)
    if layout.sharded:
        from .fsdp import from_local, local_snapshot, shard_model

        state_hook, _ = shard_model(net, layout, device, qcfg, **comm_kwargs)
        model = net
    else:
        # find_unused_parameters=True keeps DDP's bucket layout as built (otherwise DDP rebuilds it after the first
        # backward pass, and a resumed job would quantize another layout in its first round: not bit-identical)
        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        state_hook = ALQState(qcfg, **comm_kwargs)
        model.register_comm_hook(state_hook, alq_hook)
    sampler = WorkerSampler(data.y_train.shape[0], world, run.batch_size, seed=run.seed)
    aug = torch.Generator(device=device).manual_seed(20_000 + 1000 * run.seed + rank)
    opt = torch.optim.SGD(net.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    st = _new_state(bytes=0)
    ck_rank = f"{checkpoint}.rank{rank}" if checkpoint else None
    if resume and ck_rank and os.path.exists(ck_rank):
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        if layout.sharded:
            prepare = functools.partial(from_local, model=net, opt=opt, mode=mode, path=ck_rank, device=device)
        st = _restore(ck_rank, run, device, net, opt, sampler, aug, prepare=prepare, hook=state_hook)
    if qcfg.quantized and not st["levels"]:
        st["levels"].append(
            {"step": 0, "levels": np.asarray(state_hook.levels, dtype=np.float64).tolist(), "initial": True}
        )

    def snapshot() -> dict[str, Any]:
        ck = _snapshot(run, net, opt, sampler, aug, st, hook=state_hook)
        return local_snapshot(ck, mode) if layout.sharded else ck

    start = int(st["step"])
    end = run.steps if stop_at is None else min(run.steps, stop_at)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        # disable=None: no bar where stderr is not a terminal (CI logs, redirected output)
        bar = tqdm(total=run.steps, initial=start, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    times = st["times"]
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = run.lr_at(step)
        _sync(device)
        t0 = time.perf_counter()
        idx = sampler.next()[rank].to(device)
        x = data.prepare(data.x_train[idx], aug, True)
        y = data.y_train[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        _sync(device)
        times["train"] += time.perf_counter() - t0
        rec = state_hook.last_record
        if rec is not None:
            q = (rec.quantize_s or 0.0) + (rec.decode_s or 0.0)
            times["quant"] += q
            st["bytes"] = int(rec.bytes_sent)
            if rec.level_update is not None:
                times["update"] += rec.level_update.seconds
                st["num_updates"] += 1
                st["levels"].append(
                    {"step": step, "levels": list(rec.level_update.levels), "reason": rec.level_update.reason}
                )
        st["step"] = step + 1
        log_now = step % log_every == 0 or step == run.steps - 1
        entry: dict[str, float] = {"step": float(step + 1), "lr": run.lr_at(step), "loss": float(loss.detach())}
        if log_now and rec is not None and step % log_every == 0:
            var = rec.variance if qcfg.quantized else 0.0
            st["last_var"] = _mean_over_ranks(float(var) if var is not None else float("nan"), device)
            entry["variance"] = st["last_var"]
        if (step + 1) % eval_every == 0 or step + 1 == run.steps or step == 0:
            acc, vloss = evaluate(net, data)
            entry["val_acc"], entry["val_loss"] = acc, vloss
            st["best"] = max(st["best"], acc)
        st["history"].append(entry)
        if ck_rank and run.checkpoint_every > 0 and (step + 1) % run.checkpoint_every == 0:
            _save_checkpoint(ck_rank, snapshot())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if ck_rank:
        _save_checkpoint(ck_rank, snapshot())
    if st["step"] < run.steps:
        return None
    accs = [h["val_acc"] for h in st["history"] if "val_acc" in h]
    losses = [h["val_loss"] for h in st["history"] if "val_loss" in h]
    if layout.sharded:  # what this rank sent in the last round (telemetry)
        bits = 8 * int(st["bytes"])
    else:  # per worker and step, as in the simulated mode
        bits = 8 * alq_core.payload_size(qcfg, n)
    variance = float(st["last_var"]) if qcfg.quantized else 0.0
    return RunResult(
        method=run.method,
        seed=run.seed,
        bits=run.bits,
        bucket_size=run.bucket_size,
        workers=world,
        num_params=n,
        steps=run.steps,
        final_val_acc=float(accs[-1]) if accs else float("nan"),
        final_val_loss=float(losses[-1]) if losses else float("nan"),
        best_val_acc=float(st["best"]),
        final_variance=variance,
        bits_per_step=int(bits),
        train_seconds=times["train"],
        grad_seconds=times["train"] - times["quant"] - times["update"],
        quantize_seconds=times["quant"],
        update_seconds=times["update"],
        num_updates=int(st["num_updates"]),
        mode=mode,
        history=list(st["history"]),
        levels=list(st["levels"]),
    )


def main_ddp(args: argparse.Namespace) -> int:
    """``alq-train`` under torchrun: one process per worker (DDP, or FSDP2 with ``--fsdp``)."""
    from .report import format_table, plot_all, summarize, write_csv, write_json

    t_start = time.perf_counter()
    use_cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        resume_dir = (args.resume or args.out) if args.resume is not None else None
        if resume_dir:
            with open(os.path.join(resume_dir, "config.json"), encoding="utf-8") as fh:
                s = json.load(fh)
        else:
            s = resolve(args)
        try:
            layout = layout_of(bool(s.get("fsdp", False)), s.get("shard_size"), world)
        except ValueError as exc:
            raise SystemExit(f"alq-train: error: {exc}") from None
        saved = s.get("layout")
        if resume_dir and isinstance(saved, dict) and int(saved.get("world", world)) != world:
            raise SystemExit(
                f"alq-train: error: --resume {resume_dir!r}: its runs were written by {saved.get('world')} ranks "
                f"({saved.get('mode')}); this job has WORLD_SIZE={world}; fix: resume with the same torchrun layout "
                f"(nodes x processes per node = {saved.get('world')})"
            )
        backend = str(dist.get_backend())
        s["layout"] = layout.to_dict(backend)
        data = load_data(s["data"], data_dir=s.get("data_dir"), synthetic_size=int(s["synthetic_size"])).to(device)
        n_train = int(data.y_train.shape[0])
        steps = resolve_steps(s, n_train, world)
        s["resolved_steps"] = steps
        s["workers"] = world
        out = resume_dir or args.out
        if not out:
            holder: list[Any] = [time.strftime("%Y%m%d-%H%M%S")]
            dist.broadcast_object_list(holder, src=0)
            ranks = f"{layout.replicas}x{layout.shard}" if layout.kind == "hsdp" else str(world)
            out = os.path.join(
                "runs",
                f"{layout.kind}-{s['data']}-{s['model']}-b{s['bits']}-d{s['bucket_size']}-W{ranks}-{holder[0]}",
            )
        if rank == 0:
            os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
            os.makedirs(os.path.join(out, "runs"), exist_ok=True)
            if not resume_dir:
                write_json(os.path.join(out, "config.json"), s)
            print(
                f"alq-train ({layout.describe()}, {backend}): {len(s['methods'])} methods x {len(s['seeds'])} seeds, "
                f"{steps} steps, batch {s['batch_size']}/rank; output -> {out}",
                flush=True,
            )
        dist.barrier()
        results: list[dict[str, Any]] = []
        stopped = False
        for seed in s["seeds"]:
            for method in s["methods"]:
                run = run_config(s, method, seed, steps, world)
                res_path = os.path.join(out, "runs", f"{method}-s{seed}.json")
                if resume_dir and os.path.isfile(res_path):
                    with open(res_path, encoding="utf-8") as fh:
                        results.append(json.load(fh))
                    continue
                res = train_run_ddp(
                    run,
                    data,
                    device=device,
                    checkpoint=os.path.join(out, "checkpoints", f"{method}-s{seed}.pt"),
                    resume=resume_dir is not None,
                    stop_at=args.stop_at,
                    progress=not args.no_progress,
                    desc=f"{method:>7} seed {seed}",
                    layout=layout,
                )
                dist.barrier()
                if res is None:
                    stopped = True
                    continue
                d = res.to_dict()
                if rank == 0:
                    write_json(res_path, d)
                results.append(d)
        if rank == 0:
            if stopped:
                print(f"stopped at step {args.stop_at}; continue with: torchrun ... -m alq_torch.train --resume {out}")
            else:
                rows = summarize(results)
                title = f"{layout.describe()}: {s['data']}, {s['model']}, {s['bits']} bits, bucket {s['bucket_size']}, {steps} steps"
                table = format_table(rows, title=title)
                print()
                print(table)
                wall = time.perf_counter() - t_start
                write_json(
                    os.path.join(out, "results.json"),
                    {
                        "settings": s,
                        "device": str(device),
                        "versions": versions(),
                        "summary": rows,
                        "runs": results,
                        "wall_seconds": wall,
                        "table": table,
                        "mode": layout.kind,
                        "layout": s["layout"],
                    },
                )
                write_csv(os.path.join(out, "results.csv"), rows)
                if not args.no_plots:
                    plot_all(results, out, title=title)
                print(f"\nwall time {wall:.1f} s; results in {os.path.abspath(out)}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


__all__ = ["main_ddp", "train_run_ddp"]
