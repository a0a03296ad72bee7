"""A procedural image world: simple shapes and toys made of shapes on simple backgrounds, with exact captions.

Every image comes from a ``Scene`` (a frozen description: things with shape, colour, size and position, and
a background); ``render`` draws it and ``caption`` describes it in plain English, so a caption is always
true of its image. ``sample_scene`` draws random scenes (the pretraining world), ``subject_scene`` draws one
particular composite toy that ``sample_scene`` never produces (the DreamBooth subject), and ``detect`` /
``score`` read colours and shapes back from pixels, to check generated images against their prompts.

Everything is deterministic given a seed (``random.Random``, PIL and numpy only), so a dataset written twice
is byte-identical.

    >>> rng = random.Random(0)
    >>> scene = sample_scene(rng)
    >>> image, text = render(scene, 64), caption(scene)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------------------
# The vocabulary of the world

# Colours far apart in RGB, so that a nearest-colour rule reads them back from pixels reliably.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
TOY = "toy"  # the shape name of a thing made of parts
SIZES: dict[str, float] = {"small": 0.24, "medium": 0.34, "large": 0.44}  # side of the thing / image side
POSITIONS: dict[str, tuple[float, float]] = {  # centre of the thing, as fractions of the image (x, y)
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
# How a lone thing's position reads in a caption (the centre goes unsaid).
POSITION_PHRASES = {"center": "", "left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom"}
# Two things always sit on opposite sides; the caption says where the first is relative to the second.
PAIRS = {("left", "right"): "left of", ("right", "left"): "right of", ("top", "bottom"): "above",
         ("bottom", "top"): "below"}
BACKGROUND_KINDS = ("plain", "floor", "stripes")
FLOOR_FROM = 0.62  # the floor starts at this fraction of the height (the wall is above)
STRIPES = 6  # vertical stripes across the image


@dataclass(frozen=True)
class Part:
    """One shape of a toy: ``box`` is (x0, y0, x1, y1) inside the toy's unit square (y down)."""

    shape: str
    color: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Thing:
    """An object in a scene: a plain shape of one colour, or a toy (``shape == "toy"``) made of ``parts``.

    ``subject`` marks the DreamBooth subject, which captions name by its identifier; ``rotation`` is in
    degrees, counter-clockwise (only the subject is rotated, slightly)."""

    shape: str
    color: str = ""  # "" for a toy: its colours are those of its parts
    size: str = "medium"
    position: str = "center"
    parts: tuple[Part, ...] = ()
    rotation: float = 0.0
    subject: bool = False

    @property
    def colors(self) -> tuple[str, ...]:
        """Every colour the thing shows."""
        return tuple(dict.fromkeys(p.color for p in self.parts)) if self.parts else (self.color,)


@dataclass(frozen=True)
class Background:
    """``plain``: one colour; ``floor``: a ``color`` wall above a ``color2`` floor; ``stripes``: vertical
    stripes of ``color`` and ``color2``."""

    color: str
    kind: str = "plain"
    color2: str = ""

    @property
    def colors(self) -> tuple[str, ...]:
        return (self.color, self.color2) if self.color2 else (self.color,)


@dataclass(frozen=True)
class Scene:
    """What an image shows: one or two things on a background."""

    things: tuple[Thing, ...]
    background: Background


# --------------------------------------------------------------------------------------------------------
# The subject: one particular toy, never drawn by `sample_scene`

SUBJECT_PARTS: tuple[Part, ...] = (
    Part("square", "purple", (0.18, 0.42, 0.82, 1.0)),  # body
    Part("triangle", "orange", (0.26, 0.0, 0.74, 0.42)),  # hat
    Part("circle", "white", (0.27, 0.5, 0.47, 0.7)),  # eyes, big enough to survive 32 px
    Part("circle", "white", (0.53, 0.5, 0.73, 0.7)),
)
SUBJECT_COLORS: tuple[str, ...] = ("purple", "orange", "white")


