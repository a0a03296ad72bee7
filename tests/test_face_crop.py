"""``sdtune prep --crop face``: each face comes with a confidence, faces under ``--face-min-confidence`` do
not count, and the report says per image which crop was used and the best face's confidence.

The real detector runs on the DreamBench photos (read in place): OpenCV's cascade finds a "face" on one dog
photo, which must not get a face crop at the default threshold. A stand-in detector covers the rest.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from prep_corpus import encoded, photo

import sdtune.prep as prep_module
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.prep import FACE_MIN_CONFIDENCE, REPORT, detect_faces, prep


def by_source(report: dict) -> dict[str, dict]:
    return {row["source"]: row for row in report["files"]}


def test_the_dog_gets_no_face_crop_at_the_default_threshold(dreambench, tmp_path):
    report = prep(dreambench / "dog", tmp_path / "dog", crop="face", caption="a photo of sks dog", workers=1,
                  progress=False)
    rows = by_source(report)
    assert report["settings"]["face_min_confidence"] == FACE_MIN_CONFIDENCE
    assert all(row["crop"].startswith("smart (") for row in rows.values()), rows
    # the cascade does fire on 01.jpg; its confidence is what keeps it from being a face crop
    scored = {name: row["face_confidence"] for name, row in rows.items() if "face_confidence" in row}
    assert list(scored) == ["01.jpg"] and 0 < scored["01.jpg"] < FACE_MIN_CONFIDENCE
    expected = f"smart (face confidence {scored['01.jpg']:.2f} < {FACE_MIN_CONFIDENCE:g})"
    assert rows["01.jpg"]["crop"] == expected
    assert all(row["crop"] == "smart (no face found)" for name, row in rows.items() if name != "01.jpg")
    assert json.loads((tmp_path / "dog" / REPORT).read_text())["files"] == report["files"]

    # the same detection with the threshold under its score: a face crop, with the score still reported
    low = by_source(prep(dreambench / "dog", tmp_path / "low", crop="face", caption="a photo of sks dog",
                         workers=1, progress=False, face_min_confidence=scored["01.jpg"] - 0.5))
    assert low["01.jpg"]["crop"] == "face (1 found)" and low["01.jpg"]["face_confidence"] == scored["01.jpg"]
    assert low["00.jpg"]["crop"] == "smart (no face found)" and "face_confidence" not in low["00.jpg"]


def test_no_dreambench_object_gets_a_face_crop(dreambench, tmp_path):
    report = prep(dreambench / "backpack", tmp_path / "b", crop="face", caption="a photo of sks backpack",
                  workers=1, progress=False)
    assert all(not row["crop"].startswith("face") for row in report["files"])
    with Image.open(dreambench / "dog" / "01.jpg") as im:
        faces = detect_faces(im.convert("RGB"))
    assert len(faces) == 1 and all(len(f) == 5 and 0 < f[4] < FACE_MIN_CONFIDENCE for f in faces)
    x0, y0, x1, y1, _ = faces[0]
    assert 0 <= x0 < x1 <= 781 and 0 <= y0 < y1 <= 781  # a box in the photo's own pixels


@pytest.fixture
def wide(tmp_path):
    """A 300x100 photo with all its detail at the right end: the smart crop goes right, a face crop left."""
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (300, 100), (128, 128, 128))
    im.paste(photo((100, 100), 3), (200, 0))
    (src / "wide.png").write_bytes(encoded(im, "PNG"))
    return src


def test_faces_under_the_threshold_fall_back_to_the_smart_crop(wide, tmp_path, monkeypatch):
    def run(name: str, faces: list, **kw) -> dict:
        monkeypatch.setattr(prep_module, "detect_faces", lambda im: faces)
        return prep(wide, tmp_path / name, resolution=64, crop="face", caption="a photo of sks dog",
                    workers=1, progress=False, **kw)["files"][0]

    sure = run("sure", [(10, 20, 50, 60, 9.0)])  # a face at the far left
    assert sure["crop"] == "face (1 found)" and sure["crop_box"] == [0, 0, 100, 100]
    assert sure["face_confidence"] == 9.0

    unsure = run("unsure", [(10, 20, 50, 60, 1.25)])
    assert unsure["crop"] == f"smart (face confidence 1.25 < {FACE_MIN_CONFIDENCE:g})"
    assert unsure["crop_box"][0] > 150 and unsure["face_confidence"] == 1.25

    # of two faces only the confident one places the crop; the report gives the best confidence
    mixed = run("mixed", [(250, 20, 290, 60, 2.0), (10, 20, 50, 60, 6.5)])
    assert mixed["crop"] == "face (1 found)" and mixed["crop_box"] == [0, 0, 100, 100]
    assert mixed["face_confidence"] == 6.5

    # the threshold is the caller's: 1.0 takes the unsure face
    taken = run("taken", [(10, 20, 50, 60, 1.25)], face_min_confidence=1.0)
    assert taken["crop"] == "face (1 found)" and taken["crop_box"] == [0, 0, 100, 100]


def test_face_min_confidence_is_checked(wide, tmp_path):
    for crop, value, message in [("smart", 2.0, "only --crop face uses it"),
                                 ("face", -1.0, "is not a number >= 0"),
                                 ("face", float("nan"), "is not a number >= 0")]:
        with pytest.raises(SdtuneError, match=f"--face-min-confidence: .*{message}"):
            prep(wide, tmp_path / "out", crop=crop, caption="x", workers=1, progress=False,
                 face_min_confidence=value)
    assert not (tmp_path / "out").exists()


def test_cli_face_min_confidence(dreambench, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prep", str(dreambench / "dog"), str(out), "--crop", "face", "--face-min-confidence", "2",
                 "--caption", "a photo of sks dog", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "face crops: 1 of 5 images" in printed and str(out / REPORT) in printed
    assert json.loads((out / REPORT).read_text())["settings"]["face_min_confidence"] == 2.0
    assert main(["prep", str(dreambench / "dog"), str(tmp_path / "x"), "--face-min-confidence", "2",
                 "--caption", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--face-min-confidence: only --crop face uses it" in err
