"""FSDP2 with ALQ's quantized reduce-scatter vs FSDP2's own reduce-scatter (float32 and bfloat16).

Two measurements on the same model and therefore the same shard sizes:

* **step time**: an MLP (``--layers`` blocks of ``--width`` x ``--width``, each block its own
  ``fully_shard`` unit) trained for ``--steps`` steps, median per step (synchronized), for FSDP2's
  default reduce-scatter in float32, the same with ``MixedPrecisionPolicy(reduce_dtype=bfloat16)``,
  and :func:`alq_torch.register_fsdp` (float32 reduce, quantized payloads);
* **host time per reduce-scatter call**: the comm alone called ``--calls`` times on each block's
  reduce-scatter input (``W * S`` elements; GPU work not waited for, one synchronization per batch
  outside the timing): FSDP's ``reduce_scatter_single`` in float32 / bfloat16 and ``ALQReduceScatter``.

Run on the GPU machine from the repository root::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_bench.py fsdp_bench.json

With one GPU, ``--fake-world 2`` runs one process on torch's fake process group of that size: the
collectives move nothing (FSDP's reduce-scatter costs nothing; ALQ's all-to-all is replaced by one device
copy of this rank's payloads, so the decode reads valid headers), so the rows
give the comms' own host and GPU time, and the step time is compute plus that::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        python3 benchmarks/fsdp_bench.py --fake-world 2 fsdp_bench_fake2.json

or two ranks on the one GPU through Gloo (correctness of the path, not speed)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_bench.py --backend gloo fsdp_gloo.json

Without a GPU (CPU tensors) it checks the script (``--fake-world 2 --width 256 --steps 3 --calls 3``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Median host microseconds per call of ``fn`` (one synchronization per batch, outside the timing)."""
    times = []
    for _ in range(3):  # a warm-up batch and two timed ones
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        _sync(device)
    return statistics.median(times[calls:]) * 1e6


def build(width: int, layers: int, device: torch.device, policy: Any = None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(layers)]
    net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 10)).to(device)
    kw = {} if policy is None else {"mp_policy": policy}
    for b in blocks:
        fully_shard(b, **kw)
    fully_shard(net, **kw)
    return net


def step_ms(net: torch.nn.Module, steps: int, width: int, device: torch.device) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(64, width, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON file to write (rank 0)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--method", default="alq")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--bucket", type=int, default=8192)
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    p.add_argument("--fake-world", type=int, default=0, help="one process on a fake process group of this size")
    args = p.parse_args()

    from alq_core import QuantizerConfig, payload_size
    from alq_torch import ALQReduceScatter, register_fsdp
    from torch.distributed.fsdp import MixedPrecisionPolicy

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.fake_world > 0:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)

        def copy_exchange(self: Any, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
            recv.copy_(send)  # fake collectives move nothing: stand in this rank's payloads (valid headers)

        ALQReduceScatter._exchange = copy_exchange  # type: ignore[method-assign]
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    else:
        backend = args.backend or ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local if backend == "nccl" else 0)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dist.init_process_group(backend)
    if cuda:
        torch.cuda.set_device(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = QuantizerConfig(args.method, bits=args.bits, bucket_size=args.bucket)

    # ---------------------------------------------------------------- step time
    steps: dict[str, float] = {}
    steps["fsdp float32"] = step_ms(build(args.width, args.layers, device), args.steps, args.width, device)
    bf16 = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    steps["fsdp bfloat16 reduce"] = step_ms(
        build(args.width, args.layers, device, bf16), args.steps, args.width, device
    )
    net = build(args.width, args.layers, device)
    comm = register_fsdp(net, cfg, exact_below=0, timing=False, telemetry=True, telemetry_history=4)
    steps[f"alq {args.method} {args.bits} bits, float32 reduce"] = step_ms(net, args.steps, args.width, device)
    rec = comm.last_record
    sent = rec.bytes_sent if rec is not None else 0
    exact = rec.bytes_exact if rec is not None else 0

    # ------------------------------------------------ host time per reduce-scatter call
    shard = -(-args.width // world) * args.width + -(-args.width // world)  # one block: weight rows + bias, padded
    group = dist.group.WORLD
    host: dict[str, float] = {}
    for dt in (torch.float32, torch.bfloat16):
        inp = torch.randn(world * shard, device=device).to(dt)
        out = torch.empty(shard, dtype=dt, device=device)
        name = str(dt).replace("torch.", "")
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        op = dist.ReduceOp.SUM if args.fake_world or not cuda else dist.ReduceOp.AVG

        def fsdp_rs(out: torch.Tensor = out, inp: torch.Tensor = inp, op: Any = op, rs: Any = rs) -> None:
            rs(out, inp, op=op, group=group)

        host[f"fsdp reduce_scatter {name}"] = host_us(fsdp_rs, args.calls, device)
        alq = ALQReduceScatter(cfg, exact_below=0, timing=False, telemetry=False, schedule=[])

        def alq_rs(out: torch.Tensor = out, inp: torch.Tensor = inp, alq: ALQReduceScatter = alq) -> None:
            alq(out, inp, group, dist.ReduceOp.AVG)
            alq.end_round()

        host[f"ALQReduceScatter {name}"] = host_us(alq_rs, args.calls, device)

    if rank == 0:
        res = {
            "meta": {
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"CPU {platform.processor()}",
                "torch": torch.__version__,
                "world": world,
                "process group": "fake (collectives move nothing)" if args.fake_world else dist.get_backend(),
                "width": args.width,
                "layers": args.layers,
                "shard elements per block": shard,
                "config": {"method": args.method, "bits": args.bits, "bucket_size": args.bucket},
            },
            "step_ms": steps,
            "host_us_per_call": host,
            "bytes per step (this rank)": {"alq": sent, "exact float32": exact},
            "payload bytes per block shard": payload_size(cfg, shard),
        }
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
        print(json.dumps(res, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
