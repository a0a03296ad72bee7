"""Training data: find subject images and captions, turn them into batches, in a resumable order.

Instance folders are either a Hugging Face ``imagefolder`` dataset (images + ``metadata.jsonl`` with
``file_name`` and ``text``, as ``sdtune prep`` writes it, or ``metadata.csv`` / ``metadata.parquet``; the caption key is ``text``,
``caption`` or ``prompt``, as for ``data.dataset``), images with a ``.txt`` caption beside each, or plain
images that all share ``data.instance_prompt``.

The order of examples is a pure function of (seed, position in the stream), so a resumed run continues with
exactly the batch it would have seen, mid-epoch included, without replaying the loader.

With aspect-ratio buckets (``data.aspect_buckets``) each instance image is trained at the bucket (w, h) of
``sdtune prep --crop bucket`` nearest its aspect ratio, its class image (prior preservation) at the same
size, and ``BucketBatchSampler`` builds batches of one bucket each, still as a pure function of (seed,
position).

Per step, an instance caption may be dropped or have its tags shuffled (``CaptionRules``), drawn from a
generator seeded by (seed, position) too. With masked loss each instance image's mask (``NAME.mask.png``
beside it, else its alpha channel; ``mask_of``) goes through the image's own crop and flip and becomes loss
weights on the latent grid (``MaskRules``).
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.files import Located, locate, remembered, shown_name
from sdtune.images import DECODERS, IMAGE_EXTENSIONS, Decoded, Unreadable, missing_decoder, read_image
from sdtune.metadata import BOM, METADATA_FILES, Row, metadata_rows, unit_of
from sdtune.prep import (
    EXTREME_ASPECT,
    JUNK_DIRS,
    JUNK_FILES,
    MASK_SUFFIX,
    TEXT_SUFFIXES,
    fit_mask,
    nearest_bucket,
)

Size = tuple[int, int]  # (width, height) of a training crop, as PIL and `sdtune prep` write sizes

# data.resolution's lower bound (sdtune.config). A scan told no resolution judges shapes at it, so it refuses
# only what no resolution could train.
LEAST_RESOLUTION = 64


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    concept: int = 0  # which of the run's subjects (``Config.concepts()``) it shows


@dataclass
class Scan:
    """What a folder holds: usable examples, problems that stop a run, warnings that do not."""

    examples: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _names(names: list[str]) -> str:
    shown = ", ".join(shown_name(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _listing(folder: Path) -> list[os.DirEntry]:
    """Everything directly in ``folder`` but hidden files (macOS's ``._`` forks among them) and OS junk, by
    name (as ``Path`` objects sort). Directory entries, not paths: a listing says which entry is a file or a
    folder without a system call per entry (a 100,000-photo folder's stat calls and Path objects were a
    second of every start)."""
    junk = JUNK_FILES | JUNK_DIRS
    try:
        with os.scandir(folder) as entries:
            found = [e for e in entries if not e.name.startswith(".") and e.name.lower() not in junk]
    except OSError as e:
        raise SdtuneError(f"cannot list {folder} ({e.strerror or e}); fix its permissions") from None
    found.sort(key=lambda e: os.path.normcase(e.name))  # Windows' paths sort ignoring case, POSIX ones do not
    return found


def _entries(folder: Path) -> list[Path]:
    """``_listing`` as paths."""
    return [folder / e.name for e in _listing(folder)]


def _is_file(entry: os.DirEntry) -> bool:
    """``Path.is_file`` of a listed entry: a regular file, or a link to one (a broken link or a loop: False)."""
    try:
        return entry.is_file()
    except OSError:  # a link loop (ELOOP), which Path.is_file calls no file too
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    """``Path.is_dir`` of a listed entry (a broken link or a loop: False)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _suffix(name: str) -> str:
    """``PurePath(name).suffix``, on the bare name: '.png' for 'a.png', '' for '.png' or 'a.'."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` appears in ``text`` as a word of its own ('sks' in 'a sks dog', not 'o' in 'photo')."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def list_images(folder: str | Path) -> list[Path]:
    """Image files (``IMAGE_EXTENSIONS``, the names sdtune's reader opens) directly inside ``folder``, sorted
    by name; hidden files skipped. Instance and class images alike."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in _entries(folder)
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not is_mask(p)]


def mask_file(image: Path) -> Path:
    """Where the mask of ``image`` is: ``NAME.mask.png`` beside ``NAME.ext``."""
    return image.with_name(image.stem + MASK_SUFFIX)


def is_mask(path: Path) -> bool:
    """Whether ``path`` is named as a mask (``NAME.mask.png``), which is never a training image."""
    return path.name.lower().endswith(MASK_SUFFIX)


def _without_masks(images: list[Path], key: str, scan: Scan) -> list[Path]:
    """The images that are not masks; a mask with no image of its name beside it is a warning (not used)."""
    masks = [p for p in images if is_mask(p)]
    if not masks:
        return images
    images = [p for p in images if not is_mask(p)]
    paired = {mask_file(p).name for p in images}
    orphans = [m.name for m in masks if m.name not in paired]
    if orphans:
        scan.warnings.append(f"{key}: masks with no image of the same name beside them, so not used: "
                             f"{_names(orphans)}; fix: name a mask NAME.mask.png after its image NAME.png")
    return images


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes the file system could not decode, kept as surrogates
        return False


def _not_a_file(path: Path) -> str:
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a link loop
            return "a broken link or a link loop"
    return "a folder" if path.is_dir() else "not a regular file (a device or a pipe)"


def _survey(folder: Path, key: str, scan: Scan) -> list[Path]:
    """The image files directly in ``folder``. Image names that are not files are problems; other files
    that are neither images nor text (captions, metadata, prep's report), and subfolders, are warnings."""
    images, unknown, subfolders = [], [], []
    for e in _listing(folder):
        suffix = _suffix(e.name).lower()
        if suffix in IMAGE_EXTENSIONS:
            if not _utf8(e.name):
                scan.problems.append(f"{key}: the name {shown_name(e.name)} is not valid UTF-8, which run records and "
                                     "reports need; fix: rename it")
            elif _is_file(e):
                images.append(folder / e.name)
            else:
                scan.problems.append(f"{key}: {shown_name(e.name)} is {_not_a_file(folder / e.name)}, not an image; "
                                     "fix: remove or rename it")
        elif _is_dir(e):
            subfolders.append(e.name + "/")
        elif suffix not in TEXT_SUFFIXES and e.name not in METADATA_FILES:
            unknown.append(e.name)
    if unknown:
        scan.warnings.append(f"{key}: not in a format sdtune reads ({', '.join(DECODERS)}), so not used: "
                             f"{_names(unknown)}; fix: convert them to PNG or JPEG")
    if subfolders:
        scan.warnings.append(f"{key}: subfolders are not read, so not used: {_names(subfolders)}; "
                             f"fix: move their images into {folder}")
    return _without_masks(images, key, scan)


def _decode(path: Path, resolution: int):
    """Upright sRGB RGB through the safe reader: allowed decoders only, decompression bombs refused."""
    return read_image(path.read_bytes(), path.suffix, resolution, Image.MAX_IMAGE_PIXELS, (255, 255, 255))


def _unreadable(path: Path, found: Located | None = None) -> str | None:
    """Why ``path`` cannot be trained on, with the fix; None if the reader takes it (once per version of the
    file and of sdtune: a rerun over unchanged images decodes none of them). ``found``: what
    ``sdtune.files.locate`` found of it, if at hand."""
    try:
        if remembered(found or path, f"decodes-{__version__}",
                      lambda: None if _why_unreadable(path) else "ok") == "ok":
            return None
    except OSError:  # it vanished or cannot be read: said below
        pass
    return _why_unreadable(path)


def _why_unreadable(path: Path) -> str | None:
    try:
        if path.stat().st_size == 0:
            return "an empty file (0 bytes); fix: copy the photo again, or remove it"
        _decode(path, 64)
        return None
    except OSError as e:  # open() refused: permissions, or it vanished
        return f"{e.strerror or type(e).__name__}; fix: make it readable (chmod +r) or remove it"
    except Unreadable as e:
        return missing_decoder(path.suffix) or f"{e}; fix: remove it or run `sdtune prep`"


def _file_name(name: str) -> tuple[str | None, str | None]:
    """(the bare file name, None) for a metadata.jsonl ``file_name``, or (None, why it is refused)."""
    if name not in ("", ".", "..") and "/" not in name and "\\" not in name and ":" not in name:
        return name, None  # a bare name already (what prep writes): no path parsing per row
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts:
        return None, "has an empty file_name"
    if parts[0] == "/" or PureWindowsPath(name).drive or ".." in parts:
        return None, (f"names {shown_name(name)}, outside the folder: refused; fix: copy the image into the folder "
                      "and give its bare file name")
    if len(parts) > 1:
        return None, (f"names {shown_name(name)}, in a subfolder, which is not read; fix: move the image into the "
                      "folder itself and give its bare file name")
    return parts[0], None


def _bad_lines(key: str, metadata: Path, group: list[tuple[int, str]]) -> str:
    """One problem line for every line refused for one reason: the first one said, the others counted (a file
    whose every line is wrong is one line of output, not one per image)."""
    n, problem = group[0]
    what, _, fix = problem.partition("; fix: ")
    others = [str(m) for m, _ in group[1:]]
    unit = unit_of(metadata.name)
    more = (f" ({len(others):,} more {unit}{'s' if len(others) > 1 else ''} like it: {', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''})") if others else ""
    at = f" {unit} {n}" if n else ""  # 0: the file as a whole
    return f"{key}: {metadata}{at} {what}{more}" + (f"; fix: {fix}" if fix else "")


def _bare_names(rows: Iterator[Row]) -> Iterator[Row]:
    """The rows with each ``file_name`` as the bare name of an image in the folder itself (``_file_name``): a
    training folder is read on its own, not its subfolders."""
    for n, row, problem in rows:
        name, why = _file_name(row[0]) if row else (None, None)
        yield (n, None, problem or why) if not name else (n, (name, row[1]), None)  # type: ignore[index]


def _collect(rows: Iterator[Row], metadata: Path, key: str, scan: Scan) -> dict[str, str]:
    """{file name: caption} of a metadata file's rows; refused lines become problems, one per reason."""
    captions: dict[str, str] = {}
    lines: dict[str, int] = {}
    bad: dict[str, list[tuple[int, str]]] = {}  # the refused lines, by their fix (one reason, one line)
    repeated: list[tuple[str, int, int]] = []  # (name, earlier line, this line)
    for n, row, problem in rows:
        if problem:
            bad.setdefault(problem.partition("; fix: ")[2] or problem, []).append((n, problem))
        elif row:
            if row[0] in lines:
                repeated.append((row[0], lines[row[0]], n))
            captions[row[0]], lines[row[0]] = row[1], n
    scan.problems.extend(_bad_lines(key, metadata, group) for group in bad.values())
    if repeated:
        name, first, n = repeated[0]
        others = list(dict.fromkeys(r[0] for r in repeated[1:] if r[0] != name))
        unit = unit_of(metadata.name)
        more = f"; so is the last {unit} of {len(others)} more name(s) listed twice: {_names(others)}" \
            if others else ""
        scan.warnings.append(f"{key}: {metadata} lists {shown_name(name)} on {unit}s {first} and {n}; the caption "
                             f"on {unit} {n} is used{more}")
    return captions


def _check_named(captions: dict[str, str], metadata: Path, key: str, scan: Scan,
                 images: frozenset[str]) -> None:
    """Every name a metadata file lists is an image in its folder (``images``: names already known to be; the
    others are looked up). One problem line per kind, naming the first few."""
    missing, unreadable = [], []
    for name in captions:
        if name in images:
            continue
        if not (metadata.parent / name).is_file():
            missing.append(name)
        elif _suffix(name).lower() not in IMAGE_EXTENSIONS:
            unreadable.append(name)
    if missing:
        scan.problems.append(f"{key}: {metadata} names {_names(missing)}, which "
                             f"{'is' if len(missing) == 1 else 'are'} not in the folder")
    if unreadable:
        scan.problems.append(f"{key}: {metadata} names {_names(unreadable)}, which "
                             f"{'is' if len(unreadable) == 1 else 'are'} not in a format sdtune reads "
                             f"({', '.join(DECODERS)}); fix: convert to PNG and rename in {metadata.name}")


def _read_if_file(path: Path, key: str, scan: Scan) -> bytes | None:
    """The bytes of ``path``, None if it is no file (nothing said) or cannot be read (a problem). Opened
    rather than looked up first: no stat call per scan for a file that is not there."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        scan.problems.append(f"{key}: cannot read {path} ({e.strerror or e}); fix: make it readable")
        return None


def _captioned(folder: Path, images: list[Path], key: str,
               scan: Scan) -> tuple[list[Path], dict[str, str] | None]:
    """The images to train on and their captions from the folder's ``metadata.jsonl``, ``metadata.csv`` or
    ``metadata.parquet`` (None without one; then .txt files or the prompt caption them). As datasets'
    imagefolder does, images the file does not list are not examples (`sdtune prep`'s contact_sheet.jpg among
    them), and a folder with two of them is refused. Each file is read once, whatever the number of images."""
    found = [(folder / name, data) for name in METADATA_FILES
             if (data := _read_if_file(folder / name, key, scan)) is not None]
    if len(found) > 1:
        scan.problems.append(f"{key}: {folder} holds {'both ' if len(found) == 2 else ''}{' and '.join(m.name for m, _ in found)}, so which "
                             "captions are meant is not clear (datasets' imagefolder refuses such a folder too); "
                             "fix: keep one")
        return [], {}
    if not found:
        return images, None
    metadata, data = found[0]
    rows = _bare_names(metadata_rows(data, metadata.name))
    captions = _collect(rows, metadata, key, scan)
    _check_named(captions, metadata, key, scan, frozenset(p.name for p in images))
    unlisted = [p.name for p in images if p.name not in captions and p.name != "contact_sheet.jpg"]
    if unlisted:
        scan.warnings.append(f"not in {metadata.name}, so not used: {_names(unlisted)}")
    return [p for p in images if p.name in captions], captions


def _sidecar(path: Path, folder: Path) -> tuple[str | None, str | None]:
    """(caption, None) from the ``.txt`` beside ``path``, (None, None) without one, or (None, the problem)."""
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None, None
    name = shown_name(sidecar.name)
    if sidecar.is_symlink() and not sidecar.resolve().is_relative_to(folder.resolve()):
        return None, f"{name} is a link to a file outside the folder; refused"
    try:
        data = sidecar.read_bytes()
    except OSError as e:
        return None, f"cannot read {name} ({e.strerror or e}); fix: make it readable (chmod +r)"
    try:
        return data.removeprefix(BOM).decode("utf-8").strip(), None
    except UnicodeDecodeError as e:
        return None, (f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                      "fix: save it as UTF-8")


def _caption(path: Path, folder: Path, captions: dict[str, str] | None, instance_prompt: str | None,
             identifier: str, key: str, scan: Scan, prompt_key: str | None = "data.instance_prompt") -> str | None:
    """The caption of one image (metadata.jsonl, else its .txt, else ``instance_prompt``); None after a problem.
    ``prompt_key``: the recipe key that would caption it (None: none can, as with several concepts)."""
    caption = (captions or {}).get(path.name)
    if caption is None:
        caption, problem = _sidecar(path, folder)
        if problem:
            scan.problems.append(f"{key}: {problem}")
            return None
    caption = caption if caption is not None else instance_prompt
    if caption is None:
        setting = f"set {prompt_key} (e.g. 'a photo of {identifier} dog') or " if prompt_key else ""
        scan.problems.append(f"{key}: {shown_name(path.name)} has no caption; fix: {setting}give it one in "
                             f"metadata.jsonl{'' if prompt_key else ' or a .txt beside it'}")
    return caption


def apply_template(template: str | None, caption: str, identifier: str) -> str:
    """``caption`` wrapped by ``data.caption_template`` ('{identifier} dog, {caption}'); only these two exact
    tokens are replaced (str.replace), any other brace is text."""
    if not template:
        return caption
    return template.replace("{identifier}", identifier).replace("{caption}", caption)


def _pixel_limit() -> int:
    # A resize is held to the reader's decompression-bomb limit (Pillow's default should someone lift it).
    return Image.MAX_IMAGE_PIXELS or 89_478_485


def _resize_refusal(size: Size, target: Size) -> str | None:
    """Why an image of ``size`` cannot be resized to cover ``target`` (too many pixels), or None."""
    w, h = size
    rw, rh = resized_size(w, h, target)
    if rw * rh <= _pixel_limit():
        return None
    return (f"is {w}x{h} px, an aspect ratio of {max(w, h) / min(w, h):,.0f}:1: covering {target[0]}x{target[1]} "
            f"would resize it to {rw}x{rh}, over the limit of {_pixel_limit():,} pixels; fix: crop it to the "
            f"subject (`sdtune prep` reports aspect ratios over {EXTREME_ASPECT}:1)")


def _header_size(path: Path, found: Located | None = None) -> Size | None:
    """The upright size from the header (``upright_size``; a decompression bomb's is refused), or None if it
    cannot be read (the decode then says why)."""
    def strict() -> str:
        with warnings.catch_warnings():  # only where the header is read: a remembered size is a lookup
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return "{},{}".format(*_upright_size(path))

    try:
        return _size_of(remembered(found or path, "upright", strict))
    except Exception:  # a malformed header can make a decoder plugin raise anything
        return None


def _shape_warning(path: Path, size: Size) -> str | None:
    w, h = size
    aspect = max(w, h) / min(w, h)
    if aspect <= EXTREME_ASPECT:
        return None
    return (f"{shown_name(path.name)} is {w}x{h} px, an extreme aspect ratio of {aspect:.1f}:1 (over {EXTREME_ASPECT}:1, as "
            f"`sdtune prep` reports): a square crop keeps {100 / aspect:.0f}% of it, the nearest aspect bucket "
            "(data.aspect_buckets) more; fix: crop it to the subject")


def _small_warning(small: list[tuple[str, Size]], resolution: int | None, key: str) -> str:
    """One line for every image whose short side is under half the resolution: `sdtune prep` skips those
    (its default --min-side), training upscales them."""
    r = resolution or LEAST_RESOLUTION
    more = "" if resolution else " or more"
    items = [f"{shown_name(name)} {w}x{h} (x{r / min(w, h):.3g}{more})" for name, (w, h) in small[:5]]
    return (f"{key}: {len(small)} image(s) under {r // 2} px on the short side will be upscaled to cover {r}x{r}"
            f"{'' if resolution else ' (the least data.resolution)'}: {', '.join(items)}"
            + (f" and {len(small) - 5} more" if len(small) > 5 else "")
            + "; `sdtune prep` skips such photos (its --min-side is half the resolution); fix: use larger photos")


def _found(path: Path) -> Located | None:
    """What ``sdtune.files.locate`` finds of ``path``, or None if it cannot be looked at (it vanished since the
    listing, or a link broke: the checks then say why)."""
    try:
        return locate(path)
    except OSError:
        return None


def _image(path: Path, resolution: int | None, key: str, scan: Scan, found: Located | None = None) -> Size | None:
    """The upright size of an image training can use; None after a problem. Checks the header's shape first,
    so an image no resize could cover is refused before anything decodes or resizes it. ``found``: what
    ``sdtune.files.locate`` found of it (both checks are then lookups of that one version)."""
    size = _header_size(path, found)
    if size is not None:
        r = resolution or LEAST_RESOLUTION
        refusal = _resize_refusal(size, (r, r))  # a square is what the largest resize covers (buckets are smaller)
        if refusal:
            scan.problems.append(f"{key}: {shown_name(path.name)} {refusal}")
            return None
    reason = _unreadable(path, found)
    if reason or size is None:
        scan.problems.append(f"{key}: cannot read {shown_name(path.name)}: "
                             f"{reason or 'unreadable header; fix: re-save it, or run `sdtune prep`'}")
        return None
    shape = _shape_warning(path, size)
    if shape:
        scan.warnings.append(f"{key}: {shape}")
    return size


def image_problems(paths: list[Path], key: str, resolution: int | None = None) -> list[str]:
    """One line per image of ``paths`` training could not read (``key``: the recipe key of their folder), as
    an instance folder's scan says them; each file version is decoded once (a rerun looks it up)."""
    scan = Scan()
    for path in paths:
        _image(path, resolution, key, scan, _found(path))
    return list(scan.problems)


def mask_of(path: Path, decoded: Decoded) -> Image.Image | None:
    """The subject mask of the image at ``path`` (decoded as ``decoded``): mode L at the decoded image's size,
    255 = subject. ``NAME.mask.png`` beside it, else the image's own transparency; None without either.
    Raises SdtuneError for a mask file that cannot be used."""
    file = mask_file(path)
    if not file.is_file():
        return decoded.alpha
    name = shown_name(file.name)
    if file.is_symlink() and not file.resolve().is_relative_to(path.parent.resolve()):
        raise SdtuneError(f"the mask {name} is a link to a file outside the folder; refused")
    try:
        return fit_mask(file, decoded)
    except (OSError, Unreadable) as e:
        raise SdtuneError(f"cannot use the mask {name}: {e}") from None


def _check_masks(examples: list[Example], key: str, scan: Scan) -> None:
    """data.masked_loss: every mask file can be used; images without a mask, or with an empty one, are named
    (their every pixel counts fully, or only at data.unmasked_weight)."""
    missing, empty = [], []
    for ex in examples:
        try:
            mask = mask_of(ex.path, _decode(ex.path, LEAST_RESOLUTION))
        except (OSError, Unreadable):
            continue  # the image itself is reported by the scan
        except SdtuneError as e:
            scan.problems.append(f"{key}: data.masked_loss: {e}")
            continue
        if mask is None:
            missing.append(ex.path.name)
        elif mask.getextrema()[1] == 0:
            empty.append(mask_file(ex.path).name if mask_file(ex.path).is_file() else ex.path.name)
    if missing:
        scan.warnings.append(f"data.masked_loss: {len(missing)} image(s) have no mask (no transparency, no "
                             f"NAME.mask.png beside them), so every pixel of them counts fully: "
                             f"{_names(missing)}; fix: add NAME.mask.png (white = subject), or `sdtune prep` "
                             "sources with transparency")
    if empty:
        scan.warnings.append(f"data.masked_loss: {len(empty)} mask(s) mark no subject at all (all black or "
                             f"fully transparent), so those images count only at data.unmasked_weight: "
                             f"{_names(empty)}")


KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya's "10_ohwx dog": 10 repeats of the subject "ohwx dog"


def _subfolder_hint(folder: Path, key: str) -> str:
    """The end of the no-images line: where the images are when they are one level down (kohya's
    ``img/10_ohwx dog/`` layout, whose repeat count sdtune does not read from the name), else what to add."""
    try:
        held = sorted(d for d in folder.iterdir() if d.is_dir() and list_images(d))
    except OSError:
        held = []
    if not held:
        return "; add 3-20 photos of the subject"
    kohya = [(d, KOHYA_FOLDER.fullmatch(d.name)) for d in held]
    kohya = [(d, m) for d, m in kohya if m]
    if kohya:
        d, m = kohya[0]
        more = f" (and {len(kohya) - 1} more such folders: one data.concepts entry each)" if len(kohya) > 1 else ""
        return (f", but its subfolder '{d.name}' does, in kohya's REPEATS_NAME layout{more}, whose repeat count "
                f"sdtune does not read from the name; fix: {key}={d} {key.rsplit('.', 1)[0]}.repeats={int(m[1])}")
    return f", but its subfolder{'s' if len(held) > 1 else ''} {', '.join(repr(d.name) for d in held[:3])} " \
           f"{'do' if len(held) > 1 else 'does'}; fix: {key}={held[0]} (a subfolder is not searched)"


def scan_instance_dir(
    instance_dir: str | Path, identifier: str | list[str], instance_prompt: str | None,
    key: str = "data.instance_dir", resolution: int | None = None, masked_loss: bool = False, concept: int = 0,
    prompt_key: str | None = "data.instance_prompt", template: str | None = None,
) -> Scan:
    """Pair every image in ``instance_dir`` with its caption and check both, images from their headers first.
    ``identifier``: the subject's word, or the words of which a caption should hold one (held-out images of
    several concepts). ``resolution``: the training resolution, which sizes are judged at (default:
    ``LEAST_RESOLUTION``). ``masked_loss``: also check each image's mask (``mask_of``). ``concept``: the
    examples' subject (``Example.concept``); ``prompt_key``: the recipe key of ``instance_prompt`` (problem lines
    name it); ``template``: ``data.caption_template`` (``apply_template``)."""
    words = [identifier] if isinstance(identifier, str) else list(identifier)
    folder = Path(instance_dir)
    scan = Scan()
    if not folder.is_dir():
        scan.problems.append(f"{key}: {folder} is not a folder; fix the path (or run `sdtune prep` to make one)")
        return scan
    try:
        images = _survey(folder, key, scan)
    except SdtuneError as e:
        scan.problems.append(f"{key}: {e}")
        return scan
    if not images:
        scan.problems.append(
            f"{key}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}){_subfolder_hint(folder, key)}"
        )
        return scan
    images, captions = _captioned(folder, images, key, scan)
    small: list[tuple[str, Size]] = []
    identified: dict[str, bool] = {}  # whether a caption holds an identifier: each distinct caption once
    # a progress bar (on a terminal) where a scan takes a while: the first look at a large folder decodes each photo
    for path in tqdm(images, desc=f"checking {folder.name}", unit="img", disable=None if len(images) > 2000 else True,
                     leave=False):
        found = _found(path)  # one lstat for the link check and both of _image's lookups
        if (path.is_symlink() if found is None else found.link) and \
                not path.resolve().is_relative_to(folder.resolve()):
            scan.problems.append(f"{key}: {shown_name(path.name)} is a link to a file outside the folder; refused")
            continue
        caption = _caption(path, folder, captions, instance_prompt, words[0], key, scan, prompt_key)
        if caption is None:
            continue
        caption = apply_template(template, caption, words[0])
        if caption not in identified:
            identified[caption] = any(has_word(caption, word) for word in words)
        if not identified[caption]:
            named = f"the identifier '{words[0]}'" if len(words) == 1 else \
                f"any of the identifiers {', '.join(repr(w) for w in words)}"
            scan.warnings.append(f"{shown_name(path.name)}: caption '{shown_name(' '.join(caption.split()))}' does not "
                                 f"contain {named}")
        size = _image(path, resolution, key, scan, found)
        if size is None:
            continue
        if min(size) < (resolution or LEAST_RESOLUTION) // 2:
            small.append((path.name, size))
        scan.examples.append(Example(path, caption, concept))
    if small:
        scan.warnings.append(_small_warning(small, resolution, key))
    if masked_loss:
        _check_masks(scan.examples, key, scan)
    return scan


# --------------------------------------------------------------------------------------------------------
# Images -> tensors


def _target(size: int | Size) -> Size:
    return (size, size) if isinstance(size, int) else size


def resized_size(width: int, height: int, size: int | Size) -> Size:
    """(w, h) after scaling, aspect kept, to just cover ``size``: a square side, or a bucket (w, h).
    For a square that scales the shorter side to it."""
    tw, th = _target(size)
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def center_crop_top_left(width: int, height: int, size: int | Size) -> tuple[int, int]:
    """(top, left) of the centre crop taken after resizing, in resized pixels (SDXL conditions on it)."""
    tw, th = _target(size)
    w, h = resized_size(width, height, (tw, th))
    return (h - th) // 2, (w - tw) // 2


def upright_size(path: Path, found: Located | None = None) -> tuple[int, int]:
    """(width, height) as the image is seen (EXIF rotation applied), once per version of the file: PIL reads a
    PNG whole to look for an EXIF chunk after its pixels, which was most of a 10,000-photo rerun's start-up.
    ``found``: what ``sdtune.files.locate`` found of it, if at hand (it is then not looked at again)."""
    return _size_of(remembered(found or path, "upright", lambda: "{},{}".format(*_upright_size(path))))


def _size_of(text: str | None) -> tuple[int, int]:
    w, h = text.split(",")  # type: ignore[union-attr]
    return int(w), int(h)


def _upright_size(path: Path) -> tuple[int, int]:
    with Image.open(path, formats=DECODERS) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # broken EXIF: the reader keeps such pixels as stored, so the size is as stored
            orientation = 1
        if orientation in (5, 6, 7, 8):  # orientations that swap the axes
            w, h = h, w
    return w, h


def load_image(path: Path, size: int | Size, center_crop: bool, flip: bool, rng: random.Random):
    """Read, upright (EXIF), resize (Lanczos, aspect kept, just covering ``size``) and crop one image to
    ``size``: a square side (the resolution) or a bucket (w, h).

    Returns (pixel_values (3, H, W) float in [-1, 1], original (h, w), crop top-left (y, x)).
    """
    pixels, original_size, crop, _ = load_example(path, size, center_crop, flip, rng, masked=False)
    return pixels, original_size, crop


def load_example(path: Path, size: int | Size, center_crop: bool, flip: bool, rng: random.Random,
                 masked: bool) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], torch.Tensor | None]:
    """``load_image``, and with ``masked`` the image's subject mask (``mask_of``) resized, cropped and flipped
    exactly as its pixels: (1, H, W) float in [0, 1], or None when it has no mask.

    Returns (pixel_values, original (h, w), crop top-left (y, x), mask or None).
    """
    tw, th = _target(size)
    # The resized image's shorter side is at most max(tw, th), so a decode (JPEG draft) that size is enough.
    try:
        decoded = _decode(path, max(tw, th))
    except (OSError, Unreadable) as e:  # a class image, or an instance image changed since the scan
        raise SdtuneError(f"cannot read {shown_name(str(path))} ({e}); fix: remove it or run `sdtune prep`") from None
    im = decoded.image
    refusal = _resize_refusal(im.size, (tw, th))  # (working size: the pixels that would be resized)
    if refusal:
        raise SdtuneError(f"{shown_name(str(path))} {refusal}")
    original_size = (decoded.size[1], decoded.size[0])
    w, h = resized_size(im.width, im.height, (tw, th))
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
    box = (left, top, left + tw, top + th)
    pixels = _placed(im.resize((w, h), Image.Resampling.LANCZOS), box, flip)
    array = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    source = mask_of(path, decoded) if masked else None
    mask = None
    if source is not None:
        # bilinear, not Lanczos: a weight must stay within [0, 1] (Lanczos rings past the edges)
        placed = _placed(source.resize((w, h), Image.Resampling.BILINEAR), box, flip)
        mask = torch.from_numpy(np.asarray(placed, dtype=np.float32) / 255.0)[None]  # (1, H, W)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left), mask


