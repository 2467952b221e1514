"""DDP ResNet-50 step time with every gradient-communication scheme, in one run.

Run on the GPU machine (2 GPUs), from the repository root::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        torchrun --standalone --nproc_per_node 2 benchmarks/ddp_resnet50.py \\
        --out benchmarks/results/ddp_resnet50_nvlink.json

    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        torchrun --standalone --nproc_per_node 2 benchmarks/ddp_resnet50.py \\
        --out benchmarks/results/ddp_resnet50_sockets.json \\
        --baseline benchmarks/results/ddp_resnet50_nvlink.json

Add ``--compile reduce-overhead --no-broadcast-buffers`` for the GPU-bound step
(the compiled forward/backward pieces replayed as CUDA graphs; the hooks run
eagerly between them): on hosts where kernel launches set the eager step, that
is the run in which communication shows (README, "DDP ResNet-50").

ResNet-50 (torchvision's when installed, else an identical local definition:
same layers, 25,557,032 parameters), batch 64 per GPU, bf16 autocast, synthetic
data, SGD with momentum, ``gradient_as_bucket_view=True`` and
``zero_grad(set_to_none=False)`` (gradients stay views of DDP's buckets: no
per-parameter copies; ``--set-to-none`` for the other way). Every configuration
gets its own DDP model (all built first, each warmed up for ``--warmup``
steps); then ``--steps`` steps per configuration are timed one by one with CUDA
synchronization, in ``--rounds`` interleaved round-robin rounds (a shared
machine's drift hits every configuration alike), and the median is reported. Rank 0 prints a table and writes
JSON (per configuration: median / p10 / p90 step ms, ratios to no hook and to
the better of the fp16/bf16 hooks, ALQ telemetry: compression ratio, level
updates). ``--baseline`` (the NVLink JSON) adds the ratio to the NVLink no-hook
step, the compute floor of PERFORMANCE.md's socket target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# --------------------------------------------------------------------- model


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class _ResNet50(nn.Module):
    """ResNet-50 v1.5 (stride in the 3x3 conv), the torchvision layout."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = []
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                layers.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet50() -> tuple[nn.Module, str]:
    try:
        import torchvision

        return torchvision.models.resnet50(), f"torchvision {torchvision.__version__}"
    except ImportError:
        return _ResNet50(), "local definition (torchvision not installed)"


# --------------------------------------------------------------------- configurations


def _configs(args: argparse.Namespace) -> list[tuple[str, Callable[[], tuple[Any, Any] | None]]]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook, quantization_hooks

    out: list[tuple[str, Callable[[], tuple[Any, Any] | None]]] = [
        ("no hook", lambda: None),
        ("fp16_compress_hook", lambda: (None, default_hooks.fp16_compress_hook)),
        ("bf16_compress_hook", lambda: (None, default_hooks.bf16_compress_hook)),
        ("quantization_pertensor_hook", lambda: (None, quantization_hooks.quantization_pertensor_hook)),
        (
            "PowerSGD rank 4",
            lambda: (
                powerSGD_hook.PowerSGDState(
                    process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2, warm_start=True
                ),
                powerSGD_hook.powerSGD_hook,
            ),
        ),
    ]
    import alq_core
    from alq_torch import ALQState, alq_hook

    for method in args.methods:

        def make(method: str = method) -> tuple[Any, Any]:
            cfg = alq_core.QuantizerConfig(method, bits=args.bits, bucket_size=args.bucket_size)
            state = ALQState(cfg, collective=args.collective, timing=args.timing, exact_below=args.exact_below)
            return state, alq_hook

        out.append((f"ALQ {method} {args.bits}b d={args.bucket_size}", make))
    if args.cpu_smoke:
        # NCCL-only hooks: bf16 needs NCCL; torch's quantization hook fails on CPU tensors; PowerSGD
        # chains collectives in callbacks, which Gloo runs on its worker threads out of order.
        out = [c for c in out if c[0] not in ("bf16_compress_hook", "quantization_pertensor_hook", "PowerSGD rank 4")]
    if args.only:
        out = [c for c in out if any(o.lower() in c[0].lower() for o in args.only)]
    return out


# --------------------------------------------------------------------- timing


