"""What the terminal sees: one-line errors, library messages on stdout, quiet third-party libraries, and the
comma-separated lists that several commands take.

The library logs (``logging`` / ``accelerate.logging``, under the ``sdtune`` logger) and raises
``SdtuneError``; the command line turns both into lines: ``message``, ``warning: message``, ``error: message``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from sdtune.errors import SdtuneError
from sdtune.files import is_disk_full


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


LAUNCHED_BY_SDTUNE = "SDTUNE_LAUNCH"  # set by `sdtune launch` for the processes it starts


def under_accelerate_launch() -> bool:
    """True in a process that ``accelerate launch`` started itself (not through ``sdtune launch``): a failure
    there is followed by the launcher's own traceback (``CalledProcessError`` / ``ChildFailedError``)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and LAUNCHED_BY_SDTUNE not in os.environ


def not_first_process() -> bool:
    """True in every process but the first of a multi-process launch (``accelerate launch``, torchrun): their
    ``RANK`` is set and not 0. These processes say the same things as the first, which alone prints them."""
    return os.environ.get("RANK", "0") not in ("", "0")


class _Terminal(logging.Handler):
    """Writes sdtune's log records as plain lines to the current ``sys.stdout`` (looked up per record, so a
    notebook's or a test's replacement stream is used)."""

    def emit(self, record: logging.LogRecord) -> None:
        # under `accelerate launch` every process runs the same setup and says the same things: the first
        # process prints the information, each process its own warnings and errors
        if record.levelno < logging.WARNING and not_first_process():
            return
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
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0], or one error naming the option (no numbers, or nan / inf)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated numbers, got '{text}'") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise SdtuneError(f"{key}: expected comma-separated finite numbers, e.g. 0,1; got '{text}'")
    return values


def parse_ints(text: str, key: str, minimum: int | None = None, maximum: int | None = None) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2], or one error naming the option (no numbers, or one out of bounds)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdtuneError(f"{key}: expected comma-separated integers, got '{text}'") from None
    if not values:
        raise SdtuneError(f"{key}: expected comma-separated integers, e.g. 0,1,2; got '{text}'")
    if minimum is not None and min(values) < minimum:
        raise SdtuneError(f"{key}: each value must be at least {minimum}, got {min(values)}")
    if maximum is not None and max(values) > maximum:
        raise SdtuneError(f"{key}: each value must be at most {maximum}, got {max(values)}")
    return values


# argparse ``type=`` checks: a bad value is the parser's one ``error:`` line, before any command runs.

MAX_PIXELS = 4096  # per side: 4x SDXL's training size; far beyond it one cell alone exhausts a machine's memory


def text(value: str) -> str:
    """Text for the model or the recipe (a prompt, a caption, a word, key=value): it must be UTF-8. Paths need
    not be (Linux file names are bytes); an argument that is not is passed by the shell as surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{ascii(value)} is not UTF-8 text (bytes of another encoding); "
                                         "type it again in UTF-8") from None
    return value


def device(value: str) -> str:
    """A torch device that exists on this machine: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        dev = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"'{value}': this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                                         "that torch can use; use --device cpu (or see `sdtune doctor`)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps': Apple's GPU is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"'{value}': sdtune renders on cpu, cuda or mps")
    return value


def resolution(text: str) -> int:
    """An image side for training data: a multiple of 8 (the VAE's factor) from 64 to 4096 pixels."""
    value = _whole(text, -(2**63), "a whole number")
    if not 64 <= value <= 4096 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 from 64 to 4096 pixels, got {value} "
                                         f"(e.g. {min(4096, max(64, value // 8 * 8))})")
    return value


def _whole(text: str, least: int, said: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {said}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (steps, batch sizes, counts)."""
    return _whole(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (0: off, or the library's default)."""
    return _whole(text, 0, "0 or more")


def pixels(text: str) -> int:
    """An image side in pixels: a positive multiple of 8 (the VAE's factor), at most ``MAX_PIXELS``."""
    value = positive_int(text)
    if value % 8 or value > MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 between 8 and {MAX_PIXELS}, got {value} "
                                         f"(e.g. {max(8, min(MAX_PIXELS, value // 8 * 8))})")
    return value


def finite_float(text: str) -> float:
    """A number that is not nan or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (img2img strength: 0 would take no sampling step)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 1, got {value:g}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (tolerances)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


# --------------------------------------------------------------------------------------------------------
# What an exception that is not an SdtuneError says


BUG = ("this is a bug in sdtune: please report it with the output of `sdtune doctor` (run again with --debug for "
       "the traceback)")

# OSErrors about a path that the user chose or can fix: the line, with {path}. Other OSErrors are bugs.
_PATH_ERRORS = {
    errno.EACCES: "permission denied: {path} (check its permissions, or choose another path)",
    errno.EPERM: "operation not permitted: {path} (check its permissions, or choose another path)",
    errno.EISDIR: "{path} is a folder, not a file (give a file name)",
    errno.ENOTDIR: "{path}: a part of this path is a file, not a folder (check the path)",
    errno.ENOENT: "no such file or folder: {path} (check the path)",
    errno.EEXIST: "{path} already exists (choose another path)",
    errno.ENOSPC: "disk full writing {path} (free some space, or write somewhere else)",
    errno.EDQUOT: "disk quota exceeded writing {path} (free some space, or write somewhere else)",
    errno.EROFS: "read-only file system: {path} (write somewhere else)",
    errno.ENAMETOOLONG: "file name too long: {path} (choose a shorter name)",
    errno.ELOOP: "too many symbolic links: {path} (check the path)",
    errno.EIO: "input/output error reading or writing {path} (a disk or file-system problem)",
}
_NO_PATH = {errno.ENOSPC: "disk full (free some space, or write somewhere else)",
            errno.EDQUOT: "disk quota exceeded (free some space, or write somewhere else)"}


_ATOMIC_TMP = re.compile(r"\.(.+?)(?:\.\d+)?\.tmp")


def _shown_path(name: object) -> str:
    # sdtune.files.atomic_path writes to ".<name>[.<pid>].tmp" beside the target: name the file the user asked for
    path = Path(os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name))
    m = _ATOMIC_TMP.fullmatch(path.name)
    return str(path.with_name(m.group(1)) if m else path)


def os_error_line(e: BaseException) -> str | None:
    """One line for an error about a path the user can fix (permission, missing, full disk, ...), naming
    the path; None when it is not one (then it is a bug). A library's own disk-full error counts too."""
    if not isinstance(e, OSError):
        return "disk full (free some space, or write somewhere else)" if is_disk_full(e) else None
    template = _PATH_ERRORS.get(e.errno) if e.errno is not None else None
    name = e.filename2 if e.filename2 is not None and e.errno in (errno.EISDIR, errno.ENOTDIR) else e.filename
    if template is None:
        return None
    if name is None:
        return _NO_PATH.get(e.errno)  # type: ignore[arg-type]  (e.errno is not None here)
    return template.format(path=_shown_path(name))


def unexpected_line(e: BaseException) -> str:
    """The one line for an exception sdtune did not expect: its type, its first line, and how to report it."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(e).__name__}: {first}; {BUG}" if first else f"unexpected {type(e).__name__}; {BUG}"


def memory_line(e: BaseException) -> str:
    """The one line for running out of memory (host MemoryError, or torch's OutOfMemoryError)."""
    where = "GPU memory" if type(e).__name__ == "OutOfMemoryError" else "memory"
    return (f"out of {where} ({type(e).__name__}); try a smaller --batch-size or image size, fewer images at "
            "once, or close other programs")
