"""The DreamBooth paper's evaluation maths, on embeddings that are already computed.

Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation" (CVPR 2023,
arXiv:2208.12242), Sec. 4.1 and 4.3:

- DINO and CLIP-I (subject fidelity): the average pairwise cosine similarity between the embeddings of the
  generated images and of the real subject photos (DINO ViT-S/16 and CLIP image embeddings respectively).
- CLIP-T (prompt fidelity): the average cosine similarity between each image's CLIP embedding and the CLIP text
  embedding of its prompt (``sdtune.eval.paper`` removes the identifier from the prompt first).
- PRES (prior preservation, lower is better): DINO between images of the bare class prompt and the subject
  photos; a high value means "a dog" has collapsed onto *your* dog.
- DIV (diversity, higher is better): the paper uses LPIPS between images of the same prompt. LPIPS needs
  AlexNet/VGG weights that cannot be had offline, so ``diversity`` here is 1 - the mean pairwise cosine
  similarity of the images' DINO embeddings within each prompt: 0 for identical images, on another scale
  than the paper's LPIPS numbers.

Everything here is plain tensor maths in float64, so the tests can check it on hand-made embeddings. The paper's
own numbers (Table 1) and the metrics' definitions for reports are in ``sdtune.eval.dreambench``.
"""

from __future__ import annotations

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` cosine similarities between the rows of ``a`` and the rows of ``b``."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a @ b.T).clamp(-1.0, 1.0)  # rounding can put an identical pair a hair above 1


def mean_pairwise_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO / CLIP-I / PRES: the mean cosine similarity over every (generated, real) pair."""
    if len(generated) == 0 or len(real) == 0:
        raise ValueError("mean_pairwise_similarity needs at least one embedding on each side")
    return cosine_matrix(generated, real).mean().item()


def paired_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean cosine similarity of row i of ``images`` with row i of ``texts`` (its own prompt)."""
    if images.shape != texts.shape or len(images) == 0:
        raise ValueError(f"paired_similarity needs equal, non-empty shapes, got {tuple(images.shape)} "
                         f"and {tuple(texts.shape)}")
    a = torch.nn.functional.normalize(images.double(), dim=-1)
    b = torch.nn.functional.normalize(texts.double(), dim=-1)
    return (a * b).sum(-1).clamp(-1.0, 1.0).mean().item()


def diversity(groups: list[torch.Tensor]) -> float | None:
    """DIV substitute: 1 - the mean cosine similarity between distinct images of the same prompt.

    ``groups`` holds one ``[n, dim]`` tensor of embeddings per prompt. Each prompt with at least two images
    counts once; None when no prompt has two."""
    scores = []
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        sim = cosine_matrix(g, g)
        off_diagonal = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
        scores.append(1.0 - off_diagonal.item())
    return sum(scores) / len(scores) if scores else None
