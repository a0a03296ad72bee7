"""Checks of a run that look at the disk and the model's config files, never its weights.

``check_run`` finds the model's family, scans the data, and checks every option that depends on either
(LoRA targets against the real module names, options of another family, prior preservation, the output
folder, resume: the checkpoint, its config and its data), then reports every problem at once, before
``train()`` loads a weight or writes a byte. With ``strict`` every warning is a problem too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdtune import families, transformer_file
from sdtune.config import Concept, Config, ConfigError
from sdtune.data import (
    ClassImages,
    Example,
    Scan,
    concept_repeats,
    has_word,
    image_problems,
    list_images,
    mask_file,
    option_warnings,
    scan_instance_dir,
)
from sdtune.errors import SdtuneError, error_summary
from sdtune.families import Family, ModelFiles, ModelInfo
from sdtune.files import cache_root, existing_ancestor, flush_manifests
from sdtune.fsdp import config_problems as fsdp_problems
from sdtune.hfdata import materialize
from sdtune.identifier import check_identifier
from sdtune.locks import HOLDER, LOCK
from sdtune.models import (
    describe,
    load_tokenizers,
    model_files,
    read_transformer_file,
    vae_problem,
    weight_problems,
    whole_model_identity,
)
from sdtune.optim import is_schedule_free, optimizer_problems
from sdtune.pivotal import config_problems as pivotal_problems
from sdtune.prior import other_class_images
from sdtune.quantize import problems as quantize_problems
from sdtune.quantize import warnings as quantize_warnings
from sdtune.resume import check_resume, fingerprint
from sdtune.runs import WEIGHT_NAME, claimed_by_sdtune, complete_checkpoints
from sdtune.single_file import is_single_file, param_count_problem, read_checkpoint
from sdtune.tokens import truncated_captions
from sdtune.trackers import problems as tracker_problems
from sdtune.validation import check_validation

# what a folder may hold and still count as empty: desktop junk, and the lock of a run that stopped in setup
IGNORED_ENTRIES = {".DS_Store", "Thumbs.db", "desktop.ini", LOCK, HOLDER}


class RunPlan(BaseModel):
    """What ``check_run`` found: enough to start training without asking the disk again."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    model: ModelInfo
    resolution: int
    examples: list[Example]  # every concept's, in the order of Config.concepts() (Example.concept)
    # the (first concept's) folder of the examples: data.instance_dir, or data.dataset written as a folder
    instance_dir: Path
    # prior.class_dir (the first concept's); None: sdtune's cache, named in setup by the model's identity
    class_dir: Path | None
    warnings: list[str]
    # per concept (Config.concepts()): its folder, class_dir (as class_dir above) and repeats per epoch
    instance_dirs: list[Path] = []
    class_dirs: list[Path | None] = []
    repeats: list[int] = []
    data: dict[str, dict] = {}  # the instance images' fingerprint (sdtune.resume.fingerprint)
    resume_from: Path | None = None  # the verified checkpoint train.resume continues
    resume_state: dict = {}  # its state.json
    strict: bool = False  # warnings found later (captions, tokens) stop the run too
    validation: list[Example] = []  # data.validation_dir's held-out examples (sdtune.validation)
    # the model's tokenizers as the token check read them: the run loads these, not its own copies (none: the
    # check could not read them, and the run reads them with the weights). Pivotal tuning adds its tokens to them:
    # a plan starts one run.
    tokenizers: list[Any] = Field(default_factory=list, repr=False, exclude=True)

    @property
    def family(self) -> Family:
        return self.model.family


