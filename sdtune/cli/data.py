"""``sdtune prep``, ``sdtune check-token`` and ``sdtune suggest-tokens``: the training data and its identifier."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from sdtune import families
from sdtune.cli.console import positive_int, resolution, text
from sdtune.errors import SdtuneError
from sdtune.prep import (
    CAPTION_SOURCES,
    CROPS,
    DEFAULT_RENAME,
    DROPS,
    FACE_MIN_CONFIDENCE,
    FORMATS,
    RENAME_FIELDS,
    REPORT,
    SHEET,
)


def add_commands(sub: Any) -> None:
    """Add ``prep``, ``check-token`` and ``suggest-tokens`` to the ``sdtune`` subparsers."""
    fields = ", ".join(f"{{{k}}} ({v})" for k, v in RENAME_FIELDS.items())
    resolutions = " / ".join(str(families.get(n).default_resolution) for n in families.names())
    p = sub.add_parser(
        "prep", help="crop, resize and check subject photos into a training-ready imagefolder dataset",
        description="Turn a folder of photos into an imagefolder dataset (images + metadata.jsonl) with "
        "prep_report.json and contact_sheet.jpg. Sources are only read; OUT must be empty or an earlier "
        "prep output.",
    )
    p.add_argument("src", metavar="SRC", help="folder of photos (read only; subfolders included)")
    p.add_argument("out", metavar="OUT", help="output folder: empty, new, or an earlier prep output")
    p.add_argument("--family", choices=families.names(),
                   help=f"model family; sets the default resolution ({resolutions}; default sd15, or --model's)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH_OR_ID",
                       help="the model to train (a diffusers folder, hub id or single file; its config files only, "
                       "no weights): sets the family, the default resolution, and for --crop bucket the sides "
                       "its denoiser takes, so training uses each bucket as written")
    model.add_argument("--bucket-multiple", type=positive_int, metavar="N",
                       help="--crop bucket: write only buckets whose sides are multiples of N, the model's (SD1.x "
                       "64, SDXL 32, FLUX.1 and SD3.x 16; --model reads it); default: every bucket, in 64 px "
                       "steps (8 px under 512 px)")
    p.add_argument("--resolution", type=resolution, help="output size in pixels, a multiple of 8 from 64 to 4096 (default: the family's)")
    p.add_argument("--crop", choices=CROPS, default="smart",
                   help="center; smart (saliency, as Birme); face (keep faces in frame, else smart); "
                   "bucket (keep the aspect ratio, snap to the nearest training bucket)")
    p.add_argument("--face-min-confidence", type=float, metavar="SCORE",
                   help="--crop face: the least face detector score for a face crop; below it the image "
                   "gets the smart crop. Real frontal faces score about 4-9, false detections on animals and "
                   f"objects about 1-3 (default {FACE_MIN_CONFIDENCE}); the report gives each image's score")
    p.add_argument("--rename", default=DEFAULT_RENAME, metavar="PATTERN",
                   help=f"output name pattern, Python format syntax; fields: {fields} (default {DEFAULT_RENAME})")
    p.add_argument("--token", type=text, help="the identifier word for {token} in --rename, e.g. sks")
    captions = p.add_mutually_exclusive_group()
    captions.add_argument("--caption", type=text, help="one caption for every image, e.g. 'a photo of sks dog'")
    captions.add_argument("--caption-from", choices=CAPTION_SOURCES,
                          help="filename: the source name ('sks_dog_beach_2.jpg' -> 'sks dog beach'); "
                          "txt: a .txt file with the same name beside each image; metadata: SRC's metadata.jsonl, "
                          ".csv or .parquet, as datasets' imagefolder reads them (file_name and a text, caption "
                          "or prompt column)")
    p.add_argument("--format", choices=FORMATS, default="png", help="output format (default png)")
    p.add_argument("--min-side", type=int,
                   help="refuse sources whose crop is smaller than this; between it and the resolution they "
                   "are upscaled with a warning (default: half the resolution)")
    p.add_argument("--background", default="white", help="colour behind transparent pixels (name or #rrggbb)")
    p.add_argument("--drop", default="", metavar="CHECKS",
                   help=f"leave out the images these checks flag, a comma list of {', '.join(DROPS)} "
                   "(e.g. duplicates,blurry; of duplicates the best copy stays: sharpest, then largest, then "
                   "first by name); they are listed as dropped in the report and crossed out on the contact "
                   "sheet (default: keep all, with warnings)")
    p.add_argument("--overwrite-edits", action="store_true",
                   help="replace an earlier prep output in OUT even where its files (images, "
                   "metadata.jsonl's captions) were edited since prep wrote them (default: refuse, naming them)")
    p.add_argument("--workers", type=positive_int, help="processes, at most the CPU cores (default: all cores)")
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("check-token", help="is WORD a good DreamBooth identifier? (exit 0 good, 1 risky/bad)")
    p.add_argument("word", type=text, help="the identifier, e.g. sks")
    p.add_argument("--tokenizer", help="a model folder or hub id (tokenizer/, tokenizer_2/) or tokenizer folder")
    p.add_argument("--family", choices=families.names(), help="which text encoders (default: CLIP's vocab)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_check_token)

    p = sub.add_parser("suggest-tokens", help="list rare single-token identifiers that pass check-token")
    p.add_argument("--n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--seed", type=int, help="a random sample of the candidates instead of the latest merges")
    p.add_argument("--tokenizer", help="keep only suggestions that are one rare token in this model's "
                   "tokenizer(s): a model folder or hub id (tokenizer/, tokenizer_2/) or tokenizer folder")
    p.add_argument("--family", choices=families.names(),
                   help="keep only suggestions that are one rare token in this family's text encoders")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of the suggestions' check-token reports")
    p.set_defaults(func=cmd_suggest_tokens)


def cmd_prep(args: argparse.Namespace) -> int:
    """Run ``sdtune prep`` and print what happened: skips and warnings, one line each (past
    ``SHOWN_WARNINGS`` of one kind, a count), then a summary."""
    from sdtune.prep import prep

    family, size, multiple = _prep_model(args)
    report = prep(
        args.src, args.out, resolution=size, crop=args.crop, family=family, fmt=args.format,
        min_side=args.min_side, background=args.background, rename=args.rename, token=args.token,
        caption=args.caption, caption_from=args.caption_from, workers=args.workers, drop=args.drop,
        face_min_confidence=args.face_min_confidence, overwrite_edits=args.overwrite_edits, bucket_multiple=multiple,
    )
    out = Path(args.out)
    _print_rows(report["files"], out / REPORT)
    for w in report["set_warnings"]:
        print(f"warning: {w}")
    if args.crop == "face":
        crops = [row["crop"] for row in report["files"] if row.get("crop")]
        faces = sum(c.startswith("face") for c in crops)
        least = report["settings"]["face_min_confidence"]
        print(f"face crops: {faces} of {len(crops)} images; the others got the smart crop (no face scoring "
              f"{least:g} or more; each image's crop and face_confidence are in {out / REPORT})")
    if args.crop == "bucket":
        print(_buckets_line(size, multiple, args.model))
    s = report["summary"]
    captions = f"{s['captions']} caption files, " if s.get("captions") else ""
    print(
        f"prep: {s['images']} image{'' if s['images'] == 1 else 's'} in {out} ({s['fixed']} fixed, {s['dropped']} dropped, {s['skipped']} "
        f"skipped, {captions}{s['ignored']} "
        f"ignored, {s['warnings']} warnings); see {out / REPORT} and {out / SHEET}"
        + (f" (showing {s['contact_sheet']} of {s['images'] + s['dropped']}: every flagged one and a sample)"
           if s.get("contact_sheet", 0) < s["images"] + s["dropped"] else "")
    )
    return 0


# of the warnings of one kind ("near duplicate", "looks blurry"), the ones printed: a 1,500-photo folder of bursts
# drew 700 duplicate lines; the report keeps every one
SHOWN_WARNINGS = 5


def _print_rows(rows: list[dict], report: Path) -> None:
    """Each skipped and dropped file, and each image's warnings up to ``SHOWN_WARNINGS`` of a kind, then how many
    more of each kind the report holds."""
    seen: dict[str, int] = {}
    for row in rows:
        if row["status"] in ("skipped", "dropped"):
            print(f"{row['status']}: {row['source']}: {row['reason']}")
        if row["status"] == "dropped":
            continue  # its reason has the warnings that matter
        for w in row.get("warnings", []):
            kind = _warning_kind(w)
            seen[kind] = seen.get(kind, 0) + 1
            if seen[kind] <= SHOWN_WARNINGS:
                print(f"warning: {row.get('output', '-')} ({row['source']}): {w}")
    for kind, n in seen.items():
        if n > SHOWN_WARNINGS:
            print(f"warning: ... and {n - SHOWN_WARNINGS} more '{kind} ...' warnings (of {n}; each in {report})")


def _warning_kind(text: str) -> str:
    """What a warning is about, from its first words: 'near duplicate', 'looks blurry', 'upscaled'."""
    words = re.findall(r"[A-Za-z]{2,}", text.split(":")[0])[:2]
    return " ".join(words) or text[:20]


def _prep_model(args: argparse.Namespace) -> tuple[str, int, int | None]:
    """(family, resolution, bucket multiple) for ``sdtune prep``: --model's (read from its config files, no
    weights), else --family's and --bucket-multiple."""
    if not args.model:
        family = args.family or "sd15"
        return family, args.resolution or families.get(family).default_resolution, args.bucket_multiple
    from sdtune.models import inspect_model

    try:
        info = inspect_model(args.model, for_training=False)
    except SdtuneError as e:  # its messages name the recipe key; here the user typed --model
        raise SdtuneError(str(e).replace("model.pretrained:", "--model:", 1)) from None
    if args.family and args.family != info.family.name:
        raise SdtuneError(f"--family: {args.family}, but --model {args.model} is {families.article(info.family.label)} "
                          f"{info.family.label} model ({info.family.name}); fix: drop --family")
    return (info.family.name, args.resolution or info.resolution,
            info.bucket_multiple if args.crop == "bucket" else None)


