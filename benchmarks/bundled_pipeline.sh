#!/usr/bin/env bash
# The bundled model refreshed end to end on one GPU: continued training from the shipped checkpoint, the
# accuracy/convergence report, then Learn2PD (collect, filter, tau on validation, test tables).
#
#   PYTHONPATH=. bash benchmarks/bundled_pipeline.sh runs/pipe 8      # output folder, training minutes
#
# Environment: LR (1e-3), PROBLEMS (400000), FIRST_PROBLEM (0: the first training seed; set it past the
# problems of earlier runs to continue on fresh ones), TRAIN_PROMPTS (2000, for the filter), TAUS.
set -euo pipefail
out=${1:?usage: bundled_pipeline.sh OUT_DIR [TRAIN_MINUTES]}
minutes=${2:-12}
mkdir -p "$out"
python3 -m l2pd.demo.train_model --out "$out/model" --init l2pd/demo/assets/model --minutes "$minutes" \
  --lr "${LR:-1e-3}" --warmup 200 --problems "${PROBLEMS:-400000}" --first-problem "${FIRST_PROBLEM:-0}" \
  --no-compile --checkpoint-minutes 3 >"$out/train.log" 2>&1
python3 benchmarks/bundled_model_report.py --model "$out/model" --problems 500 --batch 500 >"$out/report.log" 2>&1
python3 benchmarks/learn2pd_bundled.py --model "$out/model" --out "$out/l2" --collect-dir "$out/collect" \
  --train-prompts "${TRAIN_PROMPTS:-2000}" --filter-device cuda --batch 500 --val-problems 200 \
  --taus "${TAUS:-0.98,0.995,0.998,0.999}" --gen-lengths 256,1024 --test-problems 500 --batch1-problems 3 \
  >"$out/l2.log" 2>&1
touch "$out/done"
