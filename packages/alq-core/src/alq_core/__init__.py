"""alq-core: adaptive gradient quantization (ALQ, AMQ and baselines), the NumPy reference.

Everything a backend must reproduce is defined here: level sets, quantize and
dequantize, the wire format, statistics, the variance objective and the level
optimizers. See SPEC.md for the math.
"""

from ._config import QuantizerConfig
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
from ._quantize import QuantizedTensor, bucket_scales, dequantize, quantize
from ._simulate import simulate_workers
from ._wire import (
    HEADER_SIZE,
    PayloadError,
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
    "HEADER_SIZE",
    "METHODS",
    "MethodSpec",
    "PayloadError",
    "QuantizedTensor",
    "QuantizerConfig",
    "bucket_scales",
    "decode",
    "decode_header",
    "default_levels",
    "dequantize",
    "encode",
    "encode_header",
    "exponential_levels",
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
]
