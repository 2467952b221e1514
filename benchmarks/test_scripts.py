"""The GPU machine's scripts in ``benchmarks/`` still run: their CPU paths, in CI (which has no GPU).

Their GPU figures come from runs on the GPU machine (``results/README.md``); this only keeps the scripts
from rotting between those runs (``hook_breakdown.py`` wraps private methods of the hook by name).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(*args: object) -> str:
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_host_overhead_on_a_fake_two_rank_group(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    out = tmp_path / "host.json"
    _run(HERE / "host_overhead.py", "--fake-world", "2", "--numel", "20000", "--calls", "3", out)
    res = json.loads(out.read_text())
    assert res["meta"]["world"] == 2 and res["meta"]["process group"].startswith("fake")
    hook_rows = [k for k in res["host_us"] if k.startswith("alq_hook, per bucket")]
    assert len(hook_rows) == 4 and all(res["host_us"][k] > 0 for k in hook_rows)


def test_hook_breakdown_on_cpu() -> None:
    pytest.importorskip("alq_torch")
    text = _run(HERE / "hook_breakdown.py", "--device", "cpu", "--numel", "20000", "--rounds", "4", "--warmup", "1")
    assert text.count("alq_hook (whole call)") == 2 and "prepared quantize" in text


def test_trace_idle_reads_the_committed_trace() -> None:
    trace = HERE / "results" / "ddp_graphs_r6_sockets.profile.ALQ_alq.trace.json.gz"
    text = _run(HERE / "trace_idle.py", trace)
    assert "idle" in text


def test_sim_workers_smoke_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    out = tmp_path / "sim.json"
    text = _run(HERE / "sim_workers.py", "--smoke", "--out", out)
    assert "bat/floor" in text
    res = json.loads(out.read_text())
    assert res["torch"] and res["device"].startswith("CPU")
    assert [(r["precision"], r["K"]) for r in res["results"]] == [("fp32", 2), ("bf16-cl", 2)]
    for r in res["results"]:
        paths = ("floor", "sequential", "batched", "batched-fbn")
        assert set(r["median_ms"]) == {f"{p}{q}" for p in paths for q in ("", "+quant")}
        assert all(v > 0 for v in r["median_ms"].values())
    assert res["results"][0]["check"]["vmap"]["grad_rel_err"] < 1e-2


def test_pack_cifar10_round_trip(tmp_path: Path) -> None:
    tree, back, packed = tmp_path / "tree", tmp_path / "back", tmp_path / "c.npz"
    files = {"train/cat/0000.png": b"\x89PNG one", "train/dog/a.JPG": b"\xff\xd8 two", "test/cat/0000.jpeg": b""}
    for rel, data in {**files, "README.md": b"not an image", ".alq-cache/x.png": b"hidden"}.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    assert "packed 3 files" in _run(HERE / "pack_cifar10.py", "pack", tree, packed)
    assert "unpacked 3 files" in _run(HERE / "pack_cifar10.py", "unpack", packed, back)
    got = {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert got == files
    cmd = [sys.executable, str(HERE / "pack_cifar10.py"), "unpack", str(packed), str(back)]
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "exists; fix: unpack into an empty folder or pass --force" in again.stderr


def test_level_quality_smoke_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    out = tmp_path / "lq.json"
    _run(HERE / "level_quality.py", "--smoke", "--workers", "1", "--out", out)
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {r["method"] for r in rows} >= {"alq-e", "alq-einf", "optimum-l2", "optimum-linf", "alq", "qsgdinf"}
    for r in rows:  # nothing beats the optimum of its own scale
        if not r["method"].startswith("optimum"):
            assert r["vs_optimum"] >= 1 - 1e-9
    assert res["summary"]["alq-einf_vs_optimum_max"] <= 1.10
    assert (tmp_path / "lq.md").read_text().count("| mlp-digits@") == 4


def test_gpu_sketch_smoke_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    pytest.importorskip("triton")
    out = tmp_path / "sketch.json"
    text = _run(HERE / "gpu_sketch.py", out, "--smoke", "--n", "20000", "--buckets", "8192")
    assert "sketch kernel only" in text
    res = json.loads(out.read_text())
    assert res["device"].startswith("CPU") and res["n"] == 20000
    assert set(res["results"]) == {"copy", "alq-e/d8192", "alq-einf/d8192"}
    for key in ("alq-e/d8192", "alq-einf/d8192"):
        r = res["results"][key]
        names = ("sketch_sums (public op)", "sketch kernel only", "sketch, torch ops (bincount)", "quantize_encode")
        assert all(r[name]["seconds"] > 0 for name in names), key


def test_fsdp_bench_on_a_fake_two_rank_group(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    out = tmp_path / "fsdp.json"
    _run(
        HERE / "fsdp_bench.py",
        "--fake-world",
        "2",
        "--width",
        "256",
        "--layers",
        "2",
        "--steps",
        "3",
        "--calls",
        "3",
        out,
    )
    res = json.loads(out.read_text())
    assert res["meta"]["world"] == 2 and res["meta"]["process group"].startswith("fake")
    assert len(res["step_ms"]) == 3 and all(v > 0 for v in res["step_ms"].values())
    assert set(res["host_us_per_call"]) == {
        "fsdp reduce_scatter float32",
        "fsdp reduce_scatter bfloat16",
        "ALQReduceScatter float32",
        "ALQReduceScatter bfloat16",
    }
    sent, exact = res["bytes per step (this rank)"]["alq"], res["bytes per step (this rank)"]["exact float32"]
    assert 0 < sent < exact / 8  # 3-bit payloads vs float32 chunks


def test_cifar_table_merges_harness_runs(tmp_path: Path) -> None:
    pytest.importorskip("alq_torch")
    tiny = ["-m", "alq_torch.train", "--steps", "4", "--workers", "2", "--log-every", "2", "--eval-every", "2"]
    tiny += ["--no-progress", "--no-plots"]
    for method, seed in [("fp32", 0), ("alq-einf", 0), ("alq-einf", 1), ("qsgdinf", 0)]:
        _run(*tiny, "--methods", method, "--seeds", seed, "--out", tmp_path / f"{method}-{seed}")
    dirs = sorted(tmp_path.glob("*-*"))
    (tmp_path / "qsgdinf-0" / "results.json").unlink()  # a comparison stopped at a deadline: finished runs count
    _run(HERE / "cifar_table.py", tmp_path / "t", *dirs, "--paper", "rebuttal-k16")
    res = json.loads((tmp_path / "t.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "alq-einf", "qsgdinf"} and rows["alq-einf"]["seeds"] == [0, 1]
    assert "| qsgdinf |" in (tmp_path / "t.md").read_text() and (tmp_path / "t.png").is_file()
    fp32_run = json.loads((tmp_path / "fp32-0" / "results.json").read_text())["runs"][0]
    last_loss = [h["loss"] for h in fp32_run["history"] if "loss" in h][-1]
    assert rows["fp32"]["train_loss_end"] == pytest.approx(last_loss)  # the optimization-speed column
    _run(HERE / "cifar_table.py", tmp_path / "s", *dirs, "--group-by", "bucket_size")
    sweep = (tmp_path / "s.md").read_text()
    assert "| val acc % | bucket_size 1024 |" in sweep and "| norm. variance | bucket_size 1024 |" in sweep
    assert "bucket 1024" not in sweep.splitlines()[0]  # the swept setting is not named as if fixed


def test_cifar_table_sweep_correlates_over_method_setting_pairs(tmp_path: Path) -> None:
    # Three quantized (method, bucket) pairs, accuracy falling as the variance rises: the sweep's Spearman must pool them.
    pytest.importorskip("scipy")
    for method, bucket, acc, var in [("alq", 128, 0.66, 0.2), ("alq", 16384, 0.62, 2.5), ("qsgdinf", 128, 0.64, 1.0)]:
        run = {"method": method, "seed": 0, "final_val_acc": acc, "best_val_acc": acc, "bucket_size": bucket,
               "bits_per_step": 1.0, "train_seconds": 1.0, "steps": 1,
               "history": [{"step": 1, "val_acc": acc, "variance": var, "top_error": 1.0 / var, "avg_error": var}]}  # fmt: skip
        d = tmp_path / f"{method}-{bucket}"
        d.mkdir()
        res = {"runs": [run], "settings": {"bucket_size": bucket, "bits": 3}, "device": "cpu"}
        (d / "results.json").write_text(json.dumps(res))
    _run(HERE / "cifar_table.py", tmp_path / "s", *sorted(tmp_path.glob("*-*")), "--group-by", "bucket_size")
    corr = json.loads((tmp_path / "s.json").read_text())["spearman"]
    assert corr["variance_mean"] == pytest.approx(-1.0) and corr["top_error_mean"] == pytest.approx(1.0)
    assert "across the quantized (method, setting) pairs: variance -1.00" in (tmp_path / "s.md").read_text()
