"""Per-bucket exchange plans of the DDP hook: buffers and prepared launches, built once and reused.

DDP hands the hook the same bucket buffers every step, so for each DDP bucket index the hook keeps a
plan: its payload, send and receive buffers (no allocation, no ``record_stream`` per step) and the
encode and decode launches whose arguments were checked and bound once
(:func:`alq_torch._wire.prepare_quantize_encode`, :func:`~alq_torch._wire.prepare_decode_sum`). A step
then pays little more host time than the kernel launches themselves.

:class:`_GatherPlan` serves the all-gather exchange, :class:`_ScatterPlan` the reduce-scatter style one.
A plan is keyed by the bucket's buffer, size, dtype, device, level-table version and group shape; the
state rebuilds it when the key changes (:meth:`alq_torch._exchange._Exchange._plan`).

Reusing the buffers is ordered by the streams: the next step's quantize (compute stream) and
collective (which waits for the compute stream) come after DDP waited for this step's future, whose
decode read the received bytes after the collective that read the sent ones.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from alq_core import QuantizerConfig, payload_size

from ._wire import prepare_decode_sum, prepare_quantize_encode


class _GatherPlan:
    """One DDP bucket's all-gather exchange.

    ``encode(seed)`` quantizes the bucket into ``payload``; after the all-gather of every rank's
    payload into ``gathered``, ``decode()`` writes their average into the bucket (half-precision
    buckets: the float32 average rounded at the store). ``check`` is where the decode's device-side
    header check records a mismatch (a flag tensor on CUDA, True to check on the host).
    """

    __slots__ = ("decode", "encode", "gathered", "key", "payload", "version")

    def __init__(
        self,
        config: QuantizerConfig,
        flat: torch.Tensor,
        world: int,
        rank: int,
        levels: np.ndarray,
        version: int,
        key: tuple[Any, ...],
        check: torch.Tensor | bool,
    ) -> None:
        n, device = flat.numel(), flat.device
        size = payload_size(config, n)
        self.key, self.version = key, version
        self.payload = torch.empty(size, dtype=torch.uint8, device=device)
        self.gathered = torch.empty(world * size, dtype=torch.uint8, device=device)
        self.encode = prepare_quantize_encode(flat, levels, config, table_version=version, out=self.payload)
        self.decode = prepare_decode_sum(
            self.gathered.view(world, size),
            levels,
            config,
            n,
            table_version=version,
            out=flat,
            scale=1.0 / world,
            check_headers=check,
        )


class _ScatterPlan:
    """One DDP bucket's reduce-scatter style exchange.

    The bucket is split into ``world`` chunks on quantization-bucket boundaries. ``encode[k]``
    quantizes chunk ``k`` into its slice of ``send``; after the all-to-all, ``decode_owned`` averages
    the ``world`` received payloads of this rank's chunk into ``owned``; ``encode_owned`` requantizes
    it into ``send2``; after the all-gather, ``decode[k]`` writes chunk ``k`` back into the bucket.
    ``sizes[k]`` is chunk ``k``'s payload size and ``out[k]`` its view of the bucket.
    """

    __slots__ = (
        "decode",
        "decode_owned",
        "encode",
        "encode_owned",
        "gathered",
        "key",
        "out",
        "recv",
        "send",
        "send2",
        "sizes",
        "version",
    )

    def __init__(
        self,
        config: QuantizerConfig,
        flat: torch.Tensor,
        world: int,
        rank: int,
        levels: np.ndarray,
        version: int,
        key: tuple[Any, ...],
        check: torch.Tensor | bool,
    ) -> None:
        cfg, n, device = config, flat.numel(), flat.device
        nb = -(-n // cfg.bucket_size)
        edges = [min(n, (k * nb // world) * cfg.bucket_size) for k in range(world + 1)]
        counts = [edges[k + 1] - edges[k] for k in range(world)]
        self.sizes = [payload_size(cfg, c) for c in counts]
        offsets = [sum(self.sizes[:k]) for k in range(world)]
        own, pmax = self.sizes[rank], max(self.sizes)
        self.key, self.version = key, version
        self.send = torch.empty(sum(self.sizes), dtype=torch.uint8, device=device)
        self.encode = [
            prepare_quantize_encode(
                flat[edges[k] : edges[k + 1]],
                levels,
                cfg,
                table_version=version,
                out=self.send[offsets[k] : offsets[k] + self.sizes[k]],
            )
            for k in range(world)
        ]
        self.recv = torch.empty(world * own, dtype=torch.uint8, device=device)
        owned = torch.empty(counts[rank], dtype=torch.float32, device=device)
        self.decode_owned = prepare_decode_sum(
            self.recv.view(world, own), levels, cfg, counts[rank], table_version=version, out=owned,
            scale=1.0 / world, check_headers=check,
        )  # fmt: skip
        self.send2 = torch.zeros(pmax, dtype=torch.uint8, device=device)
        self.encode_owned = prepare_quantize_encode(owned, levels, cfg, table_version=version, out=self.send2[:own])
        self.gathered = torch.empty(world * pmax, dtype=torch.uint8, device=device)
        rows = self.gathered.view(world, pmax)
        self.out = [flat[edges[k] : edges[k + 1]] for k in range(world)]
        self.decode = [
            prepare_decode_sum(
                rows[k : k + 1, : self.sizes[k]],
                levels,
                cfg,
                counts[k],
                table_version=version,
                out=self.out[k],
                scale=1.0,
                check_headers=check,
            )
            for k in range(world)
        ]


_Plan = TypeVar("_Plan", _GatherPlan, _ScatterPlan)
