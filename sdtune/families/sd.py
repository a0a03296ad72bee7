"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, the DDPM forward process.

SD2.x is SD1.x with OpenCLIP-H (1024 wide, padding with "!"), linear projections in the UNet's transformer
blocks, and for the 768 px models v-prediction: one class, two instances (``SD15``, ``SD2``). SDXL extends
the class (``sdtune.families.sdxl``).

torch, diffusers, transformers and accelerate are imported inside the methods that use them: the command
line reads the families (``--family`` choices) without paying for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.families.base import (
    Components,
    KohyaModule,
    KohyaVersion,
    MemoryConstants,
    ModelFiles,
    ModelInfo,
    OriginalLayout,
    SamplingDefaults,
    TextEncoderSpec,
    clip_skip_problem,
    empty_module_names,
    load_kwargs,
)
from sdtune.objectives import DiffusionObjective
from sdtune.tokens import EOS_TOKEN, clip_tokenizer

CLIP_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"})
# Stability's reference implementation, named in ModelSpec metadata (kohya's sai_model_spec.py)
IMPL_SGM = "https://github.com/Stability-AI/generative-models"


def clip_text_config(width: int, layers: int, heads: int, mlp: int, projection_dim: int, openclip: bool) -> Any:
    """A ``CLIPTextConfig`` with the real 49,408-token vocabulary (OpenCLIP: gelu, pads with "!" = id 0)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if openclip else 49407,
    )


def vae_config(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int,
               scaling_factor: float, force_upcast: bool) -> dict[str, Any]:
    """``AutoencoderKL`` arguments of an SD-style VAE (4 latent channels, downscale 2 ** (blocks - 1))."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, sample_size=sample_size,
        scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def has_text_time(unet: dict) -> bool:
    """Whether a UNet config takes SDXL's "text_time" micro-conditioning (no SD1.x/2.x UNet does)."""
    return unet.get("addition_embed_type") == "text_time"


def is_sd2_unet(unet: dict) -> bool:
    """Whether an SD1/2-style UNet config is SD2's."""
    # SD2 is the only SD1/2-style UNet with linear projections in its transformer blocks (and OpenCLIP-H,
    # 1024-wide, cross-attention)
    return bool(unet.get("use_linear_projection")) or unet.get("cross_attention_dim") == 1024


