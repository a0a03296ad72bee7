"""The recipes ship inside the package: `sdtune train NAME` and the README's `recipes/NAME.yaml` work from any
folder of a pip install (the Colab notebook ran only inside a clone), and `sdtune recipes` lists and prints them."""

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, overrides
from sdtune.cli import main


def test_a_shipped_recipe_runs_by_name_from_any_folder(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    args = overrides(tiny_model("sd15"), tmp_path / "run")
    for recipe in ("tiny_cpu", "tiny_cpu.yaml", "recipes/tiny_cpu.yaml"):
        assert main(["train", recipe, *args, "--dry-run"]) == 0, capsys.readouterr().err
    assert main(["train", "tiny_cpx", *args, "--dry-run"]) == 2
    assert "error: recipe tiny_cpx: no such file, nor a shipped recipe of that name; did you mean 'tiny_cpu'?" \
        in capsys.readouterr().err
    assert main(["train", "some/where/tiny_cpu.yaml", *args, "--dry-run"]) == 2  # a path is a path
    assert "recipe some/where/tiny_cpu.yaml: no such file" in capsys.readouterr().err
    # a file of that name here is the user's, and wins
    (tmp_path / "tiny_cpu.yaml").write_text("train:\n  max_steps: 3\n")
    mine = [a for a in args if not a.startswith("train.max_steps=")]
    assert main(["train", "tiny_cpu.yaml", *mine, "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_recipes_lists_and_prints_the_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for recipe in ROOT.glob("recipes/*.yaml"):
        assert f"\n{recipe.stem} " in f"\n{listed}", recipe.stem
    assert "DreamBooth LoRA on Stable Diffusion 1.5 with prior preservation." in listed
    assert main(["recipes", "sd15_dreambooth_lora_prior"]) == 0
    assert capsys.readouterr().out == (ROOT / "recipes/sd15_dreambooth_lora_prior.yaml").read_text()
    # the Accelerate configs the README's `accelerate launch --config_file recipes/accelerate/...` names
    assert "accelerate/fsdp" in listed and "accelerate/multi_gpu" in listed
    assert main(["recipes", "accelerate/fsdp"]) == 0
    assert capsys.readouterr().out == (ROOT / "recipes/accelerate/fsdp.yaml").read_text()
    assert main(["recipes", "../../etc/passwd"]) == 2
    assert "not a shipped recipe" in capsys.readouterr().err


@pytest.mark.slow  # builds the wheel (a few seconds)
def test_the_wheel_carries_every_recipe(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("sdtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sdtune/recipes/{p.relative_to(ROOT / 'recipes').as_posix()}" for p in ROOT.glob("recipes/**/*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
