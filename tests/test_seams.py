"""A practitioner's first hour: sampling the base model without a run, sampling a shared LoRA file by the base
model its metadata names, readable --checkpoints all grids, and eval rendering the base model (LoRA x0) once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import sdtune.cli.sample
import sdtune.sample
from sdtune.cli import main
from sdtune.eval.core import EvalSpec, eval_cells, read_rendered
from sdtune.eval.run import render
from sdtune.grid import Cell, Settings, row_label
from sdtune.runs import WEIGHT_NAME

FAST = ["--seeds", "0", "--steps", "1", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def run(checkpointed_run):
    return checkpointed_run


@pytest.fixture
def counted(monkeypatch):
    """Counts of pipeline loads and of cells rendered (the real ones still run)."""
    counts = {"loads": 0, "cells": 0}
    load, render_cells = sdtune.sample._load_pipeline, sdtune.sample.render_cells

    def loading(*args, **kwargs):
        counts["loads"] += 1
        return load(*args, **kwargs)

    def rendering(pipe, cells, *args, **kwargs):
        counts["cells"] += len(cells)
        return render_cells(pipe, cells, *args, **kwargs)

    monkeypatch.setattr(sdtune.sample, "_load_pipeline", loading)
    monkeypatch.setattr(sdtune.sample, "render_cells", rendering)
    return counts


def one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# 1. The base model alone, no TARGET


def test_sample_the_base_model_without_a_target(tiny_model, tmp_path, counted, capsys):
    grid = tmp_path / "base.png"
    code = main(["sample", "--model", str(tiny_model("sd15")), "--prompt", "a toy", *FAST, "--out", str(grid)])
    assert code == 0, capsys.readouterr().err
    cells = sorted((tmp_path / "base_cells").glob("cell-*.json"))
    assert len(cells) == 1 and json.loads(cells[0].read_text())["lora"] is None
    assert grid.is_file() and counted == {"loads": 1, "cells": 1}


def test_base_model_without_a_target_needs_out_and_model(tiny_model, requested, capsys):
    err = one_error(capsys, main(["sample", "--model", str(tiny_model("sd15")), "--prompt", "a toy"]))
    assert "--out" in err and "no TARGET" in err
    err = one_error(capsys, main(["sample", "--prompt", "a toy", "--out", "x.png"]))
    assert "--model MODEL" in err and "TARGET" in err
    assert requested == []


def test_no_lora_with_a_target_still_renders_the_base(run, requested, capsys):
    assert main(["sample", str(run), "--no-lora", *FAST, "--out", "x.png"]) == 0, capsys.readouterr().err
    (req,) = requested
    assert req.lora == [] and {c.lora_scale for c in req.cells} == {None}


# 2. A shared LoRA file: the base model from its metadata


@pytest.fixture(scope="module")
def kohya_file(run, tmp_path_factory) -> Path:
    """sdtune's kohya export of a run with a local base model, alone in a folder (no run config around it)."""
    folder = tmp_path_factory.mktemp("shared")
    assert main(["export", str(run), "--format", "kohya", "-o", str(folder / "exported.safetensors")]) == 0
    alone = tmp_path_factory.mktemp("alone") / "sks.safetensors"
    shutil.copy(folder / "exported.safetensors", alone)
    return alone


def _with_metadata(src: Path, dst: Path, **extra: str) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    save_file(load_file(str(src)), str(dst), metadata={**meta, **extra})
    return dst


def test_a_lora_file_alone_takes_the_hub_base_model_from_its_metadata(kohya_file, tmp_path, requested, capsys,
                                                                      monkeypatch, tiny_model):
    from sdtune.models import inspect_model

    # sample reads what the base model is (its config files) before anything loads; this hub id is in no cache
    # here, so a local model of the same family stands in for its config files
    info = inspect_model(str(tiny_model("sd15")), for_training=False)
    monkeypatch.setattr(sdtune.cli.sample, "model_info", lambda *a: info)
    named = _with_metadata(kohya_file, tmp_path / "named.safetensors", ss_sd_model_name="someone/base-model")
    assert main(["sample", str(named), "--prompt", "a sks toy", *FAST, "--out", str(tmp_path / "g.png")]) == 0, \
        capsys.readouterr().err
    (req,) = requested
    assert req.model == "someone/base-model" and req.lora[0][1] == str(named)


def test_a_lora_file_with_a_local_base_model_says_why_and_asks_for_model(kohya_file, tmp_path, requested, capsys):
    from sdtune.runs import safetensors_metadata

    # the run's base model is a local folder: the file names it by the folder's name alone
    assert safetensors_metadata(kohya_file)["ss_sd_model_name"] == "m"
    err = one_error(capsys, main(["sample", str(kohya_file), "--prompt", "a sks toy", *FAST]))
    assert "names 'm', not a hub id: a local model's name" in err and "pass --model" in err
    # kohya's own scripts write a local file name there: not a hub id either
    local = _with_metadata(kohya_file, tmp_path / "local.safetensors", ss_sd_model_name="v1-5-pruned.safetensors")
    err = one_error(capsys, main(["sample", str(local), "--prompt", "a sks toy", *FAST]))
    assert "'v1-5-pruned.safetensors', not a hub id" in err and "pass --model" in err
    assert requested == []


def test_a_lora_file_alone_with_model_renders(kohya_file, tiny_model, tmp_path, counted, capsys):
    code = main(["sample", str(kohya_file), "--model", str(tiny_model("sd15")), "--prompt", "a sks toy", *FAST,
                 "--lora-scale", "1", "--out", str(tmp_path / "g.png")])
    assert code == 0, capsys.readouterr().err
    assert counted == {"loads": 1, "cells": 1}


