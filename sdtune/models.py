"""Base models: what one is, its loaded parts, and random ones built in code for tests and benchmarks.

A model is any diffusers-format pipeline folder or Hugging Face hub id. Its family, prediction type and native
resolution are read from the model's own config files by its family (``sdtune.families``), never guessed from
its name, and without loading any weights (so config errors can be reported first).

torch is imported inside the functions that use it: the command line reads ``DTYPES`` for its choices.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.families import Components, Family, ModelFiles, ModelInfo
from sdtune.files import content_hash, unhashed_bytes
from sdtune.runs import safetensors_header
from sdtune.tokens import write_clip_tokenizer_files

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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
    return families.describe(files, for_training)


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


def local_folder(pretrained: str, revision: str | None = None) -> Path | None:
    """The folder a model's files are in: the local folder itself, or its snapshot in the Hugging Face cache
    (None when nothing of it is cached)."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, revision=revision, local_files_only=True))
    except Exception:  # not cached (yet): nothing to look at
        return None


def model_identity(pretrained: str, revision: str | None, subfolders: list[str]) -> str:
    """A short hash of what a model *is*: the bytes of every file in ``subfolders`` (weights, configs,
    tokenizer files) and of ``model_index.json``, not its name. Replacing a model folder's weights, or a
    hub snapshot moving to a new commit, gives a new identity; ``sdtune.files.content_hash`` reads each file
    version once."""
    folder = local_folder(pretrained, revision)
    if folder is None:
        raise SdtuneError(f"model.pretrained: {pretrained} is not in the Hugging Face cache; load it first")
    files = [folder / "model_index.json"] + sorted(
        f for sub in subfolders for f in (folder / sub).rglob("*") if f.is_file() and not f.name.startswith(".")
    )
    files = [f for f in files if f.is_file()]
    todo = unhashed_bytes(files)
    if todo > 2**30:  # the first time only: say why the start pauses
        logger.info(f"reading {todo / 2**30:.1f} GiB of {pretrained} once, to key the caches by its contents")
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(folder).as_posix()}={content_hash(f)}\n".encode())
    return h.hexdigest()[:16]


def weight_problems(pretrained: str, revision: str | None = None) -> list[str]:
    """One line per ``.safetensors`` file of a local model (or cached hub snapshot) that cannot be whole: an
    unreadable header, or fewer bytes than its header says (a download or copy that stopped early). Reads
    headers only (``sdtune.runs.safetensors_header``), so it is as fast as the config checks."""
    folder = local_folder(pretrained, revision)
    if folder is None:
        return []
    problems = []
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            safetensors_header(f)
        except SdtuneError as e:
            problems.append(f"model.pretrained: {e}; fix: copy or download the model again")
    return problems


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
