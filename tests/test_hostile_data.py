"""Hostile instance and class folders: every input that would do less than asked, or end in a traceback,
is a problem or a warning naming the file and the fix, found before any weights load."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

import sdtune.data
import sdtune.images
from conftest import DEMO_DATA
from sdtune.cli import main
from sdtune.data import IMAGE_EXTENSIONS, list_images, load_image, scan_instance_dir
from sdtune.errors import SdtuneError
from sdtune.prep import EXTREME_ASPECT
from sdtune.prior import missing_class_indices

KEY = "data.instance_dir"


def _photo(path: Path, size: tuple[int, int] = (64, 64), fmt: str | None = None) -> Path:
    Image.new("RGB", size, (180, 90, 40)).save(path, fmt)
    return path


def _one_line_each(messages: list[str]) -> None:
    assert all("\n" not in m and "\r" not in m for m in messages), messages


# -- 1. formats -------------------------------------------------------------------------------------------


def test_every_format_prep_reads_is_trained_and_unknown_ones_are_named(tmp_path):
    assert IMAGE_EXTENSIONS is sdtune.images.IMAGE_EXTENSIONS  # one list, shared with the safe reader
    assert {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jpe"} <= set(IMAGE_EXTENSIONS)
    for name, fmt in [("a.gif", "GIF"), ("b.tiff", "TIFF"), ("c.heic", "HEIF"), ("d.avif", "AVIF"),
                      ("e.JPG", "JPEG"), ("f.png", "PNG")]:
        _photo(tmp_path / name, fmt=fmt)
    for name in ["g.jxl", "h.raw", "i.psd"]:
        (tmp_path / name).write_bytes(b"\x00image data sdtune cannot read")
    # not data, never mentioned: hidden files, OS junk, caption sidecars, prep's report
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / "._a.gif").write_bytes(b"\x00")
    (tmp_path / "Thumbs.db").write_bytes(b"\x00")
    (tmp_path / "f.txt").write_text("a photo of sks dog on grass")
    (tmp_path / "prep_report.json").write_text("{}")
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog")
    assert not scan.problems
    assert [e.path.name for e in scan.examples] == ["a.gif", "b.tiff", "c.heic", "d.avif", "e.JPG", "f.png"]
    [warning] = scan.warnings
    assert warning.startswith(f"{KEY}: not in a format sdtune reads") and "so not used: g.jxl, h.raw, i.psd" in warning
    assert "fix: convert them to PNG or JPEG" in warning
    for junk in (".DS_Store", "._a.gif", "Thumbs.db", "prep_report.json", "f.txt"):
        assert junk not in warning


def test_a_format_whose_decoder_is_missing_is_a_problem_not_skipped(tmp_path, monkeypatch):
    _photo(tmp_path / "phone.heic", fmt="HEIF")
    _photo(tmp_path / "ok.png")
    monkeypatch.setattr(sdtune.images, "DECODERS", tuple(f for f in sdtune.images.DECODERS if f != "HEIF"))
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog")
    [problem] = scan.problems
    assert problem.startswith(f"{KEY}: cannot read phone.heic: HEIF needs a decoder that is not installed")
    assert "fix: pip install pillow-heif" in problem
    assert [e.path.name for e in scan.examples] == ["ok.png"]


# -- 2. captions and metadata.jsonl -----------------------------------------------------------------------


def test_non_utf8_captions_are_problems_and_a_bom_is_accepted(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _photo(tmp_path / name)
    (tmp_path / "a.txt").write_bytes("sks dog, caf\xe9".encode("latin-1"))  # Windows-1252 / Latin-1 editor
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfa photo of sks dog")  # UTF-8 with a BOM (Notepad)
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog")
    assert scan.problems == [f"{KEY}: a.txt is not UTF-8 text (byte 0xe9 at offset 12); fix: save it as UTF-8"]
    assert [(e.path.name, e.caption) for e in scan.examples] == [("b.png", "a photo of sks dog"),
                                                                 ("c.png", "a photo of sks dog")]

    (tmp_path / "a.txt").unlink()
    rows = [json.dumps({"file_name": n, "text": f"sks dog {n}"}).encode() for n in ("a.png", "b.png", "c.png")]
    rows[1] = b'{"file_name": "b.png", "text": "sks dog \xff"}'
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\n")
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == [f"{KEY}: {tmp_path / 'metadata.jsonl'} line 2 is not UTF-8 text (byte 0xff at column "
                             "41); fix: save the file as UTF-8"]
    assert [e.caption for e in scan.examples] == ["sks dog a.png", "sks dog c.png"]  # the BOM is not in line 1


def test_metadata_file_names_must_be_bare_names_in_the_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _photo(tmp_path / "outside.png")
    _photo(folder / "ok.png")
    (folder / "sub").mkdir()
    _photo(folder / "sub" / "deep.png")
    (folder / "notes.jxl").write_bytes(b"\x00")
    rows = [{"file_name": "ok.png", "text": "sks dog"}, {"file_name": "../outside.png", "text": "sks dog"},
            {"file_name": str(tmp_path / "outside.png"), "text": "sks dog"},
            {"file_name": "C:\\photos\\x.png", "text": "sks dog"}, {"file_name": "sub/deep.png", "text": "sks dog"},
            {"file_name": "notes.jxl", "text": "sks dog"}, {"file_name": "ok.png", "text": None},
            {"file_name": "./ok.png", "text": "sks dog again"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    scan = scan_instance_dir(folder, "sks", None)
    text = "\n".join(scan.problems)
    _one_line_each(scan.problems)
    # one line for the three lines refused for one reason: the first said, the others counted
    assert "line 2 names ../outside.png, outside the folder: refused (2 more lines like it: 3, 4)" in text
    assert "line 5 names sub/deep.png, in a subfolder, which is not read; fix: move the image into the folder" in text
    assert "names notes.jxl, which is not in a format sdtune reads" in text
    assert "line 7 is not a JSON object with file_name and text" in text  # a null caption is not the caption "None"
    assert "lists ok.png on lines 1 and 8; the caption on line 8 is used" in scan.warnings[-1]
    assert [(e.path.name, e.caption) for e in scan.examples] == [("ok.png", "sks dog again")]


# -- 3. extreme shapes --------------------------------------------------------------------------------------


def test_an_image_no_resize_could_cover_is_refused_from_its_header(tmp_path, monkeypatch):
    _photo(tmp_path / "wide.png", (1_000_000, 1))
    _photo(tmp_path / "tall.png", (1, 100_000))
    _photo(tmp_path / "ok.png")
    decoded = []
    real = sdtune.data._decode
    monkeypatch.setattr(sdtune.data, "_decode", lambda path, res: decoded.append(path.name) or real(path, res))
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog", resolution=512)
    _one_line_each(scan.problems)
    assert len(scan.problems) == 2 and decoded == ["ok.png"]  # neither was decoded, let alone resized
    tall, wide = scan.problems
    assert wide.startswith(f"{KEY}: wide.png is 1000000x1 px, an aspect ratio of 1,000,000:1: covering 512x512 "
                           "would resize it to 512000000x512, over the limit of")
    assert tall.startswith(f"{KEY}: tall.png is 1x100000 px")
    assert f"fix: crop it to the subject (`sdtune prep` reports aspect ratios over {EXTREME_ASPECT}:1)" in tall
    # without a resolution the scan judges at the least one, and still refuses both
    assert len(scan_instance_dir(tmp_path, "sks", "a photo of sks dog").problems) == 2
    # and the loader refuses rather than allocating (a class image is not scanned)
    with pytest.raises(SdtuneError, match=r"tall.png is 1x100000 px.*fix: crop it"):
        load_image(tmp_path / "tall.png", 512, True, False, random.Random(0))


def test_extreme_aspect_and_tiny_images_are_warnings_with_the_upscale(tmp_path):
    _photo(tmp_path / "pano.png", (300, 64))  # over prep's EXTREME_ASPECT: trainable, most of it cropped away
    _photo(tmp_path / "dot.png", (1, 1))
    _photo(tmp_path / "icon.png", (8, 8))
    _photo(tmp_path / "ok.png", (300, 300))
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog", resolution=512)
    assert not scan.problems and len(scan.examples) == 4
    pano, small = scan.warnings
    assert pano == (f"{KEY}: pano.png is 300x64 px, an extreme aspect ratio of 4.7:1 (over {EXTREME_ASPECT}:1, as "
                    "`sdtune prep` reports): a square crop keeps 21% of it, the nearest aspect bucket "
                    "(data.aspect_buckets) more; fix: crop it to the subject")
    assert small.startswith(f"{KEY}: 3 image(s) under 256 px on the short side will be upscaled to cover 512x512: "
                            "dot.png 1x1 (x512), icon.png 8x8 (x64), pano.png 300x64 (x8)")
    assert "fix: use larger photos" in small and "ok.png" not in small
    # without a resolution: judged at the least one, and said so
    small = scan_instance_dir(tmp_path, "sks", "a photo of sks dog").warnings[-1]
    assert "under 32 px" in small and "dot.png 1x1 (x64 or more), icon.png 8x8 (x8 or more)" in small


# -- 4. class images ----------------------------------------------------------------------------------------


def test_class_images_take_the_same_formats(tmp_path):
    for name, fmt in [("class-00000.png", "PNG"), ("mine.gif", "GIF"), ("mine.tif", "TIFF"), ("mine.heic", "HEIF")]:
        _photo(tmp_path / name, fmt=fmt)
    (tmp_path / "mine.jxl").write_bytes(b"\x00")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert [p.name for p in list_images(tmp_path)] == ["broken.png", "class-00000.png", "mine.gif", "mine.heic",
                                                        "mine.tif"]
    assert missing_class_indices(tmp_path, 7) == [1, 2]  # the user's GIF, TIFF and HEIC count
    # a class image is not scanned: the loader says which file, in a sentence
    with pytest.raises(SdtuneError, match=r"cannot read .*broken.png \(not an image in an allowed format"):
        load_image(tmp_path / "broken.png", 64, True, False, random.Random(0))
    assert load_image(tmp_path / "mine.heic", 64, True, False, random.Random(0))[0].shape == (3, 64, 64)


# -- 5. hostile folders ------------------------------------------------------------------------------------


def test_hostile_entries_are_each_one_line_naming_the_file(tmp_path):
    shutil.copy(DEMO_DATA / "toy_00.png", tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a picture")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("gone.jpg", tmp_path / "dangling.jpg")
    (tmp_path / "folder.png").mkdir()
    shutil.copy(DEMO_DATA / "toy_01.png", tmp_path / "new\nline.png")
    shutil.copy(DEMO_DATA / "toy_02.png", os.fsencode(tmp_path) + b"/caf\xe9.png")  # Latin-1 bytes in a name
    os.symlink(DEMO_DATA / "toy_03.png", tmp_path / "linked.png")  # a link leaving the folder
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog")
    _one_line_each(scan.problems + scan.warnings)
    assert scan.problems == [
        f"{KEY}: the name caf\\xe9.png is not valid UTF-8, which run records and reports need; fix: rename it",
        f"{KEY}: dangling.jpg is a broken link or a link loop, not an image; fix: remove or rename it",
        f"{KEY}: folder.png is a folder, not an image; fix: remove or rename it",
        f"{KEY}: loop.png is a broken link or a link loop, not an image; fix: remove or rename it",
        f"{KEY}: cannot read empty.png: an empty file (0 bytes); fix: copy the photo again, or remove it",
        f"{KEY}: linked.png is a link to a file outside the folder; refused",
        f"{KEY}: cannot read text.png: not an image in an allowed format ({', '.join(sdtune.images.DECODERS)}); "
        "fix: remove it or run `sdtune prep`",
    ]
    assert sorted(e.path.name for e in scan.examples) == ["good.png", "new\nline.png"]  # odd, but a fine name


def test_an_unreadable_file_is_a_problem(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading a file")
    _photo(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    _photo(tmp_path / "shy.png")
    (tmp_path / "shy.txt").write_text("sks dog")
    (tmp_path / "shy.txt").chmod(0)
    try:
        scan = scan_instance_dir(tmp_path, "sks", "a photo of sks dog")
    finally:
        (tmp_path / "locked.png").chmod(0o644)
        (tmp_path / "shy.txt").chmod(0o644)
    assert scan.problems == [f"{KEY}: cannot read locked.png: Permission denied; fix: make it readable (chmod +r) "
                             "or remove it",
                             f"{KEY}: cannot read shy.txt (Permission denied); fix: make it readable (chmod +r)"]


def test_dry_run_prints_error_lines_not_a_traceback(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(DEMO_DATA / "toy_00.png", folder / "good.png")
    (folder / "good.txt").write_bytes("sks dog, na\xefve".encode("cp1252"))
    _photo(folder / "wide.png", (1_000_000, 1))
    (folder / "metadata.jsonl.bak").write_text("")  # not an image: a warning, not shown when problems stop the run
    recipe = tmp_path / "recipe.yaml"
    # no model: its problem is reported beside the data's, all at once, and nothing loads
    recipe.write_text(f"model: {{pretrained: {tmp_path / 'no-model'}}}\n"
                      f"data: {{instance_dir: {folder}, identifier: sks, instance_prompt: a photo of sks dog, "
                      "resolution: 64}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}, report_to: none}}\n")
    assert main(["train", str(recipe), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    assert f"error: {KEY}: good.txt is not UTF-8 text (byte 0xef at offset 11); fix: save it as UTF-8" in lines
    assert any(line.startswith(f"error: {KEY}: wide.png is 1000000x1 px") for line in lines)
    assert any(line.startswith("error: model.pretrained") for line in lines), lines
