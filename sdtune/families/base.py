"""What a model family is: the protocol every family implements and the records families hand out.

A family (SD1.x, SD2.x, SDXL, FLUX.1; next SD3) is everything that differs between models which sdtune
otherwise treats alike: how it is recognised from its config files, how its parts load, how prompts become
the denoiser's conditioning, how the denoiser is called, which noising and loss target it trains with (its
``Objective``), which modules LoRA can target, how its LoRAs are named in kohya files, and its memory
constants. The training loop, caches, checkpoints, sampling and export ask the family; none of them tests a
family's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sdtune.errors import SdtuneError, error_summary
from sdtune.hub import is_hub_id, offline_reason, offline_unless_reachable


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, in the pipeline's order."""

    name: str  # diffusers component name: "text_encoder", "text_encoder_2"
    label: str  # what it is, for messages: "CLIP ViT-L/14"
    pad_token: str  # what its tokenizer pads with: OpenCLIP pads with "!", OpenAI's CLIP with <|endoftext|>
    openclip: bool = False  # OpenCLIP (SD2, SDXL's second): A1111 fuses its attention (see kohya_warnings)
    model_class: str = "CLIPTextModel"  # the transformers class (SDXL's second: CLIPTextModelWithProjection)
    # the key of its vectors in a textual-inversion file (AUTOMATIC1111 / ComfyUI / diffusers' advanced script)
    embedding_key: str = "clip_l"
    # its last layers whose output the family's encode_prompt never reads (SDXL's CLIP-L: the penultimate
    # hidden states, no pooled output). A LoRA there would get no gradient, which DDP refuses: none goes there
    unread_layers: int = 0

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's component name: text_encoder_2 -> tokenizer_2."""
        return self.name.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class KohyaVersion:
    """What kohya-ss and ModelSpec metadata call a base model (``ss_base_model_version``, architecture)."""

    base_model_version: str  # "sd_v1", "sd_v2_v", "sdxl_base_v1-0"
    architecture: str  # ModelSpec: "stable-diffusion-v1"
    implementation: str  # ModelSpec: "diffusers" or Stability's generative-models URL
    default_resolution: int
    v2: bool = False  # kohya's ss_v2 flag
    network_module: str = "networks.lora"  # ss_network_module of a LoRA: the sd-scripts module that trains it
    # {ModelSpec architecture (``ModelInfo.architecture``): ss_base_model_version} where kohya names a family's
    # variants apart (SD3: "medium", "5-medium", "5-large"); others get base_model_version
    variant_versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class KohyaModule:
    """One module of a family's original layout (kohya / BFL keys) that is not a diffusers module path: a
    rename, or one Linear the original model fuses and diffusers splits (FLUX.1's qkv). Its kohya LoRA is the
    members' LoRAs fused: downs stacked on dim 0, ups block-diagonal, one alpha (``sdtune.export``)."""

    name: str  # kohya name after the prefix, ``{i}`` for the block index: "double_blocks_{i}_img_attn_qkv"
    members: tuple[str, ...]  # the diffusers modules, in the fused output's order: "transformer_blocks.{i}.attn.to_q"
    # each member's output width as a multiple of the first's, to size the zero blocks of members that were
    # not trained (FLUX's single-block MLP input is 4x the attention width); (): all equal
    widths: tuple[int, ...] = ()
    # the output width, as a multiple of the input's, at which diffusers' module orders its output's two halves
    # the other way round from the original's (SD3's last block: a (scale, shift) norm1_context.linear where
    # the original's adaLN_modulation gives (shift, scale)); the LoRA's up rows are swapped there. 0: never
    swapped_halves_at: int = 0


@dataclass(frozen=True)
class SamplingDefaults:
    """What sampling uses where the user gave no value (``sdtune sample``, the grids during training)."""

    guidance_scale: float = 7.5
    # None: the user's --scheduler (a name of ``sdtune.schedulers.SCHEDULERS``); a diffusers class name: the one
    # scheduler the family samples with (its model's own), whatever --scheduler says, and what sidecars record
    scheduler: str | None = None
    torch_dtype: str = "float16"  # what the model card's diffusers snippet loads the pipeline in
    # why the pipeline ignores a negative prompt at these defaults (FLUX.1: guidance-distilled), for messages that
    # name the option; "": it uses one
    negative_prompt_unused: str = ""
    # why guidance_scale changes nothing (FLUX.1-schnell: no guidance embedding); "": it is used
    guidance_unused: str = ""


