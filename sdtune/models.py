"""Stable Diffusion models: read what a model is, load its parts, and build random ones for tests.

A model is any diffusers-format pipeline folder or Hugging Face hub id (SD1.x, SD2.x, SDXL). Its family,
prediction type and native resolution are read from the model's own config files, never guessed from its
name, and without loading any weights (so config errors can be reported first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdtune.errors import SdtuneError

Family = Literal["sd15", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl")
FAMILY_NAMES = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class ModelInfo:
    """What a base model is, read from its config files."""

    pretrained: str
    family: Family
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # native image size: unet.sample_size * VAE downscale factor
    pipeline_class: str


@dataclass
class Components:
    """The loaded parts of a pipeline. ``tokenizer_2``/``text_encoder_2`` exist for SDXL only."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


# --------------------------------------------------------------------------------------------------------
# Reading a model


def read_model_file(pretrained: str, filename: str, revision: str | None) -> dict:
    local = Path(pretrained).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise SdtuneError(
                f"model.pretrained: {pretrained} has no {filename}; "
                "fix: point it at a diffusers-format pipeline folder (one with model_index.json)"
            )
    else:
        if local.exists() or pretrained.count("/") != 1 or pretrained.startswith((".", "/", "~")):
            raise SdtuneError(
                f"model.pretrained: '{pretrained}' is neither a local model folder nor a hub id like "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5'; fix the path"
            )
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(pretrained, filename, revision=revision))
        except Exception as e:  # offline, missing repo, gated repo, bad revision: all one user error
            raise SdtuneError(
                f"model.pretrained: could not get {filename} of '{pretrained}' (no local folder by that name, "
                f"and the hub said: {type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "fix: check the id, run `hf auth login` for gated models, or point at a local folder"
            ) from None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"model.pretrained: cannot read {path}: {e}") from None


def inspect_model(pretrained: str, revision: str | None = None, for_training: bool = True) -> ModelInfo:
    """Family, prediction type and native resolution of a model, from config files only.

    ``for_training`` refuses inpainting / depth UNets (more than 4 input channels), which sampling accepts."""
    index = read_model_file(pretrained, "model_index.json", revision)
    unet = read_model_file(pretrained, "unet/config.json", revision)
    vae = read_model_file(pretrained, "vae/config.json", revision)
    scheduler = read_model_file(pretrained, "scheduler/scheduler_config.json", revision)

    if for_training and unet.get("in_channels", 4) != 4:
        raise SdtuneError(
            f"model.pretrained: {pretrained} is a {index.get('_class_name')} whose UNet takes "
            f"{unet.get('in_channels')} input channels (inpainting or depth model); sdtune trains "
            "text-to-image models: use the base text-to-image checkpoint"
        )
    # SDXL is the only family with the "text_time" micro-conditioning; SD2 is the only SD1/2-style UNet with
    # linear projections in its transformer blocks (and OpenCLIP-H, 1024-wide, cross-attention).
    if unet.get("addition_embed_type") == "text_time":
        family: Family = "sdxl"
    elif unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        family = "sd2"
    else:
        family = "sd15"
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, list):
        sample_size = sample_size[0]
    return ModelInfo(
        pretrained=pretrained,
        family=family,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        resolution=int(sample_size) * vae_scale,
        pipeline_class=index.get("_class_name", "?"),
    )


# --------------------------------------------------------------------------------------------------------
# Loading a model


def load_components(
    pretrained: str,
    family: Family,
    revision: str | None = None,
    variant: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and a DDPM noise scheduler.

    Weights load from safetensors only, unless ``allow_unsafe_pickle``: then .bin files are accepted too,
    and diffusers / transformers read them with torch's ``weights_only`` unpickler. Never remote code."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(pretrained).expanduser()
    if local.is_dir() and not allow_unsafe_pickle:
        pickles = [p for p in local.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
        if pickles and not any(local.rglob("*.safetensors")):
            raise SdtuneError(
                f"model.pretrained: {pretrained} has only pickle weights ({pickles[0].name}); sdtune loads "
                "safetensors. Convert them, or set model.allow_unsafe_pickle=true (loaded with weights_only)"
            )
    kw = dict(revision=revision)
    wkw = dict(revision=revision, variant=variant, use_safetensors=None if allow_unsafe_pickle else True)
    try:
        c = Components(
            tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **wkw),
            vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **wkw),
            unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **wkw),
            # Training always adds noise with the DDPM forward process; the model's own (sampling)
            # scheduler config carries betas and prediction_type.
            noise_scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw),
        )
        if family == "sdxl":
            c.tokenizer_2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw)
            c.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", **wkw
            )
    except (OSError, ValueError) as e:  # missing files, or pickle weights where safetensors are required
        raise SdtuneError(
            f"model.pretrained: could not load {pretrained}"
            f"{f' (variant {variant})' if variant else ''}: {str(e).splitlines()[0][:200]}"
        ) from None
    return c


