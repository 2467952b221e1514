"""2-GPU NCCL check of the quantized all-reduce, run as a script (one process per GPU).

    PYTHONPATH=packages/alq-core/src:packages/alq-cupy/src python packages/alq-cupy/tests/nccl_check.py OUT_DIR

Each rank all-reduces its own gradient with both algorithms, the exact path, a
non-finite fallback and a mismatched level-table version; the parent process
then checks (exit status 0 = all good, the findings in OUT_DIR/summary.json):
identical bytes on both ranks, equality with the result the core computes from
the same payloads (the device noise is reproducible on the host), and the
squared error against the predicted quantization variance.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import traceback
from pathlib import Path

import numpy as np

W = 2
N = 1_000_003
SEEDS = (1234, 98765)
VERSION = 3


def gradient(rank: int) -> np.ndarray:
    rng = np.random.default_rng(100 + rank)
    return (rng.standard_normal(N) * rng.lognormal(-3, 1.5, N)).astype(np.float32)


def config_and_levels():  # type: ignore[no-untyped-def]
    import alq_core

    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=8192, nonfinite="propagate")
    levels = alq_core.validate_levels([-1, -0.3, -0.08, -0.01, 0.01, 0.08, 0.3, 1])
    return config, levels


def worker(rank: int, out_dir: str) -> None:
    try:
        import alq_core
        import alq_cupy
        import cupy as cp

        cp.cuda.Device(rank).use()
        config, levels = config_and_levels()
        comm = alq_cupy.Communicator.from_file(Path(out_dir) / "uid", W, rank, device=rank)
        x = cp.asarray(gradient(rank))
        res = {}
        res["allgather"] = comm.quantized_allreduce(
            x, levels, config, table_version=VERSION, seed=SEEDS[rank], algorithm="allgather"
        ).get()
        res["reduce_scatter"] = comm.quantized_allreduce(
            x, levels, config, table_version=VERSION, seed=SEEDS[rank], algorithm="reduce_scatter"
        ).get()
        res["exact"] = comm.allreduce(x, average=True).get()
        comm.check_levels(levels, VERSION)
        xn = x.copy()
        if rank == 1:
            xn[777] = cp.nan
        res["nan"] = comm.quantized_allreduce(xn, levels, config, table_version=VERSION, seed=SEEDS[rank]).get()
        fallback = comm.last_fallback
        mismatch = "no error"
        try:
            comm.quantized_allreduce(x, levels, config, table_version=VERSION + rank, seed=SEEDS[rank])
        except alq_core.PayloadError as exc:
            mismatch = str(exc)
        table, ver = comm.broadcast_levels(levels if rank == 0 else alq_core.uniform_levels(3), VERSION, root=0)
        comm.close()
        np.savez(Path(out_dir) / f"rank{rank}.npz", **res)
        (Path(out_dir) / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "fallback": fallback,
                    "mismatch": mismatch,
                    "broadcast_ok": bool(np.array_equal(table, levels)) and ver == VERSION,
                }
            )
        )
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def predicted_variance(x: np.ndarray, levels: np.ndarray, config) -> float:  # type: ignore[no-untyped-def]
    """Sum over coordinates of s^2 (l_{j+1} - v)(v - l_j)."""
    import alq_core

    s = np.repeat(alq_core.bucket_scales(x, config), config.bucket_size)[: x.size].astype(np.float64)
    v = np.clip(x / np.where(s == 0, 1, s), -1, 1)
    j = np.searchsorted(levels[1:-1], v, side="right")
    lo, hi = levels[j].astype(np.float64), levels[j + 1].astype(np.float64)
    return float(np.sum(s * s * (hi - v) * (v - lo)))


def expected_results(config, levels):  # type: ignore[no-untyped-def]
    import alq_core
    from alq_cupy import chunks, counter_noise_host, derive_seed

    xs = [gradient(r) for r in range(W)]
    half = np.float32(1.0 / W)
    total = np.zeros(N, np.float32)
    for r in range(W):
        q = alq_core.quantize(xs[r], levels, config, noise=counter_noise_host(N, SEEDS[r]))
        total += alq_core.dequantize(q, levels)
    allgather = total * half
    rs = np.zeros(N, np.float32)
    stage1 = np.zeros(N, np.float32)
    for j, c in enumerate(chunks(N, config.bucket_size, W)):
        acc = np.zeros(c.size, np.float32)
        for r in range(W):
            noise = counter_noise_host(c.size, derive_seed(SEEDS[r], j))
            acc += alq_core.dequantize(alq_core.quantize(xs[r][c.start : c.stop], levels, config, noise=noise), levels)
        avg = acc * half
        stage1[c.start : c.stop] = avg
        noise2 = counter_noise_host(c.size, derive_seed(SEEDS[j], W + j))
        rs[c.start : c.stop] = alq_core.dequantize(alq_core.quantize(avg, levels, config, noise=noise2), levels)
    return xs, allgather, rs, stage1


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*"):
        f.unlink()
    (out / "uid").unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, out_dir)) for r in range(W)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(W) if (out / f"rank{r}.err").exists()}
    if errors or any(p.exitcode != 0 for p in procs):
        print("worker failure:", {r: p.exitcode for r, p in enumerate(procs)}, errors)
        return 1
    config, levels = config_and_levels()
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(W)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(W)]
    xs, want_ag, want_rs, stage1 = expected_results(config, levels)
    mean = (xs[0].astype(np.float64) + xs[1]) / W
    v1 = sum(predicted_variance(x, levels, config) for x in xs) / W**2
    v2 = predicted_variance(stage1, levels, config)  # requantization of the actual first-stage average
    checks = {}
    for key in ("allgather", "reduce_scatter", "exact", "nan"):
        checks[f"{key}: same bytes on every rank"] = all(
            ranks[r][key].tobytes() == ranks[0][key].tobytes() for r in range(W)
        )
    checks["allgather equals core on the same noise"] = bool(np.array_equal(ranks[0]["allgather"], want_ag))
    checks["reduce_scatter equals core on the same noise"] = bool(np.array_equal(ranks[0]["reduce_scatter"], want_rs))
    checks["exact equals float32 mean"] = bool(np.allclose(ranks[0]["exact"], mean, rtol=1e-6, atol=1e-30))
    err_ag = float(np.sum((ranks[0]["allgather"] - mean) ** 2))
    err_rs = float(np.sum((ranks[0]["reduce_scatter"] - mean) ** 2))
    checks["allgather error / predicted variance in [0.9, 1.1]"] = 0.9 <= err_ag / v1 <= 1.1
    checks["reduce_scatter error / predicted variance in [0.85, 1.15]"] = 0.85 <= err_rs / (v1 + v2) <= 1.15
    nan_want = (xs[0] + np.where(np.arange(N) == 777, np.float32(np.nan), xs[1])) / np.float32(W)
    checks["non-finite input falls back to the exact all-reduce"] = bool(
        all(i["fallback"] for i in infos) and np.array_equal(ranks[0]["nan"], nan_want, equal_nan=True)
    )
    checks["a different table version fails on every rank"] = all("version mismatch" in i["mismatch"] for i in infos)
    checks["broadcast_levels delivers root's table"] = all(i["broadcast_ok"] for i in infos)
    summary = {
        "checks": checks,
        "n": N,
        "world_size": W,
        "allgather_sq_error": err_ag,
        "reduce_scatter_sq_error": err_rs,
        "predicted_variance_allgather": v1,
        "predicted_variance_reduce_scatter": v1 + v2,
        "mismatch_messages": [i["mismatch"] for i in infos],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "nccl_check_out"))
