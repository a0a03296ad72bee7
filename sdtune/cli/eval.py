"""``sdtune eval``: the DreamBooth paper's metrics (or the micro world's) per checkpoint and LoRA scale.

The composition root of the evaluation: ``--metrics`` picks the scorer (``sdtune.eval.paper.PaperScorer`` or
``sdtune.micro.measure.WorldScorer``), the run folder and the flags become an ``EvalSpec``, and
``sdtune.eval.run.run_eval`` does the rest. Building the parser imports no torch: the scorers and the renderer
are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdtune.cli.console import (
    device,
    non_negative,
    parse_floats,
    pixels,
    positive_int,
    quiet_libraries,
    text,
)
from sdtune.cli.sample import (
    add_dtype_option,
    add_quantize_options,
    base_model,
    quantization,
    run_dtype,
    run_model_options,
    run_sampling,
    target_loras,
    used_negative_prompt,
    with_size,
)
from sdtune.errors import SdtuneError
from sdtune.eval.core import EvalSpec, Scorer
from sdtune.eval.dreambench import CLIP_T_TOLERANCE, DEFAULT_CLIP, DEFAULT_DINO
from sdtune.eval.prompts import class_noun_from, config_from_metadata, fill, strip_identifier
from sdtune.eval.report import recommendation, table
from sdtune.grid import Settings
from sdtune.runs import (
    cell_by_sdtune,
    check_output_folder,
    grid_by_sdtune,
    run_config,
    run_root,
    safetensors_metadata,
    step_of,
    written_by_sdtune,
)
from sdtune.schedulers import SCHEDULERS

EPILOG = """\
metrics (Ruiz et al. 2022, DreamBooth, Sec. 4.1): DINO and CLIP-I = mean cosine similarity of generated vs.
real subject images (DINO ViT-S/16 CLS token; CLIP image embedding); CLIP-T = each image vs. its prompt with
the identifier removed; DIV = 1 - mean DINO similarity within a prompt (a stand-in for the paper's LPIPS);
PRES (--pres) = DINO of class-prompt images vs. the subject, lower is better.

Real numbers need the real metric models (facebook/dino-vits16, openai/clip-vit-base-patch32: downloaded once
from the Hugging Face Hub, or local folders via --dino/--clip). Paper, Table 1 (30 subjects): real images DINO
0.774 / CLIP-I 0.885; DreamBooth on Stable Diffusion 0.668 / 0.803 / CLIP-T 0.305; Textual Inversion 0.569 /
0.780 / 0.255. Recommendation: the highest DINO whose CLIP-T is within --clip-t-tolerance of the best.
"""


def add_commands(sub: Any) -> None:
    """Add ``eval`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("eval", help="the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T) per checkpoint and scale",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder, checkpoint folder or LoRA .safetensors file")
    p.add_argument("--subject-dir", metavar="DIR",
                   help="--metrics paper: the real subject photos (default: the run's data.instance_dir or "
                        "data.dataset, or the --identifier concept's folder); --metrics world reads none")
    p.add_argument("--prompts", default="dreambench", metavar="dreambench|FILE",
                   help="'dreambench' (the paper's 25 prompts) or a file: one prompt per line, with {} for "
                        "'<identifier> <class>' or {identifier} and {class}; blank lines and lines starting with '#' "
                        "(comments) are skipped, as in sample --prompts-file")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--live", dest="kind", action="store_const", const="live",
                      help="DreamBench's live-subject prompts (default for dogs, cats, people, ...)")
    kind.add_argument("--object", dest="kind", action="store_const", const="object",
                      help="DreamBench's object prompts (default for other classes)")
    p.add_argument("--identifier", type=text, help="default: the run's data.identifier (a LoRA file outside its run: "
                   "its metadata's modelspec.trigger_phrase); with data.concepts it picks the concept (default: the "
                   "first)")
    p.add_argument("--class-noun", type=text, help="default: from prior.class_prompt ('a photo of a dog' -> dog), else the "
                   "word after the identifier in data.instance_prompt (a LoRA file outside its run: in a caption of "
                   "its metadata's ss_tag_frequency)")
    p.add_argument("--images-per-prompt", type=positive_int, default=4, metavar="N", help="seeds 0..N-1 for every prompt (paper: 4)")
    p.add_argument("--checkpoints", choices=("all",), help="one row per saved checkpoint of the run")
    p.add_argument("--lora-scale", default="1", metavar="LIST",
                   help="comma list; 0 is the base model (rendered once, shared by every checkpoint)")
    p.add_argument("--pres", action="store_true",
                   help="also draw the class prompt (--images-per-prompt images per row) and report PRES")
    p.add_argument("--class-prompt", type=text, help="for --pres (default: prior.class_prompt, else 'a photo of a <class>')")
    p.add_argument("--dino", default=DEFAULT_DINO, metavar="MODEL", help=f"DINO ViT model, hub id or folder (default {DEFAULT_DINO})")
    p.add_argument("--clip", default=DEFAULT_CLIP, metavar="MODEL", help=f"CLIP model, hub id or folder (default {DEFAULT_CLIP})")
    p.add_argument("--clip-t-tolerance", type=non_negative, default=CLIP_T_TOLERANCE, metavar="X",
                   help="how much CLIP-T the recommendation may give up for DINO (default %(default)s)")
    p.add_argument("--metrics", choices=("paper", "world"), default="paper",
                   help="paper: DINO / CLIP-I / CLIP-T (needs the metric models); world: runs on the micro model, "
                        "scored from pixels by the micro world's detector (subject, context, class drift), offline")
    p.add_argument("--world-prompts", type=positive_int, default=8, metavar="N",
                   help="--metrics world: how many subject-in-a-new-context prompts (default %(default)s)")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--steps", type=positive_int, help="sampler steps per image (default 25; world: 20)")
    p.add_argument("--guidance", type=non_negative, help="default: the run's sample.guidance_scale where the run set "
                   "one other than its family's, else 7.5; world: 4; FLUX / SD3: their own (3.5 / 7.0)")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="dpmpp_2m")
    p.add_argument("--negative-prompt", type=text, help="default: the run's sample.negative_prompt, else none")
    p.add_argument("--width", type=pixels, help="default: the run's resolution, else the model's")
    p.add_argument("--height", type=pixels)
    p.add_argument("--batch-size", type=positive_int, default=1, help="seeds rendered per pipeline call")
    add_dtype_option(p)
    add_quantize_options(p)
    p.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    p.add_argument("--out", metavar="DIR", help="report folder (default: eval/ in the run folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files of the same names that sdtune did not write")
    p.set_defaults(func=cmd_eval)


def _paper_flags(args: argparse.Namespace) -> list[str]:
    """The flags of ``--metrics paper`` that were given (``--metrics world`` reads none of them)."""
    given = {"--prompts FILE": args.prompts != "dreambench", "--pres": args.pres, "--dino": args.dino != DEFAULT_DINO,
             "--clip": args.clip != DEFAULT_CLIP, "--live / --object": args.kind is not None,
             "--clip-t-tolerance": args.clip_t_tolerance != CLIP_T_TOLERANCE}
    return [flag for flag, on in given.items() if on]


def make_scorer(args: argparse.Namespace) -> Scorer:
    """The scorer that ``--metrics`` names, with its flags (a flag of the other scorer's is refused)."""
    if args.metrics == "world":
        if _paper_flags(args):
            raise SdtuneError(f"{', '.join(_paper_flags(args))}: not read by --metrics world, which draws its own "
                              "subject prompts (--world-prompts N) and the class prompt, and scores them with the "
                              "micro world's detector; drop them, or use --metrics paper")
        from sdtune.micro.measure import WorldScorer

        return WorldScorer(n_prompts=args.world_prompts)
    from sdtune.eval.paper import PaperScorer

    return PaperScorer(prompts=args.prompts, kind=args.kind, dino=args.dino, clip=args.clip,
                       clip_t_tolerance=args.clip_t_tolerance, pres=args.pres)


def check_world_model(model: str, revision: str | None, base: str | None = None) -> None:
    """Refuse ``--metrics world`` on a model that cannot be the micro model (config files only): its detector
    reads the micro world's shapes and colours from 64 px pictures, and on any other model's images its
    numbers and recommendation mean nothing. The micro model's kind is SD1.x, 64 px, with a 32-wide CLIP text
    encoder (``sdtune.micro.model``); config files cannot tell a pretrained micro model from a random one of
    those shapes (the tests' tiny SD1.x model is one)."""
    from sdtune.micro import model as micro
    from sdtune.models import describe, model_files

    files = model_files(model, revision, None, base)
    info = describe(files, for_training=False)
    spec = info.family.text_encoders[0]
    width = files.read(f"{spec.name}/config.json").get("hidden_size")
    if (info.family.name, info.resolution, width) == (micro.FAMILY, micro.RESOLUTION, micro.TEXT_WIDTH):
        return
    raise SdtuneError(f"--metrics world: {model} is not the micro model (it is {info.family.label} at "
                      f"{info.resolution} px with a {width}-wide text encoder; the micro model is SD1.x at "
                      f"{micro.RESOLUTION} px, {micro.TEXT_WIDTH} wide): the micro world's detector means nothing "
                      "on its images; use --metrics paper")


def _dataset_photos(data: dict) -> str | None:
    """The folder of a run's ``data.dataset`` images (None for a run without one): sdtune's cache of it, which
    training wrote, or written again from the dataset."""
    if not data.get("dataset"):
        return None
    from sdtune.hfdata import materialize

    problems: list[str] = []
    folder = materialize(data["dataset"], data.get("dataset_split") or "train", data.get("image_column"),
                         data.get("caption_column"), data.get("instance_prompt"), problems)
    if folder is None:
        raise SdtuneError(f"--subject-dir: the run's {problems[0]}; or pass --subject-dir DIR with the "
                          "photos")
    return str(folder)


def _one_concept(args: argparse.Namespace, run_cfg: dict) -> dict:
    """``run_cfg`` as if it had trained one subject: with ``data.concepts``, the one ``--identifier`` names (default
    the first, said in one line), its folder, instance prompt and class prompt in ``data.*`` and ``prior.*``."""
    data = run_cfg.get("data") or {}
    concepts = data.get("concepts") or []
    if not concepts:
        return run_cfg
    words = [c.get("identifier") for c in concepts]
    owner = "the LoRA file" if "folder_names" in data else "the run"  # a file outside its run: its trigger words
    if args.identifier and args.identifier not in words:
        raise SdtuneError(f"--identifier: '{args.identifier}' is none of {owner}'s concepts ({', '.join(words)}); "
                          f"pass one of them")
    if not args.identifier:
        print(f"{owner} has {len(concepts)} concepts ({', '.join(words)}): evaluating {words[0]}; pass "
              "--identifier to choose another")
    chosen = concepts[words.index(args.identifier or words[0])]
    keys = ("identifier", "instance_dir", "instance_prompt")
    return {**run_cfg, "data": {**data, "concepts": [], **{k: chosen.get(k) for k in keys}},
            "prior": {**(run_cfg.get("prior") or {}), "class_prompt": chosen.get("class_prompt")}}


def target_config(target: Path) -> dict:
    """The config of the run ``target`` belongs to (``run_config``), else, for a LoRA file outside any run, what its
    metadata says of its subject (``config_from_metadata``: the identifier, a caption, its folders' names)."""
    return run_config(target) or (config_from_metadata(safetensors_metadata(target)) if target.is_file() else {})


def _subject(args: argparse.Namespace, target: Path, run_cfg: dict,
             photos: bool = True) -> tuple[str, str, str | None]:
    """(identifier, class noun, subject folder) from the flags, else the run's config (of one concept:
    ``_one_concept``; a LoRA file outside its run: ``target_config``). ``photos``: whether the scorer reads the
    subject photos (``Scorer.subject_photos``); if not, the folder is None and neither looked for nor asked."""
    data = run_cfg.get("data") or {}
    from_file = target.is_file() and ("folder_names" in data or not run_cfg)  # a LoRA file outside its run
    identifier = args.identifier or data.get("identifier")
    if not identifier:
        says = " (its metadata has no modelspec.trigger_phrase)" if from_file else ""
        raise SdtuneError(f"--identifier: {target} does not say its identifier{says}; pass --identifier WORD, the "
                          "rare word it was trained with")
    class_noun = args.class_noun or class_noun_from(run_cfg)
    if not class_noun:
        names = (f"{target}'s metadata names no class (no caption '... {identifier} <class>' in ss_tag_frequency)"
                 if from_file else "the run's config names no class (prior.class_prompt)")
        raise SdtuneError(f"--class-noun: {names}; pass --class-noun dog")
    if not args.class_noun and len(class_noun.split()) > 3:
        raise SdtuneError(f"--class-noun: '{class_noun}' (from prior.class_prompt) is not a class noun; "
                          "pass --class-noun dog")
    if not photos:
        if args.subject_dir:
            print(f"note: --subject-dir is not read: --metrics {args.metrics} scores the images without subject "
                  "photos", file=sys.stderr)
        return identifier, class_noun, None
    return identifier, class_noun, _subject_dir(args, target, data)


def _subject_dir(args: argparse.Namespace, target: Path, data: dict) -> str:
    """--subject-dir, else the run's photos (``data.instance_dir``, a ``data.dataset``'s folder)."""
    subject_dir = args.subject_dir or data.get("instance_dir") or _dataset_photos(data)
    if not subject_dir:
        folders = data.get("folder_names")
        names = (f"{target} names its photos' folder{'s' if len(folders) > 1 else ''} "
                 f"({', '.join(repr(f) for f in folders)}) but not where it is" if folders
                 else "the run names no data.instance_dir or data.dataset")
        raise SdtuneError(f"--subject-dir: {names}; pass --subject-dir DIR with the photos")
    if not Path(subject_dir).is_dir():
        source = "--subject-dir" if args.subject_dir else "the run's data.instance_dir"
        raise SdtuneError(f"--subject-dir: {source} {subject_dir} is not a folder here; pass --subject-dir DIR "
                          "with the subject photos")
    return subject_dir


def _settings(args: argparse.Namespace, scorer: Scorer, model: str, revision: str | None, run_cfg: dict,
              base: str | None = None) -> Settings:
    """Sampling settings: the flags, else the scorer's steps, the run's negative prompt and resolution, else the
    model's own size."""
    from sdtune.models import inspect_model

    resolution = (run_cfg.get("data") or {}).get("resolution")
    negative = args.negative_prompt if args.negative_prompt is not None else \
        run_sampling(run_cfg).get("negative_prompt", "")
    sampling = inspect_model(model, revision, for_training=False, base=base).family.sampling
    negative = used_negative_prompt(sampling, negative, args.negative_prompt is not None)  # FLUX.1 has no use for one
    settings = Settings(negative_prompt=negative,
                        steps=args.steps if args.steps is not None else scorer.steps, scheduler=args.scheduler,
                        width=args.width or resolution or 0, height=args.height or resolution or 0,
                        batch_size=args.batch_size)
    return with_size(settings, model, revision, base=base)


def spec_from_args(args: argparse.Namespace, scorer: Scorer) -> EvalSpec:
    """Resolve the run folder and the flags into an EvalSpec (every user mistake is one SdtuneError)."""
    target = Path(args.run)
    if not target.exists():
        raise SdtuneError(f"{target}: no such run folder, checkpoint folder or LoRA file")
    run_cfg = _one_concept(args, target_config(target))  # several concepts: the one --identifier names
    loras = target_loras(target, args.checkpoints)  # a run's files, or a PEFT export's folder
    model_cfg = run_cfg.get("model") or {}
    model = base_model(args.model, target, run_cfg)
    if args.metrics == "world":  # before the subject: what the user must fix first
        check_world_model(model, model_cfg.get("revision"), run_model_options(args.model, run_cfg).get("base"))
    identifier, class_noun, subject_dir = _subject(args, target, run_cfg, scorer.subject_photos)
    templates, prompt_set = scorer.templates(class_noun)
    prompts = list(dict.fromkeys(fill(t, identifier, class_noun) for t in templates))
    for p in prompts:
        if strip_identifier(p, identifier) == p:
            print(f"warning: prompt '{p}' does not contain the identifier '{identifier}'", file=sys.stderr)
    scales = parse_floats(args.lora_scale, "--lora-scale")
    article = "an" if class_noun[0].lower() in "aeiou" else "a"
    class_prompt = (args.class_prompt or (run_cfg.get("prior") or {}).get("class_prompt")
                    or f"a photo of {article} {class_noun}")
    revision = model_cfg.get("revision")
    # base: the FLUX.1 / SD3.x model beside a transformer file; quantize: the run's, unless --quantize
    options = quantization(run_model_options(args.model, run_cfg), args)
    return EvalSpec(
        run=str(target), model=model, loras=loras, steps={label: step_of(label, f) for label, f in loras},  # type: ignore[misc]
        subject_dir=Path(subject_dir) if subject_dir else None, identifier=identifier, class_noun=class_noun,
        prompt_set=prompt_set, prompts=prompts, images_per_prompt=args.images_per_prompt, lora_scales=scales,
        guidance=args.guidance if args.guidance is not None else _guidance(scorer, model, revision,
                                                                           options.get("base"), run_cfg),
        settings=_settings(args, scorer, model, revision, run_cfg, options.get("base")),
        class_prompt=class_prompt, revision=revision, variant=model_cfg.get("variant"),
        dtype=run_dtype(args.dtype, args.device, run_cfg), device=args.device, model_options=options,
    )


def _guidance(scorer: Scorer, model: str, revision: str | None, base: str | None = None,
              run_cfg: dict | None = None) -> float:
    """The guidance the run chose for its grids (``sample.guidance_scale``, where it is not its family's default:
    the SDXL recipe's 5.0), else the scorer's (the paper's 7.5, the micro world's 4), unless the model's family
    samples at its own (FLUX.1-dev 3.5, SD3 7.0): 7.5 is an SD setting, and a guidance-distilled FLUX at 7.5
    draws burnt images."""
    from sdtune.families.base import SamplingDefaults
    from sdtune.models import inspect_model

    own = inspect_model(model, revision, for_training=False, base=base).family.sampling.guidance_scale
    chosen = run_sampling(run_cfg or {}).get("guidance_scale")
    if chosen is not None and float(chosen) != own:
        return float(chosen)
    return scorer.guidance if own == SamplingDefaults().guidance_scale else own


REPORT_FILES = ("report.json", "report.md", "metrics.png")  # what sdtune.eval.report writes into the folder


def _foreign_samples(samples: Path) -> list[Path]:
    """The files in a report's ``samples/`` that eval would replace or delete and sdtune did not write: grid
    pictures, and every ``cell-*`` in the cells folders (old cells are deleted before a checkpoint renders)."""
    if samples.exists() and not samples.is_dir():
        return [samples]
    foreign = [g for g in sorted(samples.glob("*.png")) if not grid_by_sdtune(g)]
    return foreign + [c for c in sorted(samples.glob("*_cells/cell-*")) if not cell_by_sdtune(c)]


def check_report_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse, before anything loads, a report folder that eval cannot or must not write: a file; or a
    non-empty folder that is no earlier eval report, or holds files of the names eval writes that sdtune did
    not write (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out: {out} is a file; eval writes a report folder: give a new folder")
    check_output_folder(out, "--out")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    ours = written_by_sdtune(out / "report.json")
    foreign = [] if ours else [out / f for f in REPORT_FILES if (out / f).exists()]
    foreign += _foreign_samples(out / "samples")
    if not foreign and not ours and not any((out / "samples").glob("*")):
        foreign = [out]  # a folder of other things (photos, another tool's output): no place for a report
    if foreign:
        what = "is a folder that holds no eval report" if foreign[0] == out else "exists and sdtune did not write it"
        raise SdtuneError(f"--out: {foreign[0]} {what}; choose a new or empty folder (or an earlier eval report), or "
                          "pass --overwrite to write the report there anyway")


def cmd_eval(args: argparse.Namespace) -> int:
    from sdtune.eval.run import run_eval

    scorer = make_scorer(args)
    spec = spec_from_args(args, scorer)
    out = Path(args.out) if args.out else run_root(Path(args.run)) / "eval"
    check_report_folder(out, args.overwrite)
    quiet_libraries()
    class_prompt = f" + the class prompt '{spec.class_prompt}'" if scorer.class_images else ""
    print(f"eval ({scorer.name}): {len(spec.loras)} checkpoint(s) x {len(spec.lora_scales)} scale(s) x "
          f"{len(spec.prompts)} prompts ({spec.prompt_set}){class_prompt} x {spec.images_per_prompt} images; "
          f"identifier '{spec.identifier}', class '{spec.class_noun}'")
    rows, best, failures = run_eval(spec, scorer, out)
    print()
    print(table(scorer, rows, best))
    if best is not None:
        print(f"\nrecommended: {recommendation(scorer, best)}: {scorer.rule}")
    plot = ", metrics.png" if (out / "metrics.png").is_file() else ""
    print(f"report: {out / 'report.md'} (report.json{plot}, samples/)")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0
