"""The training harness: end-to-end runs per method, CLI outputs, resume, models and schedules."""

from __future__ import annotations

import csv
import json
import math
import os

import alq_core
import pytest
import torch
from alq_torch.train import RunConfig, build_model, load_digits_data, main, num_parameters, train_run
from alq_torch.train.cli import ALL_METHODS, build_parser
from alq_torch.train.loop import GradientComputer, _load_checkpoint

CPU = torch.device("cpu")
TINY = ["--model", "mlp-16", "--workers", "4", "--batch-size", "8", "--bucket-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits_data()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_short_run_per_method_is_consistent(method: str, digits) -> None:  # type: ignore[no-untyped-def]
    run = RunConfig(
        method=method, bucket_size=256, workers=4, batch_size=8, steps=6, model="mlp-16", update_steps=(0, 3)
    )
    res, model, _sim = train_run(run, digits, device=CPU, progress=False)
    assert res is not None
    assert 0.0 <= res.final_val_acc <= 1.0
    assert 0.0 <= res.best_val_acc <= 1.0
    assert res.num_params == num_parameters(model)
    assert res.bits_per_step == 8 * alq_core.payload_size(run.quantizer_config(), res.num_params)
    assert [h["step"] for h in res.history if "val_acc" in h][-1] == 6
    assert 0.0 <= res.quantize_share <= 1.0 and 0.0 <= res.update_share <= 1.0
    if method == "fp32":
        assert res.final_variance == 0.0
        assert res.quantize_seconds == 0.0
    else:
        assert math.isfinite(res.final_variance) and res.final_variance > 0
    if method in ("alq", "alq-n", "amq", "amq-n"):
        assert res.num_updates == 2
        assert len(res.levels) == 3  # initial table + two updates
        assert res.update_seconds > 0
    else:
        assert res.num_updates == 0 and res.update_seconds == 0.0


def test_cli_writes_table_json_csv_and_plots(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cmp"
    rc = main(["--methods", "all", "--seeds", "0,1", "--steps", "8", "--update-steps", "0,4", *TINY, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for m in ALL_METHODS:
        assert f"\n{m} " in printed
    for f in ("results.json", "results.csv", "table.txt", "config.json", "accuracy.png", "variance.png", "levels.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    payload = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in payload["summary"]}
    assert set(rows) == set(ALL_METHODS)
    assert len(payload["runs"]) == 2 * len(ALL_METHODS)
    for r in rows.values():
        assert 0.0 <= r["val_acc_mean"] <= 1.0
        assert r["seeds"] == 2 and r["workers"] == 4
    assert rows["fp32"]["variance"] == 0 and rows["fp32"]["variance_same_grads"] == 0
    same = payload["same_gradient_variance"]
    assert all(len(v) == 2 for v in same.values())
    for m in ("alq", "alq-n", "amq", "amq-n"):
        assert rows[m]["variance_same_grads"] < rows["nuqsgd"]["variance_same_grads"], (m, rows[m], rows["nuqsgd"])
    assert rows["alq"]["bits_per_step"] < rows["fp32"]["bits_per_step"] / 8
    with open(out / "results.csv", newline="") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == list(ALL_METHODS)


def _run_records(out: str) -> dict[str, dict]:  # type: ignore[type-arg]
    recs = {}
    for f in sorted(os.listdir(os.path.join(out, "runs"))):
        with open(os.path.join(out, "runs", f)) as fh:
            d = json.load(fh)
        recs[f] = {k: d[k] for k in ("final_val_acc", "final_val_loss", "final_variance", "num_updates", "levels")}
        recs[f]["history"] = d["history"]
    return recs


def test_resume_continues_identically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    common = [
        "--methods",
        "alq,qsgdinf",
        "--seeds",
        "0",
        "--steps",
        "10",
        "--update-steps",
        "0,3,6",
        "--no-plots",
        *TINY,
    ]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main([*common, "--out", full]) == 0
    assert main([*common, "--out", part, "--stop-at", "5"]) == 0
    assert not os.path.exists(os.path.join(part, "results.json"))
    assert main(["--resume", part, "--no-progress", "--no-plots"]) == 0
    assert _run_records(full) == _run_records(part)
    for m in ("alq", "qsgdinf"):
        a = _load_checkpoint(os.path.join(full, "checkpoints", f"{m}-s0.pt"))["model"]
        b = _load_checkpoint(os.path.join(part, "checkpoints", f"{m}-s0.pt"))["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_resume_refuses_another_runs_checkpoint(tmp_path, digits) -> None:  # type: ignore[no-untyped-def]
    ck = str(tmp_path / "run.pt")
    run = RunConfig(method="alq", bucket_size=256, workers=4, batch_size=8, steps=4, model="mlp-16")
    train_run(run, digits, device=CPU, checkpoint=ck, stop_at=2, progress=False)
    other = RunConfig(method="alq", bucket_size=256, workers=4, batch_size=8, steps=4, model="mlp-16", lr=0.5)
    with pytest.raises(ValueError, match=r"belongs to a different run; differing settings \(saved, now\): \{'lr'"):
        train_run(other, digits, device=CPU, checkpoint=ck, resume=True, progress=False)


def test_resume_refuses_a_directory_without_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match=r"no config.json there"):
        main(["--resume", str(tmp_path)])


def test_bad_flags_get_clear_errors() -> None:
    with pytest.raises(SystemExit, match=r"--methods must be 'all' or names from"):
        main(["--methods", "alq,bogus"])
    with pytest.raises(SystemExit, match=r"`bits` must be an integer in 1..8"):
        main(["--bits", "9"])
    with pytest.raises(SystemExit, match=r"--clip must be a number, 'none' or 'auto'"):
        main(["--clip", "lots"])


def test_help_lists_the_flags(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--methods",
        "--bits",
        "--bucket-size",
        "--workers",
        "--seeds",
        "--steps",
        "--epochs",
        "--lr",
        "--momentum",
        "--weight-decay",
        "--batch-size",
        "--update-steps",
        "--clip",
        "--device",
        "--preset",
        "--resume",
        "--out",
    ):
        assert flag in text


def test_lr_schedule_and_level_schedule() -> None:
    run = RunConfig(steps=80000, lr=0.1, update_steps=(0, 100, 2000), update_every=10000)
    assert run.lr_at(0) == 0.1 and run.lr_at(39999) == 0.1
    assert run.lr_at(40000) == pytest.approx(0.01) and run.lr_at(60000) == pytest.approx(0.001)
    due = [s for s in range(0, 40001) if run.update_due(s)]
    assert due == [0, 100, 2000, 12000, 22000, 32000]


@pytest.mark.parametrize(("depth", "params"), [(20, 269722), (32, 464154)])
def test_cifar_resnets_have_the_papers_sizes(depth: int, params: int) -> None:
    # He et al. 2016 report 0.27M and 0.46M parameters for ResNet-20 and ResNet-32 (option A).
    net = build_model(f"resnet{depth}", (3, 32, 32), 10)
    assert num_parameters(net) == params


def test_models_forward_and_errors() -> None:
    net = build_model("resnet8", (3, 32, 32), 10)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("mlp", (64,), 10)(torch.zeros(5, 64)).shape == (5, 10)
    with pytest.raises(ValueError, match=r"needs image inputs"):
        build_model("resnet20", (64,), 10)
    with pytest.raises(ValueError, match=r"unknown model 'vgg'"):
        build_model("vgg", (64,), 10)
    with pytest.raises(ValueError, match=r"depth must be 6n\+2"):
        build_model("resnet21", (3, 32, 32), 10)


def test_batched_worker_gradients_equal_a_loop() -> None:
    torch.manual_seed(0)
    net = build_model("mlp-8", (64,), 10)
    xs, ys = torch.randn(3, 5, 64), torch.randint(0, 10, (3, 5))
    gc = GradientComputer(net)
    assert gc.batched
    g1, l1 = gc(xs, ys)
    gc.batched = False
    g2, l2 = gc(xs, ys)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert l1 == pytest.approx(l2, rel=1e-5)
