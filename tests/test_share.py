import getpass

import pytest
import yaml

from conftest import overrides
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.train import train


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2",
                                      "data.instance_prompt=a photo of sks toy")))
    return out


def test_model_card_front_matter_and_privacy(run):
    text = (run / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["instance_prompt"] == "a photo of sks toy"
    assert "lora" in front["tags"] and "dreambooth" in front["tags"]
    assert "base_model" not in front  # a local base model is not named by its path
    assert "samples/step-000002.png" in text and "load_lora_weights" in text
    assert str(run.parent) not in text and "/tmp" not in text


def test_push_dry_run_lists_only_publishable_files(run, capsys):
    assert main(["push", str(run), "--repo", "me/toy-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload: README.md" in out and "would upload: pytorch_lora_weights.safetensors" in out
    assert "config.yaml" not in out and "checkpoints" not in out and "(private)" in out


def test_push_errors_are_one_line(run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run), "--repo", "not a repo"]) == 2
    assert "--repo: 'not a repo'" in capsys.readouterr().err
    assert main(["push", str(run), "--repo", "me/toy-lora"]) == 2  # offline: the upload cannot happen
    err = capsys.readouterr().err
    assert err.startswith("error: push to me/toy-lora failed") and "Traceback" not in err
    assert getpass.getuser() not in (run / "README.md").read_text()
