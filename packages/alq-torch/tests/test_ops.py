"""alq_torch quantize / dequantize / bucket_stats on CPU tensors against alq_core, code for code."""

from __future__ import annotations

import subprocess
import sys

import alq_core
import alq_torch
import numpy as np
import pytest
import torch
from alq_core import QuantizerConfig, default_levels
from alq_core.testing import assert_quantized_equal
from alq_core.testing.strategies import configs, gradients, levels_for, noise_for
from alq_torch import bucket_stats, dequantize, quantize
from hypothesis import given
from hypothesis import strategies as st


def _case(config: QuantizerConfig, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray | None, np.ndarray]:
    levels = default_levels(config) if config.quantized else None
    u = np.random.default_rng(seed).random(config.num_quantized(x.size), dtype=np.float32)
    return levels, u


@given(data=st.data(), config=configs(), x=gradients())
def test_quantize_matches_core(data: st.DataObject, config: QuantizerConfig, x: np.ndarray) -> None:
    levels = data.draw(levels_for(config))
    u = data.draw(noise_for(config.num_quantized(x.size)))
    expected = alq_core.quantize(x, levels, config, noise=u)
    actual = quantize(torch.from_numpy(x), torch.from_numpy(levels), config, noise=torch.from_numpy(u))
    assert_quantized_equal(actual, expected)
    np.testing.assert_array_equal(dequantize(actual, levels).numpy(), alq_core.dequantize(expected, levels))


@pytest.mark.parametrize("method", ["qsgd", "qsgdinf", "nuqsgd", "trn", "alq", "amq-n"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("tail", ["quantize", "full"])
def test_methods_bits_tails(method: str, bits: int, tail: str) -> None:
    config = QuantizerConfig(method, bits=bits, bucket_size=96, tail=tail)
    x = np.random.default_rng(bits).standard_normal(1001).astype(np.float32) * np.float32(1e-3)
    levels, u = _case(config, x)
    q = quantize(torch.from_numpy(x).reshape(7, 11, 13), levels, config, noise=u)
    assert q.shape == (7, 11, 13)
    assert_quantized_equal(q, alq_core.quantize(x, levels, config, noise=u))
    assert dequantize(q, levels).shape == (7, 11, 13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64)
    x = torch.randn(517, generator=torch.Generator().manual_seed(1)).to(dtype)
    levels, u = _case(config, np.zeros(517, np.float32))
    expected = alq_core.quantize(x.to(torch.float32).numpy(), levels, config, noise=u)
    assert_quantized_equal(quantize(x, levels, config, noise=u), expected)


def test_clipping_recomputes_the_scale() -> None:
    config = QuantizerConfig("qsgd", bits=2, bucket_size=50, clip=1.0)
    x = np.random.default_rng(3).standard_t(2, 333).astype(np.float32)
    levels, u = _case(config, x)
    q = quantize(torch.from_numpy(x), levels, config, noise=u)
    assert_quantized_equal(q, alq_core.quantize(x, levels, config, noise=u))
    unclipped = alq_core.quantize(x, levels, QuantizerConfig("qsgd", bits=2, bucket_size=50, clip=None), noise=u)
    assert np.all(q.scales.numpy() <= unclipped.scales) and np.any(q.scales.numpy() < unclipped.scales)


def test_zero_bucket_and_all_zero_input() -> None:
    config = QuantizerConfig("qsgd", bits=3, bucket_size=10)
    x = np.zeros(35, np.float32)
    x[20:30] = np.arange(10, dtype=np.float32)
    levels, u = _case(config, x)
    q = quantize(torch.from_numpy(x), levels, config, noise=u)
    assert_quantized_equal(q, alq_core.quantize(x, levels, config, noise=u))
    assert q.scales[0].item() == 0.0
    assert torch.all(dequantize(q, levels)[:20] == 0)


def test_nonfinite_raise_and_propagate() -> None:
    x = np.ones(40, np.float32)
    x[13] = np.nan
    x[35] = np.inf
    config = QuantizerConfig("nuqsgd", bits=3, bucket_size=10)
    levels, u = _case(config, x)
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 10\.\.19\) holds NaN or Inf \(2 such buckets\)"):
        quantize(torch.from_numpy(x), levels, config, noise=u)
    prop = QuantizerConfig("nuqsgd", bits=3, bucket_size=10, nonfinite="propagate")
    q = quantize(torch.from_numpy(x), levels, prop, noise=u)
    assert_quantized_equal(q, alq_core.quantize(x, levels, prop, noise=u))
    assert q.nonfinite_buckets == 2
    assert torch.all(q.codes[10:20] == 0) and torch.all(q.codes[30:40] == 0)
    out = dequantize(q, levels)
    assert torch.isnan(out[10:20]).all() and torch.isfinite(out[:10]).all()


def test_fp32_method_is_exact() -> None:
    config = QuantizerConfig("fp32")
    x = torch.randn(3, 5, dtype=torch.float64)
    q = quantize(x, None, config)
    assert q.codes.numel() == 0 and q.scales.numel() == 0
    assert torch.equal(dequantize(q, None), x.to(torch.float32))


def test_generator_is_deterministic() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64)
    x = torch.randn(1000)
    levels = default_levels(config)
    a = quantize(x, levels, config, generator=torch.Generator().manual_seed(5))
    b = quantize(x, levels, config, generator=torch.Generator().manual_seed(5))
    c = quantize(x, levels, config, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)


