"""``sdtune prep``: a corpus of bad inputs built in code, each outcome asserted in prep_report.json and in the
files; safety (sources untouched, nothing outside OUT, idempotent); and the DreamBench round trip through
``datasets`` and a tiny training run."""

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from prep_corpus import (
    BLUE,
    GREEN,
    RED,
    checks_corpus,
    encoded,
    format_corpus,
    jpeg,
    oriented_jpeg,
    photo,
)

from conftest import overrides
from sdtune.cli.data import add_commands
from sdtune.errors import SdtuneError
from sdtune.prep import (
    METADATA,
    REPORT,
    SHEET,
    bucket_sizes,
    caption_from_filename,
    nearest_bucket,
    prep,
    sanitise,
)

CAPTION = "a photo of sks dog"


def run(src, out, **kw) -> dict:
    kw = {"resolution": 64, "caption": CAPTION, "workers": 1, "progress": False, **kw}
    return prep(src, out, **kw)


def by_source(report: dict) -> dict[str, dict]:
    return {row["source"]: row for row in report["files"]}


def pixel(out: Path, row: dict, xy: tuple[int, int]) -> tuple[int, ...]:
    with Image.open(out / row["output"]) as im:
        return im.convert("RGB").getpixel(xy)


def near(a, b, tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and mtime (links listed, not followed)."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            found[str(p)] = (os.readlink(p), 0)
        elif p.is_file():
            found[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The reading corpus, prepped once: (src, out, report)."""
    base = tmp_path_factory.mktemp("formats")
    src, out = base / "src", base / "out"
    format_corpus(src)
    return src, out, run(src, out)


# --------------------------------------------------------------------------------------------------------
# Reading


def test_every_mode_becomes_srgb_rgb(formats):
    src, out, report = formats
    rows = by_source(report)
    left = (8, 32)

    assert rows["plain.png"]["status"] == "kept" and "fixed" not in rows["plain.png"]
    assert "CMYK" in rows["cmyk.jpg"]["fixed"][0] and near(pixel(out, rows["cmyk.jpg"], left), (255, 0, 0))
    # 16 bits: 40000 / 65535 of full scale is 156 / 255, not clipped to 255 (Pillow's own convert clips)
    for name in ("gray16.png", "gray16.tif"):
        assert "16-bit scaled to 8-bit" in rows[name]["fixed"] and near(pixel(out, rows[name], left), (156,) * 3, 1)
    assert "16 bits per channel" in rows["rgb48.png"]["fixed"][0]
    assert near(pixel(out, rows["rgb48.png"], left), (156, 4, 0), 1)
    assert "palette converted to RGB" in rows["palette.gif"]["fixed"]
    assert "grayscale (LA) converted to RGB" in rows["la.png"]["fixed"] and near(pixel(out, rows["la.png"], left), (90,) * 3, 1)
    assert "1-bit" in rows["bw.png"]["fixed"][0] and pixel(out, rows["bw.png"], left) == (255, 255, 255)
    for name in ("photo.webp", "photo.bmp"):
        assert rows[name]["status"] == "kept"
    assert rows["photo.heic"]["format"] == "HEIF" and near(pixel(out, rows["photo.heic"], left), RED, 16)
    assert rows["photo.avif"]["format"] == "AVIF" and near(pixel(out, rows["photo.avif"], left), RED, 16)
    for row in rows.values():
        if "output" in row:
            with Image.open(out / row["output"]) as im:
                assert im.mode == "RGB" and im.size == (64, 64) and "exif" not in im.info and "icc_profile" not in im.info


def test_icc_profile_is_applied(formats):
    _, out, report = formats
    row = by_source(report)["icc.png"]
    assert "ICC profile 'Swapped primaries (test)' converted to sRGB" in row["fixed"][0]
    # the stored pixels are pure red; the profile says "red" means sRGB's blue
    assert near(pixel(out, row, (32, 32)), (0, 0, 255), 40) and pixel(out, row, (32, 32))[2] > 200


def test_alpha_is_composited_on_the_background(formats, tmp_path):
    src, out, report = formats
    rows = by_source(report)
    for name in ("alpha.png", "palette_alpha.png"):
        assert "transparency composited on #ffffff" in rows[name]["fixed"]
        assert rows[name]["crop_box"] == [16, 0, 96, 80]  # smart crop: the blue half holds the "detail"
        assert pixel(out, rows[name], (4, 32)) == (255, 255, 255)
        assert near(pixel(out, rows[name], (60, 32)), BLUE, 2)
    only = tmp_path / "src"
    only.mkdir()
    (only / "alpha.png").write_bytes((src / "alpha.png").read_bytes())
    report = run(only, tmp_path / "out", background="#00ff00", crop="center")
    assert pixel(tmp_path / "out", report["files"][0], (2, 32)) == (0, 255, 0)


def test_animations_use_the_first_frame_with_a_warning(formats):
    _, out, report = formats
    for name in ("animated.gif", "animated.webp"):
        row = by_source(report)[name]
        assert row["status"] == "fixed" and "animated (3 frames): only the first frame is used" in row["warnings"]
        assert near(pixel(out, row, (32, 32)), RED, 4)


def test_broken_lying_and_hostile_files_are_skipped_or_sniffed(formats):
    _, _, report = formats
    rows = by_source(report)
    assert rows["truncated.jpg"]["status"] == "skipped" and "truncated" in rows["truncated.jpg"]["reason"]
    assert rows["notes.jpg"]["status"] == "skipped" and "not an image" in rows["notes.jpg"]["reason"]
    assert rows["bomb.png"]["status"] == "skipped" and "decompression bomb" in rows["bomb.png"]["reason"]
    disguised = rows["png_in_disguise.jpg"]
    assert disguised["format"] == "PNG" and disguised["fixed"] == ["content is PNG, not JPEG as the name says"]
    assert report["summary"]["skipped"] == 3 and report["summary"]["images"] == len(rows) - 3


def test_cut_files_of_every_format_are_skipped_not_fatal(formats, tmp_path):
    src, _, _ = formats
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in sorted(src.iterdir()):
        for frac in (0.3, 0.7, 0.95):
            data = p.read_bytes()
            (cut / f"{p.stem}_{int(frac * 100)}{p.suffix}").write_bytes(data[: int(len(data) * frac)])
    (cut / "zzz_good.png").write_bytes((src / "plain.png").read_bytes())
    rows = by_source(run(cut, tmp_path / "out"))
    assert rows["zzz_good.png"]["status"] == "kept"
    assert all(row["status"] in ("kept", "fixed", "skipped") for row in rows.values())
    assert sum(row["status"] == "skipped" for row in rows.values()) > len(rows) // 2


def test_bomb_limit_is_an_error_not_a_warning(tmp_path, monkeypatch):
    """Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns and decodes; prep refuses."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.png").write_bytes(encoded(photo((1200, 1000), 1), "PNG"))
    (src / "ok.png").write_bytes(encoded(photo((900, 1000), 2), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    rows = by_source(run(src, tmp_path / "out"))
    assert rows["big.png"]["status"] == "skipped" and "decompression bomb" in rows["big.png"]["reason"]
    assert rows["ok.png"]["status"] == "kept"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_comes_out_upright(tmp_path, orientation):
    src = tmp_path / "src"
    src.mkdir()
    (src / "phone.jpg").write_bytes(oriented_jpeg(orientation))
    out = tmp_path / "out"
    row = run(src, out, crop="bucket")["files"][0]
    assert row["size"] == [300, 200] and row["output_size"] == [80, 48]  # landscape once upright
    assert (f"rotated upright (EXIF orientation {orientation})" in row.get("fixed", [])) == (orientation != 1)
    assert near(pixel(out, row, (15, 14)), RED, 40)  # red block top-left, green top-right
    assert near(pixel(out, row, (65, 14)), GREEN, 40)
    assert near(pixel(out, row, (40, 40)), (128, 128, 128), 20)
    with Image.open(out / row["output"]) as im:
        assert not im.getexif()


# --------------------------------------------------------------------------------------------------------
# Crops and sizes


def test_buckets_are_the_families_training_buckets():
    sdxl = bucket_sizes(1024)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640), (512, 2048)]:
        assert size in sdxl
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in sdxl)
    assert nearest_bucket((4032, 3024), 1024) == (1152, 896)  # a 4:3 phone photo
    assert nearest_bucket((3024, 4032), 1024) == (896, 1152)
    assert nearest_bucket((1000, 1000), 512) == (512, 512)
    assert nearest_bucket((1920, 1080), 768) == (1024, 576)


