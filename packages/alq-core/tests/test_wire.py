import struct
import zlib

import numpy as np
import pytest
from alq_core import (
    HEADER_SIZE,
    PayloadError,
    QuantizerConfig,
    decode,
    decode_header,
    default_levels,
    dequantize,
    encode,
    pack_codes,
    packed_size,
    payload_size,
    quantize,
    table_checksum,
    uniform_levels,
    unpack_codes,
)
from alq_core.testing import assert_quantized_equal, reference_pack, reference_unpack
from alq_core.testing import strategies as S
from hypothesis import given
from hypothesis import strategies as st


@given(bits=S.bits, count=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_matches_reference(bits, count, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == packed_size(count, bits) == -(-count // 8) * bits
    assert packed.tobytes() == reference_pack(codes, bits)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)
    np.testing.assert_array_equal(reference_unpack(packed.tobytes(), bits, count), codes)


def test_bit_layout_by_hand():
    # 3-bit codes 1, 2, 3, 4, 5, 6, 7, 0 -> bits LSB-first:
    # 1=100 2=010 3=110 4=001 5=101 6=011 7=111 0=000
    # stream: 100 010 110 001 101 011 111 000
    # byte0 = bits 0-7  = 1,0,0,0,1,0,1,1 -> 0b11010001 = 0xD1
    # byte1 = bits 8-15 = 0,0,0,1,1,0,1,0 -> 0b01011000 = 0x58
    # byte2 = bits 16-23= 1,1,1,1,1,0,0,0 -> 0b00011111 = 0x1F
    assert pack_codes(np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8), 3).tobytes() == bytes([0xD1, 0x58, 0x1F])
    # 1-bit codes pad to a whole byte; 2-bit codes: four per byte, first code lowest.
    assert pack_codes(np.array([1, 0, 1], np.uint8), 1).tobytes() == bytes([0b101])
    assert pack_codes(np.array([3, 0, 1, 2, 1], np.uint8), 2).tobytes() == bytes([0b10010011, 0b01])
    assert pack_codes(np.array([0xAB], np.uint8), 8).tobytes() == bytes([0xAB] + [0] * 7)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"codes must be < 2\*\*bits = 4; got max 4"):
        pack_codes(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError, match=r"need 3 bytes; got 2"):
        unpack_codes(np.zeros(2, np.uint8), 3, 5)


@given(data=st.data())
def test_payload_round_trip(data):
    config = data.draw(S.configs(method=S.methods))
    levels = data.draw(S.levels_for(config)) if config.quantized else None
    x = data.draw(S.gradients(max_size=600))
    version = data.draw(st.integers(0, 2**64 - 1))
    q = quantize(x, levels, config, rng=np.random.default_rng(0))
    payload = encode(q, levels, table_version=version)
    assert len(payload) == payload_size(config, x.size)
    back = decode(payload, config=config, levels=levels, table_version=version)
    assert_quantized_equal(back, q)
    np.testing.assert_array_equal(dequantize(back, levels), dequantize(q, levels).reshape(-1))
    head = decode_header(payload)
    assert (head.count, head.table_version, head.table_crc) == (x.size, version, table_checksum(levels))


