"""Triton kernels against alq_core: payload bytes equal on the same noise.

On a CUDA machine the kernels run compiled on the GPU. Without a GPU they run in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before the
kernels module is first imported), so the same arithmetic is checked in CI.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import alq_core  # noqa: E402
import alq_torch  # noqa: E402
from alq_core import QuantizerConfig, default_levels, payload_size  # noqa: E402
from alq_core.testing import assert_payloads_equal  # noqa: E402
from alq_core.testing.strategies import configs, gradients, levels_for, noise_for  # noqa: E402
from alq_torch import decode_sum, quantize_encode  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install 'alq-torch[triton]')")
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
#: decode_sum's aligned-word loads (TUNING["decode_words"]) are inline PTX: compiled only
WORDS = [False, pytest.param(True, marks=pytest.mark.skipif(not CUDA, reason="word loads are inline PTX (GPU)"))]


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Route CPU tensors to the interpreted kernels and count kernel launches."""
    if not CUDA:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
        monkeypatch.setenv("ALQ_TORCH_KERNELS_ON_CPU", "1")
    from alq_torch import _kernels

    calls = {"quantize_pack": 0, "decode_sum": 0}  # preparations of each launch
    for name in calls:
        real = getattr(_kernels, f"prepare_{name}")

        def spy(*a: object, _real: object = real, _name: str = name, **k: object) -> object:
            calls[_name] += 1
            return _real(*a, **k)  # type: ignore[operator]

        monkeypatch.setattr(_kernels, f"prepare_{name}", spy)
    return calls


def _x(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 1e-2).to(dtype)


def _check(
    x: torch.Tensor, config: QuantizerConfig, levels: np.ndarray | None = None, version: int = 3
) -> torch.Tensor:
    levels = default_levels(config) if levels is None else levels
    n = x.numel()
    u = np.random.default_rng(n).random(config.num_quantized(n), dtype=np.float32)
    host = x.to(torch.float32).numpy()
    expected = alq_core.encode(alq_core.quantize(host, levels, config, noise=u), levels, table_version=version)
    got = quantize_encode(x.to(DEVICE), levels, config, table_version=version, noise=torch.from_numpy(u).to(DEVICE))
    assert got.device.type == DEVICE
    assert_payloads_equal(got.cpu(), expected)
    return got


CASES = [
    (method, bits)
    for method in ("qsgd", "qsgdinf", "nuqsgd", "alq", "trn")
    for bits in range(1, 9)
    if method != "trn" or bits == 2
]


@pytest.mark.parametrize(("method", "bits"), CASES)
@pytest.mark.parametrize("tail", ["quantize", "full"])
@pytest.mark.parametrize("d", [64, 200])
def test_quantize_pack_matches_core(kernels: dict[str, int], method: str, bits: int, tail: str, d: int) -> None:
    config = QuantizerConfig(method, bits=bits, bucket_size=d, tail=tail)
    _check(_x(5 * d + 37, seed=bits), config)
    assert kernels["quantize_pack"] == 1


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), config=configs(max_bucket=300), x=gradients(max_size=1500), elems=st.sampled_from([64, 4096]))
def test_quantize_encode_matches_core_for_any_config(
    kernels: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
    config: QuantizerConfig,
    x: np.ndarray,
    elems: int,
) -> None:
    """Any method, width, bucket size, tail, norm, clipping and table, one or several buckets per program:
    on the same noise the payload bytes are the core's (the fused kernel where it applies, else the
    torch ops)."""
    from alq_torch import _kernels

    if data.draw(st.booleans()):  # half the cases: a bucket the fused kernel takes (whole 8-code groups)
        config = dataclasses.replace(config, bucket_size=8 * data.draw(st.integers(4, 40)))
    monkeypatch.setitem(_kernels.TUNING, "qpack_elems", elems)
    levels = data.draw(levels_for(config))
    u = data.draw(noise_for(config.num_quantized(x.size)))
    before = kernels["quantize_pack"]
    got = quantize_encode(
        torch.from_numpy(x).to(DEVICE), levels, config, table_version=7, noise=torch.from_numpy(u).to(DEVICE)
    )
    expected = alq_core.encode(alq_core.quantize(x, levels, config, noise=u), levels, table_version=7)
    assert_payloads_equal(got.cpu(), expected)
    assert kernels["quantize_pack"] == before + _kernels.fused_supported(config)


@pytest.mark.parametrize("d", [8192, 16384])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_paper_bucket_sizes(kernels: dict[str, int], d: int, bits: int) -> None:
    config = QuantizerConfig("alq", bits=bits, bucket_size=d)
    _check(_x(2 * d + 1001, seed=d), config)
    assert kernels["quantize_pack"] == 1


