"""The key layout of the weight files sdtune writes: the canonical one, which every supported diffusers /
transformers version (and ComfyUI, InvokeAI, kohya) reads.

transformers >= 5 flattened ``CLIPTextModel`` (its modules sit on the model, no ``text_model`` wrapper) and
its ``save_pretrained`` writes them that way (``encoder.layers.0...``) for a model built in code; it reads
the canonical ``text_model.encoder.layers.0...`` through its conversion mapping, but transformers 4.x and
ComfyUI's diffusers loader read the flat keys as missing (a randomly initialised text encoder), and diffusers
< 0.39 fails on flat text-encoder LoRA keys. The canonical layout is the one the hub's SD models use:
every CLIP text-encoder key under ``text_model.``, except ``CLIPTextModelWithProjection``'s
``text_projection``, which sits beside it. The denoiser's and VAE's keys (diffusers) never changed.

The rule is hand-written because no library writes it: transformers' own ``revert_weight_conversion`` skips
prefix changes for a model that was not loaded with ``from_pretrained``, and diffusers' ``save_pretrained``
and ``save_lora_weights`` write what the module's ``state_dict`` says.

One place: ``sdtune.models.write_random_model``, the micro model's writer, the LoRA writers
(``sdtune.lora``) and the exports (``sdtune.export``) all use these functions.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sdtune.errors import SdtuneError
from sdtune.files import atomic_path
from sdtune.runs import safetensors_header

T = TypeVar("T")

TEXT_MODEL = "text_model."
# transformers classes whose canonical keys sit under text_model. (CLIPTextModel's were flattened in v5)
CLIP_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_BESIDE_TEXT_MODEL = ("text_projection.",)  # CLIPTextModelWithProjection: a sibling of text_model, not in it


def canonical_text_encoder_key(key: str, model_class: str = "CLIPTextModel") -> str:
    """One weight (or LoRA) key of a text encoder, relative to the encoder, in the canonical layout:
    ``encoder.layers.0.self_attn.q_proj.lora_A.weight`` -> ``text_model.encoder.layers.0.self_attn.q_proj.
    lora_A.weight``. Keys already canonical, and keys of classes other than CLIP's, come back unchanged."""
    if model_class not in CLIP_TEXT_CLASSES or key.startswith((TEXT_MODEL, *_BESIDE_TEXT_MODEL)):
        return key
    return TEXT_MODEL + key


def canonical_text_encoder_keys(state: Mapping[str, T], model_class: str = "CLIPTextModel") -> dict[str, T]:
    """``state`` (a text encoder's weights or LoRA tensors, keys relative to the encoder), keys canonical."""
    out = {canonical_text_encoder_key(k, model_class): v for k, v in state.items()}
    if len(out) != len(state):  # both layouts in one state dict: nothing sdtune makes, so nothing to guess
        raise SdtuneError(f"{model_class} weights with keys in both layouts (with and without "
                          f"{TEXT_MODEL!r}); save the text encoder again")
    return out


def keys_for_module(state: Mapping[str, T], module: Any) -> dict[str, T]:
    """``state`` (weights or LoRA tensors of ``module``, in either layout) renamed to what ``module`` itself
    names them: canonical keys for a CLIP text model that has the ``text_model`` level (transformers 4.x, and
    CLIPTextModelWithProjection), flat ones for a flattened transformers 5 CLIPTextModel. For loading sdtune's
    files into the installed modules (``set_peft_model_state_dict`` matches names exactly)."""
    model_class = type(module).__name__  # PEFT's add_adapter injects in place: the class stays
    canonical = canonical_text_encoder_keys(state, model_class)
    if model_class not in CLIP_TEXT_CLASSES or hasattr(module, "text_model"):
        return canonical
    return {k.removeprefix(TEXT_MODEL): v for k, v in canonical.items()}


def rewrite_safetensors_header(path: str | Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Replace the JSON header of a ``.safetensors`` file with ``edit(header)`` (tensor names, metadata);
    the tensor bytes are copied as they are (bitwise), and the file is replaced whole or not at all."""
    path = Path(path)
    header = edit(safetensors_header(path))
    with open(path, "rb") as src:
        old_size = struct.unpack("<Q", src.read(8))[0]
        raw = _header_bytes(header)
        raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        src.seek(8 + old_size)
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 1 << 20)


def _header_bytes(header: dict[str, Any]) -> bytes:
    """A safetensors header as written: compact JSON, metadata keys sorted (see ``sort_metadata``)."""
    if isinstance(header.get("__metadata__"), dict):
        header = {**header, "__metadata__": dict(sorted(header["__metadata__"].items()))}
    return json.dumps(header, separators=(",", ":")).encode()


def sort_metadata(path: str | Path) -> None:
    """Sort the metadata keys of a ``.safetensors`` file just written, in place (the header keeps its length;
    call it on a file not yet in its final place). safetensors writes metadata from a Rust HashMap, in an order
    seeded per process: the same tensors and metadata gave other bytes (and another sha256) in each run, so a
    file's hash could not say whether a LoRA changed (``sample --replay``)."""
    header = safetensors_header(path)
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = _header_bytes(header)
        raw += b" " * (size - len(raw))  # the same keys and values: never longer than the one written
        if len(raw) != size:  # a header with other spacing than safetensors' own: leave the file as it is
            return
        f.write(raw)


def canonical_text_encoder_folder(folder: str | Path, model_class: str) -> list[Path]:
    """Give the weight files of a saved text encoder (``folder/*.safetensors``, and a sharded model's
    ``*.safetensors.index.json``) canonical keys, in place: only headers are rewritten, tensors and metadata
    stay bitwise the same. Files already canonical are not touched. Returns the files rewritten."""
    rewritten = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        names = [k for k in safetensors_header(f) if k != "__metadata__"]
        if all(canonical_text_encoder_key(k, model_class) == k for k in names):
            continue
        canonical_text_encoder_keys(dict.fromkeys(names), model_class)  # refuses a file with both layouts
        rewrite_safetensors_header(f, lambda header: {
            k if k == "__metadata__" else canonical_text_encoder_key(k, model_class): v
            for k, v in header.items()})
        rewritten.append(f)
    for index in sorted(Path(folder).glob("*.safetensors.index.json")):
        data = json.loads(index.read_text())
        weight_map = data.get("weight_map") or {}
        canonical = canonical_text_encoder_keys(weight_map, model_class)
        if canonical != weight_map:
            with atomic_path(index) as tmp:
                tmp.write_text(json.dumps({**data, "weight_map": canonical}, indent=2, sort_keys=True) + "\n")
            rewritten.append(index)
    return rewritten
