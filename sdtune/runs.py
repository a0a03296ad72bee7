"""A run folder: what ``sdtune train`` writes where, and how the other commands find it again.

    RUN/config.yaml                          the resolved recipe
    RUN/pytorch_lora_weights.safetensors     the final LoRA, diffusers format (WEIGHT_NAME)
    RUN/<RUN>_kohya.safetensors              the same LoRA as one kohya file (KOHYA_SUFFIX)
    RUN/README.md                            the model card (CARD)
    RUN/checkpoints/step-NNNNNN/             verified checkpoints, each with a COMPLETE marker
    RUN/samples/step-NNNNNN.png              sample grids
    RUN/losses.jsonl, train_summary.json, data_summary.json (what the kohya metadata tells of the data), logs/, eval/
    RUN/.sdtune-run, .sdtune.lock(.json)      the run's claim on the folder (RUN_MARKER), its lock (sdtune.locks)

``sdtune sample``, ``export``, ``eval`` and ``push`` take a run folder, one of its checkpoint folders or a
LoRA file; the functions here turn that into the LoRA files and the config it was trained with.

Every LoRA file is opened through ``open_safetensors`` (a corrupt or truncated file is one ``SdtuneError``,
never a SafetensorError traceback), and the files sdtune writes carry a mark (``MARK_KEY`` in safetensors
metadata, ``SOFTWARE`` in a PNG text chunk) so that ``written_by_sdtune`` can tell them from a user's files:
commands replace only their own files unless told ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sdtune import __version__
from sdtune.errors import SdtuneError, error_summary, first_line

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = "_kohya.safetensors"
CARD = "README.md"
CONFIG = "config.yaml"
LOSSES = "losses.jsonl"  # one JSON line per log point (sdtune.train.LossLog): the UI's loss curve, rewinds
CHECKPOINTS = "checkpoints"
EMBEDDINGS_DIR = "embeddings"  # pivotal tuning's token embeddings, one file per identifier (sdtune.pivotal)
MARKER = "COMPLETE"  # written last into a checkpoint folder: the folder is whole
RUN_MARKER = ".sdtune-run"  # written when a run claims a folder: sdtune may replace what it wrote there
STATE = "state.json"  # a checkpoint's own config and step
MARK_KEY = "sdtune"  # safetensors metadata key on every .safetensors sdtune writes; the value is its version
SOFTWARE = f"sdtune {__version__}"  # PNG "Software" text chunk on every picture sdtune writes


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoint folders (``checkpoints/step-NNNNNN`` with a marker), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file()) if root.is_dir() else []


def prompt_length(config: dict) -> int | None:
    """The T5 prompt length a run's saved config sets (``flux.`` / ``sd3.max_sequence_length``: only its own
    family's section can hold one), None where it sets none."""
    found = [v["max_sequence_length"] for v in config.values() if isinstance(v, dict) and v.get("max_sequence_length")]
    return found[0] if found else None


def run_config(target: str | Path) -> dict:
    """The config a run folder, checkpoint folder or LoRA file inside one was trained with: a checkpoint's
    own ``state.json`` first (exact), else the nearest ``config.yaml`` above; {} if none."""
    target = Path(target)
    state = target / STATE
    if state.is_file():
        config = (_read_mapping(state, json.loads) or {}).get("config") or {}
        if not isinstance(config, dict):
            raise SdtuneError(f"{state}: its 'config' is not a mapping; the checkpoint is damaged")
        return config
    for folder in (target, *target.parents[:3]):
        if (folder / CONFIG).is_file():
            return _read_mapping(folder / CONFIG, yaml.safe_load)
    return {}


