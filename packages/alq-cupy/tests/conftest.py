"""Shared test setup: hypothesis profiles (the GPU gate lives in alq_cupy_gate.py)."""

from __future__ import annotations

from alq_core.testing.profiles import register_profiles

register_profiles()
