#!/usr/bin/env bash
# The default checkpoint's recipe, end to end, on 2 CPU cores (~65 min, of which the three-network reaction
# heads ~12; README "The model and its default checkpoint"). Writes runs/{corpus,shards,train,ablation},
# exports the default checkpoint and writes bench/results/eval/. Each step resumes or skips what is already
# there (the reaction stages start over).
set -euo pipefail
cd "$(dirname "$0")/.."
ES=${ES:-.venv/bin/echo-stream}
OUT=${OUT:-runs}
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
$ES corpus "$OUT/corpus" --conversations 24 --minutes 1.5 --seed 0 --quiet
say "corpus"
[ -f "$OUT/shards/dataset.json" ] || $ES preprocess "$OUT/corpus/manifest.jsonl" "$OUT/shards"
say "shards"
$ES train --shards "$OUT/shards" --out "$OUT/train" --stage 1 --config tiny --threads 2 --quiet
say "stage 1"
s1=$(ls -d "$OUT"/train/stage1/step-* | sort | tail -1)
# stage 2 of the model and of the entangled ablation side by side, one core each, from the same stage-1 weights
$ES train --shards "$OUT/shards" --out "$OUT/train" --stage 2 --config tiny --threads 1 \
    --quiet > "$OUT/stage2.log" 2>&1 &
p1=$!
$ES train --shards "$OUT/shards" --out "$OUT/ablation" --stage 2 --config tiny-entangled --init-from "$s1" \
    --threads 1 --quiet > "$OUT/ablation.log" 2>&1 &
p2=$!
wait $p1
wait $p2
say "stage 2 + ablation"
# the listener-reaction head (model/reactions.py) of both, the same recipe, everything else frozen
$ES train --shards "$OUT/shards" --out "$OUT/train" --stage reactions --init-from "$OUT/train/final" \
    --threads 1 --quiet --export default > "$OUT/reactions.log" 2>&1 &
p1=$!
$ES train --shards "$OUT/shards" --out "$OUT/ablation" --stage reactions --init-from "$OUT/ablation/final" \
    --threads 1 --quiet > "$OUT/ablation_reactions.log" 2>&1 &
p2=$!
wait $p1
wait $p2
say "reaction heads"
$ES eval --corpus "$OUT/corpus" --ablation "$OUT/ablation/reactions/final" --out bench/results/eval --quiet \
    > "$OUT/eval.log"
say "eval"
