"""FLUX.1 as a model family: flow-matching objective vs diffusers' reference maths, detection, the family's
step, and tiny end-to-end runs (CLI training, exact resume, sample grids, the LoRA in FluxPipeline)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import DEMO_DATA, ROOT, assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.export import Adapter, RunLora, _write_diffusers, to_kohya, write_kohya
from sdtune.families.base import ModelFiles
from sdtune.families.flux import FLUX, FluxOptions
from sdtune.grid import Cell, Settings
from sdtune.lora import WEIGHT_NAME
from sdtune.models import inspect_model, load_components
from sdtune.objectives import FlowMatchingObjective
from sdtune.plan import check_run, with_family_defaults
from sdtune.sample import ADAPTER, Request, _apply_lora, _load_pipeline, run_sample
from sdtune.sample import with_family_defaults as sample_defaults
from sdtune.train import training_step

# --------------------------------------------------------------------------------------------------------
# The objective against train_dreambooth_lora_flux.py


def _reference(scheduler, latents, seed, scheme):
    """diffusers examples/dreambooth/train_dreambooth_lora_flux.py, the noising part of its step, verbatim in
    its maths (get_sigmas included), drawing from one generator in the same order."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=latents.shape[0], logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29, generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    schedule_timesteps = scheduler.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()
    while len(sigmas.shape) < latents.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    return noise, timesteps, noisy, noise - latents, weighting.flatten()


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt"])
@pytest.mark.parametrize("shift", [None, 3.0])
def test_flow_matching_objective_is_the_reference_maths(scheme, shift):
    # dynamic shifting (FLUX.1-dev: the table is unshifted at training) and a static shift of 3 (non-integer
    # timesteps: the sigma must be looked up, not computed as t / 1000)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift or 1.0, use_dynamic_shifting=shift is None)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    objective = FlowMatchingObjective(scheduler, scheme)

    noise, timesteps = objective.sample(latents, torch.Generator().manual_seed(7))
    ref_noise, ref_timesteps, ref_noisy, ref_target, ref_weights = _reference(scheduler, latents, 7, scheme)
    assert torch.equal(noise, ref_noise)
    assert torch.equal(timesteps, ref_timesteps)
    assert torch.equal(objective.add_noise(latents, noise, timesteps), ref_noisy)
    assert torch.equal(objective.target(latents, noise, timesteps), ref_target)
    weights = objective.loss_weights(timesteps)
    if scheme == "sigma_sqrt":
        assert torch.equal(weights, ref_weights.float())
        assert not torch.allclose(weights, torch.ones_like(weights))
    else:
        assert weights is None and torch.equal(ref_weights, torch.ones_like(ref_weights))  # all ones: a plain mean
    # a pure function of its inputs and the generator
    again = objective.sample(latents, torch.Generator().manual_seed(7))
    assert torch.equal(again[0], noise) and torch.equal(again[1], timesteps)


def test_flow_matching_huber_thresholds_use_sigma():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    objective = FlowMatchingObjective(scheduler)
    timesteps = scheduler.timesteps[[0, 500, 999]]
    sigma = objective.sigmas(timesteps)
    assert torch.equal(objective.huber_threshold(timesteps, 0.1, "constant"), torch.full((3,), 0.1))
    assert torch.allclose(objective.huber_threshold(timesteps, 0.1, "exponential"), 0.1**sigma)
    snr = objective.huber_threshold(timesteps, 0.1, "snr")
    assert snr[0] < snr[1] < snr[2] <= 1.0  # robust (near huber_c) at pure noise, MSE-like near the clean end
    with pytest.raises(SdtuneError, match="weighting_scheme"):
        FlowMatchingObjective(scheduler, "uniform")


# --------------------------------------------------------------------------------------------------------
# The family