def _profile_steps(setup: _Setup) -> None:
    """Three more steps under torch.profiler on every rank; rank 0 writes the op tables next to ``--out``
    and the Chrome trace (``.trace.json.gz``, for chrome://tracing or Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    name, device, args = setup.name, setup.device, setup.args
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            setup.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if dist.get_rank() != 0:
        return
    tag = "".join(c if c.isalnum() else "_" for c in name)
    path = f"{os.path.splitext(args.out)[0]}.profile.{tag}.txt"
    # the timeline (streams, gaps, overlap of hooks with backward); torch gzips a ".gz" path itself
    prof.export_chrome_trace(f"{os.path.splitext(path)[0]}.trace.json.gz")
    avg = prof.key_averages()
    with open(path, "w") as fh:
        fh.write(f"{name}: 3 steps\n\nby self CPU time\n")
        fh.write(avg.table(sort_by="self_cpu_time_total", row_limit=25))
        if device.type == "cuda":
            fh.write("\n\nby self device time\n")
            fh.write(avg.table(sort_by="self_device_time_total", row_limit=25))


class _Setup:
    """One configuration's DDP model, optimizer, hook state and data; steps it and keeps its step times."""

    def __init__(
        self, name: str, make: Callable[[], tuple[Any, Any] | None], args: argparse.Namespace, device: torch.device
    ) -> None:
        torch.manual_seed(0)
        model, _ = resnet50()
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            # compiled inside DDP: dynamo splits the graph at DDP's buckets and the reducer calls the comm hook
            # eagerly between the pieces (also between their CUDA graphs). torch.compile(ddp) compiled the same
            # way on torch 2.11 but compiles nothing on torch 2.13
            model = torch.compile(model, mode=args.compile)
        self.name, self.args, self.device = name, args, device
        self.ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=args.bucket_cap_mb,
            **({} if args.broadcast_buffers else {"broadcast_buffers": False}),  # only when asked (deprecated in 2.13)
        )
        hook = make()
        self.state: Any = None
        if hook is not None:
            self.state, fn = hook
            self.ddp.register_comm_hook(self.state, fn)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
        self.x = torch.randn(args.batch, 3, args.image, args.image, device=device, generator=gen)
        if args.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (args.batch,), device=device, generator=gen)
        self.times: list[float] = []
        self.loss: torch.Tensor | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        """One training step (forward, backward with the communication, optimizer), not synchronized."""
        if self.args.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        self.opt.zero_grad(set_to_none=self.args.set_to_none)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            self.loss = nn.functional.cross_entropy(self.ddp(self.x), self.y)
        self.loss.backward()
        self.opt.step()

    def run(self, steps: int, timed: bool) -> None:
        for _ in range(steps):
            self._sync()
            t0 = time.perf_counter()
            self.step()
            self._sync()
            if timed:
                self.times.append((time.perf_counter() - t0) * 1e3)

    def result(self) -> dict[str, Any]:
        args = self.args
        if args.profile:  # every rank steps (the collectives need them all); rank 0 writes
            _profile_steps(self)
        # the slowest rank sets the pace: take the per-step max over ranks
        t = torch.tensor(self.times, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
        qs = statistics.quantiles(times, n=10)
        res: dict[str, Any] = {
            "config": self.name,
            "median_ms": statistics.median(times),
            "p10_ms": qs[0],
            "p90_ms": qs[-1],
            "steps_timed": len(times),
            "loss_finite": bool(self.loss is not None and torch.isfinite(self.loss).item()),
        }
        from alq_torch import ALQState

        state = self.state
        if isinstance(state, ALQState):
            recs = state.telemetry
            last = recs[-1]
            res["alq"] = {
                "collective": sorted({b.mode for b in last.buckets}),
                "buckets": len(last.buckets),
                "bytes_sent_per_step": last.bytes_sent,
                "bytes_exact_per_step": last.bytes_exact,
                "compression_ratio": last.compression_ratio,
                "table_version": state.table_version,
                "level_updates": [
                    {
                        "step": r.level_update.step,
                        "updated": r.level_update.updated,
                        "reason": r.level_update.reason,
                        "seconds": r.level_update.seconds,
                    }
                    for r in recs
                    if r.level_update is not None
                ],
            }
            if args.timing:
                res["alq"]["quantize_ms_per_step"] = statistics.median(
                    (r.quantize_s or 0.0) * 1e3 for r in recs[args.warmup :]
                )
                res["alq"]["decode_ms_per_step"] = statistics.median(
                    (r.decode_s or 0.0) * 1e3 for r in recs[args.warmup :]
                )
            state.check()
        return res


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (its statistics counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run_all(
    configs: list[tuple[str, Callable[[], tuple[Any, Any] | None]]], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Build every configuration, warm each up, then time them in interleaved rounds.

    Round-robin rounds of ``--steps / --rounds`` steps per configuration spread
    slow drifts of a shared machine (clocks, other tenants) over all
    configurations alike instead of charging them to whichever ran then.
    """
    rank = dist.get_rank()
    setups: list[_Setup | dict[str, Any]] = []
    for name, make in configs:
        try:
            su = _Setup(name, make, args, device)
            su.run(args.warmup, timed=False)
            setups.append(su)
        except Exception as exc:  # keep going: one broken configuration must not lose the others
            setups.append({"config": name, "error": f"{type(exc).__name__}: {exc}"})
        dist.barrier()
    if args.compile and not _compiled_graphs():
        msg = f"--compile: torch.compile produced no graph (torch {torch.__version__}); the steps would run eagerly"
        raise RuntimeError(msg)
    per_round = -(-args.steps // args.rounds)
    for rnd in range(args.rounds):
        for su in setups:
            if isinstance(su, _Setup):
                try:
                    su.run(per_round, timed=True)
                except Exception as exc:
                    setups[setups.index(su)] = {"config": su.name, "error": f"{type(exc).__name__}: {exc}"}
            dist.barrier()
        if rank == 0:
            print(f"  round {rnd + 1}/{args.rounds} done", flush=True)
    results = []
    for su in setups:
        res = su.result() if isinstance(su, _Setup) else su
        results.append(res)
        if rank == 0:
            print(f"  {res['config']}: {res.get('median_ms', float('nan')):.2f} ms {res.get('error', '')}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--baseline", help="JSON of an NVLink run: adds the ratio to its no-hook step")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the timed steps are spread over")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--bucket-size", type=int, default=8192)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket cap (MiB)")
    p.add_argument("--methods", nargs="+", default=["qsgdinf", "nuqsgd", "alq", "amq"])
    p.add_argument("--collective", default="auto", choices=["auto", "allgather", "reduce_scatter"])
    p.add_argument("--exact-below", type=int, default=16384)
    p.add_argument("--timing", action="store_true", help="record ALQ quantize/decode times (CUDA events)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    p.add_argument("--image", type=int, default=224, help="image side (pixels)")
    p.add_argument("--cpu-smoke", action="store_true", help="Gloo on CPU, to check the script without GPUs")
    p.add_argument("--profile", action="store_true", help="rank 0 writes torch.profiler tables per configuration")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile the model (inside DDP) with this mode (alone: 'default'); 'reduce-overhead' replays the"
        " compiled forward/backward pieces as CUDA graphs, for hosts whose kernel launches set the step time",
    )
    p.add_argument(
        "--no-broadcast-buffers",
        dest="broadcast_buffers",
        action="store_false",
        help="DDP(broadcast_buffers=False): no per-forward broadcast of the BatchNorm statistics from rank 0",
    )
    p.add_argument(
        "--set-to-none",
        action="store_true",
        help="zero_grad(set_to_none=True): gradients are then new tensors each step and DDP copies every one into"
        " its bucket (one copy kernel per parameter when a hook is registered); the default keeps them as views"
        " of the buckets (gradient_as_bucket_view=True), for every configuration alike",
    )
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # --profile writes there early

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu_smoke:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        torch.backends.cudnn.benchmark = True
    rank, world = dist.get_rank(), dist.get_world_size()
    _, model_src = resnet50()
    results = _run_all(_configs(args), args, device)

    ok = {r["config"]: r["median_ms"] for r in results if "median_ms" in r}
    nohook = ok.get("no hook")
    halves = [ok[k] for k in ("fp16_compress_hook", "bf16_compress_hook") if k in ok]
    best_half = min(halves) if halves else None
    floor = None
    if args.baseline and os.path.exists(args.baseline):
        with open(args.baseline) as f:
            base = json.load(f)
        floor = next(
            (r["median_ms"] for r in base["results"] if r.get("config") == "no hook" and "median_ms" in r), None
        )
    for r in results:
        if "median_ms" not in r:
            continue
        if nohook:
            r["vs_no_hook"] = r["median_ms"] / nohook
        if best_half:
            r["vs_best_fp16_bf16"] = r["median_ms"] / best_half
        if floor:
            r["vs_nvlink_no_hook"] = r["median_ms"] / floor
    transport = (
        "sockets"
        if os.environ.get("NCCL_P2P_DISABLE") == "1" and os.environ.get("NCCL_SHM_DISABLE") == "1"
        else "default (NVLink/P2P)"
    )
    meta = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "world_size": world,
        "transport": transport,
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "model": model_src,
        "batch_per_gpu": args.batch,
        "autocast": "bfloat16",
        "channels_last": args.channels_last,
        "gradient_as_bucket_view": True,
        "compiled": args.compile,
        "broadcast_buffers": args.broadcast_buffers,
        "zero_grad_set_to_none": args.set_to_none,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "alq": {
            "bits": args.bits,
            "bucket_size": args.bucket_size,
            "collective": args.collective,
            "exact_below": args.exact_below,
        },
        "baseline": args.baseline,
    }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(
            f"\nDDP ResNet-50, {world} x {meta['device']}, transport {transport}, batch {args.batch}/GPU, bf16 autocast"
        )
        head = f"{'configuration':<34} {'median ms':>10} {'p10':>8} {'p90':>8} {'/no hook':>9} {'/best16':>8} {'/NVL nh':>8} {'ratio':>7}"
        print(head)
        print("-" * len(head))
        for r in results:
            if "median_ms" not in r:
                print(f"{r['config']:<34} ERROR {r['error']}")
                continue
            cr = r.get("alq", {}).get("compression_ratio")
            print(
                f"{r['config']:<34} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} {r['p90_ms']:>8.2f} "
                f"{r.get('vs_no_hook', float('nan')):>9.3f} {r.get('vs_best_fp16_bf16', float('nan')):>8.3f} "
                f"{r.get('vs_nvlink_no_hook', float('nan')):>8.3f} {cr if cr is None else round(cr, 1)!s:>7}"
            )
        print(f"\nwrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
