#!/usr/bin/env bash
# Trains falconet-tiny, the embedded default model, on the King James Bible (public
# domain; Debian's bible-kjv-text). About 1.5-2 hours on a 2-core AVX2 CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d data/kjv ] || ./scripts/fetch_kjv.sh data/kjv
.venv/bin/falconet train data/kjv --out falconet/models/falconet-tiny --run-dir data/falconet-tiny.run \
  --variant 7b --vocab-size 8192 --hidden 256 --layers 6 --heads 4 --block-size 256 \
  --batch-size 16 --steps 2400 --lr 2e-3 --warmup 100 --min-lr-ratio 0.1 --weight-decay 0.1 \
  --clip 1.0 --eval-every 200 --checkpoint-every 100 --val-fraction 0.05 --seed 0 \
  --save-dtype bfloat16 "$@"
