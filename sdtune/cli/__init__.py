"""The ``sdtune`` command line. All argparse code lives in this package, one module per command group:

    train.py   train, random-model          sample.py  sample
    data.py    prep, check-token,           share.py   export, push
               suggest-tokens                eval.py    eval
    micro.py   micro ...                    doctor.py  doctor

The library raises ``SdtuneError`` and logs; this package prints: mistakes a user can make end in one
``error: ...`` line and exit code 2, never a traceback. Building the parser imports no torch, diffusers or
transformers (each command imports what it needs when it runs), so ``sdtune --help`` answers at once.
"""

from __future__ import annotations

import sys

from sdtune import __version__
from sdtune.cli import data, doctor, micro, sample, share
from sdtune.cli import eval as evaluation  # (`eval` would shadow the built-in)
from sdtune.cli import train as training
from sdtune.cli.console import Parser, quiet_imports, show_messages
from sdtune.errors import Interrupted, SdtuneError

COMMAND_GROUPS = (training, data, sample, share, evaluation, micro, doctor)


def build_parser() -> Parser:
    """The whole ``sdtune`` parser, every command group's subcommands in workflow order."""
    parser = Parser(prog="sdtune", description="DreamBooth LoRA for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``sdtune`` command; returns the process exit code."""
    quiet_imports()
    show_messages()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
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
