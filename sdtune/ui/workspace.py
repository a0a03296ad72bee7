"""The workspace folder of ``sdtune ui`` and ``confine``, through which every endpoint that serves or writes
a file resolves its path.

    WORKSPACE/photos/            uploaded photos (+ NAME.txt captions, read by ``prep --caption-from txt``)
    WORKSPACE/photos_dropped/    photos dropped with one click (kept, out of the dataset)
    WORKSPACE/dataset/           what ``sdtune prep`` writes (metadata.jsonl, prep_report.json, contact sheet)
    WORKSPACE/models/micro/      the shipped micro model, written on first use (the offline default)
    WORKSPACE/runs/NAME/         training runs;  WORKSPACE/jobs/NAME/  job state (``sdtune.ui.jobs``)
    WORKSPACE/compare/, exports/ comparison grids, exported LoRA files
    WORKSPACE/ui_state.json      crop boxes, starting crop and flags of the photos
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError

STATE = "ui_state.json"
FOLDERS = ("photos", "photos_dropped", "dataset", "models", "runs", "jobs", "compare", "exports")


def confine(root: str | Path, requested: str | Path) -> Path:
    """``requested`` (relative to ``root``) as a real path inside ``root``; SdtuneError for anything that would
    leave it: an absolute path, ``..``, a symlink (at any level) pointing out, a NUL byte.

    Symlinks are resolved before the check (``realpath``), so a link inside the workspace that points out is
    refused, and a link that stays inside is followed."""
    text = os.fspath(requested)
    if "\0" in text:
        raise SdtuneError("path refused: it contains a NUL byte")
    if os.path.isabs(text) or text.startswith(("\\", "~")):
        raise SdtuneError(f"path refused: {text!r} is absolute; paths are relative to the workspace")
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, text))
    if full != base and not full.startswith(base + os.sep):
        raise SdtuneError(f"path refused: {text!r} is outside the workspace")
    return Path(full)


class Workspace:
    """The folder the UI works in; every file path the UI takes from a request goes through ``path``."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.realpath(root))
        self.root.mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            (self.root / name).mkdir(exist_ok=True)

    def path(self, requested: str | Path) -> Path:
        """``confine`` to this workspace."""
        return confine(self.root, requested)

    def rel(self, path: str | Path) -> str:
        """A path inside the workspace as the relative POSIX string the page uses."""
        return Path(os.path.realpath(path)).relative_to(self.root).as_posix()

    def state(self) -> dict[str, Any]:
        """ui_state.json ({} before the first write, or if it was damaged)."""
        try:
            value = json.loads((self.root / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        """Write ui_state.json whole (a temporary file renamed over it: a crash leaves the old one)."""
        write_json(self.root / STATE, state)


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically (two tabs may write; a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)
