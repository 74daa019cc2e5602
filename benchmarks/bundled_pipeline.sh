#!/usr/bin/env bash
# The bundled model refreshed end to end on one GPU: continued training from the shipped checkpoint, the
# accuracy/convergence report, then Learn2PD (collect, filter, tau on validation, test tables).
#
#   PYTHONPATH=. bash benchmarks/bundled_pipeline.sh runs/pipe 12      # output folder, training minutes
set -euo pipefail
out=${1:?usage: bundled_pipeline.sh OUT_DIR [TRAIN_MINUTES]}
minutes=${2:-12}
mkdir -p "$out"
python3 -m l2pd.demo.train_model --out "$out/model" --init l2pd/demo/assets/model --minutes "$minutes" \
  --lr 1e-3 --warmup 200 --problems 400000 --no-compile --checkpoint-minutes 3 >"$out/train.log" 2>&1
python3 benchmarks/bundled_model_report.py --model "$out/model" --problems 500 --batch 500 >"$out/report.log" 2>&1
python3 benchmarks/learn2pd_bundled.py --model "$out/model" --out "$out/l2" --collect-dir "$out/collect" \
  --train-prompts 2000 --filter-device cuda --batch 500 --batch1-problems 10 >"$out/l2.log" 2>&1
touch "$out/done"