def _read_mapping(path: Path, parse: Any) -> dict:
    """A run file (config.yaml, state.json) as a mapping, or one SdtuneError naming it (edited by hand, or
    damaged)."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise SdtuneError(f"{path}: cannot be read ({error_summary(e, 120)}); "
                          "restore it from the run, or point at the LoRA file with --model") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SdtuneError(f"{path}: expected a mapping of settings, got a {type(value).__name__}")
    return value


def run_root(target: str | Path) -> Path:
    """The run folder that ``target`` (run, checkpoint folder or LoRA file) belongs to, else its own folder."""
    target = Path(target)
    folder = target if target.is_dir() else target.parent
    for candidate in (folder, *folder.parents[:2]):
        if (candidate / CONFIG).is_file():
            return candidate
    return folder


def lora_files(target: str | Path, checkpoints: str | None = None) -> list[tuple[str, str]]:
    """(label, LoRA file) pairs that a TARGET names: the file itself, the run's or checkpoint's LoRA, or with
    ``checkpoints="all"`` one per complete checkpoint of the run, in training order."""
    target = Path(target)
    if target.is_file():
        if checkpoints == "all":
            raise SdtuneError(f"--checkpoints all: {target} is one LoRA file; give its run folder instead")
        safetensors_header(target)
        return [(target.stem, str(target))]
    if not target.is_dir():
        raise SdtuneError(f"{target}: no such run folder, checkpoint folder or LoRA file")
    if checkpoints == "all":
        found = [(p.name, str(p / WEIGHT_NAME)) for p in complete_checkpoints(target) if (p / WEIGHT_NAME).is_file()]
        if not found:
            raise SdtuneError(f"--checkpoints all: {target} has no complete checkpoints")
        for _, f in found:  # a broken file must stop the command now, not after the model has loaded
            safetensors_header(f)
        return found
    if (target / WEIGHT_NAME).is_file():
        safetensors_header(target / WEIGHT_NAME)
        return [(target.name, str(target / WEIGHT_NAME))]
    raise SdtuneError(missing_lora(target, "point at a run or checkpoint folder, or a LoRA file"))


def missing_lora(folder: Path, otherwise: str) -> str:
    """The one line for a folder without a LoRA: a run that stopped before its end names its newest checkpoint
    and how to finish it; any other folder gets ``otherwise``."""
    saved = complete_checkpoints(folder)
    if saved:
        return (f"{folder}: no final {WEIGHT_NAME}: the run stopped before its end; point at its newest checkpoint "
                f"{saved[-1]}, or finish the run with train.resume=latest")
    return f"{folder}: no {WEIGHT_NAME} here; {otherwise}"


def step_of(label: str, lora_file: str | Path) -> int | None:
    """The training step of a LoRA: from its checkpoint folder name, else the run's train_summary.json."""
    m = re.fullmatch(r"step-(\d+)", label)
    if m:
        return int(m.group(1))
    summary = Path(lora_file).parent / "train_summary.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(summary.read_text())["global_step"])
    return None


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a run folder (``config.yaml``) or a checkpoint folder (``state.json``):
    what exports must never write into. (Whether sdtune may *train* there is ``claimed_by_sdtune``.)"""
    folder = Path(folder)
    return (folder / CONFIG).is_file() or (folder / STATE).is_file()


def claimed_by_sdtune(folder: str | Path) -> bool:
    """Whether sdtune made ``folder`` a run folder: its marker (``RUN_MARKER``), or (runs of older versions)
    verified sdtune checkpoints. Files that merely share a run's names (README.md, config.yaml, losses.jsonl)
    are not enough: they may be another tool's, or the user's."""
    return (Path(folder) / RUN_MARKER).is_file() or bool(complete_checkpoints(folder))


# --------------------------------------------------------------------------------------------------------
# safetensors files, read safely

# bytes per element of each safetensors dtype (safetensors' Dtype enum); an unknown one skips the size check
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _not_safetensors(path: str | Path, why: str) -> SdtuneError:
    return SdtuneError(f"{path} is not a readable safetensors file (truncated or corrupt: {why})")


def _check_entries(path: str | Path, header: dict, data_size: int) -> None:
    """Every tensor's byte range lies in the file and matches its shape; the last one ends the file."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
            dtype = entry["dtype"]
        except (TypeError, KeyError, ValueError) as e:
            raise _not_safetensors(path, f"tensor {name!r} has a malformed entry ({type(e).__name__})") from None
        if dtype in _DTYPE_BYTES and stop - start != count * _DTYPE_BYTES[dtype]:
            raise _not_safetensors(path, f"tensor {name!r} holds {stop - start} bytes for {count} {dtype} values")
        end = max(end, stop)
    if end != data_size:
        raise _not_safetensors(path, f"its tensors need {end} bytes of data, the file holds {data_size}")


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file, after checking that it parses and that the tensors it
    lists fill the file exactly (a truncated download or copy fails here). Reads only the header: no torch,
    no tensor data. Raises ``SdtuneError`` naming the file and what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
    except OSError as e:
        raise SdtuneError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if n < 0:
        raise _not_safetensors(path, f"{size} bytes, shorter than a safetensors header")
    if not raw:
        raise _not_safetensors(path, f"its header claims {n} bytes, the file has {size}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _not_safetensors(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise _not_safetensors(path, "its metadata is not a JSON object")
    _check_entries(path, header, size - 8 - n)
    return header


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``SdtuneError`` if it is not a readable one)."""
    return dict(safetensors_header(path).get("__metadata__") or {})


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safetensors.safe_open(path, "pt")``, the one way sdtune opens a LoRA file: the header is checked
    first, and any error of the reader (inside the ``with`` block too) becomes one ``SdtuneError``."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except SafetensorError as e:
        raise _not_safetensors(path, first_line(e, 200)) from None


# --------------------------------------------------------------------------------------------------------
# Files sdtune wrote, and files it must not replace


def _png_software(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return str(im.info.get("Software") or "")


def _json_by_sdtune(path: Path) -> bool:
    data = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and "sdtune_version" in data  # cell sidecars, eval's report.json


def written_by_sdtune(path: str | Path) -> bool:
    """Whether sdtune wrote ``path``, by its mark: ``MARK_KEY`` in a .safetensors' metadata, the
    ``SOFTWARE`` text chunk of a .png, ``sdtune_version`` in a .json. False for anything else or unreadable."""
    path = Path(path)
    readers = {".safetensors": lambda p: MARK_KEY in safetensors_metadata(p),
               ".png": lambda p: _png_software(p).startswith("sdtune "), ".json": _json_by_sdtune}
    reader = readers.get(path.suffix.lower())
    if reader is None or not path.is_file():
        return False
    try:
        return bool(reader(path))
    except Exception:  # unreadable, corrupt, not an image: not a file sdtune wrote, whatever the reason
        return False


def cells_folder(grid: str | Path) -> Path:
    """The folder beside a grid picture where ``sdtune sample`` writes its cells and their sidecars."""
    grid = Path(grid)
    return grid.with_name(grid.stem + "_cells")


def cell_by_sdtune(path: str | Path) -> bool:
    """Whether sdtune wrote a grid cell (``cell-NNNN.png``) or its ``.json`` sidecar; a picture from before
    pictures were marked counts when its sidecar is sdtune's."""
    path = Path(path)
    return written_by_sdtune(path) or (path.suffix.lower() == ".png" and written_by_sdtune(path.with_suffix(".json")))


