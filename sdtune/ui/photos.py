"""The Photos tab: uploads (through sdtune's safe image reader), a starting crop box per photo from prep's
own crop choice, the set's flags (duplicates, blur, small, extreme aspect), captions, one-click drop, and
"Prepare", which is ``sdtune.prep.prep`` with the user's boxes.

Per photo, ui_state.json holds ``{"box": [l, t, r, b], "size": [w, h], "start": crop, "flags": [...],
"warnings": [...]}``; boxes are in the upright source's pixels, as prep's ``crop_boxes`` takes them.
"""

from __future__ import annotations

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


def photo_names(ws: Workspace) -> list[str]:
    """The photos in WORKSPACE/photos, in prep's order."""
    folder = ws.path(PHOTOS)
    return sorted((p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=prep_lib._order)


def add_upload(ws: Workspace, name: str, data: bytes) -> dict[str, Any]:
    """Store one uploaded file: a photo (decoded through ``read_image`` with prep's limits first, so a file
    that prep would refuse is refused here, with its reason) or a NAME.txt caption. Returns what was stored."""
    safe = prep_lib.sanitise(Path(name).name)
    suffix = Path(safe).suffix.lower()
    if len(data) > prep_lib.MAX_FILE_BYTES:
        raise SdtuneError(f"{safe}: {len(data)} bytes is over the {prep_lib.MAX_FILE_BYTES} byte limit")
    if suffix == ".txt":
        set_caption(ws, Path(safe).stem, data[:MAX_CAPTION_BYTES].decode("utf-8-sig", "replace"))
        return {"caption": safe}
    if suffix not in IMAGE_SUFFIXES:
        raise SdtuneError(f"{safe}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .txt caption")
    try:
        decoded = read_image(data, suffix, PREVIEW_SIDE, Image.MAX_IMAGE_PIXELS, (255, 255, 255))
    except Unreadable as e:
        raise SdtuneError(f"{safe}: {e}") from None
    ws.path(f"{PHOTOS}/{safe}").write_bytes(data)
    preview = decoded.image.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    ws.path(PREVIEWS).mkdir(exist_ok=True)
    preview.save(ws.path(f"{PREVIEWS}/{safe}.jpg"), quality=90)
    return {"photo": safe, "size": list(decoded.size)}


def set_caption(ws: Workspace, stem: str, text: str) -> None:
    """The caption of photo STEM.*, as the STEM.txt beside it that ``prep --caption-from txt`` reads."""
    safe = prep_lib.sanitise(stem)
    ws.path(f"{PHOTOS}/{safe}.txt").write_text(" ".join(text.split()), encoding="utf-8")


def caption_of(ws: Workspace, name: str) -> str:
    file = ws.path(f"{PHOTOS}/{Path(name).stem}.txt")
    return file.read_text(encoding="utf-8") if file.is_file() else ""


def analyse(ws: Workspace, crop: str, resolution: int) -> dict[str, Any]:
    """Starting crop boxes (prep's ``crop``: smart, face, center or bucket) and the flags prep would set, for
    every photo; stored in ui_state.json (replacing earlier boxes) and returned."""
    settings = prep_lib._settings(resolution, crop, "png", None, "white")
    results = [prep_lib.process(name, str(ws.path(f"{PHOTOS}/{name}")), caption_of(ws, name) or "-", settings)
               for name in photo_names(ws)]
    kept = [r for r in results if r.status in ("kept", "fixed")]
    for r in kept:
        r.output = r.source  # check_set names the earlier photo of a duplicate by its output name
    prep_lib.check_set(kept)
    photos = {}
    for r in results:
        photos[r.source] = {
            "box": list(r.crop_box) if r.crop_box else None, "size": list(r.size) if r.size else None,
            "start": crop, "flags": r.flags, "warnings": r.warnings, "skipped": r.reason,
        }
    state = ws.state()
    state.update(photos=photos, crop=crop, resolution=resolution)
    ws.save_state(state)
    return state


def set_box(ws: Workspace, name: str, box: list[float]) -> None:
    """The user's crop box for one photo (source pixels), checked against its size."""
    state = ws.state()
    photo = state.get("photos", {}).get(name)
    if photo is None or not photo.get("size"):
        raise SdtuneError(f"{name}: no such analysed photo; upload it and press Analyse first")
    w, h = photo["size"]
    if len(box) != 4 or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
        raise SdtuneError(f"{name}: crop box {box} is not inside the {w}x{h} photo")
    photo["box"], photo["moved"] = [round(float(v)) for v in box], True
    ws.save_state(state)


def drop_photo(ws: Workspace, name: str) -> None:
    """Move a photo (and its caption) to WORKSPACE/photos_dropped: out of the dataset, not deleted."""
    src = ws.path(f"{PHOTOS}/{name}")
    if not src.is_file():
        raise SdtuneError(f"{name}: no such photo")
    src.replace(ws.path(f"{DROPPED}/{name}"))
    caption = ws.path(f"{PHOTOS}/{Path(name).stem}.txt")
    if caption.is_file():
        caption.replace(ws.path(f"{DROPPED}/{caption.name}"))
    state = ws.state()
    state.get("photos", {}).pop(name, None)
    ws.save_state(state)


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
