"""``sdtune prep --drop``: flagged duplicates and blurry photos left out of OUT and metadata.jsonl, listed in
the report; the line about replacing an earlier output; ``suggest-tokens --family/--tokenizer/--json``."""

import argparse
import json
import logging
from pathlib import Path

import pytest
from PIL import Image, ImageFilter
from prep_corpus import photo

from sdtune.cli.data import add_commands
from sdtune.errors import SdtuneError
from sdtune.prep import METADATA, REPORT, SHEET, prep

CAPTION = "a photo of sks dog"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdtune")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    args = parser().parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def photos(src: Path) -> None:
    """Four distinct sharp photos, an exact duplicate of b (the same image saved twice) and a blurred c."""
    src.mkdir()
    for i, name in enumerate("abcd"):
        photo((240, 180), 30 + i).save(src / f"{name}.png")
    photo((240, 180), 31).save(src / "b_copy.png")
    photo((240, 180), 32).filter(ImageFilter.GaussianBlur(8)).save(src / "c_blurred.png")


def prep_cli(src: Path, out: Path, capsys, *extra: str) -> tuple[dict, str]:
    code, printed = run_cli(["prep", str(src), str(out), "--resolution", "128", "--caption", CAPTION,
                             "--workers", "1", *extra], capsys)
    assert code == 0
    return json.loads((out / REPORT).read_text()), printed


def metadata(out: Path) -> list[str]:
    return [json.loads(line)["file_name"] for line in (out / METADATA).read_text().splitlines()]


