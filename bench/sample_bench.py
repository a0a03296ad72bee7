"""Time `sdtune sample`'s rendering path: a prompts x seeds grid with a LoRA applied.

Builds a random model with `sdtune random-model` and a random LoRA (rank 4, attention layers), renders the
grid with sdtune.sample.run_sample (the code `sdtune sample` runs) after one warm-up grid, and prints one
JSON line: seconds per grid and per image, and peak GPU memory.

    python bench/sample_bench.py --family sd15 --size full --steps 30 --seeds 4 --dtype fp16   # GPU
    python bench/sample_bench.py --size tiny --steps 4                                           # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from sdtune import families
    from sdtune.cli.console import quiet_imports, quiet_libraries, show_messages
    from sdtune.models import DTYPES
    from sdtune.schedulers import SCHEDULERS

    quiet_imports()
    show_messages()  # sdtune's own lines (the pre-flight memory estimate, warnings) on stdout
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=families.names(), default="sd15")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, default=4, help="images in the grid (one prompt)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="dpmpp_2m")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--workdir")
    args = p.parse_args()
    quiet_libraries()

    import torch

    from sdtune.grid import Cell, Settings
    from sdtune.lora import add_lora, save_diffusers_lora
    from sdtune.models import inspect_model, load_components, write_random_model
    from sdtune.sample import Request, run_sample

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdtune-sample-bench-"))
    model = work / f"model-{args.family}-{args.size}"
    if not (model / "model_index.json").is_file():
        write_random_model(model, args.family, args.size, dtype="fp16" if args.size == "full" else "fp32")
    info = inspect_model(str(model))
    lora_dir = work / "lora"
    if not (lora_dir / "pytorch_lora_weights.safetensors").is_file():
        c = load_components(str(model), info.family)
        add_lora(c.denoiser, 4, 4, ["to_k", "to_q", "to_v", "to_out.0"])
        with torch.no_grad():  # a non-zero B so the LoRA really does work in every layer
            for n, prm in c.denoiser.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.01)
        save_diffusers_lora(lora_dir, info.family, {info.family.denoiser_name: c.denoiser})
    lora = str(lora_dir / "pytorch_lora_weights.safetensors")
    settings = Settings(steps=args.steps, width=info.resolution, height=info.resolution,
                        scheduler=args.scheduler, batch_size=args.batch_size)
    cells = [Cell("a photo of sks dog", s, 7.5, 1.0, "lora") for s in range(args.seeds)]
    req = Request(model=str(model), lora=[("lora", lora)], cells=cells, settings=settings, dtype=args.dtype)
    cuda = torch.cuda.is_available()
    run_sample(req, work / "warmup.png", progress=False)  # loads, allocates, autotunes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_sample(req, work / "grid.png", progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0  # includes loading the pipeline, as a user's `sdtune sample` does
    print(json.dumps({
        "family": info.family.name, "size": args.size, "resolution": info.resolution, "images": args.seeds,
        "steps": args.steps, "batch_size": args.batch_size, "dtype": args.dtype, "scheduler": args.scheduler,
        "s_per_grid_with_load": round(seconds, 3), "s_per_image_with_load": round(seconds / args.seeds, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }))


if __name__ == "__main__":
    main()
