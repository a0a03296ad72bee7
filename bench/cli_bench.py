"""Time ``sdtune --help`` and ``sdtune CMD --help``: wall seconds per call (best and median of N fresh
processes) and which deep-learning libraries each imported. One JSON line per command.

    python bench/cli_bench.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")
PROBE = ("import sys\nfrom sdtune.cli import main\nmain({argv!r})\n"
         "print('IMPORTED', [m for m in {heavy!r} if m in sys.modules])")


def measure(argv: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdtune", *argv], capture_output=True, check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                           text=True, check=True, cwd=ROOT)
    imported = probe.stdout.rsplit("IMPORTED", 1)[-1].strip()
    return {"command": " ".join(["sdtune", *argv]), "best_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3), "heavy_imports": json.loads(imported.replace("'", '"'))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["eval", "--help"], ["export", "--help"]):
        print(json.dumps(measure(argv, args.runs)))


if __name__ == "__main__":
    main()