def test_arbitrary_level_table(kernels: dict[str, int]) -> None:
    rng = np.random.default_rng(5)
    for bits in (3, 6):
        inner = np.sort(rng.uniform(-0.99, 0.99, 2**bits - 2))
        levels = alq_core.validate_levels(np.concatenate([[-1.0], inner, [1.0]]))
        _check(_x(1000, seed=bits) * 30, QuantizerConfig("alq", bits=bits, bucket_size=128), levels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_input(kernels: dict[str, int], dtype: torch.dtype) -> None:
    _check(_x(1500, dtype=dtype) * 100, QuantizerConfig("nuqsgd", bits=3, bucket_size=256))
    assert kernels["quantize_pack"] == 1


@pytest.mark.parametrize(
    "config", [QuantizerConfig("trn", bucket_size=128), QuantizerConfig("qsgd", bits=2, bucket_size=96, clip=1.0)]
)
def test_clipping(kernels: dict[str, int], config: QuantizerConfig) -> None:
    x = torch.from_numpy(np.random.default_rng(0).standard_t(2, 1000).astype(np.float32))
    x[200:296] = 3.0  # a constant bucket clips to zero
    _check(x, config)
    assert kernels["quantize_pack"] == 1


def test_nonfinite_and_zero_buckets(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64, nonfinite="propagate")
    for norm in ("l2", "linf"):
        cfg = QuantizerConfig("alq", bits=3, bucket_size=64, nonfinite="propagate", norm=norm)
        x = _x(600)
        x[10] = float("nan")
        x[70] = float("inf")
        x[140] = -float("inf")
        x[192:256] = 0.0
        x[300] = 3e38  # L2 norm overflows float32: non-finite scale
        x[301] = 3e38
        got = _check(x, cfg)
        total = decode_sum(got[None, :], default_levels(config), cfg, 600)
        assert torch.isnan(total[:192]).all() and (total[192:256] == 0).all()
    raising = QuantizerConfig("alq", bits=3, bucket_size=64)
    with pytest.raises(ValueError, match=r"bucket 0 \(coordinates 0\.\.63\) holds NaN or Inf \(4 such buckets\)"):
        quantize_encode(x.to(DEVICE), default_levels(raising), raising, seed=1)


@pytest.mark.parametrize("elems", [4096, 64])
@pytest.mark.parametrize(("bits", "norm"), [(3, "l2"), (6, "linf"), (2, "l2")])
def test_nonfinite_buckets_get_zero_codes_with_device_noise(
    kernels: dict[str, int], monkeypatch: pytest.MonkeyPatch, bits: int, norm: str, elems: int
) -> None:
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "qpack_elems", elems)
    cfg = QuantizerConfig("qsgd", bits=bits, bucket_size=64, nonfinite="propagate", norm=norm)
    x = _x(600, seed=bits)
    x[10] = float("nan")
    x[130] = float("inf")
    got = alq_core.decode(quantize_encode(x.to(DEVICE), default_levels(cfg), cfg, seed=3).cpu().numpy())
    assert np.isnan(got.scales[[0, 2]]).all() and np.isfinite(np.delete(got.scales, [0, 2])).all()
    assert not got.codes[0:64].any() and not got.codes[128:192].any()
    assert got.codes[64:128].any()


@pytest.mark.parametrize("n", [0, 5, 64, 100])
def test_edge_sizes(kernels: dict[str, int], n: int) -> None:
    for tail in ("quantize", "full"):
        _check(_x(n), QuantizerConfig("alq", bits=3, bucket_size=64, tail=tail))


def test_unaligned_out_view(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64)
    levels = default_levels(config)
    x = _x(333).to(DEVICE)
    size = payload_size(config, 333)
    buf = torch.full((size + 5,), 7, dtype=torch.uint8, device=DEVICE)
    got = quantize_encode(x, levels, config, seed=11, out=buf[3 : 3 + size])
    assert got.data_ptr() == buf.data_ptr() + 3
    assert buf[:3].tolist() == [7, 7, 7] and buf[-2:].tolist() == [7, 7]
    assert torch.equal(buf[3 : 3 + size], quantize_encode(x, levels, config, seed=11))


