#!/bin/bash
# The paper's CIFAR-10 experiments on one GPU, as a queue of alq-train processes sharing it.
#
#   bash benchmarks/cifar10_rebuttal.sh table DATA OUT STEPS [PARALLEL] [BUDGET_S] [AMP]
#   bash benchmarks/cifar10_rebuttal.sh sweep DATA OUT STEPS [PARALLEL] [BUDGET_S]
#
# table: the rebuttal table (ResNet-32, 3 bits, bucket 16384, K = 16 x 128 images): two seeds of fp32, QSGDinf,
#        ALQ, AMQ, NUQSGD, alq-einf, one of ALQ-N, AMQ-N, TernGrad, alq-e, QSGD, and ALQ / AMQ with 1-D tensors
#        exact (19 runs), one process per run.
# sweep: ResNet-8 (K = 16 x 128), every quantized method per process: bucket 128 ... 32768 at 3 bits, bits 2 ... 8
#        at bucket 8192, and the bucket sweep with TernGrad's 2.5-sigma clipping for every method (the rebuttal's
#        Fig. 1); fp32 once.
# DATA: data/cifar10-images.npz (benchmarks/pack_cifar10.py) or a CIFAR-10 directory. PARALLEL processes run at
# once (default 6; a ResNet-32 process at K = 16 needs an estimated 8-10 GB of GPU memory in fp32: activations of 2048 images, not yet measured). Processes still running at
# BUDGET_S (default 575) are stopped; a stopped comparison keeps its finished runs (runs/*.json), which
# benchmarks/cifar_table.py reads. Writes OUT/*.md|json|png and OUT/plan.txt (timings, GPU memory).
set -u
export PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src
WHAT=$1; SRC=$2; R=$3; STEPS=$4; P=${5:-6}; BUDGET=${6:-575}; AMP=${7:-none}
T0=$(date +%s); mkdir -p $R
if [[ $SRC == *.npz ]]; then python benchmarks/pack_cifar10.py unpack $SRC /tmp/c10 > $R/unpack.log 2>&1; DATA=/tmp/c10; else DATA=$SRC; fi
python -c "from alq_torch.train.data import load_data; load_data('cifar10', data_dir='$DATA')" > $R/decode.log 2>&1
echo "$WHAT: data ready after $(( $(date +%s) - T0 )) s; $STEPS steps, $P processes, amp $AMP" > $R/plan.txt
E=$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))
COMMON="--data cifar10 --data-dir $DATA --workers 16 --batch-size 128 --no-progress --no-plots --steps $STEPS"
COMMON+=" --log-every $E --eval-every $E --update-steps 0,25,100 --update-every 200 --amp $AMP"
JOBS=$R/jobs.txt; : > $JOBS
if [ "$WHAT" = table ]; then
  COMMON+=" --model resnet32 --bits 3 --bucket-size 16384"
  for s in 0 1; do for m in fp32 qsgdinf alq amq nuqsgd alq-einf; do echo "--methods $m --seeds $s --out $R/runs/$m-s$s"; done; done >> $JOBS
  for m in alq-n amq-n trn alq-e qsgd; do echo "--methods $m --seeds 0 --out $R/runs/$m-s0"; done >> $JOBS
  for m in alq amq; do echo "--exact-1d --methods $m --seeds 0 --out $R/runs/$m-1d-s0"; done >> $JOBS
else
  COMMON+=" --model resnet8 --seeds 0"
  M=qsgdinf,alq-einf,alq,amq,nuqsgd,trn,alq-n,amq-n,alq-e,qsgd
  echo "--bits 3 --bucket-size 8192 --methods fp32 --out $R/bucket/fp32" >> $JOBS
  for d in 128 32768 2048 512 8192; do echo "--bits 3 --bucket-size $d --methods $M --out $R/bucket/d$d"; done >> $JOBS
  for b in 2 4 8 6; do echo "--bits $b --bucket-size 8192 --methods $M --out $R/bits/b$b"; done >> $JOBS
  for d in 128 2048 32768; do echo "--bits 3 --bucket-size $d --clip 2.5 --methods $M --out $R/clip/d$d"; done >> $JOBS
fi
mkdir -p $R/runs $R/bucket $R/bits $R/clip
(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > $R/gpu_use.txt 2>&1) & SMI=$!
# one log per job, named after its output directory; the queue runs in its own process group (stopped as one)
setsid xargs -P $P -I{} sh -c 'o=$(echo "{}" | sed "s/.*--out //"); python -u -m alq_torch.train $0 {} > $o.log 2>&1' "$COMMON" < $JOBS &
Q=$!; STOP=$(( BUDGET - 20 ))
while kill -0 $Q 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $STOP ]; do sleep 2; done
kill -- -$Q 2>/dev/null; sleep 1; kill $SMI 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s; peak GPU memory (MiB, util) $(sort -n $R/gpu_use.txt 2>/dev/null | tail -1)" >> $R/plan.txt
# cifar_table.py OUT DIRS...: only directories holding finished runs; nothing when there are none
table() { local out=$1; shift; local ds=(); for d in "$@"; do ls $d/runs/*.json > /dev/null 2>&1 && ds+=($d); done
  if [ ${#ds[@]} -gt 0 ]; then python benchmarks/cifar_table.py $out "${ds[@]}" "${TABLE_ARGS[@]}"; else echo "$out: no finished runs"; fi; }
if [ "$WHAT" = table ]; then
  TABLE_ARGS=(--paper rebuttal-k16 --title "ResNet-32, CIFAR-10 (JPEG tree), 3 bits, bucket 16384, K=16, $STEPS steps")
  table $R/cifar10_resnet32_k16 $R/runs/* > $R/table.txt 2>&1
else
  TABLE_ARGS=(--group-by bucket_size); table $R/sweep_bucket $R/bucket/* > $R/table.txt 2>&1
  TABLE_ARGS=(--group-by bits); table $R/sweep_bits $R/bits/* $R/bucket/d8192 >> $R/table.txt 2>&1
  TABLE_ARGS=(--group-by bucket_size); table $R/sweep_bucket_clip $R/clip/* >> $R/table.txt 2>&1
fi
rm -rf $R/*/*/checkpoints
cat $R/plan.txt $R/table.txt
