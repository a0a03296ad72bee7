"""Caption dropout, tag shuffle, keep-first-N (data.caption_dropout, data.shuffle_tags, data.keep_tokens)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_DATA, overrides
from sdtune.config import load_config
from sdtune.data import CaptionRules, DreamBoothDataset, Example, collate, option_warnings
from sdtune.runs import WEIGHT_NAME

TAGS = "sks, toy, red, on a table, photo"


def test_shuffle_keeps_the_first_n_tags_and_every_tag():
    rules = CaptionRules(shuffle_tags=True, keep_tokens=2)
    seen = set()
    for seed in range(200):
        caption = rules.apply(" sks ,toy, red,, on a table , photo ", random.Random(seed))
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "toy"]  # kept in place
        assert sorted(tags) == sorted(
            ["sks", "toy", "red", "on a table", "photo"]
        )  # none dropped, no empty tag
        seen.add(caption)
    assert len(seen) == 6  # all 3! orders of the other tags occur
    # keep_tokens=0: the identifier moves, but is never shuffled out
    moved = [CaptionRules(shuffle_tags=True).apply(TAGS, random.Random(s)).split(", ") for s in range(200)]
    assert all("sks" in tags for tags in moved) and Counter(tags[0] for tags in moved)["sks"] < 100
    # a caption without commas is one tag: unchanged
    assert (
        CaptionRules(shuffle_tags=True).apply("a photo of sks toy", random.Random(0)) == "a photo of sks toy"
    )
    assert CaptionRules().apply(TAGS, random.Random(0)) == TAGS


def _dataset(n: int = 4, **rules) -> DreamBoothDataset:
    paths = sorted(DEMO_DATA.glob("toy_*.png"))[:n]
    # cached "latents" (zeros): the dataset then reads only image headers, so thousands of items are cheap
    latents = {(str(p), False, (64, 64)): torch.zeros(8, 8, 8) for p in paths}
    return DreamBoothDataset(
        [Example(p, TAGS) for p in paths],
        64,
        class_images=paths[:2],
        class_prompt="a photo of a toy, red",
        seed=7,
        latents=latents,
        captions=CaptionRules(**rules),
    )


def test_dropout_rate_and_kept_tags_over_steps():
    dataset = _dataset(dropout=0.3, shuffle_tags=True, keep_tokens=1)
    steps = 3000
    captions = [dataset[pos]["instance"]["caption"] for pos in range(steps)]
    dropped = sum(c == "" for c in captions) / steps
    assert abs(dropped - 0.3) < 0.04, dropped  # 4 standard deviations of a binomial at p=0.3
    kept = [c for c in captions if c]
    assert all(c.startswith("sks, ") for c in kept)
    assert len(set(kept)) == 24  # all 4! orders of the four other tags
    # the class caption (prior preservation) is never dropped or shuffled
    assert {dataset[pos]["class"]["caption"] for pos in range(200)} == {"a photo of a toy, red"}
    # a pure function of (seed, position): a resumed run sees the very same captions
    again = _dataset(dropout=0.3, shuffle_tags=True, keep_tokens=1)
    assert [again[pos]["instance"]["caption"] for pos in range(2999, -1, -1)] == captions[::-1]
    batch = collate([dataset[0], dataset[1]])
    assert batch["captions"][2:] == ["a photo of a toy, red"] * 2  # instance rows first, then class rows


def test_caption_rules_leave_crops_and_flips_unchanged():
    paths = sorted(DEMO_DATA.glob("toy_*.png"))[:2]
    plain = DreamBoothDataset(
        [Example(p, TAGS) for p in paths], 48, center_crop=False, random_flip=True, seed=3
    )
    ruled = DreamBoothDataset(
        [Example(p, TAGS) for p in paths],
        48,
        center_crop=False,
        random_flip=True,
        seed=3,
        captions=CaptionRules(0.5, True, 1),
    )
    for pos in range(6):
        a, b = plain[pos]["instance"], ruled[pos]["instance"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["crop_top_left"] == b["crop_top_left"]


def test_option_warnings():
    def data(**kw):
        base = dict(
            keep_tokens=0, shuffle_tags=False, unmasked_weight=0.0, masked_loss=False, caption_dropout=0.0
        )
        return type("D", (), {**base, **kw})()

    assert option_warnings(data()) == []
    assert "data.shuffle_tags=true" in option_warnings(data(keep_tokens=1))[0]
    assert "data.masked_loss=true" in option_warnings(data(unmasked_weight=0.5))[0]
    assert "every pixel weighs 1" in option_warnings(data(masked_loss=True, unmasked_weight=1.0))[0]
    assert "never trained" in option_warnings(data(caption_dropout=1.0))[0]


@pytest.fixture
def tagged(tmp_path) -> Path:
    """Four demo photos captioned with comma-separated tags."""
    folder = tmp_path / "tagged"
    folder.mkdir()
    rows = []
    for i in range(4):
        shutil.copy(DEMO_DATA / f"toy_0{i}.png", folder / f"toy{i}.png")
        rows.append({"file_name": f"toy{i}.png", "text": f"sks, toy, red, photo {i}, on a table"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


CASES = {
    # tags shuffled: captions are encoded in the step (no text cache)
    "shuffle": ["data.caption_dropout=0.5", "data.shuffle_tags=true", "data.keep_tokens=1"],
    # dropout alone: the text cache holds the empty caption too; prior preservation (class captions kept)
    "dropout_cached": [
        "data.caption_dropout=0.5",
        "prior.enabled=true",
        "prior.class_prompt=a photo of a toy",
        "prior.num_class_images=2",
        "prior.generation_steps=1",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_captions_reach_the_encoder_and_resume_is_bitwise(case, tiny_model, tmp_path, tagged, monkeypatch):
    from sdtune import train as train_module
    from sdtune.train import train

    seen: list[list[str]] = []
    conditioning = train_module.batch_conditioning

    def recording(run, batch):
        seen.append(list(batch["captions"]))
        return conditioning(run, batch)

    monkeypatch.setattr(train_module, "batch_conditioning", recording)
    common = [
        f"data.instance_dir={tagged}",
        "train.learning_rate=1e-3",
        f"prior.class_dir={tmp_path / 'class'}",
        *CASES[case],
    ]
    straight = tmp_path / "straight"
    train(load_config(None, overrides(tiny_model("sd15"), straight, "train.max_steps=6", *common)))
    instance = [c for batch in seen for c in batch if c != "a photo of a toy"]
    assert "" in instance and any(c for c in instance)  # some captions dropped, some not
    assert all(c == "" or c.startswith("sks, ") for c in instance)
    if case == "shuffle":
        assert len({c for c in instance if c}) > 1 and any(
            not c.endswith("on a table") for c in instance if c
        )
    else:
        assert sum(c == "a photo of a toy" for batch in seen for c in batch) >= 12  # every class row, intact

    split = tmp_path / "split"
    train(
        load_config(
            None,
            overrides(tiny_model("sd15"), split, "train.max_steps=6", "train.checkpoint_every=3", *common),
        )
    )
    shutil.rmtree(split / "checkpoints/step-000006")
    (split / WEIGHT_NAME).unlink()
    train(
        load_config(
            None, overrides(tiny_model("sd15"), split, "train.max_steps=6", "train.resume=latest", *common)
        )
    )
    assert [_losses(split)[k] for k in range(1, 7)] == [_losses(straight)[k] for k in range(1, 7)]
    a = load_file(straight / "checkpoints/step-000006/adapter-unet.safetensors")
    b = load_file(split / "checkpoints/step-000006/adapter-unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
