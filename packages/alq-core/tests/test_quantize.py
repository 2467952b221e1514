import numpy as np
import pytest
from alq_core import (
    QuantizerConfig,
    default_levels,
    dequantize,
    exponential_levels,
    quantize,
    simulate_workers,
    uniform_levels,
)
from alq_core.testing import assert_quantized_equal, reference_quantize
from alq_core.testing import strategies as S
from hypothesis import given
from hypothesis import strategies as st


@given(data=st.data())
def test_fast_path_matches_reference_code_for_code(data):
    config = data.draw(S.configs())
    levels = data.draw(S.levels_for(config))
    x = data.draw(S.gradients(max_size=700))
    u = data.draw(S.noise_for(config.num_quantized(x.size)))
    q = quantize(x, levels, config, noise=u)
    codes, scales, tail = reference_quantize(x, levels, config, u)
    assert_quantized_equal(q, type("R", (), {"codes": codes, "scales": scales, "tail": tail, "n": x.size}))


def _noise_grid_average(x, levels, config, grid):
    """Dequantized values averaged over the noise grid (k + 1/2) / grid, for every coordinate."""
    u = ((np.arange(grid, dtype=np.float64) + 0.5) / grid).astype(np.float32)
    total = np.zeros(x.size, dtype=np.float64)
    sq = np.zeros(x.size, dtype=np.float64)
    for uk in u:
        y = dequantize(quantize(x, levels, config, noise=np.full(x.size, uk, np.float32)), levels).astype(np.float64)
        total += y
        sq += y * y
    mean = total / grid
    return mean, sq / grid - mean * mean


@pytest.mark.parametrize("method", ["qsgd", "qsgdinf", "nuqsgd", "trn", "alq"])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_unbiased_exactly_over_a_noise_grid(method, bits):
    config = QuantizerConfig(method, bits=bits, bucket_size=16, clip=None)
    levels = default_levels(config)
    x = np.random.default_rng(bits).standard_normal(40).astype(np.float32)
    grid = 2048
    mean, var = _noise_grid_average(x, levels, config, grid)
    q = quantize(x, levels, config, noise=np.zeros(x.size, np.float32))
    s = np.repeat(q.scales, 16)[: x.size].astype(np.float64)
    # The grid resolves probabilities to 1/grid, so the mean is exact up to one grid step of the gap.
    tol = s * np.max(np.diff(levels.astype(np.float64))) / grid + 1e-6 * np.abs(x)
    np.testing.assert_array_less(np.abs(mean - x), tol + 1e-12)
    # And the variance is s^2 (l_{j+1} - v)(v - l_j).
    v = np.clip(x / s, -1, 1)
    t = levels.astype(np.float64)
    j = np.clip(np.searchsorted(t, v, side="right") - 1, 0, t.size - 2)
    predicted = s**2 * (t[j + 1] - v) * (v - t[j])
    np.testing.assert_allclose(var, predicted, rtol=0, atol=float(np.max(s**2)) * 4 / grid + 1e-9)


@given(data=st.data())
def test_values_are_scale_times_a_bracketing_level(data):
    config = data.draw(S.configs())
    levels = data.draw(S.levels_for(config))
    x = data.draw(S.gradients(max_size=500))
    q = quantize(x, levels, config, rng=np.random.default_rng(0))
    assert q.codes.dtype == np.uint8 and np.all(q.codes < levels.size)
    m = q.codes.size
    s = np.repeat(q.scales, config.bucket_size)[:m]
    y = dequantize(q, levels)
    np.testing.assert_array_equal(y[:m], s * levels[q.codes])
    np.testing.assert_array_equal(y[m:], x[m:])
    if config.clip is None:
        ok = s > 0
        # the contract's v: x times the float32 reciprocal of the scale (not x / s)
        with np.errstate(over="ignore"):
            r = np.float32(1) / s[ok]
        v = np.clip(x[:m][ok] * np.where(np.isfinite(r), r, np.float32(0)), -1, 1)
        lo = levels[np.clip(np.searchsorted(levels, v, side="right") - 1, 0, levels.size - 2)]
        c = q.codes[ok].astype(np.int64)
        assert np.all((levels[c] == lo) | (levels[np.maximum(c - 1, 0)] == lo))


