"""DreamBooth on the shipped micro model teaches the subject, measurably: the learning checks of issue #8.

One session fixture trains two LoRAs on the same 8 photos, with and without prior preservation, and
`sdtune eval --metrics world` scores every checkpoint of both. Thresholds sit well inside what was measured
(see README.md, "The micro model") so that they catch a broken trainer, not noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sdtune.cli import main
from sdtune.micro import model as micro
from sdtune.micro.world import write_subject_photos

pytestmark = pytest.mark.slow  # trains DreamBooth on the micro model for minutes

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "micro_dreambooth.yaml"


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    return micro.write_model(tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture(scope="session")
def micro_runs(micro_model, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("micro-db")
    photos = write_subject_photos(work / "photos", n=8, seed=0)
    common = [f"model.pretrained={micro_model}", f"data.instance_dir={photos}", f"prior.class_dir={work / 'class'}",
              "train.report_to=none", "sample.every=0", "sample.seeds=[0]"]
    runs = {}
    for name, extra in (("prior", []), ("noprior", ["prior.enabled=false"])):
        out = work / name
        assert main(["train", str(RECIPE), *common, *extra, f"train.output_dir={out}"]) == 0
        # the base model (LoRA scale 0) is the same for both runs: scored once, with the first
        scales = "0,1" if name == "prior" else "1"
        assert main(["eval", str(out), "--metrics", "world", "--checkpoints", "all", "--lora-scale", scales,
                     "--world-prompts", "6", "--images-per-prompt", "3", "--batch-size", "6"]) == 0
        runs[name] = out
    return runs


def _rows(run: Path) -> list[dict]:
    return json.loads((run / "eval" / "report.json").read_text())["rows"]


def _final(run: Path, scale: float) -> dict:
    """The measures of the last checkpoint at LoRA scale ``scale``."""
    rows = [r for r in _rows(run) if r["lora_scale"] == scale]
    return max(rows, key=lambda r: r["step"])["metrics"]


def test_the_shipped_model_is_small_and_follows_prompts(micro_model, capsys):
    size = sum(p.stat().st_size for p in micro.shipped_dir().rglob("*") if p.is_file())
    assert size < 16 * 2**20, size
    assert main(["micro", "check", str(micro_model), "--n", "32"]) == 0
    line = capsys.readouterr().out
    scores = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].strip().split(", "))
    assert float(scores["background"]) >= 0.6 and float(scores["colour"]) >= 0.6, line


def test_the_lora_teaches_the_subject_and_keeps_the_context(micro_runs):
    base, tuned = _final(micro_runs["prior"], 0.0), _final(micro_runs["prior"], 1.0)
    assert tuned["subject"] >= base["subject"] + 0.4, (base, tuned)  # measured: 0.17 -> 0.78
    assert tuned["context"] >= 0.5, tuned


def test_prior_preservation_keeps_the_class_from_drifting(micro_runs):
    with_prior, without = _final(micro_runs["prior"], 1.0), _final(micro_runs["noprior"], 1.0)
    assert without["class_subject"] >= with_prior["class_subject"] + 0.3, (with_prior, without)  # 0.17 vs 0.92


def test_over_training_shows_in_the_curves_and_the_recommendation_stops_before_it(micro_runs):
    """Without prior preservation the class drifts towards the subject as training goes on; the
    recommendation then picks a checkpoint before the last one."""
    report = json.loads((micro_runs["noprior"] / "eval" / "report.json").read_text())
    tuned = sorted((r for r in report["rows"] if r["lora_scale"] == 1), key=lambda r: r["step"])
    assert tuned[-1]["metrics"]["class_subject"] >= tuned[0]["metrics"]["class_subject"] + 0.2, tuned
    assert report["recommendation"]["step"] < tuned[-1]["step"]


def test_the_report_follows_training_and_recommends_a_checkpoint(micro_runs):
    report = json.loads((micro_runs["prior"] / "eval" / "report.json").read_text())
    steps = sorted({r["step"] for r in report["rows"]})
    config = yaml.safe_load(RECIPE.read_text())["train"]
    assert steps == list(range(config["checkpoint_every"], config["max_steps"] + 1, config["checkpoint_every"]))
    subject = [r["metrics"]["subject"] for r in sorted(report["rows"], key=lambda r: r["step"]) if r["lora_scale"] == 1]
    assert subject[-1] > subject[0] - 0.05  # learning shows over the checkpoints
    assert report["recommendation"]["lora_scale"] == 1 and report["recommendation"]["step"] in steps
    assert report["scorer"] == "world" and report["recommendation"]["rule"].startswith("the highest subject score")
    assert (micro_runs["prior"] / "eval" / "report.md").read_text().count("step-") >= len(steps)
    assert (micro_runs["prior"] / "eval" / "metrics.png").is_file()
