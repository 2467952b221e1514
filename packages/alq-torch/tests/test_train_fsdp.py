"""The harness under torchrun with --fsdp: FSDP2 (2 ranks), hybrid sharding (2 x 2 ranks), resume, flag errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _torchrun import torchrun
from alq_torch.train import main
from alq_torch.train.fsdp import from_local, shard_units
from alq_torch.train.models import build_model
from alq_torch.train.settings import layout_of

#: A tiny MLP on the built-in digits: Linear(64, 31) splits into uneven shards (16 + 15 rows) over 2 ranks.
ARGS = [
    "--methods",
    "fp32,alq",
    "--seeds",
    "0",
    "--steps",
    "40",
    "--update-steps",
    "0,10",
    "--model",
    "mlp-31",
    "--bits",
    "3",
    "--lr",
    "0.3",
    "--batch-size",
    "16",
    "--bucket-size",
    "256",
    "--eval-every",
    "10",
    "--device",
    "cpu",
    "--no-progress",
    "--no-plots",
]


def _runs(out: os.PathLike[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    payload = json.loads((out / "results.json").read_text())  # type: ignore[operator]
    return {r["method"]: r for r in payload["runs"]}


def _shards(path: os.PathLike[str]) -> dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and data only
    model: dict[str, torch.Tensor] = ck["model"]
    assert all(type(t) is torch.Tensor for t in model.values())
    return model


def test_fsdp_run_of_the_harness_and_its_resume_is_bit_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, part = tmp_path / "fsdp", tmp_path / "part"
    proc = torchrun("--fsdp", *ARGS, "--out", str(out))
    assert "FSDP 2 ranks" in proc.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["mode"] == "fsdp"
    assert payload["layout"] == {"kind": "fsdp", "world": 2, "replicas": 1, "shard_size": 2, "mode": "fsdp-gloo-2"}
    assert json.loads((out / "config.json").read_text())["layout"] == payload["layout"]
    rows = {r["method"]: r for r in payload["summary"]}
    runs = _runs(out)
    for m in ("fp32", "alq"):
        assert runs[m]["mode"] == "fsdp-gloo-2" and runs[m]["workers"] == 2
        assert rows[m]["val_acc_mean"] >= 0.6, (m, rows[m]["val_acc_mean"])  # chance: 0.1
    assert rows["fp32"]["variance"] == 0
    # measured by the FSDP comm on each rank's own payloads, averaged over the ranks; 3 bits: well below 1
    assert 0 < rows["alq"]["variance"] < 1, rows["alq"]["variance"]
    logged = [h["variance"] for h in runs["alq"]["history"] if "variance" in h]
    # step 0 quantizes with the initial table (fitted at the end of that round): higher
    assert len(logged) >= 2 and all(math.isfinite(v) and v > 0 for v in logged) and max(logged[1:]) < 1, logged
    # bytes actually sent by a rank (telemetry): 3-bit payloads against FSDP's float32 reduce-scatter
    assert 0 < runs["alq"]["bits_per_step"] < runs["fp32"]["bits_per_step"] / 4
    assert runs["alq"]["num_updates"] == 2 and len(runs["alq"]["levels"]) == 3
    # per-rank checkpoints of the local shards, uneven over the ranks
    shapes = [tuple(_shards(out / "checkpoints" / f"alq-s0.pt.rank{r}")["net.1.weight"].shape) for r in (0, 1)]
    assert shapes == [(16, 64), (15, 64)]

    # stopped half way and resumed from the per-rank checkpoints: bit-identical to the uninterrupted run
    torchrun("--fsdp", *ARGS, "--out", str(part), "--stop-at", "20")
    assert not (part / "results.json").exists()
    torchrun("--resume", str(part), "--no-progress", "--no-plots")
    resumed = _runs(part)
    for m, r in runs.items():
        for key in ("history", "levels", "final_val_acc", "final_val_loss", "bits_per_step", "num_updates"):
            assert resumed[m][key] == r[key], (m, key)
        for rank in (0, 1):
            name = f"{m}-s0.pt.rank{rank}"
            a, b = _shards(out / "checkpoints" / name), _shards(part / "checkpoints" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_hybrid_fsdp_run_of_the_harness(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "hsdp"
    proc = torchrun("--fsdp", "--shard-size", "2", *ARGS, "--out", str(out), nproc=4)
    assert "hybrid FSDP 2x2 ranks" in proc.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["mode"] == "hsdp"
    assert payload["layout"]["mode"] == "hsdp-gloo-2x2" and payload["layout"]["replicas"] == 2
    runs = _runs(out)
    for m in ("fp32", "alq"):
        assert runs[m]["mode"] == "hsdp-gloo-2x2" and runs[m]["workers"] == 4
        assert runs[m]["final_val_acc"] >= 0.5, (m, runs[m]["final_val_acc"])
    assert math.isfinite(runs["alq"]["final_val_loss"])
    assert 0 < runs["alq"]["final_variance"] < 1  # the shards' quantization across the groups
    # only the traffic across the 2 groups is counted: quantized against an exact all-reduce
    assert 0 < runs["alq"]["bits_per_step"] < runs["fp32"]["bits_per_step"] / 4
    # ranks 0 and 2 hold the same shard in the two replicas (mesh [[0, 1], [2, 3]]): equal after training
    ck = [_shards(out / "checkpoints" / f"alq-s0.pt.rank{r}") for r in range(4)]
    for k in ck[0]:
        assert torch.equal(ck[0][k], ck[2][k]) and torch.equal(ck[1][k], ck[3][k]), k
    assert ck[0]["net.1.weight"].shape == (16, 64) and ck[1]["net.1.weight"].shape == (15, 64)


def test_fsdp_flags_get_clear_errors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=r"--fsdp shards the model .* got WORLD_SIZE=1 \(not under torchrun\); fix:"):
        main(["--fsdp"])
    with pytest.raises(SystemExit, match=r"needs --fsdp; got --shard-size 2 without --fsdp; fix: add --fsdp"):
        main(["--shard-size", "2"])
    (tmp_path / "config.json").write_text(json.dumps({"layout": {"mode": "fsdp-gloo-2", "world": 2}}))
    with pytest.raises(SystemExit, match=r"trained under torchrun \(fsdp-gloo-2, 2 ranks\).*fix: torchrun"):
        main(["--resume", str(tmp_path)])
    # under torchrun (checked before the process group starts)
    monkeypatch.setenv("WORLD_SIZE", "4")
    for bad in ("3", "0", "8"):
        with pytest.raises(SystemExit, match=rf"must divide the world size 4 .* one of \[1, 2, 4\]; got {bad}; fix"):
            main(["--fsdp", "--shard-size", bad])
    with pytest.raises(SystemExit, match=r"--exact-1d is only implemented for simulated workers, not under torchrun"):
        main(["--fsdp", "--exact-1d"])
    for flags in (["--amp", "bf16"], ["--channels-last"]):
        with pytest.raises(SystemExit, match=r"--amp and --channels-last are only implemented for simulated workers"):
            main(["--fsdp", *flags])


def test_layouts_and_shard_units() -> None:
    assert layout_of(False, None, 2).mode("gloo") == "ddp-gloo-2"
    assert layout_of(True, None, 8).mode("nccl") == "fsdp-nccl-8"
    assert layout_of(True, 8, 8).kind == "fsdp"
    hsdp = layout_of(True, 4, 16)
    assert (hsdp.kind, hsdp.replicas, hsdp.shard, hsdp.mode("nccl")) == ("hsdp", 4, 4, "hsdp-nccl-4x4")
    mlp = build_model("mlp-8", (64,), 10)
    assert [type(u).__name__ for u in shard_units(mlp)] == ["Linear"] * 3
    resnet = build_model("resnet8", (3, 32, 32), 10)
    assert [type(u).__name__ for u in shard_units(resnet)] == ["Conv2d", "BatchNorm2d", *["_BasicBlock"] * 3, "Linear"]
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"written by layout 'fsdp-gloo-2'; this job is 'hsdp-gloo-2x2'; fix: resume"):
        from_local(
            {"layout": "fsdp-gloo-2"}, model=mlp, opt=opt, mode="hsdp-gloo-2x2", path="x", device=torch.device("cpu")
        )
