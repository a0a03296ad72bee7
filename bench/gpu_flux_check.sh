#!/usr/bin/env bash
# The FLUX.1 family's CUDA path, in one short device call (issue #17): a tiny random FLUX model (the test
# suite's shapes) trained through `sdtune train` on the GPU in bf16 and fp16 mixed precision, with a
# checkpoint, a bitwise resume check and the sample grid, then `sdtune sample` on the result. It proves the
# device path (packing, ids, guidance, dtypes, offload of the frozen parts), not speed: real-size FLUX rows
# need the weights built on the GPU: FULL=1 below (random weights drawn on the GPU with `random-model --device`).
# Device call (carry [".whl"], made by `bash bench/device_wheels.sh`: diffusers, pydantic, bitsandbytes cut to
# CUDA 13, 16 MB), timeout_s 300 (FULL=1 alone: 600):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; bash bench/gpu_flux_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=${WORKDIR:-/tmp/flux-gpu}
mkdir -p "$OUT" "$W"
rm -rf "$W"/*
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
# The device image has no wordfreq, and its wheel (~50 MB with its word lists) does not fit a call's 64 MiB: a
# stand-in with no word lists (it only feeds the identifier warnings), said in the output.
python3 -c "import wordfreq" 2>/dev/null || { mkdir -p "$W/stub" && printf 'def available_languages(wordlist="best"):\n    return {}\n\n\ndef read_cBpack(path):\n    return []\n' > "$W/stub/wordfreq.py" && export PYTHONPATH="${PYTHONPATH:-}:$W/stub" && echo "wordfreq: a stand-in without word lists"; }
S="python3 -m sdtune"
$S random-model "$W/model" --family flux --size tiny || exit 1
common=(model.pretrained="$W/model" data.instance_dir=data/demo_toy data.identifier=sks data.resolution=64
        train.batch_size=2 train.report_to=none train.log_every=1 sample.steps=4 "sample.seeds=[0]"
        prior.class_dir="$W/class" prior.num_class_images=4)
# Run 3 (bench/RESULTS.md) went non-finite here on CUDA (bf16 at step 5, fp16 at step 1), finite on the CPU.
# First, runs that split the suspects, 12 steps each, losses printed: fp32 on CUDA (kernels alone), bf16 at a
# normal learning rate (1e-4: is it the recipe's 1e-2 on bf16?), bf16 with nothing cached or offloaded (the
# frozen parts' dtypes / moves), fp16 at 1e-4 (fp16 failed at the very first step: an overflow, not drift?)
bisect() {  # NAME OVERRIDES...
  local name=$1; shift
  $S train recipes/tiny_cpu.yaml "${common[@]}" train.max_steps=12 train.checkpoint_every=0 sample.every=0 \
    train.output_dir="$W/bisect-$name" "$@" 2>&1 | grep -E "^error|non-finite|not finite" | head -2
  python3 -c "import json,sys; l=[json.loads(x)['loss'] for x in open(sys.argv[1]) if x.strip()]; print(sys.argv[2], 'losses', [round(v, 3) if v == v else 'nan' for v in l])" \
    "$W/bisect-$name/losses.jsonl" "$name" 2>/dev/null || echo "$name: no losses written"
}
if [ "${BISECT:-1}" = 1 ]; then
  bisect fp32 train.mixed_precision=no
  bisect bf16-lr1e-4 train.mixed_precision=bf16 train.learning_rate=1e-4
  bisect bf16-uncached train.mixed_precision=bf16 train.cache_latents=false train.cache_text_embeddings=false train.offload_frozen=false
  bisect fp16-lr1e-4 train.mixed_precision=fp16 train.learning_rate=1e-4
  # the attention kernels: bf16 with PyTorch's math SDPA only (no flash / memory-efficient kernels)
  printf 'import runpy, sys, torch\nfor kernel in ("flash", "mem_efficient", "cudnn"):\n    getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(False)\nsys.argv[0] = "sdtune"\nrunpy.run_module("sdtune", run_name="__main__")\n' > "$W/math_sdpa.py"
  S_SAVED=$S
  S="python3 $W/math_sdpa.py"
  bisect bf16-math-sdpa train.mixed_precision=bf16
  S=$S_SAVED
  bisect bf16-nf4 train.mixed_precision=bf16 model.quantize=nf4 train.learning_rate=1e-4
fi
MPS=${MPS:-"bf16 fp16"}  # MPS=no BISECT=0: a CPU rehearsal of the rest
FIRST=${MPS%% *}
for mp in $MPS; do
  $S train recipes/tiny_cpu.yaml "${common[@]}" train.mixed_precision=$mp train.max_steps=20 \
    train.checkpoint_every=10 sample.every=10 train.output_dir="$W/run-$mp" 2>&1 | tail -4
  python3 - "$W/run-$mp" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
losses = [json.loads(l) for l in (run / "losses.jsonl").read_text().splitlines() if l.strip()]
print(run.name, "steps", len(losses), "first/last loss", losses[0].get("loss"), losses[-1].get("loss"),
      "files", sorted(p.name for p in run.glob("*.safetensors")), "grids", sorted(p.name for p in (run / "samples").glob("*.png")))
PY
done
# resume from step 10 of the bf16 run must give the straight run's LoRA bitwise
cp -r "$W/run-$FIRST" "$W/run-resume" && rm -rf "$W/run-resume/checkpoints/step-000020" "$W/run-resume"/*.safetensors
$S train recipes/tiny_cpu.yaml "${common[@]}" train.mixed_precision=$FIRST train.max_steps=20 train.checkpoint_every=10 \
  sample.every=10 train.output_dir="$W/run-resume" train.resume=latest 2>&1 | tail -2
python3 - "$W" "$FIRST" <<'PY'
import sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/run-{sys.argv[2]}/pytorch_lora_weights.safetensors"), load_file(f"{w}/run-resume/pytorch_lora_weights.safetensors")
print("resume bitwise:", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), len(a), "tensors")
PY
$S sample "$W/run-$FIRST" --prompt "a photo of sks toy" --seeds 0,1 --steps 4 --out "$W/grid.png" 2>&1 | tail -2
cp "$W/grid.png" "$OUT/flux_grid.png" 2>/dev/null; ls "$W"

# FULL=1: FLUX.1-dev at its real shapes (random weights drawn on the GPU, bf16 on disk: ~34 GB with T5-XXL),
# 1024 px, rank 16, gradient checkpointing, 8-bit AdamW: NF4 transformer and encoders (recipes/flux_dev_lora_16gb),
# NF4 transformer (issue #17's target: within 24 GB) and bf16, the JSON line of bench/train_bench.py each (s/step,
# img/s, peak GPU memory: train_summary's, which covers the whole run, caching included). FULL_SIZE=tiny FULL_RES=64: a CPU rehearsal.
if [ "${FULL:-0}" = 1 ]; then
  size=${FULL_SIZE:-full}; res=${FULL_RES:-1024}; dev=${BUILD_DEVICE:-cuda}
  start=$(date +%s)
  python3 -m sdtune random-model "$W/flux-$size" --family flux --size "$size" --dtype bf16 --device "$dev" 2>&1 | tail -1
  echo "built in $(( $(date +%s) - start )) s"
  # transformer:text encoders -- the 16 GB recipe's (both NF4), the 24 GB one's, plain bf16
  for q in nf4:nf4 nf4:none none:none; do
    python3 bench/train_bench.py --model "$W/flux-$size" --resolution "$res" --mixed-precision "${FULL_MP:-bf16}" \
      --gradient-checkpointing --rank 16 --optimizer adamw8bit --quantize "${q%%:*}" \
      --quantize-text-encoders "${q##*:}" --warmup 3 --steps "${FULL_STEPS:-10}" \
      --workdir "$W/bench-${q/:/-}" 2>&1 | grep -E '^\{|pre-flight|model.quantize|^error' | tail -5
  done
fi