def _is_subject_like(parts: tuple[Part, ...]) -> bool:
    """A random toy must not look like the subject: no purple square body under an orange triangle."""
    shapes = {(p.shape, p.color) for p in parts}
    return ("square", "purple") in shapes and ("triangle", "orange") in shapes


# --------------------------------------------------------------------------------------------------------
# Sampling scenes


def _random_background(rng: random.Random, avoid: tuple[str, ...] = ()) -> Background:
    colors = [c for c in COLORS if c not in avoid]
    kind = rng.choices(BACKGROUND_KINDS, weights=(6, 2, 2))[0]
    first = rng.choice(colors)
    if kind == "plain":
        return Background(first)
    return Background(first, kind, rng.choice([c for c in colors if c != first]))


def _random_toy_parts(rng: random.Random, colors: list[str]) -> tuple[Part, ...]:
    """2-4 shapes: a body, a head, and sometimes feet or arms, each of a random allowed colour."""
    while True:
        body = Part(rng.choice(("square", "circle")), rng.choice(colors), (0.2, 0.42, 0.8, 1.0))
        head = Part(rng.choice(("circle", "square", "triangle", "star")),
                    rng.choice([c for c in colors if c != body.color]), (0.28, 0.0, 0.72, 0.44))
        parts = [body, head]
        extra = rng.choice(("none", "feet", "arms"))
        limb = rng.choice(colors)
        if extra == "feet":
            parts[:0] = [Part("square", limb, (0.22, 0.86, 0.42, 1.0)),
                         Part("square", limb, (0.58, 0.86, 0.78, 1.0))]
            parts[2] = Part(body.shape, body.color, (0.2, 0.42, 0.8, 0.9))
        elif extra == "arms":
            parts[:0] = [Part("circle", limb, (0.0, 0.56, 0.24, 0.8)),
                         Part("circle", limb, (0.76, 0.56, 1.0, 0.8))]
        if not _is_subject_like(tuple(parts)):
            return tuple(parts)


def _random_thing(rng: random.Random, position: str, avoid: tuple[str, ...],
                  toy_chance: float = 0.2) -> Thing:
    colors = [c for c in COLORS if c not in avoid]
    size = rng.choice(tuple(SIZES))
    if rng.random() < toy_chance:
        return Thing(TOY, "", size, position, _random_toy_parts(rng, colors))
    return Thing(rng.choice(SHAPES), rng.choice(colors), size, position)


def sample_scene(rng: random.Random) -> Scene:
    """A random scene of the pretraining world: one thing (70%) or two, on a random background.

    Things never share a colour with the background or with each other (each stays visible and the
    detector can tell them apart), and never look like the subject."""
    background = _random_background(rng)
    if rng.random() < 0.7:
        thing = _random_thing(rng, rng.choice(tuple(POSITIONS)), background.colors)
        return Scene((thing,), background)
    first_pos, second_pos = rng.choice(tuple(PAIRS))
    first = _random_thing(rng, first_pos, background.colors)
    second = _random_thing(rng, second_pos, background.colors + first.colors)
    return Scene((first, second), background)


def subject_scene(rng: random.Random, context: Background | None = None) -> Scene:
    """The subject toy (``SUBJECT_PARTS``, always the same) in a varied context: on ``context`` (a random
    background without the subject's colours when None), at a random position and size, turned by up to
    10 degrees, and with a random companion thing 30% of the time."""
    background = context or _random_background(rng, avoid=SUBJECT_COLORS)
    rotation = round(rng.uniform(-10.0, 10.0), 1)
    if rng.random() < 0.3:
        subject_pos, other_pos = rng.choice(tuple(PAIRS))
        subject = Thing(TOY, "", rng.choice(("medium", "large")), subject_pos, SUBJECT_PARTS, rotation, True)
        other = _random_thing(rng, other_pos, background.colors + SUBJECT_COLORS, toy_chance=0.0)
        return Scene((subject, other), background)
    size = rng.choice(("medium", "large", "large"))
    subject = Thing(TOY, "", size, rng.choice(tuple(POSITIONS)), SUBJECT_PARTS, rotation, True)
    return Scene((subject,), background)


