#!/bin/sh
# Trains the demo RecurrentGemma bundled in src/rgemma/demo/ and installs it there.
#
#   scripts/train_demo.sh [RUN_DIR]        (PYTHON=... to pick the interpreter)
#
# Corpus: the .py sources of the running Python's standard library (PSF
# licence), without test suites, codec tables (encodings/) and pydoc_data/.
# 5% of the files (by a hash of their path) are held out for evaluation.
# Deterministic: seed 0, one CPU thread (thread count changes float sums).
set -eu
PYTHON=${PYTHON:-python}
RUN=${1:-runs/demo}
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

"$PYTHON" -m rgemma train \
    --data "$STDLIB" --extensions .py \
    --exclude test tests idle_test encodings pydoc_data \
    --eval-fraction 0.05 --vocab-size 4096 \
    --width 256 --layers 6 --heads 2 --mlp-width 768 --window 256 \
    --seq-len 256 --batch-size 8 --steps 600 \
    --lr 2e-3 --warmup 50 --min-lr 0.1 --weight-decay 0.1 --clip 1.0 \
    --eval-every 100 --eval-tokens 16384 --save-every 100 --keep 2 \
    --seed 0 --threads 1 --no-progress --out "$RUN"

# Copies the exported model into the package and writes MODEL_CARD.md.
"$PYTHON" "$(dirname "$0")/build_demo.py" "$RUN"
