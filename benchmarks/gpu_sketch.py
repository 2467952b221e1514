"""GPU benchmark of the level sketch (alq-e / alq-einf statistics) beside the quantize kernel.

Usage (GPU machine, repository root)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src python benchmarks/gpu_sketch.py \
        benchmarks/results/gpu_sketch_h200.json

On 25.56M float32 coordinates of a heavy-tailed gradient (Student-t, 2 degrees of freedom, under a
log-normal envelope per 64 coordinates), buckets 8192 and 16384, both norms (``alq-e``: L2,
``alq-einf``: max-abs), all in one run, medians of ``triton.testing.do_bench`` (L2 flushed between
repetitions):

* ``alq_torch.sketch_sums`` (the public op: torch scales + the Triton sketch kernel), the Triton
  kernel alone, the torch-ops implementation (``bincount`` with float64 weights), a sweep of the
  kernel's launch shape (block, warps, histogram copies), and ``alq_cupy.sketch_sums`` when CuPy is
  installed (the same tensor through DLPack);
* the fused quantize+pack kernel (``alq_torch.quantize_encode``, device noise) on the same data, and
  a device-to-device copy, for scale. Target (PERFORMANCE.md): the sketch <= 1 ms.

Every variant is checked before it is timed: sums against ``alq_core.compute_sketch`` on a prefix
(rtol 1e-12) and against the public op on the whole array (rtol 1e-10).

``--smoke`` (and any run without a GPU) takes a small size and runs the Triton kernel in the
interpreter on CPU tensors: it checks the script, not the speed.
"""

# ruff: noqa: B023  (timed lambdas run inside the loop iteration that defines them)
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

import numpy as np
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ALQ_TORCH_KERNELS_ON_CPU"] = "1"

import alq_core  # noqa: E402
import alq_torch  # noqa: E402
from alq_core import QuantizerConfig, default_levels  # noqa: E402
from alq_torch import _kernels  # noqa: E402
from alq_torch._sketch import _normalize_inputs, _sums_torch  # noqa: E402

RESNET50 = 25_557_032


