"""Host (CPU) time per call of the DDP hook and its pieces: what a GPU-bound step pays when the hooks run
eagerly between CUDA-graph replays.

Run on the GPU machine (2 GPUs), from the repository root::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        torchrun --standalone --nproc_per_node 2 benchmarks/host_overhead.py host_overhead.json

Per call, the median over ``--calls`` calls of the time the *host* spends in the call (the GPU work it
enqueues is not waited for; the GPU runs far ahead of these small buckets, so no call blocks on a
full launch queue; every ``--calls`` calls synchronize once, outside the timing): the raw
kernel launches (``_kernels.quantize_pack`` / ``decode_sum``, through Triton's dispatch and launched
directly, ``TUNING["direct_launch"]``), the public ops (``quantize_encode``,
``decode_sum`` with the device header check, as the hook calls them), one all-gather (the hook's call), torch's
``fp16_compress_hook`` on a bucket of ``--numel`` float32 gradients, and ``alq_hook`` per bucket in
rounds of ``--buckets`` such buckets (DDP bucket stand-ins with ``buffer()``, ``index()``,
``is_last()``), with ``timing=False`` (as ``ddp_resnet50.py`` runs it) and with the default timing
events. Without GPUs (``--cpu-smoke``: Gloo, CPU tensors, the torch ops) it checks the script.

With one GPU, ``--fake-world 2`` runs a single process on torch's fake process group of that size, so the
hook takes its multi-rank path; the collectives move nothing, so the all-gather the hook calls is replaced by
one device copy of this rank's payload into every slot (a kernel launch, where NCCL's call costs about
28 us of host time on the 2-GPU host): the rows then give the hook's own host time per bucket::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \
        python3 benchmarks/host_overhead.py --fake-world 2 host_overhead_fake2.json
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
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def host_us(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Median host microseconds per call of ``fn`` (GPU work not waited for; one sync per batch)."""
    times = []
    for _ in range(3):  # a warm-up batch and two timed ones
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
    return statistics.median(times[calls:]) * 1e6


