"""alq_torch wire format on CPU tensors: the same bytes as alq_core, the same checks and messages."""

from __future__ import annotations

import alq_core
import numpy as np
import pytest
import torch
from alq_core import HEADER_SIZE, PayloadError, QuantizerConfig, default_levels, payload_size
from alq_core.testing import assert_payloads_equal, assert_quantized_equal
from alq_core.testing.strategies import configs, gradients, levels_for, noise_for
from alq_torch import (
    decode,
    decode_sum,
    encode,
    pack_codes,
    prepare_decode_sum,
    prepare_quantize_encode,
    quantize,
    quantize_encode,
    unpack_codes,
)
from hypothesis import given
from hypothesis import strategies as st


@given(bits=st.integers(1, 8), m=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_pack_matches_core(bits: int, m: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, m).astype(np.uint8)
    packed = pack_codes(torch.from_numpy(codes), bits)
    np.testing.assert_array_equal(packed.numpy(), alq_core.pack_codes(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, m).numpy(), codes)


def test_pack_validation() -> None:
    with pytest.raises(ValueError, match=r"`bits` must be in 1\.\.8; got 9"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="10 codes of 3 bits need 6 bytes; got 5"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, 10)


@given(data=st.data(), config=configs(), x=gradients(max_size=700), version=st.integers(0, 2**64 - 1))
def test_encode_quantize_encode_decode_match_core(
    data: st.DataObject, config: QuantizerConfig, x: np.ndarray, version: int
) -> None:
    levels = data.draw(levels_for(config))
    u = data.draw(noise_for(config.num_quantized(x.size)))
    q = alq_core.quantize(x, levels, config, noise=u)
    expected = alq_core.encode(q, levels, table_version=version)
    qt = quantize(torch.from_numpy(x), levels, config, noise=u)
    payload = encode(qt, levels, table_version=version)
    assert_payloads_equal(payload, expected)
    assert_payloads_equal(
        quantize_encode(torch.from_numpy(x), levels, config, table_version=version, noise=u), expected
    )
    back = decode(payload, config=config, levels=levels, table_version=version)
    assert_quantized_equal(back, alq_core.decode(expected, config=config, levels=levels, table_version=version))
    total = decode_sum(torch.stack([payload, payload]), levels, config, x.size, table_version=version, scale=0.5)
    deq = alq_core.dequantize(q, levels)
    np.testing.assert_array_equal(total.numpy(), (deq + deq) * np.float32(0.5))


@pytest.mark.parametrize("method", ["fp32", "trn", "alq"])
def test_fp32_and_ternary_payloads(method: str) -> None:
    config = QuantizerConfig(method, bits=4, bucket_size=32)
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    levels = default_levels(config) if config.quantized else None
    u = np.random.default_rng(1).random(config.num_quantized(100), dtype=np.float32)
    expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=u), levels, table_version=2)
    got = quantize_encode(torch.from_numpy(x), levels, config, table_version=2, noise=u)
    assert_payloads_equal(got, expected)
    assert got.numel() == payload_size(config, 100)


def _payload(config: QuantizerConfig, n: int = 100, version: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    levels = default_levels(config)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return quantize_encode(x, levels, config, table_version=version, seed=3), levels


def test_decode_checks_like_the_core() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=32)
    p, _ = _payload(config)
    raw = p.numpy().tobytes()

    def both(payload: torch.Tensor, match: str, **kw: object) -> None:
        with pytest.raises(PayloadError, match=match):
            alq_core.decode(payload.numpy().tobytes(), **kw)  # type: ignore[arg-type]
        with pytest.raises(PayloadError, match=match):
            decode(payload, **kw)  # type: ignore[arg-type]

    both(p[:10], "payload truncated: 10 bytes, shorter than the 40-byte header")
    both(torch.cat([p, p[:1]]), "payload oversized")
    both(p[:-1], "payload truncated")
    bad = p.clone()
    bad[0] = 0
    both(bad, "not an ALQ payload")
    bad = p.clone()
    bad[20] ^= 1
    both(bad, "payload header checksum mismatch")
    both(p, "level-table version mismatch: payload has 1, reader has 2", table_version=2)
    both(p, "expected \\('alq', 4", config=QuantizerConfig("alq", bits=4, bucket_size=32))
    other = default_levels(QuantizerConfig("qsgd", bits=3))
    both(p, "level-table checksum mismatch", levels=other)
    bad = p.clone()
    bad[HEADER_SIZE + 3] = 0xBF  # the first scale becomes negative and finite
    both(bad, "payload holds a negative scale")
    tcfg = QuantizerConfig("trn", bucket_size=32)
    tp, _ = _payload(tcfg)
    tp[HEADER_SIZE + 4 * tcfg.num_buckets(100)] = 0xFF  # code 3 with 3 levels
    both(tp, "payload holds code 3 but the table has 3 levels")
    assert len(raw) == p.numel()


