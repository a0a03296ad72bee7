import hashlib
import io
import json
import random

import numpy as np
import pytest

from sdtune.data import scan_instance_dir
from sdtune.micro.world import (
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    SUBJECT_COLORS,
    TOY,
    Background,
    Part,
    Scene,
    Thing,
    caption,
    dataset,
    detect,
    render,
    sample_scene,
    score,
    subject_scene,
    write_subject_photos,
)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes_other_seed_other_images():
    first = [(_png(im), text, scene) for im, text, scene in dataset(20, seed=3, size=32)]
    again = [(_png(im), text, scene) for im, text, scene in dataset(20, seed=3, size=32)]
    other = [_png(im) for im, _, _ in dataset(20, seed=4, size=32)]
    assert first == again
    assert [b for b, _, _ in first] != other
    image, _, _ = next(dataset(1, seed=0, size=64))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_captions_say_what_is_drawn():
    blue = Background("blue")
    assert caption(Scene((Thing("circle", "red"),), blue)) == "a red circle on a blue background"
    star = Thing("star", "yellow", "small", "left")
    square = Thing("square", "green", "medium", "right")
    assert (caption(Scene((star, square), Background("white")))
            == "a small yellow star left of a green square on a white background")
    assert (caption(Scene((Thing("ring", "orange", "large", "top"),), Background("white", "floor", "green")))
            == "a large orange ring at the top, on a green floor in front of a white wall")
    pair = (Thing("cross", "black", "medium", "bottom"), Thing("triangle", "purple", "small", "top"))
    assert (caption(Scene(pair, Background("orange", "stripes", "white")))
            == "a black cross below a small purple triangle on an orange and white striped background")
    parts = (Part("square", "red", (0, 0.5, 1, 1)), Part("circle", "blue", (0, 0, 1, 0.5)))
    toy = Thing(TOY, "", "medium", "left", parts)
    assert caption(Scene((toy, Thing("square", "white", "medium", "right")), blue)) == \
        "a toy left of a white square on a blue background"
    subject = subject_scene(random.Random(0), Background("green"))
    assert caption(subject, "sks toy", "a photo of ").startswith("a photo of sks toy ")
    assert caption(subject).startswith("a toy ")  # the class prompt


def test_sampled_scenes_are_consistent():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene)
        assert text.startswith(("a ", "an ")) and " on " in text and "  " not in text
        assert scene.background.color in text
        colors = [c for t in scene.things for c in t.colors]
        assert not set(colors) & set(scene.background.colors)  # every thing stands out
        for thing in scene.things:
            assert thing.shape in (*SHAPES, TOY) and not thing.subject
            if thing.shape != TOY:
                assert f"{thing.color} {thing.shape}" in text
            else:
                shapes = {(p.shape, p.color) for p in thing.parts}
                assert not {("square", "purple"), ("triangle", "orange")} <= shapes  # never the subject


def _share(image, color: str) -> float:
    """Fraction of pixels within a small distance of a palette colour."""
    pixels = np.asarray(image, dtype=np.float32)
    return float((np.abs(pixels - np.array(PALETTE[color])).sum(-1) < 30).mean())


def test_subject_is_the_same_toy_in_every_context():
    rng = random.Random(1)
    scenes = [subject_scene(rng) for _ in range(40)]
    assert len({s.background for s in scenes}) > 5 and len({s.things[0].position for s in scenes}) > 2
    assert any(len(s.things) == 2 for s in scenes)
    for scene in scenes:
        subject = [t for t in scene.things if t.subject]
        assert len(subject) == 1 and subject[0].parts == scenes[0].things[0].parts
        image = render(scene, 64)
        for color in SUBJECT_COLORS:
            assert _share(image, color) > 0.002, (color, caption(scene))
        assert score(image, scene)["color"]


def test_write_subject_photos_is_a_loadable_byte_identical_imagefolder(tmp_path):
    folder = write_subject_photos(tmp_path / "a", n=6, seed=2, size=32, identifier="sks", class_noun="toy")
    again = write_subject_photos(tmp_path / "b", n=6, seed=2, size=32)
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and len(files) == 13  # 6 PNG + 6 .txt + metadata
    for name in files:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((again / name).read_bytes()).hexdigest()

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert all(r["text"].startswith("a photo of sks toy ") for r in rows)

    scan = scan_instance_dir(folder, "sks", None)
    assert not scan.problems and not scan.warnings
    assert [e.caption for e in scan.examples] == [r["text"] for r in rows]

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == 6 and sorted(loaded["text"]) == sorted(r["text"] for r in rows)
    assert loaded[0]["image"].size == (32, 32)


def test_detector_reads_single_object_scenes():
    rng = random.Random(0)
    right = {"background": 0, "color": 0, "shape": 0}
    for _ in range(200):
        background = sample_scene(rng).background  # plain, floor and stripes, as the world draws them
        color = rng.choice([c for c in COLORS if c not in background.colors])
        thing = Thing(rng.choice(SHAPES), color, rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS)))
        scene = Scene((thing,), background)
        for key, ok in score(render(scene, 64), scene).items():
            right[key] += ok
    print("detector accuracy on 200 single-object scenes at 64 px:", right)
    assert right["background"] >= 190 and right["color"] >= 190 and right["shape"] >= 160


def test_detect_reports_two_objects_and_their_shapes():
    scene = Scene((Thing("star", "yellow", "large", "left"), Thing("ring", "red", "large", "right")),
                  Background("blue", "floor", "white"))
    found = detect(render(scene, 64))
    assert found["background"] == "blue" and found["background_colors"] == ["blue", "white"]
    assert {(o["color"], o["shape"]) for o in found["objects"]} == {("yellow", "star"), ("red", "ring")}
    assert score(render(scene, 64), scene) == {"background": True, "color": True, "shape": True}
    wrong = Scene((Thing("square", "green", "large", "left"),), Background("black"))
    assert score(render(scene, 64), wrong) == {"background": False, "color": False, "shape": False}


def test_cli_micro_subject(tmp_path, capsys):
    from sdtune.cli import main

    assert main(["micro", "subject", str(tmp_path / "subj"), "--n", "3", "--identifier", "ohwx"]) == 0
    assert "wrote 3 photos" in capsys.readouterr().out
    rows = (tmp_path / "subj" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all("ohwx toy" in r for r in rows)
    assert main(["micro", "subject", str(tmp_path / "subj")]) == 2  # never overwrites


def test_subject_masks_cover_the_subject_and_little_else(tmp_path):
    """`sdtune micro subject --masks`: the masked-loss masks of the subject photos (bench/techniques.py)."""
    import numpy as np
    from PIL import Image

    from sdtune.micro.world import PALETTE, write_subject_photos

    folder = write_subject_photos(tmp_path / "s", n=4, masks=True)
    for i in range(4):
        image = np.asarray(Image.open(folder / f"subject_{i:02d}.png").convert("RGB")).astype(int)
        mask = np.asarray(Image.open(folder / f"subject_{i:02d}.mask.png")) > 128
        body = np.abs(image - np.array(PALETTE["purple"])).sum(-1) < 60
        assert body.sum() > 20 and mask[body].mean() == 1.0  # the subject's body is inside its mask
        assert mask[~body].mean() < 0.15  # the background is outside (the hat and eyes are the rest)
