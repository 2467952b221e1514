"""alq-torch: adaptive gradient quantization for PyTorch.

Ops bit-exact with :mod:`alq_core` on CPU and CUDA (fused Triton kernels on the
GPU), the DDP communication hook, and the quantized reduce-scatter / hybrid
all-reduce for FSDP2. Importing this package never initializes CUDA or compiles
a kernel.
"""

from ._fsdp import ALQAllReduceHook, ALQReduceScatter, register_fsdp
from ._hook import ALQState, alq_hook
from ._metrics import ErrorMetrics, error_metrics, top_mask
from ._quantize import QuantizedTensor, dequantize, quantize
from ._simulate import SimulatedStep, SimulatedWorkers, exact_mask_from_params
from ._sketch import level_sketch, sketch_sums
from ._stats import bucket_stats
from ._telemetry import BucketRecord, LevelUpdateRecord, StepRecord
from ._wire import (
    decode,
    decode_sum,
    encode,
    pack_codes,
    prepare_decode_sum,
    prepare_quantize_encode,
    quantize_encode,
    unpack_codes,
)

__version__ = "0.1.0"

__all__ = [
    "ALQAllReduceHook",
    "ALQReduceScatter",
    "ALQState",
    "BucketRecord",
    "ErrorMetrics",
    "LevelUpdateRecord",
    "QuantizedTensor",
    "SimulatedStep",
    "SimulatedWorkers",
    "StepRecord",
    "alq_hook",
    "bucket_stats",
    "decode",
    "decode_sum",
    "dequantize",
    "encode",
    "error_metrics",
    "exact_mask_from_params",
    "level_sketch",
    "pack_codes",
    "prepare_decode_sum",
    "prepare_quantize_encode",
    "quantize",
    "quantize_encode",
    "register_fsdp",
    "sketch_sums",
    "top_mask",
    "unpack_codes",
]
