"""GPU kernel benchmarks for alq-torch: fused quantize+pack and decode+average vs baselines.

Usage (GPU machine, repository root)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src python benchmarks/gpu_kernels.py \
        benchmarks/results/gpu_kernels_h200.json

Measures, on 25.56M float32 coordinates (ResNet-50 size), 3 bits, buckets 8192
and 16384, all in one run and with medians of ``triton.testing.do_bench``
(L2 flushed between repetitions):

(a) the naive reference-style torch pipeline (per-bucket norm expanded to every
    coordinate, int64 random integers, a comparison search over the levels,
    quantize -> dequantize; see :func:`naive_quantize_dequantize` for exactly what
    it runs), and for context a leaner variant whose search is one bucketize;
(b) the fused quantize+pack kernel (``alq_torch.quantize_encode``), with device
    noise and with given noise, and a sweep of its launch shapes (looping or
    not, widths, register caps), each checked before it is timed;
(c) decode+average of W = 2, 4, 8 payloads (``alq_torch.decode_sum``: the API
    with its host header check, the API with ``check_headers=False`` as the DDP
    hook called it before, the API with a device-side header check (a flag
    tensor) as the hook calls it now, the kernel alone, and a sweep of its block sizes) against the memory floor
    (bytes read + written at the device-to-device copy bandwidth measured here);
(d) that device-to-device copy.

Every timed function's result is checked (bytes equal to alq_core on the same
noise, codes within their level bracket, sums equal to the torch composition).

Without a GPU it runs the same code (sweeps included; ``--no-sweep`` skips them)
in Triton's interpreter on CPU tensors at a small size (``--n``), which checks
the script and every variant's bytes, not the speed.
"""

# ruff: noqa: B023  (timed lambdas run inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import itertools
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
from alq_core import HEADER_SIZE, QuantizerConfig, default_levels, payload_size  # noqa: E402
from alq_torch import _kernels, _tables  # noqa: E402
from alq_torch._tables import level_table  # noqa: E402

RESNET50 = 25_557_032
COPY_TBPS_DOC = 4.24e12


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