# --------------------------------------------------------------------------------------------------------
# Captions


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _describe(thing: Thing, subject: str) -> str:
    if thing.subject:
        return subject if " " in subject else _article(subject)  # "sks toy" stays bare, "toy" gets "a"
    size = "" if thing.size == "medium" else thing.size + " "
    color = thing.color + " " if thing.color else ""  # a toy's colours go unsaid: "toy" is the class noun
    return _article(f"{size}{color}{thing.shape}")


def _describe_background(background: Background) -> str:
    if background.kind == "floor":
        floor, wall = _article(background.color2 + " floor"), _article(background.color + " wall")
        return f"on {floor} in front of {wall}"
    if background.kind == "stripes":
        return f"on {_article(background.color)} and {background.color2} striped background"
    return f"on {_article(background.color)} background"


def caption(scene: Scene, subject: str = "toy", prefix: str = "") -> str:
    """The scene in plain English, e.g. "a small yellow star left of a green square on a white background".

    The subject thing (if any) is called ``subject`` ("sks toy", or "toy" for the class); ``prefix`` goes in
    front (e.g. "a photo of ")."""
    things, bg = scene.things, _describe_background(scene.background)
    if len(things) == 1:
        where = POSITION_PHRASES[things[0].position]
        thing = _describe(things[0], subject)
        text = f"{thing} {where}, {bg}" if where else f"{thing} {bg}"
    else:
        relation = PAIRS[(things[0].position, things[1].position)]
        text = f"{_describe(things[0], subject)} {relation} {_describe(things[1], subject)} {bg}"
    return prefix + text


# --------------------------------------------------------------------------------------------------------
# Rendering

SUPERSAMPLE = 4  # draw at 4x and downscale with Lanczos: anti-aliased edges without an AA rasteriser


