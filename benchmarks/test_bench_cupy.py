"""pytest-benchmark suites of alq-cupy (GPU; skipped with a reason elsewhere).

One group per operation; the NumPy core competes in every group; every benchmark
asserts its result, so ``--benchmark-disable`` turns this into a correctness run.

    PYTHONPATH=packages/alq-core/src:packages/alq-cupy/src python -m pytest benchmarks/test_bench_cupy.py --benchmark-columns=median,iqr,ops
"""

from __future__ import annotations

import importlib
from typing import Any

import alq_core
import numpy as np
import pytest


def _gpu() -> tuple[bool, str]:
    try:
        cp = importlib.import_module("cupy")
        if int(cp.cuda.runtime.getDeviceCount()) < 1:
            return False, "needs a CUDA GPU"
    except ImportError:
        return False, "needs CuPy (pip install 'alq-cupy[cuda12]' or '[cuda13]')"
    except Exception as exc:
        return False, f"needs a CUDA GPU visible to CuPy ({type(exc).__name__})"
    return True, ""


OK, REASON = _gpu()
pytestmark = pytest.mark.skipif(not OK, reason=REASON or "needs a CUDA GPU")

N = 25_557_032
BITS = 3


@pytest.fixture(scope="module", params=[8192, 16384], ids=lambda d: f"bucket{d}")
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    import cupy as cp

    d = request.param
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(N) * rng.lognormal(-4, 1.0, N)).astype(np.float32)
    cfg = alq_core.QuantizerConfig("alq", bits=BITS, bucket_size=d, nonfinite="propagate")
    levels = alq_core.default_levels(cfg)
    u = rng.random(N, dtype=np.float32)
    want = alq_core.encode(alq_core.quantize(x, levels, cfg, noise=u), levels)
    return {
        "d": d,
        "x": x,
        "x_dev": cp.asarray(x),
        "u": u,
        "u_dev": cp.asarray(u),
        "cfg": cfg,
        "levels": levels,
        "want": want,
        "out": cp.empty(len(want), dtype=cp.uint8),
    }


def _info(benchmark: Any) -> None:
    import alq_cupy  # noqa: F401
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    device = name.decode() if isinstance(name, bytes) else str(name)
    benchmark.extra_info.update(device=device, cupy=cp.__version__, numpy=np.__version__, n=N, bits=BITS)


@pytest.mark.benchmark(group="cupy-quantize-encode")
def test_cupy_quantize_encode_given_noise(benchmark: Any, case: dict[str, Any]) -> None:
    import alq_cupy
    import cupy as cp

    _info(benchmark)

    def run() -> Any:
        p = alq_cupy.quantize_encode(case["x_dev"], case["levels"], case["cfg"], noise=case["u_dev"], out=case["out"])
        cp.cuda.Device().synchronize()
        return p

    # the given-noise path validates the noise range on the host (one sync); the device-noise path below does not
    got = benchmark(run)
    assert got.get().tobytes() == case["want"]


@pytest.mark.benchmark(group="cupy-quantize-encode")
def test_cupy_quantize_encode_device_noise(benchmark: Any, case: dict[str, Any]) -> None:
    import alq_cupy
    import cupy as cp

    _info(benchmark)

    def run() -> Any:
        p = alq_cupy.quantize_encode(case["x_dev"], case["levels"], case["cfg"], seed=7, out=case["out"])
        cp.cuda.Device().synchronize()
        return p

    got = benchmark(run).get()
    assert got.size == len(case["want"])
    assert got[:40].tobytes() == case["want"][:40]
    codes = alq_core.unpack_codes(got[40 + 4 * case["cfg"].num_buckets(N) :][: 3 * 100_000 // 8 * 8], BITS, 100_000)
    assert np.all(codes < 8)


@pytest.mark.benchmark(group="cupy-quantize-encode")
def test_core_quantize_encode_reference(benchmark: Any, case: dict[str, Any]) -> None:
    _info(benchmark)
    got = benchmark.pedantic(
        lambda: alq_core.encode(
            alq_core.quantize(case["x"], case["levels"], case["cfg"], noise=case["u"]), case["levels"]
        ),
        rounds=1,
        iterations=1,
    )
    assert got == case["want"]


@pytest.mark.benchmark(group="cupy-decode-sum")
def test_cupy_decode_sum_two_payloads(benchmark: Any, case: dict[str, Any]) -> None:
    import alq_cupy
    import cupy as cp

    _info(benchmark)
    pays = cp.stack([cp.asarray(np.frombuffer(case["want"], np.uint8))] * 2)
    out = cp.empty(N, dtype=cp.float32)

    def run() -> Any:
        r = alq_cupy.decode_sum(pays, case["levels"], case["cfg"], N, out=out, scale=0.5)
        cp.cuda.Device().synchronize()
        return r

    got = benchmark(run)
    deq = alq_core.dequantize(alq_core.decode(case["want"]), case["levels"])
    assert np.array_equal(got.get(), (deq + deq) * np.float32(0.5))


@pytest.mark.benchmark(group="cupy-decode-sum")
def test_core_decode_sum_reference(benchmark: Any, case: dict[str, Any]) -> None:
    _info(benchmark)

    def run() -> np.ndarray:
        total = np.zeros(N, np.float32)
        for _ in range(2):
            total += alq_core.dequantize(alq_core.decode(case["want"]), case["levels"])
        return total * np.float32(0.5)

    got = benchmark.pedantic(run, rounds=1, iterations=1)
    assert got.shape == (N,)
