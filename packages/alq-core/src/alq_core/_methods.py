"""The method registry: the names of SPEC section 1 and their defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

LevelFamily = Literal["none", "uniform", "exponential", "ternary", "adaptive"]
Adapt = Literal["alq", "amq"]
StatsModel = Literal["norm-based", "norm-less", "empirical"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method name means.

    Attributes
    ----------
    name : str
        The user-facing name (``"alq-n"``).
    wire_id : int
        The method's id in the payload header; never reused.
    levels : {"none", "uniform", "exponential", "ternary", "adaptive"}
        The level family. ``"none"`` is full precision.
    norm : {"l2", "linf"} or None
        Default bucket norm (None for full precision).
    adapt : {"alq", "amq"} or None
        How levels adapt; None for fixed levels.
    stats : {"norm-based", "norm-less", "empirical"} or None
        Which model of the gradient distribution the adaptation fits: the paper's truncated
        normals, or the sketch of the empirical distribution (:class:`alq_core.LevelSketch`).
    clip : float or None
        Default clipping multiple of the standard deviation (TernGrad's 2.5).
    """

    name: str
    wire_id: int
    levels: LevelFamily
    norm: Literal["l2", "linf"] | None
    adapt: Adapt | None
    stats: StatsModel | None
    clip: float | None

    @property
    def quantized(self) -> bool:
        """True unless the method sends full precision."""
        return self.levels != "none"

    @property
    def adaptive(self) -> bool:
        """True when the level table changes during training."""
        return self.adapt is not None


_SPECS = (
    MethodSpec("fp32", 0, "none", None, None, None, None),
    MethodSpec("qsgd", 1, "uniform", "l2", None, None, None),
    MethodSpec("qsgdinf", 2, "uniform", "linf", None, None, None),
    MethodSpec("nuqsgd", 3, "exponential", "l2", None, None, None),
    MethodSpec("trn", 4, "ternary", "linf", None, None, 2.5),
    MethodSpec("alq", 5, "adaptive", "l2", "alq", "norm-based", None),
    MethodSpec("alq-n", 6, "adaptive", "l2", "alq", "norm-less", None),
    MethodSpec("amq", 7, "adaptive", "l2", "amq", "norm-based", None),
    MethodSpec("amq-n", 8, "adaptive", "l2", "amq", "norm-less", None),
    # beyond the paper: levels fitted to the sketch of the empirical distribution
    MethodSpec("alq-e", 9, "adaptive", "l2", "alq", "empirical", None),
    MethodSpec("alq-einf", 10, "adaptive", "linf", "alq", "empirical", None),
)

#: Every method of SPEC section 1, by name, in the paper's order.
METHODS: Mapping[str, MethodSpec] = MappingProxyType({s.name: s for s in _SPECS})

#: Wire id -> method spec.
METHODS_BY_WIRE_ID: Mapping[int, MethodSpec] = MappingProxyType({s.wire_id: s for s in _SPECS})


def method_spec(name: str) -> MethodSpec:
    """Look up a method by name, with an error that lists the known names."""
    if not isinstance(name, str) or name not in METHODS:
        known = ", ".join(METHODS)
        msg = f"`method` must be one of {known}; got {name!r}"
        raise ValueError(msg)
    return METHODS[name]
