"""Text encoders bundled in a FLUX.1 / SD3.x transformer file (ComfyUI's all-in-one files, Stability's SD3 files:
``text_encoders.clip_l.`` / ``clip_g.`` / ``t5xxl.``): found from the header, checked against model.base's configs,
loaded from the file in place of the base's (whose weights for them are never read), in the base's dtype rules,
keyed into the caches by the file's bytes; ``model.bundled_text_encoders=false`` uses the base's."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from test_flux_single_file import _own_config as _config
from test_flux_single_file import to_bfl
from test_sd3_single_file import _equal, _losses
from test_sd3_single_file import _refusal as _problems
from test_sd3_single_file import to_original as to_mmdit

from conftest import DEMO_DATA, ROOT, overrides
from sdtune.cli import main
from sdtune.cli.sample import run_model_options
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.families.flux import FLUX
from sdtune.families.sd3 import SD3_FAMILY as SD3
from sdtune.families.t5 import t5_config
from sdtune.ldm import text_encoder_to_original, vae_to_original
from sdtune.models import load_components, model_identity, read_transformer_file
from sdtune.plan import check_run
from sdtune.single_file import CONFIG_KEY

FP8 = torch.float8_e4m3fn

# --------------------------------------------------------------------------------------------------------
# Files: the tiny models' transformers in their original layouts (the inverses of tests/test_flux_single_file.py
# and tests/test_sd3_single_file.py) with text encoders in ComfyUI's layout


def _transformer(folder: Path, inverse) -> dict[str, torch.Tensor]:
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return {f"model.diffusion_model.{k}": v for k, v in inverse(state, _config(folder)).items()}


def comfy(name: str, encoder, spec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An encoder as ComfyUI saves it: its transformers state dict (``text_model.``-normalised, as transformers 4
    names it) under ``text_encoders.<name>.transformer.``, beside SDClipModel's ``logit_scale``; T5's embedding
    once, as ``shared``; ``dtype``: the storage (ComfyUI's fp8 T5)."""
    if spec.model_class == "T5EncoderModel":
        state = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    else:
        state = text_encoder_to_original(encoder, dataclasses.replace(spec, openclip=False), position_ids=False)
    if spec.model_class == "CLIPTextModel":  # ComfyUI's CLIP-L has a projection FLUX does not use (identity)
        state["text_projection.weight"] = torch.eye(encoder.config.hidden_size)
    out = {f"text_encoders.{name}.transformer.{k}": v.to(dtype) for k, v in state.items()}
    return {**out, f"text_encoders.{name}.logit_scale": torch.tensor(4.6055)}


def _save(path: Path, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={CONFIG_KEY: json.dumps({"transformer": _config(folder)})})
    return path


def _shifted(encoder):
    """A copy of ``encoder`` with other weights (+0.01)."""
    other = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    return other


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """"flux" (ComfyUI's all-in-one layout, fp32), "flux-fp8" (T5 stored in fp8), "flux-other" (other encoder
    weights than the base's), "flux-t5-48" (a 48-wide T5: another model's), "sd3" (transformer, VAE, CLIP-L,
    CLIP-G, T5), "sd3-clips" (CLIP-L without its projection, CLIP-G in OpenCLIP's layout, no T5)."""
    out = tmp_path_factory.mktemp("bundled")
    flux, sd3 = tiny_model("flux"), tiny_model("sd3")
    f, s = load_components(str(flux), FLUX), load_components(str(sd3), SD3)
    (clip_spec, t5_spec), (l_spec, g_spec, t5_3_spec) = FLUX.text_encoders, SD3.text_encoders
    transformer = _transformer(flux, to_bfl)
    clip, t5 = f.text_encoders
    wide = type(t5)(t5_config("tiny", d_model=48))
    paths = {
        "flux": {**transformer, **comfy("clip_l", clip, clip_spec), **comfy("t5xxl", t5, t5_spec)},
        "flux-fp8": {**transformer, **comfy("clip_l", clip, clip_spec), **comfy("t5xxl", t5, t5_spec, FP8)},
        "flux-other": {**transformer, **comfy("clip_l", _shifted(clip), clip_spec),
                       **comfy("t5xxl", _shifted(t5), t5_spec)},
        "flux-t5-48": {**transformer, **comfy("t5xxl", wide, t5_spec)},
    }
    vae = {f"first_stage_model.{k}": v for k, v in vae_to_original(s.vae).items()}
    mmdit = {**_transformer(sd3, to_mmdit), **vae}
    clip_l, clip_g, t5_3 = s.text_encoders
    open_clip = {f"text_encoders.clip_g.model.{k}": v for k, v in text_encoder_to_original(clip_g, g_spec).items()}
    paths["sd3"] = {**mmdit, **comfy("clip_l", clip_l, l_spec), **comfy("clip_g", clip_g, g_spec),
                    **comfy("t5xxl", t5_3, t5_3_spec)}
    paths["sd3-clips"] = {**mmdit, **{k: v for k, v in comfy("clip_l", clip_l, l_spec).items()
                                      if "text_projection" not in k},
                          **open_clip, "text_encoders.clip_g.model.logit_scale": torch.tensor(4.6055)}
    return {name: _save(out / f"{name}.safetensors", tensors, flux if name.startswith("flux") else sd3)
            for name, tensors in paths.items()}


