"""The run recipe: one typed config tree, loaded from YAML plus ``a.b=value`` overrides.

Every structural problem (unknown key with a "did you mean", wrong type, bad range, missing section) is
collected and reported at once, naming the key as the user writes it and the fix; ``sdtune.plan`` then
checks what needs the disk and the model's config files, still before any weight loads. Only the CLI and
``train()`` see the whole tree; everything below takes explicit arguments.

The sections are ``model``, ``data``, ``prior``, ``lora``, ``train``, ``sample``, plus one per model family
that has options of its own (named by ``Family.options_section``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from sdtune import families
from sdtune.errors import SdtuneError

# YAML 1.1 (PyYAML) reads 1e-4 and 1e3 as strings. pydantic's lax mode parses such strings for float fields;
# for int fields (train.max_steps: 1e3) the section validator below turns whole-number ones into numbers.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class ConfigError(SdtuneError):
    """All problems found in a recipe, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _scientific_int(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = str(cls.model_fields[info.field_name].annotation) if info.field_name else ""
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) and "int" in annotation:
            return float(value)  # pydantic takes 1000.0 for an int, and refuses 1.5 with a clear message
        return value


class ModelConfig(_Section):
    pretrained: str = Field(description="hub id or local diffusers-format folder (SD1.x, SD2.x or SDXL)")
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    allow_unsafe_pickle: bool = Field(
        False, description="also load .bin/.ckpt pickle weights (with torch's weights_only); safetensors otherwise"
    )


class DataConfig(_Section):
    instance_dir: str = Field(description="folder of subject images (imagefolder layout or plain images)")
    identifier: str = Field(min_length=1, description="the rare word that names the subject, e.g. sks")
    instance_prompt: str | None = Field(
        None, description="caption for images without one in metadata.jsonl, e.g. 'a photo of sks dog'"
    )
    resolution: int | None = Field(None, ge=64, le=4096, multiple_of=8, description="default: the model's own")
    center_crop: bool = Field(True, description="false: a random square crop each step (not with aspect_buckets)")
    random_flip: bool = False
    repeats: int = Field(1, ge=1, description="how often each instance image appears per epoch")
    aspect_buckets: bool = Field(
        False,
        description="train each image at the aspect-ratio bucket of `sdtune prep --crop bucket` nearest its own "
        "(resized to cover it, centre-cropped; data.center_crop is not used); batches never mix buckets",
    )


class PriorConfig(_Section):
    enabled: bool = False
    class_prompt: str | None = Field(None, description="e.g. 'a photo of a dog'")
    class_dir: str | None = Field(None, description="default: a cache folder keyed by model, prompt and size")
    num_class_images: int = Field(100, ge=1)
    loss_weight: float = Field(1.0, ge=0)
    generation_batch_size: int = Field(4, ge=1)
    generation_steps: int = Field(30, ge=1)
    generation_guidance: float = Field(7.5, ge=0)


class LoraConfig(_Section):
    rank: int = Field(4, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="default: equal to rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1)
    use_dora: bool = False
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    text_encoder_lr: float | None = Field(None, gt=0, description="default: train.learning_rate")


class TrainConfig(_Section):
    output_dir: str = "runs/sdtune"
    seed: int = 0
    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
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
    checkpoint_every: int = Field(500, ge=0, description="0: no intermediate checkpoints")
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: str | None = Field(None, description="'latest' or a checkpoint folder")
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
    prompts: list[str] = Field(default_factory=list, description="default: the instance prompt and class prompt")
    negative_prompt: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)


class _Config(_Section):
    def to_yaml(self) -> str:
        """The resolved recipe, every key, as YAML (what ``config.yaml`` in a run folder holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

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


def _problem_from_pydantic(section: str, err: dict[str, Any]) -> str:
    key = ".".join([section, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(key, all_keys())}"
    if err["type"] == "missing":
        cls = SECTIONS[section]
        desc = cls.model_fields[str(err["loc"][0])].description if err["loc"] else None
        return f"{key}: required{f' ({desc})' if desc else ''}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` -> (["train", "learning_rate"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise SdtuneError(f"override '{text}': expected key=value, e.g. train.max_steps=800")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise SdtuneError(f"override '{text}': bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _read_recipe(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SdtuneError(f"recipe {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SdtuneError(f"recipe {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SdtuneError(f"recipe {p}: expected a mapping of sections (model:, data:, train:, ...)")
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], problems: list[str]) -> None:
    """Set each ``a.b=value`` in ``raw``; a malformed one becomes a problem."""
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except SdtuneError as e:
            problems.append(str(e))
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section (override '{text}')")
                break
            node = child
        else:
            node[parts[-1]] = value


def _validate_sections(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Each known section validated on its own, so that an error in one does not hide those in another."""
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"{name}: unknown section{hint}")
        elif value is not None and not isinstance(value, dict):
            problems.append(f"{name}: must be a section of keys, got {value!r}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if name not in raw and Config.model_fields[name].is_required():
            required = [k for k, f in cls.model_fields.items() if f.is_required()]
            problems.append(f"{name}: required section (with {', '.join(f'{name}.{k}' for k in required)})")
        elif isinstance(value, dict):
            try:
                sections[name] = cls.model_validate(value)
            except ValidationError as e:
                problems.extend(_problem_from_pydantic(name, err) for err in e.errors())
    return sections


def load_config(recipe: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe and apply overrides; raise ConfigError listing every structural problem."""
    raw = _read_recipe(recipe)
    problems: list[str] = []
    _apply_overrides(raw, overrides, problems)
    sections = _validate_sections(raw, problems)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)
