"""The Train, Compare and Export tabs: each builds the ``sdtune`` command the CLI user would type and starts
it as a job (``sdtune.ui.jobs``); progress is read back from what the run writes (losses.jsonl, samples/,
checkpoints/, config.yaml), never from the process itself.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from sdtune import families
from sdtune.config import Config, ConfigError, load_config
from sdtune.data import has_word
from sdtune.errors import SdtuneError
from sdtune.identifier import check_identifiers
from sdtune.micro.model import write_model
from sdtune.plan import RunPlan, check_run
from sdtune.runs import CONFIG, KOHYA_SUFFIX, LOSSES, WEIGHT_NAME, complete_checkpoints
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
# keys the form sets without a field of their own: their problems are shown at the field that set them
KEY_FIELDS = {"train.output_dir": "run", "data.instance_dir": "dataset", "data.resolution": "dataset",
              "prior.class_prompt": "class", "data.instance_prompt": "class", "sample.prompts": "class"}
# a recipe's family-only options (each family's own recipe section): a problem there means the recipe does not fit
FAMILY_SECTIONS = tuple(f"{f.options_section}." for f in families.registered() if f.options_section)
CLASS_WORDS = re.compile(r"^[A-Za-z][A-Za-z -]{0,39}$")
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
    a local folder / single file made absolute (read from the folder ``sdtune ui`` was started in: the job runs
    in the workspace), or a hub id as given."""
    if base.strip() in ("", MICRO):
        folder = ws.path("models/micro")
        if not (folder / "model_index.json").is_file():
            write_model(folder)
        return str(folder)
    given = Path(base.strip()).expanduser()
    return str(given.resolve()) if given.exists() else base.strip()


