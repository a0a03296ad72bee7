"""``sdtune doctor``: the environment facts a bug report needs, and the problems in it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError


def add_commands(sub: Any) -> None:
    """Add ``doctor`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("doctor", help="print the environment facts a bug report needs, and problems")
    p.add_argument("--output-dir", default=".", help="where runs will be written (its free space is checked)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from sdtune.doctor import report

    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise SdtuneError(f"--output-dir: {args.output_dir} is a file; give the folder runs will be written to")
    text, code = report(args.output_dir)
    print(text, flush=True)
    return code