def without_weights(folder: Path, components: list[str], to: Path) -> Path:
    """A copy of a model folder without the weight files of ``components`` (their configs kept)."""
    shutil.copytree(folder, to, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")
                                                         and Path(d).name in components])
    assert all(not list((to / c).glob("*.safetensors")) for c in components)
    return to


# --------------------------------------------------------------------------------------------------------
# The header says which encoders a file bundles; checks read no tensor


def test_bundled_encoders_are_found_and_checked_from_the_header_alone(files, tiny_model, tmp_path, monkeypatch):
    tf = read_transformer_file(str(files["flux"]))
    assert [(b.name, b.spec.name, b.open_clip) for b in tf.text_encoders] == \
        [("clip_l", "text_encoder", False), ("t5xxl", "text_encoder_2", False)]
    assert tf.others == 0  # logit_scale and CLIP-L's projection are part of what ComfyUI bundles
    tf = read_transformer_file(str(files["sd3-clips"]))
    assert [(b.name, b.prefix, b.open_clip) for b in tf.text_encoders] == \
        [("clip_l", "text_encoders.clip_l.transformer.", False), ("clip_g", "text_encoders.clip_g.model.", True)]

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    for name, family in [("flux-fp8", "flux"), ("sd3", "sd3"), ("sd3-clips", "sd3")]:
        plan = check_run(load_config(None, overrides(files[name], tmp_path / name, f"model.base={tiny_model(family)}")))
        assert not [w for w in plan.warnings if "bundle" in w or "also holds" in w], plan.warnings


