"""FLUX.1: a rectified-flow transformer (MMDiT) conditioned on T5-XXL and CLIP-L.

What differs from the SD families: the denoiser is ``FluxTransformer2DModel``, which takes the latents packed
into 2x2 patches, (B, 16, h, w) -> (B, h/2 * w/2, 64), with position ids for the image and text tokens and,
for the guidance-distilled FLUX.1-dev, the guidance scale as an input; training is flow matching
(``sdtune.objectives.FlowMatchingObjective``); the prompt is T5's hidden states (B, 512, 4096) plus CLIP-L's
pooled output (B, 768); the VAE has 16 channels and a shift factor. ``predict`` packs and unpacks, so the
loop's loss code sees (B, C, h, w) tensors as for the UNets. The maths follows diffusers'
``examples/dreambooth/train_dreambooth_lora_flux.py``.

kohya / BFL LoRA files (what ComfyUI and Forge load) use the original model's names and fused Linears
(``KOHYA_MODULES``; ``sdtune.export`` fuses the LoRAs); sampling defaults to guidance 3.5 and the model's own
flow-matching Euler scheduler (``SAMPLING``).

A LoHa / LoKr (``lora.type``) is written with SimpleTuner's LyCORIS names (``sdtune.export.lycoris_module_name``).

Pivotal tuning trains CLIP-L's and T5's rows (files with ``clip_l`` and ``t5``, as diffusers' advanced FLUX script).

A transformer file in BFL's layout (what fine-tunes are shared as) loads with ``model.base`` supplying the rest
(``sdtune.flux_file``; ``load(denoiser=...)``).

T5 reads 512 tokens of a FLUX.1-dev prompt and 256 of a schnell one (``describe``; ``flux.max_sequence_length``
sets another), in training and in every sample.

Not yet: noise offset and min-SNR (DDPM notions), clip skip, a memory estimate calibrated for FLUX (SD's
constants are used); ``config_problems`` refuses each such key in one line.

torch, diffusers and transformers are imported inside the methods that use them (see ``families.sd``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    empty_module_names,
    load_kwargs,
    load_text_encoder,
)
from sdtune.families.flow import FlowOptions, flow_config_problems, flow_objective, prediction_type_problem
from sdtune.families.sd import CLIP_TARGETS, clip_text_config
from sdtune.families.t5 import t5_config, tiny_t5_tokenizer
from sdtune.objectives import FlowMatchingObjective
from sdtune.tokens import EOS_TOKEN, clip_tokenizer

# diffusers' FluxTransformer2DModel block names, as diffusers-format LoRA keys and kohya/BFL keys spell them
LORA_KEY_MARKS = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.",
                  "lora_unet_double_blocks_", "lora_unet_single_blocks_",
                  # LoHa / LoKr files (SimpleTuner's LyCORIS names, sdtune.export.LYCORIS_PREFIX)
                  "lycoris_transformer_blocks_", "lycoris_single_transformer_blocks_")
# the LoRA targets when the recipe names none, as diffusers' FLUX script trains by default: every attention
# projection of the double (joint) blocks, image and text streams; the single blocks share to_q, to_k, to_v
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# kohya-ss sd-scripts networks/lora_flux.py: lora_unet_ for the transformer (BFL's module names), lora_te1_ for
# CLIP-L (T5 would be lora_te3_; sdtune never trains it)
KOHYA_PREFIXES = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}


def _splits_linear1(targets: list[str]) -> bool:
    """Whether PEFT's ``target_modules`` (names matched as whole dotted suffixes) take some of a single
    block's q, k, v but not its proj_mlp, the members BFL's layout fuses into linear1."""
    def targeted(module: str) -> bool:
        return any(module == t or module.endswith("." + t) for t in targets)

    block = "single_transformer_blocks.0"
    return any(targeted(f"{block}.attn.{m}") for m in ("to_q", "to_k", "to_v")) and not targeted(f"{block}.proj_mlp")


def _kohya(name: str, *members: str, widths: tuple[int, ...] = ()) -> KohyaModule:
    return KohyaModule(name, members, widths)


def _qkv(block: str, q: str, k: str, v: str) -> tuple[str, str, str]:
    return (f"{block}.attn.{q}", f"{block}.attn.{k}", f"{block}.attn.{v}")


# BFL's FLUX.1 module names for diffusers' FluxTransformer2DModel modules, as diffusers' reader maps them back
# (loaders/lora_conversion_utils.py _convert_kohya_flux_lora_to_diffusers, _convert_sd_scripts_to_ai_toolkit).
# BFL fuses q, k, v into one qkv Linear per stream, and a single block's q, k, v and MLP input into linear1
# (out = 3 x 3072 + 12288 in FLUX.1: the MLP is 4x the attention width). The embedders (img_in, txt_in, time_in,
# vector_in, guidance_in) are left out: diffusers' reader (0.42) maps them to keys without "transformer.",
# which load_lora_weights then drops, so such a file would not sample as trained; export refuses them.
_DOUBLE, _SINGLE = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
KOHYA_MODULES = (
    _kohya("double_blocks_{i}_img_attn_qkv", *_qkv(_DOUBLE, "to_q", "to_k", "to_v")),
    _kohya("double_blocks_{i}_img_attn_proj", f"{_DOUBLE}.attn.to_out.0"),
    _kohya("double_blocks_{i}_txt_attn_qkv", *_qkv(_DOUBLE, "add_q_proj", "add_k_proj", "add_v_proj")),
    _kohya("double_blocks_{i}_txt_attn_proj", f"{_DOUBLE}.attn.to_add_out"),
    _kohya("double_blocks_{i}_img_mlp_0", f"{_DOUBLE}.ff.net.0.proj"),
    _kohya("double_blocks_{i}_img_mlp_2", f"{_DOUBLE}.ff.net.2"),
    _kohya("double_blocks_{i}_txt_mlp_0", f"{_DOUBLE}.ff_context.net.0.proj"),
    _kohya("double_blocks_{i}_txt_mlp_2", f"{_DOUBLE}.ff_context.net.2"),
    _kohya("double_blocks_{i}_img_mod_lin", f"{_DOUBLE}.norm1.linear"),
    _kohya("double_blocks_{i}_txt_mod_lin", f"{_DOUBLE}.norm1_context.linear"),
    _kohya("single_blocks_{i}_linear1", *_qkv(_SINGLE, "to_q", "to_k", "to_v"), f"{_SINGLE}.proj_mlp",
           widths=(1, 1, 1, 4)),
    _kohya("single_blocks_{i}_linear2", f"{_SINGLE}.proj_out"),
    _kohya("single_blocks_{i}_modulation_lin", f"{_SINGLE}.norm.linear"),
)
# FLUX.1-dev's sampling: the guidance its model card and FluxPipeline's examples use (a guidance-distilled
# model: the scale is a transformer input, not classifier-free guidance), with the model's own scheduler; no
# negative prompt (FluxPipeline uses one only with true_cfg_scale > 1: true CFG, twice the compute per step)
SAMPLING = SamplingDefaults(
    guidance_scale=3.5, scheduler="FlowMatchEulerDiscreteScheduler", torch_dtype="bfloat16",
    negative_prompt_unused="FLUX.1 is guidance-distilled and samples without classifier-free guidance (FluxPipeline "
    "uses a negative prompt only with true_cfg_scale > 1), so it is not used")
# FLUX.1-schnell (no guidance embedding: FluxPipeline drops the scale): 0.0, as its model card samples
SCHNELL_SAMPLING = replace(SAMPLING, guidance_scale=0.0, guidance_unused="this FLUX.1 model has no guidance input "
                           "(guidance_embeds: false in its transformer config, as FLUX.1-schnell): guidance changes "
                           "nothing")


class FluxOptions(FlowOptions):
    """Options that exist only for FLUX models (recipe section ``flux``): how timesteps are drawn, and the
    guidance input."""

    guidance_scale: float = Field(1.0, ge=0, description="the guidance input of a guidance-distilled transformer "
                                  "(FLUX.1-dev) during training; diffusers' script uses 1.0")


@dataclass(frozen=True)
class Flux:
    """FLUX.1-dev and FLUX.1-schnell (and their fine-tunes) in diffusers' layout."""

    name: str = "flux"
    label: str = "FLUX.1"
    default_resolution: int = 1024
    text_encoders: tuple[TextEncoderSpec, ...] = (
        TextEncoderSpec("text_encoder", "CLIP ViT-L/14", EOS_TOKEN),
        TextEncoderSpec("text_encoder_2", "T5-XXL", "<pad>", model_class="T5EncoderModel", embedding_key="t5"),
    )
    text_encoder_targets: frozenset[str] = CLIP_TARGETS  # only CLIP's: T5 stays frozen
    lora_targets: tuple[str, ...] | None = DEFAULT_TARGETS
    denoiser_name: str = "transformer"
    options_section: str | None = "flux"
    options: type | None = FluxOptions
    lora_pipeline: str = "FluxPipeline"
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_tags: tuple[str, ...] = ("flux", "text-to-image")
    lora_clients: tuple[str, ...] = ("ComfyUI", "Forge")  # AUTOMATIC1111 and InvokeAI's LoRA loaders: SD only
    kohya_prefixes: dict[str, str] = field(default_factory=lambda: dict(KOHYA_PREFIXES))
    kohya_modules: tuple[KohyaModule, ...] = KOHYA_MODULES
    sampling: SamplingDefaults = SAMPLING
    memory: MemoryConstants = MemoryConstants(calibrated=False)  # SD's constants: not measured for FLUX
    original_layout: OriginalLayout | None = None
    max_sequence_length: int | None = 512  # T5 tokens: 512 for FLUX.1-dev (the pipeline's default); schnell: describe

    # ---------------------------------------------------------------------------------------------------
    # Reading a model

    def detect(self, files: ModelFiles) -> bool:
        # the pipeline's class, or its transformer's as model_index.json lists it (["diffusers", class name])
        index = files.read("model_index.json")
        transformer = index.get("transformer")
        return index.get("_class_name") == "FluxPipeline" or \
            (isinstance(transformer, list) and transformer[-1:] == ["FluxTransformer2DModel"])

    def describe(self, files: ModelFiles, for_training: bool) -> ModelInfo:
        index, transformer = files.read("model_index.json"), files.read("transformer/config.json")
        vae = files.read("vae/config.json")
        vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        if for_training and transformer.get("in_channels", 64) != 4 * vae.get("latent_channels", 16):
            raise SdtuneError(
                f"model.pretrained: {files.pretrained} is a {index.get('_class_name')} whose transformer takes "
                f"{transformer.get('in_channels')} input channels (a Fill / Canny / Depth model); sdtune trains "
                "text-to-image models: use the base text-to-image checkpoint"
            )
        schnell = not transformer.get("guidance_embeds", True)
        return ModelInfo(
            # schnell was trained on 256 T5 tokens (BFL's sampling code, kohya's t5xxl_max_token_length), dev on 512
            pretrained=files.pretrained,
            family=replace(self, max_sequence_length=256, sampling=SCHNELL_SAMPLING) if schnell else self,
            prediction_type="flow_matching",
            resolution=int(vae.get("sample_size", self.default_resolution)),
            # the VAE's downscale x the 2x2 packing: 16 for FLUX.1
            bucket_multiple=vae_scale * 2, pipeline_class=index.get("_class_name", "?"),
            # schnell (timestep-distilled) has no guidance embedding: kohya's flux_utils tells them apart so too
            architecture="flux-1-schnell" if schnell else None,
            sample_multiple=vae_scale * 2,  # FluxPipeline resizes any other size (with a logged warning only)
        )

    def denoiser_module_names(self, files: ModelFiles) -> list[str]:
        return empty_module_names("FluxTransformer2DModel", files.read("transformer/config.json"))

    def config_problems(self, cfg: Any) -> list[str]:
        """Options that do not work for FLUX yet, each naming its key."""
        return flow_config_problems(cfg, "FLUX", "flux")  # model.clip_skip: model_option_problem, in sdtune.plan

    def config_warnings(self, cfg: Any) -> list[str]:
        """What this FLUX.1 model ignores: a guidance input without a guidance embedding (schnell), and a negative
        prompt in the grids (``SAMPLING``); and fp16 mixed precision, in which its training goes non-finite."""
        s, warnings = self.sampling, []
        if cfg.train.mixed_precision == "fp16":
            # seen on an H200 (bench/RESULTS.md, Run 3: loss nan from step 1, where bf16 and fp32 ran) and by kohya
            # sd-scripts' users (issue 1707: nan, or a LoRA that changes nothing); FLUX.1 ships in bf16
            warnings.append("train.mixed_precision: fp16 overflows FLUX.1's activations (the loss goes nan, or the "
                            "LoRA learns nothing); fix: bf16 (GPUs from Ampere / RTX 30xx on), else no (fp32)")
        if cfg.lora.use_dora and _splits_linear1(cfg.lora.target_modules):
            # said before training, not only when the run's kohya export then fails (sdtune.export._fused_magnitude)
            warnings.append("lora.use_dora: the single blocks' to_q, to_k, to_v are targets but proj_mlp is not, and "
                            "FLUX.1's layout fuses all four into linear1, whose DoRA magnitudes the kohya file needs "
                            "whole: the run will write its diffusers LoRA but no kohya file (ComfyUI, Forge); fix: add "
                            "proj_mlp to lora.target_modules")
        if s.guidance_unused and cfg.flux.guidance_scale != FluxOptions().guidance_scale:
            warnings.append(f"flux.guidance_scale: {s.guidance_unused} (its training predicts without it); fix: "
                            "remove it")
        if s.guidance_unused and cfg.sample.guidance_scale != s.guidance_scale:
            warnings.append(f"sample.guidance_scale: {s.guidance_unused} (the grids are the same at any "
                            "value); fix: remove it")
        if s.negative_prompt_unused and cfg.sample.negative_prompt:
            warnings.append(f"sample.negative_prompt: {s.negative_prompt_unused}; fix: remove it")
        return warnings

    def model_option_problem(self, name: str, key: str) -> str | None:
        if name == "prediction_type":
            return prediction_type_problem("FLUX", key)
        if name == "clip_skip":
            return f"{key}: FLUX conditions on CLIP's pooled output only; remove it"
        return None

    # ---------------------------------------------------------------------------------------------------
    # Loading and building

    def load(self, pretrained: str, revision: str | None, variant: str | None, safetensors_only: bool,
             dtype: Any = None, denoiser: Any = None,
             loaded_text_encoders: dict[str, Any] | None = None, tokenizers: list[Any] | None = None) -> Components:
        """``denoiser``: a transformer already loaded (a single file's, ``sdtune.flux_file``) in place of the
        model's own, which is then not read; ``loaded_text_encoders``: {component name: text encoder} likewise
        (the ones such a file bundles); ``tokenizers``: the model's, already read, likewise."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw: dict[str, Any] = dict(revision=revision)
        wkw: dict[str, Any] = dict(revision=revision, variant=variant, use_safetensors=True if safetensors_only else None)
        dkw, tkw = load_kwargs(dtype)
        return Components(
            tokenizers=tokenizers or [CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw),
                                      T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_2", **kw)],
            text_encoders=[load_text_encoder(cls, pretrained, name, loaded_text_encoders, **wkw, **tkw)
                           for cls, name in [(CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")]],
            vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **wkw),
            denoiser=denoiser if denoiser is not None else
            FluxTransformer2DModel.from_pretrained(pretrained, subfolder="transformer", **wkw, **dkw),
            # training draws its sigmas from the model's own scheduler (timesteps and sigmas tables)
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw),
        )

    def pipeline(self, components: Components, scheduler: Any = None) -> Any:
        from diffusers import FluxPipeline

        (tokenizer, tokenizer_2), (text_encoder, text_encoder_2) = components.tokenizers, components.text_encoders
        return FluxPipeline(
            scheduler=scheduler if scheduler is not None else components.noise_scheduler, vae=components.vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            transformer=components.denoiser, **self.pipeline_kwargs,
        )

    def random_configs(self, size: str) -> dict[str, Any]:
        """Constructor arguments of a random model: ``transformer``, ``vae``, ``clip``."""
        if size == "tiny":
            # diffusers' tests/pipelines/flux shapes: rope axes sum to the head dim (4 + 4 + 8 = 16); 4 latent
            # channels packed 2x2 -> 16 transformer input channels
            transformer: dict[str, Any] = dict(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                guidance_embeds=True)
            vae_blocks, latent_channels, groups, vae_size = (8, 16, 16, 16), 4, 4, 64
            clip = dict(width=32, layers=2, heads=4, mlp=64, projection_dim=32)
        elif size == "full":  # FLUX.1-dev
            transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True)
            vae_blocks, latent_channels, groups, vae_size = (128, 256, 512, 512), 16, 32, 1024
            clip = dict(width=768, layers=12, heads=12, mlp=3072, projection_dim=768)
        else:
            raise SdtuneError(f"--size: unknown size '{size}'; choose tiny or full")
        vae = dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_blocks,
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), layers_per_block=1 if size == "tiny" else 2,
            norm_num_groups=groups, sample_size=vae_size, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=0.3611, shift_factor=0.1159,  # FLUX.1's VAE
        )
        return dict(transformer=transformer, vae=vae, clip=clip)

    def random_scheduler(self) -> Any:
        """FLUX.1-dev's scheduler: flow-matching Euler with resolution-dependent (dynamic) shifting."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)

    def random_components(self, size: str) -> Components:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        cfg = self.random_configs(size)
        clip = CLIPTextModel(clip_text_config(**cfg["clip"], openclip=False))
        t5 = T5EncoderModel(t5_config(size))
        vae, transformer = AutoencoderKL(**cfg["vae"]), FluxTransformer2DModel(**cfg["transformer"])
        return Components(
            tokenizers=[clip_tokenizer(), tiny_t5_tokenizer(self.max_sequence_length)],
            text_encoders=[clip, t5], vae=vae, denoiser=transformer, noise_scheduler=self.random_scheduler(),
        )

    # ---------------------------------------------------------------------------------------------------
    # One training step

    def objective(self, noise_scheduler: Any, prediction_type: str, *, noise_offset: float = 0.0,
                  snr_gamma: float | None = None, options: Any = None) -> FlowMatchingObjective:
        return flow_objective(noise_scheduler, options or FluxOptions(), "FLUX", noise_offset, snr_gamma)

    def tokenize(self, tokenizers: list[Any], captions: list[str]) -> list[Any]:
        # as FluxPipeline.encode_prompt: CLIP padded to 77, T5 to max_sequence_length
        clip, t5 = tokenizers
        return [clip(captions, padding="max_length", max_length=clip.model_max_length, truncation=True,
                     return_tensors="pt").input_ids,
                t5(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                   return_tensors="pt").input_ids]

    def encode_prompt(self, text_encoders: list[Any], input_ids: list[Any]) -> dict[str, Any]:
        # FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds: CLIP's pooled output (B, 768) and T5's
        # last hidden states (B, L, 4096)
        clip, t5 = text_encoders
        return {"prompt_embeds": t5(input_ids[1], output_hidden_states=False)[0],
                "pooled_prompt_embeds": clip(input_ids[0], output_hidden_states=False).pooler_output}

    def conditioning(self, prompt_embeds: dict[str, Any], batch: dict, options: Any, device: Any,
                     dtype: Any) -> dict[str, Any]:
        import torch

        encoder_hidden_states = prompt_embeds["prompt_embeds"]  # (B, L, D)
        bsz, length = encoder_hidden_states.shape[:2]
        scale = (options or FluxOptions()).guidance_scale
        return {
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"],  # (B, 768)
            "txt_ids": torch.zeros(length, 3, device=device, dtype=dtype),  # (L, 3): text tokens sit at 0
            # (B,): used only by a transformer with guidance_embeds (predict drops it otherwise)
            "guidance": torch.full((bsz,), scale, device=device, dtype=torch.float32),
        }

    def predict(self, denoiser: Any, noisy_latents: Any, timesteps: Any, conditioning: dict[str, Any]) -> Any:
        from diffusers import FluxPipeline

        bsz, channels, height, width = noisy_latents.shape
        config = getattr(denoiser, "module", denoiser).config  # DDP wraps the module
        kwargs = dict(conditioning)
        if not config.guidance_embeds:
            kwargs.pop("guidance")
        # (B, C, h, w) -> (B, h/2 * w/2, 4C) 2x2 patches, with their (row, column) position ids (h/2 * w/2, 3)
        packed = FluxPipeline._pack_latents(noisy_latents, bsz, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, noisy_latents.device,
                                                         noisy_latents.dtype)
        # the transformer takes the timestep in [0, 1] (it multiplies by 1000 itself), as the reference passes
        model_pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, img_ids=img_ids, return_dict=False,
                              **kwargs)[0]
        # back to (B, C, h, w); _unpack_latents takes pixel sizes, so give it latent sizes with a factor of 1
        return FluxPipeline._unpack_latents(model_pred, height, width, 1)

    def trained_text_encoders(self, options: Any) -> tuple[str, ...]:
        return ("text_encoder",)  # CLIP; T5 is never LoRA'd

    # ---------------------------------------------------------------------------------------------------
    # LoRA files

    def kohya_version(self, prediction_type: str) -> KohyaVersion:
        # kohya-ss sd-scripts train_network.py / sai_model_spec.py: "flux1", ModelSpec "flux-1-dev" (+ "/lora";
        # schnell: ModelInfo.architecture), implementation BFL's repository
        return KohyaVersion("flux1", "flux-1-dev", "https://github.com/black-forest-labs/flux",
                            self.default_resolution, network_module="networks.lora_flux")

    def kohya_warnings(self, modules: dict[str, list[str]]) -> list[str]:
        clip = modules.get("text_encoder") or []
        if clip and not any(m.endswith("out_proj") for m in clip):
            # diffusers' kohya reader hands CLIP keys on in its old naming, whose type it infers from
            # to_out_lora keys (utils/state_dict_utils.py convert_state_dict_to_peft): none, and it raises
            return ["a FLUX kohya file with a CLIP LoRA but none on out_proj: diffusers' load_lora_weights (and so "
                    "`sdtune sample` on this file) cannot read it; ComfyUI and Forge can; the diffusers file "
                    "samples it"]
        return []

    def recognises_lora(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(k.startswith(LORA_KEY_MARKS) for k in keys) or \
            metadata.get("ss_base_model_version", "").startswith("flux")


FLUX = Flux()