@dataclass(frozen=True)
class MemoryConstants:
    """Activation constants of the pre-flight memory estimate (``sdtune.memory``), calibrated on an H200."""

    unet_activation_gib: float = 1.26  # per image, per 1e9 denoiser params, per 64x64 latent pixels, 2 bytes
    checkpointing_factor: float = 0.058  # share of those activations kept with gradient checkpointing
    vae_activation_gib: float = 3.1  # per 1024x1024 image through the VAE encoder, 4 bytes
    # the family these constants were measured for; another family's estimate says its activations are a guess
    calibrated: bool = True


@dataclass(frozen=True)
class OriginalLayout:
    """What a family's single-file checkpoints (Stability's original layout, ``sdtune.single_file``) say only
    through the rules of the real architectures: what their tensor shapes cannot."""

    resolutions: dict[str, int]  # native image size by prediction type ("epsilon", "v_prediction")
    micro_conditioning: bool = False  # the UNet embeds SDXL's size/crop ids (``label_emb``)
    attention_heads: int | None = None  # a fixed head count in every block (SD1.x: 8); None: head_channels each
    head_channels: int = 64
    assume_v: bool = False  # a file that does not say predicts v (SD2.x: most shared files are 768-v)
    upcast_attention_v: bool = False  # v models computed attention in fp32 (SD2.1: fp16 attention overflows)
    text_layers_dropped: int = 0  # the family conditions on a layer before the last, which diffusers cuts off
    vae_scaling_factor: float = 0.18215
    vae_force_upcast: bool = False  # the VAE overflows in fp16 (SDXL's)


