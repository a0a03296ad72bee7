"""Checks of a run that look at the disk and the model's config files, never its weights.

``check_run`` finds the model's family, scans the data, and checks every option that depends on either
(LoRA targets against the real module names, options of another family, prior preservation, the output
folder, resume: the checkpoint, its config and its data), then reports every problem at once, before
``train()`` loads a weight or writes a byte. With ``strict`` every warning is a problem too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from sdtune import families
from sdtune.config import Config, ConfigError
from sdtune.data import Example, Scan, has_word, mask_file, option_warnings, scan_instance_dir
from sdtune.errors import SdtuneError
from sdtune.families import Family, ModelFiles, ModelInfo
from sdtune.files import cache_root, existing_ancestor
from sdtune.hfdata import materialize
from sdtune.locks import HOLDER, LOCK
from sdtune.models import describe, model_files, vae_problem, weight_problems
from sdtune.optim import optimizer_problems
from sdtune.resume import check_resume, fingerprint
from sdtune.runs import WEIGHT_NAME, claimed_by_sdtune, complete_checkpoints
from sdtune.single_file import is_single_file, param_count_problem, read_checkpoint
from sdtune.validation import check_validation

# what a folder may hold and still count as empty: desktop junk, and the lock of a run that stopped in setup
IGNORED_ENTRIES = {".DS_Store", "Thumbs.db", "desktop.ini", LOCK, HOLDER}


class RunPlan(BaseModel):
    """What ``check_run`` found: enough to start training without asking the disk again."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    model: ModelInfo
    resolution: int
    examples: list[Example]
    instance_dir: Path  # the folder the examples are in: data.instance_dir, or data.dataset written as a folder
    class_dir: Path | None  # prior.class_dir; None: sdtune's cache, named in setup by the model's identity
    warnings: list[str]
    data: dict[str, dict] = {}  # the instance images' fingerprint (sdtune.resume.fingerprint)
    resume_from: Path | None = None  # the verified checkpoint train.resume continues
    resume_state: dict = {}  # its state.json
    strict: bool = False  # warnings found later (captions, tokens) stop the run too
    validation: list[Example] = []  # data.validation_dir's held-out examples (sdtune.validation)

    @property
    def family(self) -> Family:
        return self.model.family


