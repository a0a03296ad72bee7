"""``sdtune micro ...``: the procedural micro world and its micro model (offline subjects, demos, tests)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdtune.cli.console import (
    finite_float,
    non_negative,
    non_negative_int,
    positive_float,
    positive_int,
    quiet_libraries,
    resolution,
    text,
)
from sdtune.errors import SdtuneError
from sdtune.runs import check_output_file


def add_commands(sub: Any) -> None:
    """Add ``micro subject | model | pretrain | check`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("micro", help="the procedural micro world (offline subjects for demos and tests)")
    micro = p.add_subparsers(dest="micro_command", required=True, metavar="MICRO_COMMAND")
    m = micro.add_parser("subject", help="render photos of the micro world's subject toy as an imagefolder")
    m.add_argument("directory", help="a new (or empty) folder for the photos, their captions and metadata.jsonl")
    m.add_argument("--n", type=positive_int, default=8, help="photos (default %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="draws the scenes: the same seed, the same photos "
                   "(default %(default)s)")
    m.add_argument("--size", type=resolution, default=64, help="side of the square photos in pixels, a multiple of 8 from 64 to 4096 "
                   "(default %(default)s, the micro model's)")
    m.add_argument("--identifier", type=word, default="sks", help="the subject's rare word in the captions "
                   "(default %(default)s)")
    m.add_argument("--class-noun", type=words, default="toy", help="the subject's class in the captions, after "
                   "the identifier: 'a photo of sks toy ...' (default %(default)s)")
    m.add_argument("--masks", action="store_true", help="also write each photo's subject mask (NAME.mask.png)")
    m.set_defaults(func=cmd_micro_subject)
    m = micro.add_parser("model", help="write the pretrained micro model (shipped with sdtune) as a diffusers folder")
    m.add_argument("directory", help="a new (or empty) folder for the diffusers pipeline")
    m.set_defaults(func=cmd_micro_model)
    m = micro.add_parser("pretrain", help="train a micro model from scratch on the procedural world")
    m.add_argument("directory", help="a new folder, or an earlier pretraining folder (its VAE stage is reused "
                   "when the settings match)")
    m.add_argument("--seed", type=int, default=0, help="draws the scenes and the initial weights (default "
                   "%(default)s)")
    m.add_argument("--num-images", type=positive_int, default=30000, help="scenes rendered once (default %(default)s)")
    m.add_argument("--vae-steps", type=positive_int, default=1500, help="VAE training steps at batch 16, before the "
                   "UNet stage; not used with --init-from, whose VAE is kept (default %(default)s)")
    m.add_argument("--steps", type=positive_int, default=4000, help="UNet + text encoder steps (default %(default)s)")
    m.add_argument("--batch-size", type=positive_int, default=64, help="scenes per UNet + text encoder step "
                   "(default %(default)s)")
    m.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of the UNet stage "
                   "(default %(default)s)")
    m.add_argument("--warmup", type=positive_int, default=200, help="UNet steps of linear learning-rate warmup "
                   "(default %(default)s)")
    m.add_argument("--init-from", metavar="MODEL", help="continue from a micro model folder (e.g. `sdtune micro "
                   "model DIR`) instead of starting from random weights; its VAE is kept")
    m.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (default %(default)s)")
    m.add_argument("--eval-every", type=positive_int, default=500, help="score prompt following and save every N "
                   "steps")
    m.add_argument("--eval-images", type=positive_int, default=64, help="held-out scenes per score (default "
                   "%(default)s)")
    m.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    m.add_argument("--seconds", type=non_negative, default=0, help="fit the UNet stage into this many seconds: the "
                   "steps are re-planned once from the first 100 (at most --steps; 0: run --steps)")
    m.add_argument("--decoder-steps", type=non_negative_int, default=0, help="first train the VAE's decoder alone this many "
                   "steps (batch 32; the encoder, so the latents, stay): sharper shapes from the same latents")
    m.add_argument("--ship", action="store_true", help="also copy the result into sdtune's package data")
    m.set_defaults(func=cmd_micro_pretrain)
    m = micro.add_parser("check", help="score a model's prompt following on held-out scenes of the micro world")
    m.add_argument("model", help="model folder (e.g. from `sdtune micro model`)")
    m.add_argument("--n", type=positive_int, default=64, help="held-out scenes (default %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="draws the scenes and the noise (default %(default)s)")
    m.add_argument("--steps", type=positive_int, default=20, help="sampler steps per image (default %(default)s)")
    m.add_argument("--guidance", type=finite_float, default=4.0, help="guidance scale (default %(default)s)")
    m.add_argument("--grid", metavar="PNG", help="also save the first 16 images with their prompts (a .png; checked "
                   "before rendering)")
    m.add_argument("--overwrite", action="store_true", help="replace --grid even if sdtune did not write it")
    m.set_defaults(func=cmd_micro_check)


def word(value: str) -> str:
    """One word of a caption (an identifier): UTF-8, not empty, no spaces."""
    value = text(value)
    if not value or value.split() != [value]:
        raise argparse.ArgumentTypeError(f"expected one word without spaces, got {value!r}")
    return value


def words(value: str) -> str:
    """Caption words (a class noun): UTF-8 and not blank."""
    value = text(value)
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a word, got nothing")
    return value.strip()


def cmd_micro_subject(args: argparse.Namespace) -> int:
    from sdtune.micro.world import write_subject_photos

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()):
        raise SdtuneError(f"{out} exists and is not empty; choose a new folder")
    path = write_subject_photos(out, n=args.n, seed=args.seed, size=args.size, identifier=args.identifier,
                                class_noun=args.class_noun, masks=args.masks)
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
                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         init_from=args.init_from, device=args.device, eval_every=args.eval_every,
                         eval_images=args.eval_images, threads=args.threads,
                         seconds=args.seconds, decoder_steps=args.decoder_steps)
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

    from sdtune.grid import make_grid
    from sdtune.micro.measure import prompt_following
    from sdtune.models import inspect_model, load_components
    from sdtune.sample import save_image
    from sdtune.schedulers import sampling_scheduler

    if args.grid:
        check_grid(Path(args.grid), args.overwrite)
    quiet_libraries()
    info = inspect_model(args.model, for_training=False)
    c = load_components(args.model, info.family)
    pipe = info.family.pipeline(c, scheduler=sampling_scheduler(c.noise_scheduler.config))
    # the shipped weights are fp16; a micro model folder from before its config said float32 loads its text
    # encoder in fp16 (transformers 5 loads at the config's dtype, else the weights')
    pipe.to(torch.float32)
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
        # marked as sdtune's (save_image), so that the same command may replace it next time
        print(f"grid: {save_image(grid, args.grid)}")
    return 0


def check_grid(path: Path, overwrite: bool) -> None:
    """Refuse, before anything loads, a ``--grid`` that cannot be written or must not be replaced: as ``sdtune
    sample --out`` (``sdtune.sample.check_outputs``), a folder, a name that is not a .png, or a file that
    sdtune did not write unless ``overwrite``."""
    if path.suffix.lower() != ".png" and not path.is_dir():
        raise SdtuneError(f"--grid: {path}: sdtune writes PNG pictures; give a name ending in .png")
    check_output_file(path, "--grid", overwrite)
