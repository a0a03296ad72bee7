"""Where the captions of a folder of photos come from, and how a data.dataset source is opened: metadata.csv
beside metadata.jsonl (as datasets' imagefolder reads both), the caption keys data.dataset takes (text,
caption, prompt) in metadata.jsonl too, one line for a malformed metadata file, a local folder of images with
.txt captions read as an imagefolder, and a hub id with no network: one probe, one line."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import DEMO_DATA, ROOT, write_parquet
from sdtune.cli import main
from sdtune.data import scan_instance_dir

KEY = "data.instance_dir"
CAPTIONS = ["a photo of sks toy", "sks toy, on a shelf", "a close photo of sks toy \u00e9t\u00e9"]


def _folder(path: Path, n: int = 3) -> list[str]:
    """``n`` demo photos in ``path``; their names."""
    path.mkdir(parents=True, exist_ok=True)
    names = [f"toy_{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", path / name)
    return names


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------
# metadata.csv


def test_metadata_csv_captions_the_images_as_imagefolder_reads_it(tmp_path):
    names = _folder(tmp_path)
    # csv.writer quotes the caption with a comma; a BOM (Excel's "CSV UTF-8") is not part of the header
    _csv(tmp_path / "metadata.csv", ["file_name", "caption"], [[n, c] for n, c in zip(names, CAPTIONS)])
    (tmp_path / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "metadata.csv").read_bytes())
    scan = scan_instance_dir(tmp_path, "sks", "an instance prompt that must not be used")
    assert scan.problems == [] and scan.warnings == []
    assert [(e.path.name, e.caption) for e in scan.examples] == list(zip(names, CAPTIONS))

    # as with metadata.jsonl, an image the file does not list is not an example, and it is said
    shutil.copy(DEMO_DATA / "toy_05.png", tmp_path / "extra.png")
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert len(scan.examples) == 3 and "not in metadata.csv, so not used: extra.png" in scan.warnings


def test_metadata_csv_problems_are_one_line_per_reason(tmp_path):
    names = _folder(tmp_path)
    _csv(tmp_path / "metadata.csv", ["file_name", "description"], [[n, "sks toy"] for n in names])
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == [f"{KEY}: {tmp_path / 'metadata.csv'} line 1 is a header without file_name and a "
                             "caption (text, caption or prompt) (file_name,description); fix: a first line such "
                             "as file_name,text"]

    (tmp_path / "metadata.csv").write_text(
        "file_name,text\n"
        f"{names[0]},sks toy\n"
        f"{names[1]},sks toy, unquoted comma\n"  # three fields: pandas refuses it, so does sdtune
        f"{names[2]},\n"  # an empty caption: datasets reads null
        "gone.png,sks toy\n", encoding="utf-8")
    scan = scan_instance_dir(tmp_path, "sks", None)
    csv_file = tmp_path / "metadata.csv"
    assert scan.problems == [
        f"{KEY}: {csv_file} line 3 has 3 fields, its header 2; fix: one value per column (a caption that holds "
        'a comma in double quotes: "a photo of sks dog, smiling")',
        f"{KEY}: {csv_file} line 4 has an empty text; fix: fill it in, or remove the line",
        f"{KEY}: {csv_file} names gone.png, which is not in the folder",
    ]
    assert [e.path.name for e in scan.examples] == [names[0]]


def test_a_folder_with_both_metadata_files_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    names = _folder(folder)
    _jsonl(folder / "metadata.jsonl", [{"file_name": n, "text": "a photo of sks toy"} for n in names])
    _csv(folder / "metadata.csv", ["file_name", "text"], [[n, "sks toy"] for n in names])
    scan = scan_instance_dir(folder, "sks", "a photo of sks toy")
    assert scan.problems == [f"{KEY}: {folder} holds both metadata.jsonl and metadata.csv, so which captions are "
                             "meant is not clear (datasets' imagefolder refuses such a folder too); fix: keep one"]
    assert scan.examples == []
    code = main(["train", str(ROOT / "recipes" / "tiny_cpu.yaml"), f"model.pretrained={tiny_model('sd15')}",
                 f"data.instance_dir={folder}", "prior.enabled=false", f"train.output_dir={tmp_path / 'out'}",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "holds both metadata.jsonl and metadata.csv" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# metadata.jsonl: caption keys, and one line for a malformed file


@pytest.mark.parametrize("caption_key", ["text", "caption", "prompt"])
def test_metadata_jsonl_takes_the_caption_keys_data_dataset_takes(tmp_path, caption_key):
    names = _folder(tmp_path)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, caption_key: c} for n, c in zip(names, CAPTIONS)])
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == []
    assert [e.caption for e in scan.examples] == CAPTIONS


def test_one_caption_key_per_metadata_jsonl(tmp_path):
    names = _folder(tmp_path)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": names[0], "caption": CAPTIONS[0]},
                                         {"file_name": names[1], "text": CAPTIONS[1]},
                                         {"file_name": names[2], "caption": CAPTIONS[2]}])
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == [
        f"{KEY}: {tmp_path / 'metadata.jsonl'} line 2 is not a JSON object with file_name and caption (the "
        'caption key of its first row: one key per file); fix: e.g. {"file_name": "001.png", "caption": '
        '"a photo of sks dog"}']
    assert [e.path.name for e in scan.examples] == [names[0], names[2]]


def test_a_malformed_metadata_jsonl_is_one_line_not_one_per_row(tmp_path):
    names = _folder(tmp_path)
    rows = [{"file_name": names[i % 3], "label": "sks toy"} for i in range(1500)]  # no caption key anywhere
    _jsonl(tmp_path / "metadata.jsonl", rows)
    scan = scan_instance_dir(tmp_path, "sks", "a photo of sks toy")
    assert scan.problems == [
        f"{KEY}: {tmp_path / 'metadata.jsonl'} line 1 is not a JSON object with file_name and a caption (text, "
        "caption or prompt) (1,499 more lines like it: 2, 3, 4, 5, 6, ...); fix: e.g. "
        '{"file_name": "001.png", "text": "a photo of sks dog"}']

    # names that are not in the folder: one line too, the first few named
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": f"gone_{i}.png", "text": "sks toy"} for i in range(40)])
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == [f"{KEY}: {tmp_path / 'metadata.jsonl'} names gone_0.png, gone_1.png, gone_2.png, "
                             "gone_3.png, gone_4.png and 35 more, which are not in the folder"]


# --------------------------------------------------------------------------------------------------------
# data.dataset: a local folder of images, and a hub id with no network


@pytest.fixture
def datasets(tmp_path_factory, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # datasets converts an imagefolder into arrow files in its own cache: not the user's
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    return datasets


def test_a_local_folder_of_photos_with_txt_captions_loads_as_an_imagefolder(datasets, tmp_path):
    from sdtune.hfdata import materialize

    # as `sdtune micro subject` and `sdtune prep` write it: images, a .txt beside each, metadata.jsonl.
    # datasets alone infers its `text` builder here (as many .txt files as images): no image column.
    folder = tmp_path / "photos"
    names = _folder(folder)
    for name, caption in zip(names, CAPTIONS):
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    _jsonl(folder / "metadata.jsonl", [{"file_name": n, "text": c} for n, c in zip(names, CAPTIONS)])
    problems: list[str] = []
    written = materialize(str(folder), "train", None, None, None, problems)
    assert problems == [] and written is not None
    rows = [json.loads(line) for line in (written / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(CAPTIONS)
    assert sorted((written / r["file_name"]).read_bytes() for r in rows) == \
        sorted((folder / n).read_bytes() for n in names)  # each image's bytes as they were

    empty = tmp_path / "captions-only"
    empty.mkdir()
    (empty / "a.txt").write_text("a photo of sks toy")
    problems = []
    assert materialize(str(empty), "train", None, None, None, problems) is None
    assert len(problems) == 1 and problems[0].startswith(
        f"data.dataset: {empty} holds no images and no .parquet or .arrow files (subfolders included)")
    assert "data.instance_dir" in problems[0]


def test_a_hub_id_without_network_is_one_probe_and_one_line(datasets, monkeypatch, unreachable_hub):
    from sdtune.hfdata import materialize

    # a user who set no offline variable, on a machine where the Hub does not answer
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    start = time.monotonic()
    problems: list[str] = []
    assert materialize("nobody-sdtune/no-such-dataset", "train", None, None, "p", problems) is None
    assert time.monotonic() - start < 10  # not datasets' five retries of each request
    assert len(unreachable_hub) == 1 and len(problems) == 1
    assert problems[0].startswith("data.dataset: nobody-sdtune/no-such-dataset is not in the datasets cache")
    assert "and the Hub cannot be reached from here" in problems[0]
    assert "HF_HUB_OFFLINE" not in problems[0] and "HF_DATASETS_OFFLINE" not in problems[0]


# --------------------------------------------------------------------------------------------------------
# metadata.parquet


def test_metadata_parquet_captions_the_images_as_imagefolder_reads_it(tmp_path):
    """datasets' imagefolder reads metadata.parquet beside .jsonl and .csv: so does a training folder (it was
    'not in a format sdtune reads, fix: convert them to PNG', and the images trained on the instance prompt)."""
    names = _folder(tmp_path)
    write_parquet(tmp_path / "metadata.parquet", {"file_name": names, "prompt": CAPTIONS})
    scan = scan_instance_dir(tmp_path, "sks", "an instance prompt that must not be used")
    assert scan.problems == [] and scan.warnings == []
    assert [(e.path.name, e.caption) for e in scan.examples] == list(zip(names, CAPTIONS))
    shutil.copy(DEMO_DATA / "toy_05.png", tmp_path / "extra.png")
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert len(scan.examples) == 3 and "not in metadata.parquet, so not used: extra.png" in scan.warnings


def test_metadata_parquet_problems_are_one_line_per_reason_with_rows(tmp_path):
    names = _folder(tmp_path)
    parquet = tmp_path / "metadata.parquet"
    write_parquet(parquet, {"file_name": [names[0], names[1], names[2], "gone.png", "sub/x.png"],
                       "text": ["sks toy", None, "", "sks toy", "sks toy"]})
    scan = scan_instance_dir(tmp_path, "sks", None)
    assert scan.problems == [
        f"{KEY}: {parquet} row 2 has no text (empty or not text) (1 more row like it: 3); fix: fill it in, or "
        "remove the row",
        f"{KEY}: {parquet} row 5 names sub/x.png, in a subfolder, which is not read; fix: move the image into the "
        "folder itself and give its bare file name",
        f"{KEY}: {parquet} names gone.png, which is not in the folder",
    ]
    write_parquet(parquet, {"file_name": names, "label": ["a", "b", "c"]})
    assert scan_instance_dir(tmp_path, "sks", None).problems == [
        f"{KEY}: {parquet} has no file_name and a caption (text, caption or prompt) columns (its columns: "
        "file_name, label); fix: name them file_name and text"]
    parquet.write_bytes(b"not parquet")
    [problem] = scan_instance_dir(tmp_path, "sks", None).problems
    assert problem.startswith(f"{KEY}: {parquet} cannot be read as Parquet (")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": "sks toy"} for n in names])
    assert scan_instance_dir(tmp_path, "sks", None).problems == [
        f"{KEY}: {tmp_path} holds both metadata.jsonl and metadata.parquet, so which captions are meant is not "
        "clear (datasets' imagefolder refuses such a folder too); fix: keep one"]
