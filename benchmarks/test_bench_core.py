"""alq-core quantize and pack: vectorized NumPy against the loop reference.

Target (PERFORMANCE.md): vectorized NumPy quantize >= 50 M elements/s on one
core at 3 bits. Each group times one operation; the reference competes on a
size it can finish; every benchmark checks its result.
"""

from __future__ import annotations

import numpy as np
import pytest
from alq_core import QuantizerConfig, default_levels, pack_codes, quantize, unpack_codes
from alq_core.testing import reference_pack, reference_quantize

SMALL = 1 << 14
LARGE = 1 << 22


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal(n).astype(np.float32), rng.random(n, dtype=np.float32)


@pytest.mark.benchmark(group="core-quantize-16k")
def test_quantize_reference_loop(benchmark, info):
    config = QuantizerConfig("nuqsgd", bits=3, bucket_size=8192)
    levels = default_levels(config)
    x, u = _data(SMALL)
    codes, _, _ = benchmark.pedantic(reference_quantize, args=(x, levels, config, u), rounds=1, iterations=1)
    np.testing.assert_array_equal(codes, quantize(x, levels, config, noise=u).codes)


@pytest.mark.benchmark(group="core-quantize-16k")
def test_quantize_numpy_small(benchmark, info):
    config = QuantizerConfig("nuqsgd", bits=3, bucket_size=8192)
    levels = default_levels(config)
    x, u = _data(SMALL)
    q = benchmark(quantize, x, levels, config, noise=u)
    assert q.codes.size == SMALL and q.codes.max() < 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.benchmark(group="core-quantize-4M")
def test_quantize_numpy(benchmark, info, bits):
    config = QuantizerConfig("alq", bits=bits, bucket_size=8192)
    levels = default_levels(config)
    x, u = _data(LARGE)
    q = benchmark.pedantic(quantize, args=(x, levels, config), kwargs={"noise": u}, rounds=5, iterations=1)
    assert q.codes.size == LARGE and int(q.codes.max()) < 2**bits
    info["elements_per_s"] = LARGE / benchmark.stats.stats.median
    info["target_elements_per_s"] = 50e6


@pytest.mark.benchmark(group="core-pack-16k")
def test_pack_reference_loop(benchmark, info):
    codes = np.random.default_rng(0).integers(0, 8, SMALL).astype(np.uint8)
    packed = benchmark.pedantic(reference_pack, args=(codes, 3), rounds=1, iterations=1)
    assert packed == pack_codes(codes, 3).tobytes()


@pytest.mark.benchmark(group="core-pack-16k")
def test_pack_numpy_small(benchmark, info):
    codes = np.random.default_rng(0).integers(0, 8, SMALL).astype(np.uint8)
    packed = benchmark(pack_codes, codes, 3)
    np.testing.assert_array_equal(unpack_codes(packed, 3, SMALL), codes)


@pytest.mark.benchmark(group="core-pack-4M")
def test_pack_numpy(benchmark, info):
    codes = np.random.default_rng(0).integers(0, 8, LARGE).astype(np.uint8)
    packed = benchmark.pedantic(pack_codes, args=(codes, 3), rounds=5, iterations=1)
    np.testing.assert_array_equal(unpack_codes(packed, 3, LARGE), codes)
    info["elements_per_s"] = LARGE / benchmark.stats.stats.median
