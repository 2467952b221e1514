"""alq-cupy: adaptive gradient quantization on CuPy, byte-compatible with alq-core.

CUDA kernels (compiled on first use) for bucket scales, stochastic quantization
with given or device-generated counter-based noise, bit packing, the payload
format of ``alq_core`` (same bytes), decoding and summing payloads, per-bucket
statistics for the adaptive level update (and the level sketch of ``alq-e`` /
``alq-einf``), and NCCL collectives with a quantized
all-reduce. Importing this package needs neither CuPy nor a GPU; calling an op
without them raises an error naming ``pip install 'alq-cupy[cuda12]'`` or
``'alq-cupy[cuda13]'``. GPU arrays from torch or JAX are used without a copy
(DLPack).
"""

from ._backend import as_cupy
from ._comm import Communicator, chunks, derive_seed, nccl_unique_id
from ._noise import counter_noise, counter_noise_host
from ._quantize import (
    QuantizedTensor,
    bucket_scales,
    decode,
    decode_sum,
    dequantize,
    encode,
    pack_codes,
    quantize,
    quantize_encode,
    unpack_codes,
)
from ._stats import bucket_stats, gradient_stats, level_sketch, sketch_sums

__version__ = "0.1.0"

__all__ = [
    "Communicator",
    "QuantizedTensor",
    "as_cupy",
    "bucket_scales",
    "bucket_stats",
    "chunks",
    "counter_noise",
    "counter_noise_host",
    "decode",
    "decode_sum",
    "dequantize",
    "derive_seed",
    "encode",
    "gradient_stats",
    "level_sketch",
    "nccl_unique_id",
    "pack_codes",
    "quantize",
    "quantize_encode",
    "sketch_sums",
    "unpack_codes",
]
