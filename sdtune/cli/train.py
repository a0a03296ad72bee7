"""``sdtune train`` (a recipe plus overrides) and ``sdtune random-model`` (tiny or full-size models built in code)."""

from __future__ import annotations

import argparse
from typing import Any

from sdtune import families
from sdtune.cli.console import quiet_libraries, text
from sdtune.errors import SdtuneError
from sdtune.models import DTYPES


def add_commands(sub: Any) -> None:
    """Add ``train`` and ``random-model`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("train", help="train a DreamBooth LoRA from a YAML recipe")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/sd15_dreambooth_lora.yaml, or a shipped recipe's name "
                   "(`sdtune recipes` lists them)")
    p.add_argument("overrides", nargs="*", type=text, metavar="key=value", help="override recipe keys, e.g. train.max_steps=800")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="check recipe, data and model presence, then exit")
    p.add_argument("--strict", action="store_true",
                   help="refuse to train on any warning (a caption cut at 77 tokens, an unlisted image, ...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("class-images", help="make prior preservation's class images for a recipe, before training",
                       description="Generate the class images a recipe's prior preservation trains with, where "
                       "`sdtune train` with the same recipe and overrides looks for them (prior.class_dir, or "
                       "sdtune's cache keyed by the model's bytes), and nothing else: to look at them first, or "
                       "for an FSDP run, which cannot generate them. Images already there are kept.")
    p.add_argument("recipe", help="the YAML recipe the run will use")
    p.add_argument("overrides", nargs="*", type=text, metavar="key=value", help="the run's overrides")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                   help="diffusers' CPU offload on a GPU that cannot hold the whole model: model (one component "
                   "at a time) or sequential (one layer at a time, slow)")
    p.set_defaults(func=cmd_class_images)

    p = sub.add_parser("recipes", help="list the recipes that ship with sdtune, or print one to copy and edit",
                       description="The recipes that ship with sdtune (the repository's recipes/). `sdtune train` "
                       "takes one by name from any folder (`sdtune train sd15_dreambooth_lora ...`); to edit one, "
                       "print it into a file: `sdtune recipes sd15_dreambooth_lora > my_recipe.yaml`.")
    p.add_argument("name", nargs="?", help="a recipe's name: print it whole")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("random-model", help="write a randomly initialised model (tests, demos, benchmarks)")
    p.add_argument("directory", help="the diffusers folder to write (with --single-file: the .safetensors file)")
    p.add_argument("--single-file", action="store_true",
                   help="write one .safetensors checkpoint in the original (Stability / Civitai) layout instead "
                   f"({', '.join(f.name for f in families.registered() if f.original_layout)})")
    p.add_argument("--family", choices=families.names(), default="sd15")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn: cuda builds full-size "
                   "models in seconds (other weights than the CPU's for the same seed)")
    p.set_defaults(func=cmd_random_model)


def cmd_recipes(args: argparse.Namespace) -> int:
    from sdtune.config import find_recipe, shipped_recipes

    shipped = shipped_recipes()
    if shipped is None:
        raise SdtuneError("this sdtune was installed without its recipes; reinstall it, or take them from the "
                          "repository's recipes/ folder")
    if args.name:
        recipe = find_recipe(args.name)
        if not recipe.is_file():  # accelerate/fsdp: an Accelerate config, which `sdtune train` does not take
            recipe = shipped / (args.name if args.name.endswith(".yaml") else f"{args.name}.yaml")
        if not recipe.is_file() or shipped.resolve() not in recipe.resolve().parents:
            raise SdtuneError(f"{args.name}: not a shipped recipe; `sdtune recipes` lists them")
        print(recipe.read_text(encoding="utf-8"), end="")
        return 0
    for recipe in sorted(shipped.glob("*.yaml")):
        head = recipe.read_text(encoding="utf-8").split("\n", 1)[0]
        # a recipe's first line: "# NAME.yaml - what it trains"
        print(f"{recipe.stem:<28} {head.split(' - ', 1)[-1] if ' - ' in head else ''}")
    configs = sorted(f"accelerate/{c.stem}" for c in shipped.glob("accelerate/*.yaml"))
    print(f"\nAccelerate configs (for `accelerate launch --config_file FILE`): {', '.join(configs)}")
    print(f"\n(in {shipped}; `sdtune train NAME key=value ...` runs a recipe, `sdtune recipes NAME > FILE` copies "
          "a recipe or config to edit, e.g. `sdtune recipes accelerate/multi_gpu > multi_gpu.yaml`)")
    return 0


def _with_plan_problems(e: Any, strict: bool) -> Any:
    """A recipe's ``ConfigError`` with the run checks' problems added, when the recipe is valid but for unknown
    keys (a typo): every problem is said at once, not the typo first and the missing model on the next try."""
    from sdtune.config import ConfigError
    from sdtune.plan import check_run

    if e.without_unknown_keys is None:
        return e
    try:
        check_run(e.without_unknown_keys, strict=strict)
    except ConfigError as more:
        return ConfigError([*e.problems, *more.problems])
    except SdtuneError as more:
        return ConfigError([*e.problems, str(more)])
    return e


def cmd_train(args: argparse.Namespace) -> int:
    from sdtune.config import ConfigError, load_config
    from sdtune.plan import check_run

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        raise _with_plan_problems(e, args.strict) from None
    if args.print_config:
        print(cfg.to_yaml(), end="")
        if not args.dry_run:
            return 0
    plan = check_run(cfg, strict=args.strict)
    if args.dry_run:
        for w in plan.warnings:
            print(f"warning: {w}")
        m = plan.model
        print(
            f"ok: {m.pretrained} is {m.family.name} ({m.family.label}, {m.prediction_type}), {len(plan.examples)} "
            f"instance images at {plan.resolution} px"
            + (f", class images in {plan.class_dir or 'the cache (by the model identity)'}" if cfg.prior.enabled else "")
            + f"; output in {cfg.train.output_dir}"
        )
        return 0
    quiet_libraries()
    from sdtune.train import train

    train(cfg, plan)
    return 0


def cmd_class_images(args: argparse.Namespace) -> int:
    from sdtune.config import load_config
    from sdtune.data import list_images

    cfg = load_config(args.recipe, args.overrides)
    quiet_libraries()
    from sdtune.train import make_class_images

    paths = make_class_images(cfg, args.offload)
    for folder in dict.fromkeys(p.parent for p in paths):
        print(f"class images: {len(list_images(folder))} in {folder}")
    return 0


def cmd_random_model(args: argparse.Namespace) -> int:
    from sdtune.models import inspect_model, write_random_model, write_random_single_file

    quiet_libraries()
    if args.single_file:
        if args.device != "cpu":
            raise SdtuneError("--device: a --single-file model is drawn on the CPU; remove --device")
        path = write_random_single_file(args.directory, args.family, args.size, args.seed, args.dtype)
    else:
        path = write_random_model(args.directory, args.family, args.size, args.seed, args.dtype, args.device)
    info = inspect_model(str(path))
    kind = "single-file " if args.single_file else ""
    print(f"wrote a random {kind}{info.family.name} model ({args.size}, {info.prediction_type}, {info.resolution} px) "
          f"to {path}")
    return 0