def build_pipeline(components: Components, family: Family, scheduler: Any = None):
    """A text-to-image diffusers pipeline around already-loaded modules (no second copy of any weight)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler if scheduler is not None else components.noise_scheduler
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------------------
# Random models: the real classes with tiny (tests, demo) or real (benchmarks) shapes


def _text_config(width: int, layers: int, heads: int, mlp: int, act: str, projection_dim: int, pad_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_id,
    )


def _random_configs(family: Family, size: str) -> dict[str, Any]:
    """UNet / VAE / text-encoder constructor arguments for one family and size."""
    sdxl = family == "sdxl"
    if size == "tiny":
        unet: dict[str, Any] = dict(
            sample_size=8,  # 8 latents x VAE factor 8 = 64 px native resolution
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
        )
        if sdxl:
            unet.update(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 1),
                cross_attention_dim=64,  # te1 width 32 + te2 width 32, concatenated
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids * 8 + pooled te2
            )
        else:
            unet.update(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=8 if family == "sd15" else (4, 8),
                cross_attention_dim=32,
            )
        vae = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
        te = dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)
        te_2 = dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)
    elif size == "full":
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        te = dict(width=768, layers=12, heads=12, mlp=3072, projection_dim=768)  # CLIP ViT-L/14
        te_2 = dict(width=1280, layers=32, heads=20, mlp=5120, projection_dim=1280)  # OpenCLIP bigG
        if family == "sd15":
            unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            vae["sample_size"] = 512
        elif family == "sd2":
            unet = dict(
                sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            )
            vae["sample_size"] = 768
            te = dict(width=1024, layers=23, heads=16, mlp=4096, projection_dim=512)  # OpenCLIP-H, last layer cut
        else:
            unet = dict(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae["sample_size"] = 1024
    else:
        raise SdtuneError(f"--size: unknown size '{size}'; choose tiny or full")
    if family == "sd2":
        unet["use_linear_projection"] = True
    vae.update(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(vae["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(vae["block_out_channels"]),
        scaling_factor=0.13025 if sdxl else 0.18215,
        force_upcast=sdxl,  # the SDXL VAE overflows in fp16
    )
    return dict(unet=unet, vae=vae, te=te, te_2=te_2)


def _scheduler(family: Family):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    # The schedulers the real checkpoints ship: PNDM (SD1.5), DDIM v-prediction (SD2 768-v), Euler (SDXL).
    if family == "sd15":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if family == "sd2":
        return DDIMScheduler(
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common
        )
    return EulerDiscreteScheduler(timestep_spacing="leading", **common)


def write_random_model(
    directory: str | Path, family: str, size: str = "tiny", seed: int = 0, dtype: str = "fp32"
) -> Path:
    """Write a randomly initialised diffusers pipeline with the real CLIP tokenizer(s); return its folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.tokens import EOS_TOKEN, clip_tokenizer, write_clip_tokenizer_files

    if family not in FAMILIES:
        raise SdtuneError(f"--family: unknown family '{family}'; choose one of {', '.join(FAMILIES)}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise SdtuneError(f"--dtype: unknown dtype '{dtype}'; choose fp32, fp16 or bf16")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SdtuneError(f"{directory} exists and is not empty; choose a new folder")
    cfg = _random_configs(family, size)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    components = Components(
        tokenizer=clip_tokenizer(pad_token="!" if family == "sd2" else EOS_TOKEN),
        text_encoder=CLIPTextModel(
            _text_config(act="gelu" if family == "sd2" else "quick_gelu", pad_id=0 if family == "sd2" else 49407, **cfg["te"])
        ),
        vae=AutoencoderKL(**cfg["vae"]),
        unet=UNet2DConditionModel(**cfg["unet"]),
        noise_scheduler=_scheduler(family),  # type: ignore[arg-type]
    )
    if family == "sdxl":
        components.tokenizer_2 = clip_tokenizer(pad_token="!")
        components.text_encoder_2 = CLIPTextModelWithProjection(_text_config(act="gelu", pad_id=0, **cfg["te_2"]))
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = build_pipeline(components, family)  # type: ignore[arg-type]
    if torch_dtype != torch.float32:
        pipe.to(torch_dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Also the classic vocab.json + merges.txt, so older transformers (slow tokenizer) can read them too.
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        write_clip_tokenizer_files(directory / sub)
    return directory
