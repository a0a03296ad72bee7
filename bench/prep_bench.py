"""Time ``sdtune prep`` on large phone-sized JPEGs: images/s per core, one JSON line per case.

Writes photo-like JPEGs (smooth colour fields, edges, sensor-like noise; 12 and 24 megapixels, quality 92,
some with an EXIF rotation) to a temporary folder, then runs the whole ``prep`` (read, crop, resize,
checks, PNG output, report and contact sheet) with one process and with every core.
``images_per_s_per_core`` is the figure the issue asks for (target: >= 8 at 12 MP -> 512).

    python bench/prep_bench.py                      # 12 and 24 MP, 512 and 1024 px, smart crop
    python bench/prep_bench.py --images 4 --megapixels 12 --resolutions 512   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {12: (4000, 3000), 24: (6000, 4000)}


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like picture: a smooth colour field, a few shapes with hard edges, and mild noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(h // 20, h // 5))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.normal(0, 5, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(field, np.float32) + noise, 0, 255).astype(np.uint8))


def make_sources(folder: Path, megapixels: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1  # half of them portrait via EXIF, as phones write them
        photo(SIZES[megapixels], seed=i).save(folder / f"IMG_{i:04d}.jpg", quality=92, exif=exif.tobytes())


def run(src: Path, out: Path, resolution: int, crop: str, workers: int) -> float:
    from sdtune.prep import prep

    start = time.perf_counter()
    prep(src, out, resolution=resolution, crop=crop, caption="a photo of sks dog", workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="source images per size")
    p.add_argument("--megapixels", type=int, nargs="+", choices=tuple(SIZES), default=[12, 24])
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--crop", default="smart")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="for the all-cores run")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdtune-prep-bench-") as tmp:
        for mp in args.megapixels:
            src = Path(tmp) / f"src-{mp}mp"
            make_sources(src, mp, args.images)
            for res in args.resolutions:
                for workers in sorted({1, args.workers}):
                    out = Path(tmp) / f"out-{mp}-{res}-{workers}"
                    run(src, out, res, args.crop, workers)  # warm-up: imports, page cache, worker start
                    seconds = run(src, out, res, args.crop, workers)
                    print(json.dumps({
                        "source_megapixels": mp, "resolution": res, "crop": args.crop, "workers": workers,
                        "images": args.images, "seconds": round(seconds, 3),
                        "images_per_s": round(args.images / seconds, 2),
                        "images_per_s_per_core": round(args.images / seconds / workers, 2),
                    }), flush=True)


if __name__ == "__main__":
    main()
