"""SD3 / SD3.5 as a model family: detection, the prompt encoding against StableDiffusion3Pipeline's (bitwise),
the family's step, and tiny end-to-end runs (CLI training with text-encoder LoRAs, exact resume, sample grids,
the LoRA in StableDiffusion3Pipeline)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DEMO_DATA, ROOT, assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.families.base import ModelFiles
from sdtune.families.sd3 import SD3_FAMILY, SD3Options
from sdtune.lora import WEIGHT_NAME
from sdtune.models import inspect_model, load_components
from sdtune.plan import check_run
from sdtune.sample import lora_family
from sdtune.train import training_step

SD3 = SD3_FAMILY

# --------------------------------------------------------------------------------------------------------
# The family


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_sd3_is_detected_from_its_config_files(tiny_model, tmp_path):
    info = inspect_model(str(tiny_model("sd3")))
    assert info.family is SD3 and families.get("sd3") is SD3
    # 8 latents x VAE factor 8 = 64 px; 2x2 patches of the x8 latents: sides in multiples of 16
    assert (info.prediction_type, info.resolution, info.bucket_multiple) == ("flow_matching", 64, 16)
    assert SD3.default_resolution == 1024 and SD3.denoiser_name == "transformer" and SD3.label == "SD3.x"
    # by the transformer's class alone (a pipeline class of another name)
    other = tmp_path / "renamed"
    shutil.copytree(tiny_model("sd3"), other, ignore=shutil.ignore_patterns("*.safetensors"))
    _edit_json(other / "model_index.json", _class_name="MySD3Pipeline")
    assert families.detect(ModelFiles(str(other))) is SD3
    assert families.detect(ModelFiles(str(tiny_model("sd15")))) is not SD3
    # a transformer with extra input channels, and a model saved without T5, are refused for training
    _edit_json(other / "transformer/config.json", in_channels=8)
    with pytest.raises(SdtuneError, match="8 input channels"):
        inspect_model(str(other))
    _edit_json(other / "transformer/config.json", in_channels=4)
    _edit_json(other / "model_index.json", text_encoder_3=[None, None])
    with pytest.raises(SdtuneError, match="no text_encoder_3"):
        inspect_model(str(other))


def test_sd3_encode_prompt_is_the_pipelines_bitwise(tiny_model):
    model = tiny_model("sd3")
    c = load_components(str(model), SD3)
    # one caption longer than CLIP's 77 tokens: both truncate as the pipeline does
    captions = ["a photo of sks toy", "a dog on the beach", " ".join(["a cat with a dog"] * 30)]
    ids = SD3.tokenize(c.tokenizers, captions)
    assert [tuple(i.shape) for i in ids] == [(3, 77), (3, 77), (3, 256)]
    with torch.no_grad():
        embeds = SD3.encode_prompt(c.text_encoders, ids)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, use_safetensors=True)
    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(captions, None, None,
                                                                       do_classifier_free_guidance=False)
    assert torch.equal(embeds["prompt_embeds"], prompt_embeds)
    assert torch.equal(embeds["pooled_prompt_embeds"], pooled_prompt_embeds)
    # the layout: 77 CLIP tokens (CLIP-L 32 + CLIP-G 32 channels, zero-padded to T5's 96), then 256 T5 tokens
    assert tuple(prompt_embeds.shape) == (3, 77 + 256, 96) and tuple(pooled_prompt_embeds.shape) == (3, 64)
    with torch.no_grad():
        clip_g = c.text_encoders[1](ids[1], output_hidden_states=True)
        t5 = c.text_encoders[2](ids[2])[0]
    assert torch.equal(prompt_embeds[:, :77, 32:64], clip_g.hidden_states[-2])
    assert torch.equal(prompt_embeds[:, :77, 64:], torch.zeros(3, 77, 32))
    assert torch.equal(prompt_embeds[:, 77:], t5)
    assert torch.equal(pooled_prompt_embeds[:, 32:], clip_g.text_embeds)
    assert clip_g.hidden_states[-2].abs().sum() > 0 and t5.abs().sum() > 0


def test_sd3_step_and_objective(tiny_model):
    c = load_components(str(tiny_model("sd3")), SD3)
    ids = SD3.tokenize(c.tokenizers, ["a photo of sks toy", "a dog"])
    with torch.no_grad():
        embeds = SD3.encode_prompt(c.text_encoders, ids)
    cond = SD3.conditioning(embeds, {}, SD3Options(), torch.device("cpu"), torch.float32)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        model_pred = SD3.predict(c.denoiser, latents, timesteps, cond)
        # the transformer called as train_dreambooth_lora_sd3.py calls it: the scheduler's timesteps as they are
        ref = c.denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds["prompt_embeds"],
                         pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)[0]
        scaled = c.denoiser(hidden_states=latents, timestep=timesteps / 1000, encoder_hidden_states=embeds["prompt_embeds"],
                            pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)[0]
    assert tuple(model_pred.shape) == (2, 4, 8, 8)
    assert torch.equal(model_pred, ref) and not torch.equal(model_pred, scaled)

    # the model's scheduler (shift 3.0, SD3.5's) and logit-normal timesteps, unless the recipe says otherwise
    assert c.noise_scheduler.config.shift == 3.0 and not c.noise_scheduler.config.use_dynamic_shifting
    objective = SD3.objective(c.noise_scheduler, "flow_matching", options=None)
    assert (objective.weighting_scheme, objective.noise_scheduler) == ("logit_normal", c.noise_scheduler)
    assert SD3.objective(c.noise_scheduler, "flow_matching", options=SD3Options(weighting_scheme="mode")
                         ).weighting_scheme == "mode"
    noise, t = objective.sample(latents, torch.Generator().manual_seed(0))
    assert torch.equal(objective.target(latents, noise, t), noise - latents)
    out = training_step(c.denoiser, SD3, objective, latents, cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.loss > 0


def test_sd3_refuses_what_it_cannot_do_yet(tiny_model, tmp_path):
    model = tiny_model("sd3")
    base = overrides(model, tmp_path / "run")
    for key, value in [("train.noise_offset", "0.05"), ("train.snr_gamma", "5"),
                       ("model.prediction_type", "epsilon"),
                       ("model.clip_skip", "2")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_run(load_config(None, [*base, f"{key}={value}"]))
    with pytest.raises(ConfigError, match=r"flux\.guidance_scale"):
        check_run(load_config(None, [*base, "flux.guidance_scale=3.5"]))
    plan = check_run(load_config(None, [*base, "sd3.weighting_scheme=mode", "lora.train_text_encoder=true"]))
    assert plan.model.family is SD3
    # the family's default LoRA targets are valid module names of the tiny transformer (checked by check_run)
    check_run(load_config(None, [*base, f"lora.target_modules=[{','.join(SD3.lora_targets)}]"]))

    joint = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert SD3.recognises_lora([joint], {})
    assert SD3.recognises_lora(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], {})
    assert SD3.recognises_lora(["foo"], {"ss_base_model_version": "sd3"})
    # FLUX.1 LoRAs share the joint blocks' diffusers keys; their single blocks or metadata tell them apart
    assert not SD3.recognises_lora([joint, "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], {})
    assert not SD3.recognises_lora([joint], {"ss_base_model_version": "flux1"})
    assert not SD3.recognises_lora(["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"], {"ss_base_model_version": "sd_v1"})
    assert [f.name for f in families.registered() if f.recognises_lora([joint], {})][0] == "sd3"
    assert families.get("flux").recognises_lora([joint, "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], {})
    # kohya's own SD3 files carry the model type as ss_base_model_version
    assert SD3.recognises_lora(["foo"], {"ss_base_model_version": "5-large"})
    version = SD3.kohya_version("flow_matching")
    assert (version.base_model_version, version.architecture) == ("medium", "stable-diffusion-3-medium")


# --------------------------------------------------------------------------------------------------------
# End to end


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdtune", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """A tiny SD3 model written by `sdtune random-model`, then 4 steps of tiny_cpu.yaml on it through the CLI
    (prior preservation with generated class images, LoRAs on both CLIPs too, a checkpoint at step 2)."""
    tmp = tmp_path_factory.mktemp("sd3")
    model, out = tmp / "model", tmp / "run"
    made = _cli("random-model", "--family", "sd3", "--size", "tiny", str(model))
    assert made.returncode == 0, made.stdout + made.stderr
    trained = _cli("train", "recipes/tiny_cpu.yaml", f"model.pretrained={model}", f"train.output_dir={out}",
                   f"data.instance_dir={DEMO_DATA}", f"prior.class_dir={tmp / 'class'}", "prior.num_class_images=2",
                   "prior.generation_steps=1", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1",
                   "sample.every=2", "sample.steps=2", "sample.seeds=[0]", "train.report_to=none",
                   "lora.train_text_encoder=true", "lora.text_encoder_lr=1e-2")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return model, out, trained.stdout + trained.stderr


@pytest.mark.slow
def test_sd3_trains_through_the_cli(sd3_run):
    model, out, log = sd3_run
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["prior_loss"]) for r in losses)
    lora = load_file(out / WEIGHT_NAME)
    assert lora and all(k.split(".")[0] in ("transformer", "text_encoder", "text_encoder_2") for k in lora)
    # both CLIPs trained, T5 never
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("text_encoder_2.") for k in lora)
    # the family's default targets (the recipe names none): both streams' attention projections, both blocks
    # (the last block has no to_add_out: its text stream ends there)
    modules = {k.split(".lora_")[0] for k in lora if k.startswith("transformer.")}
    assert {m.split(".attn.")[1] for m in modules} == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                        "add_v_proj", "to_add_out"}
    assert {m.split(".")[2] for m in modules} == {"0", "1"}
    assert "attn.add_q_proj" in (out / "config.yaml").read_text()
    # its keys (text_encoder_2., transformer.transformer_blocks.) are SDXL's and FLUX's too: the file is SD3's
    assert lora_family(out / WEIGHT_NAME) is SD3
    # PEFT starts every lora_B at zero: trained ones are not. The one exception is the reference's too: the last
    # block's text queries (add_q_proj) only make text outputs, which that block drops (context_pre_only)
    untrained = {k for k, v in lora.items() if "lora_B" in k and v.abs().sum() == 0}
    assert untrained == {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"}
    assert all(torch.isfinite(v).all() for v in lora.values())
    # the kohya file beside it, in the original MMDiT's names: both blocks' qkv, both CLIPs
    kohya = load_file(out / f"{out.name}_kohya.safetensors")
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight",
            "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight",
            "lora_unet_joint_blocks_0_context_block_attn_proj.lora_up.weight"} <= kohya.keys()
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in kohya)
    assert "export.kohya is not available" not in log
    # sample grids during and after training, rendered (a failed cell would be a flat grey square)
    for step in (2, 4):
        grid = np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png").convert("RGB")).astype(float)
        assert grid.std() > 10
    assert "StableDiffusion3Pipeline" in (out / "README.md").read_text()
    exported = _cli("export", str(out), "--format", "kohya", "-o", str(out.parent / "k.safetensors"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    again = load_file(out.parent / "k.safetensors")
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)
    with safe_open(out.parent / "k.safetensors", "pt") as f:
        meta = f.metadata()
    # the tiny model has no QK-norm: SD3 Medium's type, as kohya's analyze_state_dict_state tells it
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("medium",
                                                                               "stable-diffusion-3-medium/lora")


@pytest.mark.slow
def test_sd3_lora_in_sd3_pipeline_gives_sdtune_sample_pixels(sd3_run, tmp_path):
    model, out, _ = sd3_run
    grid = tmp_path / "grid.png"
    sampled = _cli("sample", str(out), "--prompt", "a photo of sks toy", "--steps", "2", "--seeds", "0",
                   "--lora-scale", "1", "--guidance", "5", "--out", str(grid))
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    cells = sorted((tmp_path / "grid_cells").glob("*.png"))
    assert len(cells) == 1
    pipe = StableDiffusion3Pipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a photo of sks toy"], num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
    base = pipe(**kw, generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    pipe.load_lora_weights(str(out))
    image = pipe(**kw, generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    ours = np.asarray(Image.open(cells[0]).convert("RGB"))
    assert np.array_equal(np.asarray(image), ours)
    assert not np.array_equal(np.asarray(base), ours)  # the LoRA changed the pixels


@pytest.mark.slow
def test_sd3_resume_is_exact(tiny_model, tmp_path):
    common = ["data.random_flip=true", "train.learning_rate=1e-3", "lora.dropout=0.1", "sample.every=0",
              "sd3.weighting_scheme=logit_normal"]
    straight, split = interrupted_and_resumed(tiny_model("sd3"), tmp_path, 4, 2, *common)
    assert_resumed_bitwise(straight, split, 4, "transformer")


def test_a_lora_both_families_claim_goes_to_the_models_own(tmp_path):
    """Joint-block keys alone (no metadata) fit both SD3's and FLUX's rules: loading it into a model of either
    family must not be refused because the other one is registered first."""
    from safetensors.torch import save_file

    from sdtune.families.flux import FLUX

    file = tmp_path / "joint_only.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, file)
    assert SD3_FAMILY.recognises_lora(list(load_file(file)), {}) and FLUX.recognises_lora(list(load_file(file)), {})
    assert lora_family(file, prefer=FLUX) is FLUX and lora_family(file, prefer=SD3_FAMILY) is SD3_FAMILY


# --------------------------------------------------------------------------------------------------------
# kohya files in the original MMDiT layout (what ComfyUI loads), checked against ComfyUI's own mapping

# ComfyUI's comfy/utils.py (MMDIT_MAP_BASIC, MMDIT_MAP_BLOCK, mmdit_to_diffusers): the original MMDiT weight
# each diffusers SD3Transformer2DModel weight is, re-implemented here. {original suffix: diffusers suffix}
_COMFY_MAP_BLOCK = {
    "context_block.adaLN_modulation.1": "norm1_context.linear", "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn2.proj": "attn2.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
}
_COMFY_MAP_BLOCK_NORMS = {"context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
                          "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
                          "x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
                          "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
                          "x_block.attn2.ln_k.weight": "attn2.norm_k.weight"}
_COMFY_MAP_BASIC = {  # (original, diffusers, swap_scale_shift)
    ("context_embedder", "context_embedder", False), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", False),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", False),
    ("x_embedder.proj", "pos_embed.proj", False), ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", False),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", False),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True), ("final_layer.linear", "proj_out", False),
}


def _comfy_mmdit_to_diffusers(depth: int) -> dict[str, tuple[str, tuple[int, int, int] | None, bool]]:
    """ComfyUI comfy/utils.py ``mmdit_to_diffusers``: {diffusers key: (original key, (dim, start, length) of
    the slice it is, or None; whether swap_scale_shift maps it)}. q, k, v are slices of qkv at offsets of
    depth x 64 (the width of every SD3: 64 per head, as many heads as blocks); the last block's text adaLN and
    the final layer's are (shift, scale) in the original and (scale, shift) in diffusers."""
    key_map: dict[str, tuple[str, tuple[int, int, int] | None, bool]] = {}
    offset = depth * 64
    for i in range(depth):
        block_from, block_to = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for end in ("weight", "bias"):
            for attn, stream, names in (("attn", "x_block.attn", ("to_q", "to_k", "to_v")),
                                        ("attn", "context_block.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
                                        ("attn2", "x_block.attn2", ("to_q", "to_k", "to_v"))):
                for n, name in enumerate(names):
                    key_map[f"{block_from}.{attn}.{name}.{end}"] = (f"{block_to}.{stream}.qkv.{end}",
                                                                     (0, offset * n, offset), False)
            for original, diffusers in _COMFY_MAP_BLOCK.items():
                key_map[f"{block_from}.{diffusers}.{end}"] = (f"{block_to}.{original}.{end}", None, False)
        for original, diffusers in _COMFY_MAP_BLOCK_NORMS.items():
            key_map[f"{block_from}.{diffusers}"] = (f"{block_to}.{original}", None, False)
    for end in ("weight", "bias"):
        for original, diffusers, swap in _COMFY_MAP_BASIC:
            key_map[f"{diffusers}.{end}"] = (f"{original}.{end}", None, swap)
        key_map[f"transformer_blocks.{depth - 1}.norm1_context.linear.{end}"] = (
            f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{end}", None, True)
    key_map["pos_embed.pos_embed"] = ("pos_embed", None, False)
    return key_map


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _to_original(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 state dict in the original layout, each weight placed where ComfyUI's map says."""
    key_map, original = _comfy_mmdit_to_diffusers(depth), {}
    for key, value in state.items():
        name, offset, swap = key_map[key]
        if offset is None:
            original[name] = _swap_scale_shift(value) if swap else value.clone()
            continue
        fused = original.setdefault(name, torch.zeros(3 * value.shape[0], *value.shape[1:]))
        fused.narrow(*offset).copy_(value)
    return original


def _comfy_apply(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI comfy/lora.py: ``model_lora_keys_unet`` maps "lora_unet_" + an original weight's name (dots as
    underscores) onto that whole weight, ``load_lora`` reads NAME.lora_up / lora_down / alpha, and
    ``calculate_weight`` adds (alpha / lora_down.shape[0]) x (up @ down).reshape(weight.shape) to it."""
    key_map = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k
               for k in original if k.endswith(".weight")}
    patched, loaded = dict(original), set()
    for x, key in key_map.items():
        if f"{x}.lora_up.weight" not in lora:
            continue
        up, down, alpha = lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"], lora[f"{x}.alpha"].item()
        patched[key] = original[key] + (alpha / down.shape[0]) * torch.mm(up, down).reshape(original[key].shape)
        loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"}
    assert loaded == set(lora), f"lora key not loaded: {sorted(set(lora) - loaded)[:3]}"  # ComfyUI's warning
    return patched


# every Linear of the joint blocks: both streams' attention, SD3.5 Medium's attn2, the MLPs and the adaLNs
_ALL_BLOCK_LINEARS = r"transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0)|attn\.(add_q_proj|add_k_proj|" \
                     r"add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)"


def _mmdit_x():
    """The tiny SD3.5-Medium-like transformer of ``_mmdit_x_with_lora``, without a LoRA (the same weights)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def _mmdit_x_with_lora(use_dora: bool = False):
    """A tiny SD3.5-Medium-like transformer (MMDiT-X: attn2 in block 0, QK-norm) of SD3's 64-wide heads, one
    per block as in every SD3 (ComfyUI sizes qkv by depth x 64), with a LoRA on every block Linear: random ups,
    alpha 2 x rank, and block 0's image to_k at its own alpha and rank (so the fused qkv mixes scales); with
    ``use_dora``, DoRA with magnitudes moved off the base norms (as training moves them)."""
    from peft import LoraConfig

    transformer = _mmdit_x()
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    special = "transformer_blocks.0.attn.to_k"
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=_ALL_BLOCK_LINEARS,
                                       rank_pattern={special: 2}, alpha_pattern={special: 6}, use_dora=use_dora))
    g = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
        elif "lora_magnitude_vector" in name:
            p.data = p.data * (1 + 0.5 * torch.rand(p.shape, generator=g))
    return transformer, base


def test_sd3_kohya_keys_shapes_alphas_and_metadata():
    from sdtune.export import Adapter, to_kohya

    transformer, _ = _mmdit_x_with_lora()
    adapter = Adapter.from_module(transformer)
    tensors, meta = to_kohya(SD3, {"transformer": adapter}, prediction_type="flow_matching",
                             architecture="stable-diffusion-3-5-medium")
    block = ["x_block_attn_qkv", "x_block_attn_proj", "context_block_attn_qkv", "x_block_mlp_fc1",
             "x_block_mlp_fc2", "x_block_adaLN_modulation_1", "context_block_adaLN_modulation_1"]
    # block 0 has attn2 and a whole text stream; the last block's text stream ends (no proj, no MLP)
    first = [*block, "x_block_attn2_qkv", "x_block_attn2_proj", "context_block_attn_proj", "context_block_mlp_fc1",
             "context_block_mlp_fc2"]
    names = {k.split(".")[0] for k in tensors}
    assert names == {f"lora_unet_joint_blocks_0_{n}" for n in first} | {f"lora_unet_joint_blocks_1_{n}" for n in block}
    assert all(f"{n}.{p}" in tensors for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha"))
    d, r, t = 128, 4, adapter.tensors
    qkv = "lora_unet_joint_blocks_1_x_block_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * r, d) and tensors[f"{qkv}.lora_up.weight"].shape == (3 * d, 3 * r)
    assert float(tensors[f"{qkv}.alpha"]) == 2.0 * 3 * r  # alpha / fused rank stays PEFT's 8 / 4
    # block 0's qkv: q at rank 4 (scale 2), k at rank 2 (scale 3, folded into its up as 3 / 2), v at rank 4
    mixed = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert tensors[f"{mixed}.lora_down.weight"].shape == (10, d) and float(tensors[f"{mixed}.alpha"]) == 2.0 * 10
    up = tensors[f"{mixed}.lora_up.weight"]
    assert torch.allclose(up[d:2 * d, 4:6], t["transformer_blocks.0.attn.to_k.lora_B.weight"] * 1.5)
    assert not up[:d, 4:].any() and not up[2 * d:, :6].any()  # block-diagonal
    # the last block's text adaLN: 2 x d outputs, its halves swapped into the original's (shift, scale)
    last = t["transformer_blocks.1.norm1_context.linear.lora_B.weight"]
    assert last.shape == (2 * d, r)
    assert torch.equal(tensors["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"],
                       torch.cat([last[d:], last[:d]]))
    assert torch.equal(tensors["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"],
                       t["transformer_blocks.0.norm1_context.linear.lora_B.weight"])  # 6 x d: as trained
    # metadata as kohya's sd3_train_network.py writes it (model type; "stable-diffusion-3-" + it; "diffusers")
    assert meta["ss_base_model_version"] == "5-medium" and meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    _, default = to_kohya(SD3, {"transformer": adapter}, prediction_type="flow_matching")
    assert (default["ss_base_model_version"], default["modelspec.architecture"]) == \
        ("medium", "stable-diffusion-3-medium/lora")
    # a module the original layout names elsewhere (the embedders, the final layer) is one clear error
    odd = Adapter({"proj_out.lora_A.weight": torch.zeros(4, 8), "proj_out.lora_B.weight": torch.zeros(8, 4)},
                  {"r": 4, "lora_alpha": 4})
    with pytest.raises(SdtuneError, match="proj_out has no name in the SD3.x kohya layout"):
        to_kohya(SD3, {"transformer": odd})


def test_sd3_kohya_file_applied_as_comfyui_does_gives_the_diffusers_loras_weights():
    """The kohya file applied the way ComfyUI applies it (``_comfy_apply``) to the original-layout weights
    gives, for every weight, what PEFT's merge gives the diffusers weights, in the original layout."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from peft.tuners.lora import LoraLayer

    from sdtune.export import Adapter, to_kohya

    transformer, base = _mmdit_x_with_lora()
    depth = 2
    original = _to_original(base, depth)
    # the re-implemented ComfyUI map is the layout diffusers' own single-file converter reads back
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in original.items()})
    assert back.keys() == base.keys() and all(torch.equal(back[k], base[k]) for k in base)

    tensors, _ = to_kohya(SD3, {"transformer": Adapter.from_module(transformer)}, prediction_type="flow_matching")
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # PEFT's own W + scale x B @ A, per diffusers module
    merged = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    want, got = _to_original(merged, depth), _comfy_apply(original, tensors)
    assert want.keys() == got.keys()
    changed = [k for k in want if not torch.equal(want[k], original[k])]
    # every LoRA'd weight, fused or renamed: 12 in block 0, 7 in the last
    assert len(changed) == 19 and len(tensors) == 19 * 3
    for k in want:
        scale = (want[k] - original[k]).abs().max() + 1e-12
        assert torch.allclose(got[k], want[k], atol=1e-5 * max(1.0, float(scale))), k


def test_sd3_dora_kohya_file_reads_back_as_the_same_dora(tmp_path):
    """DoRA in the original layout: q, k, v fused into qkv with their magnitudes stacked (k at its own rank
    and scale), the last block's text adaLN with its halves swapped, SD3.5 Medium's attn2. Read back by
    `sdtune sample`'s reader onto a fresh transformer, every adapted layer computes what the trained one does."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    from sdtune.export import Adapter, read_kohya_lora, to_kohya
    from sdtune.lora import inject_adapter

    transformer, base = _mmdit_x_with_lora(use_dora=True)
    tensors, _ = to_kohya(SD3, {"transformer": Adapter.from_module(transformer)}, prediction_type="flow_matching")
    assert len([k for k in tensors if k.endswith(".dora_scale")]) == 19
    d, t = 128, Adapter.from_module(transformer).tensors
    last = t["transformer_blocks.1.norm1_context.linear.lora_magnitude_vector"]
    assert torch.equal(tensors["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.dora_scale"][:, 0],
                       torch.cat([last[d:], last[:d]]))
    fresh = _mmdit_x()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base.items())
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    adapters = read_kohya_lora(tmp_path / "dora.safetensors", SD3, {"transformer": fresh})
    assert adapters is not None
    inject_adapter(fresh, adapters["transformer"].config, adapters["transformer"].tensors, "read")
    trained = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    read = {n: m for n, m in fresh.named_modules() if isinstance(m, LoraLayer)}
    assert trained.keys() == read.keys() and len(read) == 19 + 2 * 5  # five qkv: three members each
    assert read["transformer_blocks.0.attn.to_k"].lora_A["read"].weight.shape[0] == 2  # its own rank back
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in trained.items():
            x = torch.randn(3, layer.in_features, generator=g)
            assert torch.allclose(read[name](x), layer(x), atol=1e-5), name


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt"])
def test_sd3_precondition_outputs_is_the_reference_loss(tiny_model, scheme):
    # train_dreambooth_lora_sd3.py --precondition_outputs 1: model_pred * (-sigmas) + noisy against the latents,
    # with prior preservation (its two halves' means added)
    c = load_components(str(tiny_model("sd3")), SD3)
    ids = SD3.tokenize(c.tokenizers, ["a photo of sks toy", "a photo of sks toy", "a dog", "a dog"])
    with torch.no_grad():
        embeds = SD3.encode_prompt(c.text_encoders, ids)
        cond = SD3.conditioning(embeds, {}, SD3Options(), torch.device("cpu"), torch.float32)
        latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        options = SD3Options(weighting_scheme=scheme, precondition_outputs=True)
        objective = SD3.objective(c.noise_scheduler, "flow_matching", options=options)
        ours = training_step(c.denoiser, SD3, objective, latents, cond, torch.Generator().manual_seed(5),
                             prior_preservation=True, prior_loss_weight=0.5)
        plain = training_step(c.denoiser, SD3, SD3.objective(c.noise_scheduler, "flow_matching",
                                                             options=SD3Options(weighting_scheme=scheme)),
                              latents, cond, torch.Generator().manual_seed(5), prior_preservation=True,
                              prior_loss_weight=0.5)
        # the reference, verbatim in its maths, from the same draws
        noise, timesteps = objective.sample(latents, torch.Generator().manual_seed(5))
        sigmas = objective.sigmas(timesteps, latents.dim())
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        model_pred = SD3.predict(c.denoiser, noisy, timesteps, cond) * (-sigmas) + noisy
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        per_example = torch.mean((weighting.float() * (model_pred.float() - latents.float()) ** 2).reshape(4, -1), 1)
        instance, prior = per_example.chunk(2)
    assert torch.allclose(ours.loss, instance.mean() + 0.5 * prior.mean(), rtol=1e-5)
    assert torch.allclose(ours.prior_loss, prior.mean(), rtol=1e-5)
    assert not torch.allclose(ours.loss, plain.loss, rtol=1e-3)  # the option changes the loss
