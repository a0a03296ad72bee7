"""``sdtune doctor``: the environment facts a bug report needs, and the problems in it."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Add ``doctor`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("doctor", help="print the environment facts a bug report needs, and problems")
    p.add_argument("--output-dir", default=".")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from sdtune.doctor import report

    text, code = report(args.output_dir)
    print(text, flush=True)
    return code