def test_device_noise_is_deterministic_and_unbiased(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("nuqsgd", bits=3, bucket_size=256)
    levels = default_levels(config)
    n = 8192
    x = _x(n, seed=9)
    a = quantize_encode(x.to(DEVICE), levels, config, seed=1234)
    assert torch.equal(a, quantize_encode(x.to(DEVICE), levels, config, seed=1234))
    b = quantize_encode(x.to(DEVICE), levels, config, seed=1235)
    assert not torch.equal(a, b)
    codes = alq_core.decode(a.cpu().numpy()).codes.astype(np.int64)
    host = x.numpy()
    down = alq_core.quantize(host, levels, config, noise=np.full(n, np.nextafter(np.float32(1), np.float32(0)))).codes
    up = alq_core.quantize(host, levels, config, noise=np.zeros(n, np.float32)).codes
    assert np.all((codes == down) | (codes == up)), "a code outside its level bracket"
    # rounding up happens with probability p: compare the count with its binomial spread
    v = np.clip(host / np.repeat(alq_core.bucket_scales(host, config), 256)[:n], -1, 1).astype(np.float64)
    j = down.astype(np.int64)
    lv = levels.astype(np.float64)
    p = np.where(up != down, (v - lv[j]) / (lv[np.minimum(j + 1, 7)] - lv[j]), 0.0)
    ups = float(np.sum(codes != down))
    spread = np.sqrt(np.sum(p * (1 - p)))
    assert abs(ups - p.sum()) < 5 * spread + 1, f"{ups} round-ups, expected {p.sum():.1f} +- {spread:.1f}"
    assert kernels["quantize_pack"] == 3


@pytest.mark.parametrize("w", [1, 2, 3, 8])
@pytest.mark.parametrize(
    ("method", "bits", "tail"),
    [
        ("alq", 3, "quantize"),
        ("qsgd", 8, "full"),
        ("nuqsgd", 5, "quantize"),
        ("trn", 2, "full"),
        ("qsgd", 1, "quantize"),
    ],
)
@pytest.mark.parametrize("pairs", [1, 0])
@pytest.mark.parametrize("d", [96, 100])
@pytest.mark.parametrize("words", WORDS)
def test_decode_sum_kernel_matches_composition(
    kernels: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    w: int,
    method: str,
    bits: int,
    tail: str,
    pairs: int,
    d: int,
    words: bool,
) -> None:
    """Pair lookups or single ones; buckets that are whole groups of 8 codes (96) or not (100: a group
    then straddles two buckets' scales); code bytes read one by one or as aligned words."""
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "decode_pairs_min_w", 1 if pairs else 10**9)
    monkeypatch.setitem(_kernels.TUNING, "decode_words", words)
    config = QuantizerConfig(method, bits=bits, bucket_size=d, tail=tail, nonfinite="propagate")
    levels = default_levels(config)
    n = 1000
    xs = [_x(n, seed=i) * (i + 1) for i in range(w)]
    xs[0][500] = float("nan")
    payloads = torch.stack([quantize_encode(x, levels, config, seed=i) for i, x in enumerate(xs)])  # CPU path
    # reference: the core's decode and dequantize, summed in payload order in float32
    acc = None
    for p in payloads:
        part = alq_core.dequantize(alq_core.decode(p.numpy()), levels)
        acc = part if acc is None else acc + part
    assert acc is not None
    expected = acc * np.float32(1 / w) if w > 1 else acc
    got = decode_sum(payloads.to(DEVICE), levels, config, n, scale=1 / w)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    assert kernels["decode_sum"] == 1


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    config=configs(max_bucket=300),
    w=st.integers(1, 9),
    block=st.sampled_from([64, 256, 2048]),
    pairs_from=st.sampled_from([1, 4, 10**9]),
    words=st.booleans() if CUDA else st.just(False),
)
def test_decode_sum_kernel_matches_core_for_any_config(
    kernels: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
    config: QuantizerConfig,
    w: int,
    block: int,
    pairs_from: int,
    words: bool,
) -> None:
    """Any method, width, bucket size (groups of 8 codes straddling buckets or not), tail, norm and
    clipping; any W and launch shape: the kernel's sum equals the core's decode + dequantize summed in
    payload order, then scaled, in float32."""
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "decode_block", block)
    monkeypatch.setitem(_kernels.TUNING, "decode_pairs_min_w", pairs_from)
    monkeypatch.setitem(_kernels.TUNING, "decode_words", words)
    levels = data.draw(levels_for(config))
    x = data.draw(gradients(max_size=600))
    n = x.size
    payloads, acc = [], None
    for i in range(w):
        q = alq_core.quantize(
            x * np.float32(i + 1), levels, config, noise=data.draw(noise_for(config.num_quantized(n)))
        )
        payloads.append(np.frombuffer(alq_core.encode(q, levels), dtype=np.uint8))
        part = alq_core.dequantize(q, levels)
        acc = part if acc is None else acc + part
    assert acc is not None
    before = kernels["decode_sum"]
    got = decode_sum(torch.from_numpy(np.stack(payloads)).to(DEVICE), levels, config, n, scale=1 / w)
    np.testing.assert_array_equal(got.cpu().numpy(), acc * np.float32(1 / w))
    assert kernels["decode_sum"] == before + (config.num_quantized(n) > 0)


