"""Where the DDP hook's host time goes, per bucket: the hook's own methods and calls timed in place.

One process, one GPU, torch's fake process group of two ranks (the hook takes its multi-rank path; the
all-gather it calls is replaced by one device copy of this rank's payload into every slot, as in
``host_overhead.py --fake-world``). Rounds of ``--buckets`` buckets of ``--numel`` float32 gradients;
the first ``--warmup`` rounds are not counted. Prints, per bucket, the median and mean over rounds of
each timed piece (a piece called once per round is spread over the round's buckets), with ``timing``
off (as ``ddp_resnet50.py`` runs it) and on (the default)::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src python3 benchmarks/hook_breakdown.py

The timers wrap private methods of ``alq_torch.ALQState`` (defined across ``alq_torch._hook``,
``_exchange`` and ``_checks``), the plans' prepared launches (``alq_torch._plans``) and the hook's
all-gather (``alq_torch._hook._all_gather_flat``): private names, so this developer's tool breaks when
they change; the timers' own cost, about a microsecond each, is included.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

PIECES = ("_begin_bucket", "_collect_flags", "_raise_failed_checks", "_end_round", "_update_levels", "_mode",
          "_plan", "_timed")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=6_553_600)
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--device", default="cuda", help="cpu: a smoke check of the script (the CPU ops run)")
    args = p.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    import alq_torch
    from alq_core import QuantizerConfig
    from alq_torch import _hook, _plans
    from alq_torch.testing import FakeBucket

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    fake_gather = _hook._all_gather_flat

    def gather(out: torch.Tensor, inp: torch.Tensor, group: Any, async_op: bool) -> Any:
        timed("stand-in copy (not the hook's)", lambda: out.view(-1, inp.numel()).copy_(inp))()
        return timed("fake all-gather call (not the hook's)", fake_gather)(out, inp, group, async_op)

    _hook._all_gather_flat = gather  # type: ignore[assignment]
    prep_q, prep_d = _plans.prepare_quantize_encode, _plans.prepare_decode_sum
    _plans.prepare_quantize_encode = lambda *a, **kw: timed("prepared quantize", prep_q(*a, **kw))  # type: ignore[assignment]
    _plans.prepare_decode_sum = lambda *a, **kw: timed("prepared decode", prep_d(*a, **kw))  # type: ignore[assignment]
    for name in PIECES:
        if not callable(getattr(_hook.ALQState, name, None)):
            raise SystemExit(f"hook_breakdown.py: ALQState has no method {name!r}; update PIECES")
        setattr(_hook.ALQState, name, timed(name, getattr(_hook.ALQState, name)))
    hook = timed("alq_hook (whole call)", alq_torch.alq_hook)
    device = torch.device(args.device)
    config = QuantizerConfig("alq", bits=3, bucket_size=8192, nonfinite="propagate")
    k = args.buckets
    grads = [torch.randn(args.numel, device=device) * 1e-3 for _ in range(k)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {k} buckets of {args.numel} floats")
    for timing in (False, True):
        state = alq_torch.ALQState(config, warmup_steps=0, exact_below=0, timing=timing)
        per_round: dict[str, list[float]] = collections.defaultdict(list)
        for r in range(args.rounds):
            spent.clear()
            futs = [hook(state, FakeBucket(g, i, i == k - 1)) for i, g in enumerate(grads)]
            t0 = time.perf_counter()
            for f in futs:
                f.wait()
            spent["future.wait"] += time.perf_counter() - t0
            if r % 50 == 49 and device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= args.warmup:
                for name, v in spent.items():
                    per_round[name].append(v / k)
        counted = args.rounds - args.warmup
        print(f"timing={timing}: us per bucket, median / mean over {counted} rounds (pieces nest: see PIECES)")
        for name, v in sorted(per_round.items(), key=lambda kv: -statistics.median(kv[1])):
            v += [0.0] * (counted - len(v))  # rounds where the piece did not run
            print(f"  {name:40s} {statistics.median(v) * 1e6:9.1f} {statistics.mean(v) * 1e6:9.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