# 3. --checkpoints all: the run and the checkpoints, not pytorch_lora_weights.safetensors


def test_checkpoints_all_grid_names_the_run_and_its_checkpoints(run, tmp_path, monkeypatch, capsys):
    drawn = {}

    def layout(cells, images, title=None):
        drawn.update(cells=cells, title=title)
        return images[0]

    monkeypatch.setattr(sdtune.sample, "layout", layout)
    code = main(["sample", str(run), "--checkpoints", "all", "--prompt", "a sks toy", *FAST, "--lora-scale", "1",
                 "--out", str(tmp_path / "g.png")])
    assert code == 0, capsys.readouterr().err
    title, cells = drawn["title"], drawn["cells"]
    assert title.startswith(f"{run.name}: step-000002 to step-000004 on ") and WEIGHT_NAME not in title
    labels = [row_label(c, {"checkpoint"}) for c in cells]
    assert labels == ["a sks toy | step-000002", "a sks toy | step-000004"]


def test_grid_titles():
    from sdtune.sample import Request, grid_title

    req = Request(model="m", lora=[("run", f"/r/{WEIGHT_NAME}")], cells=[], settings=Settings())
    assert grid_title(req) == "run on m"
    assert grid_title(Request(model="m", lora=[], cells=[], settings=Settings())) == "base model m"
    assert grid_title(Request(model="m", lora=[(None, "/x/a.safetensors")], cells=[],  # type: ignore[list-item]
                              settings=Settings())) == "a.safetensors on m"
    # a local model by its folder's name only (grids get posted; a full path can be private), a hub id whole
    local = Request(model="/home/someone/private/sd15-merge", lora=[], cells=[], settings=Settings())
    assert grid_title(local) == "base model sd15-merge"
    hub = Request(model="stable-diffusion-v1-5/stable-diffusion-v1-5", lora=[], cells=[], settings=Settings())
    assert grid_title(hub) == "base model stable-diffusion-v1-5/stable-diffusion-v1-5"


# 4. eval: the base model (LoRA x0) once, shared by every checkpoint


def _spec(run: Path, model: Path, loras: list[tuple[str, str]]) -> EvalSpec:
    return EvalSpec(run=str(run), model=str(model), loras=loras, steps={}, subject_dir=Path("photos"),
                    identifier="sks", class_noun="toy", prompt_set="test", prompts=["a sks toy"],
                    images_per_prompt=2, lora_scales=[0.0, 1.0], class_prompt="a photo of a toy", guidance=7.5,
                    settings=Settings(steps=1, width=64, height=64), device="cpu")


def _pixels(folder: Path, cells: list[Cell], scale: float) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"cell-{i:04d}.png")) for i, c in enumerate(cells) if c.lora_scale == scale]


def test_eval_renders_the_base_model_once_for_every_checkpoint(run, tiny_model, tmp_path, counted):
    loras = [(p.name, str(p / WEIGHT_NAME)) for p in sorted((run / "checkpoints").glob("step-*"))]
    spec = _spec(run, tiny_model("sd15"), loras)
    folders, failures = render(spec, tmp_path / "eval", class_images=False, progress=False)
    assert failures == []
    # 2 base-model images, then 2 LoRA x1 images per checkpoint (it was 4 per checkpoint)
    assert counted == {"loads": 2, "cells": 2 + 2 * 2}
    first, second = (eval_cells(spec, label, False) for label, _ in loras)
    shared = _pixels(folders[loras[0][0]], first, 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(shared, _pixels(folders[loras[1][0]], second, 0.0)))
    # every folder is complete: each cell's sidecar names its own checkpoint and LoRA
    for (label, lora), cells in zip(loras, (first, second)):
        for i, cell in enumerate(cells):
            side = json.loads((folders[label] / f"cell-{i:04d}.json").read_text())
            assert side["cell"]["checkpoint"] == cell.checkpoint == label and side["lora"] == str(Path(lora).resolve())
    rows = list(read_rendered(spec, folders, False))
    assert [(r.checkpoint, r.lora_scale) for r in rows] == [(loras[0][0], 0.0), (loras[0][0], 1.0),
                                                           (loras[1][0], 0.0), (loras[1][0], 1.0)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(rows[0].images["a sks toy"], rows[2].images["a sks toy"], strict=True))

    # The shared images are what the second checkpoint renders at LoRA x0 on its own.
    alone = render(_spec(run, tiny_model("sd15"), loras[1:]), tmp_path / "alone", False, progress=False)[0]
    assert all(np.array_equal(a, b) for a, b in zip(shared, _pixels(alone[loras[1][0]], second, 0.0)))

    # Again with the same settings: nothing loads, nothing renders.
    counted.update(loads=0, cells=0)
    render(spec, tmp_path / "eval", class_images=False, progress=False)
    assert counted == {"loads": 0, "cells": 0}


def test_eval_with_only_the_base_model_loads_it_once(run, tiny_model, tmp_path, counted):
    loras = [(p.name, str(p / WEIGHT_NAME)) for p in sorted((run / "checkpoints").glob("step-*"))]
    spec = _spec(run, tiny_model("sd15"), loras)
    spec.lora_scales = [0.0]
    _, failures = render(spec, tmp_path / "eval", class_images=False, progress=False)
    assert failures == [] and counted == {"loads": 1, "cells": 2}
