"""The run recipe: one typed config tree, loaded from YAML plus ``a.b=value`` overrides.

Every structural problem (unknown key with a "did you mean", wrong type, bad range, missing section) is
collected and reported at once, naming the key as the user writes it and the fix. A hostile recipe (or override
value) is refused in one line too: not UTF-8, duplicate keys, and documents past the bounds below (size, aliases,
nesting, values counted with aliases expanded) are caught before anything is built from them. ``sdtune.plan`` then
checks what needs the disk and the model's config files, still before any weight loads. Only the CLI and
``train()`` see the whole tree; everything below takes explicit arguments.

The sections are ``model``, ``data``, ``prior``, ``lora``, ``train``, ``sample``, plus one per model family
that has options of its own (named by ``Family.options_section``).
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.families.flow import refuse_bool_number

# YAML 1.1 (PyYAML) reads 1e-4 and 1e3 as strings. pydantic's lax mode parses such strings for float fields;
# for int fields (train.max_steps: 1e3) the section validator below turns whole-number ones into numbers.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


# Bounds on a recipe, and on each override value, checked before anything is built from it. A real recipe is a
# few KiB, four levels deep at most, with a handful of aliases and a few hundred values; these are far above
# that and far below what hangs the CLI (a 1 KiB "billion laughs" recipe expands to 10^9 values).
MAX_RECIPE_BYTES = 1 << 20
MAX_ALIASES = 1000
MAX_DEPTH = 64
MAX_VALUES = 10_000
MAX_KEY_CHARS = 200
MAX_NUMBER_CHARS = 100  # Python refuses to read integers of over 4300 digits with a ValueError

# accelerate's set_seed seeds numpy, which takes 0 .. 2**32 - 1; torch's generators take that range too.
SEED_MAX = 2**32 - 1

_TOO_MANY = (f"more than {MAX_VALUES} values (an alias counts all of its values each time it is used); "
             "a recipe has a few hundred")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

# Values shown in a problem line are cut short: a 1 MiB string or a nested alias tree fits on one line.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 4, 4, 2


def _shown(value: Any) -> str:
    """``repr(value)``, cut to about a line."""
    return _SHORT.repr(value)


class ConfigError(SdtuneError):
    """All problems found in a recipe, one line each."""

    def __init__(self, problems: list[str], without_unknown_keys: Config | None = None):
        self.problems = problems
        # the config as it would be without its unknown keys (a typo such as train.learnign_rate), when that
        # much is valid: the checks that need a config (sdtune.plan) can still report their problems at once
        self.without_unknown_keys = without_unknown_keys
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite learning rate, weight or scale is never meant (YAML's .nan, .inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _scientific_int(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = str(cls.model_fields[info.field_name].annotation) if info.field_name else ""
        refuse_bool_number(value, annotation)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) and "int" in annotation:
            number = float(value)
            # a whole number as an int, so that range checks see it (pydantic reads no int from 1e30 as a float);
            # pydantic refuses 1.5 and infinity with a clear message
            return int(number) if number.is_integer() else number
        return value


def _seed_in_range(seed: int) -> int:
    """``seed`` if every seeding function takes it."""
    if not 0 <= seed <= SEED_MAX:
        raise PydanticCustomError("seed_range", "must be a whole number from 0 to {max}", {"max": SEED_MAX})
    return seed


Seed = Annotated[int, AfterValidator(_seed_in_range)]

# Linux's limits (macOS and Windows have lower ones); past them os.stat raises instead of saying "no such file"
_PATH_BYTES, _NAME_BYTES = 4096, 255


def _path_fits(path: str) -> str:
    """``path`` (``~`` expanded, as a shell would) if the file system can be asked about it: not empty, no NUL,
    not too long."""
    if not path.strip():
        raise PydanticCustomError("path_empty", "is empty; give a path")
    path = os.path.expanduser(path)
    if "\0" in path:
        raise PydanticCustomError("path_nul", "contains a NUL character (\\0); remove it")
    longest = max((len(part.encode()) for part in Path(path).parts), default=0)
    if len(path.encode()) > _PATH_BYTES or longest > _NAME_BYTES:
        message = "a path too long for the file system (at most {path} bytes, {name} per name in it); shorten it"
        raise PydanticCustomError("path_length", message, {"path": _PATH_BYTES, "name": _NAME_BYTES})
    return path


PathText = Annotated[str, AfterValidator(_path_fits)]


def _one_word(identifier: str) -> str:
    """``identifier`` if captions can contain it as written: no edge spaces, no line breaks."""
    if identifier != identifier.strip() or any(c in identifier for c in "\r\n\t"):
        raise PydanticCustomError("identifier_space", "must be a word without spaces at its ends, tabs or line "
                                  "breaks, e.g. sks or ohwx")
    return identifier


Identifier = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS), AfterValidator(_one_word)]


def _has_caption(template: str) -> str:
    """``template`` if it keeps each image's own caption (a template without it would be one caption for all)."""
    if "{caption}" not in template:
        raise PydanticCustomError("template_caption", "must contain {caption} (the image's own caption), e.g. "
                                  "'{identifier} dog, {caption}'; one caption for every image is instance_prompt")
    return template


