"""Stream seeds of the counter-based noise: validation, fresh seeds, and the per-stream key.

A stream's key is ``mix(seed)``, with ``mix`` the SplitMix64 finalizer (Steele, Lea and Flood 2014);
the GPU kernels (:mod:`alq_cupy._kernels`) receive the key, and :mod:`alq_cupy._noise` defines the
stream built from it. Kept apart from both so the kernels and the noise stream do not import each other.
"""

from __future__ import annotations

import numpy as np

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
