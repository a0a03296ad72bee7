"""What a new user typed and got wrong, each found by trying sdtune as one: a prompt override cut at ' #' or
read as a mapping at ': ', a FLUX.1 / SD3 resolution their transformers cannot take (it passed --dry-run and
crashed at step 1), a PEFT export folder that kept another LoRA's adapters, flags sample ignored in silence, and
messages that did not say the way out."""

from __future__ import annotations

import shutil

import pytest
import yaml
from safetensors.torch import load_file

from conftest import overrides
from sdtune.cli import main
from sdtune.config import ConfigError, load_config, parse_override
from sdtune.errors import SdtuneError
from sdtune.export import PEFT_CONFIG, PEFT_WEIGHTS, export_run
from sdtune.plan import check_run
from sdtune.runs import WEIGHT_NAME


def one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("typed,meant", [
    ("data.instance_prompt=sks dog, #1 best", "sks dog, #1 best"),  # was "sks dog," (the rest a YAML comment)
    ("data.instance_prompt=#1 dog", "#1 dog"),  # was None
    ("data.instance_prompt=a photo: sks dog", "a photo: sks dog"),  # was {"a photo": "sks dog"}, refused
    ("train.output_dir=runs/#1", "runs/#1"),
    ("data.instance_prompt='quoted # text'", "quoted # text"),  # quoted: YAML's reading
    ("train.optimizer_args={d_coef: 2}", {"d_coef": 2}),  # flow collections stay YAML's
    ("sample.prompts=[a, b] # two", ["a", "b"]),
    ("train.max_steps=800", 800),
])
def test_an_override_is_read_as_it_was_typed(typed, meant):
    assert parse_override(typed)[1] == meant


def test_a_prompt_override_with_a_colon_or_a_hash_reaches_the_config():
    cfg = load_config(None, ["model.pretrained=x", "data.instance_dir=y", "data.identifier=sks",
                             "data.instance_prompt=a photo: {identifier} dog, #1"])
    assert cfg.data.instance_prompt == "a photo: sks dog, #1"  # {identifier} filled in


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_resolution_off_the_transformers_patches_is_refused_before_anything_loads(family, tiny_model, tmp_path):
    """data.resolution=72 on FLUX.1 / SD3 passed --dry-run, then crashed at step 1 ("shape '[2, 4, 4, 2, 4, 2]' is
    invalid", "size of tensor a (8) must match ... (9)"), leaving a run folder behind."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(tiny_model(family), out, "data.resolution=72")))
    assert "data.resolution: 72 is not a multiple of 16" in str(e.value)
    assert "fix: data.resolution=64 or 80" in str(e.value)
    assert not out.exists()
    check_run(load_config(None, overrides(tiny_model(family), out, "data.resolution=80")))  # a multiple: fine


def test_sample_refuses_flags_it_would_ignore(checkpointed_run, tiny_model, requested, capsys):
    run = checkpointed_run
    fast = ["--seeds", "0", "--steps", "1", "--width", "64", "--height", "64", "--out", "x.png"]
    err = one_error(capsys, main(["sample", str(run), "--no-lora", "--lora-scale", "0.5,1", *fast]))
    assert "--lora-scale: --no-lora renders the base model alone" in err
    err = one_error(capsys, main(["sample", "--model", str(tiny_model("sd15")), "--lora-scale", "1", "--prompt",
                                  "a toy", *fast]))
    assert "--lora-scale: there is no LoRA" in err
    for family in ("flux", "sd3"):  # they sample with their own flow-matching scheduler, whatever --scheduler says
        err = one_error(capsys, main(["sample", "--model", str(tiny_model(family)), "--scheduler", "euler_a",
                                      "--prompt", "a toy", *fast]))
        assert err.startswith("error: --scheduler: ") and "fix: remove it" in err
    assert requested == []
    assert main(["sample", str(run), "--no-lora", *fast]) == 0  # without the flag: the base model, as before
    assert main(["sample", str(run), "--scheduler", "euler_a", *fast]) == 0  # an SD model takes it


def test_a_peft_export_leaves_no_adapter_of_an_earlier_export(checkpointed_run, tmp_path):
    """An earlier export's text_encoder/ (or SDXL's text_encoder_2/) stayed beside the new unet/ and was loaded
    with it: other pixels, or "adapters for text_encoder_2, which an SD1.x model does not have"."""
    out = export_run(checkpointed_run, "peft", tmp_path / "peft")[0]
    shutil.copytree(out / "unet", out / "text_encoder_2")  # as an SDXL run's export left it (sdtune's files)
    (out / "mine").mkdir()
    shutil.copy(out / "unet" / PEFT_WEIGHTS, out / "mine" / PEFT_WEIGHTS)
    (out / "mine" / PEFT_CONFIG).write_text("{}")
    (out / "mine" / "notes.txt").write_text("the user's")
    export_run(checkpointed_run, "peft", out)
    assert not (out / "text_encoder_2").exists()
    assert (out / "mine" / "notes.txt").is_file()  # a folder with the user's own file keeps it
    assert set(load_file(out / "unet" / PEFT_WEIGHTS)) == set(load_file(tmp_path / "peft" / "unet" / PEFT_WEIGHTS))


def test_a_run_without_its_final_lora_names_its_newest_checkpoint(checkpointed_run, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(checkpointed_run, stopped)
    (stopped / WEIGHT_NAME).unlink()
    with pytest.raises(SdtuneError) as e:
        export_run(stopped, "kohya", tmp_path / "x.safetensors")
    assert "the run stopped before its end; point at its newest checkpoint" in str(e.value)
    assert str(stopped / "checkpoints" / "step-000004") in str(e.value) and "train.resume=latest" in str(e.value)
    err = one_error(capsys, main(["sample", str(stopped), "--steps", "1", "--out", str(tmp_path / "s.png")]))
    assert "step-000004" in err and "train.resume=latest" in err


def test_a_moved_base_model_says_what_needs_it_and_the_way_out(checkpointed_run, tmp_path, requested, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(checkpointed_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["model"]["pretrained"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SdtuneError, match=r"export --format diffusers or peft, which need no model"):
        export_run(moved, "kohya", tmp_path / "x.safetensors")
    assert export_run(moved, "diffusers", tmp_path / "d.safetensors")[0].is_file()
    err = one_error(capsys, main(["sample", str(moved), "--steps", "1", "--out", str(tmp_path / "s.png")]))
    assert "pass --model HUB_ID_OR_FOLDER" in err
