"""Every GPU op against alq_core, code for code on the same noise (skipped without CuPy and a GPU)."""

from __future__ import annotations

import dataclasses

import alq_core
import numpy as np
import pytest
from alq_core.testing import assert_payloads_equal, assert_quantized_equal
from alq_core.testing import strategies as cst
from alq_cupy_gate import GPU_OK, requires_gpu
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = [requires_gpu, pytest.mark.gpu]

if GPU_OK:
    import alq_cupy
    import cupy as cp


def _case(data: st.DataObject, max_size: int = 2000, max_bucket: int = 300):
    config = data.draw(cst.configs(max_bucket=max_bucket), label="config")
    x = data.draw(cst.gradients(max_size=max_size), label="x")
    levels = data.draw(cst.levels_for(config), label="levels") if config.quantized else None
    m = config.num_quantized(x.size)
    u = data.draw(cst.noise_for(m), label="noise")
    return config, x, levels, u


@given(st.data())
def test_quantize_matches_core_on_given_noise(data: st.DataObject) -> None:
    config, x, levels, u = _case(data)
    expected = alq_core.quantize(x, levels, config, noise=u)
    got = alq_cupy.quantize(cp.asarray(x), levels, config, noise=cp.asarray(u))
    assert_quantized_equal(got, expected)
    assert got.shape == expected.shape


@given(st.data(), st.integers(0, 2**64 - 1))
def test_quantize_with_device_noise_matches_core_on_host_noise(data: st.DataObject, seed: int) -> None:
    config, x, levels, _ = _case(data)
    m = config.num_quantized(x.size)
    expected = alq_core.quantize(x, levels, config, noise=alq_cupy.counter_noise_host(m, seed))
    assert_quantized_equal(alq_cupy.quantize(x, levels, config, seed=seed), expected)


@pytest.mark.parametrize("method", ["alq", "qsgdinf", "nuqsgd"])
@pytest.mark.parametrize("d", [8, 8192, 16384, 1000])
def test_eight_level_three_bit_kernel_encodes_like_core(method: str, d: int) -> None:
    """The 8-level 3-bit kernel (levels in registers): full buckets held in shared memory, a short last
    bucket, zeros and a bucket maximum of either sign, given and device noise; payload bytes as the core's."""
    config = alq_core.QuantizerConfig(method, bits=3, bucket_size=d)
    levels = alq_core.default_levels(config)
    assert levels.size == 8
    rng = np.random.default_rng(d)
    n = 3 * d + 77
    x = (rng.standard_normal(n) * rng.lognormal(-4, 1.0, n)).astype(np.float32)
    x[: 3 * 8 : 3] = np.float32(0.0)
    x[5] = -x[6]  # a bucket maximum, either sign
    m = config.num_quantized(n)
    for u in (rng.random(m, dtype=np.float32), None):
        noise = u if u is not None else alq_cupy.counter_noise_host(m, 99)
        expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=noise), levels)
        got = alq_cupy.quantize_encode(cp.asarray(x), levels, config, noise=u, seed=None if u is not None else 99)
        assert_payloads_equal(got, expected)


@given(st.integers(0, 100_000), st.integers(0, 2**64 - 1), st.integers(0, 2**40))
def test_device_noise_equals_host_noise(m: int, seed: int, start: int) -> None:
    assert np.array_equal(alq_cupy.counter_noise(m, seed, start).get(), alq_cupy.counter_noise_host(m, seed, start))


@given(st.data(), st.integers(0, 2**40))
def test_quantize_encode_bytes_equal_core(data: st.DataObject, version: int) -> None:
    config, x, levels, u = _case(data)
    expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=u), levels, table_version=version)
    got = alq_cupy.quantize_encode(cp.asarray(x), levels, config, table_version=version, noise=u)
    assert_payloads_equal(got, expected)