def grid_by_sdtune(path: str | Path) -> bool:
    """Whether sdtune wrote a sample grid: by its mark, or (an unmarked, older one) by its cells' sidecars."""
    return written_by_sdtune(path) or written_by_sdtune(cells_folder(path) / "cell-0000.json")


def check_output_file(path: str | Path, flag: str, overwrite: bool = False, *, ours: bool | None = None) -> None:
    """Refuse, before any work, to write the file ``path``: when it is a folder, when a folder above it is a
    file or cannot be written, or when it exists and sdtune did not write it (``ours``: that verdict, when
    the caller knows better than the file's mark) unless ``overwrite``. ``flag`` names the option."""
    path = Path(path)
    if path.is_dir():
        raise SdtuneError(f"{flag}: {path} is a folder; give a file name (inside it, or beside it)")
    check_output_folder(path.parent, flag)
    if path.exists() and not overwrite and not (written_by_sdtune(path) if ours is None else ours):
        raise SdtuneError(f"{flag}: {path} exists and sdtune did not write it; choose another name, or pass "
                          "--overwrite to replace it")


def check_output_folder(folder: str | Path, flag: str) -> None:
    """Refuse a folder that cannot be made or written: a file in its place (or above it), or a nearest
    existing folder in which a file cannot be created (permissions, a read-only or pseudo file system)."""
    folder = Path(folder)
    for existing in (folder, *folder.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise SdtuneError(f"{flag}: {existing} is a file, so {folder} cannot be a folder; choose another path")
    try:  # a real write, not os.access: ACLs, read-only mounts and /proc answer it, and root is not exempt
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise SdtuneError(f"{flag}: cannot write in {existing} ({e.strerror or type(e).__name__}); choose another "
                          "path") from None
