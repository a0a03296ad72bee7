"""The whole evaluation: prepare the scorer, render (or reuse) every checkpoint's cells, score, recommend and
write the reports.

Cells are drawn by ``sdtune sample``'s renderer, one grid per checkpoint under ``out/samples``, each image with
its JSON sidecar in ``samples/<checkpoint>_cells/`` (``sdtune sample --replay`` renders it again). Run again
with the same settings, eval reuses the images whose sidecars match, so re-scoring samples nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from sdtune.eval.core import EvalSpec, Row, Scorer, cell_path, eval_cells, read_rendered
from sdtune.eval.report import write_reports
from sdtune.files import sha256_file
from sdtune.grid import Cell
from sdtune.sample import Request, run_sample

logger = logging.getLogger(__name__)


def eval_device(spec: EvalSpec) -> str:
    """The device images are rendered (and scored) on: ``--device``, else cuda when there is one."""
    return spec.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _reusable(cells_dir: Path, cells: list[Cell], spec: EvalSpec, lora_sha: str) -> bool:
    """Whether every cell is already on disk, rendered with the same LoRA, model and settings."""
    models = {spec.model, str(Path(spec.model).resolve())}
    for i, cell in enumerate(cells):
        image = cell_path(cells_dir, i)
        sidecar = image.with_suffix(".json")
        if not (sidecar.is_file() and image.is_file()):
            return False
        try:
            d = json.loads(sidecar.read_text())
        except ValueError:
            return False
        if (d.get("cell") != asdict(cell) or d.get("settings") != asdict(spec.settings)
                or d.get("lora_sha256") != lora_sha or d.get("model") not in models
                or d.get("dtype") != spec.dtype or d.get("device") != eval_device(spec)):
            return False
    return True


def render(spec: EvalSpec, out: Path, class_images: bool,
           progress: bool = True) -> tuple[dict[str, Path], list[str]]:
    """Render (or reuse) every checkpoint's cells under ``out/samples``; ``class_images``: the class prompt
    too. Returns ({label: cells folder}, one line per failed cell)."""
    folders: dict[str, Path] = {}
    failures: list[str] = []
    for n, (label, lora_file) in enumerate(spec.loras, 1):
        cells = eval_cells(spec, label, class_images)
        grid = out / "samples" / f"{label}.png"
        cells_dir = grid.with_name(grid.stem + "_cells")
        folders[label] = cells_dir
        if _reusable(cells_dir, cells, spec, sha256_file(lora_file)):
            logger.info(f"{label} ({n}/{len(spec.loras)}): reusing {len(cells)} images in {cells_dir}")
            continue
        # Old cells of another prompt list would be read as this one's.
        for old in cells_dir.glob("cell-*"):
            old.unlink()
        logger.info(f"{label} ({n}/{len(spec.loras)}): rendering {len(cells)} images")
        req = Request(model=spec.model, lora=[(label, lora_file)], cells=cells, settings=spec.settings,
                      revision=spec.revision, variant=spec.variant, dtype=spec.dtype, device=spec.device)
        # One call per checkpoint keeps each grid picture a manageable size (run_sample always draws one).
        _, failed = run_sample(req, grid, progress=progress)
        failures += [f"{label}: {line}" for line in failed]
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
