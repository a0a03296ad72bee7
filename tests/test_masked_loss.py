"""Masked loss (data.masked_loss, data.unmasked_weight): masks from alpha or NAME.mask.png, through crops,
flips, buckets and the latent cache, into the step's loss; `sdtune prep` writes NAME.mask.png."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import DEMO_DATA, overrides
from sdtune.config import ConfigError, load_config
from sdtune.data import DreamBoothDataset, Example, MaskRules, collate, load_example, scan_instance_dir
from sdtune.prep import prep
from sdtune.train import training_step

RED, GREEN, WHITE = (220, 40, 40), (40, 170, 60), (255, 255, 255)


# --------------------------------------------------------------------------------------------------------
# The step


class _Objective:
    """Fixed noise; noisy = latents + noise; the target is the noise; no min-SNR weights."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def sample(self, latents, generator):
        return self.noise, torch.zeros(latents.shape[0], dtype=torch.long)

    def add_noise(self, latents, noise, timesteps):
        return latents + noise

    def target(self, latents, noise, timesteps):
        return noise

    def loss_weights(self, timesteps):
        return None


def _step(latents, noise, **kw):
    family = SimpleNamespace(predict=lambda denoiser, x, t, c: denoiser(x))
    return training_step(lambda x: 0.5 * x, family, _Objective(noise), latents, {}, torch.Generator(), **kw)