def class_images_dir(cfg: Config, resolution: int, model_identity: str, concept: Concept | None = None) -> Path:
    """Where a concept's class images live (default: the run's first): its class_dir (``prior.class_dir``), or a
    cache folder shared by runs of the same model (by the identity of its files,
    ``sdtune.models.model_identity``), class prompt, size and generation settings, so a second run reuses what
    the first generated and a changed model never reuses another's images."""
    concept = concept or cfg.concepts()[0]
    if concept.class_dir:
        return Path(concept.class_dir)
    p = cfg.prior
    m = cfg.model  # a quantized model draws other images: its own folder (unquantized keys stay as they were)
    stored = [f"quantize={m.quantize},{m.quantize_text_encoders}"] if (m.quantize, m.quantize_text_encoders) != \
        ("none", "none") else []
    # a T5 prompt length the recipe sets (flux. / sd3.max_sequence_length) draws other images; a model's own
    # (schnell's 256) goes with its identity
    stored += [f"max_sequence_length={v.max_sequence_length}" for _, v in cfg
               if getattr(v, "max_sequence_length", None)]
    key = "|".join([model_identity, m.variant or "", concept.class_prompt or "", str(resolution),
                    str(p.generation_steps), str(p.generation_guidance), *stored])
    return cache_root() / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _class_image_problems(cfg: Config, resolution: int | None) -> list[str]:
    """The images of a user's ``prior.class_dir`` that training would take (the first ``num_class_images``) and
    could not read: said here, before anything is generated into the folder or any weight loads."""
    if not cfg.prior.enabled:
        return []
    return [line for c in cfg.concepts() if c.class_dir and Path(c.class_dir).is_dir()
            for line in image_problems(list_images(c.class_dir)[: cfg.prior.num_class_images], c.key_of("class_dir"),
                                       resolution)]


def base_identity(cfg: Config, family: Family) -> str:
    """The identity of the base model a run reads (``sdtune.models.whole_model_identity``): its files' bytes
    (hashed once per file version), with the recipe's ``model.vae``, ``clip_skip``, ``base`` and
    ``bundled_text_encoders``."""
    m = cfg.model
    return whole_model_identity(m.pretrained, m.revision, family, m.vae, m.clip_skip, m.base, m.bundled_text_encoders)


def class_sets(cfg: Config, class_paths: list[Path]) -> list[ClassImages]:
    """``class_paths`` (``prior.num_class_images`` per concept, in the order of ``Config.concepts()``, as
    ``sdtune.train`` gathers them) as each concept's class images with its class prompt."""
    concepts = cfg.concepts()
    per, rest = divmod(len(class_paths), len(concepts))
    if rest:
        raise ValueError(f"{len(class_paths)} class images for {len(concepts)} concepts")
    return [ClassImages(class_paths[k * per : (k + 1) * per], c.class_prompt or "") for k, c in enumerate(concepts)]


def concept_fingerprint(groups: list[tuple[str, list[tuple[Path, str]]]]) -> dict[str, dict]:
    """``sdtune.resume.fingerprint`` of each concept's (image, caption) pairs, given as (identifier, pairs); with
    several concepts each file is named ``identifier/name`` (two folders may both hold 001.png)."""
    if len(groups) == 1:
        return fingerprint(groups[0][1])
    return {f"{word}/{name}": entry for word, items in groups for name, entry in fingerprint(items).items()}


def class_fingerprint(cfg: Config, class_paths: list[Path]) -> dict[str, dict]:
    """What a checkpoint remembers of the class images: each with its own concept's class prompt."""
    if not class_paths:
        return {}
    return concept_fingerprint([(c.identifier, [(p, s.prompt) for p in s.paths])
                                for c, s in zip(cfg.concepts(), class_sets(cfg, class_paths), strict=True)])


def _data_fingerprint(cfg: Config, examples: list[Example]) -> dict[str, dict]:
    """The instance images' fingerprint, every concept's; with masked loss a mask is data too: a resume refuses
    one edited since (its name: NAME.mask.png)."""
    groups = []
    for k, c in enumerate(cfg.concepts()):
        mine = [e for e in examples if e.concept == k]
        groups.append((c.identifier, [(e.path, e.caption) for e in mine] + [
            (m, "") for e in mine if cfg.data.masked_loss and (m := mask_file(e.path)).is_file()]))
    return concept_fingerprint(groups)


def default_sample_prompts(cfg: Config, examples: list[Example]) -> list[str]:
    """The sample grid's prompts when ``sample.prompts`` is empty: each concept's first caption (else its
    instance prompt), then each class prompt."""
    concepts = cfg.concepts()
    first = {e.concept: e.caption for e in reversed(examples)}
    prompts = [first.get(k, c.instance_prompt) for k, c in enumerate(concepts)] + [c.class_prompt for c in concepts]
    return list(dict.fromkeys(p for p in prompts if p))


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


