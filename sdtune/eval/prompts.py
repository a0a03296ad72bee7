"""Evaluation prompts: templates filled with the run's identifier and class noun, the identifier taken out
again for text-image similarity, prompt files, the class noun a run's config names, and the identifier and
caption a LoRA file's metadata names (a file evaluated outside its run)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompt file's text, the one rule of ``sdtune eval --prompts`` and ``sdtune sample
    --prompts-file``: one per line, stripped; blank lines and lines starting with ``#`` (comments) skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_prompt_file(path: str | Path) -> list[str]:
    """Templates from a file (``prompt_lines``)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdtuneError(f"--prompts: cannot read {path} ({type(e).__name__}: {e})") from None
    templates = prompt_lines("\n".join(lines))
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


# kohya's DreamBooth folder naming, "<repeats>_<identifier> <class>" ("10_ohwx dog"): what a kohya file's
# ss_dataset_dirs / ss_tag_frequency keys say of its subject when it has no trigger phrase
KOHYA_FOLDER = re.compile(r"^\d+_(\S+)\s+(\S.*)$")


def _json_mapping(text: str | None) -> dict[str, Any]:
    """A metadata value that holds a JSON object (kohya writes them as strings), {} if it is not one."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _has_word(text: str, word: str, followed: bool = False) -> bool:
    """Whether ``word`` is a whole word of ``text`` (``followed``: with another word after it, the class)."""
    after = r"\s+\w" if followed else r"(?!\w)"
    return re.search(rf"(?<!\w){re.escape(word)}{after}", text) is not None


def config_from_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """What a LoRA file's safetensors metadata tells of its subject, shaped as a run's config (``class_noun_from``
    and ``sdtune eval`` read it as one): ``data.identifier`` from ModelSpec's ``modelspec.trigger_phrase`` (several,
    "sks, ohwx": one ``data.concepts`` entry each), its caption as ``data.instance_prompt`` (the most frequent
    kohya ``ss_tag_frequency`` tag that holds the identifier followed by a word, the class noun, else the folder
    name below), and ``data.folder_names``: the names of its training folders
    (``ss_dataset_dirs``; names only, a file meant for sharing never holds a path). Without a trigger phrase, a
    kohya DreamBooth folder named ``<repeats>_<identifier> <class>`` ("10_ohwx dog") names both. {} when the
    metadata says nothing of them."""
    tags = {folder: counts for folder, counts in _json_mapping(meta.get("ss_tag_frequency")).items()
            if isinstance(counts, dict)}
    folders = list(dict.fromkeys([*_json_mapping(meta.get("ss_dataset_dirs")), *tags]))
    phrases = [" ".join(m.groups()) for m in map(KOHYA_FOLDER.match, folders) if m]  # "ohwx dog"
    words = [w.strip() for w in (meta.get("modelspec.trigger_phrase") or "").split(",") if w.strip()]
    words = list(dict.fromkeys(words or [phrase.split()[0] for phrase in phrases]))
    if not words:
        return {"data": {"folder_names": folders}} if folders else {}
    counted: dict[str, float] = {}
    for counts in tags.values():
        for tag, n in counts.items():
            counted[str(tag)] = counted.get(str(tag), 0) + (n if isinstance(n, (int, float)) else 0)
    by_count = sorted(counted, key=lambda tag: -counted[tag])  # stable: ties keep the file's order

    def caption(word: str) -> str | None:  # one that names the class after the identifier, if any does
        found = [t for t in [*by_count, *phrases] if _has_word(t, word)]
        return next((t for t in found if _has_word(t, word, followed=True)), found[0] if found else None)

    concepts = [{"identifier": w, "instance_prompt": caption(w)} for w in words]
    data = concepts[0] if len(concepts) == 1 else {"concepts": concepts}
    return {"data": {**data, "folder_names": folders}}