def test_decode_sum_out_of_range_code_is_nan(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("trn", bucket_size=64)
    levels = default_levels(config)
    p = quantize_encode(_x(128), levels, config, seed=0)
    p[alq_core.HEADER_SIZE + 8] = 0xFF  # codes 3 (beyond the 3 levels)
    got = decode_sum(p[None, :].to(DEVICE), levels, config, 128)
    assert torch.isnan(got[:4]).all() and torch.isfinite(got[4:]).all()


@pytest.mark.parametrize("d", [100, 7, 32768])
def test_configs_without_a_fused_path_still_match(kernels: dict[str, int], d: int) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=d)
    _check(_x(2 * d + 13), config)
    assert kernels["quantize_pack"] == 0


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("elems", [4096, 64])
@pytest.mark.parametrize(
    "config",
    [
        QuantizerConfig("alq", bits=3, bucket_size=64),
        QuantizerConfig("nuqsgd", bits=4, bucket_size=200, tail="full"),
        QuantizerConfig("qsgdinf", bits=2, bucket_size=128),
        QuantizerConfig("qsgd", bits=6, bucket_size=256),
        QuantizerConfig("qsgd", bits=8, bucket_size=96),
    ],
)
def test_program_shapes_match_core(
    kernels: dict[str, int], monkeypatch: pytest.MonkeyPatch, elems: int, loop: bool, config: QuantizerConfig
) -> None:
    """Several buckets per program or one; unmasked full-bucket programs and the masked last one; with
    ``loop`` few programs walk the full blocks (prefetching) and the device noise is the same as without."""
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "qpack_elems", elems)
    monkeypatch.setitem(_kernels.TUNING, "qpack_loop_8k", loop)
    x = _x(7 * config.bucket_size + 45, seed=config.bits)
    x[3] = float("nan")  # a non-finite first bucket
    x[config.bucket_size : 2 * config.bucket_size] = 0.0  # a zero bucket
    cfg = QuantizerConfig(
        config.method,
        bits=config.bits,
        bucket_size=config.bucket_size,
        tail=config.tail,
        norm=config.norm,
        nonfinite="propagate",
    )
    _check(x, cfg)
    a = quantize_encode(x.to(DEVICE), default_levels(cfg), cfg, seed=5)
    assert torch.equal(a, quantize_encode(x.to(DEVICE), default_levels(cfg), cfg, seed=5))
    monkeypatch.setitem(_kernels.TUNING, "qpack_loop_8k", not loop)
    assert torch.equal(a, quantize_encode(x.to(DEVICE), default_levels(cfg), cfg, seed=5))
    assert kernels["quantize_pack"] == 4


@pytest.mark.parametrize(("w", "block"), [(3, 64), (20, 2048), (20, 64)])
@pytest.mark.parametrize("words", WORDS)
def test_decode_sum_scalar_scale_and_runtime_loop(
    kernels: dict[str, int], monkeypatch: pytest.MonkeyPatch, w: int, block: int, words: bool
) -> None:
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "decode_block", block)
    monkeypatch.setitem(_kernels.TUNING, "decode_words", words)
    config = QuantizerConfig("alq", bits=3, bucket_size=256, nonfinite="propagate")
    levels = default_levels(config)
    n = 1000
    payloads = torch.stack([quantize_encode(_x(n, seed=i) * (i + 1), levels, config, seed=i) for i in range(w)])
    acc = None
    for p in payloads:
        part = alq_core.dequantize(alq_core.decode(p.numpy()), levels)
        acc = part if acc is None else acc + part
    assert acc is not None
    got = decode_sum(payloads.to(DEVICE), levels, config, n, scale=1 / w)
    np.testing.assert_array_equal(got.cpu().numpy(), acc * np.float32(1 / w))
    # rows starting at every byte offset mod 4 (views into a bigger buffer; the row stride odd too)
    for off in (1, 2, 3):
        buf = torch.zeros((w, payloads.shape[1] + 3), dtype=torch.uint8)
        buf[:, off : off + payloads.shape[1]] = payloads
        got2 = decode_sum(buf[:, off : off + payloads.shape[1]].to(DEVICE), levels, config, n, scale=1 / w)
        assert torch.equal(got2, got), f"rows at byte offset {off}"
    assert kernels["decode_sum"] == 4


