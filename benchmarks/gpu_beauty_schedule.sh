#!/usr/bin/env bash
# The Beauty default (beauty-cf-item-head) on one lent GPU: three seeds side by side, each with
# TRAIN_S seconds of training (the schedule planned to that budget, validation every 2 epochs),
# then the full evaluation and export. Everything it writes (logs, training curves, figures)
# ends up in $OUT/beauty_gpu.tar.gz. Needs .cache/ with the Beauty SASRec artifact (the codes'
# input); the text path uses the hashing encoder, as the GPU machine has no MiniLM weights.
#   OUT=/tmp/out TRAIN_S=330 DEVICE=cuda bash benchmarks/gpu_beauty_schedule.sh
set -u
OUT=${OUT:-/tmp/genrec-gpu-out}
TRAIN_S=${TRAIN_S:-330}
DEADLINE_S=${DEADLINE_S:-560}  # everything still running then is stopped and what exists is packed
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-"0 1 2"}
CONFIG=${CONFIG:-beauty-cf-item-head}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/genrec-gpu.XXXX)
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

start=$SECONDS
{ nvidia-smi || true; } > "$WORK/logs/nvidia-smi.txt" 2>&1
$PY -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)" > "$WORK/logs/versions.txt" 2>&1
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/logs/gpu_use.csv" 2>&1 &
  monitor=$!
fi
pids=()
for seed in $SEEDS; do
  # shellcheck disable=SC2086
  $PY -m training pipeline --config "$CONFIG" --seed "$seed" --models-dir "$WORK/models" \
    --set train.device="$DEVICE" train.max_train_seconds="$TRAIN_S" train.epochs=400 text_encoder=hashing-384 \
    choose_item_head_candidates=true $EXTRA > "$WORK/logs/seed$seed.log" 2>&1 &
  pids+=($!)
done
while [ $((SECONDS - start)) -lt "$DEADLINE_S" ]; do
  running=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && running=1; done
  [ $running = 0 ] && break
  sleep 5
done
for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null && echo "stopped $pid at the deadline" >> "$WORK/logs/deadline.txt"; done
[ -n "${monitor:-}" ] && kill "$monitor" 2> /dev/null
echo "elapsed $((SECONDS - start)) s" >> "$WORK/logs/versions.txt"
# Bundles stay behind (large); their figures are in runs/.
tar czf "$OUT/beauty_gpu.tar.gz" -C "$WORK" logs $( [ -d "$WORK/runs" ] && echo runs )
grep -h '^| beauty' "$WORK"/runs/results.md 2> /dev/null || true
for log in "$WORK"/logs/seed*.log; do  # progress bars (carriage returns) out, long lines cut
  echo "== $log"; tr '\r' '\n' < "$log" | grep -v 'it/s' | tail -n 6 | cut -c1-600
done
