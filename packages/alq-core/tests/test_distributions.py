import numpy as np
import pytest
from alq_core import TruncatedNormal, TruncatedNormalMixture
from alq_core.testing.strategies import mixtures, models, truncated_normals
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad


def _quad(fn, lo, hi, model):
    pts = [p for p in np.concatenate([model.means, model.means - model.stds, model.means + model.stds]) if lo < p < hi]
    pts = sorted(set(pts))[:50]
    return quad(fn, lo, hi, points=pts or None, epsabs=0.0, epsrel=1e-13, limit=1000)[0]


def _intervals(model, rng):
    """Intervals from the support, the body (a few std around means) and the near tail."""
    mu, sd = model.means[0], model.stds[0]
    cands = [(-1.0, 1.0), (mu - 2 * sd, mu + 0.5 * sd), (mu + 0.5 * sd, mu + 3 * sd), (mu - 4 * sd, mu - 1.5 * sd)]
    a, b = np.sort(rng.uniform(-1, 1, 2))
    cands.append((a, b))
    return [(max(lo, -1.0), min(hi, 1.0)) for lo, hi in cands if max(lo, -1.0) < min(hi, 1.0)]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@given(models, st.integers(0, 2**32 - 1))
@settings(max_examples=25)
def test_partial_moments_and_interval_variance_match_quadrature(model, seed):
    rng = np.random.default_rng(seed)
    for lo, hi in _intervals(model, rng):
        got = model.partial_moments(lo, hi)
        for k in range(3):
            want = _quad(lambda x, k=k: x**k * model.pdf(x), lo, hi, model)
            scale = _quad(lambda x, k=k: abs(x) ** k * model.pdf(x), lo, hi, model)
            assert abs(float(got[k]) - want) <= 1e-8 * scale + 1e-300, (k, lo, hi, float(got[k]), want)
        want = _quad(lambda x, lo=lo, hi=hi: (x - lo) * (hi - x) * model.pdf(x), lo, hi, model)
        # below 1e-200 of probability mass the quadrature itself is off by more than 1e-8 (seen: 1.5e-8 at 3e-221)
        assert abs(float(model.interval_variance(lo, hi)) - want) <= 1e-8 * want + 1e-200, (lo, hi)


@given(models, st.integers(0, 2**32 - 1))
@settings(max_examples=10)
def test_moments_match_monte_carlo_within_4_standard_errors(model, seed):
    rng = np.random.default_rng(seed)
    x = model.sample(200_000, rng)
    assert np.all((x >= -1) & (x <= 1))
    m0, m1, m2 = model.partial_moments(-1.0, 1.0)
    assert abs(float(m0) - 1.0) < 1e-12
    for k, m in ((1, m1), (2, m2)):
        v = x**k
        se = v.std() / np.sqrt(v.size)
        assert abs(v.mean() - float(m)) <= 4 * se + 1e-15, (k, v.mean(), float(m), se)


@given(models)
@settings(max_examples=20)
def test_cdf_ppf_roundtrip_and_monotone(model):
    q = np.linspace(0, 1, 33)
    x = model.ppf(q)
    assert np.all(np.diff(x) >= 0) and x[0] == -1 and x[-1] == 1
    np.testing.assert_allclose(model.cdf(x), q, atol=1e-10)
    xs = np.linspace(-1, 1, 101)
    assert np.all(np.diff(model.cdf(xs)) >= 0)


@given(truncated_normals())
@settings(max_examples=20)
def test_pdf_integrates_to_one_and_cdf_matches(model):
    assert abs(_quad(model.pdf, -1, 1, model) - 1.0) < 1e-9
    for x in (-0.5, model.mean, 0.3):
        x = min(max(x, -1.0), 1.0)
        assert abs(float(model.cdf(x)) - _quad(model.pdf, -1, x, model)) < 1e-9


def test_single_component_mixture_equals_truncated_normal():
    a = TruncatedNormal(0.01, 0.02)
    b = TruncatedNormalMixture([3.0], [0.01], [0.02])
    x = np.linspace(-1, 1, 17)
    np.testing.assert_allclose(a.pdf(x), b.pdf(x), rtol=1e-14)
    np.testing.assert_allclose(a.cdf(x), b.cdf(x), rtol=1e-14, atol=1e-16)


def test_peaked_tail_keeps_relative_precision():
    m = TruncatedNormal(0.0, 1e-3)
    m0 = float(m.partial_moments(0.02, 0.03)[0])  # 20..30 std out: ~ 2.75e-89
    want = _quad(m.pdf, 0.02, 0.03, m)
    assert want > 0 and abs(m0 - want) <= 1e-9 * want


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": 0.0, "std": 0.0}, "stds` must be positive"),
        ({"mean": np.nan, "std": 0.1}, "must be finite"),
        ({"mean": 0.0, "std": 0.1, "low": 1.0, "high": -1.0}, "`low` must be below `high`"),
        ({"mean": 1e6, "std": 1e-3}, "no representable mass"),
    ],
)
def test_truncated_normal_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TruncatedNormal(**kwargs)


def test_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="one length"):
        TruncatedNormalMixture([1, 2], [0], [0.1])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        TruncatedNormalMixture([0, 0], [0, 0], [0.1, 0.1])
    with pytest.raises(TypeError, match="must be a real number"):
        TruncatedNormal("0", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lo <= hi"):
        TruncatedNormal(0, 0.1).partial_moments(0.5, 0.1)
    with pytest.raises(ValueError, match="probabilities"):
        TruncatedNormal(0, 0.1).ppf(1.5)


@given(mixtures())
@settings(max_examples=5)
def test_strategy_models_are_valid(model):
    assert model.weights.sum() == pytest.approx(1.0)
    assert np.all(model.stds > 0)