@given(st.data())
def test_quantize_encode_into_a_misaligned_view(data: st.DataObject) -> None:
    config, x, levels, u = _case(data, max_size=500)
    expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=u), levels)
    size = len(expected)
    big = cp.full(size + 7, 0xAB, dtype=cp.uint8)
    alq_cupy.quantize_encode(x, levels, config, noise=u, out=big[3 : 3 + size])
    host = big.get()
    assert_payloads_equal(host[3 : 3 + size], expected)
    assert np.all(host[:3] == 0xAB)
    assert np.all(host[3 + size :] == 0xAB)


@given(st.data())
def test_encode_decode_dequantize_match_core(data: st.DataObject) -> None:
    config, x, levels, u = _case(data)
    core_q = alq_core.quantize(x, levels, config, noise=u)
    ours = alq_cupy.quantize(x, levels, config, noise=u)
    payload = alq_cupy.encode(ours, levels, table_version=3)
    assert_payloads_equal(payload, alq_core.encode(core_q, levels, table_version=3))
    back = alq_cupy.decode(payload, config=config, levels=levels, table_version=3)
    assert_quantized_equal(back, alq_core.decode(alq_core.encode(core_q, levels, table_version=3), config=config))
    got = alq_cupy.dequantize(ours, levels).get()
    want = alq_core.dequantize(core_q, levels)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)


@given(st.integers(1, 8), st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_pack_unpack_match_core(bits: int, m: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, m, dtype=np.uint8)
    packed = alq_cupy.pack_codes(cp.asarray(codes), bits)
    assert_payloads_equal(packed, alq_core.pack_codes(codes, bits))
    assert np.array_equal(alq_cupy.unpack_codes(packed, bits, m).get(), codes)


def test_pack_codes_validates_like_core() -> None:
    with pytest.raises(ValueError, match=r"codes must be < 2\*\*bits = 4; got max 4"):
        alq_cupy.pack_codes(cp.asarray([0, 4], dtype=cp.uint8), 2)
    with pytest.raises(ValueError, match=r"`bits` must be in 1..8; got 9"):
        alq_cupy.pack_codes(cp.zeros(3, cp.uint8), 9)


@given(st.data(), st.integers(1, 5), st.sampled_from([1.0, 0.5, 0.25, 1 / 3]))
def test_decode_sum_matches_core_sum(data: st.DataObject, w: int, scale: float) -> None:
    config = data.draw(cst.configs(method=cst.methods, max_bucket=300))
    n = data.draw(st.integers(0, 1500))
    levels = data.draw(cst.levels_for(config)) if config.quantized else None
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    payloads, total = [], np.zeros(n, dtype=np.float32)
    for _ in range(w):
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
        q = alq_core.quantize(x, levels, config, rng=rng)
        payloads.append(np.frombuffer(alq_core.encode(q, levels, table_version=2), dtype=np.uint8))
        total += alq_core.dequantize(q, levels).reshape(-1)
    want = total if scale == 1.0 else total * np.float32(scale)
    got = alq_cupy.decode_sum(cp.asarray(np.stack(payloads)), levels, config, n, table_version=2, scale=scale).get()
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("w", [1, 2, 4, 7])
@pytest.mark.parametrize(("d", "n"), [(8192, 3 * 8192 + 77), (1000, 5003), (12, 1001), (3, 100)])
def test_decode_sum_three_bits_matches_core_sum(w: int, d: int, n: int) -> None:
    """The 3-bit decode (constant shifts; code pairs from 4 payloads on), whole and part groups, groups that
    cross buckets (d % 8 != 0), buckets shorter than a group."""
    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=d)
    levels = alq_core.default_levels(config)
    rng = np.random.default_rng([w, d, n])
    payloads, total = [], np.zeros(n, dtype=np.float32)
    for _ in range(w):
        x = (rng.standard_normal(n) * rng.lognormal(-4, 1.0, n)).astype(np.float32)
        q = alq_core.quantize(x, levels, config, rng=rng)
        payloads.append(np.frombuffer(alq_core.encode(q, levels), dtype=np.uint8))
        total += alq_core.dequantize(q, levels).reshape(-1)
    got = alq_cupy.decode_sum(cp.asarray(np.stack(payloads)), levels, config, n, scale=1 / w).get()
    assert np.array_equal(got, total * np.float32(1 / w))


