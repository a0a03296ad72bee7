"""Files sdtune writes: whole or not at all, and where its caches live.

``atomic_path`` is the one way sdtune writes a file that a crash must not leave half-written (sample
grids, class images, latent cache entries, LoRA exports): the bytes go to a hidden temporary name beside
the target, which is renamed over it only once complete. ``cache_root`` is the one cache folder (latents,
class images), ``$SDTUNE_CACHE`` or ``~/.cache/sdtune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """sdtune's cache folder: ``$SDTUNE_CACHE``, else ``~/.cache/sdtune`` (not created here)."""
    return Path(os.environ.get("SDTUNE_CACHE") or Path.home() / ".cache" / "sdtune")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed to ``path`` (atomic on
    one filesystem), on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (a rename across filesystems is a copy), hidden, and ending in .tmp so that readers which
    # list a folder by extension (images, *.safetensors) never see it.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
