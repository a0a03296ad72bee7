"""The ``sdtune`` command line: train, sample, prep, check-token, export, eval, push, random-model, doctor.

Mistakes a user can make end in ``error: ...`` lines and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sdtune.errors import Interrupted, SdtuneError


def quiet_imports() -> None:
    """Keep the terminal for sdtune's own messages: library chatter hides the ones that matter.
    Runs before any library is imported (their loggers read these at import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")


def quiet_libraries() -> None:
    """No per-file progress bars while loading weights (the run has its own progress bar)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()


def parse_floats(text: str, key: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated numbers, got '{text}'") from None


def parse_ints(text: str, key: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated integers, got '{text}'") from None


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
    quiet_libraries()
    from sdtune.train import train

    train(cfg, plan)
    return 0


def cmd_random_model(args: argparse.Namespace) -> int:
    quiet_libraries()
    from sdtune.models import inspect_model, write_random_model

    path = write_random_model(args.directory, args.family, args.size, args.seed, args.dtype)
    info = inspect_model(str(path))
    print(f"wrote a random {info.family} model ({args.size}, {info.prediction_type}, {info.resolution} px) to {path}")
    return 0


def lora_files(target: Path, checkpoints: str | None) -> list[tuple[str | None, str]]:
    """(label, LoRA file) pairs that a sample TARGET names; several with --checkpoints all."""
    from sdtune.lora import WEIGHT_NAME

    if target.is_file():
        return [(target.stem, str(target))]
    if not target.is_dir():
        raise SdtuneError(f"{target}: no such run folder, checkpoint folder or LoRA file")
    if checkpoints == "all":
        found = [(p.parent.name, str(p)) for p in sorted(target.glob(f"checkpoints/step-*/{WEIGHT_NAME}"))
                 if (p.parent / "COMPLETE").is_file()]
        if not found:
            raise SdtuneError(f"--checkpoints all: {target} has no complete checkpoints")
        return found
    if (target / WEIGHT_NAME).is_file():
        return [(target.name, str(target / WEIGHT_NAME))]
    raise SdtuneError(f"{target}: no {WEIGHT_NAME} here; point at a run or checkpoint folder, or a LoRA file")


def cmd_sample(args: argparse.Namespace) -> int:
    from sdtune.sample import Cell, Request, Settings, request_from_sidecar, run_sample

    if args.replay:
        req = request_from_sidecar(args.replay)
        out = Path(args.out or Path(args.replay).with_suffix(".replay.png"))
    else:
        if not args.target:
            raise SdtuneError("sample: give a TARGET (run folder, checkpoint folder or LoRA file) or --replay CELL.json")
        target = Path(args.target)
        from sdtune.checkpoint import run_config

        run_cfg = run_config(target)
        loras = [] if args.no_lora else lora_files(target, args.checkpoints)
        model = args.model or run_cfg.get("model", {}).get("pretrained")
        if not model:
            raise SdtuneError(f"--model: {target} does not say its base model; pass --model HUB_ID_OR_FOLDER")
        prompts = list(args.prompt or [])
        if args.prompts_file:
            try:
                prompts += [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
            except OSError as e:
                raise SdtuneError(f"--prompts-file: {e}") from None
        if not prompts:
            data = run_cfg.get("data", {})
            prompts = run_cfg.get("sample", {}).get("prompts") or [p for p in [data.get("instance_prompt")] if p]
        if not prompts:
            raise SdtuneError("--prompt: no prompt given and the run has none; pass --prompt 'a photo of sks dog'")
        size = run_cfg.get("data", {}).get("resolution")
        mode = ("depth" if args.depth else "outpaint" if args.outpaint else "inpaint" if args.mask
                else "img2img" if args.init_image else "txt2img")
        settings = Settings(
            negative_prompt=args.negative_prompt, steps=args.steps, scheduler=args.scheduler, mode=mode,
            width=args.width or size or 0, height=args.height or size or 0, strength=args.strength,
            batch_size=args.batch_size,
        )
        scales = [None] if not loras else parse_floats(args.lora_scale, "--lora-scale")
        cells = [Cell(p, s, g, sc, label) for label, _ in (loras or [(None, None)]) for p in prompts
                 for sc in scales for g in parse_floats(args.guidance, "--guidance") for s in parse_ints(args.seeds, "--seeds")]
        outpaint = None
        if args.outpaint:
            outpaint = tuple(parse_ints(args.outpaint, "--outpaint"))
            if len(outpaint) == 1:
                outpaint = outpaint * 4
            if len(outpaint) != 4 or min(outpaint) < 0:
                raise SdtuneError("--outpaint: give one number or left,top,right,bottom pixels, e.g. 0,0,128,0")
        req = Request(
            model=model, lora=loras, cells=cells, settings=settings, revision=run_cfg.get("model", {}).get("revision"),
            variant=run_cfg.get("model", {}).get("variant"), dtype=args.dtype, device=args.device,
            init_image=args.init_image, mask=args.mask, outpaint=outpaint,  # type: ignore[arg-type]
        )
        default_dir = target if target.is_dir() else target.parent
        out = Path(args.out) if args.out else default_dir / "grid.png"
    quiet_libraries()
    if not req.settings.width or not req.settings.height:
        from sdtune.models import inspect_model

        native = inspect_model(req.model, req.revision, for_training=False).resolution
        req.settings = Settings(**{**req.settings.__dict__, "width": req.settings.width or native,
                                   "height": req.settings.height or native})
    written, failures = run_sample(req, out, grid=not args.replay)
    if args.replay:
        print(f"image: {written}")
    else:
        print(f"grid: {written}")
        print(f"cells: {written.with_name(written.stem + '_cells')} (each with a .json sidecar; sdtune sample --replay)")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_push(args: argparse.Namespace) -> int:
    from sdtune.share import push

    names = push(Path(args.run), args.repo, public=args.public, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    visibility = "public" if args.public else "private"
    for name in names:
        print(f"{verb}: {name}")
    print(f"{verb} {len(names)} files to {args.repo} ({visibility})")
    return 0


def cmd_micro_subject(args: argparse.Namespace) -> int:
    from sdtune.micro.world import write_subject_photos

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()):
        raise SdtuneError(f"{out} exists and is not empty; choose a new folder")
    path = write_subject_photos(out, n=args.n, seed=args.seed, size=args.size, identifier=args.identifier,
                                class_noun=args.class_noun)
    print(f"wrote {args.n} photos of the micro world's subject toy (with metadata.jsonl) to {path}")
    return 0


def cmd_micro_pretrain(args: argparse.Namespace) -> int:
    from sdtune.micro.model import ship
    from sdtune.micro.pretrain import VAE_STAGE, PretrainConfig, pretrain

    quiet_libraries()
    out = Path(args.directory)
    # An earlier pretraining folder is allowed: its trained VAE stage is reused when the settings match.
    if out.exists() and any(out.iterdir()) and not (out / VAE_STAGE / "stage.json").is_file():
        raise SdtuneError(f"{out} exists and is neither empty nor an earlier `sdtune micro pretrain` folder; "
                          "choose a new folder")
    cfg = PretrainConfig(out=str(out), seed=args.seed, num_images=args.num_images, vae_steps=args.vae_steps,
                         steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                         eval_images=args.eval_images, threads=args.threads)
    report = pretrain(cfg)
    last = report["history"][-1] if report.get("history") else {}
    print(f"micro model: {out} ({report['total_seconds']} s; prompt following on {last.get('images')} held-out "
          f"scenes: background {last.get('background')}, colour {last.get('color')}, shape {last.get('shape')}, "
          f"all {last.get('all')})")
    if args.ship:
        print(f"shipped as package data: {ship(out)}")
    return 0


def cmd_micro_model(args: argparse.Namespace) -> int:
    from sdtune.micro.model import write_model

    path = write_model(args.directory)
    print(f"wrote the pretrained micro model (diffusers format, SD1.x-shaped, 64 px) to {path}")
    return 0


def cmd_micro_check(args: argparse.Namespace) -> int:
    import torch

    from sdtune.micro.measure import prompt_following
    from sdtune.models import build_pipeline, inspect_model, load_components
    from sdtune.sample import make_grid, sampling_scheduler

    quiet_libraries()
    info = inspect_model(args.model, for_training=False)
    c = load_components(args.model, info.family)
    pipe = build_pipeline(c, info.family, scheduler=sampling_scheduler(c.noise_scheduler.config))
    pipe.to(torch.float32)  # the shipped weights are fp16; transformers 5 keeps a checkpoint's dtype
    pipe.set_progress_bar_config(disable=True)
    scores, images, prompts = prompt_following(pipe, args.n, args.seed, args.steps, args.guidance,
                                               return_images=True)
    print(f"prompt following of {args.model} on {args.n} held-out scenes of the micro world "
          f"({args.steps} steps, guidance {args.guidance:g}): background {scores.background:.3f}, "
          f"colour {scores.color:.3f}, shape {scores.shape:.3f}, all three {scores.all:.3f}")
    if args.grid:
        shown = 16  # a readable picture: the first 16 prompts, one per row
        grid = make_grid([[im] for im in images[:shown]], prompts[:shown], ["generated"],
                         title=f"prompt following: all three right in {scores.all:.0%} of {args.n}")
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"grid: {args.grid}")
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
    p.add_argument("target", nargs="?", help="run folder, checkpoint folder or LoRA .safetensors file")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--lora-scale", default="0,1", help="comma list; 0 shows the base model")
    p.add_argument("--guidance", default="7.5", help="comma list of guidance scales")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m")
    p.add_argument("--width", type=int, help="default: the run's resolution, else the model's")
    p.add_argument("--height", type=int)
    p.add_argument("--batch-size", type=int, default=1, help="seeds rendered per pipeline call")
    p.add_argument("--checkpoints", choices=("all",), help="one row per saved checkpoint of the run")
    p.add_argument("--no-lora", action="store_true", help="the base model alone")
    p.add_argument("--init-image", help="image-to-image (or inpainting/outpainting source)")
    p.add_argument("--strength", type=float, default=0.75, help="how much of --init-image to repaint (0-1)")
    p.add_argument("--mask", help="inpainting mask, same size as --init-image, white = repaint")
    p.add_argument("--outpaint", help="extend the canvas: N or left,top,right,bottom pixels, then inpaint it")
    p.add_argument("--depth", action="store_true", help="depth-to-image (the base model must be a depth model)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", help="grid file (default: TARGET/grid.png)")
    p.add_argument("--replay", help="render one cell again from its .json sidecar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("push", help="upload a finished run (model card, LoRA files, samples) to the Hugging Face Hub")
    p.add_argument("run", help="run folder")
    p.add_argument("--repo", required=True, help="user/name; created private unless --public")
    p.add_argument("--public", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and exit")
    p.set_defaults(func=cmd_push)

    from sdtune import eval as evaluation  # (`eval` would shadow the built-in)
    from sdtune import export, identifier, prep

    prep.add_commands(sub)
    identifier.add_commands(sub)
    export.add_commands(sub)
    evaluation.add_commands(sub)

    p = sub.add_parser("micro", help="the procedural micro world (offline subjects for demos and tests)")
    micro = p.add_subparsers(dest="micro_command", required=True, metavar="MICRO_COMMAND")
    m = micro.add_parser("subject", help="render photos of the micro world's subject toy as an imagefolder")
    m.add_argument("directory")
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--identifier", default="sks")
    m.add_argument("--class-noun", default="toy")
    m.set_defaults(func=cmd_micro_subject)
    m = micro.add_parser("model", help="write the pretrained micro model (shipped with sdtune) as a diffusers folder")
    m.add_argument("directory")
    m.set_defaults(func=cmd_micro_model)
    m = micro.add_parser("pretrain", help="train a micro model from scratch on the procedural world")
    m.add_argument("directory")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--num-images", type=int, default=30000, help="scenes rendered once (default %(default)s)")
    m.add_argument("--vae-steps", type=int, default=1500)
    m.add_argument("--steps", type=int, default=4000, help="UNet + text encoder steps (default %(default)s)")
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--eval-every", type=int, default=500, help="score prompt following and save every N steps")
    m.add_argument("--eval-images", type=int, default=64)
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    m.add_argument("--ship", action="store_true", help="also copy the result into sdtune's package data")
    m.set_defaults(func=cmd_micro_pretrain)
    m = micro.add_parser("check", help="score a model's prompt following on held-out scenes of the micro world")
    m.add_argument("model", help="model folder (e.g. from `sdtune micro model`)")
    m.add_argument("--n", type=int, default=64, help="held-out scenes (default %(default)s)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--guidance", type=float, default=4.0)
    m.add_argument("--grid", metavar="PNG", help="also save the images with their prompts")
    m.set_defaults(func=cmd_micro_check)

    p = sub.add_parser("doctor", help="print the environment facts a bug report needs, and problems")
    p.add_argument("--output-dir", default=".")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_imports()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except SdtuneError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