Template = Annotated[str, AfterValidator(_has_caption)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS)]


class ModelConfig(_Section):
    pretrained: PathText = Field(
        description="hub id, local diffusers-format folder, or single-file .safetensors checkpoint (a Civitai "
        "download) of SD1.x, SD2.x or SDXL, or of a FLUX.1 or SD3.x transformer (with model.base)"
    )
    base: PathText | None = Field(
        None, description="for a FLUX.1 or SD3.x transformer file only: the model of its family (hub id or diffusers "
        "folder) whose text encoders, tokenizers, VAE and scheduler go with it, e.g. black-forest-labs/FLUX.1-dev or "
        "stabilityai/stable-diffusion-3.5-medium; model.revision and model.variant then apply to it"
    )
    bundled_text_encoders: bool = Field(
        True, description="for a FLUX.1 or SD3.x transformer file that bundles text encoders (ComfyUI's and "
        "Stability's all-in-one files: text_encoders.clip_l / clip_g / t5xxl): true uses them (their weights are "
        "read from the file, model.base's are not), false uses model.base's as for a file without them"
    )
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    allow_unsafe_pickle: bool = Field(
        False, description="also load .bin/.ckpt pickle weights (with torch's weights_only); safetensors otherwise"
    )
    vae: PathText | None = Field(
        None, description="a VAE in place of the model's own: hub id, diffusers folder or single .safetensors file "
        "(e.g. the fp16-fix VAE of SDXL)"
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="what the model predicts, where its files cannot tell (SD2 768-v and v-pred SDXL "
        "single files); default: read from the model"
    )
    quantize: Literal["none", "nf4", "fp8"] = Field(
        "none", description="store the frozen UNet / transformer in fewer bytes under the fp32 LoRA: nf4 (4-bit "
        "NF4 with bitsandbytes, QLoRA-style; ~0.52 bytes a weight) or fp8 (e4m3 storage, computed in the "
        "mixed-precision dtype, norms kept); FLUX.1-dev's transformer: bf16 22.2 GiB, fp8 14.1, nf4 5.7"
    )
    quantize_text_encoders: Literal["none", "nf4", "fp8"] = Field(
        "none", description="the same for the text encoders (linear layers; embeddings, norms and T5's fp32 'wo' "
        "kept): T5-XXL (FLUX.1, SD3) 9.1 GiB in bf16, 5.7 fp8, 4.1 nf4, on the GPU while captions are encoded"
    )
    clip_skip: int = Field(
        1, ge=1, le=12, description="which text-encoder layer conditions the UNet, counted from the end as "
        "AUTOMATIC1111 and kohya do: 1 the last, 2 the penultimate (anime SD1.x models); SD1.x and SD2.x"
    )


class ConceptConfig(_Section):
    """One subject of a run with several (``data.concepts``)."""

    instance_dir: PathText = Field(description="folder of this subject's images")
    identifier: Identifier = Field(description="the rare word that names this subject, e.g. sks")
    instance_prompt: str | None = Field(
        None, description="caption for its images without one, e.g. 'a photo of {identifier} dog' ({identifier} "
        "is replaced by this concept's identifier)"
    )
    class_prompt: str | None = Field(None, description="its class prompt with prior.enabled, e.g. 'a photo of a dog'")
    class_dir: PathText | None = Field(None, description="its class images; default: a cache folder, generated")
    repeats: int | None = Field(
        None, ge=1, le=10**6, description="how often each of its images appears per epoch; default: balanced "
        "with the other concepts (data.balance_concepts), else data.repeats"
    )
    caption_template: Template | None = Field(
        None, description="wraps every caption of its images; default: data.caption_template: {caption} is the image's own caption (metadata.jsonl, "
        ".txt or the instance prompt), {identifier} the identifier, e.g. '{identifier} dog, {caption}' (kohya's "
        "caption_prefix / caption_suffix)"
    )


@dataclass(frozen=True)
class Concept:
    """One subject of a run as the code works with it (``Config.concepts()``): a concept of ``data.concepts``,
    or the one subject of ``data.*`` and ``prior.class_prompt`` / ``prior.class_dir``."""

    key: str  # the recipe key its settings are under: "data" or "data.concepts[1]"
    identifier: str
    instance_dir: str | None
    dataset: str | None  # data.dataset (a concept of data.concepts always has a folder)
    instance_prompt: str | None
    class_prompt: str | None
    class_dir: str | None
    repeats: int | None  # its own repeats; None: data.repeats, or balanced (data.balance_concepts)
    caption_template: str | None = None  # its own, else data.caption_template

    def key_of(self, name: str) -> str:
        """The recipe key of its setting ``name`` as the user writes it: ``data.concepts[1].class_prompt``, or
        for the subject of ``data.*`` ``data.instance_dir`` and ``prior.class_prompt``."""
        if self.key == "data" and name in ("class_prompt", "class_dir"):
            return f"prior.{name}"
        return f"{self.key}.{name}"