@dataclass(frozen=True)
class ModelInfo:
    """What a base model is, read from its config files (no weights)."""

    pretrained: str
    family: Family
    prediction_type: str  # "epsilon" | "v_prediction" | "flow_matching"
    resolution: int  # native image size
    bucket_multiple: int  # image sides the denoiser takes without resampling are multiples of this
    pipeline_class: str
    # ModelSpec's architecture where the config files tell variants of a family apart ("flux-1-schnell": no
    # guidance embedding); None: the family's (``KohyaVersion.architecture``)
    architecture: str | None = None
    # image sides the family's pipeline renders (a width or height it is given must be a multiple): diffusers'
    # SD / SDXL pipelines check multiples of 8; FLUX.1 and SD3.x the VAE's downscale x the patch (16)
    sample_multiple: int = 8

    def sides_near(self, side: int) -> list[int] | None:
        """The sides next to ``side`` that the pipeline renders (``sample_multiple``), to suggest in place of
        it; None when ``side`` is one."""
        m = self.sample_multiple
        return sorted({max(side // m, 1) * m, -(-side // m) * m}) if side % m else None


@dataclass
class Components:
    """The loaded parts of a model; text encoders and tokenizers in the family's order."""

    tokenizers: list[Any]
    text_encoders: list[Any]
    vae: Any
    denoiser: Any  # the UNet (SD1.x/2.x, SDXL) or transformer (SD3, FLUX)
    noise_scheduler: Any  # the training (forward-process) scheduler

    def named_modules(self, family: Family) -> dict[str, Any]:
        """{diffusers component name: module} for the denoiser and text encoders."""
        names = [family.denoiser_name, *(e.name for e in family.text_encoders)]
        return dict(zip(names, [self.denoiser, *self.text_encoders]))


class ModelFiles:
    """A model's config files (``model_index.json``, ``unet/config.json``, ...) from a local diffusers folder or
    the Hugging Face Hub, each read once. Only config files: never weights."""

    def __init__(self, pretrained: str, revision: str | None = None, folder: Path | None = None):
        # folder: where the config files are when they are not beside the weights (a single-file checkpoint's
        # derived configs, ``sdtune.single_file.config_folder``)
        self.pretrained, self.revision, self.folder = pretrained, revision, folder
        self._read: dict[str, dict] = {}

    def read(self, filename: str) -> dict:
        """The parsed JSON file, or one SdtuneError naming ``model.pretrained`` and the fix."""
        if filename not in self._read:
            source = str(self.folder) if self.folder else self.pretrained
            self._read[filename] = read_model_file(source, filename, self.revision)
        return self._read[filename]


def clip_skip_problem(label: str, key: str) -> str:
    """The line refusing clip skip for a family that conditions on fixed layers of several text encoders."""
    return (f"{key}: {label} conditions on fixed layers of its text encoders (kohya and AUTOMATIC1111 ignore "
            "clip skip there); fix: remove it")


def load_kwargs(dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers', transformers') ``from_pretrained`` arguments that load weights straight in ``dtype`` (none for
    None): FLUX.1's transformer and T5 are 68 GB in float32, the libraries' default, 34 GB in bf16, which is
    what a bf16 run casts them to anyway (the same rounding, done while reading)."""
    if dtype is None:
        return {}, {}
    import transformers
    from packaging.version import Version

    # transformers 4.56 renamed torch_dtype to dtype (5.x warns about the old name; 4.50 knows only that one)
    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {"torch_dtype": dtype}, {name: dtype}


def load_text_encoder(model_class: Any, pretrained: str, name: str, loaded: dict[str, Any] | None,
                      **kwargs: Any) -> Any:
    """The text encoder ``name`` ("text_encoder_2"): ``loaded``'s where it holds one (a transformer file's bundled
    encoder, ``sdtune.transformer_file.load_text_encoders``: the model's weights for it are then not read), else
    ``model_class.from_pretrained`` of that subfolder of ``pretrained`` with ``kwargs``."""
    if loaded and name in loaded:
        return loaded[name]
    return model_class.from_pretrained(pretrained, subfolder=name, **kwargs)


def empty_module_names(model_class: str, config: dict) -> list[str]:
    """Every module name of a diffusers model (``model_class``, e.g. "UNet2DConditionModel") built from its
    config as a skeleton on the meta device: no memory, no weights read."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = getattr(diffusers, model_class).from_config(config)
    return [n for n, _ in model.named_modules()]


def _hub_miss(pretrained: str, filename: str, e: Exception, offline: bool) -> str:
    """The one line for a hub id whose ``filename`` could not be had: offline and not cached, or what the Hub
    said; with what a local folder of that spelling holds, for a path typed without its leading ./"""
    parent = Path(pretrained).expanduser().parent
    near = ""
    if parent.is_dir():  # "models/sd15" with a models/ here: most likely a mistyped local path
        names = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
        near = f"; {parent}/ here has {', '.join(names) if names else 'no folders'}"
    if offline:
        return (f"model.pretrained: '{pretrained}' is not a local folder, and as a hub id it is not in the Hugging "
                f"Face cache ({offline_reason()}){near}; fix the path, or download the model where there is a network")
    return (f"model.pretrained: could not get {filename} of '{pretrained}' (no local folder by that name, and the "
            f"hub said: {error_summary(e, 160)}){near}; fix: check the id, run `hf auth login` for gated models, "
            "or point at a local folder")


def read_model_file(pretrained: str, filename: str, revision: str | None = None) -> dict:
    """One JSON config file of a local model folder or hub model."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise SdtuneError(
                f"model.pretrained: {pretrained} has no {filename}; "
                "fix: point it at a diffusers-format pipeline folder (one with model_index.json)"
            )
    else:
        if not is_hub_id(pretrained):
            raise SdtuneError(
                f"model.pretrained: '{pretrained}' is neither a local model folder nor a hub id like "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5'; fix the path"
            )
        from huggingface_hub import hf_hub_download

        offline = offline_unless_reachable()
        try:
            path = Path(hf_hub_download(pretrained, filename, revision=revision))
        except Exception as e:  # offline, missing repo, gated repo, bad revision: all one user error
            raise SdtuneError(_hub_miss(pretrained, filename, e, offline)) from None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdtuneError(f"model.pretrained: cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise SdtuneError(f"model.pretrained: {path} is not a JSON object of settings; the model is damaged")
    return value


@runtime_checkable
class Family(Protocol):
    """The protocol of a model family. ``sdtune.families.sd``, ``.sdxl`` and ``.flux`` implement it;
    ``sdtune.families.register`` adds one."""

    name: str  # what recipes, checkpoints and --family say: "sd15"
    label: str  # what messages say: "SD1.x"
    default_resolution: int  # when no model is at hand (sdtune prep --family)
    text_encoders: tuple[TextEncoderSpec, ...]
    text_encoder_targets: frozenset[str]  # module names LoRA may target in the text encoders
    # the denoiser's LoRA targets when the recipe names none (``sdtune.plan.with_family_defaults``); None: the
    # recipe's default, lora.target_modules = [to_k, to_q, to_v, to_out.0]
    lora_targets: tuple[str, ...] | None
    denoiser_name: str  # "unet" or "transformer"
    options_section: str | None  # the recipe section of this family's own options, e.g. "sdxl"
    options: type | None  # its pydantic model
    lora_pipeline: str  # the diffusers pipeline class: text-to-image sampling, save/load_lora_weights
    pipeline_kwargs: dict[str, Any]  # what else the pipeline's constructor is given
    hub_tags: tuple[str, ...]  # model card tags
    # the UIs that load its kohya file, as the model card names them ("AUTOMATIC1111" also gives the <lora:> hint)
    lora_clients: tuple[str, ...]
    kohya_prefixes: dict[str, str]  # component -> kohya key prefix ("lora_unet_", "lora_te1_")
    # the denoiser's kohya names where they are not its diffusers module paths (FLUX.1's BFL layout, fused qkv);
    # empty: every module is named by its diffusers path (the UNets)
    kohya_modules: tuple[KohyaModule, ...]
    sampling: SamplingDefaults  # guidance and scheduler where the user gives none
    memory: MemoryConstants
    original_layout: OriginalLayout | None  # its single-file checkpoints; None: it has none sdtune reads
    # T5 tokens per prompt in training and sampling (the pipeline's ``max_sequence_length``); None: no T5 (CLIP's
    # 77 are fixed). A model's own value comes from ``describe`` (FLUX.1-schnell: 256), a recipe's from its
    # family section (``families.with_prompt_length``)
    max_sequence_length: int | None

    # -- reading a model
    def detect(self, files: ModelFiles) -> bool:
        """Whether the model whose config files these are belongs to this family."""
        ...

    def describe(self, files: ModelFiles, for_training: bool) -> ModelInfo:
        """Prediction type, native resolution and bucket multiple from the config files."""
        ...

    def denoiser_module_names(self, files: ModelFiles) -> list[str]:
        """Every module name of the denoiser (built empty from its config), to check LoRA targets."""
        ...

    def config_problems(self, cfg: Any) -> list[str]:
        """One line per recipe option (``sdtune.config.Config``) this family cannot train with yet, naming its
        key; checked with the rest of the recipe, before any weight loads."""
        ...

    def config_warnings(self, cfg: Any) -> list[str]:
        """One line per recipe option that this family (as ``describe`` gave it: FLUX.1-schnell's copy) takes but
        does not use, naming its key (``--strict`` refuses them)."""
        ...

    def model_option_problem(self, name: str, key: str) -> str | None:
        """The one line refusing the model option ``name`` ("prediction_type", "clip_skip" above 1) for this
        family, naming it ``key`` as the user wrote it ("model.clip_skip" in a recipe, "--clip-skip" for
        ``sdtune sample``); None where the family takes it. Training and sampling share this rule."""
        ...

    # -- loading and building
    def load(self, pretrained: str, revision: str | None, variant: str | None, safetensors_only: bool,
             dtype: Any = None, tokenizers: list[Any] | None = None) -> Components:
        """Tokenizers, text encoders, VAE, denoiser and the training noise scheduler; ``dtype``: the denoiser's
        and text encoders' (``load_kwargs``), None for the libraries' default (float32); ``tokenizers``: the
        model's, already read (``sdtune.models.load_tokenizers``), which are then not read again."""
        ...

    def pipeline(self, components: Components, scheduler: Any = None) -> Any:
        """A text-to-image diffusers pipeline around the given modules (no copies)."""
        ...

    def random_components(self, size: str) -> Components:
        """Freshly initialised components with ``tiny`` (tests) or ``full`` (benchmarks) shapes."""
        ...

    def random_scheduler(self) -> Any:
        """The sampling scheduler the family's real checkpoints ship (for random and single-file models)."""
        ...

    # -- one training step
    def objective(self, noise_scheduler: Any, prediction_type: str, *, noise_offset: float,
                  snr_gamma: float | None, options: Any = None) -> Any:
        """The ``sdtune.objectives.Objective`` this family trains with (``options``: its recipe section)."""
        ...

    def tokenize(self, tokenizers: list[Any], captions: list[str]) -> list[Any]:
        """One (B, L) id tensor per tokenizer."""
        ...

    def encode_prompt(self, text_encoders: list[Any], input_ids: list[Any]) -> dict[str, Any]:
        """Prompt embeddings, each (B, ...): what the text cache stores per caption."""
        ...

    def conditioning(self, prompt_embeds: dict[str, Any], batch: dict, options: Any, device: Any,
                     dtype: Any) -> dict[str, Any]:
        """The denoiser's keyword arguments besides the latents and timesteps, for one batch."""
        ...

    def predict(self, denoiser: Any, noisy_latents: Any, timesteps: Any, conditioning: dict[str, Any]) -> Any:
        """The denoiser's output (``model_pred``), shaped like ``noisy_latents``."""
        ...

    def trained_text_encoders(self, options: Any) -> tuple[str, ...]:
        """Which text encoders get a LoRA when ``lora.train_text_encoder`` is on."""
        ...

    # -- LoRA files
    def kohya_version(self, prediction_type: str) -> KohyaVersion:
        """How kohya / ModelSpec metadata name this family."""
        ...

    def kohya_warnings(self, modules: dict[str, list[str]]) -> list[str]:
        """Known limits of the UIs' loaders for LoRAs on these modules ({component: module names})."""
        ...

    def recognises_lora(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """Whether a LoRA file's keys or metadata say it was made for this family."""
        ...

