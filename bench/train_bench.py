"""Time sdtune's own training path (data loader, VAE, text encoder, LoRA UNet step, optimizer).

Builds a random model with `sdtune random-model` (tiny or with the real architecture's shapes), trains
warm-up + N steps on the drawn demo subject, and prints one JSON line: s/step, img/s, peak GPU memory and
MFU (model FLOPs utilisation, from about 1.80 TFLOP per SD1.5 512 px image and 14.7 per SDXL 1024 px image
for a LoRA training step: forward + backward through the UNet).

    python bench/train_bench.py --family sd15 --size full --batch-size 1 --steps 100 \
        --mixed-precision fp16 --optimizer adamw8bit          # GPU
    python bench/train_bench.py --family flux --size full --resolution 1024 --mixed-precision bf16 \
        --gradient-checkpointing --rank 16 --quantize nf4 --build-device cuda --steps 20   # GPU, FLUX.1-dev QLoRA
    python bench/train_bench.py --size tiny --steps 3         # CPU smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16/fp16 tensor-core peak (TFLOP/s) of cards we may run on; MFU is only printed when known.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
TFLOP_PER_IMAGE = {("sd15", 512): 1.80, ("sdxl", 1024): 14.7}


def main() -> None:
    from sdtune import families
    from sdtune.cli.console import quiet_imports, quiet_libraries, show_messages

    quiet_imports()
    show_messages()  # sdtune's own lines (the pre-flight memory estimate, warnings) on stdout
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=families.names(), default="sd15")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--model", help="use this model folder instead of writing a random one")
    p.add_argument("--resolution", type=int, help="default: the model's native size")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the denoiser")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="default",
                   help="train.compile_mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--no-cache", action="store_true", help="encode images and captions every step")
    p.add_argument("--quantize", choices=("none", "nf4", "fp8"), default="none",
                   help="model.quantize: the frozen denoiser in 4-bit NF4 or fp8")
    p.add_argument("--quantize-text-encoders", choices=("none", "nf4", "fp8"), default="none",
                   help="model.quantize_text_encoders")
    p.add_argument("--build-device", default="cpu",
                   help="where a random model's weights are drawn (cuda: a full-size FLUX.1 in seconds)")
    p.add_argument("--workdir", help="default: a temporary folder")
    args = p.parse_args()
    quiet_libraries()

    from sdtune.config import load_config
    from sdtune.models import inspect_model, write_random_model
    from sdtune.train import train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = str(work / f"model-{args.family}-{args.size}")
        if not (Path(model) / "model_index.json").is_file():
            # full size on disk in half precision: bf16 for the flow-matching transformers (fp16 overflows FLUX)
            dtype = "fp32" if args.size == "tiny" else "bf16" if args.family in ("flux", "sd3") else "fp16"
            write_random_model(model, args.family, args.size, dtype=dtype, device=args.build_device)
    info = inspect_model(model)
    resolution = args.resolution or info.resolution
    overrides = [
        f"model.pretrained={model}",
        f"data.instance_dir={ROOT / 'data' / 'demo_toy'}",
        "data.identifier=sks",
        f"data.resolution={resolution}",
        f"lora.rank={args.rank}",
        f"train.output_dir={tempfile.mkdtemp(prefix='run-', dir=work)}",  # a fresh run every time
        f"train.max_steps={args.warmup + args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.mixed_precision={args.mixed_precision}",
        f"train.optimizer={args.optimizer}",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"train.compile_mode={args.compile_mode}",
        f"train.cache_latents={str(not args.no_cache).lower()}",
        f"train.cache_text_embeddings={str(not args.no_cache).lower()}",
        f"model.quantize={args.quantize}",
        f"model.quantize_text_encoders={args.quantize_text_encoders}",
        "train.checkpoint_every=0",
        "train.report_to=none",
        f"train.log_every={10**9}",
        "sample.prompts=[a photo of sks toy]",
        "sample.seeds=[0]",
        "sample.steps=2",
    ]
    cfg = load_config(None, overrides)
    out = train(cfg)
    summary = json.loads((out / "train_summary.json").read_text())
    # train() times from min(10, max_steps / 2) steps on; report exactly what it measured.
    result = {
        "family": info.family.name,
        "size": args.size,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "optimizer": args.optimizer,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile and args.compile_mode,
        "cached": not args.no_cache,
        "rank": args.rank,
        "quantize": args.quantize,
        "quantize_text_encoders": args.quantize_text_encoders,
        "timed_steps": summary["timed_steps"],
        "s_per_step": round(summary["s_per_step"], 4),
        "img_per_s": round(summary["img_per_s"], 2),
        "peak_gpu_mem_gib": None if summary["peak_gpu_mem_gib"] is None else round(summary["peak_gpu_mem_gib"], 2),
        "device": summary["device"],
    }
    flop = TFLOP_PER_IMAGE.get((info.family.name, resolution)) if args.size == "full" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in summary["device"]), None)
    result["mfu"] = round(flop * summary["img_per_s"] / peak, 4) if flop and peak else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
