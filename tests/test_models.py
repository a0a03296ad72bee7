import json

import pytest

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models import inspect_model, load_components


@pytest.mark.parametrize(
    "family,prediction", [("sd15", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")]
)
def test_random_model_is_a_real_diffusers_pipeline(tiny_model, family, prediction):
    path = tiny_model(family)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    info = inspect_model(str(path))
    assert (info.family.name, info.prediction_type, info.resolution) == (family, prediction, 64)
    c = load_components(str(path), info.family)
    assert c.tokenizers[0]("sks").input_ids == [49406, 48136, 49407]  # the real CLIP vocabulary
    assert all(te.config.vocab_size == 49408 for te in c.text_encoders)
    assert len(c.text_encoders) == len(c.tokenizers) == (2 if family == "sdxl" else 1)
    assert c.noise_scheduler.config.prediction_type == prediction
    assert not list(path.rglob("*.bin")), "weights must be safetensors"


def test_family_comes_from_the_model_not_its_name(tiny_model, tmp_path):
    # an SD2 model in a folder whose name says sdxl is still SD2
    import shutil

    fake = tmp_path / "sdxl-looking-name"
    shutil.copytree(tiny_model("sd2"), fake)
    assert inspect_model(str(fake)).family.name == "sd2"


def test_inpainting_unet_is_refused(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "inpaint"
    shutil.copytree(tiny_model("sd15"), model)
    cfg = json.loads((model / "unet" / "config.json").read_text())
    cfg["in_channels"] = 9
    (model / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SdtuneError, match="9 input channels"):
        inspect_model(str(model))


@pytest.mark.parametrize("bad", ["/no/such/folder", "./missing", "not-a-hub-id"])
def test_missing_model_is_one_clear_error(bad):
    with pytest.raises(SdtuneError, match="model.pretrained"):
        inspect_model(bad)


def test_unreachable_hub_id_is_one_clear_error():
    # HF_HUB_OFFLINE=1 in tests: a hub id cannot be fetched
    with pytest.raises(SdtuneError, match="could not get model_index.json"):
        inspect_model("someone/some-model")


def test_cli_random_model(tmp_path, capsys):
    assert main(["random-model", str(tmp_path / "m"), "--family", "sd2"]) == 0
    assert "sd2" in capsys.readouterr().out
    # refuses to write into a non-empty folder
    assert main(["random-model", str(tmp_path / "m"), "--family", "sd2"]) == 2
    assert "not empty" in capsys.readouterr().err
