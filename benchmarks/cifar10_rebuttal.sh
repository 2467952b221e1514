#!/bin/bash
# The paper's rebuttal table (ResNet-32, CIFAR-10, 3 bits, bucket 16384, K = 16) and a ResNet-8 bucket/bits sweep,
# as parallel alq-train processes on one GPU, within a wall-clock budget.
#
#   bash benchmarks/cifar10_rebuttal.sh CIFAR_NPZ_OR_DIR OUT_DIR [BUDGET_S]
#
# CIFAR_NPZ_OR_DIR: data/cifar10-images.npz (benchmarks/pack_cifar10.py) or an extracted CIFAR-10 directory.
# The step count is chosen from a 12-step calibration run so that every run ends inside BUDGET_S (default 540);
# runs still going at the deadline are stopped and left out of the tables. Writes OUT_DIR/*.md|json|png.
# First attempt (torch 2.11, H200) failed with --channels-last under vmap; the harness now falls back
# to the contiguous layout, and this script trains in fp32 (TF32 convolutions) without it.
set -u
export PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src
SRC=$1; R=$2; BUDGET=${3:-540}; mkdir -p $R; T0=$(date +%s)
if [[ $SRC == *.npz ]]; then python benchmarks/pack_cifar10.py unpack $SRC /tmp/c10 > $R/unpack.log 2>&1; DATA=/tmp/c10; else DATA=$SRC; fi
python -c "from alq_torch.train.data import load_data; load_data('cifar10', data_dir='$DATA')" > $R/decode.log 2>&1
COMMON="--data cifar10 --data-dir $DATA --bits 3 --workers 16 --batch-size 128 --no-progress --no-plots"
R32="$COMMON --model resnet32 --bucket-size 16384 --update-steps 0,25,50 --update-every 50"
timeout 90 python -m alq_torch.train $R32 --methods alq-einf --seeds 9 --steps 12 --log-every 6 --eval-every 1000 --out $R/calib > $R/calib.txt 2>&1
EL=$(( $(date +%s) - T0 )); STOP=$(( BUDGET - 20 ))
STEPS=$(python -c "
import json; r=json.load(open('$R/calib/results.json'))['runs'][0]; t=r['train_seconds']/r['steps']
s=int(($STOP-$EL-25)*1.3/(22*t)); print(max(60,min(80000,s//20*20)))" 2>>$R/calib.txt || echo 80)
echo "elapsed $EL s; steps $STEPS" > $R/plan.txt
E=$((STEPS/5))
run() { python -m alq_torch.train $R32 --steps $STEPS --log-every $E --eval-every $E "$@" ; }
for m in fp32 nuqsgd qsgdinf alq amq; do for s in 0 1; do run --methods $m --seeds $s --out $R/runs/$m-s$s > $R/log-$m-s$s.txt 2>&1 & done; done
for m in qsgd trn alq-n amq-n alq-e alq-einf; do run --methods $m --seeds 0 --out $R/runs/$m-s0 > $R/log-$m-s0.txt 2>&1 & done
for m in alq amq; do run --exact-1d --methods $m --seeds 0 --out $R/runs/$m-1d-s0 > $R/log-$m-1d.txt 2>&1 & done
R8="$COMMON --model resnet8 --steps $(( STEPS < 100 ? 100 : STEPS )) --seeds 0 --update-steps 0,25,50 --update-every 50 --log-every 20 --eval-every 20"
M=qsgdinf,nuqsgd,alq,amq,alq-einf
for d in 128 8192 32768; do python -m alq_torch.train $R8 --bucket-size $d --methods $M --out $R/sweep/b3-d$d > $R/log8-d$d.txt 2>&1 & done
for b in 2 4; do python -m alq_torch.train ${R8/--bits 3/--bits $b} --bucket-size 8192 --methods $M --out $R/sweep/b$b-d8192 > $R/log8-b$b.txt 2>&1 & done
sleep 20; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> $R/plan.txt 2>/dev/null
while [ $(pgrep -fc "alq_torch.train") -gt 0 ] && [ $(( $(date +%s) - T0 )) -lt $STOP ]; do sleep 2; done
pkill -f alq_torch.train; sleep 1
echo "total $(( $(date +%s) - T0 )) s" >> $R/plan.txt
ok() { for d in "$@"; do [ -f $d/results.json ] && echo $d; done; }
python benchmarks/cifar_table.py $R/cifar10_resnet32_k16 $(ok $R/runs/*) --paper rebuttal-k16 --title "ResNet-32, CIFAR-10 (JPEG tree), K=16" > $R/table.txt 2>&1
python benchmarks/cifar_table.py $R/sweep_bucket $(ok $R/sweep/b3-d*) --group-by bucket_size > $R/sweep_bucket.txt 2>&1
python benchmarks/cifar_table.py $R/sweep_bits $(ok $R/sweep/b*-d8192) --group-by bits > $R/sweep_bits.txt 2>&1
rm -rf $R/runs/*/checkpoints $R/sweep/*/checkpoints $R/calib/checkpoints
cat $R/plan.txt $R/table.txt $R/sweep_bucket.txt $R/sweep_bits.txt
