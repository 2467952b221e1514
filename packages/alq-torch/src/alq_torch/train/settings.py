"""The harness's settings: defaults, the paper's presets, flag resolution and the per-run configuration.

Shared by the simulated-worker entry point (:mod:`alq_torch.train.cli`) and the DDP one under
``torchrun`` (:mod:`alq_torch.train.ddp`), which both import from here and not from each other.
"""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from typing import Any

import alq_core
import numpy as np
import torch

from .loop import RunConfig

#: Every method in the paper's order.
ALL_METHODS = tuple(alq_core.METHODS)

#: The built-in default comparison (what ``alq-train`` runs with no arguments).
DEFAULTS: dict[str, Any] = {
    "methods": "all",
    # 2 bits, bucket 1024: chosen so the default run shows the point on the built-in digits data.
    # At 3 bits / bucket 128 every method reaches the same 97.2 % (the task is too easy to tell them
    # apart). At 2 bits / bucket 1024 the fixed levels with the L2 scale (QSGD, NUQSGD) diverge in
    # every seed while every adaptive method trains to full-precision accuracy, and alq-einf's
    # quantization variance is ~4x below the other adaptive methods' (measured: docs/results.md).
    # QSGDinf (fixed levels, max-abs scale) trains too: it is the scale, not adaptivity alone.
    # The paper's 3 bits / 8192 is in --preset paper-cifar10-resnet32.
    "bits": 2,
    "bucket_size": 1024,
    "workers": 16,
    "seeds": "0,1,2",
    "steps": 300,
    "epochs": None,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 16,
    "milestones": "0.5,0.75",
    "update_steps": "0,10,50",
    "update_every": 100,
    "update_method": "exact",
    "dist_num": 50,
    "clip": "auto",
    "model": "mlp",
    "data": "digits",
    "data_dir": None,
    "synthetic_size": 10000,
    "eval_every": 0,
    "log_every": 0,
    "checkpoint_every": 0,
    "amp": "none",
    "channels_last": False,
    "exact_1d": False,
    # under torchrun: DDP (False) or FSDP2 (True); ranks per FSDP shard group (None: all of them)
    "fsdp": False,
    "shard_size": None,
}

#: Presets: the paper's settings (SPEC section 10). Explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar10-resnet32": {
        "methods": "all",
        "bits": 3,
        "bucket_size": 8192,
        "workers": 4,
        "seeds": "0",
        "steps": 80000,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "milestones": "0.5,0.75",
        "update_steps": "0,100,2000",
        "update_every": 10000,
        "update_method": "exact",
        "dist_num": 50,
        "model": "resnet32",
        "data": "cifar10",
        "eval_every": 2000,
        "log_every": 500,
        "checkpoint_every": 2000,
    },
}