def test_decode_sum_check_headers_false_skips_the_host_check(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=64)
    levels = default_levels(config)
    p = torch.stack([quantize_encode(_x(300, seed=i), levels, config, table_version=4, seed=i) for i in range(2)])
    with pytest.raises(alq_core.PayloadError, match="version mismatch"):
        decode_sum(p.to(DEVICE), levels, config, 300, table_version=5)
    trusted = decode_sum(p.to(DEVICE), levels, config, 300, table_version=5, check_headers=False)
    assert torch.equal(trusted, decode_sum(p.to(DEVICE), levels, config, 300, table_version=4))
    with pytest.raises(alq_core.PayloadError, match=r"payloads truncated: .* n = 400 elements need"):
        decode_sum(p.to(DEVICE), levels, config, 400, check_headers=False)


@pytest.mark.parametrize(("bits", "tail", "w"), [(3, "quantize", 2), (6, "full", 3), (2, "quantize", 20)])
def test_decode_sum_device_header_check(kernels: dict[str, int], bits: int, tail: str, w: int) -> None:
    config = QuantizerConfig("alq", bits=bits, bucket_size=64, tail=tail)
    levels = default_levels(config)
    n = 300
    p = torch.stack([quantize_encode(_x(n, seed=i), levels, config, table_version=4, seed=i) for i in range(w)])
    p = p.to(DEVICE)
    good = decode_sum(p, levels, config, n, table_version=4, scale=1 / w)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    same = decode_sum(p, levels, config, n, table_version=4, scale=1 / w, check_headers=flag)
    assert torch.equal(same, good) and flag.item() == 0
    # a reader on another table version: every output NaN, the flag set, nothing raised
    bad = decode_sum(p, levels, config, n, table_version=5, scale=1 / w, check_headers=flag)
    assert torch.isnan(bad).all() and flag.item() == 1
    # one payload of the W with another version is enough
    flag.zero_()
    odd = quantize_encode(_x(n, seed=99), levels, config, table_version=5, seed=1).to(DEVICE)
    mixed = torch.cat([p[:-1], odd[None, :]])
    assert torch.isnan(decode_sum(mixed, levels, config, n, table_version=4, check_headers=flag)).all()
    assert flag.item() == 1
    assert kernels["decode_sum"] == 4
    with pytest.raises(ValueError, match="needs `table_version`"):
        decode_sum(p, levels, config, n, check_headers=flag)
    with pytest.raises(ValueError, match="contiguous int32 tensor of one element"):
        decode_sum(p, levels, config, n, table_version=4, check_headers=torch.zeros(2, dtype=torch.int32))


@needs_cuda
def test_cuda_large_matches_core() -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=8192)
    levels = default_levels(config)
    n = 3_000_017
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    u = np.random.default_rng(0).random(n, dtype=np.float32)
    expected = alq_core.encode(alq_core.quantize(x.numpy(), levels, config, noise=u), levels)
    got = quantize_encode(x.cuda(), levels, config, noise=torch.from_numpy(u).cuda())
    assert_payloads_equal(got.cpu(), expected)
    total = decode_sum(torch.stack([got, got]), levels, config, n, scale=0.5)
    deq = alq_core.dequantize(alq_core.decode(expected), levels)
    np.testing.assert_array_equal(total.cpu().numpy(), (deq + deq) * np.float32(0.5))


def test_launch_key_covers_triton_specialization() -> None:
    """The direct-launch key separates whatever Triton compiles differently: tensor dtype and 16-byte
    alignment, int values (width class only for arguments Triton does not specialize), float type."""
    from alq_torch import _kernels

    k = _kernels._arg_key
    base = torch.zeros(64, dtype=torch.uint8)
    assert k(base, True) != k(base[1:], True)  # alignment
    assert k(base, True) != k(base.view(torch.int32), True)  # dtype
    assert k(16, True) != k(32, True) and k(1, True) != k(2, True)  # values (Triton: == 1, % 16)
    assert k(5, False) == k(7, False) != k(2**40, False) != k(2**63 + 1, False)  # i32 / i64 / u64
    assert k(0.5, True) == k(0.25, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tail", ["quantize", "full"])
def test_decode_sum_into_half_precision_rounds_the_float32_sum(
    kernels: dict[str, int], dtype: torch.dtype, tail: str
) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=256, tail=tail)
    levels = default_levels(config)
    n = 3000
    payloads = torch.stack([quantize_encode(_x(n, seed=k).to(DEVICE), levels, config, seed=k) for k in range(3)])
    want = decode_sum(payloads, levels, config, n, scale=1 / 3).to(dtype)
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    got = decode_sum(payloads, levels, config, n, scale=1 / 3, out=out)
    assert got is out and torch.equal(got, want)
    assert kernels["decode_sum"] == 2
    with pytest.raises(ValueError, match=r"float32 or torch\.float16 or torch\.bfloat16"):
        decode_sum(payloads, levels, config, n, out=torch.empty(n, dtype=torch.float64, device=DEVICE))


