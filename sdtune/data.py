"""Training data: find subject images and captions, turn them into batches, in a resumable order.

Instance folders are either a Hugging Face ``imagefolder`` dataset (images + ``metadata.jsonl`` with
``file_name`` and ``text``, as ``sdtune prep`` writes it), images with a ``.txt`` caption beside each, or plain
images that all share ``data.instance_prompt``.

The order of examples is a pure function of (seed, position in the stream), so a resumed run continues with
exactly the batch it would have seen, mid-epoch included, without replaying the loader.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


@dataclass
class Scan:
    """What a folder holds: usable examples, problems that stop a run, warnings that do not."""

    examples: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _decode(path: Path, resolution: int):
    """Upright sRGB RGB through the safe reader: allowed decoders only, decompression bombs refused."""
    from sdtune.images import read_image

    return read_image(path.read_bytes(), path.suffix, resolution, Image.MAX_IMAGE_PIXELS, (255, 255, 255))


def _unreadable(path: Path) -> str | None:
    from sdtune.images import Unreadable

    try:
        _decode(path, 64)
        return None
    except Unreadable as e:
        return str(e)
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def scan_instance_dir(
    instance_dir: str | Path, identifier: str, instance_prompt: str | None, key: str = "data.instance_dir"
) -> Scan:
    """Pair every image in ``instance_dir`` with its caption and check both."""
    folder = Path(instance_dir)
    scan = Scan()
    if not folder.is_dir():
        scan.problems.append(f"{key}: {folder} is not a folder; fix the path (or run `sdtune prep` to make one)")
        return scan
    images = list_images(folder)
    if not images:
        scan.problems.append(
            f"{key}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add 3-20 photos of the subject"
        )
        return scan

    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file_name"])] = str(row["text"])
            except (ValueError, KeyError, TypeError):
                scan.problems.append(
                    f"{key}: {metadata} line {n} is not a JSON object with file_name and text"
                )
        for name in captions:
            if not (folder / name).is_file():
                scan.problems.append(f"{key}: {metadata} names {name}, which is not in the folder")

    if metadata.is_file():
        # As datasets' imagefolder does: with a metadata.jsonl, images it does not list are not examples
        # (`sdtune prep`'s contact_sheet.jpg among them).
        unlisted = [p.name for p in images if p.name not in captions and p.name != "contact_sheet.jpg"]
        if unlisted:
            scan.warnings.append(f"not in metadata.jsonl, so not used: {', '.join(unlisted[:5])}"
                                 + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""))
        images = [p for p in images if p.name in captions]
    for path in list(images):
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            scan.problems.append(f"{key}: {path.name} is a link to a file outside the folder; refused")
            images.remove(path)
    for path in images:
        caption = captions.get(path.name)
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        if caption is None:
            caption = instance_prompt
        if caption is None:
            scan.problems.append(
                f"{key}: {path.name} has no caption; fix: set data.instance_prompt (e.g. 'a photo of "
                f"{identifier} dog') or give it one in metadata.jsonl"
            )
            continue
        if identifier not in caption.split() and identifier not in caption:
            scan.warnings.append(f"{path.name}: caption '{caption}' does not contain the identifier '{identifier}'")
        reason = _unreadable(path)
        if reason:
            scan.problems.append(f"{key}: cannot read {path.name} ({reason}); remove it or run `sdtune prep`")
            continue
        scan.examples.append(Example(path, caption))
    return scan


# --------------------------------------------------------------------------------------------------------
# Images -> tensors


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to ``resolution``."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def center_crop_top_left(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the centre crop taken after resizing, in resized pixels (SDXL conditions on it)."""
    w, h = resized_size(width, height, resolution)
    return (h - resolution) // 2, (w - resolution) // 2


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is seen (EXIF rotation applied), from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap the axes
            w, h = h, w
    return w, h


def load_image(path: Path, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Read, upright (EXIF), resize (Lanczos, shorter side = resolution) and crop one image.

    Returns (pixel_values (3, H, W) float in [-1, 1], original (h, w), crop top-left (y, x)).
    """
    decoded = _decode(path, resolution)
    im = decoded.image  # may be decoded smaller than the source (JPEG draft), never below `resolution`
    original_size = (decoded.size[1], decoded.size[0])
    w, h = resized_size(im.width, im.height, resolution)
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        top, left = rng.randint(0, h - resolution), rng.randint(0, w - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)


def tokenize(tokenizers: list, captions: list[str]) -> list[torch.Tensor]:
    """One (B, 77) id tensor per tokenizer, padded to the encoder's full context like training in diffusers."""
    return [
        tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        .input_ids
        for tok in tokenizers
    ]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item ``pos`` of an endless stream: instance example (and class example, with prior preservation).

    ``pos = epoch * len(self) + index``; the epoch only seeds per-example randomness (crop, flip).
    """

    def __init__(
        self,
        instance: list[Example],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        seed: int = 0,
        latents: dict[tuple[str, bool], torch.Tensor] | None = None,
    ):
        self.instance = instance
        self.class_images = class_images or []
        self.class_prompt = class_prompt
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.latents = latents  # (path, flip) -> cached latent distribution; then no pixels are decoded
        # As in diffusers' DreamBooth: one epoch covers every instance image (x repeats) and every class image.
        self.length = max(len(instance) * repeats, len(self.class_images))

    def __len__(self) -> int:
        return self.length

    def _example(self, path: Path, caption: str, pos: int, kind: str) -> dict:
        rng = random.Random(f"{self.seed}/{kind}/{pos}")
        flip = self.random_flip and rng.random() < 0.5
        if self.latents is not None:
            w, h = upright_size(path)
            return {"latent_params": self.latents[(str(path), flip)], "caption": caption, "original_size": (h, w),
                    "crop_top_left": center_crop_top_left(w, h, self.resolution), "path": str(path)}
        pixels, original_size, crop = load_image(path, self.resolution, self.center_crop, flip, rng)
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size, "crop_top_left": crop,
                "path": str(path)}

    def __getitem__(self, pos: int) -> dict:
        index = pos % self.length
        ex = self.instance[index % len(self.instance)]
        item = {"instance": self._example(ex.path, ex.caption, pos, "instance")}
        if self.class_images:
            item["class"] = self._example(self.class_images[index % len(self.class_images)], self.class_prompt or "",
                                          pos, "class")
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples, so one forward pass serves both (split by ``chunk(2)``)."""
    examples = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    key = "latent_params" if "latent_params" in examples[0] else "pixel_values"
    return {
        key: torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format),
        "captions": [e["caption"] for e in examples],
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
        "paths": [e["path"] for e in examples],
    }


class StreamBatchSampler(torch.utils.data.Sampler):
    """Endless batches over reshuffled epochs; this process's share of global micro-batch k onwards.

    Stream position p is (epoch p // n, shuffled index). Global micro-batch k holds positions
    [k * B * W, (k + 1) * B * W); process r takes slice r of width B. Starting at any k is O(1): that is
    what makes mid-epoch resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._perm_epoch, self._perm = -1, torch.arange(0)

    def position(self, p: int) -> int:
        epoch = p // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return epoch * self.n + int(self._perm[p % self.n])

    def batch(self, k: int) -> list[int]:
        first = (k * self.world_size + self.rank) * self.batch_size
        return [self.position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1