def test_center_smart_and_face_crops(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (300, 100), (128, 128, 128))
    im.paste(photo((100, 100), 3), (200, 0))  # all the detail at the right end
    (src / "wide.png").write_bytes(encoded(im, "PNG"))

    assert run(src, tmp_path / "c", crop="center")["files"][0]["crop_box"] == [100, 0, 200, 100]
    assert run(src, tmp_path / "s", crop="smart")["files"][0]["crop_box"][0] > 150
    row = run(src, tmp_path / "f", crop="face")["files"][0]
    assert row["crop"] == "smart (no face found)" and row["crop_box"][0] > 150

    import sdtune.prep as prep_module

    monkeypatch.setattr(prep_module, "detect_faces", lambda im: [(10, 20, 50, 60, 9.0)])  # far left, confident
    row = run(src, tmp_path / "f2", crop="face")["files"][0]
    assert row["crop"] == "face (1 found)" and row["crop_box"] == [0, 0, 100, 100]


def test_small_sources_are_upscaled_with_a_warning_or_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "medium.png").write_bytes(encoded(photo((48, 40), 1), "PNG"))
    (src / "tiny.png").write_bytes(encoded(photo((24, 20), 2), "PNG"))
    (src / "panorama.png").write_bytes(encoded(photo((400, 100), 3), "PNG"))
    rows = by_source(run(src, tmp_path / "out"))
    assert rows["medium.png"]["status"] == "kept" and "upscaled x1.60" in rows["medium.png"]["warnings"][0]
    assert rows["tiny.png"]["status"] == "skipped" and "under --min-side 32" in rows["tiny.png"]["reason"]
    assert "extreme aspect ratio 4.0:1" in rows["panorama.png"]["warnings"][0]
    rows = by_source(run(src, tmp_path / "strict", min_side=64))
    assert rows["medium.png"]["status"] == "skipped"


