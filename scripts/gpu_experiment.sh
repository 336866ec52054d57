#!/usr/bin/env bash
# The whole demo pipeline and the headline experiment (3 seeds each way, a 5-member ensemble) at a GPU
# budget on one CUDA GPU: bf16, budgets in steps, every command under 10 minutes and 15 minutes in all.
#   scripts/gpu_experiment.sh [--dry-run]   run (log: runs/<scale>/gpu_experiment.log); --dry-run prints the commands
# Environment: PY (default .venv/bin/python), SCALE (default demo), STEPS (experiment runs, default 1500),
# TOTAL_S (default 900). The stages keep their configs' step budgets; their time limits are lifted.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") DRY="" ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
PY=${PY:-.venv/bin/python}
SCALE=${SCALE:-demo}
STEPS=${STEPS:-1500}
TOTAL_S=${TOTAL_S:-900}
PER_CMD_S=600
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
GPU=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.max_time null
     --data.init_args.num_workers 4)
LOG=runs/$SCALE/gpu_experiment.log
START=$SECONDS

run() {  # one command under min(10 min, what is left of the total)
  local left=$(( TOTAL_S - (SECONDS - START) ))
  local limit=$(( left < PER_CMD_S ? left : PER_CMD_S ))
  echo "+ timeout $limit $*"
  [[ -n $DRY ]] && return 0
  if (( limit <= 0 )); then echo "[gpu_experiment] out of time (${TOTAL_S}s in all)" >&2; exit 124; fi
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
}

[[ -n $DRY ]] || mkdir -p "runs/$SCALE"
CKPT=runs/$SCALE/dynamics/checkpoints/best.ckpt
SHARDS=data_shards/metaworld/$SCALE
run "$PY" -m whale_pl.data.cli metaworld --config "stages/$SCALE/data.yaml" --workers 8
run "$PY" -m whale_pl.pipeline tokenizer --scale "$SCALE" -- "${GPU[@]}"
run "$PY" -m whale_pl.pipeline behavior --scale "$SCALE" -- "${GPU[@]}"
run "$PY" -m whale_pl.pipeline dynamics --scale "$SCALE" -- "${GPU[@]}"
run "$PY" -m whale_pl.eval_cli video --ckpt "$CKPT" --shards "$SHARDS" --num-clips 16 --clip-len 12 --device cuda \
  --out "runs/$SCALE/video_metrics.json"
run "$PY" -m whale_pl.eval_cli gifs --ckpt "$CKPT" --shards "$SHARDS" --device cuda --out "runs/$SCALE/gifs"
run "$PY" -m whale_pl.experiment --scale "$SCALE" --seeds 3 --members 5 --steps "$STEPS" --device cuda --jobs 4 \
  --fit-args "${GPU[@]}"
run "$PY" -m whale_pl.report --scale "$SCALE"
echo "[gpu_experiment] $(( SECONDS - START ))s in all"
