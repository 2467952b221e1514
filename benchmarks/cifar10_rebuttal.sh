#!/bin/bash
# The paper's CIFAR-10 experiments on one GPU, as a queue of alq-train processes sharing it.
#
#   bash benchmarks/cifar10_rebuttal.sh table DATA OUT STEPS [PARALLEL] [BUDGET_S] [AMP]
#   bash benchmarks/cifar10_rebuttal.sh sweep DATA OUT STEPS [PARALLEL] [BUDGET_S]
#   STATE=dir bash benchmarks/cifar10_rebuttal.sh long DATA OUT STEPS [PARALLEL] [BUDGET_S] [AMP]
#
# table: the rebuttal table (ResNet-32, 3 bits, bucket 16384, K = 16 x 128 images): two seeds of fp32, QSGDinf,
#        ALQ, AMQ, NUQSGD, alq-einf, one of ALQ-N, AMQ-N, TernGrad and ALQ with 1-D tensors exact, then alq-e and
#        QSGD (18 runs), one process per run, seed 0 of the main methods first.
# sweep: ResNet-8 (K = 16 x BATCH, default 128), one process per (setting, method), most telling first: bucket
#        128 ... 32768 at 3 bits, bits 2 ... 8 at bucket 8192, and the bucket sweep with TernGrad's 2.5-sigma clipping
#        for every method (the rebuttal's Fig. 1); fp32 once. Runs are named GROUP/SETTING-METHOD (bucket/d128-alq,
#        bits/b2-amq, clip/d32768-qsgdinf, ...); ONLY="..." keeps those, in that order (the rest of an interrupted
#        sweep in a later call).
# long:  table runs (default: seeds 0 and 1 of fp32, QSGDinf, ALQ, AMQ, NUQSGD) at a schedule longer than one call,
#        continued across calls: their output directories and checkpoints (every CKPT steps, default 50)
#        live under STATE; a call resumes each unfinished run from its last checkpoint, trains until BUDGET_S, and
#        packs each run under way as OUT/<run>.tgz, the finished ones (without checkpoints) as OUT/finished.tgz
#        (unpack them all into STATE/runs before the next call, and carry STATE), the rest (plan, tables, logs) as
#        OUT/summary.tgz. With more runs than PARALLEL, the later ones start as the earlier ones finish.
# DATA: data/cifar10-images.npz (benchmarks/pack_cifar10.py) or a CIFAR-10 directory. PARALLEL processes run at
# once ('auto', the default: as many as GPU memory holds at 14 GiB per ResNet-32 process at K = 16 x 128 (12.2 GiB
# measured, 64 GiB peak for five), at most 9; for the sweep 6 GiB per ResNet-8 process (an estimate), at most 12).
# Measured on one H100 in fp32: five ResNet-32 processes at K = 16 x 128 take 0.40-0.45 s per step each, plus ~15 s
# to start and ~1 s per evaluation; budget STEPS from that. Processes still running at BUDGET_S (default 575) are stopped; a stopped comparison keeps its
# finished runs (runs/*.json), which benchmarks/cifar_table.py reads. ONLY="fp32-s0 alq-s0 ..." keeps those table
# runs, in that order. Writes OUT/*.md|json|png and OUT/plan.txt (timings, GPU memory).
set -u
export PYTHONPATH=packages/alq-core/src:packages/alq-torch/src:packages/alq-cupy/src
WHAT=$1; SRC=$2; R=$3; STEPS=$4; P=${5:-auto}; BUDGET=${6:-575}; AMP=${7:-none}; BATCH=${BATCH:-128}
T0=$(date +%s); mkdir -p $R
if [[ $SRC == *.npz ]]; then python benchmarks/pack_cifar10.py unpack $SRC /tmp/c10 > $R/unpack.log 2>&1; DATA=/tmp/c10; else DATA=$SRC; fi
python -c "from alq_torch.train.data import load_data; load_data('cifar10', data_dir='$DATA')" > $R/decode.log 2>&1
RUNS=$R/runs; EXTRA=""
if [ "$WHAT" = long ]; then
  RUNS=${STATE:?long needs STATE=dir (the runs carried from call to call)}/runs; EXTRA="--checkpoint-every ${CKPT:-50}"
  ONLY=${ONLY:-fp32-s0 qsgdinf-s0 alq-s0 amq-s0 nuqsgd-s0 fp32-s1 qsgdinf-s1 alq-s1 amq-s1 nuqsgd-s1}