# --------------------------------------------------------------------------------------------------------
# Checks


def test_duplicates_and_blur_are_reported_not_removed(tmp_path):
    src = tmp_path / "src"
    checks_corpus(src)
    report = run(src, tmp_path / "out", resolution=128)
    rows = by_source(report)
    assert report["summary"]["images"] == 8  # reported, never silently dropped
    warned = {name: " | ".join(row.get("warnings", [])) for name, row in rows.items()}
    shot0, shot1 = rows["shot0.jpg"]["output"], rows["shot1.jpg"]["output"]
    assert f"exact duplicate of {shot1} (shot1.jpg)" in warned["shot1_copy.jpg"]
    assert f"near duplicate of {shot0} (shot0.jpg)" in warned["shot0_reencoded.jpg"]
    assert f"near duplicate of {shot0} (shot0.jpg)" in warned["shot0_smaller.png"]
    assert "looks blurry" in warned["soft.jpg"]
    for name in ("shot0.jpg", "shot1.jpg", "shot2.jpg", "shot3.jpg"):
        assert not warned[name], name
    assert not report["set_warnings"]


def test_a_grayscale_only_set_is_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"bw{i}.jpg").write_bytes(jpeg(photo((96, 80), i).convert("L")))
    report = run(src, tmp_path / "out")
    assert report["set_warnings"] == ["every image is grayscale: the LoRA will learn a black-and-white subject"]
    assert all(row["grayscale"] for row in report["files"])


# --------------------------------------------------------------------------------------------------------
# Names, captions, junk, links


def test_names_are_sanitised_and_never_collide(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["A.jpg", "a.JPG", "my dog 1.jpg", "a..b.jpg", "chien été.jpg", "狗.jpg", "CON.jpg"]):
        (src / name).write_bytes(jpeg(photo((96, 80), i)))
    out = tmp_path / "out"
    rows = by_source(run(src, out, rename="{stem}"))
    assert {k: v["output"] for k, v in rows.items()} == {
        "A.jpg": "A.png", "a.JPG": "a-2.png", "a..b.jpg": "a.b.png", "chien été.jpg": "chien_ete.png",
        "CON.jpg": "_CON.png", "my dog 1.jpg": "my_dog_1.png", "狗.jpg": "image.png",
    }
    assert "names compared ignoring case" in rows["a.JPG"]["warnings"][0]
    # a pattern that tries to climb out of OUT stays inside it
    rows = by_source(run(src, tmp_path / "out2", rename="../../{token}_{index:02d}", token="sks"))
    assert rows["a..b.jpg"]["output"] == "sks_01.png"  # source order ignores case: 'a..b' < 'A' = 'a'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "src"]
    assert sanitise("../..") == "image" and sanitise(".hidden") == "hidden"


