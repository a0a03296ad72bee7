"""``sdtune prep SRC OUT``: turn a folder of phone photos into a training-ready ``imagefolder`` dataset.

Every file in SRC is read safely (``sdtune.images``), cropped (center, saliency, face or aspect bucket),
Lanczos-resized and written to OUT with ``metadata.jsonl`` (``file_name``, ``text``), which is what
``datasets.load_dataset("imagefolder", data_dir=OUT)`` and ``sdtune train`` read. Beside them:
``prep_report.json`` (every source file: kept / fixed (what) / skipped (why) / ignored / caption (a .txt or
metadata file its captions were read from), output name, crop box, and the checks) and ``contact_sheet.jpg``, every kept crop labelled on one page (past ``SHEET_MAX``
crops: every flagged or dropped one and an even sample of the rest, as the report says). The sheet is not in
``metadata.jsonl``, so neither ``datasets`` nor ``sdtune train`` takes it for a training image.

Problems with the photos themselves (near duplicates, blur, upscaling, extreme aspect, a grayscale-only
set) are reported, never silently fixed; ``--drop`` leaves the flagged ones out (status ``dropped`` in the
report, marked DROPPED on the contact sheet, absent from ``metadata.jsonl`` and from OUT). Of a group of
duplicates the best copy is never flagged (``set_findings``), so ``--drop duplicates`` keeps it. Sources are
only read; nothing is written outside OUT; running twice gives the same bytes. A rerun into OUT replaces the
earlier output, but not a file of it edited since (the report records the sha256 of what prep wrote), and an
earlier prep output in a subfolder of SRC is skipped, not read as photos.

``--crop bucket`` keeps each photo's aspect ratio (snapped to the training buckets: with ``bucket_multiple``,
the model's, only those whose sides its denoiser takes, as training assigns them), so its images are not
square. ``datasets`` and ``sdtune train`` read them as they are; with
``data.aspect_buckets: true`` the trainer batches them by the same buckets, otherwise it crops a square
from each (``data.center_crop``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import string
import sys
import unicodedata
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

from PIL import Image, ImageColor, ImageDraw

from sdtune.errors import SdtuneError
from sdtune.files import sha256_file
from sdtune.grid import drawable
from sdtune.images import Decoded, Unreadable, read_image
from sdtune.metadata import SourceMetadata, has_metadata, is_metadata_file, read_metadata
from sdtune.tokens import clip_prefix, clip_tokenize

logger = logging.getLogger(__name__)

# numpy, OpenCV, imagehash and smartcrop are imported where used: `sdtune --help` and
# every other command import this module for its subcommand, and should not pay for them.

CROPS = ("center", "smart", "face", "bucket")
CAPTION_SOURCES = ("filename", "txt", "metadata")
PALETTE_FIXES = ("palette", "1-bit")  # sdtune.images' fixes for a source of at most 256 colours  # --caption-from
FORMATS = ("png", "jpg", "webp")
RENAME_FIELDS = {"token": "the --token word", "index": "1, 2, ... in source order", "stem": "source name"}
DEFAULT_RENAME = "{index:03d}"

REPORT, METADATA, SHEET = "prep_report.json", "metadata.jsonl", "contact_sheet.jpg"
# NAME.mask.png beside the output NAME.png: a source's transparency as the subject mask (white = opaque) that
# training's data.masked_loss reads; never a training image itself (not in metadata.jsonl).
MASK_SUFFIX = ".mask.png"
# what cameras and phones name their files before the number (IMG_1234, DSC01234, PXL_2024..., GOPR0001)
CAMERA_NAME = re.compile(r"img|image|dsc[nf]?|dcim|pxl|mvimg|dji|gopr|gx|vid|photo|pic|screenshot",
                         re.IGNORECASE)
TMP_DIR = ".sdtune-prep-tmp"  # new outputs are built here, inside OUT, then moved into place
# each processed image's bytes and thumbnail wait here (inside OUT) until the names are known, rather than in
# memory: 100,000 photos at 512 px would hold gigabytes
STAGE_DIR = ".sdtune-prep-stage"

JUNK_FILES = {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", ".localized"}
JUNK_DIRS = {"__macosx", "@eadir", "$recycle.bin", "system volume information", ".thumbnails"}
TEXT_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".md", ".csv", ".xmp", ".aae"}
MAX_FILE_BYTES = 512 * 2**20
# --drop NAME leaves out the images that carry this contact-sheet flag (set by check_set and _size_checks).
DROPS = {"duplicates": "DUP", "blurry": "BLUR", "small": "SMALL", "extreme-aspect": "ASPECT"}

NEAR_DUPLICATE_BITS = 6  # phash Hamming distance (of 64) at or below which two photos are the same shot
BLUR_RATIO = 0.25  # flagged when the variance of the Laplacian is below this fraction of the set's median
# Of duplicates, copies within this fraction of the sharpest copy's sharpness count as equally sharp (then the
# largest source is kept). Measured on DreamBench dog/00-02.jpg: at 64 px the original, JPEG q60 / q30 and
# half-size copies are within 1% of each other (the half-size one highest), at 512 px q60 is 2-4% under the
# original; a copy blurred with a 2 px Gaussian is 10% under at 64 px and 96% under at 512 px.
SHARPNESS_TIE = 0.1
EXTREME_ASPECT = 2.5
ANALYSIS_SIDE = 256  # short side of the small copy the saliency crop and the perceptual hash look at
FACE_SIDE = 512
# The least Haar score (OpenCV's final-stage sum, ``detect_faces``) for a face crop. Measured at FACE_SIDE on
# scikit-image's astronaut portrait and 15 variants: real frontal faces score 4.3-8.7 (a small face in a wide
# photo 4.35; blur, noise, JPEG, dark 5.2-7.5). The "faces" found on DreamBench's dog and backpack score
# 1.1-3.0 (dog/01.jpg: 2.98), on scikit-image's coins and moon 0.6-5.6. Below it the smart crop is used, which
# favours skin and detail anyway, so a missed face costs little and a false one (a crop on a dog's ear) more.
FACE_MIN_CONFIDENCE = 4.0
SHEET_CELL = 192
SHEET_MAX = 400  # cells on the contact sheet: a 10,000-image sheet would pass JPEG's 65,500-pixel limit
# caption: a .txt or metadata file that prep read captions from (not an image; counted apart from "ignored")
STATUSES = ("kept", "fixed", "dropped", "skipped", "ignored", "caption")
SHOWN_NOTES = 5  # of many notes of one kind (caption mismatches, captions without images), the ones a message names


@dataclass(frozen=True)
class Settings:
    """What every worker needs to turn one source file into one training image."""

    resolution: int = 512
    crop: str = "smart"
    format: str = "png"
    min_side: int = 256
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS
    face_min_confidence: float = FACE_MIN_CONFIDENCE  # --crop face: faces scoring less are not faces
    bucket_multiple: int = 1  # --crop bucket: only buckets whose sides are multiples of this (the model's)


@dataclass
class Result:
    """The outcome for one source file (picklable: it travels back from a worker process)."""

    source: str
    status: str  # kept | fixed | dropped (by --drop) | skipped | ignored | caption (a caption file prep read)
    reason: str | None = None
    caption: str | None = None
    format: str | None = None
    size: tuple[int, int] | None = None
    crop: str | None = None  # how the crop was chosen, e.g. "smart", "face (1 found)", "bucket 1152x896"
    face_confidence: float | None = None  # --crop face: the best face's Haar score (None: no face found)
    crop_box: tuple[int, int, int, int] | None = None
    output_size: tuple[int, int] | None = None
    fixes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    encoded: bytes = b""
    mask: str | None = None  # NAME.mask.png, for a source with transparency
    mask_encoded: bytes = b""
    thumb: Image.Image | None = None
    staged: str | None = None  # where the encoded image (and NAME.mask, NAME.thumb) wait, once off the worker
    has_mask: bool = False  # a NAME.mask.png goes with it (its bytes in mask_encoded, or staged)
    sha256: str = ""
    output_sha256: str | None = None  # of the bytes written to OUT: a rerun knows an output edited since
    mask_sha256: str | None = None
    phash: int = 0
    sharpness: float = 0.0
    grayscale: bool = False
    palette: bool = False  # the source held at most 256 colours (a GIF, an 8-bit PNG, 1-bit): often dithered
    flags: list[str] = field(default_factory=list)  # short tags for the contact sheet: DUP, BLUR, ...
    flagged_by: dict[str, str] = field(default_factory=dict)  # flag -> the first warning that set it

    def warn(self, flag: str, text: str) -> None:
        self.warnings.append(text)
        self.flagged_by.setdefault(flag, text)
        if flag not in self.flags:
            self.flags.append(flag)

    def entry(self) -> dict:
        """This file's line in prep_report.json."""
        row: dict = {"source": self.source, "status": self.status}
        optional = {
            "reason": self.reason, "output": None if self.status == "dropped" else self.output,
            "mask": None if self.status == "dropped" else self.mask,
            "output_sha256": None if self.status == "dropped" else self.output_sha256,
            "mask_sha256": None if self.status == "dropped" or not self.mask else self.mask_sha256,
            "caption": self.caption, "format": self.format,
            "size": list(self.size) if self.size else None,
            "crop": self.crop, "crop_box": list(self.crop_box) if self.crop_box else None,
            "face_confidence": None if self.face_confidence is None else round(self.face_confidence, 2),
            "output_size": list(self.output_size) if self.output_size else None,
            "fixed": self.fixes or None, "warnings": self.warnings or None,
        }
        row.update({k: v for k, v in optional.items() if v is not None})
        if self.status in ("kept", "fixed", "dropped"):
            row.update(sharpness=round(self.sharpness, 2), phash=f"{self.phash:016x}", grayscale=self.grayscale)
        return row


# --------------------------------------------------------------------------------------------------------
# The whole run