def test_flux_is_detected_from_its_config_files(tiny_model, tmp_path):
    info = inspect_model(str(tiny_model("flux")))
    assert info.family is FLUX and families.get("flux") is FLUX
    assert (info.prediction_type, info.resolution, info.bucket_multiple) == ("flow_matching", 64, 16)
    assert FLUX.default_resolution == 1024 and FLUX.denoiser_name == "transformer"
    # by the transformer's class alone (a pipeline class of another name)
    other = tmp_path / "renamed"
    shutil.copytree(tiny_model("flux"), other, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyFluxPipeline"}))
    assert families.detect(ModelFiles(str(other))) is FLUX
    assert families.detect(ModelFiles(str(tiny_model("sd15")))) is not FLUX
    # a Fill-style transformer (extra input channels) is refused for training
    config = json.loads((other / "transformer/config.json").read_text())
    (other / "transformer/config.json").write_text(json.dumps({**config, "in_channels": 32}))
    with pytest.raises(SdtuneError, match="input channels"):
        inspect_model(str(other))


def test_flux_step_shapes_and_packing(tiny_model):
    c = load_components(str(tiny_model("flux")), FLUX)
    captions = ["a photo of sks toy", "a dog"]
    ids = FLUX.tokenize(c.tokenizers, captions)
    assert [tuple(i.shape) for i in ids] == [(2, 77), (2, 512)]
    with torch.no_grad():
        embeds = FLUX.encode_prompt(c.text_encoders, ids)
    assert tuple(embeds["prompt_embeds"].shape) == (2, 512, 32)  # T5 (B, L, D); 4096 wide in FLUX.1
    assert tuple(embeds["pooled_prompt_embeds"].shape) == (2, 32)  # CLIP pooled; 768 in FLUX.1
    cond = FLUX.conditioning(embeds, {}, FluxOptions(guidance_scale=3.5), torch.device("cpu"), torch.float32)
    assert tuple(cond["txt_ids"].shape) == (512, 3) and torch.equal(cond["guidance"], torch.full((2,), 3.5))

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 8)
    assert tuple(packed.shape) == (2, 16, 16)
    timesteps = torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        model_pred = FLUX.predict(c.denoiser, latents, timesteps, cond)
        # what the transformer itself gives, called as the reference script calls it
        ref = c.denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=cond["guidance"],
                         pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                         txt_ids=cond["txt_ids"], img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                         return_dict=False)[0]
        other_guidance = FLUX.predict(c.denoiser, latents, timesteps, {**cond, "guidance": torch.full((2,), 1.0)})
    assert tuple(model_pred.shape) == (2, 4, 8, 8)
    assert torch.equal(model_pred, FluxPipeline._unpack_latents(ref, 64, 64, 8))
    assert not torch.equal(model_pred, other_guidance)  # guidance_embeds: the scale is an input

    objective = FLUX.objective(c.noise_scheduler, "flow_matching", options=FluxOptions())
    out = training_step(c.denoiser, FLUX, objective, latents, cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_flux_refuses_what_it_cannot_do_yet(tiny_model, tmp_path):
    model = tiny_model("flux")
    base = overrides(model, tmp_path / "run")
    for key, value in [("train.noise_offset", "0.05"), ("train.snr_gamma", "5"),
                       ("model.prediction_type", "epsilon")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_run(load_config(None, [*base, f"{key}={value}"]))
    with pytest.raises(ConfigError, match=r"sdxl\.crop_conditioning"):
        check_run(load_config(None, [*base, "sdxl.crop_conditioning=false"]))
    check_run(load_config(None, [*base, "flux.guidance_scale=3.5", "flux.weighting_scheme=mode"]))
    assert FLUX.recognises_lora(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], {})
    assert FLUX.recognises_lora(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], {})
    assert not FLUX.recognises_lora(["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"], {"ss_base_model_version": "sd_v1"})
    assert FLUX.kohya_version("flow_matching").base_model_version == "flux1"


