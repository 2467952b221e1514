"""``torchrun`` of the harness in a subprocess (the DDP and FSDP harness tests): Gloo on CPU, one thread a rank."""

from __future__ import annotations

import os
import subprocess
import sys

import alq_torch

SRC = [os.path.dirname(os.path.dirname(alq_torch.__file__))]
try:
    import alq_core

    SRC.append(os.path.dirname(os.path.dirname(alq_core.__file__)))
except ImportError:  # pragma: no cover
    pass


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alq_torch.train ARGS`` under ``torchrun --standalone --nproc_per_node NPROC``; assert it succeeds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "alq_torch.train",
    ]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
