"""SDXL: SD with two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) and micro-conditioning.

The UNet also takes the second encoder's pooled, projected prompt embedding and six "time ids" per image:
its original size, the top-left corner of the crop, and the target size (Podell et al. 2023, sec. 2.2).
Its options live in the recipe section ``sdxl``.

The UNet reads CLIP-L's penultimate hidden states only, so a text-encoder LoRA (``lora.train_text_encoder``)
goes on every CLIP-L layer but the last (``TextEncoderSpec.unread_layers``): there it could not learn, and
DDP refuses a trained parameter without a gradient. OpenCLIP's last layer feeds the pooled embedding: it
keeps its LoRA.

torch, diffusers and transformers are imported inside the methods that use them (see ``families.sd``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdtune.errors import SdtuneError
from sdtune.families.base import KohyaVersion, ModelFiles, OriginalLayout, TextEncoderSpec
from sdtune.families.sd import IMPL_SGM, StableDiffusion, has_text_time, vae_config
from sdtune.tokens import EOS_TOKEN


class SDXLOptions(BaseModel):
    """Options that exist only for SDXL models (recipe section ``sdxl``); setting one for a model of another
    family is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_conditioning: bool = Field(True, description="pass each crop's top-left corner as micro-conditioning")
    train_text_encoder_2: bool = Field(True, description="with lora.train_text_encoder, also train encoder 2")


def time_ids(geometry: Any, crop_conditioning: bool) -> Any:
    """SDXL micro-conditioning from a batch's ``geometry`` (B, 6), original (h, w) + crop top-left (y, x) +
    target (h, w), on its device; without crop conditioning the crop is (0, 0). The target is the size each
    example was cropped to: (resolution, resolution), or its aspect bucket's."""
    import torch

    if crop_conditioning:
        return geometry
    return torch.cat([geometry[:, :2], torch.zeros_like(geometry[:, 2:4]), geometry[:, 4:]], dim=1)


@dataclass(frozen=True)
class StableDiffusionXL(StableDiffusion):
    """SDXL base 1.0 and the checkpoints fine-tuned from it."""

    options_section: str | None = "sdxl"
    options: type | None = SDXLOptions
    lora_pipeline: str = "StableDiffusionXLPipeline"
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_tags: tuple[str, ...] = ("stable-diffusion-xl",)
    # CLIP-L and OpenCLIP-bigG are lora_te1_ and lora_te2_ in every loader
    kohya_prefixes: dict[str, str] = field(
        default_factory=lambda: {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    )
    original_layout: OriginalLayout | None = OriginalLayout(
        resolutions={"epsilon": 1024, "v_prediction": 1024}, micro_conditioning=True, vae_scaling_factor=0.13025,
        vae_force_upcast=True)

    def detect(self, files: ModelFiles) -> bool:
        return "unet" in files.read("model_index.json") and has_text_time(files.read("unet/config.json"))

    def random_configs(self, size: str) -> dict[str, Any]:
        if size == "tiny":
            unet: dict[str, Any] = dict(
                sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
                cross_attention_dim=64,  # te1 width 32 + te2 width 32, concatenated
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids * 8 + pooled te2
            )
            vae_size, vae_blocks, layers, groups = 64, (8, 16, 16, 16), 1, 4
            encoders = [dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)] * 2
        elif size == "full":
            unet = dict(
                sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae_size, vae_blocks, layers, groups = 1024, (128, 256, 512, 512), 2, 32
            encoders = [dict(width=768, layers=12, heads=12, mlp=3072, projection_dim=768),  # CLIP ViT-L/14
                        dict(width=1280, layers=32, heads=20, mlp=5120, projection_dim=1280)]  # OpenCLIP bigG
        else:
            raise SdtuneError(f"--size: unknown size '{size}'; choose tiny or full")
        # the SDXL VAE overflows in fp16, so it asks to be kept in fp32 (force_upcast)
        vae = vae_config(vae_blocks, layers, groups, vae_size, 0.13025, True)
        return dict(unet=unet, vae=vae, text_encoders=encoders)

    def random_scheduler(self) -> Any:
        """Euler, as SDXL base 1.0 ships."""
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")

    def encode_prompt(self, text_encoders: list[Any], input_ids: list[Any]) -> dict[str, Any]:
        import torch

        # Penultimate hidden states of both encoders side by side, (B, 77, 768 + 1280 = 2048), and the
        # projected pooled output of the second one, (B, 1280): what StableDiffusionXLPipeline computes.
        outs = [encoder(ids, output_hidden_states=True, return_dict=True) for encoder, ids in zip(text_encoders, input_ids)]
        return {"encoder_hidden_states": torch.cat([out.hidden_states[-2] for out in outs], dim=-1),
                "pooled": outs[-1].text_embeds}

    def conditioning(self, prompt_embeds: dict[str, Any], batch: dict, options: Any, device: Any,
                     dtype: Any) -> dict[str, Any]:
        ids = time_ids(batch["geometry"].to(device, dtype, non_blocking=True), options.crop_conditioning)
        return {"encoder_hidden_states": prompt_embeds["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": prompt_embeds["pooled"], "time_ids": ids}}

    def trained_text_encoders(self, options: Any) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if options.train_text_encoder_2 else ("text_encoder",)

    def kohya_version(self, prediction_type: str) -> KohyaVersion:
        # kohya sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0; AUTOMATIC1111 (extensions-builtin/Lora/network.py
        # NetworkOnDisk.detect_version) files a LoRA as SDXL when ss_base_model_version starts with "sdxl_"
        return KohyaVersion("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", IMPL_SGM, 1024)

    def kohya_warnings(self, modules: dict[str, list[str]]) -> list[str]:
        warnings = super().kohya_warnings(modules)
        # A1111's convert_diffusers_name_to_compvis assumes SD1's layout for upsamplers (output_blocks.2.1.conv;
        # SDXL's is .2.2) and has no rule for add_embedding (SGM label_emb)
        odd = [m for m in modules.get("unet", []) if m.startswith(("up_blocks.0.upsamplers", "add_embedding"))]
        if odd:
            warnings.insert(0, f"AUTOMATIC1111 cannot place SDXL LoRA modules such as {odd[0]}; ComfyUI can")
        return warnings

    def recognises_lora(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return (any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
                or "sdxl" in metadata.get("ss_base_model_version", ""))


SDXL = StableDiffusionXL(
    name="sdxl", label="SDXL", default_resolution=1024,
    text_encoders=(
        # encode_prompt reads CLIP-L's penultimate hidden states only, so its last layer never matters;
        # OpenCLIP's last layer does, through the pooled text_embeds
        TextEncoderSpec("text_encoder", "CLIP ViT-L/14", EOS_TOKEN, unread_layers=1),
        TextEncoderSpec("text_encoder_2", "OpenCLIP ViT-bigG/14", "!", openclip=True,
                        model_class="CLIPTextModelWithProjection", embedding_key="clip_g"),
    ),
)