# --------------------------------------------------------------------------------------------------------
# End to end


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdtune", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """A tiny FLUX model written by `sdtune random-model`, then 4 steps of tiny_cpu.yaml on it through the CLI
    (prior preservation with generated class images, cached latents and text, a checkpoint at step 2)."""
    tmp = tmp_path_factory.mktemp("flux")
    model, out = tmp / "model", tmp / "run"
    made = _cli("random-model", "--family", "flux", "--size", "tiny", str(model))
    assert made.returncode == 0, made.stdout + made.stderr
    trained = _cli("train", "recipes/tiny_cpu.yaml", f"model.pretrained={model}", f"train.output_dir={out}",
                   f"data.instance_dir={DEMO_DATA}", f"prior.class_dir={tmp / 'class'}", "prior.num_class_images=2",
                   "prior.generation_steps=1", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1",
                   "sample.every=2", "sample.steps=2", "sample.seeds=[0]", "train.report_to=none")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return model, out, trained.stdout + trained.stderr


@pytest.mark.slow
def test_flux_trains_through_the_cli(flux_run):
    model, out, _ = flux_run
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["prior_loss"]) for r in losses)
    lora = load_file(out / WEIGHT_NAME)
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(".single_transformer_blocks." in k for k in lora) and any(".transformer_blocks." in k for k in lora)
    # the family's default targets (the recipe names none): the text stream's projections too
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora}
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q", "to_k", "to_v"} <= modules
    assert "add_q_proj" in (out / "config.yaml").read_text()
    # PEFT starts every lora_B at zero: trained ones are not
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert all(torch.isfinite(v).all() for v in lora.values())
    # the kohya file in BFL's layout (q, k, v fused), written by training and by `sdtune export`
    kohya = load_file(out / f"{out.name}_kohya.safetensors")
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_txt_attn_qkv.alpha",
            "lora_unet_single_blocks_0_linear1.lora_up.weight"} <= kohya.keys()
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in kohya)
    # the grids during training use FLUX.1-dev's guidance (the recipe gives none)
    assert yaml.safe_load((out / "config.yaml").read_text())["sample"]["guidance_scale"] == 3.5
    # sample grids during and after training, rendered (a failed cell would be a flat grey square)
    for step in (2, 4):
        grid = np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png").convert("RGB")).astype(float)
        assert grid.std() > 10
    assert "FluxPipeline" in (out / "README.md").read_text()
    exported = _cli("export", str(out), "--format", "kohya", "-o", str(out.parent / "k.safetensors"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert load_file(out.parent / "k.safetensors").keys() == kohya.keys()


@pytest.mark.slow
def test_flux_lora_in_flux_pipeline_gives_sdtune_sample_pixels(flux_run, tmp_path):
    model, out, _ = flux_run
    grid = tmp_path / "grid.png"
    # no --guidance: FLUX.1-dev's 3.5, as the pipeline below is given
    sampled = _cli("sample", str(out), "--prompt", "a photo of sks toy", "--steps", "2", "--seeds", "0",
                   "--lora-scale", "1", "--out", str(grid))
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    cells = sorted((tmp_path / "grid_cells").glob("*.png"))
    assert len(cells) == 1
    sidecar = json.loads(cells[0].with_suffix(".json").read_text())
    assert sidecar["cell"]["guidance_scale"] == 3.5
    assert sidecar["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"  # not the --scheduler default
    pipe = FluxPipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(prompt=["a photo of sks toy"], num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
                generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    pipe.load_lora_weights(str(out))
    image = pipe(prompt=["a photo of sks toy"], num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
                 generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    ours = np.asarray(Image.open(cells[0]).convert("RGB"))
    assert np.array_equal(np.asarray(image), ours)
    assert not np.array_equal(np.asarray(base), ours)  # the LoRA changed the pixels


@pytest.mark.slow
def test_flux_resume_is_exact(tiny_model, tmp_path):
    common = ["data.random_flip=true", "train.learning_rate=1e-3", "lora.dropout=0.1", "sample.every=0",
              "flux.weighting_scheme=mode"]
    straight, split = interrupted_and_resumed(tiny_model("flux"), tmp_path, 4, 2, *common)
    assert_resumed_bitwise(straight, split, 4, "transformer")


# --------------------------------------------------------------------------------------------------------
# kohya / BFL files (what ComfyUI and Forge load) and the sampling defaults

FLUX1 = 3072  # FLUX.1's width: diffusers' kohya reader splits linear1 at FLUX.1's sizes (3 x 3072 + 12288)


def _flux1_adapters(rank: int = 4, alpha: float = 8.0) -> dict[str, Adapter]:
    """LoRA tensors of FLUX.1-dev's real shapes on a spread of modules (no model: only the LoRA's own small
    tensors), one module with its own rank and alpha, and a CLIP-L adapter."""
    d, m = FLUX1, 4 * FLUX1
    shapes = {  # module: (out, in)
        **{f"transformer_blocks.0.attn.{p}": (d, d) for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out")},
        "transformer_blocks.0.ff.net.0.proj": (m, d), "transformer_blocks.0.ff.net.2": (d, m),
        "transformer_blocks.0.norm1.linear": (6 * d, d), "transformer_blocks.18.norm1_context.linear": (6 * d, d),
        "transformer_blocks.18.ff_context.net.0.proj": (m, d), "transformer_blocks.18.ff_context.net.2": (d, m),
        "transformer_blocks.18.attn.add_k_proj": (d, d),  # alone: q and v are zero blocks of the fused qkv
        # the default targets: q, k, v (linear1's MLP part a zero block), and the rest of a single block
        **{f"single_transformer_blocks.0.attn.{p}": (d, d) for p in ("to_q", "to_k", "to_v")},
        "single_transformer_blocks.0.proj_out": (d, d + m), "single_transformer_blocks.0.norm.linear": (3 * d, d),
        **{f"single_transformer_blocks.37.attn.{p}": (d, d) for p in ("to_q", "to_k", "to_v")},
        "single_transformer_blocks.37.proj_mlp": (m, d),
    }
    special = "single_transformer_blocks.37.attn.to_k"
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, inp) in shapes.items():
        r = 8 if module == special else rank
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    config = {"r": rank, "lora_alpha": alpha, "rank_pattern": {special: 8}, "alpha_pattern": {special: 4.0}}
    clip = {f"text_model.encoder.layers.0.self_attn.{p}.lora_{ab}.weight": torch.randn(*shape, generator=g)
            for p in ("q_proj", "v_proj") for ab, shape in (("A", (rank, 32)), ("B", (32, rank)))}
    return {"transformer": Adapter(tensors, config), "text_encoder": Adapter(clip, {"r": rank, "lora_alpha": alpha})}


def test_flux_kohya_keys_shapes_and_metadata():
    adapters = _flux1_adapters()
    tensors, meta = to_kohya(FLUX, adapters, trigger_word="sks", base_model="black-forest-labs/FLUX.1-dev",
                             prediction_type="flow_matching")
    d, r = FLUX1, 4
    names = {k.split(".")[0] for k in tensors}
    assert names == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_18_txt_mod_lin",
        "lora_unet_double_blocks_18_txt_mlp_0", "lora_unet_double_blocks_18_txt_mlp_2",
        "lora_unet_double_blocks_18_txt_attn_qkv", "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin",
        "lora_unet_single_blocks_37_linear1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
    }
    assert all(f"{n}.{p}" in tensors for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha"))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * r, d)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * d, 3 * r)
    assert float(tensors[f"{qkv}.alpha"]) == 8.0 * 3  # alpha / rank stays 8 / 4
    t = adapters["transformer"].tensors
    down, up = tensors[f"{qkv}.lora_down.weight"], tensors[f"{qkv}.lora_up.weight"]
    assert torch.equal(down[r:2 * r], t["transformer_blocks.0.attn.to_k.lora_A.weight"])
    assert torch.equal(up[d:2 * d, r:2 * r], t["transformer_blocks.0.attn.to_k.lora_B.weight"])
    assert not up[:d, r:].any() and not up[d:2 * d, :r].any()  # block-diagonal
    # linear1: q, k, v and a zero block for the untrained MLP input (4 x the width); rank 4r, alpha x 4
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert tensors[f"{linear1}.lora_down.weight"].shape == (4 * r, d)
    assert tensors[f"{linear1}.lora_up.weight"].shape == (3 * d + 4 * d, 4 * r)
    assert not tensors[f"{linear1}.lora_down.weight"][3 * r:].any() and float(tensors[f"{linear1}.alpha"]) == 32.0
    # k alone in the text stream's qkv: zero q and v blocks
    assert not tensors["lora_unet_double_blocks_18_txt_attn_qkv.lora_up.weight"][:d].any()
    # a rename keeps the trained bits and alpha
    assert torch.equal(tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"],
                       t["transformer_blocks.0.attn.to_out.0.lora_B.weight"])
    assert float(tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 8.0
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    _, schnell = to_kohya(FLUX, adapters, prediction_type="flow_matching", architecture="flux-1-schnell")
    assert schnell["modelspec.architecture"] == "flux-1-schnell/lora"
    assert "modelspec.prediction_type" not in schnell  # flow matching: neither epsilon nor v (kohya writes none)
    # a module BFL's layout has no name for is one clear error
    odd = Adapter({"norm_out.linear.lora_A.weight": torch.zeros(4, 8),
                   "norm_out.linear.lora_B.weight": torch.zeros(8, 4)}, {"r": 4, "lora_alpha": 4})
    with pytest.raises(SdtuneError, match="norm_out.linear has no name in the FLUX.1 kohya layout"):
        to_kohya(FLUX, {"transformer": odd})
    odd = Adapter({k.replace("norm_out.linear", "x_embedder"): v for k, v in odd.tensors.items()}, odd.config)
    with pytest.raises(SdtuneError, match="x_embedder has no name"):
        to_kohya(FLUX, {"transformer": odd})


def test_flux_kohya_file_reads_back_through_diffusers_converter_to_the_same_deltas():
    adapters = _flux1_adapters()
    tensors, _ = to_kohya(FLUX, adapters, prediction_type="flow_matching")
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    # CLIP's keys come back in diffusers' old naming (self_attn.to_q_lora.down), which load_lora_weights
    # turns into PEFT's with this function
    converted = convert_state_dict_to_peft(converted, original_type=StateDictType.DIFFUSERS_OLD)

    def delta(state: dict, module: str) -> torch.Tensor:
        return state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]

    checked = 0
    for component, adapter in adapters.items():
        for module in adapter.modules():
            want = adapter.scale(module) * adapter.tensors[f"{module}.lora_B.weight"] @ \
                adapter.tensors[f"{module}.lora_A.weight"]
            got = delta(converted, f"{component}.{module}")
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), module
            checked += 1
    assert checked == len(adapters["transformer"].modules()) + 2
    # what the zero blocks become: LoRAs of the untrained members with a zero delta, nothing else
    trained = {f"{c}.{m}" for c, a in adapters.items() for m in a.modules()}
    extra = {k.split(".lora")[0] for k in converted} - trained
    assert extra == {"transformer.single_transformer_blocks.0.proj_mlp",
                     "transformer.transformer_blocks.18.attn.add_q_proj",
                     "transformer.transformer_blocks.18.attn.add_v_proj"}
    assert all(not delta(converted, module).any() for module in extra)
    # equal ranks in a fused module come back as the members' own rank-r LoRAs (diffusers' "sparse" split)
    assert converted["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"].shape == (4, FLUX1)


def test_flux_sampling_defaults(tiny_model, tmp_path):
    assert FLUX.sampling.guidance_scale == 3.5 and FLUX.sampling.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert families.get("sd15").sampling.guidance_scale == 7.5 and families.get("sd15").sampling.scheduler is None
    model = tiny_model("flux")
    base = overrides(model, tmp_path / "run")
    assert with_family_defaults(load_config(None, base), FLUX).sample.guidance_scale == 3.5
    assert with_family_defaults(load_config(None, [*base, "sample.guidance_scale=5"]), FLUX).sample.guidance_scale == 5
    # the class images too (prior preservation's "a photo of a dog" at FLUX's guidance, not SD's 7.5)
    assert with_family_defaults(load_config(None, base), FLUX).prior.generation_guidance == 3.5
    assert with_family_defaults(load_config(None, [*base, "prior.generation_guidance=2"]),
                                FLUX).prior.generation_guidance == 2
    sd = overrides(tiny_model("sd15"), tmp_path / "sd")
    assert with_family_defaults(load_config(None, sd), families.get("sd15")).sample.guidance_scale == 7.5
    req = Request(model=str(model), lora=[], cells=[Cell("a dog", 0, None), Cell("a dog", 1, 2.0)],
                  settings=Settings(scheduler="dpmpp_2m"))
    resolved = sample_defaults(req)
    assert [c.guidance_scale for c in resolved.cells] == [3.5, 2.0]
    assert resolved.settings.scheduler == "FlowMatchEulerDiscreteScheduler"
    sd_req = sample_defaults(Request(model=str(tiny_model("sd15")), lora=[], cells=[Cell("a dog", 0, None)],
                                     settings=Settings(scheduler="euler")))
    assert sd_req.cells[0].guidance_scale == 7.5 and sd_req.settings.scheduler == "euler"
    # schnell (no guidance embedding) is named so in the kohya metadata
    schnell = tmp_path / "schnell"
    shutil.copytree(model, schnell, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((schnell / "transformer/config.json").read_text())
    (schnell / "transformer/config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    assert inspect_model(str(schnell)).architecture == "flux-1-schnell"
    assert inspect_model(str(model)).architecture is None


def _tiny_lora(model: Path) -> dict[str, Adapter]:
    """A LoRA on the tiny FLUX (every module kind BFL's layout has, bar linear1: diffusers' reader splits it at
    FLUX.1's sizes only) and on CLIP, with random (non-zero) ups and alpha 2 x rank."""
    from peft import LoraConfig

    c = load_components(str(model), FLUX)
    double = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|" \
             r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    single = r"single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
    c.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                      target_modules=f"{double}|{single}"))
    c.text_encoders[0].add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                              target_modules=["q_proj", "v_proj", "out_proj"]))
    g = torch.Generator().manual_seed(3)
    for module in (c.denoiser, c.text_encoders[0]):
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.5
    return {"transformer": Adapter.from_module(c.denoiser), "text_encoder": Adapter.from_module(c.text_encoders[0])}


