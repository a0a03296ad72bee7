"""Caches that take the frozen VAE and text encoders out of the training step.

Latents: each training image (and its mirror image, when flips are on) is encoded once. What is cached is
the VAE's latent *distribution* (mean and log-variance, (8, H/8, W/8)), not one sample of it, so every step
still draws a fresh latent from it exactly as the uncached path does. Files live on disk as safetensors,
keyed by the image's content hash, the VAE's identity (a hash of its weight and config files' bytes, never
its path or hub id: a replaced model folder or a new hub snapshot encodes again, and says so), the target
size (the square resolution, or an aspect-ratio bucket) and the crop, so reruns and resumes skip the
encoding. A cache file whose header does not check out (a truncated copy, a full disk) is encoded again.
The run reads each latent from its file when a batch needs it (``LatentStore``, in the DataLoader's workers
when there are any): resident memory does not grow with the number of images.

Text: with the text encoders frozen, each distinct caption is encoded once into a file of its own, as the
family's prompt embeddings (``Family.encode_prompt``: hidden states, pooled embeddings, ...), keyed by the
text encoders' identity; the most recently used ones stay on the device (``TextCache``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from sdtune.data import Size, load_image
from sdtune.errors import DiskFull, SdtuneError
from sdtune.files import content_hashes, free_bytes, locate, mib, remembered, write_bytes, write_text
from sdtune.locks import cache_lock
from sdtune.runs import safetensors_header

logger = logging.getLogger(__name__)


def vae_identity(weights_id: str, vae_config: dict, dtype: str) -> str:
    """A short hash naming one VAE: its files' identity (``sdtune.models.model_identity``), its config and the
    dtype it encodes in."""
    text = json.dumps([weights_id, dict(vae_config), dtype], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def note_identity(directory: Path, name: str, identity: str, what: str, key: str | None = None) -> str | None:
    """Remember that ``name`` (a model path or hub id; ``key`` if the cache is keyed by more) is ``identity``
    now, in ``directory/identities.json``; return a line for the user if it had another identity before (its
    cache entries no longer apply, so they are built again)."""
    key = key or name
    record = directory / "identities.json"
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    before = known.get(key)
    if before == identity:
        return None
    known[key] = identity
    with contextlib.suppress(OSError):
        write_text(record, json.dumps(known, indent=1))
    if before is None:
        return None
    return f"{name} is not the model it was when {what} were cached (its files changed), so they are made again"


def _cached(file: Path, key: str | None = "params", what: str = "latent") -> bool:
    """Whether a cache entry is there whole: its header parses, names ``key`` (if given), and its tensors fill
    the file exactly (a header read, not the tensor: 100,000 entries are checked in seconds). A damaged one is
    removed, to be encoded again."""
    try:  # one lstat: whether it is there, and which version of it (what the manifest is asked about)
        found = locate(file)
    except OSError:  # not there (or a broken link)
        return False
    if not found.regular:
        return False

    def check() -> str | None:
        header = safetensors_header(file)  # raises SdtuneError for a truncated or foreign file
        return "ok" if key is None or key in header else None

    try:  # a header read once per version of the file (sdtune.files.remembered), a lookup after that
        whole = remembered(found, "whole", check) == "ok"
    except SdtuneError:
        whole = False
    if not whole:
        logger.info(f"{what} cache: {file.name} is damaged; encoding it again")
        file.unlink(missing_ok=True)
    return whole


class LatentStore(Mapping):
    """The cached latents of a run by ``(str(path), flip, (w, h))``, each read from its file when asked: the
    distribution parameters (2C, h, w), or with ``mean_std`` their mean and standard deviation
    (``mean_and_std``, what a training example carries). Holds file names only, so it pickles cheaply into
    DataLoader workers."""

    def __init__(self, files: dict[tuple[str, bool, Size], Path], mean_std: bool = False):
        self.files, self.mean_std = files, mean_std

    def __getitem__(self, key: tuple[str, bool, Size]) -> torch.Tensor:
        params = load_file(self.files[key])["params"]
        return mean_and_std(params) if self.mean_std else params

    def __iter__(self) -> Iterator[tuple[str, bool, Size]]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def as_mean_std(self) -> LatentStore:
        return LatentStore(self.files, mean_std=True)


def latent_key(image_hash: str, vae_id: str, size: tuple[int, int], flip: bool) -> str:
    """Cache file name: content hash, VAE identity, target size (h, w), crop ("center"), flip."""
    text = f"{image_hash}|{vae_id}|{size[0]}x{size[1]}|center|{'flip' if flip else 'noflip'}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@torch.no_grad()
def shard(items: list[tuple[Path, bool, Size]], index: int, count: int) -> list[tuple[Path, bool, Size]]:
    """Process ``index`` of ``count``'s share of ``items``: every ``count``-th photo, with all its flips and
    sizes (each photo is then hashed and decoded by one process only)."""
    paths = list(dict.fromkeys(path for path, _, _ in items))
    mine = set(paths[index::count])
    return [it for it in items if it[0] in mine]


def cache_latents(
    vae: Any,
    items: list[tuple[Path, bool, Size]],
    vae_id: str,
    directory: Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    lock: bool = True,
) -> LatentStore:
    """The latent distribution parameters (8, h/8, w/8) of every (image, flip, size (w, h)), keyed
    ``(str(path), flip, size)``, encoding only the ones not on disk yet; read from disk when asked. Centre
    crops only: a random crop would need a new latent every step. ``lock``: hold the folder's lock while
    encoding, so that two runs do not encode the same images at once; the processes of one run encoding
    disjoint shares go without it (each file is written whole either way)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = list(dict.fromkeys(p for p, _, _ in items))
    # each photo looked at once; known ones are a lookup each, many new ones are hashed in threads
    hashes = dict(zip(paths, content_hashes(paths), strict=True))
    out: dict[tuple[str, bool, Size], Path] = {}
    todo: list[tuple[Path, bool, Size, Path]] = []
    for path, flip, (w, h) in items:
        file = directory / f"{latent_key(hashes[path], vae_id, (h, w), flip)}.safetensors"
        if _cached(file):
            out[(str(path), flip, (w, h))] = file
        else:
            todo.append((path, flip, (w, h), file))
    if todo:
        with cache_lock(directory, "latents") if lock else contextlib.nullcontext():
            _encode(vae, todo, out, batch_size, progress)
    return LatentStore(out)