# --------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name", ["flux-fp8", "sd3", "sd3-clips"])
def test_the_bundled_encoders_load_as_the_folders_without_reading_the_bases(name, files, tiny_model, tmp_path):
    family = FLUX if name.startswith("flux") else SD3
    folder = tiny_model(family.name)
    bundled = [b.spec.name for b in read_transformer_file(str(files[name])).text_encoders]
    # the base's weight files of the bundled encoders are gone: the file's are the only ones there are
    base = without_weights(folder, bundled, tmp_path / "base")
    loaded = load_components(str(files[name]), family, base=str(base))
    own = load_components(str(folder), family)
    for spec, a, b in zip(family.text_encoders, own.text_encoders, loaded.text_encoders, strict=True):
        expected = dict(a.state_dict())
        assert all(v.dtype == torch.float32 for v in b.state_dict().values())
        if name == "flux-fp8" and spec.model_class == "T5EncoderModel":  # stored in fp8, computed in float32
            expected = {k: v.to(FP8).float() for k, v in expected.items()}
            assert not _equal(expected, a.state_dict())
        if name == "sd3-clips" and spec.name == "text_encoder":  # no projection in the file: diffusers' identity
            expected["text_projection.weight"] = torch.eye(32)
        assert _equal(expected, b.state_dict()), spec.name
        assert type(a) is type(b) and not b.training
    t5 = loaded.text_encoders[-1]
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # one tied embedding, as from_pretrained gives
    assert _equal(own.denoiser.state_dict(), loaded.denoiser.state_dict())
    if name == "sd3-clips":  # the file bundles no T5: the base's
        assert "text_encoder_3" not in bundled and _equal(own.text_encoders[2].state_dict(), t5.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_in_half_precision_the_encoders_are_what_from_pretrained_gives(dtype, files, tiny_model):
    """transformers keeps T5's ``wo`` in float32 when it loads in float16 (not in bfloat16); the file's T5 too."""
    own = load_components(str(tiny_model("flux")), FLUX, dtype=dtype)
    loaded = load_components(str(files["flux"]), FLUX, base=str(tiny_model("flux")), dtype=dtype)
    for a, b in zip(own.text_encoders, loaded.text_encoders, strict=True):
        assert {n: p.dtype for n, p in a.named_parameters()} == {n: p.dtype for n, p in b.named_parameters()}
        assert _equal(a.state_dict(), b.state_dict())
    wo = {p.dtype for n, p in loaded.text_encoders[1].named_parameters() if n.endswith("DenseReluDense.wo.weight")}
    assert wo == {torch.float32 if dtype == torch.float16 else dtype}


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_an_encoder_that_is_not_the_bases_kind_is_refused_in_one_line(files, tiny_model, tmp_path):
    base = f"model.base={tiny_model('flux')}"
    [line] = _problems(tmp_path, files["flux-t5-48"], base)
    assert line.startswith("model.pretrained: flux-t5-48.safetensors bundles a T5-XXL text encoder "
                           "(text_encoders.t5xxl.*) of another shape than model.base's (text_encoder_2/config.json): "
                           "its shared.weight is (128, 48), the config's (128, 32)")
    assert "fix: model.bundled_text_encoders=false" in line
    # the same where no plan checks first (sdtune sample --model FILE --base BASE)
    with pytest.raises(SdtuneError, match="bundles a T5-XXL text encoder"):
        load_components(str(files["flux-t5-48"]), FLUX, base=str(tiny_model("flux")))
    # with the base's encoders the file trains
    check_run(load_config(None, overrides(files["flux-t5-48"], tmp_path / "o", base,
                                          "model.bundled_text_encoders=false")))
    # an incomplete encoder, and one in a layout sdtune does not read
    tensors = load_file(files["flux"])
    cut = tmp_path / "cut.safetensors"
    _save(cut, {k: v for k, v in tensors.items() if not k.endswith("final_layer_norm.bias")}, tiny_model("flux"))
    [line] = _problems(tmp_path, cut, base)  # CLIP's final norm has a bias, T5's none
    assert line.startswith("model.pretrained: cut.safetensors bundles a CLIP ViT-L/14 text encoder "
                           "(text_encoders.clip_l.*) without 1 of its tensors (e.g. final_layer_norm.bias): an "
                           "incomplete encoder")
    odd = tmp_path / "odd.safetensors"
    _save(odd, {**{k: v for k, v in tensors.items() if not k.startswith("text_encoders.clip_l.")},
                "text_encoders.clip_l.text.weight": torch.zeros(2)}, tiny_model("flux"))
    [line] = _problems(tmp_path, odd, base)
    assert "(text_encoders.clip_l.*) in a layout sdtune does not read (e.g. text_encoders.clip_l.text.weight)" in line
    # ComfyUI's scaled fp8 (a scale beside each fp8 weight), which a plain cast would read wrong
    scaled = tmp_path / "scaled.safetensors"
    q = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    _save(scaled, {**tensors, f"{q}.scale_weight": torch.ones(()), "text_encoders.t5xxl.transformer.scaled_fp8":
                   torch.zeros(2)}, tiny_model("flux"))
    [line] = _problems(tmp_path, scaled, base)
    assert "T5-XXL text encoder (text_encoders.t5xxl.*) with 2 tensor(s) model.base's text_encoder_2 has no place " \
        "for (e.g. encoder.block.0.layer.0.SelfAttention.q.scale_weight)" in line
    # the option where there is nothing bundled to choose: a diffusers folder, a file of the transformer alone
    alone = _save(tmp_path / "alone.safetensors", {k: v for k, v in tensors.items() if k.startswith("model.")},
                  tiny_model("flux"))
    for model, extra in [(tiny_model("flux"), []), (alone, [base])]:
        assert _problems(tmp_path, model, *extra, "model.bundled_text_encoders=true") == [
            f"model.bundled_text_encoders: {model.name} bundles no text encoders (text_encoders.*): the option is for "
            "a FLUX.1 or SD3.x transformer file that does; fix: remove it"]


# --------------------------------------------------------------------------------------------------------
# model.bundled_text_encoders=false, the caches' identity, training


def _embeddings(c, family) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return family.encode_prompt(c.text_encoders, family.tokenize(c.tokenizers, ["a photo of sks toy"]))


def test_bundled_text_encoders_false_uses_the_bases(files, tiny_model):
    base = str(tiny_model("flux"))
    own = _embeddings(load_components(base, FLUX), FLUX)
    other = _embeddings(load_components(str(files["flux-other"]), FLUX, base=base), FLUX)
    bases = _embeddings(load_components(str(files["flux-other"]), FLUX, base=base, bundled_text_encoders=False), FLUX)
    assert own.keys() == other.keys() == bases.keys()
    assert all(not torch.equal(own[k], other[k]) for k in own) and _equal(own, bases)
    # the text-embedding and class-image caches follow: the file's bytes where its encoders are used
    parts = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]  # what the text cache is keyed by
    assert model_identity(str(files["flux-other"]), None, parts, base=base) != model_identity(base, None, parts)
    assert model_identity(str(files["flux-other"]), None, parts, base=base, bundled_text_encoders=False) == \
        model_identity(base, None, parts)
    assert model_identity(str(files["flux-other"]), None, ["vae"], base=base) == model_identity(base, None, ["vae"])
    # sdtune sample / eval / export of such a run load the same encoders (the run's model options)
    run = {"model": {"pretrained": str(files["flux-other"]), "base": base, "bundled_text_encoders": False}}
    assert run_model_options(None, run) == {"base": base, "bundled_text_encoders": False}
    assert run_model_options(base, run) == {}  # another --model: the run's options are not its
    run["model"]["bundled_text_encoders"] = True
    assert run_model_options(None, run) == {"base": base}


