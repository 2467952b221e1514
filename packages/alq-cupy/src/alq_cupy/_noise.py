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
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _mix_int(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def check_seed(seed: object) -> int:
    """Validate a seed: an integer in ``[0, 2**64)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _MASK:
        msg = f"`seed` must be an integer in [0, 2**64); got {seed!r}"
        raise ValueError(msg)
    return int(seed)


def seed_key(seed: int) -> int:
    """The per-stream key the kernels receive: ``mix(seed)``."""
    return _mix_int(check_seed(seed))


def fresh_seed(rng: np.random.Generator | None = None) -> int:
    """A new 64-bit seed from ``rng`` (or from OS entropy)."""
    gen = rng if rng is not None else np.random.default_rng()
    return int(gen.integers(0, 1 << 64, dtype=np.uint64))


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
    from ._kernels import launch_noise

    return launch_noise(int(m), check_seed(seed), int(start))