fi
JOBS=$R/jobs.txt; : > $JOBS
if [ "$WHAT" = sweep ]; then
  MODEL="--model resnet8 --seeds 0"
  M="qsgdinf alq amq nuqsgd alq-einf"  # TernGrad's two bits and its clip are its own: bucket sweep only
  bucket() { for m in $2; do echo "--bits 3 --bucket-size $1 --methods $m --out $RUNS/bucket/d$1-$m"; done; }
  bits() { for m in $2; do echo "--bits $1 --bucket-size 8192 --methods $m --out $RUNS/bits/b$1-$m"; done; }
  clip() { for m in $2; do echo "--bits 3 --bucket-size $1 --clip 2.5 --methods $m --out $RUNS/clip/d$1-$m"; done; }
  { echo "--bits 3 --bucket-size 8192 --methods fp32 --out $RUNS/bucket/d8192-fp32"
    for d in 128 32768 8192; do bucket $d "$M trn"; done; for b in 2 8; do bits $b "$M"; done; clip 32768 "$M"
    for d in 2048 512; do bucket $d "$M trn"; done; bits 4 "$M"; bits 6 "$M"; clip 128 "$M"; clip 2048 "$M"
    bits 5 "$M"; bits 7 "$M"; for d in 128 8192 32768; do bucket $d "alq-n amq-n"; done; } >> $JOBS
  PMAX=12; GIB=6  # a ResNet-8 process at K = 16 x 128
else
  MODEL="--model resnet32 --bits 3 --bucket-size 16384"
  for s in 0 1; do for m in fp32 qsgdinf alq amq nuqsgd alq-einf; do echo "--methods $m --seeds $s --out $RUNS/$m-s$s"
    [ $s = 0 ] && [ $m = alq-einf ] && for n in alq-n amq-n; do echo "--methods $n --seeds 0 --out $RUNS/$n-s0"; done
  done; done >> $JOBS
  echo "--methods trn --seeds 0 --out $RUNS/trn-s0" >> $JOBS
  echo "--exact-1d --methods alq --seeds 0 --out $RUNS/alq-1d-s0" >> $JOBS
  for m in alq-e qsgd; do echo "--methods $m --seeds 0 --out $RUNS/$m-s0"; done >> $JOBS
  PMAX=9; GIB=14