def is_micro_run(ws: Workspace, folder: Path) -> bool:
    """Whether a run trained the workspace's micro model (whose world the ``--metrics world`` scorer reads)."""
    try:
        pretrained = yaml.safe_load((folder / CONFIG).read_text())["model"]["pretrained"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return False
    return os.path.realpath(str(pretrained)) == os.path.realpath(ws.path("models/micro"))


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
    if "identifier" in form and not str(form["identifier"] or "").strip():
        raise FieldError({"identifier": "type an identifier on the Identifier tab (e.g. sks)"})
    advanced = [line.strip() for line in str(form.get("advanced") or "").splitlines() if line.strip()]
    bad = [line for line in advanced if "=" not in line]
    if bad:
        raise FieldError({"advanced": f"'{bad[0]}' is not key=value (e.g. train.batch_size=2)"})
    return name, out + advanced


def check_config(recipe: Path, overrides: list[str]) -> Config:
    """The recipe's own checks (``load_config``), with each problem placed at its page field."""
    try:
        return load_config(recipe, overrides)
    except ConfigError as e:
        raise field_errors(e.problems, recipe.name) from None


def field_errors(problems: list[str], recipe: str = "") -> FieldError:
    """Config problems (``key: text``) at the page fields that set those keys, in the page's terms."""
    by_key = {**{key: field for field, key in FIELDS.items()}, **KEY_FIELDS}
    fields: dict[str, str] = {}
    for problem in problems:
        key = problem.partition(":")[0].strip()
        field = by_key.get(key) or ("recipe" if key.startswith(FAMILY_SECTIONS) else "advanced")
        text = problem  # the recipe key stays named: "advanced" takes the same keys
        if field == "recipe":
            text = f"recipe {recipe} does not fit this base model ({problem})"
        elif field == "run" and "already holds" in problem:
            text = "this run name holds another run's files: choose a new run name (or Resume that run's job)"
        elif field == "base" and "neither a local model folder" in problem:
            text = problem.replace("fix the path", f"a relative path is read from {Path.cwd()}, where sdtune ui "
                                   "was started")
        fields[field] = (fields[field] + "; " if field in fields else "") + text
    return FieldError(fields)


def class_overrides(cfg: Config, noun: str) -> list[str]:
    """prior.class_prompt, data.instance_prompt and sample.prompts for the class the page names (e.g. dog):
    the recipe's own class noun (from its prior.class_prompt: 'a photo of a toy' -> toy) replaced in its
    sample prompts, so a recipe's scenes stay and show the user's subject."""
    noun = " ".join(noun.split())
    if not CLASS_WORDS.match(noun):
        raise FieldError({"class": f"'{noun}' is not a class noun (a word or two, e.g. dog)"})
    old = re.fullmatch(r"a photo of an? (.+)", (cfg.prior.class_prompt or "").strip())
    prompts = [re.sub(rf"\b{re.escape(old.group(1))}\b", noun, p) for p in cfg.sample.prompts] if old else []
    prompts = prompts or ["a photo of {identifier} " + noun, "a photo of {identifier} " + noun + " on the beach",
                          f"a photo of a {noun}"]
    return [f"prior.class_prompt=a photo of a {noun}", "data.instance_prompt=a photo of {identifier} " + noun,
            "sample.prompts=" + json.dumps(prompts)]  # JSON is YAML: the override reads it as a list


def _check_identifier(word: str) -> None:
    """Refuse an identifier the Identifier tab calls bad (e.g. 'a photo': two words, in every caption)."""
    report = check_identifiers([word])[0]
    if report.verdict == "bad":
        raise FieldError({"identifier": f"{report.summary}; pick one the Identifier tab calls good"})


def check_plan(ws: Workspace, cfg: Config, recipe: str) -> RunPlan:
    """``sdtune train --dry-run``'s checks on the final config (model files, data, output folder; no weights),
    then what the page adds: captions that name the identifier, photos prepared at the run's resolution."""
    try:
        plan = check_run(cfg)
    except ConfigError as e:
        raise field_errors(e.problems, recipe) from None
    identifier = cfg.data.identifier
    missing = [e.caption for e in plan.examples if identifier and not has_word(e.caption, identifier)]
    if missing:  # the run would train one word and sample another: grids that never show the subject
        raise FieldError({"identifier": f"{len(missing)} of {len(plan.examples)} prepared captions do not name "
                          f"'{identifier}' (e.g. '{missing[0]}'): use the identifier they name, or edit the "
                          "captions on the Photos tab and Prepare again"})
    try:
        prepared = json.loads(ws.path(f"{DATASET}/prep_report.json").read_text())["settings"]["resolution"]
    except (OSError, KeyError, TypeError, ValueError):
        prepared = None
    if prepared and prepared != plan.resolution:
        raise FieldError({"dataset": f"the photos were prepared at {prepared} px, and this run trains at "
                          f"{plan.resolution} px: set the Photos tab's resolution to {plan.resolution} and "
                          "Prepare again"})
    return plan


def _recipe(recipe_dir: Path | None, form: dict[str, Any]) -> Path:
    name = str(form.get("recipe") or DEFAULT_RECIPE)
    if not recipe_dir or name not in recipes(recipe_dir):
        raise FieldError({"recipe": f"no recipe '{name}' (recipes: {', '.join(recipes(recipe_dir))})"})
    return recipe_dir / name


def start_training(ws: Workspace, recipe_dir: Path | None, form: dict[str, Any]) -> dict[str, Any]:
    """Check the form through the recipe's checks and then the run's (``check_plan``, on the config the job
    will run), then start ``sdtune train RECIPE overrides`` as a job."""
    recipe = _recipe(recipe_dir, form)
    name, overrides = train_overrides(ws, form)
    cfg = check_config(recipe, overrides)
    if str(form.get("class") or "").strip():
        overrides += class_overrides(cfg, str(form["class"]))
        check_config(recipe, overrides)
    if not ws.path(f"{DATASET}/metadata.jsonl").is_file():
        raise FieldError({"dataset": "no prepared dataset yet: press Prepare on the Photos tab first"})
    if any(jobs.status(ws, n)["state"] == "running" and jobs.status(ws, n)["run_dir"] == f"runs/{name}"
           for n in jobs.names(ws, "train")):
        raise FieldError({"run": f"run '{name}' is training already"})
    if str(form.get("identifier") or "").strip():
        _check_identifier(str(form["identifier"]).strip())
    overrides.insert(0, f"model.pretrained={base_model(ws, str(form.get('base') or MICRO))}")
    check_plan(ws, check_config(recipe, overrides), recipe.name)
    return jobs.start(ws, "train", ["train", str(recipe), *overrides], run_dir=f"runs/{name}")


def form_of(ws: Workspace, argv: list[str]) -> dict[str, str]:
    """The Train form as a train job's command (``sdtune`` arguments) set it: a tab that follows a run shows
    that run's settings."""
    by_key = {key: field for field, key in FIELDS.items()}
    form = {"recipe": Path(argv[1]).name if len(argv) > 1 else "", "advanced": ""}
    from_class = False  # the Class field's keys come last (class_overrides): the user's own ones are advanced
    for arg in argv[2:]:
        key, _, value = arg.partition("=")
        if key == "train.output_dir":
            form["run"] = Path(value).name
        elif key == "prior.class_prompt":
            form["class"], from_class = re.sub(r"^a photo of an? ", "", value), True
        elif from_class and key in ("data.instance_prompt", "sample.prompts"):
            continue
        elif key == "model.pretrained":
            form["base"] = MICRO if os.path.realpath(value) == str(ws.path("models/micro")) else value
        elif key in by_key:
            form[by_key[key]] = value
        elif key not in ("data.instance_dir", "prior.class_dir", "train.resume"):
            form["advanced"] += arg + "\n"
    return form


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
    if (folder / LOSSES).is_file():
        for line in (folder / LOSSES).read_text().splitlines():
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
    checkpoints = [p.name for p in complete_checkpoints(folder)]  # listed once: the recommendation checks it too
    return {"run": run, "step": step, "max_steps": max_steps, "eta_s": eta, "losses": losses, "samples": samples,
            "checkpoints": checkpoints, "kohya": ws.rel(kohya) if kohya.is_file() else None,
            "recommended": recommended_checkpoint(folder, checkpoints)}


def recommended_checkpoint(folder: Path, checkpoints: list[str] | None = None) -> dict[str, str] | None:
    """What the run's eval report (``sdtune eval RUN``: ``RUN/eval/report.json``) recommends, as Export's default:
    {"checkpoint": "step-N", "why": "..."}; None without a report, when it recommends none, when it recommends LoRA
    scale 0 (the base model did best: no checkpoint to prefer), or when that checkpoint is no longer complete (a
    rewind removed it). ``checkpoints``: the run's complete checkpoints' names, if already listed."""
    try:
        report = json.loads((folder / "eval" / "report.json").read_text(encoding="utf-8"))
        best = report["recommendation"]
        name, scale, rule = best["checkpoint"], float(best["lora_scale"]), str(best.get("rule") or "")
    except (OSError, ValueError, KeyError, TypeError):  # no report, one being written, or not eval's
        return None
    if checkpoints is None:
        checkpoints = [p.name for p in complete_checkpoints(folder)]
    if scale <= 0 or name not in checkpoints:
        return None
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in (best.get("metrics") or {}).items() if isinstance(v, (int, float)))
    at = "" if scale == 1 else f" at LoRA scale {scale:g}"
    return {"checkpoint": name, "why": f"recommended by eval{at}" + (f" ({metrics})" if metrics else "")
            + (f": {rule}" if rule else "")}


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


