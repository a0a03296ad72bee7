"""The ``sdtune`` command line. All argparse code lives in this package, one module per command group:

    train.py   train, random-model          sample.py  sample
    data.py    prep, check-token,           share.py   export, push
               suggest-tokens                eval.py    eval
    micro.py   micro ...                    doctor.py  doctor
    launch.py  launch (accelerate launch)

The library raises ``SdtuneError`` and logs; this package prints: mistakes a user can make end in one
``error: ...`` line and exit code 2, never a traceback. So do the OSErrors of a user's paths (permission
denied, no such file, disk full: the line names the path). Anything else is a bug in sdtune: one line that
says so and how to report it, exit code 1; ``sdtune --debug COMMAND`` or ``SDTUNE_DEBUG=1`` shows the
traceback instead. Building the parser imports no torch, diffusers or transformers (each command imports what
it needs when it runs), so ``sdtune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from sdtune import __version__
from sdtune.cli import data, doctor, launch, micro, sample, share, ui
from sdtune.cli import eval as evaluation  # (`eval` would shadow the built-in)
from sdtune.cli import train as training
from sdtune.cli.console import (
    Parser,
    memory_line,
    not_first_process,
    os_error_line,
    quiet_imports,
    show_messages,
    text,
    under_accelerate_launch,
    unexpected_line,
)
from sdtune.errors import Interrupted, SdtuneError

COMMAND_GROUPS = (training, launch, data, sample, share, evaluation, micro, doctor, ui)


def build_parser() -> Parser:
    """The whole ``sdtune`` parser, every command group's subcommands in workflow order."""
    parser = Parser(prog="sdtune", description="DreamBooth LoRA for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (or set SDTUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


# The cyclic garbage collector's first-generation threshold for a command's process. Importing torch, diffusers,
# transformers and peft creates millions of objects, almost none of them garbage; at CPython's 700 the collector
# runs thousands of times meanwhile: a rerun over cached data started its first step in 6.4-6.6 s, at 10,000 in
# 5.0-5.3 s (bench/SCALE.md). A training step allocates far fewer, so cycles are still collected every few steps.
GC_THRESHOLD = 10_000
OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]-]*=")  # a recipe override, key=value (``sdtune.config.parse_override``)


def main(argv: list[str] | None = None) -> int:
    """Run one ``sdtune`` command; returns the process exit code."""
    gc.set_threshold(max(gc.get_threshold()[0], GC_THRESHOLD), *gc.get_threshold()[1:])
    quiet_imports()
    show_messages()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        _late_overrides(parser, args, extra)
    except SystemExit as e:  # --help, --version, or a usage error (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    terminated: list[int] = []
    try:
        with _sigterm_as_ctrl_c(terminated):
            return args.func(args)
    except Interrupted as e:
        # every process of a launch stops at the same step (the loop agrees on it) with the same line: the
        # first says it, not each of N processes
        if not not_first_process():
            print(str(e), file=sys.stderr)
        return SIGTERM_EXIT if terminated and e.exit_code == 130 else e.exit_code
    except SdtuneError as e:
        if _left_to_rank_zero(e):
            if os.environ.get("TORCHELASTIC_RUN_ID"):  # torch elastic stops the others once the first has failed
                time.sleep(RANK_ZERO_GRACE_S)
        else:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
            if under_accelerate_launch() and not not_first_process():
                print("note: the traceback below is accelerate launch's report of this exit (code 2), not another "
                      "error; `sdtune launch` takes the same options and ends without it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not not_first_process():  # the launcher stops the others when one fails: the first says it
            print("stopped by SIGTERM" if terminated else "interrupted", file=sys.stderr)
        return SIGTERM_EXIT if terminated else 130
    except Exception as e:
        return _unexpected(e, args.debug or os.environ.get("SDTUNE_DEBUG", "") not in ("", "0"))


SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM


@contextmanager
def _sigterm_as_ctrl_c(terminated: list[int]) -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's time limit, the UI's Stop) takes Ctrl-C's path for the command: what
    a command keeps and says on Ctrl-C (a grid's finished cells, a setup's caches) it keeps and says on SIGTERM,
    where Python's default ends the process without a word. ``terminated`` records that it came. A training
    loop installs its own handlers (``sdtune.guards.StopSignals``) and puts this one back after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # a handler someone else installed (a test runner, an embedding program) is theirs to keep
        return

    def handle(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# How long a process other than the first waits before it exits quietly on a recipe's problems: torch elastic
# (accelerate launch with several processes, torchrun) stops every process once one has failed, and a quiet one
# that failed first stopped the first before it said the problems: the launch then ended without a word of why.
RANK_ZERO_GRACE_S = 10.0


def _left_to_rank_zero(e: SdtuneError) -> bool:
    """True for a recipe's problems (``ConfigError``) in a process other than the first of a multi-process launch
    (``accelerate launch``): every process checks the same recipe and finds the same lines, which the first one
    prints; the others exit with the same code, quietly, instead of printing each line N times (under torch
    elastic after ``RANK_ZERO_GRACE_S``, unless it has stopped them by then: the first process fails first)."""
    from sdtune.config import ConfigError

    return not_first_process() and isinstance(e, ConfigError)


def _late_overrides(parser: Parser, args: argparse.Namespace, extra: list[str]) -> None:
    """Recipe overrides written after a flag (``sdtune train R --dry-run train.max_steps=5``, as kohya and
    OneTrainer users write them): argparse leaves them unparsed; they join the command's overrides in order.
    Anything else left over is the usage error argparse would give."""
    if not extra:
        return
    if not hasattr(args, "overrides") or not all(OVERRIDE.match(a) for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.overrides = [*args.overrides, *(text(a) for a in extra)]
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument key=value: {e}")


def _unexpected(e: Exception, debug: bool) -> int:
    """Print an exception that is not an SdtuneError: the traceback with ``debug``, else one line. A user's
    path (permission, missing, full disk) exits 2 like any user error; a bug or no memory exits 1."""
    if isinstance(e, BrokenPipeError):  # the reader went away (`sdtune ... | head`): nothing left to say
        try:  # and Python's flush of stdout at exit must not complain about it either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # no real stdout (a notebook, a test's capture)
            pass
        return 1
    if debug:
        traceback.print_exception(e, file=sys.stderr)
        return 1
    path_line = os_error_line(e)
    if path_line:
        print(f"error: {path_line}", file=sys.stderr)
        return 2
    memory = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # torch's, without importing it
    print(f"error: {memory_line(e) if memory else unexpected_line(e)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