fi
if [ -n "${ONLY:-}" ]; then  # those runs, in that order
  for o in $ONLY; do grep -- "--out $RUNS/$o\$" $JOBS || { echo "ONLY: no run named '$o'; names are \
$(sed "s#.*--out $RUNS/##" $JOBS | tr '\n' ' ')" >&2; exit 2; }; done > $JOBS.only; mv $JOBS.only $JOBS
fi
if [ "$WHAT" = long ]; then  # a run with a config.json from an earlier call continues from its checkpoint
  while read -r line; do o=${line##*--out }
    if ls $o/runs/*.json > /dev/null 2>&1; then continue  # finished in an earlier call
    elif [ -f $o/config.json ]; then echo "--resume $o --out $o"; else echo "$line"; fi
  done < $JOBS > $JOBS.resume; mv $JOBS.resume $JOBS
fi
if [ "$P" = auto ]; then
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  P=$(( MEM / (GIB * 1024) )); [ $P -gt $PMAX ] && P=$PMAX; [ $P -lt 1 ] && P=1
fi
echo "$WHAT: data ready after $(( $(date +%s) - T0 )) s; $(wc -l < $JOBS) jobs, $P processes, $STEPS steps, amp $AMP" > $R/plan.txt
E=${EVAL:-$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))}
COMMON="--data cifar10 --data-dir $DATA --workers 16 --batch-size $BATCH --no-progress --no-plots --amp $AMP $MODEL"
COMMON+=" --update-steps 0,25,100 --update-every 200 --steps $STEPS --log-every $E --eval-every $E $EXTRA"
(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > $R/gpu_use.txt 2>&1) & SMI=$!
# one log per job (appended to by every call), named after its output directory; the queue runs in a session of
# its own, whose process group is stopped as one at the deadline
mkdir -p $RUNS; [ "$WHAT" = sweep ] && mkdir -p $RUNS/bucket $RUNS/bits $RUNS/clip
setsid xargs -P $P -I{} sh -c 'o=$(echo "{}" | sed "s/.*--out //"); python -u -m alq_torch.train $0 {} >> $o.log 2>&1' "$COMMON" < $JOBS &
Q=$!; STOP=$(( BUDGET - 20 ))
while kill -0 $Q 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $STOP ]; do sleep 2; done
kill -- -$Q 2>/dev/null; sleep 1; kill $SMI 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s; peak GPU memory (MiB, util) $(sort -n $R/gpu_use.txt 2>/dev/null | tail -1)" >> $R/plan.txt
# cifar_table.py OUT DIRS...: only directories holding finished runs; nothing when there are none
table() { local out=$1; shift; local ds=(); for d in "$@"; do ls $d/runs/*.json > /dev/null 2>&1 && ds+=($d); done
  if [ ${#ds[@]} -gt 0 ]; then python benchmarks/cifar_table.py $out "${ds[@]}" "${TABLE_ARGS[@]}"; else echo "$out: no finished runs"; fi; }
if [ "$WHAT" = sweep ]; then
  TABLE_ARGS=(--group-by bucket_size); table $R/sweep_bucket $RUNS/bucket/*/ > $R/table.txt 2>&1
  B3=(); for m in fp32 $M; do B3+=($RUNS/bucket/d8192-$m); done  # the 3-bit column: not TernGrad, ALQ-N, AMQ-N
  TABLE_ARGS=(--group-by bits); table $R/sweep_bits $RUNS/bits/*/ "${B3[@]}" >> $R/table.txt 2>&1
  TABLE_ARGS=(--group-by bucket_size); table $R/sweep_bucket_clip $RUNS/clip/*/ >> $R/table.txt 2>&1
else
  TABLE_ARGS=(--paper rebuttal-k16 --title "ResNet-32, CIFAR-10 (JPEG tree), 3 bits, bucket 16384, K=16, $STEPS steps")
  table $R/cifar10_resnet32_k16 $RUNS/* > $R/table.txt 2>&1
fi
if [ "$WHAT" = long ]; then  # where each run stands, then one archive per run (checkpoints included)
  python - $RUNS $ONLY >> $R/plan.txt <<'PY'
import glob, sys
from alq_torch.train.loop import _load_checkpoint
for o in sys.argv[2:]:
    ck = glob.glob(f"{sys.argv[1]}/{o}/checkpoints/*.pt")
    if glob.glob(f"{sys.argv[1]}/{o}/runs/*.json"):
        print(f"{o}: finished (its accuracy is in the table below)")
        continue
    st = _load_checkpoint(ck[0])["state"] if ck else {}
    acc = [h["val_acc"] for h in st.get("history", []) if "val_acc" in h]
    print(f"{o}: step {st.get('step', 0)}, val acc {acc[-1] if acc else float('nan'):.4f}")
PY
  # a run still under way as OUT/<run>.tgz (checkpoints included), the finished ones without checkpoints as one
  # OUT/finished.tgz, runs not started yet not at all: at most PARALLEL + 2 files
  FIN=()
  for o in $ONLY; do [ -d $RUNS/$o ] || continue
    if ls $RUNS/$o/runs/*.json > /dev/null 2>&1; then rm -rf $RUNS/$o/checkpoints; FIN+=($o $o.log)
    else tar czf $R/$o.tgz -C $RUNS $o $o.log; fi
  done
  [ ${#FIN[@]} -gt 0 ] && tar czf $R/finished.tgz -C $RUNS "${FIN[@]}"
  cat $R/plan.txt $R/table.txt  # the rest as one archive: a device call returns at most 8 files
  tar czf /tmp/summary.$$.tgz -C $R --exclude='*.tgz' . && find $R -mindepth 1 ! -name '*.tgz' -delete
  mv /tmp/summary.$$.tgz $R/summary.tgz; exit 0
else
  rm -rf $RUNS/*/checkpoints $RUNS/*/*/checkpoints  # the table's runs and the sweep's GROUP/runs
fi
cat $R/plan.txt $R/table.txt
