"""Labelled grids: the cells of ``sdtune sample`` (prompt x seed x LoRA scale x guidance x checkpoint) laid out
as one picture with a header row of seeds and a label column. Pure PIL: no model is needed to draw one."""

from __future__ import annotations

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
    font = load_font(size)
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
    font = load_font(max(10, width // 16))
    y = 4
    for line in _wrap(draw, f"failed: {reason}", font, width - 8)[:8]:
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


