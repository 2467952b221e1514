"""Launch each fused kernel a few times on ResNet-50-sized input, for Nsight Compute.

Run on the GPU machine, from the repository root::

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
            --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \\
            -k "regex:_qpack_kernel|_decode_sum_kernel" python3 benchmarks/profile_kernels.py

Launches, three times each, in order: quantize+pack at bucket 8192 (device
noise), decode+sum of 8 payloads (bucket 8192), quantize+pack at bucket 16384.
``--only quantize|decode`` picks one kind.
"""

from __future__ import annotations

import argparse

import torch
from alq_core import HEADER_SIZE, QuantizerConfig, default_levels, payload_size
from alq_torch import _kernels, _tables

RESNET50 = 25_557_032


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=RESNET50)
    parser.add_argument("--only", choices=["quantize", "decode"])
    args = parser.parse_args()
    x = torch.randn(args.n, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 1e-3
    for d in (8192, 16384):
        config = QuantizerConfig("alq", bits=3, bucket_size=d, nonfinite="propagate")
        table = _tables.level_table(default_levels(config), config, x.device)
        head = _tables.header_tensor(config, args.n, 0, table.crc, x.device)
        buf = torch.empty(payload_size(config, args.n), dtype=torch.uint8, device="cuda")
        if args.only != "decode":
            for _ in range(3):
                _kernels.quantize_pack(x, table, config, head, buf, noise=None, seed=1)
        if args.only != "quantize" and d == 8192:
            payloads = buf.expand(8, -1).contiguous()
            m = config.num_quantized(args.n)
            off = HEADER_SIZE + 4 * config.num_buckets(args.n)
            avg = torch.empty(args.n, device="cuda")
            for _ in range(3):
                _kernels.decode_sum(payloads, table, config, m, off, avg, 0.125)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
