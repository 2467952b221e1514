"""Finding CuPy and a GPU lazily, and turning foreign arrays into CuPy arrays.

Nothing here runs at import time: :func:`require_cupy` imports CuPy and checks
for a visible CUDA device the first time an operation needs them, and raises an
error that names the pip command to fix the installation.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The two ways to get a prebuilt CuPy wheel with this package (bare `cupy` builds from source).
INSTALL_HINT = "pip install 'alq-cupy[cuda12]' (CUDA 12.x) or pip install 'alq-cupy[cuda13]' (CUDA 13.x)"

_cupy: Any = None
_checked_devices: set[int] = set()


def require_cupy() -> Any:
    """Import CuPy and check that it sees a CUDA GPU; return the ``cupy`` module.

    Raises
    ------
    ImportError
        CuPy is not installed; the message names the pip command.
    RuntimeError
        CuPy is installed but no CUDA device (or no working driver) is visible.
    """
    global _cupy
    if _cupy is None:
        try:
            mod = importlib.import_module("cupy")
        except ImportError as exc:
            msg = f"alq_cupy needs CuPy, which is not installed (or failed to import: {exc}); fix: {INSTALL_HINT}"
            raise ImportError(msg) from exc
        _cupy = mod
    cp = _cupy
    try:
        dev = int(cp.cuda.runtime.getDevice())
        if dev not in _checked_devices:
            count = int(cp.cuda.runtime.getDeviceCount())
            if count < 1:
                raise RuntimeError("device count is 0")
            _checked_devices.add(dev)
    except Exception as exc:  # CUDARuntimeError, missing driver, ...
        msg = (
            f"alq_cupy needs a CUDA GPU visible to CuPy; got none ({type(exc).__name__}: {exc}). "
            f"Check the driver and CUDA_VISIBLE_DEVICES, and that CuPy matches the CUDA major version: {INSTALL_HINT}"
        )
        raise RuntimeError(msg) from exc
    return cp


def as_cupy(x: Any) -> Any:
    """View an array as a CuPy array without copying when it lives on the GPU.

    Parameters
    ----------
    x : cupy.ndarray, any object with ``__dlpack__`` (torch, JAX, ...), or array_like
        CuPy arrays are returned as they are; DLPack producers on the GPU are
        wrapped without a copy through ``cupy.from_dlpack``; host data (NumPy,
        lists) is copied to the current device.

    Returns
    -------
    cupy.ndarray
        Sharing memory with ``x`` whenever ``x`` is already on the GPU.
    """
    cp = require_cupy()
    if isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        dev_type = int(x.__dlpack_device__()[0])
        if dev_type in (2, 13):  # kDLCUDA, kDLCUDAManaged
            if hasattr(x, "requires_grad") and getattr(x, "requires_grad", False):
                x = x.detach()
            return cp.from_dlpack(x)
        if hasattr(x, "detach"):  # a torch CPU tensor
            x = x.detach().numpy()
    return cp.asarray(x)