def test_captions_from_filenames_and_txt(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "sks_dog_on_the_beach (2).jpg").write_bytes(jpeg(photo((96, 80), 1)))
    (src / "IMG_0001.jpg").write_bytes(jpeg(photo((96, 80), 2)))
    (src / "IMG_0001.txt").write_text("sks dog\nin the snow\n")
    assert caption_from_filename("sks-dog_beach_03") == "sks-dog beach"
    rows = by_source(run(src, tmp_path / "a", caption=None, caption_from="filename"))
    assert rows["sks_dog_on_the_beach (2).jpg"]["caption"] == "sks dog on the beach"
    # a camera's name is no caption (it was "IMG", silently)
    assert rows["IMG_0001.jpg"]["status"] == "skipped" and "a camera's file name" in rows["IMG_0001.jpg"]["reason"]
    assert rows["IMG_0001.txt"]["status"] == "ignored"
    rows = by_source(run(src, tmp_path / "b", caption=None, caption_from="txt"))
    assert rows["IMG_0001.jpg"]["caption"] == "sks dog in the snow"
    assert rows["sks_dog_on_the_beach (2).jpg"]["status"] == "skipped"
    assert "sks_dog_on_the_beach (2).txt not found" in rows["sks_dog_on_the_beach (2).jpg"]["reason"]
    lines = [json.loads(x) for x in (tmp_path / "b" / METADATA).read_text().splitlines()]
    assert lines == [{"file_name": "001.png", "text": "sks dog in the snow"}]


def test_junk_and_symlinks(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "__MACOSX").mkdir(parents=True)
    (src / "sub").mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg(photo((96, 80), 1)))
    (src / "real.jpg").write_bytes(jpeg(photo((96, 80), 2)))
    (src / "sub" / "deeper.jpg").write_bytes(jpeg(photo((96, 80), 3)))
    for junk in (".DS_Store", "Thumbs.db", "._real.jpg", "desktop.ini"):
        (src / junk).write_bytes(b"\0\x05\x16\x07junk")
    (src / "__MACOSX" / "._real.jpg").write_bytes(b"\0\x05\x16\x07")
    (src / "leak.jpg").symlink_to(outside / "secret.jpg")
    (src / "again.jpg").symlink_to(src / "real.jpg")  # inside SRC: fine, and a duplicate
    (src / "elsewhere").symlink_to(outside, target_is_directory=True)
    (src / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # broken: said so, not "outside SRC"
    rows = by_source(run(src, tmp_path / "out"))
    assert rows["gone.jpg"]["status"] == "skipped" and rows["gone.jpg"]["reason"].startswith("broken symlink")
    for junk in (".DS_Store", "Thumbs.db", "._real.jpg", "desktop.ini", "__MACOSX/"):
        assert rows[junk]["status"] == "ignored", junk
    assert rows["leak.jpg"]["status"] == "skipped" and "outside SRC" in rows["leak.jpg"]["reason"]
    assert rows["elsewhere/"]["status"] == "skipped"
    assert rows["sub/deeper.jpg"]["status"] == "kept"
    assert "exact duplicate" in rows["real.jpg"]["warnings"][0]  # again.jpg sorts first
    assert not any("secret" in json.dumps(r) for r in rows.values() if r["source"] != "leak.jpg")


# --------------------------------------------------------------------------------------------------------
# Safety and idempotence


def test_sources_untouched_nothing_outside_out_and_reruns_identical(formats, tmp_path):
    src, first_out, _ = formats
    before, around = tree(src), sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    run(src, out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    run(src, out, workers=2)  # a re-run, in parallel: same bytes, and no stale file left over
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert {p.name: p.read_bytes() for p in first_out.iterdir()} == first  # another OUT, the same bytes
    assert tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*around, "out"])
    assert {REPORT, METADATA, SHEET} <= set(first) and first[SHEET].startswith(b"\xff\xd8")