def test_unbiased_over_a_noise_grid() -> None:
    """Averaging the dequantized value over a uniform noise grid gives back x (exact property)."""
    config = QuantizerConfig("nuqsgd", bits=3, bucket_size=16)
    x = torch.randn(16, generator=torch.Generator().manual_seed(2))
    levels = default_levels(config)
    grid = (np.arange(4096, dtype=np.float64) + 0.5) / 4096
    total = torch.zeros(16, dtype=torch.float64)
    for g in grid:
        q = quantize(x, levels, config, noise=torch.full((16,), float(g)))
        total += dequantize(q, levels).double()
    torch.testing.assert_close(total / grid.size, x.double(), rtol=0, atol=2e-3 * float(x.norm()))


def test_input_validation_messages() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=8)
    levels = default_levels(config)
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor; got ndarray"):
        quantize(np.zeros(8, np.float32), levels, config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be float16, bfloat16, float32 or float64; got torch\.int32"):
        quantize(torch.zeros(8, dtype=torch.int32), levels, config)
    with pytest.raises(TypeError, match=r"`config` must be an alq_core\.QuantizerConfig; got dict"):
        quantize(torch.zeros(8), levels, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`noise` must hold one uniform value per quantized coordinate \(8\); got 7"):
        quantize(torch.zeros(8), levels, config, noise=torch.zeros(7))
    with pytest.raises(ValueError, match=r"`noise` values must lie in \[0, 1\)"):
        quantize(torch.zeros(8), levels, config, noise=torch.ones(8))
    with pytest.raises(ValueError, match="pass either `noise` or `generator`, not both"):
        quantize(torch.zeros(8), levels, config, noise=torch.zeros(8), generator=torch.Generator())
    with pytest.raises(ValueError, match="expected 8 levels for this configuration; got 4"):
        quantize(torch.zeros(8), default_levels(QuantizerConfig("alq", bits=2)), config)
    with pytest.raises(ValueError, match="method 'alq' needs a level table; got None"):
        quantize(torch.zeros(8), None, config)


def _stats_reference(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = x.size // d
    rows = x[: k * d].reshape(k, d).astype(np.float64)
    norms = np.sqrt((rows**2).sum(axis=1))
    w = rows / np.where(norms == 0, 1.0, norms)[:, None]
    return norms, w.mean(axis=1), w.std(axis=1)


def test_bucket_stats_match_float64_reference() -> None:
    x = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    x[100:200] = 0
    norms, means, stds, sizes = bucket_stats(torch.from_numpy(x), 100)
    rn, rm, rs = _stats_reference(x, 100)
    assert norms.dtype == means.dtype == stds.dtype == torch.float64 and sizes.dtype == torch.int64
    np.testing.assert_allclose(norms.numpy(), rn, rtol=1e-13)
    np.testing.assert_allclose(means.numpy(), rm, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(stds.numpy(), rs, rtol=1e-10)
    assert norms[1].item() == 0 and means[1].item() == 0 and stds[1].item() == 0
    assert sizes.tolist() == [100] * 10
    n2, *_ = bucket_stats(torch.from_numpy(x[:950]).to(torch.bfloat16), 100)
    assert n2.shape == (9,)
    with pytest.raises(ValueError, match="`bucket_size` must be a positive integer; got 0"):
        bucket_stats(torch.zeros(4), 0)


def test_public_api() -> None:
    names = {n for n in dir(alq_torch) if not n.startswith("_")} - {"train"}
    assert alq_torch.__all__ == sorted(alq_torch.__all__)
    mine = {"QuantizedTensor", "bucket_stats", "decode", "decode_sum", "dequantize", "encode", "pack_codes",
            "prepare_decode_sum", "prepare_quantize_encode", "quantize", "quantize_encode", "unpack_codes"}  # fmt: skip
    assert mine <= set(alq_torch.__all__) <= names


def test_import_starts_no_gpu_and_no_triton() -> None:
    code = (
        "import sys, torch, alq_torch, numpy as np, alq_core as ac\n"
        "cfg = ac.QuantizerConfig('alq', bits=3, bucket_size=8)\n"
        "alq_torch.quantize(torch.zeros(16), ac.default_levels(cfg), cfg)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialized'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