class DataConfig(_Section):
    instance_dir: PathText | None = Field(
        None, description="folder of subject images (imagefolder layout or plain images); or data.dataset"
    )
    dataset: PathText | None = Field(
        None, description="a Hugging Face dataset in place of data.instance_dir: hub id, local imagefolder or "
        "save_to_disk folder, or .parquet / .arrow files"
    )
    dataset_split: Name = Field("train", description="the split of data.dataset to train on")
    image_column: Name | None = Field(None, description="data.dataset's image column; default: its one image column")
    caption_column: Name | None = Field(
        None, description="data.dataset's caption column; default: text, caption or prompt if it has one, else "
        "data.instance_prompt for every image"
    )
    caption_template: Template | None = Field(
        None, description="wraps every caption of the instance images (each concept's own wins): {caption} is the image's own caption (metadata.jsonl, "
        ".txt or the instance prompt), {identifier} the identifier, e.g. '{identifier} dog, {caption}' (kohya's "
        "caption_prefix / caption_suffix)"
    )
    identifier: Identifier | None = Field(None, description="the rare word that names the subject, e.g. sks "
                                          "(required unless data.concepts)")
    concepts: list[ConceptConfig] = Field(
        default_factory=list, max_length=100, description="several subjects in one run, each {instance_dir, "
        "identifier, instance_prompt, class_prompt, class_dir, repeats}; in place of data.instance_dir, "
        "data.identifier and data.instance_prompt (prior.class_prompt / class_dir then per concept)"
    )
    balance_concepts: bool = Field(
        True, description="with data.concepts: repeat each concept's images so that every concept is seen about "
        "equally often per epoch, whatever its number of photos (a concept's own repeats wins)"
    )
    instance_prompt: str | None = Field(
        None, description="caption for images without one in metadata.jsonl, e.g. 'a photo of {identifier} dog' "
        "({identifier} is replaced by data.identifier)"
    )
    resolution: int | None = Field(None, ge=64, le=4096, multiple_of=8, description="default: the model's own")
    center_crop: bool = Field(True, description="false: a random square crop each step (not with aspect_buckets)")
    random_flip: bool = False
    repeats: int = Field(1, ge=1, le=10**6, description="how often each instance image appears per epoch (with "
                         "data.concepts: times each concept's balancing)")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability of training an image with an empty "
                                   "caption (kohya's caption_dropout_rate)")
    shuffle_tags: bool = Field(False, description="shuffle each caption's comma-separated tags every step")
    keep_tokens: int = Field(0, ge=0, le=1000, description="with shuffle_tags: the first N tags stay in place "
                             "(kohya's keep_tokens; 1 keeps the identifier tag first)")
    masked_loss: bool = Field(False, description="weight the loss by each image's mask: its alpha channel or "
                              "NAME.mask.png beside it (white = subject)")
    unmasked_weight: float = Field(0.0, ge=0, le=1, description="with masked_loss: the loss weight outside the mask")
    validation_dir: PathText | None = Field(None, description="held-out images for train.validation_every (same "
                                            "layout as data.instance_dir)")
    aspect_buckets: bool = Field(
        False,
        description="train each image at the aspect-ratio bucket of `sdtune prep --crop bucket` nearest its own "
        "(resized to cover it, centre-cropped; data.center_crop is not used); batches never mix buckets",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.concepts:
            given = [k for k in ("instance_dir", "dataset", "identifier", "instance_prompt") if getattr(self, k)]
            if given:
                raise PydanticCustomError(
                    "data_concepts", "data.concepts: each concept names its subject's folder, identifier and "
                    "prompt; remove {keys} (or move it into a concept)",
                    {"keys": ", ".join(f"data.{k}" for k in given)})
            names = [c.identifier for c in self.concepts]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise PydanticCustomError("data_concepts_twice", "data.concepts: two concepts have the identifier "
                                          "{names}; give each subject its own word", {"names": ", ".join(twice)})
            return self
        if self.identifier is None:
            raise PydanticCustomError("data_identifier", "data.identifier: required (the rare word that names the "
                                      "subject, e.g. sks), or give data.concepts")
        if (self.instance_dir is None) == (self.dataset is None):
            raise PydanticCustomError(
                "data_source", "give one of data.instance_dir (a folder of photos) or data.dataset (a Hugging Face "
                "dataset){both}", {"both": ", not both" if self.instance_dir else ""})
        return self


class PriorConfig(_Section):
    enabled: bool = False
    class_prompt: str | None = Field(None, description="e.g. 'a photo of a dog'")
    class_dir: PathText | None = Field(None, description="default: a cache folder keyed by model, prompt and size")
    num_class_images: int = Field(100, ge=1, le=10**6)
    loss_weight: float = Field(1.0, ge=0)
    generation_batch_size: int = Field(4, ge=1, le=4096)
    generation_steps: int = Field(30, ge=1, le=10**4)
    generation_guidance: float = Field(7.5, ge=0)


class PivotalConfig(_Section):
    """Pivotal tuning: token embeddings trained with the LoRA (textual inversion beside it)."""

    enabled: bool = Field(False, description="train token embeddings for each identifier with the LoRA")
    new_tokens: int = Field(
        2, ge=0, le=16, description="new tokens per identifier (<sks0><sks1>; prompts still say sks); 0: one "
        "per token of the identifier, starting at its own rows"
    )
    init: str | None = Field(
        None, description="words whose embeddings start the new tokens, e.g. the class noun 'dog'; default: "
        "random, with the spread of the model's own token embeddings"
    )
    learning_rate: float | None = Field(None, gt=0, description="the embeddings' learning rate; default: "
                                        "train.learning_rate")
    fraction: float = Field(
        0.5, gt=0, le=1, description="train the embeddings for this share of train.max_steps, then keep them "
        "fixed while the LoRA goes on (the pivot; diffusers' train_text_encoder_ti_frac)"
    )


class LoraConfig(_Section):
    rank: int = Field(4, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="default: equal to rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Name] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1)
    type: Literal["lora", "loha", "lokr"] = Field(
        "lora", description="loha / lokr: LyCORIS' Hadamard and Kronecker adapters (PEFT's), exported in LyCORIS keys"
    )
    use_dora: bool = False
    train_text_encoder: bool = False
    text_encoder_target_modules: list[Name] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    text_encoder_lr: float | None = Field(None, gt=0, description="default: train.learning_rate")


class TrainConfig(_Section):
    output_dir: PathText = "runs/sdtune"
    seed: Seed = 0
    max_steps: int = Field(400, ge=1, le=10**9)
    batch_size: int = Field(1, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=10**4)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, le=10**9)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "lion8bit", "adamw_schedulefree",
                       "prodigy_schedulefree"] = Field(
        "adamw", description="prodigy, prodigy_schedulefree: set train.learning_rate=1.0 (they find the step "
                             "size); *_schedulefree: a constant train.lr_scheduler; see the recipe docs"
    )
    optimizer_args: dict[Name, bool | int | float | str] = Field(
        default_factory=dict, description="extra keyword arguments of the optimizer, e.g. {d_coef: 2, safeguard_warmup: true}"
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = Field(True, description="encode images once (not with data.center_crop: false)")
    cache_text_embeddings: bool = Field(True, description="encode captions once (when text encoders are frozen)")
    offload_frozen: bool = Field(True, description="keep the VAE / frozen text encoders off the GPU once cached")
    compile: bool = Field(False, description="torch.compile the denoiser (GPU; the first steps are slow)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode: reduce-overhead replays CUDA graphs (one per aspect bucket)"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager / eager trace without generating code (debugging)"
    )
    channels_last: bool = Field(True, description="channels-last UNet memory layout on GPU")
    allow_tf32: bool = True
    noise_offset: float = Field(0.0, ge=0)
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting; 5.0 is usual")
    loss: Literal["mse", "huber", "smooth_l1"] = Field("mse", description="huber / smooth_l1: robust to outliers")
    huber_c: float = Field(0.1, gt=0, description="the Huber / smooth-L1 threshold (kohya's huber_c)")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="how huber_c varies with the timestep, as kohya's huber_schedule"
    )
    ema: bool = Field(False, description="keep an exponential moving average of the LoRA weights; samples and "
                      "the saved LoRA use it")
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_on_cpu: bool = Field(False, description="keep the EMA copy in CPU memory (saves GPU memory)")
    validation_every: int = Field(0, ge=0, description="validation loss on held-out images every N steps; 0: off")
    checkpoint_every: int = Field(500, ge=0, description="0: no intermediate checkpoints")
    checkpoint_every_epochs: int | None = Field(
        None, ge=1, description="a checkpoint every N epochs (passes over the instance images) instead of steps"
    )
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: PathText | None = Field(None, description="'latest' or a checkpoint folder")
    dataloader_workers: int = Field(0, ge=0)
    report_to: Literal["none", "tensorboard", "wandb"] = "tensorboard"
    log_every: int = Field(10, ge=1)
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many NaN/inf steps in a row")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means "no".
        return "no" if v is False else v