def prep(
    src: str | Path,
    out: str | Path,
    *,
    resolution: int = 512,
    crop: str = "smart",
    family: str | None = None,
    fmt: str = "png",
    min_side: int | None = None,
    background: str = "white",
    rename: str = DEFAULT_RENAME,
    token: str | None = None,
    caption: str | None = None,
    caption_from: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    drop: tuple[str, ...] | list[str] = (),
    face_min_confidence: float | None = None,
    crop_boxes: dict[str, tuple[int, int, int, int]] | None = None,
    overwrite_edits: bool = False,
    bucket_multiple: int | None = None,
) -> dict:
    """Prepare SRC into OUT and return the report (also written to OUT/prep_report.json).

    ``drop`` names checks (of ``DROPS``: duplicates, blurry, small, extreme-aspect) whose flagged images are
    left out of OUT and metadata.jsonl; the report lists them as ``dropped`` with the reason.
    ``face_min_confidence`` (``--crop face`` only; default ``FACE_MIN_CONFIDENCE``): faces scoring less are
    ignored, and an image with none left gets the smart crop; the report gives each image's crop and score.
    ``crop_boxes`` (source name relative to SRC -> (left, top, right, bottom) in the upright source's pixels):
    a user's crop for that photo instead of ``crop``'s (``sdtune ui``); square unless ``crop`` is bucket.
    An OUT that holds an earlier prep output is replaced, unless a file the earlier prep wrote there (an
    image, a mask, metadata.jsonl's captions) was edited since: then SdtuneError, or with ``overwrite_edits``
    the edits are replaced too.
    ``caption_from``: filename, txt (a .txt beside each image) or metadata (SRC's metadata.jsonl / .csv, as
    datasets' imagefolder reads them: ``sdtune.metadata``); the files read are ``caption`` rows.
    ``workers``: processes, at most the CPU cores (None: all of them). ``bucket_multiple`` (``--crop bucket``
    only): write only buckets whose sides are multiples of it, the model's ``ModelInfo.bucket_multiple``, as
    training buckets them (None: 1, every bucket of ``bucket_sizes``).

    Raises SdtuneError for bad options, an unusable OUT, or a SRC with no usable image.
    """
    settings = _settings(resolution, crop, fmt, min_side, background, face_min_confidence, bucket_multiple)
    drop = _check_drop(drop)
    _check_rename(rename, token)
    _check_caption_option(src, caption, caption_from)
    workers = _check_workers(workers)
    src_dir, out_dir = _check_folders(src, out)
    previous = _previous_outputs(out_dir, overwrite_edits)
    if previous:
        files = sum(1 for p in previous if p.name != TMP_DIR)
        logger.info(f"replacing the earlier prep output in {out_dir} ({files} files)")

    created = not out_dir.exists()
    _remove(out_dir / STAGE_DIR)  # what a killed run left
    ledger = _Ledger(out_dir / STAGE_DIR)
    try:
        notes = _collect(ledger, src_dir, out_dir, settings, caption, caption_from, crop_boxes, workers, progress)
        return _finish(src_dir, out_dir, previous, ledger, settings, family, rename, token, caption, caption_from,
                       fmt, drop, notes)
    finally:
        ledger.close()
        _remove(out_dir / STAGE_DIR)
        _remove(out_dir / TMP_DIR)  # outputs half-built by a failure in _write (the earlier ones are intact)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):  # a prep that failed leaves no OUT
            out_dir.rmdir()


def _collect(ledger: _Ledger, src_dir: Path, out_dir: Path, settings: Settings, caption: str | None,
             caption_from: str | None, crop_boxes: dict[str, tuple[int, int, int, int]] | None, workers: int,
             progress: bool | None) -> list[str]:
    """Every source file's result into ``ledger``: the files left out, the ones with no caption, and what the
    workers made of the others; returns the warnings about the captions as a whole (``_caption_notes``). (The
    lists of sources and jobs, 100,000 paths each, end with this call.)"""
    sources, results = find_sources(src_dir, out_dir)
    sources, masks = pair_masks(sources, results)
    metadata = _source_metadata(src_dir, results, caption_from)
    jobs, captioned = [], {}
    for rel, path in sources:
        text, why = _caption(src_dir, rel, caption, caption_from, metadata)
        if text is None:
            results.append(Result(rel, "skipped", reason=why))
        else:
            if caption_from in ("txt", "metadata"):  # to compare with the other source (_caption_notes)
                captioned[rel] = text
            jobs.append((rel, str(path), text, settings, masks.get(rel), (crop_boxes or {}).get(rel)))
    notes = _caption_notes(src_dir, sources, captioned, results, caption_from, metadata)
    notes += _long_captions([(job[0], job[2]) for job in jobs])
    for r in results:
        ledger.add(r)
    for r in _run(jobs, workers, progress):
        ledger.add(r)
    return notes


def _finish(src_dir: Path, out_dir: Path, previous: list[Path], ledger: _Ledger, settings: Settings,
            family: str | None, rename: str, token: str | None, caption: str | None, caption_from: str | None,
            fmt: str, drop: tuple[str, ...], notes: list[str]) -> dict:
    """Name, check and write the processed images (staged on disk by ``_Ledger``); return the report.
    ``notes``: warnings about the captions, the first of the report's ``set_warnings``."""
    order = sorted(range(len(ledger)), key=lambda i: _order(ledger.sources[i]))
    kept = [i for i in order if STATUSES[ledger.status[i]] in ("kept", "fixed")]
    if not kept:
        raise SdtuneError(_nothing_usable(src_dir, [ledger.read(i) for i in order]))
    steps = _SetSteps(len(ledger), fmt, drop)
    # Names come before the checks (their warnings name the earlier file) and stay as they are after --drop,
    # so a source gets the same output name with or without it.
    _name(ledger, kept, steps, rename, token)
    set_warnings = notes + _check_kept(ledger, kept, steps)
    steps.decide_drops(ledger.flags, kept)  # the reasons are written with each row (settle)
    if all(steps.dropped[i] for i in kept):
        dropped = [steps.settle(ledger.read(i), i) for i in kept[:5]]
        raise SdtuneError(f"--drop {','.join(drop)}: all {len(kept)} usable images would be dropped: "
                          + "; ".join(f"{r.source}: {r.reason}" for r in dropped))
    report = _report(src_dir, settings, family, rename, caption, caption_from,
                     _summary(ledger, steps, set_warnings), set_warnings, drop)
    _write(out_dir, previous, ledger, order, kept, steps, report)
    return report