def _check_concept(cfg: Config, c: Concept, concepts: list[Concept], problems: list[str]) -> None:
    """One subject's prompts and class folder: its instance prompt names it; with prior preservation its class
    prompt names the class only, and its class images are not a subject's photos."""
    prior = cfg.prior
    if c.instance_prompt and not has_word(c.instance_prompt, c.identifier):
        problems.append(
            f"{c.key_of('instance_prompt')}: '{c.instance_prompt}' does not contain {c.key_of('identifier')} "
            f"'{c.identifier}' as a word; fix: e.g. 'a photo of {c.identifier} dog'"
        )
    if not prior.enabled:
        return
    named = [o.identifier for o in concepts if has_word(c.class_prompt or "", o.identifier)]
    if not c.class_prompt:
        problems.append(f"{c.key_of('class_prompt')}: required with prior.enabled=true; fix: e.g. 'a photo of a dog'")
    elif named:
        problems.append(
            f"{c.key_of('class_prompt')}: '{c.class_prompt}' contains the identifier '{named[0]}'; the class "
            "prompt names the class only, e.g. 'a photo of a dog'"
        )
    for other in concepts:
        if c.class_dir and other.instance_dir and Path(c.class_dir).resolve() == Path(other.instance_dir).resolve():
            problems.append(f"{c.key_of('class_dir')}: is {other.key_of('instance_dir')}; class images are other "
                            f"members of the class (a folder of its own, or leave {c.key_of('class_dir')} unset and "
                            "sdtune generates them)")


def _check_concepts(cfg: Config, concepts: list[Concept], problems: list[str]) -> None:
    """With data.concepts: no folder twice, and no run-wide class prompt or folder (each concept has its own)."""
    if not cfg.data.concepts:
        return
    first: dict[Path, Concept] = {}
    for c in concepts:
        folder = Path(c.instance_dir or "").resolve()
        if folder in first:
            problems.append(f"{c.key_of('instance_dir')}: {c.instance_dir} is also "
                            f"{first[folder].key_of('instance_dir')}; fix: give each concept a folder of its own "
                            "photos (one subject per folder)")
        first.setdefault(folder, c)
    for key in ("class_prompt", "class_dir"):
        if getattr(cfg.prior, key):
            problems.append(f"prior.{key}: not used with data.concepts, where each concept has its own; fix: move "
                            f"it into each concept (data.concepts[0].{key}, ...) and remove prior.{key}")


def _check_sample_prompts(cfg: Config, concepts: list[Concept], examples: list[Example], problems: list[str],
                          warnings: list[str]) -> None:
    if not cfg.sample.prompts and not (examples or any(c.instance_prompt for c in concepts)):
        problems.append("sample.prompts: nothing to sample; set sample.prompts")
    words = [c.identifier for c in concepts]
    if len(words) == 1:
        uses = f"data.identifier '{words[0]}'"
        fix = "write {identifier} in it"
    else:
        uses = f"any of the identifiers of data.concepts ({', '.join(words)})"
        fix = "write one of them in it"
    for prompt in cfg.sample.prompts:
        # a recipe's "sks" left in after data.identifier=ohwx: grids of a word that was never trained, silently
        if prompt not in {c.class_prompt for c in concepts} and not any(has_word(prompt, w) for w in words):
            warnings.append(f"sample.prompts: '{prompt}' does not use {uses}, so the grids will not show what was "
                            f"trained; {fix}")


def _check_prompts(cfg: Config, examples: list[Example], problems: list[str], warnings: list[str]) -> None:
    concepts = cfg.concepts()
    for c in concepts:
        _check_concept(cfg, c, concepts, problems)
    _check_concepts(cfg, concepts, problems)
    if cfg.data.aspect_buckets and not cfg.data.center_crop:
        warnings.append("data.center_crop=false is not used with data.aspect_buckets=true: each image is "
                        "centre-cropped to its bucket")
    _check_sample_prompts(cfg, concepts, examples, problems, warnings)


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


