"""Multi-process scenarios for the DDP hook tests (imported by spawned workers).

Every scenario runs on every rank of one process group and returns a dict of
plain values / tensors; :func:`run_group` saves them per rank, and the tests
(in the parent process) load them and check them against references computed
with the NumPy core. One spawn serves many scenarios: starting processes and
importing torch is the slow part.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from alq_core import METHODS, PayloadError, QuantizerConfig
from alq_torch import ALQState, alq_hook
from alq_torch.testing import FakeBucket

BUCKET = 256
#: Two DDP-bucket sizes per round: uneven (tail of 77) and exact multiple.
SIZES = (20 * BUCKET + 77, 6 * BUCKET)
QUANTIZED = [m for m, spec in METHODS.items() if spec.quantized]


def local_grad(step: int, index: int, rank: int, n: int) -> np.ndarray:
    """A gradient-like float32 vector: normal times a log-normal envelope, a few outliers."""
    rng = np.random.default_rng([step, index, rank, n])
    env = np.exp(0.7 * rng.standard_normal(n // 64 + 1)).repeat(64)[:n]
    g = rng.standard_normal(n) * env * 1e-2
    g[rng.integers(0, n, 3)] *= 30.0
    return g.astype(np.float32)


def schedule_kwargs() -> dict[str, Any]:
    """Level updates at rounds 0 and 1 (so round 1 uses version 1 and round 2 version 2)."""
    return {"schedule": [0, 1]}


def hook_rounds(
    method: str,
    collective: str,
    *,
    device: torch.device,
    rounds: int = 3,
    dtype: torch.dtype = torch.float32,
    group: Any = None,
    persistent: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """Call the hook directly on two buckets per round; return inputs' levels and the outputs.

    ``persistent``: every round refills the same two buffers (as DDP's bucket buffers), else new
    tensors each round. ``plans_kept``: per round after the first, whether each bucket's prepared
    exchange is the previous round's.
    """
    rank = dist.get_rank(group)
    cfg = QuantizerConfig(method, bits=3, bucket_size=BUCKET)
    state = ALQState(cfg, process_group=group, collective=collective, exact_below=0, **schedule_kwargs(), **kw)
    out: dict[str, Any] = {"levels": [], "versions": [], "results": [], "plans_kept": []}
    kept: list[list[Any]] = []
    bufs = [torch.zeros(n, device=device, dtype=dtype) for n in SIZES]
    for step in range(rounds):
        out["levels"].append(None if state.levels is None else state.levels.copy())
        out["versions"].append(state.table_version)
        res = []
        for i, n in enumerate(SIZES):
            grad = torch.from_numpy(local_grad(step, i, rank, n)).to(device=device, dtype=dtype)
            buf = bufs[i].copy_(grad) if persistent else grad
            fut = alq_hook(state, FakeBucket(buf, i, i == len(SIZES) - 1))  # type: ignore[arg-type]
            got = fut.wait()
            if isinstance(got, list):
                got = got[0]
            assert got.data_ptr() == buf.data_ptr(), "the hook must return bucket.buffer()"
            res.append(got.cpu().clone())  # (a CPU buffer is refilled next round)
        out["results"].append(res)
        kept.append([state._plans.get(i) for i in range(len(SIZES))])  # (held: ids of freed plans recur)
        if step:
            out["plans_kept"].append([a is b for a, b in zip(kept[-1], kept[-2])])
    tel = state.telemetry
    out["modes"] = [[b.mode for b in r.buckets] for r in tel]
    out["ratios"] = [r.compression_ratio for r in tel]
    out["updates"] = [
        None if r.level_update is None else (r.level_update.updated, r.level_update.version, r.level_update.reason)
        for r in tel
    ]
    out["variance"] = [r.variance for r in tel]
    out["step"] = state.step
    return out


# ----------------------------------------------------------------- scenarios
def sc_methods(device: torch.device) -> dict[str, Any]:
    res: dict[str, Any] = {"fp32": hook_rounds("fp32", "allgather", device=device, rounds=1)}
    for method in QUANTIZED:
        for coll in ("allgather", "reduce_scatter"):
            # persistent buffers (as DDP's): the hook reuses its prepared exchanges
            res[f"{method}/{coll}"] = hook_rounds(method, coll, device=device, measure_variance=True, persistent=True)
    return res


def sc_half(device: torch.device) -> dict[str, Any]:
    return {
        str(dt).replace("torch.", ""): hook_rounds("alq", coll, device=device, rounds=2, dtype=dt)
        for dt, coll in ((torch.float16, "allgather"), (torch.bfloat16, "reduce_scatter"))
    }


def sc_warmup(device: torch.device) -> dict[str, Any]:
    return {"alq": hook_rounds("alq", "allgather", device=device, rounds=3, warmup_steps=2)}


def sc_world1(device: torch.device) -> dict[str, Any]:
    group = dist.new_group([0])  # every rank must take part in creating it
    if dist.get_rank() != 0:
        return {}
    return {"alq": hook_rounds("alq", "allgather", device=device, rounds=2, group=group)}


def sc_plans(device: torch.device) -> dict[str, Any]:
    """A round of two buckets, then rounds of one (as when DDP rebuilds fewer buckets)."""
    rank = dist.get_rank()
    state = ALQState(QuantizerConfig("qsgdinf", bits=3, bucket_size=BUCKET), exact_below=0)
    bufs = [torch.from_numpy(local_grad(0, i, rank, n)).to(device) for i, n in enumerate(SIZES)]
    for i, buf in enumerate(bufs):
        alq_hook(state, FakeBucket(buf, i, i == len(bufs) - 1)).wait()  # type: ignore[arg-type]
    before = sorted(state._plans)
    alq_hook(state, FakeBucket(bufs[0], 0, True)).wait()  # type: ignore[arg-type]
    return {"before": before, "after": sorted(state._plans)}


def sc_nonfinite(device: torch.device) -> dict[str, Any]:
    rank = dist.get_rank()
    out = {}
    for coll in ("allgather", "reduce_scatter"):
        cfg = QuantizerConfig("qsgdinf", bits=3, bucket_size=BUCKET)
        state = ALQState(cfg, collective=coll, exact_below=0)
        buf = torch.from_numpy(local_grad(0, 0, rank, SIZES[0])).to(device)
        if rank == 1:
            buf[3 * BUCKET + 5] = float("inf")
            buf[7 * BUCKET + 1] = float("nan")
        out[coll] = alq_hook(state, FakeBucket(buf, 0, True)).wait().cpu()  # type: ignore[arg-type]
    return out


def sc_mismatch(device: torch.device) -> dict[str, Any]:
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for coll in ("allgather", "reduce_scatter"):
        cfg = QuantizerConfig("nuqsgd", bits=3, bucket_size=BUCKET)
        state = ALQState(cfg, collective=coll, exact_below=0)
        if rank == 1:  # a rank that resumed from another checkpoint
            sd = state.quantizer.state_dict()
            sd["version"] = sd["version"] + 5
            state.quantizer.load_state_dict(sd)
        buf = torch.from_numpy(local_grad(0, 0, rank, SIZES[0])).to(device)
        try:
            alq_hook(state, FakeBucket(buf, 0, True)).wait()  # type: ignore[arg-type]
            state.check()
            out[coll] = "no error"
        except (PayloadError, RuntimeError) as exc:
            out[coll] = f"{type(exc).__name__}: {exc}"
    return out


def sc_late_mismatch(device: torch.device) -> dict[str, Any]:
    """Good rounds, then rank 1's table version jumps at round 6: that round raises on every rank (CPU: in
    the decode; CUDA: the device header check read back after the round)."""
    rank = dist.get_rank()
    state = ALQState(QuantizerConfig("nuqsgd", bits=3, bucket_size=BUCKET), exact_below=0)
    bufs = [torch.from_numpy(local_grad(0, i, rank, n)).to(device) for i, n in enumerate(SIZES)]
    for step in range(10):
        if step == 6 and rank == 1:
            sd = state.quantizer.state_dict()
            sd["version"] = sd["version"] + 1
            state.quantizer.load_state_dict(sd)
        try:
            futs = [alq_hook(state, FakeBucket(b, i, i == len(bufs) - 1)) for i, b in enumerate(bufs)]  # type: ignore[arg-type]
            for f in futs:
                f.wait()
            state.check()
        except (PayloadError, RuntimeError) as exc:  # CPU: the host decode raises inside the future
            return {"step": step, "error": f"{type(exc).__name__}: {exc}"}
    return {"step": None, "error": ""}


def sc_sketch(device: torch.device) -> dict[str, Any]:
    """``alq-einf`` level updates from the sketch: a clean round, a round where rank 1 has a non-finite
    bucket, and a round of all-zero gradients (nothing to fit: the table is kept)."""
    rank = dist.get_rank()
    cfg = QuantizerConfig("alq-einf", bits=3, bucket_size=BUCKET)
    state = ALQState(cfg, exact_below=0, schedule=[0, 1, 2])
    out: dict[str, Any] = {"levels": [], "versions": [], "updates": []}
    for step in range(3):
        for i, n in enumerate(SIZES):
            g = local_grad(step, i, rank, n)
            if step == 1 and rank == 1 and i == 0:
                g[2 * BUCKET + 3] = np.nan
            if step == 2:
                g[:] = 0
            alq_hook(state, FakeBucket(torch.from_numpy(g).to(device), i, i == len(SIZES) - 1)).wait()  # type: ignore[arg-type]
        out["levels"].append(state.levels.copy())
        out["versions"].append(state.table_version)
        rec = state.telemetry[-1].level_update
        out["updates"].append(None if rec is None else (rec.updated, rec.reason, rec.num_buckets))
    return out


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 256)
        self.b = torch.nn.Linear(256, 128)
        self.c = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _batch(step: int, micro: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randn(16, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return x.to(device), y.to(device)


def _ddp(device: torch.device, state: ALQState | None, fixed_layout: bool = False) -> tuple[Any, torch.optim.Optimizer]:
    """The test net under DDP: two buckets (34186 and 8448 elements) after DDP's rebuild.

    ``fixed_layout``: ``find_unused_parameters=True``, with which DDP keeps its
    initial bucket layout instead of rebuilding it after the first backward.
    """
    torch.manual_seed(0)
    net = _Net().to(device)
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=ids, bucket_cap_mb=0.05, find_unused_parameters=fixed_layout
    )
    if state is not None:
        ddp.register_comm_hook(state, alq_hook)
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)


def _grads(ddp: Any) -> list[torch.Tensor]:
    return [p.grad.detach().cpu().clone() for p in ddp.parameters()]


def _train(ddp: Any, opt: torch.optim.Optimizer, steps: range, device: torch.device, micro: int = 1) -> list[Any]:
    rank = dist.get_rank()
    grads = []
    for step in steps:
        opt.zero_grad()
        for m in range(micro):
            x, y = _batch(step, m, rank, device)
            if m < micro - 1:
                with ddp.no_sync():
                    torch.nn.functional.cross_entropy(ddp(x), y).backward()
            else:
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
        grads.append(_grads(ddp))
        opt.step()
    return grads


def _cfg(method: str = "alq") -> QuantizerConfig:
    return QuantizerConfig(method, bits=3, bucket_size=BUCKET)


def sc_ddp(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ref, ref_opt = _ddp(device, None)
    out["exact"] = _train(ref, ref_opt, range(3), device)
    # warm-up rounds are exact: bit-identical to DDP without a hook
    st = ALQState(_cfg(), warmup_steps=2, exact_below=10000, **schedule_kwargs())
    ddp, opt = _ddp(device, st)
    out["warm"] = _train(ddp, opt, range(3), device)
    out["warm_modes"] = [[(b.mode, b.reason, b.numel) for b in r.buckets] for r in st.telemetry]
    # accumulation: two micro-batches under no_sync, one synchronized round per step
    st = ALQState(_cfg(), warmup_steps=1, exact_below=1024, **schedule_kwargs())
    ddp, opt = _ddp(device, st)
    out["accum"] = _train(ddp, opt, range(2), device, micro=3)
    out["accum_step"] = st.step
    ref, ref_opt = _ddp(device, None)
    out["accum_exact"] = _train(ref, ref_opt, range(1), device, micro=3)
    # resume: a checkpoint after round 2 continues bit-identically. DDP rebuilds its buckets after
    # its first backward, so a restarted job's first round would see another layout; with
    # find_unused_parameters=True DDP keeps one layout (see ALQState.state_dict).
    for method in ("alq", "qsgdinf"):
        st = ALQState(_cfg(method), exact_below=1024, seed=7, **schedule_kwargs())
        ddp, opt = _ddp(device, st, fixed_layout=True)
        _train(ddp, opt, range(2), device)
        ckpt = copy.deepcopy({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "alq": st.state_dict()})
        torch.save(ckpt, os.devnull)  # the state must be serializable
        first = _train(ddp, opt, range(2, 5), device)
        st2 = ALQState(_cfg(method), exact_below=1024, seed=0, **schedule_kwargs())
        st2.load_state_dict(ckpt["alq"])
        ddp2, opt2 = _ddp(device, st2, fixed_layout=True)
        ddp2.module.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        second = _train(ddp2, opt2, range(2, 5), device)
        out[f"resume/{method}"] = (first, second, st.table_version, st2.table_version)
        out[f"resume_layout/{method}"] = [
            [[(b.index, b.numel) for b in r.buckets] for r in s.telemetry[-3:]] for s in (st, st2)
        ]
    return out


def sc_amp(device: torch.device) -> dict[str, Any]:
    """An overflow on one rank makes GradScaler skip the step on every rank."""
    rank = dist.get_rank()
    st = ALQState(_cfg("alq"), exact_below=1024)
    ddp, opt = _ddp(device, st)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    before = [p.detach().clone() for p in ddp.parameters()]
    x, y = _batch(0, 0, rank, device)
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    if rank == 1:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, ddp.parameters()))
    skipped_scale = scaler.get_scale()
    x, y = _batch(1, 0, rank, device)
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(ddp(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    moved = not all(torch.equal(a, b) for a, b in zip(before, ddp.parameters()))
    return {"unchanged": unchanged, "scale": skipped_scale, "moved": moved}


def sc_compiled(device: torch.device) -> dict[str, Any]:
    """The hook with the module compiled inside DDP, beside the same run eager and an exact one.

    Dynamo's DDP optimizer splits the compiled graph at DDP's buckets (it needs buckets of at least
    DDP's 1 MiB first bucket, so a wider net: 2.2 MB of gradients in three buckets) and the reducer
    calls the hook between the compiled pieces. ``pieces``: how many pieces the backend compiled.
    (torch 2.13 compiles nothing under ``torch.compile(ddp)`` on the CPU, hence the inner module.)
    """
    out: dict[str, Any] = {}
    aot_eager = torch._dynamo.lookup_backend("aot_eager")  # no code generation: quick, same arithmetic
    pieces: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        pieces.append(gm)  # one call per piece of the split graph
        return aot_eager(gm, example_inputs)

    for mode in ("exact", "eager", "compiled"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(32, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10),
        ).to(device)  # fmt: skip
        ddp = torch.nn.parallel.DistributedDataParallel(
            torch.compile(net, backend=backend) if mode == "compiled" else net, bucket_cap_mb=1
        )
        st = ALQState(_cfg("qsgdinf"), warmup_steps=1, exact_below=1024, seed=3, **schedule_kwargs())
        if mode != "exact":
            ddp.register_comm_hook(st, alq_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        out[mode] = _train(ddp, opt, range(2 if mode == "exact" else 3), device)
        out[f"{mode}_modes"] = [[b.mode for b in r.buckets] for r in st.telemetry]
    out["pieces"] = len(pieces)
    return out


SCENARIOS: dict[str, Callable[[torch.device], dict[str, Any]]] = {
    "methods": sc_methods,
    "half": sc_half,
    "warmup": sc_warmup,
    "world1": sc_world1,
    "nonfinite": sc_nonfinite,
    "mismatch": sc_mismatch,
    "late_mismatch": sc_late_mismatch,
    "ddp": sc_ddp,
    "amp": sc_amp,
    "compiled": sc_compiled,
    "plans": sc_plans,
    "sketch": sc_sketch,
}


def serve(
    scenarios: dict[str, Callable[[torch.device], Any]],
    rank: int,
    world: int,
    port: int,
    outdir: str,
    backend: str,
    names: list[str],
) -> None:
    """One spawned rank: join the group, run the named scenarios, save each result for the parent."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    elif backend == "gloo-cuda":  # every rank on GPU 0, through Gloo's CUDA collectives
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend.removesuffix("-cuda"),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        for name in names:
            try:
                result: Any = scenarios[name](device)
            except Exception:
                result = {"__error__": traceback.format_exc()}
            torch.save(result, os.path.join(outdir, f"{name}.{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, outdir: str, backend: str, names: list[str]) -> None:
    serve(SCENARIOS, rank, world, port, outdir, backend, names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_group(worker: Callable[..., None], world: int, names: list[str], backend: str) -> dict[str, list[Any]]:
    """Spawn ``world`` ranks of ``worker`` (a module's ``_worker``); ``{name: [result of rank 0, 1, ...]}``."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(worker, args=(world, free_port(), outdir, backend, names), nprocs=world, join=True)
        return {
            name: [torch.load(os.path.join(outdir, f"{name}.{r}.pt"), weights_only=False) for r in range(world)]
            for name in names
        }


def run_group(world: int, names: list[str], backend: str = "gloo") -> dict[str, list[Any]]:
    """Run scenarios on ``world`` spawned ranks; returns ``{name: [result of rank 0, 1, ...]}``.

    ``backend``: ``"gloo"`` (CPU tensors), ``"nccl"`` (rank r on GPU r) or ``"gloo-cuda"`` (Gloo, every rank
    on GPU 0).
    """
    return spawn_group(_worker, world, names, backend)
