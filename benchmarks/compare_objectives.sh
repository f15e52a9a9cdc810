#!/usr/bin/env bash
# NTM against its baselines on the same `small` backbone at equal compute (issue 3), then one
# table and plot. Each objective gets 900 CPU-seconds of one thread, converted to steps with the
# per-step CPU cost measured side by side (process_time, batch 64, pairwise): ntm 1.20 s,
# gaussian 0.95 s, fm 0.88 s. About 50 minutes of one core for training, 30 for the evals.
#   bash benchmarks/compare_objectives.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cmp}
N=.venv/bin/ntm-edge
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
train() { $N train --dataset mnist5k --preset small --text-encoder labels --objective "$1" --steps "$2" --batch-size 64 \
            --checkpoint-every 100000 --out "$OUT/$1" --seed 0; }
train fm 1025
train gaussian 950
train ntm 750
ev() { $N eval --checkpoint "$OUT/$1" --num-samples 500 --out "$OUT/$2.json" "${@:3}"; }
ev ntm ntm --steps 4 --steps 8 --steps 16
ev gaussian gaussian --steps 4
ev fm fm --steps 4 --steps 8 --steps 16
ev fm fm_fine --steps 32 --steps 64
$N compare "$OUT"/ntm.json "$OUT"/gaussian.json "$OUT"/fm.json "$OUT"/fm_fine.json \
    --out "$OUT/table.md" --plot "$OUT/table.png"
