"""Measures of learning in the micro world, read from pixels with the world's detector.

- ``prompt_following``: the base model draws held-out scenes of the world; the share whose background,
  colours and shapes the detector reads back as asked.
- ``subject_similarity``: how much an image shows the subject toy (purple square body under an orange
  triangle hat, white eyes), 0..1, a template check of colours and layout.
- ``context_ok``: whether the parts of a subject prompt that are *not* the subject (background, a companion
  thing) came out as asked: the LoRA must not paint the training photos' backgrounds.
- ``toy_share`` / ``color_diversity``: whether class-prompt images ("a photo of a toy") still show varied
  toys; ``subject_similarity`` of those images is the prior-preservation drift (lower is better).

``WorldScorer`` plugs these into ``sdtune eval --metrics world`` (``sdtune.eval``): subject prompts and the
class prompt are drawn for every checkpoint at each LoRA scale by the evaluation core (cached and replayable)
and scored here; ``recommend`` picks the checkpoint with the best subject fidelity among those not yet
over-trained: context accuracy near the best and class drift near the lowest.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.eval.core import EvalSpec, Metric, Rendered, Row
from sdtune.eval.prompts import fill
from sdtune.micro import world

EVAL_SEED = 1_000  # held-out contexts: the training photos use seed 0
CONTEXT_TOLERANCE = 0.1
DRIFT_TOLERANCE = 0.25


# --------------------------------------------------------------------------------------------------------
# Per-image measures


def subject_similarity(image: Image.Image) -> float:
    """0..1: a quarter each for a purple region, an orange region above it (the hat), white inside the
    purple region's box (the eyes), and the purple region being the largest foreground thing."""
    return subject_score(world.detect(image))


def subject_score(found: dict) -> float:
    """``subject_similarity`` from a ``world.detect`` result (scoring reads each image once)."""
    by_color = {o["color"]: o for o in found["objects"]}
    score = 0.0
    purple, orange, white = by_color.get("purple"), by_color.get("orange"), by_color.get("white")
    if purple:
        score += 0.25
        if found["objects"][0]["color"] in ("purple", "orange"):
            score += 0.25
    if purple and orange:
        px0, py0, px1, py1 = purple["bbox"]
        ox0, oy0, ox1, oy1 = orange["bbox"]
        above = (oy0 + oy1) / 2 < (py0 + py1) / 2
        overlap = min(px1, ox1) - max(px0, ox0) > 0
        score += 0.25 * (above and overlap)
    if purple and white:
        px0, py0, px1, py1 = purple["bbox"]
        wx0, wy0, wx1, wy1 = white["bbox"]
        score += 0.25 * (wx0 >= px0 - 1 and wx1 <= px1 + 1 and wy0 >= py0 - 1 and wy1 <= py1 + 1)
    return score


def context_ok(image: Image.Image, scene: world.Scene, found: dict | None = None) -> bool:
    """The scene's background colours are on the border, and every non-subject thing's colour is there.
    ``found``: the image's ``world.detect`` result, if already made."""
    found = found or world.detect(image)
    colors = {o["color"] for o in found["objects"]}
    background = set(scene.background.colors) <= set(found["background_colors"])
    others = all(c in colors for t in scene.things if not t.subject for c in t.colors)
    return background and others


def is_toy(image: Image.Image, found: dict | None = None) -> bool:
    """A toy is made of parts: two or more foreground colours, one above the other."""
    objects = (found or world.detect(image))["objects"]
    if len(objects) < 2:
        return False
    (_, a0, _, a1), (_, b0, _, b1) = objects[0]["bbox"], objects[1]["bbox"]
    return abs((a0 + a1) / 2 - (b0 + b1) / 2) > 2  # centres at different heights (px)


def color_diversity(images: list[Image.Image], found: list[dict] | None = None) -> float:
    """Mean pairwise Jaccard distance of the images' foreground colour sets: 0 when all alike."""
    found = found or [world.detect(im) for im in images]
    sets = [frozenset(o["color"] for o in f["objects"]) for f in found]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    if not pairs:
        return 0.0
    # two images with nothing in the foreground are alike (distance 0), not maximally different
    return sum(1 - len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs) / len(pairs)


# --------------------------------------------------------------------------------------------------------
# Prompts