def _csv(value: Any, key: str, pattern: str, what: str = "numbers") -> str:
    text = ",".join(str(value).split()) if not isinstance(value, list) else ",".join(map(str, value))
    if not re.fullmatch(pattern, text):
        raise FieldError({key: f"'{value}' is not a comma list of {what}"})
    return text


def _unique(ws: Workspace, folder: str, stem: str, suffix: str) -> Path:
    """A new name in the workspace folder (time + random: two jobs started at once never share an output)."""
    return ws.path(f"{folder}/{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}{suffix}")


def _refuse_twin(ws: Workspace, kind: str, args: list[str], field: str) -> None:
    """A second job identical to a running one (a double click) would only repeat its work."""
    for name in jobs.names(ws, kind):
        s = jobs.status(ws, name, log_lines=0)
        if s["state"] in ("running", "starting") and jobs.argv_of(ws, name)[:len(args)] == args:
            raise FieldError({field: f"{name} is doing exactly this already; wait for it"})


def start_compare(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune sample RUN`` as a grid: prompts x seeds x LoRA scale (x checkpoint), into WORKSPACE/compare/."""
    run = str(form.get("run") or "")
    folder = _run_folder(ws, run)
    prompts = [p.strip() for p in str(form.get("prompts") or "").splitlines() if p.strip()]
    if not prompts:
        raise FieldError({"prompts": "give at least one prompt, one per line"})
    seeds = _csv(form.get("seeds", "0,1"), "seeds", r"\d+(,\d+)*", "whole numbers >= 0 (e.g. 0,1,2)")
    scales = _csv(form.get("scales", "0,1"), "scales", r"-?[\d.]+(,-?[\d.]+)*")
    args = ["sample", str(folder), "--seeds", seeds, "--lora-scale", scales,
            "--steps", str(int(form.get("steps") or 20)), "--guidance", str(form.get("guidance") or 4),
            "--batch-size", "4"]
    for p in prompts:
        args += ["--prompt", p]
    if form.get("all_checkpoints"):
        args += ["--checkpoints", "all"]
    _refuse_twin(ws, "compare", args, "prompts")
    out = _unique(ws, "compare", folder.name, ".png")
    job = jobs.start(ws, "compare", [*args, "--out", str(out)], run_dir=run)
    return {**job, "grid": ws.rel(out)}


def start_eval(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune eval RUN --checkpoints all``: the report with its recommended checkpoint; ``--metrics world``
    (the micro world's detector) for a run of the micro model, else the DreamBooth paper's (DINO, CLIP-I,
    CLIP-T: ``sdtune eval``'s default, which needs those metric models)."""
    run = str(form.get("run") or "")
    folder = _run_folder(ws, run)
    args = ["eval", str(folder), "--metrics", "world" if is_micro_run(ws, folder) else "paper",
            "--checkpoints", "all", "--lora-scale", "0,1", "--batch-size", "4"]
    _refuse_twin(ws, "eval", args, "general")
    return jobs.start(ws, "eval", args, run_dir=run)


def export_source(folder: Path, checkpoint: str) -> Path:
    """What Export writes from: the named checkpoint (``step-N``), else the final weights, else (a stopped
    run) its latest checkpoint, as ``sdtune export RUN/checkpoints/step-N`` takes."""
    done = {p.name: p for p in complete_checkpoints(folder)}
    if checkpoint and checkpoint != "final":
        if checkpoint not in done:
            raise FieldError({"checkpoint": f"no complete checkpoint '{checkpoint}' (has: "
                              f"{', '.join(done) or 'none'})"})
        return done[checkpoint]
    if (folder / WEIGHT_NAME).is_file() or not done:
        return folder
    return list(done.values())[-1]


def start_export(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """``sdtune export RUN --format F -o WORKSPACE/exports/...``; the file is then a download link."""
    run, fmt = str(form.get("run") or ""), str(form.get("format") or "kohya")
    folder = _run_folder(ws, run)
    if fmt not in EXPORTS:
        raise FieldError({"format": f"'{fmt}' is not one of {', '.join(EXPORTS)}"})
    source = export_source(folder, str(form.get("checkpoint") or ""))
    which = source.name if source != folder else "final"
    out = ws.path(f"exports/{folder.name}_{which}_{fmt}{EXPORTS[fmt]}")
    args = ["export", str(source), "--format", fmt, "-o", str(out), "--overwrite"]
    _refuse_twin(ws, "export", args, "format")
    job = jobs.start(ws, "export", args, run_dir=run)
    return {**job, "file": ws.rel(out)}


def output_of(ws: Workspace, name: str) -> dict[str, Any]:
    """What a finished compare / export / eval job made, from its command (a reloaded page shows it again):
    {"grid": REL} / {"file": REL} / {"report": REL}."""
    argv = jobs.argv_of(ws, name)
    for flag, key in (("--out", "grid"), ("-o", "file")):
        if flag in argv[:-1] and argv[0] in ("sample", "export"):
            return {key: ws.rel(argv[argv.index(flag) + 1])}
    if argv and argv[0] == "eval":
        return {"report": ws.rel(Path(argv[1]) / "eval" / "report.md")}
    return {}


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