def _both_files(model: Path, adapters: dict[str, Adapter], folder: Path) -> tuple[Path, Path]:
    """(the diffusers file, the kohya file) of ``adapters``, as a run writes them."""
    diffusers_file, _ = _write_diffusers(RunLora(folder / "x", adapters, {"model": {"pretrained": str(model)}}),
                                         folder / "lora.safetensors")
    kohya_file = write_kohya(folder / "lora_kohya.safetensors", FLUX, adapters, base_model=str(model),
                             prediction_type="flow_matching")
    return diffusers_file, kohya_file


def test_flux_kohya_file_samples_the_pixels_of_the_diffusers_file(tiny_model, tmp_path):
    model = tiny_model("flux")
    adapters = _tiny_lora(model)
    diffusers_file, kohya_file = _both_files(model, adapters, tmp_path)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in load_file(kohya_file))
    # an ai-toolkit file: diffusers' transformer.* keys in kohya's lora_down / lora_up naming, no metadata
    ai_toolkit = tmp_path / "ai_toolkit.safetensors"
    save_file({k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
               for k, v in load_file(diffusers_file).items() if k.startswith("transformer.")}, str(ai_toolkit))
    images, sidecars = {}, {}
    for name, lora in (("base", None), ("diffusers", diffusers_file), ("kohya", kohya_file), ("ai", ai_toolkit)):
        req = Request(model=str(model), lora=[(name, str(lora))] if lora else [],
                      cells=[Cell("a photo of sks toy", 0, None, 1.0 if lora else None, name if lora else None)],
                      settings=Settings(steps=2, width=64, height=64))
        run_sample(req, tmp_path / f"{name}.png", progress=False)
        images[name] = np.asarray(Image.open(tmp_path / f"{name}_cells/cell-0000.png").convert("RGB"))
        sidecars[name] = json.loads((tmp_path / f"{name}_cells/cell-0000.json").read_text())
    # The same pixels, to one level: the two files give every module the same update bitwise (below), but the
    # CPU's matmul kernels round differently with where tensors happen to lie in memory (the same two files
    # render equal or 1 level apart depending only on the model folder's path), so bitwise is not promised.
    apart = np.abs(images["kohya"].astype(int) - images["diffusers"])
    assert apart.max() <= 1 and (apart > 0).mean() < 0.05
    assert np.abs(images["base"].astype(int) - images["diffusers"]).max() > 8  # the LoRA changed the pixels
    assert not np.array_equal(images["ai"], images["diffusers"])  # no CLIP LoRA in it: other pixels ...
    assert not np.array_equal(images["ai"], images["base"])  # ... but its transformer LoRA loaded
    # every LoRA'd module of the loaded pipelines: the same update, bitwise (scale x up @ down)
    updates = {}
    for name, lora in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        pipe, family = _load_pipeline(Request(model=str(model), lora=[], cells=[], settings=Settings(), device="cpu"))
        _apply_lora(pipe, str(lora), family)
        updates[name] = {f"{c}.{n}": m.scaling[ADAPTER] * m.lora_B[ADAPTER].weight @ m.lora_A[ADAPTER].weight
                         for c in ("transformer", "text_encoder") for n, m in getattr(pipe, c).named_modules()
                         if hasattr(m, "lora_A") and ADAPTER in m.lora_A}
    assert updates["kohya"].keys() == updates["diffusers"].keys() and len(updates["kohya"]) == 16 + 6
    assert all(torch.equal(updates["kohya"][k], updates["diffusers"][k]) for k in updates["kohya"])
    # the family's defaults, recorded: FLUX.1-dev's guidance and the scheduler that really ran
    assert sidecars["kohya"]["cell"]["guidance_scale"] == 3.5
    assert sidecars["kohya"]["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_eval_samples_a_flux_model_at_its_own_guidance(tiny_model):
    """`sdtune eval` without --guidance: the scorer's (the paper's 7.5, the micro world's 4) for SD models, the
    family's own for FLUX (3.5: at 7.5 a guidance-distilled model draws burnt images)."""
    from types import SimpleNamespace

    from sdtune.cli.eval import _guidance

    paper, world = SimpleNamespace(guidance=7.5), SimpleNamespace(guidance=4.0)
    assert _guidance(paper, str(tiny_model("flux")), None) == 3.5
    assert _guidance(world, str(tiny_model("flux")), None) == 3.5
    assert _guidance(paper, str(tiny_model("sd15")), None) == 7.5
    assert _guidance(world, str(tiny_model("sd15")), None) == 4.0


def test_a_kohya_file_at_a_tiny_models_widths_samples_and_one_diffusers_cannot_split_is_one_line(tiny_model,
                                                                                                  tmp_path, capsys):
    # linear1 (the single blocks' fused q, k, v and MLP) of a tiny model: diffusers' reader asserts FLUX.1's
    # widths with a bare `assert` (no message); sdtune's reader splits it at the model's own widths. A file with
    # a part sdtune does not read (here a T5 LoRA) goes to diffusers: its assert is one line, not "a bug in sdtune"
    from peft import LoraConfig

    from sdtune.cli import main

    model = tiny_model("flux")
    c = load_components(str(model), FLUX)
    c.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
    kohya = write_kohya(tmp_path / "k.safetensors", FLUX, {"transformer": Adapter.from_module(c.denoiser)},
                        base_model=str(model), prediction_type="flow_matching")
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in load_file(kohya))

    def sample(lora: Path) -> int:
        return main(["sample", str(lora), "--model", str(model), "--prompt", "a toy", "--seeds", "0", "--steps", "1",
                     "--out", str(tmp_path / "g.png")])

    assert sample(kohya) == 0
    with_t5 = tmp_path / "with_t5.safetensors"
    save_file({**load_file(kohya), "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight":
               torch.zeros(4, 32), "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight":
               torch.zeros(32, 4)}, str(with_t5))
    capsys.readouterr()
    code = sample(with_t5)
    err = capsys.readouterr().err
    assert code != 0 and "bug in sdtune" not in err
    # not the file's fault: the converter's widths are FLUX.1's, the tiny model's are not
    assert "needs FLUX.1's own layer widths (3072)" in err and "pytorch_lora_weights.safetensors" in err


