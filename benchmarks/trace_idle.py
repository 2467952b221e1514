"""Where a profiled DDP step's GPU time goes: busy and idle time of each CUDA stream per step.

Reads the Chrome traces ``ddp_resnet50.py --profile`` writes (``*.trace.json.gz``, rank 0, three
steps) and prints, per step (from one ``Optimizer.zero_grad`` to the next), the step's length, each
stream's busy time (union of its kernels, copies and sets), the compute stream's idle time and its
longest gaps with the kernel that ended each gap. The profiler slows the host, so a profiled step is
longer than a timed one: use it to see *where* the GPU waits (for the host between graph replays,
for a collective), not for step times::

    python benchmarks/trace_idle.py benchmarks/results/ddp_graphs_r6_sockets.profile.ALQ_alq.trace.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from collections import defaultdict
from typing import Any


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (start, end)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def analyse(events: list[dict[str, Any]], gaps: int) -> list[dict[str, Any]]:
    """Per-step stream statistics (microseconds) of a Chrome trace's events."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    starts = sorted(
        e["ts"] for e in events if e.get("cat") == "user_annotation" and e.get("name", "").endswith("zero_grad")
    )
    if not gpu or len(starts) < 2:
        msg = "no GPU events or fewer than two Optimizer.zero_grad annotations: not a --profile trace of steps"
        raise ValueError(msg)
    compute = max(
        {e["args"].get("stream") for e in gpu}, key=lambda s: sum(e["dur"] for e in gpu if e["args"].get("stream") == s)
    )
    steps = []
    for lo, hi in itertools.pairwise(starts):
        by_stream: dict[Any, list[tuple[float, float]]] = defaultdict(list)
        for e in gpu:
            if lo <= e["ts"] < hi:
                by_stream[e["args"].get("stream")].append((e["ts"], e["ts"] + e["dur"]))
        mine = sorted(
            (e for e in gpu if lo <= e["ts"] < hi and e["args"].get("stream") == compute), key=lambda e: e["ts"]
        )
        found = []
        end = None
        for e in mine:
            if end is not None and e["ts"] > end:
                found.append((e["ts"] - end, end - lo, e["name"][:60]))
            end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
        busy = {str(s): _union(iv) for s, iv in by_stream.items()}
        steps.append(
            {
                "step_us": hi - lo,
                "compute_stream": str(compute),
                "busy_us": busy,
                "compute_idle_us": (hi - lo) - busy[str(compute)],
                "longest_gaps": sorted(found, reverse=True)[:gaps],
            }
        )
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", help="*.trace.json.gz files of ddp_resnet50.py --profile")
    p.add_argument("--gaps", type=int, default=5, help="longest compute-stream gaps listed per step")
    args = p.parse_args()
    for path in args.traces:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as fh:
            events = json.load(fh)["traceEvents"]
        print(path)
        for i, st in enumerate(analyse(events, args.gaps)):
            others = ", ".join(
                f"stream {s} {v / 1e3:.2f}" for s, v in st["busy_us"].items() if s != st["compute_stream"]
            )
            print(
                f"  step {i}: {st['step_us'] / 1e3:.2f} ms; compute stream {st['compute_stream']} busy "
                f"{st['busy_us'][st['compute_stream']] / 1e3:.2f} ms, idle {st['compute_idle_us'] / 1e3:.2f} ms; "
                f"other streams busy (ms): {others}"
            )
            for gap, at, name in st["longest_gaps"]:
                print(f"    gap {gap / 1e3:.3f} ms at +{at / 1e3:.2f} ms, then {name}")


if __name__ == "__main__":
    main()
