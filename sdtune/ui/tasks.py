"""The Train, Compare and Export tabs: each builds the ``sdtune`` command the CLI user would type and starts
it as a job (``sdtune.ui.jobs``); progress is read back from what the run writes (losses.jsonl, samples/,
checkpoints/, config.yaml), never from the process itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.micro.model import write_model
from sdtune.runs import CONFIG, KOHYA_SUFFIX, complete_checkpoints
from sdtune.ui import jobs
from sdtune.ui.photos import DATASET
from sdtune.ui.workspace import Workspace

MICRO = "micro"  # the base model choice that means the shipped micro model (written on first use)
DEFAULT_RECIPE = "micro_dreambooth.yaml"
# page field -> the recipe key it sets; a config problem about that key is shown at that field
FIELDS = {"steps": "train.max_steps", "learning_rate": "train.learning_rate", "rank": "lora.rank",
          "identifier": "data.identifier", "base": "model.pretrained", "model_base": "model.base",
          "sample_every": "sample.every",
          "checkpoint_every": "train.checkpoint_every", "log_every": "train.log_every", "prior": "prior.enabled"}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EXPORTS = {"kohya": ".safetensors", "diffusers": ".safetensors", "peft": ""}


class FieldError(SdtuneError):
    """Config problems, each tied to the page field it belongs to ("advanced" when none)."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__("\n".join(f"{k}: {v}" for k, v in fields.items()))


def recipes(folder: Path | None) -> list[str]:
    return sorted(p.name for p in folder.glob("*.yaml")) if folder and folder.is_dir() else []


def base_model(ws: Workspace, base: str) -> str:
    """model.pretrained for the page's base model: the micro model (written into the workspace on first use),
    or a local folder / single file / hub id as given."""
    if base.strip() in ("", MICRO):
        folder = ws.path("models/micro")
        if not (folder / "model_index.json").is_file():
            write_model(folder)
        return str(folder)
    return base.strip()


def train_overrides(ws: Workspace, form: dict[str, Any]) -> tuple[str, list[str]]:
    """(run name, recipe overrides) for the Train form; the rest of the recipe stays as it is."""
    name = str(form.get("run") or "run")
    if not RUN_NAME.match(name):
        raise FieldError({"run": f"'{name}' is not a run name (letters, digits, _ and -)"})
    out = [f"data.instance_dir={ws.path(DATASET)}", f"train.output_dir={ws.path('runs/' + name)}",
           f"prior.class_dir={ws.path('class_images')}"]
    for field, key in FIELDS.items():
        value = form.get(field)
        if field != "base" and value not in (None, ""):
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    advanced = [line.strip() for line in str(form.get("advanced") or "").splitlines() if line.strip()]
    bad = [line for line in advanced if "=" not in line]
    if bad:
        raise FieldError({"advanced": f"'{bad[0]}' is not key=value (e.g. train.batch_size=2)"})
    return name, out + advanced


def check_config(recipe: Path, overrides: list[str]) -> None:
    """The recipe's own checks (``load_config``), with each problem placed at its page field."""
    try:
        load_config(recipe, overrides)
    except ConfigError as e:
        fields: dict[str, str] = {}
        by_key = {key: field for field, key in FIELDS.items()}
        for problem in e.problems:
            key = problem.split(":", 1)[0].strip()
            field = by_key.get(key, "advanced")
            fields[field] = (fields[field] + "; " if field in fields else "") + problem
        raise FieldError(fields) from None


def start_training(ws: Workspace, recipe_dir: Path | None, form: dict[str, Any]) -> dict[str, Any]:
    """Check the form through the recipe's checks, then start ``sdtune train RECIPE overrides`` as a job."""
    recipe_name = str(form.get("recipe") or DEFAULT_RECIPE)
    if not recipe_dir or recipe_name not in recipes(recipe_dir):
        raise FieldError({"recipe": f"no recipe '{recipe_name}' (recipes: {', '.join(recipes(recipe_dir))})"})
    name, overrides = train_overrides(ws, form)
    check_config(recipe_dir / recipe_name, overrides)
    if not ws.path(f"{DATASET}/metadata.jsonl").is_file():
        raise FieldError({"dataset": "no prepared dataset yet: press Prepare on the Photos tab first"})
    if any(jobs.status(ws, n)["state"] == "running" and jobs.status(ws, n)["run_dir"] == f"runs/{name}"
           for n in jobs.names(ws, "train")):
        raise FieldError({"run": f"run '{name}' is training already"})
    overrides.insert(0, f"model.pretrained={base_model(ws, str(form.get('base') or MICRO))}")
    return jobs.start(ws, "train", ["train", str(recipe_dir / recipe_name), *overrides], run_dir=f"runs/{name}")


def resume_training(ws: Workspace, name: str) -> dict[str, Any]:
    """Run a stopped train job's command again with train.resume=latest (exact: sdtune.resume)."""
    s = jobs.status(ws, name)
    if s["kind"] != "train" or s["state"] == "running":
        raise SdtuneError(f"job {name} is not a stopped training ({s['kind']}, {s['state']})")
    argv = [a for a in jobs.argv_of(ws, name) if not a.startswith("train.resume=")]
    return jobs.start(ws, "train", [*argv, "train.resume=latest"], run_dir=s["run_dir"])


