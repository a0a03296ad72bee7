"""``sdtune launch``: ``accelerate launch -m sdtune COMMAND ...`` run by accelerate's own launcher inside this
process, so that a failed run ends in its own ``error:`` line and one line naming the process and its exit
code, never in the launcher's traceback (accelerate raises ``CalledProcessError`` for one process and torch's
``ChildFailedError`` for several)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from unittest import mock

from sdtune.cli.console import LAUNCHED_BY_SDTUNE
from sdtune.errors import SdtuneError

LAUNCHABLE = ("train", "class-images")  # the sdtune commands that run as several processes
USAGE = "sdtune launch [ACCELERATE LAUNCH OPTIONS] {train,class-images} RECIPE [key=value ...] [OPTIONS]"
SAID_BY_THE_PROCESS = (130, 128 + signal.SIGTERM)  # stopped by Ctrl-C / SIGTERM: the process said so itself


def add_commands(sub: Any) -> None:
    """Add ``launch`` to the ``sdtune`` subparsers."""
    # "+" prefixes: argparse must not read accelerate's or the command's options (--num_processes, --dry-run)
    # as this parser's own; all of them are passed on as they are
    p = sub.add_parser(
        "launch", prefix_chars="+", add_help=False, usage=USAGE,
        help="`accelerate launch -m sdtune ...` (several GPUs, FSDP), failing with one line, not a traceback",
        description="Run `sdtune train` (or `class-images`) through `accelerate launch`: the same options "
        "(--config_file recipes/accelerate/multi_gpu.yaml, --num_processes N, --multi_gpu, ...), the same "
        "processes, but a process that fails ends the launch with its own error line, one line naming it and "
        "its exit code, and that exit code (2 for a recipe's mistake), where `accelerate launch` adds a Python "
        "traceback. Example: sdtune launch --config_file recipes/accelerate/multi_gpu.yaml train "
        "recipes/sd15_dreambooth_lora.yaml train.max_steps=800")
    p.add_argument("arguments", nargs=argparse.REMAINDER,
                   help="`accelerate launch`'s options (`accelerate launch --help`), then the sdtune command")
    p.set_defaults(func=cmd_launch, launch_parser=p)


def cmd_launch(args: argparse.Namespace) -> int:
    arguments = list(args.arguments)
    if arguments[:1] in (["-h"], ["--help"]):
        args.launch_parser.print_help()
        return 0
    at = next((i for i, a in enumerate(arguments) if a in LAUNCHABLE), None)
    if at is None:
        given = f" in `{' '.join(arguments)}`" if arguments else ""
        raise SdtuneError(f"launch: no sdtune command{given}; fix: name it after accelerate's "
                          "options, e.g. `sdtune launch --num_processes 2 train RECIPE`")
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()

    def error(message: str) -> None:  # argparse's usage block and exit: one line instead
        raise SdtuneError(f"launch: {message}; fix: see `accelerate launch --help` for its options")

    parser.error = error  # type: ignore[method-assign]
    launch = parser.parse_args([*arguments[:at], "--module", "sdtune", *arguments[at:]])
    debug = args.debug or os.environ.get("SDTUNE_DEBUG", "") not in ("", "0")
    if debug:
        os.environ["SDTUNE_DEBUG"] = "1"  # the processes show their tracebacks too
    try:
        # LAUNCHED_BY_SDTUNE: the processes leave out their note on accelerate's traceback (there is none)
        with _signals_go_to_the_processes(), _quiet_elastic(not debug), \
                mock.patch.dict(os.environ, {LAUNCHED_BY_SDTUNE: "1"}):
            launch_command(launch)
    except subprocess.CalledProcessError as e:
        return _failed(f"`sdtune {arguments[at]}`", e.returncode)
    except Exception as e:
        code = _failure(e, launch.num_processes)
        if code is None or debug:
            raise
        return code
    return 0


def _failure(e: Exception, processes: int | None) -> int | None:
    """The exit code for torch elastic's ``ChildFailedError`` (the first process to fail, said in one line) or
    ``SignalException`` (the launch was stopped); None for any other exception."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(e, SignalException):
        print(f"stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    if isinstance(e, ChildFailedError):
        rank, failure = e.get_first_failure()
        # the processes that elastic stopped once this one failed are not failures of their own
        of = f" of {processes}" if processes else ""
        return _failed(f"process {rank}{of} (the first to fail)", failure.exitcode)
    return None


def _failed(process: str, returncode: int) -> int:
    """One line for a process that failed; returns the launch's exit code: the process's own, or 128 + the
    signal that ended it, as a shell reports it."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if -returncode == signal.SIGKILL else ""
        print(f"error: launch: {process} was ended by {name}{hint}", file=sys.stderr)
        return 128 - returncode
    if returncode not in SAID_BY_THE_PROCESS:
        print(f"error: launch: {process} exited with code {returncode} (its messages are above)", file=sys.stderr)
    return returncode


@contextlib.contextmanager
def _signals_go_to_the_processes() -> Iterator[None]:
    """Ctrl-C reaches the launched processes from the terminal, and each stops after a step and saves: this
    process waits for them instead of ending first. A SIGTERM sent to this process alone (``kill``) is passed
    on to them. (With several processes, torch's elastic agent installs its own handlers, which do the same.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: object) -> None:
        import psutil  # accelerate's dependency

        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    old = {signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
           signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _quiet_elastic(quiet: bool) -> Iterator[None]:
    """Torch elastic's log lines about a failed process ("failed (exitcode: 2) local_rank: 0 ...", "Sending
    process ... closing signal SIGTERM") say, at length, what the launch's one line says; ``--debug`` keeps them."""
    log = logging.getLogger("torch.distributed.elastic")
    level = log.level
    if quiet:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
