"""Counter-based uniform noise, identical on the GPU and on the host.

Coordinate ``k`` of a stream with seed ``seed`` gets the float32 uniform

    key  = mix(seed mod 2**64)
    h    = mix(key + (k // 2 + 1) * 0x9E3779B97F4A7C15)      (mod 2**64)
    bits = h >> 40 if k is even else (h >> 16) & 0xFFFFFF   (24 bits)
    u    = bits * 2**-24                                     (exact, in [0, 1))

with ``mix`` the SplitMix64 finalizer (Steele, Lea and Flood 2014). One 64-bit
hash serves two coordinates. The GPU kernels generate it in place;
:func:`counter_noise_host` computes the same values with NumPy so a device
result can be compared with ``alq_core.quantize(..., noise=...)`` code for code.
The seed helpers (``check_seed``, ``seed_key``, ``fresh_seed``) live in :mod:`alq_cupy._seeds` and are
re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._kernels import launch_noise
from ._seeds import _M1, _M2, GOLDEN

# Re-exported: the seed helpers are part of the noise stream's interface (as they were defined here).
from ._seeds import _mix_int as _mix_int
from ._seeds import check_seed as check_seed
from ._seeds import fresh_seed as fresh_seed
from ._seeds import seed_key as seed_key


def counter_noise_host(m: int, seed: int, start: int = 0) -> NDArray[np.float32]:
    """Noise values ``start .. start + m - 1`` of stream ``seed``, computed on the host.

    Parameters
    ----------
    m : int
        Number of values.
    seed : int
        Stream seed in ``[0, 2**64)``.
    start : int, optional
        Index of the first coordinate.

    Returns
    -------
    ndarray of float32, shape (m,)
        Values in [0, 1), equal to what the GPU kernels use for coordinates
        ``start .. start + m - 1``.
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
        msg = f"`m` must be a non-negative integer; got {m!r}"
        raise ValueError(msg)
    key = np.uint64(seed_key(seed))
    k = np.arange(start, start + int(m), dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = key + ((k >> np.uint64(1)) + np.uint64(1)) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    odd = (k & np.uint64(1)).astype(bool)
    bits = np.where(odd, (z >> np.uint64(16)) & np.uint64(0xFFFFFF), z >> np.uint64(40))
    return (bits.astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def counter_noise(m: int, seed: int, start: int = 0) -> Any:
    """The same noise as :func:`counter_noise_host`, generated on the current GPU.

    Returns
    -------
    cupy.ndarray of float32, shape (m,)
    """
    return launch_noise(int(m), check_seed(seed), int(start))
