"""Render labelled image grids (rows: prompt x LoRA scale, columns: seeds) with a diffusers pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

SCHEDULERS = ("dpmpp_2m", "ddim", "euler", "euler_a")


def sampling_scheduler(config: Any, name: str = "dpmpp_2m"):
    """A sampling scheduler built from the model's scheduler config (betas, prediction type)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "dpmpp_2m": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
    }
    # A training (DDPM) config may say clip_sample=True, which sampling schedulers must not inherit.
    return classes[name].from_config({**dict(config), "clip_sample": False})


@dataclass(frozen=True)
class Cell:
    prompt: str
    seed: int
    lora_scale: float | None = None


def _font(size: int):
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
    font = _font(size)
    label_w = max(160, w)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header_h = size * 2 + (size + 6 if title else 0)
    grid = Image.new("RGB", (label_w + w * len(col_labels), header_h + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), title[: grid.width // max(1, size // 2)], fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * w + 4, header_h - size - 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = header_h + r * h + 4
        for line in _wrap(probe, label, font, label_w - 8)[: max(1, h // (size + 2))]:
            draw.text((4, y), line, fill="black", font=font)
            y += size + 2
        for c, im in enumerate(images[r]):
            grid.paste(im, (label_w + c * w, header_h + r * h))
    return grid


@torch.no_grad()
def render_grid(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    lora_scales: list[float] | None = None,
    negative_prompt: str = "",
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int,
    width: int,
    title: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[Image.Image, list[list[Image.Image]]]:
    """One row per (prompt, LoRA scale), one column per seed. Each image has its own CPU generator seeded
    with its seed, so a cell is the same whatever else is in the grid, and the global RNG is untouched."""
    scales = lora_scales if lora_scales is not None else [None]
    rows, labels = [], []
    for prompt in prompts:
        for scale in scales:
            row = []
            for seed in seeds:
                kwargs = {"cross_attention_kwargs": {"scale": scale}} if scale is not None else {}
                out = pipe(
                    prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    **kwargs,
                )
                row.append(out.images[0])
            rows.append(row)
            labels.append(prompt if scale is None else f"{prompt} [LoRA x{scale:g}]")
    grid = make_grid(rows, labels, [f"seed {s}" for s in seeds], title=title)
    return grid, rows


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save atomically (temporary name, then rename), so a crash never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
