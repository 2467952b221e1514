"""The level sketch and the empirical-distribution methods alq-e / alq-einf."""

import itertools

import alq_core as alq
import numpy as np
import pytest
from alq_core._sketch import EDGES, NUM_BINS, sketch_bins
from alq_core.testing import strategies as S
from hypothesis import given, settings
from hypothesis import strategies as st

EMPIRICAL = ["alq-e", "alq-einf"]


def heavy(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, n) * rng.standard_normal(n) ** 2).astype(np.float32)


@given(S.gradients(), st.sampled_from([1, 7, 64]), st.sampled_from(["l2", "linf"]))
def test_every_coordinate_lies_in_its_bin(g, d, norm):
    v, _ = alq.normalized_coordinates(g, alq.QuantizerConfig("alq-e", bucket_size=d, norm=norm))
    b = sketch_bins(v)
    assert b.min(initial=0) >= 0 and b.max(initial=0) < NUM_BINS
    assert np.all(EDGES[b] <= v) and np.all(v <= EDGES[b + 1])


def test_grid_is_float32_exact_dense_near_zero_and_symmetric():
    assert EDGES.size == NUM_BINS + 1 and EDGES[0] == -1 and EDGES[-1] == 1
    assert np.array_equal(EDGES.astype(np.float32).astype(np.float64), EDGES)
    assert np.array_equal(EDGES, -EDGES[::-1])
    pos = EDGES[EDGES > 2.0**-20]
    assert np.max(pos[1:] / pos[:-1]) <= 1 + 1 / 32 + 1e-12


def test_bins_at_edges_and_signed_zero():
    v = np.array([0.0, -0.0, 1.0, -1.0, 2.0**-21, -(2.0**-21), 0.5, -0.5], dtype=np.float32)
    b = sketch_bins(v)
    half = NUM_BINS // 2
    assert b[0] == b[1] == half and b[2] == NUM_BINS - 1 and b[3] == 0
    assert b[4] == half and b[5] == half - 1
    assert EDGES[b[6]] == 0.5 and EDGES[b[7] + 1] == -0.5


def test_compute_stats_follows_the_config():
    g = heavy(5000)
    for method in EMPIRICAL:
        cfg = alq.QuantizerConfig(method, bucket_size=256)
        sk = alq.compute_stats(g, cfg)
        assert isinstance(sk, alq.LevelSketch) and sk.key == (cfg.norm, 256) and sk.count == 5000
        v, s = alq.normalized_coordinates(g, cfg)
        w = np.repeat(s.astype(np.float64) ** 2, 256)[: v.size]
        np.testing.assert_allclose(sk.sums[0].sum(), w.sum(), rtol=1e-12)
        np.testing.assert_allclose(sk.sums[2].sum(), np.dot(w, v.astype(np.float64) ** 2), rtol=1e-12)
    stats = alq.compute_stats(g, alq.QuantizerConfig("alq", bucket_size=256))
    assert isinstance(stats, alq.GradientStats) and stats.num_buckets == 5000 // 256


@settings(max_examples=30)
@given(S.gradients(max_size=600), S.gradients(max_size=600), st.sampled_from(EMPIRICAL), st.integers(1, 80))
def test_merged_sketches_equal_the_sketch_of_the_parts_together(a, b, method, d):
    cfg = alq.QuantizerConfig(method, bucket_size=d)
    merged = alq.merge_stats([alq.compute_stats(a, cfg), alq.compute_stats(b, cfg)])
    joint = alq.compute_stats([a, b], cfg)
    np.testing.assert_allclose(merged.sums, joint.sums, rtol=1e-12, atol=0)
    assert (merged.count, merged.skipped) == (joint.count, joint.skipped) == (a.size + b.size, 0)
    if d == 1 or a.size % d == 0:  # same buckets when the first part ends on a boundary
        np.testing.assert_allclose(alq.compute_stats(np.concatenate([a, b]), cfg).sums, joint.sums, rtol=1e-12)


def test_merge_refuses_sketches_of_different_configurations():
    a = alq.compute_stats(heavy(100), alq.QuantizerConfig("alq-e", bucket_size=10))
    b = alq.compute_stats(heavy(100), alq.QuantizerConfig("alq-einf", bucket_size=10))
    with pytest.raises(ValueError, match="share norm and bucket size"):
        alq.merge_stats([a, b])
    with pytest.raises(TypeError, match="GradientStats, or of LevelSketch"):
        alq.merge_stats([a, alq.compute_stats(heavy(100), 10)])


