import numpy as np
import pytest
from alq_core import (
    DegenerateStatsError,
    GradientStats,
    TruncatedNormal,
    TruncatedNormalMixture,
    compute_stats,
    merge_stats,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _loop_stats(x, d):
    out = []
    for i in range(x.size // d):
        b = x[i * d : (i + 1) * d].astype(np.float64)
        n = np.sqrt(np.sum(b * b))
        if n > 0:
            w = b / n
            out.append((n, w.mean(), w.std()))
    return np.array(out).reshape(-1, 3)


@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 7, 64]), st.integers(0, 700))
@settings(max_examples=30)
def test_per_bucket_stats_match_a_loop(seed, d, n):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.choice([1e-20, 1.0, 1e20])).astype(np.float32)
    x[rng.random(n) < 0.1] = 0
    if n >= d:
        x[:d] = 0  # a zero bucket is skipped
    s = compute_stats(x, d)
    want = _loop_stats(x, d)
    np.testing.assert_allclose(s.norms, want[:, 0], rtol=1e-12)
    np.testing.assert_allclose(s.means, want[:, 1], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s.stds, want[:, 2], rtol=1e-10, atol=1e-15)
    assert np.all(s.sizes == d)


def test_merge_of_parts_equals_stats_of_the_whole():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(1000) * (i + 1) for i in range(3)]
    whole = compute_stats(parts, 64, dist_num=5)
    merged = merge_stats([compute_stats(p, 64, dist_num=5) for p in parts])
    for f in ("norms", "means", "stds", "sizes"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(merged, f))
    assert whole.skipped == merged.skipped == 3
    assert whole.pooled() == merged.pooled()
    a, b = whole.norm_based_model(), merged.norm_based_model()
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.means, b.means)


def test_pooled_stats_are_within_bucket():
    # Two buckets with different means: pooled std must not include the between-bucket spread.
    s = GradientStats.from_buckets([1.0, 2.0], [0.1, -0.1], [0.2, 0.4], [10, 30])
    mean, std = s.pooled()
    assert mean == pytest.approx((10 * 0.1 - 30 * 0.1) / 40)
    assert std == pytest.approx(np.sqrt((10 * 0.04 + 30 * 0.16) / 40))
    assert isinstance(s.norm_less_model(), TruncatedNormal)


def test_top_dist_num_by_norm_with_stable_ties_and_weights():
    s = GradientStats.from_buckets([1.0, 3.0, 3.0, 2.0], [0, 0.1, 0.2, 0.3], [0.1] * 4, [8] * 4, dist_num=3)
    np.testing.assert_array_equal(s.top_buckets(), [1, 2, 3])
    m = s.norm_based_model()
    assert isinstance(m, TruncatedNormalMixture)
    np.testing.assert_allclose(m.weights, np.array([3, 3, 2]) / 8)
    np.testing.assert_allclose(m.means, [0.1, 0.2, 0.3])
    s2 = GradientStats.from_buckets([1.0, 3.0, 3.0, 2.0], [0] * 4, [0.1] * 4, [8] * 4, dist_num=3, weights="norm2")
    np.testing.assert_allclose(s2.norm_based_model().weights, np.array([9, 9, 4]) / 22)


def test_unusable_buckets_are_skipped():
    s = GradientStats.from_buckets([0.0, np.nan, 1.0, 1.0, np.inf], [0, 0, 0, 0, 0], [0.1] * 5, [8, 8, 1, 8, 8])
    assert s.num_buckets == 1 and s.skipped == 4
    assert compute_stats(np.ones(10), 1).num_buckets == 0
    huge = compute_stats(np.full(16, 1e300), 8)
    assert np.all(np.isfinite(huge.norms)) and huge.num_buckets == 2


def test_degenerate_models_raise_degenerate_stats_error():
    empty = compute_stats(np.zeros(100), 10)
    with pytest.raises(DegenerateStatsError, match="no usable bucket"):
        empty.norm_less_model()
    with pytest.raises(DegenerateStatsError, match="no usable bucket"):
        empty.norm_based_model()
    flat = compute_stats(np.ones(100), 10)  # every bucket constant: std 0
    with pytest.raises(DegenerateStatsError, match="spread"):
        flat.norm_less_model()
    with pytest.raises(DegenerateStatsError, match="zero spread"):
        flat.norm_based_model()


def test_bad_options_and_dict_roundtrip():
    with pytest.raises(ValueError, match="`dist_num` must be a positive integer"):
        compute_stats(np.ones(4), 2, dist_num=0)
    with pytest.raises(ValueError, match="`weights` must be"):
        compute_stats(np.ones(4), 2, weights="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share dist_num"):
        merge_stats([compute_stats(np.ones(4), 2), compute_stats(np.ones(4), 2, dist_num=3)])
    s = compute_stats(np.random.default_rng(0).standard_normal(300), 32)
    t = GradientStats.from_dict(s.to_dict())
    for f in ("norms", "means", "stds", "sizes"):
        np.testing.assert_array_equal(getattr(s, f), getattr(t, f))
    assert t.skipped == s.skipped
