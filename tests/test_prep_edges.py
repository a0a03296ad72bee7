"""sdtune prep on what a new user's folder holds at the edges: file names that are not UTF-8 (archives from
another system), an empty caption, bucket multiples that leave few resolutions, 32-bit integer TIFFs, and a
black-and-white copy of a colour photo among duplicates."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from prep_corpus import jpeg, photo

from sdtune.errors import SdtuneError
from sdtune.prep import METADATA, REPORT, TMP_DIR, prep


def run(src, out, **kw) -> dict:
    kw = {"resolution": 64, "caption": "a photo of sks dog", "workers": 1, "progress": False, **kw}
    return prep(src, out, **kw)


def test_names_that_are_not_utf8_are_prepped_and_reported_as_they_are(tmp_path):
    """A name's bytes of another encoding (Latin-1, Shift-JIS: an unzipped archive) came back as surrogates
    and crashed the report ("surrogates not allowed"), leaving OUT/.sdtune-prep-tmp behind, which refused every
    rerun. Now: the report names the file with JSON escapes that read back as the same name, the caption from
    the name has U+FFFD for the bytes, and a rerun replaces the output."""
    src = tmp_path / os.fsdecode(b"src\xff")
    src.mkdir()
    (src / "ok.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    bad = os.fsdecode(b"sks_dog_\xe9t\xe9.jpg")  # Latin-1 'été'
    (src / bad).write_bytes(jpeg(photo((96, 80), 1)))
    (src / os.fsdecode(b"n\xffotes.txt")).write_text("x")  # junk that is ignored, by a name of its own kind
    out = tmp_path / "out"
    report = run(src, out, caption=None, caption_from="filename")
    notes = os.fsdecode(b"n\xffotes.txt")
    assert {row["source"]: row["status"] for row in report["files"]} == {"ok.jpg": "kept", bad: "kept",
                                                                         notes: "ignored"}
    read = json.loads((out / REPORT).read_bytes().decode("utf-8"))  # valid UTF-8 JSON
    assert read["source"] == str(src) and [row["source"] for row in read["files"]] == \
        [row["source"] for row in report["files"]]
    captions = [json.loads(line)["text"] for line in (out / METADATA).read_text(encoding="utf-8").splitlines()]
    assert sorted(captions) == ["ok", "sks dog \ufffdt\ufffd"]
    run(src, out, caption=None, caption_from="filename")  # a rerun reads the report back and replaces it
    assert not (out / TMP_DIR).exists()


def test_a_failure_while_writing_leaves_no_temporary_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    out = tmp_path / "out"
    run(src, out)
    before = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr("sdtune.prep._place", broken)
    with pytest.raises(OSError):
        run(src, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier output intact, nothing left over


def test_a_caption_on_several_lines_is_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    run(src, tmp_path / "out", caption="a photo of\nsks dog \t on grass ")
    assert json.loads((tmp_path / "out" / METADATA).read_text())["text"] == "a photo of sks dog on grass"


def test_a_caption_longer_than_clip_reads_is_reported(tmp_path):
    """A caption past CLIP's 77 tokens (a tagger's output, a pasted description) was written without a word,
    and training read only its start. Now prep's report names the images and where CLIP stops reading;
    a short caption gives no such warning."""
    src = tmp_path / "src"
    src.mkdir()
    words = " ".join(f"word{i}" for i in range(60))  # 'word12' is two tokens: 120 in all
    for name, text in [("long", f"a photo of sks dog, {words}"), ("short", "a photo of sks dog")]:
        (src / f"{name}.jpg").write_bytes(jpeg(photo((96, 80), len(name))))
        (src / f"{name}.txt").write_text(text)
    report = run(src, tmp_path / "out", caption=None, caption_from="txt")
    long = [w for w in report["set_warnings"] if w.startswith("long caption")]
    assert len(long) == 1 and "1 image " in long[0] and "long.jpg (" in long[0] and "short.jpg" not in long[0]
    assert "...a photo of sks dog" not in long[0] and "word" in long[0]  # where CLIP stops: in the word list
    report = run(src, tmp_path / "out2", caption="a photo of sks dog")
    assert not [w for w in report["set_warnings"] if w.startswith("long caption")]


@pytest.mark.parametrize("caption", ["", "   "])
def test_an_empty_caption_is_refused(tmp_path, caption):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    with pytest.raises(SdtuneError, match=r"--caption: .* holds no words"):
        run(src, tmp_path / "out", caption=caption)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("multiple,resolution,suggested", [
    (7, 512, "--resolution 504 or 560"),  # multiples of both 8 and 7
    (3, 512, "--resolution 504 or 528"),
    (64, 520, "--resolution 512 or 576"),
])
def test_a_bucket_multiple_suggests_resolutions_prep_takes(tmp_path, multiple, resolution, suggested):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    with pytest.raises(SdtuneError) as e:
        run(src, tmp_path / "out", crop="bucket", bucket_multiple=multiple, resolution=resolution)
    assert str(e.value).endswith(suggested)
    shown = [int(r) for r in suggested.split()[1::2]]
    report = run(src, tmp_path / "ok", crop="bucket", bucket_multiple=multiple, resolution=shown[0], min_side=1)
    assert report["files"][0]["status"] in ("kept", "fixed")
    with pytest.raises(SdtuneError, match=r"--bucket-multiple: 5000 leaves no --resolution"):
        run(src, tmp_path / "out", crop="bucket", bucket_multiple=5000)


def test_32_bit_integer_images_keep_their_brightness(tmp_path):
    """A 32-bit integer TIFF holds no convention for its range: values 0..255 were divided by 257 (black)."""
    src = tmp_path / "src"
    src.mkdir()
    gray = np.asarray(photo((96, 80), 0).convert("L")).astype(np.int32)
    Image.fromarray(gray).save(src / "as_8bit.tiff")
    Image.fromarray(gray * 257).save(src / "as_16bit.tiff")
    Image.fromarray(gray * 100_000).save(src / "beyond_16bit.tiff")
    out = tmp_path / "out"
    rows = {row["source"]: row for row in run(src, out, crop="center")["files"]}
    with Image.open(out / rows["as_8bit.tiff"]["output"]) as im:
        reference = np.asarray(im.convert("L"), dtype=np.float64)
    assert abs(reference.mean() - gray.mean()) < 8  # not black
    with Image.open(out / rows["as_16bit.tiff"]["output"]) as im:
        assert np.abs(np.asarray(im.convert("L"), dtype=np.float64) - reference).mean() < 2
    with Image.open(out / rows["beyond_16bit.tiff"]["output"]) as im:  # stretched to its own maximum
        beyond = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.max() < 250 and abs(beyond.mean() - reference.mean() * 255 / gray.max()) < 4


def test_a_black_and_white_copy_is_never_the_one_kept(tmp_path):
    """Of a colour photo and its grayscale copy (as sharp, as large), the colour one is the best copy, whatever
    their names' order; --drop duplicates keeps it."""
    src = tmp_path / "src"
    src.mkdir()
    shot = photo((96, 80), 0)
    shot.convert("L").save(src / "a_bw.jpg", quality=95)
    shot.save(src / "b_color.jpg", quality=95)
    for i in (1, 2):
        (src / f"c{i}.jpg").write_bytes(jpeg(photo((96, 80), 10 + i)))
    rows = {row["source"]: row for row in run(src, tmp_path / "out", drop=("duplicates",))["files"]}
    assert rows["b_color.jpg"]["status"] == "kept"
    assert rows["a_bw.jpg"]["status"] == "dropped"
    assert "in colour, unlike this grayscale copy" in rows["a_bw.jpg"]["reason"]


