"""``sdtune prep``'s sources (QA findings): captions from the source's own metadata.jsonl / metadata.csv as
``datasets``' imagefolder reads them, buckets of the sides the model takes (``--model``, ``--bucket-multiple``),
caption files counted as captions, captions without images, a .txt that disagrees with the metadata,
warnings of one kind capped on the terminal, and ``--workers`` checked."""

import argparse
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from prep_corpus import jpeg, photo

from conftest import write_parquet
from sdtune.cli.data import SHOWN_WARNINGS, add_commands
from sdtune.data import assign_buckets
from sdtune.errors import SdtuneError
from sdtune.prep import METADATA, REPORT, bucket_sizes, prep

SIZES = [(96, 72), (72, 96), (80, 80), (120, 60)]


def run(src, out, **kw) -> dict:
    kw = {"resolution": 64, "workers": 1, "progress": False, **kw}
    return prep(src, out, **kw)


def by_source(report: dict) -> dict[str, dict]:
    return {row["source"]: row for row in report["files"]}


def written(out: Path) -> dict[str, str]:
    """OUT's metadata.jsonl: output name -> caption."""
    return {r["file_name"]: r["text"] for r in map(json.loads, (out / METADATA).read_text().splitlines())}


def photos(src: Path, n: int, txt: bool = False) -> list[str]:
    src.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"p{i}.jpg"
        (src / name).write_bytes(jpeg(photo(SIZES[i % len(SIZES)], i)))
        if txt:
            (src / f"p{i}.txt").write_text(f"a photo of sks dog, txt {i}\n")
        names.append(name)
    return names


def command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdtune")
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["prep", *argv])


# --------------------------------------------------------------------------------------------------------
# 1. --caption-from metadata


