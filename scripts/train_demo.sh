#!/bin/sh
# Trains the demo RecurrentGemma bundled in src/rgemma/demo/ and installs it there.
#
#   scripts/train_demo.sh [RUN_DIR]        (PYTHON=... to pick the interpreter)
#
# Corpus: the .py sources of the running Python's standard library (PSF
# licence), without test suites, codec tables (encodings/) and pydoc_data/.
# 5% of the files (by a hash of their path) are held out for evaluation.
# 14M parameters, 3000 steps of 8 x 512 tokens: hours on 2 CPU threads. Run it
# again after a stop and it resumes from the last checkpoint in RUN_DIR.
# Deterministic for a given thread count (seed 0, 2 threads; another count
# changes float sums, so the numbers differ slightly).
set -eu
PYTHON=${PYTHON:-python}
RUN=${1:-runs/demo}
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
RESUME=""
if ls "$RUN"/checkpoints/step-*.pt >/dev/null 2>&1; then RESUME="--resume"; fi

"$PYTHON" -m rgemma train \
    --data "$STDLIB" --extensions .py \
    --exclude test tests idle_test encodings pydoc_data \
    --eval-fraction 0.05 --vocab-size 8192 \
    --width 384 --layers 6 --heads 3 --mlp-width 1152 --window 512 \
    --seq-len 512 --batch-size 8 --steps 3000 \
    --lr 2e-3 --warmup 150 --min-lr 0.1 --weight-decay 0.1 --clip 1.0 \
    --eval-every 250 --eval-tokens 65536 --save-every 50 --keep 2 \
    --seed 0 --threads 2 --no-progress --export-dtype bfloat16 --out "$RUN" $RESUME

# Copies the exported model into the package and writes MODEL_CARD.md.
"$PYTHON" "$(dirname "$0")/build_demo.py" "$RUN"