#: Settings that do not change results and may differ on --resume.
_RUNTIME_KEYS = ("device", "progress", "stop_at", "out", "resume")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in str(text).split(",") if t.strip() != "")
    except ValueError as exc:
        msg = f"--{name} must be comma-separated integers; got {text!r}"
        raise SystemExit(f"alq-train: error: {msg}") from exc
    return vals


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Merge flags over the preset over the defaults, and validate."""
    s = dict(DEFAULTS)
    if args.preset:
        s.update(PRESETS[args.preset])
        s["preset"] = args.preset
    for key in DEFAULTS:
        val = getattr(args, key, None)
        if val is not None:
            s[key] = val
    methods = str(s["methods"])
    names = (
        list(ALL_METHODS)
        if methods.strip().lower() == "all"
        else [m.strip().lower() for m in methods.split(",") if m.strip()]
    )
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise SystemExit(
            f"alq-train: error: --methods must be 'all' or names from {', '.join(ALL_METHODS)}; got {methods!r}"
        )
    s["methods"] = names
    seeds = str(s["seeds"])
    s["seeds"] = list(_ints(seeds, "seeds"))
    if not s["seeds"]:
        raise SystemExit("alq-train: error: --seeds needs at least one seed, e.g. 0,1,2")
    s["update_steps"] = sorted(set(_ints(s["update_steps"], "update-steps")))
    try:
        s["milestones"] = [float(t) for t in str(s["milestones"]).split(",") if t.strip()]
    except ValueError:
        raise SystemExit(
            f"alq-train: error: --milestones must be comma-separated fractions; got {s['milestones']!r}"
        ) from None
    clip = s["clip"]
    if isinstance(clip, str) and clip.lower() == "none":
        s["clip"] = None
    elif isinstance(clip, str) and clip != "auto":
        try:
            s["clip"] = float(clip)
        except ValueError:
            raise SystemExit(f"alq-train: error: --clip must be a number, 'none' or 'auto'; got {clip!r}") from None
    for key in ("bits", "bucket_size", "workers", "batch_size"):
        if int(s[key]) < 1:
            raise SystemExit(f"alq-train: error: --{key.replace('_', '-')} must be positive; got {s[key]}")
    if s.get("steps") is not None and int(s["steps"]) < 1:
        raise SystemExit(f"alq-train: error: --steps must be positive; got {s['steps']}")
    for m in names:  # validates bits / bucket / clip combinations with the core's messages, as the runs build them
        try:
            RunConfig(method=m, bits=int(s["bits"]), bucket_size=int(s["bucket_size"]), clip=s["clip"]).quantizer_config()
        except ValueError as exc:
            raise SystemExit(f"alq-train: error: {exc}") from None
    return s


def run_config(s: dict[str, Any], method: str, seed: int, steps: int, workers: int) -> RunConfig:
    """The :class:`RunConfig` of one run (one method, one seed) from the resolved settings ``s``."""
    return RunConfig(
        method=method,
        bits=int(s["bits"]),
        bucket_size=int(s["bucket_size"]),
        workers=workers,
        seed=int(seed),
        steps=steps,
        lr=float(s["lr"]),
        momentum=float(s["momentum"]),
        weight_decay=float(s["weight_decay"]),
        batch_size=int(s["batch_size"]),
        milestones=tuple(s["milestones"]),
        update_steps=tuple(s["update_steps"]),
        update_every=int(s["update_every"]),
        update_method=str(s["update_method"]),
        dist_num=int(s["dist_num"]),
        clip=s["clip"],
        model=str(s["model"]),
        eval_every=int(s["eval_every"]),
        log_every=int(s["log_every"]),
        checkpoint_every=int(s["checkpoint_every"]),
        exact_1d=bool(s.get("exact_1d", False)),
    )


@dataclass(frozen=True)
class Layout:
    """How the ranks of a ``torchrun`` job hold the model.

    ``kind`` is ``"ddp"`` (every rank a full replica; ``shard`` is 1), ``"fsdp"`` (FSDP2 over every rank;
    ``shard == world``) or ``"hsdp"`` (hybrid: ``replicas`` groups of ``shard`` ranks; FSDP2 within a
    group, ALQ's quantized all-reduce across the groups).
    """

    kind: str
    world: int
    shard: int

    @property
    def replicas(self) -> int:
        """Model replicas: ``world // shard``."""
        return self.world // self.shard

    @property
    def sharded(self) -> bool:
        """True under FSDP2 (``fsdp`` or ``hsdp``)."""
        return self.kind != "ddp"

    def mode(self, backend: str) -> str:
        """The run's mode label: ``ddp-gloo-2``, ``fsdp-nccl-8``, ``hsdp-nccl-2x8`` (replicas x shard)."""
        if self.kind == "hsdp":
            return f"hsdp-{backend}-{self.replicas}x{self.shard}"
        return f"{self.kind}-{backend}-{self.world}"

    def describe(self) -> str:
        """In words, for titles: ``DDP 2 ranks``, ``FSDP 4 ranks``, ``hybrid FSDP 2x4 ranks``."""
        if self.kind == "hsdp":
            return f"hybrid FSDP {self.replicas}x{self.shard} ranks"
        return f"{self.kind.upper()} {self.world} ranks"

    def to_dict(self, backend: str) -> dict[str, Any]:
        """Plain data for ``config.json`` and ``results.json``."""
        return {
            "kind": self.kind,
            "world": self.world,
            "replicas": self.replicas,
            "shard_size": self.shard,
            "mode": self.mode(backend),
        }


def layout_of(fsdp: bool, shard_size: int | None, world: int) -> Layout:
    """The :class:`Layout` of ``--fsdp`` / ``--shard-size`` on ``world`` ranks; ValueError saying what to fix."""
    if shard_size is not None and not fsdp:
        msg = (
            f"--shard-size sets the ranks per FSDP shard group and needs --fsdp; got --shard-size {shard_size} "
            "without --fsdp; fix: add --fsdp (hybrid FSDP), or drop --shard-size (DDP)"
        )
        raise ValueError(msg)
    if not fsdp:
        return Layout("ddp", world, 1)
    if world < 2:
        msg = (
            f"--fsdp shards the model over the processes of a torchrun job; got WORLD_SIZE={world} (not under "
            "torchrun); fix: torchrun --nproc_per_node G -m alq_torch.train --fsdp ... (G >= 2), or drop --fsdp "
            "(and --shard-size) to simulate K workers on one device"
        )
        raise ValueError(msg)
    n = world if shard_size is None else int(shard_size)
    if n < 1 or world % n != 0:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        msg = (
            f"--shard-size must divide the world size {world} (ranks per shard group; the rest replicate): one "
            f"of {divisors}; got {shard_size}; fix: the GPUs per node, as in torchrun --nnodes N "
            "--nproc_per_node G ... --fsdp --shard-size G"
        )
        raise ValueError(msg)
    return Layout("fsdp" if n == world else "hsdp", world, n)


def versions() -> dict[str, str]:
    """Versions and machine facts written into every run's ``results.json``."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "alq_core": getattr(alq_core, "__version__", "?"),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
    }
