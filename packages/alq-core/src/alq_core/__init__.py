"""alq-core: adaptive gradient quantization (ALQ, AMQ and baselines), the NumPy reference.

Everything a backend must reproduce is defined here: level sets, quantize and
dequantize, the wire format, statistics, the variance objective and the level
optimizers. See SPEC.md for the math.
"""

from ._adaptive import AdaptiveQuantizer, UpdateReport, UpdateSchedule
from ._config import QuantizerConfig
from ._distributions import TruncatedNormal, TruncatedNormalMixture
from ._levels import (
    default_levels,
    exponential_levels,
    min_multiplier,
    quantile_levels,
    ternary_levels,
    uniform_levels,
    validate_levels,
)
from ._methods import METHODS, MethodSpec
from ._optimize import AlqResult, AmqResult, alq_levels, amq_multiplier
from ._quantize import QuantizedTensor, bucket_scales, dequantize, quantize
from ._simulate import simulate_workers
from ._stats import DegenerateStatsError, GradientStats, compute_stats, merge_stats
from ._variance import expected_variance, variance_gradient
from ._wire import (
    HEADER_SIZE,
    Header,
    PayloadError,
    check_header,
    decode,
    decode_header,
    encode,
    encode_header,
    pack_codes,
    packed_size,
    payload_size,
    table_checksum,
    unpack_codes,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveQuantizer",
    "AlqResult",
    "AmqResult",
    "DegenerateStatsError",
    "GradientStats",
    "HEADER_SIZE",
    "Header",
    "METHODS",
    "MethodSpec",
    "PayloadError",
    "QuantizedTensor",
    "QuantizerConfig",
    "TruncatedNormal",
    "TruncatedNormalMixture",
    "UpdateReport",
    "UpdateSchedule",
    "alq_levels",
    "amq_multiplier",
    "bucket_scales",
    "check_header",
    "compute_stats",
    "decode",
    "decode_header",
    "default_levels",
    "dequantize",
    "encode",
    "encode_header",
    "expected_variance",
    "exponential_levels",
    "merge_stats",
    "min_multiplier",
    "pack_codes",
    "packed_size",
    "payload_size",
    "quantile_levels",
    "quantize",
    "simulate_workers",
    "table_checksum",
    "ternary_levels",
    "uniform_levels",
    "unpack_codes",
    "validate_levels",
    "variance_gradient",
]
