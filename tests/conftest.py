"""Shared fixtures: tiny random models (built once per test session) and an offline environment."""

from __future__ import annotations

import logging
import os
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


# Library loggers keep a handle on the sys.stderr of the test that first used them, which pytest's capsys
# closes afterwards; a later log record would print a "--- Logging error ---" traceback into another
# test's captured stderr. That is an artefact of capturing, not an sdtune traceback.
logging.raiseExceptions = False


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
