"""The DDP hook on CUDA tensors across processes: the same scenarios and checks as the Gloo CPU tests.

``nccl``: two ranks on two GPUs (the deployment). ``gloo-cuda``: two ranks sharing one GPU through Gloo's
CUDA collectives (NCCL refuses two ranks on one device), so the hook's CUDA path (prepared launches on the
current stream, device header checks, half-precision decode, DDP and AMP) runs across real processes on a
1-GPU machine too. Run on the GPU machine (the lead does)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src python -m pytest packages/alq-torch/tests/test_hook_gpu.py -q
"""

from __future__ import annotations

from typing import Any

import _hook_workers as hw
import pytest
import torch
import torch.distributed as dist
from test_hook import _ok, check_bits, check_method, check_sketch_methods, check_sketch_scenario

BACKENDS = [
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
            reason="needs 2 CUDA GPUs and NCCL",
        ),
    ),
    pytest.param("gloo-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def g2(request: pytest.FixtureRequest) -> dict[str, list[Any]]:
    names = ["methods", "half", "nonfinite", "mismatch", "late_mismatch", "ddp", "amp", "plans", "sketch"]
    return hw.run_group(2, names, backend=request.param)


def test_cuda_every_method_identical_and_within_predicted_variance(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["methods"])
    for key in (k for k in res[0] if k != "fp32"):
        check_method([res[0][key], res[1][key]], key, 2)
        check_bits([res[0][key], res[1][key]], key, 2, "cuda")
        kept, versions = res[0][key]["plans_kept"], res[0][key]["versions"]
        for step in range(1, len(versions)):  # prepared exchanges kept while the level table is
            assert kept[step - 1] == [versions[step] == versions[step - 1]] * len(hw.SIZES), (key, step)


def test_cuda_sketch_level_updates_equal_the_core(g2: dict[str, list[Any]]) -> None:
    """alq-e / alq-einf on the GPU (the Triton sketch kernel): every rank holds the core's table for the
    merged sketch; non-finite buckets are left out and counted; all-zero rounds keep the table."""
    check_sketch_methods(_ok(g2["methods"]), 2)
    check_sketch_scenario(_ok(g2["sketch"]), 2)


def test_cuda_prepared_exchanges_of_buckets_ddp_no_longer_has_are_freed(g2: dict[str, list[Any]]) -> None:
    for res in _ok(g2["plans"]):
        assert res == {"before": [0, 1], "after": [0]}


def test_cuda_half_precision(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["half"])
    for name, dt, coll in (("float16", torch.float16, "allgather"), ("bfloat16", torch.bfloat16, "reduce_scatter")):
        check_method([res[0][name], res[1][name]], f"alq/{coll}", 2, dt)
    check_bits([res[0]["float16"], res[1]["float16"]], "alq/allgather", 2, "cuda", torch.float16)
    check_bits([res[0]["bfloat16"], res[1]["bfloat16"]], "alq/reduce_scatter", 2, "cuda", torch.bfloat16)


def test_cuda_nonfinite_propagates(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["nonfinite"])
    for coll in ("allgather", "reduce_scatter"):
        bad = torch.isnan(res[0][coll])
        assert torch.equal(bad, torch.isnan(res[1][coll]))
        assert int(bad.sum()) == 2 * hw.BUCKET


def test_cuda_version_mismatch_raises(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["mismatch"])
    for r in range(2):
        for coll in ("allgather", "reduce_scatter"):
            msg = res[r][coll]
            assert "PayloadError" in msg and ("version mismatch" in msg or "header did not match" in msg), msg


def test_cuda_a_later_mismatch_is_named_by_its_round(g2: dict[str, list[Any]]) -> None:
    for res in _ok(g2["late_mismatch"]):
        assert res["step"] == 6, res
        assert "step 6, bucket(s) [0, 1]" in res["error"], res["error"]


def test_cuda_ddp_warmup_exact_identical_ranks_and_resume(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["ddp"])
    for step in range(3):
        for a, b in zip(res[0]["warm"][step], res[1]["warm"][step]):
            assert torch.equal(a, b)
    for step in (0, 1):  # NCCL and Gloo sum in a fixed order: warm-up rounds equal DDP without a hook
        for a, b in zip(res[0]["exact"][step], res[0]["warm"][step]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for method in ("alq", "qsgdinf"):
        first, second, _, _ = res[0][f"resume/{method}"]
        for a, b in zip(first, second):
            for ga, gb in zip(a, b):
                assert torch.equal(ga, gb)


def test_cuda_amp_overflow_skipped(g2: dict[str, list[Any]]) -> None:
    res = _ok(g2["amp"])
    for r in range(2):
        assert res[r]["unchanged"] and res[r]["moved"] and res[r]["scale"] == 2.0**9
