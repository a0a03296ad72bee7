"""Measures of learning in the micro world, read from pixels with the world's detector.

- ``prompt_following``: the base model draws held-out scenes of the world; the share whose background,
  colours and shapes the detector reads back as asked.
- ``subject_similarity``: how much an image shows the subject toy (purple square body under an orange
  triangle hat, white eyes), 0..1, a template check of colours and layout.
- ``context_ok``: whether the parts of a subject prompt that are *not* the subject (background, a companion
  thing) came out as asked: the LoRA must not paint the training photos' backgrounds.
- ``toy_share`` / ``color_diversity``: whether class-prompt images ("a photo of a toy") still show varied
  toys; ``subject_similarity`` of those images is the prior-preservation drift (lower is better).

``evaluate_run`` draws subject prompts and the class prompt for every checkpoint at each LoRA scale
(with ``sdtune eval``'s renderer, so images are cached and replayable) and scores them; ``recommend`` picks
the checkpoint with the best subject fidelity among those not yet over-trained: context accuracy near the
best and class drift near the lowest.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

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
# A DreamBooth run, checkpoint by checkpoint


@dataclass
class WorldRow:
    """Scores of one checkpoint at one LoRA scale."""

    checkpoint: str
    step: int | None
    lora_scale: float
    subject: float  # mean subject_similarity of subject-prompt images (higher: the subject is learned)
    context: float  # share of subject-prompt images whose background / companion is as asked
    class_subject: float  # mean subject_similarity of class-prompt images (lower: the class kept its prior)
    class_toy: float  # share of class-prompt images that still show a toy
    class_diversity: float  # colour diversity of the class-prompt images
    images: int = 0
    per_prompt: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.checkpoint} x{self.lora_scale:g}"


def recommend(rows: list[WorldRow], tolerance: float = CONTEXT_TOLERANCE,
              drift_tolerance: float = DRIFT_TOLERANCE) -> WorldRow | None:
    """Among rows with LoRA scale > 0 whose context accuracy is within ``tolerance`` of the best and whose
    class drift is within ``drift_tolerance`` of the lowest (the signs of over-training): the highest subject
    fidelity; ties go to the earlier step and the lower class drift."""
    candidates = [r for r in rows if r.lora_scale > 0]
    if not candidates:
        return None
    best_context = max(r.context for r in candidates)
    least_drift = min(r.class_subject for r in candidates)
    near = [r for r in candidates if r.context >= best_context - tolerance - 1e-12
            and r.class_subject <= least_drift + drift_tolerance + 1e-12]
    return max(near, key=lambda r: (round(r.subject, 3), -(r.step or 0), -r.class_subject))


def score_rows(spec, folders: dict[str, Path], scenes: dict[str, world.Scene]) -> list[WorldRow]:
    """One WorldRow per (checkpoint, scale) from the images ``sdtune.eval.render`` wrote."""
    from sdtune.eval import _read_cells, eval_cells

    rows = []
    for label, _ in spec.loras:
        cells = eval_cells(spec, label)
        for scale in spec.lora_scales:
            by_prompt, _ = _read_cells(folders[label], cells,
                                       lambda c, s=scale: c.lora_scale == s and c.prompt in scenes)
            by_class, _ = _read_cells(folders[label], cells,
                                      lambda c, s=scale: c.lora_scale == s and c.prompt == spec.class_prompt)
            subject, context, per_prompt = [], [], []
            for prompt, images in by_prompt.items():
                found = [world.detect(im) for im in images]  # each image read once for both measures
                sims = [subject_score(f) for f in found]
                oks = [context_ok(im, scenes[prompt], f) for im, f in zip(images, found)]
                subject += sims
                context += oks
                per_prompt.append({"prompt": prompt, "subject": round(sum(sims) / len(sims), 3),
                                   "context": round(sum(oks) / len(oks), 3)})
            klass = by_class.get(spec.class_prompt, [])
            klass_found = [world.detect(im) for im in klass]
            mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else 0.0  # noqa: E731
            rows.append(WorldRow(
                label, spec.steps.get(label), scale, subject=mean(subject), context=mean([float(x) for x in context]),
                class_subject=mean([subject_score(f) for f in klass_found]),
                class_toy=mean([float(is_toy(im, f)) for im, f in zip(klass, klass_found)]),
                class_diversity=round(color_diversity(klass, klass_found), 3), images=len(subject) + len(klass),
                per_prompt=per_prompt,
            ))
    return rows


COLUMNS = (("subject", "subject ↑"), ("context", "context ↑"), ("class_subject", "class drift ↓"),
           ("class_toy", "class toy ↑"), ("class_diversity", "class div ↑"))


def table(rows: list[WorldRow], best: WorldRow | None) -> str:
    head = ["", "checkpoint", "step", "LoRA", *[c[1] for c in COLUMNS], "images"]
    body = [["*" if r is best else "", r.checkpoint, "-" if r.step is None else str(r.step), f"{r.lora_scale:g}",
             *[f"{getattr(r, k):.3f}" for k, _ in COLUMNS], str(r.images)] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(fmt([w * "-" for w in widths]))
    return "\n".join([fmt(head), rule, *map(fmt, body)])


RULE = (f"the highest subject score among rows with LoRA scale > 0 whose context accuracy is within "
        f"{CONTEXT_TOLERANCE:g} of the best and whose class drift is within {DRIFT_TOLERANCE:g} of the lowest "
        "(ties: earlier step, lower class drift)")


def write_report(out: Path, spec, rows: list[WorldRow], best: WorldRow | None) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out``."""
    from sdtune import __version__

    data = {
        "sdtune_version": __version__, "run": spec.run, "model": spec.model, "metrics": "world",
        "identifier": spec.identifier, "class_noun": spec.class_noun, "prompts": spec.prompts,
        "class_prompt": spec.class_prompt, "images_per_prompt": spec.images_per_prompt,
        "lora_scales": spec.lora_scales, "guidance_scale": spec.guidance, "settings": asdict(spec.settings),
        "rows": [asdict(r) for r in rows],
        "recommendation": None if best is None else {"checkpoint": best.checkpoint, "step": best.step,
                                                     "lora_scale": best.lora_scale, "rule": RULE},
        "measures": {k: v for k, v in zip((c[0] for c in COLUMNS), (
            "mean subject_similarity (0..1) of subject-prompt images",
            "share of subject-prompt images whose background and companion thing are as asked",
            "mean subject_similarity of class-prompt images: drift of the class towards the subject",
            "share of class-prompt images that show a toy (2+ parts stacked)",
            "mean pairwise Jaccard distance of the class images' foreground colour sets"))},
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# sdtune eval (micro world): {spec.run}", "",
             f"- model `{spec.model}`; identifier `{spec.identifier}`, class prompt \"{spec.class_prompt}\"",
             f"- {len(spec.prompts)} subject prompts x {spec.images_per_prompt} images; LoRA scales "
             f"{', '.join(f'{x:g}' for x in spec.lora_scales)}; {spec.settings.steps} steps, guidance {spec.guidance:g}",
             "", "```", table(rows, best), "```", ""]
    if best is not None:
        lines += [f"**Recommended: `{best.checkpoint}` at LoRA scale {best.lora_scale:g}.** Rule: {RULE}.", ""]
    lines += ["![measures against training step](metrics.png)", "",
              "Measures (read from pixels by `sdtune.micro.world.detect`):", ""]
    lines += [f"- {label}: {data['measures'][key]}" for key, label in COLUMNS]
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def evaluate_run(spec, out: str | Path, scenes: dict[str, world.Scene], progress: bool = True):
    """Render (or reuse) and score every checkpoint; write the report. Returns (rows, best, failures)."""
    from sdtune.eval import render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders, failures = render(spec, out, progress=progress)
    rows = score_rows(spec, folders, scenes)
    best = recommend(rows)
    write_report(out, spec, rows, best)
    plot_curves(rows, out / "metrics.png", best)
    return rows, best, failures


def plot_curves(rows: list[WorldRow], path: Path, best: WorldRow | None) -> Path:
    """Each measure against training step, one line per LoRA scale: over-training shows as context and class
    toy share falling while subject fidelity saturates."""
    from sdtune.eval import plot_metrics

    metrics = [(key, label.rstrip(" ↑↓"), not label.endswith("↓")) for key, label in COLUMNS]
    return plot_metrics(rows, path, best, metrics=metrics, references={})
