"""The harness under torchrun: a 2-process Gloo run with the ALQ communication hook."""

from __future__ import annotations

import json

from _torchrun import torchrun as _torchrun


def test_two_process_gloo_run_of_the_harness(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ddp"
    part = tmp_path / "part"
    args = [
        "--methods",
        "fp32,nuqsgd,alq",
        "--seeds",
        "0",
        "--steps",
        "8",
        "--update-steps",
        "0,4",
        "--model",
        "mlp-16",
        "--batch-size",
        "8",
        "--bucket-size",
        "256",
        "--device",
        "cpu",
        "--no-progress",
        "--no-plots",
    ]
    proc = _torchrun(*args, "--out", str(out))
    assert "DDP 2 ranks" in proc.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["mode"] == "ddp"
    rows = {r["method"]: r for r in payload["summary"]}
    assert set(rows) == {"fp32", "nuqsgd", "alq"}
    for r in rows.values():
        assert r["workers"] == 2
        assert 0.0 <= r["val_acc_mean"] <= 1.0
    assert rows["fp32"]["variance"] == 0
    assert rows["nuqsgd"]["variance"] > 0 and rows["alq"]["variance"] > 0
    runs = {r["method"]: r for r in payload["runs"]}
    assert runs["alq"]["num_updates"] == 2 and runs["nuqsgd"]["num_updates"] == 0
    assert runs["alq"]["mode"] == "ddp-gloo-2"

    # stopped half way and resumed from the per-rank checkpoints: the same histories
    _torchrun(*args, "--out", str(part), "--stop-at", "4")
    _torchrun("--resume", str(part), "--no-progress", "--no-plots")
    resumed = {r["method"]: r for r in json.loads((part / "results.json").read_text())["runs"]}
    for m, r in runs.items():
        assert resumed[m]["history"] == r["history"], m