def test_drop_duplicates_and_blurry(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    photos(src)
    report, printed = prep_cli(src, out, capsys, "--drop", "duplicates,blurry")
    rows = {row["source"]: row for row in report["files"]}

    assert rows["b_copy.png"]["status"] == "dropped"
    assert rows["b_copy.png"]["reason"].startswith("dropped (--drop duplicates): exact duplicate of ")
    assert "(b.png)" in rows["b_copy.png"]["reason"]
    assert rows["c_blurred.png"]["status"] == "dropped" and "looks blurry" in rows["c_blurred.png"]["reason"]
    assert "blurry" in rows["c_blurred.png"]["reason"].split(":")[0]
    for name in ("a.png", "b.png", "c.png", "d.png"):  # of duplicates the first stays
        assert rows[name]["status"] == "kept", name
    assert all("output" not in rows[n] for n in ("b_copy.png", "c_blurred.png"))

    written = metadata(out)
    assert written == [rows[n]["output"] for n in ("a.png", "b.png", "c.png", "d.png")]
    images = sorted(p.name for p in out.iterdir() if p.name not in (REPORT, METADATA, SHEET))
    assert images == sorted(written)  # the dropped ones are not written
    assert report["summary"]["dropped"] == 2 and report["summary"]["images"] == 4
    assert report["settings"]["drop"] == ["duplicates", "blurry"]
    assert "dropped: b_copy.png: dropped (--drop duplicates)" in printed
    assert "dropped: c_blurred.png: dropped (--drop " in printed
    assert "prep: 4 images in" in printed and "2 dropped" in printed
    with Image.open(out / SHEET) as sheet:  # the dropped ones are on it, crossed out: six cells, 3 x 2
        assert sheet.size == (3 * 200 + 8, 2 * 240 + 8)

    again = tmp_path / "again"  # deterministic, whatever the order of the names
    assert prep(src, again, resolution=128, caption=CAPTION, workers=1, progress=False, family="sd15",
                drop=["blurry", "duplicates"]) == report
    assert (again / METADATA).read_bytes() == (out / METADATA).read_bytes()


def test_without_drop_everything_is_kept(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    photos(src)
    report, printed = prep_cli(src, out, capsys)
    rows = {row["source"]: row for row in report["files"]}
    assert all(row["status"] == "kept" for row in rows.values())
    assert any("exact duplicate" in w for w in rows["b_copy.png"]["warnings"])
    assert any("looks blurry" in w for w in rows["c_blurred.png"]["warnings"])
    assert len(metadata(out)) == 6 and report["summary"]["dropped"] == 0
    assert report["settings"]["drop"] == [] and "dropped:" not in printed


def test_drop_refuses_unknown_checks_and_dropping_everything(tmp_path):
    src = tmp_path / "src"
    photos(src)
    with pytest.raises(SdtuneError, match=r"^--drop: 'dupes' is not one of duplicates, blurry"):
        prep(src, tmp_path / "out", caption=CAPTION, drop=["dupes"])
    # At 256 px every 180 px photo is upscaled (flagged SMALL): --drop small would leave nothing.
    with pytest.raises(SdtuneError, match=r"^--drop small: all 6 usable images would be dropped"):
        prep(src, tmp_path / "out", resolution=256, caption=CAPTION, workers=1, progress=False, drop="small")
    assert not (tmp_path / "out").exists()


def test_rerun_says_it_replaces_the_earlier_output(tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    photos(src)
    kw = {"resolution": 128, "caption": CAPTION, "workers": 1, "progress": False}
    with caplog.at_level(logging.INFO, logger="sdtune.prep"):
        prep(src, out, **kw)
        assert "replacing" not in caplog.text
        prep(src, out, drop=["duplicates"], **kw)
    lines = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert lines == [f"replacing the earlier prep output in {out.resolve()} (9 files)"]  # 6 images + 3
    dup = json.loads((out / REPORT).read_text())["files"][2]
    assert dup["source"] == "b_copy.png" and dup["status"] == "dropped"
    assert not (out / "003.png").exists()  # written by the first run, for b_copy.png


def test_suggest_tokens_json_for_sdxl(capsys):
    code, printed = run_cli(["suggest-tokens", "--n", "5", "--family", "sdxl", "--json"], capsys)
    assert code == 0
    items = json.loads(printed)
    assert len(items) == 5 and len({i["word"] for i in items}) == 5
    for item in items:
        assert item["verdict"] == "good" and item["single_token"]
        assert len(item["encoders"]) == 2  # both of SDXL's text encoders
        assert all(len(e["pieces"]) == 1 and len(e["ids"]) == 1 for e in item["encoders"])

    code, plain = run_cli(["suggest-tokens", "--n", "5", "--family", "sdxl"], capsys)
    assert plain.split() == [i["word"] for i in items]
    code, seeded = run_cli(["suggest-tokens", "--n", "3", "--seed", "4", "--family", "sd15"], capsys)
    _, default = run_cli(["suggest-tokens", "--n", "3", "--seed", "4"], capsys)
    assert seeded == default  # sd15's encoder is the default CLIP: the same suggestions


def test_suggest_tokens_with_a_models_tokenizers(tiny_model, capsys):
    model = str(tiny_model("sdxl"))
    code, printed = run_cli(["suggest-tokens", "--n", "3", "--tokenizer", model, "--family", "sdxl", "--json"],
                            capsys)
    items = json.loads(printed)
    assert code == 0 and len(items) == 3
    assert all(item["single_token"] and item["verdict"] == "good" for item in items)
    assert [e["name"] for e in items[0]["encoders"]] == ["tokenizer", "tokenizer_2"]
    _, shipped = run_cli(["suggest-tokens", "--n", "3", "--family", "sdxl"], capsys)
    assert shipped.split() == [i["word"] for i in items]  # the model's tokenizers are CLIP's BPE too


# --------------------------------------------------------------------------------------------------------
# Of duplicates the best copy stays (QA: --drop duplicates,blurry lost the only sharp copy of a photo)


def copies(src: Path) -> None:
    """Two shots with two copies each, the worse copy first by name: a blurred one beside a sharp one, a
    224 px wide one (as sharp, within SHARPNESS_TIE) beside a 240 px one; and two distinct sharp photos."""
    src.mkdir()
    shot = photo((240, 180), 40)
    shot.filter(ImageFilter.GaussianBlur(6)).save(src / "a_blurry.png")
    shot.save(src / "b_sharp.png")
    other = photo((240, 180), 41)
    other.resize((224, 168), Image.Resampling.LANCZOS).save(src / "c_smaller.png")
    other.save(src / "d_larger.png")
    for i, name in enumerate(("e.png", "f.png")):
        photo((240, 180), 42 + i).save(src / name)


@pytest.mark.parametrize("drop", ["duplicates,blurry", "duplicates"])
def test_of_duplicates_the_best_copy_stays(tmp_path, capsys, drop):
    src, out = tmp_path / "src", tmp_path / "out"
    copies(src)
    report, printed = prep_cli(src, out, capsys, "--drop", drop)
    rows = {row["source"]: row for row in report["files"]}
    assert [n for n, r in rows.items() if r["status"] == "dropped"] == ["a_blurry.png", "c_smaller.png"]
    assert metadata(out) == [rows[n]["output"] for n in ("b_sharp.png", "d_larger.png", "e.png", "f.png")]
    blurry, smaller = rows["a_blurry.png"]["reason"], rows["c_smaller.png"]["reason"]
    assert blurry.startswith(f"dropped (--drop {drop}): near duplicate of 002.png (b_sharp.png), perceptual "
                             "hash distance 0/64, the best copy: sharper (")
    assert ("looks blurry" in blurry) == ("blurry" in drop)
    assert smaller == ("dropped (--drop duplicates): near duplicate of 004.png (d_larger.png), perceptual "
                       "hash distance 0/64, the best copy: as sharp, larger (240x180 vs 224x168)")
    assert (f"dropped: a_blurry.png: dropped (--drop {drop}): near duplicate of 002.png (b_sharp.png)"
            in printed)
    assert "b_sharp.png" not in printed.replace("(b_sharp.png)", "")  # never dropped, never warned


def test_without_drop_the_best_copy_carries_no_duplicate_warning(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    copies(src)
    rows = {row["source"]: row for row in prep_cli(src, out, capsys)[0]["files"]}
    assert all(row["status"] == "kept" for row in rows.values())
    assert "warnings" not in rows["b_sharp.png"] and "warnings" not in rows["d_larger.png"]
    assert rows["a_blurry.png"]["warnings"][0].startswith("near duplicate of 002.png (b_sharp.png)")
    assert "looks blurry" in rows["a_blurry.png"]["warnings"][1]


def test_a_duplicate_of_a_dropped_copy_is_not_dropped_as_a_duplicate(tmp_path, capsys):
    """At 256 px the 240x180 photos are upscaled (SMALL): with --drop duplicates,small both copies of x go for
    being small, and the second's reason does not blame the first, itself dropped."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i, name in enumerate(("big1.png", "big2.png")):
        photo((400, 300), 50 + i).save(src / name)
    photo((240, 180), 52).save(src / "x.png")
    (src / "x_copy.png").write_bytes((src / "x.png").read_bytes())
    report, _ = prep_cli(src, out, capsys, "--resolution", "256", "--drop", "duplicates,small")
    rows = {row["source"]: row for row in report["files"]}
    assert rows["x.png"]["status"] == rows["x_copy.png"]["status"] == "dropped"
    assert rows["x_copy.png"]["reason"].startswith("dropped (--drop small): upscaled x1.42")
    assert "duplicate" not in rows["x_copy.png"]["reason"]
    assert ("exact duplicate of 003.png (x.png), the best copy: as sharp and as large, first by name; "
            "another --drop check leaves it out too") in rows["x_copy.png"]["warnings"][-1]
    assert metadata(out) == ["001.png", "002.png"]


def test_set_findings_choose_the_best_copy_and_say_why():
    """The choice on the measurements alone: not left out by another --drop check, then the sharpest (within
    SHARPNESS_TIE), then the largest, then the first; groups are the images near their group's first image."""
    import numpy as np

    from sdtune.prep import duplicate_groups, set_findings

    sha256 = np.zeros((6, 32), dtype=np.uint8)
    sha256[:, 0] = np.arange(6)
    sha256[5] = sha256[4]  # 5: the same bytes as 4
    high = 0xFFFF << 48
    # 1 is 4 bits from 0; 2 is 3 bits from 1 but 7 from 0, its group's first image: a group of its own
    phash = np.array([0, 0b1111, 0b1111111, high, high ^ 1, high ^ 1], dtype=np.uint64)
    sharpness = np.array([10, 100, 50, 95, 100, 100], dtype=np.float64)
    sizes = np.array([(100, 100)] * 3 + [(200, 200), (100, 100), (100, 100)])

    def named(i: int) -> str:
        return f"#{i}"

    assert [g.tolist() for g in duplicate_groups(sha256, phash)] == [[0, 1], [3, 4, 5]]
    found = set_findings(sha256, phash, sharpness, False, named, sizes=sizes)
    assert found.best_copy == {0: 1, 4: 3, 5: 3}
    # duplicates first, image by image, then blur (10 is under 25% of the median, 97.5)
    assert [(i, flag) for i, flag, _ in found.findings] == [(0, "DUP"), (4, "DUP"), (5, "DUP"), (0, "BLUR")]
    texts = {i: text for i, flag, text in found.findings if flag == "DUP"}
    assert texts[0] == ("near duplicate of #1, perceptual hash distance 4/64, the best copy: sharper "
                        "(100.0 vs 10.0)")
    assert texts[4] == ("near duplicate of #3, perceptual hash distance 1/64, the best copy: as sharp, "
                        "larger (200x200 vs 100x100)")

    avoid = np.array([False, False, False, True, False, False])  # 3 is left out by another --drop check
    found = set_findings(sha256, phash, sharpness, False, named, sizes=sizes, avoid=avoid)
    assert found.best_copy == {0: 1, 3: 4, 5: 4}
    texts = {i: text for i, flag, text in found.findings if flag == "DUP"}
    assert texts[5] == "exact duplicate of #4, the best copy: as sharp and as large, first by name"
    assert texts[3].endswith("the best copy: not left out by another --drop check, unlike this copy")

    avoid[4:] = True  # every copy left out: still the best one named, but no copy blamed on it
    found = set_findings(sha256, phash, sharpness, False, named, sizes=sizes, avoid=avoid)
    assert found.best_copy[4] == found.best_copy[5] == 3
    assert all(t.endswith("so --drop duplicates does not count this copy")
               for i, _, t in found.findings if i > 2)

    # --drop blurry: a blurry copy is never the one kept, though as sharp (within 10%) as another and larger
    sha256[:, 0] = np.arange(6)  # no two the same bytes
    phash = np.array([0, 0xFF, 0xFF00, high, high ^ 1, 0xFF0000], dtype=np.uint64)  # 3, 4: one shot
    sharpness = np.array([100, 100, 100, 26, 24, 100], dtype=np.float64)  # 4 under 25% of the median, 100
    sizes = np.array([(100, 100)] * 4 + [(999, 999), (100, 100)])
    assert set_findings(sha256, phash, sharpness, False, named, sizes=sizes).best_copy == {3: 4}
    found = set_findings(sha256, phash, sharpness, False, named, sizes=sizes, drop=("blurry",))
    assert found.best_copy == {4: 3}
    assert [(i, flag) for i, flag, _ in found.findings] == [(4, "DUP"), (4, "BLUR")]
    assert set_findings(sha256[:0], phash[:0], sharpness[:0], False, named).findings == []


# --------------------------------------------------------------------------------------------------------
# A rerun never loses what was edited in OUT since prep wrote it


def test_rerun_refuses_to_replace_files_edited_since_prep_wrote_them(tmp_path, capsys, monkeypatch):
    import hashlib
    import os

    from sdtune import files
    from sdtune import prep as prep_module

    src, out = tmp_path / "src", tmp_path / "out"
    photos(src)
    kw = {"resolution": 128, "caption": CAPTION, "workers": 1, "progress": False}
    report = prep(src, out, **kw)
    for row in report["files"]:  # what prep wrote, as it wrote it
        assert row["output_sha256"] == hashlib.sha256((out / row["output"]).read_bytes()).hexdigest()
    assert report["metadata_sha256"] == hashlib.sha256((out / METADATA).read_bytes()).hexdigest()
    assert json.loads((out / REPORT).read_text()) == report

    meta = out / METADATA
    edited = meta.read_text().replace(CAPTION, "a photo of sks dog, hand edited", 1)
    meta.write_text(edited)
    with pytest.raises(SdtuneError) as e:
        prep(src, out, **kw)
    assert str(e.value) == (f"OUT: metadata.jsonl in {out.resolve()} was edited since prep wrote it; fix: "
                            "--overwrite-edits to replace it, or move it away first")
    assert meta.read_text() == edited  # the edit is still there
    with Image.open(out / "002.png") as im:
        im.rotate(90).save(out / "002.png")
    with pytest.raises(SdtuneError, match=r"^OUT: 002.png, metadata.jsonl in .* were edited since prep wrote "
                                          r"them; fix: --overwrite-edits to replace them"):
        prep_cli(src, out, capsys)
    assert meta.read_text() == edited

    _, printed = prep_cli(src, out, capsys, "--overwrite-edits")
    assert "prep: 6 images in" in printed and "hand edited" not in meta.read_text()

    hashed = []
    monkeypatch.setattr(prep_module, "sha256_file", lambda p: hashed.append(p.name) or files.sha256_file(p))
    prep(src, out, **kw)  # untouched: only metadata.jsonl is read back, every image is older than the report
    assert hashed == [METADATA]
    later = (out / REPORT).stat().st_mtime_ns + 10**9
    for p in out.iterdir():  # as after a copy: every file newer than the report, none changed
        if p.name != REPORT:
            os.utime(p, ns=(later, later))
    hashed.clear()
    prep(src, out, **kw)
    assert sorted(hashed) == sorted([METADATA, *metadata(out)])

    # the report of an older sdtune, with no hashes: nothing to compare, replaced as before
    old = json.loads((out / REPORT).read_text())
    del old["metadata_sha256"]
    for row in old["files"]:
        row.pop("output_sha256", None)
    (out / REPORT).write_text(json.dumps(old))
    meta.write_text(edited)
    prep(src, out, **kw)
    assert "hand edited" not in meta.read_text()

    (out / "001.png").unlink()  # a folder in an image's place: replacing it would delete what it holds
    (out / "001.png").mkdir()
    (out / "001.png" / "mine.txt").write_text("x")
    with pytest.raises(SdtuneError, match=r"^OUT: 001.png in .* was edited since prep wrote it"):
        prep(src, out, **kw)
    assert (out / "001.png" / "mine.txt").read_text() == "x"


def test_the_report_ends_with_what_is_known_once_every_row_is_written():
    import io

    from sdtune.prep import _report_writer

    head = {"sdtune_prep": 1, "summary": {"files": 1}}
    for rows in ([{"source": "é.jpg", "status": "kept"}], []):
        out = io.StringIO()
        tail: dict[str, str] = {}
        with _report_writer(out, head, tail) as write_row:
            for row in rows:
                write_row(row)
            tail["metadata_sha256"] = "ab" * 32
        whole = {**head, "files": rows, "metadata_sha256": "ab" * 32}
        assert out.getvalue() == json.dumps(whole, indent=1, ensure_ascii=False) + "\n"