def test_rerun_replaces_stale_outputs_and_refuses_foreign_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(photo((96, 80), i)))
    out = tmp_path / "out"
    run(src, out)
    (src / "2.jpg").unlink()
    run(src, out, fmt="jpg")
    assert sorted(p.name for p in out.iterdir()) == sorted(["001.jpg", "002.jpg", METADATA, REPORT, SHEET])

    (out / "mine.txt").write_text("not prep's")
    with pytest.raises(SdtuneError, match=r"holds files an earlier prep did not write \(mine.txt\)"):
        run(src, out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SdtuneError, match="is not empty and holds no prep_report.json"):
        run(src, other)
    with pytest.raises(SdtuneError, match="holds SRC"):
        run(src, tmp_path)
    assert (other / "notes.txt").read_text() == "x"
    # OUT inside SRC: its own outputs are never read back as sources
    for _ in range(2):
        report = run(src, src / "prepped")
        assert [row["source"] for row in report["files"]] == ["0.jpg", "1.jpg"]


def test_an_earlier_prep_output_in_src_is_skipped(tmp_path, capsys):
    """QA: a prep output in a subfolder of SRC (kept there by an earlier prep) was read back as photos, its
    crops as near duplicates and its contact sheet as a training image."""
    src = tmp_path / "src"
    (src / "notes").mkdir(parents=True)
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(photo((96, 80), i)))
    run(src, src / "old")
    (src / "notes" / REPORT).write_text('{"mine": 1}')  # someone else's report: the folder is searched
    (src / "notes" / "n.jpg").write_bytes(jpeg(photo((96, 80), 7)))
    parser = argparse.ArgumentParser(prog="sdtune")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prep", str(src), str(tmp_path / "new"), "--resolution", "64", "--caption",
                              CAPTION, "--workers", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    rows = by_source(json.loads((tmp_path / "new" / REPORT).read_text()))
    assert rows["old/"]["status"] == "skipped"
    assert rows["old/"]["reason"].startswith("an earlier sdtune prep output (old/prep_report.json): its")
    assert [s for s in rows if s.startswith("old/")] == ["old/"]
    kept = [s for s, row in rows.items() if row["status"] == "kept"]
    assert kept == ["0.jpg", "1.jpg", "2.jpg", "notes/n.jpg"]
    assert [line for line in printed.splitlines() if "old/" in line] == [
        f"skipped: old/: {rows['old/']['reason']}"]

    # SRC itself a prep output: its images are prepped again (another resolution, say), its sheet is not
    again = by_source(run(src / "old", tmp_path / "again"))
    assert again[SHEET]["status"] == "skipped"
    assert "contact sheet of the earlier sdtune prep" in again[SHEET]["reason"]
    assert [s for s, row in again.items() if row["status"] == "kept"] == ["001.png", "002.png", "003.png"]


def test_empty_files_and_what_an_extreme_aspect_crop_keeps(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "four.jpg").write_bytes(jpeg(photo((400, 100), 1)))  # 4:1, a bucket's shape at 64 px (128x32)
    (src / "ten.jpg").write_bytes(jpeg(photo((1000, 100), 2)))  # 10:1
    (src / "plain.jpg").write_bytes(jpeg(photo((96, 80), 3)))
    square = by_source(run(src, tmp_path / "square"))
    assert square["empty.jpg"]["status"] == "skipped"
    assert square["empty.jpg"]["reason"] == "an empty file (0 bytes); fix: copy the photo again, or remove it"
    assert square["four.jpg"]["warnings"] == ["extreme aspect ratio 4.0:1; the square crop keeps 25% of it"]
    assert square["ten.jpg"]["warnings"] == ["extreme aspect ratio 10.0:1; the square crop keeps 10% of it"]
    bucket = by_source(run(src, tmp_path / "bucket", crop="bucket", crop_boxes={"ten.jpg": (0, 0, 500, 100)}))
    assert bucket["four.jpg"]["output_size"] == [128, 32]
    assert bucket["four.jpg"]["warnings"] == [
        "extreme aspect ratio 4.0:1; the 128x32 crop (the nearest training bucket) keeps all of it"]
    assert bucket["ten.jpg"]["warnings"] == [  # the user's box, half of the photo
        "extreme aspect ratio 10.0:1; the 128x32 crop box (the nearest training bucket) keeps 50% of it"]
    bucket = by_source(run(src, tmp_path / "bucket2", crop="bucket"))
    assert bucket["ten.jpg"]["warnings"] == [
        "extreme aspect ratio 10.0:1; the 128x32 crop (the nearest training bucket) keeps 40% of it"]


