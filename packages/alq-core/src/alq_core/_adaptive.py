"""`AdaptiveQuantizer`: the level table of a method over training (SPEC section 9).

It holds the config, the current float32 table and its version (incremented on every
change), the update schedule, the last statistics and the last :class:`UpdateReport`.
Updates never raise for bad statistics: the old table is kept and the report says why.
The state is plain data; :meth:`AdaptiveQuantizer.load_state_dict` restores it exactly,
without refitting, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._config import QuantizerConfig
from ._levels import default_levels, exponential_levels, validate_levels
from ._optimize import AlqResult, AmqResult, alq_levels, amq_multiplier
from ._sketch import LevelSketch, fit_sketch, sketch_variance
from ._stats import GradientStats
from ._variance import expected_variance

STATE_VERSION = 1


@dataclass(frozen=True)
class UpdateSchedule:
    """Steps at which levels update: the explicit ``steps``, then every ``every`` steps.

    The default is the paper's: 0, 100, 2000, then 10000, 20000, ... (``every=0`` disables
    the periodic part).
    """

    steps: tuple[int, ...] = (0, 100, 2000)
    every: int = 10_000

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in steps):
            msg = f"`steps` must be non-negative integers; got {self.steps!r}"
            raise ValueError(msg)
        if isinstance(self.every, bool) or not isinstance(self.every, (int, np.integer)) or self.every < 0:
            msg = f"`every` must be a non-negative integer (0: no periodic updates); got {self.every!r}"
            raise ValueError(msg)
        object.__setattr__(self, "steps", tuple(sorted({int(s) for s in steps})))
        object.__setattr__(self, "every", int(self.every))

    def due(self, step: int) -> bool:
        """True when ``step`` is a level-update step."""
        if step in self.steps:
            return True
        return self.every > 0 and step > 0 and step % self.every == 0


@dataclass(frozen=True)
class UpdateReport:
    """What a call of :meth:`AdaptiveQuantizer.update` did.

    Attributes
    ----------
    step : int
    updated : bool
        True when the table changed (version incremented).
    reason : str
        ``"updated"`` or why the old table was kept.
    version : int
        Table version after the call.
    variance_before, variance_after : float or None
        Expected variance of the old and the new table under the new model (None without a model).
    multiplier : float or None
        AMQ's ``p`` after the call.
    init : str or None
        ALQ's winning initialization.
    seconds : float
        Wall time of the update.
    """

    step: int
    updated: bool
    reason: str
    version: int
    variance_before: float | None = None
    variance_after: float | None = None
    multiplier: float | None = None
    init: str | None = None
    seconds: float = 0.0


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


class AdaptiveQuantizer:
    """The level table of any method, with its schedule, version and update logic.

    Parameters
    ----------
    config : QuantizerConfig
        Any method: adaptive ones (``alq``, ``alq-n``, ``amq``, ``amq-n``) update; fixed ones
        keep their table (version 0, never due); ``fp32`` has ``levels = None``.
    schedule : UpdateSchedule, sequence of int, or None
        When levels update; a sequence means exactly those steps. Default: the paper's.
    epochs : int
        ALQ sweeps (default 30).
    update : {"exact", "gd", "bounded"}
        ``"exact"`` (default): ALQ's exact coordinate update, AMQ's bounded minimization.
        ``"gd"``: the paper's finite-difference ALQ / gradient-descent AMQ. ``"bounded"`` is
        accepted as a synonym of ``"exact"``.
    sym : bool
        Symmetric ALQ tables.
    order : {"red-black", "sequential"}
        ALQ sweep order (see :func:`alq_core.alq_levels`).
    """

    def __init__(
        self,
        config: QuantizerConfig,
        *,
        schedule: UpdateSchedule | Sequence[int] | None = None,
        epochs: int = 30,
        update: str = "exact",
        sym: bool = False,
        order: str = "red-black",
    ) -> None:
        if not isinstance(config, QuantizerConfig):
            msg = f"`config` must be a QuantizerConfig; got {type(config).__name__}"
            raise TypeError(msg)
        if schedule is None:
            schedule = UpdateSchedule()
        elif not isinstance(schedule, UpdateSchedule):
            schedule = UpdateSchedule(steps=tuple(schedule), every=0)
        if update not in ("exact", "gd", "bounded"):
            msg = f"`update` must be 'exact', 'bounded' or 'gd'; got {update!r}"
            raise ValueError(msg)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            msg = f"`epochs` must be a non-negative integer; got {epochs!r}"
            raise ValueError(msg)
        if order not in ("red-black", "sequential"):
            msg = f"`order` must be 'red-black' or 'sequential'; got {order!r}"
            raise ValueError(msg)
        self.config = config
        self.schedule = schedule
        self.epochs = epochs
        self.update_rule = "gd" if update == "gd" else "exact"
        self.sym = bool(sym)
        self.order = order
        self.levels: NDArray[np.float32] | None = default_levels(config) if config.quantized else None
        self.version = 0
        self.multiplier: float | None = 0.5 if config.spec.adapt == "amq" else None
        self.step: int | None = None
        self.last_stats: GradientStats | LevelSketch | None = None
        self.last_report: UpdateReport | None = None

    @property
    def adaptive(self) -> bool:
        """True for ALQ / AMQ methods."""
        return self.config.spec.adapt is not None

    def due(self, step: int) -> bool:
        """True when ``step`` is scheduled for a level update (always False for fixed methods)."""
        return self.adaptive and self.schedule.due(int(step))

    def _keep(self, step: int, reason: str, t0: float, before: float | None = None) -> UpdateReport:
        report = UpdateReport(
            step=step,
            updated=False,
            reason=reason,
            version=self.version,
            variance_before=_finite_or_none(before),
            multiplier=self.multiplier,
            seconds=time.perf_counter() - t0,
        )
        self.last_report = report
        return report

    def update(self, stats: GradientStats | LevelSketch | None, step: int) -> UpdateReport:
        """Fit new levels to ``stats``; never raises for bad statistics (keeps the old table).

        Parameters
        ----------
        stats : GradientStats, LevelSketch or None
            What :func:`alq_core.compute_stats` returns for this quantizer's config: a
            :class:`LevelSketch` for ``alq-e`` / ``alq-einf``, :class:`GradientStats` else.
        step : int
            The training step (recorded; the caller checks :meth:`due`).
        """
        t0 = time.perf_counter()
        step = int(step)
        self.step = step
        if not self.adaptive:
            return self._keep(step, f"method {self.config.method!r} has fixed levels", t0)
        if self.config.spec.stats == "empirical":
            return self._update_empirical(stats, step, t0)
        if not isinstance(stats, GradientStats):
            return self._keep(
                step,
                f"no statistics: method {self.config.method!r} needs GradientStats, got {type(stats).__name__}",
                t0,
            )
        self.last_stats = stats
        try:
            model = stats.model(self.config.spec.stats)  # type: ignore[arg-type]
        except ValueError as exc:
            return self._keep(step, f"degenerate statistics: {exc}", t0)
        assert self.levels is not None
        try:
            before = float(expected_variance(self.levels.astype(np.float64), model))
        except (ValueError, FloatingPointError):
            before = float("nan")
        bits = self.config.bits
        init: str | None = None
        multiplier = self.multiplier
        try:
            with np.errstate(all="ignore"):
                if self.config.spec.adapt == "alq":
                    init_model = None
                    if self.config.spec.stats == "norm-less":
                        try:  # the paper starts ALQ-N from the norm-based quantiles too
                            init_model = stats.norm_based_model()
                        except ValueError:
                            init_model = None
                    res = alq_levels(
                        model,
                        bits,
                        epochs=self.epochs,
                        update=self.update_rule,  # type: ignore[arg-type]
                        init_model=init_model,
                        sym=self.sym,
                        order=self.order,  # type: ignore[arg-type]
                        return_result=True,
                    )
                    assert isinstance(res, AlqResult)
                    new = validate_levels(res.levels, num_levels=self.config.num_levels)
                    init = res.init
                else:
                    amq = amq_multiplier(
                        model,
                        bits,
                        update="gd" if self.update_rule == "gd" else "bounded",
                        previous=self.multiplier,
                        return_result=True,
                    )
                    assert isinstance(amq, AmqResult)
                    multiplier = amq.p
                    new = exponential_levels(bits, amq.p)
            after = float(expected_variance(new.astype(np.float64), model))
        except (ValueError, ArithmeticError, RuntimeError) as exc:
            return self._keep(step, f"optimizer failed, kept the old levels: {exc}", t0, before)
        if not math.isfinite(after):
            return self._keep(step, f"new levels have non-finite variance {after}", t0, before)
        changed = not np.array_equal(new, self.levels)
        if changed:
            self.levels = new
            self.version += 1
        self.multiplier = multiplier
        report = UpdateReport(
            step=step,
            updated=changed,
            reason="updated" if changed else "optimum unchanged",
            version=self.version,
            variance_before=_finite_or_none(before),
            variance_after=after,
            multiplier=self.multiplier,
            init=init,
            seconds=time.perf_counter() - t0,
        )
        self.last_report = report
        return report

    def _update_empirical(self, stats: object, step: int, t0: float) -> UpdateReport:
        """The level update of ``alq-e`` / ``alq-einf``: fit the table to a :class:`LevelSketch`."""
        if not isinstance(stats, LevelSketch):
            got = type(stats).__name__
            msg = f"no statistics: method {self.config.method!r} needs a LevelSketch (compute_stats(g, config)), got {got}"
            return self._keep(step, msg, t0)
        try:
            stats.check(self.config)
        except ValueError as exc:
            return self._keep(step, f"sketch from another configuration: {exc}", t0)
        self.last_stats = stats
        assert self.levels is not None
        with np.errstate(all="ignore"):
            before = sketch_variance(stats, self.levels)
            try:
                new, after = fit_sketch(stats, self.config.num_levels, previous=self.levels)
                new = validate_levels(new, num_levels=self.config.num_levels)
            except (ValueError, ArithmeticError) as exc:
                return self._keep(step, f"degenerate statistics: {exc}", t0, before)
        if not math.isfinite(after):
            return self._keep(step, f"new levels have non-finite variance {after}", t0, before)
        if math.isfinite(before) and after >= before:
            new, after = self.levels, before
        changed = not np.array_equal(new, self.levels)
        if changed:
            self.levels = new
            self.version += 1
        report = UpdateReport(
            step=step,
            updated=changed,
            reason="updated" if changed else "optimum unchanged",
            version=self.version,
            variance_before=_finite_or_none(before),
            variance_after=after,
            seconds=time.perf_counter() - t0,
        )
        self.last_report = report
        return report

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings, lists, dicts) restoring this object exactly."""
        return {
            "state_version": STATE_VERSION,
            "config": asdict(self.config),
            "levels": None if self.levels is None else [float(v) for v in self.levels],
            "version": self.version,
            "multiplier": self.multiplier,
            "step": self.step,
            "schedule": {"steps": list(self.schedule.steps), "every": self.schedule.every},
            "epochs": self.epochs,
            "update": self.update_rule,
            "sym": self.sym,
            "order": self.order,
            "last_stats": None if self.last_stats is None else self.last_stats.to_dict(),
            "last_report": None if self.last_report is None else asdict(self.last_report),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly (no refit). The method and bits must match."""
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            msg = f"expected a state dict of version {STATE_VERSION} from AdaptiveQuantizer.state_dict()"
            raise ValueError(msg)
        cfg = QuantizerConfig(**state["config"])
        if (cfg.method, cfg.bits) != (self.config.method, self.config.bits):
            msg = (
                f"state is for method {cfg.method!r} at {cfg.bits} bits; this quantizer is "
                f"{self.config.method!r} at {self.config.bits} bits"
            )
            raise ValueError(msg)
        levels = state["levels"]
        self.levels = None if levels is None else validate_levels(np.asarray(levels, dtype=np.float32))
        self.version = int(state["version"])
        self.multiplier = None if state["multiplier"] is None else float(state["multiplier"])
        self.step = None if state["step"] is None else int(state["step"])
        sch = state["schedule"]
        self.schedule = UpdateSchedule(steps=tuple(sch["steps"]), every=int(sch["every"]))
        self.epochs = int(state["epochs"])
        self.update_rule = str(state["update"])
        self.sym = bool(state["sym"])
        self.order = str(state["order"])
        ls = state["last_stats"]
        if ls is None:
            self.last_stats = None
        elif ls.get("kind") == "sketch":
            self.last_stats = LevelSketch.from_dict(ls)
        else:
            self.last_stats = GradientStats.from_dict(ls)
        lr = state["last_report"]
        self.last_report = None if lr is None else UpdateReport(**lr)

    def __repr__(self) -> str:
        return f"AdaptiveQuantizer(method={self.config.method!r}, bits={self.config.bits}, version={self.version})"
