"""``sdtune eval RUN``: the DreamBooth paper's numbers for a trained run, per checkpoint and LoRA scale.

For each checkpoint (``--checkpoints all``) and LoRA scale, ``sdtune sample``'s renderer draws
``--images-per-prompt`` images of every evaluation prompt: the paper's DreamBench prompts (25 for objects, 25
for live subjects) with the run's identifier and class noun filled in, or a prompt file. Every row uses the
same seeds, so rows differ only by the LoRA. The images are scored against the real subject photos
(``data.instance_dir`` or ``--subject-dir``) with ``sdtune.metrics``: DINO and CLIP-I (subject fidelity),
CLIP-T (prompt fidelity, the prompt without the identifier: "a dog in the snow"), DIV (diversity; a DINO
substitute for the paper's LPIPS) and, with ``--pres``, PRES (prior preservation, from as many images of the
bare class prompt).

``--out`` (default ``RUN/eval``) receives ``report.json`` (every number, per prompt too), ``report.md``,
``metrics.png`` (each metric against training step, one line per LoRA scale, the paper's DreamBooth-SD value
dashed) and ``samples/<checkpoint>.png`` grids, each image with its JSON sidecar in
``samples/<checkpoint>_cells/`` (``sdtune sample --replay`` renders it again). Run again with the same
settings, eval reuses the images whose sidecars match, so re-scoring with other metric models samples nothing.

Recommendation: among the rows with LoRA scale > 0, the one with the highest DINO whose CLIP-T is within
``--clip-t-tolerance`` (0.02) of the best CLIP-T. The paper finds DINO differences of ~0.1 and CLIP-T
differences of 0.05 clear to people, so up to 0.02 of prompt fidelity is a fair price for identity.

Images are centre-cropped to a square before each model's own processor: DINO's evaluation transform is a
resize and centre crop, while ``facebook/dino-vits16``'s processor would squash a non-square photo.

Real numbers need the real metric models: ``facebook/dino-vits16`` (DINO ViT-S/16; the CLS token of
transformers' ``ViTModel``) and ``openai/clip-vit-base-patch32`` (CLIP ViT-B/32, as in Textual Inversion's
evaluation code, the CLIP-I the paper cites), from the Hugging Face Hub or local folders (``--dino``,
``--clip``). The tests run this code on tiny random models, whose numbers mean nothing. The paper averages 30
subjects; a single subject's numbers scatter around its means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from sdtune.errors import SdtuneError
from sdtune.metrics import (
    PAPER_PRES,
    PAPER_SOURCE,
    PAPER_TABLE1,
    diversity,
    mean_pairwise_similarity,
    paired_similarity,
)
from sdtune.sample import SCHEDULERS, Cell, Settings

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIP_T_TOLERANCE = 0.02
# Class nouns that get DreamBench's live-subject prompts (accessories, outfits) unless --object says otherwise.
# DreamBench's own live subjects are its dogs and cats; people and other animals wear a hat just as well.
LIVE_NOUNS = {"dog", "cat", "puppy", "kitten", "pet", "person", "man", "woman", "boy", "girl", "baby", "child",
              "bird", "parrot", "horse", "rabbit", "bunny", "hamster", "guinea pig", "fox", "monkey", "bear"}
# Which metrics exist, how they are labelled, and which way is better.
METRICS = (("dino", "DINO", True), ("clip_i", "CLIP-I", True), ("clip_t", "CLIP-T", True),
           ("div", "DIV", True), ("pres", "PRES", False))


# --------------------------------------------------------------------------------------------------------
# Prompts


def dreambench() -> dict[str, Any]:
    """The shipped DreamBench data: ``object`` and ``live`` prompt templates, ``classes``, credit, licence."""
    raw = resources.files("sdtune").joinpath("assets", "dreambench_prompts.json").read_text(encoding="utf-8")
    return json.loads(raw)


def fill(template: str, identifier: str, class_noun: str) -> str:
    """A prompt from a template: ``{}`` stands for "<identifier> <class>", or ``{identifier}`` and ``{class}``."""
    # Plain replacement rather than str.format: a user's prompt may hold other braces.
    text = template.replace("{}", "{identifier} {class}")
    return " ".join(text.replace("{identifier}", identifier).replace("{class}", class_noun).split())


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T compares with: the identifier removed ("a sks dog" -> "a dog"), as Textual Inversion's
    evaluation drops its placeholder; CLIP has never seen the rare word, so it would only add noise."""
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt).split())


def read_prompt_file(path: str | Path) -> list[str]:
    """Templates from a file: one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdtuneError(f"--prompts: cannot read {path} ({type(e).__name__}: {e})") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise SdtuneError(f"--prompts: {path} holds no prompts (one per line; {{}} for '<identifier> <class>')")
    return templates


def class_noun_from(run_cfg: dict) -> str | None:
    """The class noun a run names: from ``prior.class_prompt`` ("a photo of a dog" -> "dog"), else the word after
    the identifier in ``data.instance_prompt``; None if neither says."""
    class_prompt = (run_cfg.get("prior") or {}).get("class_prompt")
    if class_prompt:
        noun = re.sub(r"^(?:(?:a|an|the)\s+)?(?:photo|picture|image|photograph|portrait)\s+of\s+", "",
                      class_prompt.strip(), flags=re.I)
        noun = re.sub(r"^(?:a|an|the|some)\s+", "", noun, flags=re.I).strip(" .")
        if noun:
            return noun
    data = run_cfg.get("data") or {}
    words = (data.get("instance_prompt") or "").split()
    identifier = data.get("identifier")
    if identifier in words and words.index(identifier) + 1 < len(words):
        return words[words.index(identifier) + 1].strip(",.")
    return None


def is_live(class_noun: str) -> bool:
    """Whether DreamBench's live-subject prompts suit this class (dogs, cats, people, ...)."""
    noun = class_noun.lower().strip()
    return noun in LIVE_NOUNS or noun.split()[-1] in LIVE_NOUNS