def _check_train(cfg: Config, problems: list[str], run_folder: bool = True) -> None:
    t = cfg.train
    if t.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        problems.append("train.report_to: wandb is not installed; pip install wandb, or use tensorboard")
    if run_folder:  # a run starts the tracker (class-images starts none): W&B's API key, before any load
        problems += tracker_problems(t.report_to)
    if run_folder and t.resume and t.resume != "latest" and not Path(t.resume).is_dir():
        problems.append(f"train.resume: {t.resume} is not a checkpoint folder; use 'latest' or a path")
    earlier = complete_checkpoints(t.output_dir) if run_folder else []
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
    if t.ema and is_schedule_free(t.optimizer):
        problems.append(f"train.ema: train.optimizer={t.optimizer} already averages the LoRA weights (the average "
                        "is what it samples and saves); an EMA on top would average its training point instead. "
                        "fix: train.ema=false")
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
                    f"{section}.{key}: {families.article(other.label)} {other.label}-only option, but "
                    f"{cfg.model.pretrained} is {families.article(family.label)} {family.label} model; fix: remove it"
                )
    problems += family.config_problems(cfg)
    side = cfg.data.resolution
    sizes = info.sides_near(side) if side else None
    if sizes:  # FLUX.1's 2x2 packing, SD3's patches: any other side fails at the first step
        problems.append(f"data.resolution: {side} is not a multiple of {info.sample_multiple}, the sides "
                        f"{family.label}'s {family.denoiser_name} takes; fix: data.resolution={' or '.join(map(str, sizes))}")
    try:
        names = family.denoiser_module_names(files)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a damaged config: no module to name
        problems.append(f"model.pretrained: cannot build the {family.denoiser_name} of {cfg.model.pretrained} from "
                        f"its config ({error_summary(e, 120)}); is the model complete?")
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
        files = model_files(m.pretrained, m.revision, m.prediction_type, m.base)
        info = describe(files, for_training=True, prediction_type=m.prediction_type)
    except SdtuneError as e:
        problems.append(str(e))
        return None, None
    tf = read_transformer_file(m.pretrained)
    if "bundled_text_encoders" in m.model_fields_set and not (tf and tf.text_encoders):
        problems.append(f"model.bundled_text_encoders: {Path(m.pretrained).name} bundles no text encoders "
                        "(text_encoders.*): the option is for a FLUX.1 or SD3.x transformer file that does; fix: "
                        "remove it")
    if tf:  # a FLUX.1 or SD3.x transformer file and its base (sdtune.transformer_file): refused without one
        assert m.base and files.folder
        warnings += transformer_file.pair_warnings(tf, m.base, m.revision)
        problems += transformer_file.problems(tf, files.folder, with_vae=not m.vae,
                                              with_text_encoders=m.bundled_text_encoders)
    elif is_single_file(m.pretrained):
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
    problem = info.family.model_option_problem("clip_skip", "model.clip_skip") if m.clip_skip > 1 else None
    if problem:  # the family's rule, which `sdtune sample --clip-skip` shares
        problems.append(problem)
    problem = vae_problem(m.vae) if m.vae else None
    if problem:
        problems.append(problem)
    # the T5 families' section (flow.FlowOptions) may set the prompt length; the run's family then carries it
    tokens = getattr(cfg.family_options(info.family), "max_sequence_length", None)
    return dataclasses.replace(info, family=families.with_prompt_length(info.family, tokens)), files


