"""What a resume may find changed, checked before any weight loads or any byte is written.

A checkpoint records the config it was trained with and a fingerprint of its data (each image's name,
size, content hash and caption; class images too). ``train.resume`` continues it only if neither changed in
a way that alters the run: a changed option (other than ``RESUMABLE_CHANGES``), an added, removed or edited
photo, or a new caption is refused, listing what changed. The checkpoint itself is verified against its
manifest (sizes and sha256) first: a corrupt one is named and never loaded.

No torch here: ``sdtune train --dry-run`` runs these checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.files import content_hash, sha256_file
from sdtune.runs import EMBEDDINGS_DIR, MARKER, STATE, complete_checkpoints

MANIFEST = "manifest.json"

# Keys of the config that may change between a checkpoint and its resume; anything else alters the run.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.resume", "train.log_every", "train.report_to", "train.checkpoint_every",
    "train.checkpoints_total_limit", "train.dataloader_workers", "train.output_dir", "train.offload_frozen",
    "train.compile", "train.compile_mode", "train.compile_backend", "train.channels_last", "train.allow_tf32",
    "train.max_nonfinite_steps", "train.checkpoint_every_epochs", "train.validation_every", "sample",
    "train.ema_on_cpu", "data.validation_dir",  # where the average lives, what is measured: same training
}


# --------------------------------------------------------------------------------------------------------
# Config drift


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: config keys as the user writes them."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


# Keys holding local paths: compared as absolute paths (runs store them resolved; older runs relative)
PATH_KEYS = {"model.pretrained", "model.base", "model.vae", "data.instance_dir", "data.dataset", "prior.class_dir"}


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return False


def config_drift(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run's, except harmless ones.

    Keys only one side has (an option added or removed by another sdtune version) are not compared: a newer
    sdtune must resume the checkpoints of an older one."""
    a, b = flat_keys(saved), flat_keys(current)
    return sorted(
        k for k in set(a) & set(b)
        if not _same(k, a[k], b[k]) and k not in RESUMABLE_CHANGES and k.split(".")[0] not in RESUMABLE_CHANGES
    )


# --------------------------------------------------------------------------------------------------------
# Data fingerprints


def fingerprint(items: list[tuple[Path, str]]) -> dict[str, dict[str, Any]]:
    """{file name: {size, sha256, caption}} of (image, caption) pairs: what a checkpoint remembers of its data.
    Hashes come from ``content_hash``, so an unchanged image is not read again on the next start."""
    return {p.name: {"size": p.stat().st_size, "sha256": content_hash(p), "caption": caption} for p, caption in items}


