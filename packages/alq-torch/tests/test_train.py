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
from alq_torch.train.settings import resolve

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
    if alq_core.METHODS[method].adaptive:
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


def test_clip_reaches_the_quantizers_and_leaves_fp32_unclipped() -> None:
    # The rebuttal's Fig. 1 clips every quantized method; full precision has nothing to clip and stays the baseline.
    fp32 = RunConfig(method="fp32", clip=2.5).quantizer_config()
    qsgdinf = RunConfig(method="qsgdinf", clip=2.5).quantizer_config()
    assert fp32.clip is None and qsgdinf.clip == 2.5
    s = resolve(build_parser().parse_args(["--methods", "fp32,qsgdinf", "--clip", "2.5"]))  # validation agrees
    assert s["clip"] == 2.5


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


class _NotPlainData:
    """Stands for any pickled object: a weights-only load must never construct it."""

    built = 0

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_NotPlainData._build, ())

    @staticmethod
    def _build() -> _NotPlainData:
        _NotPlainData.built += 1
        return _NotPlainData()


def test_checkpoints_are_weights_only_and_refuse_pickled_objects(tmp_path, digits) -> None:  # type: ignore[no-untyped-def]
    ck = str(tmp_path / "run.pt")
    run = RunConfig(method="alq", bucket_size=256, workers=4, batch_size=8, steps=4, model="mlp-16")
    train_run(run, digits, device=CPU, checkpoint=ck, stop_at=2, progress=False)
    saved = torch.load(ck, weights_only=True)  # holds only tensors and plain data
    assert saved["state"]["step"] == 2 and isinstance(saved["aug"], torch.Tensor)
    saved["sim"]["evil"] = _NotPlainData()
    torch.save(saved, ck)  # bypasses _save_checkpoint, as a foreign or tampered file would
    with pytest.raises(ValueError, match=r"run\.pt' could not be read as a weights-only checkpoint .*Fix: delete it"):
        train_run(run, digits, device=CPU, checkpoint=ck, resume=True, progress=False)
    assert _NotPlainData.built == 0
    with open(ck, "wb") as fh:
        fh.write(b"truncated")
    with pytest.raises(ValueError, match=r"could not be read as a weights-only checkpoint"):
        _load_checkpoint(ck)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt' does not exist"):
        _load_checkpoint(str(tmp_path / "nope.pt"))