@dataclass(frozen=True)
class StableDiffusion:
    """SD1.x (``v2=False``) and SD2.x (``v2=True``)."""

    name: str
    label: str
    default_resolution: int
    text_encoders: tuple[TextEncoderSpec, ...]
    v2: bool = False
    text_encoder_targets: frozenset[str] = CLIP_TARGETS
    lora_targets: tuple[str, ...] | None = None  # the recipe's default: the UNet's attention projections
    denoiser_name: str = "unet"
    options_section: str | None = None
    options: type | None = None
    lora_pipeline: str = "StableDiffusionPipeline"
    # no safety checker in a training tool's samples
    pipeline_kwargs: dict[str, Any] = field(
        default_factory=lambda: dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    )
    hub_tags: tuple[str, ...] = ("stable-diffusion",)
    lora_clients: tuple[str, ...] = ("ComfyUI", "AUTOMATIC1111", "Forge", "InvokeAI")
    kohya_prefixes: dict[str, str] = field(
        # kohya-ss sd-scripts' networks/lora.py names. SD1.x/SD2.x text encoders use lora_te_, the one prefix
        # all loaders take: InvokeAI patches them with prefix "lora_te_" only (invokeai/app/invocations/
        # compel.py); AUTOMATIC1111's convert_diffusers_name_to_compvis has rules for lora_te_ only
        # (lora_te1_ reaches an SD1 model through a fallback, an SD2 model not at all); ComfyUI
        # (comfy/lora.py model_lora_keys_clip) and diffusers take lora_te_ and lora_te1_ alike.
        default_factory=lambda: {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    )
    kohya_modules: tuple[KohyaModule, ...] = ()  # UNet modules keep their diffusers paths
    sampling: SamplingDefaults = SamplingDefaults()  # guidance 7.5, the user's --scheduler
    memory: MemoryConstants = MemoryConstants()
    original_layout: OriginalLayout | None = OriginalLayout(resolutions={"epsilon": 512}, attention_heads=8)
    max_sequence_length: int | None = None  # CLIP only: 77 tokens

    # ---------------------------------------------------------------------------------------------------
    # Reading a model

    def detect(self, files: ModelFiles) -> bool:
        if "unet" not in files.read("model_index.json"):
            return False
        unet = files.read("unet/config.json")
        return not has_text_time(unet) and is_sd2_unet(unet) == self.v2

    def describe(self, files: ModelFiles, for_training: bool) -> ModelInfo:
        index, unet = files.read("model_index.json"), files.read("unet/config.json")
        vae, scheduler = files.read("vae/config.json"), files.read("scheduler/scheduler_config.json")
        if for_training and unet.get("in_channels", 4) != 4:
            raise SdtuneError(
                f"model.pretrained: {files.pretrained} is a {index.get('_class_name')} whose UNet takes "
                f"{unet.get('in_channels')} input channels (inpainting or depth model); sdtune trains "
                "text-to-image models: use the base text-to-image checkpoint"
            )
        vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        sample_size = unet.get("sample_size", 64)
        if isinstance(sample_size, list):
            sample_size = sample_size[0]
        return ModelInfo(
            pretrained=files.pretrained, family=self, prediction_type=scheduler.get("prediction_type", "epsilon"),
            resolution=int(sample_size) * vae_scale,
            # each UNet downsampling halves the latents: sides must divide by the VAE factor x 2 per level
            # (64 for SD1.x/2.x, 32 for SDXL, 16 for the tiny test models)
            bucket_multiple=vae_scale * 2 ** (len(unet.get("down_block_types", [0] * 4)) - 1),
            pipeline_class=index.get("_class_name", "?"),
        )

    def denoiser_module_names(self, files: ModelFiles) -> list[str]:
        return empty_module_names("UNet2DConditionModel", files.read("unet/config.json"))

    def config_problems(self, cfg: Any) -> list[str]:
        return []  # every option works for SD

    def config_warnings(self, cfg: Any) -> list[str]:
        return []  # every option SD takes is used

    def model_option_problem(self, name: str, key: str) -> str | None:
        # SD1.x / SD2.x condition on one CLIP, whose layers clip skip picks; SDXL (a subclass) on fixed layers
        # of two, where kohya and AUTOMATIC1111 ignore it
        if name == "clip_skip" and len(self.text_encoders) > 1:
            return clip_skip_problem(self.label, key)
        return None

    # ---------------------------------------------------------------------------------------------------
    # Loading and building

    def load(self, pretrained: str, revision: str | None, variant: str | None, safetensors_only: bool,
             dtype: Any = None, tokenizers: list[Any] | None = None) -> Components:
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        kw: dict[str, Any] = dict(revision=revision)
        wkw: dict[str, Any] = dict(revision=revision, variant=variant, use_safetensors=True if safetensors_only else None)
        dkw, tkw = load_kwargs(dtype)  # the VAE loads as it is: its dtype depends on force_upcast
        tokenizers = tokenizers or [CLIPTokenizer.from_pretrained(pretrained, subfolder=spec.tokenizer_name, **kw)
                                    for spec in self.text_encoders]
        text_encoders = []
        for spec in self.text_encoders:
            model_class = getattr(transformers, spec.model_class)
            text_encoders.append(model_class.from_pretrained(pretrained, subfolder=spec.name, **wkw, **tkw))
        return Components(
            tokenizers=tokenizers, text_encoders=text_encoders,
            vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **wkw),
            denoiser=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **wkw, **dkw),
            # Training always adds noise with the DDPM forward process; the model's own (sampling) scheduler
            # config carries the betas and the prediction type.
            noise_scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw),
        )

    def pipeline(self, components: Components, scheduler: Any = None) -> Any:
        import diffusers

        modules: dict[str, Any] = {"vae": components.vae, self.denoiser_name: components.denoiser,
                                   "scheduler": scheduler if scheduler is not None else components.noise_scheduler}
        for spec, tokenizer, encoder in zip(self.text_encoders, components.tokenizers, components.text_encoders):
            modules[spec.name], modules[spec.tokenizer_name] = encoder, tokenizer
        return getattr(diffusers, self.lora_pipeline)(**modules, **self.pipeline_kwargs)

    def random_configs(self, size: str) -> dict[str, Any]:
        """Constructor arguments of a random model: ``unet``, ``vae``, ``text_encoders`` (one dict each)."""
        if size == "tiny":
            unet: dict[str, Any] = dict(
                sample_size=8,  # 8 latents x VAE factor 8 = 64 px native resolution
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(4, 8) if self.v2 else 8, cross_attention_dim=32,
            )
            vae = vae_config((8, 16, 16, 16), 1, 4, 64, 0.18215, False)
            te = dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)
        elif size == "full" and not self.v2:
            unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            vae = vae_config((128, 256, 512, 512), 2, 32, 512, 0.18215, False)
            te = dict(width=768, layers=12, heads=12, mlp=3072, projection_dim=768)  # CLIP ViT-L/14
        elif size == "full":
            unet = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))
            vae = vae_config((128, 256, 512, 512), 2, 32, 768, 0.18215, False)
            te = dict(width=1024, layers=23, heads=16, mlp=4096, projection_dim=512)  # OpenCLIP-H, last layer cut
        else:
            raise SdtuneError(f"--size: unknown size '{size}'; choose tiny or full")
        if self.v2:
            unet["use_linear_projection"] = True
        return dict(unet=unet, vae=vae, text_encoders=[te])

    def random_scheduler(self) -> Any:
        """The sampling scheduler the real checkpoints ship: PNDM (SD1.5), DDIM v-prediction (SD2 768-v)."""
        from diffusers import DDIMScheduler, PNDMScheduler

        common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1)
        if self.v2:
            return DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common)
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)

    def random_components(self, size: str) -> Components:
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cfg = self.random_configs(size)

        def encoder(i: int) -> Any:
            spec = self.text_encoders[i]
            return getattr(transformers, spec.model_class)(clip_text_config(**cfg["text_encoders"][i],
                                                                             openclip=spec.openclip))

        # Built in this order (first encoder, VAE, UNet, then the other encoders) so a seed gives the same
        # weights as the random models of earlier sdtune versions.
        first, vae, unet = encoder(0), AutoencoderKL(**cfg["vae"]), UNet2DConditionModel(**cfg["unet"])
        return Components(
            tokenizers=[clip_tokenizer(pad_token=spec.pad_token) for spec in self.text_encoders],
            text_encoders=[first, *(encoder(i) for i in range(1, len(self.text_encoders)))],
            vae=vae, denoiser=unet, noise_scheduler=self.random_scheduler(),
        )

    # ---------------------------------------------------------------------------------------------------
    # One training step

    def objective(self, noise_scheduler: Any, prediction_type: str, *, noise_offset: float = 0.0,
                  snr_gamma: float | None = None, options: Any = None) -> DiffusionObjective:
        return DiffusionObjective(noise_scheduler, prediction_type, noise_offset, snr_gamma)

    def tokenize(self, tokenizers: list[Any], captions: list[str]) -> list[Any]:
        # padded to the encoder's full context (77), as the pipelines and diffusers' training scripts do
        return [
            tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in tokenizers
        ]

    def encode_prompt(self, text_encoders: list[Any], input_ids: list[Any]) -> dict[str, Any]:
        # encoder_hidden_states: (B, 77, D), the last layer's hidden states, as StableDiffusionPipeline
        return {"encoder_hidden_states": text_encoders[0](input_ids[0], return_dict=True).last_hidden_state}

    def conditioning(self, prompt_embeds: dict[str, Any], batch: dict, options: Any, device: Any,
                     dtype: Any) -> dict[str, Any]:
        return {"encoder_hidden_states": prompt_embeds["encoder_hidden_states"]}

    def predict(self, denoiser: Any, noisy_latents: Any, timesteps: Any, conditioning: dict[str, Any]) -> Any:
        return denoiser(noisy_latents, timesteps, **conditioning, return_dict=False)[0]

    def trained_text_encoders(self, options: Any) -> tuple[str, ...]:
        return (self.text_encoders[0].name,)

    # ---------------------------------------------------------------------------------------------------
    # LoRA files

    def kohya_version(self, prediction_type: str) -> KohyaVersion:
        # kohya-ss sd-scripts library/model_util.py get_model_version_str_for_sd1_sd2 and sai_model_spec.py
        if not self.v2:
            return KohyaVersion("sd_v1", "stable-diffusion-v1", "diffusers", 512)
        if prediction_type == "v_prediction":
            return KohyaVersion("sd_v2_v", "stable-diffusion-v2-768-v", "diffusers", 768, v2=True)
        return KohyaVersion("sd_v2", "stable-diffusion-v2-512", "diffusers", 512, v2=True)

    def kohya_warnings(self, modules: dict[str, list[str]]) -> list[str]:
        # AUTOMATIC1111 (networks.py network_apply_weights) patches OpenCLIP's fused nn.MultiheadAttention only
        # when q, k, v and out LoRAs are all present; SD2's encoder and SDXL's encoder 2 are OpenCLIP there.
        warnings = []
        for spec in self.text_encoders:
            trained = {m.rsplit(".", 1)[-1] for m in modules.get(spec.name, []) if ".self_attn." in m}
            if spec.openclip and trained and trained != {"q_proj", "k_proj", "v_proj", "out_proj"}:
                warnings.append(
                    f"AUTOMATIC1111 ignores {spec.name} attention LoRAs unless q_proj, k_proj, v_proj and "
                    "out_proj are all trained (lora.text_encoder_target_modules)"
                )
        return warnings

    def recognises_lora(self, keys: list[str], metadata: dict[str, str]) -> bool:
        # Only kohya metadata tells SD1.x and SD2.x LoRAs apart (their keys are the same); a file without it
        # is left to the loader.
        version = metadata.get("ss_base_model_version", "")
        return version.startswith("sd_v2") if self.v2 else version == "sd_v1"


SD15 = StableDiffusion(
    name="sd15", label="SD1.x", default_resolution=512,
    text_encoders=(TextEncoderSpec("text_encoder", "CLIP ViT-L/14", EOS_TOKEN),),
)
SD2 = StableDiffusion(
    name="sd2", label="SD2.x", default_resolution=768, v2=True,
    original_layout=OriginalLayout(resolutions={"epsilon": 512, "v_prediction": 768}, assume_v=True,
                                   upcast_attention_v=True, text_layers_dropped=1),
    text_encoders=(TextEncoderSpec("text_encoder", "OpenCLIP ViT-H/14", "!", openclip=True,
                                   embedding_key="clip_h"),),
)
