"""The DDP communication hook on real processes (Gloo on loopback, 2 and 3 ranks).

Two spawns (one per world size) run every scenario of ``_hook_workers``; the
tests below check their results against references computed with the NumPy
core in this process.
"""

from __future__ import annotations

from typing import Any

import _hook_workers as hw
import numpy as np
import pytest
import torch
import torch.distributed as dist
from alq_core import (
    AdaptiveQuantizer,
    QuantizerConfig,
    bucket_scales,
    compute_sketch,
    default_levels,
    dequantize,
    quantize,
)
from alq_torch import ALQState, alq_hook

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with Gloo"
)

ALL = [
    "methods",
    "half",
    "warmup",
    "world1",
    "nonfinite",
    "mismatch",
    "late_mismatch",
    "ddp",
    "amp",
    "compiled",
    "plans",
    "sketch",
]


def _ok(per_rank: list[Any]) -> list[Any]:
    for r, res in enumerate(per_rank):
        if isinstance(res, dict) and "__error__" in res:
            pytest.fail(f"rank {r} raised:\n{res['__error__']}")
    return per_rank


@pytest.fixture(scope="module")
def w2() -> dict[str, list[Any]]:
    return hw.run_group(2, ALL)


@pytest.fixture(scope="module")
def w3() -> dict[str, list[Any]]:
    return hw.run_group(3, ["methods", "mismatch", "nonfinite", "sketch"])


# ----------------------------------------------------------------- references
def predicted_mse(xs: list[np.ndarray], levels: np.ndarray, cfg: QuantizerConfig) -> float:
    """E ||mean_r Q(x_r) - mean_r x_r||^2 under the core's arithmetic.

    Per coordinate, stochastic rounding between ``l_j <= v <= l_{j+1}`` has
    variance ``s^2 (l_{j+1} - v)(v - l_j)``; clipping (TernGrad) adds a bias
    ``x_clipped - x``. Independent noise across ranks: variances add, over W^2.
    """
    d, w = cfg.bucket_size, len(xs)
    bias = np.zeros(xs[0].size)
    var = 0.0
    for x in xs:
        x = x.astype(np.float32)
        xc = x.copy()
        if cfg.clip is not None:
            for b0 in range(0, x.size, d):
                seg = x[b0 : b0 + d]
                t = np.float32(cfg.clip * seg.astype(np.float64).std())
                xc[b0 : b0 + d] = np.minimum(np.maximum(seg, -t), t)
        s = np.repeat(bucket_scales(xc, cfg), d)[: x.size].astype(np.float64)
        v = np.where(s > 0, xc / np.where(s > 0, s, 1), 0.0).clip(-1, 1)
        j = np.searchsorted(levels[1:-1], v, side="right")
        lo, hi = levels[j].astype(np.float64), levels[j + 1].astype(np.float64)
        var += float(np.sum(s**2 * (hi - v) * (v - lo)))
        bias += xc.astype(np.float64) - x
    return float(np.sum((bias / w) ** 2)) + var / w**2


