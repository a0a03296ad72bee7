#!/usr/bin/env bash
# One prepared GPU check (run from the repo root on a CUDA machine; SIZE=tiny for a quick CPU rehearsal).
# Trains SD1.5-shaped random weights at 512 px through sdtune's own training path:
#   fp16 + 8-bit AdamW at batch 1 (10 warm-up + 100 timed steps) and batch 4, then bf16 + torch AdamW,
#   then SDXL-shaped weights at 1024 px, batch 1, gradient checkpointing, fp16 + 8-bit AdamW.
# Each line it prints is one JSON result from bench/train_bench.py.
set -uo pipefail
SIZE=${SIZE:-full}
STEPS=${STEPS:-100}
OUT=${OUT:-/tmp/sdtune-gpu-out}
W=${WORKDIR:-/tmp/sdtune-gpu}
mkdir -p "$OUT" "$W"
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 - <<'PY'
import importlib.metadata as m
print("versions:", ", ".join(f"{p} {m.version(p)}" for p in
      ["torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic"]))
PY
run() { PYTHONUNBUFFERED=1 python3 bench/train_bench.py "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -E '^\{|rror' ; }
run --family sd15 --size "$SIZE" --batch-size 1 --steps "$STEPS" --warmup 10 --mixed-precision fp16 --optimizer adamw8bit --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 4 --steps 50 --warmup 10 --mixed-precision fp16 --optimizer adamw8bit --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 1 --steps 50 --warmup 10 --mixed-precision bf16 --optimizer adamw --workdir "$W/sd15"
run --family sdxl --size "$SIZE" --batch-size 1 --steps 30 --warmup 10 --mixed-precision fp16 --optimizer adamw8bit --gradient-checkpointing --workdir "$W/sdxl"
