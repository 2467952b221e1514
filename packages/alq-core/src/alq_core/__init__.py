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
from ._oracle import OptimalLevels, empirical_variance, optimal_levels
from ._quantize import QuantizedTensor, bucket_scales, dequantize, normalized_coordinates, quantize
from ._simulate import simulate_workers
from ._sketch import LevelSketch, compute_sketch, fit_sketch, merge_sketches, sketch_bins, sketch_variance
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
    "LevelSketch",
    "METHODS",
    "MethodSpec",
    "OptimalLevels",
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
    "compute_sketch",
    "compute_stats",
    "decode",
    "decode_header",
    "default_levels",
    "dequantize",
    "empirical_variance",
    "encode",
    "encode_header",
    "expected_variance",
    "exponential_levels",
    "fit_sketch",
    "merge_sketches",
    "merge_stats",
    "min_multiplier",
    "normalized_coordinates",
    "optimal_levels",
    "pack_codes",
    "packed_size",
    "payload_size",
    "quantile_levels",
    "quantize",
    "simulate_workers",
    "sketch_bins",
    "sketch_variance",
    "table_checksum",
    "ternary_levels",
    "uniform_levels",
    "unpack_codes",
    "validate_levels",
    "variance_gradient",
]