def _encode(vae: Any, todo: list[tuple[Path, bool, Size, Path]], out: dict, batch_size: int, progress: bool) -> None:
    """Encode and write the missing entries (another process may have written some meanwhile: those are read)."""
    todo = [it for it in todo if not _take(out, it)]
    # One size per VAE batch (stacked pixels need one shape); a stable sort keeps a single-size list as is.
    todo.sort(key=lambda item: item[2])
    device, dtype = vae.device, vae.dtype
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress or not todo)

    def pixels_of(item: tuple[Path, bool, Size, Path]) -> torch.Tensor:
        return load_image(item[0], item[2], True, item[1], random.Random(0))[0]

    start = 0
    # decoding and resizing in threads (PIL lets go of the GIL for both): a 10,000-photo cache is bound by them,
    # not by a GPU's VAE; the same pixels in the same order as one by one
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        while start < len(todo):
            size = todo[start][2]
            batch = [it for it in todo[start : start + batch_size] if it[2] == size]
            pixels = torch.stack(list(pool.map(pixels_of, batch))).to(device, dtype)  # (B, 3, h, w)
            params = vae.encode(pixels).latent_dist.parameters.float().cpu()  # (B, 8, h/8, w/8)
            for (path, flip, _, file), p in zip(batch, params):
                _write_entry(file, p, len(todo) - start)
                out[(str(path), flip, size)] = file
            bar.update(len(batch))
            start += len(batch)
    bar.close()


def _take(out: dict, item: tuple[Path, bool, Size, Path]) -> bool:
    path, flip, size, file = item
    if _cached(file):
        out[(str(path), flip, size)] = file
        return True
    return False


