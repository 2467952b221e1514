"""K simulated workers on one device: batched vs sequential worker gradients vs one pass over the K*b batch.

The harness (``alq-train``) needs K separate per-worker gradients, float32 ``(K, n)``.
Times per step, each path with and without the quantize + average that follows it
(``SimulatedWorkers('alq', 3 bits, bucket 16384).reduce``, as ``train_run`` calls it):

* ``floor``: one forward/backward over all K*b images (no per-worker gradients; the
  target the batched path is judged against, PERFORMANCE.md: within 1.3x). Its
  "with quantization" row quantizes and averages K copies of that one gradient.
* ``sequential``: K forward/backward passes of b images (the reference path).
* ``batched``: one ``torch.func.vmap`` pass with per-worker BatchNorm statistics
  (vmap's own BatchNorm rule; the harness's default).
* ``batched-fbn``: the same with ``GradientComputer(batchnorm="functional")``
  (BatchNorm as ``x * a + c`` from ``var_mean`` on each worker's slice).

ResNet-32 on random CIFAR-shaped data, b = 128 per worker, K = 16 and 4, fp32 and
bf16 autocast + channels_last. Rounds interleave the paths (one step of each per
round); medians over ``--steps`` rounds after ``--warmup``; CUDA timings use
``torch.cuda.synchronize`` + ``perf_counter`` around each step. Before timing, the
batched gradients are checked against the sequential ones (same model, same data)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src python benchmarks/sim_workers.py --out FILE.json

``--smoke`` runs tiny settings on the CPU (a check that the script works).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATHS = ("floor", "sequential", "batched", "batched-fbn")
SHORT = {"floor": "floor", "sequential": "seq", "batched": "bat", "batched-fbn": "fbn"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat_grad(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]


def _setup(args: argparse.Namespace, k: int, precision: str, device: torch.device) -> dict[str, Any]:
    import alq_core
    from alq_torch import SimulatedWorkers
    from alq_torch.train.models import build_model
    from alq_torch.train.workers import GradientComputer

    amp = "bf16" if precision.startswith("bf16") else "none"
    cl = precision.endswith("-cl")
    torch.manual_seed(0)
    model = build_model(args.model, (3, args.image, args.image), 10).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    g = torch.Generator(device=device).manual_seed(1)
    xs = torch.randn(k, args.batch, 3, args.image, args.image, device=device, generator=g)
    ys = torch.randint(0, 10, (k, args.batch), device=device, generator=g)
    cfg = alq_core.QuantizerConfig("alq", bits=args.bits, bucket_size=args.bucket)
    sim = SimulatedWorkers(cfg, device=device, seed=0)
    seq = GradientComputer(model, "sequential", amp=amp, channels_last=cl)
    bat = GradientComputer(model, "batched", amp=amp, channels_last=cl)
    fbn = GradientComputer(model, "batched", amp=amp, channels_last=cl, batchnorm="functional")
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")

    def floor() -> Tensor:
        x = xs.reshape(k * args.batch, *xs.shape[2:])
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for p in params:
            p.grad = None
        with autocast:
            loss = F.cross_entropy(model(x).float(), ys.reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        return _flat_grad(params).unsqueeze(0).expand(k, -1)

    fns: dict[str, Callable[[], Tensor]] = {
        "floor": floor,
        "sequential": lambda: seq(xs, ys)[0],
        "batched": lambda: bat(xs, ys)[0],
        "batched-fbn": lambda: fbn(xs, ys)[0],
    }
    # Check: batched == sequential on the same model state (copies, so BatchNorm statistics start equal),
    # in true float32: with TF32 convolutions (cuDNN's default) the two paths differ by ~1.4 % on an H200.
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    m1 = copy.deepcopy(model)
    g_seq = GradientComputer(m1, "sequential", amp=amp, channels_last=cl)(xs, ys)[0]
    check = {}
    for bn in ("vmap", "functional"):
        m2 = copy.deepcopy(model)
        g_bat = GradientComputer(m2, "batched", amp=amp, channels_last=cl, batchnorm=bn)(xs, ys)[0]  # type: ignore[arg-type]
        rel = float(((g_bat - g_seq).norm(dim=1) / g_seq.norm(dim=1)).max())
        stats_rel = max(
            float((a - b).norm() / b.norm().clamp_min(1e-12))
            for a, b in zip(m2.buffers(), m1.buffers())
            if a.is_floating_point()
        )
        limit = 0.25 if amp == "bf16" else 1e-2  # bf16: loose, tiny smoke batches drift ~0.1
        if not (rel < limit and stats_rel < limit):
            msg = (
                f"batched ({bn}) gradients disagree with sequential ones: max relative error {rel:.3g}, "
                f"running stats {stats_rel:.3g}"
            )
            raise AssertionError(msg)
        check[bn] = {"grad_rel_err": rel, "running_stats_rel_err": stats_rel}
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    sim.update_levels(g_seq, 0)  # levels fitted to real gradients, as the harness's step 0 does
    return {"fns": fns, "sim": sim, "check": check}


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench(args: argparse.Namespace, k: int, precision: str, device: torch.device) -> dict[str, Any]:
    """Median ms per step of every path, with and without quantize + average."""
    s = _setup(args, k, precision, device)
    fns, sim = s["fns"], s["sim"]
    steps: dict[str, Callable[[], Any]] = {}
    for name in PATHS:
        fn = fns[name]
        steps[f"{name}"] = fn
        steps[f"{name}+quant"] = lambda fn=fn: sim.reduce(fn()).mean
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.steps):
        for name, fn in steps.items():
            t = _time(fn, device)
            if r >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, Any] = {"K": k, "precision": precision, "median_ms": med, "check": s["check"]}
    for q in ("", "+quant"):
        for b in ("batched", "batched-fbn"):
            out[f"{b}/floor{q}"] = med[f"{b}{q}"] / med[f"floor{q}"]
            out[f"sequential/{b}{q}"] = med[f"sequential{q}"] / med[f"{b}{q}"]
    if device.type == "cuda":
        out["max_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def table(results: list[dict[str, Any]]) -> str:
    """One line per (precision, K): medians in ms without / with quantize + average, then the ratios."""
    times = " ".join(f"{SHORT[p]:>7}{SHORT[p] + '+q':>9}" for p in PATHS)
    ratios = " ".join(f"{SHORT[b] + '/floor':>9}{'+q':>6}{'seq/' + SHORT[b]:>8}{'+q':>6}" for b in PATHS[2:])
    head = f"{'precision':<10}{'K':>4} | {times} | {ratios}"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["median_ms"]
        t = " ".join(f"{m[p]:7.2f}{m[p + '+quant']:9.2f}" for p in PATHS)
        q = " ".join(
            f"{r[b + '/floor']:9.2f}{r[b + '/floor+quant']:6.2f}{r['sequential/' + b]:8.2f}{r['sequential/' + b + '+quant']:6.2f}"
            for b in PATHS[2:]
        )
        lines.append(f"{r['precision']:<10}{r['K']:>4} | {t} | {q}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--workers", default="16,4", help="comma-separated K [default: 16,4]")
    p.add_argument("--batch", type=int, default=128, help="images per worker [default: 128]")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--image", type=int, default=32, help="image side [default: 32]")
    p.add_argument("--precisions", default="fp32,bf16-cl", help="fp32, fp32-cl, bf16, bf16-cl [default: fp32,bf16-cl]")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--bucket", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20, help="timed rounds [default: 20]")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None, help="[default: cuda if available else cpu]")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: resnet8, K=2, batch 8, 8x8, 2 steps")
    args = p.parse_args()
    if args.smoke:
        args.model, args.workers, args.batch, args.image = "resnet8", "2", 8, 8
        args.steps, args.warmup, args.device = 2, 1, args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or '?'})"
    print(
        f"{name}, torch {torch.__version__}; {args.model}, batch {args.batch}/worker, {args.image}x{args.image}, "
        f"alq {args.bits} bits bucket {args.bucket}; medians of {args.steps} rounds (ms per step)",
        flush=True,
    )
    results = []
    for precision in args.precisions.split(","):
        for k in (int(t) for t in args.workers.split(",")):
            res = bench(args, k, precision.strip(), device)
            results.append(res)
            print(table([res]).splitlines()[-1], flush=True)
    text = table(results)
    print()
    print(text)
    if args.out:
        payload = {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn_benchmark": bool(args.cudnn_benchmark),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "results": results,
            "table": text,
        }
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