def test_dora_on_flux_with_linear1_partly_trained_keeps_its_diffusers_file_and_says_what_to_add(tiny_model,
                                                                                                 tmp_path, caplog):
    """The default targets train q, k, v of the single blocks but not proj_mlp, which BFL's layout fuses with
    them into linear1: its dora_scale would need proj_mlp's base norms. The run still ends with its LoRA, model
    card and grid, and says the kohya file was not written and what to add."""
    from sdtune.train import train

    out = tmp_path / "dora"
    train(load_config(None, overrides(tiny_model("flux"), out, "prior.enabled=false", "lora.use_dora=true",
                                      "train.max_steps=2", "sample.every=0")))
    assert (out / WEIGHT_NAME).is_file() and (out / "README.md").is_file()
    assert not (out / f"{out.name}_kohya.safetensors").exists()
    said = [r.message for r in caplog.records if "not written" in r.message]
    assert said and "but not on single_transformer_blocks.0.proj_mlp" in said[0], said
    assert "add proj_mlp to lora.target_modules" in said[0], said
    # and before training, with the recipe's other warnings (not only once the run is over)
    before = [r.message for r in caplog.records if "lora.use_dora: the single blocks' to_q" in r.message]
    assert before and caplog.records.index(next(r for r in caplog.records if r.message in before)) < \
        caplog.records.index(next(r for r in caplog.records if "not written" in r.message))
    for targets, warned in (("[to_q,to_k,to_v,to_out.0]", True), ("[attn.to_q,proj_mlp]", False),
                            ("[to_out.0,add_q_proj]", False)):
        cfg = load_config(None, overrides(tiny_model("flux"), out, "lora.use_dora=true",
                                          f"lora.target_modules={targets}"))
        assert any(w.startswith("lora.use_dora: the single blocks'") for w in FLUX.config_warnings(cfg)) == warned


