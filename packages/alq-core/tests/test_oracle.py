"""The level-table oracle: exact on small inputs, certified on large ones, never beaten."""

import itertools

import alq_core as alq
import numpy as np
import pytest
from alq_core.testing import strategies as S
from hypothesis import given, settings
from hypothesis import strategies as st


def heavy(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, n) * rng.standard_normal(n) ** 2).astype(np.float32)


def brute_force(g, cfg):
    v, _ = alq.normalized_coordinates(g, cfg)
    inner = np.unique(v[(v > -1) & (v < 1)])
    free = cfg.num_levels - 2
    return min(alq.empirical_variance(g, [-1, *c, 1], cfg) for c in itertools.combinations(inner, free))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["l2", "linf"]), st.sampled_from([2, 3]), st.sampled_from([3, 5, 16]))
def test_exact_on_small_inputs_by_brute_force(seed, norm, bits, d):
    g = heavy(14, seed)
    cfg = alq.QuantizerConfig("alq-e", bits=bits, bucket_size=d, norm=norm)
    res = alq.optimal_levels(g, cfg)
    if len(np.unique(alq.normalized_coordinates(g, cfg)[0])) <= cfg.num_levels:
        assert res.variance == 0
        return
    assert res.exact and res.gap == 0
    assert res.variance == pytest.approx(brute_force(g, cfg), rel=1e-9)
    assert alq.empirical_variance(g, res.levels, cfg) == pytest.approx(res.variance, rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(S.gradients(max_size=400), st.sampled_from([2, 3, 4]), st.sampled_from([8, 64]), st.sampled_from(["l2", "linf"]))
def test_the_oracle_beats_or_ties_every_method(g, bits, d, norm):
    cfg = alq.QuantizerConfig("alq-e", bits=bits, bucket_size=d, norm=norm)
    if not np.any(alq.normalized_coordinates(g, cfg)[0]):
        with pytest.raises(ValueError, match="no finite nonzero"):
            alq.optimal_levels(g, cfg)
        return
    res = alq.optimal_levels(g, cfg)
    assert res.exact  # at most 400 distinct values
    tables = [alq.uniform_levels(bits), alq.exponential_levels(bits, 0.5), alq.exponential_levels(bits, 0.2)]
    for method in ("alq", "amq", "alq-e", "alq-einf"):
        m_cfg = alq.QuantizerConfig(method, bits=bits, bucket_size=d, norm=norm)
        q = alq.AdaptiveQuantizer(m_cfg)
        q.update(alq.compute_stats(g, m_cfg), step=0)
        tables.append(q.levels)
    for table in tables:
        assert alq.empirical_variance(g, table, cfg) >= res.variance * (1 - 1e-9)


def test_large_inputs_are_certified_and_the_sketch_fit_is_close():
    g = heavy(200_000, seed=7)
    for norm in ("l2", "linf"):
        cfg = alq.QuantizerConfig("alq-e", bits=3, bucket_size=1024, norm=norm)
        res = alq.optimal_levels(g, cfg, grid=512)
        assert not res.exact
        assert 0 < res.lower_bound <= res.variance and res.gap < 0.5
        assert alq.empirical_variance(g, res.levels, cfg) == pytest.approx(res.variance, rel=1e-9)
        q = alq.AdaptiveQuantizer(cfg)
        q.update(alq.compute_stats(g, cfg), step=0)
        fitted = alq.empirical_variance(g, q.levels, cfg)
        assert res.lower_bound <= fitted <= 1.02 * res.variance


def test_subsampled_search_finds_the_exact_optimum():
    g = heavy(3000, seed=11)
    cfg = alq.QuantizerConfig("alq-einf", bits=3, bucket_size=512)
    exact = alq.optimal_levels(g, cfg, grid=4096)
    coarse = alq.optimal_levels(g, cfg, grid=256)
    assert exact.exact and not coarse.exact
    assert coarse.variance == pytest.approx(exact.variance, rel=1e-6)
    assert coarse.lower_bound <= exact.variance


def test_bad_input():
    cfg = alq.QuantizerConfig("alq-e", bits=3, bucket_size=64)
    for g in (np.zeros(0, np.float32), np.zeros(100, np.float32)):
        with pytest.raises(ValueError, match="no finite nonzero"):
            alq.optimal_levels(g, cfg)
    with pytest.raises(ValueError, match="`grid` must be an integer >= 16"):
        alq.optimal_levels(heavy(100), cfg, grid=4)
    with pytest.raises(ValueError, match="quantized method"):
        alq.optimal_levels(heavy(100), alq.QuantizerConfig("fp32"))
    res = alq.optimal_levels(np.array([1.0, -1.0, 0.0, 1.0], np.float32), cfg)
    assert res.variance == 0 and res.levels.size == 8
    alq.validate_levels(res.levels, num_levels=8)
