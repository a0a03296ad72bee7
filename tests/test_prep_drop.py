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
