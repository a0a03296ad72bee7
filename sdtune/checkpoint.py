"""Checkpoints that survive kills and full disks, and resume exactly.

A checkpoint is written into ``checkpoints/.tmp-step-NNNNNN/``, every file fsynced, with ``manifest.json``
(size and sha256 of each file) and a ``COMPLETE`` marker, then renamed to ``checkpoints/step-NNNNNN/``. A
kill at any moment leaves either the previous checkpoints alone or a temporary folder that the next start
ignores and removes. Resuming verifies the manifest first (``sdtune.resume``): a corrupt checkpoint is named and never loaded.
Old checkpoints are pruned only after the new one verifies.

A resume from a checkpoint earlier than the run's newest (a rewind: ``train.resume=RUN/checkpoints/step-000008``
on a run that reached step 20) first makes the run folder read as a run at that step (``rewind``): the later
checkpoints, sample grids and final LoRA files move into ``checkpoints/abandoned-<time>/`` with the losses
logged after that step, and ``losses.jsonl`` is rewritten to end there, so that it always reads in step order
and ``train.resume=latest`` never picks a checkpoint of the abandoned branch.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from sdtune.ema import EMA_FILE, AdapterEMA, ema_weights
from sdtune.errors import DiskFull, SdtuneError
from sdtune.families import Family
from sdtune.files import free_bytes, fsync, is_disk_full, mib, sha256_file, write_bytes, write_text
from sdtune.fsdp import full_optimizer_state, shard_optimizer_state
from sdtune.lora import adapter_state_dict, load_adapter_state_dict, save_diffusers_lora
from sdtune.optim import averaged_weights
from sdtune.pivotal import ROWS_FILE, Embeddings
from sdtune.resume import MANIFEST, STATE, config_drift, find_checkpoint, flat_keys, resume_drift, verify
from sdtune.runs import CHECKPOINTS, EMBEDDINGS_DIR, LOSSES, MARKER, complete_checkpoints

__all__ = ["DiskFull", "config_drift", "find_checkpoint", "flat_keys", "load_checkpoint", "rewind", "save_checkpoint",
           "verify"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Random state


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a step draws from: Python, NumPy, torch (CPU, CUDA) and the training generator."""
    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# Files