def test_decode_sum_rejects_a_foreign_table_version_and_size() -> None:
    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=64)
    levels = alq_core.default_levels(config)
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    p = alq_cupy.quantize_encode(x, levels, config, table_version=1, seed=1)
    with pytest.raises(alq_core.PayloadError, match="level-table version mismatch: payload has 1, reader has 2"):
        alq_cupy.decode_sum(p.reshape(1, -1), levels, config, 300, table_version=2)
    # 301 elements pack into as many bytes as 300 (38 groups of 8 codes): the header check catches it
    assert alq_core.payload_size(config, 301) == p.size
    with pytest.raises(alq_core.PayloadError, match="payload holds 300 elements, expected 301"):
        alq_cupy.decode_sum(p.reshape(1, -1), levels, config, 301)
    with pytest.raises(ValueError, match=r"`payloads` must be uint8 of shape \(W, payload_size = 2\d\d\)"):
        alq_cupy.decode_sum(p.reshape(1, -1), levels, config, 400)


def test_decode_sum_flags_out_of_table_codes() -> None:
    config = alq_core.QuantizerConfig("trn", bucket_size=16)
    levels = alq_core.default_levels(config)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    p = alq_cupy.quantize_encode(x, levels, config, seed=3)
    off_c = alq_core.HEADER_SIZE + 4 * config.num_buckets(64)
    p[off_c] = 0xFF  # code 3 in a 3-level table
    with pytest.raises(alq_core.PayloadError, match="code outside the level table"):
        alq_cupy.decode_sum(p, levels, config, 64)
    with pytest.raises(alq_core.PayloadError, match="payload holds code 3 but the table has 3 levels"):
        alq_cupy.decode(p)


def test_kernel_source_compiles_without_flush_to_zero() -> None:
    """NVRTC with exactly our options emits no .ftz instruction (CuPy's RawModule would add -ftz=true),
    the per-bucket reciprocal and per-level inverse gaps are correctly rounded, and nothing is approximate."""
    from alq_cupy import _kernels as K
    from cupy.cuda import nvrtc

    arch = f"-arch=compute_{cp.cuda.Device().compute_capability}"
    prog = nvrtc.createProgram(K.SOURCE, "alq_check.cu", (), ())
    try:
        nvrtc.compileProgram(prog, [*K.OPTIONS, arch, "--device-as-default-execution-space"])
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    text = ptx.decode() if isinstance(ptx, bytes) else str(ptx)
    assert ".ftz" not in text
    assert "rcp.rn.f32" in text
    assert "rcp.approx" not in text
    assert "div.approx" not in text
    assert "div.full" not in text
    assert "-ftz=true" not in " ".join(K.OPTIONS)


@pytest.mark.parametrize("method", ["qsgd", "qsgdinf", "alq", "trn"])
@pytest.mark.parametrize("tiny", [1e-42, 1e-44, 1.4e-45, 1e-39])
def test_subnormal_inputs_and_scales_are_kept(method: str, tiny: float) -> None:
    """Float32 subnormals are not flushed to zero (the kernels are built without -ftz=true)."""
    config = alq_core.QuantizerConfig(method, bits=2, bucket_size=8, nonfinite="propagate")
    levels = alq_core.default_levels(config)
    x = np.full(24, tiny, dtype=np.float32)
    x[1::3] *= -1
    x[8] = np.nan  # bucket 1 non-finite, buckets 0 and 2 subnormal
    x[17] = 1.0  # bucket 2 normal scale, subnormal coordinates
    assert 0 < abs(float(x[0])) < np.finfo(np.float32).tiny
    u = np.random.default_rng(0).random(24, dtype=np.float32)
    u[:4] = 0.0
    u[16:20] = 0.0  # u == 0 < p for any p > 0: with trn's zero level a flushed p = v / 1 would change the code
    expected = alq_core.quantize(x, levels, config, noise=u)
    assert float(expected.scales[0]) > 0
    np.testing.assert_array_equal(alq_cupy.bucket_scales(x, config).get(), alq_core.bucket_scales(x, config))
    assert_quantized_equal(alq_cupy.quantize(x, levels, config, noise=u), expected)
    assert_payloads_equal(alq_cupy.quantize_encode(x, levels, config, noise=u), alq_core.encode(expected, levels))
    got = alq_cupy.dequantize(alq_cupy.quantize(x, levels, config, noise=u), levels).get()
    assert np.array_equal(got, alq_core.dequantize(expected, levels), equal_nan=True)


