"""Single-file checkpoints (Civitai downloads) as model.pretrained: detected from their header, configs derived
offline, trained, sampled and exported like the diffusers folder of the same weights; model.vae,
model.prediction_type and model.clip_skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, overrides
from sdtune import families
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.models import inspect_model, load_components, write_random_single_file
from sdtune.plan import check_run
from sdtune.single_file import (
    CONFIG_KEY,
    Checkpoint,
    config_folder,
    derived_configs,
    read_checkpoint,
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """single(family, meta=None) -> a tiny single-file checkpoint with the same weights as tiny_model(family);
    ``meta``: replace its ModelSpec metadata with these keys (its exact configs stay)."""
    made: dict[tuple, Path] = {}

    def get(family: str = "sd15", meta: dict[str, str] | None = None) -> Path:
        key = (family, tuple(sorted((meta or {}).items())) if meta is not None else None)
        if key not in made:
            path = tmp_path_factory.mktemp(f"single-{family}") / f"{family}.safetensors"
            write_random_single_file(path, family, "tiny", seed=0)
            if meta is not None:
                with safe_open(path, "pt") as f:
                    configs = (f.metadata() or {})[CONFIG_KEY]
                save_file(load_file(path), path, metadata={CONFIG_KEY: configs, **meta})
            made[key] = path
        return made[key]

    return get


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_a_single_file_loads_the_same_weights_as_its_folder(family, single, tiny_model):
    folder_form = load_components(str(tiny_model(family)), families.get(family))
    file_form = load_components(str(single(family)), families.get(family))
    for a, b in [(folder_form.denoiser, file_form.denoiser), (folder_form.vae, file_form.vae),
                 *zip(folder_form.text_encoders, file_form.text_encoders)]:
        pa, pb = _params(a), _params(b)
        assert pa.keys() == pb.keys()
        assert all(torch.equal(pa[k], pb[k]) for k in pa), type(a).__name__
    assert dict(file_form.noise_scheduler.config) == dict(folder_form.noise_scheduler.config)
    ids = [t("a photo of sks dog").input_ids for t in file_form.tokenizers]
    assert ids == [t("a photo of sks dog").input_ids for t in folder_form.tokenizers]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_a_single_file_describes_itself_like_its_folder(family, single, tiny_model):
    a, b = inspect_model(str(tiny_model(family))), inspect_model(str(single(family)))
    assert (b.family, b.prediction_type, b.resolution, b.bucket_multiple) == \
           (a.family, a.prediction_type, a.resolution, a.bucket_multiple)


@pytest.mark.slow
def test_training_on_a_single_file_equals_training_on_its_folder(single, tiny_model, tmp_path):
    """Same weights, same seed: bitwise the same LoRA and the same losses; then sample and export the run."""
    from sdtune.train import train

    runs = {}
    for name, model in [("folder", tiny_model("sd15")), ("file", single("sd15"))]:
        runs[name] = train(load_config(None, overrides(model, tmp_path / name, "train.max_steps=3",
                                                       "sample.prompts=['a photo of sks toy']")))
    a, b = (load_file(runs[n] / "pytorch_lora_weights.safetensors") for n in ("folder", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (runs[n] / "losses.jsonl").read_text().splitlines()]
              for n in ("folder", "file")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    # the run stores the file's absolute path: sample and export work from another folder
    config = (runs["file"] / "config.yaml").read_text()
    assert f"pretrained: {single('sd15').resolve()}" in config
    assert main(["sample", str(runs["file"]), "--steps", "2", "--seeds", "0", "--prompt", "a photo of sks toy"]) == 0
    assert (runs["file"] / "grid.png").is_file()
    assert main(["export", str(runs["file"]), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert any(k.startswith("lora_unet_") for k in load_file(tmp_path / "k.safetensors"))


def test_dry_run_names_the_family_of_a_single_file(single, tmp_path, capsys):
    assert main(["train", "recipes/micro_dreambooth.yaml", *overrides(single("sdxl"), tmp_path / "o"),
                 "--dry-run"]) == 0
    assert f"ok: {single('sdxl')} is sdxl (SDXL, epsilon), " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# What a header says


@pytest.mark.parametrize("metadata, expected", [
    ({}, ("v_prediction", "")),
    ({"modelspec.prediction_type": "epsilon"}, ("epsilon", "its modelspec.prediction_type")),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, ("v_prediction", "its modelspec.architecture")),
    ({"ss_v_parameterization": "True"}, ("v_prediction", "its ss_v_parameterization")),
])
def test_sd2_prediction_type_from_metadata(single, metadata, expected):
    ckpt = read_checkpoint(str(single("sd2", meta=metadata)))
    assert (ckpt.prediction_type, ckpt.said_by) == expected


def test_an_sd2_file_that_does_not_say_warns_and_can_be_told(single, tmp_path):
    path = single("sd2", meta={})
    cfg = load_config(None, overrides(path, tmp_path / "o"))
    plan = check_run(cfg)
    assert plan.model.prediction_type == "v_prediction"
    assert any(w.startswith("model.prediction_type: sd2.safetensors does not say") for w in plan.warnings)
    told = check_run(load_config(None, overrides(path, tmp_path / "o", "model.prediction_type=epsilon")))
    assert told.model.prediction_type == "epsilon" and not any("prediction_type" in w for w in told.warnings)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_file_whose_shapes_break_the_head_rule_is_one_line(family, single, tmp_path, capsys):
    """Without sdtune's configs in its metadata, a file's head counts come from its widths (64 channels per
    head); the tiny models are 32 wide, which no real model is: one line naming the file, not a
    ZeroDivisionError from transformers."""
    from sdtune.cli import main

    bare = tmp_path / f"{family}-bare.safetensors"
    save_file(load_file(single(family)), bare)  # no metadata at all
    code = main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), *overrides(bare, tmp_path / "o"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: model.pretrained: {bare.name}: a UNet with [32, 64] channels, not multiples of " \
        "the 64 per head" in err and "Traceback" not in err and "ZeroDivision" not in err


def test_a_v_pred_key_makes_an_sdxl_file_v_prediction(single, tmp_path):
    path = tmp_path / "vpred.safetensors"
    save_file({**load_file(single("sdxl")), "v_pred": torch.tensor([])}, path, metadata=_metadata(single("sdxl")))
    assert read_checkpoint(str(path)).prediction_type == "v_prediction"
    components = load_components(str(path), families.get("sdxl"))
    assert components.noise_scheduler.config.prediction_type == "v_prediction"


def _refusal(path: Path, tmp_path: Path, *extra: str) -> str:
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(path, tmp_path / "o", *extra)))
    return str(e.value)


def test_files_that_are_not_a_base_model_are_refused_in_one_line(single, tmp_path):
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    assert "is a LoRA, not a base model" in _refusal(lora, tmp_path)
    loha = tmp_path / "peft_loha.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.hada_w1_a": torch.zeros(4, 4)}, loha)
    assert "is a LoRA, not a base model" in _refusal(loha, tmp_path)
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, vae)
    assert "is a VAE alone; give it as model.vae" in _refusal(vae, tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    assert "is a pickle checkpoint (.ckpt)" in _refusal(ckpt, tmp_path)
    assert "does not exist" in _refusal(tmp_path / "missing.safetensors", tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single("sd15").read_bytes()[:-100])
    assert "cut.safetensors" in _refusal(cut, tmp_path)
    tensors = load_file(single("sd15"))
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file(tensors, inpaint)
    assert "9 input channels (inpainting" in _refusal(inpaint, tmp_path)


def test_a_file_without_a_vae_needs_model_vae(single, tiny_model, tmp_path):
    tensors = {k: v for k, v in load_file(single("sd15")).items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "novae.safetensors"
    save_file(tensors, path, metadata=_metadata(single("sd15")))
    assert "holds no VAE (first_stage_model.*); fix: set model.vae" in _refusal(path, tmp_path)
    vae_folder = tiny_model("sd15") / "vae"
    plan = check_run(load_config(None, overrides(path, tmp_path / "o", f"model.vae={vae_folder}")))
    assert plan.model.family.name == "sd15"
    c = load_components(str(path), families.get("sd15"), vae=str(vae_folder))
    expected = load_components(str(tiny_model("sd15")), families.get("sd15")).vae
    assert all(torch.equal(a, b) for a, b in zip(c.vae.state_dict().values(), expected.state_dict().values()))


def test_model_vae_takes_a_single_vae_file(single, tiny_model, tmp_path):
    base = load_components(str(tiny_model("sd15")), families.get("sd15"))
    vae_file = tmp_path / "other_vae.safetensors"
    tensors = {k.removeprefix("first_stage_model."): v * 2 for k, v in load_file(single("sd15")).items()
               if k.startswith("first_stage_model.")}
    save_file(tensors, vae_file)
    c = load_components(str(tiny_model("sd15")), families.get("sd15"), vae=str(vae_file))
    for k, v in base.vae.state_dict().items():
        assert torch.equal(c.vae.state_dict()[k], v * 2), k


def test_model_vae_that_cannot_load_is_refused_before_any_weight(tiny_model, tmp_path):
    assert "model.vae: nowhere/../vae is neither a file, a folder nor a hub id" in \
        _refusal(tiny_model("sd15"), tmp_path, "model.vae=nowhere/../vae")
    assert "model.vae: could not get the config of 'someone/vae' from the hub" in \
        _refusal(tiny_model("sd15"), tmp_path, "model.vae=someone/vae")
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    assert "is not a .safetensors file" in _refusal(tiny_model("sd15"), tmp_path, f"model.vae={tmp_path / 'vae.ckpt'}")


# --------------------------------------------------------------------------------------------------------
# Configs derived from the shapes of the real architectures


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_configs_derived_from_full_size_shapes_are_the_real_ones(family):
    """Full-size components built empty (meta device), written out under the original key names: the configs
    derived from those shapes alone are the ones the real models ship."""
    from accelerate import init_empty_weights

    from sdtune.ldm import to_original

    fam = families.get(family)
    with init_empty_weights():
        components = fam.random_components("full")
    shapes = {k: list(v.shape) for k, v in to_original(components, fam).items()}
    if fam.original_layout.text_layers_dropped:  # real SD2 files hold OpenCLIP-H's 24th layer, which diffusers cuts
        last = "cond_stage_model.model.transformer.resblocks.22."
        shapes |= {k.replace(last, last.replace("22", "23")): v for k, v in shapes.items() if k.startswith(last)}
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    ckpt = Checkpoint(path=Path("x.safetensors"), family=fam, prediction_type=prediction, said_by="", zero_snr=False,
                      has_vae=True, shapes=shapes, metadata={})
    derived = derived_configs(ckpt)
    unet = components.denoiser.config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "attention_head_dim", "transformer_layers_per_block", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "sample_size", "in_channels"):
        value, real = derived["unet"].get(key, unet[key]), unet[key]
        if key == "transformer_layers_per_block":  # 1 and [1, 1, 1, 1] are the same UNet
            levels = len(unet["block_out_channels"])
            value, real = ([v] * levels if isinstance(v, int) else v for v in (value, real))
        assert _listed(value) == _listed(real), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"):
        assert list(derived["vae"][key]) == list(components.vae.config[key]) if isinstance(derived["vae"][key], list) \
            else derived["vae"][key] == components.vae.config[key], key
    for spec, encoder in zip(fam.text_encoders, components.text_encoders):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                    "vocab_size", "max_position_embeddings"):
            assert derived[spec.name][key] == getattr(encoder.config, key), (spec.name, key)


def test_the_config_folder_is_written_once_into_the_cache(single):
    ckpt, folder = config_folder(str(single("sd15")))
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    _, again = config_folder(str(single("sd15")))
    assert again == folder and (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert ckpt.family.name == "sd15"
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")("sks").input_ids == [49406, 48136, 49407]
    assert (folder / "tokenizer" / "vocab.json").is_file()  # transformers 4's slow tokenizer reads these


# --------------------------------------------------------------------------------------------------------
# clip skip


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(tiny_model):
    """What diffusers' pipelines compute for clip_skip=1 and AUTOMATIC1111 for "Clip skip: 2"."""
    family = families.get("sd15")
    full = load_components(str(tiny_model("sd15")), family)
    skipped = load_components(str(tiny_model("sd15")), family, clip_skip=2)
    ids = family.tokenize(skipped.tokenizers, ["a photo of sks dog"])
    # StableDiffusionPipeline.encode_prompt with clip_skip=1 (which diffusers 0.42 cannot run on transformers 5's
    # flattened CLIPTextModel: it asks for .text_model)
    hidden = full.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
    expected = getattr(full.text_encoders[0], "text_model", full.text_encoders[0]).final_layer_norm(hidden)
    got = family.encode_prompt(skipped.text_encoders, ids)["encoder_hidden_states"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(family.encode_prompt(full.text_encoders, ids)["encoder_hidden_states"], expected)


def test_clip_skip_is_refused_for_sdxl(tiny_model, tmp_path):
    assert "model.clip_skip: SDXL conditions on fixed layers" in \
        _refusal(tiny_model("sdxl"), tmp_path, "model.clip_skip=2")


def test_sample_uses_the_runs_clip_skip(checkpointed_run, tmp_path):
    import yaml

    cfg = yaml.safe_load((checkpointed_run / "config.yaml").read_text())
    from sdtune.cli.sample import run_model_options

    assert run_model_options(None, cfg) == {}
    cfg["model"]["clip_skip"] = 2
    assert run_model_options(None, cfg) == {"clip_skip": 2}
    assert run_model_options("another/model", {**cfg, "model": {**cfg["model"], "vae": "v"}}) == {"clip_skip": 2}


def test_sample_renders_a_single_file_model_alone(single, tmp_path, capsys):
    out = tmp_path / "base.png"
    assert main(["sample", "--model", str(single("sdxl")), "--prompt", "a photo of a dog", "--steps", "2",
                 "--seeds", "0", "--out", str(out)]) == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "base_cells" / "cell-0000.json").read_text())
    assert sidecar["model"] == str(single("sdxl").resolve())
    # the replay loads the same file the same way: the same pixels
    assert main(["sample", "--replay", str(tmp_path / "base_cells" / "cell-0000.json"),
                 "--out", str(tmp_path / "again.png")]) == 0
    from PIL import Image, ImageChops

    with Image.open(tmp_path / "base_cells" / "cell-0000.png") as a, Image.open(tmp_path / "again.png") as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


@pytest.mark.slow
def test_a_clip_skip_run_says_so_in_its_kohya_file_and_samples_with_it(tiny_model, tmp_path, monkeypatch):
    from sdtune.runs import safetensors_metadata
    from sdtune.train import train

    out = train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", "train.max_steps=2",
                                            "model.clip_skip=2", "sample.prompts=['a photo of sks toy']")))
    kohya = next(out.glob("*_kohya.safetensors"))
    assert safetensors_metadata(kohya)["ss_clip_skip"] == "2"
    import sdtune.sample as sample_module

    seen = []
    real = sample_module.load_components
    monkeypatch.setattr(sample_module, "load_components", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert main(["sample", str(out), "--steps", "2", "--seeds", "0", "--out", str(tmp_path / "g.png")]) == 0
    assert seen and seen[0]["clip_skip"] == 2
    # the tiny encoder's 2 layers, the last one skipped
    assert real(str(tiny_model("sd15")), families.get("sd15"), clip_skip=2).text_encoders[0].config.num_hidden_layers == 1
