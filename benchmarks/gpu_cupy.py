"""Standalone GPU benchmark of alq-cupy (self-checking); writes one JSON file.

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src python benchmarks/gpu_cupy.py benchmarks/results/gpu_cupy.json

Part 1 (one GPU): quantize+pack (fused ``quantize_encode``) of 25.56M float32, 3 bits,
buckets 8192 and 16384, with device noise and with given noise; the naive CuPy
pipeline of the reference code's style; alq-torch's fused Triton kernel on the same
array (when alq-torch is on the path); the memory floor from a device copy; and
``decode_sum`` of 2 and 4 payloads. Every result is first checked byte for byte
against ``alq_core`` on a 2M-coordinate slice.

Part 2 (two GPUs, skipped with a note otherwise): exact float32 NCCL all-reduce vs
the quantized all-reduce (all-gather and reduce-scatter paths) of 25.56M float32, in
the same run, over the socket transport (``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
NCCL_IB_DISABLE=1 NCCL_NET=Socket``)
and over the default transport (NVLink).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

N = 25_557_032  # ResNet-50 parameters
BITS = 3
BUCKETS = (8192, 16384)


def _median_events(fn: Any, iters: int, inner: int = 10) -> float:
    """Median over ``iters`` of the per-call GPU time (s) of ``inner`` back-to-back calls between two events."""
    import cupy as cp

    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(iters):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / inner)
    return float(statistics.median(times))


def _median_wall(fn: Any, iters: int) -> float:
    import cupy as cp

    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def _env() -> dict[str, Any]:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    info: dict[str, Any] = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "device_count": int(cp.cuda.runtime.getDeviceCount()),
        "cupy": cp.__version__,
        "cuda_runtime": int(cp.cuda.runtime.runtimeGetVersion()),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        from cupy.cuda import nccl

        info["nccl"] = int(nccl.get_version()) if nccl.available else None
    except Exception:
        info["nccl"] = None
    return info


def naive_pipeline(x: Any, levels_dev: Any, d: int) -> Any:
    """Reference-style CuPy quantize+pack: per-bucket norm, expanded scale, int64 randoms, level search."""
    import cupy as cp

    full = (x.size // d) * d
    rows = x[:full].reshape(-1, d)
    s = cp.sqrt((rows.astype(cp.float64) ** 2).sum(axis=1)).astype(cp.float32)
    s_el = cp.repeat(s, d)
    v = cp.clip(x[:full] / s_el, -1, 1)
    j = cp.searchsorted(levels_dev[1:-1], v, side="right")
    lo = levels_dev[j]
    p = (v - lo) / (levels_dev[j + 1] - lo)
    u = cp.random.randint(0, 1 << 24, full, dtype=cp.int64).astype(cp.float32) * np.float32(2**-24)
    codes = (j + (u < p)).astype(cp.uint64)
    shifts = (cp.arange(8, dtype=cp.uint64) * BITS).reshape(1, 8)
    words = (codes.reshape(-1, 8) << shifts).sum(axis=1, dtype=cp.uint64)  # fields do not overlap: sum == OR
    return words.view(cp.uint8).reshape(-1, 8)[:, :BITS].reshape(-1)


def _triton_quantize_us(x: Any, cfg: Any, iters: int) -> float | None:
    """GPU time of alq-torch's fused Triton quantize+pack (device noise) on ``x``; None without alq-torch."""
    try:
        import torch
        from alq_torch import _kernels, _tables
    except ImportError:
        return None
    import alq_core

    xt = torch.from_dlpack(x)  # the same memory, no copy
    table = _tables.level_table(alq_core.default_levels(cfg), cfg, xt.device)
    head = _tables.header_tensor(cfg, N, 0, table.crc, xt.device)
    buf = torch.empty(alq_core.payload_size(cfg, N), dtype=torch.uint8, device=xt.device)
    return 1e6 * _median_events(lambda: _kernels.quantize_pack(xt, table, cfg, head, buf, noise=None, seed=5), iters)