def class_images_dir(cfg: Config, resolution: int, model_identity: str) -> Path:
    """Where class images live: ``prior.class_dir``, or a cache folder shared by runs of the same model (by
    the identity of its files, ``sdtune.models.model_identity``), prompt, size and generation settings, so a
    second run reuses what the first generated and a changed model never reuses another's images."""
    if cfg.prior.class_dir:
        return Path(cfg.prior.class_dir)
    p = cfg.prior
    key = "|".join([model_identity, cfg.model.variant or "", p.class_prompt or "", str(resolution),
                    str(p.generation_steps), str(p.generation_guidance)])
    return cache_root() / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_output(cfg: Config, problems: list[str]) -> None:
    """The output folder can be written, and holds nothing sdtune did not write there (it writes config.yaml,
    README.md, ... into it: a folder of the user's own files would lose them)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"train.output_dir: {out} is a file; fix: give a folder (it is created if missing)")
        return
    existing = existing_ancestor(out)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"train.output_dir: cannot write in {existing} (permission denied or read-only); fix: "
                        "choose a folder you can write to")
        return
    if out.is_dir() and claimed_by_sdtune(out) and (out / WEIGHT_NAME).is_file() and not complete_checkpoints(out):
        # a finished run without the checkpoints a resume continues: a new run there would replace its LoRA
        problems.append(f"train.output_dir: {out} holds a finished run ({WEIGHT_NAME}) and no checkpoint to resume; "
                        "fix: choose another train.output_dir (or move that run away)")
    if out.is_dir() and not claimed_by_sdtune(out):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in IGNORED_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            problems.append(f"train.output_dir: {out} already holds files that sdtune did not write ({shown}); "
                            "a run writes config.yaml, README.md and more there. fix: choose a new or empty folder")


def _check_prompts(cfg: Config, examples: list[Example], problems: list[str], warnings: list[str]) -> None:
    data, prior = cfg.data, cfg.prior
    if data.instance_prompt and not has_word(data.instance_prompt, data.identifier):
        problems.append(
            f"data.instance_prompt: '{data.instance_prompt}' does not contain data.identifier "
            f"'{data.identifier}' as a word; fix: e.g. 'a photo of {data.identifier} dog'"
        )
    if prior.enabled and not prior.class_prompt:
        problems.append("prior.class_prompt: required with prior.enabled=true; fix: e.g. 'a photo of a dog'")
    elif prior.enabled and data.identifier in (prior.class_prompt or "").split():
        problems.append(
            f"prior.class_prompt: '{prior.class_prompt}' contains the identifier '{data.identifier}'; the class "
            "prompt names the class only, e.g. 'a photo of a dog'"
        )
    if data.aspect_buckets and not data.center_crop:
        warnings.append("data.center_crop=false is not used with data.aspect_buckets=true: each image is "
                        "centre-cropped to its bucket")
    if (prior.enabled and prior.class_dir and data.instance_dir
            and Path(prior.class_dir).resolve() == Path(data.instance_dir).resolve()):
        problems.append("prior.class_dir: is data.instance_dir; class images are other members of the class (a "
                        "folder of its own, or leave prior.class_dir unset and sdtune generates them)")
    if not cfg.sample.prompts and not (examples or data.instance_prompt):
        problems.append("sample.prompts: nothing to sample; set sample.prompts")
    for prompt in cfg.sample.prompts:
        # a recipe's "sks" left in after data.identifier=ohwx: grids of a word that was never trained, silently
        if prompt != prior.class_prompt and not has_word(prompt, data.identifier):
            warnings.append(f"sample.prompts: '{prompt}' does not use data.identifier '{data.identifier}', so the "
                            "grids will not show what was trained; write {identifier} in it")


FP16_ON_CPU = "train.mixed_precision: fp16 needs a GPU; on CPU use bf16 or no"


def precision_problem(mixed_precision: str) -> str | None:
    """Why ``train.mixed_precision`` cannot run on this machine's device, None if it can. Imports torch (only
    here: ``sdtune --help`` must not)."""
    if mixed_precision == "no":
        return None
    import torch

    if not torch.cuda.is_available():
        if mixed_precision == "fp16":
            return FP16_ON_CPU
        return None  # bf16 runs on CPU (slowly, but it runs)
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        return (f"train.mixed_precision: bf16 is not supported by this GPU ({torch.cuda.get_device_name()}); "
                "use fp16 or no")
    return None


def _check_train(cfg: Config, problems: list[str]) -> None:
    t = cfg.train
    if t.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        problems.append("train.report_to: wandb is not installed; pip install wandb, or use tensorboard")
    if t.resume and t.resume != "latest" and not Path(t.resume).is_dir():
        problems.append(f"train.resume: {t.resume} is not a checkpoint folder; use 'latest' or a path")
    earlier = complete_checkpoints(t.output_dir)
    if earlier and not t.resume:
        # Never overwrite an earlier run's checkpoints by starting afresh in the same folder.
        problems.append(
            f"train.output_dir: {t.output_dir} already holds checkpoints of a run (newest {earlier[-1].name}); "
            "fix: train.resume=latest to continue it, or another train.output_dir"
        )
    if t.lr_warmup_steps > 0 and t.lr_warmup_steps >= t.max_steps:
        problems.append(
            f"train.lr_warmup_steps: {t.lr_warmup_steps} is not below train.max_steps {t.max_steps}; the run "
            "would never reach the full learning rate"
        )
    _check_intervals(cfg, problems)


def _check_intervals(cfg: Config, problems: list[str]) -> None:
    """A checkpoint or sample interval in steps and one in epochs are two answers to one question: refused
    together (a step interval left at its default is not an answer; the epoch one is used)."""
    pairs = [(cfg.train, "train.checkpoint_every", "train.checkpoint_every_epochs"),
             (cfg.sample, "sample.every", "sample.every_epochs")]
    for section, steps_key, epochs_key in pairs:
        steps, epochs = (getattr(section, key.split(".")[1]) for key in (steps_key, epochs_key))
        if epochs and steps and steps_key.split(".")[1] in section.model_fields_set:
            problems.append(f"{epochs_key}: {epochs} is set together with {steps_key}: {steps}; choose one. "
                            f"fix: {steps_key}=0 to act every {epochs} epochs, or remove {epochs_key}")


def _check_family(cfg: Config, info: ModelInfo, files: ModelFiles, problems: list[str]) -> None:
    """Options of other families, and LoRA targets against the family's real module names."""
    family = info.family
    for other in families.registered():
        section = other.options_section
        if section and section != family.options_section:
            for key in sorted(getattr(cfg, section).model_fields_set):
                problems.append(
                    f"{section}.{key}: an {other.label}-only option, but {cfg.model.pretrained} is an "
                    f"{family.label} model; fix: remove it"
                )
    try:
        names = family.denoiser_module_names(files)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a damaged config: no module to name
        problems.append(f"model.pretrained: cannot build the {family.denoiser_name} of {cfg.model.pretrained} from "
                        f"its config ({type(e).__name__}: {str(e).splitlines()[0][:120]}); is the model complete?")
        return
    for target in cfg.lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            problems.append(
                f"lora.target_modules: no {family.denoiser_name} module is named '{target}'; fix: e.g. "
                "[to_k, to_q, to_v, to_out.0] (attention) plus [proj_in, proj_out, ff.net.0.proj, ff.net.2]"
            )
    if cfg.lora.train_text_encoder:
        for target in cfg.lora.text_encoder_target_modules:
            if target not in family.text_encoder_targets:
                problems.append(
                    f"lora.text_encoder_target_modules: the {family.label} text encoders have no module "
                    f"'{target}'; choose from {', '.join(sorted(family.text_encoder_targets))}"
                )