class SampleConfig(_Section):
    every: int = Field(0, ge=0, description="render a grid every N steps; 0: only after training")
    every_epochs: int | None = Field(None, ge=1, description="render a grid every N epochs instead of steps")
    prompts: list[str] = Field(
        default_factory=list,
        description="default: the instance prompt and class prompt (of each concept); {identifier} is replaced by "
        "data.identifier (with data.concepts: write the words)",
    )
    negative_prompt: str = ""
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(25, ge=1, le=10**4)
    guidance_scale: float = Field(7.5, ge=0)


class _Config(_Section):
    def to_yaml(self) -> str:
        """The resolved recipe, every key, as YAML (what ``config.yaml`` in a run folder holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved_paths(self) -> _Config:
        """This config with every local path made absolute (a hub id stays as it is): what a run folder stores,
        so that ``sdtune sample``, ``export`` and resume work from any folder."""
        def local(path: str | None, must_exist: bool = True) -> str | None:
            if path is None or (must_exist and not os.path.exists(path)):
                return path
            return os.path.abspath(path)

        m, d, p = self.model, self.data, self.prior  # type: ignore[attr-defined]
        concepts = [c.model_copy(update={"instance_dir": local(c.instance_dir, must_exist=False),
                                         "class_dir": local(c.class_dir, must_exist=False) if p.enabled
                                         else c.class_dir}) for c in d.concepts]
        return self.model_copy(update={
            "model": m.model_copy(update={"pretrained": local(m.pretrained), "vae": local(m.vae), "base": local(m.base)}),
            "data": d.model_copy(update={"instance_dir": local(d.instance_dir, must_exist=False),
                                         "dataset": local(d.dataset), "concepts": concepts,
                                         "validation_dir": local(d.validation_dir, must_exist=False)}),
            # an unused class_dir stays as written: resolved, it would differ between folders for nothing
            "prior": p.model_copy(update={"class_dir": local(p.class_dir, must_exist=False) if p.enabled else p.class_dir}),
        })

    def identifiers(self) -> list[str]:
        """The words that name the run's subjects: ``data.identifier``, or each concept's in order."""
        data = self.data  # type: ignore[attr-defined]
        return [c.identifier for c in data.concepts] if data.concepts else [data.identifier]

    def concepts(self) -> list[Concept]:
        """The run's subjects in order: each of ``data.concepts``, or the one of ``data.*`` (with
        ``prior.class_prompt`` / ``prior.class_dir``)."""
        data, prior = self.data, self.prior  # type: ignore[attr-defined]
        if not data.concepts:
            return [Concept("data", data.identifier, data.instance_dir, data.dataset, data.instance_prompt,
                            prior.class_prompt, prior.class_dir, None, data.caption_template)]
        return [Concept(f"data.concepts[{i}]", c.identifier, c.instance_dir, None, c.instance_prompt, c.class_prompt,
                        c.class_dir, c.repeats, c.caption_template or data.caption_template)
                for i, c in enumerate(data.concepts)]

    def family_options(self, family: families.Family) -> BaseModel | None:
        """The recipe section of ``family``'s own options, None for a family without one."""
        if not family.options_section:
            return None
        if family.options_section not in type(self).model_fields:
            # the tree's sections are read from the registry when this module is imported
            raise SdtuneError(f"{family.options_section}: the {family.label} family was registered after "
                              "sdtune.config was imported, so the recipe tree has no section for its options; "
                              "register it before importing sdtune.config")
        return getattr(self, family.options_section)