class _Ledger:
    """Every result of one prep, source file by source file, without its bytes (``_stage`` puts those on disk
    as each arrives): each ``Result`` as one JSON line in a file beside them, read back one at a time (the
    report, the contact sheet), and in memory only what the steps over the whole set look at, a column each
    (source names, status, the workers' flags, the duplicate and blur measurements): about 150 bytes a photo,
    where whole ``Result`` objects were 3.7 KB (most of prep's 694 MiB peak at 100,000 photos)."""

    def __init__(self, stage: Path):
        self.stage = stage
        self._file: TextIO | None = None  # opened by the first add, closed by close()
        self._offsets = array("q")
        self.sources: list[str] = []
        self.status = bytearray()  # index into STATUSES
        self.flags: list[tuple[str, ...]] = []  # the workers' (ANIM, SMALL, ASPECT, MASK): () for most
        self.warnings = array("q")  # each result's count of warnings as it came
        self.has_mask = bytearray()
        self.sha256 = bytearray()  # 32 bytes each (zeros for none)
        self.size = array("I")  # the source's width, height (0, 0 for none): which duplicate is largest
        self.phash = array("Q")
        self.sharpness = array("d")
        self.grayscale = bytearray()
        self.palette = bytearray()

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, r: Result) -> None:
        """Stage ``r``'s bytes and write it down."""
        _stage(r, self.stage, len(self))
        record = {k: v for k, v in vars(r).items() if k not in ("encoded", "mask_encoded", "thumb")}
        if self._file is None:
            self.stage.mkdir(parents=True, exist_ok=True)
            self._file = open(self.stage / "results.jsonl", "w+", encoding="utf-8")  # noqa: SIM115
        self._file.seek(0, os.SEEK_END)
        self._offsets.append(self._file.tell())
        self._file.write(json.dumps(record) + "\n")  # ASCII-escaped: a name's undecodable bytes come back
        self.sources.append(r.source)
        self.status.append(STATUSES.index(r.status))
        self.flags.append(tuple(sys.intern(f) for f in r.flags))
        self.warnings.append(len(r.warnings))
        self.has_mask.append(r.has_mask)
        self.sha256 += bytes.fromhex(r.sha256) if r.sha256 else bytes(32)
        self.size.extend(r.size or (0, 0))
        self.phash.append(r.phash)
        self.sharpness.append(r.sharpness)
        self.grayscale.append(r.grayscale)
        self.palette.append(r.palette)

    def read(self, i: int) -> Result:
        """Result ``i`` as the worker left it (staged: ``Result.staged``)."""
        assert self._file is not None
        self._file.seek(self._offsets[i])
        record = json.loads(self._file.readline())
        record["source"] = self.sources[i]  # the same text: one object where rows are kept
        for key in ("size", "crop_box", "output_size"):
            if record[key] is not None:
                record[key] = tuple(record[key])
        return Result(**record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _SetSteps:
    """What the steps over the whole set decided for the kept images, by ledger index: output names, the
    warnings they added (flag, text, in order), the best copy of each duplicate and which ``--drop`` leaves
    out."""

    size: int
    fmt: str
    drop: tuple[str, ...]

    def __post_init__(self) -> None:
        self.outputs: list[str | None] = [None] * self.size
        self.masks: list[str | None] = [None] * self.size
        self.added: dict[int, list[tuple[str, str]]] = {}  # few: most images get no warning
        self.best_copy: dict[int, int] = {}  # each image flagged DUP -> the best copy of its group
        self.dropped = bytearray(self.size)

    def warn(self, i: int, flag: str, text: str) -> None:
        self.added.setdefault(i, []).append((flag, text))

    def flags(self, i: int) -> tuple[str, ...]:
        return tuple(flag for flag, _ in self.added.get(i, ()))

    def decide_drops(self, worker_flags: list[tuple[str, ...]], kept: list[int]) -> None:
        """Which kept images ``--drop`` leaves out, on their flags (the workers' and the set's): a duplicate
        only where the best copy of its group stays, so no photo is lost to a copy that is itself dropped."""
        others = {DROPS[d] for d in self.drop if d != "duplicates"}
        for i in kept:
            self.dropped[i] = bool(others.intersection(worker_flags[i] + self.flags(i)))
        if "duplicates" in self.drop:
            for i, best in self.best_copy.items():
                self.dropped[i] |= not self.dropped[best]

    def settle(self, r: Result, i: int) -> Result:
        """``r`` (ledger entry ``i``, as its worker left it) as the report gives it: named, warned, dropped."""
        r.output, r.mask = self.outputs[i], self.masks[i]
        for flag, text in self.added.get(i, ()):
            r.warn(flag, text)
        if self.dropped[i]:
            best = self.best_copy.get(i)
            # a duplicate of a dropped best copy is dropped for its other flags alone (decide_drops)
            drop_flagged([r], self.drop if best is None or not self.dropped[best]
                         else tuple(d for d in self.drop if d != "duplicates"))
        return r


def _check_drop(drop: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The --drop names, validated, deduplicated, in DROPS order (so the report is the same either way)."""
    names = [d.strip() for d in (drop.split(",") if isinstance(drop, str) else drop) if d.strip()]
    unknown = [d for d in names if d not in DROPS]
    if unknown:
        raise SdtuneError(f"--drop: '{unknown[0]}' is not one of {', '.join(DROPS)}; e.g. --drop duplicates,blurry")
    return tuple(d for d in DROPS if d in names)


def drop_flagged(kept: list[Result], drop: tuple[str, ...]) -> list[Result]:
    """Mark the images flagged by the checks named in ``drop`` as dropped (reason: the names and the warnings
    that flagged them) and return them, in order.

    Of each group of duplicates the best copy is never flagged DUP (``set_findings``: sharpest, then largest,
    then first by name, preferring copies no other --drop check leaves out), so it stays with ``duplicates``.
    """
    dropped = []
    for r in kept:
        names = [d for d in drop if DROPS[d] in r.flags]
        if names:
            r.status = "dropped"
            r.reason = f"dropped (--drop {','.join(names)}): " + "; ".join(r.flagged_by[DROPS[d]] for d in names)
            dropped.append(r)
    return dropped


def _settings(resolution: int, crop: str, fmt: str, min_side: int | None, background: str,
              face_min_confidence: float | None = None, bucket_multiple: int | None = None) -> Settings:
    if not isinstance(resolution, int) or resolution < 64 or resolution > 4096 or resolution % 8:
        raise SdtuneError(f"--resolution: {resolution} is not a multiple of 8 between 64 and 4096; e.g. 512")
    if crop not in CROPS:
        raise SdtuneError(f"--crop: '{crop}' is not one of {', '.join(CROPS)}")
    if fmt not in FORMATS:
        raise SdtuneError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    min_side = resolution // 2 if min_side is None else min_side
    if min_side < 1:
        raise SdtuneError(f"--min-side: {min_side} must be at least 1")
    try:
        rgb = ImageColor.getrgb(background)[:3]
    except ValueError:
        raise SdtuneError(f"--background: '{background}' is not a colour; use a name or #rrggbb") from None
    return Settings(resolution, crop, fmt, min_side, rgb, Image.MAX_IMAGE_PIXELS,  # type: ignore[arg-type]
                    _face_min_confidence(face_min_confidence, crop),
                    _bucket_multiple(bucket_multiple, crop, resolution))


def _bucket_multiple(value: int | None, crop: str, resolution: int) -> int:
    """--bucket-multiple, checked: a whole number >= 1 that divides the resolution (a model that takes only
    multiples of it takes no square of another side), given only with --crop bucket (else it does nothing)."""
    if value is None:
        return 1
    if crop != "bucket":
        raise SdtuneError(f"--bucket-multiple: only --crop bucket uses it (this is --crop {crop}); drop it or use "
                          "--crop bucket")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SdtuneError(f"--bucket-multiple: {value} is not a whole number >= 1; e.g. 64 (SD1.x), 32 (SDXL), "
                          "16 (FLUX.1, SD3.x)")
    step = math.lcm(8, value)  # a resolution is a multiple of 8 too (_settings)
    if step > 4096:
        raise SdtuneError(f"--bucket-multiple: {value} leaves no --resolution (a multiple of both 8 and {value} up "
                          "to 4096); e.g. 64 (SD1.x), 32 (SDXL), 16 (FLUX.1, SD3.x)")
    if resolution % value:
        lower = max(step, resolution // step * step)
        shown = " or ".join(str(r) for r in (lower, lower + step) if 64 <= r <= 4096)
        raise SdtuneError(f"--resolution: {resolution} is not a multiple of the bucket multiple {value}, so the "
                          f"model takes no {resolution}x{resolution} image; e.g. --resolution {shown}")
    return value


def _check_caption_option(src: str | Path, caption: str | None, caption_from: str | None) -> None:
    """Refuse a run with no caption option (naming SRC's metadata file, if it has one) or an unknown one."""
    if caption is None and caption_from is None:
        found = has_metadata(src)
        hint = (f"; SRC has {found}: --caption-from metadata uses its captions" if found else "")
        raise SdtuneError("--caption: give a caption, e.g. --caption 'a photo of sks dog', or --caption-from "
                          f"{'|'.join(CAPTION_SOURCES)}{hint}")
    if caption_from not in (None, *CAPTION_SOURCES):
        raise SdtuneError(f"--caption-from: '{caption_from}' is not one of {', '.join(CAPTION_SOURCES)}")
    if caption is not None and not caption.strip():
        raise SdtuneError(f"--caption: {caption!r} holds no words: every image would train on an empty caption; "
                          "give one, e.g. --caption 'a photo of sks dog'")


def _check_workers(workers: int | None) -> int:
    """--workers, checked: None is every CPU core this process may use; more than that are that many (more
    processes than cores only share them, each with its own imports and memory), with a note."""
    cores = _cores()
    if workers is None:
        return cores
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SdtuneError(f"--workers: {workers} is not a number of processes >= 1; leave it out to use all "
                          f"{cores} CPU cores")
    if workers > cores:
        logger.info(f"--workers {workers}: this machine has {cores} CPU cores for it; using {cores}")
        return cores
    return workers


def _face_min_confidence(value: float | None, crop: str) -> float:
    """--face-min-confidence, checked: a finite number >= 0, given only with --crop face (else it would do
    nothing, silently)."""
    if value is None:
        return FACE_MIN_CONFIDENCE
    if crop != "face":
        raise SdtuneError(f"--face-min-confidence: only --crop face uses it (this is --crop {crop}); drop it "
                          "or use --crop face")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SdtuneError(f"--face-min-confidence: {value} is not a number >= 0; e.g. {FACE_MIN_CONFIDENCE} "
                          "(real faces score about 4-9, false detections on animals and objects about 1-3)")
    return float(value)


def _check_rename(pattern: str, token: str | None) -> None:
    """Refuse a --rename pattern with unknown fields or a bad format spec, before any work."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise SdtuneError(f"--rename: '{pattern}' is not a valid pattern ({e}); e.g. '{{token}}_{{index:03d}}'") from None
    unknown = names - set(RENAME_FIELDS)
    if unknown:
        raise SdtuneError(f"--rename: unknown field {{{sorted(unknown)[0]}}}; fields: "
                          + ", ".join(f"{{{k}}}" for k in RENAME_FIELDS))
    if "token" in names and not token:
        raise SdtuneError("--rename: the pattern uses {token}; pass --token WORD, e.g. --token sks")
    if token and "token" not in names:  # it would be ignored: --token names files, it is not the caption
        raise SdtuneError(f"--token: the --rename pattern '{pattern}' has no {{token}}, so it would not be used; "
                          f"fix: --rename '{{token}}_{{index:03d}}', or remove --token (the caption is --caption's)")
    try:
        pattern.format(token=token or "sks", index=1, stem="photo")
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise SdtuneError(f"--rename: '{pattern}' cannot be filled in ({e}); e.g. '{{token}}_{{index:03d}}'") from None


def _check_folders(src: str | Path, out: str | Path) -> tuple[Path, Path]:
    src_dir, out_dir = Path(src).resolve(), Path(out).resolve()
    if not src_dir.is_dir():
        raise SdtuneError(f"SRC: {src} is not a folder")
    if out_dir == src_dir or src_dir.is_relative_to(out_dir):
        raise SdtuneError(f"OUT: {out} holds SRC; choose an output folder outside the photos")
    if out_dir.exists() and not out_dir.is_dir():
        raise SdtuneError(f"OUT: {out} exists and is not a folder")
    return src_dir, out_dir


def _previous_outputs(out_dir: Path, overwrite_edits: bool = False) -> list[Path]:
    """What an earlier prep left in OUT (to be replaced); refuse an OUT that holds anything else, or (unless
    ``overwrite_edits``) one of the earlier prep's files edited since it wrote them."""
    if not out_dir.exists():
        return []
    entries = [p for p in out_dir.iterdir() if p.name.lower() not in JUNK_FILES]
    if not entries:
        return []
    report = out_dir / REPORT
    if not report.is_file():
        raise SdtuneError(f"OUT: {out_dir} is not empty and holds no {REPORT} from an earlier prep; choose an "
                          "empty or new folder")
    try:
        earlier = json.loads(report.read_text(encoding="utf-8"))
        written = _written(earlier)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SdtuneError(f"OUT: {report} is unreadable; empty {out_dir} or choose another folder") from None
    ours = {REPORT, SHEET, TMP_DIR, STAGE_DIR} | set(written)
    foreign = sorted(p.name for p in entries if p.name not in ours)
    if foreign:
        raise SdtuneError(f"OUT: {out_dir} holds files an earlier prep did not write ({_listed(foreign)}); move "
                          "them or choose another folder")
    edited = [] if overwrite_edits else _edited(entries, written, report.stat().st_mtime_ns)
    if edited:
        one = len(edited) == 1
        raise SdtuneError(f"OUT: {_listed(edited)} in {out_dir} {'was' if one else 'were'} edited since prep "
                          f"wrote {'it' if one else 'them'}; fix: --overwrite-edits to replace "
                          f"{'it' if one else 'them'}, or move {'it' if one else 'them'} away first")
    return entries


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _written(report: dict) -> dict[str, str | None]:
    """What the prep that wrote ``report`` left in OUT besides the report and the sheet: file name -> its
    sha256 as written (None where that prep, an older sdtune, did not record it)."""
    written: dict[str, str | None] = {METADATA: report.get("metadata_sha256")}
    for row in report["files"]:
        for key in ("output", "mask"):
            if row.get(key):
                written[row[key]] = row.get(f"{key}_sha256")
    return written


def _edited(entries: list[Path], written: dict[str, str | None], since: int) -> list[str]:
    """The names of ``entries`` that differ from what the earlier prep wrote (``written``): a file with other
    bytes, or a folder in a file's place. Only metadata.jsonl and files modified at or after the earlier
    report (``since``, its mtime in ns: prep closes it after writing every image) are read, so a rerun over
    100,000 untouched images hashes none of them. A link in a file's place is not edited content (removing
    it loses nothing); a file whose hash the earlier prep (an older sdtune) did not record cannot be told."""
    edited = []
    for p in entries:
        if p.name not in written:
            continue
        st = p.lstat()  # one system call a file
        if stat.S_ISDIR(st.st_mode):
            edited.append(p.name)
            continue
        expected = written[p.name]
        if expected is None or not stat.S_ISREG(st.st_mode):  # a link: removing it loses nothing
            continue
        if p.name != METADATA and st.st_mtime_ns < since:
            continue
        if sha256_file(p) != expected:
            edited.append(p.name)
    return sorted(edited)


def _nothing_usable(src_dir: Path, results: list[Result]) -> str:
    usable = [r for r in results if r.status not in ("ignored", "caption")]
    if not usable:
        return f"SRC: {src_dir} holds no image files" + (
            f" ({len(results)} ignored: {', '.join(r.source for r in results[:5])})" if results else "")
    lines = [f"SRC: none of the {len(usable)} files in {src_dir} is usable:"]
    lines += [f"{r.source}: {r.reason}" for r in usable[:20]]
    if len(usable) > 20:
        lines.append(f"... and {len(usable) - 20} more")
    if any((r.reason or "").startswith("too small") for r in usable):
        lines.append("fix: use larger photos, or lower --min-side (they will be upscaled) or --resolution")
    found = has_metadata(src_dir)
    if found and any((r.reason or "").startswith("no caption") and "metadata" not in (r.reason or "") for r in usable):
        lines.append(f"fix: SRC has {found}: --caption-from metadata uses its captions")
    return "\n".join(lines)


def _order(rel: str) -> tuple[str, str]:
    return rel.casefold(), rel  # the same order on case-sensitive and case-insensitive file systems


# --------------------------------------------------------------------------------------------------------
# Finding source files and captions


def find_sources(src_dir: Path, out_dir: Path) -> tuple[list[tuple[str, Path]], list[Result]]:
    """Candidate image files under ``src_dir`` (relative name, path) and results for what is left out:
    junk and text files (ignored), symlinks leaving SRC, non-regular and empty files, and earlier prep
    outputs in subfolders (skipped: their crops would be duplicates, their contact sheet a collage)."""
    sources: list[tuple[str, Path]] = []
    left_out: list[Result] = []
    src_is_prep_output = _is_prep_output(src_dir)  # re-prepping a prep output: its images, not its sheet
    for dirpath, dirnames, filenames in os.walk(src_dir):  # does not follow symlinked folders
        here = Path(dirpath)
        for d in sorted(dirnames):
            rel = (here / d).relative_to(src_dir).as_posix()
            row, search = _folder(here / d, rel, out_dir)
            if row is not None:
                left_out.append(row)
            if not search:
                dirnames.remove(d)
        dirnames.sort()
        for name in sorted(filenames):
            path, rel = here / name, (here / name).relative_to(src_dir).as_posix()
            why = _left_out(path, src_dir)
            if src_is_prep_output and rel == SHEET:
                why = "skipped", f"the contact sheet of the earlier sdtune prep in SRC ({REPORT}), not a photo"
            if why is None:
                sources.append((rel, path))
            else:
                left_out.append(Result(rel, *why))
    return sources, left_out


def _folder(path: Path, rel: str, out_dir: Path) -> tuple[Result | None, bool]:
    """(the report row of the subfolder ``path`` of SRC, named ``rel``, if it is left out; whether to search
    it for photos)."""
    name = path.name
    if name.lower() in JUNK_DIRS or name.startswith("."):
        return Result(rel + "/", "ignored", reason="junk or hidden folder"), False
    if path.resolve() == out_dir:
        return None, False  # OUT inside SRC: our own output is not a source
    if path.is_symlink():  # os.walk does not follow it
        return Result(rel + "/", "skipped", reason="symlinked folder not followed"), True
    if _is_prep_output(path):
        why = (f"an earlier sdtune prep output ({rel}/{REPORT}): its crops are not photos, nor its contact sheet; "
               "prep the photos it came from")
        return Result(rel + "/", "skipped", reason=why), False
    return None, True


def _is_prep_output(folder: Path) -> bool:
    """Whether ``folder`` holds a prep_report.json that sdtune prep wrote (its first key is ``sdtune_prep``);
    reads its first bytes only (a 100,000-photo report is tens of MB)."""
    try:
        with open(folder / REPORT, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return re.match(rb'\{\s*"sdtune_prep"\s*:', head) is not None


def _left_out(path: Path, src_dir: Path) -> tuple[str, str] | None:
    name = path.name
    if name.lower() in JUNK_FILES or name.startswith("."):  # also macOS's "._name" resource forks
        return "ignored", "junk or hidden file"
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "ignored", "text file, not an image"
    if is_metadata_file(name):  # metadata.parquet: read for --caption-from metadata, never decoded
        return "ignored", "metadata file, not an image"
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            return "skipped", "broken symlink: what it points to does not exist"
        if target.is_dir():  # os.walk lists a link to a folder as a file when it is a loop
            return "skipped", "symlinked folder not followed"
        if not target.is_relative_to(src_dir):
            return "skipped", "symlink to a file outside SRC refused"
    if not path.is_file():
        return "skipped", "not a regular file (a device, pipe or socket)"
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return "skipped", f"file larger than {MAX_FILE_BYTES // 2**20} MiB"
    if size == 0:  # the same words as `sdtune train` (sdtune.data) for the same file
        return "skipped", "an empty file (0 bytes); fix: copy the photo again, or remove it"
    return None


def _mask_name(rel: str) -> str:
    """The source mask of the source image ``rel``: ``NAME.mask.png`` beside it."""
    return str(Path(rel).with_name(Path(rel).stem + MASK_SUFFIX).as_posix())


def pair_masks(sources: list[tuple[str, Path]], results: list[Result]) -> tuple[list[tuple[str, Path]],
                                                                                 dict[str, str]]:
    """Masks among the sources (``NAME.mask.png`` beside an image ``NAME.*``) are not images: each goes with
    its image, to be cropped with it (a result ``ignored`` says so). Returns (the other sources, {image: mask
    path}); a mask with no image of its name is left a source like any other file."""
    paths = dict(sources)
    paired = {rel: str(paths[_mask_name(rel)]) for rel, _ in sources
              if not rel.lower().endswith(MASK_SUFFIX) and _mask_name(rel) in paths}
    used = {_mask_name(rel): sorted(r for r in paired if _mask_name(r) == _mask_name(rel)) for rel in paired}
    for rel, images in sorted(used.items()):
        results.append(Result(rel, "ignored", reason=f"the mask of {', '.join(images)}: cropped with it into "
                              f"its NAME{MASK_SUFFIX}"))
    return [(rel, path) for rel, path in sources if rel not in used], paired


def fit_mask(file: Path, decoded: Decoded) -> Image.Image:
    """A mask file (white = subject) for the image ``decoded``: mode L at the decoded image's size. A mask's
    transparent pixels are not subject (flattened on black); colour counts by brightness. Raises
    ``Unreadable`` with the reason, a shape other than the image's among them."""
    mask = read_image(file.read_bytes(), file.suffix, min(decoded.image.size), Image.MAX_IMAGE_PIXELS,
                      (0, 0, 0))
    (mw, mh), (w, h) = mask.size, decoded.size  # upright, full resolution
    if abs(mw * h - mh * w) > 0.01 * max(mw * h, mh * w):
        raise Unreadable(f"it is {mw}x{mh} px, its image {w}x{h}: another shape, so it cannot follow the "
                         "image's crop; fix: save the mask at the image's size")
    return mask.image.convert("L").resize(decoded.image.size, Image.Resampling.BILINEAR)


def _caption(src_dir: Path, rel: str, caption: str | None, caption_from: str | None,
             metadata: SourceMetadata | None = None) -> tuple[str | None, str]:
    """(caption, '') or (None, why there is none)."""
    if caption is not None:  # whitespace made single spaces, as a .txt caption's
        return " ".join(caption.split()), ""
    path = src_dir / rel
    if caption_from == "filename":
        # a name's bytes that are not UTF-8 (surrogates from the file system) become U+FFFD: a caption is text
        text = caption_from_filename(os.fsencode(path.stem).decode("utf-8", "replace"))
        if not text:
            return None, "no caption: the file name holds no words"
        if CAMERA_NAME.fullmatch(text):  # IMG_1234.jpg: the camera's name, not a description
            return None, f"no caption: '{path.name}' is a camera's file name, not words that describe it"
        return text, ""
    if caption_from == "metadata":
        found = metadata.captions.get(rel) if metadata else None
        if found is None:
            return None, f"no caption: {metadata.names() if metadata else 'metadata.jsonl'} does not list it " \
                         "(--caption-from metadata)"
        return (found.text, "") if found.text else (None, f"no caption: {found.where} gives it an empty caption")
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file() or not sidecar.resolve().is_relative_to(src_dir):
        return None, f"no caption: {sidecar.name} not found beside it (--caption-from txt)"
    try:
        text = " ".join(sidecar.read_bytes()[:65536].decode("utf-8-sig").split())
    except UnicodeDecodeError:
        return None, f"no caption: {sidecar.name} is not UTF-8 text"
    return (text, "") if text else (None, f"no caption: {sidecar.name} is empty")


def _source_metadata(src_dir: Path, left_out: list[Result], caption_from: str | None) -> SourceMetadata | None:
    """The captions of SRC's metadata files (``sdtune.metadata``): for --caption-from metadata (an error
    without any), and for txt, to say where a .txt and the metadata disagree (a metadata file that cannot be
    read is then not compared); None otherwise."""
    files = [r.source for r in left_out if r.status == "ignored" and is_metadata_file(r.source)]
    if caption_from == "metadata":
        if not files:
            raise SdtuneError(f"--caption-from metadata: {src_dir} has no metadata.jsonl, .csv or .parquet (a "
                              "file_name column and a text, caption or prompt column); fix: --caption-from txt "
                              "or filename, or --caption")
        return read_metadata(src_dir, files)
    if caption_from == "txt" and files:
        with contextlib.suppress(SdtuneError):
            return read_metadata(src_dir, files)
    return None


def _caption_notes(src_dir: Path, sources: list[tuple[str, Path]], captioned: dict[str, str],
                   left_out: list[Result], caption_from: str | None, metadata: SourceMetadata | None) -> list[str]:
    """Mark the caption files read (.txt, metadata) as ``caption`` rows, each .txt beside no image with a
    warning ("caption without image"); return the warnings about the captions as a whole: metadata rows
    naming no image, and images whose .txt and metadata captions differ (saying which one is used).
    ``captioned``: each image with a caption -> that caption."""
    names = {rel for rel, _ in sources}
    if caption_from == "txt":
        _mark_txt_rows(names, captioned, left_out)
    notes: list[str] = []
    if metadata is None:
        return notes
    read = Counter(metadata.captions[rel].file for rel in captioned) if caption_from == "metadata" else Counter()
    for r in left_out:
        if r.status == "ignored" and r.source in metadata.files:
            r.status, r.reason = ("caption", f"the captions of {read[r.source]} images (--caption-from metadata)") \
                if read[r.source] else ("ignored", f"not read: --caption-from {caption_from} (--caption-from "
                                                     "metadata reads it)")
    if caption_from == "metadata":
        notes += metadata.notes
        orphans = [f"{rel} ({c.where})" for rel, c in metadata.captions.items() if rel not in names]
        if orphans:
            notes.append(f"caption without image: {_count(len(orphans), 'row')} of {metadata.names()} name no image "
                         f"in SRC, so their captions are not used: {_listed(orphans)}")
    differ = _differing(src_dir, captioned, metadata, caption_from)
    if differ:
        used_name, other = ("metadata", "the .txt files") if caption_from == "metadata" else (".txt", metadata.names())
        notes.append(f"{_count(len(differ), 'image')} with a .txt and a {metadata.names()} caption that differ; "
                     f"the {used_name} captions are used (--caption-from {caption_from}), not {other}: "
                     + "; ".join(differ[:SHOWN_NOTES]) + (" ..." if len(differ) > SHOWN_NOTES else ""))
    return notes


# What CLIP reads of a caption: 77 tokens with its start and end tokens. Every family sdtune trains has a CLIP
# encoder (SD3 and FLUX add T5, which reads more, but CLIP-L's pooled embedding still stops here).
CLIP_CAPTION_TOKENS = 75


def _long_captions(captions: list[tuple[str, str]]) -> list[str]:
    """A warning naming the images whose caption is longer than CLIP reads: training and sampling cut the rest
    off without a word (``sdtune train`` warns again with the model's own tokenizers). ``captions``: (source,
    caption) of each image."""
    lengths: dict[str, int] = {}  # each distinct caption once: with --caption, all images share one
    long = []
    for rel, text in captions:
        if text not in lengths:
            lengths[text] = len(clip_tokenize(text))
        if lengths[text] > CLIP_CAPTION_TOKENS:
            long.append((rel, text))
    if not long:
        return []
    shown = []
    for rel, text in long[:SHOWN_NOTES]:
        seen = clip_prefix(text, CLIP_CAPTION_TOKENS)
        shown.append(f"{rel} ({lengths[text]} tokens, read up to '...{seen[-30:]}')")
    return [f"long caption: {_count(len(long), 'image')} with a caption longer than the {CLIP_CAPTION_TOKENS} "
            f"tokens CLIP reads (77 with its start and end), so training and sampling ignore the rest: "
            + "; ".join(shown) + (" ..." if len(long) > SHOWN_NOTES else "")
            + ". fix: shorten them (the subject's identifier and class first)"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mark_txt_rows(names: set[str], captioned: dict[str, str], left_out: list[Result]) -> None:
    """With --caption-from txt: each .txt read as an image's caption becomes a ``caption`` row, and each .txt
    with no image of its name beside it an ``ignored`` row with a warning (its image was deleted or renamed)."""
    read = {}
    for rel in captioned:  # in source order: of a.jpg and a.png sharing a.txt, the first names it
        read.setdefault(PurePosixPath(rel).with_suffix(".txt").as_posix(), rel)
    beside = {PurePosixPath(rel).with_suffix(".txt").as_posix() for rel in names}
    for r in left_out:
        if r.status != "ignored" or PurePosixPath(r.source).suffix != ".txt":
            continue
        if r.source in read:
            r.status, r.reason = "caption", f"the caption of {read[r.source]} (--caption-from txt)"
        elif r.source not in beside:
            stem = PurePosixPath(r.source).with_suffix("").as_posix()
            r.reason = "caption without image"
            r.warnings.append(f"caption without image: no image {stem}.* beside it, so its caption is not used")


def _differing(src_dir: Path, captioned: dict[str, str], metadata: SourceMetadata, caption_from: str | None
               ) -> list[str]:
    """'a.png: 'x' (metadata.jsonl line 3) vs 'y' (a.txt)' for each captioned image whose .txt and metadata
    captions differ (whitespace aside)."""
    if caption_from not in ("txt", "metadata"):
        return []
    differ = []
    for rel, text in captioned.items():
        found = metadata.captions.get(rel)
        if found is None:
            continue
        txt = text if caption_from == "txt" else _sidecar_text(src_dir, rel)
        if txt is not None and txt != found.text:
            sidecar = PurePosixPath(rel).with_suffix(".txt").name
            differ.append(f"{rel}: {found.text[:60]!r} ({found.where}) vs {txt[:60]!r} ({sidecar})")
    return differ


def _sidecar_text(src_dir: Path, rel: str) -> str | None:
    """The caption in the .txt beside the image ``rel``, whitespace made single spaces; None if unreadable."""
    sidecar = (src_dir / rel).with_suffix(".txt")
    try:
        return " ".join(sidecar.read_bytes()[:65536].decode("utf-8-sig").split())
    except (OSError, UnicodeDecodeError):
        return None


def caption_from_filename(stem: str) -> str:
    """'sks_dog_on_the_beach (2)' -> 'sks dog on the beach': underscores to spaces, copy numbers dropped."""
    text = re.sub(r"[_\s]+", " ", stem)
    text = re.sub(r"(\s*(\(\d+\)|copy|-?\d+))+$", "", text, flags=re.IGNORECASE)
    return text.strip(" -.")


# --------------------------------------------------------------------------------------------------------
# One file (runs in a worker process)


def _stage(r: Result, stage: Path, index: int) -> Result:
    """Move a result's bytes and thumbnail out of memory into ``stage`` (``Result.staged``)."""
    if not r.encoded:
        return r
    stage.mkdir(parents=True, exist_ok=True)
    r.staged = str(stage / str(index))
    Path(r.staged).write_bytes(r.encoded)
    if r.mask_encoded:
        Path(r.staged + ".mask").write_bytes(r.mask_encoded)
    if r.thumb is not None:
        r.thumb.save(r.staged + ".thumb.png")
    r.encoded, r.mask_encoded, r.thumb = b"", b"", None
    return r


def _run(jobs: list[tuple], workers: int, progress: bool | None) -> Iterator[Result]:
    """Process every job, over ``workers`` processes (0: all cores), with a progress bar; each result as it
    arrives (``prep`` stages its bytes on disk at once: memory stays flat in the number of photos)."""
    from tqdm.auto import tqdm

    workers = max(1, min(workers, len(jobs)))
    # disable=None: a bar on a terminal, none in logs
    bar = tqdm(total=len(jobs), desc="prep", unit="img", disable=None if progress is None else not progress)
    if workers == 1:
        for job in jobs:
            yield process(*job)
            bar.update()
    else:
        import multiprocessing

        # spawn, not fork: the parent may hold torch threads, which a fork can deadlock on
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(_process_job, jobs):
                yield r
                bar.update()
    bar.close()


def _process_job(job: tuple) -> Result:
    return process(*job)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process(rel: str, path: str, caption: str, settings: Settings, mask: str | None = None,
            user_box: tuple[int, int, int, int] | None = None) -> Result:
    """Read, crop, resize, encode and measure one source file; ``mask``: its source mask (``pair_masks``),
    else its transparency, becomes NAME.mask.png; ``user_box``: the crop in source pixels (``prep``'s
    ``crop_boxes``), else ``settings.crop`` chooses it."""
    import imagehash

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Result(rel, "skipped", reason=f"cannot read the file: {e.strerror or e}")
    try:
        decoded = read_image(data, Path(path).suffix, settings.resolution, settings.max_pixels, settings.background)
    except Unreadable as e:
        return Result(rel, "skipped", reason=str(e))
    r = Result(rel, "kept", caption=caption, format=decoded.format, size=decoded.size, fixes=decoded.fixes,
               warnings=decoded.warnings, sha256=hashlib.sha256(data).hexdigest())
    if decoded.animated:
        r.flags.append("ANIM")
    small = _small(decoded.image, ANALYSIS_SIDE)
    if user_box is None:
        box, out_size = choose_crop(decoded, small, settings, r)
    else:
        try:
            box, out_size = user_crop(decoded, user_box, settings, r)
        except ValueError as e:
            return Result(rel, "skipped", format=decoded.format, size=decoded.size, reason=f"crop box: {e}")
    sx, sy = decoded.scale
    r.crop_box = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
    too_small = _size_checks(r, out_size, settings)
    if too_small:
        return Result(rel, "skipped", format=decoded.format, size=decoded.size, reason=too_small)

    image = decoded.image.resize(out_size, Image.Resampling.LANCZOS, box=box)
    image.info = {}  # Pillow would write the source's EXIF or ICC profile back out from here
    r.output_size = image.size
    r.encoded = encode(image, settings.format)
    r.output_sha256 = hashlib.sha256(r.encoded).hexdigest()
    subject = _subject(mask, decoded, r)
    if subject is not None:  # the same crop and resize as the pixels, so it lies exactly on them
        r.mask_encoded = encode(subject.resize(out_size, Image.Resampling.LANCZOS, box=box), "png")
        r.mask_sha256 = hashlib.sha256(r.mask_encoded).hexdigest()
        r.has_mask = True
    r.thumb = _small(image, SHEET_CELL * min(image.size) // max(image.size))
    r.phash = int(str(imagehash.phash(small)), 16)  # of the whole picture: crops of one shot may differ
    r.sharpness = sharpness(image)
    r.grayscale = is_grayscale(r.thumb)
    r.palette = any(f.startswith(PALETTE_FIXES) for f in decoded.fixes)
    r.status = "fixed" if r.fixes else "kept"
    return r


def _subject(mask: str | None, decoded: Decoded, r: Result) -> Image.Image | None:
    """The subject mask at the decoded image's size: the source mask file, else the transparency, else None.
    A mask file that cannot be used is a warning (MASK), and the transparency is used instead."""
    if mask is None:
        return decoded.alpha
    try:
        return fit_mask(Path(mask), decoded)
    except (OSError, Unreadable) as e:
        r.warn("MASK", f"mask {Path(mask).name} not used: {e}")
        return decoded.alpha


def _size_checks(r: Result, out_size: tuple[int, int], settings: Settings) -> str | None:
    """Why the source is too small to use, or None after adding upscaling / aspect warnings to ``r``."""
    (w, h), (left, top, right, bottom) = r.size, r.crop_box  # type: ignore[misc]
    crop_w, crop_h = right - left, bottom - top
    if min(crop_w, crop_h) < settings.min_side:
        return f"too small: {w}x{h}, crop {crop_w}x{crop_h} is under --min-side {settings.min_side}"
    upscale = out_size[0] / crop_w
    if upscale > 1.001:
        r.warn("SMALL", f"upscaled x{upscale:.2f}: crop {crop_w}x{crop_h} is smaller than {out_size[0]}x{out_size[1]}")
    aspect = max(w, h) / min(w, h)
    if aspect > EXTREME_ASPECT:
        r.warn("ASPECT", f"extreme aspect ratio {aspect:.1f}:1; {_crop_keeps(r, out_size, settings)}")
    return None


def _crop_keeps(r: Result, out_size: tuple[int, int], settings: Settings) -> str:
    """How much of the source ``r``'s crop keeps, e.g. 'the square crop keeps 25% of it'; from the crop box
    itself, so it is true of a bucket's shape and of a user's box as of the square."""
    (w, h), (left, top, right, bottom) = r.size, r.crop_box  # type: ignore[misc]
    kept = 100 * (right - left) * (bottom - top) / (w * h)
    shape = "square" if out_size[0] == out_size[1] else f"{out_size[0]}x{out_size[1]}"
    crop = f"the {shape} crop" if not (r.crop or "").startswith("user") else f"the {shape} crop box"
    if settings.crop == "bucket":
        crop += " (the nearest training bucket)"
    return f"{crop} keeps {'all' if kept >= 99.5 else f'{kept:.0f}%'} of it"


def encode(image: Image.Image, fmt: str) -> bytes:
    """Image -> file bytes with no metadata (EXIF and ICC are stripped: pixels are sRGB)."""
    import io

    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, "JPEG", quality=95, subsampling=0)  # 4:4:4: keep colour edges for training
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=95, method=4)
    else:
        image.save(buf, "PNG", compress_level=1)  # 5x faster than the default 6, files ~20% larger
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Crops. Boxes are (left, top, right, bottom) floats in the decoded image's pixels.


def choose_crop(
    decoded: Decoded, small: Image.Image, settings: Settings, r: Result
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The crop box and the output size for one image, by ``settings.crop`` (``small``: a reduced copy)."""
    im, res = decoded.image, settings.resolution
    r.crop = settings.crop
    if settings.crop == "bucket":
        bw, bh = nearest_bucket(decoded.size, res, settings.bucket_multiple)
        r.crop = f"bucket {bw}x{bh}"
        return aspect_box(im.size, bw / bh), (bw, bh)
    if settings.crop == "center":
        return square_box(im.size, None), (res, res)
    if settings.crop == "face":
        faces = detect_faces(im)
        r.face_confidence = max((f[4] for f in faces), default=None)
        sure = [f for f in faces if f[4] >= settings.face_min_confidence]
        if sure:
            r.crop = f"face ({len(sure)} found)"
            x, y = _face_center(sure, min(im.size))
            return square_box(im.size, x if im.width >= im.height else y), (res, res)
        r.crop = "smart (no face found)" if not faces else \
            f"smart (face confidence {r.face_confidence:.2f} < {settings.face_min_confidence:g})"
    return square_box(im.size, smart_center(small) * max(im.size) / max(small.size)), (res, res)


def user_crop(decoded: Decoded, user_box: tuple[int, int, int, int], settings: Settings,
              r: Result) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """A user's crop box (source pixels) as ``choose_crop`` returns one (working pixels) with its output size;
    ValueError (the reason) for a box outside the image, empty, or not square where the output is square."""
    (w, h), (sx, sy) = decoded.size, decoded.scale
    left, top, right, bottom = (float(v) for v in user_box)
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        raise ValueError(f"{list(user_box)} is not inside the {w}x{h} image")
    cw, ch = right - left, bottom - top
    r.crop = "user"
    if settings.crop == "bucket":
        out_size = nearest_bucket((round(cw), round(ch)), settings.resolution, settings.bucket_multiple)
        r.crop = f"user, bucket {out_size[0]}x{out_size[1]}"
    elif abs(cw - ch) > max(2.0, 0.01 * max(cw, ch)):  # a square output would stretch it
        raise ValueError(f"{list(user_box)} is {cw:g}x{ch:g}, not square (only --crop bucket keeps other shapes)")
    else:
        out_size = (settings.resolution, settings.resolution)
    return (left / sx, top / sy, right / sx, bottom / sy), out_size


def square_box(size: tuple[int, int], center: float | None) -> tuple[float, float, float, float]:
    """The largest square, centred on ``center`` along the long axis (None: the middle), kept inside."""
    w, h = size
    side = min(w, h)
    long = max(w, h)
    start = (long - side) / 2 if center is None else min(max(center - side / 2, 0), long - side)
    return (start, 0, start + side, h) if w >= h else (0, start, w, start + side)


def aspect_box(size: tuple[int, int], aspect: float) -> tuple[float, float, float, float]:
    """The largest centred box of width/height ``aspect``."""
    w, h = size
    if w / h > aspect:
        cw = h * aspect
        return ((w - cw) / 2, 0, (w + cw) / 2, h)
    ch = w / aspect
    return (0, (h - ch) / 2, w, (h + ch) / 2)


def smart_center(im: Image.Image) -> float:
    """Centre along the long axis of the square crop smartcrop (skin, detail, saturation, thirds) picks."""
    from smartcrop import SmartCrop

    side = min(im.size)
    if im.width == im.height:
        return side / 2
    best = SmartCrop().analyse(im, crop_width=side, crop_height=side, min_scale=1.0, max_scale=1.0,
                               num_scale_steps=1, step=max(1, side // 32))["top_crop"]
    return (best["x"] if im.width > im.height else best["y"]) + side / 2


@functools.lru_cache(maxsize=1)
def _face_cascade():
    import cv2

    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))


Face = tuple[float, float, float, float, float]  # left, top, right, bottom (image pixels), confidence


def detect_faces(im: Image.Image) -> list[Face]:
    """Frontal faces in ``im``, each with its confidence (OpenCV's Haar cascade, shipped with opencv-python).

    The confidence is the cascade's own score of the detection: the sum of its last stage's weak classifiers
    (``detectMultiScale3``'s level weight), which every detection passed. Not a probability: see
    ``FACE_MIN_CONFIDENCE`` for what real faces and false detections score."""
    import cv2
    import numpy as np

    small = _small(im, FACE_SIDE)
    gray = cv2.equalizeHist(np.asarray(small.convert("L")))
    least = max(24, min(small.size) // 16)
    found, _, weights = _face_cascade().detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5,
                                                          minSize=(least, least), outputRejectLevels=True)
    k = im.width / small.width
    boxes = np.asarray(found).reshape(-1, 4).tolist()
    return [(x * k, y * k, (x + w) * k, (y + h) * k, float(c))
            for (x, y, w, h), c in zip(boxes, np.asarray(weights).reshape(-1).tolist(), strict=True)]


def _face_center(faces: list[Face], side: float) -> tuple[float, float]:
    """(x, y) to centre the crop on: all faces if they fit in one crop, else the largest face."""
    x0, y0 = min(f[0] for f in faces), min(f[1] for f in faces)
    x1, y1 = max(f[2] for f in faces), max(f[3] for f in faces)
    if max(x1 - x0, y1 - y0) > side:
        x0, y0, x1, y1 = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))[:4]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _small(im: Image.Image, side: int) -> Image.Image:
    """A copy with short side ``side`` (or the image itself if already smaller), fast and good enough."""
    if min(im.size) <= side:
        return im
    k = side / min(im.size)
    return im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.Resampling.BILINEAR,
                     reducing_gap=2.0)


def bucket_sizes(resolution: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Training buckets (width, height): multiples of 64 (8 below 512 px), area <= resolution², sides
    between resolution/2 and 2 x resolution. At 1024 these are SDXL's buckets (1024², 1152x896, 1216x832,
    1344x768, 1536x640, ... 512x2048).

    With ``multiple`` (the trainer passes the sides its UNet takes without resampling, e.g. 64 for SD1.x),
    only the buckets whose sides are multiples of it; if none is, the square."""
    step = 64 if resolution >= 512 else 8
    area, lo, hi = resolution * resolution, math.ceil(resolution / 2 / step) * step, 2 * resolution
    sizes = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    return sorted(s for s in sizes if s[0] % multiple == 0 and s[1] % multiple == 0) or [(resolution, resolution)]


def nearest_bucket(size: tuple[int, int], resolution: int, multiple: int = 1) -> tuple[int, int]:
    """The bucket (of ``bucket_sizes(resolution, multiple)``) whose aspect ratio is closest (in log ratio)
    to ``size``'s."""
    target = math.log(size[0] / size[1])
    return min(bucket_sizes(resolution, multiple),
               key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


# --------------------------------------------------------------------------------------------------------
# Checks: measured per image in the workers, judged over the whole set here


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grayscale image: low means blurry (only comparable within a set)."""
    import cv2
    import numpy as np

    return float(cv2.Laplacian(np.asarray(image.convert("L")), cv2.CV_64F).var())


def is_grayscale(image: Image.Image) -> bool:
    """True when (almost) no pixel has colour: 99% of pixels within 6 levels across R, G, B."""
    import numpy as np

    a = np.asarray(image, dtype=np.int16)
    chroma = a.max(axis=2) - a.min(axis=2)
    return bool(np.percentile(chroma, 99) <= 6)


def check_set(kept: list[Result]) -> list[str]:
    """Add duplicate and blur warnings to the images; return warnings about the set as a whole."""
    import numpy as np

    sha256 = np.frombuffer(b"".join(bytes.fromhex(r.sha256) if r.sha256 else bytes(32) for r in kept),
                           dtype=np.uint8).reshape(len(kept), 32)
    found = set_findings(
        sha256, np.array([r.phash for r in kept], dtype=np.uint64),
        np.array([r.sharpness for r in kept], dtype=np.float64), np.array([bool(r.grayscale) for r in kept]),
        lambda i: f"{kept[i].output} ({kept[i].source})",
        sizes=np.array([r.size or (0, 0) for r in kept], dtype=np.int64).reshape(len(kept), 2),
        palette=np.array([bool(r.palette) for r in kept]))
    for i, flag, text in found.findings:
        kept[i].warn(flag, text)
    return found.set_warnings


@dataclass
class SetFindings:
    """What ``set_findings`` found over a set of images (indices into the set)."""

    findings: list[tuple[int, str, str]]  # (image, flag, warning), in the order to add them
    set_warnings: list[str]  # about the set as a whole
    best_copy: dict[int, int]  # each image flagged DUP -> the best copy of its group (never flagged DUP)


def set_findings(sha256, phash, sharpness, grayscale, named: Callable[[int], str], *, sizes=None,
                 avoid=None, drop: tuple[str, ...] = (), palette=None) -> SetFindings:
    """The duplicate and blur checks over a set of n images, in order, on their measurements alone: ``sha256``
    (n, 32) uint8 digests, ``phash`` (n,) uint64 perceptual hashes, ``sharpness`` (n,) float64, ``grayscale``
    (n,) bool which images are (or one bool for all); ``named(i)``: how a warning names image i, e.g.
    '001.png (IMG_1.jpg)'.

    Of each group of duplicates (``duplicate_groups``) the best copy is never flagged DUP, and every other
    copy's warning names it and says why it is best (``best_copy``). ``sizes`` (n, 2): the sources' width and
    height (None: all alike); ``avoid`` (n,) bool: the images that a ``--drop`` check other than duplicates
    leaves out (None: none), and with ``drop`` naming blurry, the ones flagged BLUR here too; ``palette`` (n,)
    bool: the sources of at most 256 colours (None: none), whose dithering reads as sharpness."""
    import numpy as np

    n = len(phash)
    gray = np.broadcast_to(np.asarray(grayscale, dtype=bool), (n,))
    # which copy of a shot holds the most colour: 0 full colour, 1 a palette's (dithered), 2 grayscale
    depth = 2 * gray + (0 if palette is None else np.asarray(palette, dtype=bool) & ~gray)
    blurry, median = _blurry(sharpness)
    avoid = np.zeros(n, dtype=bool) if avoid is None else np.asarray(avoid, dtype=bool).copy()
    if "blurry" in drop:
        avoid |= blurry
    sizes = np.ones((n, 2), dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    findings: list[tuple[int, str, str]] = []
    best_copy: dict[int, int] = {}
    for members in duplicate_groups(sha256, phash):
        best, sharpest = _best_copy(members, sharpness, sizes, avoid, depth)
        for i in members.tolist():
            if i != best:
                best_copy[i] = best
                why = _why_best(i, best, sharpest, sharpness, sizes, avoid, depth)
                if bytes(sha256[i]) == bytes(sha256[best]):
                    text = f"exact duplicate of {named(best)}, the best copy: {why}"
                else:
                    distance = int(_popcount(phash[i:i + 1] ^ phash[best])[0])
                    text = (f"near duplicate of {named(best)}, perceptual hash distance {distance}/64, "
                            f"the best copy: {why}")
                findings.append((i, "DUP", text))
    findings.sort(key=lambda f: f[0])  # image by image, as the report lists them
    for i in np.flatnonzero(blurry).tolist():
        findings.append((i, "BLUR", f"looks blurry: sharpness {100 * sharpness[i] / median:.0f}% of the "
                                    "set's median"))
    all_gray = ["every image is grayscale: the LoRA will learn a black-and-white subject"] if n and gray.all() else []
    return SetFindings(findings, all_gray, best_copy)


def _blurry(sharpness) -> tuple:
    """((n,) bool: which images look blurry beside the set's median sharpness, the median); none in a set of
    fewer than 3 (no median to speak of)."""
    import numpy as np

    if len(sharpness) < 3:
        return np.zeros(len(sharpness), dtype=bool), 0.0
    median = float(np.median(sharpness))
    return (sharpness < BLUR_RATIO * median) if median > 0 else np.zeros(len(sharpness), dtype=bool), median


def duplicate_groups(sha256, phash) -> list:
    """The groups of two or more copies of one shot, each an ascending (k,) int64 array of indices: images
    with the same bytes, or whose perceptual hash is within ``NEAR_DUPLICATE_BITS`` of the group's first
    image's. Each image is compared with the first image of every group so far (not with every earlier image:
    a burst of shots drifting away from its first frame starts a new group rather than chaining on), so the
    work is n x groups popcounts and the memory a few (n,) arrays, whatever n."""
    import numpy as np

    n = len(phash)
    if not n:
        return []
    # the first image with the same bytes as each: np.unique's first indices (a sort, not n^2 comparisons)
    _, first, inverse = np.unique(sha256.view(f"V{sha256.shape[1]}").ravel(), return_index=True,
                                  return_inverse=True)
    same = first[inverse.ravel()]
    group = np.arange(n)
    heads = np.empty(n, dtype=np.uint64)  # the first image's hash of each group so far, heads[:k]
    head_of = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        if same[i] != i:
            group[i] = group[same[i]]
            continue
        if k:
            dist = _popcount(heads[:k] ^ phash[i])  # (k,) Hamming distances to every group's first image
            j = int(np.argmin(dist))
            if dist[j] <= NEAR_DUPLICATE_BITS:
                group[i] = head_of[j]
                continue
        heads[k], head_of[k] = phash[i], i
        k += 1
    counts = np.bincount(group, minlength=n)
    shared = np.flatnonzero(counts[group] > 1)  # only the images with a copy: no array per photo
    shared = shared[np.argsort(group[shared], kind="stable")]
    return np.split(shared, np.flatnonzero(np.diff(group[shared])) + 1) if len(shared) else []


def _best_copy(members, sharpness, sizes, avoid, depth) -> tuple[int, float]:
    """(the best of a group of duplicates, the sharpness the others are compared with): of the copies no
    other ``--drop`` check leaves out (all if none is), the ones with the most colour (``depth``: a
    black-and-white copy of a colour photo is never the one to keep, nor a GIF's dithered one, whose dither
    reads as sharpness), those within ``SHARPNESS_TIE`` of the sharpest, then the largest source, then the
    first by name (members are in name order)."""
    pool = members[~avoid[members]]
    if not len(pool):
        pool = members
    pool = pool[depth[pool] == depth[pool].min()]
    sharpest = float(sharpness[pool].max())
    pool = pool[sharpness[pool] >= (1 - SHARPNESS_TIE) * sharpest]
    area = sizes[pool, 0] * sizes[pool, 1]
    return int(pool[area == area.max()][0]), sharpest


def _why_best(i: int, best: int, sharpest: float, sharpness, sizes, avoid, depth) -> str:
    """Why copy ``best`` of a group of duplicates is kept rather than copy ``i`` (``_best_copy``'s steps)."""
    if depth[i] > depth[best] and not (avoid[best] and not avoid[i]):
        why = "in colour, unlike this grayscale copy" if depth[i] == 2 else \
            "in full colour, unlike this copy of at most 256 colours (a palette, often dithered)"
    elif sharpness[i] < (1 - SHARPNESS_TIE) * sharpest:  # then best, at least (1 - SHARPNESS_TIE) * sharpest
        why = f"sharper ({sharpness[best]:.1f} vs {sharpness[i]:.1f})"
    elif avoid[i] and not avoid[best]:
        why = "not left out by another --drop check, unlike this copy"
    elif sizes[best].prod() > sizes[i].prod():
        why = "as sharp, larger ({}x{} vs {}x{})".format(*sizes[best].tolist(), *sizes[i].tolist())
    else:
        why = "as sharp and as large, first by name"
    return why + ("; another --drop check leaves it out too, so --drop duplicates does not count this copy"
                  if avoid[best] else "")


def _check_kept(ledger: _Ledger, kept: list[int], steps: _SetSteps) -> list[str]:
    """``check_set`` over the kept images of a prep, from the ledger's columns (no result is read back); the
    best copy of each group of duplicates goes to ``steps.best_copy``."""
    import numpy as np

    sha256 = np.frombuffer(ledger.sha256, dtype=np.uint8).reshape(len(ledger), 32)[kept]
    sizes = np.frombuffer(ledger.size, dtype=np.uint32).reshape(len(ledger), 2)[kept].astype(np.int64)
    # the flags of the other --drop checks (BLUR is set by set_findings itself)
    others = {DROPS[d] for d in steps.drop if d not in ("duplicates", "blurry")}
    avoid = np.fromiter((bool(others.intersection(ledger.flags[i] + steps.flags(i))) for i in kept),
                        dtype=bool, count=len(kept))
    found = set_findings(
        sha256, np.frombuffer(ledger.phash, dtype=np.uint64)[kept],
        np.frombuffer(ledger.sharpness, dtype=np.float64)[kept], np.array([bool(ledger.grayscale[i]) for i in kept]),
        lambda k: f"{steps.outputs[kept[k]]} ({ledger.sources[kept[k]]})", sizes=sizes, avoid=avoid,
        drop=steps.drop, palette=np.array([bool(ledger.palette[i]) for i in kept]))
    for k, flag, text in found.findings:
        steps.warn(kept[k], flag, text)
    steps.best_copy = {kept[k]: kept[b] for k, b in found.best_copy.items()}
    return found.set_warnings


# --------------------------------------------------------------------------------------------------------
# Names and output


def _popcount(x):
    """The set bits of each uint64: numpy's own bit_count where it has one (2.0+), else by unpacking bytes."""
    import numpy as np

    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8)).reshape(len(x), 64).sum(axis=1)


def sanitise(name: str) -> str:
    """A file name safe everywhere: ASCII letters, digits, '.', '_', '-'; no path parts, no leading dot."""
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    name = re.sub(r"\.{2,}", ".", name).strip("._-")[:100].strip("._-")
    if name.split(".")[0].upper() in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                                      *(f"LPT{i}" for i in range(10))}:
        name = "_" + name
    return name or "image"


def _name(ledger: _Ledger, kept: list[int], steps: _SetSteps, pattern: str, token: str | None) -> None:
    """Give each kept image (ledger indices, in order) its output name; names differ even on case-insensitive
    file systems."""
    ext = steps.fmt
    taken: set[str] = set()
    for index, i in enumerate(kept, 1):
        stem = sanitise(Path(ledger.sources[i]).stem)
        base = sanitise(pattern.format(token=token or "", index=index, stem=stem))
        if f"{base}.{ext}".lower().endswith(MASK_SUFFIX):  # training would read it as a mask, not an image
            base = base[:-5] + "_mask"
            steps.warn(i, "RENAMED", f"renamed to {base}.{ext}: an image named *{MASK_SUFFIX} is read as a mask")
        name, n = base, 1
        while name.casefold() in taken:
            n += 1
            name = f"{base}-{n}"
        if n > 1:
            steps.warn(i, "RENAMED", f"renamed to {name}.{ext}: {base}.{ext} was taken (names compared ignoring "
                                     "case)")
        taken.add(name.casefold())
        steps.outputs[i] = f"{name}.{ext}"
        steps.masks[i] = f"{name}{MASK_SUFFIX}" if ledger.has_mask[i] else None


def _summary(ledger: _Ledger, steps: _SetSteps, set_warnings: list[str]) -> dict:
    """The report's summary, from the ledger's columns and the set's steps."""
    status = [STATUSES[code] for code in ledger.status]
    for i, dropped in enumerate(steps.dropped):
        if dropped:
            status[i] = "dropped"
    count = {s: status.count(s) for s in ("kept", "fixed", "dropped", "skipped", "ignored")}
    kept = [i for i, s in enumerate(status) if s in ("kept", "fixed")]
    return {"files": len(status), "images": count["kept"] + count["fixed"], **count,
            "captions": status.count("caption"),  # the caption files read (.txt, metadata)
            "masks": sum(steps.masks[i] is not None for i in kept),
            # a dropped image's warnings are its reason, not warnings about the set
            "warnings": sum(ledger.warnings[i] + len(steps.added.get(i, ())) for i, s in enumerate(status)
                            if s != "dropped") + len(set_warnings),
            # the contact sheet's cells: all of them, or past SHEET_MAX the flagged ones and a sample
            "contact_sheet": min(SHEET_MAX, count["kept"] + count["fixed"] + count["dropped"])}


def _report(src_dir: Path, settings: Settings, family: str | None, rename: str, caption: str | None,
            caption_from: str | None, summary: dict, set_warnings: list[str], drop: tuple[str, ...] = ()) -> dict:
    """The report but its ``files`` (``_write`` streams those to the file, and returns them)."""
    return {
        "sdtune_prep": 1,
        "source": str(src_dir),
        "settings": {
            "family": family, "resolution": settings.resolution, "crop": settings.crop, "format": settings.format,
            "min_side": settings.min_side, "background": "#{:02x}{:02x}{:02x}".format(*settings.background),
            "rename": rename, "caption": caption, "caption_from": caption_from, "drop": list(drop),
            "face_min_confidence": settings.face_min_confidence if settings.crop == "face" else None,
            "bucket_multiple": settings.bucket_multiple if settings.crop == "bucket" else None,
        },
        "summary": summary,
        "set_warnings": set_warnings,
    }


def _write(out_dir: Path, previous: list[Path], ledger: _Ledger, order: list[int], kept: list[int],
           steps: _SetSteps, report: dict) -> None:
    """Build every output in OUT/.sdtune-prep-tmp, then replace the earlier run's outputs with them; add the
    report's rows (``files``) and metadata.jsonl's sha256 (``metadata_sha256``) to ``report``. One pass over
    the results in order: each kept image's staged bytes are moved to its name, and its metadata.jsonl line
    and report row written, as it comes (the report is never one string)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / TMP_DIR
    _remove(tmp)
    tmp.mkdir()
    marked = [bool(ledger.flags[i] or steps.added.get(i) or ledger.grayscale[i] or steps.dropped[i]) for i in kept]
    shown = [steps.settle(ledger.read(kept[k]), kept[k]) for k in _sheet_indices(marked, SHEET_MAX)]
    contact_sheet(shown).save(tmp / SHEET, "JPEG", quality=90)
    del shown
    rows: list[dict] = []
    digest = hashlib.sha256()  # of metadata.jsonl as written: a rerun refuses to lose captions edited since
    tail: dict[str, str] = {}
    with open(tmp / METADATA, "w", encoding="utf-8", newline="\n") as metadata, \
            open(tmp / REPORT, "w", encoding="utf-8", errors="backslashreplace") as file:
        # errors: a source name's bytes that are not UTF-8 (surrogates) are written as JSON's own escapes
        # ("\udcff"), which read back as the same name
        with _report_writer(file, report, tail) as write_row:
            for i in order:
                r = steps.settle(ledger.read(i), i)
                if r.status in ("kept", "fixed"):
                    _place(r, tmp)
                    line = json.dumps({"file_name": r.output, "text": r.caption}, ensure_ascii=False) + "\n"
                    metadata.write(line)
                    digest.update(line.encode("utf-8"))
                rows.append(_shared(r.entry()))
                write_row(rows[-1])
            tail["metadata_sha256"] = digest.hexdigest()
    report.update(files=rows, **tail)  # in the file's order
    for p in previous:
        if p.name != TMP_DIR:
            _remove(p)
    for p in sorted(tmp.iterdir()):
        os.replace(p, out_dir / p.name)
    tmp.rmdir()


def _place(r: Result, folder: Path) -> None:
    """A kept image's staged bytes (and mask) moved, not copied, to its name in ``folder``."""
    if r.staged:
        os.replace(r.staged, folder / r.output)  # type: ignore[operator]
    else:
        (folder / r.output).write_bytes(r.encoded)  # type: ignore[operator]
    if r.mask:
        if r.staged:
            os.replace(r.staged + ".mask", folder / r.mask)
        else:
            (folder / r.mask).write_bytes(r.mask_encoded)


@contextlib.contextmanager
def _report_writer(file: TextIO, report: dict, tail: dict[str, str] | None = None
                   ) -> Iterator[Callable[[dict], None]]:
    """Write ``report`` with the rows given to the function yielded as its ``files``, row by row, then the keys
    put in ``tail`` by then (text values, known only once every row is written): the same text as
    ``json.dumps({**report, "files": rows, **tail}, indent=1, ensure_ascii=False)`` with a final newline."""
    head = json.dumps({**report, "files": []}, indent=1, ensure_ascii=False)
    assert head.endswith('"files": []\n}')
    file.write(head[: -len("[]\n}")])
    written = 0

    def write_row(row: dict) -> None:
        nonlocal written
        # a list item of the report, two levels deep: each of its lines indented by two more spaces (JSON
        # escapes every newline inside a string, so each "\n" of the text is a line break)
        file.write(("[\n  " if not written else ",\n  ")
                   + json.dumps(row, indent=1, ensure_ascii=False).replace("\n", "\n  "))
        written += 1

    yield write_row
    file.write("\n ]" if written else "[]")
    for key, value in (tail or {}).items():
        file.write(f",\n {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    file.write("\n}\n")


def _shared(row: dict) -> dict:
    """A report row with its repeated texts (status, caption, format, crop) as one object each: 100,000 rows
    that name the same caption hold it once."""
    for key in ("status", "caption", "format", "crop"):
        if isinstance(row.get(key), str):
            row[key] = sys.intern(row[key])
    return row


def _remove(p: Path) -> None:
    """Delete a file, link or folder inside OUT (a link is removed, never followed)."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def sheet_sample(results: list[Result], limit: int = SHEET_MAX) -> list[Result]:
    """What the contact sheet shows, in order: every result up to ``limit``; past it, the flagged and dropped
    ones first (what needs a look), then an even sample of the others to fill the sheet."""
    if len(results) <= limit:
        return results
    marked = [bool(r.flags or r.grayscale or r.status == "dropped") for r in results]
    return [results[i] for i in _sheet_indices(marked, limit)]


def _sheet_indices(marked: list[bool], limit: int) -> list[int]:
    """``sheet_sample``'s choice by position, given which results are flagged or dropped (``marked``)."""
    if len(marked) <= limit:
        return list(range(len(marked)))
    flagged = [i for i, m in enumerate(marked) if m][:limit]
    rest = [i for i, m in enumerate(marked) if not m]
    room = limit - len(flagged)
    sample = [rest[k * len(rest) // room] for k in range(room)] if room and rest else []
    return sorted(flagged + sample)


def contact_sheet(kept: list[Result]) -> Image.Image:
    """All kept (and --drop'ped) crops on one sheet, each labelled with its output name, source and warnings;
    dropped ones are crossed out in red and labelled DROPPED instead of a name."""
    cell = SHEET_CELL if len(kept) <= 400 else SHEET_CELL // 2
    cols = min(8, max(1, math.ceil(math.sqrt(len(kept)))))
    rows = math.ceil(len(kept) / cols)
    label_h, pad = 40, 8
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(kept):
        x, y = pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + label_h + pad)
        thumb = r.thumb.copy() if r.thumb is not None else Image.open(f"{r.staged}.thumb.png")
        thumb.thumbnail((cell, cell))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        flags = " ".join(r.flags + (["GRAY"] if r.grayscale else []))
        colour = (255, 200, 80) if flags else (220, 220, 220)
        name = r.output
        if r.status == "dropped":
            name, colour = "DROPPED", (255, 80, 80)
            draw.line((x, y, x + cell, y + cell), fill=colour, width=3)
            draw.line((x, y + cell, x + cell, y), fill=colour, width=3)
        font, (label, source) = drawable([_cut(f"{name}  {flags}", cell // 6), _cut(r.source, cell // 6)], 11)
        draw.text((x, y + cell + 2), label, fill=colour, font=font)
        draw.text((x, y + cell + 18), source, fill=(150, 150, 150), font=font)
    return sheet


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
