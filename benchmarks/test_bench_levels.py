"""Level updates: ALQ (3 starts x 30 sweeps) and AMQ on a 50-component mixture, 2/3/4/8 bits.

Targets (PERFORMANCE.md): ALQ 3 bits <= 20 ms, AMQ <= 5 ms on one CPU core. The slow
reference-style competitor in each ALQ group is the paper's finite-difference update
(``update="gd"``, 10 steps per level per sweep); in each AMQ group, the paper's gradient
descent (lr 0.7, 40 steps from 7 starts). Every benchmark checks its result.
"""

from __future__ import annotations

import numpy as np
import pytest
from alq_core import (
    TruncatedNormalMixture,
    alq_levels,
    amq_multiplier,
    expected_variance,
    exponential_levels,
    validate_levels,
)


def _mixture(k: int = 50, d: int = 16384) -> TruncatedNormalMixture:
    rng = np.random.default_rng(0)
    stds = rng.uniform(0.5, 3.0, k) / np.sqrt(d)
    return TruncatedNormalMixture(rng.uniform(0.5, 2.0, k), rng.normal(0, 1e-3, k), stds)


MODEL = _mixture()


def _nuq_var(bits: int) -> float:
    return float(expected_variance(exponential_levels(bits, 0.5).astype(np.float64), MODEL))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_alq_exact(benchmark, info, bits):
    benchmark.group = f"levels-alq-{bits}bit"
    rounds = 3 if bits == 8 else 20
    lv = benchmark.pedantic(alq_levels, args=(MODEL, bits), rounds=rounds, iterations=1, warmup_rounds=1)
    validate_levels(lv, num_levels=2**bits)
    assert expected_variance(lv, MODEL) <= _nuq_var(bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_alq_exact_sequential(benchmark, info, bits):
    benchmark.group = f"levels-alq-{bits}bit"
    lv = benchmark.pedantic(alq_levels, args=(MODEL, bits), kwargs={"order": "sequential"}, rounds=5, iterations=1)
    assert expected_variance(lv, MODEL) <= _nuq_var(bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_alq_reference_gd(benchmark, info, bits):
    benchmark.group = f"levels-alq-{bits}bit"
    lv = benchmark.pedantic(alq_levels, args=(MODEL, bits), kwargs={"update": "gd"}, rounds=1, iterations=1)
    exact = alq_levels(MODEL, bits)
    assert expected_variance(exact, MODEL) <= expected_variance(lv, MODEL) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_amq_bounded(benchmark, info, bits):
    benchmark.group = f"levels-amq-{bits}bit"
    p = benchmark.pedantic(amq_multiplier, args=(MODEL, bits), rounds=3 if bits == 8 else 20, iterations=1)
    assert 0 < p < 1
    assert expected_variance(exponential_levels(bits, p).astype(np.float64), MODEL) <= _nuq_var(bits) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_amq_reference_gd(benchmark, info, bits):
    benchmark.group = f"levels-amq-{bits}bit"
    p = benchmark.pedantic(amq_multiplier, args=(MODEL, bits), kwargs={"update": "gd"}, rounds=3, iterations=1)
    best = amq_multiplier(MODEL, bits, return_result=True)
    got = expected_variance(exponential_levels(bits, p).astype(np.float64), MODEL)
    assert best.variance <= got * (1 + 1e-9)