def bench(fn: Callable[[], Any], device: str) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")) * 1e-3
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heavy_gradient(n: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    t = torch.distributions.StudentT(torch.tensor(2.0))
    torch.manual_seed(0)
    x = t.sample((n,)).to(torch.float32)
    env = torch.exp(0.7 * torch.randn(n // 64 + 1, generator=gen)).repeat_interleave(64)[:n]
    return (x * env * 1e-3).to(device)


def check_close(got: torch.Tensor | np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    g = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    err = np.abs(g - want)
    bad = err > rtol * np.abs(want) + 1e-300
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        msg = f"{what}: {int(bad.sum())} sums differ beyond rtol {rtol}; first at {i}: {g[i]!r} vs {want[i]!r}"
        raise AssertionError(msg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--n", type=int, default=None, help="coordinates (default 25,557,032; 40,000 with --smoke)")
    parser.add_argument("--buckets", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["alq-e", "alq-einf"])
    parser.add_argument("--smoke", action="store_true", help="small size, no sweep (CPU: Triton interpreter)")
    parser.add_argument("--check-prefix", type=int, default=2_000_000, help="coordinates checked against the core")
    args = parser.parse_args()
    device = "cuda" if CUDA else "cpu"
    n = args.n or (40_000 if args.smoke or not CUDA else RESNET50)
    x = heavy_gradient(n, device)
    try:
        import alq_cupy
        import cupy  # noqa: F401

        has_cupy = CUDA
    except ImportError:
        has_cupy = False

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if CUDA
        else f"CPU (Triton interpreter; timings meaningless) {platform.processor()}",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "n": n,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tuning_default": {k: v for k, v in _kernels.TUNING.items() if k.startswith("sketch")},
        "target_seconds": 1e-3,
        "results": {},
    }
    rows: list[tuple[str, str, float, str]] = []
    dst = torch.empty_like(x)
    t_copy = bench(lambda: dst.copy_(x), device)
    res["results"]["copy"] = {"seconds": t_copy, "bytes_per_s": 8 * n / t_copy}
    rows.append(("d2d copy", "-", t_copy, f"{8 * n / t_copy / 1e12:.2f} TB/s"))
    prefix = min(n, args.check_prefix)

    for method in args.methods:
        for d in args.buckets:
            cfg = QuantizerConfig(method, bits=3, bucket_size=d, nonfinite="propagate")
            key = f"{method}/d{d}"
            out: dict[str, Any] = {}
            res["results"][key] = out
            want_prefix = alq_core.compute_sketch(x[:prefix].cpu().numpy(), cfg).sums
            check_close(alq_torch.sketch_sums(x[:prefix], cfg), want_prefix, 1e-12, f"{key} public op, prefix")
            ref = alq_torch.sketch_sums(x, cfg).cpu().numpy()
            body, recip, weights, _ = _normalize_inputs(x, cfg)

            variants: dict[str, Callable[[], Any]] = {
                "sketch_sums (public op)": lambda: alq_torch.sketch_sums(x, cfg),
                "sketch kernel only": lambda: _kernels.sketch_sums(body, recip, weights, d),
                "sketch, torch ops (bincount)": lambda: _sums_torch(body, recip, weights, d),
                "scales + reciprocals only (torch)": lambda: _normalize_inputs(x, cfg),
            }
            if has_cupy:
                xc = alq_cupy.as_cupy(x)
                variants["alq_cupy.sketch_sums"] = lambda: alq_cupy.sketch_sums(xc, cfg)
            for name, fn in variants.items():
                got = fn()
                if not name.startswith("scales"):
                    got_np = alq_cupy.as_cupy(got).get() if name.startswith("alq_cupy") else got
                    check_close(got_np, ref, 1e-10, f"{key} {name}")
                t = bench(fn, device)
                out[name] = {"seconds": t, "elements_per_s": n / t}
                rows.append((name, key, t, f"{n / t / 1e9:.1f} G el/s"))
            if has_cupy:
                check_close(alq_cupy.level_sketch(x[:prefix], cfg).sums, want_prefix, 1e-12, f"{key} cupy, prefix")

            if not args.smoke and CUDA:
                saved = dict(_kernels.TUNING)
                sweep: dict[str, Any] = {}
                for block, warps, copies in (
                    (2048, 4, 64), (4096, 8, 64), (8192, 8, 64), (8192, 16, 64), (4096, 8, 16), (4096, 8, 256),
                    (4096, 4, 128), (16384, 16, 128),
                ):  # fmt: skip
                    name = f"block{block}_warps{warps}_copies{copies}"
                    _kernels.TUNING.update(sketch_block=block, sketch_warps=warps, sketch_copies=copies)
                    try:
                        check_close(_kernels.sketch_sums(body, recip, weights, d), ref, 1e-10, name)
                        sweep[name] = bench(lambda: _kernels.sketch_sums(body, recip, weights, d), device)
                    except Exception as exc:
                        sweep[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
                    finally:
                        _kernels.TUNING.clear()
                        _kernels.TUNING.update(saved)
                out["kernel_sweep"] = sweep
                timed = {k: v for k, v in sweep.items() if isinstance(v, float)}
                if timed:
                    best = min(timed, key=timed.__getitem__)
                    rows.append((f"  best kernel: {best}", key, timed[best], ""))

            # the quantize kernel on the same data, for scale
            levels = default_levels(cfg)
            payload = alq_torch.quantize_encode(x, levels, cfg, seed=1)
            assert payload.numel() == alq_core.payload_size(cfg, n)
            t_q = bench(lambda: alq_torch.quantize_encode(x, levels, cfg, seed=1, out=payload), device)
            out["quantize_encode"] = {"seconds": t_q}
            rows.append(("quantize_encode (fused, device noise)", key, t_q, "for scale"))
            out["sketch_over_quantize"] = out["sketch_sums (public op)"]["seconds"] / t_q

    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"device: {res['device']}; n = {n}")
    print(f"{'operation':44s} {'config':>15s} {'median':>12s}  note")
    for name, key, secs, note in rows:
        print(f"{name:44s} {key:>15s} {secs * 1e6:10.1f} us  {note}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
