"""The DreamBooth paper's numbers for a run: DINO, CLIP-I, CLIP-T, DIV and PRES (``sdtune eval --metrics paper``).

For each checkpoint and LoRA scale, ``--images-per-prompt`` images of every evaluation prompt (the paper's
DreamBench prompts, 25 for objects, 25 for live subjects, with the run's identifier and class noun filled in,
or a prompt file) are scored against the real subject photos (``data.instance_dir`` or ``--subject-dir``) with
``sdtune.metrics``: DINO and CLIP-I (subject fidelity), CLIP-T (prompt fidelity, the prompt without the
identifier: "a dog in the snow"), DIV (diversity; a DINO substitute for the paper's LPIPS) and, with
``--pres``, PRES (prior preservation, from as many images of the bare class prompt). The protocol itself
(metrics, Table 1, the recommendation rule) is ``sdtune.eval.dreambench``.

Images are centre-cropped to a square before each model's own processor: DINO's evaluation transform is a
resize and centre crop, while ``facebook/dino-vits16``'s processor would squash a non-square photo.

Real numbers need the real metric models: ``facebook/dino-vits16`` (DINO ViT-S/16; the CLS token of
transformers' ``ViTModel``) and ``openai/clip-vit-base-patch32`` (CLIP ViT-B/32, as in Textual Inversion's
evaluation code, the CLIP-I the paper cites), from the Hugging Face Hub or local folders (``--dino``,
``--clip``). The tests run this code on tiny random models, whose numbers mean nothing. The paper averages 30
subjects; a single subject's numbers scatter around its means.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdtune.data import list_images
from sdtune.errors import SdtuneError
from sdtune.eval.core import EvalSpec, Rendered, Row
from sdtune.eval.dreambench import (
    CLIP_T_TOLERANCE,
    DEFAULT_CLIP,
    DEFAULT_DINO,
    METRICS,
    PAPER_PRES,
    TABLE1,
    dreambench,
    is_live,
    recommend,
    rule_text,
)
from sdtune.eval.prompts import read_prompt_file, strip_identifier
from sdtune.eval.run import eval_device
from sdtune.hub import is_hub_id, offline_reason, offline_unless_reachable
from sdtune.images import open_image
from sdtune.metrics import diversity, mean_pairwise_similarity, paired_similarity

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Subject photos and metric models


def subject_images(folder: str | Path) -> list[Path]:
    """The subject photos in ``folder``: those its metadata.jsonl lists (what training read), else all images."""
    folder = Path(folder)
    images = list_images(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        listed = set()
        try:
            text = metadata.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise SdtuneError(f"{metadata}: cannot be read as UTF-8 text ({e}); save it as UTF-8") from None
        for line in text.splitlines():
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


def _cached(name: str) -> bool:
    """Whether the Hugging Face cache holds a hub model's ``config.json``."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _load(model_class: Any, model_type: str, name: str, key: str, **kwargs) -> tuple[Any, Any]:
    """(model, image processor) from a hub id or folder, or one clear error naming the flag."""
    from transformers import AutoConfig, AutoImageProcessor

    hint = f"pass {key} PATH (a local folder with the model and its preprocessor_config.json)"
    # no network: one probe, then the local cache at once (not 5 retries, ~25 s, per file); a folder asks nothing
    offline = is_hub_id(name) and offline_unless_reachable()

    def failed(e: Exception) -> SdtuneError:
        if offline and not _cached(name):  # the libraries' message is about connecting: it is not cached
            return SdtuneError(f"{key}: could not load {name}: it is not in the Hugging Face cache "
                               f"({offline_reason()}); {hint}, or load it once with a network")
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
        """Move both models to ``device``; returns self."""
        self.device = torch.device(device)
        self.dino_model.to(self.device)
        self.clip_model.to(self.device)
        return self

    def _pixels(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        with _quiet_transformers():
            pixels = processor(images=[square(im.convert("RGB")) for im in images], return_tensors="pt")
        return pixels["pixel_values"].to(self.device)

    def _batched(self, items: list, fn: Callable[[list], torch.Tensor]) -> torch.Tensor:
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
# The scorer


@dataclass
class _Targets:
    """What every row is compared with: the subject photos' embeddings and each prompt's CLIP-T text."""

    real_dino: torch.Tensor
    real_clip: torch.Tensor
    clip_texts: dict[str, str]  # prompt -> the prompt without the identifier
    text_embedding: dict[str, torch.Tensor]  # prompt without the identifier -> its CLIP embedding


@dataclass
class PaperScorer:
    """``--metrics paper``: the DreamBooth paper's metrics with DINO and CLIP models (see the module doc)."""

    prompts: str = "dreambench"  # 'dreambench' or a prompt file
    kind: str | None = None  # DreamBench's 'live' or 'object' prompts; None: by the class noun
    dino: str = DEFAULT_DINO
    clip: str = DEFAULT_CLIP
    clip_t_tolerance: float = CLIP_T_TOLERANCE
    pres: bool = False  # also draw the class prompt (same seeds) and measure PRES
    real: list[Image.Image] = field(default_factory=list, init=False, repr=False)
    embedder: Embedder | None = field(default=None, init=False, repr=False)

    name = "paper"
    title = "sdtune eval"
    metrics = METRICS
    references = TABLE1
    quote = ("dino", "clip_t")
    subject_photos = True  # DINO, CLIP-I and PRES compare with them
    steps = 25
    guidance = 7.5

    @property
    def class_images(self) -> bool:
        return self.pres

    @property
    def rule(self) -> str:
        return rule_text(self.clip_t_tolerance)

    def templates(self, class_noun: str) -> tuple[list[str], str]:
        """DreamBench's live or object prompts (by ``kind``, else by the class noun), or the prompt file's."""
        if self.prompts != "dreambench":
            return read_prompt_file(self.prompts), str(self.prompts)
        kind = self.kind or ("live" if is_live(class_noun) else "object")
        return dreambench()[kind], f"dreambench-{kind}"

    def prepare(self, spec: EvalSpec) -> None:
        """Read the subject photos and load the metric models (on the CPU until scoring)."""
        if spec.subject_dir is None:
            raise SdtuneError("--subject-dir: the paper's metrics compare with the subject photos; pass "
                              "--subject-dir DIR")
        paths = subject_images(spec.subject_dir)
        if not paths:
            raise SdtuneError(f"--subject-dir: {spec.subject_dir} holds no subject photos; pass --subject-dir DIR")
        self.real = [open_image(p, "--subject-dir") for p in paths]
        logger.info(f"subject: {len(self.real)} photos in {spec.subject_dir}")
        self.embedder = Embedder(self.dino, self.clip)

    def score(self, spec: EvalSpec, rendered: Iterable[Rendered]) -> list[Row]:
        """One Row per (checkpoint, LoRA scale): every metric over all its images, and DINO / CLIP-I / CLIP-T per
        prompt."""
        if self.embedder is None:
            raise RuntimeError("PaperScorer.score before prepare")
        embedder = self.embedder.to(eval_device(spec))
        clip_texts = {p: strip_identifier(p, spec.identifier) for p in spec.prompts}
        unique = list(dict.fromkeys(clip_texts.values()))
        targets = _Targets(embedder.dino_images(self.real), embedder.clip_images(self.real), clip_texts,
                           dict(zip(unique, embedder.clip_texts(unique))))
        return [self._row(spec, embedder, targets, r) for r in rendered]

    def _row(self, spec: EvalSpec, embedder: Embedder, t: _Targets, r: Rendered) -> Row:
        metrics: dict[str, float | None] = {m.key: None for m in METRICS}
        dinos, clips, texts, per_prompt = [], [], [], []
        for prompt in spec.prompts:
            if prompt not in r.images:
                continue  # every image of it failed
            dino, clip = embedder.dino_images(r.images[prompt]), embedder.clip_images(r.images[prompt])
            text = t.text_embedding[t.clip_texts[prompt]].expand_as(clip)
            dinos.append(dino)
            clips.append(clip)
            texts.append(text)
            per_prompt.append({
                "prompt": prompt, "clip_text": t.clip_texts[prompt], "images": len(dino),
                "dino": mean_pairwise_similarity(dino, t.real_dino),
                "clip_i": mean_pairwise_similarity(clip, t.real_clip), "clip_t": paired_similarity(clip, text),
            })
        if dinos:
            metrics["dino"] = mean_pairwise_similarity(torch.cat(dinos), t.real_dino)
            metrics["clip_i"] = mean_pairwise_similarity(torch.cat(clips), t.real_clip)
            metrics["clip_t"] = paired_similarity(torch.cat(clips), torch.cat(texts))
            metrics["div"] = diversity(dinos)
        if self.pres and spec.class_prompt in r.images:
            klass = embedder.dino_images(r.images[spec.class_prompt])
            metrics["pres"] = mean_pairwise_similarity(klass, t.real_dino)
        return r.row(metrics, sum(len(d) for d in dinos), per_prompt)

    def recommend(self, rows: list[Row]) -> Row | None:
        """``sdtune.eval.dreambench.recommend`` with this scorer's CLIP-T tolerance."""
        return recommend(rows, self.clip_t_tolerance)

    def report_fields(self, spec: EvalSpec) -> dict[str, Any]:
        """The subject photos, the CLIP-T prompts, the metric models and the paper's PRES numbers."""
        return {
            "subject_dir": str(Path(spec.subject_dir).resolve()),
            "subject_images": len(self.real),
            "clip_t_prompts": [strip_identifier(p, spec.identifier) for p in spec.prompts],
            "metric_models": {"dino": self.dino, "clip": self.clip},
            "pres_reference": {"source": "Ruiz et al. 2022, Table 3 (Imagen, 15 subjects)", **PAPER_PRES},
            "note": f"Real numbers need the real metric models ({DEFAULT_DINO}, {DEFAULT_CLIP}).",
        }

    def report_lines(self, spec: EvalSpec) -> list[str]:
        """Where the subject photos came from and which models measured."""
        return [f"- subject: {len(self.real)} photos in `{spec.subject_dir}`",
                f"- metric models: DINO `{self.dino}`, CLIP `{self.clip}`"]

    def notes(self, spec: EvalSpec) -> list[str]:
        """What CLIP-T compared with, PRES against the paper, and how far one subject's numbers go."""
        pres = (f"- PRES: compare with the paper (Imagen, Table 3): {PAPER_PRES['with prior preservation']} with "
                f"prior preservation, {PAPER_PRES['without']} without." if self.pres else
                "- PRES was not measured (`--pres` also draws the class prompt for every row).")
        return [
            f"- CLIP-T compares each image with its prompt without the identifier "
            f"(\"{strip_identifier(spec.prompts[0], spec.identifier)}\").",
            pres,
            "- Real numbers need the real metric models; a single subject scatters around the paper's 30-subject "
            "means.",
        ]
