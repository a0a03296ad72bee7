"""T5's prompt length (FLUX.1, SD3): 512 tokens for FLUX.1-dev, 256 for schnell (BFL's code, kohya's
t5xxl_max_token_length), ``flux.`` / ``sd3.max_sequence_length`` for another; the same length in training, in
the class images and in every sample."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

from conftest import overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.families.flux import FLUX
from sdtune.grid import Cell, Settings
from sdtune.models import inspect_model, load_components
from sdtune.plan import check_run
from sdtune.sample import Request, render_cells
from sdtune.sample import with_family_defaults as sample_defaults
from sdtune.train import train


@pytest.fixture(scope="module")
def schnell(tiny_model, tmp_path_factory):
    """The tiny FLUX.1-dev made schnell: the same transformer without its guidance embedding."""
    folder = tmp_path_factory.mktemp("schnell") / "m"
    shutil.copytree(tiny_model("flux"), folder)
    config = json.loads((folder / "transformer/config.json").read_text())
    transformer = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}
                                         | {"guidance_embeds": False})
    dev = FluxTransformer2DModel.from_pretrained(tiny_model("flux"), subfolder="transformer")
    transformer.load_state_dict(dev.state_dict(), strict=False)  # all but guidance_embedder.*
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return folder


def test_the_model_says_its_length_and_a_recipe_may_set_another(tiny_model, schnell, tmp_path):
    assert inspect_model(str(tiny_model("flux"))).family.max_sequence_length == 512
    info = inspect_model(str(schnell))
    assert info.architecture == "flux-1-schnell" and info.family.max_sequence_length == 256
    assert FLUX.max_sequence_length == 512 and families.get("flux") is FLUX  # the registered family is unchanged
    assert families.get("sd15").max_sequence_length is None
    c = load_components(str(schnell), info.family)
    ids = info.family.tokenize(c.tokenizers, ["a photo of sks toy"])
    assert [i.shape[1] for i in ids] == [77, 256]  # CLIP's 77, T5's 256

    plan = check_run(load_config(None, overrides(schnell, tmp_path / "a", "prior.enabled=false",
                                                 "flux.max_sequence_length=64")))
    assert plan.family.max_sequence_length == 64
    assert [i.shape[1] for i in plan.family.tokenize(c.tokenizers, ["a photo"])] == [77, 64]
    sd3 = check_run(load_config(None, overrides(tiny_model("sd3"), tmp_path / "d", "prior.enabled=false",
                                                "sd3.max_sequence_length=32")))
    assert sd3.family.max_sequence_length == 32 and families.get("sd3").max_sequence_length == 256
    with pytest.raises(ConfigError, match="flux.max_sequence_length"):
        load_config(None, overrides(schnell, tmp_path / "b", "flux.max_sequence_length=1024"))
    with pytest.raises(ConfigError, match="flux.max_sequence_length: expected a number, got a true/false"):
        load_config(None, overrides(schnell, tmp_path / "b", "flux.max_sequence_length=true"))
    with pytest.raises(ConfigError, match="flux"):  # another family's section: one line naming it
        check_run(load_config(None, overrides(tiny_model("sd15"), tmp_path / "c", "prior.enabled=false",
                                              "flux.max_sequence_length=64")))


def test_samples_give_the_pipeline_the_length(schnell):
    req = sample_defaults(Request(model=str(schnell), lora=[], cells=[Cell("a photo of sks toy", 0, None)],
                                  settings=Settings(width=64, height=64, steps=2)))
    assert req.settings.max_sequence_length == 256
    assert sample_defaults(Request(model=str(schnell), lora=[], cells=req.cells, settings=Settings(),
                                   model_options={"max_sequence_length": 32})).settings.max_sequence_length == 32
    pipe = FluxPipeline.from_pretrained(schnell, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    ours, errors = render_cells(pipe, req.cells, req.settings)
    assert errors == [None]

    def direct(tokens: int) -> np.ndarray:
        return np.asarray(pipe(prompt=["a photo of sks toy"], num_inference_steps=2, guidance_scale=3.5, height=64,
                               width=64, generator=[torch.Generator("cpu").manual_seed(0)],
                               max_sequence_length=tokens).images[0])

    assert np.array_equal(np.asarray(ours[0]), direct(256))
    assert not np.array_equal(np.asarray(ours[0]), direct(512))  # the padding is attended to: the length matters


def test_training_class_images_and_grids_use_the_runs_length(schnell, tmp_path, monkeypatch):
    """A schnell run with flux.max_sequence_length=48: the transformer sees (B, 48, D) text in every step, class
    image and grid; `sdtune sample RUN` renders at 48 too (its sidecar says so)."""
    from sdtune.cli import main

    seen: set[int] = set()
    forward = FluxTransformer2DModel.forward

    def recording(self, *args, **kwargs):
        seen.add(kwargs["encoder_hidden_states"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording)
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train(load_config(None, overrides(schnell, out, "flux.max_sequence_length=48", "train.max_steps=2",
                                      f"prior.class_dir={tmp_path / 'class'}", "prior.num_class_images=1",
                                      "prior.generation_steps=1", "train.cache_text_embeddings=true",
                                      "sample.every=0")))
    assert seen == {48}
    assert main(["sample", str(out), "--prompt", "a photo of sks toy", "--steps", "1", "--seeds", "0",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert seen == {48}
    cells = sorted((tmp_path / "grid_cells").glob("*.json"))
    assert cells and all(json.loads(c.read_text())["settings"]["max_sequence_length"] == 48 for c in cells)
    assert np.asarray(Image.open(tmp_path / "grid.png")).std() > 0


def test_sample_takes_the_length_for_a_model_without_a_run(schnell, tiny_model, tmp_path, capsys):
    from sdtune.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(schnell), "--prompt", "a toy", "--seeds", "0", "--steps", "1",
                 "--max-sequence-length", "40", "--out", str(out)]) == 0
    cells = sorted((tmp_path / "grid_cells").glob("*.json"))
    assert cells and all(json.loads(c.read_text())["settings"]["max_sequence_length"] == 40 for c in cells)
    assert main(["sample", "--model", str(tiny_model("sd15")), "--prompt", "a toy", "--seeds", "0", "--steps", "1",
                 "--max-sequence-length", "40", "--out", str(tmp_path / "sd.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --max-sequence-length: SD1.x has no T5 encoder; its prompts are CLIP's 77 tokens. " \
                      "fix: remove it"


def test_the_runs_length_goes_with_its_own_model():
    """A run's T5 length is for its model; a LoRA sampled on another model (even one without T5, where the LoRA's
    family is then what is refused) takes that model's own."""
    from sdtune.cli.sample import run_model_options

    run = {"model": {"pretrained": "a/flux"}, "flux": {"max_sequence_length": 64}, "sd3": {"max_sequence_length": None}}
    assert run_model_options(None, run)["max_sequence_length"] == 64
    assert run_model_options("a/flux", run)["max_sequence_length"] == 64
    assert "max_sequence_length" not in run_model_options("other/sd15", run)


def test_a_caption_longer_than_the_t5_length_is_named(schnell, tmp_path):
    """CLIP reads 77 tokens and says so; T5 reads the run's length (here 8), and a caption it cuts is named too,
    with the identifier when it is in the part cut off."""
    from sdtune.plan import truncated_captions

    plan = check_run(load_config(None, overrides(schnell, tmp_path / "a", "prior.enabled=false",
                                                 "flux.max_sequence_length=8")))
    c = load_components(str(schnell), plan.family)
    long = "a photo on a sunny beach with waves and sand in the evening light of sks toy"
    plan.examples[0] = plan.examples[0].__class__(**{**plan.examples[0].__dict__, "caption": long})
    lines = truncated_captions(plan.family, [(e.path.name, e.caption, "sks") for e in plan.examples], c.tokenizers)
    assert len(lines) == len(plan.examples)  # the tiny T5's tokenizer cuts every demo caption at 8 too
    assert "T5-XXL reads 8" in lines[0] and "The identifier 'sks' is in the part cut off" in lines[0]
