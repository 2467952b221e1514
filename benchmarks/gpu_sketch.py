"""GPU benchmark of the level sketch (alq-e / alq-einf statistics) beside the quantize kernel.

Usage (GPU machine, repository root)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src python benchmarks/gpu_sketch.py \
        benchmarks/results/gpu_sketch_h200.json

On 25.56M float32 coordinates of a heavy-tailed gradient (Student-t, 2 degrees of freedom, under a
log-normal envelope per 64 coordinates), buckets 8192 and 16384, both norms (``alq-e``: L2,
``alq-einf``: max-abs), all in one run, medians of ``triton.testing.do_bench`` (L2 flushed between
repetitions):

* ``alq_torch.sketch_sums`` (the public op, ``_kernels.TUNING`` as shipped), the element kernel
  alone on torch scales (``sketch kernel only``), the torch-ops implementation (``bincount`` with
  float64 weights), the torch scale ops alone, and ``alq_cupy.sketch_sums`` when CuPy is installed
  (the same tensor through DLPack);
* the kernel variants (``VARIANTS``: element kernel on torch scales or the fused kernel that computes
  the scales itself; histogram layout "planes" or "interleaved"; ``S0`` by atomics or from
  ``tl.histogram`` counts), each timed as the public op with its ``TUNING`` overrides, and a sweep of
  launch shapes (chunk, warps, copies) around the main ones (``--sweep``);
* the fused quantize+pack kernel (``alq_torch.quantize_encode``, device noise) on the same data, and
  a device-to-device copy, for scale. Target (PERFORMANCE.md): the sketch <= 1 ms.

Every variant is checked before it is timed: its sums against ``alq_core.compute_sketch`` of the
whole array (``--check-prefix`` to check a prefix only; rtol 1e-12), its skipped-bucket mask too.

``--smoke`` (and any run without a GPU) takes a small size and runs the Triton kernels in the
interpreter on CPU tensors: it checks the script, not the speed.
"""

# ruff: noqa: B023  (timed lambdas run inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import os
import platform
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
from alq_torch._sketch import _normalize_inputs, _sketch_parts, _sums_torch  # noqa: E402

RESNET50 = 25_557_032

#: Kernel variants, as ``_kernels.TUNING`` overrides of the shipped defaults (the public op is timed).
VARIANTS: dict[str, dict[str, Any]] = {
    "element/planes (previous default)": {
        "sketch_fused": False, "sketch_layout": "planes", "sketch_block": 4096, "sketch_chunk": 4096,
    },
    "element/interleaved": {"sketch_fused": False, "sketch_layout": "interleaved", "sketch_block": 4096},
    "fused/planes": {"sketch_fused": True, "sketch_layout": "planes", "sketch_s0": "atomic"},
    "fused/interleaved": {"sketch_fused": True, "sketch_layout": "interleaved", "sketch_s0": "atomic"},
    "fused/planes/s0-histogram": {"sketch_fused": True, "sketch_layout": "planes", "sketch_s0": "histogram"},
    "fused/interleaved/s0-histogram": {"sketch_fused": True, "sketch_layout": "interleaved", "sketch_s0": "histogram"},
}  # fmt: skip
#: Launch shapes swept around a variant (one parameter at a time).
SHAPES: dict[str, list[Any]] = {
    "sketch_chunk": [512, 2048],
    "sketch_fused_warps": [4, 16],
    "sketch_copies": [16, 256],
}
#: Variants swept: "main" the two likely best (one per cost model of the L2 atomics), "all" every fused one.
SWEPT = {
    "main": ["fused/interleaved", "fused/planes/s0-histogram"],
    "all": [k for k in VARIANTS if k.startswith("fused")],
}