def write_manifest(folder: Path) -> None:
    """fsync every file, then record its size and sha256, then the marker (each fsynced, then the folder)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, MARKER))
    files += sorted((folder / EMBEDDINGS_DIR).glob("*.safetensors"))  # pivotal tuning's, one per identifier
    for p in files:
        fsync(p)
    manifest = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync(folder / MANIFEST)
    (folder / MARKER).write_text("ok\n")
    fsync(folder / MARKER)
    fsync(folder)


def _discard(folder: Path) -> None:
    """Delete a checkpoint so that a kill halfway never leaves a half-deleted one that looks complete:
    first an atomic rename to a temporary name (which the next start removes), then the deletion."""
    doomed = folder.with_name(f".tmp-discard-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_temporary(output_dir: Path) -> list[Path]:
    """Remove temporary folders left by a save that was killed; return what was removed."""
    root = output_dir / CHECKPOINTS
    leftovers = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


# --------------------------------------------------------------------------------------------------------
# Save and load


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def checkpoint_bytes(states: dict[str, dict[str, torch.Tensor]]) -> int:
    """About what one checkpoint takes on disk: the fp32 adapters, AdamW's two moments of each, and the
    diffusers LoRA file beside them."""
    return 4 * sum(v.numel() * v.element_size() for sd in states.values() for v in sd.values()) + 2**16


def save_checkpoint(
    accelerator: Any, output_dir: Path, global_step: int, trained: dict[str, torch.nn.Module], optimizer: Any,
    lr_scheduler: Any, generator: torch.Generator, config: dict, family: Family, limit: int | None,
    data: dict | None = None, ema: AdapterEMA | None = None, embeddings: Embeddings | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNN/`` atomically and verified, then prune old ones (main process writes
    all but the per-process random state). With ``ema`` (``train.ema``) the adapters are still the training
    weights (what a resume continues), ``ema.pt`` holds the average, and the LoRA file is the average.
    Every process calls this: under FSDP the adapters and the optimizer's moments are gathered whole first
    (``sdtune.fsdp``), so the files are those a DDP run writes."""
    root = output_dir / CHECKPOINTS
    final = root / f"step-{global_step:06d}"
    tmp = root / f".tmp-step-{global_step:06d}"
    states = {name: adapter_state_dict(module) for name, module in trained.items()}
    optimizer_state = full_optimizer_state(optimizer)
    bad = [f"{name}.{k}" for name, sd in states.items() for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:  # never write a checkpoint that would poison a resume or an export
        raise SdtuneError(f"LoRA weights are not finite at step {global_step} ({bad[0]}); nothing was saved")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Every process keeps its own random streams (noise differs per process).
        write_bytes(tmp / f"rng-{accelerator.process_index}.pt", _torch_bytes(rng_state(generator)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, sd in states.items():
                write_bytes(tmp / f"adapter-{name}.safetensors", save(sd))
            write_bytes(tmp / "optimizer.pt", _torch_bytes(optimizer_state))
            write_bytes(tmp / "lr_scheduler.pt", _torch_bytes(lr_scheduler.state_dict()))
            if ema is not None:
                write_bytes(tmp / EMA_FILE, ema.state_bytes())
            if embeddings is not None:  # the training rows, what a resume continues
                write_bytes(tmp / ROWS_FILE, save(embeddings.state()))
            # the checkpoint's LoRA file is what the run shows: the average with EMA or a schedule-free optimizer
            # (read again only then, never under FSDP, where gathering takes every process); the adapters above
            # are the training weights, what a resume continues
            with ema_weights(ema), averaged_weights(optimizer) as averaged:
                shown = (states if ema is None and not averaged
                         else {name: adapter_state_dict(m) for name, m in trained.items()})
                save_diffusers_lora(tmp, family, trained, (config.get("model") or {}).get("pretrained"), shown)
                if embeddings is not None:  # and the embedding files that go with it
                    embeddings.save(tmp)
            # the data fingerprint ({"instance": ..., "class": ...}, sdtune.resume.fingerprint) lets a resume
            # refuse photos added, removed or edited since
            state = {"global_step": global_step, "num_processes": accelerator.num_processes, "config": config,
                     "data": data or {}}
            write_bytes(tmp / STATE, json.dumps(state, indent=2).encode())
            write_manifest(tmp)
            if final.exists():  # saving the same step again (a resume at max_steps): replace it whole
                _discard(final)
            tmp.rename(final)
            fsync(root)
    except Exception as e:  # an OSError, or a disk error inside a library's writer (diffusers' LoRA file)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFull(
                f"disk full while saving checkpoint step {global_step} in {root}: its temporary files were "
                f"removed and the earlier checkpoints are intact; a checkpoint needs about "
                f"{mib(checkpoint_bytes(states))} ({mib(free_bytes(root))} free): free space, then "
                "train.resume=latest"
            ) from None
        if isinstance(e, OSError):
            raise SdtuneError(f"could not save checkpoint step {global_step} in {root}: {e}") from None
        raise
    if accelerator.is_main_process and limit:
        problem = verify(final)
        if problem:  # keep every older checkpoint if the new one does not read back
            raise SdtuneError(f"checkpoint {final} did not verify after saving ({problem}); older ones kept")
        for old in complete_checkpoints(output_dir)[:-limit]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path, accelerator: Any, trained: dict[str, torch.nn.Module], optimizer: Any, lr_scheduler: Any,
    generator: torch.Generator, config: dict, ema: AdapterEMA | None = None, embeddings: Embeddings | None = None,
) -> int:
    """Restore adapters, optimizer, LR schedule, random streams (and the EMA); return the step to continue
    from."""
    state = json.loads((path / "state.json").read_text())
    drift = resume_drift(state, config)
    if drift:
        raise SdtuneError(
            f"train.resume: {path} was trained with a different config ({', '.join(drift)}); "
            "fix: restore those values, or start a new output_dir"
        )
    if state.get("num_processes", 1) != accelerator.num_processes:
        raise SdtuneError(
            f"train.resume: {path} was written by {state.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}; the data order would change. Launch with the same count"
        )
    for name, module in trained.items():
        load_adapter_state_dict(module, load_file(path / f"adapter-{name}.safetensors"))
    # whole moments (as every run writes them), cut to this process's shards under FSDP
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(shard_optimizer_state(optimizer, saved))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True), generator)
    if embeddings is not None:
        embeddings.load_state(load_file(path / ROWS_FILE))
    if ema is not None:
        _load_ema(path, ema)
    return int(state["global_step"])


def _load_ema(path: Path, ema: AdapterEMA) -> None:
    """The checkpoint's average; a checkpoint of an sdtune without train.ema has none, so it starts anew from
    the resumed weights (said, not silent)."""
    if (path / EMA_FILE).is_file():
        ema.load(path / EMA_FILE)
        return
    ema.restart()
    logger.warning(f"train.ema: {path.name} holds no EMA (it was trained without it); the average starts "
                   "from its weights now")