def _family_sections() -> dict[str, Any]:
    """One optional section per family with options of its own, named as recipes spell it."""
    return {f.options_section: (f.options, f.options()) for f in families.registered() if f.options_section}


# The whole tree. Built with create_model so that a family's options section comes from the family.
Config = create_model(
    "Config",
    __base__=_Config,
    model=(ModelConfig, ...),
    data=(DataConfig, ...),
    prior=(PriorConfig, PriorConfig()),
    lora=(LoraConfig, LoraConfig()),
    pivotal=(PivotalConfig, PivotalConfig()),
    **_family_sections(),
    train=(TrainConfig, TrainConfig()),
    sample=(SampleConfig, SampleConfig()),
)

SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation for name, field in Config.model_fields.items()  # type: ignore[misc]
}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``train.learning_rate``."""
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.model_fields]


def _did_you_mean(key: str, candidates: list[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    # Match the full dotted key first, then the last part alone (a key put in the wrong section).
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last]
    if not close:
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.75)]
    return f"; did you mean '{close[0]}'?" if close else ""


def _item_model(field: Any) -> type[BaseModel] | None:
    """The section model of a list-of-sections field (``data.concepts``: ConceptConfig), else None."""
    args = getattr(field.annotation, "__args__", ())
    return args[0] if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], _Section) else None


def _located(section: str, loc: tuple) -> tuple[str, Any, str]:
    """(the key as the user writes it, the field it names or None, the key of the section it is in) of an error's
    location: an item of a list of sections is ``data.concepts[1].identifier``, of a list of values
    ``sample.seeds.1``."""
    key, owner = section, section
    cls: type[BaseModel] | None = SECTIONS[section]
    field = None
    for part in loc:
        item = _item_model(field) if isinstance(part, int) and field is not None else None
        if item is not None:
            key, cls, field, owner = f"{key}[{part}]", item, None, f"{key}[{part}]"
            continue
        owner = key
        key += f".{part}"
        field = cls.model_fields.get(str(part)) if cls is not None else None
        cls = None  # a field's value is no section (a list of sections is stepped into above)
    return key, field, owner


def _problem_from_pydantic(section: str, err: dict[str, Any]) -> str:
    key, field, owner = _located(section, err["loc"])
    if err["type"] == "extra_forbidden":
        if owner != section:  # a key in a concept: its own keys are the candidates
            item = _item_model(SECTIONS[section].model_fields[str(err["loc"][0])])
            return f"{key}: unknown key{_did_you_mean(key, [f'{owner}.{k}' for k in item.model_fields])}"
        return f"{key}: unknown key{_did_you_mean(key, all_keys())}"
    if err["type"] == "missing":
        desc = field.description if field is not None else None
        return f"{key}: required{f' ({desc})' if desc else ''}"
    if not err["loc"] and err["msg"].startswith(f"{section}.") and ": " in err["msg"]:
        return err["msg"]  # a section's own check that names the key itself ("data.identifier: required ...")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {_shown(value)})"
    return f"{key}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"


class _NotYaml(ConfigError):
    """Text that PyYAML cannot read (an override value then stays text)."""


class _Refused(Exception):
    """A bound of the YAML loader was hit, at ``line`` (1-based)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that counts alias uses and nesting depth while it composes the document, so that a
    10,000-deep ``[[[...]]]`` is a problem line rather than a RecursionError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0
        self.nodes = 0  # stops a long flat list before PyYAML's pure-Python parser reads all of it

    def compose_node(self, parent: Any, index: Any) -> Any:
        line = self.peek_event().start_mark.line + 1
        self.nodes += 1
        if self.nodes > MAX_VALUES:
            raise _Refused(line, _TOO_MANY)
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(line, f"more than {MAX_ALIASES} aliases (*name); write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(line, f"nested more than {MAX_DEPTH} levels deep; a recipe needs four at most")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML checks few scalars: `2024-13-45`, `!!int abc`, `!!bool x` or a 5000-digit number raise
        # ValueError, KeyError or AttributeError from deep inside it
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(line, f"a number of {len(node.value)} characters; no setting takes one that long")
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            kind = node.tag.rsplit(":", 1)[-1]
            raise _Refused(line, f"{_shown(node.value)} is not a valid YAML {kind}; quote it if it is text") from None


def _key_problem(key: yaml.Node, path: str) -> str | None:
    """Why a mapping key is not a name a recipe can have, None if it is one."""
    where = f" in {path}" if path else ""
    if not isinstance(key, yaml.ScalarNode):
        kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
        return f"a {kind} used as a key{where}; keys are names like max_steps"
    if key.tag != _STR_TAG:
        kind = key.tag.rsplit(":", 1)[-1]
        return f"key {_shown(key.value)}{where} reads as YAML {kind}, not a name; keys are names like max_steps"
    if len(key.value) > MAX_KEY_CHARS:
        return f"a key of {len(key.value)} characters{where}; keys are names like max_steps"
    return None


def _mapping_problems(node: yaml.MappingNode, path: str) -> list[tuple[int, str]]:
    """Keys that are not names, and keys written twice (PyYAML silently keeps the last), with their lines."""
    problems = []
    first: dict[str, int] = {}
    for key, value in node.value:
        line = key.start_mark.line + 1
        if key.tag == _MERGE_TAG:  # `<<: *base`: keys it brings may be overridden here, so they are no duplicates
            continue
        problem = _key_problem(key, path)
        if problem:
            problems.append((line, problem))
        elif key.value in first:
            name = f"{path}.{key.value}" if path else key.value
            fix = "merge the two" if isinstance(value, yaml.MappingNode) else "keep one"
            problems.append((line, f"'{name}' appears twice (first on line {first[key.value]}); {fix}"))
        else:
            first[key.value] = line
    return problems


def _node_problems(root: yaml.Node) -> list[tuple[int, str]]:
    """Walk the composed document with aliases expanded, as building and validating it would, stopping early
    past MAX_VALUES; check each mapping's keys once."""
    problems: list[tuple[int, str]] = []
    checked: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    count = 0
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            problems.append((node.start_mark.line + 1, _TOO_MANY))
            break
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, path) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            if id(node) not in checked:
                checked.add(id(node))
                problems.extend(_mapping_problems(node, path))
            for key, value in node.value:
                named = isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG
                stack.append((value, (f"{path}.{key.value}" if path else key.value) if named else path))
    return problems


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, str]:
    """PyYAML's error, which spans several lines, as (line, one-line reason)."""
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        return line, f"character #x{e.character:04x} is not allowed in YAML; remove it"
    mark = getattr(e, "problem_mark", None)
    reason = "; ".join(str(r) for r in (getattr(e, "context", None), getattr(e, "problem", None)) if r) or str(e)
    return (mark.line + 1 if mark else 0), f"not valid YAML ({' '.join(reason.split())})"