@given(data=st.data(), exponent=st.integers(-20, 20))
def test_codes_are_invariant_to_power_of_two_scaling(data, exponent):
    config = data.draw(S.configs())
    levels = data.draw(S.levels_for(config))
    x = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    u = np.random.default_rng(2).random(config.num_quantized(x.size), dtype=np.float32)
    a = quantize(x, levels, config, noise=u)
    b = quantize(x * np.float32(2.0**exponent), levels, config, noise=u)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(b.scales, a.scales * np.float32(2.0**exponent))


def test_reciprocal_multiplication_is_the_contract():
    # v = 0.1 * float32(1 / 0.3) is one ulp above 0.1 / 0.3; a level placed exactly at the product
    # gives code 2 (j = 2, p = 0); the quotient would give j = 1, p = 0.99999994 and code 1 for u below 1.
    s = np.float32(0.3)
    v = np.float32(0.1) * (np.float32(1) / s)
    assert v != np.float32(0.1) / s
    levels = np.array([-1.0, -0.5, v, 1.0], dtype=np.float32)
    config = QuantizerConfig("qsgd", bits=2, bucket_size=2, norm="linf")
    x = np.array([0.1, 0.3], dtype=np.float32)
    u = np.array([np.nextafter(np.float32(1), np.float32(0)), 0.0], dtype=np.float32)
    q = quantize(x, levels, config, noise=u)
    assert q.scales[0] == s
    assert q.codes.tolist() == [2, 3]
    codes, _, _ = reference_quantize(x, levels, config, u)
    assert codes.tolist() == [2, 3]


def test_tiny_scale_reciprocal_overflow_gives_zero_v():
    config = QuantizerConfig("qsgd", bits=2, bucket_size=2, norm="linf")
    levels = np.array([-1.0, -0.5, 0.5, 1.0], dtype=np.float32)
    x = np.array([1e-45, 0.0], dtype=np.float32)  # scale 1e-45: 1 / s overflows float32
    u = np.full(2, 0.5, np.float32)
    q = quantize(x, levels, config, noise=u)
    assert q.scales[0] == np.float32(1e-45)
    codes, _, _ = reference_quantize(x, levels, config, u)
    assert q.codes.tolist() == codes.tolist() == [1, 1]  # v = 0: between -0.5 and 0.5, p = 0.5, u = 0.5


def test_zero_buckets_decode_to_zero():
    config = QuantizerConfig("qsgd", bucket_size=4)
    x = np.array([0, 0, 0, 0, 1, 2, 3, 4, 0, 0], dtype=np.float32)
    q = quantize(x, uniform_levels(3), config, rng=np.random.default_rng(0))
    assert q.scales[0] == 0 and q.scales[2] == 0
    y = dequantize(q, uniform_levels(3))
    np.testing.assert_array_equal(y[[0, 1, 2, 3, 8, 9]], 0)


def test_tail_policies():
    x = np.arange(1, 11, dtype=np.float32)
    levels = uniform_levels(2)
    q = quantize(x, levels, QuantizerConfig("qsgd", bits=2, bucket_size=4, tail="full"), rng=np.random.default_rng(0))
    assert q.codes.size == 8 and q.scales.size == 2
    np.testing.assert_array_equal(q.tail, [9, 10])
    q = quantize(x, levels, QuantizerConfig("qsgd", bits=2, bucket_size=4), rng=np.random.default_rng(0))
    assert q.codes.size == 10 and q.scales.size == 3 and q.tail.size == 0
    np.testing.assert_allclose(q.scales[2], np.hypot(9, 10), rtol=1e-7)
    # n == d with tail="full": the one full bucket is quantized, nothing is dropped.
    q = quantize(x[:4], levels, QuantizerConfig("qsgd", bits=2, bucket_size=4, tail="full"), noise=np.zeros(4))
    assert q.codes.size == 4 and q.tail.size == 0 and q.scales[0] > 0


def test_clipping_recomputes_the_scale_from_clipped_values():
    x = np.array([100.0] + [1.0, -1.0] * 50, dtype=np.float32)
    config = QuantizerConfig("qsgdinf", bucket_size=x.size, clip=2.5)
    q = quantize(x, uniform_levels(3), config, rng=np.random.default_rng(0))
    t = np.float32(2.5 * x.astype(np.float64).std())
    assert q.scales[0] == t < 100


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_dtypes(dtype):
    x = np.random.default_rng(0).standard_normal(100).astype(dtype)
    config = QuantizerConfig("nuqsgd", bucket_size=32)
    u = np.random.default_rng(1).random(100, dtype=np.float32)
    q = quantize(x, exponential_levels(3, 0.5), config, noise=u)
    r = quantize(x.astype(np.float32), exponential_levels(3, 0.5), config, noise=u)
    assert_quantized_equal(q, r)
    assert q.scales.dtype == np.float32


