import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_DATA, ROOT
from sdtune.cli import main
from sdtune.config import ConfigError, load_config, parse_override
from sdtune.plan import check_run

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


MINIMAL = f"""
model: {{pretrained: MODEL}}
data: {{instance_dir: {DEMO_DATA}, identifier: sks}}
"""


def test_overrides_are_typed():
    # YAML 1.1 reads 1e-4 as a string; the typed section makes it a number, a string field keeps it a string
    assert parse_override("train.learning_rate=1e-4") == (["train", "learning_rate"], "1e-4")
    cfg = load_config(None, ["model.pretrained=m", "data.instance_dir=d", "data.identifier=1e5",
                             "train.learning_rate=1e-4", "train.max_steps=1e3", "train.snr_gamma=5e0"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 1000 and cfg.train.snr_gamma == 5.0
    assert cfg.data.identifier == "1e5"
    with pytest.raises(ConfigError, match="train.max_steps: input should be a valid integer"):
        load_config(None, ["model.pretrained=m", "data.instance_dir=d", "data.identifier=x", "train.max_steps=1.5e0"])
    assert parse_override("sample.seeds=[1, 2]") == (["sample", "seeds"], [1, 2])
    assert parse_override("lora.use_dora=true") == (["lora", "use_dora"], True)
    assert parse_override("data.instance_prompt=a photo of sks dog")[1] == "a photo of sks dog"


def test_recipe_values(tmp_path):
    cfg = load_config(
        _recipe(tmp_path, MINIMAL + "train: {learning_rate: 1e-4, mixed_precision: no}\n"), ["lora.rank=8"]
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.train.mixed_precision == "no" and cfg.lora.rank == 8


def test_every_problem_is_reported_at_once_with_suggestions(tmp_path):
    text = MINIMAL + "train: {learnign_rate: 1.0e-4, max_steps: -3, optimizer: sgd}\nlora: {rank: many}\ndatta: {}\n"
    with pytest.raises(ConfigError) as e:
        load_config(_recipe(tmp_path, text), ["data.learning_rate=1", "sample.stepz=3"])
    problems = "\n".join(e.value.problems)
    assert "train.learnign_rate: unknown key; did you mean 'train.learning_rate'?" in problems
    assert "data.learning_rate: unknown key; did you mean 'train.learning_rate'?" in problems
    assert "sample.stepz: unknown key; did you mean 'sample.steps'?" in problems
    assert "train.max_steps: input should be greater than or equal to 1 (got -3)" in problems
    assert "train.optimizer:" in problems and "'adamw8bit'" in problems
    assert "lora.rank:" in problems
    assert "datta: unknown section; did you mean 'data'?" in problems
    assert len(e.value.problems) == 7


def test_required_sections_and_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_recipe(tmp_path, "data: {instance_dir: x}\n"))
    problems = "\n".join(e.value.problems)
    assert "model: required section" in problems
    assert "data.identifier: required" in problems


def _check(tiny_model, *extra):
    return check_run(load_config(None, [f"model.pretrained={tiny_model('sd15')}", f"data.instance_dir={DEMO_DATA}",
                                        "data.identifier=sks", *extra]))


def test_cross_checks_all_reported_before_weights(tiny_model, tmp_path):
    with pytest.raises(ConfigError) as e:
        _check(tiny_model, "prior.enabled=true", "sdxl.crop_conditioning=false", "lora.target_modules=[to_qq]",
               "data.instance_prompt=a photo of a dog")
    problems = "\n".join(e.value.problems)
    assert "prior.class_prompt: required with prior.enabled=true" in problems
    assert "sdxl.crop_conditioning: an SDXL-only option" in problems and "SD1.x" in problems
    assert "lora.target_modules: no unet module is named 'to_qq'" in problems
    assert "data.instance_prompt: 'a photo of a dog' does not contain data.identifier 'sks'" in problems


def test_missing_and_empty_data_folders(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        _check(tiny_model, f"data.instance_dir={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images .*; add 3-20 photos of the subject"):
        _check(tiny_model, f"data.instance_dir={tmp_path / 'empty'}")
    # kohya's layout, img/10_ohwx dog/*.png: the subfolder is named, with the repeat count its name carries
    kohya = tmp_path / "img" / "10_ohwx dog"
    shutil.copytree(DEMO_DATA, kohya)
    with pytest.raises(ConfigError) as e:
        _check(tiny_model, f"data.instance_dir={tmp_path / 'img'}")
    assert f"data.instance_dir: {tmp_path / 'img'} holds no images" in str(e.value) and \
        f"but its subfolder '10_ohwx dog' does, in kohya's REPEATS_NAME layout, whose repeat count sdtune does not " \
        f"read from the name; fix: data.instance_dir={kohya} data.repeats=10" in str(e.value)
    kohya.rename(tmp_path / "img" / "photos")
    with pytest.raises(ConfigError, match=r"but its subfolder 'photos' does; fix: data.instance_dir=.*photos \(a "
                                          r"subfolder is not searched\)"):
        _check(tiny_model, f"data.instance_dir={tmp_path / 'img'}")


def test_caption_without_identifier_warns(tiny_model):
    plan = _check(tiny_model, "data.identifier=zwx")
    assert len(plan.examples) == 8
    assert any("does not contain the identifier 'zwx'" in w for w in plan.warnings)


def test_aspect_buckets_say_random_crops_are_not_used(tiny_model):
    plan = _check(tiny_model, "data.aspect_buckets=true", "data.center_crop=false")
    assert any("data.center_crop=false is not used with data.aspect_buckets=true" in w for w in plan.warnings)
    assert not any("center_crop" in w for w in _check(tiny_model, "data.aspect_buckets=true").warnings)


def test_cli_errors_are_lines_not_tracebacks(tmp_path, capsys):
    code = main(["train", str(_recipe(tmp_path, MINIMAL)), "train.max_stepz=3", "lora.rank=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert "train.max_stepz" in err and "lora.rank" in err


def test_print_config_shows_resolved_tree(tmp_path, capsys):
    assert main(["train", str(_recipe(tmp_path, MINIMAL)), "lora.rank=16", "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["lora"]["rank"] == 16 and tree["train"]["optimizer"] == "adamw"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_is_valid_and_dry_runs(recipe, tiny_model, tmp_path, capsys):
    text = recipe.read_text()
    assert text.startswith("#"), "every recipe opens with a header comment"
    header = text.split("\n\n")[0].lower()
    assert "command" in header and ("memory" in header or "gpu" in header)
    cfg = load_config(recipe)  # every key valid as shipped
    family = next((f for key, f in [("sdxl", "sdxl"), ("sd2", "sd2"), ("flux", "flux"), ("sd35", "sd3")]
                   if key in recipe.name), "sd15")
    # dry-run against a tiny local model of the same family (no network here)
    import torch

    # on a machine without a GPU the dry run refuses fp16, as training would (tests/test_first_hour.py)
    cpu = [] if torch.cuda.is_available() else ["train.mixed_precision=no"]
    code = main(["train", str(recipe), f"model.pretrained={tiny_model(family)}", f"data.instance_dir={DEMO_DATA}",
                 f"train.output_dir={tmp_path}/out", *cpu, "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"is {family}" in out.out
    assert cfg.model.pretrained
