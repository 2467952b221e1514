"""One training run: a model trained with one method and one seed, simulated or under DDP.

The run records what the paper measures: validation accuracy over training,
the normalized quantization variance ``||Q(g) - g||^2 / ||g||^2`` of the
method on the workers' gradients, the level tables after every update, bits
on the wire, and the time spent quantizing and updating levels.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import alq_core
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._simulate import SimulatedWorkers, exact_mask_from_params
from .data import Dataset, WorkerSampler
from .models import build_model, num_parameters
from .report import HISTORY_ERROR_KEYS, measured_errors
from .workers import GradientComputer


@dataclass
class RunConfig:
    """Every setting of one run (method and seed included); stored in checkpoints.

    ``update_steps`` are explicit level-update steps and ``update_every`` the
    period after the last of them (SPEC section 9: ``(0, 100, 2000)`` then every
    10000). ``milestones`` are fractions of ``steps`` where the learning rate is
    multiplied by 0.1 (the paper's 40k and 60k of 80k). ``exact_1d`` sends the
    1-D tensors (biases, BatchNorm weights/biases) exactly in full precision.
    """

    method: str = "alq"
    bits: int = 3
    bucket_size: int = 8192
    workers: int = 4
    seed: int = 0
    steps: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    milestones: tuple[float, ...] = (0.5, 0.75)
    update_steps: tuple[int, ...] = (0, 100, 2000)
    update_every: int = 10000
    update_method: str = "exact"
    dist_num: int = 50
    clip: float | str | None = "auto"
    model: str = "mlp"
    eval_every: int = 0
    log_every: int = 0
    checkpoint_every: int = 0
    exact_1d: bool = False

    def quantizer_config(self) -> alq_core.QuantizerConfig:
        """The :class:`alq_core.QuantizerConfig` of this run (``fp32`` is never clipped: ``--clip`` is for the quantizers)."""
        clip = self.clip if alq_core.METHODS[self.method].quantized else None
        return alq_core.QuantizerConfig(self.method, bits=self.bits, bucket_size=self.bucket_size, clip=clip)

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: ``lr * 0.1**(milestones passed)``."""
        passed = sum(1 for m in self.milestones if step >= round(m * self.steps))
        return self.lr * (0.1**passed)

    def update_due(self, step: int) -> bool:
        """True when the level schedule asks for an update at ``step``."""
        if step in self.update_steps:
            return True
        last = max(self.update_steps) if self.update_steps else 0
        return self.update_every > 0 and step > last and (step - last) % self.update_every == 0

    def interval(self, every: int, default_points: int) -> int:
        """``every`` if positive, else about ``default_points`` points over the run."""
        return every if every > 0 else max(1, self.steps // default_points)

    def signature(self) -> dict[str, Any]:
        """Plain-data form, compared on resume."""
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        out["update_steps"] = list(self.update_steps)
        if not self.exact_1d:  # checkpoints written before the option existed still resume
            del out["exact_1d"]
        return out


@dataclass
class RunResult:
    """Everything a run reports (plain data; see :mod:`alq_torch.train.report`)."""

    method: str
    seed: int
    bits: int
    bucket_size: int
    workers: int
    num_params: int
    steps: int
    final_val_acc: float
    final_val_loss: float
    best_val_acc: float
    final_variance: float
    bits_per_step: int
    train_seconds: float
    grad_seconds: float
    quantize_seconds: float
    update_seconds: float
    num_updates: int
    mode: str = "simulated"
    diverged_at: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    levels: list[dict[str, Any]] = field(default_factory=list)
    exact_1d: bool = False
    final_errors: dict[str, Any] = field(default_factory=dict)

    @property
    def quantize_share(self) -> float:
        """Share of training time spent quantizing (and averaging)."""
        return self.quantize_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def update_share(self) -> float:
        """Share of training time spent updating levels."""
        return self.update_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, shares included."""
        out = asdict(self)
        out["quantize_share"] = self.quantize_share
        out["update_share"] = self.update_share
        return out


class ScheduledQuantizer:
    """An :class:`alq_core.AdaptiveQuantizer` whose ``due(step)`` follows the run's schedule.

    Everything else (``levels``, ``version``, ``update``, ``state_dict``...) is the
    wrapped quantizer's; the DDP hook and :class:`SimulatedWorkers` consult ``due``.
    """

    def __init__(self, inner: Any, run: RunConfig) -> None:
        self.inner = inner
        self.run = run

    def due(self, step: int) -> bool:
        """True at the run's level-update steps (never for fixed methods)."""
        return bool(self.run.quantizer_config().spec.adaptive and self.run.update_due(int(step)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_quantizer(run: RunConfig) -> ScheduledQuantizer:
    """The level-table owner of a run: the core's AdaptiveQuantizer on the run's schedule."""
    inner = alq_core.AdaptiveQuantizer(run.quantizer_config(), update=run.update_method)
    return ScheduledQuantizer(inner, run)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 1000) -> tuple[float, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy on the validation split."""
    was = model.training
    model.eval()
    correct = 0
    loss = 0.0
    n = data.y_val.shape[0]
    for i in range(0, n, batch):
        x = data.prepare(data.x_val[i : i + batch], None, False)
        y = data.y_val[i : i + batch]
        logits = model(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was)
    return correct / max(1, n), loss / max(1, n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: What a checkpoint may hold besides tensors (the types ``torch.load(weights_only=True)`` reads back).
_PLAIN = (str, int, float, bool, type(None))


def _plain_data(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy arrays as lists and numpy scalars as Python scalars; other types are refused.

    Keeps a checkpoint readable by ``torch.load(..., weights_only=True)``: tensors
    (RNG states included, which are uint8 tensors), ``dict``, ``list``, ``tuple``,
    ``str``, ``int``, ``float``, ``bool`` and ``None``. Raises TypeError naming the
    entry (``where``) for anything else, so a bad checkpoint fails when written.
    """
    if isinstance(obj, np.generic):  # before _PLAIN: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, (Tensor, *_PLAIN)):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, OrderedDict):  # a module's state_dict(); keep its version metadata
        out = OrderedDict((k, _plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, dict):
        return {k: _plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    msg = (
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only tensors "
        "and plain data (dict, list, tuple, str, int, float, bool, None); fix: make the state_dict() "
        "that produced it return plain data"
    )
    raise TypeError(msg)


def _load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`_save_checkpoint`, weights-only (no arbitrary objects).

    Raises FileNotFoundError when ``path`` is missing and ValueError, naming the
    file, when it is damaged or holds anything but tensors and plain data.
    """
    if not os.path.isfile(path):
        msg = f"checkpoint {path!r} does not exist; fix: check the path, or start the run without --resume"
        raise FileNotFoundError(msg)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
        first = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0])
        msg = (
            f"checkpoint {path!r} could not be read as a weights-only checkpoint ({type(exc).__name__}: "
            f"{first[:300]}). alq-torch checkpoints hold only tensors and plain data; this file is damaged, "
            "not an alq-train checkpoint, or holds other pickled objects (which are never unpickled). "
            "Fix: delete it and run that run again without --resume"
        )
        raise ValueError(msg) from exc
    if not isinstance(ck, dict):
        msg = f"checkpoint {path!r} must hold a dict; got {type(ck).__name__}; fix: delete it and run again"
        raise ValueError(msg)
    return ck


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (converted by :func:`_plain_data`) to ``path`` atomically."""
    plain = _plain_data(state)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(plain, tmp)
    os.replace(tmp, path)


def _new_state(**extra: Any) -> dict[str, Any]:
    """A run's progress record (checkpointed with it): step, history, level tables, times, counters."""
    return {
        "step": 0,
        "history": [],
        "levels": [],
        "times": {"train": 0.0, "grad": 0.0, "quant": 0.0, "update": 0.0},
        "num_updates": 0,
        "last_var": float("nan"),
        "best": 0.0,
        **extra,
    }


def _snapshot(
    run: RunConfig,
    model: torch.nn.Module,
    opt: Any,
    sampler: Any,
    aug: torch.Generator,
    state: dict[str, Any],
    **parts: Any,
) -> dict[str, Any]:
    """Everything a checkpoint holds; ``parts`` are the run's stateful helpers (``sim=`` or ``hook=``)."""
    return {
        "run": run.signature(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        **{name: part.state_dict() for name, part in parts.items()},
        "sampler": sampler.state_dict(),
        "aug": aug.get_state(),
        "state": state,
    }


def _restore(
    path: str,
    run: RunConfig,
    device: torch.device,
    model: torch.nn.Module,
    opt: Any,
    sampler: Any,
    aug: torch.Generator,
    *,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **parts: Any,
) -> dict[str, Any]:
    """Load the :func:`_snapshot` at ``path`` into the run's objects; returns its progress record.

    ``prepare`` turns the checkpoint read from disk into what the objects load (the FSDP harness
    rebuilds DTensors from the saved local shards); it runs after the run's settings are checked.
    """
    ck = _load_checkpoint(path)
    missing = sorted({"run", "model", "optimizer", "sampler", "aug", "state", *parts} - set(ck))
    if missing:
        msg = f"checkpoint {path!r} lacks {missing}; got keys {sorted(map(str, ck))}; fix: delete it and run again"
        raise ValueError(msg)
    if ck["run"] != run.signature():
        diff = {k: (ck["run"].get(k), v) for k, v in run.signature().items() if ck["run"].get(k) != v}
        msg = f"checkpoint {path!r} belongs to a different run; differing settings (saved, now): {diff}"
        raise ValueError(msg)
    if prepare is not None:
        ck = prepare(ck)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    opt.state.update({p: _tensor_state(s, device) for p, s in opt.state.items()})
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    sampler.load_state_dict(ck["sampler"])
    aug.set_state(ck["aug"])
    state: dict[str, Any] = ck["state"]
    return state


def _tensor_state(obj: Any, device: torch.device) -> Any:
    """Move optimizer-state tensors back to the device after loading."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _tensor_state(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tensor_state(v, device) for v in obj]
    return obj


# --------------------------------------------------------------------------- simulated run
def resolve_steps(settings: dict[str, Any], n_train: int, workers: int) -> int:
    """Training steps: ``settings["steps"]``, or ``settings["epochs"]`` passes over ``n_train``
    examples when given (each step consumes ``workers * batch_size`` examples)."""
    if settings.get("epochs") is not None:
        return max(1, round(float(settings["epochs"]) * n_train / (workers * int(settings["batch_size"]))))
    return int(settings["steps"])


def train_run(
    run: RunConfig,
    data: Dataset,
    *,
    device: torch.device,
    checkpoint: str | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    workers_mode: str = "auto",
    amp: str = "none",
    channels_last: bool = False,
) -> tuple[RunResult | None, nn.Module, SimulatedWorkers]:
    """Train one (method, seed) with K simulated workers on one device.

    Parameters
    ----------
    run : RunConfig
    data : Dataset
        Already on ``device``.
    device : torch.device
    checkpoint : str, optional
        Path of this run's checkpoint (written every ``run.checkpoint_every``
        steps, at ``stop_at`` and at the end).
    resume : bool
        Continue from ``checkpoint`` if it exists (bit-identical continuation).
    stop_at : int, optional
        Stop after this many steps, save a checkpoint, and return ``None`` as
        the result (simulates a pre-emption; used to test resume).
    progress : bool
        Show a tqdm progress bar.
    workers_mode : {"auto", "batched", "sequential"}
        How the K worker gradients are computed (:class:`GradientComputer`):
        one vmapped pass (``auto``: MLPs, and BatchNorm models on CUDA) or
        K sequential passes; the results agree to float rounding.
    amp : {"none", "bf16"}
        bfloat16 autocast of the forward passes (gradients stay float32).
    channels_last : bool
        Train in channels-last memory format (image models).

    Returns
    -------
    (RunResult or None, model, SimulatedWorkers)
    """
    torch.manual_seed(run.seed)
    model = build_model(run.model, data.input_shape, data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    n = num_parameters(model)
    qcfg = run.quantizer_config()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    layout = [(name, p.numel()) for name, p in trained]
    one_d = [name for name, p in trained if p.ndim <= 1]
    exact = exact_mask_from_params([p for _, p in trained]) if run.exact_1d else None
    sim = SimulatedWorkers(
        qcfg,
        quantizer=make_quantizer(run),
        device=device,
        seed=10_000 + run.seed,
        dist_num=run.dist_num,
        exact_mask=exact,
    )
    sampler = WorkerSampler(data.y_train.shape[0], run.workers, run.batch_size, seed=run.seed)
    aug = torch.Generator(device=device).manual_seed(20_000 + run.seed)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    gc = GradientComputer(model, workers_mode, amp=amp, channels_last=channels_last)  # type: ignore[arg-type]
    eval_every = run.interval(run.eval_every, 20)
    log_every = run.interval(run.log_every, 40)
    state = _new_state(last_loss=float("nan"))
    if resume and checkpoint and os.path.exists(checkpoint):
        state = _restore(checkpoint, run, device, model, opt, sampler, aug, sim=sim)
    if qcfg.quantized and not state["levels"]:
        state["levels"].append(
            {
                "step": 0,
                "levels": np.asarray(sim.quantizer.levels, dtype=np.float64).tolist(),
                "version": int(sim.quantizer.version),
                "initial": True,
            }
        )

    def snapshot() -> dict[str, Any]:
        return _snapshot(run, model, opt, sampler, aug, state, sim=sim)

    start = int(state["step"])
    end = run.steps if stop_at is None else min(run.steps, stop_at)
    if state.get("diverged_at") is not None:
        end = start
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=run.steps, initial=start, desc=desc or f"{run.method} s{run.seed}", leave=False, dynamic_ncols=True,
            disable=None,  # tqdm: no bar where stderr is not a terminal (CI logs, redirected output)
        )  # fmt: skip
    times = state["times"]
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = run.lr_at(step)
        _sync(device)
        t0 = time.perf_counter()
        idx = sampler.next().to(device)
        xs = data.x_train[idx.reshape(-1)]
        xs = data.prepare(xs, aug, True).reshape(run.workers, run.batch_size, *data.input_shape)
        ys = data.y_train[idx]
        grads, loss = gc(xs, ys)
        _sync(device)
        t1 = time.perf_counter()
        if not (math.isfinite(loss) and bool(torch.isfinite(grads).all())):
            state["diverged_at"] = step
            break
        log_now = step % log_every == 0 or step == run.steps - 1
        due = qcfg.spec.adaptive and run.update_due(step)
        update_s = 0.0
        if due:
            _sync(device)
            tu = time.perf_counter()
            before = int(sim.quantizer.version)
            report = sim.update_levels(grads, step)
            _ = sim.levels
            _sync(device)
            update_s = time.perf_counter() - tu
            state["num_updates"] += 1
            state["levels"].append(
                {
                    "step": step,
                    "levels": np.asarray(sim.quantizer.levels, dtype=np.float64).tolist(),
                    "version": int(sim.quantizer.version),
                    "changed": int(sim.quantizer.version) != before,
                    "reason": str(getattr(report, "reason", "") or ""),
                }
            )
        out = sim.reduce(grads, measure=log_now, layers=layout if log_now else None)
        gc.set_grad(out.mean)
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        times["train"] += t2 - t0
        times["grad"] += t1 - t0
        times["quant"] += out.quantize_seconds
        times["update"] += update_s
        state["step"] = step + 1
        state["last_loss"] = loss
        if log_now:
            state["last_var"] = float(out.variance if out.variance is not None else float("nan"))
            state["last_errors"] = measured_errors(out, one_d)
        if (step + 1) % eval_every == 0 or step + 1 == run.steps or step == 0 or log_now:
            entry: dict[str, float] = {"step": float(step + 1), "lr": run.lr_at(step), "loss": loss}
            if log_now:
                entry["variance"] = state["last_var"]
                entry.update({k: v for k, v in state["last_errors"].items() if k in HISTORY_ERROR_KEYS})
            if (step + 1) % eval_every == 0 or step + 1 == run.steps or step == 0:
                acc, vloss = evaluate(model, data)
                entry["val_acc"] = acc
                entry["val_loss"] = vloss
                state["best"] = max(state["best"], acc)
                if bar is not None:
                    bar.set_postfix(acc=f"{acc:.3f}", var=f"{state['last_var']:.3g}", refresh=False)
            state["history"].append(entry)
        if checkpoint and run.checkpoint_every > 0 and (step + 1) % run.checkpoint_every == 0:
            _save_checkpoint(checkpoint, snapshot())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if checkpoint:
        _save_checkpoint(checkpoint, snapshot())
    diverged = state.get("diverged_at")
    if diverged is not None and not any(h.get("diverged") for h in state["history"]):
        # Training blew up (non-finite loss or gradient): the run ends here, with the
        # accuracy of the model as it is (usually chance level) and infinite variance.
        acc, vloss = evaluate(model, data)
        state["history"].append({"step": float(diverged), "val_acc": acc, "val_loss": vloss, "diverged": 1.0})
        state["last_var"] = float("inf")
        if checkpoint:
            _save_checkpoint(checkpoint, snapshot())
    elif state["step"] < run.steps:
        return None, model, sim
    accs = [h["val_acc"] for h in state["history"] if "val_acc" in h]
    losses = [h["val_loss"] for h in state["history"] if "val_loss" in h]
    result = RunResult(
        method=run.method,
        seed=run.seed,
        bits=run.bits,
        bucket_size=run.bucket_size,
        workers=run.workers,
        num_params=n,
        steps=run.steps,
        final_val_acc=float(accs[-1]) if accs else float("nan"),
        final_val_loss=float(losses[-1]) if losses else float("nan"),
        best_val_acc=float(state["best"]),
        final_variance=float(state["last_var"]),
        bits_per_step=sim.bits_per_worker(n),
        train_seconds=times["train"],
        grad_seconds=times["grad"],
        quantize_seconds=times["quant"],
        update_seconds=times["update"],
        num_updates=int(state["num_updates"]),
        diverged_at=diverged,
        history=list(state["history"]),
        levels=list(state["levels"]),
        exact_1d=run.exact_1d,
        final_errors=dict(state.get("last_errors", {})),
    )
    return result, model, sim


def probe_gradients(
    model: nn.Module, data: Dataset, workers: int, batch_size: int, seed: int, device: torch.device
) -> Tensor:
    """K worker gradients (K, n) of ``model`` on fixed mini-batches (seeded), without augmentation.

    Used to compare every method's level table on the same gradients.
    """
    sampler = WorkerSampler(data.y_train.shape[0], workers, batch_size, seed=30_000 + seed)
    idx = sampler.next().to(device)
    xs = data.prepare(data.x_train[idx.reshape(-1)], None, False).reshape(workers, batch_size, *data.input_shape)
    ys = data.y_train[idx]
    was = model.training
    model.train()
    grads, _ = GradientComputer(model)(xs, ys)
    model.train(was)
    for p in model.parameters():
        p.grad = None
    return grads.detach()


__all__ = [
    "GradientComputer",
    "RunConfig",
    "RunResult",
    "ScheduledQuantizer",
    "evaluate",
    "make_quantizer",
    "probe_gradients",
    "train_run",
]
