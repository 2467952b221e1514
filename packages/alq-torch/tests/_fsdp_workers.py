"""Multi-process scenarios for the FSDP2 tests (imported by spawned workers).

Same shape as ``_hook_workers``: every scenario runs on every rank and returns plain values / tensors;
the tests check them in the parent process against the public ops and the NumPy core.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _hook_workers import local_grad, serve, spawn_group
from alq_core import METHODS, PayloadError, QuantizerConfig
from alq_torch import ALQAllReduceHook, ALQReduceScatter, register_fsdp

BUCKET = 256
#: Shard sizes S of the two direct calls per round: uneven (5 buckets and a tail of 20) and a multiple.
SHARDS = (5 * BUCKET + 20, 3 * BUCKET)
QUANTIZED = [m for m, spec in METHODS.items() if spec.quantized]


def cfg_of(method: str) -> QuantizerConfig:
    return QuantizerConfig(method, bits=3, bucket_size=BUCKET)


def rs_input(step: int, index: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s reduce-scatter input of call ``index`` in round ``step``: ``world`` chunks of ``SHARDS[index]``."""
    return local_grad(step, 100 + index, rank, world * SHARDS[index])


def _tables(comm: Any) -> tuple[Any, int]:
    return (None if comm.levels is None else comm.levels.copy()), comm.table_version


def direct_rounds(
    method: str, *, device: torch.device, rounds: int = 3, dtype: torch.dtype = torch.float32, op: Any = None, **kw: Any
) -> dict[str, Any]:
    """Drive an ALQReduceScatter by hand (as FSDP calls it): two calls per round, then ``end_round``."""
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    comm = ALQReduceScatter(cfg_of(method), exact_below=0, schedule=[0, 1], **kw)
    out: dict[str, Any] = {"levels": [], "versions": [], "results": [], "modes": []}
    for step in range(rounds):
        lv, ver = _tables(comm)
        out["levels"].append(lv)
        out["versions"].append(ver)
        res = []
        for i, s in enumerate(SHARDS):
            inp = torch.from_numpy(rs_input(step, i, rank, world)).to(device=device, dtype=dtype)
            got = torch.empty(s, dtype=dtype, device=device)
            comm(got, inp, group, dist.ReduceOp.AVG if op is None else op)
            res.append(got.cpu())
        comm.end_round()
        out["results"].append(res)
        rec = comm.telemetry[-1]
        out["modes"].append([(b.mode, b.reason, b.bytes_sent, b.bytes_exact) for b in rec.buckets])
        upd = rec.level_update
        out.setdefault("updates", []).append(None if upd is None else (upd.updated, upd.version, upd.reason))
    out["final"] = _tables(comm)
    return out


def sc_methods(device: torch.device) -> dict[str, Any]:
    res: dict[str, Any] = {"fp32": direct_rounds("fp32", device=device, rounds=1)}
    for method in QUANTIZED:
        res[method] = direct_rounds(method, device=device)
    return res


def sc_half(device: torch.device) -> dict[str, Any]:
    """bfloat16 with FSDP's AVG; float16 with SUM (FSDP pre/post-divides float16 around a SUM)."""
    return {
        "bfloat16": direct_rounds("alq", device=device, rounds=2, dtype=torch.bfloat16),
        "float16": direct_rounds("alq", device=device, rounds=2, dtype=torch.float16, op=dist.ReduceOp.SUM),
    }


def sc_exact(device: torch.device) -> dict[str, Any]:
    """Warm-up rounds and small inputs take FSDP's own reduce-scatter."""
    return {
        "warmup": direct_rounds("alq", device=device, rounds=3, warmup_steps=2),
    }