def bench(fn: Callable[[], Any], device: str, rep: int = 300) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def with_tuning(overrides: dict[str, Any], fn: Callable[[], Any]) -> Any:
    saved = dict(_kernels.TUNING)
    _kernels.TUNING.update(overrides)
    try:
        return fn()
    finally:
        _kernels.TUNING.clear()
        _kernels.TUNING.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--n", type=int, default=None, help="coordinates (default 25,557,032; 40,000 with --smoke)")
    parser.add_argument("--buckets", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["alq-e", "alq-einf"])
    parser.add_argument("--smoke", action="store_true", help="small size, no sweep (CPU: Triton interpreter)")
    parser.add_argument("--check-prefix", type=int, default=None, help="check only this many coordinates (default all)")
    parser.add_argument(
        "--sweep", choices=["none", "main", "all"], default="main",
        help="launch shapes around the main variants (default), every fused variant, or none",
    )  # fmt: skip
    parser.add_argument("--rep", type=int, default=300, help="do_bench repetition time per timing, ms")
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
        "variants": VARIANTS,
        "target_seconds": 1e-3,
        "results": {},
    }
    rows: list[tuple[str, str, float, str]] = []
    dst = torch.empty_like(x)
    t_copy = bench(lambda: dst.copy_(x), device, args.rep)
    res["results"]["copy"] = {"seconds": t_copy, "bytes_per_s": 8 * n / t_copy}
    rows.append(("d2d copy", "-", t_copy, f"{8 * n / t_copy / 1e12:.2f} TB/s"))
    checked = min(n, args.check_prefix or n)
    xc_host = x[:checked].cpu().numpy()

    for method in args.methods:
        for d in args.buckets:
            cfg = QuantizerConfig(method, bits=3, bucket_size=d, nonfinite="propagate")
            key = f"{method}/d{d}"
            out: dict[str, Any] = {}
            res["results"][key] = out
            core = alq_core.compute_sketch(xc_host, cfg)
            want, want_skipped = core.sums, core.skipped
            xs = x[:checked]

            def check(fn: Callable[[], Any], what: str) -> None:
                """The public op (under the current TUNING) on the checked coordinates against the core."""
                sums, bad = fn()
                check_close(sums, want, 1e-12, what)
                got_skipped = int(bad.sum().item()) if bad.numel() else 0
                if got_skipped != want_skipped:
                    msg = f"{what}: {got_skipped} buckets skipped; the core skips {want_skipped}"
                    raise AssertionError(msg)

            check(lambda: _sketch_parts(xs, cfg), f"{key} public op")
            body, recip, weights, _ = _normalize_inputs(x, cfg)
            ref = alq_torch.sketch_sums(x, cfg).cpu().numpy()  # the whole array: every variant matches it too

            fixed: dict[str, Callable[[], Any]] = {
                "sketch_sums (public op)": lambda: alq_torch.sketch_sums(x, cfg),
                "sketch kernel only": lambda: _kernels.sketch_sums(body, recip, weights, d),
                "sketch, torch ops (bincount)": lambda: _sums_torch(body, recip, weights, d),
                "scales + reciprocals only (torch)": lambda: _normalize_inputs(x, cfg),
            }
            if has_cupy:
                xc = alq_cupy.as_cupy(x)
                fixed["alq_cupy.sketch_sums"] = lambda: alq_cupy.sketch_sums(xc, cfg)
            for name, fn in fixed.items():
                got = fn()
                if not name.startswith("scales"):
                    got_np = alq_cupy.as_cupy(got).get() if name.startswith("alq_cupy") else got
                    check_close(got_np, ref, 1e-10, f"{key} {name}")
                t = bench(fn, device, args.rep)
                out[name] = {"seconds": t, "elements_per_s": n / t}
                rows.append((name, key, t, f"{n / t / 1e9:.1f} G el/s"))
            if has_cupy:
                check_close(alq_cupy.level_sketch(xs, cfg).sums, want, 1e-12, f"{key} cupy")

            # the variants, each as the public op under its TUNING overrides, checked against the core first
            runs: dict[str, dict[str, Any]] = dict(VARIANTS)
            if CUDA and not args.smoke and args.sweep != "none":
                for base in SWEPT[args.sweep]:
                    for param, values in SHAPES.items():
                        for value in values:
                            runs[f"{base} {param.removeprefix('sketch_')}={value}"] = {**VARIANTS[base], param: value}
            timed: dict[str, Any] = {}
            for name, over in runs.items():
                try:
                    with_tuning(over, lambda: check(lambda: _sketch_parts(xs, cfg), f"{key} {name}"))
                    with_tuning(over, lambda: check_close(alq_torch.sketch_sums(x, cfg), ref, 1e-10, f"{key} {name}"))
                    t = with_tuning(over, lambda: bench(lambda: alq_torch.sketch_sums(x, cfg), device, args.rep))
                    timed[name] = {"seconds": t, "tuning": over}
                    rows.append((f"  {name}", key, t, f"{n / t / 1e9:.1f} G el/s"))
                except Exception as exc:  # a variant that fails to compile or to match is reported, not fatal
                    timed[name] = {"failed": f"{type(exc).__name__}: {exc}"[:300], "tuning": over}
                    rows.append((f"  {name}", key, float("nan"), timed[name]["failed"][:60]))
            out["variants"] = timed
            ok = {k: v["seconds"] for k, v in timed.items() if "seconds" in v}
            if ok:
                best = min(ok, key=ok.__getitem__)
                out["best_variant"] = best
                rows.append((f"  best: {best}", key, ok[best], ""))

            # the quantize kernel on the same data, for scale
            levels = default_levels(cfg)
            payload = alq_torch.quantize_encode(x, levels, cfg, seed=1)
            assert payload.numel() == alq_core.payload_size(cfg, n)
            t_q = bench(lambda: alq_torch.quantize_encode(x, levels, cfg, seed=1, out=payload), device, args.rep)
            out["quantize_encode"] = {"seconds": t_q}
            rows.append(("quantize_encode (fused, device noise)", key, t_q, "for scale"))
            out["sketch_over_quantize"] = out["sketch_sums (public op)"]["seconds"] / t_q

    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"device: {res['device']}; n = {n}")
    print(f"{'operation':58s} {'config':>15s} {'median':>12s}  note")
    for name, key, secs, note in rows:
        print(f"{name:58s} {key:>15s} {secs * 1e6:10.1f} us  {note}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
