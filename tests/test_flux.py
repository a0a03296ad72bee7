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
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from PIL import Image
from safetensors.torch import load_file

from conftest import DEMO_DATA, ROOT, overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.families.base import ModelFiles
from sdtune.families.flux import FLUX, FluxOptions
from sdtune.lora import WEIGHT_NAME
from sdtune.models import inspect_model, load_components
from sdtune.objectives import FlowMatchingObjective
from sdtune.plan import check_run
from sdtune.train import train, training_step

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
    for key, value in [("train.noise_offset", "0.05"), ("train.snr_gamma", "5"), ("pivotal.enabled", "true"),
                       ("model.prediction_type", "epsilon"), ("train.validation_every", "2")]:
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
    model, out, log = flux_run
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
    # the kohya file is not written (its FLUX layout is not implemented), and the run says so
    assert not list(out.glob("*_kohya.safetensors"))
    assert "export.kohya is not available for FLUX" in log
    # sample grids during and after training, rendered (a failed cell would be a flat grey square)
    for step in (2, 4):
        grid = np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png").convert("RGB")).astype(float)
        assert grid.std() > 10
    assert "FluxPipeline" in (out / "README.md").read_text()
    exported = _cli("export", str(out), "--format", "kohya", "-o", str(out.parent / "k.safetensors"))
    assert exported.returncode != 0 and "export.kohya is not available for FLUX" in exported.stdout + exported.stderr


@pytest.mark.slow
def test_flux_lora_in_flux_pipeline_gives_sdtune_sample_pixels(flux_run, tmp_path):
    model, out, _ = flux_run
    grid = tmp_path / "grid.png"
    sampled = _cli("sample", str(out), "--prompt", "a photo of sks toy", "--steps", "2", "--seeds", "0",
                   "--lora-scale", "1", "--guidance", "3.5", "--out", str(grid))
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    cells = sorted((tmp_path / "grid_cells").glob("*.png"))
    assert len(cells) == 1
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
    common = ["train.max_steps=4", "data.random_flip=true", "train.learning_rate=1e-3", "lora.dropout=0.1",
              "sample.every=0", "flux.weighting_scheme=mode"]
    model = tiny_model("flux")
    straight = tmp_path / "straight"
    train(load_config(None, overrides(model, straight, *common)))
    split = tmp_path / "split"
    train(load_config(None, overrides(model, split, "train.checkpoint_every=2", *common)))
    shutil.rmtree(split / "checkpoints/step-000004")
    (split / WEIGHT_NAME).unlink()
    train(load_config(None, overrides(model, split, "train.resume=latest", *common)))

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}

    assert [losses(split)[k] for k in range(1, 5)] == [losses(straight)[k] for k in range(1, 5)]
    a = load_file(straight / "checkpoints/step-000004/adapter-transformer.safetensors")
    b = load_file(split / "checkpoints/step-000004/adapter-transformer.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
