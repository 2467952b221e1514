"""Shared benchmark fixtures: device and version info go into every result."""

from __future__ import annotations

import platform

import numpy as np
import pytest


@pytest.fixture
def info(benchmark):  # type: ignore[no-untyped-def]
    """``benchmark.extra_info`` pre-filled with machine and library versions."""
    benchmark.extra_info.update(
        {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine()}
    )
    try:
        import torch

        benchmark.extra_info["torch"] = torch.__version__
        if torch.cuda.is_available():
            benchmark.extra_info["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return benchmark.extra_info
