"""SD3 / SD3.5 single files (Stability's original MMDiT layout, ``model.diffusion_model.joint_blocks.N...``, often
with the VAE under ``first_stage_model.`` and text encoders: what Stability and Civitai share) as
model.pretrained beside model.base: detected and configured from the header, converted with diffusers'
converter, refused in one line where they cannot work, trained and sampled like the diffusers folder of the
same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import DEMO_DATA, ROOT, overrides
from sdtune import sd3_file
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.families.sd3 import SD3_FAMILY as SD3
from sdtune.ldm import vae_to_original
from sdtune.models import inspect_model, load_components, model_identity, read_transformer_file
from sdtune.plan import check_run
from sdtune.single_file import CONFIG_KEY

PREFIX = "model.diffusion_model."

# --------------------------------------------------------------------------------------------------------
# diffusers' layout -> Stability's, written from the original MMDiT (Stability's sd3_impls.py, ComfyUI's
# comfy/ldm/modules/diffusionmodules/mmdit.py): the inverse of diffusers' converter

# {Stability module: diffusers module} of the tensors that move whole
_TOP = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
_IMAGE = {"x_block.attn.proj": "attn.to_out.0", "x_block.adaLN_modulation.1": "norm1.linear",
          "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2"}
# the text stream's: not in the last block, whose context_block is pre-only (no proj, no MLP)
_TEXT = {"context_block.attn.proj": "attn.to_add_out", "context_block.adaLN_modulation.1": "norm1_context.linear",
         "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2"}
# SelfAttention.qkv: one Linear, q, k, v stacked on its output; (stream, diffusers attention, q, k, v)
_QKV = [("x_block.attn", "attn", ("to_q", "to_k", "to_v")),
        ("context_block.attn", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"))]
_QK_NORMS = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
             "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k"}
# SD3.5 Medium's second, image-only attention (MMDiT-X)
_ATTN2 = {"x_block.attn2.proj": "attn2.to_out.0"}
_ATTN2_NORMS = {"x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}


def _swapped(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous gives (scale, shift), the original's final / pre-only adaLN (shift,
    scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _move(out: dict, state: dict, table: dict[str, str], original: str, diffusers: str,
          leaves: tuple[str, ...] = ("weight", "bias")) -> None:
    for module, name in table.items():
        for leaf in leaves:
            out[f"{original}{module}.{leaf}"] = state[f"{diffusers}{name}.{leaf}"]


def _joint_block(out: dict, state: dict, i: int, last: bool, dual: bool, qk_norm: bool) -> None:
    d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
    _move(out, state, _IMAGE, o, d)
    _move(out, state, {} if last else _TEXT, o, d)
    _move(out, state, _ATTN2 if dual else {}, o, d)
    _move(out, state, (_QK_NORMS | (_ATTN2_NORMS if dual else {})) if qk_norm else {}, o, d, ("weight",))
    for stream, attn, names in _QKV + ([("x_block.attn2", "attn2", ("to_q", "to_k", "to_v"))] if dual else []):
        for leaf in ("weight", "bias"):
            out[f"{o}{stream}.qkv.{leaf}"] = torch.cat([state[f"{d}{attn}.{n}.{leaf}"] for n in names])
    if last:
        for leaf in ("weight", "bias"):
            out[f"{o}context_block.adaLN_modulation.1.{leaf}"] = _swapped(state[f"{d}norm1_context.linear.{leaf}"])


def to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` state dict in Stability's original MMDiT layout (without the prefix)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    _move(out, state, _TOP, "", "")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swapped(state[f"norm_out.linear.{leaf}"])
    n = config["num_layers"]
    for i in range(n):
        _joint_block(out, state, i, i == n - 1, i in config["dual_attention_layers"], bool(config["qk_norm"]))
    return out


def _own_config(folder: Path) -> dict:
    """The transformer config a model folder holds (as diffusers saved it), less diffusers' own keys."""
    return {k: v for k, v in SD3Transformer2DModel.load_config(folder / "transformer").items() if k[0] != "_"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def mmditx(tiny_model, tmp_path_factory) -> Path:
    """The tiny SD3 model with an SD3.5-Medium-shaped transformer in place of its own: q/k RMS norms (random
    scales, so that q and k, image and text are told apart) and MMDiT-X's second attention in block 0."""
    folder = tmp_path_factory.mktemp("mmditx") / "m"
    shutil.copytree(tiny_model("sd3"), folder, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(**{**_own_config(tiny_model("sd3")), "dual_attention_layers": (0,),
                                           "qk_norm": "rms_norm"})
    for name, p in transformer.named_parameters():
        if ".norm_" in name:
            p.data = torch.rand(p.shape) + 0.5
    transformer.save_pretrained(folder / "transformer")
    return folder


def test_the_inverse_round_trips_through_diffusers_converter(tiny_model, mmditx):
    for folder in (tiny_model("sd3"), mmditx):
        state, config = _weights(folder), _own_config(folder)
        original = to_original(state, config)
        assert len(original) < len(state)  # q, k, v fused
        # diffusers' converter removes the prefix itself; sdtune's to_diffusers gets the keys without it
        for given in (dict(original), {PREFIX + k: v for k, v in original.items()}):
            back = convert_sd3_transformer_checkpoint_to_diffusers(given)
            assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
        ours = sd3_file.to_diffusers(dict(original), config)
        assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)
    assert any("x_block.attn2.qkv" in k for k in original) and any(".ln_q." in k for k in original)
    with pytest.raises(Exception, match="has no place in an SD3 transformer"):
        sd3_file.to_diffusers({**original, "joint_blocks.0.x_block.extra.weight": torch.zeros(1)}, config)


# --------------------------------------------------------------------------------------------------------
# Files of the tiny models' weights


@pytest.fixture(scope="module")
def sd3_files(tiny_model, mmditx, tmp_path_factory) -> dict[str, Path]:
    """{name: path}: "plain" (the tiny transformer in Stability's layout, no prefix, sdtune's metadata),
    "fp8" (float8_e4m3fn storage, prefixed), "nometa" (plain without the metadata), "ownvae" (prefixed, with
    a VAE of other weights than the base's), "mmditx" (the SD3.5-Medium-shaped transformer as Stability ships
    it: prefixed, with the base's VAE and two text-encoder tensors bundled, no metadata)."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("sd3-files")
    tiny = tiny_model("sd3")
    original = to_original(_weights(tiny), _own_config(tiny))
    prefixed = {PREFIX + k: v for k, v in original.items()}
    meta = {CONFIG_KEY: json.dumps({"transformer": _own_config(tiny)})}
    vae = {f"first_stage_model.{k}": v for k, v in
           vae_to_original(AutoencoderKL.from_pretrained(tiny, subfolder="vae")).items()}
    encoders = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(32),
                "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(8, 96)}
    x = {PREFIX + k: v for k, v in to_original(_weights(mmditx), _own_config(mmditx)).items()}
    paths = {name: folder / f"sd3-{name}.safetensors" for name in ("plain", "fp8", "nometa", "ownvae", "mmditx")}
    save_file(original, paths["plain"], metadata=meta)
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in prefixed.items()}, paths["fp8"], metadata=meta)
    save_file(original, paths["nometa"])
    save_file({**prefixed, **{k: v + 0.01 for k, v in vae.items()}}, paths["ownvae"], metadata=meta)
    save_file({**x, **vae, **encoders}, paths["mmditx"])
    return paths


@pytest.mark.parametrize("name", ["plain", "fp8", "mmditx"])
def test_an_sd3_file_is_detected_and_configured_from_its_header_alone(name, sd3_files, tiny_model, mmditx,
                                                                      monkeypatch):
    tf = read_transformer_file(str(sd3_files[name]))
    assert tf is not None and tf.layout is sd3_file.LAYOUT
    assert tf.prefix == ("" if name == "plain" else PREFIX)
    assert (len(tf.vae), tf.others) == ((176, 0) if name == "mmditx" else (0, 0))
    # the two text-encoder tensors are taken for encoders (tests/test_bundled_encoders.py: whole ones load)
    assert [b.name for b in tf.text_encoders] == (["clip_l", "t5xxl"] if name == "mmditx" else [])
    assert (tf.variant, tf.example_base) == (("SD3.5 Medium", "stabilityai/stable-diffusion-3.5-medium")
                                             if name == "mmditx" else
                                             ("SD3 Medium", "stabilityai/stable-diffusion-3-medium-diffusers"))

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    info = inspect_model(str(sd3_files[name]), base=str(tiny_model("sd3")))
    own = mmditx if name == "mmditx" else tiny_model("sd3")
    # the derived config is the model's own (the head width of the tiny SD3 from sdtune's metadata, of the
    # SD3.5-shaped one from its q/k norm), sample_size the base's
    assert derived_config_of(sd3_files[name], tiny_model("sd3")) == _own_config(own)
    assert sd3_file.derived_config(tf) == {**_own_config(own), "sample_size": 128}  # SD3's, without a base
    folder = inspect_model(str(own))
    assert info.family is SD3 and info.pretrained == str(sd3_files[name])
    assert (info.prediction_type, info.resolution, info.bucket_multiple, info.architecture) == \
        (folder.prediction_type, folder.resolution, folder.bucket_multiple, folder.architecture)
    assert info.architecture == ("stable-diffusion-3-5-medium" if name == "mmditx" else "stable-diffusion-3-medium")


def derived_config_of(file: Path, base: Path) -> dict:
    from sdtune.models import model_files

    return _own_config(model_files(str(file), base=str(base)).folder)


def _refusal(tmp_path: Path, model: Path | str, *extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(model, tmp_path / "o", *extra)))
    assert all("\n" not in p for p in e.value.problems)
    return e.value.problems


def test_the_refusals_are_one_line_each(sd3_files, tiny_model, tmp_path):
    base = f"model.base={tiny_model('sd3')}"
    # no base: one line naming model.base with an example of the file's own variant
    assert _refusal(tmp_path, sd3_files["plain"]) == [
        "model.base: sd3-plain.safetensors holds only an SD3 Medium transformer (Stability's MMDiT layout); set "
        "model.base to the SD3.x model whose text encoders, tokenizers, VAE and scheduler go with it, e.g. "
        "model.base=stabilityai/stable-diffusion-3-medium-diffusers (sdtune sample: --base)"]
    [line] = _refusal(tmp_path, sd3_files["mmditx"])
    assert line.startswith("model.base: sd3-mmditx.safetensors holds an SD3.5 Medium transformer")
    assert "e.g. model.base=stabilityai/stable-diffusion-3.5-medium" in line
    # a base of another family
    assert _refusal(tmp_path, sd3_files["plain"], f"model.base={tiny_model('sd15')}") == [
        f"model.base: {tiny_model('sd15')} is an SD1.x model; an SD3.x transformer file takes its text encoders, "
        "tokenizers, VAE and scheduler from an SD3.x model, e.g. model.base=stabilityai/stable-diffusion-3-medium-diffusers"]
    # a base whose T5 is not the width the transformer takes
    other = tmp_path / "other-t5"
    shutil.copytree(tiny_model("sd3"), other, ignore=shutil.ignore_patterns("*.safetensors"))
    t5 = json.loads((other / "text_encoder_3/config.json").read_text())
    (other / "text_encoder_3/config.json").write_text(json.dumps({**t5, "d_model": 48}))
    [line] = _refusal(tmp_path, sd3_files["plain"], f"model.base={other}")
    assert "T5 encoder gives 48-wide embeddings, but the transformer of sd3-plain.safetensors takes 96" in line
    # a base for a model that needs none
    [line] = _refusal(tmp_path, tiny_model("sd3"), base)
    assert line.startswith("model.base: only a FLUX.1 or SD3.x transformer file") and "remove model.base" in line
    # a head width no shape says, from a file sdtune did not write
    [line] = _refusal(tmp_path, sd3_files["nometa"], base)
    assert "32 channels wide (x_embedder), not a whole number of SD3's 64-channel attention heads" in line
    # a bundled VAE that is not the base's kind; with model.vae it is not used, and not refused
    bad_vae = tmp_path / "bad-vae.safetensors"
    tensors = load_file(sd3_files["ownvae"])
    tensors["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    save_file(tensors, bad_vae, metadata={CONFIG_KEY: json.dumps({"transformer": _own_config(tiny_model("sd3"))})})
    [line] = _refusal(tmp_path, bad_vae, base)
    assert line.startswith("model.pretrained: bad-vae.safetensors bundles a VAE (first_stage_model.*) of another "
                           "kind than model.base's (e.g. first_stage_model.encoder.conv_in.weight)")
    check_run(load_config(None, overrides(bad_vae, tmp_path / "o", base, f"model.vae={tiny_model('sd3')}")))
    # an SD3 LoRA in the original layout is not taken for a model
    lora = tmp_path / "sd3_lora.safetensors"
    save_file({"joint_blocks.0.x_block.attn.qkv.lora_down.weight": torch.zeros(4, 32)}, lora)
    assert read_transformer_file(str(lora)) is None
    assert "is a LoRA, not a base model" in _refusal(tmp_path, lora)[0]


def test_a_file_bundling_incomplete_text_encoders_trains_with_the_bases(sd3_files, tiny_model, tmp_path):
    base = f"model.base={tiny_model('sd3')}"
    problems = _refusal(tmp_path, sd3_files["mmditx"], base)
    assert [p.split(" (")[0] for p in problems] == [f"model.pretrained: sd3-mmditx.safetensors bundles a {label} "
                                                    "text encoder" for label in ("CLIP ViT-L/14", "T5-XXL")]
    assert all("fix: model.bundled_text_encoders=false" in p for p in problems)
    plan = check_run(load_config(None, overrides(sd3_files["mmditx"], tmp_path / "o", base,
                                                 "model.bundled_text_encoders=false")))
    assert plan.model.family is SD3 and not [w for w in plan.warnings if "also holds" in w]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_sd3_file_loads_the_weights_of_its_folder(sd3_files, tiny_model):
    folder = load_components(str(tiny_model("sd3")), SD3)
    loaded = load_components(str(sd3_files["fp8"]), SD3, base=str(tiny_model("sd3")))
    # the folder's weights rounded to the file's storage, computed in float32
    a, b = folder.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert all(v.dtype == torch.float32 for v in b.values())
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in a.items()}
    assert not _equal(rounded, a) and _equal(rounded, b)
    assert {k: v for k, v in loaded.denoiser.config.items() if not k.startswith("_")} == \
        {k: v for k, v in folder.denoiser.config.items() if not k.startswith("_")}
    # the rest is the base's
    for x, y in zip(folder.text_encoders, loaded.text_encoders, strict=True):
        assert _equal(x.state_dict(), y.state_dict())
    assert _equal(folder.vae.state_dict(), loaded.vae.state_dict())
    assert dict(loaded.noise_scheduler.config) == dict(folder.noise_scheduler.config)
    # a bundled VAE is the file's own, unless model.vae names another
    own = load_components(str(sd3_files["ownvae"]), SD3, base=str(tiny_model("sd3")))
    assert _equal(own.vae.state_dict(), {k: v + 0.01 for k, v in folder.vae.state_dict().items()})
    assert _equal(own.denoiser.state_dict(), a)
    replaced = load_components(str(sd3_files["ownvae"]), SD3, base=str(tiny_model("sd3")), vae=str(tiny_model("sd3")))
    assert _equal(replaced.vae.state_dict(), folder.vae.state_dict())
    # so latents cached for the base's VAE are not taken for the file's
    base = str(tiny_model("sd3"))
    assert model_identity(str(sd3_files["fp8"]), None, ["vae"], base=base) == model_identity(base, None, ["vae"])
    assert model_identity(str(sd3_files["ownvae"]), None, ["vae"], base=base) != model_identity(base, None, ["vae"])


# --------------------------------------------------------------------------------------------------------
# End to end: `sdtune train` and `sdtune sample`, in-process as the CLI runs them


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def test_training_on_an_sd3_file_equals_training_on_its_folder_and_samples(sd3_files, tiny_model, mmditx, tmp_path):
    """The SD3.5-Medium-shaped file (no metadata, VAE and text-encoder tensors bundled, the base's encoders used)
    with the plain tiny model as its base (whose own transformer is another) trains as the diffusers folder of its
    weights."""
    common = [str(ROOT / "recipes/tiny_cpu.yaml"), f"data.instance_dir={DEMO_DATA}", "prior.enabled=false",
              "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0", "sample.every=0",
              "train.report_to=none"]
    runs = {}
    for name, model in [("folder", [f"model.pretrained={mmditx}"]),
                        ("file", [f"model.pretrained={sd3_files['mmditx']}", f"model.base={tiny_model('sd3')}",
                                  "model.bundled_text_encoders=false"])]:
        runs[name] = tmp_path / name
        assert main(["train", *common, *model, f"train.output_dir={runs[name]}"]) == 0
    losses = _losses(runs["folder"])
    assert len(losses) == 2 and all(np.isfinite(loss) and loss > 0 for loss in losses)
    assert _losses(runs["file"]) == losses
    a, b = (load_file(runs[n] / "pytorch_lora_weights.safetensors") for n in ("folder", "file"))
    assert _equal(a, b) and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    config = (runs["file"] / "config.yaml").read_text()
    assert f"base: {tiny_model('sd3').resolve()}" in config and f"pretrained: {sd3_files['mmditx'].resolve()}" in config
    # the kohya file (written by the run, and by `sdtune export`, which reads the base from config.yaml) says the
    # model type the file's shapes give: SD3.5 Medium (q/k norm, second attention), not the base's SD3 Medium
    exported = tmp_path / "k.safetensors"
    assert main(["export", str(runs["file"]), "--format", "kohya", "-o", str(exported)]) == 0
    for kohya in (exported, next(runs["file"].glob("*_kohya.safetensors"))):
        with safetensors.safe_open(kohya, "pt") as f:
            meta = f.metadata()
        assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == \
            ("5-medium", "stable-diffusion-3-5-medium/lora")
    # the run reads the base from its config.yaml
    assert main(["sample", str(runs["file"]), "--steps", "2", "--seeds", "0", "--prompt", "a photo of sks toy",
                 "--lora-scale", "1"]) == 0
    grid = np.asarray(Image.open(runs["file"] / "grid.png").convert("RGB")).astype(float)
    assert grid.std() > 10  # rendered (a failed cell would be a flat grey square)
    sidecar = json.loads(next((runs["file"] / "grid_cells").glob("*.json")).read_text())
    assert sidecar["model_options"]["base"] == str(tiny_model("sd3").resolve())
    assert sidecar["model_options"]["bundled_text_encoders"] is False  # the run's: the base's text encoders
