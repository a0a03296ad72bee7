"""Base models: what one is, its loaded parts, and random ones built in code for tests and benchmarks.

A model is any diffusers-format pipeline folder or Hugging Face hub id. Its family, prediction type and native
resolution are read from the model's own config files by its family (``sdtune.families``), never guessed from
its name, and without loading any weights (so config errors can be reported first).

torch is imported inside the functions that use it: the command line reads ``DTYPES`` for its choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.families import Components, Family, ModelFiles, ModelInfo
from sdtune.tokens import write_clip_tokenizer_files

if TYPE_CHECKING:
    import torch

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def torch_dtype(name: str) -> torch.dtype:
    """fp32 / fp16 / bf16 (and Accelerate's mixed-precision names no / fp16 / bf16) -> the torch dtype."""
    import torch

    dtypes = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise SdtuneError(f"--dtype: unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return dtypes[name]


def inspect_model(pretrained: str, revision: str | None = None, for_training: bool = True) -> ModelInfo:
    """Family, prediction type, native resolution and bucket multiple of a model, from config files only.

    ``for_training`` refuses inpainting / depth denoisers (extra input channels), which sampling accepts."""
    files = ModelFiles(pretrained, revision)
    return families.detect(files).describe(files, for_training)


def load_components(
    pretrained: str,
    family: Family,
    revision: str | None = None,
    variant: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> Components:
    """Load a model's tokenizers, text encoders, VAE, denoiser and training noise scheduler.

    Weights load from safetensors only, unless ``allow_unsafe_pickle``: then .bin files are accepted too, and
    diffusers / transformers read them with torch's ``weights_only`` unpickler. Never remote code."""
    local = Path(pretrained).expanduser()
    if local.is_dir() and not allow_unsafe_pickle:
        pickles = [p for p in local.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(local.rglob("*.safetensors")):
            raise SdtuneError(
                f"model.pretrained: {pretrained} has only pickle weights ({pickles[0].name}); sdtune loads "
                "safetensors. Convert them, or set model.allow_unsafe_pickle=true (loaded with weights_only)"
            )
    try:
        return family.load(pretrained, revision, variant, safetensors_only=not allow_unsafe_pickle)
    except (OSError, ValueError) as e:  # missing files, or pickle weights where safetensors are required
        raise SdtuneError(
            f"model.pretrained: could not load {pretrained}"
            f"{f' (variant {variant})' if variant else ''}: {str(e).splitlines()[0][:200]}"
        ) from None


def write_random_model(
    directory: str | Path, family: str, size: str = "tiny", seed: int = 0, dtype: str = "fp32"
) -> Path:
    """Write a randomly initialised diffusers pipeline of ``family`` with the real CLIP tokenizer(s), in
    ``tiny`` (tests, 64 px) or ``full`` (the real models' shapes, for benchmarks) size; return its folder."""
    import torch

    fam = families.get(family)
    weights_dtype = torch_dtype(dtype)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SdtuneError(f"{directory} exists and is not empty; choose a new folder")
    torch.manual_seed(seed)
    pipe: Any = fam.pipeline(fam.random_components(size))
    if weights_dtype != torch.float32:
        pipe.to(weights_dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Also the classic vocab.json + merges.txt, so older transformers (slow tokenizer) can read them too.
    for spec in fam.text_encoders:
        write_clip_tokenizer_files(directory / spec.tokenizer_name)
    return directory
