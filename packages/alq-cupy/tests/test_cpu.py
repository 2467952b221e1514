"""Tests that run everywhere (CI has no CuPy and no GPU): packaging, import hygiene, noise, headers."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import alq_core
import alq_cupy
import numpy as np
import pytest
from alq_core.testing import strategies as cst
from alq_cupy._comm import chunks, derive_seed
from alq_cupy._header import check_header, payload_offsets
from alq_cupy._noise import _mix_int, check_seed, counter_noise_host, seed_key
from alq_cupy_gate import GPU_OK
from hypothesis import given
from hypothesis import strategies as st


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)


def test_import_without_cupy_works_and_ops_name_the_pip_command() -> None:
    proc = _run(
        """
        import sys
        sys.modules["cupy"] = None          # make `import cupy` fail like an absent install
        import alq_cupy, alq_core
        try:
            alq_cupy.quantize([1.0, 2.0], alq_core.uniform_levels(3), alq_core.QuantizerConfig("qsgd"))
        except ImportError as exc:
            print("ERR", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERR alq_cupy needs CuPy" in proc.stdout
    assert "pip install 'alq-cupy[cuda12]'" in proc.stdout
    assert "'alq-cupy[cuda13]'" in proc.stdout


def test_importing_never_imports_cupy_nor_compiles() -> None:
    proc = _run(
        """
        import sys
        import alq_cupy
        print("cupy" in sys.modules, "cupy.cuda.nccl" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.skipif(GPU_OK, reason="checks the no-GPU error; a GPU is present")
def test_without_a_gpu_the_error_names_the_fix() -> None:
    pytest.importorskip("cupy", reason="checks the no-GPU message of an installed CuPy; CuPy is not installed")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU visible to CuPy.*alq-cupy\[cuda12\]"):
        alq_cupy.quantize(np.ones(4, np.float32), alq_core.uniform_levels(2), alq_core.QuantizerConfig("qsgd", bits=2))


def test_all_is_sorted_public_and_documented() -> None:
    assert alq_cupy.__all__ == sorted(alq_cupy.__all__)
    public = {n for n in dir(alq_cupy) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(alq_cupy, n)).__name__ == "module"}
    assert set(alq_cupy.__all__) == public - modules
    undocumented = [n for n in alq_cupy.__all__ if not getattr(alq_cupy, n).__doc__]
    assert undocumented == []


def test_ops_mirror_core_signatures() -> None:
    import inspect

    for name in ("quantize", "dequantize", "encode", "decode", "pack_codes", "unpack_codes", "bucket_scales"):
        core_params = list(inspect.signature(getattr(alq_core, name)).parameters)
        ours = list(inspect.signature(getattr(alq_cupy, name)).parameters)
        core_params = ["seed" if p == "rng" else p for p in core_params]
        assert ours == core_params, name


# ------------------------------------------------------------------------------------------- noise


def _scalar_noise(seed: int, k: int) -> np.float32:
    h = _mix_int(seed_key(seed) + (k // 2 + 1) * 0x9E3779B97F4A7C15)
    bits = (h >> 40) if k % 2 == 0 else (h >> 16) & 0xFFFFFF
    return np.float32(bits / 2**24)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**40), st.integers(0, 40))
def test_counter_noise_host_matches_a_scalar_loop(seed: int, start: int, m: int) -> None:
    u = counter_noise_host(m, seed, start)
    assert u.dtype == np.float32
    assert u.shape == (m,)
    assert [float(v) for v in u] == [float(_scalar_noise(seed, start + i)) for i in range(m)]


def test_counter_noise_host_is_uniform_in_unit_interval_and_seeded() -> None:
    u = counter_noise_host(200_000, 7)
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = np.bincount((u * 16).astype(int), minlength=16) / u.size
    assert np.all(np.abs(hist - 1 / 16) < 0.004), hist
    assert abs(float(np.corrcoef(u[:-1], u[1:])[0, 1])) < 0.01
    assert np.array_equal(u, counter_noise_host(200_000, 7))
    assert not np.array_equal(u[:100], counter_noise_host(100, 8))
    assert np.array_equal(u[1000:1100], counter_noise_host(100, 7, start=1000))


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3"])
def test_seed_validation(bad: object) -> None:
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*64\)"):
        check_seed(bad)


def test_derived_seeds_differ() -> None:
    seeds = {derive_seed(s, k) for s in (0, 1, 2**63) for k in range(16)}
    assert len(seeds) == 48


# ------------------------------------------------------------------------------------------- chunks


@given(st.integers(0, 100_000), st.integers(1, 5000), st.integers(1, 9))
def test_chunks_cover_in_whole_buckets(n: int, d: int, w: int) -> None:
    parts = chunks(n, d, w)
    assert len(parts) == w
    assert parts[0].start == 0
    assert parts[-1].stop == n
    for a, b in itertools.pairwise(parts):
        assert a.stop == b.start
    for c in parts:
        assert c.size >= 0
        assert c.start % d == 0 or c.start == n


# ------------------------------------------------------------------------------------------- headers


@given(cst.configs(), st.integers(0, 3000))
def test_payload_offsets_match_core_layout(config: alq_core.QuantizerConfig, n: int) -> None:
    off_s, off_c, off_t, end = payload_offsets(config, n)
    assert end == alq_core.payload_size(config, n)
    assert off_s == alq_core.HEADER_SIZE
    if config.quantized:
        assert off_c - off_s == 4 * config.num_buckets(n)
        assert off_t - off_c == alq_core.packed_size(config.num_quantized(n), config.code_bits)


def _core_error(payload: bytes, **kw: object) -> str | None:
    try:
        alq_core.decode(payload, **kw)  # type: ignore[arg-type]
    except alq_core.PayloadError as exc:
        return str(exc)
    return None


def _our_error(payload: bytes, **kw: object) -> str | None:
    levels = kw.pop("levels", None)
    crc = alq_core.table_checksum(alq_core.validate_levels(levels)) if levels is not None else None
    try:
        check_header(payload[:40], len(payload), table_crc=crc, **kw)  # type: ignore[arg-type]
    except alq_core.PayloadError as exc:
        return str(exc)
    return None


@given(cst.configs(max_bucket=40), st.integers(0, 200), st.data())
def test_header_checks_give_the_core_messages(config: alq_core.QuantizerConfig, n: int, data: st.DataObject) -> None:
    levels = alq_core.default_levels(config)
    rng = np.random.default_rng(n)
    q = alq_core.quantize(rng.standard_normal(n).astype(np.float32), levels, config, rng=rng)
    good = alq_core.encode(q, levels, table_version=5)
    other = alq_core.QuantizerConfig("qsgd" if config.method != "qsgd" else "nuqsgd", bits=config.bits)
    cases = [
        (good, {}),
        (good, {"config": config, "levels": levels, "table_version": 5}),
        (good, {"table_version": 6}),
        (good, {"config": other}),
        (good[: data.draw(st.integers(0, len(good) - 1))], {}),
        (good + b"\0" * data.draw(st.integers(1, 9)), {}),
        (b"XLQW" + good[4:], {}),
        (good[:10] + bytes([good[10] ^ 0xFF]) + good[11:], {}),
    ]
    if config.quantized:
        wrong = levels.copy()
        wrong[1] = np.nextafter(wrong[1], np.float32(2)) if wrong.size > 2 else wrong[1]
        if wrong.size > 2:
            cases.append((good, {"levels": wrong}))
    for payload, kw in cases:
        core = _core_error(payload, **dict(kw))
        ours = _our_error(payload, **dict(kw))
        if core is not None and "negative scale" not in core and "payload holds code" not in core:
            assert ours == core
        elif core is None:
            assert ours is None


def test_header_count_mismatch_is_reported() -> None:
    cfg = alq_core.QuantizerConfig("qsgd", bits=2, bucket_size=4)
    q = alq_core.quantize(np.ones(8, np.float32), alq_core.uniform_levels(2), cfg, rng=np.random.default_rng(0))
    payload = alq_core.encode(q, alq_core.uniform_levels(2))
    with pytest.raises(alq_core.PayloadError, match="payload holds 8 elements, expected 9"):
        check_header(payload[:40], len(payload), count=9)


# ------------------------------------------------------------------------------------------- NCCL ids


def test_unique_id_normalizes_cupy14_bytes_and_older_signed_tuples() -> None:
    from alq_cupy._comm import unique_id_bytes

    raw = bytes((37 * i + 200) % 256 for i in range(128))
    assert unique_id_bytes(raw) == raw
    signed = tuple(b - 256 if b > 127 else b for b in raw)
    assert min(signed) < 0
    assert unique_id_bytes(signed) == raw
    assert unique_id_bytes(list(raw)) == raw
    assert unique_id_bytes(bytes.fromhex(raw.hex())) == raw  # the from_file round trip
    with pytest.raises(ValueError, match="`unique_id` must hold 128 bytes; got 127"):
        unique_id_bytes(raw[:127])
    with pytest.raises(TypeError, match="`unique_id` must be the 128 bytes from nccl_unique_id"):
        unique_id_bytes("abc")
    with pytest.raises(TypeError, match="`unique_id` must be the 128 bytes from nccl_unique_id"):
        unique_id_bytes((300,) * 128)


def test_nccl_communicator_gets_bytes_or_falls_back_to_signed_chars() -> None:
    from alq_cupy._comm import _new_nccl_comm

    raw = bytes((37 * i + 200) % 256 for i in range(128))
    seen: list[object] = []

    class Cupy14:
        def NcclCommunicator(self, ndev: int, comm_id: bytes, rank: int) -> str:
            if not isinstance(comm_id, bytes):
                raise TypeError("expected bytes")
            seen.append(comm_id)
            return "comm14"

    class Cupy13:
        def NcclCommunicator(self, ndev: int, comm_id: tuple[int, ...], rank: int) -> str:
            if not isinstance(comm_id, tuple):
                raise TypeError("expected tuple")
            seen.append(comm_id)
            return "comm13"

    assert _new_nccl_comm(Cupy14(), 2, raw, 1) == "comm14"
    assert _new_nccl_comm(Cupy13(), 2, raw, 1) == "comm13"
    assert seen[0] == raw
    assert seen[1] == tuple(b - 256 if b > 127 else b for b in raw)


def test_sketch_ops_name_the_pip_command_without_cupy() -> None:
    proc = _run(
        """
        import sys
        sys.modules["cupy"] = None
        import alq_cupy, alq_core
        for op in (alq_cupy.sketch_sums, alq_cupy.level_sketch):
            try:
                op([1.0, 2.0], alq_core.QuantizerConfig("alq-einf", bits=3, bucket_size=2))
            except ImportError as exc:
                print("ERR", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ERR alq_cupy needs CuPy") == 2 and "alq-cupy[cuda12]" in proc.stdout


def test_sketch_kernel_grid_constants_are_the_cores() -> None:
    """The CUDA sketch kernel hard-codes the grid (bins per sign, first exponent, bins per octave): they must be
    ``alq_core._sketch``'s, else the GPU bins differ from the core's."""
    import re

    from alq_core import _sketch as core_sketch
    from alq_cupy import _kernels

    defines = dict(re.findall(r"#define (ALQ_SK_\w+) (\S+)", _kernels.SOURCE))
    assert int(defines["ALQ_SK_MAG"]) == core_sketch.MAG_BINS
    assert int(defines["ALQ_SK_EXP0"]) == 127 - core_sketch.OCTAVES
    assert core_sketch.PER_OCTAVE == 32 and "(a >> 18) & 31u" in _kernels.SOURCE  # 5 mantissa bits
    assert core_sketch.NUM_BINS == 1282
