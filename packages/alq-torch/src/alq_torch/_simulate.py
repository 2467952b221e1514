"""Simulated data parallelism on one device: the paper's protocol (SPEC section 10).

``K`` simulated workers each compute a gradient on their own mini-batch; every
gradient is quantized independently with the shared level table and fresh
noise, dequantized, and the K results are averaged. The optimizer (momentum,
weight decay) then acts on that average. Level updates fit the statistics of
the workers' gradients of the step at which they are due (merged exactly
across workers by concatenating their per-bucket statistics) with
:class:`alq_core.AdaptiveQuantizer`.

An optional ``exact_mask`` sends some coordinates (typically the 1-D tensors:
biases and BatchNorm weights/biases, as PowerSGD and CGX do) exactly in full
precision: the quantized part is the concatenation of the other coordinates
(buckets, scales and statistics are over it alone) and the exact part is
averaged in float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import alq_core
import numpy as np
import torch
import torch.nn.functional as F
from alq_core import QuantizerConfig
from torch import Tensor

from ._metrics import ErrorMetrics, error_metrics


@dataclass(frozen=True)
class SimulatedStep:
    """What one :meth:`SimulatedWorkers.reduce` call produced.

    Attributes
    ----------
    mean : Tensor of float32, shape (n,)
        ``mean_k dequantize(quantize(grads[k]))`` (the plain mean for ``fp32``).
    variance : float or None
        Normalized quantization variance ``mean_k ||Q(g_k) - g_k||^2 / ||g_k||^2``
        over workers with a nonzero gradient (measured when asked; 0 for ``fp32``).
    quantize_seconds : float
        Wall time of quantize + dequantize + average (device synchronized).
    update_seconds : float
        Wall time of the level update at this step (statistics + fit), 0 if none.
    updated : bool
        True when the level table changed at this step.
    top_error : float or None
        Relative error on each worker's largest 1% of coordinates, averaged over
        workers (measured when asked; see :func:`alq_torch.error_metrics`).
    top_share : float or None
        Share of the error energy on those coordinates (NaN when there is no error).
    avg_error : float or None
        ``||mean_k Q(g_k) - mean_k g_k||^2 / ||mean_k g_k||^2``: the error of the
        averaged update the optimizer sees.
    layer_errors : dict of str to float, or None
        Per-layer relative error when ``reduce`` got a ``layers`` layout.
    metrics : alq_torch.ErrorMetrics or None
        Everything measured (per-layer sums included, for :meth:`ErrorMetrics.group_error`).
    """

    mean: Tensor
    variance: float | None
    quantize_seconds: float
    update_seconds: float
    updated: bool
    top_error: float | None = None
    top_share: float | None = None
    avg_error: float | None = None
    layer_errors: dict[str, float] | None = None
    metrics: ErrorMetrics | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exact_mask_from_params(params: Iterable[Tensor], *, max_ndim: int = 1) -> Tensor:
    """Boolean mask over the flat gradient of ``params``: True on tensors with ``ndim <= max_ndim``.

    Parameters
    ----------
    params : iterable of Tensor
        The parameters in the order their gradients are concatenated (e.g.
        ``[p for p in model.parameters() if p.requires_grad]``).
    max_ndim : int
        1 selects biases and normalization weights/biases (and scalars).

    Returns
    -------
    Tensor of bool, shape (sum of numel,), on CPU
    """
    parts = [torch.full((p.numel(),), p.ndim <= max_ndim, dtype=torch.bool) for p in params]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _ops() -> Any:
    """The alq_torch op module (imported lazily: it imports this module)."""
    import alq_torch

    return alq_torch


class SimulatedWorkers:
    """K simulated workers that quantize their gradients independently and average them.

    Parameters
    ----------
    config : alq_core.QuantizerConfig
        The method, bits, bucket size, norm, clipping.
    quantizer : alq_core.AdaptiveQuantizer, optional
        Holds the level table and its update schedule; built with its defaults
        from ``config`` when omitted. Fixed methods keep their table.
    device : torch.device or str, optional
        Where gradients live (default CPU).
    seed : int, optional
        Seeds the noise generator (on ``device``); unseeded when omitted.
    dist_num : int
        Norm-based statistics keep the ``dist_num`` largest-norm buckets.
    weights : {"norm", "norm2"}
        Mixture weights of the norm-based model.
    exact_mask : Tensor of bool, shape (n,), optional
        Coordinates sent exactly (32 bits each) and averaged in full precision;
        the others are concatenated and quantized as one flat gradient (bucket
        layout, scales and level statistics over them alone). Gradients passed
        later must have ``n`` coordinates. See :func:`exact_mask_from_params`.

    Examples
    --------
    >>> import torch, alq_core
    >>> sim = SimulatedWorkers(alq_core.QuantizerConfig("nuqsgd", bits=3, bucket_size=64), seed=0)
    >>> out = sim.reduce(torch.randn(4, 256), step=0, measure=True)
    >>> out.mean.shape
    torch.Size([256])
    """

    def __init__(
        self,
        config: QuantizerConfig,
        *,
        quantizer: Any | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
        dist_num: int = 50,
        weights: Literal["norm", "norm2"] = "norm",
        exact_mask: Tensor | None = None,
    ) -> None:
        if not isinstance(config, QuantizerConfig):
            msg = f"`config` must be an alq_core.QuantizerConfig; got {type(config).__name__}"
            raise TypeError(msg)
        if isinstance(dist_num, bool) or not isinstance(dist_num, int) or dist_num < 1:
            msg = f"`dist_num` must be a positive integer; got {dist_num!r}"
            raise ValueError(msg)
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.quantizer = quantizer if quantizer is not None else alq_core.AdaptiveQuantizer(config)
        self.dist_num = dist_num
        self.weights = weights
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()
        self._levels_version: int | None = None
        self._levels: Tensor | None = None
        self.exact_mask: Tensor | None = None
        self._keep: Tensor | None = None
        if exact_mask is not None:
            if not isinstance(exact_mask, Tensor) or exact_mask.dtype != torch.bool or exact_mask.ndim != 1:
                got = (
                    f"{exact_mask.dtype} tensor of shape {tuple(exact_mask.shape)}"
                    if isinstance(exact_mask, Tensor)
                    else type(exact_mask).__name__
                )
                msg = f"`exact_mask` must be a 1-D bool torch.Tensor over the flat gradient; got {got}"
                raise TypeError(msg)
            self.exact_mask = exact_mask.to(self.device)
            self._keep = torch.nonzero(~self.exact_mask).reshape(-1)

    # ------------------------------------------------------------------ levels
    @property
    def levels(self) -> Tensor | None:
        """The current level table, float32 ``(L,)`` on :attr:`device` (None for ``fp32``)."""
        if not self.config.quantized:
            return None
        version = int(self.quantizer.version)
        if self._levels is None or self._levels_version != version:
            self._levels = torch.as_tensor(np.asarray(self.quantizer.levels, dtype=np.float32)).to(self.device)
            self._levels_version = version
        return self._levels

    @property
    def num_exact(self) -> int:
        """Coordinates sent exactly (0 without an ``exact_mask``)."""
        return 0 if self.exact_mask is None else int(self.exact_mask.numel() - self._keep.numel())  # type: ignore[union-attr]

    def bits_per_worker(self, n: int) -> int:
        """Bits one worker sends per step for ``n`` coordinates: ``8 * alq_core.payload_size``.

        With an ``exact_mask`` (quantized methods): the payload of the quantized
        coordinates plus 32 bits per exact coordinate.
        """
        if self.exact_mask is None or not self.config.quantized:
            return 8 * int(alq_core.payload_size(self.config, int(n)))
        self._check_mask_length(int(n))
        e = self.num_exact
        return 8 * int(alq_core.payload_size(self.config, int(n) - e)) + 32 * e

    def _check_mask_length(self, n: int) -> None:
        if self.exact_mask is not None and int(self.exact_mask.numel()) != n:
            msg = (
                f"`exact_mask` covers {int(self.exact_mask.numel())} coordinates but the gradient has n={n}; "
                "build the mask from the same parameters the gradient is flattened from"
            )
            raise ValueError(msg)

    def quantized_part(self, grads: Tensor) -> Tensor:
        """The coordinates that are quantized, float32 ``(K, m)``: all of ``grads`` without an ``exact_mask``."""
        grads = self._check(grads)
        if self._keep is None:
            return grads
        self._check_mask_length(int(grads.shape[1]))
        return grads.index_select(1, self._keep)

    def stats(self, grads: Tensor) -> Any:
        """Merged statistics of the workers' gradients, what ``alq_core.compute_stats`` gives for the config.

        An :class:`alq_core.GradientStats` for the paper's methods; for ``alq-e`` / ``alq-einf``
        an :class:`alq_core.LevelSketch` (each worker's gradient bucketed on its own, the
        sketches summed on the device). With an ``exact_mask``, of the quantized coordinates
        only (:meth:`quantized_part`).

        Parameters
        ----------
        grads : Tensor of float32, shape (K, n)
        """
        ops = _ops()
        grads = self.quantized_part(grads)
        k, n = grads.shape
        d = self.config.bucket_size
        if self.config.spec.stats == "empirical":
            sums = sum(ops.sketch_sums(grads[i], self.config) for i in range(k))
            return alq_core.LevelSketch.from_sums(sums.cpu().numpy(), self.config, count=k * n)
        if n % d == 0:
            parts = [ops.bucket_stats(grads.reshape(-1), d)]
        else:
            parts = [ops.bucket_stats(grads[i], d) for i in range(k)]
        arrays = [np.concatenate([p[j].detach().cpu().numpy() for p in parts]) for j in range(4)]
        return alq_core.GradientStats.from_buckets(
            arrays[0], arrays[1], arrays[2], arrays[3], dist_num=self.dist_num, weights=self.weights
        )

    def update_levels(self, grads: Tensor, step: int) -> Any:
        """Fit new levels to the workers' gradients now (whatever the schedule says).

        Returns the quantizer's ``UpdateReport`` (``None`` for non-adaptive methods).
        """
        if not self.config.spec.adaptive:
            return None
        report = self.quantizer.update(self.stats(grads), int(step))
        return report

    # -------------------------------------------------------------- quantizing
    def _check(self, grads: Tensor) -> Tensor:
        if not isinstance(grads, Tensor):
            msg = f"`grads` must be a torch.Tensor of shape (K, n); got {type(grads).__name__}"
            raise TypeError(msg)
        if grads.ndim != 2 or grads.shape[0] < 1:
            msg = f"`grads` must have shape (K, n) with K >= 1 workers; got {tuple(grads.shape)}"
            raise ValueError(msg)
        if grads.dtype != torch.float32:
            grads = grads.float()
        return grads.contiguous()

    def dequantized(self, grads: Tensor) -> Tensor:
        """Each worker's gradient quantized independently and dequantized, float32 ``(K, n)``.

        With an ``exact_mask``, the masked coordinates are returned unchanged and
        the others are :meth:`quantized_part` quantized as one flat gradient per
        worker (the same codes as quantizing that concatenation directly).
        """
        grads = self._check(grads)
        if not self.config.quantized or self._keep is None:
            return self._dequantized_rows(grads)
        part = self.quantized_part(grads)
        if part.shape[1] == 0:
            return grads
        return grads.clone().index_copy_(1, self._keep, self._dequantized_rows(part))

    def _dequantized_rows(self, grads: Tensor) -> Tensor:
        """Quantize + dequantize every row of ``grads`` (K, n) as one flat gradient.

        When bucket boundaries can be aligned (``n`` a multiple of the bucket size,
        or no clipping with a quantized tail: each worker's gradient is padded with
        zeros to whole buckets, which changes neither a scale nor the distribution
        of any real coordinate's code), all K gradients go through one
        :func:`alq_torch.quantize` call; otherwise one call per worker.
        """
        grads = self._check(grads)
        cfg = self.config
        if not cfg.quantized:
            return grads
        ops = _ops()
        levels = self.levels
        k, n = grads.shape
        d = cfg.bucket_size
        if n % d == 0 or (cfg.clip is None and cfg.tail == "quantize"):
            n_pad = -(-n // d) * d
            x = grads if n_pad == n else F.pad(grads, (0, n_pad - n))
            flat = x.reshape(-1)
            noise = torch.rand(flat.numel(), generator=self.generator, device=self.device)
            q = ops.quantize(flat, levels, cfg, noise=noise)
            out: Tensor = ops.dequantize(q, levels).reshape(k, n_pad)
            return out[:, :n] if n_pad != n else out
        rows = []
        for i in range(k):
            m = cfg.num_quantized(n)
            noise = torch.rand(m, generator=self.generator, device=self.device)
            rows.append(ops.dequantize(ops.quantize(grads[i], levels, cfg, noise=noise), levels).reshape(n))
        return torch.stack(rows)

    @staticmethod
    def normalized_variance(dequantized: Tensor, grads: Tensor) -> float:
        """``mean_k ||Q(g_k) - g_k||^2 / ||g_k||^2`` over workers whose gradient is nonzero."""
        num = (dequantized.double() - grads.double()).pow(2).sum(dim=1)
        den = grads.double().pow(2).sum(dim=1)
        ok = den > 0
        if not bool(ok.any()):
            return 0.0
        return float((num[ok] / den[ok]).mean())

    def variance(self, grads: Tensor, repeats: int = 1) -> float:
        """Normalized quantization variance of the current levels on ``grads`` (K, n), averaged over ``repeats`` draws."""
        grads = self._check(grads)
        vals = [self.normalized_variance(self.dequantized(grads), grads) for _ in range(max(1, repeats))]
        return float(np.mean(vals))

    def reduce(
        self,
        grads: Tensor,
        *,
        step: int | None = None,
        measure: bool = False,
        layers: Sequence[tuple[str, int]] | None = None,
    ) -> SimulatedStep:
        """Level update if due at ``step``, then quantize each worker's gradient and average.

        Parameters
        ----------
        grads : Tensor of float32, shape (K, n)
            Row ``k`` is worker ``k``'s flat gradient.
        step : int, optional
            The training step; when given and the quantizer's schedule says an
            update is due, the levels are fitted to ``grads`` first.
        measure : bool
            Also measure this step's error: the normalized quantization variance,
            ``top_error``, ``top_share``, ``avg_error`` (see :func:`alq_torch.error_metrics`;
            over all ``n`` coordinates, exact ones included with zero error).
        layers : sequence of (str, int), optional
            ``(name, numel)`` of every parameter tensor in flat order; with
            ``measure``, adds per-layer relative errors (``layer_errors``).
        """
        grads = self._check(grads)
        update_s = 0.0
        updated = False
        if step is not None and self.config.spec.adaptive and self.quantizer.due(int(step)):
            _sync(self.device)
            t0 = time.perf_counter()
            before = int(self.quantizer.version)
            self.update_levels(grads, int(step))
            _ = self.levels
            _sync(self.device)
            update_s = time.perf_counter() - t0
            updated = int(self.quantizer.version) != before
        _sync(self.device)
        t0 = time.perf_counter()
        deq = self.dequantized(grads)
        mean = deq.mean(dim=0)
        _sync(self.device)
        quant_s = time.perf_counter() - t0 if self.config.quantized else 0.0
        if not measure:
            return SimulatedStep(mean, None, quant_s, update_s, updated)
        m = error_metrics(deq, grads, layers=layers)
        return SimulatedStep(
            mean,
            m.variance,
            quant_s,
            update_s,
            updated,
            top_error=m.top_error,
            top_share=m.top_share,
            avg_error=m.avg_error,
            layer_errors=m.layers if layers is not None else None,
            metrics=m,
        )

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Quantizer state (plain data) and the noise generator's state."""
        return {"quantizer": self.quantizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next step continues identically."""
        self.quantizer.load_state_dict(state["quantizer"])
        self.generator.set_state(state["generator"])
        self._levels = None
        self._levels_version = None


__all__ = ["SimulatedStep", "SimulatedWorkers", "exact_mask_from_params"]