def _star_points(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, y0 + (y1 - y0) * 0.53, (x1 - x0) / 2
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float]) -> None:
    """Fill ``shape`` inside ``box`` (pixels) with 255 on a mask; a ring's hole is cleared back to 0."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle((x0 + 0.06 * w, y0 + 0.06 * h, x1 - 0.06 * w, y1 - 0.06 * h), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0 + 0.04 * h), (x1, y0 + 0.9 * h), (x0, y0 + 0.9 * h)], fill=255)
    elif shape == "star":
        draw.polygon(_star_points(box), fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((x0 + 0.24 * w, y0 + 0.24 * h, x1 - 0.24 * w, y1 - 0.24 * h), fill=0)
    elif shape == "cross":
        draw.rectangle((x0 + 0.33 * w, y0, x1 - 0.33 * w, y1), fill=255)
        draw.rectangle((x0, y0 + 0.33 * h, x1, y1 - 0.33 * h), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def _paint_background(canvas: Image.Image, background: Background) -> None:
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, w, h), fill=PALETTE[background.color])
    if background.kind == "floor":
        draw.rectangle((0, round(FLOOR_FROM * h), w, h), fill=PALETTE[background.color2])
    elif background.kind == "stripes":
        for i in range(1, STRIPES, 2):
            stripe = (round(i * w / STRIPES), 0, round((i + 1) * w / STRIPES) - 1, h)
            draw.rectangle(stripe, fill=PALETTE[background.color2])


def _paint_thing(canvas: Image.Image, thing: Thing) -> None:
    """Draw each part as a mask on a square tile around the thing, turn the tile, paste its colour."""
    big = canvas.width
    side = SIZES[thing.size] * big
    tile = math.ceil(side * 1.5)  # room for the corners of a turned thing
    margin = (tile - side) / 2
    cx, cy = (f * big for f in POSITIONS[thing.position])
    left, top = round(cx - tile / 2), round(cy - tile / 2)
    parts = thing.parts or (Part(thing.shape, thing.color, (0.0, 0.0, 1.0, 1.0)),)
    for part in parts:
        mask = Image.new("L", (tile, tile), 0)
        x0, y0, x1, y1 = part.box
        _draw_shape(ImageDraw.Draw(mask), part.shape,
                    (margin + x0 * side, margin + y0 * side, margin + x1 * side, margin + y1 * side))
        if thing.rotation:
            mask = mask.rotate(thing.rotation, resample=Image.Resampling.BICUBIC)
        canvas.paste(PALETTE[part.color], (left, top, left + tile, top + tile), mask)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (32 or 64 in the micro model; any size works)."""
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE))
    _paint_background(canvas, scene.background)
    for thing in scene.things:
        _paint_thing(canvas, thing)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def dataset(n: int, seed: int = 0, size: int = 64) -> Iterator[tuple[Image.Image, str, Scene]]:
    """``n`` random (image, caption, scene) triples of the pretraining world; the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield render(scene, size), caption(scene), scene


def subject_mask(scene: Scene, size: int = 64) -> Image.Image:
    """The subject's pixels in ``scene`` as an L image (255 = subject, 0 = background and other things), drawn
    exactly where ``render`` draws it: the masked-loss mask of a subject photo."""
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE))
    for thing in scene.things:
        if thing.subject:
            _paint_thing(canvas, replace(thing, parts=tuple(replace(p, color="white") for p in thing.parts)))
    return canvas.resize((size, size), Image.Resampling.LANCZOS).convert("L")


def write_subject_photos(directory: str | Path, n: int = 8, seed: int = 0, size: int = 64,
                         identifier: str = "sks", class_noun: str = "toy", masks: bool = False) -> Path:
    """Write ``n`` photos of the subject as an imagefolder dataset: ``subject_00.png``, ... and a
    ``metadata.jsonl`` with captions like "a photo of sks toy on a blue background", each caption also in a
    ``.txt`` beside its image (kohya's convention; ``sdtune prep --caption-from txt`` reads them). With
    ``masks``, also ``subject_00.mask.png``, ... (``subject_mask``: for ``data.masked_loss``). Returns the folder.

    The same arguments give byte-identical files (PIL writes no timestamp into PNGs)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = subject_scene(rng)
        name = f"subject_{i:02d}.png"
        render(scene, size).save(folder / name, format="PNG")
        if masks:
            subject_mask(scene, size).save(folder / f"subject_{i:02d}.mask.png", format="PNG")
        text = caption(scene, f"{identifier} {class_noun}", "a photo of ")
        (folder / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        rows.append({"file_name": name, "text": text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------------
# Reading scenes back from pixels

_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float32)  # (colours, 3)
BACKGROUND_SHARE = 0.15  # a colour covering this much of the border is part of the background
MIN_OBJECT_SHARE = 0.001  # a colour needs this much of the image (in "core" pixels) to count as a thing
TEMPLATE_SIDE = 96


def _labels(image: Image.Image) -> np.ndarray:
    """(H, W) index of the nearest palette colour of every pixel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE_ARRAY) ** 2).sum(-1)
    return distances.argmin(-1)


@cache
def _template(shape: str) -> np.ndarray:
    """The shape's mask cropped to its own bounding box (bool, about TEMPLATE_SIDE px), to compare against."""
    mask = Image.new("L", (TEMPLATE_SIDE, TEMPLATE_SIDE), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, (0, 0, TEMPLATE_SIDE - 1, TEMPLATE_SIDE - 1))
    array = np.asarray(mask) > 127
    ys, xs = np.nonzero(array)
    return array[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The world shape that best matches a boolean mask, and its IoU: each shape's template is stretched
    over the mask's bounding box, and a template whose aspect ratio differs from the box's is penalised."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "", 0.0
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    best, best_score = "", -1.0
    for shape in SHAPES:
        template = _template(shape)
        stretched = Image.fromarray(template.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
        t = np.asarray(stretched) > 127
        iou = (t & crop).sum() / max(1, (t | crop).sum())
        aspect = math.log((w / h) / (template.shape[1] / template.shape[0]))
        score = iou - 0.5 * abs(aspect)  # why: stretching a circle into a wide box would fit an ellipse too
        if score > best_score:
            best, best_score = shape, float(score)
    return best, best_score


def detect(image: Image.Image) -> dict:
    """What the image shows, in the world's terms, read from pixels.

    Returns ``background`` (the commonest palette colour on the border), ``background_colors`` (every colour
    covering at least 15% of the border, commonest first), ``objects`` (per foreground colour, largest
    first: ``color``, ``shape``, ``fit`` (template match, about 1 when exact), ``pixels``, ``bbox`` (x0, y0,
    x1, y1)) and, for the largest object, ``color`` and ``shape`` ("" when nothing stands out)."""
    labels = _labels(image)
    h, w = labels.shape
    band = max(1, h // 32)
    border = np.concatenate([labels[:band].ravel(), labels[-band:].ravel(), labels[:, :band].ravel(),
                             labels[:, -band:].ravel()])
    shares = np.bincount(border, minlength=len(COLORS)) / len(border)
    by_share = np.argsort(-shares, kind="stable")
    background_ids = [int(i) for i in by_share if shares[i] >= BACKGROUND_SHARE] or [int(by_share[0])]
    # "Core" pixels agree with their four neighbours: that drops the 1-px blends along anti-aliased edges,
    # which the nearest-colour rule would otherwise read as a third colour (red on yellow -> orange rim).
    padded = np.pad(labels, 1, mode="edge")
    core = ((padded[1:-1, 1:-1] == padded[:-2, 1:-1]) & (padded[1:-1, 1:-1] == padded[2:, 1:-1])
            & (padded[1:-1, 1:-1] == padded[1:-1, :-2]) & (padded[1:-1, 1:-1] == padded[1:-1, 2:]))
    core_counts = np.bincount(labels[core].ravel(), minlength=len(COLORS))
    counts = np.bincount(labels.ravel(), minlength=len(COLORS))
    by_size = np.argsort(-counts, kind="stable")
    candidates = [int(i) for i in by_size if int(i) not in background_ids and counts[i]]
    objects = []
    for rank, i in enumerate(candidates):
        # The commonest foreground colour is always a thing: a thin ring at 32 px may have no core pixels.
        if rank > 0 and core_counts[i] < max(2, MIN_OBJECT_SHARE * h * w):
            continue
        mask = labels == i
        ys, xs = np.nonzero(mask)
        shape, fit = classify_shape(mask)
        objects.append({"color": COLORS[i], "shape": shape, "fit": round(fit, 3), "pixels": int(mask.sum()),
                        "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)})
    return {
        "background": COLORS[background_ids[0]],
        "background_colors": [COLORS[i] for i in background_ids],
        "objects": objects,
        "color": objects[0]["color"] if objects else "",
        "shape": objects[0]["shape"] if objects else "",
    }


def score(image: Image.Image, scene: Scene) -> dict[str, bool]:
    """Does the image show ``scene``? ``background``: every background colour is on the border;
    ``color``: every thing's colours stand out as objects; ``shape``: every plain thing's colour region has
    its shape (a toy counts as right when all its colours are there)."""
    found = detect(image)
    by_color = {o["color"]: o for o in found["objects"]}
    background_ok = set(scene.background.colors) <= set(found["background_colors"])
    color_ok = all(c in by_color for thing in scene.things for c in thing.colors)
    shape_ok = all(
        all(c in by_color for c in thing.colors) if thing.parts
        else thing.color in by_color and by_color[thing.color]["shape"] == thing.shape
        for thing in scene.things
    )
    return {"background": background_ok, "color": color_ok, "shape": shape_ok}
