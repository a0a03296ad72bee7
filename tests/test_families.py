"""Model families behind one protocol: the built-in ones conform, a new one registers without touching the rest
(its checks run through config checking and the CLI), and an objective that is not DDPM fits the step."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from conftest import DEMO_DATA, ROOT
from sdtune import families
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.families import Family, ModelFiles, ModelInfo, TextEncoderSpec
from sdtune.families.sd import StableDiffusion
from sdtune.lora import add_lora
from sdtune.models import inspect_model, load_components
from sdtune.objectives import DiffusionObjective
from sdtune.plan import check_run
from sdtune.train import training_step


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl"])
def test_builtin_families_implement_the_protocol(name, tiny_model):
    family = families.get(name)
    assert isinstance(family, Family)
    info = inspect_model(str(tiny_model(name)))
    assert info.family is family and info.bucket_multiple == 16  # tiny models: VAE x8, one UNet downsampling
    assert family.denoiser_name in family.kohya_prefixes
    assert [e.name for e in family.text_encoders][: 1] == ["text_encoder"]
    assert family.trained_text_encoders(family.options() if family.options else None)


def test_unknown_family_names_are_one_clear_error():
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="--family: unknown family 'sd9'; choose one of sd15, sd2, sd3, sdxl, flux"):
        families.get("sd9")
    with pytest.raises(TypeError, match="does not implement"):
        families.register(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# A family registered from outside: a flow-matching transformer with a T5 encoder, in spirit


@dataclass(frozen=True)
class StubFamily(StableDiffusion):
    def detect(self, files: ModelFiles) -> bool:
        return files.read("model_index.json").get("_class_name") == "StubPipeline"

    def describe(self, files: ModelFiles, for_training: bool) -> ModelInfo:
        return ModelInfo(files.pretrained, self, "flow_matching", 256, 16, "StubPipeline")

    def denoiser_module_names(self, files: ModelFiles) -> list[str]:
        return ["", "blocks", "blocks.0", "blocks.0.attn", "blocks.0.attn.to_q", "blocks.0.attn.to_k"]


STUB = StubFamily(name="stub", label="Stub-1", default_resolution=256, denoiser_name="transformer",
                  text_encoders=(TextEncoderSpec("text_encoder", "T5", "<pad>"),),
                  text_encoder_targets=frozenset({"q", "k", "v", "o"}))


@pytest.fixture
def stub_model(tmp_path):
    families.register(STUB)
    folder = tmp_path / "stub-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StubPipeline",
                                                         "transformer": ["diffusers", "StubTransformer"]}))
    yield folder
    families.unregister("stub")


def _stub_config(model, *extra):
    return load_config(None, [f"model.pretrained={model}", f"data.instance_dir={DEMO_DATA}", "data.identifier=sks",
                              "lora.target_modules=[to_q,to_k]", *extra])


def test_a_registered_family_is_detected_and_checked(stub_model):
    plan = check_run(_stub_config(stub_model))
    assert plan.family is STUB and plan.resolution == 256 and plan.model.prediction_type == "flow_matching"
    with pytest.raises(ConfigError) as e:
        check_run(_stub_config(stub_model, "sdxl.crop_conditioning=false", "lora.target_modules=[to_v]",
                               "lora.train_text_encoder=true", "lora.text_encoder_target_modules=[q_proj]"))
    problems = "\n".join(e.value.problems)
    assert f"sdxl.crop_conditioning: an SDXL-only option, but {stub_model} is an Stub-1 model" in problems
    assert "lora.target_modules: no transformer module is named 'to_v'" in problems
    assert "lora.text_encoder_target_modules: the Stub-1 text encoders have no module 'q_proj'; choose from k, o, q, v" \
        in problems


def test_a_registered_family_is_offered_by_the_cli(stub_model, capsys, tmp_path):
    assert main(["train", str(ROOT / "recipes" / "tiny_cpu.yaml"), f"model.pretrained={stub_model}",
                 f"data.instance_dir={DEMO_DATA}", "lora.target_modules=[to_q]", f"train.output_dir={tmp_path / 'out'}",
                 "prior.enabled=false", "--dry-run"]) == 0
    assert f"ok: {stub_model} is stub (Stub-1, flow_matching), 8 instance images at 64 px" in capsys.readouterr().out
    # the stub's encoder has a vocabulary of its own: the shipped CLIP one cannot answer for it
    assert main(["check-token", "ohwx", "--family", "stub"]) == 2
    assert "--family: T5 does not use CLIP's vocabulary" in capsys.readouterr().err


def test_a_model_no_family_knows_is_one_clear_error(tmp_path):
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FancyPipeline", "transformer": []}))
    with pytest.raises(ConfigError, match="is a FancyPipeline that sdtune does not know how to train"):
        check_run(_stub_config(folder))


# --------------------------------------------------------------------------------------------------------
# Objectives: the step asks the objective, so a flow-matching one fits without a change in the loop


@dataclass
class FlowMatching:
    """Rectified flow as SD3 and FLUX train: x_t = (1 - s) x + s n, target n - x; timesteps = 1000 s."""

    def sample(self, latents, generator):
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = torch.rand(latents.shape[0], generator=generator)
        return noise, sigmas * 1000

    def add_noise(self, latents, noise, timesteps):
        s = (timesteps / 1000).view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def loss_weights(self, timesteps):
        return None


def test_training_step_takes_any_objective(tiny_model):
    family = families.get("sd15")
    c = load_components(str(tiny_model("sd15")), family)
    add_lora(c.denoiser, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = {"encoder_hidden_states": torch.randn(2, 77, 32)}
    ddpm = DiffusionObjective(c.noise_scheduler, "epsilon")
    flow = FlowMatching()
    a = training_step(c.denoiser, family, ddpm, latents, conditioning, torch.Generator().manual_seed(1))
    b = training_step(c.denoiser, family, flow, latents, conditioning, torch.Generator().manual_seed(1))
    assert torch.isfinite(a.loss) and torch.isfinite(b.loss) and a.loss != b.loss
    b.loss.backward()
    assert all(p.grad is not None for n, p in c.denoiser.named_parameters() if "lora_A" in n)


def test_diffusion_objective_targets_and_min_snr_weights(tiny_model):
    scheduler = load_components(str(tiny_model("sd2")), families.get("sd2")).noise_scheduler
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = DiffusionObjective(scheduler, "epsilon", snr_gamma=5.0)
    v = DiffusionObjective(scheduler, "v_prediction", snr_gamma=5.0)
    noise, timesteps = eps.sample(latents, torch.Generator().manual_seed(2))
    assert torch.equal(eps.target(latents, noise, timesteps), noise)
    assert torch.allclose(v.target(latents, noise, timesteps), scheduler.get_velocity(latents, noise, timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    assert torch.allclose(eps.loss_weights(timesteps), snr.clamp(max=5.0) / snr, rtol=1e-4)
    assert torch.allclose(v.loss_weights(timesteps), snr.clamp(max=5.0) / (snr + 1), rtol=1e-4)
    assert DiffusionObjective(scheduler, "epsilon").loss_weights(timesteps) is None
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="unsupported prediction type 'sample'"):
        DiffusionObjective(scheduler, "sample")


def test_options_of_a_family_registered_too_late_are_an_error_not_ignored(stub_model):
    from dataclasses import replace

    from pydantic import BaseModel

    from sdtune.errors import SdtuneError

    class StubOptions(BaseModel):
        guidance: float = 3.5

    late = replace(STUB, options_section="stub", options=StubOptions)
    cfg = _stub_config(stub_model)
    assert cfg.family_options(STUB) is None and cfg.family_options(families.get("sdxl")) == cfg.sdxl
    with pytest.raises(SdtuneError, match="registered after sdtune.config was imported"):
        cfg.family_options(late)