if HAS_TRITON:
    import triton
    import triton.language as tl
    from alq_torch._kernels import _round_to

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def]
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _round_to(tl.load(x_ptr + i), out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_store_rounds_like_torch(kernels: dict[str, int], dtype: torch.dtype) -> None:
    """Ties to even, carries into the exponent, overflow to infinity, subnormals, signed zeros, NaN."""
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00008000, 0x00018000,
            0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x3C008000]  # fmt: skip
    raw = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    rng = torch.randn(112, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 112)
    x = torch.cat([raw.view(torch.float32), rng.float()])
    out = torch.empty(128, dtype=dtype, device=DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), out, N=128)
    want = x.to(dtype)
    got = out.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_decode_sum_reads_payloads_of_any_column_stride(kernels: dict[str, int]) -> None:
    config = QuantizerConfig("alq", bits=3, bucket_size=256)
    levels = default_levels(config)
    n = 3000
    payloads = torch.stack([quantize_encode(_x(n, seed=k).to(DEVICE), levels, config, seed=k) for k in range(3)])
    wide = torch.zeros(*payloads.shape, 2, dtype=torch.uint8, device=DEVICE)
    wide[:, :, 0] = payloads
    view = wide[:, :, 0]
    assert view.stride(1) == 2
    want = decode_sum(payloads, levels, config, n, scale=1 / 3)
    assert torch.equal(decode_sum(view, levels, config, n, scale=1 / 3), want)
    assert kernels["decode_sum"] == 2


