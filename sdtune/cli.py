"""The ``sdtune`` command line: train, sample, random-model, doctor.

Mistakes a user can make end in ``error: ...`` lines and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sdtune.errors import SdtuneError


def _quiet_imports() -> None:
    """Keep the terminal for sdtune's own messages: library chatter hides the ones that matter.
    Runs before any library is imported (their loggers read these at import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")


def _quiet_libraries() -> None:
    """No per-file progress bars while loading weights (the run has its own progress bar)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from sdtune.config import check_run, load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        if not args.dry_run:
            return 0
    plan = check_run(cfg)
    if args.dry_run:
        for w in plan.warnings:
            print(f"warning: {w}")
        m = plan.model
        print(
            f"ok: {m.pretrained} is {m.family} ({m.prediction_type}), {len(plan.examples)} instance images at "
            f"{plan.resolution} px"
            + (f", class images in {plan.class_dir}" if plan.class_dir else "")
            + f"; output in {cfg.train.output_dir}"
        )
        return 0
    _quiet_libraries()
    from sdtune.train import train

    train(cfg, plan)
    return 0


def cmd_random_model(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sdtune.models import inspect_model, write_random_model

    path = write_random_model(args.directory, args.family, args.size, args.seed, args.dtype)
    info = inspect_model(str(path))
    print(f"wrote a random {info.family} model ({args.size}, {info.prediction_type}, {info.resolution} px) to {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from sdtune.lora import WEIGHT_NAME

    target = Path(args.target)
    run_cfg: dict = {}
    if target.is_dir():
        for folder in (target, *target.parents[:2]):
            if (folder / "config.yaml").is_file():
                run_cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
                break
        lora_path = target / WEIGHT_NAME
        if not lora_path.is_file():
            raise SdtuneError(f"{target}: no {WEIGHT_NAME} here; point at a run or checkpoint folder, or a LoRA file")
    elif target.is_file():
        lora_path = target
    else:
        raise SdtuneError(f"{target}: no such run folder or LoRA file")
    model = args.model or run_cfg.get("model", {}).get("pretrained")
    if not model:
        raise SdtuneError(f"--model: {target} does not say its base model; pass --model HUB_ID_OR_FOLDER")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
    if not prompts:
        data = run_cfg.get("data", {})
        prompts = run_cfg.get("sample", {}).get("prompts") or [p for p in [data.get("instance_prompt")] if p]
    if not prompts:
        raise SdtuneError("--prompt: no prompt given and the run has none; pass --prompt 'a photo of sks dog'")

    _quiet_libraries()
    from sdtune.models import build_pipeline, inspect_model, load_components
    from sdtune.sample import render_grid, sampling_scheduler, save_image

    info = inspect_model(model, run_cfg.get("model", {}).get("revision"))
    components = load_components(info.pretrained, info.family, run_cfg.get("model", {}).get("revision"),
                                 run_cfg.get("model", {}).get("variant"))
    pipe = build_pipeline(components, info.family, sampling_scheduler(components.noise_scheduler.config, args.scheduler))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device, dtype)
    try:
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    except Exception as e:  # a LoRA for another family or with another layout
        raise SdtuneError(f"{lora_path}: cannot apply it to {model}: {str(e).splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    size = args.size or run_cfg.get("data", {}).get("resolution") or info.resolution
    grid, _ = render_grid(
        pipe, prompts, _ints(args.seeds), lora_scales=_floats(args.lora_scale),
        negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
        height=size, width=size, title=f"{lora_path.name} on {model}",
    )
    out = Path(args.out) if args.out else (target if target.is_dir() else target.parent) / "grid.png"
    print(f"grid: {save_image(grid, out)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from sdtune.doctor import run_doctor

    return run_doctor(args.output_dir)


# --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from sdtune import __version__
    from sdtune.models import FAMILIES
    from sdtune.sample import SCHEDULERS

    parser = argparse.ArgumentParser(prog="sdtune", description="DreamBooth LoRA for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a DreamBooth LoRA from a YAML recipe")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/sd15_dreambooth_lora.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.max_steps=800")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="check recipe, data and model presence, then exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("random-model", help="write a randomly initialised model (tests, demos, benchmarks)")
    p.add_argument("directory")
    p.add_argument("--family", choices=FAMILIES, default="sd15")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.set_defaults(func=cmd_random_model)

    p = sub.add_parser("sample", help="render a labelled grid with a trained LoRA (rows: prompt x scale)")
    p.add_argument("target", help="run folder, checkpoint folder or LoRA .safetensors file")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--prompts-file")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--lora-scale", default="0,1", help="comma list; 0 shows the base model")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m")
    p.add_argument("--size", type=int, help="image size (default: the run's resolution)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device")
    p.add_argument("--out", help="grid file (default: TARGET/grid.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("doctor", help="print the environment facts a bug report needs, and problems")
    p.add_argument("--output-dir", default=".")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdtuneError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
