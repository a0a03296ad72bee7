"""``sdtune export`` (the LoRA in another format) and ``sdtune push`` (a run to the Hugging Face Hub)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdtune.export import WRITERS


def add_commands(sub: Any) -> None:
    """Add ``export`` and ``push`` to the ``sdtune`` subparsers."""
    p = sub.add_parser(
        "export", help="write a run's LoRA as diffusers, PEFT or kohya (A1111, ComfyUI, InvokeAI, Forge)"
    )
    p.add_argument("run", help="run folder or checkpoint folder (checkpoints/step-NNNNNN)")
    p.add_argument("--format", choices=tuple(WRITERS), default="kohya",
                   help="; ".join(f"{name}: {f.description}" for name, f in WRITERS.items()) + " (default kohya)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file (a folder for peft)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT even if sdtune did not write it (a run's own LoRA file: never)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a finished run (model card, LoRA files, samples) to the Hugging Face Hub")
    p.add_argument("run", help="run folder")
    p.add_argument("--repo", required=True, help="user/name; created private unless --public")
    p.add_argument("--public", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded, then exit")
    p.set_defaults(func=cmd_push)


def cmd_export(args: argparse.Namespace) -> int:
    from sdtune.export import export_run

    path, warnings = export_run(args.run, args.format, args.out, overwrite=args.overwrite)
    for line in warnings:
        print(f"warning: {line}")
    print(f"wrote {args.format} LoRA: {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from sdtune.share import push

    names = push(Path(args.run), args.repo, public=args.public, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    visibility = "public" if args.public else "private"
    for name in names:
        print(f"{verb}: {name}")
    print(f"{verb} {len(names)} files to {args.repo} ({visibility})")
    return 0
