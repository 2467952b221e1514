"""Launch alq-cupy's quantize and decode kernels a few times on ResNet-50-sized input, for Nsight Compute.

Run on the GPU machine, from the repository root::

    PYTHONPATH=packages/alq-core/src:packages/alq-cupy/src \\
        ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
            --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section InstructionStats \\
            -k "regex:alq_quantize|alq_decode_sum" python3 benchmarks/profile_cupy.py

Launches, three times each, in order: quantize+pack at bucket 8192 (device noise), decode+sum of 2 payloads
(bucket 8192), quantize+pack at bucket 16384.
"""

from __future__ import annotations

import alq_core
import cupy as cp
import numpy as np
from alq_cupy import _header
from alq_cupy import _kernels as K
from alq_cupy._quantize import device_header, level_table

RESNET50 = 25_557_032


def main() -> None:
    n = RESNET50
    rng = np.random.default_rng(0)
    x = cp.asarray((rng.standard_normal(n) * 1e-3).astype(np.float32))
    for d in (8192, 16384):
        cfg = alq_core.QuantizerConfig("alq", bits=3, bucket_size=d, nonfinite="propagate")
        levels = alq_core.default_levels(cfg)
        _, dev, crc = level_table(levels, cfg)
        size = alq_core.payload_size(cfg, n)
        buf = cp.empty(size, dtype=cp.uint8)
        hdr = device_header(cfg, n, 0, crc)
        off_s, off_c, off_t, _ = _header.payload_offsets(cfg, n)
        for _ in range(3):
            K.launch_quantize(
                x, n, d, dev, levels.size, False, None, 3, None, 5,
                scale_bytes=buf[off_s:], packed=buf[off_c:], header_src=hdr, header_dst=buf,
            )  # fmt: skip
        if d == 8192:
            pays = cp.stack([buf] * 2)
            out = cp.empty(n, dtype=cp.float32)
            err = cp.zeros(1, dtype=cp.int32)
            for _ in range(3):
                K.launch_decode_sum(pays, size, 2, n, n, d, 3, levels.size, (off_s, off_c, off_t), dev, 0.5, out, err)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
