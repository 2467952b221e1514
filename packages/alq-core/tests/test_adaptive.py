import numpy as np
import pytest
from alq_core import (
    AdaptiveQuantizer,
    GradientStats,
    QuantizerConfig,
    UpdateSchedule,
    compute_stats,
    default_levels,
)


def _stats(seed=0, d=1024, buckets=20, dist_num=50):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d * buckets) * np.repeat(rng.uniform(0.1, 3, buckets), d)
    return compute_stats(x, d, dist_num=dist_num)


def test_default_schedule():
    q = AdaptiveQuantizer(QuantizerConfig("alq"))
    due = [s for s in range(0, 50_001) if q.due(s)]
    assert due == [0, 100, 2000, 10_000, 20_000, 30_000, 40_000, 50_000]
    assert AdaptiveQuantizer(QuantizerConfig("alq"), schedule=[5, 7]).due(7)
    assert not AdaptiveQuantizer(QuantizerConfig("alq"), schedule=[5, 7]).due(10_000)
    assert UpdateSchedule(every=50_000).due(100_000)


@pytest.mark.parametrize("method", ["alq", "alq-n", "amq", "amq-n"])
def test_adaptive_methods_update_and_version(method):
    q = AdaptiveQuantizer(QuantizerConfig(method, bits=3, bucket_size=1024))
    start = q.levels.copy()
    r = q.update(_stats(), step=0)
    assert r.updated and r.reason == "updated" and q.version == 1 == r.version
    assert q.levels.dtype == np.float32 and q.levels.shape == (8,)
    assert not np.array_equal(q.levels, start)
    assert r.variance_after <= r.variance_before
    if method.startswith("amq"):
        assert 0 < q.multiplier < 0.5
    r2 = q.update(_stats(), step=100)  # same stats: same optimum, no new version
    assert not r2.updated and q.version == 1
    q.update(_stats(seed=3), step=2000)
    assert q.version == 2 and q.last_report.step == 2000


@pytest.mark.parametrize("method", ["fp32", "qsgd", "qsgdinf", "nuqsgd", "trn"])
def test_fixed_methods_never_change(method):
    cfg = QuantizerConfig(method)
    q = AdaptiveQuantizer(cfg)
    assert not q.due(0)
    r = q.update(_stats(), 0)
    assert not r.updated and "fixed levels" in r.reason and q.version == 0
    if method == "fp32":
        assert q.levels is None
    else:
        np.testing.assert_array_equal(q.levels, default_levels(cfg))


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        (None, "no statistics"),
        (compute_stats(np.zeros(4096), 1024), "no usable bucket"),
        (compute_stats(np.ones(4096), 1024), "spread"),
        (compute_stats(np.full(4096, np.nan), 1024), "no usable bucket"),
        (GradientStats.from_buckets([], [], [], []), "no usable bucket"),
        (GradientStats.from_buckets([1e308], [0.0], [0.03], [1024]), "updated"),  # one bucket, huge norm
        (GradientStats.from_buckets([1.0], [np.inf], [0.03], [1024]), "no usable bucket"),
    ],
)
@pytest.mark.parametrize("method", ["alq", "alq-n", "amq", "amq-n"])
def test_degenerate_stats_never_raise_and_keep_the_table(method, stats, reason):
    q = AdaptiveQuantizer(QuantizerConfig(method, bits=3, bucket_size=1024))
    before, version = q.levels.copy(), q.version
    r = q.update(stats, step=0)
    assert reason in r.reason
    if reason != "updated":
        assert not r.updated and q.version == version
        np.testing.assert_array_equal(q.levels, before)


def test_state_dict_round_trip_continues_bit_identically():
    for method in ("alq", "amq-n"):
        cfg = QuantizerConfig(method, bits=3, bucket_size=1024)
        a = AdaptiveQuantizer(cfg, update="gd" if method == "amq-n" else "exact")
        a.update(_stats(1), 0)
        state = a.state_dict()
        import json

        state = json.loads(json.dumps(state))  # plain data
        b = AdaptiveQuantizer(cfg)
        b.load_state_dict(state)
        np.testing.assert_array_equal(a.levels, b.levels)
        assert (a.version, a.multiplier, a.step) == (b.version, b.multiplier, b.step)
        assert a.last_report == b.last_report
        for seed in (2, 3):
            ra, rb = a.update(_stats(seed), 100), b.update(_stats(seed), 100)
            np.testing.assert_array_equal(a.levels, b.levels)
            assert (a.version, a.multiplier) == (b.version, b.multiplier)
            assert ra.variance_after == rb.variance_after


def test_load_state_dict_rejects_other_methods_and_bad_arguments():
    a = AdaptiveQuantizer(QuantizerConfig("alq", bits=3))
    with pytest.raises(ValueError, match="state is for method 'alq' at 3 bits"):
        AdaptiveQuantizer(QuantizerConfig("amq", bits=3)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="expected a state dict"):
        a.load_state_dict({})
    with pytest.raises(TypeError, match="QuantizerConfig"):
        AdaptiveQuantizer("alq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`update` must be"):
        AdaptiveQuantizer(QuantizerConfig("alq"), update="adam")
    with pytest.raises(ValueError, match="`every` must be"):
        UpdateSchedule(every=-1)