def _load_yaml(text: str, where: str, lines: bool = True) -> Any:
    """``text`` read as YAML within the bounds above; every problem raised as one ConfigError line starting
    with ``where`` (and the line, with ``lines``)."""

    def line(n: int, message: str) -> str:
        return f"{where}{f' line {n}' if lines and n else ''}: {message}"

    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError([line(0, f"longer than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a few KiB")])
    loader = None
    try:
        loader = _RecipeLoader(text)  # which refuses control characters at once
        root = loader.get_single_node()
        problems = _node_problems(root) if root is not None else []
        if problems:
            raise ConfigError([line(n, message) for n, message in sorted(problems, key=lambda p: p[0])])
        return loader.construct_document(root) if root is not None else None
    except _Refused as e:
        raise ConfigError([line(e.line, str(e))]) from None
    except yaml.YAMLError as e:
        raise _NotYaml([line(*_yaml_problem(e, text))]) from None
    except RecursionError:  # a backstop: the bounds above are meant to stop any document before this
        raise ConfigError([line(0, "nested too deeply to read; simplify it")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` -> (["train", "learning_rate"], 0.0001); the value is read as YAML, within
    the same bounds as a recipe."""
    shown = _shown(text)
    if "=" not in text:
        raise SdtuneError(f"override {shown}: expected key=value, e.g. train.max_steps=800")
    key, _, raw = text.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not all(parts) or any(len(part) > MAX_KEY_CHARS for part in parts):
        raise SdtuneError(f"override {shown}: bad key {_shown(key)}; keys are dotted names like train.max_steps")
    try:
        value = _load_yaml(raw, f"override {shown}", lines=False) if raw.strip() else None
    except _NotYaml:
        value = raw  # text that is not YAML, e.g. a prompt with ': ' in it, is meant as that text
    return parts, _meant_as_text(raw, value)


def _meant_as_text(raw: str, value: Any) -> Any:
    """An override's value where YAML reads a command line otherwise than it was typed: a prompt holding ': '
    (YAML: a mapping, unless written in braces) or ' #' (YAML: the rest is a comment, silently dropped) is that
    text. Quoted values and flow collections ([...], {...}) are YAML's."""
    text = raw.strip()
    if not text or text[0] in "'\"[{":
        return value
    if isinstance(value, dict):
        return text
    if ("#" in text and (text.startswith("#") or " #" in text or "\t#" in text)
            and (value is None or isinstance(value, str))):
        return text
    return value


def _read_text(p: Path) -> str:
    """The recipe file's text; a folder, a device, an unreadable, oversized or non-UTF-8 file is one line."""
    if p.is_dir():
        raise SdtuneError(f"recipe {p}: is a folder; give the .yaml file, e.g. recipes/sd15_dreambooth_lora.yaml")
    if not p.exists():
        raise SdtuneError(f"recipe {p}: no such file")
    if not p.is_file():
        raise SdtuneError(f"recipe {p}: not a regular file; give a .yaml file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # no more than that, whatever the file's size
    except OSError as e:
        raise SdtuneError(f"recipe {p}: cannot be read ({e.strerror}); check its permissions") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise SdtuneError(f"recipe {p}: larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a few KiB of YAML")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SdtuneError(f"recipe {p}: UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SdtuneError(f"recipe {p}: not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}, "
                          f"line {line}); save it as UTF-8") from None


def shipped_recipes() -> Path | None:
    """The recipes that ship inside the package (the repository's ``recipes/``, package data), or None."""
    folder = Path(__file__).resolve().parent / "recipes"  # in a checkout, a link to ../recipes
    return folder if folder.is_dir() else None


def find_recipe(recipe: str | os.PathLike) -> Path:
    """The recipe file ``recipe`` names: the file itself when it exists; else a shipped recipe, by its name
    (``sd15_dreambooth_lora_prior``, with or without ``.yaml``) or as this README writes it
    (``recipes/sd15_dreambooth_lora_prior.yaml``), so a pip-installed sdtune runs the README's commands from any
    folder. A name found nowhere is refused with the shipped names."""
    p = Path(recipe)
    shipped = shipped_recipes()
    if p.exists() or shipped is None:
        return p
    parts = p.parts
    if "recipes" in parts[:-1]:  # recipes/x.yaml, ../recipes/accelerate/x.yaml: what follows the last recipes/
        relative = Path(*parts[len(parts) - 1 - parts[::-1].index("recipes") + 1:])
    elif len(parts) == 1:
        relative = p
    else:
        return p
    for candidate in (shipped / relative, shipped / relative.with_name(relative.name + ".yaml")):
        if candidate.is_file():
            return candidate
    if len(parts) == 1:
        names = sorted(f.stem for f in shipped.glob("*.yaml"))
        close = difflib.get_close_matches(p.stem, names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; shipped recipes: {', '.join(names)}"
        raise SdtuneError(f"recipe {p}: no such file, nor a shipped recipe of that name{hint}")
    return p


def _read_recipe(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = find_recipe(path)
    raw = _load_yaml(_read_text(p), f"recipe {p}")
    if raw is None:  # an empty recipe, or only comments
        return {}
    if not isinstance(raw, dict):
        raise SdtuneError(f"recipe {p}: expected a mapping of sections (model:, data:, train:, ...), "
                          f"got {_shown(raw)}")
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], problems: list[str]) -> None:
    """Set each ``a.b=value`` in ``raw``; a malformed one becomes a problem."""
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        except SdtuneError as e:
            problems.append(str(e))
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or written empty (`train:`) in the recipe
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section (override {_shown(text)})")
                break
            node = child
        else:
            node[parts[-1]] = value
            _replace_alternative(raw, parts, overrides)


# Keys that are ways to say one thing (the photos as a folder, a dataset or a list of concepts; intervals in steps
# or epochs): an override of one replaces the recipe's others, as a user who types it means, unless they are
# overridden too. {key: the keys an override of it replaces}
_ALTERNATIVES = {
    "data.instance_dir": ("data.dataset", "data.concepts"),
    "data.dataset": ("data.instance_dir", "data.concepts"),
    # a concept names its own folder, identifier and prompt
    "data.concepts": ("data.instance_dir", "data.dataset", "data.identifier", "data.instance_prompt"),
    "train.checkpoint_every": ("train.checkpoint_every_epochs",),
    "train.checkpoint_every_epochs": ("train.checkpoint_every",),
    "sample.every": ("sample.every_epochs",),
    "sample.every_epochs": ("sample.every",),
}


def _replace_alternative(raw: dict[str, Any], parts: list[str], overrides: list[str] | tuple[str, ...]) -> None:
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    for other in _ALTERNATIVES.get(".".join(parts), ()):
        section, key = other.split(".")
        if isinstance(raw.get(section), dict) and other not in overridden:
            raw[section].pop(key, None)


def _validate_sections(raw: dict[str, Any], problems: list[str],
                       lenient: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each known section validated on its own, so that an error in one does not hide those in another;
    ``lenient`` receives the sections that are valid but for unknown keys, validated without them."""
    lenient = {} if lenient is None else lenient
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"{name}: unknown section{hint}")
        elif value is not None and not isinstance(value, dict):
            example = next(iter(SECTIONS[name].model_fields), "key")
            problems.append(f"{name}: must be a section of keys (like {name}.{example}), got {_shown(value)}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        required = [k for k, f in cls.model_fields.items() if f.is_required()]
        # a section without required keys (data: a folder and identifier, or data.concepts) says what it needs
        if name not in raw and Config.model_fields[name].is_required() and required:
            problems.append(f"{name}: required section (with {', '.join(f'{name}.{k}' for k in required)})")
        elif isinstance(value, dict):
            try:
                sections[name] = cls.model_validate(value)
            except ValidationError as e:
                problems.extend(_problem_from_pydantic(name, err) for err in e.errors())
                _without_unknown_keys(name, cls, value, e, lenient)
    return sections


def _without_unknown_keys(name: str, cls: type[BaseModel], value: dict, e: ValidationError,
                          lenient: dict[str, Any]) -> None:
    """Put in ``lenient`` the section validated without its unknown keys, when they are all that is wrong."""
    errors = e.errors()
    if all(err["type"] == "extra_forbidden" and len(err["loc"]) == 1 for err in errors):
        unknown = {err["loc"][0] for err in errors}
        with contextlib.suppress(ValidationError):
            lenient[name] = cls.model_validate({k: v for k, v in value.items() if k not in unknown})


# Written in data.instance_prompt (a concept's instance_prompt) and sample.prompts, replaced by data.identifier
# (that concept's identifier) when the recipe is loaded, so that `data.identifier=ohwx` on the command line reaches
# every prompt. Only this exact token is replaced (str.replace, not str.format): any other brace in a prompt is text.
IDENTIFIER_TOKEN = "{identifier}"


def _identifier_problems(sections: dict[str, Any]) -> list[str]:
    """``{identifier}`` in sample.prompts when several concepts could be meant."""
    data, sample = sections.get("data"), sections.get("sample")
    if data is None or sample is None or len(data.concepts) < 2:
        return []
    return [f"sample.prompts: in '{p}', {IDENTIFIER_TOKEN} could be any of the {len(data.concepts)} concepts "
            f"({', '.join(c.identifier for c in data.concepts)}); fix: write the word, e.g. "
            f"'{p.replace(IDENTIFIER_TOKEN, data.concepts[0].identifier)}'"
            for p in sample.prompts if IDENTIFIER_TOKEN in p]


def _filled(prompt: str | None, word: str) -> str | None:
    return prompt.replace(IDENTIFIER_TOKEN, word) if prompt and IDENTIFIER_TOKEN in prompt else prompt


def _with_identifier(sections: dict[str, Any]) -> dict[str, Any]:
    """``sections`` with ``{identifier}`` in the instance prompts and the sample prompts replaced by the
    identifier (each concept's in its own prompt; sample prompts by the one subject's); ``config.yaml``,
    ``sdtune sample`` and resume all see the real word."""
    data, sample = sections["data"], sections["sample"]
    words = [c.identifier for c in data.concepts] or [data.identifier]
    if data.concepts:
        data = data.model_copy(update={"concepts": [
            c.model_copy(update={"instance_prompt": _filled(c.instance_prompt, c.identifier)}) for c in data.concepts]})
    elif data.instance_prompt and IDENTIFIER_TOKEN in data.instance_prompt:
        data = data.model_copy(update={"instance_prompt": _filled(data.instance_prompt, data.identifier)})
    if len(words) == 1 and any(IDENTIFIER_TOKEN in prompt for prompt in sample.prompts):
        sample = sample.model_copy(update={"prompts": [_filled(p, words[0]) for p in sample.prompts]})
    return {**sections, "data": data, "sample": sample}


def load_config(recipe: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe and apply overrides, with ``{identifier}`` in the instance and sample prompts replaced by
    ``data.identifier`` (each concept's in its instance prompt); raise ConfigError listing every structural
    problem."""
    raw = _read_recipe(recipe)
    problems: list[str] = []
    _apply_overrides(raw, overrides, problems)
    lenient: dict[str, Any] = {}
    sections = _validate_sections(raw, problems, lenient)
    problems += _identifier_problems(sections)
    if problems:
        raise ConfigError(problems, _lenient_config(problems, sections, lenient))
    return Config(**_with_identifier(sections))


def _lenient_config(problems: list[str], sections: dict[str, Any], lenient: dict[str, Any]) -> Config | None:
    """The config without its unknown keys, when they are the only problems (else None)."""
    if not lenient or not all(": unknown key" in p for p in problems):
        return None
    try:
        return Config(**_with_identifier({**sections, **lenient}))
    except (ValidationError, SdtuneError):
        return None
