"""The run recipe: one typed config tree, loaded from YAML plus ``a.b=value`` overrides.

Every problem (unknown key, wrong type, bad range, missing folder, missing model, option of another model
family) is collected and reported at once, naming the key as the user writes it and the fix, before any
weights load. Only ``cli.py`` and ``train()`` see the whole tree; everything below takes explicit arguments.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdtune.errors import SdtuneError


class ConfigError(SdtuneError):
    """All problems found in a recipe, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class SDXLConfig(_Section):
    """Options that exist only for SDXL models; setting one for another family is an error."""

    crop_conditioning: bool = Field(True, description="pass each crop's top-left corner as micro-conditioning")
    train_text_encoder_2: bool = Field(True, description="with lora.train_text_encoder, also train encoder 2")


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
    compile: bool = Field(False, description="torch.compile the UNet (GPU; the first steps are slow)")
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


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    prior: PriorConfig = PriorConfig()
    lora: LoraConfig = LoraConfig()
    sdxl: SDXLConfig = SDXLConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[_Section]] = {
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
    return parts, _fix_scientific(value)


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


def _fix_scientific(node: Any) -> Any:
    # YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4"; every recipe author writes it so.
    if isinstance(node, dict):
        return {k: _fix_scientific(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_scientific(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node) if ("e" in node.lower() and node.strip()[0] in "0123456789.+-") else node
        except ValueError:
            return node
    return node


def load_config(recipe: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe and apply overrides; raise ConfigError listing every structural problem."""
    raw = _fix_scientific(_read_recipe(recipe))
    problems: list[str] = []
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

    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"{name}: unknown section{hint}")
        elif value is not None and not isinstance(value, dict):
            problems.append(f"{name}: must be a section of keys, got {value!r}")
    # Validate each section on its own so that an error in one does not hide the errors in another.
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if name not in raw and Config.model_fields[name].is_required():
            required = [k for k, f in cls.model_fields.items() if f.is_required()]
            problems.append(f"{name}: required section (with {', '.join(f'{name}.{k}' for k in required)})")
            continue
        if not isinstance(value, dict):
            continue
        try:
            sections[name] = cls.model_validate(value)
        except ValidationError as e:
            problems.extend(_problem_from_pydantic(name, err) for err in e.errors())
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def class_images_dir(cfg: Config, resolution: int) -> Path:
    """Where class images live: ``prior.class_dir``, or a cache folder shared by runs of the same
    model, prompt and size (so a second run reuses what the first generated)."""
    if cfg.prior.class_dir:
        return Path(cfg.prior.class_dir)
    key = "|".join(
        [cfg.model.pretrained, cfg.model.revision or "", cfg.model.variant or "", cfg.prior.class_prompt or "",
         str(resolution)]
    )
    cache = Path(os.environ.get("SDTUNE_CACHE", Path.home() / ".cache" / "sdtune"))
    return cache / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Checks that look at the disk and the model's config files (never its weights)


class RunPlan(BaseModel):
    """What ``check_run`` found: enough to start training without asking the disk again."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    model: Any  # models.ModelInfo
    resolution: int
    examples: list[Any]  # data.Example
    class_dir: Path | None
    warnings: list[str]


def check_run(cfg: Config) -> RunPlan:
    """Check model presence, data, and options that depend on the model family; raise ConfigError with
    every problem at once. Reads config files and image headers only."""
    from accelerate import init_empty_weights

    from sdtune.data import scan_instance_dir
    from sdtune.models import FAMILY_NAMES, inspect_model

    problems: list[str] = []
    info = None
    try:
        info = inspect_model(cfg.model.pretrained, cfg.model.revision)
    except SdtuneError as e:
        problems.append(str(e))

    scan = scan_instance_dir(cfg.data.instance_dir, cfg.data.identifier, cfg.data.instance_prompt)
    problems += scan.problems
    warnings = list(scan.warnings)
    if cfg.data.instance_prompt and cfg.data.identifier not in cfg.data.instance_prompt:
        problems.append(
            f"data.instance_prompt: '{cfg.data.instance_prompt}' does not contain data.identifier "
            f"'{cfg.data.identifier}'; fix: e.g. 'a photo of {cfg.data.identifier} dog'"
        )

    if cfg.prior.enabled:
        if not cfg.prior.class_prompt:
            problems.append("prior.class_prompt: required with prior.enabled=true; fix: e.g. 'a photo of a dog'")
        elif cfg.data.identifier in cfg.prior.class_prompt.split():
            problems.append(
                f"prior.class_prompt: '{cfg.prior.class_prompt}' contains the identifier "
                f"'{cfg.data.identifier}'; the class prompt names the class only, e.g. 'a photo of a dog'"
            )
    if cfg.data.aspect_buckets and not cfg.data.center_crop:
        warnings.append("data.center_crop=false is not used with data.aspect_buckets=true: each image is "
                        "centre-cropped to its bucket")
    if not cfg.sample.prompts and not (scan.examples or cfg.data.instance_prompt):
        problems.append("sample.prompts: nothing to sample; set sample.prompts")

    if cfg.train.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            problems.append("train.report_to: wandb is not installed; pip install wandb, or use tensorboard")
    resume = cfg.train.resume
    if resume and resume != "latest" and not Path(resume).is_dir():
        problems.append(f"train.resume: {resume} is not a checkpoint folder; use 'latest' or a path")
    earlier = sorted(Path(cfg.train.output_dir).glob("checkpoints/step-*/COMPLETE"))
    if earlier and not resume:
        # Never overwrite an earlier run's checkpoints by starting afresh in the same folder.
        problems.append(
            f"train.output_dir: {cfg.train.output_dir} already holds checkpoints of a run (newest "
            f"{earlier[-1].parent.name}); fix: train.resume=latest to continue it, or another train.output_dir"
        )
    if cfg.train.lr_warmup_steps >= cfg.train.max_steps and cfg.train.lr_warmup_steps > 0:
        problems.append(
            f"train.lr_warmup_steps: {cfg.train.lr_warmup_steps} is not below train.max_steps "
            f"{cfg.train.max_steps}; the run would never reach the full learning rate"
        )

    resolution = cfg.data.resolution
    if info is not None:
        resolution = resolution or info.resolution
        if info.family != "sdxl":
            for key in sorted(cfg.sdxl.model_fields_set):
                problems.append(
                    f"sdxl.{key}: an SDXL-only option, but {cfg.model.pretrained} is an {FAMILY_NAMES[info.family]} "
                    "model; fix: remove it"
                )
        # Check LoRA targets against the real module names, on an empty (meta) skeleton of the UNet.
        from diffusers import UNet2DConditionModel

        from sdtune.models import read_model_file

        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(read_model_file(cfg.model.pretrained, "unet/config.json", cfg.model.revision))
        names = [n for n, _ in unet.named_modules()]
        for target in cfg.lora.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                problems.append(
                    f"lora.target_modules: no UNet module is named '{target}'; "
                    "fix: e.g. [to_k, to_q, to_v, to_out.0] (attention) plus [proj_in, proj_out, ff.net.0.proj, ff.net.2]"
                )
        if cfg.lora.train_text_encoder:
            known = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
            for target in cfg.lora.text_encoder_target_modules:
                if target not in known:
                    problems.append(
                        f"lora.text_encoder_target_modules: CLIP has no module '{target}'; choose from "
                        f"{', '.join(sorted(known))}"
                    )
    if problems:
        raise ConfigError(problems)
    class_dir = class_images_dir(cfg, resolution) if cfg.prior.enabled else None  # type: ignore[arg-type]
    return RunPlan(model=info, resolution=resolution, examples=scan.examples, class_dir=class_dir, warnings=warnings)
