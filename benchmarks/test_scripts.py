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