def _check_adapter_type(cfg: Config, problems: list[str]) -> None:
    """What ``lora.type`` loha / lokr (PEFT's LoHaConfig, LoKrConfig) cannot do: DoRA, and input dropout
    (PEFT's LoHa and LoKr have only rank and module dropout, which sdtune does not offer)."""
    kind = cfg.lora.type
    if kind == "lora":
        return
    if cfg.lora.use_dora:
        problems.append(f"lora.use_dora: DoRA is LoRA's; PEFT has no DoRA for lora.type={kind}. fix: remove "
                        "lora.use_dora, or lora.type=lora")
    if cfg.lora.dropout:
        problems.append(f"lora.dropout: PEFT's {'LoHa' if kind == 'loha' else 'LoKr'} has no input dropout "
                        f"(lora.dropout={cfg.lora.dropout}); fix: remove lora.dropout, or lora.type=lora")


def _check_model(cfg: Config, problems: list[str], warnings: list[str]) -> tuple[ModelInfo | None, ModelFiles | None]:
    """The base model's family and settings from its config files (a single file's header), and the model.*
    options that depend on them."""
    m = cfg.model
    try:
        files = model_files(m.pretrained, m.revision, m.prediction_type)
        info = describe(files, for_training=True, prediction_type=m.prediction_type)
    except SdtuneError as e:
        problems.append(str(e))
        return None, None
    if is_single_file(m.pretrained):
        ckpt = read_checkpoint(m.pretrained)
        if not ckpt.said_by and not m.prediction_type:
            warnings.append(f"model.prediction_type: {Path(m.pretrained).name} does not say whether it predicts "
                            "noise or v; assuming v_prediction (SD2.x 768-v). fix: set model.prediction_type=epsilon "
                            "for a 512 px SD2.x base model, or v_prediction to silence this")
        if not ckpt.has_vae and not m.vae:
            problems.append(f"model.pretrained: {Path(m.pretrained).name} holds no VAE (first_stage_model.*); "
                            "fix: set model.vae to the VAE it was made for")
        problem = param_count_problem(ckpt, files.folder) if files.folder else None
        if problem:
            problems.append(problem)
    if m.clip_skip > 1 and len(info.family.text_encoders) > 1:
        problems.append(f"model.clip_skip: {info.family.label} conditions on fixed layers of its two text encoders "
                        "(kohya and AUTOMATIC1111 ignore clip skip there); fix: remove it")
    problem = vae_problem(m.vae) if m.vae else None
    if problem:
        problems.append(problem)
    return info, files