def _tiny_dora(model: Path) -> dict[str, Adapter]:
    """A DoRA on every module kind of the tiny FLUX that BFL's layout names, linear1's four members included,
    with random ups and magnitudes (as trained ones: not the base norms), alpha 2 x rank."""
    from peft import LoraConfig

    c = load_components(str(model), FLUX)
    double = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|" \
             r"to_add_out)|ff\.net\.2|norm1\.linear)"
    single = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
    c.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", use_dora=True,
                                      target_modules=f"{double}|{single}"))
    g = torch.Generator().manual_seed(5)
    for name, p in c.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
        elif "lora_magnitude_vector" in name:
            p.data = p.data * (1 + 0.5 * torch.rand(p.shape, generator=g))
    return {"transformer": Adapter.from_module(c.denoiser)}


def _layer_outputs(pipe) -> dict[str, torch.Tensor]:
    """Every adapted Linear of the pipeline's transformer on a fixed input of its width (seeded by it)."""
    with torch.no_grad():
        return {n: m(torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(m.in_features)))
                for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def test_a_flux_dora_kohya_file_fuses_qkv_and_samples_back_as_the_dora(tiny_model, tmp_path, caplog):
    """q, k, v (and linear1's MLP input) fused in BFL's layout: the dora_scale of the fused Linear is the
    members' magnitudes stacked, exactly (DoRA's norm is per output row). `sdtune sample` splits it back:
    every adapted layer computes what the diffusers file's does, and the pixels match."""
    model = tiny_model("flux")
    adapters = _tiny_dora(model)
    diffusers_file, kohya_file = _both_files(model, adapters, tmp_path)
    tensors, t = load_file(kohya_file), adapters["transformer"].tensors
    magnitude = [t[f"transformer_blocks.0.attn.{m}.lora_magnitude_vector"] for m in ("to_q", "to_k", "to_v")]
    assert torch.equal(tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"][:, 0], torch.cat(magnitude))
    assert tensors["lora_unet_single_blocks_0_linear1.dora_scale"].shape[0] == \
        tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0]
    outputs = {}
    for name, lora in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        pipe, family = _load_pipeline(Request(model=str(model), lora=[], cells=[], settings=Settings(), device="cpu"))
        _apply_lora(pipe, str(lora), family)
        outputs[name] = _layer_outputs(pipe)
        if name == "kohya":  # split back to the members' rank, not the fused 3 x rank
            assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_A[ADAPTER].weight.shape[0] == 4
    assert outputs["kohya"].keys() == outputs["diffusers"].keys() and len(outputs["kohya"]) == 10 + 5
    for key, value in outputs["diffusers"].items():
        assert torch.allclose(outputs["kohya"][key], value, atol=1e-5), key
    images = {}
    for name, lora in (("diffusers", diffusers_file), ("kohya", kohya_file)):
        req = Request(model=str(model), lora=[(name, str(lora))], cells=[Cell("a photo of sks toy", 0, None, 1.0, name)],
                      settings=Settings(steps=2, width=64, height=64))
        run_sample(req, tmp_path / f"{name}.png", progress=False)
        images[name] = np.asarray(Image.open(tmp_path / f"{name}_cells/cell-0000.png").convert("RGB")).astype(int)
    assert np.abs(images["kohya"] - images["diffusers"]).max() <= 1
    assert not any("not applied" in r.message for r in caplog.records)


