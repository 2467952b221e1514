"""Per-worker gradients of K simulated workers: one batched pass, or K sequential passes.

The harness simulates K data-parallel workers on one device and needs each
worker's flat gradient, float32 ``(K, n)`` (each is quantized on its own).
:class:`GradientComputer` gets them from one ``torch.func.vmap`` over the
worker dimension (parameters shared), or from K sequential forward/backward
passes (the reference).

BatchNorm under the batched path: every worker normalizes with its own batch
statistics, exactly as K separate passes would. The running statistics are
left out of the vmapped call (their buffers are passed as ``None``) and
updated afterwards as the K sequential passes define them: worker 1 updates
with momentum ``m``, worker 2 from that, ... so that
``r_K = (1-m)^K r_0 + sum_k m (1-m)^(K-k) s_k`` with the unbiased batch
variance for ``running_var``, and ``num_batches_tracked += K``
(:func:`compose_running_stats`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

#: Values of ``GradientComputer(batched=...)`` and of ``alq-train --workers-mode``.
WORKERS_MODES = ("auto", "batched", "sequential")

#: Values of ``GradientComputer(batchnorm=...)``.
BATCHNORM_MODES = ("vmap", "functional")

#: Values of ``GradientComputer(amp=...)`` and of ``alq-train --amp``.
AMP_MODES = ("none", "bf16")


def batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm modules of ``model`` (``nn.BatchNorm1d/2d/3d`` and subclasses) with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def supports_batched(model: nn.Module) -> bool:
    """True when every buffer of ``model`` belongs to a BatchNorm module (or there is none).

    Such models run under :func:`torch.func.vmap` with the running statistics
    handled outside; any other buffer might be written in place by ``forward``,
    which a vmapped call cannot do, so those models use the sequential path.
    """
    owned = {
        f"{name}.{b}" if name else b for name, m in batchnorm_modules(model) for b, _ in m.named_buffers(recurse=False)
    }
    return all(name in owned for name, _ in model.named_buffers())


def _updating(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm modules whose forward would update running statistics now (training mode, tracking)."""
    return [
        (name, m)
        for name, m in batchnorm_modules(model)
        if m.training and m.track_running_stats and m.running_mean is not None and m.running_var is not None
    ]


def _stat_hook(
    store: list[tuple[Tensor, Tensor]],
) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
    """A forward pre-hook that records a BatchNorm input's per-channel mean and unbiased variance.

    A reduced-precision input (bf16 under autocast) is handed on as float32:
    vmap's BatchNorm rule normalizes without the affine weight and multiplies
    by it afterwards, which promotes the output to float32 anyway, and its
    backward refuses the mixed dtypes (seen on CPU). The statistics are float32.
    """

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        cast = x.dtype in (torch.bfloat16, torch.float16)
        if cast:
            x = x.float()
        dims = [0, *range(2, x.ndim)]
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)
        store.append((mean, var))
        return (x, *args[1:]) if cast else None

    return hook