def _write_entry(file: Path, tensors: torch.Tensor | dict[str, torch.Tensor], left: int,
                 what: str = "latents") -> None:
    """One cache file, whole or not at all; a full disk is one line saying how much the rest needs."""
    tensors = {"params": tensors} if isinstance(tensors, torch.Tensor) else tensors
    try:  # whole or not at all: a killed run never leaves half a cache file
        write_bytes(file, save({k: v.contiguous() for k, v in tensors.items()}))
        # known whole as written (this version of it): the next run need not read its header back (_cached)
        remembered(file, "whole", lambda: "ok")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise SdtuneError(f"{what} cache: cannot write {file}: {e.strerror or e}") from None
        need = left * (sum(v.numel() * v.element_size() for v in tensors.values()) + 256)
        raise DiskFull(f"disk full while caching {what} in {file.parent}: the partial file was removed; the "
                       f"remaining {left} {'latents' if what == 'latents' else 'entries'} need about {mib(need)} ({mib(free_bytes(file.parent))} free). "
                       "fix: free space, or set SDTUNE_CACHE to a folder on a larger disk") from None


def mean_and_std(params: torch.Tensor) -> torch.Tensor:
    """A cached latent distribution, (2C, h, w) mean and log-variance, as (2C, h, w) mean and standard deviation,
    computed exactly as ``DiagonalGaussianDistribution`` does (log-variance clamped to [-30, 20])."""
    mean, logvar = torch.chunk(params, 2, dim=0)
    return torch.cat([mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))])


class TextCache:
    """Prompt embeddings of each distinct caption, computed once into ``directory`` (one safetensors file per
    caption, named by its hash under the text encoders' ``identity``, so a rerun encodes nothing) and read back
    when a batch needs them. The ``keep`` most recently used captions stay on ``device``: a DreamBooth run's
    few captions never touch the disk again, and 100,000 captions take ``keep`` entries of memory, not 30 GB
    of SDXL embeddings. Values are bitwise what ``encode`` gave (stored in its dtype)."""

    def __init__(self, captions: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
                 directory: Path, identity: str, device: torch.device | str = "cpu", batch_size: int = 16,
                 keep: int = 256, progress: bool = False):
        """``encode(captions)`` returns the batched prompt embeddings the training step uses."""
        self.directory, self.device, self.keep = Path(directory) / identity, torch.device(device), keep
        self.directory.mkdir(parents=True, exist_ok=True)
        unique = list(dict.fromkeys(captions))
        self.files = {c: self.directory / f"{hashlib.sha256(c.encode()).hexdigest()[:32]}.safetensors" for c in unique}
        self._recent: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        todo = [c for c in unique if not _cached(self.files[c], None, "text")]
        if todo:
            with cache_lock(self.directory, "text embeddings"):
                self._encode([c for c in todo if not _cached(self.files[c], None, "text")], encode, batch_size,
                             progress)

    def _encode(self, todo: list[str], encode: Callable, batch_size: int, progress: bool) -> None:
        bar = tqdm(total=len(todo), desc="caching text", unit="caption", disable=not progress or not todo)
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                batch = encode(chunk)
                for i, caption in enumerate(chunk):
                    row = {name: value[i].detach().to("cpu").contiguous() for name, value in batch.items()}
                    _write_entry(self.files[caption], row, len(todo) - start - i, "text embeddings")
                    self._remember(caption, {name: value[i] for name, value in batch.items()})
                bar.update(len(chunk))
        bar.close()

    def _remember(self, caption: str, row: dict[str, torch.Tensor]) -> None:
        self._recent[caption] = row
        self._recent.move_to_end(caption)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def _row(self, caption: str) -> dict[str, torch.Tensor]:
        row = self._recent.get(caption)
        if row is None:
            row = {name: value.to(self.device) for name, value in load_file(self.files[caption]).items()}
        self._remember(caption, row)
        return row

    def __getitem__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The batched embeddings of ``captions`` (each (B, ...)), as ``encode`` would give them."""
        rows = [self._row(caption) for caption in captions]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