@given(st.data())
def test_bucket_scales_match_core_including_nonfinite(data: st.DataObject) -> None:
    config = data.draw(cst.configs())
    x = data.draw(cst.gradients()).copy()
    if x.size and data.draw(st.booleans()):
        x[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    got = alq_cupy.bucket_scales(x, config).get()
    want = alq_core.bucket_scales(x, config)
    np.testing.assert_array_equal(got, want)  # NaN == NaN; Inf signs and every finite bit must agree


@given(st.data())
def test_nonfinite_buckets_propagate_like_core(data: st.DataObject) -> None:
    config = dataclasses.replace(data.draw(cst.configs()), nonfinite="propagate")
    x = data.draw(cst.gradients(max_size=800)).copy()
    if x.size:
        for _ in range(data.draw(st.integers(1, 3))):
            x[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    levels = data.draw(cst.levels_for(config))
    u = data.draw(cst.noise_for(config.num_quantized(x.size)))
    expected = alq_core.quantize(x, levels, config, noise=u)
    assert_quantized_equal(alq_cupy.quantize(x, levels, config, noise=u), expected)
    assert_payloads_equal(alq_cupy.quantize_encode(x, levels, config, noise=u), alq_core.encode(expected, levels))


def test_nonfinite_raise_has_the_core_message() -> None:
    config = alq_core.QuantizerConfig("qsgd", bits=2, bucket_size=4)
    x = np.arange(12, dtype=np.float32)
    x[5] = np.nan
    x[9] = np.inf
    levels = alq_core.uniform_levels(2)
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 4..7\) holds NaN or Inf \(2 such buckets\)"):
        alq_core.quantize(x, levels, config, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 4..7\) holds NaN or Inf \(2 such buckets\)"):
        alq_cupy.quantize(x, levels, config, seed=0)
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 4..7\) holds NaN or Inf \(2 such buckets\)"):
        alq_cupy.quantize_encode(x, levels, config, seed=0)


