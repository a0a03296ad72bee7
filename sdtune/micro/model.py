"""The micro model: a Stable-Diffusion-1.x-shaped text-to-image model small enough to train and run on a CPU.

It is a standard diffusers ``StableDiffusionPipeline`` (``AutoencoderKL``, ``UNet2DConditionModel``, a CLIP
text encoder with the real CLIP tokenizer, a scheduler, ``model_index.json``), so everything in sdtune (and
any diffusers code) treats it as an SD1.x model: ``inspect_model`` reads family ``sd15``, 64 px native.

Shapes (why these):
- 64 x 64 RGB images, a VAE with a 4x downscale -> latents (4, 16, 16). A flat-coloured world compresses
  easily, and 16 x 16 latents make the UNet cheap enough for an hour of CPU pretraining.
- UNet at 16 -> 8 -> 4 latents with cross-attention at 8 and 4 (and in the mid block): the background
  colour is a global property, so the text must reach the coarse levels.
- Text encoder: CLIP architecture, 32 wide (its 49,408-row token table is most of its size), 2 layers, the
  full 49,408-token vocabulary (so ``sks`` is the same rare token id 48136 as in real CLIP, and the
  identifier lessons carry over). Its weights are saved with canonical keys (``text_model.``,
  ``sdtune.layout``), which transformers 4.x and 5.x and ComfyUI all read.
- Noise schedule: the cosine schedule of Nichol & Dhariwal (``squaredcos_cap_v2``), made for small images,
  with v-prediction and "trailing" sampling steps (Lin et al. 2023, "Common diffusion noise schedules and
  sample steps are flawed"). SD's scaled-linear schedule leaves ~7% of the signal at its last step: at
  16 x 16 the mean of pure noise is as large as that leak, so the seed, not the prompt, picks the background.
  DDPM's linear schedule ends clean but spends most timesteps on almost pure noise (a first run with it
  learned the prompts only weakly in 1,000 steps). The cosine schedule ends at ~0 signal, where predicting
  the noise is ill-posed; v-prediction is not, and the sampler starts at the last training step.
"""

from __future__ import annotations

import copy
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.families import Components, Family
from sdtune.layout import canonical_text_encoder_folder
from sdtune.tokens import clip_tokenizer, write_clip_tokenizer_files

RESOLUTION = 64
VAE_FACTOR = 4
LATENT_SIZE = RESOLUTION // VAE_FACTOR
TEXT_WIDTH = 32
FAMILY = "sd15"  # an SD1.x-shaped pipeline: everything in sdtune treats it as one


def family() -> Family:
    """The model family of the micro model."""
    return families.get(FAMILY)

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                timestep_spacing="trailing")


def vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 64),  # 3 blocks = 2 downsamples = 4x; thin at 64 px, where it costs most
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the latents' standard deviation after the VAE is trained
    )


def unet_config(width: int = 48) -> dict[str, Any]:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
    )


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def noise_scheduler():
    """The training (forward-process) scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def sampling_scheduler():
    """The scheduler saved with the model: DPM-Solver++ draws this world well in ~20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE)


def build(seed: int = 0, unet_width: int = 48):
    """Freshly initialised (tokenizer, text_encoder, vae, unet) with the micro shapes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return (clip_tokenizer(), CLIPTextModel(text_config()), AutoencoderKL(**vae_config()),
            UNet2DConditionModel(**unet_config(unet_width)))


def pipeline(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any) -> Any:
    """A ``StableDiffusionPipeline`` around the given modules (no copies), with the sampling scheduler."""
    parts = Components(tokenizers=[tokenizer], text_encoders=[text_encoder], vae=vae, denoiser=unet,
                       noise_scheduler=noise_scheduler())
    return family().pipeline(parts, scheduler=sampling_scheduler())


def save_pipeline(directory: str | Path, tokenizer: Any, text_encoder: Any, vae: Any, unet: Any,
                  dtype: str = "fp16") -> Path:
    """Write the model as a diffusers pipeline folder (safetensors), weights in ``dtype``; the modules passed
    in are not changed (fp16 copies are saved)."""
    import torch

    if dtype == "fp16":
        text_encoder, vae, unet = (copy.deepcopy(m).to(torch.float16) for m in (text_encoder, vae, unet))
    directory = Path(directory)
    pipeline(tokenizer, text_encoder, vae, unet).save_pretrained(directory, safe_serialization=True)
    write_clip_tokenizer_files(directory / "tokenizer")
    canonical_text_encoder(directory)
    load_in_float32(directory)
    return directory


def load_in_float32(directory: str | Path) -> None:
    """Make the text encoder's ``config.json`` say ``"dtype": "float32"``, in place (the weight files are not
    touched): what a plain ``StableDiffusionPipeline.from_pretrained(directory)`` then loads in every part."""
    # transformers 5 loads a model at its config's dtype ("float16" as saved from fp16 weights; with no dtype
    # key, at the weights' dtype), while diffusers loads the UNet and VAE in fp32: the text encoder's fp16
    # encoder_hidden_states then met fp32 UNet weights ("mat1 and mat2 must have the same dtype").
    path = Path(directory) / family().text_encoders[0].name / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("dtype") != "float32":
        path.write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def canonical_text_encoder(directory: str | Path) -> None:
    """Give the text encoder's weight file the canonical keys (``text_model.``, ``sdtune.layout``) that every
    transformers version reads, in place (headers only: the tensors stay bitwise the same)."""
    spec = family().text_encoders[0]
    canonical_text_encoder_folder(Path(directory) / spec.name, spec.model_class)


# --------------------------------------------------------------------------------------------------------
# The shipped weights: package data without the tokenizer files (4.5 MB that the shipped BPE merges rebuild)

SHIPPED_PARTS = ("model_index.json", "scheduler", "text_encoder", "unet", "vae", "pretrain_report.json")


def shipped_dir() -> Path:
    """Where the shipped weights live in the installed package."""
    return Path(str(resources.files("sdtune").joinpath("assets", "micro")))


def _copy_parts(source: Path, target: Path) -> None:
    """Copy SHIPPED_PARTS of a model folder (weights, configs, report; not the tokenizer) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for part in SHIPPED_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part)
        elif (source / part).is_file():
            shutil.copy2(source / part, target / part)


def ship(model_dir: str | Path, target: str | Path | None = None) -> Path:
    """Copy a pretrained micro model's weights and configs (not its tokenizer) into the package data."""
    target = Path(target) if target else shipped_dir()
    if target.exists():
        shutil.rmtree(target)
    _copy_parts(Path(model_dir), target)
    canonical_text_encoder(target)  # a model folder from an older sdtune may hold flat keys
    load_in_float32(target)  # ... or an fp16 dtype in its text encoder's config
    return target


def write_model(directory: str | Path, source: str | Path | None = None) -> Path:
    """Write the shipped micro model as a complete diffusers pipeline folder (tokenizer included)."""
    source = Path(source) if source else shipped_dir()
    if not (source / "model_index.json").is_file():
        raise SdtuneError(f"no micro model weights in {source}; train them with `sdtune micro pretrain DIR`")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SdtuneError(f"{directory} exists and is not empty; choose a new folder")
    _copy_parts(source, directory)
    canonical_text_encoder(directory)  # weights shipped by an older sdtune may hold flat keys
    load_in_float32(directory)
    clip_tokenizer().save_pretrained(directory / "tokenizer")
    write_clip_tokenizer_files(directory / "tokenizer")
    return directory
