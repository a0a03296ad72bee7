"""A run folder: what ``sdtune train`` writes where, and how the other commands find it again.

    RUN/config.yaml                          the resolved recipe
    RUN/pytorch_lora_weights.safetensors     the final LoRA, diffusers format (WEIGHT_NAME)
    RUN/<RUN>_kohya.safetensors              the same LoRA as one kohya file (KOHYA_SUFFIX)
    RUN/README.md                            the model card (CARD)
    RUN/checkpoints/step-NNNNNN/             verified checkpoints, each with a COMPLETE marker
    RUN/samples/step-NNNNNN.png              sample grids
    RUN/losses.jsonl, train_summary.json, logs/, eval/

``sdtune sample``, ``export``, ``eval`` and ``push`` take a run folder, one of its checkpoint folders or a
LoRA file; the functions here turn that into the LoRA files and the config it was trained with.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import yaml

from sdtune.errors import SdtuneError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = "_kohya.safetensors"
CARD = "README.md"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"  # written last into a checkpoint folder: the folder is whole


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoint folders (``checkpoints/step-NNNNNN`` with a marker), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file()) if root.is_dir() else []


def run_config(target: str | Path) -> dict:
    """The config a run folder, checkpoint folder or LoRA file inside one was trained with: a checkpoint's
    own ``state.json`` first (exact), else the nearest ``config.yaml`` above; {} if none."""
    target = Path(target)
    state = target / "state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("config") or {}
    for folder in (target, *target.parents[:3]):
        if (folder / CONFIG).is_file():
            return yaml.safe_load((folder / CONFIG).read_text()) or {}
    return {}


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
        return [(target.stem, str(target))]
    if not target.is_dir():
        raise SdtuneError(f"{target}: no such run folder, checkpoint folder or LoRA file")
    if checkpoints == "all":
        found = [(p.name, str(p / WEIGHT_NAME)) for p in complete_checkpoints(target) if (p / WEIGHT_NAME).is_file()]
        if not found:
            raise SdtuneError(f"--checkpoints all: {target} has no complete checkpoints")
        return found
    if (target / WEIGHT_NAME).is_file():
        return [(target.name, str(target / WEIGHT_NAME))]
    raise SdtuneError(f"{target}: no {WEIGHT_NAME} here; point at a run or checkpoint folder, or a LoRA file")


def step_of(label: str, lora_file: str | Path) -> int | None:
    """The training step of a LoRA: from its checkpoint folder name, else the run's train_summary.json."""
    m = re.fullmatch(r"step-(\d+)", label)
    if m:
        return int(m.group(1))
    summary = Path(lora_file).parent / "train_summary.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(summary.read_text())["global_step"])
    return None
