import itertools

import numpy as np
import pytest
from alq_core import TruncatedNormal, expected_variance, exponential_levels, uniform_levels, variance_gradient
from alq_core.testing.strategies import models
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad


def _tables(rng, bits):
    inner = np.sort(rng.uniform(-1, 1, 2**bits - 2))
    return [
        np.concatenate([[-1.0], inner, [1.0]]),
        uniform_levels(bits).astype(np.float64),
        exponential_levels(bits, 0.3).astype(np.float64),
    ]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@given(models, st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3]))
@settings(max_examples=20)
def test_expected_variance_matches_quadrature(model, seed, bits):
    rng = np.random.default_rng(seed)
    for lv in _tables(rng, bits):
        want = 0.0
        for lo, hi in itertools.pairwise(lv):
            pts = sorted(
                {
                    p
                    for p in np.concatenate([model.means, model.means + model.stds, model.means - model.stds])
                    if lo < p < hi
                }
            )[:50]
            want += quad(
                lambda x, lo=lo, hi=hi: (x - lo) * (hi - x) * model.pdf(x),
                lo,
                hi,
                points=pts or None,
                epsabs=0,
                epsrel=1e-13,
                limit=1000,
            )[0]
        assert abs(expected_variance(lv, model) - want) <= 1e-8 * want + 1e-300


@given(models, st.integers(0, 2**32 - 1))
@settings(max_examples=10)
def test_expected_variance_matches_monte_carlo(model, seed):
    rng = np.random.default_rng(seed)
    lv = uniform_levels(3).astype(np.float64)
    x = model.sample(100_000, rng)
    j = np.clip(np.searchsorted(lv, x, side="right") - 1, 0, lv.size - 2)
    v = (x - lv[j]) * (lv[j + 1] - x)
    assert abs(v.mean() - expected_variance(lv, model)) <= 4 * v.std() / np.sqrt(v.size) + 1e-18


@given(models, st.integers(0, 2**32 - 1))
@settings(max_examples=15)
def test_gradient_matches_finite_differences(model, seed):
    rng = np.random.default_rng(seed)
    lv = np.concatenate([[-1.0], np.sort(rng.uniform(-0.9, 0.9, 6)), [1.0]])
    g = variance_gradient(lv, model)
    for i in range(1, 7):
        h = 1e-6 * min(lv[i] - lv[i - 1], lv[i + 1] - lv[i])
        up, dn = lv.copy(), lv.copy()
        up[i] += h
        dn[i] -= h
        fd = (expected_variance(up, model) - expected_variance(dn, model)) / (2 * h)
        noise = 100 * np.finfo(float).eps * expected_variance(lv, model) / h  # rounding in the difference
        assert abs(fd - g[i]) <= 1e-4 * abs(g[i]) + noise, (i, fd, g[i])


def test_batched_tables_and_validation():
    m = TruncatedNormal(0.0, 0.05)
    lvs = np.stack([uniform_levels(2), exponential_levels(2, 0.5)]).astype(np.float64)
    np.testing.assert_allclose(expected_variance(lvs, m), [expected_variance(t, m) for t in lvs])
    with pytest.raises(ValueError, match="non-decreasing"):
        expected_variance([-1.0, 0.5, 0.2, 1.0], m)
    with pytest.raises(ValueError, match="start at the model's low end"):
        expected_variance([-0.5, 1.0], m)
    with pytest.raises(TypeError, match="TruncatedNormal"):
        expected_variance([-1.0, 1.0], "normal")  # type: ignore[arg-type]


def test_two_level_variance_is_one_minus_second_moment():
    m = TruncatedNormal(0.1, 0.3)
    assert expected_variance([-1.0, 1.0], m) == pytest.approx(1.0 - float(m.partial_moments(-1, 1)[2]), rel=1e-13)