# --------------------------------------------------------------------------------------------------------
# Rewinding

SAMPLES = "samples"
ABANDONED = "abandoned-"  # checkpoints/abandoned-<time>/: what a rewind set aside (complete_checkpoints skips it)
_STEP = re.compile(r"step-(\d+)")


def _step_of(path: Path) -> int:
    """12 for ``step-000012`` or ``step-000012.png``; -1 for a name without one."""
    found = _STEP.match(path.name)
    return int(found.group(1)) if found else -1


def _log_up_to(path: Path, step: int) -> tuple[list[str], list[str]]:
    """(kept, dropped) lines of ``losses.jsonl``: kept, the last line of each step up to ``step``, in step order
    (an earlier sdtune appended a rewound run's steps after the old ones); dropped, every other line in file
    order (steps past ``step``, repeated steps, a line a kill cut short)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], []
    latest: dict[int, int] = {}  # step -> index of its last line
    for i, line in enumerate(lines):
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, TypeError, KeyError):
            continue
        if logged <= step:
            latest[logged] = i
    kept_at = set(latest.values())
    kept = [lines[i] for _, i in sorted(latest.items())]
    if kept == lines:
        return kept, []
    return kept, [line for i, line in enumerate(lines) if i not in kept_at]


def _aside_folder(root: Path) -> Path:
    """A new ``checkpoints/abandoned-<local time>/`` (``-2``, ``-3`` ... after one of the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / f"{ABANDONED}{stamp}", 1
    while folder.exists():
        n += 1
        folder = root / f"{ABANDONED}{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def _size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def rewind(output_dir: Path, step: int, final_files: list[Path]) -> list[str]:
    """Make a run folder read as a run at ``step``, the step a run continues from, before it trains: returns
    what was done, one line each (none when nothing lay past ``step``).

    Checkpoints and sample grids of later steps (a resume from an earlier checkpoint than the newest) move into
    a new ``checkpoints/abandoned-<time>/`` (as ``step-NNNNNN/``, ``samples/``), with ``final_files`` that exist
    (the last finish's LoRA files, which belong to those steps: files or folders directly in the run folder,
    named relative or absolute) and the dropped lines of ``losses.jsonl``;
    nothing is deleted. Without later checkpoints or grids (a run killed between a log line and its next
    checkpoint) the lines past ``step`` are dropped and said: those steps are trained again, exactly.
    ``losses.jsonl`` is rewritten atomically, ending at ``step`` in step order. Main process only."""
    later = [p for p in complete_checkpoints(output_dir) if _step_of(p) > step]
    grids = sorted(p for p in (output_dir / SAMPLES).glob("step-*.png") if _step_of(p) > step)
    kept, dropped = _log_up_to(output_dir / LOSSES, step)
    if not later and not grids:
        if not dropped:
            return []
        write_text(output_dir / LOSSES, "".join(f"{line}\n" for line in kept))
        return [f"{LOSSES}: removed {len(dropped)} line{'s' if len(dropped) > 1 else ''} past step {step} or repeated "
                "(logged by a run that stopped before its next checkpoint): this run trains those steps again"]
    aside = _aside_folder(output_dir / CHECKPOINTS)
    finals = [f for f in final_files if f.exists()]
    if dropped:  # first: a kill halfway through leaves the old tail kept, and the next start finishes the rest
        write_text(aside / LOSSES, "".join(f"{line}\n" for line in dropped))
    for p in later:  # each an atomic rename: a checkpoint is whole here or there
        p.rename(aside / p.name)
    for p in grids:
        (aside / SAMPLES).mkdir(exist_ok=True)
        p.rename(aside / SAMPLES / p.name)
    for p in finals:  # each directly in the run folder (a file, or the embeddings/ folder)
        p.rename(aside / p.name)
    if dropped:
        write_text(output_dir / LOSSES, "".join(f"{line}\n" for line in kept))
    fsync(output_dir / CHECKPOINTS)
    moved = [", ".join(p.name for p in later)] if later else []
    moved += [f"{len(grids)} sample grid{'s' if len(grids) > 1 else ''}"] if grids else []
    moved += ["the final LoRA files"] if finals else []
    moved += [f"{len(dropped)} line{'s' if len(dropped) > 1 else ''} of {LOSSES}"] if dropped else []
    return [f"rewinding to step {step}: what came after it ({'; '.join(moved)}) is set aside in {aside} "
            f"({mib(_size([aside]))}: delete that folder when you no longer need it); {LOSSES} ends at step {step}"]
