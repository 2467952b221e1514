"""`QuantizerConfig`: one validated, immutable description of a quantizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._methods import MethodSpec, method_spec

Norm = Literal["l2", "linf"]
TailPolicy = Literal["quantize", "full"]
NonfinitePolicy = Literal["raise", "propagate"]

_NORMS = ("l2", "linf")
_TAILS = ("quantize", "full")
_NONFINITE = ("raise", "propagate")
#: Largest bucket the wire format's 32-bit field can describe.
MAX_BUCKET_SIZE = 2**31 - 1


@dataclass(frozen=True)
class QuantizerConfig:
    """How gradients are quantized, validated on construction.

    Parameters
    ----------
    method : str
        One of :data:`alq_core.METHODS` (``"fp32"``, ``"qsgd"``, ``"qsgdinf"``,
        ``"nuqsgd"``, ``"trn"``, ``"alq"``, ``"alq-n"``, ``"amq"``, ``"amq-n"``, and the
        empirical-distribution methods ``"alq-e"`` (L2 scale) and ``"alq-einf"`` (max-abs scale)).
    bits : int
        Bits per coordinate, 1..8; ``L = 2**bits`` signed levels. TernGrad always
        uses 2-bit codes (:attr:`code_bits`); full precision ignores it.
    bucket_size : int
        Coordinates per bucket ``d``, each bucket with its own scale.
    norm : {"auto", "l2", "linf"}
        Bucket scale; ``"auto"`` takes the method's default.
    tail : {"quantize", "full"}
        The last, shorter bucket is quantized with its own scale (default) or
        sent exactly in float32 (the reference code's behaviour).
    clip : float, None or "auto"
        Clip normalized coordinates beyond ``clip`` standard deviations and
        recompute the scale (TernGrad). ``"auto"`` is 2.5 for ``trn``, else off.
    nonfinite : {"raise", "propagate"}
        A bucket holding NaN or Inf raises (default), or is marked with a NaN
        scale so that it decodes to NaN and the caller can send that step exactly.
    """

    method: str = "alq"
    bits: int = 3
    bucket_size: int = 8192
    norm: str = "auto"
    tail: str = "quantize"
    clip: float | str | None = "auto"
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        spec = method_spec(self.method)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            msg = f"`bits` must be an integer in 1..8; got {self.bits!r}"
            raise ValueError(msg)
        if (
            isinstance(self.bucket_size, bool)
            or not isinstance(self.bucket_size, int)
            or not 1 <= self.bucket_size <= MAX_BUCKET_SIZE
        ):
            msg = (
                f"`bucket_size` must be an integer in 1..{MAX_BUCKET_SIZE}; got {self.bucket_size!r}"
                " (the paper uses 8192 or 16384)"
            )
            raise ValueError(msg)
        norm = spec.norm if self.norm == "auto" else self.norm
        if spec.quantized and norm not in _NORMS:
            msg = f"`norm` must be 'auto', 'l2' or 'linf'; got {self.norm!r}"
            raise ValueError(msg)
        object.__setattr__(self, "norm", norm if spec.quantized else "l2")
        if self.tail not in _TAILS:
            msg = f"`tail` must be 'quantize' or 'full'; got {self.tail!r}"
            raise ValueError(msg)
        clip = spec.clip if self.clip == "auto" else self.clip
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
                msg = f"`clip` must be a positive number of standard deviations, None or 'auto'; got {self.clip!r}"
                raise ValueError(msg)
            clip = float(clip)
            if not spec.quantized:
                msg = (
                    f"`clip` applies to quantized methods only; {self.method!r} sends the gradient unchanged, so "
                    f"clip={self.clip!r} would be ignored. Use clip=None (or 'auto') for {self.method!r}, "
                    "and give the clipping to the quantized methods"
                )
                raise ValueError(msg)
        object.__setattr__(self, "clip", clip)
        if self.nonfinite not in _NONFINITE:
            msg = f"`nonfinite` must be 'raise' or 'propagate'; got {self.nonfinite!r}"
            raise ValueError(msg)

    @property
    def spec(self) -> MethodSpec:
        """The registry entry of :attr:`method`."""
        return method_spec(self.method)

    @property
    def quantized(self) -> bool:
        """False for full precision (``fp32``)."""
        return self.spec.quantized

    @property
    def code_bits(self) -> int:
        """Bits per code on the wire: 2 for TernGrad, 32 for fp32, else :attr:`bits`."""
        family = self.spec.levels
        if family == "none":
            return 32
        if family == "ternary":
            return 2
        return self.bits

    @property
    def num_levels(self) -> int:
        """Number of levels ``L`` in the table (3 for TernGrad, 0 for fp32)."""
        family = self.spec.levels
        if family == "none":
            return 0
        if family == "ternary":
            return 3
        return int(2**self.bits)

    def num_buckets(self, n: int) -> int:
        """Scales sent for ``n`` coordinates (the tail has one unless ``tail='full'``)."""
        full, rest = divmod(n, self.bucket_size)
        return full + (1 if rest and self.tail == "quantize" else 0)

    def num_quantized(self, n: int) -> int:
        """Coordinates sent as codes for ``n`` coordinates (the rest go exactly)."""
        if not self.quantized:
            return 0
        if self.tail == "full":
            return (n // self.bucket_size) * self.bucket_size
        return n
