"""``alq_torch.__all__``: sorted, documented, and holding the level-sketch ops."""

from __future__ import annotations

import alq_torch


def test_all_is_sorted_public_and_documented() -> None:
    names = {n for n in dir(alq_torch) if not n.startswith("_")} - {"train"}
    assert alq_torch.__all__ == sorted(alq_torch.__all__)
    assert set(alq_torch.__all__) <= names
    undocumented = [n for n in alq_torch.__all__ if not getattr(alq_torch, n).__doc__]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_sketch_ops_are_exported() -> None:
    assert {"level_sketch", "sketch_sums"} <= set(alq_torch.__all__)
