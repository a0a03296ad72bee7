"""Training data: find subject images and captions, turn them into batches, in a resumable order.

Instance folders are either a Hugging Face ``imagefolder`` dataset (images + ``metadata.jsonl`` with
``file_name`` and ``text``, as ``sdtune prep`` writes it), images with a ``.txt`` caption beside each, or plain
images that all share ``data.instance_prompt``.

The order of examples is a pure function of (seed, position in the stream), so a resumed run continues with
exactly the batch it would have seen, mid-epoch included, without replaying the loader.

With aspect-ratio buckets (``data.aspect_buckets``) each instance image is trained at the bucket (w, h) of
``sdtune prep --crop bucket`` nearest its aspect ratio, its class image (prior preservation) at the same
size, and ``BucketBatchSampler`` builds batches of one bucket each, still as a pure function of (seed,
position).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.images import Unreadable, read_image
from sdtune.prep import nearest_bucket

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Size = tuple[int, int]  # (width, height) of a training crop, as PIL and `sdtune prep` write sizes


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
    return read_image(path.read_bytes(), path.suffix, resolution, Image.MAX_IMAGE_PIXELS, (255, 255, 255))


def _unreadable(path: Path) -> str | None:
    try:
        _decode(path, 64)
        return None
    except Unreadable as e:
        return str(e)
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _read_metadata(folder: Path, key: str, scan: Scan) -> dict[str, str] | None:
    """{file name: caption} from ``metadata.jsonl`` (None without one); bad lines become problems."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        return None
    captions: dict[str, str] = {}
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            scan.problems.append(f"{key}: {metadata} line {n} is not a JSON object with file_name and text")
    for name in captions:
        if not (folder / name).is_file():
            scan.problems.append(f"{key}: {metadata} names {name}, which is not in the folder")
    return captions


def _listed(images: list[Path], captions: dict[str, str], scan: Scan) -> list[Path]:
    """As datasets' imagefolder does: with a metadata.jsonl, images it does not list are not examples
    (`sdtune prep`'s contact_sheet.jpg among them)."""
    unlisted = [p.name for p in images if p.name not in captions and p.name != "contact_sheet.jpg"]
    if unlisted:
        scan.warnings.append(f"not in metadata.jsonl, so not used: {', '.join(unlisted[:5])}"
                             + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""))
    return [p for p in images if p.name in captions]


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
    captions = _read_metadata(folder, key, scan)
    if captions is not None:
        images = _listed(images, captions, scan)
    for path in images:
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            scan.problems.append(f"{key}: {path.name} is a link to a file outside the folder; refused")
            continue
        sidecar = path.with_suffix(".txt")
        caption = (captions or {}).get(path.name)
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        caption = caption if caption is not None else instance_prompt
        if caption is None:
            scan.problems.append(
                f"{key}: {path.name} has no caption; fix: set data.instance_prompt (e.g. 'a photo of "
                f"{identifier} dog') or give it one in metadata.jsonl"
            )
            continue
        if identifier not in caption:
            scan.warnings.append(f"{path.name}: caption '{caption}' does not contain the identifier '{identifier}'")
        reason = _unreadable(path)
        if reason:
            scan.problems.append(f"{key}: cannot read {path.name} ({reason}); remove it or run `sdtune prep`")
            continue
        scan.examples.append(Example(path, caption))
    return scan


# --------------------------------------------------------------------------------------------------------
# Images -> tensors


def _target(size: int | Size) -> Size:
    return (size, size) if isinstance(size, int) else size


def resized_size(width: int, height: int, size: int | Size) -> Size:
    """(w, h) after scaling, aspect kept, to just cover ``size``: a square side, or a bucket (w, h).
    For a square that scales the shorter side to it."""
    tw, th = _target(size)
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def center_crop_top_left(width: int, height: int, size: int | Size) -> tuple[int, int]:
    """(top, left) of the centre crop taken after resizing, in resized pixels (SDXL conditions on it)."""
    tw, th = _target(size)
    w, h = resized_size(width, height, (tw, th))
    return (h - th) // 2, (w - tw) // 2


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is seen (EXIF rotation applied), from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap the axes
            w, h = h, w
    return w, h


def load_image(path: Path, size: int | Size, center_crop: bool, flip: bool, rng: random.Random):
    """Read, upright (EXIF), resize (Lanczos, aspect kept, just covering ``size``) and crop one image to
    ``size``: a square side (the resolution) or a bucket (w, h).

    Returns (pixel_values (3, H, W) float in [-1, 1], original (h, w), crop top-left (y, x)).
    """
    tw, th = _target(size)
    # The resized image's shorter side is at most max(tw, th), so a decode (JPEG draft) that size is enough.
    decoded = _decode(path, max(tw, th))
    im = decoded.image
    original_size = (decoded.size[1], decoded.size[0])
    w, h = resized_size(im.width, im.height, (tw, th))
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
    im = im.crop((left, top, left + tw, top + th))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)


