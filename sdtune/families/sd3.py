"""Stable Diffusion 3 / 3.5: a rectified-flow MMDiT conditioned on two CLIPs and T5-XXL.

What differs from FLUX.1 (``families.flux``), whose structure this follows: the denoiser is
``SD3Transformer2DModel``, which patchifies the latents itself (no packing, no position ids, no guidance
input: SD3 is not guidance-distilled and samples with classifier-free guidance) and takes the raw scheduler
timesteps in (0, 1000]; three text encoders, as ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G
(both ``CLIPTextModelWithProjection``) give their penultimate hidden states, side by side (B, 77, 768 + 1280)
and zero-padded to T5's width (B, 77, 4096), then T5's last hidden states (B, 256, 4096) follow on the
sequence axis: (B, 333, 4096); the pooled input is both CLIPs' projected pooled outputs (B, 768 + 1280 = 2048).
Training is flow matching (``sdtune.objectives.FlowMatchingObjective``) on the model's own scheduler (shift 3.0
for SD3 and SD3.5), timesteps drawn logit-normal, as diffusers' ``examples/dreambooth/
train_dreambooth_lora_sd3.py``. That script's ``--precondition_outputs`` (on by default there: EDM-style, the
loss on the predicted clean latents ``noisy_latents - sigma * model_pred`` against ``latents``, which is the flow
loss weighted by sigma ** 2 per example) is ``sd3.precondition_outputs``, off by default: sdtune trains the plain
flow-matching loss, as the FLUX script does, unless asked.

kohya LoRA files (what ComfyUI loads) use the original MMDiT's module names, as kohya sd-scripts'
``networks/lora_sd3.py`` writes them, with q, k, v fused into each stream's qkv (``KOHYA_MODULES``;
``sdtune.export`` fuses the LoRAs). diffusers' SD3 loader cannot read them back (it has no kohya converter):
``sdtune sample`` uses the run's diffusers file.

A LoHa / LoKr (``lora.type``) is written with SimpleTuner's LyCORIS names (``sdtune.export.lycoris_module_name``).

Pivotal tuning trains both CLIPs' and T5's rows (``clip_l``, ``clip_g``, ``t5``).

Single files in Stability's layout (``sd3.5_medium.safetensors`` and fine-tunes shared like it: the MMDiT, often
with a VAE and text encoders) load as ``model.pretrained`` beside ``model.base``, the SD3.x diffusers model whose
text encoders, tokenizers and scheduler go with them (``sdtune.sd3_file``; ``load(denoiser=...)``).

Not yet: noise offset and min-SNR (DDPM
notions), clip skip (``model_option_problem``: ``sdtune.plan`` and ``sdtune sample`` ask it), a model without T5, a memory
estimate calibrated for SD3 (SD's constants are used); ``config_problems`` refuses each such key in one line.

torch, diffusers and transformers are imported inside the methods that use them (see ``families.sd``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

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
    load_text_encoder,
)
from sdtune.families.flow import FlowOptions, flow_config_problems, flow_objective, prediction_type_problem
from sdtune.families.sd import CLIP_TARGETS, clip_text_config
from sdtune.families.t5 import t5_config, tiny_t5_tokenizer
from sdtune.objectives import FlowMatchingObjective
from sdtune.tokens import EOS_TOKEN, clip_tokenizer

# diffusers' SD3Transformer2DModel joint blocks as diffusers-format LoRA keys spell them, and kohya / SAI's
LORA_KEY_MARKS = ("transformer.transformer_blocks.", "lora_unet_joint_blocks_", "lycoris_transformer_blocks_")
# what only FLUX.1 LoRAs have: both families' joint blocks are transformer_blocks.N.attn.* in diffusers keys
FLUX_KEY_MARKS = ("transformer.single_transformer_blocks.", "lora_unet_double_blocks_", "lora_unet_single_blocks_",
                  "lycoris_single_transformer_blocks_")
# the LoRA targets when the recipe names none, as diffusers' SD3 script trains by default: the attention
# projections of the joint blocks, image and text streams. "attn." keeps SD3.5 Medium's second, image-only
# attention (attn2, MMDiT-X) out, as that script does; the last block has no to_add_out (its text stream ends)
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out")
# kohya-ss sd-scripts networks/lora_sd3.py: lora_unet_ for the MMDiT ("make ComfyUI compatible"), lora_te1_ /
# lora_te2_ for CLIP-L / CLIP-G (T5 would be lora_te3_; sdtune never trains it)
KOHYA_PREFIXES = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _kohya(name: str, *members: str, swapped_halves_at: int = 0) -> KohyaModule:
    return KohyaModule(name, members, swapped_halves_at=swapped_halves_at)


def _qkv(attn: str, q: str, k: str, v: str) -> tuple[str, str, str]:
    return (f"{_BLOCK}.{attn}.{q}", f"{_BLOCK}.{attn}.{k}", f"{_BLOCK}.{attn}.{v}")


# The original MMDiT's names (Stability's sd3 code, kohya's library/sd3_models.py, ComfyUI's mmdit.py) for
# diffusers' SD3Transformer2DModel modules, as ComfyUI maps diffusers keys to them (comfy/utils.py
# MMDIT_MAP_BLOCK, mmdit_to_diffusers): each joint block is an x_block (image stream) and a context_block (text
# stream), each with attn.qkv (q, k, v fused: out = 3 x dim), attn.proj, mlp.fc1, mlp.fc2 and
# adaLN_modulation.1; SD3.5 Medium's first blocks add x_block.attn2 (MMDiT-X). A kohya key is "lora_unet_" +
# the original weight's name with dots as underscores, which ComfyUI's model_lora_keys_unet maps onto that
# whole weight. The last block's context_block is pre-only (no proj, no MLP) and its adaLN gives (shift,
# scale) where diffusers' norm1_context (AdaLayerNormContinuous) gives (scale, shift): its out is 2 x dim, the
# other blocks' 6 x dim, so swapped_halves_at=2 swaps only the last block's (ComfyUI: swap_scale_shift there).
# The embedders and the final layer are left out: export refuses them.
_BLOCK = "transformer_blocks.{i}"
KOHYA_MODULES = (
    _kohya("joint_blocks_{i}_x_block_attn_qkv", *_qkv("attn", "to_q", "to_k", "to_v")),
    _kohya("joint_blocks_{i}_x_block_attn_proj", f"{_BLOCK}.attn.to_out.0"),
    _kohya("joint_blocks_{i}_context_block_attn_qkv", *_qkv("attn", "add_q_proj", "add_k_proj", "add_v_proj")),
    _kohya("joint_blocks_{i}_context_block_attn_proj", f"{_BLOCK}.attn.to_add_out"),
    _kohya("joint_blocks_{i}_x_block_attn2_qkv", *_qkv("attn2", "to_q", "to_k", "to_v")),
    _kohya("joint_blocks_{i}_x_block_attn2_proj", f"{_BLOCK}.attn2.to_out.0"),
    _kohya("joint_blocks_{i}_x_block_mlp_fc1", f"{_BLOCK}.ff.net.0.proj"),
    _kohya("joint_blocks_{i}_x_block_mlp_fc2", f"{_BLOCK}.ff.net.2"),
    _kohya("joint_blocks_{i}_context_block_mlp_fc1", f"{_BLOCK}.ff_context.net.0.proj"),
    _kohya("joint_blocks_{i}_context_block_mlp_fc2", f"{_BLOCK}.ff_context.net.2"),
    _kohya("joint_blocks_{i}_x_block_adaLN_modulation_1", f"{_BLOCK}.norm1.linear"),
    _kohya("joint_blocks_{i}_context_block_adaLN_modulation_1", f"{_BLOCK}.norm1_context.linear",
           swapped_halves_at=2),
)
# kohya-ss sd-scripts library/sd3_utils.py analyze_state_dict_state: the model type it derives from the weights
# (QK-norm: SD3.5; with attn2 layers: 3.5 Medium), which train_network.py writes as ss_base_model_version and
# sai_model_spec.py as ModelSpec's architecture "stable-diffusion-3-" + it (+ "/lora")
KOHYA_VARIANTS = {"medium": "stable-diffusion-3-medium", "5-medium": "stable-diffusion-3-5-medium",
                  "5-large": "stable-diffusion-3-5-large"}


class SD3Options(FlowOptions):
    """Options that exist only for SD3 models (recipe section ``sd3``): how timesteps are drawn, and the
    loss's preconditioning."""

    precondition_outputs: bool = Field(
        False, description="EDM output preconditioning, on by default in diffusers' train_dreambooth_lora_sd3.py: "
        "the loss on the predicted clean latents, i.e. the flow loss weighted by sigma**2 (less weight on the "
        "noisiest timesteps); off: the plain flow-matching loss, as FLUX trains")