def subject_prompts(n: int, identifier: str = "sks", class_noun: str = "toy",
                    seed: int = EVAL_SEED) -> list[tuple[str, world.Scene]]:
    """``n`` (prompt, scene) pairs: the subject in contexts the training photos (seed 0) did not use."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        scene = world.subject_scene(rng)
        prompt = world.caption(scene, f"{identifier} {class_noun}", "a photo of ")
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, scene))
    return pairs


# --------------------------------------------------------------------------------------------------------
# Base model prompt following


@dataclass
class PromptScores:
    background: float
    color: float
    shape: float
    all: float
    images: int


def generate(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 4.0, batch: int = 32):
    """PIL images for ``prompts``, seeded per batch."""
    import torch

    images = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i: i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g).images
    return images


def prompt_following(pipe, n: int = 64, seed: int = 0, steps: int = 20, guidance: float = 4.0,
                     return_images: bool = False):
    """Draw ``n`` held-out scenes' captions and score them with the detector (shares of 0..1)."""
    rng = random.Random(10_000 + seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = generate(pipe, [world.caption(s) for s in scenes], seed, steps, guidance)
    checks = [world.score(img, s) for img, s in zip(images, scenes)]
    mean = lambda key: round(sum(c[key] for c in checks) / n, 3)  # noqa: E731
    scores = PromptScores(mean("background"), mean("color"), mean("shape"),
                          round(sum(all(c.values()) for c in checks) / n, 3), n)
    return (scores, images, [world.caption(s) for s in scenes]) if return_images else scores


# --------------------------------------------------------------------------------------------------------
# A DreamBooth run, checkpoint by checkpoint: the scorer for ``sdtune eval --metrics world``


METRICS = (
    Metric("subject", "subject", True, "mean subject_similarity (0..1) of subject-prompt images"),
    Metric("context", "context", True,
           "share of subject-prompt images whose background and companion thing are as asked"),
    Metric("class_subject", "class drift", False,
           "mean subject_similarity of class-prompt images: drift of the class towards the subject"),
    Metric("class_toy", "class toy", True, "share of class-prompt images that show a toy (2+ parts stacked)"),
    Metric("class_diversity", "class div", True,
           "mean pairwise Jaccard distance of the class images' foreground colour sets"),
)
RULE = (f"the highest subject score among rows with LoRA scale > 0 whose context accuracy is within "
        f"{CONTEXT_TOLERANCE:g} of the best and whose class drift is within {DRIFT_TOLERANCE:g} of the lowest "
        "(ties: earlier step, lower class drift)")


def recommend(rows: list[Row], tolerance: float = CONTEXT_TOLERANCE,
              drift_tolerance: float = DRIFT_TOLERANCE) -> Row | None:
    """Among rows with LoRA scale > 0 whose context accuracy is within ``tolerance`` of the best and whose
    class drift is within ``drift_tolerance`` of the lowest (the signs of over-training): the highest subject
    fidelity; ties go to the earlier step and the lower class drift."""
    candidates = [r for r in rows if r.lora_scale > 0]
    if not candidates:
        return None
    best_context = max(_value(r, "context") for r in candidates)
    least_drift = min(_value(r, "class_subject") for r in candidates)
    near = [r for r in candidates if _value(r, "context") >= best_context - tolerance - 1e-12
            and _value(r, "class_subject") <= least_drift + drift_tolerance + 1e-12]
    return max(near, key=lambda r: (round(_value(r, "subject"), 3), -(r.step or 0), -_value(r, "class_subject")))


def _value(row: Row, key: str) -> float:
    # The world scorer measures every row (an empty row scores 0), so None only comes from a hand-made row.
    return row.metrics.get(key) or 0.0


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


@dataclass
class WorldScorer:
    """``--metrics world``: a run on the micro model, scored from pixels by the world's detector. Subject
    prompts put the subject in held-out contexts (``subject_prompts``); the class prompt shows the drift."""

    n_prompts: int = 8  # subject-in-a-new-context prompts
    seed: int = EVAL_SEED

    name = "world"
    title = "sdtune eval (micro world)"
    metrics = METRICS
    references = None
    quote = ()
    class_images = True
    subject_photos = False  # the detector knows the subject toy: no photos to compare with
    steps = 20
    guidance = 4.0
    rule = RULE

    def _pairs(self) -> list[tuple[str, world.Scene]]:
        if self.n_prompts < 1:
            raise SdtuneError("--world-prompts: must be at least 1")
        return subject_prompts(self.n_prompts, "{identifier}", "{class}", self.seed)

    def templates(self, class_noun: str) -> tuple[list[str], str]:
        """``n_prompts`` subject prompts in contexts the training photos did not use."""
        return [p for p, _ in self._pairs()], "micro-world"

    def prepare(self, spec: EvalSpec) -> None:
        """Nothing to load: the detector reads pixels."""

    def score(self, spec: EvalSpec, rendered: Iterable[Rendered]) -> list[Row]:
        """One Row per (checkpoint, LoRA scale), each image read by the detector once."""
        scenes = {fill(p, spec.identifier, spec.class_noun): scene for p, scene in self._pairs()}
        return [self._row(spec, scenes, r) for r in rendered]

    def _row(self, spec: EvalSpec, scenes: dict[str, world.Scene], r: Rendered) -> Row:
        subject, context, per_prompt = [], [], []
        for prompt, scene in scenes.items():
            images = r.images.get(prompt)
            if not images:
                continue  # every image of it failed
            found = [world.detect(im) for im in images]  # each image read once for both measures
            sims = [subject_score(f) for f in found]
            oks = [float(context_ok(im, scene, f)) for im, f in zip(images, found)]
            subject += sims
            context += oks
            per_prompt.append({"prompt": prompt, "subject": _mean(sims), "context": _mean(oks)})
        klass = r.images.get(spec.class_prompt, [])
        klass_found = [world.detect(im) for im in klass]
        metrics: dict[str, float | None] = {
            "subject": _mean(subject), "context": _mean(context),
            "class_subject": _mean([subject_score(f) for f in klass_found]),
            "class_toy": _mean([float(is_toy(im, f)) for im, f in zip(klass, klass_found)]),
            "class_diversity": round(color_diversity(klass, klass_found), 3),
        }
        return r.row(metrics, len(subject) + len(klass), per_prompt)

    def recommend(self, rows: list[Row]) -> Row | None:
        """``recommend`` with the default tolerances."""
        return recommend(rows)

    def report_fields(self, spec: EvalSpec) -> dict[str, Any]:
        """How the measures were read."""
        return {"measured_by": "sdtune.micro.world.detect: colours, shapes and backgrounds read from pixels"}

    def report_lines(self, spec: EvalSpec) -> list[str]:
        """Nothing beyond the common header."""
        return []

    def notes(self, spec: EvalSpec) -> list[str]:
        """Where the measures come from."""
        return ["- Measures are read from pixels by `sdtune.micro.world.detect`; subject prompts put the subject "
                "in contexts the training photos did not use."]
