#!/usr/bin/env bash
# Train, evaluate and export the testbed model on one CUDA GPU in a single command of under 10 minutes:
#   bash scripts/train_testbed_gpu.sh [RUN_DIR [--set KEY=VALUE ...]]      (default runs/testbed-gpu)
# The recipe is the default one with 8x larger batches (--batch-scale 8), batches rendered by 12 worker processes,
# and the language-model stage's length planned so training ends FIT_MINUTES (default 7) after it starts. Then
# the 500-scene held-out evaluation and the export (RUN_DIR/export, what `vlmprune testbed export` ships); when
# $OUT is set (the device tool), the export is also packed into $OUT/checkpoint.tar with the logs beside it.
# Environment: PYTHON (default python3), DEVICE (default cuda), WORKERS, SCALE, FIT_MINUTES; vlmprune runs from
# src/ (no install). Arguments after RUN_DIR go to `testbed train` (a smoke test: DEVICE=cpu with a tiny --set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
run=${1:-runs/testbed-gpu}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
vlmprune() { "$py" -m vlmprune.cli.main "$@"; }
"$py" - <<'PY'
import platform, torch, transformers
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, {name}")
PY
started=$(date +%s)
vlmprune testbed train --out "$run" --device "${DEVICE:-cuda}" --workers "${WORKERS:-12}" --batch-scale "${SCALE:-8}" \
    --fit-minutes "${FIT_MINUTES:-7}" --set lm_eval_every_images=40000 --set vision_eval_every_images=24000 \
    --set log_every_steps=400 "${@:2}"   # a log line every 50 steps of 8x batches: reading metrics waits for the GPU
echo "training took $(( $(date +%s) - started )) s"
vlmprune testbed eval --model "$run/model" --limit 500 --json "$run/eval_500.json" --no-progress
vlmprune testbed export --run "$run" --dest "$run/export"
if [[ -n "${OUT:-}" ]]; then
    tar -C "$run/export" -cf "$OUT/checkpoint.tar" .
    cp "$run/eval_500.json" "$run/log.jsonl" "$run/command.txt" "$OUT/"
fi
echo "done in $(( $(date +%s) - started )) s"
