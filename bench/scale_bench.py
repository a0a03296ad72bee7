"""Scale (issue #19): prep, the latent cache and training over N synthetic images; one JSON line per N.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py                     # N = 100 and 1,000
    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py --sizes 1000,10000,100000 --out bench/SCALE.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py --sizes 100 --steps 10 --workers 1   # a quick look

For each N it writes N photo-like 96 x 96 JPEGs (a colour field, a few coloured shapes, mild noise; image i is
drawn from seed i, so every N shares the same first images; made once into ``WORK/photos`` and hard-linked
into ``WORK/src-N``), then runs, each as its own process, from the command line only:

1. ``sdtune prep WORK/src-N WORK/data-N --resolution 64 --crop center --caption "a photo of sks toy"`` (a
   fresh output every time);
2. ``sdtune train recipes/tiny_cpu.yaml`` on a tiny random SD1.x model (``sdtune random-model``, made once)
   over ``WORK/data-N``: STEPS steps, prior preservation off, latents cached into an empty cache folder of its
   own (``SDTUNE_CACHE=WORK/cache-N``), no checkpoints, no trackers, the smallest final grid: the first run;
3. the same run again into a new output folder with the same cache: the rerun (``--reruns K``: K times, one
   after another, each into a new folder; the row is the one with the median start-up, ``rerun_startups_s``
   lists them all: on a shared machine a single start-up can be off by a second).

How each figure is measured, from the outside:

- wall time: ``time.perf_counter`` around each process.
- peak RSS: ``os.wait4`` on the child's pid returns that one child's resource usage; its ``ru_maxrss`` is the
  largest resident set of the child (or of a process it started and waited for: for ``prep`` with several
  workers it is the largest single process, not their sum). Exact per child, no polling, no psutil.
- start-up (process start to the first training step): from the process's start (unix time, taken just before
  it is spawned) to the training loop's start, which the run records in its ``data_summary.json``
  (``training_started_at``: the loop's start as the end of the loop minus its ``wall_s``; it comes out later
  than the true start by the final checkpoint's save, milliseconds for the tiny model). It includes Python and
  torch imports, the checks, the model load and the latent cache. Where that file is missing: total wall
  minus the loop's ``wall_s`` (``train_summary.json``), which also counts the end (final LoRA files, grid).
- cache build: the first run's start-up minus the rerun's (the median one; same data, same model: the rerun
  finds every latent on disk). A cache that encodes lazily, during the steps, moves its cost out of the start-up and into the
  first run's steps: compare ``first_wall_s`` with ``rerun_wall_s`` and ``s_per_step`` with
  ``rerun_s_per_step`` then; ``cache_files`` counts what the first run left in the cache folder.
- s/step: ``train_summary.json``'s ``s_per_step`` (the steady state: timed from step min(10, STEPS / 2) on).

Targets (issue #19): peak RSS and s/step flat within 20% from 1,000 to 10,000 images; the rerun's start-up
under 10% of the first run's cache build. With ``--out FILE`` the rows go into a Markdown table there, with the
command, the date and those ratios. Each child's output goes to ``WORK/logs/`` (``n100-first.log``, ...); from
the train runs' "caching latents" progress bar come ``first_encoded`` and ``rerun_encoded``, the images each
encoded (0 where no bar was shown: the rerun should encode none). An N whose files would not fit on the disk
(about 25 KiB per image at 64 px measured: photo, prep output, latents, the runs; 32 KiB counted twice) is
skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SDTUNE = [sys.executable, "-m", "sdtune"]
CAPTION = "a photo of sks toy"
PHOTO_SIZE = 96
# ru_maxrss is in KiB on Linux, in bytes on macOS
RSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass
class Child:
    """One finished sdtune process as seen from outside."""

    started_at: float  # unix time just before it was spawned
    wall_s: float
    peak_rss_mib: float


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    """Run one sdtune command, its output to ``log`` (a new file); stop the bench with the log's tail if it
    fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        started_at, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        # wait4, not proc.wait(): it hands back this child's own rusage (RUSAGE_CHILDREN is every child's max)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = re.split(r"[\r\n]+", log.read_text(errors="replace").strip())[-15:]
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return Child(started_at, wall, usage.ru_maxrss * RSS_UNIT / 2**20)


