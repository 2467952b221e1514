#!/bin/bash
# GPU checks for code changed since its last GPU run (one H200 / H100, ~4 min). Round 12 ran the FSDP gloo-cuda
# tests, test_hook_gpu.py and fsdp_bench on an H100 (benchmarks/results/gpu_tests_round12_h100x1.txt), round 13 the
# bf16 batched-worker timing (sim_workers_bf16_h200.txt); the sketch tests, hook_breakdown and the preset run on a GPU
# (it ran end to end on the CPU: results/cifar10-preset-cpu-smoke/) are still owed:
#   OUT=dir bash benchmarks/gpu_checks.sh [CIFAR_NPZ]
# FSDP gloo-cuda tests, the hook GPU tests, the sketch kernels, hook_breakdown, fsdp_bench on a fake 2-rank group,
# bf16 batched-worker timing, and the CIFAR-10 preset end to end plus step times / memory for planning the table.

export PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src
O=$OUT/a; mkdir -p $O; T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv > $O/gpu.txt
python benchmarks/pack_cifar10.py unpack ${1:-data/cifar10-images.npz} /tmp/c10 > $O/unpack.log 2>&1
python -c "from alq_torch.train.data import load_data; load_data('cifar10', data_dir='/tmp/c10')" > $O/decode.log 2>&1
echo "data ready $(( $(date +%s) - T0 )) s" >> $O/time.txt
# tests in parallel (separate processes)
( timeout 100 python -m pytest -q -p no:cacheprovider packages/alq-torch/tests/test_fsdp.py -k "cuda" > $O/t_fsdp.txt 2>&1 ) &
( timeout 100 python -m pytest -q -p no:cacheprovider -x packages/alq-torch/tests/test_hook_gpu.py > $O/t_hook.txt 2>&1 ) &
( timeout 100 python -m pytest -q -p no:cacheprovider packages/alq-torch/tests/test_sketch.py -k "gpu or kernel or variant or fused or launch" > $O/t_sketch.txt 2>&1 ) &
wait
echo "tests $(( $(date +%s) - T0 )) s" >> $O/time.txt
timeout 40 python benchmarks/hook_breakdown.py --rounds 100 --warmup 30 > $O/hook_breakdown.txt 2>&1
timeout 45 python benchmarks/fsdp_bench.py --fake-world 2 --steps 5 --calls 30 $O/fsdp_fake2_h200.json > $O/fsdp_fake2_h200.txt 2>&1
timeout 60 python benchmarks/sim_workers.py --workers 16 --precisions fp32,bf16 --steps 4 --warmup 1 --out $O/sim_workers_bf16_h200.json > $O/sim_workers_bf16_h200.txt 2>&1
echo "bench $(( $(date +%s) - T0 )) s" >> $O/time.txt
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -lms 500 > $O/mem.txt 2>&1 &
SMI=$!
C="--data cifar10 --data-dir /tmp/c10 --no-progress --no-plots --log-every 5 --eval-every 1000"
timeout 70 python -u -m alq_torch.train --preset paper-cifar10-resnet32 $C --methods alq-einf,qsgdinf --steps 10 --out $O/preset > $O/preset.txt 2>&1
echo "preset $(( $(date +%s) - T0 )) s" >> $O/time.txt
R="$C --bits 3 --workers 16 --batch-size 128 --seeds 0 --update-steps 0,10 --update-every 0"
timeout 50 python -u -m alq_torch.train $R --model resnet32 --bucket-size 16384 --methods alq-einf --amp bf16 --steps 20 --out $O/r32bf16 > $O/r32bf16.txt 2>&1
echo "r32bf16 $(( $(date +%s) - T0 )) s" >> $O/time.txt
timeout 50 python -u -m alq_torch.train $R --model resnet8 --bucket-size 8192 --methods alq-einf,amq --steps 30 --out $O/r8 > $O/r8.txt 2>&1
echo "r8 $(( $(date +%s) - T0 )) s" >> $O/time.txt
# two ResNet-32 processes at once: throughput under sharing
for s in 0 1; do timeout 50 python -u -m alq_torch.train ${R/--seeds 0/--seeds $s} --model resnet32 --bucket-size 16384 --methods alq --steps 20 --out $O/par$s > $O/par$s.txt 2>&1 & done; wait
echo "par $(( $(date +%s) - T0 )) s" >> $O/time.txt
kill $SMI
rm -rf $O/*/checkpoints
cd $OUT && tar czf a.tgz a && rm -rf a