def test_checkpoint_writer_converts_numpy_and_refuses_other_objects(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from alq_torch.train.loop import _save_checkpoint

    ck = str(tmp_path / "x.pt")
    _save_checkpoint(ck, {"a": np.arange(3, dtype=np.float32), "b": np.float64(0.5), "c": (1, [np.int64(2)])})
    assert _load_checkpoint(ck) == {"a": [0.0, 1.0, 2.0], "b": 0.5, "c": (1, [2])}
    with pytest.raises(TypeError, match=r"checkpoint\['s'\]\['obj'\] is a .*_NotPlainData; a checkpoint holds only"):
        _save_checkpoint(ck, {"s": {"obj": _NotPlainData()}})
    assert _load_checkpoint(ck)["b"] == 0.5  # the failed write left the old file in place


# --------------------------------------------------------------------------- measured errors, --exact-1d
ERROR_KEYS = ("top_error", "top_share", "avg_error", "err_1d", "err_nd", "worst_layer_error")


def test_runs_record_measured_errors_per_log_step_and_at_the_end(digits) -> None:  # type: ignore[no-untyped-def]
    run = RunConfig(method="alq", bucket_size=256, workers=4, batch_size=8, steps=6, model="mlp-16", log_every=2)
    res, model, _ = train_run(run, digits, device=CPU, progress=False)
    assert res is not None and not res.exact_1d
    logged = [h for h in res.history if "variance" in h]
    assert len(logged) >= 3
    for h in logged:
        for key in ERROR_KEYS:
            assert math.isfinite(h[key]), (key, h)
        assert h["top_error"] > 0 and 0 < h["top_share"] < 1 and h["avg_error"] > 0 and h["err_1d"] > 0
    fe = res.final_errors
    names = [n for n, p in model.named_parameters()]
    assert set(fe["layers"]) == set(names) and fe["worst_layer"] in names
    assert fe["worst_layer_error"] == max(fe["layers"].values())
    assert fe["top_error"] == logged[-1]["top_error"] and fe["avg_error"] == logged[-1]["avg_error"]
    # Resume compatibility: the option is absent from the signature unless it is on.
    assert "exact_1d" not in run.signature()
    assert RunConfig(exact_1d=True).signature()["exact_1d"] is True


def test_cli_exact_1d_sends_1d_tensors_exactly_and_reports_it(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from alq_torch import exact_mask_from_params

    out = tmp_path / "x1d"
    argv = ["--methods", "alq,qsgdinf,fp32", "--seeds", "0", "--steps", "6", "--update-steps", "0,3", "--exact-1d"]
    assert main([*argv, *TINY, "--log-every", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1-D tensors exact" in printed
    for name in ("alq+1d", "qsgdinf+1d", "fp32"):
        assert f"\n{name} " in printed, name
    assert "top1% err" in printed and "avg err" in printed and "qvar (own)" in printed
    assert (out / "errors.png").is_file()
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["exact_1d"] is True
    rows = {r["method"]: r for r in payload["summary"]}
    assert set(rows) == {"alq+1d", "qsgdinf+1d", "fp32"}
    assert rows["alq+1d"]["base_method"] == "alq" and rows["alq+1d"]["exact_1d"] is True
    cfg = payload["settings"]
    net = build_model("mlp-16", (64,), 10)
    mask = exact_mask_from_params(list(net.parameters()))
    n, e = int(mask.numel()), int(mask.sum())
    assert (
        rows["alq+1d"]["bits_per_step"]
        == 8 * alq_core.payload_size(alq_core.QuantizerConfig("alq", bits=cfg["bits"], bucket_size=cfg["bucket_size"]), n - e)
        + 32 * e
    )
    assert set(payload["same_gradient_variance"]) == {"alq+1d", "qsgdinf+1d", "fp32"}
    assert rows["alq+1d"]["variance_same_grads"] > 0
    for m in ("alq+1d", "qsgdinf+1d"):
        r = rows[m]
        assert r["err_1d"] == 0.0, r  # the 1-D tensors went exactly
        assert r["err_nd"] > 0 and r["top_error"] > 0 and r["avg_error"] > 0
        assert r["worst_layer"].endswith("weight")
    for run in payload["runs"]:
        assert run["exact_1d"] is True
        if run["method"] != "fp32":
            assert all(h["err_1d"] == 0.0 for h in run["history"] if "variance" in h)
    with open(out / "results.csv", newline="") as fh:
        recs = list(csv.DictReader(fh))
    assert [r["method"] for r in recs] == ["alq+1d", "qsgdinf+1d", "fp32"]
    assert {"top_error", "avg_error", "err_1d", "worst_layer", "exact_1d"} <= set(recs[0])


def test_report_tolerates_results_without_measured_errors() -> None:
    # DDP runs and results written before the measured errors existed have none of the new keys.
    from alq_torch.train.report import format_table, summarize

    base = {
        "method": "qsgd", "seed": 0, "bits": 3, "bucket_size": 64, "workers": 2, "num_params": 100, "steps": 4,
        "final_val_acc": 0.5, "final_val_loss": 1.0, "final_variance": 0.3, "bits_per_step": 800,
        "train_seconds": 1.0, "quantize_seconds": 0.1, "update_seconds": 0.0, "num_updates": 0,
        "history": [{"step": 1.0, "variance": 0.3}],
    }  # fmt: skip
    rows = summarize([base])
    assert rows[0]["method"] == "qsgd" and math.isnan(rows[0]["top_error"]) and rows[0]["worst_layer"] == ""
    assert rows[0]["variance_run_mean"] == pytest.approx(0.3)
    line = format_table(rows).splitlines()[2]
    assert line.split()[0] == "qsgd" and " - " in line