def _buckets_line(size: int, multiple: int | None, model: str | None) -> str:
    """Which bucket sizes prep wrote, and whether training takes them as they are."""
    step = 64 if size >= 512 else 8  # prep.bucket_sizes' steps
    if multiple:
        source = f"{model}'s denoiser" if model else "--bucket-multiple"
        return (f"buckets: sides in multiples of {math.lcm(step, multiple)} ({source} takes multiples of {multiple}), "
                "so training uses them as written")
    if step % 64 == 0:
        return "buckets: sides in multiples of 64, which every model family takes"
    return (f"buckets: sides in multiples of {step}; a model takes only multiples of its own (SD1.x 64, SDXL 32, "
            "FLUX.1 and SD3.x 16) and training crops the others to its nearest bucket: pass --model MODEL (or "
            "--bucket-multiple N) to write only sizes it takes")


def cmd_check_token(args: argparse.Namespace) -> int:
    from sdtune.identifier import check_identifiers, piece_list, tokenizers_at

    tokenizers = tokenizers_at(args.tokenizer, args.family) if args.tokenizer else None
    report = check_identifiers([args.word], tokenizers, None if tokenizers else args.family)[0]
    if args.json:
        print(report.to_json())
    else:
        print(report.summary)
        for reason in report.reasons[1:]:
            print(f"  also: {reason}")
        for e in report.encoders:
            print(f"  {e['name']}: {piece_list(e['pieces'], e['ids']) or '(no tokens)'}")
    return 0 if report.verdict == "good" else 1


def cmd_suggest_tokens(args: argparse.Namespace) -> int:
    import json

    from sdtune.identifier import suggest_identifiers, suggestion_reports, tokenizers_at

    tokenizers = tokenizers_at(args.tokenizer, args.family) if args.tokenizer else None
    family = None if tokenizers else args.family
    if args.json:
        reports = suggestion_reports(args.n, args.seed, tokenizers, family)
        print(json.dumps([r.as_dict() for r in reports], ensure_ascii=False))
        return 0
    for word in suggest_identifiers(args.n, args.seed, tokenizers, family):
        print(word)
    return 0