@pytest.mark.parametrize("dora", [True, False])
def test_a_lora_trained_on_the_fused_linear_reads_back_exactly(tiny_model, tmp_path, dora):
    """A file trained on BFL's fused qkv (kohya sd-scripts' FLUX LoRA; a LyCORIS DoRA: a dense up, one dora_scale
    for 3 x width rows): q, k and v each become a LoRA (DoRA) of the full rank whose outputs stacked are the
    fused Linear's, computed here by the formula W0 + s up @ down (DoRA's m * that / ||that||_row)."""
    from sdtune.export import read_kohya_lora
    from sdtune.lora import inject_adapter

    model = tiny_model("flux")
    c = load_components(str(model), FLUX)
    attn = c.denoiser.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(1)
    width, rank, alpha = attn.to_q.in_features, 6, 3.0
    down, up = torch.randn(rank, width, generator=g), torch.randn(3 * width, rank, generator=g) * 0.3
    w0 = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
    bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]).detach()
    scale = w0.norm(dim=1) * (1 + 0.5 * torch.rand(3 * width, generator=g))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha),
               **({f"{name}.dora_scale": scale[:, None].contiguous()} if dora else {})},
              str(tmp_path / "fused.safetensors"))
    adapters = read_kohya_lora(tmp_path / "fused.safetensors", FLUX, {"transformer": c.denoiser})
    assert adapters is not None and sorted(adapters["transformer"].modules()) == [
        f"transformer_blocks.0.attn.{m}" for m in ("to_k", "to_q", "to_v")]
    inject_adapter(c.denoiser, adapters["transformer"].config, adapters["transformer"].tensors, "x")
    merged = w0 + (alpha / rank) * up @ down
    expected = scale[:, None] * merged / merged.norm(dim=1, keepdim=True) if dora else merged
    x = torch.randn(5, width, generator=g)
    with torch.no_grad():
        got = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=1)
    assert torch.allclose(got, x @ expected.T + bias, atol=1e-4)
    # a dora_scale per input channel (LyCORIS' wd_on_out=False) is not PEFT's DoRA: not read
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.dora_scale": torch.ones(1, width)}, str(tmp_path / "per_input.safetensors"))
    assert read_kohya_lora(tmp_path / "per_input.safetensors", FLUX, {"transformer": c.denoiser}) is None