@dataclass(frozen=True)
class SD3:
    """Stable Diffusion 3 Medium, 3.5 Medium / Large / Large Turbo (and their fine-tunes) in diffusers' layout."""

    name: str = "sd3"
    label: str = "SD3.x"
    default_resolution: int = 1024
    text_encoders: tuple[TextEncoderSpec, ...] = (
        TextEncoderSpec("text_encoder", "CLIP ViT-L/14", EOS_TOKEN, model_class="CLIPTextModelWithProjection"),
        TextEncoderSpec("text_encoder_2", "OpenCLIP ViT-bigG/14", "!", openclip=True,
                        model_class="CLIPTextModelWithProjection", embedding_key="clip_g"),
        TextEncoderSpec("text_encoder_3", "T5-XXL", "<pad>", model_class="T5EncoderModel", embedding_key="t5"),
    )
    text_encoder_targets: frozenset[str] = CLIP_TARGETS  # only the CLIPs': T5 stays frozen
    lora_targets: tuple[str, ...] | None = DEFAULT_TARGETS
    denoiser_name: str = "transformer"
    options_section: str | None = "sd3"
    options: type | None = SD3Options
    lora_pipeline: str = "StableDiffusion3Pipeline"
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_tags: tuple[str, ...] = ("sd3", "sd3-diffusers", "text-to-image")
    lora_clients: tuple[str, ...] = ("ComfyUI",)  # the one UI whose SD3 LoRA key mapping the tests check
    kohya_prefixes: dict[str, str] = field(default_factory=lambda: dict(KOHYA_PREFIXES))
    kohya_modules: tuple[KohyaModule, ...] = KOHYA_MODULES
    # the pipeline's default guidance (SD3 samples with classifier-free guidance), with the model's own
    # flow-matching scheduler: the DDPM-style ones of --scheduler do not take its sigmas
    sampling: SamplingDefaults = SamplingDefaults(guidance_scale=7.0, scheduler="FlowMatchEulerDiscreteScheduler",
                                                  torch_dtype="bfloat16")
    memory: MemoryConstants = MemoryConstants(calibrated=False)  # SD's constants: not measured for SD3
    original_layout: OriginalLayout | None = None
    # T5 tokens: StableDiffusion3Pipeline's default, which every sampler uses (diffusers' SD3 training script
    # defaults to 77, so its LoRAs train on shorter T5 embeddings than they sample with)
    max_sequence_length: int = 256

    # ---------------------------------------------------------------------------------------------------
    # Reading a model

    def detect(self, files: ModelFiles) -> bool:
        # the pipeline's class, or its transformer's as model_index.json lists it (["diffusers", class name])
        index = files.read("model_index.json")
        transformer = index.get("transformer")
        return index.get("_class_name") == "StableDiffusion3Pipeline" or \
            (isinstance(transformer, list) and transformer[-1:] == ["SD3Transformer2DModel"])

    def describe(self, files: ModelFiles, for_training: bool) -> ModelInfo:
        index, transformer = files.read("model_index.json"), files.read("transformer/config.json")
        vae = files.read("vae/config.json")
        vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        if for_training:
            self._check_trainable(files.pretrained, index, transformer, vae)
        patch = int(transformer.get("patch_size", 2))
        return ModelInfo(
            pretrained=files.pretrained, family=self, prediction_type="flow_matching",
            # the pipeline's default size: the transformer's latent sample size x the VAE's downscale (128 x 8)
            resolution=int(transformer.get("sample_size", self.default_resolution // vae_scale)) * vae_scale,
            # the VAE's downscale x the transformer's patch size: 16 for SD3
            bucket_multiple=vae_scale * patch, pipeline_class=index.get("_class_name", "?"),
            architecture=KOHYA_VARIANTS[model_type(transformer)],
            sample_multiple=vae_scale * patch,  # StableDiffusion3Pipeline.check_inputs refuses any other size
        )

    def _check_trainable(self, pretrained: str, index: dict, transformer: dict, vae: dict) -> None:
        """One SdtuneError for an SD3 model sdtune cannot train: one without T5, or with extra input channels."""
        if not any(index.get("text_encoder_3") or []):
            raise SdtuneError(
                f"model.pretrained: {pretrained} has no text_encoder_3 (T5); sdtune trains SD3 with all three "
                "text encoders: use the full model folder")
        if transformer.get("in_channels", 16) != vae.get("latent_channels", 16):
            raise SdtuneError(
                f"model.pretrained: {pretrained} is a {index.get('_class_name')} whose transformer takes "
                f"{transformer.get('in_channels')} input channels for a {vae.get('latent_channels')}-channel VAE; "
                "sdtune trains text-to-image models: use the base text-to-image checkpoint")

    def denoiser_module_names(self, files: ModelFiles) -> list[str]:
        return empty_module_names("SD3Transformer2DModel", files.read("transformer/config.json"))

    def config_problems(self, cfg: Any) -> list[str]:
        """Options that do not work for SD3 yet, each naming its key (model.clip_skip: ``model_option_problem``)."""
        return flow_config_problems(cfg, "SD3", "sd3")

    def config_warnings(self, cfg: Any) -> list[str]:
        return []  # SD3 samples with classifier-free guidance: its negative prompt and guidance are used

    def model_option_problem(self, name: str, key: str) -> str | None:
        if name == "prediction_type":
            return prediction_type_problem("SD3", key)
        return clip_skip_problem(self.label, key) if name == "clip_skip" else None

    # ---------------------------------------------------------------------------------------------------
    # Loading and building

    def load(self, pretrained: str, revision: str | None, variant: str | None, safetensors_only: bool,
             dtype: Any = None, denoiser: Any = None,
             loaded_text_encoders: dict[str, Any] | None = None, tokenizers: list[Any] | None = None) -> Components:
        """``denoiser``: a transformer already loaded (a single file's, ``sdtune.sd3_file``) in place of the
        model's own, which is then not read; ``loaded_text_encoders``: {component name: text encoder} likewise
        (the ones such a file bundles); ``tokenizers``: the model's, already read, likewise."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw: dict[str, Any] = dict(revision=revision)
        wkw: dict[str, Any] = dict(revision=revision, variant=variant, use_safetensors=True if safetensors_only else None)
        dkw, tkw = load_kwargs(dtype)
        return Components(
            tokenizers=tokenizers or [CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw),
                                      CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw),
                                      T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3", **kw)],
            text_encoders=[load_text_encoder(cls, pretrained, name, loaded_text_encoders, **wkw, **tkw)
                           for cls, name in [(CLIPTextModelWithProjection, "text_encoder"),
                                             (CLIPTextModelWithProjection, "text_encoder_2"),
                                             (T5EncoderModel, "text_encoder_3")]],
            vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **wkw),
            denoiser=denoiser if denoiser is not None else
            SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", **wkw, **dkw),
            # training draws its sigmas from the model's own scheduler (shift 3.0: its timesteps and sigmas tables)
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw),
        )

    def pipeline(self, components: Components, scheduler: Any = None) -> Any:
        from diffusers import StableDiffusion3Pipeline

        tokenizer, tokenizer_2, tokenizer_3 = components.tokenizers
        text_encoder, text_encoder_2, text_encoder_3 = components.text_encoders
        return StableDiffusion3Pipeline(
            scheduler=scheduler if scheduler is not None else components.noise_scheduler, vae=components.vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=components.denoiser,
            **self.pipeline_kwargs,
        )

    def random_configs(self, size: str) -> dict[str, Any]:
        """Constructor arguments of a random model: ``transformer``, ``vae``, ``clip`` (CLIP-L, CLIP-G), ``t5``."""
        if size == "tiny":
            # diffusers' tests/pipelines/stable_diffusion_3 widths (4 heads x 8 = 32, CLIPs 32 wide), with two
            # joint blocks (the last has no to_add_out) and SD3's 2x2 patches over 8x8 latents (64 px). T5 is 96
            # wide so that the CLIP half (32 + 32) is really zero-padded, as SD3's 768 + 1280 is to 4096
            transformer: dict[str, Any] = dict(
                sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64,
                pos_embed_max_size=32)
            vae_blocks, latent_channels, groups, vae_size = (8, 16, 16, 16), 4, 4, 64
            clip = [dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)] * 2
            t5 = dict(d_model=96)
        elif size == "full":  # SD3.5 Medium (MMDiT-X: a second attention in the first 13 blocks)
            transformer = dict(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, caption_projection_dim=1536, joint_attention_dim=4096,
                pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                qk_norm="rms_norm")
            vae_blocks, latent_channels, groups, vae_size = (128, 256, 512, 512), 16, 32, 1024
            clip = [dict(width=768, layers=12, heads=12, mlp=3072, projection_dim=768),  # CLIP ViT-L/14
                    dict(width=1280, layers=32, heads=20, mlp=5120, projection_dim=1280)]  # OpenCLIP bigG
            t5 = {}
        else:
            raise SdtuneError(f"--size: unknown size '{size}'; choose tiny or full")
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_blocks,
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), layers_per_block=1 if size == "tiny" else 2,
            norm_num_groups=groups, sample_size=vae_size, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5305, shift_factor=0.0609,  # SD3's VAE
        )
        return dict(transformer=transformer, vae=vae, clip=clip, t5=t5)

    def random_scheduler(self) -> Any:
        """SD3's and SD3.5's scheduler: flow-matching Euler with a static shift of 3.0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    def random_components(self, size: str) -> Components:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        cfg = self.random_configs(size)
        clips = [CLIPTextModelWithProjection(clip_text_config(**c, openclip=spec.openclip))
                 for c, spec in zip(cfg["clip"], self.text_encoders)]
        t5 = T5EncoderModel(t5_config(size, **cfg["t5"]))
        vae, transformer = AutoencoderKL(**cfg["vae"]), SD3Transformer2DModel(**cfg["transformer"])
        return Components(
            tokenizers=[clip_tokenizer(pad_token=spec.pad_token) for spec in self.text_encoders[:2]]
            + [tiny_t5_tokenizer(self.max_sequence_length)],
            text_encoders=[*clips, t5], vae=vae, denoiser=transformer, noise_scheduler=self.random_scheduler(),
        )

    # ---------------------------------------------------------------------------------------------------
    # One training step

    def objective(self, noise_scheduler: Any, prediction_type: str, *, noise_offset: float = 0.0,
                  snr_gamma: float | None = None, options: Any = None) -> FlowMatchingObjective:
        return flow_objective(noise_scheduler, options or SD3Options(), "SD3", noise_offset, snr_gamma)

    def tokenize(self, tokenizers: list[Any], captions: list[str]) -> list[Any]:
        # as StableDiffusion3Pipeline.encode_prompt: both CLIPs padded to 77, T5 to max_sequence_length
        clip_l, clip_g, t5 = tokenizers
        return [*(tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for tok in (clip_l, clip_g)),
                t5(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                   add_special_tokens=True, return_tensors="pt").input_ids]

    def encode_prompt(self, text_encoders: list[Any], input_ids: list[Any]) -> dict[str, Any]:
        import torch

        # StableDiffusion3Pipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds / encode_prompt, op for op
        # (the same dtype casts, so that mixed dtypes promote as there)
        clip_l, clip_g, t5 = text_encoders
        outs = [encoder(ids, output_hidden_states=True) for encoder, ids in zip((clip_l, clip_g), input_ids)]
        # penultimate hidden states (B, 77, 768) and (B, 77, 1280), cast to CLIP-L's dtype as the pipeline
        # does; a trained encoder comes wrapped in DDP, which has no dtype of its own. Every CLIP layer is
        # read (the last through the pooled outputs), so each keeps its LoRA (TextEncoderSpec.unread_layers)
        clip_dtype = getattr(clip_l, "module", clip_l).dtype
        clip_prompt_embeds = torch.cat([out.hidden_states[-2].to(dtype=clip_dtype) for out in outs], dim=-1)
        t5_prompt_embeds = t5(input_ids[2])[0].to(dtype=getattr(t5, "module", t5).dtype)  # (B, 256, 4096)
        # zero-pad the CLIP channels to T5's width, then CLIP's 77 tokens before T5's: (B, 77 + 256, 4096)
        clip_prompt_embeds = torch.nn.functional.pad(
            clip_prompt_embeds, (0, t5_prompt_embeds.shape[-1] - clip_prompt_embeds.shape[-1]))
        return {"prompt_embeds": torch.cat([clip_prompt_embeds, t5_prompt_embeds], dim=-2),
                # the projected pooled outputs (text_embeds) side by side: (B, 768 + 1280 = 2048)
                "pooled_prompt_embeds": torch.cat([out[0] for out in outs], dim=-1)}

    def conditioning(self, prompt_embeds: dict[str, Any], batch: dict, options: Any, device: Any,
                     dtype: Any) -> dict[str, Any]:
        return {"encoder_hidden_states": prompt_embeds["prompt_embeds"],  # (B, 333, 4096)
                "pooled_projections": prompt_embeds["pooled_prompt_embeds"]}  # (B, 2048)

    def predict(self, denoiser: Any, noisy_latents: Any, timesteps: Any, conditioning: dict[str, Any]) -> Any:
        # (B, 16, h, w) in and out: the transformer patchifies itself. It takes the scheduler's timesteps as
        # they are, in (0, 1000], as the reference passes them (FLUX's takes timesteps / 1000)
        return denoiser(hidden_states=noisy_latents, timestep=timesteps, return_dict=False, **conditioning)[0]

    def trained_text_encoders(self, options: Any) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2")  # both CLIPs, as diffusers' script; T5 is never LoRA'd

    # ---------------------------------------------------------------------------------------------------
    # LoRA files

    def kohya_version(self, prediction_type: str) -> KohyaVersion:
        # as kohya's sd3_train_network.py writes an SD3 LoRA: ss_base_model_version the model type, ModelSpec
        # architecture "stable-diffusion-3-<type>" (describe: ModelInfo.architecture; SD3 Medium where the
        # model is not known) and implementation "diffusers" (sai_model_spec.determine_implementation)
        return KohyaVersion("medium", KOHYA_VARIANTS["medium"], "diffusers", self.default_resolution,
                            network_module="networks.lora_sd3",
                            variant_versions=tuple((arch, kind) for kind, arch in KOHYA_VARIANTS.items()))

    def kohya_warnings(self, modules: dict[str, list[str]]) -> list[str]:
        return []

    def recognises_lora(self, keys: list[str], metadata: dict[str, str]) -> bool:
        version = metadata.get("ss_base_model_version", "")
        # registered before SDXL and FLUX, whose rules match SD3 files too (text_encoder_2., joint blocks): so
        # their files are ruled out here. FLUX.1's joint blocks have SD3's diffusers keys; its single blocks
        # (or metadata) tell them apart. SDXL files have unet. keys, which the rule below never matches
        if version.startswith("flux") or any(k.startswith(FLUX_KEY_MARKS) for k in keys):
            return False
        # kohya's own SD3 files say the model type ("5-large": KOHYA_VARIANTS), sdtune's before them "sd3"
        return version.startswith("sd3") or version in KOHYA_VARIANTS or \
            any(k.startswith(LORA_KEY_MARKS) for k in keys)


def model_type(transformer: dict) -> str:
    """kohya's name of the SD3 variant whose transformer config this is (``KOHYA_VARIANTS``)."""
    if not transformer.get("qk_norm"):
        return "medium"
    return "5-medium" if transformer.get("dual_attention_layers") else "5-large"


SD3_FAMILY = SD3()
