"""The technique table (issue #16): each training technique on and off in the micro world, at equal steps and
seeds, scored from pixels by the world's detector (``sdtune eval --metrics world``).

    .venv/bin/python bench/techniques.py                       # every technique, seeds 0 1 2, 400 steps
    .venv/bin/python bench/techniques.py --only baseline,ema --seeds 0 --steps 200   # a quick look

Each row trains ``recipes/micro_dreambooth.yaml`` (the demo: 8 photos of the subject toy, prior preservation)
with the technique's overrides, renders the held-out subject prompts and the class prompt at LoRA scale 1 for
the final LoRA, and reports the world's numbers: subject fidelity (higher is better), context (the parts of a
prompt that are not the subject drawn as asked; higher is better), class drift (the subject leaking into "a
photo of a toy"; lower is better) and the wall time of training. Mean and spread (sample standard deviation)
over the seeds. The table goes to ``bench/TECHNIQUES.md`` with the command that made it; a technique whose
numbers do not differ from the baseline's beyond the spread is marked so, plainly. CPU only, about 1.5 min per
run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDTUNE = [sys.executable, "-m", "sdtune"]

# name -> (what it is, the overrides that switch it on)
TECHNIQUES: dict[str, tuple[str, list[str]]] = {
    "baseline": ("AdamW, MSE, LoRA rank 16 (the demo recipe)", []),
    "prodigy": ("Prodigy, lr 1.0 (it finds the step size)", ["train.optimizer=prodigy", "train.learning_rate=1.0"]),
    "lion": ("Lion, lr 1e-4 (10x below AdamW's), beta2 0.99, decay 0.1",
             ["train.optimizer=lion", "train.learning_rate=1.0e-4", "train.adam_beta2=0.99", "train.weight_decay=0.1"]),
    "adafactor": ("Adafactor, fixed lr", ["train.optimizer=adafactor"]),
    "adamw_schedulefree": ("Schedule-Free AdamW, the baseline's lr 1e-3, 10 warm-up steps",
                           ["train.optimizer=adamw_schedulefree", "train.lr_scheduler=constant_with_warmup",
                            "train.lr_warmup_steps=10"]),
    "prodigy_schedulefree": ("Prodigy + Schedule-Free, lr 1.0, no clipping, beta2 0.99",
                             ["train.optimizer=prodigy_schedulefree", "train.learning_rate=1.0",
                              "train.max_grad_norm=0", "train.adam_beta2=0.99"]),
    "huber": ("Huber loss, SNR-scheduled threshold", ["train.loss=huber"]),
    "smooth_l1": ("smooth-L1 loss, SNR-scheduled threshold", ["train.loss=smooth_l1"]),
    "ema": ("EMA of the LoRA weights (decay 0.99)", ["train.ema=true", "train.ema_decay=0.99"]),
    "caption_dropout": ("10% empty captions", ["data.caption_dropout=0.1"]),
    "masked_loss": ("loss on the subject only (its NAME.mask.png)", ["data.masked_loss=true"]),
    "loha": ("LoHa (LyCORIS) in place of LoRA", ["lora.type=loha"]),
    "lokr": ("LoKr (LyCORIS) in place of LoRA", ["lora.type=lokr"]),
    "pivotal": ("pivotal tuning: 2 new tokens, random start, trained in the first half",
                ["pivotal.enabled=true"]),
    "pivotal_init": ("pivotal tuning: 2 new tokens starting at 'toy', first half",
                     ["pivotal.enabled=true", "pivotal.init=toy"]),
}
METRICS = (("subject", "subject ↑"), ("context", "context ↑"), ("class_subject", "class drift ↓"))


def run(cmd: list[str], log: Path) -> None:
    """Run one sdtune command, its output to ``log``; stop the bench with the log's tail if it fails."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def prepare(work: Path, log: Path) -> dict[str, str]:
    """The micro model, the subject's photos (prepped) and the class images, made once for every row."""
    model, photos, subject = work / "micro-model", work / "subject_photos", work / "subject"
    if not model.is_dir():
        run([*SDTUNE, "micro", "model", str(model)], log)
    if not subject.is_dir():
        # with masks (subject_XX.mask.png), which prep crops with their photos: the masked_loss row reads them
        run([*SDTUNE, "micro", "subject", str(photos), "--n", "8", "--masks"], log)
        run([*SDTUNE, "prep", str(photos), str(subject), "--resolution", "64", "--caption-from", "txt",
             "--workers", "1"], log)
    return {"model.pretrained": str(model), "data.instance_dir": str(subject),
            "prior.class_dir": str(work / "class_images")}