def _placed(im: Image.Image, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    """The crop ``box`` (left, top, right, bottom) of a resized image, mirrored with ``flip``."""
    im = im.crop(box)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def assign_buckets(paths: list[Path], resolution: int, multiple: int = 1) -> list[Size]:
    """The training bucket (w, h) of each image: of ``sdtune prep --crop bucket``'s buckets at
    ``resolution`` whose sides are multiples of ``multiple``, the one nearest its upright aspect ratio."""
    return [nearest_bucket(upright_size(p), resolution, multiple) for p in paths]


def option_warnings(data: Any) -> list[str]:
    """What the caption and mask options of ``data`` (the recipe's ``data`` section) would do silently: an
    option that only works with another one left off, or a setting that makes one do nothing."""
    lines = []
    if data.keep_tokens and not data.shuffle_tags:
        lines.append(f"data.keep_tokens: {data.keep_tokens} does nothing without data.shuffle_tags=true (it "
                     "keeps the first tags in place while the rest are shuffled); fix: set "
                     "data.shuffle_tags=true or remove it")
    if data.unmasked_weight and not data.masked_loss:
        lines.append("data.unmasked_weight: does nothing without data.masked_loss=true; fix: set "
                     "data.masked_loss=true or remove it")
    if data.masked_loss and data.unmasked_weight == 1:
        lines.append("data.masked_loss: with data.unmasked_weight=1 every pixel weighs 1, as without a mask; "
                     "fix: a lower data.unmasked_weight (0 trains on the subject alone)")
    if data.caption_dropout == 1:
        lines.append("data.caption_dropout: 1 drops every caption, so data.identifier is never trained; fix: "
                     "e.g. 0.1")
    return lines


@dataclass(frozen=True)
class CaptionRules:
    """What an instance caption becomes at one step (kohya's semantics): ``dropout`` the probability of an
    empty caption (data.caption_dropout); ``shuffle_tags`` its comma-separated tags in a new order, the first
    ``keep_tokens`` of them kept in place (data.shuffle_tags, data.keep_tokens). Tags are only reordered,
    never left out, so the identifier is always in the caption (at its place if it is among the kept tags)."""

    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """The caption for this step; every draw from ``rng`` (the example's own, seeded by the run's seed and
        its stream position, so a resumed run draws the same)."""
        if self.dropout and rng.random() < self.dropout:
            return ""
        if not self.shuffle_tags:
            return caption
        tags = [t for t in (tag.strip() for tag in caption.split(",")) if t]  # "a, , b": no empty tag
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        rng.shuffle(rest)
        return ", ".join(kept + rest)


@dataclass(frozen=True)
class MaskRules:
    """data.masked_loss: per-pixel loss weights from each instance image's mask (``mask_of``)."""

    unmasked_weight: float = 0.0  # data.unmasked_weight: the weight outside the subject
    latent_factor: int = 8  # image pixels per latent pixel along a side (the VAE's downsampling)

    def weights(self, mask: torch.Tensor | None, size: Size) -> torch.Tensor:
        """(1, h, w) loss weights on the latent grid of a (w, h) crop: unmasked_weight + (1 - unmasked_weight)
        * the mask (1, H, W) averaged over each latent pixel's area; 1 everywhere without a mask."""
        shape = (size[1] // self.latent_factor, size[0] // self.latent_factor)
        if mask is None:
            return torch.ones((1, *shape))
        area = F.interpolate(mask[None], size=shape, mode="area")[0]  # (1, h, w)
        return self.unmasked_weight + (1.0 - self.unmasked_weight) * area


def concept_repeats(counts: list[int], own: list[int | None], balance: bool, repeats: int) -> list[int]:
    """How often each concept's images appear per epoch: its own ``repeats`` where it has one, else with
    ``balance`` (data.balance_concepts, several concepts) ``max(1, round(largest count / its count)) x repeats``
    so that every concept is seen about equally often, else ``repeats`` (data.repeats). ``counts``: each
    concept's number of images."""
    largest = max(counts, default=0)
    return [mine if mine is not None else
            max(1, round(largest / count)) * repeats if balance and len(counts) > 1 and count else repeats
            for count, mine in zip(counts, own, strict=True)]


@dataclass(frozen=True)
class ClassImages:
    """One concept's class images (prior preservation) and the prompt that is their caption."""

    paths: list[Path]
    prompt: str


def _stream_order(repeats: list[int]) -> list[int]:
    """The instance example of each item of one pass: every example ``repeats[i]`` times, in rounds (all
    examples once, then those repeated more, ...); with one count for all, ``[0..n-1] * repeats``."""
    return [i for r in range(max(repeats, default=0)) for i, n in enumerate(repeats) if n > r]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item ``pos`` of an endless stream: instance example (and class example, with prior preservation).

    ``pos = epoch * len(self) + index``; the epoch only seeds per-example randomness (crop, flip, and with
    ``captions`` the instance caption's dropout and tag order).
    ``repeats``: how often each instance example appears per epoch, one count for all or one per example
    (several concepts, balanced). With ``buckets`` (one (w, h) per instance example) both examples of an item
    are centre crops of that bucket's size, whatever ``center_crop`` says; without, squares of ``resolution``.
    Prior preservation: ``class_images`` and ``class_prompt`` (one subject), or ``classes``, one set per concept:
    each instance example is paired with a class image of its own concept (``Example.concept``), captioned with
    that concept's class prompt.
    With ``masks`` every example has ``loss_mask``, (1, h, w) loss weights on its latent grid (``MaskRules``);
    class examples (prior preservation) weigh 1 everywhere, and so do instance images without a mask. Class
    captions are never dropped or shuffled.
    """

    def __init__(
        self,
        instance: list[Example],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int | list[int] = 1,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        seed: int = 0,
        latents: dict[tuple[str, bool, Size], torch.Tensor] | None = None,
        buckets: list[Size] | None = None,
        captions: CaptionRules | None = None,
        masks: MaskRules | None = None,
        classes: list[ClassImages] | None = None,
    ):
        if buckets is not None and len(buckets) != len(instance):
            raise ValueError(f"{len(buckets)} buckets for {len(instance)} instance examples")
        counts = [repeats] * len(instance) if isinstance(repeats, int) else list(repeats)
        if len(counts) != len(instance):
            raise ValueError(f"{len(counts)} repeat counts for {len(instance)} instance examples")
        if classes is None and class_images:
            classes = [ClassImages(list(class_images), class_prompt or "")]
        self.classes = classes or []
        if self.classes and any(e.concept >= len(self.classes) or not self.classes[e.concept].paths for e in instance):
            raise ValueError("every concept of the instance examples needs class images")
        self.instance = instance
        self.class_images = [p for c in self.classes for p in c.paths]
        self.class_prompt = self.classes[0].prompt if self.classes else class_prompt
        self.resolution, self.random_flip, self.seed = resolution, random_flip, seed
        self.buckets = buckets
        # A bucket is the crop itself (chosen for the image's shape), and its latent is cached: no random crops.
        self.center_crop = center_crop or buckets is not None
        # (path, flip, (w, h)) -> the cached latent distribution as mean and std, (2C, h, w); then no pixels are decoded
        self.latents = latents
        self._upright: dict[Path, tuple[int, int]] = {}  # header reads, once per file rather than every step
        self.captions, self.masks = captions, masks
        # (path, flip, (w, h)) -> a cached latent's loss weights (its image decoded once, not every step)
        self._weights: dict[tuple[Path, bool, Size], torch.Tensor] = {}
        self.order = _stream_order(counts)  # index % len(order) -> instance example
        concepts = [instance[i].concept for i in self.order]
        # the k-th item of a concept takes its concept's class image k (mod their number): the rank of each item
        # of a pass among its concept's, and each concept's items per pass
        self._per_pass = Counter(concepts)
        seen: Counter = Counter()
        self._rank = []
        for concept in concepts:
            self._rank.append(seen[concept])
            seen[concept] += 1
        # As in diffusers' DreamBooth: one epoch covers every instance image (x repeats) and every class image
        # (of each concept: the shortest stream that pairs each of them once).
        self.length = max([len(self.order)] + [self._covering(k, len(c.paths)) for k, c in enumerate(self.classes)
                                               if self._per_pass[k]])

    def _covering(self, concept: int, count: int) -> int:
        """The length of the shortest stream whose items of ``concept`` number ``count``."""
        passes, within = divmod(count - 1, self._per_pass[concept])
        j = next(j for j, (i, r) in enumerate(zip(self.order, self._rank))
                 if self.instance[i].concept == concept and r == within)
        return passes * len(self.order) + j + 1

    def __len__(self) -> int:
        return self.length

    def _instance_index(self, index: int) -> int:
        return self.order[index % self.length % len(self.order)]

    def _class_image(self, index: int) -> tuple[Path, str]:
        """The class image of item ``index`` and its caption: its instance example's concept's, in turn."""
        index %= self.length
        j = index % len(self.order)
        concept = self.instance[self.order[j]].concept
        images = self.classes[concept]
        slot = index // len(self.order) * self._per_pass[concept] + self._rank[j]
        return images.paths[slot % len(images.paths)], images.prompt

    def size(self, index: int) -> Size:
        """(w, h) of both examples of item ``index`` (any position with that index in the stream)."""
        return self.buckets[self._instance_index(index)] if self.buckets else (self.resolution, self.resolution)

    def targets(self) -> list[tuple[Path, Size]]:
        """Every distinct (image, size) an epoch uses, instance and class images: what a latent cache holds."""
        # each instance example's first item comes in the first pass, in the order of self.order: the same list
        # as item by item, with one step per example rather than per item
        square = (self.resolution, self.resolution)
        pairs = [(self.instance[j].path, self.buckets[j] if self.buckets else square)
                 for j in dict.fromkeys(self.order)]
        if self.classes:
            pairs += [(self._class_image(i)[0], self.size(i)) for i in range(self.length)]
        return list(dict.fromkeys(pairs))

    def _example(self, path: Path, caption: str, pos: int, kind: str, size: Size) -> dict:
        rng = random.Random(f"{self.seed}/{kind}/{pos}")
        flip = self.random_flip and rng.random() < 0.5
        masked = self.masks is not None and kind == "instance"  # class images weigh 1 everywhere
        if self.latents is not None:
            if path not in self._upright:
                self._upright[path] = upright_size(path)
            w, h = self._upright[path]
            example = {"latent_mean_std": self.latents[(str(path), flip, size)], "caption": caption,
                       "original_size": (h, w), "crop_top_left": center_crop_top_left(w, h, size),
                       "target_size": (size[1], size[0]), "path": str(path)}
            if self.masks is not None:
                example["loss_mask"] = self._cached_weights(path, flip, size) if masked else \
                    self.masks.weights(None, size)
            return example
        pixels, original_size, crop, mask = load_example(path, size, self.center_crop, flip, rng, masked)
        example = {"pixel_values": pixels, "caption": caption, "original_size": original_size,
                   "crop_top_left": crop, "target_size": (size[1], size[0]), "path": str(path)}
        if self.masks is not None:
            example["loss_mask"] = self.masks.weights(mask, size)
        return example

    def _cached_weights(self, path: Path, flip: bool, size: Size) -> torch.Tensor:
        """The loss weights of a cached latent: its mask through the centre crop ``cache_latents`` encoded."""
        key = (path, flip, size)
        if key not in self._weights:
            assert self.masks is not None
            mask = load_example(path, size, True, flip, random.Random(0), masked=True)[3]
            self._weights[key] = self.masks.weights(mask, size)
        return self._weights[key]

    def __getitem__(self, pos: int) -> dict:
        index = pos % self.length
        size = self.size(index)
        ex = self.instance[self._instance_index(index)]
        # the caption's draws come from a generator of their own: crops and flips stay as they were without
        caption = self.captions.apply(ex.caption, random.Random(f"{self.seed}/caption/{pos}")) \
            if self.captions else ex.caption
        item = {"instance": self._example(ex.path, caption, pos, "instance", size)}
        if self.classes:
            # The class image is cropped to its instance example's size, so the whole batch has one shape.
            item["class"] = self._example(*self._class_image(index), pos, "class", size)
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples, so one forward pass serves both (split by ``chunk(2)``)."""
    examples = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    key = "latent_mean_std" if "latent_mean_std" in examples[0] else "pixel_values"
    return {
        key: torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format),
        "captions": [e["caption"] for e in examples],
        # each crop's original (h, w) + top-left (y, x) + target (h, w) as one (B, 6) tensor: the loader pins
        # it, so a model that conditions on it (SDXL) gets it on the device without a blocking copy
        "geometry": torch.tensor([[*e["original_size"], *e["crop_top_left"], *e["target_size"]] for e in examples],
                                 dtype=torch.float32),
        "paths": [e["path"] for e in examples],
        # with data.masked_loss: (B, 1, h, w) loss weights on the latent grid, in the rows' order
        **({"loss_mask": torch.stack([e["loss_mask"] for e in examples])} if "loss_mask" in examples[0]
           else {}),
    }


class StreamBatchSampler(torch.utils.data.Sampler):
    """Endless batches over reshuffled epochs; this process's share of global micro-batch k onwards.

    Stream position p is (epoch p // n, shuffled index). Global micro-batch k holds positions
    [k * B * W, (k + 1) * B * W); process r takes slice r of width B. Starting at any k is O(1): that is
    what makes mid-epoch resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._perm_epoch, self._perm = -1, torch.arange(0)

    def position(self, p: int) -> int:
        epoch = p // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return epoch * self.n + int(self._perm[p % self.n])

    def batch(self, k: int) -> list[int]:
        first = (k * self.world_size + self.rank) * self.batch_size
        return [self.position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches that never mix aspect-ratio buckets; this process's share from global micro-batch k on.

    ``buckets[i]`` is dataset index i's bucket (any hashable, e.g. its (w, h)). Epoch e, a pure function of
    (seed, e): each bucket's indices are shuffled and cut into batches of ``batch_size`` (a short last batch
    is filled from the start of the same bucket, so an example may appear twice in an epoch), then the order
    of all the batches is shuffled. The epoch has the same number M of batches every time, so the stream of
    batches is (epoch j // M, batch j % M), and process r of W takes batches r, r + W, r + 2W, ... as its
    micro-batches 0, 1, 2, ...: global micro-batch k is stream batch k * W + r. Starting at any k costs one
    epoch's shuffle, which is what makes mid-epoch resume exact. Positions are ``epoch * n + index``, as
    ``DreamBoothDataset`` expects.
    """

    def __init__(self, buckets: list[Hashable], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.n, self.batch_size, self.seed = len(buckets), batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        members: dict[Hashable, list[int]] = {}
        for i, b in enumerate(buckets):
            members.setdefault(b, []).append(i)
        # In order of first appearance: the shuffles below must not depend on how buckets sort or hash.
        self.members: list[list[int]] = list(members.values())
        self.batches_per_epoch = sum(math.ceil(len(m) / batch_size) for m in self.members)
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s batches of stream positions, in training order (cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for members in self.members:
                order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
                for first in range(0, len(order), self.batch_size):
                    # wraps around to the bucket's start for the last batch (more than once if the bucket is tiny)
                    batches.append([epoch * self.n + order[j % len(order)]
                                    for j in range(first, first + self.batch_size)])
            perm = torch.randperm(len(batches), generator=g).tolist()
            self._batches, self._epoch = [batches[i] for i in perm], epoch
        return self._batches

    def batch(self, k: int) -> list[int]:
        j = k * self.world_size + self.rank
        return self.epoch_batches(j // self.batches_per_epoch)[j % self.batches_per_epoch]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1