def test_the_model_card_says_its_snippet_loads_the_bases_encoders(files, tiny_model):
    """diffusers' from_single_file reads only the transformer of such a file: the card's snippet says that the
    encoders it loads are the base's, not the bundled ones the LoRA was trained with."""
    from sdtune import share

    config = {"model": {"pretrained": str(files["flux-other"]), "base": str(tiny_model("flux"))},
              "data": {"identifier": "sks"}, "train": {"max_steps": 1, "batch_size": 1, "learning_rate": 1e-4,
              "lr_scheduler": "constant", "optimizer": "adamw", "mixed_precision": "bf16"},
              "lora": {"rank": 4, "target_modules": ["to_q"]}}
    note = "# the LoRA was trained with the text encoders flux-other.safetensors bundles (clip_l, t5xxl); this " \
           "loads the base's"
    assert note in share.model_card(config, FLUX, None, None)
    config["model"]["bundled_text_encoders"] = False
    assert "bundles" not in share.model_card(config, FLUX, None, None)
    config["model"] = {"pretrained": str(files["flux-t5-48"]), "base": str(tiny_model("flux")),
                       "bundled_text_encoders": True}
    assert "bundles (t5xxl)" in share.model_card(config, FLUX, None, None)


def test_training_on_an_all_in_one_file_equals_training_on_its_folder(files, tiny_model, tmp_path):
    folder = tiny_model("flux")
    base = without_weights(folder, ["text_encoder", "text_encoder_2", "transformer"], tmp_path / "base")
    models = {"folder": [f"model.pretrained={folder}"],
              "file": [f"model.pretrained={files['flux']}", f"model.base={base}"]}  # the base without encoders
    for name, model in models.items():
        assert main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), f"data.instance_dir={DEMO_DATA}", *model,
                     "prior.enabled=false", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0",
                     "sample.every=0", "train.report_to=none", f"train.output_dir={tmp_path / name}"]) == 0
    losses = _losses(tmp_path / "folder")
    assert len(losses) == 2 and _losses(tmp_path / "file") == losses
    assert _equal(*(load_file(tmp_path / n / "pytorch_lora_weights.safetensors") for n in models))
