#!/usr/bin/env bash
# The bundled LLaDA2-format model end to end on one GPU: upcycled from the bundled LLaDA-format model (its MLPs
# split into a shared and routed experts), trained by block diffusion, then Learn2PD (collect at block 32, a
# shared filter, tau chosen on validation problems with EoTP) and the held-out table.
#
#   PYTHONPATH=. bash benchmarks/bundled_llada2.sh runs/llada2 2.5      # output folder, training minutes
#
# Environment: LR (1e-3), PROBLEMS (60000), FIRST_PROBLEM (800000: seeds no bundled model trained on),
# TRAIN_PROMPTS (1000, for the filter), VAL (300 validation problems for tau), TEST (500 held-out problems),
# DEVICE (cuda; where the filter trains), COPY (a folder that gets the model, the filter and the table as they
# are made).
set -euo pipefail
out=${1:?usage: bundled_llada2.sh OUT_DIR [TRAIN_MINUTES]}
minutes=${2:-2.5}
copy=${COPY:-$out/copy}
mkdir -p "$out" "$copy/model/filter"
l2pd() { python3 -m l2pd "$@"; }
python3 -m l2pd.demo.train_model --family llada2 --from-dense l2pd/demo/assets/model --out "$out/model" \
  --minutes "$minutes" --lr "${LR:-1e-3}" --warmup 100 --problems "${PROBLEMS:-60000}" \
  --first-problem "${FIRST_PROBLEM:-800000}" --no-compile
cp "$out/model/config.json" "$out/model/model.safetensors" "$out/model/training.json" "$copy/model/"
l2pd collect --model "$out/model" --out "$out/collect" --num-prompts "${TRAIN_PROMPTS:-1000}" --batch-size 500 \
  --block-length 32
l2pd train-filter --data "$out/collect" --out "$out/model/filter" --kind shared --hidden 32 --device "${DEVICE:-cuda}"
l2pd tune --model "$out/model" --filter "$out/model/filter" --problems "${VAL:-300}" --batch-size "${VAL:-300}" \
  --eotp accepted \
  --taus 0.9,0.95,0.98,0.99,0.995
cp "$out/model/filter/filter.json" "$out/model/filter/filter.safetensors" "$copy/model/filter/"
test=${TEST:-500}
{
  l2pd eval --model "$out/model" --problems "$test" --batch-size "$test" --json
  l2pd eval --model "$out/model" --problems "$test" --batch-size "$test" --strategy steps --block-length 32 --json
  for tau in 0.9 0.95 0.98; do
    l2pd eval --model "$out/model" --problems "$test" --batch-size "$test" --strategy threshold --threshold "$tau" \
      --block-length 32 --eotp accepted --json
  done
} | tee "$copy/eval.jsonl"