def photo(seed: int) -> Image.Image:
    """A small photo-like picture: a smooth colour field, two to five coloured shapes, mild noise (so prep's
    blur and duplicate checks see distinct, sharp images)."""
    rng = np.random.default_rng(seed)
    size = PHOTO_SIZE
    field = Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((size, size),
                                                                                  Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = (int(v) for v in rng.integers((0, 0, size // 10), (size, size, size // 3)))
        box = (x - r, y - r, x + r, y + r)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noise = rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(field, np.float32) + noise, 0, 255).astype(np.uint8))


def make_sources(work: Path, n: int) -> Path:
    """``WORK/src-N``: hard links to the first N photos of ``WORK/photos``, each drawn once (reused later)."""
    pool, src = work / "photos", work / f"src-{n}"
    pool.mkdir(parents=True, exist_ok=True)
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"img_{i:06d}.jpg"
        if not (pool / name).is_file():
            tmp = pool / f".{name}"
            photo(i).save(tmp, format="JPEG", quality=92)
            os.replace(tmp, pool / name)  # an interrupted bench leaves no half-written photo behind
        if not (src / name).is_file():
            os.link(pool / name, src / name)
    return src


def fits_on_disk(work: Path, n: int, resolution: int) -> str | None:
    """None when N images' files fit twice over in the free space; else why not."""
    per_image = 32 * 1024 * max(1, (resolution // 64) ** 2)
    need, free = 2 * n * per_image, shutil.disk_usage(work).free
    return None if free >= need else f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def train_overrides(model: Path, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [f"model.pretrained={model}", f"data.instance_dir={data}", "data.identifier=sks",
            f"data.resolution={args.resolution}", "prior.enabled=false", f"train.output_dir={out}",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.checkpoint_every=0",
            "train.report_to=none", "train.cache_latents=true", "train.cache_text_embeddings=true",
            "sample.every=0", "sample.steps=2", "sample.seeds=[0]", f"sample.prompts=[{CAPTION}]"]


def encoded(log: Path) -> int:
    """Images the run encoded into the latent cache: the total of its "caching latents" bar (0 when none)."""
    totals = re.findall(r"caching latents:[^\r\n|]*\|[^|]*\|\s*\d+/(\d+)", log.read_text(errors="replace"))
    return max((int(t) for t in totals), default=0)


def train_once(model: Path, data: Path, out: Path, cache: Path, args: argparse.Namespace) -> dict:
    """One ``sdtune train`` into a fresh ``out`` with ``SDTUNE_CACHE=cache``: what it took, from outside and
    from its files."""
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "SDTUNE_CACHE": str(cache)}
    log = Path(args.work) / "logs" / f"{out.name}.log"
    child = run([*SDTUNE, "train", "recipes/tiny_cpu.yaml", *train_overrides(model, data, out, args)], log, env)
    summary = json.loads((out / "train_summary.json").read_text())
    record = out / "data_summary.json"
    started = json.loads(record.read_text()).get("training_started_at") if record.is_file() else None
    # the loop's start as the run recorded it; without it, everything but the loop counts (the end too)
    startup = started - child.started_at if started else child.wall_s - summary["wall_s"]
    return {"wall_s": child.wall_s, "peak_rss_mib": child.peak_rss_mib, "startup_s": startup,
            "s_per_step": summary["s_per_step"], "timed_steps": summary["timed_steps"],
            "loop_s": summary["wall_s"], "encoded": encoded(log)}


def cache_contents(cache: Path) -> tuple[int, float]:
    """(files, MiB) under the cache folder's ``latents``."""
    files = [f for f in (cache / "latents").rglob("*") if f.is_file()] if (cache / "latents").is_dir() else []
    return len(files), sum(f.stat().st_size for f in files) / 2**20


def one(n: int, model: Path, args: argparse.Namespace) -> dict:
    """Prep, first run and rerun over N images: the row."""
    work = Path(args.work)
    src, data, cache = make_sources(work, n), work / f"data-{n}", work / f"cache-{n}"
    for folder in (data, cache):  # a fresh prep output, and an empty cache so the first run builds it
        if folder.exists():
            shutil.rmtree(folder)
    workers = ["--workers", str(args.workers)] if args.workers else []
    prep = run([*SDTUNE, "prep", str(src), str(data), "--resolution", str(args.resolution), "--crop", "center",
                "--caption", CAPTION, *workers], work / "logs" / f"n{n}-prep.log")
    first = train_once(model, data, work / "runs" / f"n{n}-first", cache, args)
    files, mib = cache_contents(cache)
    reruns = [train_once(model, data, work / "runs" / f"n{n}-rerun{k + 1 if k else ''}", cache, args)
              for k in range(args.reruns)]
    startups = [r["startup_s"] for r in reruns]
    rerun = reruns[startups.index(statistics.median_low(startups))]
    build = first["startup_s"] - rerun["startup_s"]
    return {"n": n, "prep_s": round(prep.wall_s, 2), "prep_peak_rss_mib": round(prep.peak_rss_mib, 1),
            "first_startup_s": round(first["startup_s"], 2), "rerun_startup_s": round(rerun["startup_s"], 2),
            "rerun_startups_s": [round(t, 2) for t in startups],
            "cache_build_s": round(build, 2),
            "rerun_vs_build": round(rerun["startup_s"] / build, 3) if build > 0 else None,
            "peak_rss_mib": round(first["peak_rss_mib"], 1), "rerun_peak_rss_mib": round(rerun["peak_rss_mib"], 1),
            "s_per_step": round(first["s_per_step"], 4), "rerun_s_per_step": round(rerun["s_per_step"], 4),
            "timed_steps": first["timed_steps"], "first_wall_s": round(first["wall_s"], 2),
            "rerun_wall_s": round(rerun["wall_s"], 2), "first_encoded": first["encoded"],
            "rerun_encoded": rerun["encoded"], "cache_files": files, "cache_mib": round(mib, 2),
            "resolution": args.resolution, "steps": args.steps, "batch_size": args.batch_size,
            "omp_threads": os.environ.get("OMP_NUM_THREADS")}


COLUMNS = (("n", "N"), ("prep_s", "prep s"), ("prep_peak_rss_mib", "prep peak RSS MiB"),
           ("first_startup_s", "first start-up s"), ("cache_build_s", "cache build s"),
           ("rerun_startup_s", "rerun start-up s"), ("rerun_vs_build", "rerun / build"),
           ("peak_rss_mib", "train peak RSS MiB"), ("s_per_step", "s/step"), ("cache_files", "cache files"))


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as ratios of the rows at hand: met or not, plainly."""
    by_n = {r["n"]: r for r in rows if "skipped" not in r}
    lines = []
    if 1000 in by_n and 10000 in by_n:
        for key, what in (("peak_rss_mib", "training peak RSS"), ("s_per_step", "s/step")):
            ratio = by_n[10000][key] / by_n[1000][key]
            lines.append(f"- {what} at 10,000 / at 1,000 images: {ratio:.2f} "
                         f"({'met' if abs(ratio - 1) <= 0.2 else 'NOT met'}: flat within 20%)")
    smallest = min(by_n, default=None)
    for n, r in by_n.items():
        if r["rerun_vs_build"] is None:
            continue
        line = (f"- N = {n:,}: rerun start-up / cache build = {r['rerun_vs_build']:.2f} "
                f"({'met' if r['rerun_vs_build'] < 0.1 else 'NOT met'}: under 0.10)")
        if n != smallest and r["cache_build_s"] > 0:
            # most of a start-up (imports, model load) does not grow with N; this part does
            extra = r["rerun_startup_s"] - by_n[smallest]["rerun_startup_s"]
            line += (f"; the rerun's start-up beyond N = {smallest:,}'s: {extra:.2f} s, "
                     f"{extra / r['cache_build_s']:.2f} of the build")
        lines.append(line)
    return lines


def table(rows: list[dict], command: str, args: argparse.Namespace) -> str:
    lines = [f"# Scale: prep, latent cache and training over N images ({date.today().isoformat()}, CPU)", "",
             f"`{command}`", "",
             f"Synthetic {PHOTO_SIZE} px JPEGs, prep to {args.resolution} px, a tiny random SD1.x model, "
             f"{args.steps} steps at batch {args.batch_size}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
             "how each figure is measured: the docstring of `bench/scale_bench.py`.", "",
             "| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 2))
        else:
            lines.append("| " + " | ".join("" if r[k] is None else f"{r[k]:,}" for k, _ in COLUMNS) + " |")
    found = targets(rows)
    lines += ["", "Targets (issue #19):", *(found or ["- none measurable with these sizes"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,1000", help="comma-separated image counts, e.g. 100,1000,10000")
    p.add_argument("--work", default=str(ROOT / ".cache" / "scale"), help="photos, data, caches, runs and the log")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, help="sdtune prep --workers (default: prep's, every core)")
    p.add_argument("--reruns", type=int, default=1, help="reruns per N; the one with the median start-up is reported")
    p.add_argument("--out", help="also write the rows as a Markdown table to this file")
    args = p.parse_args()
    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    except ValueError:
        sys.exit(f"--sizes: '{args.sizes}' is not a comma list of counts; e.g. --sizes 100,1000,10000")
    work = Path(args.work).resolve()
    args.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model-sd15-tiny"
    if not (model / "model_index.json").is_file():
        run([*SDTUNE, "random-model", str(model), "--family", "sd15", "--size", "tiny"], work / "logs" / "model.log")
    rows = []
    for n in sizes:
        why = fits_on_disk(work, n, args.resolution)
        rows.append({"n": n, "skipped": why} if why else one(n, model, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        command = "python bench/scale_bench.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(table(rows, command, args))
        print(f"table: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
