import json
import os

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
    with pytest.raises(SdtuneError, match="not in the Hugging Face cache .HF_HUB_OFFLINE is set"):
        inspect_model("someone/some-model")


def test_no_network_is_found_once_and_the_cache_is_read_at_once(tmp_path, monkeypatch, unreachable_hub):
    """With no network, each hub lookup used to retry five times (about 25 s) before failing; one HEAD now
    switches huggingface_hub to offline mode, so a mistyped local path ("models/sd15" without ./) fails at once,
    and says what the local folder of that spelling holds."""
    import time

    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd-15").mkdir(parents=True)
    start = time.monotonic()
    for _ in range(2):
        with pytest.raises(SdtuneError) as e:
            inspect_model("models/sd15")
    assert time.monotonic() - start < 5  # not 2 x 25 s of retries
    assert "not in the Hugging Face cache (the Hub cannot be reached from here); models/ here has sd-15" in \
        str(e.value)
    assert len(unreachable_hub) == 1 and constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_long_library_message_is_cut_at_a_word():
    from sdtune.errors import error_summary

    line = error_summary(OSError("Please check your connection and try again " * 5), 60)
    assert line == "OSError: Please check your connection and try again Please check ..."


def test_cli_random_model(tmp_path, capsys):
    assert main(["random-model", str(tmp_path / "m"), "--family", "sd2"]) == 0
    assert "sd2" in capsys.readouterr().out
    # refuses to write into a non-empty folder
    assert main(["random-model", str(tmp_path / "m"), "--family", "sd2"]) == 2
    assert "not empty" in capsys.readouterr().err
    for family in ("flux", "sd3"):  # a transformer file is not written: one line, not an AttributeError
        assert main(["random-model", str(tmp_path / "f.safetensors"), "--single-file", "--family", family]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --single-file: random checkpoints are written for sd15, sd2, sdxl;") and \
            err.count("\n") == 1
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_loading_in_half_precision_reads_the_weights_a_cast_would_give(family, tiny_model):
    # a bf16 run reads the denoiser and text encoders straight in bf16 (FLUX.1 + T5: 34 GB of RAM, not 68 in
    # float32): the same numbers as loading in float32 and casting, as every run did before; the VAE as it is
    import torch

    from sdtune import families
    from sdtune.models import load_components

    fam = families.get(family)
    half = load_components(str(tiny_model(family)), fam, dtype=torch.bfloat16)
    full = load_components(str(tiny_model(family)), fam)
    for a, b in zip([half.denoiser, *half.text_encoders], [full.denoiser, *full.text_encoders], strict=True):
        sa, sb = a.state_dict(), b.to(torch.bfloat16).state_dict()
        assert sa.keys() == sb.keys()
        assert all(t.dtype == torch.bfloat16 for t in sa.values() if t.is_floating_point())
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert half.vae.dtype == torch.float32