def test_captions_from_metadata_jsonl_and_csv_as_datasets_reads_them(tmp_path):
    """The imagefolder layout sdtune itself writes, re-prepped with its captions; a nested metadata file names
    its images relative to its own folder; metadata.csv with a caption column and quoted commas; every caption
    is the one datasets' imagefolder gives the same image."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    photos(src, 3)
    photos(src / "more", 1)
    rows = [{"file_name": "p0.jpg", "text": "a photo of sks dog, on a beach"},
            {"file_name": "p1.jpg", "text": "a photo of  sks dog\tin snow"},
            {"file_name": "p2.jpg", "text": "a photo of sks dog"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (src / "more" / "metadata.jsonl").write_text(json.dumps({"file_name": "p0.jpg", "text": "nested sks dog"}) + "\n")
    report = run(src, tmp_path / "a", caption_from="metadata")
    got = {row["source"]: row.get("caption") for row in report["files"] if row["status"] == "kept"}
    assert got == {"p0.jpg": "a photo of sks dog, on a beach", "p1.jpg": "a photo of sks dog in snow",
                   "p2.jpg": "a photo of sks dog", "more/p0.jpg": "nested sks dog"}
    assert sorted(written(tmp_path / "a").values()) == sorted(got.values())
    table = by_source(report)
    assert table["metadata.jsonl"]["status"] == table["more/metadata.jsonl"]["status"] == "caption"
    assert table["metadata.jsonl"]["reason"] == "the captions of 3 images (--caption-from metadata)"
    assert report["summary"]["captions"] == 2 and report["summary"]["ignored"] == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(src), split="train")
    theirs = {Path(p).relative_to(src).as_posix(): t for p, t in
              zip([im.filename for im in ds["image"]], ds["text"])}
    assert {k: " ".join(v.split()) for k, v in theirs.items()} == got

    csv_src = tmp_path / "csv"
    photos(csv_src, 2)
    (csv_src / "metadata.csv").write_text('file_name,caption\np0.jpg,"sks dog, red collar"\n'
                                          'p1.jpg,"sks dog\nin the park"\n')
    rows = by_source(run(csv_src, tmp_path / "b", caption_from="metadata"))
    assert rows["p0.jpg"]["caption"] == "sks dog, red collar" and rows["p1.jpg"]["caption"] == "sks dog in the park"
    # a re-prep of prep's own output keeps its captions (its metadata.jsonl names the output files)
    again = run(tmp_path / "a", tmp_path / "c", caption_from="metadata")
    assert sorted(written(tmp_path / "c").values()) == sorted(got.values()) and again["summary"]["images"] == 4


def test_no_caption_option_names_the_metadata_file_and_how_to_use_it(tmp_path):
    src = tmp_path / "src"
    photos(src, 2)
    (src / "metadata.jsonl").write_text('{"file_name": "p0.jpg", "text": "sks dog"}\n'
                                        '{"file_name": "p1.jpg", "text": "sks dog"}\n')
    args = command([str(src), str(tmp_path / "out"), "--resolution", "64"])
    with pytest.raises(SdtuneError) as e:
        args.func(args)
    assert len(str(e.value).splitlines()) == 1
    assert "--caption-from filename|txt|metadata" in str(e.value)
    assert "SRC has metadata.jsonl: --caption-from metadata uses its captions" in str(e.value)
    with pytest.raises(SdtuneError) as e:  # --caption-from txt, no .txt anywhere: the fix names the metadata
        run(src, tmp_path / "out", caption_from="txt")
    assert str(e.value).splitlines()[-1] == "fix: SRC has metadata.jsonl: --caption-from metadata uses its captions"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, says", [
    ({}, "has no metadata.jsonl, .csv or .parquet"),
    ({"metadata.jsonl": '{"file_name": "p0.jpg", "text": "x"}\n', "sub/metadata.csv": "file_name,text\n"},
     "two kinds"),
    ({"metadata.jsonl": '{"file_name": "p0.jpg", "text": "x"}\nnot json\n'}, "metadata.jsonl line 2 is not a JSON"),
    ({"metadata.jsonl": '{"file_name": "../p0.jpg", "text": "x"}\n'}, "outside its folder"),
    ({"metadata.jsonl": '{"text": "x"}\n'}, "line 1 has no file_name"),
    ({"metadata.csv": "file_name,label\np0.jpg,dog\n"}, "metadata.csv line 1 is a header without file_name and a "
                                                        "caption (text, caption or prompt) (file_name,label)"),
    # an unquoted comma: pandas (datasets' reader) refuses the line; prep read "a photo of sks dog" and dropped
    # ", smiling" without a word (the training folder's reader refused it: both now parse with sdtune.metadata)
    ({"metadata.csv": "file_name,text\np0.jpg,a photo of sks dog, smiling\n"},
     "metadata.csv line 2 has 3 fields, its header 2; fix: one value per column"),
    ({"metadata.jsonl": '{"file_name": "p0.jpg", "text": "x"}\n{"file_name": "p1.jpg"}\n[]\n'},
     "metadata.jsonl line 2 is not a JSON object with file_name and text (the caption key of its first row: one "
     "key per file) (1 more line refused: 3)"),
])
def test_metadata_that_datasets_would_refuse_is_one_line(tmp_path, files, says):
    src = tmp_path / "src"
    photos(src, 1)
    for name, text in files.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_text(text)
    with pytest.raises(SdtuneError) as e:
        run(src, tmp_path / "out", caption_from="metadata")
    assert says in str(e.value) and len(str(e.value).splitlines()) == 1


# --------------------------------------------------------------------------------------------------------
# 2. buckets of the sides the model takes


def test_buckets_are_the_models_so_training_never_recrops(tmp_path, capsys):
    """At 64 px prep's 8-px buckets (72x56, ...) are not the micro model's (multiples of 16); with --model
    prep writes exactly the bucket training assigns each image, and says which multiple it used."""
    from sdtune.micro.model import write_model

    src = tmp_path / "src"
    photos(src, 4)
    plain = run(src, tmp_path / "plain", crop="bucket", caption="sks dog")
    sizes = {tuple(r["output_size"]) for r in plain["files"]}
    assert (72, 56) in sizes  # the finding: a size the micro model's UNet does not take
    model = write_model(tmp_path / "micro")
    args = command([str(src), str(tmp_path / "out"), "--model", str(model), "--crop", "bucket", "--caption",
                    "sks dog", "--workers", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "buckets: sides in multiples of 16 (" in printed and "so training uses them as written" in printed
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["settings"]["bucket_multiple"] == 16 and report["settings"]["resolution"] == 64
    images = sorted((tmp_path / "out").glob("*.png"))
    made = [Image.open(p).size for p in images]
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in made) and len(set(made)) > 1
    assert assign_buckets(images, 64, 16) == made  # training's bucket of each image is the image's own size
    # without a model prep says its buckets may be cropped in training, and how to avoid it
    args = command([str(src), str(tmp_path / "o2"), "--resolution", "64", "--crop", "bucket", "--caption", "x"])
    args.func(args)
    assert "pass --model MODEL (or --bucket-multiple N)" in capsys.readouterr().out


def test_bucket_multiple_is_checked_and_leaves_512_px_buckets_alone(tmp_path):
    src = tmp_path / "src"
    photos(src, 1)
    for kw, says in [({"crop": "smart", "bucket_multiple": 16}, "--bucket-multiple: only --crop bucket"),
                     ({"crop": "bucket", "bucket_multiple": 0}, "--bucket-multiple: 0 is not"),
                     ({"crop": "bucket", "bucket_multiple": 16, "resolution": 72},
                      "--resolution: 72 is not a multiple")]:
        with pytest.raises(SdtuneError) as e:
            run(src, tmp_path / "out", caption="x", **kw)
        assert str(e.value).startswith(says), str(e.value)
    # the default output at 512 px and up is unchanged: 64-px steps, which every family's multiple divides
    for resolution, multiple in [(512, 64), (768, 64), (1024, 32), (1024, 16)]:
        assert bucket_sizes(resolution, multiple) == bucket_sizes(resolution)
    with pytest.raises(SystemExit):  # argparse: --model and --bucket-multiple are one choice
        command(["a", "b", "--model", "m", "--bucket-multiple", "16"])


# --------------------------------------------------------------------------------------------------------
# 3. caption files, captions without images, disagreements, terminal floods, workers


def test_txt_captions_are_counted_as_captions_and_leftovers_warned(tmp_path, capsys):
    src = tmp_path / "src"
    photos(src, 3, txt=True)
    (src / "deleted.txt").write_text("a photo of sks dog that was deleted\n")
    (src / "metadata.jsonl").write_text('{"file_name": "p0.jpg", "text": "a photo of sks dog, txt 0"}\n'
                                        '{"file_name": "p1.jpg", "text": "a photo of sks cat"}\n')
    args = command([str(src), str(tmp_path / "out"), "--resolution", "64", "--caption-from", "txt", "--workers", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    rows = by_source(report)
    assert rows["p0.txt"] == {"source": "p0.txt", "status": "caption",
                              "reason": "the caption of p0.jpg (--caption-from txt)"}
    assert report["summary"]["captions"] == 3 and report["summary"]["ignored"] == 2  # deleted.txt, metadata.jsonl
    assert "3 caption files, 2 ignored" in printed
    assert rows["deleted.txt"]["warnings"] == ["caption without image: no image deleted.* beside it, so its "
                                               "caption is not used"]
    assert "warning: - (deleted.txt): caption without image" in printed
    assert rows["metadata.jsonl"]["reason"].startswith("not read: --caption-from txt")
    # only p1's captions differ; the note says which one is used
    [note] = [w for w in report["set_warnings"] if "differ" in w]
    assert note.startswith("1 image with a .txt and a metadata.jsonl caption that differ; the .txt captions are used")
    assert "p1.jpg: 'a photo of sks cat' (metadata.jsonl line 2) vs 'a photo of sks dog, txt 1' (p1.txt)" in note
    assert written(tmp_path / "out")["002.png"] == "a photo of sks dog, txt 1"
    # the other way round: the metadata is used, and the note says so
    report = run(src, tmp_path / "m", caption_from="metadata")
    assert written(tmp_path / "m") == {"001.png": "a photo of sks dog, txt 0", "002.png": "a photo of sks cat"}
    notes = " | ".join(report["set_warnings"])
    assert "the metadata captions are used (--caption-from metadata), not the .txt files" in notes
    assert by_source(report)["p2.jpg"]["reason"] == "no caption: metadata.jsonl does not list it (--caption-from " \
                                                    "metadata)"


def test_metadata_rows_without_an_image_are_a_warning(tmp_path):
    src = tmp_path / "src"
    photos(src, 1)
    (src / "metadata.jsonl").write_text('{"file_name": "p0.jpg", "text": "sks dog"}\n'
                                        '{"file_name": "gone.jpg", "text": "sks dog"}\n')
    report = run(src, tmp_path / "out", caption_from="metadata")
    assert report["set_warnings"] == ["caption without image: 1 row of metadata.jsonl name no image in SRC, so "
                                      "their captions are not used: gone.jpg (metadata.jsonl line 2)"]


def test_warnings_of_one_kind_are_a_few_lines_and_a_count(tmp_path, capsys):
    """Twelve copies of one shot: 11 duplicate warnings, SHOWN_WARNINGS printed and one line for the rest;
    the report keeps all of them."""
    src = tmp_path / "src"
    src.mkdir()
    data = jpeg(photo((96, 72), 1))
    for i in range(12):
        (src / f"copy{i:02d}.jpg").write_bytes(data)
    args = command([str(src), str(tmp_path / "out"), "--resolution", "64", "--caption", "x", "--workers", "1"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    dup = [x for x in lines if "exact duplicate of" in x]
    assert len(dup) == SHOWN_WARNINGS
    more = f"warning: ... and {11 - SHOWN_WARNINGS} more 'exact duplicate ...' warnings (of 11; each in "
    assert more in "\n".join(lines)
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert sum(len(r.get("warnings", [])) for r in report["files"]) == 11 == report["summary"]["warnings"]


def test_workers_are_checked_and_capped_at_the_cores(tmp_path, monkeypatch, caplog):
    import sdtune.prep as prep_module

    src = tmp_path / "src"
    photos(src, 1)
    for bad in (0, -1):
        with pytest.raises(SdtuneError) as e:
            prep(src, tmp_path / "out", resolution=64, caption="x", workers=bad, progress=False)
        assert str(e.value).startswith(f"--workers: {bad} is not a number of processes >= 1")
        with pytest.raises(SystemExit):
            command(["a", "b", f"--workers={bad}"])
    monkeypatch.setattr(prep_module, "_cores", lambda: 1)
    with caplog.at_level(logging.INFO, logger="sdtune.prep"):
        report = prep(src, tmp_path / "out", resolution=64, caption="x", workers=64, progress=False)
    assert "--workers 64: this machine has 1 CPU cores for it; using 1" in caplog.text
    assert report["summary"]["images"] == 1


def test_captions_from_metadata_parquet_as_datasets_reads_them(tmp_path):
    """metadata.parquet (datasets 3 to 5's imagefolder reads it beside .jsonl and .csv): its captions, nested
    ones relative to their folder, the file counted as a caption file (it was decoded as a photo and skipped),
    and the same captions datasets' imagefolder gives; a broken one is one line naming it."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    photos(src, 2)
    photos(src / "more", 1)
    write_parquet(src / "metadata.parquet", {"file_name": ["p0.jpg", "p1.jpg"],
                                        "caption": ["a photo of sks dog, on a beach", "sks dog  in snow"],
                                        "width": [96, 72]})
    write_parquet(src / "more" / "metadata.parquet", {"file_name": ["p0.jpg"], "caption": ["nested sks dog"]})
    report = run(src, tmp_path / "a", caption_from="metadata")
    got = {row["source"]: row.get("caption") for row in report["files"] if row["status"] == "kept"}
    assert got == {"p0.jpg": "a photo of sks dog, on a beach", "p1.jpg": "sks dog in snow",
                   "more/p0.jpg": "nested sks dog"}
    assert sorted(written(tmp_path / "a").values()) == sorted(got.values())
    table = by_source(report)
    assert table["metadata.parquet"]["status"] == table["more/metadata.parquet"]["status"] == "caption"
    assert report["summary"]["skipped"] == 0 and report["summary"]["ignored"] == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(src), split="train", cache_dir=str(tmp_path / "hf"))
    theirs = {Path(im.filename).relative_to(src).as_posix(): t for im, t in zip(ds["image"], ds["caption"])}
    assert {k: " ".join(v.split()) for k, v in theirs.items()} == got

    (src / "more" / "metadata.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SdtuneError) as e:
        run(src, tmp_path / "b", caption_from="metadata")
    assert "more/metadata.parquet cannot be read as Parquet" in str(e.value) and len(str(e.value).splitlines()) == 1
    (src / "more" / "metadata.parquet").unlink()
    write_parquet(src / "metadata.parquet", {"file_name": ["p0.jpg", None], "text": ["sks dog", "sks dog"]})
    with pytest.raises(SdtuneError, match=r"metadata.parquet row 2 has no file_name"):
        run(src, tmp_path / "c", caption_from="metadata")