def test_bad_inputs_raise_core_messages() -> None:
    config = alq_core.QuantizerConfig("qsgd", bits=2, bucket_size=4)
    levels = alq_core.uniform_levels(2)
    with pytest.raises(TypeError, match=r"`x` must be a real floating-point array"):
        alq_cupy.quantize(cp.zeros(3, dtype=cp.bool_), levels, config)
    with pytest.raises(ValueError, match=r"one uniform value per quantized coordinate \(8\); got 7"):
        alq_cupy.quantize(np.ones(8, np.float32), levels, config, noise=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=r"`noise` values must lie in \[0, 1\)"):
        alq_cupy.quantize(np.ones(8, np.float32), levels, config, noise=np.ones(8, np.float32))
    with pytest.raises(ValueError, match="pass either `noise` or `seed`, not both"):
        alq_cupy.quantize(np.ones(8, np.float32), levels, config, noise=np.zeros(8, np.float32), seed=1)
    with pytest.raises(ValueError, match="method 'qsgd' needs a level table; got None"):
        alq_cupy.quantize(np.ones(8, np.float32), None, config)
    with pytest.raises(TypeError, match="`config` must be a QuantizerConfig; got str"):
        alq_cupy.quantize(np.ones(8, np.float32), levels, "qsgd")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- paper-sized buckets


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(["alq", "qsgd", "qsgdinf", "nuqsgd", "trn", "amq-n"]),
    st.integers(1, 8),
    st.sampled_from([8192, 16384, 8191, 30000, 40000]),
    st.sampled_from(["quantize", "full"]),
    st.integers(0, 2**32 - 1),
)
def test_large_buckets_match_core(method: str, bits: int, d: int, tail: str, seed: int) -> None:
    """Shared-memory path (8192, 16384), unaligned buckets (8191) and buckets read twice (30000, 40000)."""
    config = alq_core.QuantizerConfig(method, bits=bits, bucket_size=d, tail=tail, nonfinite="propagate")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2 * d, 4 * d))
    x = (rng.standard_normal(n) * rng.lognormal(0, 2, n)).astype(np.float32)
    levels = alq_core.default_levels(config)
    u = rng.random(config.num_quantized(n), dtype=np.float32)
    expected = alq_core.quantize(x, levels, config, noise=u)
    assert_quantized_equal(alq_cupy.quantize(x, levels, config, noise=u), expected)
    assert_payloads_equal(alq_cupy.quantize_encode(x, levels, config, noise=u), alq_core.encode(expected, levels))
    m = config.num_quantized(n)
    dev = alq_core.quantize(x, levels, config, noise=alq_cupy.counter_noise_host(m, seed))
    assert_payloads_equal(alq_cupy.quantize_encode(x, levels, config, seed=seed), alq_core.encode(dev, levels))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_input_dtypes_convert_like_core(dtype: type) -> None:
    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=128)
    x = (np.random.default_rng(1).standard_normal(1000) * 3).astype(dtype)
    levels = alq_core.default_levels(config)
    u = np.random.default_rng(2).random(1000, dtype=np.float32)
    assert_quantized_equal(
        alq_cupy.quantize(cp.asarray(x), levels, config, noise=u), alq_core.quantize(x, levels, config, noise=u)
    )


def test_unbiased_on_a_noise_grid() -> None:
    """Average of the dequantized values over a uniform noise grid equals x to float32 accuracy."""
    config = alq_core.QuantizerConfig("nuqsgd", bits=3, bucket_size=64)
    levels = alq_core.default_levels(config)
    x = np.random.default_rng(3).standard_normal(256).astype(np.float32)
    grid = (np.arange(1024, dtype=np.float32) + np.float32(0.5)) / np.float32(1024)
    acc = np.zeros(256, np.float64)
    for u in grid:
        q = alq_cupy.quantize(x, levels, config, noise=np.full(256, u, np.float32))
        acc += alq_cupy.dequantize(q, levels).get()
    assert np.allclose(acc / grid.size, x, rtol=0, atol=2e-3 * float(np.abs(x).max()))


# --------------------------------------------------------------------------------- statistics


@given(st.data())
def test_bucket_stats_match_core(data: st.DataObject) -> None:
    d = data.draw(st.integers(2, 500))
    x = data.draw(cst.gradients(max_size=3000))
    norms, means, stds, sizes = (a.get() for a in alq_cupy.bucket_stats(cp.asarray(x), d))
    k = x.size // d
    assert norms.shape == means.shape == stds.shape == sizes.shape == (k,)
    assert np.all(sizes == d)
    core = alq_core.compute_stats(x, d, dist_num=10**6)
    usable = np.isfinite(norms) & (norms > 0)
    np.testing.assert_allclose(norms[usable], core.norms, rtol=1e-12)
    np.testing.assert_allclose(means[usable], core.means, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(stds[usable], core.stds, rtol=1e-9, atol=1e-15)
    ours = alq_cupy.gradient_stats(cp.asarray(x), d, dist_num=10**6)
    assert ours.num_buckets == core.num_buckets
    assert ours.skipped == core.skipped


def test_gradient_stats_feed_the_adaptive_quantizer() -> None:
    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=512)
    x = (np.random.default_rng(4).standard_normal(512 * 40) * 1e-3).astype(np.float32)
    stats = alq_cupy.gradient_stats(cp.asarray(x), 512)
    aq = alq_core.AdaptiveQuantizer(config)
    report = aq.update(stats, 0)
    assert aq.version >= 1, report
    assert not np.array_equal(aq.levels, alq_core.default_levels(config))


