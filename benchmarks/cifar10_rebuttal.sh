#!/bin/bash
# The paper's CIFAR-10 experiments on one GPU, as a queue of alq-train processes sharing it.
#
#   bash benchmarks/cifar10_rebuttal.sh table DATA OUT STEPS [PARALLEL] [BUDGET_S] [AMP]
#   bash benchmarks/cifar10_rebuttal.sh sweep DATA OUT STEPS [PARALLEL] [BUDGET_S]
#
# table: the rebuttal table (ResNet-32, 3 bits, bucket 16384, K = 16 x 128 images): two seeds of fp32, QSGDinf,
#        ALQ, AMQ, NUQSGD, alq-einf, one of ALQ-N, AMQ-N, TernGrad and ALQ with 1-D tensors exact, then alq-e and
#        QSGD (18 runs), one process per run, seed 0 of the main methods first.
# sweep: ResNet-8 (K = 16 x BATCH, default 128), every quantized method per process: bucket 128 ... 32768 at 3 bits,
#        bits 2 ... 8 at bucket 8192, and the bucket sweep with TernGrad's 2.5-sigma clipping for every method (the
#        rebuttal's Fig. 1); fp32 once.
# DATA: data/cifar10-images.npz (benchmarks/pack_cifar10.py) or a CIFAR-10 directory. PARALLEL processes run at
# once ('auto', the default: as many as GPU memory holds at ~14 GiB per ResNet-32 process at K = 16 x 128 (12.2 GiB
# measured), at most 9; 12 for the sweep). STEPS 'auto': the first PARALLEL jobs run 12 steps at once as a probe,
# and the longest schedule that lets every wave of the queue finish inside BUDGET_S (default 575) is chosen from
# the probe's step time and start-up time (85 % of the estimate). Processes still running at BUDGET_S are stopped;
# a stopped comparison keeps its finished runs (runs/*.json), which benchmarks/cifar_table.py reads.
# MAX_STEPS caps an 'auto' schedule; ONLY="fp32-s0 alq-s0 ..." keeps those table runs, in that order. Writes OUT/*.md|json|png and OUT/plan.txt (probe, timings, GPU memory).
set -u
export PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src
WHAT=$1; SRC=$2; R=$3; STEPS=$4; P=${5:-auto}; BUDGET=${6:-575}; AMP=${7:-none}; BATCH=${BATCH:-128}
T0=$(date +%s); mkdir -p $R
if [[ $SRC == *.npz ]]; then python benchmarks/pack_cifar10.py unpack $SRC /tmp/c10 > $R/unpack.log 2>&1; DATA=/tmp/c10; else DATA=$SRC; fi
python -c "from alq_torch.train.data import load_data; load_data('cifar10', data_dir='$DATA')" > $R/decode.log 2>&1
JOBS=$R/jobs.txt; : > $JOBS
if [ "$WHAT" = table ]; then
  MODEL="--model resnet32 --bits 3 --bucket-size 16384"
  for s in 0 1; do for m in fp32 qsgdinf alq amq nuqsgd alq-einf; do echo "--methods $m --seeds $s --out $R/runs/$m-s$s"
    [ $s = 0 ] && [ $m = alq-einf ] && for n in alq-n amq-n; do echo "--methods $n --seeds 0 --out $R/runs/$n-s0"; done
  done; done >> $JOBS
  echo "--methods trn --seeds 0 --out $R/runs/trn-s0" >> $JOBS
  echo "--exact-1d --methods alq --seeds 0 --out $R/runs/alq-1d-s0" >> $JOBS
  for m in alq-e qsgd; do echo "--methods $m --seeds 0 --out $R/runs/$m-s0"; done >> $JOBS
  PMAX=9
else
  MODEL="--model resnet8 --seeds 0"
  M=qsgdinf,alq-einf,alq,amq,nuqsgd,trn,alq-n,amq-n,alq-e,qsgd
  echo "--bits 3 --bucket-size 8192 --methods fp32 --out $R/bucket/fp32" >> $JOBS
  for d in 128 32768 2048 512 8192; do echo "--bits 3 --bucket-size $d --methods $M --out $R/bucket/d$d"; done >> $JOBS
  for b in 2 4 8 6; do echo "--bits $b --bucket-size 8192 --methods $M --out $R/bits/b$b"; done >> $JOBS
  for d in 128 2048 32768; do echo "--bits 3 --bucket-size $d --clip 2.5 --methods $M --out $R/clip/d$d"; done >> $JOBS
  PMAX=12
fi
if [ -n "${ONLY:-}" ]; then  # e.g. ONLY="fp32-s0 alq-s0": those runs of the table, in that order
  for o in $ONLY; do grep -- "--out $R/runs/$o\$" $JOBS; done > $JOBS.only; mv $JOBS.only $JOBS
fi
if [ "$P" = auto ]; then
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  P=$(( MEM / 14336 )); [ $P -gt $PMAX ] && P=$PMAX; [ $P -lt 1 ] && P=1
fi
echo "$WHAT: data ready after $(( $(date +%s) - T0 )) s; $(wc -l < $JOBS) jobs, $P processes, amp $AMP" > $R/plan.txt
BASE="--data cifar10 --data-dir $DATA --workers 16 --batch-size $BATCH --no-progress --no-plots --amp $AMP $MODEL"
BASE+=" --update-steps 0,25,100 --update-every 200"
# one log per job, named after its output directory; a queue runs in its own session (its PID names the process
# group that is stopped as one)
queue() { exec setsid xargs -P $P -I{} sh -c 'o=$(echo "{}" | sed "s/.*--out //"); mkdir -p $(dirname $o); python -u -m alq_torch.train $0 {} > $o.log 2>&1' "$1" < $2; }
if [ "$STEPS" = auto ]; then
  head -n $P $JOBS | sed "s#--out $R/#--out $R/probe/#" > $R/probe_jobs.txt
  TP=$(date +%s); timeout 240 bash -c "$(declare -f queue); P=$P; queue \"$BASE --steps 12 --log-every 6 --eval-every 12\" $R/probe_jobs.txt"
  pkill -f "$R/probe/"; sleep 1
  STEPS=$(python - $R/probe $(( $(date +%s) - TP )) $(( BUDGET - 20 - $(date +%s) + T0 )) $(wc -l < $JOBS) $P <<'PY'
import collections, glob, json, math, sys
d, wall, left, n, p = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
jobs = collections.defaultdict(float)  # a job's runs (its methods) run one after the other
for f in glob.glob(d + "/**/runs/*.json", recursive=True):
    jobs[f.rsplit("/runs/", 1)[0]] += json.load(open(f))["train_seconds"]
step = max(jobs.values()) / 12
start = max(0.0, wall - max(jobs.values()))
waves = math.ceil(n / p)
print(max(10, int(0.85 * (left - waves * (start + 10)) / (waves * step))))
PY
)
  echo "probe: $P processes x 12 steps in $(( $(date +%s) - TP )) s -> ${STEPS:-no estimate} steps" >> $R/plan.txt
  [ -n "$STEPS" ] || { echo "the probe finished no run (see $R/probe/*/*.log); stopping" >> $R/plan.txt; cat $R/plan.txt; exit 1; }
  rm -rf $R/probe/*/*/checkpoints
  [ -n "${MAX_STEPS:-}" ] && [ $STEPS -gt $MAX_STEPS ] && STEPS=$MAX_STEPS
fi
E=$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))
COMMON="$BASE --steps $STEPS --log-every $E --eval-every $E"
(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > $R/gpu_use.txt 2>&1) & SMI=$!
queue "$COMMON" $JOBS &
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
