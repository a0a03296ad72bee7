"""One writer per run folder and per shared cache folder, across processes.

A lock is ``FOLDER/.sdtune.lock`` (``filelock``: ``flock`` on POSIX, released by the kernel when its process
dies, so a killed run never leaves a stale lock) plus ``FOLDER/.sdtune.lock.json`` naming the holder (pid,
host, command, since when), which the holder writes once it has the lock and which a refused process reads
for its message. ``run_lock`` refuses at once (two trainings interleaving one run's checkpoints and logs are
never right); ``cache_lock`` waits, saying for whom (two runs filling one cache take turns).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from sdtune.errors import SdtuneError
from sdtune.files import write_text

logger = logging.getLogger(__name__)

LOCK = ".sdtune.lock"
HOLDER = ".sdtune.lock.json"


class Busy(SdtuneError):
    """Another process holds the lock of a folder sdtune writes to."""


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, as a phrase: 'pid 1234 on host (sdtune train r.yaml, since 10:02:11)'."""
    try:
        h = json.loads((folder / HOLDER).read_text(encoding="utf-8"))
        return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid was not recorded yet)"


def _acquire(folder: Path, timeout: float) -> FileLock:
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK), timeout=timeout)
    lock.acquire()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["sdtune", *sys.argv[1:]])[:200],
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        write_text(folder / HOLDER, json.dumps(info))
    return lock


@contextlib.contextmanager
def run_lock(folder: str | Path, key: str = "train.output_dir") -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise Busy naming the process that holds it."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        lock = _acquire(folder, timeout=0)
    except Timeout:
        raise Busy(f"{key}: {folder} is in use by another sdtune run, {holder(folder)}; wait for it to finish, "
                   f"stop it, or choose another {key}") from None
    try:
        yield
    finally:
        lock.release()
        if created and {p.name for p in folder.iterdir()} <= {LOCK, HOLDER}:
            # a run refused before its first write leaves no folder behind
            for name in (HOLDER, LOCK):
                (folder / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def cache_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, waiting (and saying so) while another process writes there."""
    folder = Path(folder)
    try:
        lock = _acquire(folder, timeout=0)
    except Timeout:
        logger.info(f"waiting for {holder(folder)}, which is writing {what} in {folder}")
        lock = _acquire(folder, timeout=-1)
    try:
        yield
    finally:
        lock.release()