def inputs(step: int, index: int, world: int, dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    """Every rank's bucket as the hook saw it (rounded to ``dtype``), in float32."""
    xs = [hw.local_grad(step, index, r, hw.SIZES[index]) for r in range(world)]
    return [torch.from_numpy(x).to(dtype).float().numpy() for x in xs]


def predicted_rs(xs: list[np.ndarray], levels: np.ndarray, cfg: QuantizerConfig) -> float:
    """Reduce-scatter path: the all-gather term plus the requantization of the averaged chunks.

    The second quantization sees the *noisy* first-stage average (its scales
    are larger than the exact mean's), so its variance is predicted on a
    first stage simulated with the core (chunks sit on bucket boundaries, so
    quantizing whole vectors gives the same buckets).
    """
    rng = np.random.default_rng(12345)
    y = np.mean([dequantize(quantize(x, levels, cfg, rng=rng), levels) for x in xs], axis=0, dtype=np.float64)
    return predicted_mse(xs, levels, cfg) + predicted_mse([y.astype(np.float32)], levels, cfg)


def check_method(per_rank: list[dict[str, Any]], key: str, world: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """Identical results on all ranks; error within [0.3, 3] x predicted. Returns a log of ratios."""
    method, coll = key.split("/")
    cfg = QuantizerConfig(method, bits=3, bucket_size=hw.BUCKET)
    r0 = per_rank[0]
    log = []
    for step, outs in enumerate(r0["results"]):
        for other in per_rank[1:]:
            for a, b in zip(outs, other["results"][step]):
                assert a.dtype == dtype
                assert torch.equal(a, b), f"{key}: ranks disagree at round {step}"
        levels = r0["levels"][step]
        for i, got in enumerate(outs):
            xs = inputs(step, i, world, dtype)
            mean = np.mean(np.stack(xs).astype(np.float64), axis=0)
            mse = float(np.sum((got.float().numpy().astype(np.float64) - mean) ** 2))
            pred = predicted_rs(xs, levels, cfg) if coll == "reduce_scatter" else predicted_mse(xs, levels, cfg)
            if dtype != torch.float32:  # rounding the average to the bucket's dtype
                pred += float(np.sum((mean * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)) ** 2)) / 3
            ratio = mse / pred
            log.append(f"{key} round {step} bucket {i}: mse/predicted = {ratio:.3f}")
            assert 0.3 <= ratio <= 3.0, (
                f"{key} round {step} bucket {i}: squared error {mse:.4g} vs predicted {pred:.4g} (ratio {ratio:.3f})"
            )
    return log


def check_bits(
    per_rank: list[dict[str, Any]], key: str, world: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    """Every round equals the public ops bit for bit. All-gather: every rank's ``quantize_encode`` with
    the hook's seed, level table and version, then ``decode_sum`` of the W payloads scaled by ``1/W``.
    Reduce-scatter: per chunk, the W ranks' payloads averaged by ``decode_sum``, requantized with the
    owner's phase-2 seed and decoded. (The hook keeps one prepared exchange per bucket: a stale table,
    seed, buffer or chunk shows here.)"""
    from alq_torch import decode_sum, quantize_encode
    from alq_torch._hook import _derive_seed

    method, coll = key.split("/")
    cfg = QuantizerConfig(method, bits=3, bucket_size=hw.BUCKET, nonfinite="propagate")
    r0 = per_rank[0]
    for step, outs in enumerate(r0["results"]):
        levels, version = r0["levels"][step], r0["versions"][step]

        def encode(x: torch.Tensor, seed: int) -> torch.Tensor:
            return quantize_encode(x, levels, cfg, table_version=version, seed=seed)  # noqa: B023

        def average(payloads: torch.Tensor, n: int, scale: float) -> torch.Tensor:
            return decode_sum(payloads, levels, cfg, n, table_version=version, scale=scale)  # noqa: B023

        for i, got in enumerate(outs):
            xs = [torch.from_numpy(x).to(device=device, dtype=dtype) for x in inputs(step, i, world, dtype)]
            n = xs[0].numel()
            if coll == "allgather":
                payloads = torch.stack([encode(x, _derive_seed(0, step, i, r, 1, 0)) for r, x in enumerate(xs)])
                want = average(payloads, n, 1.0 / world)
            else:
                nb = -(-n // hw.BUCKET)
                edges = [min(n, (k * nb // world) * hw.BUCKET) for k in range(world + 1)]
                parts = []
                for k in range(world):
                    lo, hi = edges[k], edges[k + 1]
                    payloads = torch.stack(
                        [encode(x[lo:hi], _derive_seed(0, step, i, r, 1, k)) for r, x in enumerate(xs)]
                    )
                    owned = average(payloads, hi - lo, 1.0 / world)
                    parts.append(average(encode(owned, _derive_seed(0, step, i, k, 2, k))[None], hi - lo, 1.0))
                want = torch.cat(parts)
            assert torch.equal(got, want.to(dtype).cpu()), f"{key}: round {step} bucket {i} differs from the ops"


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("world", [2, 3])
def test_every_method_identical_on_all_ranks_and_within_predicted_variance(
    world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]
) -> None:
    res = _ok((w2 if world == 2 else w3)["methods"])
    keys = [k for k in res[0] if k != "fp32"]
    assert len(keys) == 2 * len(hw.QUANTIZED)
    for key in keys:
        check_method([res[r][key] for r in range(world)], key, world)
        assert res[0][key]["modes"][-1] == [key.split("/")[1]] * 2


@pytest.mark.parametrize("world", [2, 3])
def test_rounds_equal_the_ops_bit_for_bit(world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]) -> None:
    res = _ok((w2 if world == 2 else w3)["methods"])
    for key in (k for k in res[0] if k != "fp32"):
        check_bits([res[r][key] for r in range(world)], key, world)
        # persistent buffers: a bucket's prepared exchange is kept while its level table is, rebuilt on a new one
        kept, versions = res[0][key]["plans_kept"], res[0][key]["versions"]
        for step in range(1, len(versions)):
            assert kept[step - 1] == [versions[step] == versions[step - 1]] * len(hw.SIZES), (key, step)
    assert any(v != 0 for v in res[0]["alq/allgather"]["versions"]), "the level table never changed"


@pytest.mark.parametrize("world", [2, 3])
def test_fp32_is_the_exact_average(world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]) -> None:
    res = _ok((w2 if world == 2 else w3)["methods"])
    for i, got in enumerate(res[0]["fp32"]["results"][0]):
        mean = np.mean(np.stack(inputs(0, i, world)).astype(np.float64), axis=0)
        np.testing.assert_allclose(got.numpy(), mean, rtol=1e-6, atol=1e-9)
    assert res[0]["fp32"]["modes"] == [["allreduce", "allreduce"]]


def test_adaptive_levels_update_and_versions_advance_in_step(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["methods"])
    for method in ("alq", "alq-n", "amq", "amq-n", "alq-e", "alq-einf"):
        for coll in ("allgather", "reduce_scatter"):
            r0, r1 = res[0][f"{method}/{coll}"], res[1][f"{method}/{coll}"]
            assert r0["versions"] == r1["versions"]
            for a, b in zip(r0["levels"], r1["levels"]):
                np.testing.assert_array_equal(a, b)
            upd = r0["updates"][0]
            assert upd is not None, "round 0 is an update round"
            assert r0["versions"][1] == upd[1]
            assert r0["versions"][1] > r0["versions"][0], upd
    for method in ("qsgd", "qsgdinf", "nuqsgd", "trn"):
        r0 = res[0][f"{method}/allgather"]
        assert r0["versions"] == [0, 0, 0] and r0["updates"] == [None, None, None]
        cfg = QuantizerConfig(method, bits=3, bucket_size=hw.BUCKET)
        np.testing.assert_array_equal(r0["levels"][2], default_levels(cfg))


def merged_sketch(step: int, world: int, cfg: QuantizerConfig, poison: bool = False) -> Any:
    """The core's sketch of every rank's DDP buckets of round ``step`` (rank by rank, bucket by bucket)."""
    samples = []
    for r in range(world):
        for i, n in enumerate(hw.SIZES):
            g = hw.local_grad(step, i, r, n)
            if poison and r == 1 and i == 0:
                g[2 * hw.BUCKET + 3] = np.nan
            samples.append(g)
    return compute_sketch(samples, cfg)


@pytest.mark.parametrize("world", [2, 3])
def test_empirical_methods_fit_the_merged_sketch_of_all_ranks(
    world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]
) -> None:
    """alq-e / alq-einf: every rank holds the table the core fits to the merged sketch of all ranks' gradients."""
    check_sketch_methods(_ok((w2 if world == 2 else w3)["methods"]), world)


def check_sketch_methods(res: list[dict[str, Any]], world: int) -> None:
    """The ``methods`` scenario's alq-e / alq-einf tables against the core's fit to the merged sketch."""
    for method in ("alq-e", "alq-einf"):
        cfg = QuantizerConfig(method, bits=3, bucket_size=hw.BUCKET)
        q = AdaptiveQuantizer(cfg, **hw.schedule_kwargs())
        for step in (0, 1):
            rep = q.update(merged_sketch(step, world, cfg), step)
            assert rep.updated or step, rep
            for coll in ("allgather", "reduce_scatter"):
                for r in range(world):
                    got = res[r][f"{method}/{coll}"]
                    np.testing.assert_array_equal(
                        got["levels"][step + 1], q.levels, err_msg=f"{method}/{coll} rank {r}"
                    )
                    assert got["versions"][step + 1] == q.version
                assert res[0][f"{method}/{coll}"]["updates"][step][0] == rep.updated


@pytest.mark.parametrize("world", [2, 3])
def test_sketch_updates_skip_nonfinite_buckets_and_keep_the_table_without_data(
    world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]
) -> None:
    check_sketch_scenario(_ok((w2 if world == 2 else w3)["sketch"]), world)


def check_sketch_scenario(res: list[dict[str, Any]], world: int) -> None:
    """The ``sketch`` scenario: clean, non-finite and all-zero update rounds."""
    cfg = QuantizerConfig("alq-einf", bits=3, bucket_size=hw.BUCKET)
    q = AdaptiveQuantizer(cfg, schedule=[0, 1, 2])
    for step in (0, 1):
        q.update(merged_sketch(step, world, cfg, poison=step == 1), step)
        for r in range(world):
            np.testing.assert_array_equal(res[r]["levels"][step], q.levels, err_msg=f"round {step} rank {r}")
    r0 = res[0]
    buckets = world * sum(-(-n // hw.BUCKET) for n in hw.SIZES)
    assert r0["updates"][0][2] == buckets
    assert "1 non-finite buckets left out" in r0["updates"][1][1] and r0["updates"][1][2] == buckets - 1
    # round 2: every gradient is zero: nothing to fit, the table and its version stay, the reason says why
    updated, reason, _ = r0["updates"][2]
    assert not updated and reason, reason
    for r in range(world):
        np.testing.assert_array_equal(res[r]["levels"][2], res[r]["levels"][1])
        assert res[r]["versions"][2] == res[r]["versions"][1] == res[0]["versions"][1]


def test_telemetry_bytes_and_measured_variance(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["methods"])
    r = res[0]["qsgd/allgather"]
    # fp32 exact all-reduce at W=2 sends N bytes; 3-bit payloads ~ N * (3 + 32/256) / 32 plus headers
    assert 9.0 < r["ratios"][0] < 10.3
    assert all(v is not None and v > 0 for v in r["variance"])
    assert res[0]["fp32"]["ratios"] == [1.0]


def test_a_later_mismatch_is_named_by_its_round(w2: dict[str, list[Any]]) -> None:
    for res in _ok(w2["late_mismatch"]):
        assert res["step"] == 6 and "PayloadError" in res["error"] and "version mismatch" in res["error"], res


def test_prepared_exchanges_of_buckets_ddp_no_longer_has_are_freed(w2: dict[str, list[Any]]) -> None:
    for res in _ok(w2["plans"]):
        assert res == {"before": [0, 1], "after": [0]}


def test_half_precision_buckets_keep_their_dtype(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["half"])
    for name, dt, coll in (("float16", torch.float16, "allgather"), ("bfloat16", torch.bfloat16, "reduce_scatter")):
        check_method([res[0][name], res[1][name]], f"alq/{coll}", 2, dt)
    check_bits([res[0]["float16"], res[1]["float16"]], "alq/allgather", 2, dtype=torch.float16)
    check_bits([res[0]["bfloat16"], res[1]["bfloat16"]], "alq/reduce_scatter", 2, dtype=torch.bfloat16)


def test_warmup_rounds_are_exact(w2: dict[str, list[Any]]) -> None:
    r = _ok(w2["warmup"])[0]["alq"]
    assert r["modes"] == [["allreduce", "allreduce"], ["allreduce", "allreduce"], ["allgather", "allgather"]]
    for step in (0, 1):
        for i, got in enumerate(r["results"][step]):
            mean = np.mean(np.stack(inputs(step, i, 2)).astype(np.float64), axis=0)
            np.testing.assert_allclose(got.numpy(), mean, rtol=1e-6, atol=1e-9)
    # stats of warm-up rounds still fit the levels: round 0 was an update round
    assert r["updates"][0] is not None and r["versions"][2] >= 1


def test_world_size_one_passes_gradients_through(w2: dict[str, list[Any]]) -> None:
    r = _ok(w2["world1"])[0]["alq"]
    for step, outs in enumerate(r["results"]):
        for i, got in enumerate(outs):
            np.testing.assert_array_equal(got.numpy(), hw.local_grad(step, i, 0, hw.SIZES[i]))
    assert r["modes"] == [["local", "local"]] * 2 and r["step"] == 2


@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_buckets_propagate_as_nan_on_every_rank(
    world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]
) -> None:
    res = _ok((w2 if world == 2 else w3)["nonfinite"])
    d = hw.BUCKET
    for coll in ("allgather", "reduce_scatter"):
        outs = [res[r][coll] for r in range(world)]
        for o in outs[1:]:
            assert torch.equal(torch.isnan(outs[0]), torch.isnan(o))
            assert torch.equal(torch.nan_to_num(outs[0]), torch.nan_to_num(o))
        bad = torch.isnan(outs[0])
        expect = torch.zeros_like(bad)
        expect[3 * d : 4 * d] = True
        expect[7 * d : 8 * d] = True
        assert torch.equal(bad, expect), f"{coll}: NaN exactly in the two poisoned buckets"


@pytest.mark.parametrize("world", [2, 3])
def test_table_version_mismatch_is_a_clear_error(
    world: int, w2: dict[str, list[Any]], w3: dict[str, list[Any]]
) -> None:
    res = _ok((w2 if world == 2 else w3)["mismatch"])
    for r in range(world):
        for coll in ("allgather", "reduce_scatter"):
            assert "PayloadError" in res[r][coll] and "level-table version mismatch" in res[r][coll], res[r][coll]


def test_ddp_warmup_is_bit_identical_to_no_hook(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["ddp"])
    for r in range(2):
        exact, warm = res[r]["exact"], res[r]["warm"]
        for step in (0, 1):
            for a, b in zip(exact[step], warm[step]):
                assert torch.equal(a, b), f"rank {r} warm-up round {step} differs from DDP without a hook"
        assert any(not torch.equal(a, b) for a, b in zip(exact[2], warm[2])), "round 2 must be quantized"
    modes = res[0]["warm_modes"]
    assert {m for m, _, _ in modes[0]} == {"allreduce"} and {r for _, r, _ in modes[1]} == {"warmup"}
    assert sorted(modes[2], key=lambda t: t[2]) == [("allreduce", "small", 8448), ("allgather", None, 34186)]


def test_ddp_gradients_identical_on_all_ranks(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["ddp"])
    for key in ("warm", "accum"):
        for step, (a, b) in enumerate(zip(res[0][key], res[1][key])):
            for ga, gb in zip(a, b):
                assert torch.equal(ga, gb), f"{key} round {step}"


def test_ddp_no_sync_accumulation(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["ddp"])
    r0 = res[0]
    assert r0["accum_step"] == 2, "one communication round per optimizer step, whatever the micro-batches"
    # round 0 is a warm-up (exact) round: the accumulated gradient equals DDP without a hook
    for a, b in zip(r0["accum"][0], r0["accum_exact"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["alq", "qsgdinf"])
def test_ddp_resume_from_checkpoint_is_bit_identical(method: str, w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["ddp"])
    for r in range(2):
        first, second, v1, v2 = res[r][f"resume/{method}"]
        assert v1 == v2
        for step, (a, b) in enumerate(zip(first, second)):
            for ga, gb in zip(a, b):
                assert torch.equal(ga, gb), f"rank {r}: resumed round {step + 2} differs"


def test_ddp_compiled_model(w2: dict[str, list[Any]]) -> None:
    """The module compiled inside DDP (graph split at DDP's buckets, the hook between the pieces):
    the warm-up round equals DDP without a hook bit for bit; later rounds are quantized, identical on
    both ranks, and as far from the exact average as the eager run's (bucket layouts, and so noise
    seeds, differ: DDP rebuilds its buckets in the compiled gradients' ready order)."""
    res = _ok(w2["compiled"])
    assert res[0]["pieces"] >= 2, "the compiled graph was not split at DDP's buckets"
    assert res[0]["compiled_modes"][0] == ["allreduce"] and res[0]["compiled_modes"][2] == ["allgather"] * 3

    def rel_err(got: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
        num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(got, exact))
        return num / sum(float(b.double().square().sum()) for b in exact)

    for step in range(3):
        for a, b in zip(res[0]["compiled"][step], res[1]["compiled"][step]):
            assert torch.equal(a, b), f"round {step}: ranks disagree"
    for r in range(2):
        exact, eager, compiled = res[r]["exact"], res[r]["eager"], res[r]["compiled"]
        for a, b in zip(compiled[0], exact[0]):
            assert torch.equal(a, b), f"rank {r}: the compiled warm-up round differs from DDP without a hook"
        e_eager, e_compiled = rel_err(eager[1], exact[1]), rel_err(compiled[1], exact[1])
        assert 0 < e_compiled < 1 and 0 < e_eager < 1, (e_eager, e_compiled)  # 3 bits, 2 ranks: about 0.32
        assert 1 / 3 < e_compiled / e_eager < 3, (e_eager, e_compiled)


def test_ddp_amp_overflow_is_skipped_like_without_hook(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["amp"])
    for r in range(2):
        assert res[r]["unchanged"], f"rank {r}: the overflow step must be skipped"
        assert res[r]["scale"] == 2.0**9
        assert res[r]["moved"], f"rank {r}: the next (finite) step must apply"


# ----------------------------------------------------------------- no process group needed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timing_spans_record_on_the_current_stream() -> None:
    from alq_torch._telemetry import _Span, current_stream

    dev = torch.device("cuda", torch.cuda.current_device())
    assert current_stream(dev) == torch.cuda.current_stream(dev)
    assert current_stream(torch.device("cuda")) == torch.cuda.current_stream()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(side):
        assert current_stream(dev) == side
        span = _Span(dev)
        span.start()
        torch.cuda._sleep(10**7)  # type: ignore[no-untyped-call]
        span.stop()
    assert current_stream(dev) == torch.cuda.current_stream(dev) != side
    seconds = span.seconds(block=True)
    assert seconds is not None and seconds > 1e-4  # the events bracket the sleep on the side stream


def test_state_validates_its_arguments() -> None:
    cfg = QuantizerConfig("alq", bits=3, bucket_size=256)
    with pytest.raises(TypeError, match=r"must be an alq_core\.QuantizerConfig"):
        ALQState("alq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`collective` must be one of"):
        ALQState(cfg, collective="ring")
    with pytest.raises(ValueError, match="`warmup_steps` must be an integer >= 0"):
        ALQState(cfg, warmup_steps=-1)
    with pytest.raises(ValueError, match="`measure_variance` must be a bool"):
        ALQState(cfg, measure_variance=-2)
    with pytest.raises(TypeError, match="`state` must be an ALQState"):
        alq_hook(object(), None)  # type: ignore[arg-type]


def test_state_dict_round_trip_and_config_check() -> None:
    cfg = QuantizerConfig("amq", bits=3, bucket_size=256)
    st = ALQState(cfg, seed=3)
    st.step = 41
    sd = st.state_dict()
    st2 = ALQState(cfg)
    st2.load_state_dict(sd)
    assert st2.step == 41 and st2.seed == 3 and st2.table_version == st.table_version
    np.testing.assert_array_equal(st2.levels, st.levels)
    with pytest.raises(ValueError, match="checkpoint was saved with"):
        ALQState(QuantizerConfig("amq", bits=2, bucket_size=256)).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"expected an ALQState\.state_dict"):
        st2.load_state_dict({"format": 99})


def test_nonfinite_policy_is_propagate() -> None:
    st = ALQState(QuantizerConfig("alq", bits=3, bucket_size=256, nonfinite="raise"))
    assert st.config.nonfinite == "propagate"


def test_device_header_flags_are_reported_once_per_round() -> None:
    """The per-round bookkeeping of the decode kernels' header-check flags (host flags stand in for the GPU's)."""
    from alq_core import PayloadError
    from alq_torch import _hook

    state = ALQState(QuantizerConfig("alq", bits=3, bucket_size=64))
    flags = torch.zeros(_hook._MAX_FLAGS, dtype=torch.int32)
    state._flags, state._flags_used, state.step = flags, True, 7
    state.check()  # all clear: nothing raised, the flags consumed
    assert not state._flags_used and not state._pending
    state._flags_used = True
    flags[[2, _hook._MAX_FLAGS - 1]] = 1
    with pytest.raises(PayloadError, match=r"step 6, bucket\(s\) \[2, 255\] \(index 255 stands for all higher ones\)"):
        state.check()
    assert int(flags.sum()) == 0, "the flags are cleared once read"
    state._flags_used = True
    state.check()  # the failure was reported once
