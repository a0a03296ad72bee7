"""Pivotal tuning's embedding files, read and bundled without torch at import (``sdtune.export`` reads them
for the kohya file; the command line lists export formats without paying for torch). ``sdtune.pivotal`` trains
and loads what they hold.

A file per identifier, ``embeddings/<identifier>.safetensors``: one (n, width) tensor per text encoder under the
key AUTOMATIC1111, ComfyUI and diffusers read (``clip_l``, ``clip_g``, ``clip_h``). In a kohya file the same
tensors are ``bundle_emb.<identifier>.<key>`` (A1111's bundled embeddings; its own files may say
``bundle_emb.<name>.string_to_param.*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.runs import EMBEDDINGS_DIR

if TYPE_CHECKING:
    import torch

BUNDLE_PREFIX = "bundle_emb."
TOKENS_KEY = "sdtune.tokens"  # metadata: the token strings sdtune trained, comma-separated
MODE_KEY = "sdtune.pivotal"  # metadata: "new" (random or pivotal.init start) or "own" (the identifier's rows)

Files = dict[str, tuple[dict[str, Any], dict[str, str]]]  # {identifier: (tensors, metadata)}


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an embedding file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def folder_files(folder: str | Path) -> Files:
    """``{identifier: (tensors, metadata)}`` of ``folder/embeddings/*.safetensors`` (a run or checkpoint)."""
    directory = Path(folder) / EMBEDDINGS_DIR
    if not directory.is_dir():
        return {}
    return {p.stem: read_file(p) for p in sorted(directory.glob("*.safetensors"))}


def bundle_files(tensors: dict[str, torch.Tensor]) -> Files:
    """The embeddings bundled in a kohya LoRA's tensors (``bundle_emb.<name>.<key>``; A1111's
    ``bundle_emb.<name>.string_to_param.*`` too)."""
    out: Files = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, vector = key[len(BUNDLE_PREFIX):].partition(".")
            out.setdefault(name, ({}, {}))[0][vector.replace("string_to_param.*", "emb_params")] = value
    return out


def bundle_tensors(files: Files) -> dict[str, torch.Tensor]:
    """The kohya file's ``bundle_emb.<identifier>.<key>`` tensors of a run's embedding files."""
    return {f"{BUNDLE_PREFIX}{name}.{key}": tensor.contiguous()
            for name, (tensors, _) in files.items() for key, tensor in tensors.items()}