def one(name: str, seed: int, steps: int, base: dict[str, str], work: Path, log: Path) -> dict[str, float]:
    """Train and score one (technique, seed); reuses a finished row of an earlier call."""
    out = work / "runs" / f"{name}-s{seed}-{steps}"
    report = out / "eval" / "report.json"
    if not report.is_file():
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        overrides = [f"{k}={v}" for k, v in base.items()] + [
            f"train.output_dir={out}", f"train.seed={seed}", f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}", "sample.every=0", "train.report_to=none"]
        t0 = time.perf_counter()
        run([*SDTUNE, "train", "recipes/micro_dreambooth.yaml", *overrides, *TECHNIQUES[name][1]], log)
        (out / "bench_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        run([*SDTUNE, "eval", str(out), "--metrics", "world", "--lora-scale", "1", "--batch-size", "8"], log)
    data = json.loads(report.read_text())
    final = [r for r in data["rows"] if r["lora_scale"] == 1][-1]
    result = {key: float(final["metrics"][key]) for key, _ in METRICS}
    result["wall_s"] = float((out / "bench_wall_s.txt").read_text())
    return result


def cell(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def differs(values: list[float], baseline: list[float]) -> bool:
    """Whether two sets of per-seed numbers differ by more than their spread (or by anything, with one seed)."""
    gap = abs(statistics.fmean(values) - statistics.fmean(baseline))
    spread = max(statistics.stdev(values) if len(values) > 1 else 0.0,
                 statistics.stdev(baseline) if len(baseline) > 1 else 0.0)
    return gap > spread


def table(results: dict[str, list[dict[str, float]]], command: str, steps: int, seeds: list[int]) -> str:
    lines = [f"# Techniques in the micro world ({date.today().isoformat()}, CPU)", "",
             f"`{command}`", "",
             f"`recipes/micro_dreambooth.yaml`, {steps} steps, seeds {', '.join(map(str, seeds))}; final LoRA at "
             "scale 1, the world's held-out subject prompts and the class prompt; mean ± sample std over seeds. "
             "\"=\" marks a number within the spread of the baseline's (no effect measured).", "",
             "| technique | what | " + " | ".join(label for _, label in METRICS) + " | train wall s |",
             "|---|---|" + "---:|" * (len(METRICS) + 1)]
    base = results.get("baseline")
    for name, rows in results.items():
        cells = []
        for key, _ in METRICS:
            values = [r[key] for r in rows]
            same = base is not None and name != "baseline" and not differs(values, [r[key] for r in base])
            cells.append(cell(values) + (" =" if same else ""))
        lines.append(f"| {name} | {TECHNIQUES[name][0]} | " + " | ".join(cells)
                     + f" | {cell([r['wall_s'] for r in rows], 0)} |")
    lines += ["", "How to read it: every row runs the demo recipe's settings (learning rate 1e-3 and rank 16, tuned for "
              "AdamW and LoRA) with only the technique's own overrides, at equal steps: a row measures those settings, "
              f"not the technique at its best. {seeds_note(len(seeds))} The micro world's subject photos vary "
              "their backgrounds, so the leakage masked loss is for is small here to begin with."]
    return "\n".join(lines) + "\n"


def seeds_note(n: int) -> str:
    """What the table's seeds allow, from how many there were."""
    if n == 1:
        return ("One seed gives no spread: a mean cannot be trusted, and every gap to the baseline, however small, "
                "counts as an effect (no \"=\"); run --seeds 0,1,2 for a spread.")
    return (f"{n} seeds are few; the spread says how far a mean can be trusted, and the \"=\" rule (gap within the "
            "larger spread) is a coarse one." if n < 10 else
            f"Over {n} seeds the spread says how far a mean can be trusted; the \"=\" rule (gap within the larger "
            "spread) is a coarse one.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated techniques (default all: {','.join(TECHNIQUES)})")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--work", default=str(ROOT / ".cache" / "techniques"), help="where models and runs go")
    p.add_argument("--out", default=str(ROOT / "bench" / "TECHNIQUES.md"))
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(TECHNIQUES)
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown:
        sys.exit(f"--only: unknown technique(s) {', '.join(unknown)}; choose from {', '.join(TECHNIQUES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    # the commands run in ROOT (for recipes/...): paths the caller typed are resolved against the caller's
    # folder once, here, so that relative --work and --out name the same folders for the script and for them
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    base = prepare(work, log)
    results: dict[str, list[dict[str, float]]] = {}
    for name in names:
        for seed in seeds:
            row = one(name, seed, args.steps, base, work, log)
            results.setdefault(name, []).append(row)
            print(json.dumps({"technique": name, "seed": seed, **row}), flush=True)
    command = "python bench/techniques.py " + " ".join(sys.argv[1:])
    out.write_text(table(results, command.strip(), args.steps, seeds))
    print(f"table: {out}")


if __name__ == "__main__":
    main()
