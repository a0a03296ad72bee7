"""FLUX.1 transformer files (Black Forest Labs' original layout, the transformer alone: what Civitai and model
pages share) as model.pretrained beside model.base: detected and configured from the header, converted with
diffusers' converter, refused in one line where they cannot work, trained and sampled like the diffusers
folder of the same weights."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers.loaders.single_file_utils as diffusers_single_file
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from PIL import Image, ImageChops
from safetensors.torch import load_file, save_file

from conftest import DEMO_DATA, ROOT, overrides
from sdtune import flux_file
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.families.flux import FLUX
from sdtune.flux_file import derived_config, read_flux_file
from sdtune.models import inspect_model, load_components
from sdtune.plan import check_run
from sdtune.single_file import CONFIG_KEY

# --------------------------------------------------------------------------------------------------------
# diffusers' layout -> BFL's, written from BFL's model (flux/modules/layers.py): the inverse of the converter


def _linear(out: dict, bfl: str, state: dict, name: str) -> None:
    for leaf in ("weight", "bias"):
        out[f"{bfl}.{leaf}"] = state[f"{name}.{leaf}"]


def _swapped(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous gives (scale, shift), BFL's final layer (shift, scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _double_block(out: dict, state: dict, i: int) -> None:
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    for bfl, name in [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                      ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                      ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                      ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]:
        _linear(out, b + bfl, state, d + name)
    streams = [("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))]
    for stream, names in streams:
        for leaf in ("weight", "bias"):  # SelfAttention.qkv: one Linear, q, k, v stacked on its output
            out[f"{b}{stream}_attn.qkv.{leaf}"] = torch.cat([state[f"{d}attn.{n}.{leaf}"] for n in names])
    norms = [("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
             ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")]
    for bfl, name in norms:
        out[f"{b}{bfl}.scale"] = state[f"{d}attn.{name}.weight"]  # RMSNorm's parameter is called scale


def _single_block(out: dict, state: dict, i: int) -> None:
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    _linear(out, b + "modulation.lin", state, d + "norm.linear")
    _linear(out, b + "linear2", state, d + "proj_out")
    for leaf in ("weight", "bias"):  # SingleStreamBlock.linear1: q, k, v and the MLP input in one Linear
        out[f"{b}linear1.{leaf}"] = torch.cat([state[f"{d}{n}.{leaf}"] for n in
                                               ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    out[f"{b}norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
    out[f"{b}norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]


def to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict in BFL's original layout."""
    out: dict[str, torch.Tensor] = {}
    top = [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
           ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
           ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
           ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
           ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")]
    if config["guidance_embeds"]:
        top += [("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    for bfl, name in top:
        _linear(out, bfl, state, name)
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swapped(state[f"norm_out.linear.{leaf}"])
    for i in range(config["num_layers"]):
        _double_block(out, state, i)
    for i in range(config["num_single_layers"]):
        _single_block(out, state, i)
    return out


def diffusers_converter(width: int):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, its own code, with its one width
    constant (``inner_dim = 3072``, FLUX.1's) set to ``width``: it splits a single block's linear1 there."""
    module = diffusers_single_file
    source = textwrap.dedent(inspect.getsource(module.convert_flux_transformer_checkpoint_to_diffusers))
    assert source.count("inner_dim = 3072") == 1  # diffusers changed: look at the converter again
    namespace = dict(vars(module))
    patched = source.replace("inner_dim = 3072", f"inner_dim = {width}")
    exec(compile(patched, module.__file__, "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _own_config(folder: Path) -> dict:
    """The transformer config the tiny model's folder holds (as diffusers saved it), less its own keys."""
    config = json.loads((folder / "transformer" / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _folder_transformer(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_the_inverse_round_trips_through_diffusers_converter(tiny_model):
    state = _folder_transformer(tiny_model("flux"))
    config = _own_config(tiny_model("flux"))
    bfl = to_bfl(state, config)
    assert len(bfl) < len(state)  # q, k, v (and the MLP input) fused
    back = diffusers_converter(32)(dict(bfl))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # sdtune's conversion at a width other than 3072 is the same mapping
    ours = flux_file.to_diffusers(dict(bfl), 32)
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_at_flux1_width_sdtune_converts_with_diffusers_own_converter(monkeypatch):
    """FLUX.1's real width (3072) goes through diffusers' unpatched converter, on meta tensors (no memory):
    every key and shape of the diffusers model."""
    config = {**FLUX.random_configs("full")["transformer"], "num_layers": 1, "num_single_layers": 1}
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    state = dict(model.state_dict())
    calls = []
    real = diffusers_single_file.convert_flux_transformer_checkpoint_to_diffusers
    monkeypatch.setattr(diffusers_single_file, "convert_flux_transformer_checkpoint_to_diffusers",
                        lambda sd, **kw: calls.append(1) or real(sd, **kw))
    back = flux_file.to_diffusers(to_bfl(state, config), 3072)
    assert calls and back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)


# --------------------------------------------------------------------------------------------------------
# Files of the tiny model's weights


@pytest.fixture(scope="module")
def flux_files(tiny_model, tmp_path_factory):
    """{name: path}: the tiny FLUX model's transformer in BFL's layout: "plain", "comfy" (under
    model.diffusion_model., with a bundled VAE tensor), "fp8" (float8_e4m3fn storage, prefixed), "bf16",
    "schnell" (no guidance embedding), "nometa" (without sdtune's metadata)."""
    folder = tmp_path_factory.mktemp("flux-files")
    config = _own_config(tiny_model("flux"))
    bfl = to_bfl(_folder_transformer(tiny_model("flux")), config)
    meta = {CONFIG_KEY: json.dumps({"transformer": config})}
    variants = {
        "plain": (bfl, meta),
        "comfy": ({**{f"model.diffusion_model.{k}": v for k, v in bfl.items()},
                   "vae.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, meta),
        "fp8": ({f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, meta),
        "bf16": ({k: v.to(torch.bfloat16) for k, v in bfl.items()}, meta),
        "schnell": ({k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}, meta),
        "nometa": (bfl, {}),
    }
    paths = {}
    for name, (tensors, metadata) in variants.items():
        paths[name] = folder / f"flux-{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, paths[name], metadata=metadata)
    return paths


@pytest.mark.parametrize("name", ["plain", "comfy", "fp8"])
def test_a_flux_file_is_detected_and_its_config_derived_from_its_header(name, flux_files, tiny_model):
    ff = read_flux_file(str(flux_files[name]))
    assert ff is not None and flux_file.has_guidance(ff) and ff.variant == "FLUX.1-dev"
    assert ff.prefix == ("" if name == "plain" else "model.diffusion_model.")
    assert ff.others == (1 if name == "comfy" else 0)
    assert derived_config(ff) == _own_config(tiny_model("flux"))
    info = inspect_model(str(flux_files[name]), base=str(tiny_model("flux")))
    folder = inspect_model(str(tiny_model("flux")))
    assert info.family is FLUX and info.pretrained == str(flux_files[name])
    assert (info.prediction_type, info.resolution, info.bucket_multiple, info.architecture) == \
        (folder.prediction_type, folder.resolution, folder.bucket_multiple, None)


def test_schnell_is_told_from_dev_by_its_guidance_embedding(flux_files, tiny_model, tmp_path):
    ff = read_flux_file(str(flux_files["schnell"]))
    assert ff is not None and not flux_file.has_guidance(ff) and ff.variant == "FLUX.1-schnell"
    assert derived_config(ff) == {**_own_config(tiny_model("flux")), "guidance_embeds": False}
    info = inspect_model(str(flux_files["schnell"]), base=str(tiny_model("flux")))
    assert info.architecture == "flux-1-schnell"  # what kohya metadata calls it
    # a schnell file with a dev base trains, with a warning about the scheduler it samples with
    plan = check_run(load_config(None, overrides(flux_files["schnell"], tmp_path / "o",
                                                 f"model.base={tiny_model('flux')}")))
    assert any("is a FLUX.1-schnell transformer" in w and "model.base=black-forest-labs/FLUX.1-schnell" in w
               for w in plan.warnings)


def _refusal(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(model, tmp_path / "o", *extra)))
    return e.value.problems


def test_the_refusals_are_one_line_each(flux_files, tiny_model, tmp_path):
    # no base: one line naming model.base with an example of the file's own variant
    problems = _refusal(tmp_path, flux_files["plain"])
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("model.base: flux-plain.safetensors holds only a FLUX.1-dev transformer")
    assert "e.g. model.base=black-forest-labs/FLUX.1-dev" in problems[0]
    assert "e.g. model.base=black-forest-labs/FLUX.1-schnell" in _refusal(tmp_path, flux_files["schnell"])[0]
    # a base of another family
    problems = _refusal(tmp_path, flux_files["plain"], f"model.base={tiny_model('sd15')}")
    assert problems == [f"model.base: {tiny_model('sd15')} is an SD1.x model; a FLUX.1 transformer file takes "
                        "its text encoders, tokenizers, VAE and scheduler from a FLUX.1 model, e.g. "
                        "model.base=black-forest-labs/FLUX.1-dev"]
    # a base whose T5 is not the width the transformer takes
    other = tmp_path / "other-t5"
    shutil.copytree(tiny_model("flux"), other, ignore=shutil.ignore_patterns("*.safetensors"))
    t5 = json.loads((other / "text_encoder_2/config.json").read_text())
    (other / "text_encoder_2/config.json").write_text(json.dumps({**t5, "d_model": 48}))
    [line] = _refusal(tmp_path, flux_files["plain"], f"model.base={other}")
    assert "T5 encoder gives 48-wide embeddings, but the transformer of flux-plain.safetensors takes 32" \
        in line
    # a base for a model that needs none: a diffusers folder, a hub id
    for model in (tiny_model("flux"), "black-forest-labs/FLUX.1-dev"):
        [line] = _refusal(tmp_path, model, f"model.base={tiny_model('flux')}")
        assert line.startswith("model.base: only a FLUX.1 or SD3.x transformer file") and "remove model.base" in line
    # a head width other than FLUX.1's, from a file sdtune did not write: it cannot tell the rope axes
    [line] = _refusal(tmp_path, flux_files["nometa"], f"model.base={tiny_model('flux')}")
    assert "16 channels per attention head, not FLUX.1's 128" in line and "axes_dims_rope" in line
    # a FLUX LoRA in BFL's layout is not taken for a model
    lora = tmp_path / "flux_lora.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 32),
               "single_blocks.0.linear1.lora_down.weight": torch.zeros(4, 32)}, lora)
    assert read_flux_file(str(lora)) is None
    assert "is a LoRA, not a base model" in _refusal(tmp_path, lora)[0]


def test_a_bundled_file_warns_that_its_other_parts_are_not_used(flux_files, tiny_model, tmp_path):
    plan = check_run(load_config(None, overrides(flux_files["comfy"], tmp_path / "o",
                                                 f"model.base={tiny_model('flux')}")))
    assert plan.model.family is FLUX
    assert any("also holds 1 tensors outside its transformer" in w for w in plan.warnings)


@pytest.mark.parametrize("name", ["comfy", "fp8", "bf16"])
def test_a_flux_file_loads_the_weights_of_its_folder(name, flux_files, tiny_model):
    folder = load_components(str(tiny_model("flux")), FLUX)
    loaded = load_components(str(flux_files[name]), FLUX, base=str(tiny_model("flux")))
    a, b = folder.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert a.keys() == b.keys()
    assert all(v.dtype == torch.float32 for v in b.values())
    stored = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}.get(name)
    if stored:  # the folder's weights rounded to the file's storage, computed in float32
        a = {k: v.to(stored).float() for k, v in a.items()}
        assert any(not torch.equal(a[k], folder.denoiser.state_dict()[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in loaded.denoiser.config.items() if not k.startswith("_")} == \
        {k: v for k, v in folder.denoiser.config.items() if not k.startswith("_")}
    # the rest is the base's
    for x, y in zip(folder.text_encoders, loaded.text_encoders, strict=True):
        pairs = zip(x.state_dict().values(), y.state_dict().values(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs)
    assert dict(loaded.noise_scheduler.config) == dict(folder.noise_scheduler.config)


def test_sample_renders_a_flux_file_with_its_base_as_its_folder(flux_files, tiny_model, tmp_path, capsys):
    args = ["--prompt", "a photo of a dog", "--steps", "2", "--seeds", "0"]
    assert main(["sample", "--model", str(flux_files["fp8"]), *args, "--out", str(tmp_path / "x.png")]) != 0
    assert "e.g. model.base=black-forest-labs/FLUX.1-dev (sdtune sample: --base)" in capsys.readouterr().err
    assert main(["sample", "--model", str(flux_files["comfy"]), "--base", str(tiny_model("flux")), *args,
                 "--out", str(tmp_path / "file.png")]) == 0
    assert main(["sample", "--model", str(tiny_model("flux")), *args,
                 "--out", str(tmp_path / "folder.png")]) == 0
    # the same weights; diffusers leaves the folder's tensors where they sit in the memory-mapped file, 24
    # bytes off a 64-byte boundary, and the CPU's matmul kernels round such operands differently (2e-7 in the
    # transformer's output): a pixel may differ by one level
    with Image.open(tmp_path / "file_cells" / "cell-0000.png") as a, \
            Image.open(tmp_path / "folder_cells" / "cell-0000.png") as b:
        difference = np.asarray(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    sidecar = json.loads((tmp_path / "file_cells" / "cell-0000.json").read_text())
    assert sidecar["model_options"]["base"] == str(tiny_model("flux").resolve())


# --------------------------------------------------------------------------------------------------------
# End to end: `sdtune train` and `sdtune sample`, each in its own process as a user runs them


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdtune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_on_a_flux_file_equals_training_on_its_folder_and_samples(flux_files, tiny_model, tmp_path):
    folder = tiny_model("flux")
    common = ["recipes/tiny_cpu.yaml", f"data.instance_dir={DEMO_DATA}", "prior.enabled=false",
              "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0", "sample.every=0",
              "train.report_to=none"]
    runs = {}
    for name, model in [("folder", [f"model.pretrained={folder}"]),
                        ("file", [f"model.pretrained={flux_files['comfy']}", f"model.base={folder}"])]:
        runs[name] = tmp_path / name
        done = _cli("train", *common, *model, f"train.output_dir={runs[name]}")
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(_losses(runs["folder"])) == 2 and _losses(runs["file"]) == _losses(runs["folder"])
    a, b = (load_file(runs[n] / "pytorch_lora_weights.safetensors") for n in ("folder", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = (runs["file"] / "config.yaml").read_text()
    assert f"base: {folder.resolve()}" in config and f"pretrained: {flux_files['comfy'].resolve()}" in config
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in
               load_file(next(runs["file"].glob("*_kohya.safetensors"))))
    # a fresh process reads the base from the run's config.yaml
    done = _cli("sample", str(runs["file"]), "--steps", "2", "--seeds", "0", "--prompt", "a photo of sks toy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (runs["file"] / "grid.png").is_file()
    sidecar = json.loads(next((runs["file"] / "grid_cells").glob("*.json")).read_text())
    assert sidecar["model_options"]["base"] == str(folder.resolve())