class _FunctionalBatchNorm(TorchFunctionMode):
    """Computes training-mode ``F.batch_norm`` as ``x * a + c`` from ``torch.var_mean``, recording the statistics.

    Under vmap this reduces each worker's slice in place, where vmap's own
    BatchNorm rule first copies the worker dimension next to the channels.
    A call is recorded (mean, unbiased variance) when :attr:`pending` is set
    (by a pre-hook of a module whose running statistics are updated).
    """

    def __init__(self, store: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.store = store
        self.pending = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = {**dict(zip(names, args)), **kwargs}
        x = a["input"]
        if not a.get("training", False) or a.get("running_mean") is not None:
            self.pending = False
            return func(*args, **kwargs)
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        dims = [0, *range(2, x.ndim)]
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        if self.pending:
            n = x.numel() // x.shape[1]
            self.store.append((mean.detach().flatten(), var.detach().flatten() * (n / max(n - 1, 1))))
            self.pending = False
        shape = (1, -1, *([1] * (x.ndim - 2)))
        scale = torch.rsqrt(var + float(a.get("eps", 1e-5)))
        if a.get("weight") is not None:
            scale = scale * a["weight"].reshape(shape)
        shift = -mean * scale
        if a.get("bias") is not None:
            shift = shift + a["bias"].reshape(shape)
        return torch.addcmul(shift, x, scale)


def compose_running_stats(modules: list[_BatchNorm], means: Tensor, variances: Tensor, workers: int) -> None:
    """Update the running statistics of ``modules`` as ``workers`` sequential training passes would.

    Parameters
    ----------
    modules : list of BatchNorm modules
        In the order their statistics are concatenated.
    means, variances : Tensor of float32, shape (K, sum of the modules' channels)
        Worker ``k``'s batch mean and unbiased batch variance of every module's input.
    workers : int
        ``K``; ``num_batches_tracked`` grows by ``K``.

    Notes
    -----
    With momentum ``m`` worker ``k`` (1-based) contributes ``m (1-m)^(K-k)`` and
    the old value keeps ``(1-m)^K``. ``momentum=None`` (cumulative average)
    uses ``a_k = 1/(n_0 + k)`` with ``n_0`` the batches tracked so far, as
    PyTorch's BatchNorm does pass by pass.
    """
    if not modules:
        return
    k = int(workers)
    coefs: list[Tensor] = []
    decays: list[float] = []
    for m in modules:
        if m.momentum is None:
            n0 = int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
            factors = [1.0 / (n0 + j + 1) for j in range(k)]
        else:
            factors = [float(m.momentum)] * k
        keep = 1.0
        weights = [0.0] * k
        for j in range(k - 1, -1, -1):  # the last worker's factor is applied last
            weights[j] = factors[j] * keep
            keep *= 1.0 - factors[j]
        decays.append(keep)
        coefs.append(torch.tensor(weights, dtype=torch.float64).expand(m.num_features, k))
    col = torch.cat(coefs).T.to(device=means.device, dtype=means.dtype)  # (K, C_total)
    sizes = [int(m.num_features) for m in modules]
    new_mean = list(torch.split((col * means).sum(0), sizes))
    new_var = list(torch.split((col * variances).sum(0), sizes))
    rmeans: list[Tensor] = [cast(Tensor, m.running_mean) for m in modules]
    rvars: list[Tensor] = [cast(Tensor, m.running_var) for m in modules]
    with torch.no_grad():
        torch._foreach_mul_(rmeans, decays)
        torch._foreach_add_(rmeans, [t.to(r.dtype) for t, r in zip(new_mean, rmeans)])
        torch._foreach_mul_(rvars, decays)
        torch._foreach_add_(rvars, [t.to(r.dtype) for t, r in zip(new_var, rvars)])
        counts = [m.num_batches_tracked for m in modules if m.num_batches_tracked is not None]
        if counts:
            torch._foreach_add_(counts, k)


def _resolve_amp(amp: str | torch.dtype | None) -> torch.dtype | None:
    if amp is None or amp == "none":
        return None
    if amp in ("bf16", torch.bfloat16):
        return torch.bfloat16
    msg = f"`amp` must be one of {AMP_MODES} (or torch.bfloat16 / None); got {amp!r}"
    raise ValueError(msg)


class GradientComputer:
    """Per-worker flat gradients, float32 ``(K, n)``, for K mini-batches.

    Parameters
    ----------
    model : nn.Module
        Its trainable parameters, in ``model.parameters()`` order, make up a
        flat gradient. With ``channels_last=True`` the caller converts the
        model (``model.to(memory_format=torch.channels_last)``); this class
        converts the inputs.
    batched : {"auto", "batched", "sequential"} or bool
        ``"batched"`` (or True): one ``torch.func.vmap`` call over the worker
        dimension, per-worker BatchNorm statistics, running statistics
        composed afterwards (module docstring). ``"sequential"`` (or False):
        K forward/backward passes, each updating the running statistics in
        turn (the reference). ``"auto"``: batched for models without buffers,
        and for models whose only buffers are BatchNorm statistics
        (:func:`supports_batched`) when their parameters are on CUDA (on
        the CPU K passes measured faster); else sequential.
    amp : {"none", "bf16"} or torch.dtype or None
        Autocast the forward pass to bfloat16 (the loss and the gradients stay
        float32).
    channels_last : bool
        Convert 4-D inputs ``(B, C, H, W)`` to channels-last memory format.
    batchnorm : {"vmap", "functional"}
        Batched path only: BatchNorm through vmap's rule for ``F.batch_norm``
        (it copies the worker dimension next to the channels and back), or
        computed as ``x * a + c`` from ``torch.var_mean`` on each worker's
        slice (:class:`_FunctionalBatchNorm`). Same results to rounding;
        ``benchmarks/sim_workers.py`` times both.

    Attributes
    ----------
    batched : bool
        The resolved path; may be set to switch paths.
    """

    def __init__(
        self,
        model: nn.Module,
        batched: Literal["auto", "batched", "sequential"] | bool = "auto",
        *,
        amp: str | torch.dtype | None = None,
        channels_last: bool = False,
        batchnorm: Literal["vmap", "functional"] = "vmap",
    ) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        ok = supports_batched(model)
        if batched is True or batched == "batched":
            if not ok:
                bad = [
                    n
                    for n, _ in model.named_buffers()
                    if not any(n.startswith(f"{b}.") for b, _ in batchnorm_modules(model))
                ]
                msg = (
                    "batched worker gradients need a model whose only buffers are BatchNorm statistics; "
                    f"got other buffers {bad[:5]}; fix: batched='sequential' (or 'auto')"
                )
                raise ValueError(msg)
            self.batched = True
        elif batched is False or batched == "sequential":
            self.batched = False
        elif batched == "auto":
            # BatchNorm models: batched on CUDA only. On CPU the batched pass measured about 2x slower
            # than K passes (ResNet-8, K=4, b=32: per-worker conv weight gradients as grouped convolutions).
            has_buffers = any(True for _ in model.buffers())
            on_cuda = any(p.is_cuda for p in self.params)
            self.batched = ok and (not has_buffers or on_cuda)
        else:
            msg = f"`batched` must be one of {WORKERS_MODES} or a bool; got {batched!r}"
            raise ValueError(msg)
        self.amp = _resolve_amp(amp)
        self.channels_last = bool(channels_last)
        if batchnorm not in BATCHNORM_MODES:
            msg = f"`batchnorm` must be one of {BATCHNORM_MODES}; got {batchnorm!r}"
            raise ValueError(msg)
        self.batchnorm = batchnorm
        self._fns: dict[tuple[str, ...], Callable[..., Any]] = {}
        self._stats: list[tuple[Tensor, Tensor]] = []

    # ----------------------------------------------------------------- helpers
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp)

    def _inputs(self, xs: Tensor) -> Tensor:
        """``xs`` (K, B, C, H, W) in channels-last layout per worker when asked (a view of K*B images)."""
        if not self.channels_last or xs.ndim != 5:
            return xs
        k, b = xs.shape[:2]
        flat = xs.reshape(k * b, *xs.shape[2:]).contiguous(memory_format=torch.channels_last)
        return flat.view(xs.shape)

    def _vmapped(self, updating: tuple[str, ...]) -> Callable[..., Any]:
        fn = self._fns.get(updating)
        if fn is None:
            from torch.func import functional_call, grad_and_value, vmap

            model = self.model
            stats = self._stats
            # The updating BatchNorms see no running statistics inside the call: they use
            # batch statistics and write nothing; their inputs' statistics come back as aux.
            hidden: dict[str, Tensor | None] = {
                f"{name}.{b}": None for name in updating for b in ("running_mean", "running_var", "num_batches_tracked")
            }

            def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                stats.clear()
                out = functional_call(model, {**params, **hidden}, (x,))  # type: ignore[dict-item]
                loss = F.cross_entropy(out.float(), y)
                if stats:
                    means = torch.cat([m for m, _ in stats])
                    variances = torch.cat([v for _, v in stats])
                else:
                    means = variances = loss.detach().new_zeros(0)
                stats.clear()
                return loss, (means, variances)

            fn = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(None, 0, 0))
            self._fns[updating] = fn
        return fn

    @contextlib.contextmanager
    def _hooks(self, modules: list[_BatchNorm]) -> Iterator[None]:
        if self.batchnorm == "vmap":
            handles = [m.register_forward_pre_hook(_stat_hook(self._stats)) for m in modules]
            mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            fbn = _FunctionalBatchNorm(self._stats)

            def mark(module: nn.Module, args: tuple[Any, ...]) -> None:
                fbn.pending = True

            handles = [m.register_forward_pre_hook(mark) for m in modules]
            mode = fbn
        try:
            with mode:
                yield
        finally:
            for h in handles:
                h.remove()
            self._stats.clear()

    # -------------------------------------------------------------------- paths
    def _batched(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, float]:
        k = xs.shape[0]
        upd = _updating(self.model)
        modules = [m for _, m in upd]
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        fn = self._vmapped(tuple(name for name, _ in upd))
        with self._hooks(modules), self._autocast(xs.device):
            grads, (losses, (means, variances)) = fn(params, xs, ys)
        compose_running_stats(modules, means, variances, k)
        flat = torch.cat([grads[n].reshape(k, -1) for n in self.names], dim=1)
        return flat, float(losses.mean())

    def _sequential(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, float]:
        k = xs.shape[0]
        rows = []
        total = 0.0
        for i in range(k):
            for p in self.params:
                p.grad = None
            with self._autocast(xs.device):
                loss = F.cross_entropy(self.model(xs[i]).float(), ys[i])
            loss.backward()  # type: ignore[no-untyped-call]
            rows.append(torch.cat([p.grad.reshape(-1) for p in self.params]))  # type: ignore[union-attr]
            total += float(loss.detach())
        return torch.stack(rows), total / k

    def __call__(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, float]:
        """Gradients and mean loss of K workers.

        Parameters
        ----------
        xs : Tensor, shape (K, B, ...)
            Worker ``k``'s mini-batch is ``xs[k]``.
        ys : Tensor of int64, shape (K, B)

        Returns
        -------
        grads : Tensor of float32, shape (K, n)
            Row ``k`` is worker ``k``'s flat gradient of its mean cross-entropy.
        loss : float
            The workers' mean loss.
        """
        if xs.ndim < 2 or ys.shape != xs.shape[:2]:
            msg = f"expected xs (K, B, ...) and ys (K, B); got xs {tuple(xs.shape)} and ys {tuple(ys.shape)}"
            raise ValueError(msg)
        if self.batched:
            try:
                return self._batched(self._inputs(xs), ys)
            except RuntimeError as exc:
                # torch 2.11 on CUDA (seen on an H200): "NYI: Tensor.clone(memory_format) inside vmap is
                # only supported with ... (got ChannelsLast)" in the backward pass. Fall back to the
                # contiguous layout for the rest of the run instead of stopping training.
                if not (self.channels_last and "inside vmap" in str(exc)):
                    raise
                warnings.warn(
                    f"channels_last is not supported by this torch's vmap ({exc}); the batched workers "
                    "continue in the contiguous layout",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.channels_last = False
                self.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
                return self._batched(xs, ys)
        return self._sequential(self._inputs(xs), ys)

    def set_grad(self, flat: Tensor) -> None:
        """Write a flat gradient (n,) into the parameters' ``.grad``."""
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[off : off + n].view_as(p).clone()
            off += n


__all__ = [
    "AMP_MODES",
    "BATCHNORM_MODES",
    "WORKERS_MODES",
    "GradientComputer",
    "batchnorm_modules",
    "compose_running_stats",
    "supports_batched",
]