def _mismatch_run(device: torch.device, corrupt: bool) -> str:
    world, rank = dist.get_world_size(), dist.get_rank()

    class Corrupting(ALQReduceScatter):
        def _exchange(self, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
            if rank == 1:
                size = send.numel() // world
                for k in range(world):
                    send[k * size + 20] ^= 0xFF  # a header byte of every payload rank 1 sends
            super()._exchange(recv, send, group)

    cls = Corrupting if corrupt else ALQReduceScatter
    comm = cls(cfg_of("nuqsgd"), exact_below=0)
    if rank == 1 and not corrupt:  # a rank that resumed from another checkpoint
        sd = comm.quantizer.state_dict()
        sd["version"] = sd["version"] + 5
        comm.quantizer.load_state_dict(sd)
    try:
        for step in range(2):
            for i, s in enumerate(SHARDS):
                inp = torch.from_numpy(rs_input(step, i, rank, world)).to(device)
                comm(torch.empty(s, device=device), inp, dist.group.WORLD, dist.ReduceOp.AVG)
            comm.end_round()
        comm.check()
    except (PayloadError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def sc_mismatch(device: torch.device) -> dict[str, Any]:
    return {"version": _mismatch_run(device, False), "corrupt": _mismatch_run(device, True)}


# ------------------------------------------------------------------ FSDP2 models
class _Net(torch.nn.Module):
    """Odd sizes (uneven shards), a layer that never runs (parameters without gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(31, 97)
        self.b = torch.nn.Linear(97, 61)
        self.unused = torch.nn.Linear(5, 7)
        self.c = torch.nn.Linear(61, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 31, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)


def _fsdp(device: torch.device, reshard: bool = True, mesh: Any = None) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = _Net().to(device)
    kw: dict[str, Any] = {"reshard_after_forward": reshard}
    if mesh is not None:
        kw["mesh"] = mesh
    for m in (net.a, net.b, net.unused, net.c):
        fully_shard(m, **kw)
    fully_shard(net, **kw)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


class _RecordingRS(ALQReduceScatter):
    """Keeps each call's input and output (to check them against the ops and the exact average)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any, async_op: bool = False
    ) -> None:  # type: ignore[override]
        step, index = self.step, self._calls if self._in_round else 0
        inp = input_tensor.detach().cpu().clone()
        super().__call__(output_tensor, input_tensor, group, op, async_op)
        self.calls.append((step, index, inp, output_tensor.detach().cpu().clone()))


def _shards(net: Any) -> list[torch.Tensor]:
    return [p._local_tensor.detach().cpu().clone() for p in net.parameters()]


def _train(net: Any, opt: Any, steps: range, device: torch.device) -> tuple[list[float], list[list[Any]]]:
    rank = dist.get_rank()
    losses, grads = [], []
    for step in steps:
        opt.zero_grad()
        x, y = _batch(step, rank, device)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grads.append(
            [None if p.grad is None else p.grad._local_tensor.detach().cpu().clone() for p in net.parameters()]
        )
        opt.step()
        losses.append(float(loss))
    return losses, grads


def _train_accumulating(net: Any, opt: Any, steps: range, device: torch.device) -> list[float]:
    """Two micro-batches per step; the first backward without gradient sync (no reduce-scatter)."""
    rank = dist.get_rank()
    losses = []
    for step in steps:
        opt.zero_grad()
        for micro in (0, 1):
            net.set_requires_gradient_sync(micro == 1)
            x, y = _batch(10 * step + micro, rank, device)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            losses.append(float(loss))
        opt.step()
    return losses


def sc_fsdp(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # gradient accumulation: only the syncing backward calls the comm, one round per optimizer step; its input is
    # the accumulated gradient (the same as FSDP's own reduce-scatter gets, seen through an exact warm-up round)
    for name, kw in (("accum/exact", {"warmup_steps": 10}), ("accum/alq", {})):
        net, opt = _fsdp(device)
        comm = _RecordingRS(cfg_of("alq"), exact_below=0, schedule=[0, 2], seed=5, **kw)
        for m in (net.a, net.b, net.unused, net.c, net):
            m.set_custom_reduce_scatter(comm)
        losses = _train_accumulating(net, opt, range(3), device)
        out[name] = (losses, comm.step, [(st, i, inp) for st, i, inp, _ in comm.calls], _tables(comm))
    net, opt = _fsdp(device)
    out["exact"] = _train(net, opt, range(4), device)
    for reshard in (True, False):
        net, opt = _fsdp(device, reshard)
        comm = _RecordingRS(cfg_of("alq"), exact_below=0, schedule=[0, 2], seed=5, measure_variance=2)
        assert register_fsdp(net, comm.config) is not None  # installs a fresh comm ...
        for m in (net.a, net.b, net.unused, net.c, net):  # ... which we replace by the recording one
            m.set_custom_reduce_scatter(comm)
        out[f"alq/{reshard}"] = _train(net, opt, range(4), device)
        out[f"calls/{reshard}"] = comm.calls
        out[f"tables/{reshard}"] = _tables(comm)
        out[f"steps/{reshard}"] = comm.step
        out[f"modes/{reshard}"] = [[(b.index, b.mode, b.numel) for b in r.buckets] for r in comm.telemetry]
        out[f"variance/{reshard}"] = [r.variance for r in comm.telemetry]
    # warm-up rounds: bit-identical to FSDP's own reduce-scatter
    net, opt = _fsdp(device)
    comm = register_fsdp(net, cfg_of("alq"), warmup_steps=4, exact_below=0)
    out["warm"] = _train(net, opt, range(4), device)
    # resume: a checkpoint after round 2 continues bit-identically
    for method in ("alq", "alq-einf"):
        kw: dict[str, Any] = {"exact_below": 0, "schedule": [0, 1, 3], "seed": 9}
        net, opt = _fsdp(device)
        comm = register_fsdp(net, cfg_of(method), **kw)
        _train(net, opt, range(2), device)
        ckpt = copy.deepcopy({"shards": _shards(net), "opt": opt.state_dict(), "alq": comm.state_dict()})
        first = _train(net, opt, range(2, 5), device)
        net2, opt2 = _fsdp(device)
        with torch.no_grad():
            for p, s in zip(net2.parameters(), ckpt["shards"]):
                p._local_tensor.copy_(s)
        opt2.load_state_dict(ckpt["opt"])
        comm2 = register_fsdp(net2, cfg_of(method), **{**kw, "seed": 0})
        comm2.load_state_dict(ckpt["alq"])
        second = _train(net2, opt2, range(2, 5), device)
        out[f"resume/{method}"] = (first, second, _tables(comm), _tables(comm2))
    return out


def sc_hybrid(device: torch.device) -> dict[str, Any]:
    """2 x 2 mesh: FSDP within a group of 2 (exact), ALQ across the 2 groups."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (2, 2), mesh_dim_names=("replicate", "shard"))
    out: dict[str, Any] = {"coords": mesh.get_coordinate()}

    class Recording(ALQAllReduceHook):
        calls: list[Any] = []
        moved: list[int] = []

        def __call__(self, tensor: torch.Tensor) -> None:
            step, index = self.step, self._calls if self._in_round else 0
            inp = tensor.detach().cpu().clone()
            super().__call__(tensor)
            self.calls.append((step, index, inp, tensor.detach().cpu().clone()))

        def _exchange(self, recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
            self.moved.append(send.numel())
            super()._exchange(recv, send, group)

    # reference: FSDP within the group, a recording hook that only keeps the exact group average
    net, opt = _fsdp(device, mesh=mesh["shard"])
    seen: list[torch.Tensor] = []
    for m in (net.a, net.b, net.c, net):
        m.set_all_reduce_hook(lambda t: seen.append(t.detach().cpu().clone()))
    x, y = _batch(0, dist.get_rank(), device)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    out["group_average"] = seen

    net, opt = _fsdp(device, mesh=mesh["shard"])
    hook = register_fsdp(net, cfg_of("alq"), hybrid=True, mesh=mesh, exact_below=0, schedule=[0, 1])
    rec = Recording(hook.config, hook.replicate_group, exact_below=0, schedule=[0, 1])
    for m in (net.a, net.b, net.c, net):
        m.set_all_reduce_hook(rec)
    tables = []
    for step in range(3):
        tables.append(_tables(rec))
        _train(net, opt, range(step, step + 1), device)
    out["tables"] = [*tables, _tables(rec)]
    out["calls"] = rec.calls
    out["moved"] = rec.moved
    out["records"] = [
        [(b.index, b.mode, b.numel, b.bytes_sent, b.bytes_exact) for b in r.buckets] for r in rec.telemetry
    ]
    out["replicate_ranks"] = dist.get_process_group_ranks(hook.replicate_group)
    try:
        net3, _ = _fsdp(device, mesh=mesh)  # native HSDP: refused with the reason
        register_fsdp(net3, cfg_of("alq"), hybrid=True, mesh=mesh)
        out["native_hsdp"] = "accepted"
    except ValueError as exc:
        out["native_hsdp"] = str(exc)
    return out


SCENARIOS: dict[str, Callable[[torch.device], dict[str, Any]]] = {
    "methods": sc_methods,
    "half": sc_half,
    "exact": sc_exact,
    "mismatch": sc_mismatch,
    "fsdp": sc_fsdp,
    "hybrid": sc_hybrid,
}


def _worker(rank: int, world: int, port: int, outdir: str, backend: str, names: list[str]) -> None:
    serve(SCENARIOS, rank, world, port, outdir, backend, names)


def run_group(world: int, names: list[str], backend: str = "gloo") -> dict[str, list[Any]]:
    """Run scenarios on ``world`` spawned ranks; returns ``{name: [result of rank 0, 1, ...]}``."""
    return spawn_group(_worker, world, names, backend)
