#!/usr/bin/env bash
# One GPU session's checks, in order (run from the repository root on the GPU machine; the
# README's GPU section says how). Writes logs and a GPU-trained adapter under $OUT (default
# ./gpu-out). SERVE_ARGS / TRAIN_ARGS pass options to each gpu_check.py run, SERVE_SECONDS /
# TRAIN_SECONDS bound them, SKIP_CLI=1 leaves out step 2.
#   1. benchmarks/gpu_check.py: serving and training speed, both configs; then every decoder
#      family the lean forward runs, at the 135M config's sizes (FAMILY_SECONDS bounds it);
#   2. the CLI on the GPU: train on a random-init 135M model saved to a folder, then generate and
#      eval with the adapter, all with --device cuda (the adapter comes back to be loaded on a CPU).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Serving and training in separate processes: a failure in one leaves the other's GPU state clean.
timeout "${SERVE_SECONDS:-300}" python3 benchmarks/gpu_check.py --skip-train ${SERVE_ARGS:-} \
    2>"$OUT/serve.err" | tee "$OUT/serve.jsonl"
tail -3 "$OUT/serve.err"
timeout "${FAMILY_SECONDS:-240}" python3 benchmarks/gpu_check.py --configs 135M --skip-serve \
    --skip-train --families llama mistral qwen2 qwen3 gemma2 gemma3_text phi3 \
    2>"$OUT/families.err" | tee "$OUT/families.jsonl"
tail -3 "$OUT/families.err"
timeout "${TRAIN_SECONDS:-300}" python3 benchmarks/gpu_check.py --skip-serve ${TRAIN_ARGS:-} \
    2>"$OUT/train.err" | tee "$OUT/train.jsonl"
tail -3 "$OUT/train.err"
[ -n "${SKIP_CLI:-}" ] && exit 0
python3 - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from gpu_check import CONFIGS, build_model, tokenizer_for
import torch
model = build_model(CONFIGS["135M"], torch.device("cpu"), torch.float32)
model.save_pretrained("/tmp/random-135m")
tokenizer_for(CONFIGS["135M"]["vocab_size"]).save_pretrained("/tmp/random-135m")
PY
sp() { python3 -c 'import sys; from softprompt.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
sp train --model /tmp/random-135m --device cuda --data examples:quotes --epochs 1 \
    --output "$OUT/quotes-gpu" --json 2>&1 | tail -3
sp eval --model /tmp/random-135m --device cuda --adapter "$OUT/quotes-gpu" \
    --data examples:quotes:heldout --json 2>&1 | tail -3
sp generate --model /tmp/random-135m --device cuda --adapter "$OUT/quotes-gpu" \
    --prompt "t5 t6 t7" --max-new-tokens 8 --json 2>&1 | tail -3
sp generate --device cpu --model /tmp/random-135m --dtype bfloat16 --prompt "t5" \
    --max-new-tokens 4 2>&1 | tail -2
ls -la "$OUT" "$OUT/quotes-gpu"
