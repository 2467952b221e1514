"""The one GPU gate of the alq-cupy tests, with its reason (a uniquely named module, not conftest)."""

from __future__ import annotations

import importlib

import pytest


def gpu_status() -> tuple[bool, str]:
    """(usable, reason) for CuPy with at least one CUDA device."""
    try:
        cp = importlib.import_module("cupy")
    except ImportError:
        return False, "needs CuPy (pip install 'alq-cupy[cuda12]' or '[cuda13]'); not installed here"
    try:
        count = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver / no device
        return False, f"needs a CUDA GPU visible to CuPy; got {type(exc).__name__}: {exc}"
    if count < 1:
        return False, "needs a CUDA GPU; CuPy sees none"
    return True, ""


GPU_OK, GPU_REASON = gpu_status()
requires_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_REASON or "needs a CUDA GPU")