def _check_tokens(cfg: Config, info: ModelInfo, files: ModelFiles, examples: list[Example],
                  warnings: list[str]) -> list[Any]:
    """What the model's own tokenizers (no weights) say of the run's words: an identifier that is not a single,
    rare token (``sdtune check-token``), a caption (or class prompt) longer than a text encoder reads. Here,
    ``--dry-run`` says them and ``--strict`` refuses them with the other problems. Returns the tokenizers, for
    the run to use (none if they could not be read)."""
    class_prompts = [(k.key_of("class_prompt"), k.class_prompt) for k in cfg.concepts()
                     if cfg.prior.enabled and k.class_prompt]
    m = cfg.model
    try:
        tokenizers = load_tokenizers(m.pretrained, info.family, m.revision, m.base, files.folder)
    except Exception as e:  # the load itself reports a missing or broken tokenizer, with the weights
        warnings.append(f"captions: their length was not checked: the tokenizers of {m.base or m.pretrained} "
                        f"could not be read ({error_summary(e, 120)})")
        return []
    for concept in cfg.concepts():
        report = check_identifier(concept.identifier, tokenizers)
        if report.verdict != "good":
            more = "" if "suggest-tokens" in report.summary else ", `sdtune suggest-tokens`"  # said once
            warnings.append(f"{concept.key_of('identifier')} {report.summary} (see `sdtune check-token "
                            f"{concept.identifier}`{more})")
    identifiers = cfg.identifiers()
    named = [(e.path.name, e.caption, identifiers[e.concept]) for e in examples]
    warnings += truncated_captions(info.family, named + [(key, prompt, None) for key, prompt in class_prompts],
                                   tokenizers)
    return tokenizers


def _scan_concept(cfg: Config, c: Concept, index: int, resolution: int | None) -> tuple[Path | None, Scan]:
    """The folder of one subject's images (its instance_dir, or ``data.dataset`` written once into sdtune's cache
    as such a folder) and its scan; None and the problems if the dataset cannot be written."""
    d = cfg.data
    if c.dataset is None:
        folder, key = Path(c.instance_dir or ""), c.key_of("instance_dir")
    else:
        failed = Scan()
        found = materialize(c.dataset, d.dataset_split, d.image_column, d.caption_column, c.instance_prompt,
                            failed.problems)
        if found is None:
            return None, failed
        folder, key = found, "data.dataset"
    return folder, scan_instance_dir(folder, c.identifier, c.instance_prompt, key=key, resolution=resolution,
                                     masked_loss=d.masked_loss, concept=index,
                                     prompt_key=c.key_of("instance_prompt"), template=c.caption_template)


def _scan_data(cfg: Config, resolution: int | None) -> tuple[list[Path | None], Scan]:
    """Each subject's folder and the scan of all of them (examples in concept order)."""
    folders, scan = [], Scan()
    for index, concept in enumerate(cfg.concepts()):
        folder, found = _scan_concept(cfg, concept, index, resolution)
        folders.append(folder)
        scan.examples += found.examples
        scan.problems += found.problems
        scan.warnings += found.warnings
    return folders, scan


def with_family_defaults(cfg: Config, family: Family) -> Config:
    """``cfg`` with the family's own defaults where the recipe leaves a key unset: ``lora.target_modules``
    (``Family.lora_targets``; FLUX trains its text-stream projections too), ``sample.guidance_scale`` and
    ``prior.generation_guidance`` (``Family.sampling``; FLUX.1-dev: 3.5, for the grids and the class images
    alike). What the run folder records and a resume compares."""
    guidance = family.sampling.guidance_scale
    for section, key in (("sample", "guidance_scale"), ("prior", "generation_guidance")):
        part = getattr(cfg, section)
        if key not in part.model_fields_set and getattr(part, key) != guidance:
            cfg = cfg.model_copy(update={section: part.model_copy(update={key: guidance})})
    if family.lora_targets is None or "target_modules" in cfg.lora.model_fields_set:
        return cfg
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": list(family.lora_targets)})})