def sweep_tuning(
    variants: dict[str, dict[str, Any]], check: Callable[[], None], run: Callable[[], Any], device: str
) -> tuple[dict[str, float | str], str | None]:
    """Median seconds of ``run`` under each ``_kernels.TUNING`` override, after ``check`` passes.

    A variant that fails (compiler limits, a wrong result) is reported as a string, not raised.
    ``TUNING`` is restored afterwards. Returns the results and the fastest variant's name.
    """
    saved = dict(_kernels.TUNING)
    res: dict[str, float | str] = {}
    try:
        for name, var in variants.items():
            _kernels.TUNING.clear()
            _kernels.TUNING.update(saved)
            _kernels.TUNING.update(var)
            try:
                check()
                res[name] = bench(run, device)
            except Exception as exc:
                res[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
    finally:
        _kernels.TUNING.clear()
        _kernels.TUNING.update(saved)
    timed = {k: v for k, v in res.items() if isinstance(v, float)}
    return res, min(timed, key=timed.__getitem__) if timed else None


def naive_magnitudes(levels: torch.Tensor) -> torch.Tensor:
    """The non-negative level magnitudes the naive pipeline rounds between (computed once, like a real port)."""
    return levels[levels >= 0].contiguous()


def naive_quantize_dequantize(x: torch.Tensor, mags: torch.Tensor, d: int, *, bucketize: bool = False) -> torch.Tensor:
    """The reference-style pipeline: what a straightforward torch port of the paper's code does.

    Per call, over the ``n // d`` full buckets (one elementwise torch kernel per line, no fusion):
    float32 per-bucket L2 norm, expanded to every coordinate; ``v = x / (norm + 1e-7)``; sign and
    magnitude; int64 random integers turned into float32 uniforms; a level search over the
    ``k`` magnitude intervals (per interval: two comparisons, an and, two selects of the
    bracket); ``p``, the stochastic choice, and the dequantized ``sign * level * norm``. No host
    synchronization (the magnitudes are computed once, outside). ``bucketize``: a leaner search
    (for context, not the target's baseline): one ``torch.bucketize`` and two gathers.
    """
    n = x.numel()
    full = n // d * d
    xb = x[:full].view(-1, d)
    norm = xb.norm(p=2, dim=1, keepdim=True).expand_as(xb)  # expanded per coordinate
    v = xb / (norm + 1e-7)
    sign = torch.sign(v)
    a = v.abs()
    r = torch.randint(0, 2**31, xb.shape, dtype=torch.int64, device=x.device)  # int64 random integers
    u = r.to(torch.float32) / 2**31
    if bucketize:
        idx = torch.bucketize(a, mags[1:-1], right=True)
        lo = mags[idx]
        hi = mags[idx + 1]
    else:
        lo = torch.zeros_like(a)
        hi = torch.ones_like(a)
        for k in range(mags.numel() - 1):  # level search by comparisons
            inside = (a >= mags[k]) & (a < mags[k + 1])
            lo = torch.where(inside, mags[k], lo)
            hi = torch.where(inside, mags[k + 1], hi)
    p = (a - lo) / (hi - lo)
    q = torch.where(u < p, hi, lo)
    out = torch.empty_like(x)
    out[:full] = (sign * q * norm).reshape(-1)
    out[full:] = x[full:]
    return out


def check_naive(x: torch.Tensor, y: torch.Tensor, d: int) -> None:
    full = x.numel() // d * d
    norm = x[:full].view(-1, d).norm(dim=1, keepdim=True)
    err = (y[:full].view(-1, d) - x[:full].view(-1, d)).abs() / norm
    assert float(err.max()) <= 1.0 + 1e-5, "naive pipeline left its level bracket"


def bracket_codes(x: torch.Tensor, table: torch.Tensor, config: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with noise just below 1 (round down) and 0 (round up), by the torch composition."""
    from alq_torch._quantize import quantize_flat

    m = config.num_quantized(x.numel())
    below = torch.full((m,), float(np.nextafter(np.float32(1), np.float32(0))), device=x.device)
    down, _ = quantize_flat(x, table, config, below)
    up, _ = quantize_flat(x, table, config, torch.zeros(m, device=x.device))
    return down, up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--n", type=int, default=RESNET50 if CUDA else 40_000, help="coordinates")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--buckets", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-width sweep")
    args = parser.parse_args()
    device = "cuda" if CUDA else "cpu"
    n = args.n
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=gen) * 1e-3

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if CUDA
        else f"CPU (Triton interpreter; timings meaningless) {platform.processor()}",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "n": n,
        "bits": args.bits,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tuning_default": dict(_kernels.TUNING),
        "results": {},
    }
    rows: list[tuple[str, str, float, str]] = []

    # (d) device-to-device copy
    dst = torch.empty_like(x)
    t_copy = bench(lambda: dst.copy_(x), device)
    copy_bw = 8 * n / t_copy
    res["results"]["copy"] = {"seconds": t_copy, "bytes_per_s": copy_bw}
    rows.append(("d2d copy", "-", t_copy, f"{copy_bw / 1e12:.2f} TB/s (read+write)"))
    assert torch.equal(dst, x)

    for d in args.buckets:
        config = QuantizerConfig("alq", bits=args.bits, bucket_size=d, nonfinite="propagate")
        levels = default_levels(config)
        table = level_table(levels, config, x.device)
        key = f"d{d}"
        out: dict[str, Any] = {}
        res["results"][key] = out
        size = payload_size(config, n)
        floor_q = (4 * n + size) / copy_bw

        # (a) naive
        mags = naive_magnitudes(table.levels)
        naive = naive_quantize_dequantize(x, mags, d)
        check_naive(x, naive, d)
        t_naive = bench(lambda: naive_quantize_dequantize(x, mags, d), device)
        out["naive_quantize_dequantize"] = {"seconds": t_naive, "elements_per_s": n / t_naive}
        rows.append(("naive quantize->dequantize", key, t_naive, f"{n / t_naive / 1e9:.1f} G el/s"))
        check_naive(x, naive_quantize_dequantize(x, mags, d, bucketize=True), d)
        t_lean = bench(lambda: naive_quantize_dequantize(x, mags, d, bucketize=True), device)
        out["naive_bucketize_quantize_dequantize"] = {"seconds": t_lean, "elements_per_s": n / t_lean}
        rows.append(("naive, bucketize search (context)", key, t_lean, f"{n / t_lean / 1e9:.1f} G el/s"))

        # (b) fused quantize + pack: correctness first
        u = torch.rand(n, device=device, generator=gen)
        payload = alq_torch.quantize_encode(x, levels, config, noise=u)
        sample = min(n, 4_000_000)  # core check on a prefix (the core on all 25.56M takes a few seconds)
        cfg_s = config
        xs, us = x[:sample].cpu().numpy(), u[:sample].cpu().numpy()
        exp = alq_core.encode(alq_core.quantize(xs, levels, cfg_s, noise=us), levels)
        got_s = alq_torch.quantize_encode(x[:sample], levels, cfg_s, noise=u[:sample]).cpu().numpy().tobytes()
        assert got_s == exp, "fused kernel bytes differ from alq_core (given noise, prefix)"
        ref_full = alq_torch.encode(alq_torch.quantize(x, levels, config, noise=u), levels)  # torch composition
        assert torch.equal(payload, ref_full), "fused kernel bytes differ from the torch composition (full size)"
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        seeded = alq_torch.quantize_encode(x, levels, config, seed=1, out=buf)
        codes = alq_torch.decode(seeded, config=config, levels=levels).codes
        down, up = bracket_codes(x, table.levels, config)
        assert bool(((codes == down) | (codes == up)).all()), "device-noise codes outside their level bracket"
        frac_up = float((codes != down).float().mean())

        t_fused = bench(lambda: alq_torch.quantize_encode(x, levels, config, seed=1, out=buf), device)
        t_given = bench(lambda: alq_torch.quantize_encode(x, levels, config, noise=u, out=buf), device)
        head = _tables.header_tensor(config, n, 0, table.crc, x.device)
        t_kernel_q = bench(lambda: _kernels.quantize_pack(x, table, config, head, buf, noise=None, seed=1), device)
        out["fused_quantize_pack_kernel_only"] = {"seconds": t_kernel_q, "speedup_vs_naive": t_naive / t_kernel_q}
        rows.append(("fused quantize+pack (kernel launch only)", key, t_kernel_q, f"{t_naive / t_kernel_q:.0f}x naive"))
        out["fused_quantize_pack"] = {
            "seconds": t_fused,
            "speedup_vs_naive": t_naive / t_fused,
            "memory_floor_seconds": floor_q,
            "target_seconds": 60e-6,
            "target_speedup": 20.0,
            "fraction_rounded_up": frac_up,
        }
        out["fused_quantize_pack_given_noise"] = {"seconds": t_given, "memory_floor_seconds": (8 * n + size) / copy_bw}
        rows.append(
            (
                "fused quantize+pack (device noise)",
                key,
                t_fused,
                f"{t_naive / t_fused:.0f}x naive; floor {floor_q * 1e6:.1f} us",
            )
        )
        rows.append(("fused quantize+pack (given noise)", key, t_given, "reads noise too"))

        if not args.no_sweep:
            ref_seeded = alq_torch.quantize_encode(x, levels, config, seed=1)  # device noise: index-determined

            def check_variant() -> None:
                got = alq_torch.quantize_encode(x, levels, config, noise=u, out=buf)
                assert torch.equal(got, ref_full), "bytes differ from the torch composition"
                got = alq_torch.quantize_encode(x, levels, config, seed=1, out=buf)
                assert torch.equal(got, ref_seeded), "device-noise bytes differ from the default launch's"

            # (looping programs?, num_warps, register cap, looping programs per SM), for both bucket sizes
            # (the worst of earlier rounds dropped: loop with 2-3 programs per SM, 90-175 us at 16384)
            # each with the level bracket found by a scan and by binary search (qpack_bsearch)
            variants: dict[str, dict[str, Any]] = {}
            for (loop, w, r, per_sm), bsearch in itertools.product(
                ((False, 8, 72, 1), (False, 16, 64, 1), (True, 16, 128, 1), (True, 16, 96, 1), (True, 32, 64, 1)),
                (False, True),
            ):
                var: dict[str, Any] = {"qpack_loop_per_sm": per_sm, "qpack_bsearch": bsearch}
                for size_key in ("8k", "16k"):
                    var.update(
                        {f"qpack_loop_{size_key}": loop, f"qpack_warps_{size_key}": w, f"qpack_maxnreg_{size_key}": r}
                    )
                variants[f"loop={loop},warps={w},maxnreg={r},per_sm={per_sm},bsearch={bsearch}"] = var
            # timed: the kernel alone (the API adds host work that can exceed the kernel's own time)
            sweep, best = sweep_tuning(
                variants,
                check_variant,
                lambda: _kernels.quantize_pack(x, table, config, head, buf, noise=None, seed=1),
                device,
            )
            out["fused_quantize_pack_sweep"] = sweep
            if best is not None:
                out["fused_quantize_pack_best"] = {"tuning": best, "seconds": sweep[best]}
            for k, v in sweep.items():
                rows.append(
                    (
                        f"  sweep {k}",
                        key,
                        v if isinstance(v, float) else float("nan"),
                        "" if isinstance(v, float) else v,
                    )
                )

        # (c) decode + average of W payloads
        for w in args.workers:
            xs_w = [x * (i + 1) for i in range(w)]
            payloads = torch.stack([alq_torch.quantize_encode(xi, levels, config, seed=i) for i, xi in enumerate(xs_w)])
            avg = torch.empty(n, dtype=torch.float32, device=device)
            alq_torch.decode_sum(payloads, levels, config, n, scale=1 / w, out=avg)
            acc = None
            for p in payloads:
                part = alq_torch.dequantize(alq_torch.decode(p, config=config, levels=levels), levels)
                acc = part if acc is None else acc + part
            assert acc is not None
            assert torch.equal(avg, acc * float(np.float32(1 / w))), f"decode_sum W={w} differs from the composition"
            nb = config.num_buckets(n)
            off_codes = HEADER_SIZE + 4 * nb
            m_q = config.num_quantized(n)
            scale32 = float(np.float32(1 / w))
            trusted = alq_torch.decode_sum(payloads, levels, config, n, scale=1 / w, check_headers=False)
            assert torch.equal(trusted, avg), "check_headers=False changed the sum"
            t_api = bench(lambda: alq_torch.decode_sum(payloads, levels, config, n, scale=1 / w, out=avg), device)
            t_api_nosync = bench(
                lambda: alq_torch.decode_sum(payloads, levels, config, n, scale=1 / w, out=avg, check_headers=False),
                device,
            )
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            checked = alq_torch.decode_sum(
                payloads, levels, config, n, table_version=0, scale=1 / w, check_headers=flag
            )
            assert torch.equal(checked, avg) and int(flag.item()) == 0, "the device header check changed the sum"
            t_api_flag = bench(
                lambda: alq_torch.decode_sum(
                    payloads, levels, config, n, table_version=0, scale=1 / w, out=avg, check_headers=flag
                ),
                device,
            )
            t_kernel = bench(lambda: _kernels.decode_sum(payloads, table, config, m_q, off_codes, avg, scale32), device)
            moved = w * (size - HEADER_SIZE) + 4 * n
            floor = moved / copy_bw
            entry: dict[str, Any] = {
                "seconds_api": t_api,
                "seconds_api_check_headers_false": t_api_nosync,
                "seconds_api_device_check": t_api_flag,
                "seconds_kernel": t_kernel,
                "bytes_moved": moved,
                "memory_floor_seconds": floor,
                "ratio_to_floor_kernel": t_kernel / floor,
                "ratio_to_floor_api": t_api / floor,
                "ratio_to_floor_api_check_headers_false": t_api_nosync / floor,
                "ratio_to_floor_api_device_check": t_api_flag / floor,
                "target_ratio": 2.0,
            }
            out[f"decode_average_W{w}"] = entry
            rows.append(
                (
                    f"decode+average W={w} (kernel)",
                    key,
                    t_kernel,
                    f"{t_kernel / floor:.2f}x floor ({floor * 1e6:.1f} us)",
                )
            )
            rows.append((f"decode+average W={w} (API, header check)", key, t_api, f"{t_api / floor:.2f}x floor"))
            rows.append(
                (
                    f"decode+average W={w} (API, check_headers=False)",
                    key,
                    t_api_nosync,
                    f"{t_api_nosync / floor:.2f}x floor",
                )
            )
            rows.append(
                (
                    f"decode+average W={w} (API, device check)",
                    key,
                    t_api_flag,
                    f"{t_api_flag / floor:.2f}x floor (as the DDP hook calls it)",
                )
            )
            if not args.no_sweep:

                def check_sum() -> None:
                    _kernels.decode_sum(payloads, table, config, m_q, off_codes, avg, scale32)
                    assert torch.equal(avg, trusted), "sum differs"

                dvariants = {
                    f"decode_block={blk},decode_warps={warps},decode_pairs={pairs},decode_words={words}": {
                        "decode_block": blk,
                        "decode_warps": warps,
                        "decode_pairs_min_w": 1 if pairs else 10**9,
                        "decode_words": bool(words),
                    }
                    for blk, warps, pairs, words in (
                        (2048, 4, 1, 0), (2048, 4, 1, 1), (2048, 4, 0, 0), (2048, 4, 0, 1), (4096, 4, 1, 1),
                        (1024, 4, 1, 1), (1024, 2, 1, 1), (2048, 8, 1, 1), (4096, 8, 1, 1), (4096, 4, 0, 1),
                    )
                }  # fmt: skip
                dsweep, best = sweep_tuning(
                    dvariants,
                    check_sum,
                    lambda: _kernels.decode_sum(payloads, table, config, m_q, off_codes, avg, scale32),
                    device,
                )
                entry["kernel_sweep"] = dsweep
                if best is not None:
                    t_best = float(dsweep[best])
                    entry["kernel_best"] = {"tuning": best, "seconds": t_best, "ratio_to_floor": t_best / floor}
                    rows.append((f"  best decode W={w}: {best}", key, t_best, f"{t_best / floor:.2f}x floor"))

    with open(args.output, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"device: {res['device']}; n = {n}; bits = {args.bits}")
    print(f"{'operation':44s} {'bucket':>7s} {'median':>12s}  note")
    for name, key, secs, note in rows:
        print(f"{name:44s} {key:>7s} {secs * 1e6:10.1f} us  {note}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