def test_fit_is_the_grid_optimum_by_brute_force():
    # a sketch with mass on a handful of bins: every table on the active edges can be enumerated
    rng = np.random.default_rng(3)
    sums = np.zeros((3, NUM_BINS))
    for b in rng.choice(NUM_BINS, 9, replace=False):
        v = rng.uniform(EDGES[b], EDGES[b + 1], 5)
        w = rng.uniform(0.5, 2.0, 5)
        sums[:, b] += [w.sum(), (w * v).sum(), (w * v * v).sum()]
    sk = alq.LevelSketch(sums, "linf", 64)
    busy = np.flatnonzero(sums[0] > 0)
    edges = np.unique(np.concatenate([EDGES[busy], EDGES[busy + 1]]))
    edges = edges[(edges > -1) & (edges < 1)]
    best = min(alq.sketch_variance(sk, [-1, *c, 1]) for c in itertools.combinations(edges, 2))
    levels, var = alq.fit_sketch(sk, 4)
    assert var == pytest.approx(best, rel=1e-9)
    assert alq.sketch_variance(sk, levels) == pytest.approx(var, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(S.gradients(max_size=3000), st.sampled_from(EMPIRICAL), st.integers(2, 4), st.sampled_from([16, 128, 1000]))
def test_update_never_increases_the_variance(g, method, bits, d):
    cfg = alq.QuantizerConfig(method, bits=bits, bucket_size=d)
    q = alq.AdaptiveQuantizer(cfg)
    sk = alq.compute_stats(g, cfg)
    for step in range(2):
        before, version = alq.sketch_variance(sk, q.levels), q.version
        report = q.update(sk, step=step)
        after = alq.sketch_variance(sk, q.levels)
        if np.isfinite(before):
            assert after <= before * (1 + 1e-12) + 1e-300
        assert q.version == version + int(report.updated)
        alq.validate_levels(q.levels, num_levels=cfg.num_levels)


@pytest.mark.parametrize(
    ("g", "why"),
    [
        (np.zeros(0, np.float32), "no finite, nonzero"),
        (np.zeros(4096, np.float32), "no finite, nonzero"),
        (np.full(4096, np.nan, np.float32), "no finite, nonzero"),
        (np.full(4096, np.inf, np.float32), "no finite, nonzero"),
    ],
)
def test_bad_gradients_keep_the_old_table_with_a_reason(g, why):
    for method in EMPIRICAL:
        cfg = alq.QuantizerConfig(method, bits=3, bucket_size=512, nonfinite="propagate")
        q = alq.AdaptiveQuantizer(cfg)
        old = q.levels.copy()
        report = q.update(alq.compute_stats(g, cfg), step=0)
        assert not report.updated and why in report.reason and report.version == 0
        assert np.array_equal(q.levels, old)


@pytest.mark.parametrize(
    ("g", "fits"),
    [
        (np.full(4096, 0.25, np.float32), True),  # constant: v = ±1 or 1/sqrt(d), any table is exact-ish
        (heavy(4096) * np.float32(1e-36), True),  # tiny but normalizable
        (np.full(4096, 1e-40, np.float32), False),  # denormal: 1/s overflows, the quantizer sends zeros
    ],
)
def test_constant_and_tiny_gradients(g, fits):
    for method in EMPIRICAL:
        cfg = alq.QuantizerConfig(method, bits=3, bucket_size=512)
        q = alq.AdaptiveQuantizer(cfg)
        report = q.update(alq.compute_stats(g, cfg), step=0)
        alq.validate_levels(q.levels, num_levels=8)
        if fits:
            assert report.reason in ("updated", "optimum unchanged")
        else:
            assert not report.updated and "no finite, nonzero" in report.reason


def test_wrong_statistics_keep_the_old_table_with_a_reason():
    g = heavy(4096)
    q = alq.AdaptiveQuantizer(alq.QuantizerConfig("alq-einf", bits=3, bucket_size=512))
    for stats, why in [
        (alq.compute_stats(g, 512), "needs a LevelSketch"),
        (alq.compute_stats(g, alq.QuantizerConfig("alq-e", bucket_size=512)), "another configuration"),
        (alq.compute_stats(g, alq.QuantizerConfig("alq-einf", bucket_size=256)), "another configuration"),
        (None, "needs a LevelSketch"),
    ]:
        report = q.update(stats, step=0)
        assert not report.updated and why in report.reason
    paper = alq.AdaptiveQuantizer(alq.QuantizerConfig("alq", bits=3, bucket_size=512))
    report = paper.update(alq.compute_stats(g, alq.QuantizerConfig("alq-e", bucket_size=512)), step=0)
    assert not report.updated and "needs GradientStats" in report.reason


def test_start_tables_and_state_round_trip():
    assert np.array_equal(alq.AdaptiveQuantizer(alq.QuantizerConfig("alq-einf")).levels, alq.uniform_levels(3))
    assert np.array_equal(alq.AdaptiveQuantizer(alq.QuantizerConfig("alq-e")).levels, alq.exponential_levels(3, 0.5))
    cfg = alq.QuantizerConfig("alq-einf", bits=3, bucket_size=512)
    q = alq.AdaptiveQuantizer(cfg)
    q.update(alq.compute_stats(heavy(8192), cfg), step=0)
    twin = alq.AdaptiveQuantizer(cfg)
    twin.load_state_dict(q.state_dict())
    assert np.array_equal(twin.levels, q.levels) and twin.version == q.version == 1
    assert np.array_equal(twin.last_stats.sums, q.last_stats.sums)
    # resumed, both continue identically
    sk = alq.compute_stats(heavy(8192, seed=5), cfg)
    q.update(sk, 100)
    twin.update(sk, 100)
    assert np.array_equal(q.levels, twin.levels) and q.version == twin.version


def test_sketch_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(3, 1282\)"):
        alq.LevelSketch(np.zeros((3, 10)), "l2", 8)
    with pytest.raises(ValueError, match="'l2' or 'linf'"):
        alq.LevelSketch(np.zeros((3, NUM_BINS)), "l1", 8)
