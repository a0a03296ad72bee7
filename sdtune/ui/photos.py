"""The Photos tab: uploads (through sdtune's safe image reader), a starting crop box per photo from prep's
own crop choice, the set's flags (duplicates, blur, small, extreme aspect), captions, one-click drop, and
"Prepare", which is ``sdtune.prep.prep`` with the user's boxes.

Uploads are stored under ``safe_name`` (one rule for a photo and its NAME.txt caption) and overwrite
nothing: a taken name gets "NAME (2).jpg", a dropped photo keeps an earlier dropped one. ``analyse`` keeps
the boxes the user moved.

Per photo, ui_state.json holds ``{"box": [l, t, r, b], "size": [w, h], "start": crop, "flags": [...],
"warnings": [...]}``; boxes are in the upright source's pixels, as prep's ``crop_boxes`` takes them.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

from sdtune import prep as prep_lib
from sdtune.errors import SdtuneError
from sdtune.images import Unreadable, read_image
from sdtune.ui.workspace import Workspace

PHOTOS, DROPPED, PREVIEWS, DATASET = "photos", "photos_dropped", "previews", "dataset"
PREVIEW_SIDE = 384  # long side of the picture the page draws the crop box on
MAX_CAPTION_BYTES = 65536  # what prep reads of a caption file
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
# Unsafe in a file name on some disk: path separators and what Windows reserves (a workspace may move there).
UNSAFE_CHARS = re.compile(r'[<>:"/\\|?*]')
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
# A stored name's UTF-8 bytes, its preview's ".jpg" included: under the 255 bytes most file systems allow.
MAX_NAME_BYTES = 200


def photo_names(ws: Workspace) -> list[str]:
    """The photos in WORKSPACE/photos, in prep's order."""
    folder = ws.path(PHOTOS)
    return sorted((p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=prep_lib._order)


def safe_name(name: str) -> str:
    """The name an uploaded file is stored under; one rule for a photo and its NAME.txt caption. The parts of
    a folder upload's path are joined with '_' (``dog/00.jpg`` is ``dog_00.jpg``; '.' and '..' parts left
    out); Unicode NFC; letters of every script, spaces and punctuation kept (``IMG (1).jpg``, ``犬.jpg``).
    Only what is unsafe on some disk becomes '_': control characters and ``<>:"/\\|?*``; no leading dot, no
    trailing dot or space, no Windows device name (CON, NUL...). A stored name maps to itself."""
    text = unicodedata.normalize("NFC", name)  # macOS hands out NFD names: one photo, one spelling
    text = "_".join(part for part in re.split(r"[/\\]+", text) if part not in ("", ".", ".."))
    text = "".join("_" if unicodedata.category(c).startswith("C") else c for c in re.sub(r"\s+", " ", text))
    stem, suffix = os.path.splitext(UNSAFE_CHARS.sub("_", text))
    if len(suffix.encode()) > 16:  # not a file type: part of the name (and shortened with it)
        stem, suffix = stem + suffix, ""
    stem = stem.strip(" .")
    while stem and len(f"{stem}{suffix}.jpg".encode()) > MAX_NAME_BYTES:
        stem = stem[:-1].rstrip(" .")
    if stem.split(".")[0].upper() in DEVICE_NAMES:
        stem = "_" + stem
    return f"{stem or 'photo'}{suffix}"


def _stems(folder: Path, images_only: bool) -> set[str]:
    """The casefolded stems of the files in ``folder`` (of its images only, with ``images_only``)."""
    return {os.path.splitext(p.name)[0].casefold() for p in folder.iterdir()
            if not images_only or p.suffix.lower() in IMAGE_SUFFIXES}


def _free_name(name: str, taken: set[str]) -> str:
    """NAME, else "STEM (2).EXT", "STEM (3).EXT"...: the first whose stem is not in ``taken`` (casefolded
    stems: a photo's caption is STEM.txt, so two photos of one stem would share it, and a case-insensitive
    disk sees Dog and dog as one)."""
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 1
    while os.path.splitext(candidate)[0].casefold() in taken:
        n += 1
        candidate = f"{stem} ({n}){suffix}"
    return candidate


def add_upload(ws: Workspace, name: str, data: bytes) -> dict[str, Any]:
    """Store one uploaded file under ``safe_name(name)``: a photo (decoded through ``read_image`` with prep's
    limits first, so a file that prep would refuse is refused here, with its reason) or a NAME.txt caption.
    A photo whose stem another photo has is stored under the first free "STEM (2).EXT" (nothing is ever
    overwritten; the same bytes under the same name are not stored twice). Returns what was stored, with a
    ``note`` (one line for the page) when the name changed, the photo was there already, or a caption has
    no photo."""
    safe = safe_name(name)
    suffix = Path(safe).suffix.lower()
    if len(data) > prep_lib.MAX_FILE_BYTES:
        limit = prep_lib.MAX_FILE_BYTES // 2**20
        raise SdtuneError(f"{safe}: {len(data)} bytes is over the {limit} MiB limit")
    if suffix == ".txt":
        return _add_caption(ws, safe, data)
    if suffix not in IMAGE_SUFFIXES:
        raise SdtuneError(f"{safe}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .txt caption")
    try:
        decoded = read_image(data, suffix, PREVIEW_SIDE, Image.MAX_IMAGE_PIXELS, (255, 255, 255))
    except Unreadable as e:
        raise SdtuneError(f"{safe}: {e}") from None
    same = ws.path(f"{PHOTOS}/{safe}")
    if same.is_file() and same.read_bytes() == data:
        return {"photo": safe, "size": list(decoded.size), "note": f"{safe}: already here (the same file)"}
    stored = _free_name(safe, _stems(ws.path(PHOTOS), images_only=True))
    ws.path(f"{PHOTOS}/{stored}").write_bytes(data)
    preview = decoded.image.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    ws.path(PREVIEWS).mkdir(exist_ok=True)
    preview.save(ws.path(f"{PREVIEWS}/{stored}.jpg"), quality=90)
    result: dict[str, Any] = {"photo": stored, "size": list(decoded.size)}
    if stored != safe:
        result["note"] = f"{safe}: another photo has that name; stored as {stored}"
    return result


def _add_caption(ws: Workspace, safe: str, data: bytes) -> dict[str, Any]:
    stem = os.path.splitext(safe)[0]
    set_caption(ws, stem, data[:MAX_CAPTION_BYTES].decode("utf-8-sig", "replace"))
    result: dict[str, Any] = {"caption": safe}
    if stem not in {os.path.splitext(n)[0] for n in photo_names(ws)}:
        result["note"] = f"{safe}: no photo named {stem}.* here; the caption is kept for one"
    return result


def set_caption(ws: Workspace, stem: str, text: str) -> None:
    """The caption of photo STEM.*, as the STEM.txt beside it that ``prep --caption-from txt`` reads (the
    photo's own stem: ``safe_name`` keeps a stored name as it is)."""
    ws.path(f"{PHOTOS}/{safe_name(stem)}.txt").write_text(" ".join(text.split()), encoding="utf-8")


def caption_of(ws: Workspace, name: str) -> str:
    """The caption of photo NAME ("" when it has none): NAME's stem + .txt, as prep reads it."""
    file = ws.path(f"{PHOTOS}/{os.path.splitext(name)[0]}.txt")
    return file.read_text(encoding="utf-8") if file.is_file() else ""


def analyse(ws: Workspace, crop: str, resolution: int) -> dict[str, Any]:
    """Starting crop boxes (prep's ``crop``: smart, face, center or bucket) and the flags prep would set, for
    every photo; stored in ui_state.json and returned. A box the user moved is kept (``_keep_moved``): a new
    starting crop is for the photos whose box was not moved by hand."""
    settings = prep_lib._settings(resolution, crop, "png", None, "white")
    results = [prep_lib.process(name, str(ws.path(f"{PHOTOS}/{name}")), caption_of(ws, name) or "-", settings)
               for name in photo_names(ws)]
    kept = [r for r in results if r.status in ("kept", "fixed")]
    for r in kept:
        r.output = r.source  # check_set names the earlier photo of a duplicate by its output name
    prep_lib.check_set(kept)
    state = ws.state()
    earlier = state.get("photos", {})
    photos = {}
    for r in results:
        photos[r.source] = _keep_moved({
            "box": list(r.crop_box) if r.crop_box else None, "size": list(r.size) if r.size else None,
            "start": crop, "flags": r.flags, "warnings": r.warnings, "skipped": r.reason,
        }, earlier.get(r.source), crop)
    state.update(photos=photos, crop=crop, resolution=resolution)
    ws.save_state(state)
    return state


def _keep_moved(entry: dict[str, Any], before: dict[str, Any] | None, crop: str) -> dict[str, Any]:
    """``entry`` (a photo's fresh analysis) with the box the user had moved, when there was one for the same
    photo; unless ``crop`` needs a square box (all but bucket) and that box is not one (prep would refuse
    it): then the new starting box, with a warning that says so."""
    if not before or not before.get("moved") or not entry["box"] or before.get("size") != entry["size"]:
        return entry
    left, top, right, bottom = before["box"]
    if crop != "bucket" and right - left != bottom - top:
        entry["warnings"] = [*entry["warnings"], f"your crop box {before['box']} is not square, as the "
                             f"{crop} crop needs: back to {crop}'s box"]
        return entry
    entry.update(box=before["box"], moved=True)
    return entry


def set_box(ws: Workspace, name: str, box: list[float]) -> None:
    """The user's crop box for one photo (source pixels), checked against its size."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        given = json.dumps(box, default=str)[:80]
        raise SdtuneError(f"box: {given} is not four numbers [left, top, right, bottom] in source pixels")
    state = ws.state()
    photo = state.get("photos", {}).get(name)
    if photo is None or not photo.get("size"):
        raise SdtuneError(f"name: {name!r} is not an analysed photo; upload it and press Analyse again first")
    w, h = photo["size"]
    if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
        raise SdtuneError(f"box: {list(box)} is not inside {name}, a {w}x{h} photo")
    photo["box"], photo["moved"] = [round(float(v)) for v in box], True
    ws.save_state(state)


def drop_photo(ws: Workspace, name: str) -> str:
    """Move a photo (and its caption) to WORKSPACE/photos_dropped: out of the dataset, not deleted. Returns
    its name there."""
    if name not in photo_names(ws):  # a name, not a path: "../ui_state.json" is no photo
        raise SdtuneError(f"name: {name!r} is not a photo here")
    # a new name when an earlier dropped photo (or its caption) has this one: dropped copies are kept
    dropped = _free_name(name, _stems(ws.path(DROPPED), images_only=False))
    ws.path(f"{PHOTOS}/{name}").replace(ws.path(f"{DROPPED}/{dropped}"))
    caption = ws.path(f"{PHOTOS}/{os.path.splitext(name)[0]}.txt")
    if caption.is_file():
        caption.replace(ws.path(f"{DROPPED}/{os.path.splitext(dropped)[0]}.txt"))
    state = ws.state()
    state.get("photos", {}).pop(name, None)
    ws.save_state(state)
    return dropped


def prepare(ws: Workspace, resolution: int, crop: str, drop: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``sdtune prep WORKSPACE/photos WORKSPACE/dataset --caption-from txt`` with each photo's crop box;
    returns prep's report."""
    missing = [n for n in photo_names(ws) if not caption_of(ws, n)]
    if missing:
        raise SdtuneError(f"caption: {', '.join(missing[:5])} has no caption; type one under the photo")
    photos = ws.state().get("photos", {})
    boxes = {name: tuple(p["box"]) for name, p in photos.items() if p.get("box") and p.get("moved")}
    return prep_lib.prep(ws.path(PHOTOS), ws.path(DATASET), resolution=resolution, crop=crop, caption_from="txt",
                         workers=1, progress=False, drop=tuple(drop), crop_boxes=boxes)