def _scan_data(cfg: Config, resolution: int | None) -> tuple[Path | None, Scan]:
    """The folder of the instance images (``data.instance_dir``, or ``data.dataset`` written once into sdtune's
    cache as such a folder) and its scan; None and the problems if the dataset cannot be written."""
    d = cfg.data
    if d.dataset is None:
        folder, key = Path(d.instance_dir), "data.instance_dir"
    else:
        failed = Scan()
        found = materialize(d.dataset, d.dataset_split, d.image_column, d.caption_column, d.instance_prompt,
                            failed.problems)
        if found is None:
            return None, failed
        folder, key = found, "data.dataset"
    return folder, scan_instance_dir(folder, d.identifier, d.instance_prompt, key=key, resolution=resolution,
                                     masked_loss=d.masked_loss)


def check_run(cfg: Config, strict: bool = False) -> RunPlan:
    """Check the model, the data, the output folder and every option that depends on them; raise ConfigError
    with every problem at once (with ``strict``, warnings too). Reads config files, safetensors headers,
    images and checkpoint manifests: no weights, and writes nothing but a ``data.dataset``'s images into
    sdtune's cache (once per version of the dataset)."""
    problems: list[str] = []
    model_warnings: list[str] = []
    info, files = _check_model(cfg, problems, model_warnings)
    folder, scan = _scan_data(cfg, cfg.data.resolution or (info.resolution if info else None))
    problems += scan.problems
    warnings = model_warnings + list(scan.warnings) + option_warnings(cfg.data)
    _check_prompts(cfg, scan.examples, problems, warnings)
    validation = check_validation(cfg, cfg.data.resolution or (info.resolution if info else None),
                                  scan.examples, problems, warnings)
    _check_train(cfg, problems)
    _check_adapter_type(cfg, problems)
    t = cfg.train  # the optimizer's package, arguments and learning rate, before any weight loads
    found, advice = optimizer_problems(t.optimizer, t.optimizer_args, t.learning_rate,
                                       cfg.lora.text_encoder_lr if cfg.lora.train_text_encoder else None,
                                       t.adam_beta2)
    problems += found
    warnings += advice
    precision = precision_problem(cfg.train.mixed_precision)
    if precision:
        problems.append(precision)
    _check_output(cfg, problems)
    if info is not None and files is not None:
        _check_family(cfg, info, files, problems)
        problems += weight_problems(cfg.model.pretrained, cfg.model.revision)
    data = {} if scan.problems else fingerprint([(e.path, e.caption) for e in scan.examples] + [
        # with masked loss a mask is data too: a resume refuses one edited since (its name: NAME.mask.png)
        (m, "") for e in scan.examples if cfg.data.masked_loss and (m := mask_file(e.path)).is_file()])
    resumed = None
    if cfg.train.resume and not scan.problems:
        resumed = check_resume(Path(cfg.train.output_dir), cfg.train.resume, cfg.model_dump(mode="json"), data,
                               problems, warnings)
    if strict:
        problems += [f"{w} (--strict)" for w in warnings]
    if problems:
        raise ConfigError(problems)
    assert info is not None and folder is not None
    return RunPlan(model=info, resolution=cfg.data.resolution or info.resolution, examples=scan.examples,
                   instance_dir=folder,
                   class_dir=Path(cfg.prior.class_dir) if cfg.prior.enabled and cfg.prior.class_dir else None,
                   warnings=warnings, data=data, resume_from=resumed[0] if resumed else None,
                   resume_state=resumed[1] if resumed else {}, strict=strict, validation=validation)

