"""The DreamBooth paper's evaluation protocol, as data: DreamBench prompts, the five metrics, Table 1 and the
recommendation rule (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation", CVPR 2023, arXiv:2208.12242, Sec. 4.1 and 4.3). ``sdtune.eval.paper`` computes the metrics.

No torch here: ``sdtune eval --help`` shows the defaults below.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from sdtune.eval.core import Metric, Reference, References, Row

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# The paper finds DINO differences of ~0.1 and CLIP-T differences of 0.05 clear to people, so up to 0.02 of
# prompt fidelity is a fair price for identity.
CLIP_T_TOLERANCE = 0.02

# Class nouns that get DreamBench's live-subject prompts (accessories, outfits) unless --object says otherwise.
# DreamBench's own live subjects are its dogs and cats; people and other animals wear a hat just as well.
LIVE_NOUNS = {"dog", "cat", "puppy", "kitten", "pet", "person", "man", "woman", "boy", "girl", "baby", "child",
              "bird", "parrot", "horse", "rabbit", "bunny", "hamster", "guinea pig", "fox", "monkey", "bear"}

METRICS = (
    Metric("dino", "DINO", True, "subject fidelity: mean cosine similarity of the DINO ViT-S/16 CLS embeddings "
           "over all (generated image, subject photo) pairs"),
    Metric("clip_i", "CLIP-I", True, "subject fidelity: the same with CLIP image embeddings"),
    Metric("clip_t", "CLIP-T", True, "prompt fidelity: mean cosine similarity of each image's CLIP embedding with "
           "its prompt's CLIP text embedding, the identifier removed from the prompt"),
    Metric("div", "DIV", True, "diversity: 1 - the mean pairwise cosine similarity of the DINO embeddings of the "
           "images of one prompt, averaged over prompts; 0 means identical images (a substitute for the paper's "
           "LPIPS, whose weights are not available offline: compare DIV between rows, not with the paper)",
           optional=True),
    Metric("pres", "PRES", False, "prior preservation: DINO between images of the class prompt and the subject "
           "photos; lower means the class prior survived", optional=True),
)

PAPER_SOURCE = "Ruiz et al. 2022 (DreamBooth, arXiv:2208.12242), Table 1"
DREAMBOOTH_SD = "paper: DreamBooth (Stable Diffusion)"
TABLE1 = References(
    source=PAPER_SOURCE,
    note="30 subjects x 25 prompts x 4 images",
    rows=(
        Reference("paper: Real images", {"dino": 0.774, "clip_i": 0.885, "clip_t": None}),
        Reference(DREAMBOOTH_SD, {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
                  short="paper: DreamBooth (SD)"),
        Reference("paper: Textual Inversion (Stable Diffusion)", {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
                  short="paper: Textual Inversion (SD)"),
    ),
    plotted=DREAMBOOTH_SD,
)
# Table 3 (Imagen, 15 subjects): PRES with / without the prior preservation loss. Its DIV is LPIPS, which
# sdtune's substitute does not reproduce, so only PRES is quoted.
PAPER_PRES = {"with prior preservation": 0.493, "without": 0.664}


def dreambench() -> dict[str, Any]:
    """The shipped DreamBench data: ``object`` and ``live`` prompt templates, ``classes``, credit, licence."""
    raw = resources.files("sdtune").joinpath("assets", "dreambench_prompts.json").read_text(encoding="utf-8")
    return json.loads(raw)


def is_live(class_noun: str) -> bool:
    """Whether DreamBench's live-subject prompts suit this class (dogs, cats, people, ...)."""
    noun = class_noun.lower().strip()
    return noun in LIVE_NOUNS or noun.split()[-1] in LIVE_NOUNS


def recommend(rows: list[Row], tolerance: float = CLIP_T_TOLERANCE) -> Row | None:
    """The highest DINO among rows with LoRA scale > 0 whose CLIP-T is within ``tolerance`` of the best CLIP-T
    of those rows (ties: the earlier step, then the lower scale). None if no such row was measured."""
    candidates = [r for r in rows if r.lora_scale > 0 and r.metrics.get("dino") is not None
                  and r.metrics.get("clip_t") is not None]
    if not candidates:
        return None
    best = max(r.metrics["clip_t"] for r in candidates)  # type: ignore[type-var]
    near = [r for r in candidates if r.metrics["clip_t"] >= best - tolerance - 1e-12]  # type: ignore[operator]
    return max(near, key=lambda r: (r.metrics["dino"], -(r.step or 0), -r.lora_scale))


def rule_text(tolerance: float = CLIP_T_TOLERANCE) -> str:
    """``recommend``'s rule in words."""
    return (f"the highest DINO among rows with LoRA scale > 0 whose CLIP-T is within {tolerance:g} of the best "
            "CLIP-T (ties: earlier step, lower scale)")
