"""The whole evaluation: prepare the scorer, render (or reuse) every checkpoint's cells, score, recommend and
write the reports.

Cells are drawn by ``sdtune sample``'s renderer, one grid per checkpoint under ``out/samples``, each image with
its JSON sidecar in ``samples/<checkpoint>_cells/`` (``sdtune sample --replay`` renders it again). Run again
with the same settings, eval reuses the images whose sidecars match, so re-scoring samples nothing; an
interrupted eval keeps every cell it finished, and the same command again renders only the others.

LoRA scale 0 is the base model, the same pixels at every checkpoint: those cells are rendered once (keyed
without their checkpoint) and written into every checkpoint's cells folder, so each folder stays complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from sdtune.errors import Interrupted
from sdtune.eval.core import EvalSpec, Row, Scorer, cell_path, eval_cells, read_rendered
from sdtune.eval.report import write_reports
from sdtune.files import sha256_file
from sdtune.grid import Cell
from sdtune.images import open_image
from sdtune.runs import safetensors_header
from sdtune.sample import UNFINISHED, Request, run_sample, with_family_defaults

logger = logging.getLogger(__name__)


def eval_device(spec: EvalSpec) -> str:
    """The device images are rendered (and scored) on: ``--device``, else cuda when there is one."""
    return spec.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _on_disk(cells_dir: Path, i: int, cell: Cell, spec: EvalSpec, lora_sha: str) -> bool:
    """Whether cell ``i`` is on disk, rendered with the same LoRA, model and settings."""
    image = cell_path(cells_dir, i)
    sidecar = image.with_suffix(".json")
    if not (sidecar.is_file() and image.is_file()):
        return False
    try:
        d = json.loads(sidecar.read_text())
    except ValueError:
        return False
    return (isinstance(d, dict) and d.get("cell") == asdict(cell) and d.get("settings") == asdict(spec.settings)
            and d.get("lora_sha256") == lora_sha and d.get("model") in {spec.model, str(Path(spec.model).resolve())}
            and d.get("dtype") == spec.dtype and d.get("device") == eval_device(spec)
            and (d.get("model_options") or {}) == spec.model_options)


def _reusable(cells_dir: Path, cells: list[Cell], spec: EvalSpec, lora_sha: str) -> bool:
    """Whether every cell is already on disk, rendered with the same LoRA, model and settings, and its grid drawn
    (an interrupt may come after the last cell: ``run_sample`` then draws it from the cells)."""
    return not (cells_dir / UNFINISHED).exists() and all(_on_disk(cells_dir, i, cell, spec, lora_sha)
                                                         for i, cell in enumerate(cells))


def _base_key(cell: Cell) -> Cell | None:
    """The key of a base-model cell (LoRA scale 0) shared by every checkpoint: the cell without its checkpoint;
    None for a cell that needs its checkpoint's LoRA."""
    return replace(cell, checkpoint=None) if cell.lora_scale == 0 else None


def _is_dora(lora_file: str | Path) -> bool:
    """Whether a LoRA has DoRA magnitudes: at scale 0 it still rescales the base weights, so it is not the
    base model and its scale-0 cells are its own."""
    return any(k.endswith(("lora_magnitude_vector", ".dora_scale")) or ".lora_magnitude_vector." in k
               for k in safetensors_header(lora_file))


def _remember(shared: dict[Cell, Image.Image], cells_dir: Path, cells: list[Cell], spec: EvalSpec,
              lora_sha: str) -> None:
    """Add the base-model cells of ``cells_dir`` that are on disk and up to date to ``shared``."""
    for i, cell in enumerate(cells):
        key = _base_key(cell)
        if key is not None and key not in shared and _on_disk(cells_dir, i, cell, spec, lora_sha):
            shared[key] = open_image(cell_path(cells_dir, i), "eval")


def render(spec: EvalSpec, out: Path, class_images: bool,
           progress: bool = True) -> tuple[dict[str, Path], list[str]]:
    """Render (or reuse) every checkpoint's cells under ``out/samples``; ``class_images``: the class prompt
    too. Returns ({label: cells folder}, one line per failed cell)."""
    # the settings as the sampler resolves them for this model (FLUX / SD3: their own scheduler and T5 prompt
    # length), which every sidecar records: compared unresolved, no cell of theirs was ever reused
    spec = replace(spec, settings=with_family_defaults(Request(
        model=spec.model, lora=[], cells=[], settings=spec.settings, revision=spec.revision,
        model_options=spec.model_options)).settings)
    folders: dict[str, Path] = {}
    failures: list[str] = []
    shared: dict[Cell, Image.Image] = {}  # base-model cells, keyed without their checkpoint
    for n, (label, lora_file) in enumerate(spec.loras, 1):
        cells = eval_cells(spec, label, class_images)
        grid = out / "samples" / f"{label}.png"
        cells_dir = grid.with_name(grid.stem + "_cells")
        folders[label] = cells_dir
        lora_sha, plain = sha256_file(lora_file), not _is_dora(lora_file)
        if plain:
            _remember(shared, cells_dir, cells, spec, lora_sha)
        if _reusable(cells_dir, cells, spec, lora_sha):
            logger.info(f"{label} ({n}/{len(spec.loras)}): reusing {len(cells)} images in {cells_dir}")
            continue
        given = {c: shared[k] for c in cells if plain and (k := _base_key(c)) in shared}
        reused = f", reusing {len(given)} base-model images (LoRA x0)" if given else ""
        logger.info(f"{label} ({n}/{len(spec.loras)}): rendering {len(cells) - len(given)} images{reused}")
        req = Request(model=spec.model, lora=[(label, lora_file)], cells=cells, settings=spec.settings,
                      revision=spec.revision, variant=spec.variant, dtype=spec.dtype, device=spec.device,
                      model_options=spec.model_options)
        # One call per checkpoint keeps each grid picture a manageable size (run_sample always draws one). It
        # removes old cells of another prompt list (they would be read as this one's) and, after an interrupt,
        # reuses this checkpoint's finished ones.
        try:
            _, failed = run_sample(req, grid, progress=progress, given=given)
        except Interrupted as e:
            raise Interrupted(f"{label} ({n}/{len(spec.loras)} checkpoints): {e}", e.exit_code) from None
        failures += [f"{label}: {line}" for line in failed]
        if plain:
            _remember(shared, cells_dir, cells, spec, lora_sha)
    return folders, failures


def run_eval(spec: EvalSpec, scorer: Scorer, out: str | Path,
             progress: bool = True) -> tuple[list[Row], Row | None, list[str]]:
    """Evaluate ``spec`` with ``scorer``: report.json, report.md, metrics.png and samples/ in ``out``.
    Returns (rows, recommended row, one line per failed cell)."""
    out = Path(out)
    # The scorer checks its inputs and loads its models first: an offline hub id should fail now, not after an
    # hour of sampling.
    scorer.prepare(spec)
    out.mkdir(parents=True, exist_ok=True)
    folders, failures = render(spec, out, scorer.class_images, progress=progress)
    rows = scorer.score(spec, read_rendered(spec, folders, scorer.class_images))
    best = scorer.recommend(rows)
    write_reports(out, spec, scorer, rows, best)
    return rows, best, failures