def test_empty_and_all_rejected_sources_are_errors_with_reasons(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    with pytest.raises(SdtuneError, match="holds no image files"):
        run(empty, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("not an image")
    (bad / "b.png").write_bytes(encoded(photo((20, 20), 1), "PNG"))
    with pytest.raises(SdtuneError) as e:
        run(bad, tmp_path / "out")
    lines = str(e.value).splitlines()
    assert "none of the 2 files" in lines[0]
    assert lines[1].startswith("a.jpg: not an image") and lines[2].startswith("b.png: too small")
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdtune")
    add_commands(parser.add_subparsers(dest="command"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 1)))
    (src / "b.jpg").write_text("nope")
    args = parser.parse_args(["prep", str(src), str(tmp_path / "out"), "--resolution", "64", "--caption", CAPTION,
                              "--rename", "{token}_{index:03d}", "--token", "sks", "--workers", "1",
                              "--crop", "center", "--format", "webp"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "skipped: b.jpg: not an image" in printed and "prep: 1 image in" in printed
    assert (tmp_path / "out" / "sks_001.webp").is_file()

    with pytest.raises(SystemExit):  # the command line refuses it (a multiple of 8), as the library does
        parser.parse_args(["prep", str(src), str(tmp_path / "o2"), "--resolution", "100", "--caption", CAPTION])
    bad = [["--rename", "{name}"], ["--rename", "{token}"], [], ["--background", "nope"]]
    for extra in bad:
        args = parser.parse_args(["prep", str(src), str(tmp_path / "o2"), *extra] + (
            ["--caption", CAPTION] if extra else []))
        with pytest.raises(SdtuneError) as e:
            args.func(args)
        assert len(str(e.value).splitlines()) == 1 and str(e.value).split(":")[0].startswith("--"), extra
    assert not (tmp_path / "o2").exists()


def test_bucket_outputs_are_a_valid_dataset(tmp_path):
    """Bucketed images are not square; datasets and sdtune's loader (which crops a square) take them as is.
    Batching by bucket in the trainer is a later change."""
    import random

    import datasets

    from sdtune.data import load_image, scan_instance_dir

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i, size in enumerate([(400, 300), (300, 400), (160, 90), (200, 200)]):
        (src / f"{i}.jpg").write_bytes(jpeg(photo(size, i)))
    report = run(src, out, crop="bucket")
    assert [row["output_size"] for row in report["files"]] == [[72, 56], [56, 72], [80, 48], [64, 64]]
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(im.size for im in ds["image"]) == [(56, 72), (64, 64), (72, 56), (80, 48)]
    scan = scan_instance_dir(out, "sks", None)
    assert not scan.problems and len(scan.examples) == 4
    for ex in scan.examples:
        pixels, _, _ = load_image(ex.path, 64, True, False, random.Random(0))
        assert pixels.shape == (3, 64, 64)


# --------------------------------------------------------------------------------------------------------
# Real photos: prep -> datasets imagefolder -> sdtune's scan -> a tiny training run


def test_dreambench_round_trip(dreambench, tiny_model, tmp_path):
    import datasets

    from sdtune.config import load_config
    from sdtune.data import scan_instance_dir
    from sdtune.lora import WEIGHT_NAME
    from sdtune.train import train

    src = dreambench / "dog"
    out = tmp_path / "prepped"
    report = prep(src, out, resolution=64, crop="bucket", caption=CAPTION, workers=1, progress=False)
    assert report["summary"]["images"] == len(list(src.glob("*.jpg"))) and not report["summary"]["skipped"]

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == report["summary"]["images"] and set(ds["text"]) == {CAPTION}
    assert ds[0]["image"].size == (64, 64)

    scan = scan_instance_dir(out, "sks", None)
    assert not scan.problems and not scan.warnings and len(scan.examples) == len(ds)

    run_dir = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), run_dir, f"data.instance_dir={out}")))
    assert (run_dir / WEIGHT_NAME).is_file()
