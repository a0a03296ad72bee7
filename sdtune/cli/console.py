"""What the terminal sees: one-line errors, library messages on stdout, quiet third-party libraries, and the
comma-separated lists that several commands take.

The library logs (``logging`` / ``accelerate.logging``, under the ``sdtune`` logger) and raises
``SdtuneError``; the command line turns both into lines: ``message``, ``warning: message``, ``error: message``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

from sdtune.errors import SdtuneError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


class _Terminal(logging.Handler):
    """Writes sdtune's log records as plain lines to the current ``sys.stdout`` (looked up per record, so a
    notebook's or a test's replacement stream is used)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                message = f"error: {message}"
            elif record.levelno >= logging.WARNING:
                message = f"warning: {message}"
            print(message, file=sys.stdout, flush=True)
        except Exception:  # logging must never take the program down
            self.handleError(record)


def show_messages(level: int = logging.INFO) -> None:
    """Print sdtune's log messages (info and up) on stdout; idempotent. The CLI calls it; so can a notebook."""
    logger = logging.getLogger("sdtune")
    logger.setLevel(level)
    if not any(isinstance(h, _Terminal) for h in logger.handlers):
        logger.addHandler(_Terminal())
    logger.propagate = False  # printed once, here, whatever the root logger does


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
    """No per-file progress bars while loading weights (commands have their own progress bars)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()


def parse_floats(text: str, key: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0], or one error naming the option."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated numbers, got '{text}'") from None


def parse_ints(text: str, key: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2], or one error naming the option."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated integers, got '{text}'") from None
