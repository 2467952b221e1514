"""Fused Triton kernels (CUDA). Placeholder: no fast path yet, every config uses the torch ops."""

from __future__ import annotations

from alq_core import QuantizerConfig


def fused_supported(config: QuantizerConfig) -> bool:
    """Whether :func:`quantize_pack` handles ``config``."""
    return False


def decode_supported(config: QuantizerConfig) -> bool:
    """Whether :func:`decode_sum` handles ``config``."""
    return False