def _emulate_all_gather() -> None:
    """Make the hook's all-gather copy this rank's payload into every slot (fake collectives move nothing)."""
    from alq_torch import _hook

    real = _hook._all_gather_flat

    def gather(out: torch.Tensor, inp: torch.Tensor, group: Any, async_op: bool) -> Any:
        out.view(-1, inp.numel()).copy_(inp)
        return real(out, inp, group, async_op)

    _hook._all_gather_flat = gather  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file written by rank 0")
    p.add_argument("--numel", type=int, default=6_553_600, help="bucket size (floats): 25 MiB, DDP's default cap")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--buckets", type=int, default=4, help="buckets per hook round (ResNet-50 at 25 MiB: 4-5)")
    p.add_argument("--cpu-smoke", action="store_true", help="Gloo on CPU, to check the script without GPUs")
    p.add_argument("--cprofile", action="store_true", help="also write cProfile tables of alq_hook (rank 0)")
    p.add_argument(
        "--fake-world", type=int, default=0, help="one process on a fake process group of this size (see above)"
    )
    args = p.parse_args()
    cpu = args.cpu_smoke or not torch.cuda.is_available()
    fake = args.fake_world > 0
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
        _emulate_all_gather()
    else:
        dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if not cpu:
        torch.cuda.set_device(device)
    import alq_torch
    from alq_core import HEADER_SIZE, QuantizerConfig, default_levels, payload_size
    from alq_torch import _tables
    from alq_torch._hook import _all_gather_flat
    from alq_torch.testing import FakeBucket

    config = QuantizerConfig("alq", bits=3, bucket_size=8192, nonfinite="propagate")
    levels = default_levels(config)
    n = args.numel
    x = torch.randn(n, device=device, generator=torch.Generator(device).manual_seed(rank)) * 1e-3
    size = payload_size(config, n)
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    gathered = torch.empty(world * size, dtype=torch.uint8, device=device)
    out = torch.empty(n, device=device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    alq_torch.quantize_encode(x, levels, config, seed=1, out=buf)
    _all_gather_flat(gathered, buf, None, False)
    if fake:
        gathered.view(world, size).copy_(buf)
    payloads = gathered.view(world, size)
    res: dict[str, float] = {}
    from alq_torch import _kernels

    if not cpu:
        table = _tables.level_table(levels, config, device)
        head = _tables.header_tensor(config, n, 0, table.crc, device)
        m = config.num_quantized(n)
        codes_off = HEADER_SIZE + 4 * config.num_buckets(n)
        for direct in (False, True):
            _kernels.TUNING["direct_launch"] = direct
            how = "direct launch" if direct else "Triton dispatch"
            res[f"kernel quantize_pack ({how})"] = host_us(
                lambda: _kernels.quantize_pack(x, table, config, head, buf, noise=None, seed=5), args.calls, device
            )
            res[f"kernel decode_sum ({how})"] = host_us(
                lambda: _kernels.decode_sum(payloads, table, config, m, codes_off, out, 1 / world, (head, flag)),
                args.calls,
                device,
            )
    if not cpu:
        from alq_torch._wire import prepare_decode_sum, prepare_quantize_encode

        encode = prepare_quantize_encode(x, levels, config, out=buf)
        res["prepared quantize_encode (the hook's per-bucket plan)"] = host_us(lambda: encode(5), args.calls, device)
        decode = prepare_decode_sum(
            payloads, levels, config, n, table_version=0, out=out, scale=1 / world, check_headers=flag
        )
        res["prepared decode_sum (device header check)"] = host_us(decode, args.calls, device)
    res["quantize_encode"] = host_us(
        lambda: alq_torch.quantize_encode(x, levels, config, seed=5, out=buf), args.calls, device
    )
    res["decode_sum (device header check)"] = host_us(
        lambda: alq_torch.decode_sum(
            payloads, levels, config, n, table_version=0, out=out, scale=1 / world, check_headers=flag
        ),
        args.calls,
        device,
    )
    if not fake:  # a fake collective costs nothing to measure
        res["all-gather of the payload (async)"] = host_us(
            lambda: _all_gather_flat(gathered, buf, None, True), args.calls, device
        )
        res["all-gather + then(callback) of the completion future"] = host_us(
            lambda: _all_gather_flat(gathered, buf, None, True).get_future().then(lambda f: out).wait(),
            args.calls,
            device,
        )
        res["all-gather + work.wait() (stream wait, no future)"] = host_us(
            lambda: _all_gather_flat(gathered, buf, None, True).wait(), args.calls, device
        )
    res["dist.get_world_size() + dist.get_rank()"] = host_us(
        lambda: (dist.get_world_size(), dist.get_rank()), args.calls, device
    )
    res[f"torch.empty({size}, uint8)"] = host_us(
        lambda: torch.empty(size, dtype=torch.uint8, device=device), args.calls, device
    )
    if not cpu:

        def stream_bookkeeping() -> None:
            gathered.record_stream(torch.cuda.current_stream(device))

        res["record_stream(current_stream(device))"] = host_us(stream_bookkeeping, args.calls, device)

        def round_check() -> None:  # what the hook does once per round for its header-check flags
            pinned = torch.empty(256, dtype=torch.int32, pin_memory=True)
            pinned.copy_(out[:256].view(torch.int32), non_blocking=True)
            ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ev.record()
            ev.query()

        res["pinned copy + event (the hook's per-round flag read-back)"] = host_us(round_check, args.calls, device)

        def plain_span() -> None:  # two timing events recorded as torch.cuda.Event.record() does
            for _ in range(2):
                torch.cuda.Event(enable_timing=True).record()  # type: ignore[no-untyped-call]

        res["timing span: 2 events, Event.record() (current_stream() in Python)"] = host_us(
            plain_span, args.calls, device
        )

        from alq_torch._telemetry import _Span

        def hook_span() -> None:
            span = _Span(device)
            span.start()
            span.stop()

        res["timing span: 2 events, the hook's _Span (cached Stream objects)"] = host_us(hook_span, args.calls, device)
    grad = x.clone()
    if not fake:
        res["fp16_compress_hook"] = host_us(
            lambda: default_hooks.fp16_compress_hook(None, FakeBucket(grad)), args.calls, device
        )
    if world > 1:  # one rank: the hook passes gradients through (nothing to measure)
        k = args.buckets
        grads = [grad.clone() for _ in range(k)]

        def rounds(state: Any) -> Callable[[], None]:
            def one() -> None:  # a round of k buckets, as DDP calls the hook in a step
                futs = [alq_torch.alq_hook(state, FakeBucket(g, i, i == k - 1)) for i, g in enumerate(grads)]
                for f in futs:
                    f.wait()

            return one

        state = alq_torch.ALQState(config, warmup_steps=0, exact_below=0, timing=False)
        _kernels.TUNING["direct_launch"] = False
        res[f"alq_hook, per bucket (rounds of {k}, timing=False, Triton dispatch)"] = (
            host_us(rounds(state), args.calls, device) / k
        )
        _kernels.TUNING["direct_launch"] = True
        res[f"alq_hook, per bucket (rounds of {k}, timing=False as ddp_resnet50)"] = (
            host_us(rounds(state), args.calls, device) / k
        )
        from alq_torch import _plans  # the hook's per-bucket plans prepare its launches

        real_ops = _plans.prepare_quantize_encode, _plans.prepare_decode_sum
        _plans.prepare_quantize_encode = lambda x, *a, out, **kw: lambda seed: out  # type: ignore[assignment]
        _plans.prepare_decode_sum = lambda p, lv, c, n, *, out=None, **kw: lambda: out if out is not None else p  # type: ignore[assignment]
        stubbed = alq_torch.ALQState(config, warmup_steps=0, exact_below=0, timing=False)
        res[f"alq_hook, per bucket (rounds of {k}, timing=False, ops stubbed out)"] = (
            host_us(rounds(stubbed), args.calls, device) / k
        )
        _plans.prepare_quantize_encode, _plans.prepare_decode_sum = real_ops
        timed = alq_torch.ALQState(config, warmup_steps=0, exact_below=0)
        res[f"alq_hook, per bucket (rounds of {k}, timing=True: the default)"] = (
            host_us(rounds(timed), args.calls, device) / k
        )
    if args.cprofile and world > 1:  # where the hook's host time goes (rank 0's table; every rank runs the calls)
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        one = rounds(state)
        for _ in range(args.calls):
            one()
        prof.disable()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if rank == 0:
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumtime").print_stats(40)
            with open(f"{os.path.splitext(args.out)[0]}.cprofile.txt", "w") as fh:
                fh.write(text.getvalue())
    if rank == 0:
        meta = {
            "device": "CPU (smoke run)" if cpu else torch.cuda.get_device_name(device),
            "world": world,
            "process group": "fake (collectives move nothing; the hook's all-gather is a device copy)"
            if fake
            else dist.get_backend(),
            "numel": n,
            "calls": args.calls,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "host_us": res}, fh, indent=1)
        print(f"host time per call, median of {args.calls} (us), bucket {n} floats, world {world}: {meta['device']}")
        for k, v in res.items():
            print(f"{k:45s} {v:9.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
