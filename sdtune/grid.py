"""Labelled grids: the cells of ``sdtune sample`` (prompt x seed x LoRA scale x guidance x checkpoint) laid out
as one picture with a header row of seeds and a label column. Pure PIL: no model is needed to draw one."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Cell:
    """Everything that can differ between two images of one grid."""

    prompt: str
    seed: int
    guidance_scale: float = 7.5
    lora_scale: float | None = None  # None: leave the adapters as they are (training-time samples)
    checkpoint: str | None = None  # label of the LoRA file, for --checkpoints all


@dataclass(frozen=True)
class Settings:
    """What all cells of a grid share."""

    negative_prompt: str = ""
    steps: int = 25
    width: int = 512
    height: int = 512
    scheduler: str = "dpmpp_2m"
    mode: str = "txt2img"  # txt2img | img2img | inpaint | outpaint | depth
    strength: float = 0.75
    batch_size: int = 1
    max_sequence_length: int | None = None  # T5 tokens per prompt (FLUX, SD3: the run's); None: no T5


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (sample grids, eval plots)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


# Pillow's own font (Aileron) holds ASCII only, and draws any other character as an empty box. A label with
# other characters (a prompt in French or Japanese, a photo named été.jpg) is drawn in whichever of these the
# system has (Pillow looks in its font folders) holds the most of them; what none holds is spelt in ASCII
# (accents dropped, '?' for the rest) rather than drawn as boxes.
WIDE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc", "DroidSansFallbackFull.ttf",
              "LiberationSans-Regular.ttf", "arialuni.ttf", "arial.ttf", "msyh.ttc", "Arial Unicode.ttf")


def drawable(texts: list[str], size: int) -> tuple[ImageFont.ImageFont, list[str]]:
    """The font to draw ``texts`` in at ``size`` px, and the texts as that font can draw them: Pillow's own
    for ASCII, else the system font of ``WIDE_FONTS`` that holds the most of their other characters."""
    others = sorted({c for text in texts for c in text if not c.isascii() and not c.isspace()})
    if not others:
        return load_font(size), texts
    name = max((None, *WIDE_FONTS), key=lambda n: sum(_has_glyph(n, size, c) for c in others))
    font = _font(name, size)
    assert font is not None  # None (Pillow's own) always loads; a missing file holds no glyph, so is never max
    missing = {c for c in others if not _has_glyph(name, size, c)}
    return font, ["".join(_ascii(c) if c in missing else c for c in text) for text in texts]


def _ascii(char: str) -> str:
    """'é' -> 'e', '日' -> '?': the character's ASCII letters once its accents are dropped."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", char) if c.isascii() and c.isprintable())
    return plain or "?"


@functools.cache
def _font(name: str | None, size: int) -> ImageFont.ImageFont | None:
    if name is None:
        return load_font(size)
    try:
        return ImageFont.truetype(name, size)
    except OSError:  # not on this system
        return None


@functools.cache
def _has_glyph(name: str | None, size: int, char: str) -> bool:
    """Whether font ``name`` draws ``char`` as itself, not as its empty box for characters it lacks."""
    if unicodedata.category(char) in ("Cs", "Co", "Cn", "Cc"):  # a file name's undecodable byte, unassigned
        return False
    font = _font(name, size)
    return font is not None and _pixels(font, char) != _pixels(font, "\uffff")  # U+FFFF: in no font


def _pixels(font: ImageFont.ImageFont, char: str) -> bytes:
    im = Image.new("L", (font.size * 3 if hasattr(font, "size") else 48,) * 2)
    ImageDraw.Draw(im).text((4, 4), char, fill=255, font=font)
    return im.tobytes()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    title: str | None = None,
    min_cell: int = 128,
) -> Image.Image:
    """Paste ``images[row][col]`` into one picture with a header row and a label column.

    Cells smaller than ``min_cell`` px are enlarged (nearest neighbour) so a person can see them."""
    zoom = max(1, -(-min_cell // max(images[0][0].width, images[0][0].height)))
    if zoom > 1:
        images = [[im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST) for im in row]
                  for row in images]
    h, w = images[0][0].height, images[0][0].width
    size = max(12, min(24, w // 12))
    font, texts = drawable([title or "", *col_labels, *row_labels], size)
    title, col_labels, row_labels = texts[0], texts[1 : 1 + len(col_labels)], texts[1 + len(col_labels):]
    label_w = max(160, w)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # a title wider than a narrow grid (one seed: 288 px) wraps onto more lines rather than being cut off
    title_lines = _wrap(probe, title, font, label_w + w * len(col_labels) - 12) if title else []
    header_h = size * 2 + (size + 6) * len(title_lines)
    grid = Image.new("RGB", (label_w + w * len(col_labels), header_h + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((6, 4 + i * (size + 6)), line, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * w + 4, header_h - size - 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = header_h + r * h + 4
        for line in _wrap(probe, label, font, label_w - 8)[: max(1, h // (size + 2))]:
            draw.text((4, y), line, fill="black", font=font)
            y += size + 2
        for c, im in enumerate(images[r]):
            grid.paste(im.resize((w, h)) if im.size != (w, h) else im, (label_w + c * w, header_h + r * h))
    return grid


def failed_cell(width: int, height: int, reason: str) -> Image.Image:
    """A grey cell that says why it could not be rendered (the grid keeps its other cells)."""
    im = Image.new("RGB", (width, height), (90, 90, 90))
    draw = ImageDraw.Draw(im)
    font, (text,) = drawable([f"failed: {reason}"], max(10, width // 16))
    y = 4
    for line in _wrap(draw, text, font, width - 8)[:8]:
        draw.text((4, y), line, fill="white", font=font)
        y += max(10, width // 16) + 2
    return im


def row_label(cell: Cell, varying: set[str]) -> str:
    """The prompt, plus whichever of checkpoint / LoRA scale / guidance varies in this grid."""
    parts = [cell.prompt]
    if "checkpoint" in varying:
        parts.append(str(cell.checkpoint))
    if "lora_scale" in varying or (cell.lora_scale is not None and cell.lora_scale != 1):
        parts.append(f"LoRA x{cell.lora_scale:g}")
    if "guidance_scale" in varying:
        parts.append(f"cfg {cell.guidance_scale:g}")
    return " | ".join(parts)


def layout(cells: list[Cell], images: list[Image.Image], title: str | None = None) -> Image.Image:
    """One row per (checkpoint, prompt, LoRA scale, guidance), one column per seed."""
    row_keys = list(dict.fromkeys(replace(c, seed=0) for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    varying = {f for f in ("checkpoint", "lora_scale", "guidance_scale") if len({getattr(c, f) for c in cells}) > 1}
    by_cell = dict(zip(cells, images))
    rows = [[by_cell[replace(key, seed=s)] for s in seeds] for key in row_keys]
    return make_grid(rows, [row_label(k, varying) for k in row_keys], [f"seed {s}" for s in seeds], title=title)


