"""Evaluation prompts: templates filled with the run's identifier and class noun, the identifier taken out
again for text-image similarity, prompt files, and the class noun a run's config names."""

from __future__ import annotations

import re
from pathlib import Path

from sdtune.errors import SdtuneError


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
