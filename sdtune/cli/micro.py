"""``sdtune micro ...``: the procedural micro world and its micro model (offline subjects, demos, tests)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdtune.cli.console import quiet_libraries
from sdtune.errors import SdtuneError


def add_commands(sub: Any) -> None:
    """Add ``micro subject | model | pretrain | check`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("micro", help="the procedural micro world (offline subjects for demos and tests)")
    micro = p.add_subparsers(dest="micro_command", required=True, metavar="MICRO_COMMAND")
    m = micro.add_parser("subject", help="render photos of the micro world's subject toy as an imagefolder")
    m.add_argument("directory")
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--identifier", default="sks")
    m.add_argument("--class-noun", default="toy")
    m.add_argument("--masks", action="store_true", help="also write each photo's subject mask (NAME.mask.png)")
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
    m.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet stage (default %(default)s)")
    m.add_argument("--warmup", type=int, default=200)
    m.add_argument("--init-from", metavar="MODEL", help="continue from a micro model folder (e.g. `sdtune micro "
                   "model DIR`) instead of starting from random weights; its VAE is kept")
    m.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (default %(default)s)")
    m.add_argument("--eval-every", type=int, default=500, help="score prompt following and save every N steps")
    m.add_argument("--eval-images", type=int, default=64)
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    m.add_argument("--seconds", type=float, default=0, help="fit the UNet stage into this many seconds: the "
                   "steps are re-planned once from the first 100 (at most --steps; 0: run --steps)")
    m.add_argument("--decoder-steps", type=int, default=0, help="first train the VAE's decoder alone this many "
                   "steps (batch 32; the encoder, so the latents, stay): sharper shapes from the same latents")
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
    from sdtune.schedulers import sampling_scheduler

    quiet_libraries()
    info = inspect_model(args.model, for_training=False)
    c = load_components(args.model, info.family)
    pipe = info.family.pipeline(c, scheduler=sampling_scheduler(c.noise_scheduler.config))
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