def progress(ws: Workspace, run: str) -> dict[str, Any]:
    """What a run folder shows so far: steps, ETA, the loss curve, sample grids and checkpoints."""
    folder = ws.path(run)
    losses = []
    if (folder / "losses.jsonl").is_file():
        for line in (folder / "losses.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
                losses.append({"step": row["step"], "loss": row["loss"], "steps_per_s": row.get("steps_per_s")})
            except (ValueError, KeyError):
                continue  # a line being written
    max_steps = _max_steps(folder)
    step = losses[-1]["step"] if losses else 0
    rate = losses[-1]["steps_per_s"] if losses else None
    eta = (max_steps - step) / rate if rate and max_steps else None
    samples = sorted(ws.rel(p) for p in (folder / "samples").glob("step-*.png")) if (folder / "samples").is_dir() else []
    kohya = folder / f"{folder.name}{KOHYA_SUFFIX}"
    return {"run": run, "step": step, "max_steps": max_steps, "eta_s": eta, "losses": losses, "samples": samples,
            "checkpoints": [p.name for p in complete_checkpoints(folder)],
            "kohya": ws.rel(kohya) if kohya.is_file() else None}


def _max_steps(folder: Path) -> int | None:
    try:
        return int(yaml.safe_load((folder / CONFIG).read_text())["train"]["max_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _run_folder(ws: Workspace, run: str) -> Path:
    folder = ws.path(run)
    if not (folder / CONFIG).is_file():
        raise SdtuneError(f"{run}: not a run folder (no {CONFIG}); train one first")
    return folder


def _csv(value: Any, key: str, pattern: str) -> str:
    text = ",".join(str(value).split()) if not isinstance(value, list) else ",".join(map(str, value))
    if not re.fullmatch(pattern, text):
        raise FieldError({key: f"'{value}' is not a comma list of numbers"})
    return text


def start_compare(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune sample RUN`` as a grid: prompts x seeds x LoRA scale (x checkpoint), into WORKSPACE/compare/."""
    run = str(form.get("run") or "")
    folder = _run_folder(ws, run)
    prompts = [p.strip() for p in str(form.get("prompts") or "").splitlines() if p.strip()]
    if not prompts:
        raise FieldError({"prompts": "give at least one prompt, one per line"})
    seeds = _csv(form.get("seeds", "0,1"), "seeds", r"\d+(,\d+)*")
    scales = _csv(form.get("scales", "0,1"), "scales", r"-?[\d.]+(,-?[\d.]+)*")
    out = ws.path(f"compare/{folder.name}-{len(list(ws.path('compare').glob('*.png'))) + 1:03d}.png")
    args = ["sample", str(folder), "--seeds", seeds, "--lora-scale", scales, "--out", str(out),
            "--steps", str(int(form.get("steps") or 20)), "--guidance", str(form.get("guidance") or 4),
            "--batch-size", "4", "--overwrite"]
    for p in prompts:
        args += ["--prompt", p]
    if form.get("all_checkpoints"):
        args += ["--checkpoints", "all"]
    job = jobs.start(ws, "compare", args, run_dir=run)
    return {**job, "grid": ws.rel(out)}


def start_eval(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune eval RUN --metrics world --checkpoints all``: the report with its recommended checkpoint."""
    run = str(form.get("run") or "")
    folder = _run_folder(ws, run)
    return jobs.start(ws, "eval", ["eval", str(folder), "--metrics", "world", "--checkpoints", "all",
                                   "--lora-scale", "0,1", "--batch-size", "4"], run_dir=run)


def start_export(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune export RUN --format F -o WORKSPACE/exports/...``; the file is then a download link."""
    run, fmt = str(form.get("run") or ""), str(form.get("format") or "kohya")
    folder = _run_folder(ws, run)
    if fmt not in EXPORTS:
        raise FieldError({"format": f"'{fmt}' is not one of {', '.join(EXPORTS)}"})
    out = ws.path(f"exports/{folder.name}_{fmt}{EXPORTS[fmt]}")
    job = jobs.start(ws, "export", ["export", str(folder), "--format", fmt, "-o", str(out), "--overwrite"],
                     run_dir=run)
    return {**job, "file": ws.rel(out)}


def start_push(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune push RUN --repo R``; the token typed into the page goes to that process's environment
    (HF_TOKEN) alone: not into job.json, the log, or any file."""
    run, repo = str(form.get("run") or ""), str(form.get("repo") or "")
    folder = _run_folder(ws, run)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise FieldError({"repo": f"'{repo}' is not user/name"})
    args = ["push", str(folder), "--repo", repo] + (["--dry-run"] if form.get("dry_run") else [])
    token = str(form.get("token") or "")
    return jobs.start(ws, "push", args, run_dir=run, env={"HF_TOKEN": token} if token else None)
