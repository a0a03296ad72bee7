"""Prior preservation: make sure ``num_class_images`` class images exist, generating the missing ones.

Generated images get deterministic names (``class-00017.png``) and seeds (``seed + index``), are written
atomically, and are counted again on every start, so a run that crashed halfway continues where it stopped
and the next run with the same model and prompt reuses them. The cache folder is named by the model's
identity (the bytes of its files, ``sdtune.models.model_identity``), never by its path alone; one writer at a
time fills a folder (``sdtune.locks.cache_lock``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdtune.data import list_images
from sdtune.files import write_text
from sdtune.sample import save_image

MANIFEST = "sdtune_class_images.json"


def missing_class_indices(class_dir: Path, num_class_images: int) -> list[int]:
    """Indices of ``class-NNNNN.png`` still to generate so the folder holds ``num_class_images`` images
    (images the user put there count too)."""
    existing = list_images(class_dir)
    need = num_class_images - len(existing)
    names = {p.name for p in existing}
    missing, i = [], 0
    while len(missing) < need:
        if f"class-{i:05d}.png" not in names:
            missing.append(i)
        i += 1
    return missing


def other_class_images(class_dir: Path, class_prompt: str, model_id: str, model_identity: str | None = None) -> str | None:
    """The warning for a class-image folder whose record (``MANIFEST``, written when sdtune generated them) names
    another class prompt or model than this run's; ``model_identity``: also the model's files (None: its name
    only, as a check that reads no weights gives it). None when they match, or nothing is recorded."""
    try:
        old = json.loads((class_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    old = old if isinstance(old, dict) else {}
    same_place = _same_place(old.get("model"), model_id)
    if model_identity is not None and old.get("identity"):
        same_model = old["identity"] == model_identity  # the files decide, wherever they are now
    else:
        same_model = same_place
    if old.get("class_prompt") == class_prompt and same_model:
        return None
    changed = " (the same name, but its files have changed since)" if same_place and not same_model else ""
    return (f"{class_dir} holds class images made for '{old.get('class_prompt')}' with {old.get('model')}"
            f"{changed}, not '{class_prompt}' with {model_id}; they are used as they are (prior.class_dir is "
            "yours: sdtune does not replace its images; empty it to generate new ones)")


def _same_place(recorded: str | None, model_id: str) -> bool:
    """Whether a recorded model name and this run's name the same model: the same hub id, or the same local
    folder however written (training records absolute paths; a recipe may give ``models/sd15``)."""
    if recorded == model_id:
        return True
    if not recorded:
        return False
    a, b = Path(recorded).expanduser(), Path(model_id).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def ensure_class_images(
    pipe: Any,
    class_dir: Path,
    class_prompt: str,
    num_class_images: int,
    *,
    resolution: int,
    batch_size: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    model_id: str,
    model_identity: str = "",
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    max_sequence_length: int | None = None,
    missing: list[int] | None = None,
) -> list[str]:
    """Generate this process's share of the missing class images; return warnings for the user.
    ``max_sequence_length``: a T5 family's prompt length (the run's), given to the pipeline. ``missing``: the
    indices every process of the run listed before any of them wrote (``missing_class_indices``); a process
    listing the folder on its own after another wrote its share would take a shifted share and leave gaps."""
    class_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    manifest = class_dir / MANIFEST
    record = {"model": model_id, "identity": model_identity, "class_prompt": class_prompt, "resolution": resolution,
              "steps": steps, "guidance_scale": guidance_scale}
    if manifest.is_file():
        other = other_class_images(class_dir, class_prompt, model_id, model_identity)
        warnings += [other] if other else []
    elif process_index == 0:
        write_text(manifest, json.dumps(record, indent=2))

    todo = (missing_class_indices(class_dir, num_class_images) if missing is None else missing)[
        process_index::num_processes]
    if not todo:
        return warnings
    bar = tqdm(total=len(todo), desc="class images", disable=not progress, unit="img")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = pipe(
            [class_prompt] * len(batch),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            # One generator per image: image i is the same whatever the batch size or process count.
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in batch],
            **({"max_sequence_length": max_sequence_length} if max_sequence_length else {}),
        ).images
        for i, image in zip(batch, images):
            save_image(image, class_dir / f"class-{i:05d}.png")
        bar.update(len(batch))
    bar.close()
    return warnings
