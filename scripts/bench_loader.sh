#!/usr/bin/env bash
# Reproducible loader benchmark behind the table in docs/loader.md: DALI vs DataLoader + Pillow.
#
#   scripts/bench_loader.sh [OUT_DIR]        (default bench-out/loader; git-ignored)
#
# 1. writes 1000 synthetic photo-like JPEGs (~440x350, quality 90, ~50 KB each; seed 0),
# 2. shards them twice with `kdkit shard folder`: as they are, and with --max-size 256,
# 3. runs `kdkit bench-loader` on both on the CPU backend (2 DALI threads vs 2 DataLoader
#    workers, batch 64, 224x224 random-resized-crop + flip + normalize, 3 alternating runs each),
#    once with kdkit's CPU resize operator (the default) and once with DALI's fn.resize,
# 4. where a GPU is visible: the GPU backend, and the ResNet-50 AMP training step it must feed.
# Each run prints its table and writes OUT_DIR/<name>.json. Environment overrides: IMAGES,
# THREADS, BATCH, BATCHES, REPEATS, KDKIT (the kdkit command).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out/loader}"
IMAGES="${IMAGES:-1000}" THREADS="${THREADS:-2}" BATCH="${BATCH:-64}" BATCHES="${BATCHES:-60}" REPEATS="${REPEATS:-3}"
KDKIT="${KDKIT:-.venv/bin/kdkit}"
PY="${PY:-.venv/bin/python}"

mkdir -p "$OUT"
if [ ! -d "$OUT/raw" ]; then
    "$PY" -m kdkit.bench.synthetic "$OUT/raw" --images "$IMAGES" --classes 10 --seed 0
fi
# 100 samples per shard so both loaders have several shards to spread over their workers
"$KDKIT" shard folder "$OUT/raw" "$OUT/shards" --name train --samples-per-shard 100 --quiet
"$KDKIT" shard folder "$OUT/raw" "$OUT/shards-256" --name train --samples-per-shard 100 --max-size 256 --quiet

common=(--batch-size "$BATCH" --threads "$THREADS" --size 224 --aug rrc-flip --batches "$BATCHES" --warmup 5
        --repeats "$REPEATS")
for set in shards shards-256; do
    echo; echo "== CPU backend, $set"
    "$KDKIT" bench-loader "$OUT/$set" "${common[@]}" --device cpu --json "$OUT/cpu-$set.json"
    echo; echo "== CPU backend, $set, DALI's fn.resize (--no-native-resize)"
    "$KDKIT" bench-loader "$OUT/$set" "${common[@]}" --device cpu --no-native-resize --json "$OUT/cpu-$set-fn-resize.json"
done

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # a GPU loader's host side (reading, JPEG parsing, the CPU share of decoding) wants every core
    GPU_THREADS="${GPU_THREADS:-$(nproc)}"
    for set in shards shards-256; do
        echo; echo "== GPU backend, $set (+ ResNet-50 AMP step)"
        "$KDKIT" bench-loader "$OUT/$set" --batch-size 256 --threads "$GPU_THREADS" --size 224 --aug rrc-flip \
            --batches "$BATCHES" --warmup 10 --repeats "$REPEATS" --device gpu --gpu-feed resnet50 \
            --json "$OUT/gpu-$set.json"
    done
else
    echo; echo "(no CUDA device: GPU backend and ResNet-50 feed comparison skipped)"
fi