def test_decode_sum_checks_every_header() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=32)
    a, levels = _payload(config, version=4)
    b, _ = _payload(config, version=5)
    with pytest.raises(PayloadError, match="payload 1 of 2: level-table version mismatch: payload has 5, reader has 4"):
        decode_sum(torch.stack([a, b]), levels, config, 100, table_version=4)
    with pytest.raises(PayloadError, match="payload 0 of 2: level-table checksum mismatch"):
        decode_sum(torch.stack([a, a]), default_levels(QuantizerConfig("qsgd", bits=3)), config, 100)
    c, _ = _payload(config, n=99)
    with pytest.raises(PayloadError, match="payload 0 of 1: payload truncated: 94 bytes, header says 99 elements"):
        decode_sum(torch.stack([c[:-1]]), levels, config, 100)
    with pytest.raises(PayloadError, match="it holds 99 elements, expected n = 98"):
        decode_sum(torch.stack([c]), levels, config, 98)
    with pytest.raises(TypeError, match=r"`payloads` must be a 2-D uint8 tensor \(W, payload_size\)"):
        decode_sum(a, levels, config, 100)
    with pytest.raises(TypeError, match=r"`payload` must be a 1-D uint8 tensor; got torch.uint8 with shape \(1, "):
        decode(a[None, :])
    with pytest.raises(ValueError, match="at least one payload"):
        decode_sum(a[None, :][:0], levels, config, 100)


def test_decode_sum_into_out_with_scale() -> None:
    config = QuantizerConfig("nuqsgd", bits=2, bucket_size=16, tail="full")
    levels = default_levels(config)
    xs = [torch.randn(90, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ps = torch.stack([quantize_encode(x, levels, config, seed=i) for i, x in enumerate(xs)])
    buf = torch.full((100,), -1.0)
    res = decode_sum(ps, levels, config, 90, out=buf[5:95], scale=1 / 3)
    assert res.data_ptr() == buf[5:].data_ptr() and buf[0] == -1 and buf[99] == -1
    parts = [alq_core.dequantize(alq_core.decode(p.numpy()), levels) for p in ps]
    np.testing.assert_array_equal(res.numpy(), ((parts[0] + parts[1]) + parts[2]) * np.float32(1 / 3))
    torch.testing.assert_close(res[80:], sum(x[80:] for x in xs) / 3)  # exact tail, averaged


@pytest.mark.parametrize("method", ["alq", "fp32"])
def test_prepared_calls_read_their_buffers_at_each_call(method: str) -> None:
    """Prepared once, called as the contents change: the same bytes and sums as fresh public calls."""
    config = QuantizerConfig(method, bits=3, bucket_size=64, nonfinite="propagate")
    levels = default_levels(config) if config.quantized else None
    n = 300
    x = torch.empty(n)
    encode_x = prepare_quantize_encode(x, levels, config, table_version=4)
    rows = torch.empty(2, payload_size(config, n), dtype=torch.uint8)
    decode_rows = prepare_decode_sum(rows, levels, config, n, table_version=4, scale=0.5)
    for step in range(3):
        x.copy_(torch.randn(n, generator=torch.Generator().manual_seed(step)))
        rows[0].copy_(encode_x(step))
        assert torch.equal(rows[0], quantize_encode(x.clone(), levels, config, table_version=4, seed=step))
        rows[1].copy_(quantize_encode(2 * x, levels, config, table_version=4, seed=step + 9))
        assert torch.equal(decode_rows(), decode_sum(rows.clone(), levels, config, n, table_version=4, scale=0.5))
    with pytest.raises(ValueError, match="not float64"):
        prepare_quantize_encode(x.double(), levels, config)


def test_quantize_encode_seed_out_and_validation() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64)
    levels = default_levels(config)
    x = torch.randn(300)
    a = quantize_encode(x, levels, config, seed=7)
    assert torch.equal(a, quantize_encode(x, levels, config, seed=7))
    assert not torch.equal(a, quantize_encode(x, levels, config, seed=8))
    buf = torch.zeros(payload_size(config, 300) + 3, dtype=torch.uint8)
    res = quantize_encode(x, levels, config, seed=7, out=buf[3:])
    assert torch.equal(buf[3:], a) and res.data_ptr() == buf[3:].data_ptr()
    with pytest.raises(ValueError, match=r"`out` must be a contiguous 1-D torch\.uint8 tensor of"):
        quantize_encode(x, levels, config, out=buf)
    with pytest.raises(ValueError, match="pass either `noise` or `seed`, not both"):
        quantize_encode(x, levels, config, seed=1, noise=torch.zeros(300))
    with pytest.raises(ValueError, match="`seed` must be a non-negative integer"):
        quantize_encode(x, levels, config, seed=-1)
    with pytest.raises(TypeError, match=r"`table_version` must be a non-negative integer; got 1\.5"):
        quantize_encode(x, levels, config, table_version=1.5)  # type: ignore[arg-type]
    bad = x.clone()
    bad[70] = float("inf")
    with pytest.raises(ValueError, match=r"bucket 1 \(coordinates 64\.\.127\) holds NaN or Inf"):
        quantize_encode(bad, levels, config, seed=1)


def test_decode_sum_device_check_without_kernels() -> None:
    """The flag-based header check on the torch-ops path (CPU): NaN result and flag set, no exception."""
    config = QuantizerConfig("qsgd", bits=4, bucket_size=32, tail="full")
    levels = default_levels(config)
    x = torch.randn(100, generator=torch.Generator().manual_seed(3))
    p = torch.stack([quantize_encode(x, levels, config, table_version=2, seed=s) for s in (1, 2)])
    flag = torch.zeros(1, dtype=torch.int32)
    ok = decode_sum(p, levels, config, 100, table_version=2, check_headers=flag)
    assert torch.equal(ok, decode_sum(p, levels, config, 100, table_version=2)) and flag.item() == 0
    bad = decode_sum(p, levels, config, 100, table_version=3, check_headers=flag)
    assert torch.isnan(bad).all() and flag.item() == 1