def test_the_loss_of_an_example_is_its_masked_mean():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 3, 2, 3, generator=g), torch.randn(4, 3, 2, 3, generator=g)
    mask = torch.rand(4, 1, 2, 3, generator=g)
    mask[2:] = 1.0  # class rows (prior preservation) weigh 1
    pred, target = (0.5 * (latents + noise)).double().numpy(), noise.double().numpy()
    m = mask.double().numpy()
    by_hand = []
    for b in range(4):  # sum over channels and pixels of weight * squared error, over the element count
        total = sum(
            m[b, 0, i, j] * (pred[b, c, i, j] - target[b, c, i, j]) ** 2
            for c in range(3)
            for i in range(2)
            for j in range(3)
        )
        by_hand.append(total / (3 * 2 * 3))
    out = _step(latents, noise, loss_mask=mask, prior_preservation=True, prior_loss_weight=0.5)
    assert out.instance_loss.item() == pytest.approx((by_hand[0] + by_hand[1]) / 2, rel=1e-6)
    assert out.prior_loss.item() == pytest.approx((by_hand[2] + by_hand[3]) / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx(out.instance_loss.item() + 0.5 * out.prior_loss.item(), rel=1e-6)
    # weight 1 everywhere is bitwise the unmasked loss; weight 0 everywhere is no loss
    assert torch.equal(
        _step(latents, noise, loss_mask=torch.ones(4, 1, 2, 3)).loss, _step(latents, noise).loss
    )
    assert _step(latents, noise, loss_mask=torch.zeros(4, 1, 2, 3)).loss.item() == 0.0


# --------------------------------------------------------------------------------------------------------
# Masks through crops, flips and buckets


def _subject(draw: ImageDraw.ImageDraw, fill) -> None:
    """An asymmetric subject in a 120x80 frame: a block right of centre and a bar at the top left."""
    draw.rectangle((70, 12, 108, 60), fill=fill)
    draw.rectangle((8, 4, 50, 14), fill=fill)


def _alpha_image(path: Path) -> Path:
    """RGBA: red subject, opaque; elsewhere green but fully transparent (read as white)."""
    im = Image.new("RGBA", (120, 80), (*GREEN, 0))
    _subject(ImageDraw.Draw(im), (*RED, 255))
    im.save(path)
    return path


def _masked_image(path: Path) -> Path:
    """RGB: red subject on green, and NAME.mask.png beside it at twice the size (white = subject)."""
    im = Image.new("RGB", (120, 80), GREEN)
    _subject(ImageDraw.Draw(im), RED)
    im.save(path)
    mask = Image.new("L", (120, 80), 0)
    _subject(ImageDraw.Draw(mask), 255)
    mask.resize((240, 160), Image.Resampling.NEAREST).save(path.with_name(path.stem + ".mask.png"))
    return path


def _agrees(pixels: torch.Tensor, mask: torch.Tensor, background: tuple[int, int, int]) -> None:
    """Where the mask is surely 1 (in a 7x7 neighbourhood) the pixel is the subject's red; where surely 0, the
    background. Edges are left out: Lanczos (pixels) and bilinear (mask) blur them differently."""
    sure_in = -F.max_pool2d(-mask[None], 7, 1, 3)[0, 0] > 0.99  # (H, W)
    sure_out = F.max_pool2d(mask[None], 7, 1, 3)[0, 0] < 0.01
    assert sure_in.sum() > 20 and sure_out.sum() > 20
    rgb = ((pixels + 1) * 127.5).permute(1, 2, 0)  # (H, W, 3) in 0..255
    assert torch.allclose(rgb[sure_in], torch.tensor(RED, dtype=torch.float32), atol=3)
    assert torch.allclose(rgb[sure_out], torch.tensor(background, dtype=torch.float32), atol=3)


@pytest.mark.parametrize("source", ["alpha", "file"])
def test_the_mask_follows_crops_flips_and_buckets(source, tmp_path):
    path = _alpha_image(tmp_path / "a.png") if source == "alpha" else _masked_image(tmp_path / "a.png")
    background = WHITE if source == "alpha" else GREEN
    placements = set()
    for size, center_crop, flip, seed in [
        (64, True, False, 0),
        (64, True, True, 0),
        (48, False, False, 1),
        (48, False, True, 2),
        (48, False, False, 3),
        ((80, 48), True, True, 0),
        ((48, 80), True, False, 0),
        ((56, 40), False, True, 4),
    ]:
        pixels, _, crop, mask = load_example(path, size, center_crop, flip, random.Random(seed), masked=True)
        assert (
            mask is not None and mask.shape == (1, *pixels.shape[1:]) and 0 <= mask.min() <= mask.max() <= 1
        )
        _agrees(pixels, mask, background)
        placements.add((crop, flip))
        # the pixels are exactly what load_image gives (masks change nothing else)
        again, _, _, none = load_example(path, size, center_crop, flip, random.Random(seed), masked=False)
        assert torch.equal(again, pixels) and none is None
    assert len(placements) >= 6  # crops and flips really differed


def _examples(folder: Path) -> list[Example]:
    masked = _alpha_image(folder / "a.png")
    plain = folder / "b.png"
    Image.new("RGB", (120, 80), GREEN).save(plain)
    return [Example(masked, "a photo of sks toy"), Example(plain, "a photo of sks toy")]


def test_loss_weights_on_the_latent_grid_cached_or_not(tmp_path):
    examples = _examples(tmp_path)
    cls = DEMO_DATA / "toy_00.png"
    rules = MaskRules(unmasked_weight=0.25, latent_factor=8)
    dataset = DreamBoothDataset(
        examples, 64, class_images=[cls], class_prompt="a photo of a toy", masks=rules
    )
    first, second = dataset[0], dataset[1]
    weights = first["instance"]["loss_mask"]
    mask = load_example(examples[0].path, 64, True, False, random.Random(0), masked=True)[3]
    assert weights.shape == (1, 8, 8)
    assert torch.allclose(weights, 0.25 + 0.75 * F.avg_pool2d(mask[None], 8)[0])  # area mean, then the weight
    assert weights.min() == pytest.approx(0.25) and weights.max() == pytest.approx(1.0)
    assert torch.equal(second["instance"]["loss_mask"], torch.ones(1, 8, 8))  # no mask: weight 1
    assert torch.equal(first["class"]["loss_mask"], torch.ones(1, 8, 8))  # prior preservation: unmasked
    batch = collate([first, second])
    assert batch["loss_mask"].shape == (4, 1, 8, 8) and torch.equal(batch["loss_mask"][0], weights)

    # cached latents: no pixels decoded per step, the same weights (the centre crop the cache encoded)
    latents = {
        (str(p), flip, (64, 64)): torch.zeros(8, 8, 8)
        for p in [e.path for e in examples] + [cls]
        for flip in (False, True)
    }
    cached = DreamBoothDataset(
        examples,
        64,
        random_flip=True,
        class_images=[cls],
        class_prompt="a photo of a toy",
        latents=latents,
        masks=rules,
    )
    uncached = DreamBoothDataset(
        examples, 64, random_flip=True, class_images=[cls], class_prompt="a photo of a toy", masks=rules
    )
    placed = set()
    for pos in range(0, 16, 2):  # image a.png (position 2k)
        a, b = cached[pos]["instance"], uncached[pos]["instance"]
        assert "pixel_values" not in a and torch.equal(a["loss_mask"], b["loss_mask"])
        placed.add(tuple(a["loss_mask"].flatten().tolist()))
    assert len(placed) == 2  # flipped and not: the subject is not symmetric
    # buckets: the weights have the bucket's latent shape
    bucketed = DreamBoothDataset(examples, 64, buckets=[(80, 48), (80, 48)], masks=rules)
    assert bucketed[0]["instance"]["loss_mask"].shape == (1, 6, 10)


# --------------------------------------------------------------------------------------------------------
# The scan and the plan


def test_scan_reads_masks_never_trains_on_them_and_names_images_without(tmp_path):
    _alpha_image(tmp_path / "a.png")
    _masked_image(tmp_path / "b.png")
    Image.new("RGB", (120, 80), GREEN).save(tmp_path / "c.png")
    Image.new("RGB", (120, 80), GREEN).save(tmp_path / "d.png")
    Image.new("L", (80, 80), 255).save(tmp_path / "d.mask.png")  # square mask of a 3:2 image
    Image.new("L", (120, 80), 255).save(tmp_path / "orphan.mask.png")
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks toy")
    assert [e.path.name for e in scan.examples] == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
    ]  # masks are not images
    assert not scan.problems and len(scan.warnings) == 1 and "orphan.mask.png" in scan.warnings[0]

    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks toy", masked_loss=True)
    assert len(scan.problems) == 1 and "mask d.mask.png: it is 80x80 px, its image 120x80" in scan.problems[0]
    missing = [w for w in scan.warnings if "have no mask" in w]
    assert (
        len(missing) == 1
        and "c.png" in missing[0]
        and "a.png" not in missing[0]
        and "b.png" not in missing[0]
    )


