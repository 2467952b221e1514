"""The 2-GPU NCCL run of the quantized all-reduce (a script in its own processes; skipped below 2 GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alq_cupy_gate import GPU_OK, GPU_REASON


def _two_gpus_with_nccl() -> tuple[bool, str]:
    if not GPU_OK:
        return False, GPU_REASON
    import cupy as cp

    if int(cp.cuda.runtime.getDeviceCount()) < 2:
        return False, "needs 2 CUDA GPUs for the NCCL all-reduce; fewer are visible"
    from cupy.cuda import nccl

    if not nccl.available:
        return False, "CuPy cannot load NCCL (pip install nvidia-nccl-cu12 / nvidia-nccl-cu13)"
    return True, ""


OK, REASON = _two_gpus_with_nccl()


@pytest.mark.multigpu
@pytest.mark.skipif(not OK, reason=REASON or "needs 2 GPUs")
@pytest.mark.parametrize("transport", ["default", "socket"])
def test_quantized_allreduce_on_two_gpus(tmp_path: Path, transport: str) -> None:
    env = dict(os.environ)
    if transport == "socket":
        env.update(NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1", NCCL_IB_DISABLE="1", NCCL_NET="Socket")
    script = Path(__file__).with_name("nccl_check.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    summary = tmp_path / "summary.json"
    assert summary.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads(summary.read_text())["checks"]
    failed = [k for k, v in checks.items() if not v]
    assert failed == [], json.loads(summary.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