def data_drift(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What changed between two fingerprints, one phrase per kind: 'added: a.png, b.png'."""
    changes = {
        "added": sorted(set(current) - set(saved)),
        "removed": sorted(set(saved) - set(current)),
        "content changed": sorted(n for n in set(saved) & set(current)
                                  if saved[n].get("sha256") != current[n]["sha256"]),
        "caption changed": sorted(n for n in set(saved) & set(current)
                                  if saved[n].get("caption") != current[n]["caption"]),
    }
    return [f"{kind}: {_names(names)}" for kind, names in changes.items() if names]


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def refuse_data_drift(checkpoint: Path, state: dict, kind: str, current: dict[str, dict]) -> str | None:
    """A problem line if the ``kind`` ("instance" or "class") images differ from the checkpoint's, else None."""
    saved = (state.get("data") or {}).get(kind)
    if saved is None:  # a checkpoint of an sdtune that did not record its data: nothing to compare
        return None
    drift = data_drift(saved, current)
    if not drift:
        return None
    dataset = ((state.get("config") or {}).get("data") or {}).get("dataset")  # a run trained from data.dataset
    where = ("data.dataset" if dataset else "data.instance_dir (or data.concepts' folders)") if kind == "instance" \
        else "prior (class images)"
    return (f"train.resume: the {kind} images changed since {checkpoint.name} ({'; '.join(drift)}); resuming would "
            f"train a different run. fix: restore {where} as it was, or start a new train.output_dir")


# --------------------------------------------------------------------------------------------------------
# Finding and verifying a checkpoint


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and every file matches its manifest, else the reason."""
    if not (folder / MARKER).is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in manifest.items()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"its {MANIFEST} is missing or unreadable"
    for name, size, sha256 in entries:
        p = folder / name
        parts = Path(name).parts
        # files of the checkpoint itself, and its embeddings/ folder (pivotal tuning), nothing else
        if not (parts == (name,) or (len(parts) == 2 and parts[0] == EMBEDDINGS_DIR)) or ".." in parts:
            return f"its {MANIFEST} names {name!r}, outside the checkpoint"
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {size}"
        if sha256_file(p) != sha256:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest complete one for 'latest', or the given folder.
    A corrupt one is an error naming it, never skipped silently and never loaded."""
    if resume != "latest":
        path = Path(resume)
        problem = verify(path)
        if problem:
            raise SdtuneError(f"train.resume: {path} cannot be used: {problem}")
        return path
    done = complete_checkpoints(output_dir)
    if not done:
        return None
    problem = verify(done[-1])
    if problem:
        older = f"; the previous one is {done[-2]}: pass train.resume={done[-2]}" if len(done) > 1 else ""
        raise SdtuneError(
            f"train.resume=latest: the newest checkpoint {done[-1]} is corrupt ({problem}); it was not loaded"
            f"{older}, or delete the corrupt folder"
        )
    return done[-1]


def read_state(checkpoint: Path) -> dict:
    """A verified checkpoint's ``state.json`` (step, process count, config, data fingerprint)."""
    try:
        state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdtuneError(f"train.resume: cannot read {checkpoint / STATE}: {e}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise SdtuneError(f"train.resume: {checkpoint / STATE} is not an sdtune checkpoint state")
    return state


def resume_drift(state: dict, config: dict) -> list[str]:
    """``config_drift`` between a checkpoint's state and this run's config, where the base model's location
    (``model.pretrained`` / ``model.base``) may change when the checkpoint recorded what the base is: the model
    folder moved to another disk, a hub id became a local copy. ``check_resume`` then compares the bytes."""
    drift = config_drift(state.get("config") or {}, config)
    if ((state.get("data") or {}).get("model") or {}).get("identity"):
        drift = [k for k in drift if k not in ("model.pretrained", "model.base")]
    return drift


def _base_drift(checkpoint: Path, state: dict, model_identity: Callable[[], str] | None, config: dict) -> str | None:
    """Why the base model is not the one ``checkpoint`` was trained on (its files were replaced, or the hub
    snapshot moved), or None. The same ``model.pretrained`` no longer means the same weights then: a resume
    would continue a LoRA on a model it was not trained for."""
    recorded = ((state.get("data") or {}).get("model") or {}).get("identity")
    if not recorded or model_identity is None:
        return None
    try:
        now = model_identity()
    except SdtuneError as e:
        return str(e)
    if now == recorded:
        return None
    pretrained = (config.get("model") or {}).get("pretrained")
    return (f"train.resume: the base model is not the one {checkpoint} was trained on: the files of model.pretrained "
            f"{pretrained} changed since (identity {recorded}, now {now}); fix: point it at the weights the run was "
            "trained on, or start a new train.output_dir")


def check_resume(output_dir: Path, resume: str, config: dict, instance: dict[str, dict],
                 problems: list[str], warnings: list[str],
                 model_identity: Callable[[], str] | None = None) -> tuple[Path, dict] | None:
    """The checkpoint a resume continues and its state, or None (no resume, or nothing saved yet). Problems
    (corrupt checkpoint, changed config, changed data, other base weights at the same ``model.pretrained``:
    ``model_identity`` gives the base's now, asked only when the checkpoint recorded one) are appended to
    ``problems``, what cannot be checked to ``warnings``."""
    try:
        checkpoint = find_checkpoint(output_dir, resume)
        if checkpoint is None:
            return None
        state = read_state(checkpoint)
    except SdtuneError as e:
        problems.append(str(e))
        return None
    step, max_steps = int(state["global_step"]), int(config["train"]["max_steps"])
    if step > max_steps:
        problems.append(f"train.max_steps: {max_steps} is below the step of {checkpoint} ({step}), which is where a "
                        f"resume continues; fix: train.max_steps={step} or more, or resume an earlier checkpoint")
    drift = resume_drift(state, config)
    if drift:
        problems.append(f"train.resume: {checkpoint} was trained with a different config ({', '.join(drift)}); "
                        "fix: restore those values, or start a new train.output_dir")
    problem = refuse_data_drift(checkpoint, state, "instance", instance)
    if problem:
        problems.append(problem)
    problem = _base_drift(checkpoint, state, model_identity, config)
    if problem:
        problems.append(problem)
    if "data" not in state:
        warnings.append(f"train.resume: {checkpoint} was saved by an sdtune that did not record its images, so "
                        "changes to data.instance_dir since cannot be detected")
    return checkpoint, state