def test_images_without_a_mask_are_a_plan_warning_or_a_strict_problem(tiny_model, tmp_path):
    from sdtune.plan import check_run

    data = tmp_path / "data"
    data.mkdir()
    _examples(data)
    cfg = load_config(
        None,
        overrides(
            tiny_model("sd15"),
            tmp_path / "out",
            f"data.instance_dir={data}",
            "data.instance_prompt=a photo of sks toy",
            "data.masked_loss=true",
        ),
    )
    plan = check_run(cfg)
    assert any("have no mask" in w and "b.png" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match=r"b\.png.*--strict"):
        check_run(cfg, strict=True)
    # mask files are data too: a resume's fingerprint sees one edited since its checkpoint
    mask = data / "b.mask.png"
    Image.new("L", (120, 80), 0).save(mask)
    before = check_run(cfg).data
    assert "b.mask.png" in before
    Image.new("L", (120, 80), 255).save(mask)
    from sdtune.resume import data_drift

    assert data_drift(before, check_run(cfg).data) == ["content changed: b.mask.png"]


# --------------------------------------------------------------------------------------------------------
# sdtune prep


def test_prep_writes_a_mask_for_a_source_with_transparency(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _alpha_image(src / "cut_out.png")
    Image.new("RGB", (120, 80), GREEN).save(src / "photo.jpg")
    report = prep(
        src, out, resolution=64, crop="center", caption="a photo of sks toy", workers=1, progress=False
    )
    rows = {r["source"]: r for r in report["files"]}
    assert rows["cut_out.png"]["mask"] == "001.mask.png" and "mask" not in rows["photo.jpg"]
    assert report["summary"]["masks"] == 1
    assert json.loads((out / "prep_report.json").read_text())["files"] == report["files"]
    with Image.open(out / "001.png") as im, Image.open(out / "001.mask.png") as mask:
        assert mask.mode == "L" and mask.size == im.size
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(
            2, 0, 1
        )
        _agrees(pixels, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None], WHITE)
    assert [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()] == [
        "001.png",
        "002.png",
    ]  # the mask is not a training image
    scan = scan_instance_dir(out, "sks", None, masked_loss=True)
    assert [e.path.name for e in scan.examples] == ["001.png", "002.png"] and not scan.problems
    assert [w for w in scan.warnings if "have no mask" in w and "002.png" in w and "001.png" not in w]
    # prep again into the same folder: its own masks are not someone else's files
    prep(src, out, resolution=64, crop="center", caption="a photo of sks toy", workers=1, progress=False)
    assert (out / "001.mask.png").is_file()
    # an output named like a mask would be read as one: renamed, and said so
    shutil.copy(src / "cut_out.png", src / "shot.mask.png")
    report = prep(
        src,
        tmp_path / "out2",
        resolution=64,
        crop="center",
        caption="a photo of sks toy",
        rename="{stem}",
        workers=1,
        progress=False,
    )
    outputs = {r["source"]: r for r in report["files"]}
    assert outputs["shot.mask.png"]["output"] == "shot_mask.png"
    assert outputs["shot.mask.png"]["mask"] == "shot_mask.mask.png"