@pytest.mark.slow
def test_eval_reuses_a_flux_runs_images(flux_run, tmp_path, caplog):
    """`sdtune eval` compares each cell's sidecar with its settings as the sampler resolves them (FLUX's own
    scheduler and T5 length): the base model's cells are shared by checkpoints, a second eval renders none."""
    import logging

    from sdtune.eval.core import EvalSpec
    from sdtune.eval.run import render

    model, out, _ = flux_run
    loras = [(p.name, str(p / WEIGHT_NAME)) for p in sorted((out / "checkpoints").iterdir())]
    spec = EvalSpec(run=str(out), model=str(model), loras=loras, subject_dir=DEMO_DATA, identifier="sks",
                    class_noun="toy", prompt_set="test", prompts=["a photo of sks toy"], images_per_prompt=1,
                    lora_scales=[0.0, 1.0], guidance=3.5, settings=Settings(steps=1, width=64, height=64))
    caplog.set_level(logging.INFO, logger="sdtune.eval.run")
    render(spec, tmp_path, class_images=False, progress=False)
    assert "reusing 1 base-model images" in caplog.text  # the second checkpoint's LoRA x0 cell
    caplog.clear()
    render(spec, tmp_path, class_images=False, progress=False)
    assert caplog.text.count("reusing 2 images") == len(loras) and "rendering" not in caplog.text
