#!/usr/bin/env bash
# One prepared GPU check (run from the repo root on a CUDA machine; SIZE=tiny for a quick CPU rehearsal).
# Trains random weights of the real shapes through sdtune's own training path and prints one JSON line per
# setting (bench/train_bench.py). The settings follow issue 5's reference rows: SD1.5 512 px batch 1 and 4
# (fp16 + 8-bit AdamW), batch 16 bf16 with torch.compile, SDXL 1024 px batch 1 with gradient checkpointing.
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
run() { PYTHONUNBUFFERED=1 python3 bench/train_bench.py "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -E '^\{|rror|pre-flight' ; }
run --family sd15 --size "$SIZE" --batch-size 1 --steps "$STEPS" --warmup 10 --mixed-precision fp16 --optimizer adamw8bit --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 4 --steps 50 --warmup 10 --mixed-precision fp16 --optimizer adamw8bit --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 1 --steps "$STEPS" --warmup 10 --mixed-precision bf16 --optimizer adamw --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 16 --steps 30 --warmup 15 --mixed-precision bf16 --optimizer adamw --compile --workdir "$W/sd15"
run --family sd15 --size "$SIZE" --batch-size 1 --steps "$STEPS" --warmup 15 --mixed-precision bf16 --optimizer adamw --compile --compile-mode reduce-overhead --workdir "$W/sd15"
run --family sdxl --size "$SIZE" --batch-size 1 --steps 20 --warmup 5 --mixed-precision fp16 --optimizer adamw8bit --gradient-checkpointing --workdir "$W/sdxl"
# a 4-image SD1.5 grid at 30 steps, as `sdtune sample` renders it (load included)
PYTHONUNBUFFERED=1 python3 bench/sample_bench.py --family sd15 --size "$SIZE" --steps 30 --seeds 4 --batch-size 4 --dtype fp16 --workdir "$W/sd15-sample" 2>&1 | tee -a "$OUT/bench.log" | grep -E '^\{|rror'