def test_prep_crops_a_source_mask_with_its_image(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _masked_image(src / "photo.png")  # photo.mask.png beside it, at twice its size
    Image.new("RGB", (120, 80), GREEN).save(src / "other.png")
    Image.new("L", (80, 80), 255).save(src / "other.mask.png")  # the wrong shape: not used, and said so
    report = prep(
        src, out, resolution=64, crop="center", caption="a photo of sks toy", workers=1, progress=False
    )
    rows = {r["source"]: r for r in report["files"]}
    assert (
        rows["photo.mask.png"]["status"] == "ignored"
        and "the mask of photo.png" in rows["photo.mask.png"]["reason"]
    )
    assert rows["photo.png"]["mask"] == "002.mask.png" and "mask" not in rows["other.png"]
    assert any("mask other.mask.png not used" in w for w in rows["other.png"]["warnings"])
    with Image.open(out / "002.png") as im, Image.open(out / "002.mask.png") as mask:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(
            2, 0, 1
        )
        _agrees(pixels, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None], GREEN)
    assert sorted(p.name for p in out.glob("*.png")) == ["001.png", "002.mask.png", "002.png"]


# --------------------------------------------------------------------------------------------------------
# Training


@pytest.fixture
def cut_outs(tmp_path) -> Path:
    """Four demo photos, transparent outside a centred disc (the "subject"), prepared by `sdtune prep`."""
    src = tmp_path / "cutouts"
    src.mkdir()
    for i in range(4):
        with Image.open(DEMO_DATA / f"toy_0{i}.png") as im:
            rgba = im.convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        w, h = rgba.size
        ImageDraw.Draw(alpha).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
        rgba.putalpha(alpha)
        rgba.save(src / f"toy{i}.png")
    out = tmp_path / "prepped"
    prep(src, out, resolution=64, crop="center", caption="a photo of sks toy", workers=1, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_training_weights_the_loss_by_the_masks(cached, tiny_model, tmp_path, cut_outs, monkeypatch):
    from sdtune import train as train_module

    seen: list[torch.Tensor | None] = []
    step = train_module.training_step

    def recording(*args, **kwargs):
        seen.append(kwargs.get("loss_mask"))
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", recording)
    extra = [] if cached else ["data.center_crop=false"]
    train_module.train(
        load_config(
            None,
            overrides(
                tiny_model("sd15"),
                tmp_path / "run",
                f"data.instance_dir={cut_outs}",
                "data.masked_loss=true",
                "data.unmasked_weight=0.1",
                "data.random_flip=true",
                "prior.enabled=true",
                "prior.class_prompt=a photo of a toy",
                "prior.num_class_images=2",
                "prior.generation_steps=1",
                f"prior.class_dir={tmp_path / 'class'}",
                *extra,
            ),
        )
    )
    masks = [
        m for m in seen[:4] if m is not None
    ]  # the loop's steps (the health probe after them passes none)
    assert len(masks) == 4
    for m in masks:
        assert m.shape[:2] == (4, 1) and m.dtype == torch.float32  # 2 instance rows, then 2 class rows
        assert m[:2].min() == pytest.approx(0.1) and m[:2].max() == pytest.approx(1.0)
        assert torch.equal(m[2:], torch.ones_like(m[2:]))