def assign_buckets(paths: list[Path], resolution: int, multiple: int = 1) -> list[Size]:
    """The training bucket (w, h) of each image: of ``sdtune prep --crop bucket``'s buckets at
    ``resolution`` whose sides are multiples of ``multiple``, the one nearest its upright aspect ratio."""
    return [nearest_bucket(upright_size(p), resolution, multiple) for p in paths]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item ``pos`` of an endless stream: instance example (and class example, with prior preservation).

    ``pos = epoch * len(self) + index``; the epoch only seeds per-example randomness (crop, flip).
    With ``buckets`` (one (w, h) per instance example) both examples of an item are centre crops of that
    bucket's size, whatever ``center_crop`` says; without, squares of ``resolution``.
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
        latents: dict[tuple[str, bool, Size], torch.Tensor] | None = None,
        buckets: list[Size] | None = None,
    ):
        if buckets is not None and len(buckets) != len(instance):
            raise ValueError(f"{len(buckets)} buckets for {len(instance)} instance examples")
        self.instance = instance
        self.class_images = class_images or []
        self.class_prompt = class_prompt
        self.resolution, self.random_flip, self.seed = resolution, random_flip, seed
        self.buckets = buckets
        # A bucket is the crop itself (chosen for the image's shape), and its latent is cached: no random crops.
        self.center_crop = center_crop or buckets is not None
        # (path, flip, (w, h)) -> the cached latent distribution as mean and std, (2C, h, w); then no pixels are decoded
        self.latents = latents
        self._upright: dict[Path, tuple[int, int]] = {}  # header reads, once per file rather than every step
        # As in diffusers' DreamBooth: one epoch covers every instance image (x repeats) and every class image.
        self.length = max(len(instance) * repeats, len(self.class_images))

    def __len__(self) -> int:
        return self.length

    def size(self, index: int) -> Size:
        """(w, h) of both examples of item ``index`` (any position with that index in the stream)."""
        index %= self.length
        return self.buckets[index % len(self.instance)] if self.buckets else (self.resolution, self.resolution)

    def targets(self) -> list[tuple[Path, Size]]:
        """Every distinct (image, size) an epoch uses, instance and class images: what a latent cache holds."""
        pairs = [(self.instance[i % len(self.instance)].path, self.size(i)) for i in range(self.length)]
        if self.class_images:
            pairs += [(self.class_images[i % len(self.class_images)], self.size(i)) for i in range(self.length)]
        return list(dict.fromkeys(pairs))

    def _example(self, path: Path, caption: str, pos: int, kind: str, size: Size) -> dict:
        rng = random.Random(f"{self.seed}/{kind}/{pos}")
        flip = self.random_flip and rng.random() < 0.5
        if self.latents is not None:
            if path not in self._upright:
                self._upright[path] = upright_size(path)
            w, h = self._upright[path]
            return {"latent_mean_std": self.latents[(str(path), flip, size)], "caption": caption,
                    "original_size": (h, w), "crop_top_left": center_crop_top_left(w, h, size),
                    "target_size": (size[1], size[0]), "path": str(path)}
        pixels, original_size, crop = load_image(path, size, self.center_crop, flip, rng)
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size, "crop_top_left": crop,
                "target_size": (size[1], size[0]), "path": str(path)}

    def __getitem__(self, pos: int) -> dict:
        index = pos % self.length
        size = self.size(index)
        ex = self.instance[index % len(self.instance)]
        item = {"instance": self._example(ex.path, ex.caption, pos, "instance", size)}
        if self.class_images:
            # The class image is cropped to its instance example's size, so the whole batch has one shape.
            item["class"] = self._example(self.class_images[index % len(self.class_images)], self.class_prompt or "",
                                          pos, "class", size)
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples, so one forward pass serves both (split by ``chunk(2)``)."""
    examples = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    key = "latent_mean_std" if "latent_mean_std" in examples[0] else "pixel_values"
    return {
        key: torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format),
        "captions": [e["caption"] for e in examples],
        # each crop's original (h, w) + top-left (y, x) + target (h, w) as one (B, 6) tensor: the loader pins
        # it, so a model that conditions on it (SDXL) gets it on the device without a blocking copy
        "geometry": torch.tensor([[*e["original_size"], *e["crop_top_left"], *e["target_size"]] for e in examples],
                                 dtype=torch.float32),
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


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches that never mix aspect-ratio buckets; this process's share from global micro-batch k on.

    ``buckets[i]`` is dataset index i's bucket (any hashable, e.g. its (w, h)). Epoch e, a pure function of
    (seed, e): each bucket's indices are shuffled and cut into batches of ``batch_size`` (a short last batch
    is filled from the start of the same bucket, so an example may appear twice in an epoch), then the order
    of all the batches is shuffled. The epoch has the same number M of batches every time, so the stream of
    batches is (epoch j // M, batch j % M), and process r of W takes batches r, r + W, r + 2W, ... as its
    micro-batches 0, 1, 2, ...: global micro-batch k is stream batch k * W + r. Starting at any k costs one
    epoch's shuffle, which is what makes mid-epoch resume exact. Positions are ``epoch * n + index``, as
    ``DreamBoothDataset`` expects.
    """

    def __init__(self, buckets: list[Hashable], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.n, self.batch_size, self.seed = len(buckets), batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        members: dict[Hashable, list[int]] = {}
        for i, b in enumerate(buckets):
            members.setdefault(b, []).append(i)
        # In order of first appearance: the shuffles below must not depend on how buckets sort or hash.
        self.members: list[list[int]] = list(members.values())
        self.batches_per_epoch = sum(math.ceil(len(m) / batch_size) for m in self.members)
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s batches of stream positions, in training order (cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for members in self.members:
                order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
                for first in range(0, len(order), self.batch_size):
                    # wraps around to the bucket's start for the last batch (more than once if the bucket is tiny)
                    batches.append([epoch * self.n + order[j % len(order)]
                                    for j in range(first, first + self.batch_size)])
            perm = torch.randperm(len(batches), generator=g).tolist()
            self._batches, self._epoch = [batches[i] for i in perm], epoch
        return self._batches

    def batch(self, k: int) -> list[int]:
        j = k * self.world_size + self.rank
        return self.epoch_batches(j // self.batches_per_epoch)[j % self.batches_per_epoch]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1
