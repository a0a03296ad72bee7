"""Shared fixtures: tiny random models (built once per test session) and an offline environment."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo_toy"
# Real photos (CC-BY 4.0), read in place, never copied into the repo; CI has ../shared beside the clone.
DREAMBENCH = Path(os.environ.get("SDTUNE_DREAMBENCH", ROOT.parent / "shared" / "data" / "dreambench"))


@pytest.fixture
def dreambench() -> Path:
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench photos not found at {DREAMBENCH} (set SDTUNE_DREAMBENCH)")
    return DREAMBENCH

# Offline, quiet, and nothing written to the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Under pytest-xdist (`make test` runs a worker per core, up to 4), each worker takes its share of the cores:
# torch's default, a thread per core in every worker, oversubscribes them. The subprocesses tests start (the CLI,
# accelerate launch) inherit the share through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    import torch

    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


# sdtune's library logs; the CLI prints those messages on stdout, and so do the tests that call the library
# directly (they assert on what a user would read).
from sdtune.cli.console import show_messages  # noqa: E402

show_messages()

# Library loggers keep a handle on the sys.stderr of the test that first used them, which pytest's capsys
# closes afterwards; a later log record would print a "--- Logging error ---" traceback into another
# test's captured stderr. That is an artefact of capturing, not an sdtune traceback.
logging.raiseExceptions = False


@pytest.fixture
def unreachable_hub(monkeypatch) -> list[str]:
    """A machine where the Hugging Face Hub does not answer (DNS fails) and the user set no offline variable:
    every HEAD raises as httpx does there. Returns the URLs asked (sdtune.hub probes once, then works offline)."""
    import httpx
    from huggingface_hub import constants

    from sdtune import hub

    heads: list[str] = []

    class NoNetwork:
        def head(self, url, timeout):
            heads.append(url)
            raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: NoNetwork())
    monkeypatch.setattr(hub, "_switched_offline", [])
    hub.offline_unless_reachable.cache_clear()
    yield heads
    hub.offline_unless_reachable.cache_clear()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "sdtune-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> folder of a tiny random pipeline of that family (built once)."""
    from sdtune.models import write_random_model

    built: dict[str, Path] = {}

    def get(family: str = "sd15") -> Path:
        if family not in built:
            built[family] = write_random_model(tmp_path_factory.mktemp(f"model-{family}") / "m", family, "tiny")
        return built[family]

    return get


def write_parquet(path: Path, columns: dict[str, list]) -> None:
    """A Parquet file of ``columns`` (a metadata.parquet, as datasets and pandas write them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    """A small, fast training run on the drawn demo subject."""
    return [
        f"model.pretrained={model}",
        f"data.instance_dir={DEMO_DATA}",
        "data.identifier=sks",
        "data.resolution=64",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.report_to=none",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "sample.steps=2",
        "sample.seeds=[0]",
        *extra,
    ]


def interrupted_and_resumed(model: Path, tmp_path: Path, steps: int, every: int, *common: str) -> tuple[Path, Path]:
    """(straight, split): a run of ``steps`` steps, and the same run "crashed" after its step-``every``
    checkpoint (the later checkpoint and the final LoRA gone), then resumed with ``train.resume=latest``."""
    from sdtune.config import load_config
    from sdtune.lora import WEIGHT_NAME
    from sdtune.train import train

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, overrides(model, straight, f"train.max_steps={steps}", *common)))
    train(load_config(None, overrides(model, split, f"train.max_steps={steps}", f"train.checkpoint_every={every}",
                                      *common)))
    shutil.rmtree(split / f"checkpoints/step-{steps:06d}")
    (split / WEIGHT_NAME).unlink()
    train(load_config(None, overrides(model, split, f"train.max_steps={steps}", "train.resume=latest", *common)))
    return straight, split


def assert_resumed_bitwise(straight: Path, split: Path, steps: int, component: str) -> None:
    """The resumed run logged the same loss at every step and ends with bitwise the same adapter."""
    import torch
    from safetensors.torch import load_file

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}

    assert [losses(split)[k] for k in range(1, steps + 1)] == [losses(straight)[k] for k in range(1, steps + 1)]
    a = load_file(straight / f"checkpoints/step-{steps:06d}/adapter-{component}.safetensors")
    b = load_file(split / f"checkpoints/step-{steps:06d}/adapter-{component}.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.fixture(scope="session")
def bucketed_toy(tmp_path_factory) -> Path:
    """The demo subject cut to portrait, landscape and square shapes, then `sdtune prep --crop bucket` at 64 px:
    an imagefolder of 48x80, 80x48, 64x64, 56x72, 72x56, 40x88 and 88x40 images captioned 'a photo of sks toy'."""
    from PIL import Image

    from sdtune.prep import prep

    src, out = tmp_path_factory.mktemp("mixed-src"), tmp_path_factory.mktemp("mixed") / "prepped"
    boxes = [(0, 0, 72, 120), (0, 0, 120, 72), (0, 0, 128, 128), (16, 0, 112, 128), (0, 16, 128, 112),
             (32, 0, 96, 128), (0, 32, 128, 96), (0, 0, 128, 128)]  # of 128 px squares: 3:5, 5:3, 1:1, 3:4, ...
    for i, box in enumerate(boxes):
        with Image.open(DEMO_DATA / f"toy_{i:02d}.png") as im:
            im.crop(box).save(src / f"toy{i}.png")
    prep(src, out, resolution=64, crop="bucket", caption="a photo of sks toy", workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model, tmp_path_factory):
    """A tiny sd15 run (one per test module) with checkpoints at steps 2 and 4, for sample and eval tests."""
    from sdtune.config import load_config
    from sdtune.train import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=4", "train.checkpoint_every=2",
                                      "train.learning_rate=1e-2", "data.instance_prompt=a photo of sks toy")))
    return out


@pytest.fixture
def requested(monkeypatch):
    """The sample requests the CLI would render (``sdtune sample``'s); nothing loads."""
    import sdtune.cli.sample
    import sdtune.sample

    seen = []

    def capture(req, out, **kwargs):
        seen.append(req)
        return Path(out), []

    monkeypatch.setattr(sdtune.sample, "run_sample", capture)
    monkeypatch.setattr(sdtune.cli.sample, "with_size", lambda settings, *a: settings)
    return seen