def check_run(cfg: Config, strict: bool = False, run_folder: bool = True) -> RunPlan:
    """Check the model, the data, the output folder and every option that depends on them; raise ConfigError
    with every problem at once (with ``strict``, warnings too). Reads config files, safetensors headers,
    images and checkpoint manifests: no weights, and writes nothing but a ``data.dataset``'s images into
    sdtune's cache (once per version of the dataset). ``run_folder=False``: the output folder and a resume
    are not checked (``sdtune class-images`` writes no run)."""
    problems: list[str] = []
    model_warnings: list[str] = []
    tokenizers: list[Any] = []
    info, files = _check_model(cfg, problems, model_warnings)
    if info is not None:
        cfg = with_family_defaults(cfg, info.family)
    # the base model's bytes, hashed only if a check needs them (FSDP's class images, a resume), then once
    identity = functools.cache(lambda: base_identity(cfg, info.family))
    folders, scan = _scan_data(cfg, cfg.data.resolution or (info.resolution if info else None))
    problems += scan.problems + _class_image_problems(cfg, cfg.data.resolution or (info.resolution if info else None))
    warnings = model_warnings + list(scan.warnings) + option_warnings(cfg.data)
    _check_prompts(cfg, scan.examples, problems, warnings)
    validation = check_validation(cfg, cfg.data.resolution or (info.resolution if info else None),
                                  scan.examples, problems, warnings)
    _check_train(cfg, problems, run_folder)
    _check_adapter_type(cfg, problems)
    problems += quantize_problems(cfg.model.quantize, cfg.lora.type, cfg.lora.use_dora)
    problems += quantize_problems(cfg.model.quantize_text_encoders, cfg.lora.type, cfg.lora.use_dora,
                                  "model.quantize_text_encoders", adapters=cfg.lora.train_text_encoder)
    warnings += quantize_warnings(cfg.model.quantize, cfg.train.gradient_checkpointing)
    if cfg.pivotal.enabled:
        problems += pivotal_problems(cfg.identifiers(), cfg.pivotal.new_tokens, cfg.pivotal.init)
    # launched with an FSDP accelerate config: what cannot run sharded; class images made beforehand
    # (`sdtune class-images`) are found in their cache folder, keyed by the model's bytes
    problems += fsdp_problems(cfg, (lambda c: class_images_dir(cfg, cfg.data.resolution or info.resolution,
                                                               identity(), c)) if info else None)
    t = cfg.train  # the optimizer's package, arguments and learning rate, before any weight loads
    found, advice = optimizer_problems(t.optimizer, t.optimizer_args, t.learning_rate,
                                       cfg.lora.text_encoder_lr if cfg.lora.train_text_encoder else None,
                                       t.adam_beta2, t.lr_scheduler, t.max_grad_norm)
    problems += found
    warnings += advice
    precision = precision_problem(cfg.train.mixed_precision)
    if precision:
        problems.append(precision)
    if run_folder:
        _check_output(cfg, problems)
    if info is not None and files is not None:
        _check_family(cfg, info, files, problems)
        warnings += info.family.config_warnings(cfg)  # options this model takes but ignores (FLUX.1-schnell's guidance)
        problems += weight_problems(cfg.model.pretrained, cfg.model.revision)
        if not scan.problems:
            tokenizers = _check_tokens(cfg, info, files, scan.examples, warnings)
        # class images of the user's folder that sdtune made for another prompt or model (by name here; their
        # files' identity is compared again when the run loads the model)
        warnings += [w for c in cfg.concepts() if cfg.prior.enabled and c.class_dir and c.class_prompt
                     for w in [other_class_images(Path(c.class_dir), c.class_prompt, info.pretrained)] if w]
    data = {} if scan.problems else _data_fingerprint(cfg, scan.examples)
    resumed = None
    if cfg.train.resume and not scan.problems and run_folder:
        resumed = check_resume(Path(cfg.train.output_dir), cfg.train.resume, cfg.model_dump(mode="json"), data,
                               problems, warnings, identity if info is not None else None)
    flush_manifests()  # what the checks learnt of each file (hashes, decodes, sizes): a rerun looks it up
    if strict:
        problems += [f"{w} (--strict)" for w in warnings]
    if problems:
        raise ConfigError(problems)
    assert info is not None and all(folders)
    concepts = cfg.concepts()
    class_dirs = [Path(c.class_dir) if cfg.prior.enabled and c.class_dir else None for c in concepts]
    counts = [sum(e.concept == k for e in scan.examples) for k in range(len(concepts))]
    return RunPlan(model=info, resolution=cfg.data.resolution or info.resolution, examples=scan.examples,
                   instance_dir=folders[0], class_dir=class_dirs[0],
                   warnings=warnings, data=data, resume_from=resumed[0] if resumed else None,
                   resume_state=resumed[1] if resumed else {}, strict=strict, validation=validation,
                   instance_dirs=folders, class_dirs=class_dirs, tokenizers=tokenizers,
                   repeats=concept_repeats(counts, [c.repeats for c in concepts], cfg.data.balance_concepts,
                                           cfg.data.repeats))