def test_a_dithered_gif_copy_is_not_kept_for_its_dither(tmp_path):
    """A GIF of a photo (few colours, Floyd-Steinberg dithered) measures sharper than the photo, its dither
    being fine edges, and was the copy kept. Now the full-colour copy is, and the GIF's reason says why."""
    src = tmp_path / "src"
    src.mkdir()
    shot = photo((96, 80), 0).resize((128, 106), Image.Resampling.BICUBIC)
    shot.save(src / "b_photo.png")
    shot.convert("P", palette=Image.Palette.ADAPTIVE, colors=16, dither=Image.Dither.FLOYDSTEINBERG).save(
        src / "a_copy.gif")
    for i in (1, 2):
        (src / f"c{i}.jpg").write_bytes(jpeg(photo((96, 80), 10 + i)))
    rows = {row["source"]: row for row in run(src, tmp_path / "out", drop=("duplicates",))["files"]}
    assert rows["a_copy.gif"]["sharpness"] > rows["b_photo.png"]["sharpness"]  # what used to decide
    assert rows["b_photo.png"]["status"] == "kept"
    assert rows["a_copy.gif"]["status"] == "dropped"
    assert "in full colour, unlike this copy of at most 256 colours" in rows["a_copy.gif"]["reason"]


def test_what_pillow_warns_about_a_file_is_that_files_warning(tmp_path, recwarn):
    """A JPEG with a cut EXIF block made Pillow print 'UserWarning: Corrupt EXIF data' on the terminal, naming
    no file, while the summary said 0 warnings: now it is the file's warning in the report."""
    src = tmp_path / "src"
    src.mkdir()
    data = jpeg(photo((96, 80), 0))
    exif = b"Exif\0\0MM\0*\0\0\0\x08" + b"\xff" * 50  # a TIFF header whose first directory is cut short
    (src / "cut_exif.jpg").write_bytes(data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:])
    report = run(src, tmp_path / "out")
    row = report["files"][0]
    assert row["status"] == "kept" and any(w.startswith("Pillow: Corrupt EXIF data") for w in row["warnings"])
    assert report["summary"]["warnings"] == 1
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


def test_a_token_the_rename_pattern_does_not_use_is_refused(tmp_path):
    """--token ohwx with the default --rename ({index:03d}) named no file and captioned nothing, in silence."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(photo((96, 80), 0)))
    with pytest.raises(SdtuneError, match=r"--token: the --rename pattern '\{index:03d\}' has no \{token\}"):
        run(src, tmp_path / "out", token="ohwx")
    assert run(src, tmp_path / "out", token="ohwx", rename="{token}_{index:03d}")["files"][0]["output"] == "ohwx_001.png"
