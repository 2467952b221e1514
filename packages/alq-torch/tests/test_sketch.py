"""The level sketch on torch tensors against :func:`alq_core.compute_sketch`.

Bin indices must equal the core's exactly (same float32 ``v``, same integer recipe); the
per-bin sums equal within float64 rounding (the summation order differs). Both
implementations are checked: the torch ops on CPU (and CUDA), and the Triton kernel, compiled
on a GPU or in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set before the
kernels module is first imported, as in ``test_kernels.py``).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import alq_core  # noqa: E402
import alq_torch  # noqa: E402
from alq_core import QuantizerConfig  # noqa: E402
from alq_core._sketch import NUM_BINS  # noqa: E402
from alq_torch._sketch import _normalize_inputs, _sums_torch, sketch_bins  # noqa: E402

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install 'alq-torch[triton]')")
RTOL = 1e-12


def heavy(n: int, seed: int = 0) -> np.ndarray:
    """A heavy-tailed float32 gradient with zeros, a zero bucket and exact powers of two."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(2.0, n) * 1e-3).astype(np.float32)
    x[rng.integers(0, n, max(1, n // 50))] = 0.0
    x[: min(n, 7)] = [2.0**-30, -(2.0**-21), 2.0**-20, -(2.0**-1), 1.0, -0.0, 3e-38][: min(n, 7)]
    return x


def assert_sums_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape == (3, NUM_BINS)
    err = np.abs(got - want)
    tol = RTOL * np.abs(want) + 1e-300
    bad = np.argwhere(err > tol)
    assert bad.size == 0, (
        f"{what}: {len(bad)} sums differ, first at {tuple(bad[0])}: {got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}"
    )


CONFIGS = [
    ("alq-e", 256, 20 * 256 + 77),
    ("alq-einf", 256, 20 * 256 + 77),
    ("alq-einf", 64, 640),
    ("alq-e", 1000, 3500),  # bucket size not a power of two
    ("trn", 128, 1000),  # clipping at 2.5 sigma, scale recomputed
    ("qsgd", 300, 299),  # one short bucket only
]


def test_bins_equal_the_core_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    mags = np.concatenate(
        [
            np.ldexp(1.0, np.arange(-40, 1)),  # powers of two around the octave edges
            np.nextafter(np.ldexp(1.0, np.arange(-40, 1)), 0),
            rng.random(5000) ** 8,
            alq_core._sketch.EDGES[alq_core._sketch.EDGES >= 0],  # every edge, and just below it
            np.nextafter(alq_core._sketch.EDGES[alq_core._sketch.EDGES > 0], 0),
            [0.0, 1.0],
        ]
    ).astype(np.float32)
    v = np.concatenate([mags, -mags, np.array([-0.0], dtype=np.float32)])
    got = sketch_bins(torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, alq_core.sketch_bins(v))
    assert got.min() == 0 and got.max() == NUM_BINS - 1


@pytest.mark.parametrize(("method", "d", "n"), CONFIGS)
def test_torch_sums_equal_the_core(method: str, d: int, n: int) -> None:
    cfg = QuantizerConfig(method, bits=3, bucket_size=d)
    x = heavy(n, seed=n)
    want = alq_core.compute_sketch(x, cfg)
    got = alq_torch.level_sketch(torch.from_numpy(x), cfg)
    assert_sums_close(got.sums, want.sums, f"{method} d={d} n={n}")
    assert (got.count, got.skipped, got.key) == (want.count, want.skipped, want.key)


def test_normalized_coordinates_are_the_cores() -> None:
    """``v`` inside the sketch is exactly :func:`alq_core.normalized_coordinates` (clipping included)."""
    for method, d, n in CONFIGS:
        cfg = QuantizerConfig(method, bits=3, bucket_size=d)
        x = heavy(n, seed=3)
        body, recip, weights, bad = _normalize_inputs(torch.from_numpy(x), cfg)
        v_core, s_core = alq_core.normalized_coordinates(x, cfg)
        counts = torch.full((recip.numel(),), d)
        if body.numel() % d:
            counts[-1] = body.numel() % d
        v = (body * torch.repeat_interleave(recip, counts)).clamp(-1, 1).numpy()
        np.testing.assert_array_equal(v.view(np.int32), v_core.view(np.int32))
        np.testing.assert_array_equal(weights.numpy(), np.where(np.isfinite(s_core), s_core.astype(np.float64) ** 2, 0))
        assert not bad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_sketched_as_their_float32_values(dtype: torch.dtype) -> None:
    cfg = QuantizerConfig("alq-einf", bits=3, bucket_size=128)
    x = torch.from_numpy(heavy(1000)).to(dtype)
    want = alq_core.compute_sketch(x.to(torch.float32).numpy(), cfg)
    assert_sums_close(alq_torch.sketch_sums(x, cfg).numpy(), want.sums, str(dtype))


def test_nonfinite_buckets_contribute_nothing_and_are_counted() -> None:
    cfg = QuantizerConfig("alq-e", bits=3, bucket_size=64)
    x = heavy(64 * 6 + 10)
    x[70] = np.nan
    x[200] = np.inf
    x[64 * 6 + 3] = -np.inf  # the tail bucket
    want = alq_core.compute_sketch(x, cfg)
    got = alq_torch.level_sketch(torch.from_numpy(x), cfg)
    assert np.all(np.isfinite(got.sums))
    assert_sums_close(got.sums, want.sums, "non-finite")
    assert got.skipped == want.skipped == 3
    clean = x.copy()
    clean[64:128] = clean[192:256] = clean[384:] = 0
    assert_sums_close(alq_torch.sketch_sums(torch.from_numpy(clean), cfg).numpy(), want.sums, "as if zero")


def test_sums_fit_the_same_table_as_the_core() -> None:
    cfg = QuantizerConfig("alq-einf", bits=3, bucket_size=256)
    x = heavy(40 * 256)
    a, b = alq_core.AdaptiveQuantizer(cfg), alq_core.AdaptiveQuantizer(cfg)
    ra = a.update(alq_torch.level_sketch(torch.from_numpy(x), cfg), 0)
    rb = b.update(alq_core.compute_sketch(x, cfg), 0)
    assert ra.updated and rb.updated
    np.testing.assert_array_equal(a.levels, b.levels)


def test_invalid_inputs_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="must be a quantized method"):
        alq_torch.sketch_sums(torch.zeros(8), QuantizerConfig("fp32", bits=3, bucket_size=4))
    with pytest.raises(TypeError, match=r"must be an alq_core\.QuantizerConfig"):
        alq_torch.sketch_sums(torch.zeros(8), "alq-e")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        alq_torch.sketch_sums(torch.zeros(8, dtype=torch.int32), QuantizerConfig("alq-e", bits=3, bucket_size=4))
    empty = alq_torch.sketch_sums(torch.zeros(0), QuantizerConfig("alq-e", bits=3, bucket_size=4))
    assert empty.shape == (3, NUM_BINS) and not empty.any()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route CPU tensors to the interpreted Triton kernel."""
    if not HAS_TRITON:
        pytest.skip("needs triton (pip install 'alq-torch[triton]')")
    if not CUDA:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
        monkeypatch.setenv("ALQ_TORCH_KERNELS_ON_CPU", "1")


DEVICE = "cuda" if CUDA else "cpu"


@needs_triton
@pytest.mark.parametrize(("method", "d", "n"), CONFIGS)
def test_triton_kernel_equals_the_core_and_the_torch_ops(kernel: None, method: str, d: int, n: int) -> None:
    from alq_torch import _kernels

    cfg = QuantizerConfig(method, bits=3, bucket_size=d)
    x = heavy(n, seed=n + 1)
    x[min(n - 1, 5 * d + 1)] = np.nan
    want = alq_core.compute_sketch(x, cfg)
    xt = torch.from_numpy(x).to(DEVICE)
    body, recip, weights, _ = _normalize_inputs(xt, cfg)
    got = _kernels.sketch_sums(body, recip, weights, d)
    assert got.device.type == DEVICE
    assert_sums_close(got.cpu().numpy(), want.sums, f"kernel {method} d={d} n={n}")
    assert_sums_close(_sums_torch(body, recip, weights, d).cpu().numpy(), want.sums, "torch")
    via_api = alq_torch.level_sketch(xt, cfg)  # the public op takes the kernel here
    assert_sums_close(via_api.sums, want.sums, "public op")
    assert via_api.skipped == want.skipped


@needs_cuda
@pytest.mark.parametrize("norm_method", ["alq-e", "alq-einf"])
@pytest.mark.parametrize("d", [8192, 16384])
def test_gpu_sketch_of_a_large_gradient(norm_method: str, d: int) -> None:
    """25.6M-scale shapes on the GPU: kernel and torch ops against the core (a 2M slice keeps the core quick)."""
    cfg = QuantizerConfig(norm_method, bits=3, bucket_size=d)
    n = (1 << 21) + 12345
    x = heavy(n, seed=d)
    want = alq_core.compute_sketch(x, cfg)
    xt = torch.from_numpy(x).cuda()
    assert_sums_close(alq_torch.sketch_sums(xt, cfg).cpu().numpy(), want.sums, "cuda")
    body, recip, weights, _ = _normalize_inputs(xt, cfg)
    assert_sums_close(_sums_torch(body, recip, weights, d).cpu().numpy(), want.sums, "cuda torch ops")


#: The kernel variants ``_kernels.TUNING`` selects (benchmarks/gpu_sketch.py times the same ones), with
#: launch shapes small enough that programs take several chunks, several buckets or one bucket each.
VARIANTS: dict[str, dict[str, object]] = {
    "element/planes": {"sketch_fused": False, "sketch_layout": "planes", "sketch_block": 1024, "sketch_chunk": 256},
    "element/interleaved": {"sketch_fused": False, "sketch_layout": "interleaved", "sketch_block": 512},
    "fused/planes": {"sketch_layout": "planes", "sketch_chunk": 128, "sketch_copies": 3},
    "fused/interleaved": {"sketch_layout": "interleaved", "sketch_chunk": 128},
    "fused/interleaved/bucket-per-program": {"sketch_fused_elems": 1, "sketch_chunk": 64},
    "fused/interleaved/s0-histogram": {"sketch_s0": "histogram", "sketch_fused_elems": 1, "sketch_chunk": 128},
    "fused/planes/s0-histogram": {"sketch_layout": "planes", "sketch_s0": "histogram", "sketch_fused_elems": 1},
    "fused/s0-histogram/several-buckets": {"sketch_s0": "histogram", "sketch_chunk": 512},  # falls back to atomics
}


def special_buckets(x: np.ndarray, d: int, norm: str) -> None:
    """Write a zero bucket, a bucket of subnormals (its reciprocal scale overflows: v = 0, weight s^2 > 0) and,
    for the L2 scale, a bucket whose scale overflows (skipped, as a bucket holding Inf) into ``x``."""
    nb = x.size // d
    if nb >= 3:
        x[d : 2 * d] = 0.0
        x[2 * d : 3 * d] = np.float32(1e-42) * np.sign(x[2 * d : 3 * d] + 0.5)
    if nb >= 4 and norm == "l2":
        x[3 * d : 4 * d] = np.float32(3e38)


@needs_triton
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("method", "d", "n"), CONFIGS)
def test_every_kernel_variant_equals_the_core(
    kernel: None, monkeypatch: pytest.MonkeyPatch, variant: str, method: str, d: int, n: int
) -> None:
    from alq_torch import _kernels

    for key, value in VARIANTS[variant].items():
        monkeypatch.setitem(_kernels.TUNING, key, value)
    cfg = QuantizerConfig(method, bits=3, bucket_size=d)
    x = heavy(n, seed=n + 2)
    special_buckets(x, d, cfg.norm)
    x[min(n - 1, 5 * d + 1)] = np.nan
    want = alq_core.compute_sketch(x, cfg)
    fused = _kernels.TUNING["sketch_fused"] and _kernels.fused_supported(cfg)
    calls = {"sketch_fused": 0, "sketch_sums": 0}
    for name in calls:
        real = getattr(_kernels, name)

        def spy(*a: object, _real: object = real, _name: str = name) -> object:
            calls[_name] += 1
            return _real(*a)  # type: ignore[operator]

        monkeypatch.setattr(_kernels, name, spy)
    got = alq_torch.level_sketch(torch.from_numpy(x).to(DEVICE), cfg)
    assert calls == {"sketch_fused": int(fused), "sketch_sums": int(not fused)}
    assert_sums_close(got.sums, want.sums, f"{variant} {method} d={d} n={n}")
    assert (got.count, got.skipped) == (want.count, want.skipped)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_kernel_reads_other_dtypes_as_their_float32_values(kernel: None, dtype: torch.dtype) -> None:
    cfg = QuantizerConfig("alq-e", bits=3, bucket_size=128)
    x = torch.from_numpy(heavy(1000, seed=5)).to(dtype)
    want = alq_core.compute_sketch(x.to(torch.float32).numpy(), cfg)
    assert_sums_close(alq_torch.sketch_sums(x.to(DEVICE), cfg).cpu().numpy(), want.sums, str(dtype))


@needs_triton
def test_bad_tuning_values_say_what_is_allowed(kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from alq_torch import _kernels

    x = torch.from_numpy(heavy(600)).to(DEVICE)
    cfg = QuantizerConfig("alq-e", bits=3, bucket_size=64)
    monkeypatch.setitem(_kernels.TUNING, "sketch_layout", "rows")
    with pytest.raises(ValueError, match=r"TUNING\['sketch_layout'\] must be one of"):
        alq_torch.sketch_sums(x, cfg)
    monkeypatch.setitem(_kernels.TUNING, "sketch_layout", "planes")
    monkeypatch.setitem(_kernels.TUNING, "sketch_s0", "bincount")
    with pytest.raises(ValueError, match=r"TUNING\['sketch_s0'\] must be 'atomic' or 'histogram'"):
        alq_torch.sketch_sums(x, cfg)


@needs_triton
@pytest.mark.parametrize(("block", "copies", "use_kernel"), [(1024, 3, True), (8192, 1, True), (4096, 64, False)])
def test_kernel_launch_shapes_and_the_switch_give_the_same_sums(
    kernel: None, monkeypatch: pytest.MonkeyPatch, block: int, copies: int, use_kernel: bool
) -> None:
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "sketch_fused", False)
    monkeypatch.setitem(_kernels.TUNING, "sketch_block", block)
    monkeypatch.setitem(_kernels.TUNING, "sketch_copies", copies)
    monkeypatch.setitem(_kernels.TUNING, "sketch_kernel", use_kernel)
    cfg = QuantizerConfig("alq-e", bits=3, bucket_size=512)
    x = heavy(9 * 512 + 300, seed=block)
    want = alq_core.compute_sketch(x, cfg)
    assert_sums_close(alq_torch.sketch_sums(torch.from_numpy(x).to(DEVICE), cfg).cpu().numpy(), want.sums, "shape")