def test_payload_size_formula():
    c = QuantizerConfig("alq", bits=3, bucket_size=8192)
    n = 25_557_032
    nb = -(-n // 8192)
    assert payload_size(c, n) == HEADER_SIZE + 4 * nb + -(-n // 8) * 3
    assert payload_size(QuantizerConfig("trn", bits=8, bucket_size=10), 20) == HEADER_SIZE + 8 + 6
    assert payload_size(QuantizerConfig("fp32"), 5) == HEADER_SIZE + 20
    f = QuantizerConfig("qsgd", bits=2, bucket_size=10, tail="full")
    assert payload_size(f, 25) == HEADER_SIZE + 8 + 6 + 20
    with pytest.raises(ValueError, match="non-negative integer"):
        payload_size(c, -1)


def _payload(config=None, n=100):
    config = config or QuantizerConfig("qsgd", bits=3, bucket_size=16)
    levels = default_levels(config)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return encode(quantize(x, levels, config, rng=np.random.default_rng(1)), levels, table_version=7), config, levels


def _reheader(payload, **fields):
    names = [
        "magic",
        "version",
        "method",
        "bits",
        "norm",
        "tail",
        "flags",
        "reserved",
        "d",
        "n",
        "tver",
        "tcrc",
        "hcrc",
    ]
    from alq_core._wire import HEADER

    values = dict(zip(names, HEADER.unpack(payload[:HEADER_SIZE])))
    values.update(fields)
    head = HEADER.pack(*[values[k] for k in names])
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    return head + payload[HEADER_SIZE:]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p[:10], r"truncated: 10 bytes, shorter than the 40-byte header"),
        (lambda p: p[:-1], r"payload truncated: \d+ bytes, header says 100 elements which need"),
        (lambda p: p + b"\0", r"payload oversized"),
        (lambda p: b"XXXX" + p[4:], r"not an ALQ payload"),
        (lambda p: p[:4] + b"\x09" + p[5:], r"unsupported payload format version 9"),
        (lambda p: p[:20] + b"\xff" + p[21:], r"header checksum mismatch"),
        (lambda p: _reheader(p, method=99), r"unknown method id 99"),
        (lambda p: _reheader(p, bits=0), r"invalid payload header: `bits`"),
        (lambda p: _reheader(p, norm=7), r"invalid payload header fields"),
        (lambda p: _reheader(p, n=2**60), r"more than the limit"),
        (lambda p: _reheader(p, n=10**9), r"payload truncated"),
        (lambda p: p[:HEADER_SIZE] + b"\x00\x00\x80\xbf" + p[HEADER_SIZE + 4 :], r"negative scale"),
    ],
)
def test_decode_rejects_corruption(mutate, match):
    payload, _, _ = _payload()
    with pytest.raises(PayloadError, match=match):
        decode(mutate(payload))


def test_decode_rejects_mismatches():
    payload, _, levels = _payload()
    with pytest.raises(PayloadError, match=r"encoded with \('qsgd', 3, 16, 'l2', 'quantize'\), expected \('qsgd', 4"):
        decode(payload, config=QuantizerConfig("qsgd", bits=4, bucket_size=16))
    with pytest.raises(PayloadError, match=r"level-table version mismatch: payload has 7, reader has 8"):
        decode(payload, table_version=8)
    other = levels.copy()
    other[3] = np.float32(-0.1)
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode(payload, levels=other)
    with pytest.raises(TypeError, match="bytes or a 1-D uint8 array"):
        decode("abc")  # type: ignore[arg-type]


def test_decode_rejects_out_of_range_ternary_codes():
    config = QuantizerConfig("trn", bucket_size=8)
    levels = default_levels(config)
    q = quantize(np.ones(8, np.float32), levels, config, noise=np.zeros(8))
    payload = bytearray(encode(q, levels))
    payload[HEADER_SIZE + 4] = 0xFF  # code 3 in a 3-level table
    with pytest.raises(PayloadError, match="code 3 but the table has 3 levels"):
        decode(bytes(payload))


def test_decode_accepts_numpy_uint8():
    payload, config, levels = _payload()
    q = decode(np.frombuffer(payload, np.uint8), config=config, levels=levels)
    assert q.n == 100


@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 8), cut=st.integers(0, 400))
def test_decode_fuzz_mutations_give_clean_error_or_valid_result(seed, flips, cut):
    payload, _, _ = _payload(n=100)
    rng = np.random.default_rng(seed)
    buf = bytearray(payload[: max(cut, 0)] if cut < len(payload) and seed % 3 == 0 else payload)
    for _ in range(flips):
        if buf:
            buf[int(rng.integers(len(buf)))] ^= 1 << int(rng.integers(8))
    try:
        q = decode(bytes(buf))
    except PayloadError:
        return
    # Accepted: it is a well-formed payload, whatever its values.
    assert len(buf) == payload_size(q.config, q.n)
    assert q.codes.size == q.config.num_quantized(q.n) and np.all(q.codes < q.config.num_levels)


@given(blob=st.binary(max_size=300))
def test_decode_fuzz_random_bytes(blob):
    with pytest.raises(PayloadError):
        decode(blob)


def test_encode_needs_levels():
    config = QuantizerConfig("qsgd")
    q = quantize(np.ones(4, np.float32), uniform_levels(3), config, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs the level table"):
        encode(q)