def _one_bucket(
    d: int, x: Any, host: np.ndarray, rng: np.random.Generator, iters: int, bw: float, sweep: bool
) -> dict[str, Any]:
    import alq_core
    import alq_cupy
    import cupy as cp
    from alq_cupy import _kernels as K
    from alq_cupy._quantize import decode_sum_async, level_table

    cfg = alq_core.QuantizerConfig("alq", bits=BITS, bucket_size=d, nonfinite="propagate")
    levels = alq_core.default_levels(cfg)
    # correctness first: 2M coordinates (with a tail), given and device noise
    sl = host[: 2_000_000 + 123]
    u = rng.random(sl.size, dtype=np.float32)
    want = alq_core.encode(alq_core.quantize(sl, levels, cfg, noise=u), levels, table_version=7)
    got = alq_cupy.quantize_encode(cp.asarray(sl), levels, cfg, table_version=7, noise=u).get().tobytes()
    assert got == want, f"bucket {d}: quantize_encode with given noise differs from alq_core"
    want_dev = alq_core.encode(
        alq_core.quantize(sl, levels, cfg, noise=alq_cupy.counter_noise_host(sl.size, 11)), levels
    )
    assert alq_cupy.quantize_encode(cp.asarray(sl), levels, cfg, seed=11).get().tobytes() == want_dev
    size = alq_core.payload_size(cfg, N)
    buf = cp.empty(size, dtype=cp.uint8)
    noise = cp.asarray(rng.random(N, dtype=np.float32))
    _, dev, crc = level_table(levels, cfg)
    hdr = alq_cupy._quantize.device_header(cfg, N, 0, crc)
    off_s, off_c, off_t, _ = alq_cupy._header.payload_offsets(cfg, N)

    def kernel_only(u: Any = None) -> None:
        K.launch_quantize(
            x,
            N,
            d,
            dev,
            8,
            False,
            None,
            BITS,
            u,
            None if u is not None else 5,
            scale_bytes=buf[off_s:],
            packed=buf[off_c:],
            header_src=hdr,
            header_dst=buf,
        )

    floor = (4 * N + N * BITS / 8) / bw
    res = {
        "kernel_device_noise_us": 1e6 * _median_events(kernel_only, iters),
        "kernel_given_noise_us": 1e6 * _median_events(lambda: kernel_only(noise), iters),
        "api_quantize_encode_us": 1e6
        * _median_events(lambda: alq_cupy.quantize_encode(x, levels, cfg, seed=5, out=buf), iters),
        "naive_cupy_pipeline_us": 1e6 * _median_events(lambda: naive_pipeline(x, dev, d), max(5, iters // 5), 2),
        "memory_floor_us": 1e6 * floor,
        "smem_bytes_per_block": K.smem_bytes_for(d),
        "threads_per_block": K.threads_for(d),
    }
    if sweep:  # the quantize launch shape (threads per bucket), device noise
        default = K.TUNING["quantize_groups_per_thread"]
        for gpt in (2, 8, 16):
            K.TUNING["quantize_groups_per_thread"] = gpt
            res[f"sweep_groups_per_thread_{gpt}_threads_{K.threads_for(d)}_us"] = 1e6 * _median_events(
                kernel_only, iters
            )
        K.TUNING["quantize_groups_per_thread"] = default
    res["kernel_vs_floor"] = res["kernel_device_noise_us"] / res["memory_floor_us"]
    triton_us = _triton_quantize_us(x, cfg, iters)
    if triton_us is not None:  # the torch backend's fused kernel on the same array, same run
        res["torch_triton_kernel_us"] = triton_us
        res["kernel_over_triton"] = res["kernel_device_noise_us"] / triton_us
    res["naive_over_kernel"] = res["naive_cupy_pipeline_us"] / res["kernel_device_noise_us"]
    for w in (2, 4):
        pays = cp.stack([buf] * w)
        res_out = cp.empty(N, dtype=cp.float32)
        err = cp.zeros(1, dtype=cp.int32)

        def dsum(pays: Any = pays, w: int = w, res_out: Any = res_out, err: Any = err) -> None:
            K.launch_decode_sum(pays, size, w, N, N, d, BITS, 8, (off_s, off_c, off_t), dev, 1.0 / w, res_out, err)

        t = _median_events(dsum, iters)
        res[f"decode_sum_W{w}_kernel_us"] = 1e6 * t
        res[f"decode_sum_W{w}_floor_us"] = 1e6 * (w * size + 4 * N) / bw
        t_api = _median_events(
            lambda pays=pays, w=w, res_out=res_out: decode_sum_async(pays, levels, cfg, N, out=res_out, scale=1 / w),
            max(5, iters // 5),
            2,
        )
        res[f"decode_sum_W{w}_api_us"] = 1e6 * t_api
    # decode_sum correctness on a slice
    p2 = cp.stack([alq_cupy.quantize_encode(cp.asarray(sl), levels, cfg, seed=s) for s in (1, 2)])
    tot = np.zeros(sl.size, np.float32)
    for s in (1, 2):
        q = alq_core.quantize(sl, levels, cfg, noise=alq_cupy.counter_noise_host(sl.size, s))
        tot += alq_core.dequantize(q, levels)
    assert np.array_equal(alq_cupy.decode_sum(p2, levels, cfg, sl.size, scale=0.5).get(), tot * np.float32(0.5))
    return res


def part_single(iters: int, sweep: bool = False) -> dict[str, Any]:
    import cupy as cp

    rng = np.random.default_rng(0)
    host = (rng.standard_normal(N) * rng.lognormal(-4, 1.0, N)).astype(np.float32)
    x = cp.asarray(host)
    out: dict[str, Any] = {"n": N, "bits": BITS}
    y = cp.empty_like(x)
    t_copy = _median_events(lambda: cp.copyto(y, x), iters)
    bw = 8 * N / t_copy
    out["device_copy_TBps"] = bw / 1e12
    for d in BUCKETS:
        out[f"bucket_{d}"] = _one_bucket(d, x, host, rng, iters, bw, sweep)
    return out


def _rank(rank: int, world: int, uid_path: str, iters: int, result_path: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    import alq_core
    import alq_cupy
    import cupy as cp

    cp.cuda.Device(rank).use()
    comm = alq_cupy.Communicator.from_file(uid_path, world, rank, device=rank)
    rng = np.random.default_rng(rank)
    x = cp.asarray((rng.standard_normal(N) * rng.lognormal(-4, 1.0, N)).astype(np.float32))
    xh = x.astype(cp.float16)
    res: dict[str, Any] = {}
    nccl = comm._nccl
    f16 = getattr(nccl, "NCCL_FLOAT16", getattr(nccl, "NCCL_HALF", None))

    def barrier() -> None:
        comm.allreduce(cp.zeros(1, cp.float32))
        cp.cuda.Device().synchronize()

    res["fp32_allreduce_ms"] = 1e3 * _median_wall(lambda: comm.allreduce(x, average=True), iters)
    if f16 is not None:
        yh = cp.empty_like(xh)

        def ar16() -> None:
            comm._comm.allReduce(xh.data.ptr, yh.data.ptr, N, f16, nccl.NCCL_SUM, comm._stream())

        res["fp16_allreduce_ms"] = 1e3 * _median_wall(ar16, iters)
    # Every rank fits the same ALQ table from one shared sample of the same distribution
    # (NUQSGD's default table on these heavy-tailed values would dominate the error figure).
    common_rng = np.random.default_rng(12345)
    common = (common_rng.standard_normal(N) * common_rng.lognormal(-4, 1.0, N)).astype(np.float32)
    for d in BUCKETS:
        cfg = alq_core.QuantizerConfig("alq", bits=BITS, bucket_size=d, nonfinite="propagate")
        fitted = alq_core.AdaptiveQuantizer(cfg)
        report = fitted.update(alq_core.compute_stats(common, d), step=0)
        levels = fitted.levels
        res[f"alq3_levels_b{d}"] = [float(v) for v in levels]
        res[f"alq3_level_fit_b{d}"] = report.reason
        for algo in ("allgather", "reduce_scatter"):
            barrier()
            seeds = iter(range(10**6))
            t = _median_wall(
                lambda algo=algo, cfg=cfg, levels=levels, seeds=seeds: comm.quantized_allreduce(
                    x, levels, cfg, algorithm=algo, seed=1000 * rank + next(seeds)
                ),
                iters,
            )
            res[f"alq3_{algo}_b{d}_ms"] = 1e3 * t
            r = comm.quantized_allreduce(x, levels, cfg, algorithm=algo, seed=rank)
            exact = comm.allreduce(x, average=True)
            rel = float(cp.linalg.norm(r - exact) / cp.linalg.norm(exact))
            res[f"alq3_{algo}_b{d}_rel_error"] = rel  # ||r - exact|| / ||exact||
    comm.close()
    if rank == 0:
        Path(result_path).write_text(json.dumps(res))


def part_multi(iters: int) -> dict[str, Any]:
    import cupy as cp

    if int(cp.cuda.runtime.getDeviceCount()) < 2:
        return {"skipped": "needs 2 GPUs"}
    from cupy.cuda import nccl

    if not nccl.available:
        return {"skipped": "CuPy cannot load NCCL"}
    out: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    socket = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1", "NCCL_NET": "Socket"}
    for name, env in (("socket", socket), ("default", {})):
        with tempfile.TemporaryDirectory() as tmp:
            uid, result = str(Path(tmp) / "uid"), str(Path(tmp) / "r.json")
            procs = [ctx.Process(target=_rank, args=(r, 2, uid, iters, result, env)) for r in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=900)
            if any(p.exitcode != 0 for p in procs) or not Path(result).exists():
                out[name] = {"failed": [p.exitcode for p in procs]}
                continue
            res = json.loads(Path(result).read_text())
            for d in BUCKETS:
                for algo in ("allgather", "reduce_scatter"):
                    res[f"speedup_vs_fp32_{algo}_b{d}"] = res["fp32_allreduce_ms"] / res[f"alq3_{algo}_b{d}_ms"]
            out[name] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON output path")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip-nccl", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time the quantize kernel at other launch shapes")
    args = ap.parse_args()
    report: dict[str, Any] = {"env": _env(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    report["single_gpu"] = part_single(args.iters, args.sweep)
    print(json.dumps(report["single_gpu"], indent=1), flush=True)
    report["two_gpus"] = {"skipped": "--skip-nccl"} if args.skip_nccl else part_multi(max(5, args.iters // 2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["two_gpus"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
