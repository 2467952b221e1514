"""ALQ under FSDP2 on real processes (Gloo on loopback): the quantized reduce-scatter on 2 and 4 ranks,
real ``fully_shard`` training on 2, and hybrid sharding on a 2 x 2 mesh of 4 ranks.

Two spawns run every scenario of ``_fsdp_workers``; the tests check their results against the public
ops (bit for bit, with the comm's seeds), the NumPy core and the exact average.
"""

from __future__ import annotations

from typing import Any

import _fsdp_workers as fw
import numpy as np
import pytest
import torch
import torch.distributed as dist
from alq_core import AdaptiveQuantizer, QuantizerConfig, compute_sketch, compute_stats, payload_size
from alq_core import dequantize as core_dequantize
from alq_core import quantize as core_quantize
from alq_torch import decode_sum, quantize_encode
from alq_torch._exchange import _derive_seed as derive_seed
from test_hook import predicted_mse

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with Gloo"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """The reference ops on tiny tensors: intra-op threads only contend (15 ms per op on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ok(per_rank: list[Any]) -> list[Any]:
    for r, res in enumerate(per_rank):
        if isinstance(res, dict) and "__error__" in res:
            pytest.fail(f"rank {r} raised:\n{res['__error__']}")
    return per_rank


@pytest.fixture(scope="module")
def w2() -> dict[str, list[Any]]:
    return fw.run_group(2, ["methods", "half", "exact", "mismatch", "fsdp"])


@pytest.fixture(scope="module")
def w4() -> dict[str, list[Any]]:
    return fw.run_group(4, ["methods", "mismatch", "hybrid"])


def _cfg(method: str, **kw: Any) -> QuantizerConfig:
    return QuantizerConfig(method, bits=3, bucket_size=fw.BUCKET, nonfinite="propagate", **kw)


def reduce_scatter_ops(
    inputs: list[torch.Tensor],
    method: str,
    levels: Any,
    version: int,
    step: int,
    index: int,
    seed: int = 0,
    scale: float | None = None,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """What every rank's output must be: chunk ``r`` of every rank ``q``'s input, ``quantize_encode``-d with
    seed ``(seed, step, index, q, 1, r)``, then ``decode_sum`` of the W payloads (scaled by ``1/W``)."""
    cfg = _cfg(method)
    world = len(inputs)
    n = inputs[0].numel() // world
    inputs = [x.to(device) for x in inputs]
    outs = []
    for r in range(world):
        payloads = torch.stack(
            [
                quantize_encode(
                    x[r * n : (r + 1) * n],
                    levels,
                    cfg,
                    table_version=version,
                    seed=derive_seed(seed, step, index, q, 1, r),
                )
                for q, x in enumerate(inputs)
            ]
        )
        outs.append(
            decode_sum(
                payloads, levels, cfg, n, table_version=version, scale=1.0 / world if scale is None else scale
            ).cpu()
        )
    return outs


def check_methods(res: list[dict[str, Any]], world: int, device: str = "cpu") -> None:
    for method in fw.QUANTIZED:
        per = [res[r][method] for r in range(world)]
        for r in range(1, world):  # ranks never disagree on tables
            assert per[r]["versions"] == per[0]["versions"], method
            for a, b in zip(per[r]["levels"], per[0]["levels"]):
                np.testing.assert_array_equal(a, b, err_msg=method)
        cfg = _cfg(method)
        for step, levels in enumerate(per[0]["levels"]):
            version = per[0]["versions"][step]
            for i, _ in enumerate(fw.SHARDS):
                xs = [torch.from_numpy(fw.rs_input(step, i, q, world)) for q in range(world)]
                want = reduce_scatter_ops(xs, method, levels, version, step, i, device=device)
                n = fw.SHARDS[i]
                for r in range(world):
                    got = per[r]["results"][step][i]
                    assert torch.equal(got, want[r]), f"{method} round {step} call {i} rank {r} differs from the ops"
                    chunks = [x[r * n : (r + 1) * n].numpy() for x in xs]
                    mean = np.mean(np.stack(chunks).astype(np.float64), axis=0)
                    mse = float(np.sum((got.numpy().astype(np.float64) - mean) ** 2))
                    ratio = mse / predicted_mse(chunks, levels, cfg)
                    assert 0.25 <= ratio <= 4.0, f"{method} round {step} call {i} rank {r}: mse/predicted {ratio:.3f}"
                    if (
                        i == 0 and step == 0 and method in ("qsgd", "alq") and device == "cpu"
                    ):  # the core, on the same noise
                        core = np.zeros(n, dtype=np.float32)
                        for q, c in enumerate(chunks):
                            g = torch.Generator().manual_seed(derive_seed(0, step, i, q, 1, r))
                            u = torch.rand(cfg.num_quantized(n), generator=g).numpy()
                            core += core_dequantize(core_quantize(c, levels, cfg, noise=u), levels)
                        np.testing.assert_allclose(got.numpy(), core / world, rtol=2e-6, atol=1e-9)
        modes = per[0]["modes"][-1]
        assert [m[:2] for m in modes] == [("quantized", None)] * len(fw.SHARDS)
        for (_, _, sent, exact), n in zip(modes, fw.SHARDS):  # telemetry: payloads vs FSDP's float32 chunks
            assert sent == (world - 1) * payload_size(cfg, n) and exact == (world - 1) * n * 4


@pytest.mark.parametrize("world", [2, 4])
def test_every_method_equals_the_ops_bit_for_bit_and_stays_within_its_variance(
    world: int, w2: dict[str, list[Any]], w4: dict[str, list[Any]]
) -> None:
    check_methods(_ok((w2 if world == 2 else w4)["methods"]), world)


@pytest.mark.parametrize("world", [2, 4])
def test_adaptive_tables_are_the_cores_fit_to_every_ranks_chunks(
    world: int, w2: dict[str, list[Any]], w4: dict[str, list[Any]]
) -> None:
    res = _ok((w2 if world == 2 else w4)["methods"])
    for method in ("alq", "alq-n", "amq", "amq-n", "alq-e", "alq-einf"):
        cfg = QuantizerConfig(method, bits=3, bucket_size=fw.BUCKET)
        q = AdaptiveQuantizer(cfg, schedule=[0, 1])
        for step in (0, 1):
            chunks = [
                fw.rs_input(step, i, r, world)[k * n : (k + 1) * n]
                for r in range(world)
                for i, n in enumerate(fw.SHARDS)
                for k in range(world)
            ]
            stats = (
                compute_sketch(chunks, cfg) if cfg.spec.stats == "empirical" else compute_stats(chunks, cfg.bucket_size)
            )
            q.update(stats, step)
            for r in range(world):
                got = res[r][method]
                np.testing.assert_allclose(
                    got["levels"][step + 1], q.levels, rtol=1e-5, atol=1e-7, err_msg=f"{method} rank {r}"
                )
                assert got["versions"][step + 1] == q.version == step + 1
    for method in ("qsgd", "nuqsgd", "trn"):
        assert res[0][method]["versions"] == [0, 0, 0] and res[0][method]["updates"] == [None] * 3


def test_fp32_and_warmup_rounds_are_fsdps_own_reduce_scatter(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["methods"])
    for r in range(2):
        for i, n in enumerate(fw.SHARDS):
            xs = [fw.rs_input(0, i, q, 2)[r * n : (r + 1) * n] for q in range(2)]
            np.testing.assert_allclose(res[r]["fp32"]["results"][0][i].numpy(), (xs[0] + xs[1]) / 2, rtol=1e-6)
    assert res[0]["fp32"]["modes"][0][0][:2] == ("exact", "fp32")
    warm = _ok(w2["exact"])[0]["warmup"]
    assert [[m[:2] for m in ms] for ms in warm["modes"]] == [[("exact", "warmup")] * 2] * 2 + [
        [("quantized", None)] * 2
    ]
    for i, n in enumerate(fw.SHARDS):
        xs = [fw.rs_input(0, i, q, 2)[:n] for q in range(2)]
        np.testing.assert_allclose(warm["results"][0][i].numpy(), (xs[0] + xs[1]) / 2, rtol=1e-6)
    assert warm["updates"][0] is not None and warm["versions"][2] == 2  # warm-up rounds still fit the levels


def test_half_precision_keeps_its_dtype_and_fsdps_reduce_op(w2: dict[str, list[Any]]) -> None:
    res = _ok(w2["half"])
    for name, dt, scale in (("bfloat16", torch.bfloat16, 0.5), ("float16", torch.float16, 1.0)):
        per = [res[r][name] for r in range(2)]
        for step, levels in enumerate(per[0]["levels"]):
            for i, _ in enumerate(fw.SHARDS):
                xs = [torch.from_numpy(fw.rs_input(step, i, q, 2)).to(dt) for q in range(2)]
                want = reduce_scatter_ops(xs, "alq", levels, per[0]["versions"][step], step, i, scale=scale)
                for r in range(2):
                    got = per[r]["results"][step][i]
                    assert got.dtype == dt and torch.equal(got, want[r].to(dt)), (name, step, i, r)


@pytest.mark.parametrize("world", [2, 4])
def test_wrong_version_or_corrupted_payload_names_rank_and_bucket(
    world: int, w2: dict[str, list[Any]], w4: dict[str, list[Any]]
) -> None:
    res = _ok((w2 if world == 2 else w4)["mismatch"])
    for r in range(world):
        version, corrupt = res[r]["version"], res[r]["corrupt"]
        sender = 0 if r == 1 else 1  # rank 1 jumped ahead; the others see rank 1's payload, rank 1 sees rank 0's
        assert version.startswith("PayloadError: ALQReduceScatter step 0, bucket 0: the payload from rank "), version
        assert f"from rank {sender}:" in version and "version mismatch" in version, version
        assert "bucket 0: the payload from rank 1: payload header checksum mismatch" in corrupt, corrupt


# ------------------------------------------------------------------ real FSDP2
def test_fsdp_training_every_call_equals_the_ops_and_the_exact_average_within_variance(
    w2: dict[str, list[Any]],
) -> None:
    res = _ok(w2["fsdp"])
    calls = [res[r]["calls/True"] for r in range(2)]
    assert len(calls[0]) == 4 * 3  # 4 rounds x 3 modules owning gradients (the unused layer and the root: none)
    cfg = _cfg("alq")
    pred_sum = mse_sum = 0.0
    # the table of each round: the core's fit to the recorded inputs of the update rounds (0 and 2)
    q = AdaptiveQuantizer(QuantizerConfig("alq", bits=3, bucket_size=fw.BUCKET), schedule=[0, 2])
    by_round: dict[int, list[int]] = {}
    for j, c in enumerate(calls[0]):
        by_round.setdefault(c[0], []).append(j)
    own_error = {(r, step): [0.0, 0.0] for r in range(2) for step in (0, 2)}  # measure_variance=2: rounds 0, 2
    for step, idx in sorted(by_round.items()):
        levels, version = q.levels, q.version
        chunks_all = []
        for j in idx:
            _, index, _, _ = calls[0][j]
            xs = [calls[r][j][2] for r in range(2)]
            n = xs[0].numel() // 2
            for r in range(2) if step in (0, 2) else ():  # each rank's own payloads against its own chunks
                for k in range(2):
                    chunk = xs[r][k * n : (k + 1) * n]
                    seed = derive_seed(5, step, index, r, 1, k)
                    payload = quantize_encode(chunk, levels, cfg, table_version=version, seed=seed)
                    deq = decode_sum(payload[None], levels, cfg, n, table_version=version)
                    own_error[(r, step)][0] += float((deq.double() - chunk.double()).square().sum())
                    own_error[(r, step)][1] += float(chunk.double().square().sum())
            want = reduce_scatter_ops(xs, "alq", levels, version, step, index, seed=5)
            for r in range(2):
                assert torch.equal(calls[r][j][3], want[r]), f"round {step} call {index} rank {r}"
                chunks = [x[r * n : (r + 1) * n].numpy() for x in xs]
                mean = np.mean(np.stack(chunks).astype(np.float64), axis=0)
                mse_sum += float(np.sum((calls[r][j][3].numpy().astype(np.float64) - mean) ** 2))
                pred_sum += predicted_mse(chunks, levels, cfg)
            chunks_all += [x[k * n : (k + 1) * n].numpy() for x in xs for k in range(2)]
        if step in (0, 2):
            q.update(compute_stats(chunks_all, fw.BUCKET), step)
    assert 0.6 <= mse_sum / pred_sum <= 1.6, mse_sum / pred_sum
    for r in range(2):  # telemetry's measured variance: the rank's own payloads, every 2nd round
        want_var = [own_error[(r, st)][0] / own_error[(r, st)][1] if st in (0, 2) else None for st in range(4)]
        got_var = res[r]["variance/True"]
        assert [v is None for v in got_var] == [v is None for v in want_var], got_var
        np.testing.assert_allclose(
            [v for v in got_var if v is not None], [v for v in want_var if v is not None], rtol=1e-6
        )
    np.testing.assert_allclose(res[0]["tables/True"][0], q.levels, rtol=1e-5, atol=1e-7)
    for r in range(2):
        assert res[r]["tables/True"][1] == q.version == 2
        np.testing.assert_array_equal(res[r]["tables/True"][0], res[0]["tables/True"][0])
    # training follows the exact run closely (3 bits, 4 steps)
    exact_losses, alq_losses = res[0]["exact"][0], res[0]["alq/True"][0]
    assert exact_losses[0] == alq_losses[0]
    assert max(abs(a - b) for a, b in zip(exact_losses, alq_losses)) < 0.05, (exact_losses, alq_losses)


def test_fsdp_rounds_unused_parameters_and_reshard_after_forward(w2: dict[str, list[Any]]) -> None:
    for r0 in _ok(w2["fsdp"]):
        assert r0["steps/True"] == r0["steps/False"] == 4  # one round per backward pass, ended by autograd
        assert r0["modes/True"] == r0["modes/False"]
        assert [[m[1] for m in rnd] for rnd in r0["modes/True"]] == [["quantized"] * 3] * 4
        # unused layer: no gradient, no call; uneven shards: 61x10+10 and 97x31+97 padded to even rows
        grads = r0["alq/True"][1][0]
        assert [g is None for g in grads] == [False, False, False, False, True, True, False, False]
        # reshard_after_forward True or False: the same calls, the same bits
        for ga, gb in zip(r0["alq/True"][1], r0["alq/False"][1]):
            for a, b in zip(ga, gb):
                assert (a is None and b is None) or torch.equal(a, b)
        assert r0["alq/True"][0] == r0["alq/False"][0]


def test_fsdp_gradient_accumulation_quantizes_only_the_syncing_backward(w2: dict[str, list[Any]]) -> None:
    for r0 in _ok(w2["fsdp"]):
        (ex_losses, ex_steps, ex_calls, _), (q_losses, q_steps, q_calls, tables) = r0["accum/exact"], r0["accum/alq"]
        assert ex_steps == q_steps == 3  # one round per optimizer step, not per backward pass
        assert [(st, i) for st, i, _ in q_calls] == [(st, i) for st in range(3) for i in range(3)]
        for (_, _, a), (_, _, b) in zip(ex_calls[:3], q_calls[:3]):
            assert torch.equal(a, b)  # step 0: the quantized comm got FSDP's accumulated gradient
        assert ex_losses[:2] == q_losses[:2]
        assert max(abs(a - b) for a, b in zip(ex_losses, q_losses)) < 0.05, (ex_losses, q_losses)
        assert tables[1] == 2  # level updates at rounds 0 and 2 (round numbers count optimizer steps)


def test_fsdp_warmup_is_bit_identical_to_fsdp_and_resume_is_bit_identical(w2: dict[str, list[Any]]) -> None:
    for r0 in _ok(w2["fsdp"]):
        assert r0["warm"][0] == r0["exact"][0]
        for ga, gb in zip(r0["warm"][1], r0["exact"][1]):
            for a, b in zip(ga, gb):
                assert (a is None and b is None) or torch.equal(a, b)
        for method in ("alq", "alq-einf"):
            first, second, t1, t2 = r0[f"resume/{method}"]
            assert first[0] == second[0], method
            for ga, gb in zip(first[1], second[1]):
                for a, b in zip(ga, gb):
                    assert (a is None and b is None) or torch.equal(a, b), method
            np.testing.assert_array_equal(t1[0], t2[0])
            assert t1[1] == t2[1] == 3


# ------------------------------------------------------------------ hybrid
def test_hybrid_intra_group_exact_inter_group_quantized_and_bytes(w4: dict[str, list[Any]]) -> None:
    res = _ok(w4["hybrid"])
    cfg = _cfg("alq")
    for r in range(4):
        assert res[r]["native_hsdp"].startswith("hybrid=True quantizes the replicate dimension"), res[r]["native_hsdp"]
        for t, t0 in zip(res[r]["tables"], res[0]["tables"]):  # ranks never disagree on tables
            np.testing.assert_array_equal(t[0], t0[0])
            assert t[1] == t0[1]
        # intra-group: the hook's input at round 0 is FSDP's exact reduce-scatter within the group
        first = [c for c in res[r]["calls"] if c[0] == 0]
        assert len(first) == len(res[r]["group_average"]) == 3
        for c, exact in zip(first, res[r]["group_average"]):
            assert torch.equal(c[2], exact)
    assert [t[1] for t in res[0]["tables"]] == [0, 1, 2, 2]
    # inter-group: replicate groups {0, 2} and {1, 3}; every output is the ops' average of the two groups' payloads
    for group in ([0, 2], [1, 3]):
        assert res[group[0]]["replicate_ranks"] == group
        for j, (step, index, _, _out) in enumerate(res[group[0]]["calls"]):
            levels, version = res[0]["tables"][step]
            xs = [res[q]["calls"][j][2] for q in group]
            payloads = torch.stack(
                [
                    quantize_encode(x, levels, cfg, table_version=version, seed=derive_seed(0, step, index, q, 1, 0))
                    for q, x in zip(group, xs)
                ]
            )
            want = decode_sum(payloads, levels, cfg, xs[0].numel(), table_version=version, scale=0.5)
            for q in group:
                assert torch.equal(res[q]["calls"][j][3], want), (group, step, index, q)
    # bytes across groups: one payload per call and rank, the compressed size
    for r in range(4):
        sizes = [payload_size(cfg, c[2].numel()) for c in res[r]["calls"]]
        assert res[r]["moved"] == sizes
        recs = [b for rnd in res[r]["records"] for b in rnd]
        assert [b[3] for b in recs] == sizes  # (R - 1) * payload with R = 2
        assert all(b[1] == "allgather" and b[3] < b[4] / 7 for b in recs)


# ------------------------------------------------------------------ CUDA
GPU_BACKENDS = [
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
            reason="needs 2 CUDA GPUs and NCCL",
        ),
    ),
    pytest.param("gloo-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.fixture(scope="module", params=GPU_BACKENDS)
def g2(request: pytest.FixtureRequest) -> dict[str, list[Any]]:
    return fw.run_group(2, ["methods", "mismatch", "fsdp"], backend=request.param)


@pytest.mark.gpu
def test_cuda_every_method_equals_the_ops_and_training_resumes_bit_identically(g2: dict[str, list[Any]]) -> None:
    """The Triton path (Philox noise, device header flags) on two ranks: the same checks as on the CPU."""
    check_methods(_ok(g2["methods"]), 2, "cuda")
    for r0 in _ok(g2["fsdp"]):
        assert r0["steps/True"] == 4 and r0["warm"][0] == r0["exact"][0]
        for method in ("alq", "alq-einf"):
            first, second, _, _ = r0[f"resume/{method}"]
            assert first[0] == second[0], method
        assert max(abs(a - b) for a, b in zip(r0["exact"][0], r0["alq/True"][0])) < 0.05


@pytest.mark.gpu
def test_cuda_mismatch_names_rank_and_bucket(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["mismatch"])
    for r in range(2):
        sender = 0 if r == 1 else 1
        for kind in ("version", "corrupt"):
            text = res[r][kind]
            assert text.startswith("PayloadError: ALQReduceScatter step 0") and "bucket 0 from rank" in text, text
        assert f"bucket 0 from rank {sender}" in res[r]["version"], res[r]["version"]
        assert "bucket 0 from rank 1" in res[r]["corrupt"], res[r]["corrupt"]
