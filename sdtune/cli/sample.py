"""``sdtune sample``: labelled grids of a run's LoRA (prompts x seeds x LoRA scale x guidance x checkpoint),
and ``--replay`` of one saved cell."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdtune.cli.console import (
    device,
    fraction,
    parse_floats,
    parse_ints,
    pixels,
    positive_int,
    quiet_libraries,
    text,
)
from sdtune.errors import SdtuneError
from sdtune.eval.prompts import prompt_lines
from sdtune.families.base import ModelInfo, SamplingDefaults
from sdtune.models import DTYPES
from sdtune.runs import prompt_length
from sdtune.schedulers import SCHEDULERS

QUANTIZE = ("none", "nf4", "fp8")  # --quantize, --quantize-text-encoders: model.quantize's values
QUANTIZE_KEYS = ("quantize", "quantize_text_encoders")  # model.* keys, and their keys in a request's model_options
# what an option left out is without a run to take it from (a LoRA file outside one, --model alone)
DEFAULT_SEEDS = (0, 1, 2, 3)
DEFAULT_STEPS = 25
DEFAULT_SCHEDULER = "dpmpp_2m"


def add_commands(sub: Any) -> None:
    """Add ``sample`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("sample", help="render a labelled grid with a trained LoRA (rows: prompt x scale)",
                       description="Render a labelled grid (prompts x seeds x LoRA scale x guidance x checkpoint). "
                       "With a run (its folder, a checkpoint folder or a LoRA file inside one), every option left "
                       "out is the run's: its prompts and resolution, its grids' guidance, steps, seeds and "
                       "negative prompt (sample.*), its model options and quantization (model.*) and, on a GPU, "
                       "its mixed precision; `sdtune sample RUN --lora-scale 1` renders the cells of its last "
                       "grid again. A flag given wins. A LoRA file outside a run, or --model alone: the defaults "
                       "below.")
    p.add_argument("target", nargs="?",
                   help="run folder, checkpoint folder or LoRA .safetensors file (none: --model alone, with --out)")
    p.add_argument("--model", help="base model (default: the run's, or the hub id in a LoRA file's metadata)")
    p.add_argument("--prompt", action="append", type=text, help="prompt (repeatable; default: the run's "
                   "sample.prompts, else each concept's instance prompt and class prompt)")
    p.add_argument("--prompts-file", help="one prompt per line; blank lines and lines starting with '#' (comments) "
                   "are skipped")
    p.add_argument("--negative-prompt", type=text, help="default: the run's sample.negative_prompt, else none")
    p.add_argument("--seeds", help="comma list of seeds (whole numbers >= 0; default: the run's sample.seeds, "
                   f"else {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--lora-scale", help="comma list; 0 shows the base model (default: 0,1, "
                   "without and with the LoRA)")
    p.add_argument("--guidance", help="comma list of guidance scales (default: the run's sample.guidance_scale, "
                   "else the model family's: 7.5; FLUX.1: 3.5, SD3.x: 7.0)")
    p.add_argument("--steps", type=positive_int, help=f"default: the run's sample.steps, else {DEFAULT_STEPS}")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS),
                   help=f"default: {DEFAULT_SCHEDULER}, what training's grids use (FLUX.1 and SD3.x sample with "
                   "their own)")
    p.add_argument("--width", type=pixels, help="default: the run's resolution, else the model's")
    p.add_argument("--height", type=pixels)
    p.add_argument("--batch-size", type=positive_int, default=1, help="seeds rendered per pipeline call")
    p.add_argument("--checkpoints", choices=("all",), help="one row per saved checkpoint of the run")
    p.add_argument("--no-lora", action="store_true", help="the base model alone")
    p.add_argument("--init-image", help="image-to-image (or inpainting/outpainting source)")
    p.add_argument("--strength", type=fraction, default=0.75, help="how much of --init-image to repaint (0-1)")
    p.add_argument("--mask", help="inpainting mask, same size as --init-image, white = repaint")
    p.add_argument("--outpaint", help="extend the canvas: N or left,top,right,bottom pixels, then inpaint it")
    p.add_argument("--depth", action="store_true", help="depth-to-image (the base model must be a depth model)")
    add_model_options(p)
    add_dtype_option(p)
    p.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    p.add_argument("--out", help="grid file, .png (default: TARGET/grid.png); its cells go to <name>_cells/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out (and its cells) even if sdtune did not write them")
    p.add_argument("--replay", help="render one cell again from its .json sidecar")
    p.set_defaults(func=cmd_sample)


def run_grid_prompts(run_cfg: dict) -> list[str]:
    """The prompts of the run's own grids: ``sample.prompts``, else (as training's ``default_sample_prompts``) each
    concept's instance prompt, then each concept's class prompt. (Where a concept's photos have captions,
    training's row shows its first caption, which the config does not hold: the instance prompt stands in.)"""
    listed = (run_cfg.get("sample") or {}).get("prompts")
    if listed:
        return list(listed)
    data = run_cfg.get("data") or {}
    concepts = data.get("concepts") or [{"instance_prompt": data.get("instance_prompt"),
                                         "class_prompt": (run_cfg.get("prior") or {}).get("class_prompt")}]
    prompts = [c.get("instance_prompt") for c in concepts] + [c.get("class_prompt") for c in concepts]
    return list(dict.fromkeys(p for p in prompts if p))


def read_prompts(args: argparse.Namespace, run_cfg: dict) -> list[str]:
    """--prompt (repeatable) and --prompts-file (refused when it holds no prompt), else the prompts of the run's
    grids (``run_grid_prompts``)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as e:
            raise SdtuneError(f"--prompts-file: cannot read {args.prompts_file} ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise SdtuneError(f"--prompts-file: {args.prompts_file} is not UTF-8 text (byte {e.start}: {e.reason}); "
                              "save it as UTF-8, one prompt per line") from None
        listed = prompt_lines(text)  # eval --prompts' rule: '#' lines are comments
        if not listed:  # not the run's prompts instead: the file was meant to say which
            raise SdtuneError(f"--prompts-file: {args.prompts_file} holds no prompt; write one prompt per line")
        prompts += listed
    prompts = prompts or run_grid_prompts(run_cfg)
    if not prompts:
        data = run_cfg.get("data") or {}
        identifier = data.get("identifier") or next((c.get("identifier") for c in data.get("concepts") or []), None)
        example = f"a photo of {identifier} ..." if identifier else "a photo of <its identifier> <class>"
        where = "the run has none" if "train" in run_cfg else "a LoRA file outside its run has no grid prompts"
        raise SdtuneError(f"--prompt: no prompt given and {where}; pass --prompt '{example}'")
    return prompts


def base_model(model: str | None, target: Path, run_cfg: dict) -> str:
    """The base model to render with: ``--model``, else the one the run was trained on, else (a LoRA file
    outside any run) the hub id its kohya metadata names."""
    model = model or run_cfg.get("model", {}).get("pretrained")
    if model:
        return model
    peft = peft_folder(target)
    if peft is not None:
        return peft_base_model(peft)
    if target.is_file():
        return lora_base_model(target)
    raise SdtuneError(f"--model: {target} does not say its base model; pass --model HUB_ID_OR_FOLDER")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--base, --vae, --prediction-type, --clip-skip, --quantize(-text-encoders) and --max-sequence-length: the
    recipe's model.* options, for a model given with --model."""
    p.add_argument("--base", help="the FLUX.1 or SD3.x model (hub id or folder) whose text encoders, tokenizers, VAE "
                   "and scheduler go with a transformer file of its family given as --model (default: the run's "
                   "model.base)")
    p.add_argument("--vae", help="a VAE in place of the model's (hub id, folder or .safetensors; default: the run's)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what a single-file model predicts, where the file does not say (default: the run's)")
    p.add_argument("--clip-skip", type=positive_int, help="1: last text-encoder layer, 2: penultimate (default: the "
                   "run's, else 1)")
    add_quantize_options(p)
    p.add_argument("--max-sequence-length", type=positive_int, help="T5 tokens per prompt for FLUX.1 / SD3.x (as "
                   "flux. / sd3.max_sequence_length; default: the run's, else the model's: FLUX.1-dev 512, "
                   "schnell 256, SD3.x 256)")


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    """--quantize and --quantize-text-encoders (``sdtune sample`` and ``eval``): the run's model.quantize and
    model.quantize_text_encoders unless given."""
    p.add_argument("--quantize", choices=QUANTIZE, help="store the UNet / transformer in 4-bit NF4 or fp8 (as "
                   "model.quantize: FLUX.1-dev in 5.7 or 14.1 GiB instead of 22.2), computing in --dtype; default: "
                   "the run's model.quantize (none: full precision)")
    p.add_argument("--quantize-text-encoders", choices=QUANTIZE, help="the same for the text encoders (T5-XXL: "
                   "4.1 GiB in NF4 instead of 9.1 in bf16); default: the run's model.quantize_text_encoders")


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """--dtype (``sdtune sample`` and ``eval``): ``run_dtype`` unless given."""
    p.add_argument("--dtype", choices=DTYPES, help="default: on a GPU the run's train.mixed_precision (fp16 / bf16: "
                   "what its grids computed in), else fp32")


def run_model_options(model: str | None, run_cfg: dict) -> dict:
    """{vae, prediction_type, clip_skip, base, bundled_text_encoders, max_sequence_length, quantize,
    quantize_text_encoders} the run loaded its base model with, where they are not the defaults. Its VAE,
    prediction type, base (the FLUX.1 / SD3.x model beside a transformer file), bundled_text_encoders (false: the
    base's text encoders, not the file's) and the T5 prompt length the run set (``flux.`` /
    ``sd3.max_sequence_length``; only its own family's section can hold one) belong to that model, so they apply
    only when ``model`` (--model) does not name another (which samples at its own length, or
    --max-sequence-length). Its quantization (``model.quantize``, ``model.quantize_text_encoders``) is what fits
    the memory of the run's machine, whatever the model: it always applies."""
    run = run_cfg.get("model", {})
    own = not model or model == run.get("pretrained")
    options = {"vae": run.get("vae") if own else None, "prediction_type": run.get("prediction_type") if own else None,
               "clip_skip": run.get("clip_skip") or 1, "base": run.get("base") if own else None,
               "max_sequence_length": prompt_length(run_cfg) if own else None,
               **{key: run.get(key) for key in QUANTIZE_KEYS}}
    options = {k: v for k, v in options.items() if v and v != "none" and not (k == "clip_skip" and v == 1)}
    bundled = own and run.get("bundled_text_encoders") is False  # the one option whose non-default value is false
    return options | ({"bundled_text_encoders": False} if bundled else {})


def model_options(args: argparse.Namespace, run_cfg: dict) -> dict:
    """The run's model options (``run_model_options``) with the --base / --vae / --prediction-type / --clip-skip /
    --max-sequence-length flags and the quantization ``quantization`` settles."""
    flags = {"vae": args.vae, "prediction_type": args.prediction_type, "clip_skip": args.clip_skip,
             "base": args.base, "max_sequence_length": args.max_sequence_length}
    options = run_model_options(args.model, run_cfg) | {k: v for k, v in flags.items() if v}
    options = {k: v for k, v in options.items() if not (k == "clip_skip" and v == 1)}
    return quantization(options, args)


def quantization(options: dict, args: argparse.Namespace) -> dict:
    """``options`` (``run_model_options``) with --quantize / --quantize-text-encoders: a mode replaces the run's,
    ``none`` drops it. bitsandbytes quantizes on a CPU too, so the run's quantization applies there as well; where
    bitsandbytes is not installed, the run's nf4 is dropped, in one line saying the model is sampled unquantized,
    and a flag's nf4 is refused."""
    flags = {key: getattr(args, key, None) for key in QUANTIZE_KEYS}
    options = {k: v for k, v in options.items() if flags.get(k) is None} | \
        {k: v for k, v in flags.items() if v not in (None, "none")}
    for key in QUANTIZE_KEYS:
        flag = f"--{key.replace('_', '-')}"
        if options.get(key) == "nf4" and not _bitsandbytes_here():
            if flags[key]:
                raise SdtuneError(f"{flag}: nf4 needs bitsandbytes; pip install bitsandbytes, or {flag} fp8")
            print(f"note: the run's model.{key}=nf4 needs bitsandbytes, which is not installed here: sampling "
                  f"unquantized (pip install bitsandbytes, or {flag} fp8)")
            del options[key]
        elif key in options and not flags[key]:
            print(f"the run's model.{key}={options[key]}: quantized as in training ({flag} none: unquantized)")
    return options


def _bitsandbytes_here() -> bool:
    from sdtune.quantize import problems

    return not problems("nf4", "lora", False)  # its one complaint about nf4 alone: bitsandbytes is missing


def run_dtype(dtype: str | None, device: str | None, run_cfg: dict) -> str:
    """--dtype, else on a GPU the dtype the run computed in (``train.mixed_precision``: its frozen weights and
    grids were fp16 / bf16, and FLUX.1 in fp32 needs twice the memory), else fp32 (on a CPU, or without a run:
    a CPU computes half precision slowly, fp16 hardly at all)."""
    if dtype:
        return dtype
    precision = (run_cfg.get("train") or {}).get("mixed_precision")
    if precision not in ("fp16", "bf16"):
        return "fp32"
    import torch

    return precision if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "fp32"


def run_sampling(run_cfg: dict) -> dict[str, Any]:
    """How the run rendered its own grids (its config's ``sample.*``): guidance_scale, steps, seeds and
    negative_prompt; {} without a run (a LoRA file outside one). (Training's grids use ``DEFAULT_SCHEDULER``: no
    config key names another.)"""
    sample = run_cfg.get("sample") or {}
    return {k: sample[k] for k in ("guidance_scale", "steps", "seeds", "negative_prompt")
            if sample.get(k) not in (None, [])}


def lora_base_model(lora_file: Path) -> str:
    """The base model a shared LoRA file names: kohya's ``ss_sd_model_name``, when it is a hub id."""
    from sdtune.hub import public_model_id
    from sdtune.runs import safetensors_metadata

    named = safetensors_metadata(lora_file).get("ss_sd_model_name")
    if public_model_id(named):
        return named  # type: ignore[return-value]
    says = (f"names '{named}', not a hub id: a local model's name (files meant for sharing never hold its path)"
            if named else "names no base model")
    raise SdtuneError(f"--model: {lora_file} {says}; pass --model HUB_ID_FOLDER_OR_FILE")


def peft_base_model(folder: Path) -> str:
    """The base model a PEFT adapter folder names: its adapter_config.json's ``base_model_name_or_path``, when it
    is a hub id (sdtune's export writes a local model's folder name only)."""
    import json

    from sdtune.export import PEFT_CONFIG
    from sdtune.hub import public_model_id

    configs = [folder / PEFT_CONFIG] if (folder / PEFT_CONFIG).is_file() else sorted(folder.glob(f"*/{PEFT_CONFIG}"))
    named = None
    for config in configs:
        try:
            named = named or json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue  # read again, and named, when the adapters load
    if public_model_id(named):
        return named  # type: ignore[return-value]
    says = f"names '{named}', not a hub id" if named else "names no base model"
    raise SdtuneError(f"--model: {folder}'s {PEFT_CONFIG} {says}; pass --model HUB_ID_FOLDER_OR_FILE")


def with_size(settings: Any, model: str, revision: str | None, prediction_type: str | None = None,
              base: str | None = None) -> Any:
    """``settings`` with a width and height: the model's native size where the flags and the run gave none."""
    from sdtune.models import inspect_model

    if settings.width and settings.height:
        return settings
    native = inspect_model(model, revision, for_training=False, prediction_type=prediction_type, base=base).resolution
    return replace(settings, width=settings.width or native, height=settings.height or native)


def _outpaint(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    sides = tuple(parse_ints(text, "--outpaint"))
    sides = sides * 4 if len(sides) == 1 else sides
    if len(sides) != 4 or min(sides) < 0:
        raise SdtuneError("--outpaint: give one number or left,top,right,bottom pixels, e.g. 0,0,128,0")
    return sides  # type: ignore[return-value]


def _request(args: argparse.Namespace) -> tuple[Any, Path]:
    """The sample request the flags describe, and the grid file it writes."""
    from sdtune.grid import Cell, Settings
    from sdtune.sample import Request

    target, run_cfg, loras, model = _source(args)
    prompts = distinct(read_prompts(args, run_cfg), "prompts")
    options = model_options(args, run_cfg)
    info = model_info(args, model, run_cfg, options)  # before anything loads: what this family cannot take
    # the flags', else the run's, else the model's native size (info has read it: with_size need not again)
    size = run_cfg.get("data", {}).get("resolution") or info.resolution
    mode = ("depth" if args.depth else "outpaint" if args.outpaint else "inpaint" if args.mask
            else "img2img" if args.init_image else "txt2img")
    guidance, seeds, shared = family_sampling(args, info, *grid_defaults(args, run_cfg))
    settings = Settings(**shared, mode=mode, width=args.width or size or 0, height=args.height or size or 0,
                        strength=args.strength, batch_size=args.batch_size)
    if not loras and args.lora_scale is not None:  # it would be ignored: the cells hold no LoRA
        why = "--no-lora renders the base model alone" if args.no_lora else "there is no LoRA (no TARGET)"
        raise SdtuneError(f"--lora-scale: {why}; fix: remove --lora-scale")
    scales = [None] if not loras else distinct(parse_floats(args.lora_scale or "0,1", "--lora-scale"), "--lora-scale")
    cells = [Cell(p, s, g, sc, label) for label, _ in (loras or [(None, None)]) for p in prompts
             for sc in scales for g in guidance for s in seeds]
    req = Request(
        model=model, lora=loras, cells=cells, settings=settings, revision=run_cfg.get("model", {}).get("revision"),
        variant=run_cfg.get("model", {}).get("variant"), dtype=run_dtype(args.dtype, args.device, run_cfg),
        device=args.device, init_image=args.init_image, mask=args.mask, outpaint=_outpaint(args.outpaint),
        model_options=options,
    )
    if args.out:
        return req, Path(args.out)
    return req, (target if target.is_dir() else target.parent) / "grid.png"  # type: ignore[union-attr]


def model_info(args: argparse.Namespace, model: str, run_cfg: dict, options: dict) -> ModelInfo:
    """What the base model is (config files only), refusing in one line what its family cannot sample with,
    named as the user gave it: the model options the family refuses in training too
    (``Family.model_option_problem``: --prediction-type, --clip-skip) and a --width / --height its pipeline does
    not render (``ModelInfo.sample_multiple``)."""
    from sdtune.models import inspect_model

    try:
        info = inspect_model(model, run_cfg.get("model", {}).get("revision"), for_training=False,
                             prediction_type=options.get("prediction_type"), base=options.get("base"))
    except SdtuneError as e:  # model_files names the recipe key; here the user typed --base, or --model
        said = str(e)
        if args.base and said.startswith("model.base"):
            said = said.replace("model.base", "--base")
        elif said.startswith("model.pretrained"):
            said = (said.replace("model.pretrained", "--model", 1) if args.model else
                    f"{said} (the base model the run or LoRA names); or pass --model HUB_ID_OR_FOLDER where it is now")
        raise SdtuneError(said) from None
    for name in ("prediction_type", "clip_skip"):
        flag = f"--{name.replace('_', '-')}"
        problem = info.family.model_option_problem(name, flag if getattr(args, name) else f"model.{name}") \
            if options.get(name) else None
        if problem:
            raise SdtuneError(problem)
    for flag, side in (("--width", args.width), ("--height", args.height)):
        sizes = info.sides_near(side) if side and not args.init_image else None  # an init image: the pipeline's
        if sizes:  # FluxPipeline would draw another size than the sidecar records; the others fail every cell
            raise SdtuneError(f"{flag}: {side} is not a multiple of {info.sample_multiple}, the sides "
                              f"{info.family.label}'s pipeline renders; fix: {flag} {' or '.join(map(str, sizes))}")
    return info


def family_sampling(args: argparse.Namespace, info: ModelInfo, guidance: list[float | None], seeds: list[int],
                    shared: dict[str, Any]) -> tuple[list[float | None], list[int], dict[str, Any]]:
    """``grid_defaults``' answer without what the model's family ignores (``SamplingDefaults``): guidance
    scales where guidance changes nothing (FLUX.1-schnell: one row at the family's, said in a note, not one row
    per scale of the same pixels), and a negative prompt its pipeline does not use (refused as --negative-prompt,
    left out with a note as the run's, so that no sidecar records it)."""
    sampling, model = info.family.sampling, info.pretrained
    if getattr(args, "scheduler", None) and sampling.scheduler:  # it would change nothing: the family's own is used
        raise SdtuneError(f"--scheduler: {info.family.label} samples with its model's own {sampling.scheduler} (the "
                          "schedulers of --scheduler are for the SD families' noise predictions); fix: remove it")
    if sampling.guidance_unused and any(g is not None and g != sampling.guidance_scale for g in guidance):
        where = "--guidance" if args.guidance is not None else "the run's sample.guidance_scale"
        print(f"note: {where}: {model}: {sampling.guidance_unused}; each cell is drawn once, at guidance "
              f"{sampling.guidance_scale:g}", file=sys.stderr)
        guidance = [None]  # the family's, resolved with the model (sdtune.sample.with_family_defaults)
    negative = used_negative_prompt(sampling, shared["negative_prompt"], args.negative_prompt is not None)
    return guidance, seeds, shared | {"negative_prompt": negative}


def used_negative_prompt(sampling: SamplingDefaults, negative: str, flag: bool) -> str:
    """``negative`` where the family's pipeline uses a negative prompt; else (FLUX.1) one line refusing it as
    --negative-prompt (``flag``: the user typed it), or a note that the run's ``sample.negative_prompt`` is left
    out, and "" (``sdtune sample`` and ``eval``)."""
    if not negative or not sampling.negative_prompt_unused:
        return negative
    if flag:
        raise SdtuneError(f"--negative-prompt: {sampling.negative_prompt_unused}; fix: remove it")
    print(f"note: the run's sample.negative_prompt: {sampling.negative_prompt_unused}: sampled without it",
          file=sys.stderr)
    return ""


def grid_defaults(args: argparse.Namespace, run_cfg: dict) -> tuple[list[float | None], list[int], dict[str, Any]]:
    """(guidance scales, seeds, {negative_prompt, steps, scheduler}): each flag given, else the run's grids'
    (``run_sampling``), else sdtune's defaults. A guidance of None is the family's default, resolved with the model
    (``sdtune.sample.with_family_defaults``)."""
    ran = run_sampling(run_cfg)
    guidance = (parse_floats(args.guidance, "--guidance") if args.guidance is not None
                else [ran.get("guidance_scale")])
    if any(g is not None and g < 0 for g in guidance):  # sample.guidance_scale's range
        raise SdtuneError(f"--guidance: guidance scales must be 0 or more, as sample.guidance_scale; got {args.guidance}")
    seeds = (parse_ints(args.seeds, "--seeds", 0, 2**63 - 1) if args.seeds is not None
             else [int(s) for s in ran.get("seeds", DEFAULT_SEEDS)])
    shared = {"negative_prompt": args.negative_prompt if args.negative_prompt is not None
              else ran.get("negative_prompt", ""),
              "steps": args.steps or ran.get("steps", DEFAULT_STEPS),
              "scheduler": args.scheduler or DEFAULT_SCHEDULER}
    return distinct(guidance, "--guidance"), distinct(seeds, "--seeds"), shared


def distinct(values: list, what: str) -> list:
    """``values`` without repeats, in their order, saying so where there were some: a repeated prompt, seed or
    scale would render the same cells again (the same pixels) and make the grid lie about its size."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        print(f"note: {what}: {len(values) - len(unique)} repeat(s) left out, {len(unique)} distinct (each cell is "
              "drawn once)", file=sys.stderr)
    return unique


def _source(args: argparse.Namespace) -> tuple[Path | None, dict, list[tuple[str, str]], str]:
    """(TARGET or None, its run config, its LoRA files, the base model). No TARGET: ``--model`` alone, and the
    grid needs ``--out`` (there is no run folder to put it in)."""
    from sdtune.runs import run_config

    if args.target:
        target = Path(args.target)
        run_cfg = run_config(target)
        loras = [] if args.no_lora else target_loras(target, args.checkpoints)
        return target, run_cfg, loras, base_model(args.model, target, run_cfg)
    if not args.model:
        raise SdtuneError("sample: give a TARGET (run folder, checkpoint folder or LoRA file), --model MODEL for the "
                          "base model alone, or --replay CELL.json")
    if args.checkpoints:
        raise SdtuneError("--checkpoints all: give the run folder as TARGET")
    if not args.out:
        raise SdtuneError("--out: with no TARGET the grid has no run folder to go to; pass --out base.png")
    return None, {}, [], args.model


def peft_folder(target: Path) -> Path | None:
    """The PEFT adapters a TARGET names (``sdtune export --format peft``): the export folder (one component folder
    each: unet/, text_encoder/, ...), one component's folder, or its adapter_model.safetensors; else None."""
    from sdtune.export import PEFT_CONFIG, PEFT_WEIGHTS
    from sdtune.runs import WEIGHT_NAME

    folder = target.parent if target.name == PEFT_WEIGHTS else target
    if (folder / PEFT_WEIGHTS).is_file() and (folder / PEFT_CONFIG).is_file():
        return folder
    if folder.is_dir() and not (folder / WEIGHT_NAME).is_file() and any(folder.glob(f"*/{PEFT_WEIGHTS}")):
        return folder
    return None


def check_lora_files(lora: str | Path) -> None:
    """Read the header of a LoRA file, or of each adapter file of a PEFT folder (one line if one is broken)."""
    from sdtune.export import PEFT_WEIGHTS
    from sdtune.runs import safetensors_header

    path = Path(lora)
    for f in sorted(path.rglob(PEFT_WEIGHTS)) if path.is_dir() else [path]:
        safetensors_header(f)


def target_loras(target: Path, checkpoints: str | None) -> list[tuple[str, str]]:
    """(label, LoRA) pairs a TARGET names (``sdtune.runs.lora_files``), or its PEFT adapter folder (``peft_folder``;
    its label the export's name, with the component for one component's folder)."""
    from sdtune.export import PEFT_WEIGHTS
    from sdtune.runs import STATE, lora_files, run_root

    if checkpoints == "all" and (target / STATE).is_file():
        raise SdtuneError(f"--checkpoints all: {target} is one checkpoint; give its run folder ({run_root(target)}) to "
                          "draw every checkpoint")
    peft = peft_folder(target)
    if peft is None:
        return lora_files(target, checkpoints)
    if checkpoints == "all":
        raise SdtuneError(f"--checkpoints all: {target} is one exported PEFT adapter; give its run folder instead")
    check_lora_files(peft)
    one_part = (peft / PEFT_WEIGHTS).is_file()  # ex/micro_peft/unet: "micro_peft-unet"
    return [(f"{peft.parent.resolve().name}-{peft.name}" if one_part else peft.name, str(peft))]


def cmd_sample(args: argparse.Namespace) -> int:
    from sdtune.sample import check_outputs, request_from_sidecar, run_sample

    if args.replay:
        req = request_from_sidecar(args.replay)
        out = Path(args.out or Path(args.replay).with_suffix(".replay.png"))
        for _, lora_file in req.lora:  # the sidecar's LoRA may have gone or changed since
            check_lora_files(lora_file)
    else:
        req, out = _request(args)
    # Before anything loads: an hour of rendering must not end in "cannot write", nor replace a user's file.
    check_outputs(out, len(req.cells), grid=not args.replay, overwrite=args.overwrite)
    quiet_libraries()
    req.settings = with_size(req.settings, req.model, req.revision, req.model_options.get("prediction_type"),
                             req.model_options.get("base"))
    earlier = out.exists()  # a grid sdtune wrote (check_outputs refused anything else)
    written, failures = run_sample(req, out, grid=not args.replay)
    if args.replay:
        print(f"image: {written}")
    else:
        # the README's second sample of a run writes the same default grid.png: say the first one is gone
        print(f"grid: {written}" + (" (it replaces the earlier grid of that name; --out NAME.png keeps both)"
                                    if earlier else ""))
        print(f"cells: {written.with_name(written.stem + '_cells')} (each with a .json sidecar; sdtune sample --replay)")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0