# --------------------------------------------------------------------------------------------------------
# Subject photos and metric models


def subject_images(folder: str | Path) -> list[Path]:
    """The subject photos in ``folder``: those its metadata.jsonl lists (what training read), else all images."""
    from sdtune.data import list_images

    folder = Path(folder)
    images = list_images(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        listed = set()
        for line in metadata.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                listed.add(str(json.loads(line)["file_name"]))
        images = [p for p in images if p.name in listed]
    return images


def square(image: Image.Image) -> Image.Image:
    """The largest centred square of an image (DINO's evaluation transform crops; it never squashes)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns that torchvision is missing and falls back to its PIL processors, which is fine."""
    import transformers.utils.logging as tlog

    old = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            yield
    finally:
        tlog.set_verbosity(old)


def _load(model_class: Any, model_type: str, name: str, key: str, **kwargs) -> tuple[Any, Any]:
    """(model, image processor) from a hub id or folder, or one clear error naming the flag."""
    from transformers import AutoConfig, AutoImageProcessor

    hint = f"pass {key} PATH (a local folder with the model and its preprocessor_config.json)"

    def failed(e: Exception) -> SdtuneError:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        return SdtuneError(f"{key}: could not load {name} ({type(e).__name__}: {reason}); {hint}")

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(name)
    except Exception as e:  # hub, file and format errors come in many types; all mean "cannot use this"
        raise failed(e) from None
    # A model of another kind would load with random weights in place of the missing ones, silently.
    if config.model_type != model_type:
        raise SdtuneError(f"{key}: {name} is a {config.model_type} model, not {model_type}; {hint}")
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(name, output_loading_info=True, **kwargs)
            processor = AutoImageProcessor.from_pretrained(name)
    except Exception as e:  # as above
        raise failed(e) from None
    if info["missing_keys"]:
        raise SdtuneError(f"{key}: {name} lacks {len(info['missing_keys'])} weights of a {model_class.__name__} "
                          f"(e.g. {info['missing_keys'][0]}); {hint}")
    return model.eval(), processor


class Embedder:
    """DINO and CLIP embeddings of images and texts, each model with its own preprocessing, in fp32."""

    def __init__(self, dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP, batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel, ViTModel

        self.batch_size = batch_size
        self.device = torch.device("cpu")
        # The pooler is a trained head on top of DINO's CLS token; the metric is the CLS token itself.
        self.dino_model, self.dino_processor = _load(ViTModel, "vit", dino, "--dino", add_pooling_layer=False)
        self.clip_model, self.clip_processor = _load(CLIPModel, "clip", clip, "--clip")
        try:
            with _quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(clip)
        except Exception as e:  # as in _load
            raise SdtuneError(f"--clip: could not load the tokenizer of {clip} ({type(e).__name__}); pass --clip "
                              "PATH (a local folder with the model, its tokenizer and preprocessor_config.json)"
                              ) from None

    def to(self, device: str | torch.device) -> Embedder:
        self.device = torch.device(device)
        self.dino_model.to(self.device)
        self.clip_model.to(self.device)
        return self

    def _pixels(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        with _quiet_transformers():
            pixels = processor(images=[square(im.convert("RGB")) for im in images], return_tensors="pt")
        return pixels["pixel_values"].to(self.device)

    def _batched(self, items: list, fn) -> torch.Tensor:
        chunks = [fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return torch.cat([c.float().cpu() for c in chunks])

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``[n, 384]`` for ViT-S/16: the CLS token of the last layer (after its layer norm)."""
        return self._batched(images, lambda b: self.dino_model(
            pixel_values=self._pixels(self.dino_processor, b)).last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``[n, 512]`` for ViT-B/32: the projected image embedding (``get_image_features``)."""
        m = self.clip_model
        # vision_model + visual_projection is get_image_features in transformers 4 and 5 alike (5 returns an
        # output object from get_image_features, 4 a tensor).
        return self._batched(images, lambda b: m.visual_projection(
            m.vision_model(pixel_values=self._pixels(self.clip_processor, b)).pooler_output))

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        """``[n, 512]``: the projected text embedding of each text (truncated to CLIP's 77 tokens)."""
        m = self.clip_model

        def encode(batch: list[str]) -> torch.Tensor:
            tokens = self.tokenizer(batch, padding=True, truncation=True,
                                    max_length=m.config.text_config.max_position_embeddings, return_tensors="pt")
            out = m.text_model(input_ids=tokens["input_ids"].to(self.device),
                               attention_mask=tokens["attention_mask"].to(self.device))
            return m.text_projection(out.pooler_output)

        return self._batched(texts, encode)


# --------------------------------------------------------------------------------------------------------
# What to evaluate, and rendering it


@dataclass
class EvalSpec:
    """One ``sdtune eval``, resolved from the run folder and the flags."""

    run: str  # what RUN named, for the report's title
    model: str
    loras: list[tuple[str, str]]  # (label, LoRA file), in training order
    subject_dir: Path
    identifier: str
    class_noun: str
    prompt_set: str  # 'dreambench-live', 'dreambench-object' or the prompt file
    prompts: list[str]  # what is drawn, identifier and class filled in
    steps: dict[str, int | None] = field(default_factory=dict)  # label -> training step
    images_per_prompt: int = 4
    lora_scales: list[float] = field(default_factory=lambda: [1.0])
    guidance: float = 7.5
    settings: Settings = field(default_factory=Settings)
    pres: bool = False  # also draw the class prompt (same seeds) and measure PRES
    class_prompt: str = ""
    dino: str = DEFAULT_DINO
    clip: str = DEFAULT_CLIP
    clip_t_tolerance: float = CLIP_T_TOLERANCE
    revision: str | None = None
    variant: str | None = None
    dtype: str = "fp32"
    device: str | None = None


def eval_cells(spec: EvalSpec, label: str) -> list[Cell]:
    """The cells of one checkpoint: prompts (+ the class prompt for PRES) x scales x seeds 0..n-1.

    Every prompt gets the same seeds: ``sdtune.sample.layout`` draws a full prompts x seeds grid."""
    prompts = spec.prompts + ([spec.class_prompt] if spec.pres else [])
    cells = [Cell(p, seed, spec.guidance, scale, label) for p in prompts for scale in spec.lora_scales
             for seed in range(spec.images_per_prompt)]
    return list(dict.fromkeys(cells))  # a prompt file may repeat a prompt, or hold the class prompt


def _device(spec: EvalSpec) -> str:
    return spec.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _reusable(cells_dir: Path, cells: list[Cell], spec: EvalSpec, lora_sha: str) -> bool:
    """Whether every cell is already on disk, rendered with the same LoRA, model and settings."""
    models = {spec.model, str(Path(spec.model).resolve())}
    for i, cell in enumerate(cells):
        sidecar = cells_dir / f"cell-{i:04d}.json"
        if not (sidecar.is_file() and sidecar.with_suffix(".png").is_file()):
            return False
        try:
            d = json.loads(sidecar.read_text())
        except ValueError:
            return False
        if (d.get("cell") != asdict(cell) or d.get("settings") != asdict(spec.settings)
                or d.get("lora_sha256") != lora_sha or d.get("model") not in models
                or d.get("dtype") != spec.dtype or d.get("device") != _device(spec)):
            return False
    return True


def render(spec: EvalSpec, out: Path, progress: bool = True) -> tuple[dict[str, Path], list[str]]:
    """Render (or reuse) every checkpoint's cells under ``out/samples``. Returns ({label: cells folder},
    one line per failed cell)."""
    from sdtune.checkpoint import sha256_file
    from sdtune.sample import Request, run_sample

    folders: dict[str, Path] = {}
    failures: list[str] = []
    for n, (label, lora_file) in enumerate(spec.loras, 1):
        cells = eval_cells(spec, label)
        grid = out / "samples" / f"{label}.png"
        cells_dir = grid.with_name(grid.stem + "_cells")
        folders[label] = cells_dir
        if _reusable(cells_dir, cells, spec, sha256_file(lora_file)):
            print(f"{label} ({n}/{len(spec.loras)}): reusing {len(cells)} images in {cells_dir}")
            continue
        # Old cells of another prompt list would be read as this one's.
        for old in cells_dir.glob("cell-*"):
            old.unlink()
        print(f"{label} ({n}/{len(spec.loras)}): rendering {len(cells)} images")
        req = Request(model=spec.model, lora=[(label, lora_file)], cells=cells, settings=spec.settings,
                      revision=spec.revision, variant=spec.variant, dtype=spec.dtype, device=spec.device)
        # One call per checkpoint keeps each grid picture a manageable size (run_sample always draws one).
        _, failed = run_sample(req, grid, progress=progress)
        failures += [f"{label}: {line}" for line in failed]
    return folders, failures


# --------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Row:
    """The metrics of one checkpoint at one LoRA scale. None: not measured (no images, or no pairs for DIV)."""

    checkpoint: str
    step: int | None
    lora_scale: float
    dino: float | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    div: float | None = None
    pres: float | None = None
    images: int = 0
    failed: int = 0
    per_prompt: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.checkpoint} x{self.lora_scale:g}"


def _read_cells(cells_dir: Path, cells: list[Cell], keep) -> tuple[dict[str, list[Image.Image]], int]:
    """({prompt: images}, failed count) for the cells ``keep`` selects; a missing PNG is a failed cell."""
    images: dict[str, list[Image.Image]] = {}
    failed = 0
    for i, cell in enumerate(cells):
        if not keep(cell):
            continue
        path = cells_dir / f"cell-{i:04d}.png"
        if path.is_file():
            with Image.open(path) as im:
                images.setdefault(cell.prompt, []).append(im.convert("RGB"))
        else:
            failed += 1
    return images, failed


def score(spec: EvalSpec, folders: dict[str, Path], embedder: Embedder, real: list[Image.Image]) -> list[Row]:
    """One Row per (checkpoint, LoRA scale), in training order."""
    real_dino, real_clip = embedder.dino_images(real), embedder.clip_images(real)
    clip_texts = {p: strip_identifier(p, spec.identifier) for p in spec.prompts}
    unique = list(dict.fromkeys(clip_texts.values()))
    text_embedding = dict(zip(unique, embedder.clip_texts(unique)))
    rows = []
    for label, _ in spec.loras:
        cells = eval_cells(spec, label)
        for scale in spec.lora_scales:
            row = Row(label, spec.steps.get(label), scale)
            by_prompt, row.failed = _read_cells(folders[label], cells,
                                                lambda cell, s=scale: cell.lora_scale == s and cell.prompt in clip_texts)
            dinos, clips, texts = [], [], []
            for prompt in spec.prompts:
                if prompt not in by_prompt:
                    continue  # every image of it failed
                dino, clip = embedder.dino_images(by_prompt[prompt]), embedder.clip_images(by_prompt[prompt])
                text = text_embedding[clip_texts[prompt]].expand_as(clip)
                dinos.append(dino)
                clips.append(clip)
                texts.append(text)
                row.per_prompt.append({
                    "prompt": prompt, "clip_text": clip_texts[prompt], "images": len(dino),
                    "dino": mean_pairwise_similarity(dino, real_dino),
                    "clip_i": mean_pairwise_similarity(clip, real_clip), "clip_t": paired_similarity(clip, text),
                })
            if dinos:
                row.images = sum(len(d) for d in dinos)
                row.dino = mean_pairwise_similarity(torch.cat(dinos), real_dino)
                row.clip_i = mean_pairwise_similarity(torch.cat(clips), real_clip)
                row.clip_t = paired_similarity(torch.cat(clips), torch.cat(texts))
                row.div = diversity(dinos)
            if spec.pres:
                by_class, failed = _read_cells(
                    folders[label], cells, lambda cell, s=scale: cell.lora_scale == s and cell.prompt == spec.class_prompt)
                row.failed += failed
                if by_class:
                    row.pres = mean_pairwise_similarity(embedder.dino_images(by_class[spec.class_prompt]), real_dino)
            rows.append(row)
    return rows


def recommend(rows: list[Row], tolerance: float = CLIP_T_TOLERANCE) -> Row | None:
    """The highest DINO among rows with LoRA scale > 0 whose CLIP-T is within ``tolerance`` of the best CLIP-T
    of those rows (ties: the earlier step, then the lower scale). None if no such row was measured."""
    candidates = [r for r in rows if r.lora_scale > 0 and r.dino is not None and r.clip_t is not None]
    if not candidates:
        return None
    best = max(r.clip_t for r in candidates)  # type: ignore[type-var]
    near = [r for r in candidates if r.clip_t >= best - tolerance - 1e-12]  # type: ignore[operator]
    return max(near, key=lambda r: (r.dino, -(r.step or 0), -r.lora_scale))


# --------------------------------------------------------------------------------------------------------
# Report: terminal table, report.json, report.md, metrics.png


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _present(rows: list[Row]) -> list[tuple[str, str, bool]]:
    """DINO, CLIP-I and CLIP-T, then DIV and PRES where measured (DIV needs 2+ images per prompt; PRES --pres)."""
    return [m for m in METRICS if m[0] in ("dino", "clip_i", "clip_t") or any(getattr(r, m[0]) is not None
                                                                               for r in rows)]


def table(rows: list[Row], best: Row | None = None) -> str:
    """The terminal table: one line per row (* = recommended), then the paper's Table 1 for reference."""
    metrics = _present(rows)
    head = ["", "checkpoint", "step", "LoRA", *[m[1] for m in metrics], "images"]
    body = [["*" if r is best else "", r.checkpoint, "-" if r.step is None else str(r.step), f"{r.lora_scale:g}",
             *[_fmt(getattr(r, m[0])) for m in metrics], str(r.images) + (f" ({r.failed} failed)" if r.failed else "")]
            for r in rows]
    # "SD" keeps the table within 100 columns; report.md spells the names out.
    paper = [["", f"paper: {name.replace('Stable Diffusion', 'SD')}", "", "", *[_fmt(v) for v in (dino, clip_i, clip_t)],
              *["" for _ in metrics[3:]], ""] for name, dino, clip_i, clip_t in PAPER_TABLE1]
    widths = [max(len(line[i]) for line in [head, *body, *paper]) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(fmt([w * "-" for w in widths]))
    note = f"{PAPER_SOURCE}: 30 subjects x 25 prompts x 4 images, for reference"
    return "\n".join([fmt(head), rule, *map(fmt, body), rule, *map(fmt, paper), note])


def _rule_text(tolerance: float) -> str:
    return (f"the highest DINO among rows with LoRA scale > 0 whose CLIP-T is within {tolerance:g} of the best "
            "CLIP-T (ties: earlier step, lower scale)")


def write_json(path: Path, spec: EvalSpec, rows: list[Row], best: Row | None, n_real: int) -> Path:
    from sdtune import __version__

    report = {
        "sdtune_version": __version__,
        "run": spec.run,
        "model": spec.model,
        "loras": [{"checkpoint": label, "file": str(Path(f).resolve()), "step": spec.steps.get(label)}
                  for label, f in spec.loras],
        "subject_dir": str(Path(spec.subject_dir).resolve()),
        "subject_images": n_real,
        "identifier": spec.identifier,
        "class_noun": spec.class_noun,
        "prompt_set": spec.prompt_set,
        "prompts": spec.prompts,
        "clip_t_prompts": [strip_identifier(p, spec.identifier) for p in spec.prompts],
        "images_per_prompt": spec.images_per_prompt,
        "lora_scales": spec.lora_scales,
        "guidance_scale": spec.guidance,
        "settings": asdict(spec.settings),
        "class_prompt": spec.class_prompt if spec.pres else None,
        "metric_models": {"dino": spec.dino, "clip": spec.clip},
        "div_method": "1 - mean pairwise cosine similarity of DINO embeddings within each prompt "
                      "(substitute for the paper's LPIPS)",
        "rows": [asdict(r) for r in rows],
        "recommendation": None if best is None else {
            "checkpoint": best.checkpoint, "step": best.step, "lora_scale": best.lora_scale,
            "dino": best.dino, "clip_t": best.clip_t, "rule": _rule_text(spec.clip_t_tolerance)},
        "paper": {"source": PAPER_SOURCE, "table1": [dict(zip(("method", "dino", "clip_i", "clip_t"), r))
                                                     for r in PAPER_TABLE1],
                  "pres_imagen_table3": PAPER_PRES},
        "note": "Real numbers need the real metric models (facebook/dino-vits16, openai/clip-vit-base-patch32).",
    }
    path.write_text(json.dumps(report, indent=2))
    return path


def write_markdown(path: Path, spec: EvalSpec, rows: list[Row], best: Row | None, n_real: int) -> Path:
    metrics = _present(rows)
    arrow = {True: "↑", False: "↓"}
    s = spec.settings
    lines = [
        f"# sdtune eval: {spec.run}",
        "",
        f"- subject: {n_real} photos in `{spec.subject_dir}`; identifier `{spec.identifier}`, class `{spec.class_noun}`",
        f"- prompts: {spec.prompt_set} ({len(spec.prompts)}) x {spec.images_per_prompt} images, seeds "
        f"0-{spec.images_per_prompt - 1}; LoRA scales {', '.join(f'{x:g}' for x in spec.lora_scales)}",
        f"- sampling: `{spec.model}`, {s.steps} steps {s.scheduler}, guidance {spec.guidance:g}, {s.width}x{s.height}",
        f"- metric models: DINO `{spec.dino}`, CLIP `{spec.clip}`",
        "",
        "| checkpoint | step | LoRA scale | " + " | ".join(f"{m[1]} {arrow[m[2]]}" for m in metrics) + " | images |",
        "|---|---:|---:|" + "---:|" * len(metrics) + "---:|",
    ]
    for r in rows:
        name = f"**{r.checkpoint}**" if r is best else r.checkpoint
        lines.append(f"| {name} | {'-' if r.step is None else r.step} | {r.lora_scale:g} | "
                     + " | ".join(_fmt(getattr(r, m[0])) for m in metrics) + f" | {r.images} |")
    for name, dino, clip_i, clip_t in PAPER_TABLE1:
        extra = " |" * (len(metrics) - 3)
        lines.append(f"| *paper: {name}* | | | {_fmt(dino)} | {_fmt(clip_i)} | {_fmt(clip_t)} |{extra} |")
    lines += ["", f"Paper rows: {PAPER_SOURCE}, 30 subjects x 25 prompts x 4 images.", ""]
    if best is not None:
        lines += [f"**Recommended: `{best.checkpoint}` at LoRA scale {best.lora_scale:g}** "
                  f"(DINO {_fmt(best.dino)}, CLIP-T {_fmt(best.clip_t)}). Rule: {_rule_text(spec.clip_t_tolerance)}.",
                  ""]
    lines += ["![metrics against training step](metrics.png)", ""]
    if best is not None and best.per_prompt:
        lines += [f"## Per prompt ({best.name})", "", "| prompt | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|"]
        lines += [f"| {p['prompt']} | {_fmt(p['dino'])} | {_fmt(p['clip_i'])} | {_fmt(p['clip_t'])} |"
                  for p in best.per_prompt]
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- DINO / CLIP-I: mean cosine similarity over all (generated, real) pairs of DINO ViT-S/16 CLS / CLIP image "
        "embeddings. CLIP-T: each image against its prompt with the identifier removed "
        f"(\"{strip_identifier(spec.prompts[0], spec.identifier)}\").",
        "- DIV is not the paper's LPIPS (no LPIPS weights offline): 1 - the mean pairwise DINO similarity of the "
        "images of one prompt; 0 means identical images. Compare DIV between rows, not with the paper.",
        f"- PRES: DINO between images of \"{spec.class_prompt}\" and the subject photos; lower means the class "
        f"prior survived (paper, Imagen: {PAPER_PRES['with prior preservation']} with prior preservation, "
        f"{PAPER_PRES['without']} without)." if spec.pres else
        "- PRES was not measured (`--pres` also draws the class prompt for every row).",
        "- Real numbers need the real metric models; a single subject scatters around the paper's 30-subject means.",
        "- Images: `samples/<checkpoint>.png`, each cell with its sidecar in `samples/<checkpoint>_cells/`.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


# Plot colours, one per LoRA scale (matplotlib's first six, so the picture looks familiar).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PAPER_DREAMBOOTH_SD = dict(zip(("dino", "clip_i", "clip_t"), PAPER_TABLE1[1][1:]))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour, dash: int = 6) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=1)
        x += 2 * dash


def plot_metrics(rows: list, path: str | Path, best: Any = None,
                 metrics: list[tuple[str, str, bool]] | None = None,
                 references: dict[str, float] | None = None,
                 reference_label: str = "paper: DreamBooth (Stable Diffusion)") -> Path:
    """One panel per metric against training step (rows' order when steps are unknown), one line per LoRA scale;
    a reference value per metric dashed in grey (default: the paper's DreamBooth-SD row); the recommended point
    ringed. ``rows`` need ``checkpoint``, ``step``, ``lora_scale`` and the metrics' attributes."""
    path = Path(path)
    metrics = metrics if metrics is not None else _present(rows)
    references = PAPER_DREAMBOOTH_SD if references is None else references
    scales = list(dict.fromkeys(r.lora_scale for r in rows))
    labels = list(dict.fromkeys(r.checkpoint for r in rows))
    steps = {r.checkpoint: r.step for r in rows}
    use_steps = all(s is not None for s in steps.values())
    xs = {c: float(steps[c]) if use_steps else float(i) for i, c in enumerate(labels)}  # type: ignore[arg-type]

    pw, ph, left, right, top, bottom = 380, 280, 64, 16, 34, 46
    legend_h, columns = 28, min(3, len(metrics))
    panel_rows = -(-len(metrics) // columns)
    image = Image.new("RGB", (columns * pw, panel_rows * ph + legend_h), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    x_lo, x_hi = min(xs.values()), max(xs.values())
    x_pad = (x_hi - x_lo) * 0.06 or 1.0  # keep the first and last points off the frame
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad

    for k, (key, title, higher) in enumerate(metrics):
        ox, oy = (k % columns) * pw, (k // columns) * ph
        ax0, ax1, ay0, ay1 = ox + left, ox + pw - right, oy + top, oy + ph - bottom
        ref = references.get(key)
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None] + ([] if ref is None else [ref])
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = max((hi - lo) * 0.1, 0.01)
        lo, hi = lo - pad, hi + pad

        def px(x: float, y: float, ax0=ax0, ax1=ax1, ay0=ay0, ay1=ay1, lo=lo, hi=hi) -> tuple[float, float]:
            return (ax0 + (x - x_lo) / (x_hi - x_lo) * (ax1 - ax0), ay1 - (y - lo) / (hi - lo) * (ay1 - ay0))

        draw.text((ax0, oy + 8), f"{title} ({'higher' if higher else 'lower'} is better)", fill="black", font=font)
        draw.rectangle([ax0, ay0, ax1, ay1], outline=(120, 120, 120))
        for i in range(5):  # y ticks
            y = lo + (hi - lo) * i / 4
            _, py = px(x_lo, y)
            draw.line([(ax0 - 4, py), (ax0, py)], fill="black")
            draw.text((ox + 4, py - 7), f"{y:.3f}", fill="black", font=small)
        every = max(1, len(labels) // 6)  # at most ~6 x labels, so they never overlap
        for i, c in enumerate(labels):
            x, _ = px(xs[c], lo)
            draw.line([(x, ay1), (x, ay1 + 4)], fill="black")
            if i % every == 0 or i == len(labels) - 1:
                text = str(steps[c]) if use_steps else c
                draw.text((x - draw.textlength(text, font=small) / 2, ay1 + 6), text, fill="black", font=small)
        axis = "training step" if use_steps else "checkpoint"
        draw.text(((ax0 + ax1) / 2 - draw.textlength(axis, font=small) / 2, ay1 + 24), axis, fill="black", font=small)
        if ref is not None:
            _, py = px(x_lo, ref)
            _dashed(draw, ax0, ax1, py, (150, 150, 150))
        for j, scale in enumerate(scales):
            colour = PALETTE[j % len(PALETTE)]
            points = [px(xs[r.checkpoint], getattr(r, key)) for r in rows
                      if r.lora_scale == scale and getattr(r, key) is not None]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if best is not None and getattr(best, key) is not None:
            x, y = px(xs[best.checkpoint], getattr(best, key))
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline="black", width=2)

    x, y = 8, panel_rows * ph + 6  # legend
    for j, scale in enumerate(scales):
        colour = PALETTE[j % len(PALETTE)]
        draw.line([(x, y + 7), (x + 22, y + 7)], fill=colour, width=3)
        text = f"LoRA x{scale:g}"
        draw.text((x + 28, y), text, fill="black", font=small)
        x += 40 + draw.textlength(text, font=small)
    if references:
        _dashed(draw, x, x + 24, y + 7, (150, 150, 150), dash=4)
        draw.text((x + 30, y), reference_label, fill="black", font=small)
        x += 46 + draw.textlength(reference_label, font=small)
    draw.ellipse([x, y + 1, x + 12, y + 13], outline="black", width=2)
    draw.text((x + 18, y), "recommended", fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# --------------------------------------------------------------------------------------------------------
# The whole evaluation


def run_eval(spec: EvalSpec, out: str | Path, progress: bool = True) -> tuple[list[Row], Row | None, list[str]]:
    """Render, score and write the report to ``out``. Returns (rows, recommended row, failed-cell lines)."""
    from sdtune.sample import read_image

    out = Path(out)
    paths = subject_images(spec.subject_dir)
    if not paths:
        raise SdtuneError(f"--subject-dir: {spec.subject_dir} holds no subject photos; pass --subject-dir DIR")
    real = [read_image(p, "--subject-dir") for p in paths]
    # Load the metric models first: an offline hub id should fail now, not after an hour of sampling.
    embedder = Embedder(spec.dino, spec.clip)
    out.mkdir(parents=True, exist_ok=True)
    folders, failures = render(spec, out, progress=progress)
    rows = score(spec, folders, embedder.to(_device(spec)), real)
    best = recommend(rows, spec.clip_t_tolerance)
    write_json(out / "report.json", spec, rows, best, len(real))
    write_markdown(out / "report.md", spec, rows, best, len(real))
    if any(r.dino is not None for r in rows):
        plot_metrics(rows, out / "metrics.png", best)
    return rows, best, failures


# --------------------------------------------------------------------------------------------------------
# Command line

EPILOG = """\
metrics (Ruiz et al. 2022, DreamBooth, Sec. 4.1): DINO and CLIP-I = mean cosine similarity of generated vs.
real subject images (DINO ViT-S/16 CLS token; CLIP image embedding); CLIP-T = each image vs. its prompt with
the identifier removed; DIV = 1 - mean DINO similarity within a prompt (a stand-in for the paper's LPIPS);
PRES (--pres) = DINO of class-prompt images vs. the subject, lower is better.

Real numbers need the real metric models (facebook/dino-vits16, openai/clip-vit-base-patch32: downloaded once
from the Hugging Face Hub, or local folders via --dino/--clip). Paper, Table 1 (30 subjects): real images DINO
0.774 / CLIP-I 0.885; DreamBooth on Stable Diffusion 0.668 / 0.803 / CLIP-T 0.305; Textual Inversion 0.569 /
0.780 / 0.255. Recommendation: the highest DINO whose CLIP-T is within --clip-t-tolerance of the best.
"""


def add_commands(sub: Any) -> None:
    """Add ``eval`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("eval", help="the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T) per checkpoint and scale",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder, checkpoint folder or LoRA .safetensors file")
    p.add_argument("--subject-dir", metavar="DIR", help="the real subject photos (default: the run's data.instance_dir)")
    p.add_argument("--prompts", default="dreambench", metavar="dreambench|FILE",
                   help="'dreambench' (the paper's 25 prompts) or a file: one prompt per line, with {} for "
                        "'<identifier> <class>' or {identifier} and {class}; '#' lines are comments")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--live", dest="kind", action="store_const", const="live",
                      help="DreamBench's live-subject prompts (default for dogs, cats, people, ...)")
    kind.add_argument("--object", dest="kind", action="store_const", const="object",
                      help="DreamBench's object prompts (default for other classes)")
    p.add_argument("--identifier", help="default: the run's data.identifier")
    p.add_argument("--class-noun", help="default: from prior.class_prompt ('a photo of a dog' -> dog), else the "
                                        "word after the identifier in data.instance_prompt")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="N", help="seeds 0..N-1 for every prompt (paper: 4)")
    p.add_argument("--checkpoints", choices=("all",), help="one row per saved checkpoint of the run")
    p.add_argument("--lora-scale", default="1", metavar="LIST",
                   help="comma list; 0 is the base model (rendered again for each checkpoint)")
    p.add_argument("--pres", action="store_true",
                   help="also draw the class prompt (--images-per-prompt images per row) and report PRES")
    p.add_argument("--class-prompt", help="for --pres (default: prior.class_prompt, else 'a photo of a <class>')")
    p.add_argument("--dino", default=DEFAULT_DINO, metavar="MODEL", help=f"DINO ViT model, hub id or folder (default {DEFAULT_DINO})")
    p.add_argument("--clip", default=DEFAULT_CLIP, metavar="MODEL", help=f"CLIP model, hub id or folder (default {DEFAULT_CLIP})")
    p.add_argument("--clip-t-tolerance", type=float, default=CLIP_T_TOLERANCE, metavar="X",
                   help="how much CLIP-T the recommendation may give up for DINO (default %(default)s)")
    p.add_argument("--metrics", choices=("paper", "world"), default="paper",
                   help="paper: DINO / CLIP-I / CLIP-T (needs the metric models); world: runs on the micro model, "
                        "scored from pixels by the micro world's detector (subject, context, class drift), offline")
    p.add_argument("--world-prompts", type=int, default=8, metavar="N",
                   help="--metrics world: how many subject-in-a-new-context prompts (default %(default)s)")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--steps", type=int, help="sampler steps per image (default 25; world: 20)")
    p.add_argument("--guidance", type=float, help="default 7.5; world: 4")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, help="default: the run's resolution, else the model's")
    p.add_argument("--height", type=int)
    p.add_argument("--batch-size", type=int, default=1, help="seeds rendered per pipeline call")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", metavar="DIR", help="report folder (default: eval/ in the run folder)")
    p.set_defaults(func=cmd_eval)


def _step_of(label: str, lora_file: str) -> int | None:
    """The training step of a LoRA: from its checkpoint folder name, else the run's train_summary.json."""
    m = re.fullmatch(r"step-(\d+)", label)
    if m:
        return int(m.group(1))
    summary = Path(lora_file).parent / "train_summary.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(summary.read_text())["global_step"])
    return None


def _run_root(target: Path) -> Path:
    """The run folder that ``target`` (run, checkpoint folder or LoRA file) belongs to, else its own folder."""
    folder = target if target.is_dir() else target.parent
    for candidate in (folder, *folder.parents[:2]):
        if (candidate / "config.yaml").is_file():
            return candidate
    return folder


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """Resolve the run folder and the flags into an EvalSpec (every user mistake is one SdtuneError)."""
    from sdtune.checkpoint import run_config
    from sdtune.cli import lora_files, parse_floats

    target = Path(args.run)
    if not target.exists():
        raise SdtuneError(f"{target}: no such run folder, checkpoint folder or LoRA file")
    run_cfg = run_config(target)
    loras = lora_files(target, args.checkpoints)
    data, model_cfg = run_cfg.get("data") or {}, run_cfg.get("model") or {}
    model = args.model or model_cfg.get("pretrained")
    if not model:
        raise SdtuneError(f"--model: {target} does not say its base model; pass --model HUB_ID_OR_FOLDER")
    identifier = args.identifier or data.get("identifier")
    if not identifier:
        raise SdtuneError(f"--identifier: {target} does not say its identifier; pass --identifier sks")
    class_noun = args.class_noun or class_noun_from(run_cfg)
    if not class_noun:
        raise SdtuneError("--class-noun: the run's config names no class (prior.class_prompt); pass --class-noun dog")
    if not args.class_noun and len(class_noun.split()) > 3:
        raise SdtuneError(f"--class-noun: '{class_noun}' (from prior.class_prompt) is not a class noun; "
                          "pass --class-noun dog")
    subject_dir = args.subject_dir or data.get("instance_dir")
    if not subject_dir:
        raise SdtuneError("--subject-dir: the run names no data.instance_dir; pass --subject-dir DIR with the photos")
    if not Path(subject_dir).is_dir():
        source = "--subject-dir" if args.subject_dir else "the run's data.instance_dir"
        raise SdtuneError(f"--subject-dir: {source} {subject_dir} is not a folder here; pass --subject-dir DIR "
                          "with the subject photos")
    world = getattr(args, "metrics", "paper") == "world"
    if world:
        from sdtune.micro.measure import subject_prompts

        if args.world_prompts < 1:
            raise SdtuneError("--world-prompts: must be at least 1")
        templates = [p for p, _ in subject_prompts(args.world_prompts, "{identifier}", "{class}")]
        prompt_set = "micro-world"
    elif args.prompts == "dreambench":
        kind = args.kind or ("live" if is_live(class_noun) else "object")
        templates, prompt_set = dreambench()[kind], f"dreambench-{kind}"
    else:
        templates, prompt_set = read_prompt_file(args.prompts), str(args.prompts)
    prompts = list(dict.fromkeys(fill(t, identifier, class_noun) for t in templates))
    for p in prompts:
        if strip_identifier(p, identifier) == p:
            print(f"warning: prompt '{p}' does not contain the identifier '{identifier}'", file=sys.stderr)
    if args.images_per_prompt < 1:
        raise SdtuneError("--images-per-prompt: must be at least 1")
    scales = parse_floats(args.lora_scale, "--lora-scale")
    if not scales:
        raise SdtuneError("--lora-scale: give at least one scale, e.g. 1 or 0.8,1")
    article = "an" if class_noun[0].lower() in "aeiou" else "a"
    class_prompt = (args.class_prompt or (run_cfg.get("prior") or {}).get("class_prompt")
                    or f"a photo of {article} {class_noun}")
    size = data.get("resolution")
    steps = args.steps if args.steps is not None else (20 if world else 25)
    guidance = args.guidance if args.guidance is not None else (4.0 if world else 7.5)
    settings = Settings(negative_prompt=args.negative_prompt, steps=steps, scheduler=args.scheduler,
                        width=args.width or size or 0, height=args.height or size or 0, batch_size=args.batch_size)
    revision, variant = model_cfg.get("revision"), model_cfg.get("variant")
    if not settings.width or not settings.height:
        from sdtune.models import inspect_model

        native = inspect_model(model, revision, for_training=False).resolution
        settings = Settings(**{**asdict(settings), "width": settings.width or native,
                               "height": settings.height or native})
    return EvalSpec(
        run=str(target), model=model, loras=loras, steps={label: _step_of(label, f) for label, f in loras},  # type: ignore[misc]
        subject_dir=Path(subject_dir), identifier=identifier, class_noun=class_noun, prompt_set=prompt_set,
        prompts=prompts, images_per_prompt=args.images_per_prompt, lora_scales=scales, guidance=guidance,
        settings=settings, pres=args.pres or world, class_prompt=class_prompt, dino=args.dino,
        clip=args.clip, clip_t_tolerance=args.clip_t_tolerance, revision=revision, variant=variant,
        dtype=args.dtype, device=args.device,
    )


def _cmd_eval_world(args: argparse.Namespace, spec: EvalSpec, out: Path) -> int:
    from sdtune.micro.measure import RULE, evaluate_run, subject_prompts
    from sdtune.micro.measure import table as world_table

    scenes = {fill(p, spec.identifier, spec.class_noun): scene
              for p, scene in subject_prompts(args.world_prompts, "{identifier}", "{class}")}
    print(f"eval (micro world): {len(spec.loras)} checkpoint(s) x {len(spec.lora_scales)} scale(s) x "
          f"{len(spec.prompts)} subject prompts + the class prompt '{spec.class_prompt}' x {spec.images_per_prompt} images")
    rows, best, failures = evaluate_run(spec, out, scenes)
    print()
    print(world_table(rows, best))
    if best is not None:
        print(f"\nrecommended: {best.checkpoint} at LoRA scale {best.lora_scale:g}: {RULE}")
    print(f"report: {out / 'report.md'} (report.json, samples/)")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sdtune.cli import quiet_libraries

    spec = spec_from_args(args)
    out = Path(args.out) if args.out else _run_root(Path(args.run)) / "eval"
    quiet_libraries()
    if args.metrics == "world":
        return _cmd_eval_world(args, spec, out)
    print(f"eval: {len(spec.loras)} checkpoint(s) x {len(spec.lora_scales)} scale(s) x {len(spec.prompts)} prompts "
          f"({spec.prompt_set}) x {spec.images_per_prompt} images; identifier '{spec.identifier}', class "
          f"'{spec.class_noun}'; subject: {spec.subject_dir}")
    rows, best, failures = run_eval(spec, out)
    print()
    print(table(rows, best))
    if best is not None:
        print(f"\nrecommended: {best.checkpoint} at LoRA scale {best.lora_scale:g} (DINO {_fmt(best.dino)}, "
              f"CLIP-T {_fmt(best.clip_t)}): {_rule_text(spec.clip_t_tolerance)}")
    print(f"report: {out / 'report.md'} (report.json, metrics.png, samples/)")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0
