"""Hypothesis strategies for alq-core and its backends (import needs ``hypothesis``).

Ranges are kept meaningful: gradients are finite float32 with magnitudes from
1e-30 to 1e30, buckets from 1 to a few thousand coordinates, level tables
strictly increasing in float32 with ±1 ends.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .._config import QuantizerConfig
from .._levels import default_levels, exponential_levels, min_multiplier, uniform_levels, validate_levels
from .._methods import METHODS

bits = st.integers(min_value=1, max_value=8)
quantized_methods = st.sampled_from([m for m, s in METHODS.items() if s.quantized])
methods = st.sampled_from(list(METHODS))


@st.composite
def configs(
    draw: st.DrawFn,
    method: st.SearchStrategy[str] = quantized_methods,
    max_bucket: int = 300,
) -> QuantizerConfig:
    """A valid :class:`QuantizerConfig` with a small bucket (so tails are common)."""
    name = draw(method)
    # fp32 sends the gradient unchanged, so the config rejects a clip for it.
    clips = ["auto", None, 1.0, 2.5] if METHODS[name].quantized else ["auto", None]
    return QuantizerConfig(
        method=name,
        bits=draw(bits),
        bucket_size=draw(st.integers(1, max_bucket)),
        norm=draw(st.sampled_from(["auto", "l2", "linf"])),
        tail=draw(st.sampled_from(["quantize", "full"])),
        clip=draw(st.sampled_from(clips)),
    )


@st.composite
def level_tables(draw: st.DrawFn, num_levels: int) -> np.ndarray:
    """An arbitrary valid float32 table of ``num_levels`` levels (sorted, ±1 ends)."""
    if num_levels == 2:
        return validate_levels([-1.0, 1.0])
    inner = draw(
        st.lists(
            st.floats(-0.9990234375, 0.9990234375, width=32),
            min_size=num_levels - 2,
            max_size=num_levels - 2,
            unique=True,
        )
    )
    return validate_levels([-1.0, *sorted(inner), 1.0])


@st.composite
def levels_for(draw: st.DrawFn, config: QuantizerConfig) -> np.ndarray:
    """A level table that fits ``config``: its default, an exponential one, or arbitrary."""
    family = config.spec.levels
    if family in ("ternary", "uniform"):
        return default_levels(config)
    multipliers = st.floats(max(0.05, min_multiplier(config.bits)), 0.95)
    if family == "exponential":
        return exponential_levels(config.bits, draw(multipliers))
    return draw(
        st.one_of(
            st.just(uniform_levels(config.bits)),
            multipliers.map(lambda p: exponential_levels(config.bits, p)),
            level_tables(config.num_levels),
        )
    )


@st.composite
def gradients(draw: st.DrawFn, max_size: int = 2000) -> np.ndarray:
    """A finite float32 gradient: a scale times normal-ish values, with exact zeros mixed in."""
    n = draw(st.integers(0, max_size))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e30]))
    body = draw(
        hnp.arrays(
            np.float32,
            n,
            elements=st.floats(-4.0, 4.0, width=32),
        )
    )
    return (body * np.float32(scale)).astype(np.float32)


def noise_for(n: int) -> st.SearchStrategy[np.ndarray]:
    """``n`` float32 uniforms in [0, 1), from a drawn seed (fast for large ``n``)."""
    return st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).random(n, dtype=np.float32))


# -- models of normalized coordinates (level optimization) ------------------------------------------
@st.composite
def truncated_normals(draw: st.DrawFn) -> object:
    """A :class:`alq_core.TruncatedNormal` on [-1, 1]: peaked (std down to 1e-3) or wide, means off center."""
    from .._distributions import TruncatedNormal

    std = draw(st.sampled_from([1e-3, 1.0 / np.sqrt(16384), 1e-2, 0.05, 0.2, 1.0]))
    mean = draw(st.sampled_from([0.0, 1e-3, -0.01, 0.1, -0.5, 0.9]))
    return TruncatedNormal(mean, std)


@st.composite
def mixtures(draw: st.DrawFn, max_components: int = 8) -> object:
    """A :class:`alq_core.TruncatedNormalMixture` of realistic bucket statistics (std ~ 1/sqrt(d))."""
    from .._distributions import TruncatedNormalMixture

    k = draw(st.integers(1, max_components))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    d = draw(st.sampled_from([64, 1024, 8192, 16384]))
    stds = rng.uniform(0.3, 3.0, k) / np.sqrt(d)
    means = rng.normal(0.0, 1.0, k) * stds * draw(st.sampled_from([0.0, 0.3, 3.0]))
    return TruncatedNormalMixture(rng.uniform(0.1, 1.0, k), means, stds)


models = st.one_of(truncated_normals(), mixtures())