def test_shape_is_kept():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    q = quantize(x, uniform_levels(3), QuantizerConfig("qsgd", bucket_size=8), rng=np.random.default_rng(0))
    assert dequantize(q, uniform_levels(3)).shape == (3, 5, 7)


def test_fp32_method_is_exact():
    x = np.random.default_rng(0).standard_normal(10).astype(np.float32)
    q = quantize(x, None, QuantizerConfig("fp32"))
    np.testing.assert_array_equal(dequantize(q, None), x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raise_names_the_bucket(bad):
    x = np.ones(20, dtype=np.float32)
    x[13] = bad
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 10\.\.19\) holds NaN or Inf.*nonfinite='propagate'"):
        quantize(x, uniform_levels(3), QuantizerConfig("qsgd", bucket_size=10), rng=np.random.default_rng(0))


def test_nonfinite_propagate_marks_the_bucket_and_decodes_to_nan():
    x = np.ones(30, dtype=np.float32)
    x[13] = np.inf
    config = QuantizerConfig("trn", bucket_size=10, nonfinite="propagate")
    q = quantize(x, default_levels(config), config, rng=np.random.default_rng(0))
    assert q.nonfinite_buckets == 1 and np.isnan(q.scales[1])
    assert np.all(q.codes[10:20] == 0)
    y = dequantize(q, default_levels(config))
    assert np.all(np.isnan(y[10:20])) and np.all(np.isfinite(y[:10])) and np.all(np.isfinite(y[20:]))


def test_noise_is_validated():
    x = np.ones(10, dtype=np.float32)
    c = QuantizerConfig("qsgd")
    with pytest.raises(ValueError, match=r"one uniform value per quantized coordinate \(10\); got 3"):
        quantize(x, uniform_levels(3), c, noise=np.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        quantize(x, uniform_levels(3), c, noise=np.ones(10))
    with pytest.raises(ValueError, match="either `noise` or `rng`"):
        quantize(x, uniform_levels(3), c, noise=np.zeros(10), rng=np.random.default_rng())
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        quantize(x, uniform_levels(3), c, rng=np.random.RandomState(0))  # type: ignore[arg-type]


def test_bad_inputs():
    c = QuantizerConfig("qsgd")
    with pytest.raises(TypeError, match="real floating-point array"):
        quantize(np.array(["a"]), uniform_levels(3), c)
    with pytest.raises(ValueError, match="expected 8 levels for this configuration; got 4"):
        quantize(np.ones(3), uniform_levels(2), c)
    with pytest.raises(ValueError, match="needs a level table"):
        quantize(np.ones(3), None, c)
    with pytest.raises(TypeError, match=r"QuantizerConfig"):
        quantize(np.ones(3), uniform_levels(3), "qsgd")  # type: ignore[arg-type]


def test_seeded_rng_is_reproducible():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    c = QuantizerConfig("qsgd", bucket_size=64)
    a = quantize(x, uniform_levels(3), c, rng=np.random.default_rng(5))
    b = quantize(x, uniform_levels(3), c, rng=np.random.default_rng(5))
    assert_quantized_equal(a, b)


def test_simulated_workers_average_independent_quantizations():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(50).astype(np.float32) for _ in range(4)]
    c = QuantizerConfig("qsgd", bucket_size=10)
    levels = uniform_levels(3)
    got = simulate_workers(grads, levels, c, rng=np.random.default_rng(7))
    gen = np.random.default_rng(7)
    expected = sum(dequantize(quantize(g, levels, c, rng=gen), levels) for g in grads) / np.float32(4)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    exact = simulate_workers(grads, None, QuantizerConfig("fp32"))
    np.testing.assert_allclose(exact, np.mean(grads, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        simulate_workers([np.ones(3), np.ones(4)], levels, c)
    with pytest.raises(ValueError, match="at least one worker"):
        simulate_workers([], levels, c)
