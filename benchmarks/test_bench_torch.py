"""alq-torch ops: CPU torch ops against the NumPy core, and the CUDA kernels against the naive pipeline.

Every group times one operation with its reference competing; every benchmark
checks its result. CUDA groups skip (with the reason) on machines without a GPU;
the standalone ``benchmarks/gpu_kernels.py`` gives the full GPU picture
(memory floors, launch-width sweep) on the GPU machine.
"""

from __future__ import annotations

import alq_core
import alq_torch
import numpy as np
import pytest
import torch
from alq_core import QuantizerConfig, default_levels

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
N_CPU = 1 << 20
N_GPU = 25_557_032
CONFIG = QuantizerConfig("alq", bits=3, bucket_size=8192)
LEVELS = default_levels(CONFIG)


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n) * 1e-3).astype(np.float32), rng.random(n, dtype=np.float32)


@pytest.fixture(scope="module")
def cpu_case() -> tuple[np.ndarray, np.ndarray, bytes]:
    x, u = _data(N_CPU)
    return x, u, alq_core.encode(alq_core.quantize(x, LEVELS, CONFIG, noise=u), LEVELS)


@pytest.mark.benchmark(group="torch-quantize-encode-cpu-1M")
def test_core_quantize_encode(benchmark, info, cpu_case):  # type: ignore[no-untyped-def]
    x, u, expected = cpu_case
    got = benchmark(lambda: alq_core.encode(alq_core.quantize(x, LEVELS, CONFIG, noise=u), LEVELS))
    assert got == expected


@pytest.mark.benchmark(group="torch-quantize-encode-cpu-1M")
def test_torch_quantize_encode_cpu(benchmark, info, cpu_case):  # type: ignore[no-untyped-def]
    x, u, expected = cpu_case
    xt, ut = torch.from_numpy(x), torch.from_numpy(u)
    got = benchmark(alq_torch.quantize_encode, xt, LEVELS, CONFIG, noise=ut)
    assert got.numpy().tobytes() == expected
    if benchmark.stats is not None:  # None under --benchmark-disable
        info["elements_per_s"] = N_CPU / benchmark.stats.stats.median


@pytest.mark.benchmark(group="torch-decode-sum-cpu-1M-W4")
def test_core_decode_average(benchmark, info, cpu_case):  # type: ignore[no-untyped-def]
    _, _, payload = cpu_case

    def run() -> np.ndarray:
        acc = None
        for _ in range(4):
            part = alq_core.dequantize(alq_core.decode(payload), LEVELS)
            acc = part if acc is None else acc + part
        assert acc is not None
        return acc * np.float32(0.25)

    got = benchmark(run)
    np.testing.assert_array_equal(
        got, alq_core.dequantize(alq_core.decode(payload), LEVELS) * np.float32(4) * np.float32(0.25)
    )


@pytest.mark.benchmark(group="torch-decode-sum-cpu-1M-W4")
def test_torch_decode_sum_cpu(benchmark, info, cpu_case):  # type: ignore[no-untyped-def]
    _, _, payload = cpu_case
    stack = torch.frombuffer(bytearray(payload * 4), dtype=torch.uint8).view(4, -1)
    got = benchmark(alq_torch.decode_sum, stack, LEVELS, CONFIG, N_CPU, scale=0.25)
    deq = alq_core.dequantize(alq_core.decode(payload), LEVELS)
    np.testing.assert_array_equal(got.numpy(), (((deq + deq) + deq) + deq) * np.float32(0.25))


def _cuda_sync(fn):  # type: ignore[no-untyped-def]
    def run():  # type: ignore[no-untyped-def]
        r = fn()
        torch.cuda.synchronize()
        return r

    return run


@pytest.fixture(scope="module")
def gpu_case():  # type: ignore[no-untyped-def]
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N_GPU, device="cuda", generator=g) * 1e-3
    return x, torch.rand(N_GPU, device="cuda", generator=g)


@needs_cuda
@pytest.mark.benchmark(group="torch-quantize-cuda-25.56M")
def test_naive_torch_pipeline_cuda(benchmark, info, gpu_case):  # type: ignore[no-untyped-def]
    from gpu_kernels import check_naive, naive_magnitudes, naive_quantize_dequantize

    x, _ = gpu_case
    levels = torch.from_numpy(LEVELS).cuda()
    mags = naive_magnitudes(levels)
    y = benchmark(_cuda_sync(lambda: naive_quantize_dequantize(x, mags, 8192)))
    check_naive(x, y, 8192)


@needs_cuda
@pytest.mark.benchmark(group="torch-quantize-cuda-25.56M")
def test_fused_quantize_pack_cuda(benchmark, info, gpu_case):  # type: ignore[no-untyped-def]
    x, u = gpu_case
    buf = torch.empty(alq_core.payload_size(CONFIG, N_GPU), dtype=torch.uint8, device="cuda")
    ref = alq_torch.encode(alq_torch.quantize(x, LEVELS, CONFIG, noise=u), LEVELS)
    assert torch.equal(alq_torch.quantize_encode(x, LEVELS, CONFIG, noise=u, out=buf), ref)
    benchmark(_cuda_sync(lambda: alq_torch.quantize_encode(x, LEVELS, CONFIG, seed=1, out=buf)))
    info["target_seconds"] = 60e-6


@needs_cuda
@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.benchmark(group="torch-decode-sum-cuda-25.56M")
def test_decode_sum_cuda(benchmark, info, gpu_case, w):  # type: ignore[no-untyped-def]
    x, _ = gpu_case
    payloads = torch.stack([alq_torch.quantize_encode(x * (i + 1), LEVELS, CONFIG, seed=i) for i in range(w)])
    out = torch.empty(N_GPU, device="cuda")
    got = benchmark(_cuda_sync(lambda: alq_torch.decode_sum(payloads, LEVELS, CONFIG, N_GPU, scale=1 / w, out=out)))
    acc = None
    for p in payloads:
        part = alq_torch.dequantize(alq_torch.decode(p), LEVELS)
        acc = part if acc is None else acc + part
    assert torch.equal(got, acc * float(np.float32(1 / w)))