# --------------------------------------------------------------------------------- DLPack


def test_torch_tensor_is_quantized_without_a_copy() -> None:
    torch = pytest.importorskip("torch", reason="needs torch for the DLPack test")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for the DLPack test")
    config = alq_core.QuantizerConfig("alq", bits=3, bucket_size=256)
    levels = alq_core.default_levels(config)
    t = torch.randn(4, 1000, device="cuda")
    view = alq_cupy.as_cupy(t)
    assert int(view.data.ptr) == t.data_ptr()
    u = np.random.default_rng(5).random(4000, dtype=np.float32)
    want = alq_core.encode(alq_core.quantize(t.cpu().numpy(), levels, config, noise=u), levels)
    out = torch.empty(len(want), dtype=torch.uint8, device="cuda")
    got = alq_cupy.quantize_encode(t, levels, config, noise=torch.from_numpy(u).cuda(), out=out)
    assert int(got.data.ptr) == out.data_ptr()
    assert_payloads_equal(out, want)
    back = torch.from_dlpack(alq_cupy.decode_sum(got, levels, config, 4000))
    assert back.shape == (4000,)


# ------------------------------------------------------------------ level sketch (alq-e / alq-einf)
def _heavy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(2.0, n) * 1e-3).astype(np.float32)
    x[rng.integers(0, n, max(1, n // 50))] = 0.0
    x[:6] = [2.0**-30, -(2.0**-21), 2.0**-20, -0.5, 1.0, -0.0]
    return x


def _assert_sums_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape == (3, 1282)
    bad = np.argwhere(np.abs(got - want) > 1e-12 * np.abs(want) + 1e-300)
    assert bad.size == 0, (
        f"{len(bad)} sums differ, first at {tuple(bad[0])}: {got[tuple(bad[0])]!r} vs {want[tuple(bad[0])]!r}"
    )


@pytest.mark.parametrize(
    ("method", "d", "n"),
    [("alq-e", 256, 20 * 256 + 77), ("alq-einf", 256, 5197), ("alq-e", 1000, 3500), ("trn", 128, 1000),
     ("alq-einf", 8192, 3 * 8192 + 5), ("alq-e", 16384, 2 * 16384 + 999), ("qsgd", 300, 299)],
)  # fmt: skip
def test_sketch_sums_equal_the_core(method: str, d: int, n: int) -> None:
    config = alq_core.QuantizerConfig(method, bits=3, bucket_size=d)
    x = _heavy(n, n)
    x[min(n - 1, d + 3)] = np.nan
    want = alq_core.compute_sketch(x, config)
    got = alq_cupy.level_sketch(cp.asarray(x), config)
    _assert_sums_close(got.sums, want.sums)
    assert (got.count, got.skipped, got.key) == (want.count, want.skipped, want.key)
    _assert_sums_close(cp.asnumpy(alq_cupy.sketch_sums(cp.asarray(x).astype(cp.float16), config)),
                       alq_core.compute_sketch(x.astype(np.float16), config).sums)  # fmt: skip


@pytest.mark.parametrize("method", ["alq-e", "alq-einf"])
@pytest.mark.parametrize("d", [256, 8192])
def test_empirical_methods_with_fitted_tables_encode_like_core(method: str, d: int) -> None:
    """A table fitted to the sketch (arbitrary levels): payload bytes equal the core's on the same noise."""
    config = alq_core.QuantizerConfig(method, bits=3, bucket_size=d)
    x = _heavy(3 * d + 77, d)
    q = alq_core.AdaptiveQuantizer(config)
    assert q.update(alq_cupy.level_sketch(cp.asarray(x), config), 0).updated
    levels = q.levels
    u = np.random.default_rng(1).random(config.num_quantized(x.size), dtype=np.float32)
    expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=u), levels, table_version=q.version)
    got = alq_cupy.quantize_encode(cp.asarray(x), levels, config, noise=cp.asarray(u), table_version=q.version)
    assert_payloads_equal(cp.asnumpy(got), expected)
