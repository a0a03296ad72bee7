"""A practitioner's first hour: the shipped recipes follow data.identifier, and --dry-run refuses what would fail
once the model has loaded (fp16 without a GPU)."""

from __future__ import annotations

import pytest
import yaml

from conftest import DEMO_DATA, ROOT
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.data import has_word
from sdtune.plan import check_run, precision_problem

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BASE = ["model.pretrained=m", "data.instance_dir=d", "data.identifier=ohwx"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_identifier_placeholder_reaches_the_run_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {pretrained: m}\n"
                      "data: {instance_dir: d, identifier: sks, instance_prompt: 'a photo of {identifier} dog'}\n"
                      "sample: {prompts: ['{identifier} on the beach', 'a photo of a dog']}\n")
    cfg = load_config(recipe, ["data.identifier=ohwx"])
    assert cfg.data.instance_prompt == "a photo of ohwx dog"
    assert cfg.sample.prompts == ["ohwx on the beach", "a photo of a dog"]
    # what a run writes as config.yaml, and what `sdtune sample` reads back
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["data"]["instance_prompt"] == "a photo of ohwx dog"
    assert written["sample"]["prompts"][0] == "ohwx on the beach"
    assert "{identifier}" not in cfg.to_yaml()


def test_other_braces_are_kept():
    cfg = load_config(None, [*BASE, "data.instance_prompt=a {red} photo of {identifier} {identifier}",
                             "sample.prompts=['{ident} {identifier}}', '{}']"])
    assert cfg.data.instance_prompt == "a {red} photo of ohwx ohwx"
    assert cfg.sample.prompts == ["{ident} ohwx}", "{}"]


def test_sample_prompt_without_the_identifier_warns(tiny_model, tmp_path):
    cfg = load_config(None, [f"model.pretrained={tiny_model('sd15')}", f"data.instance_dir={DEMO_DATA}",
                             "data.identifier=sks", "data.resolution=64", f"train.output_dir={tmp_path / 'out'}",
                             "prior.enabled=true", "prior.class_prompt=a photo of a toy",
                             "sample.prompts=['a photo of ohwx toy', 'a photo of sks toy', 'a photo of a toy']"])
    plan = check_run(cfg)
    found = [w for w in plan.warnings if w.startswith("sample.prompts:")]
    assert found == ["sample.prompts: 'a photo of ohwx toy' does not use data.identifier 'sks', so the grids will "
                     "not show what was trained; write {identifier} in it"]
    with pytest.raises(ConfigError, match=r"'a photo of ohwx toy' does not use .*\(--strict\)"):
        check_run(cfg, strict=True)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_follows_the_identifier(recipe):
    cfg = load_config(recipe, ["data.identifier=ohwx"])
    assert cfg.data.instance_prompt is None or has_word(cfg.data.instance_prompt, "ohwx")
    trained = [p for p in cfg.sample.prompts if p != cfg.prior.class_prompt]
    assert trained, "a recipe's grids should show the subject"
    assert all(has_word(p, "ohwx") for p in trained), trained
    assert "sks" not in cfg.to_yaml()


@pytest.mark.parametrize("recipe", [p for p in RECIPES if "On CPU" in p.read_text()],
                         ids=lambda p: p.stem)
def test_cpu_overrides_in_each_recipe_header_pass_the_dry_run(recipe, tiny_model, tmp_path, capsys):
    # the "On CPU" block names the overrides; with them, --dry-run is ok on a machine without a GPU
    header = recipe.read_text().split("\n\n", 1)[0]
    line = header.split("# On CPU", 1)[1].splitlines()[-1]
    extra = [o for o in line.lstrip("# ").split() if not o.startswith("model.pretrained=")]
    family = next((f for f in ("sdxl", "sd2", "sd35", "flux") if recipe.stem.startswith(f)), "sd15")
    family = {"sd35": "sd3"}.get(family, family)
    code = main(["train", str(recipe), f"model.pretrained={tiny_model(family)}", f"data.instance_dir={DEMO_DATA}",
                 "data.identifier=sks", f"train.output_dir={tmp_path / 'out'}", *extra, "--dry-run"])
    assert code == 0, capsys.readouterr().err
    assert "ok:" in capsys.readouterr().out


def test_fp16_on_cpu_is_refused_by_the_dry_run(tiny_model, tmp_path):
    cfg = load_config(None, [f"model.pretrained={tiny_model('sd15')}", f"data.instance_dir={DEMO_DATA}",
                             "data.identifier=sks", f"train.output_dir={tmp_path / 'out'}",
                             "train.mixed_precision=fp16"])
    if _has_cuda():
        check_run(cfg)  # a GPU runs fp16
        return
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    assert e.value.problems == ["train.mixed_precision: fp16 needs a GPU; on CPU use bf16 or no"]


def test_precision_needs_no_torch_for_no():
    assert precision_problem("no") is None
    if not _has_cuda():
        assert precision_problem("bf16") is None  # bf16 runs on CPU


def test_the_readme_lists_the_cpu_overrides():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Recipes and overrides", 1)[1].split("\n## ", 1)[0]
    assert "On CPU" in section and "train.mixed_precision=no" in section and "train.optimizer=adamw" in section
