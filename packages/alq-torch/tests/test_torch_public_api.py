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


def test_fsdp_names_are_exported_and_importing_does_not_load_fsdp() -> None:
    import subprocess
    import sys

    assert {"ALQAllReduceHook", "ALQReduceScatter", "register_fsdp"} <= set(alq_torch.__all__)
    code = "import sys, alq_torch; print('torch.distributed.fsdp._fully_shard' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", "import alq_torch must not import FSDP2 (over a second); _fsdp registers the comm lazily"