def test_prepared_launches_follow_their_buffers_and_seeds(kernels: dict[str, int]) -> None:
    """The hook's prepared encode and decode, called again and again on buffers whose contents change,
    equal fresh public-op calls; seeds of both int widths (the kernel's seed argument is compiled as
    int32 or int64) each take their own kernel."""
    from alq_torch import prepare_decode_sum, prepare_quantize_encode

    config = QuantizerConfig("alq", bits=3, bucket_size=256, nonfinite="propagate")
    levels = default_levels(config)
    n = 5000
    x = torch.empty(n, device=DEVICE)
    out = torch.empty(payload_size(config, n), dtype=torch.uint8, device=DEVICE)
    encode = prepare_quantize_encode(x, levels, config, table_version=2, out=out)
    rows = torch.empty(2, out.numel(), dtype=torch.uint8, device=DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    decode = prepare_decode_sum(rows, levels, config, n, table_version=2, scale=0.5, check_headers=flag)
    seeds = (5, 2**40 + 3, 7, 2**62, 2**31 - 1)
    for k, seed in enumerate(seeds):
        x.copy_(_x(n, seed=k))
        want = quantize_encode(x.clone(), levels, config, table_version=2, seed=seed)
        assert encode(seed).data_ptr() == out.data_ptr()
        assert torch.equal(out, want), f"seed {seed}"
        rows[0].copy_(want)
        rows[1].copy_(quantize_encode(x.clone() * 2, levels, config, table_version=2, seed=seed + 1))
        total = decode_sum(rows.clone(), levels, config, n, table_version=2, scale=0.5)
        assert torch.equal(decode(), total)
    assert int(flag.item()) == 0
    assert kernels["quantize_pack"] == 1 + 2 * len(seeds)
    assert kernels["decode_sum"] == 1 + len(seeds)


@needs_cuda
@pytest.mark.parametrize("bsearch", [False, True])
@pytest.mark.parametrize("method", ["qsgdinf", "alq"])
def test_level_scan_and_binary_search_give_the_core_bytes(
    monkeypatch: pytest.MonkeyPatch, bsearch: bool, method: str
) -> None:
    """Both ways of finding the level bracket (TUNING["qpack_bsearch"], 8 levels) give the core's codes,
    on values exactly at every level, between them, at +-1 and 0 (linf norm: v = x exactly)."""
    from alq_torch import _kernels

    monkeypatch.setitem(_kernels.TUNING, "qpack_bsearch", bsearch)
    config = QuantizerConfig(method, bits=3, bucket_size=512, norm="linf", nonfinite="propagate")
    levels = np.array([-1.0, -0.61, -0.3, -0.07, 0.02, 0.33, 0.8, 1.0], dtype=np.float32)
    grid = np.concatenate([levels, (levels[1:] + levels[:-1]) / 2, np.nextafter(levels, 0), [0.0, -0.0]])
    x = np.resize(grid.astype(np.float32), 512 * 6)
    x[::512] = 1.0  # every bucket's scale is exactly 1
    _check(torch.from_numpy(x), config, levels)
    seeded = quantize_encode(torch.from_numpy(x).to(DEVICE), levels, config, seed=3)
    monkeypatch.setitem(_kernels.TUNING, "qpack_bsearch", not bsearch)
    assert torch.equal(seeded, quantize_encode(torch.from_numpy(x).to(DEVICE), levels, config, seed=3))


@needs_cuda
def test_direct_launch_runs_the_dispatched_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a signature's first launch the compiled kernel is launched directly: bytes still the core's,
    one cache entry per signature (device noise, an unaligned output and another size are new ones)."""
    from alq_torch import _kernels

    monkeypatch.setattr(_kernels, "_LAUNCHES", {})
    config = QuantizerConfig("alq", bits=3, bucket_size=256, nonfinite="propagate")
    levels = default_levels(config)
    x = _x(5000, seed=3)
    for k in range(3):
        _check(x * (k + 1), config)  # given noise: bit-exact with the core, launches 2 and 3 direct
    assert len(_kernels._LAUNCHES) == 1
    a = quantize_encode(x.to(DEVICE), levels, config, seed=7)
    assert torch.equal(a, quantize_encode(x.to(DEVICE), levels, config, seed=7))
    assert not torch.equal(a, quantize_encode(x.to(DEVICE), levels, config, seed=8))
    assert len(_kernels._LAUNCHES) == 2
    buf = torch.zeros(a.numel() + 1, dtype=torch.uint8, device=DEVICE)
    assert torch.equal(quantize_encode(x.to(DEVICE), levels, config, seed=7, out=buf[1:]), a)  # unaligned
    assert len(_kernels._LAUNCHES) == 3
    payloads = torch.stack([a, quantize_encode(x.to(DEVICE) * 2, levels, config, seed=9)])
    first = decode_sum(payloads, levels, config, 5000, scale=0.5)
    assert torch.equal(first, decode_sum(payloads, levels, config, 5000, scale=0.5))
    parts = [alq_core.dequantize(alq_core.decode(p.cpu().numpy()), levels) for p in payloads]
    np.testing.assert_array_equal(first.cpu().numpy(), (parts[0] + parts[1]) * np.float32(0.5))


@needs_cuda
def test_cuda_import_does_not_compile() -> None:
    assert hasattr(alq_torch, "quantize_encode")


_COMPILE_SCRIPT = r"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alq_torch import _kernels


def build(fn, sig, consts, warps):
    sig = dict(sig)
    sig.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": False})


sig = {"x_ptr": "*fp32", "u_ptr": "*fp32", "lv_ptr": "*fp32", "pair_ptr": "*i64", "head_ptr": "*u8", "out_ptr": "*u8",
       "m": "i32", "nb": "i32", "n_even": "i32", "ngroups": "i32", "seed": "i64", "clip_bits": "i64",
       "codes_off": "i32", "n_loop": "i32"}
for loop, noise in ((False, True), (True, False)):
    rows, g, warps, _, _ = _kernels._qpack_params(8192)
    consts = {"D": 8192, "G": g, "ROWS": rows, "BITS": 3, "L": 8, "LINF": False, "CLIP": True, "NOISE": noise,
              "LIB": True, "ROUNDS": _kernels.PHILOX_ROUNDS, "LOOP": loop, "BSEARCH": loop}
    try:
        k = build(_kernels._qpack_kernel, sig, consts, warps)
    except (FileNotFoundError, PermissionError) as exc:  # no usable ptxas here; any other error fails the test
        print("SKIP", type(exc).__name__, exc)
        raise SystemExit(0)
    ptx = k.asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx.f32" not in ptx, "inexact reciprocal"
    # given noise (bit-exact with the core): no multiply-add; device noise: only the explicit fma(., ., 1) of p + 1
    fmas = re.findall(r"fma\.rn\.f32\s+[^;]*;", ptx)
    assert (not fmas) if noise else (fmas and all(f.endswith("0f3F800000;") for f in fmas)), "fused multiply-add"
    assert "sqrt.rn.f64" in ptx, "float64 square root not correctly rounded"
    assert "ld.global.nc.v2.b32" in ptx, "level pair gather"
    assert ptx.count("div.rn.f32") == 2, "a per-element division (the only ones: r = 1/s on both paths)"
dsig = {"p_ptr": "*u8", "stride_w": "i64", "lut_ptr": "*fp32", "pair_ptr": "*i64", "out_ptr": "*fp32",
        "head_ptr": "*u8", "flag_ptr": "*i32", "m": "i32", "ngroups": "i32", "codes_off": "i32", "scale": "fp32",
        "n_w": "i32"}
for pair, bits, unroll, words in ((True, 3, 4, False), (True, 3, 8, True), (False, 6, 4, True), (True, 2, 0, True)):
    dconsts = {"D": 8192, "BITS": bits, "BLOCK": 2048, "UNROLL": unroll, "HAS_SCALE": True, "PAIR": pair,
               "LIB": True, "CHECK": True, "HW": 4, "WORDS": words}
    dk = build(_kernels._decode_sum_kernel, dsig, dconsts, 4)
    assert "fma.rn.f32" not in dk.asm["ptx"], "decode_sum fuses acc + s * l"
    assert pair == ("ld.global.nc.v2.b32" in dk.asm["ptx"]), "two-code lookup"
    assert words == ("shf.r.clamp.b32" in dk.asm["ptx"]), "aligned-word loads"
print("OK")
"""


def test_kernels_compile_for_hopper_with_exact_arithmetic() -> None:
    """Compile for sm_90 (no GPU needed): correctly rounded division, no fused multiply-add."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile for sm_90 here: {done.stdout.strip()}")
    assert done.stdout.strip().endswith("OK")


def test_launch_binds_once_then_runs_directly_and_redispatches_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct-launch bookkeeping of ``_kernels.Launch`` / ``_launch`` / ``_run`` on CPU, with a stand-in
    compiled kernel: the first call dispatches; later ones run the kept kernel with the bound arguments
    (tensors as pointers) and the new seed; a seed of another int width, or a changed launch environment,
    dispatches again; a second Launch of a cached signature runs directly from its first call."""
    from alq_torch import _kernels

    log: list[tuple[Any, ...]] = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *a: Any) -> None:
            log.append(("run", *a))

    class Jit:
        arg_names = ("x", "n", "seed", "K")
        do_not_specialize = ("seed",)  # as the quantize kernel: one compilation per seed width

        def __getitem__(self, grid: tuple[int]) -> Any:
            def dispatch(*args: Any, **kw: Any) -> Compiled:
                log.append(("dispatch", grid, *args, kw["K"]))
                return Compiled()

            return dispatch

    env = [(0, None, None)]
    monkeypatch.setattr(_kernels, "_launch_env", lambda: env[0])
    monkeypatch.setattr(_kernels, "_LAUNCHES", {})
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 70 + device, raising=False)
    x, jit = torch.zeros(4), Jit()
    launch = _kernels.Launch(jit, (3,), (x, 4, 0), {"K": 8}, {}, seed_at=2)
    launch(5)
    launch(6)
    assert log[0] == ("dispatch", (3,), x, 4, 5, 8)
    assert log[1] == ("run", 3, 1, 1, 70, "fn", "meta", None, None, None, x.data_ptr(), 4, 6, 8)
    big = 2**40  # a 64-bit seed: Triton compiles another kernel
    launch(big)
    assert log[2][:1] == ("dispatch",) and log[2][4] == big
    launch(big + 1)
    assert log[3] == ("run", 3, 1, 1, 70, "fn", "meta", None, None, None, x.data_ptr(), 4, big + 1, 8)
    env[0] = (1, None, None)  # the same seed width on another device: dispatched again
    launch(big + 2)
    assert log[4][:1] == ("dispatch",) and log[4][4] == big + 2
    launch(big + 3)
    assert log[5] == ("run", 3, 1, 1, 71, "fn", "meta", None, None, None, x.data_ptr(), 4, big + 3, 8)
    again = _kernels.Launch(jit, (3,), (x, 4, 0), {"K": 8}, {}, seed_at=2)
    again(big + 4)  # the signature is cached: straight to the kernel, the tensor as Triton takes it
    assert log[6][:10] == ("run", 3, 1, 1, 71, "fn", "meta", None, None, None)
    assert log[6][10] is x and log[6][11:] == (4, big + 4, 8)
    assert len(log) == 7
