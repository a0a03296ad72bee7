#!/usr/bin/env python
"""Draw the offline demo subject for sdtune: one little robot "toy" in 8 photos.

Everything is drawn in code with Pillow + numpy (nothing is downloaded), so
the images can be dedicated to the public domain (CC0) by the sdtune authors.

The subject is always the same toy -- red rounded-rectangle body, yellow round
head with two black eyes, blue arms, green antenna, same proportions -- seen in
8 different scenes (background, scenery, position, size, slight rotation and a
few distractor objects).  Every scene is drawn at 4x and downscaled with
LANCZOS for anti-aliasing.

Output (128x128 RGB PNGs plus a Hugging Face "imagefolder" metadata file):

    data/demo_toy/toy_00.png ... toy_07.png
    data/demo_toy/metadata.jsonl   {"file_name": ..., "text": "a photo of sks toy ..."}

The script is deterministic: running it twice produces byte-identical files
(fixed parameters, fixed seed, PNGs written without timestamps or text chunks).

Usage:  python data/make_demo_toy.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128          # final image size
SCALE = 4           # supersampling factor
BIG = SIZE * SCALE  # drawing canvas size
SEED = 20240607     # only used for the small per-scene jitter below

# The toy's fixed palette (RGB).
RED = (214, 40, 40)
RED_DARK = (150, 20, 25)
YELLOW = (250, 205, 40)
YELLOW_DARK = (205, 150, 20)
BLUE = (40, 90, 210)
BLUE_DARK = (25, 55, 140)
GREEN = (40, 175, 70)
GREEN_DARK = (25, 115, 45)
BLACK = (15, 15, 20)
WHITE = (255, 255, 255)

# Canonical toy canvas (RGBA); the toy is drawn once here and then
# scaled/rotated into every scene, so its proportions never change.
TOY_W, TOY_H = 600, 800


# --------------------------------------------------------------------------
# small drawing helpers
# --------------------------------------------------------------------------

def _lerp(c0, c1, t):
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c0, c1))


def vertical_gradient(w: int, h: int, top, bottom) -> Image.Image:
    """RGB image with a linear top->bottom colour gradient."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float64)[:, None, None]
    a = np.asarray(top, dtype=np.float64)[None, None, :]
    b = np.asarray(bottom, dtype=np.float64)[None, None, :]
    arr = a + (b - a) * t
    arr = np.repeat(arr, w, axis=1)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def diagonal_gradient(w: int, h: int, c0, c1) -> Image.Image:
    """RGB image with a gradient from the top-left to the bottom-right corner."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = ((xx / max(w - 1, 1)) + (yy / max(h - 1, 1))) / 2.0
    a = np.asarray(c0, dtype=np.float64)
    b = np.asarray(c1, dtype=np.float64)
    arr = a[None, None, :] + (b - a)[None, None, :] * t[:, :, None]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def radial_shade(w: int, h: int, light, dark, cx: float, cy: float) -> Image.Image:
    """RGB image that is `light` around (cx, cy) (fractions of w/h) and `dark` far away."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.sqrt(((xx / w) - cx) ** 2 + ((yy / h) - cy) ** 2)
    t = np.clip(d / 0.9, 0.0, 1.0) ** 1.3
    a = np.asarray(light, dtype=np.float64)
    b = np.asarray(dark, dtype=np.float64)
    arr = a[None, None, :] + (b - a)[None, None, :] * t[:, :, None]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def paste_shaded(canvas: Image.Image, box, light, dark, shape: str, radius: int = 0,
                 cx: float = 0.35, cy: float = 0.3) -> None:
    """Fill `shape` ('rrect' | 'ellipse') inside `box` with a soft radial shade."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    fill = radial_shade(w, h, light, dark, cx, cy).convert("RGBA")
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    if shape == "ellipse":
        md.ellipse((0, 0, w - 1, h - 1), fill=255)
    else:
        md.rounded_rectangle((0, 0, w - 1, h - 1), radius=radius, fill=255)
    canvas.paste(fill, (x0, y0), mask)


# --------------------------------------------------------------------------
# the toy
# --------------------------------------------------------------------------

def draw_toy() -> Image.Image:
    """The one and only subject, on a transparent TOY_W x TOY_H canvas."""
    toy = Image.new("RGBA", (TOY_W, TOY_H), (0, 0, 0, 0))
    d = ImageDraw.Draw(toy)

    # Antenna: green stalk with a green ball on top.
    d.rounded_rectangle((288, 40, 312, 170), radius=12, fill=GREEN_DARK)
    paste_shaded(toy, (255, 5, 345, 95), _lerp(GREEN, WHITE, 0.35), GREEN_DARK, "ellipse")

    # Arms: blue rounded rectangles hanging from the shoulders.
    paste_shaded(toy, (20, 420, 130, 700), _lerp(BLUE, WHITE, 0.3), BLUE_DARK, "rrect",
                 radius=50, cx=0.4, cy=0.2)
    paste_shaded(toy, (470, 420, 580, 700), _lerp(BLUE, WHITE, 0.3), BLUE_DARK, "rrect",
                 radius=50, cx=0.4, cy=0.2)

    # Body: red rounded rectangle (drawn over the arm tops = shoulders).
    paste_shaded(toy, (110, 390, 490, 790), _lerp(RED, WHITE, 0.25), RED_DARK, "rrect",
                 radius=70, cx=0.35, cy=0.25)
    # A small darker chest panel with three "buttons" keeps the toy recognisable.
    d.rounded_rectangle((215, 500, 385, 620), radius=24, fill=RED_DARK)
    for i, col in enumerate((YELLOW, GREEN, BLUE)):
        x = 250 + i * 50
        d.ellipse((x - 16, 544, x + 16, 576), fill=col)

    # Head: yellow circle with two black eyes (with tiny white glints).
    paste_shaded(toy, (140, 140, 460, 460), _lerp(YELLOW, WHITE, 0.45), YELLOW_DARK,
                 "ellipse", cx=0.35, cy=0.3)
    for ex in (235, 365):
        d.ellipse((ex - 34, 262, ex + 34, 330), fill=BLACK)
        d.ellipse((ex - 18, 272, ex - 2, 288), fill=WHITE)
    # A small smile.
    d.arc((245, 320, 355, 400), start=20, end=160, fill=BLACK, width=12)
    return toy


def place_toy(scene: Image.Image, toy: Image.Image, cx: float, bottom: float,
              height_frac: float, angle: float, shadow: bool = True) -> None:
    """Paste the toy so its (unrotated) height is `height_frac` of the frame,
    horizontally centred at `cx` and with its feet at `bottom` (fractions)."""
    h = int(round(BIG * height_frac))
    w = int(round(h * TOY_W / TOY_H))
    small = toy.resize((w, h), Image.LANCZOS)
    rot = small.rotate(angle, resample=Image.BICUBIC, expand=True)
    x = int(round(BIG * cx - rot.width / 2))
    y = int(round(BIG * bottom - h - (rot.height - h) / 2))
    if shadow:
        sh = Image.new("L", scene.size, 0)
        sd = ImageDraw.Draw(sh)
        fy = BIG * bottom
        sd.ellipse((BIG * cx - w * 0.55, fy - h * 0.05, BIG * cx + w * 0.55, fy + h * 0.05),
                   fill=110)
        sh = sh.filter(ImageFilter.GaussianBlur(BIG * 0.02))
        scene.paste(Image.new("RGB", scene.size, (0, 0, 0)), (0, 0), sh)
    scene.paste(rot, (x, y), rot)


# --------------------------------------------------------------------------
# scenery and distractors
# --------------------------------------------------------------------------

def floor(scene: Image.Image, y_frac: float, top, bottom, line=None) -> None:
    y = int(BIG * y_frac)
    scene.paste(vertical_gradient(BIG, BIG - y, top, bottom), (0, y))
    if line is not None:
        ImageDraw.Draw(scene).rectangle((0, y - 3, BIG, y + 3), fill=line)


def ball(scene, cx, cy, r, light, dark):
    b = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    paste_shaded(scene, b, light, dark, "ellipse")


def box(scene, x0, y0, x1, y1, front, top):
    d = ImageDraw.Draw(scene)
    depth = (x1 - x0) * 0.25
    d.polygon([(x0, y0), (x0 + depth, y0 - depth), (x1 + depth, y0 - depth), (x1, y0)], fill=top)
    d.polygon([(x1, y0), (x1 + depth, y0 - depth), (x1 + depth, y1 - depth), (x1, y1)],
              fill=_lerp(front, (0, 0, 0), 0.25))
    d.rectangle((x0, y0, x1, y1), fill=front)


def cup(scene, x0, y1, w, h, color):
    d = ImageDraw.Draw(scene)
    d.arc((x0 + w * 0.7, y1 - h * 0.8, x0 + w * 1.25, y1 - h * 0.25), start=-90, end=90,
          fill=color, width=int(w * 0.1))
    d.rounded_rectangle((x0, y1 - h, x0 + w, y1), radius=int(w * 0.12), fill=color)
    d.ellipse((x0, y1 - h - w * 0.08, x0 + w, y1 - h + w * 0.08), fill=_lerp(color, (0, 0, 0), 0.3))


def plant(scene, cx, y1, s):
    d = ImageDraw.Draw(scene)
    for dx, dy, rw, rh in ((-0.35, -1.25, 0.35, 0.55), (0.3, -1.3, 0.35, 0.55),
                           (0.0, -1.6, 0.3, 0.6), (-0.1, -1.0, 0.3, 0.4)):
        d.ellipse((cx + (dx - rw) * s, y1 + (dy - rh) * s, cx + (dx + rw) * s, y1 + (dy + rh) * s),
                  fill=(60, 130, 60))
    d.polygon([(cx - 0.45 * s, y1 - 0.75 * s), (cx + 0.45 * s, y1 - 0.75 * s),
               (cx + 0.33 * s, y1), (cx - 0.33 * s, y1)], fill=(170, 95, 55))


def bricks(scene, y_end, mortar, brick):
    d = ImageDraw.Draw(scene)
    d.rectangle((0, 0, BIG, y_end), fill=mortar)
    bh, bw = 40, 96
    for row in range(y_end // bh + 1):
        off = 0 if row % 2 == 0 else bw // 2
        for col in range(-1, BIG // bw + 2):
            x = col * bw - off
            shade = _lerp(brick, (0, 0, 0), 0.08 * ((row * 7 + col * 3) % 3))
            d.rectangle((x + 4, row * bh + 4, x + bw - 4, row * bh + bh - 4), fill=shade)


# --------------------------------------------------------------------------
# the 8 scenes
# --------------------------------------------------------------------------

def scene_00(toy, rng):
    s = Image.new("RGB", (BIG, BIG), (70, 130, 220))
    place_toy(s, toy, 0.5, 0.88, 0.72, 3 + rng.uniform(-1, 1), shadow=False)
    return s, "a photo of sks toy on a blue background"


def scene_01(toy, rng):
    s = vertical_gradient(BIG, BIG, (120, 175, 240), (225, 240, 255))
    ImageDraw.Draw(s).ellipse((40, 60, 200, 120), fill=(250, 250, 255))
    ImageDraw.Draw(s).ellipse((110, 40, 250, 110), fill=(250, 250, 255))
    floor(s, 0.72, (110, 185, 80), (70, 140, 50))
    place_toy(s, toy, 0.6, 0.9, 0.62, -8 + rng.uniform(-1, 1))
    return s, "a photo of sks toy on green grass under a blue sky"


def scene_02(toy, rng):
    s = Image.new("RGB", (BIG, BIG), (232, 216, 190))
    floor(s, 0.66, (170, 115, 65), (120, 75, 40), line=(95, 60, 30))
    d = ImageDraw.Draw(s)
    for i in range(4):  # wood grain
        y = int(BIG * 0.72) + i * 36
        d.line((0, y, BIG, y + 6), fill=(140, 92, 50), width=3)
    place_toy(s, toy, 0.38, 0.86, 0.55, 10 + rng.uniform(-1, 1))
    return s, "a photo of sks toy on a wooden table in front of a beige wall"


def scene_03(toy, rng):
    s = Image.new("RGB", (BIG, BIG), (240, 190, 205))
    floor(s, 0.7, (200, 200, 205), (160, 160, 170), line=(120, 120, 130))
    ball(s, BIG * 0.8, BIG * 0.83, BIG * 0.09, (120, 230, 230), (20, 130, 140))
    place_toy(s, toy, 0.4, 0.92, 0.66, -4 + rng.uniform(-1, 1))
    return s, "a photo of sks toy on the floor next to a teal ball in front of a pink wall"


def scene_04(toy, rng):
    s = vertical_gradient(BIG, BIG, (250, 170, 80), (120, 70, 150))
    place_toy(s, toy, 0.55, 0.95, 0.8, 14 + rng.uniform(-0.5, 0.5), shadow=False)
    return s, "a close-up photo of sks toy with an orange and purple sunset gradient background"


def scene_05(toy, rng):
    s = Image.new("RGB", (BIG, BIG), (175, 180, 185))
    floor(s, 0.74, (110, 105, 100), (80, 75, 70), line=(60, 55, 50))
    box(s, BIG * 0.06, BIG * 0.72, BIG * 0.3, BIG * 0.93, (200, 160, 100), (225, 190, 130))
    cup(s, BIG * 0.78, BIG * 0.92, BIG * 0.12, BIG * 0.14, (245, 245, 240))
    place_toy(s, toy, 0.56, 0.9, 0.48, -12 + rng.uniform(-1, 1))
    return s, "a photo of sks toy between a cardboard box and a white cup on a grey floor"


def scene_06(toy, rng):
    s = diagonal_gradient(BIG, BIG, (30, 110, 115), (10, 45, 55))
    place_toy(s, toy, 0.34, 0.6, 0.42, 6 + rng.uniform(-1, 1), shadow=False)
    return s, "a photo of a small sks toy on a dark teal background"


def scene_07(toy, rng):
    s = Image.new("RGB", (BIG, BIG), (0, 0, 0))
    bricks(s, int(BIG * 0.7), (200, 195, 185), (170, 75, 55))
    floor(s, 0.7, (245, 245, 240), (215, 215, 210), line=(180, 180, 175))
    plant(s, BIG * 0.18, BIG * 0.86, BIG * 0.22)
    place_toy(s, toy, 0.64, 0.93, 0.6, -14 + rng.uniform(-0.5, 0.5))
    return s, "a photo of sks toy on a white shelf in front of a brick wall, next to a potted plant"


SCENES = [scene_00, scene_01, scene_02, scene_03, scene_04, scene_05, scene_06, scene_07]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo_toy")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(SEED)
    toy = draw_toy()
    lines = []
    for i, make in enumerate(SCENES):
        big, caption = make(toy, rng)
        img = big.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        name = f"toy_{i:02d}.png"
        # No pnginfo / no timestamps: plain PNG so the bytes are reproducible.
        img.save(args.out / name, format="PNG", optimize=True)
        assert "sks" in caption and "toy" in caption
        lines.append(json.dumps({"file_name": name, "text": caption}, ensure_ascii=True))
    (args.out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8",
                                             newline="\n")
    print(f"wrote {len(lines)} images + metadata.jsonl to {args.out}")


if __name__ == "__main__":
    main()
