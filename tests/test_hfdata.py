"""data.dataset: Hugging Face datasets (parquet, arrow, save_to_disk, imagefolder) as training data, written
once into sdtune's cache as an imagefolder, with every problem named by its key."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import DEMO_DATA, ROOT, overrides
from sdtune.cli import main
from sdtune.files import cache_root
from sdtune.hfdata import materialize
from sdtune.resume import fingerprint

datasets = pytest.importorskip("datasets")

RECIPE = str(ROOT / "recipes" / "tiny_cpu.yaml")
CAPTIONS = ["a photo of sks toy", "sks toy on a table", "a close photo of sks toy", "sks toy, side view"]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path_factory, monkeypatch):
    # datasets converts parquet files and imagefolders into arrow files in its own cache: not the user's
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def _encoded(i: int, fmt: str) -> bytes:
    """The demo toy's photo ``i`` encoded as ``fmt`` (its 128 px original, so training crops it down)."""
    out = io.BytesIO()
    with Image.open(DEMO_DATA / f"toy_{i:02d}.png") as im:
        im.convert("RGB").save(out, format=fmt)
    return out.getvalue()


def _images(n: int = 4) -> list[bytes]:
    return [_encoded(i, "JPEG" if i % 2 == 0 else "PNG") for i in range(n)]


def _dataset(images: list[bytes], **columns: list) -> datasets.Dataset:
    """A dataset with an ``image`` column of these encoded images, plus ``columns`` (text unless images)."""
    features = {"image": datasets.Image()}
    data: dict[str, list] = {"image": [{"bytes": b, "path": None} for b in images]}
    for name, values in columns.items():
        is_image = values and isinstance(values[0], bytes)
        features[name] = datasets.Image() if is_image else datasets.Value("string")
        data[name] = [{"bytes": v, "path": None} for v in values] if is_image else values
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def _parquet(tmp_path: Path, name: str = "toy.parquet", **columns: list) -> Path:
    path = tmp_path / name
    _dataset(_images(), **({"text": CAPTIONS} if not columns else columns)).to_parquet(str(path))
    return path


def _dry_run(tiny_model, tmp_path: Path, dataset: Path | str, *extra: str) -> int:
    return main(["train", RECIPE, f"model.pretrained={tiny_model('sd15')}", "data.instance_dir=null",
                 f"data.dataset={dataset}", "prior.enabled=false", f"train.output_dir={tmp_path / 'out'}",
                 *extra, "--dry-run"])


def _entries() -> set[Path]:
    return set((cache_root() / "datasets").glob("*/images"))


# --------------------------------------------------------------------------------------------------------
# Sources


def test_a_parquet_dataset_passes_the_dry_run_as_an_imagefolder_of_its_bytes(tiny_model, tmp_path, capsys):
    source = _parquet(tmp_path)
    before = _entries()
    assert _dry_run(tiny_model, tmp_path, source) == 0
    assert "4 instance images at 64 px" in capsys.readouterr().out
    (folder,) = _entries() - before
    # row-numbered names, the extension of each image's real format, and its bytes as encoded (not re-encoded)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00000.jpg", "00001.png", "00002.jpg", "00003.png", "metadata.jsonl"]
    for i, data in enumerate(_images()):
        assert (folder / names[i]).read_bytes() == data
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"file_name": n, "text": c} for n, c in zip(names[:4], CAPTIONS, strict=True)]
    source_json = json.loads((folder.parent / "source.json").read_text())
    assert source_json["rows"] == 4 and source_json["caption_column"] == "text"
    assert not (tmp_path / "out").exists()


def test_a_second_materialization_is_a_cache_hit_with_the_same_fingerprint(tmp_path, monkeypatch):
    from sdtune import hfdata

    source = str(_parquet(tmp_path))
    problems: list[str] = []
    folder = materialize(source, "train", None, None, None, problems)
    assert problems == [] and folder is not None
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    first = fingerprint([(p, "") for p in sorted(folder.glob("0*"))])

    def no_write(*args, **kwargs):
        raise AssertionError("rewrote a dataset already in the cache")

    with monkeypatch.context() as m:
        m.setattr(hfdata, "_write", no_write)
        assert materialize(source, "train", None, None, None, problems) == folder and problems == []
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stats
    # written again from scratch (cache emptied): the same names and bytes, so a resume's fingerprint matches
    shutil.rmtree(folder.parent)
    assert materialize(source, "train", None, None, None, problems) == folder and problems == []
    assert fingerprint([(p, "") for p in sorted(folder.glob("0*"))]) == first


def test_a_changed_dataset_is_a_new_folder(tmp_path):
    problems: list[str] = []
    source = _parquet(tmp_path)
    first = materialize(str(source), "train", None, None, None, problems)
    # rewritten in place: other rows, a new modification time
    _dataset(_images()[::-1], text=CAPTIONS).to_parquet(str(source))
    second = materialize(str(source), "train", None, None, None, problems)
    assert problems == [] and first != second
    assert (second / "00000.png").read_bytes() == _images()[3]


def test_save_to_disk_split_imagefolder_and_arrow_glob_are_accepted(tiny_model, tmp_path, capsys):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": _dataset(_images()[:1], text=CAPTIONS[:1]),
                          "validation": _dataset(_images(), text=CAPTIONS)}).save_to_disk(str(saved))
    assert _dry_run(tiny_model, tmp_path, saved, "data.dataset_split=validation") == 0
    assert "4 instance images" in capsys.readouterr().out

    imagefolder = tmp_path / "imagefolder"
    imagefolder.mkdir()
    for i in range(3):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", imagefolder / f"toy_{i}.png")
    (imagefolder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"toy_{i}.png", "text": CAPTIONS[i]}) + "\n" for i in range(3)))
    assert _dry_run(tiny_model, tmp_path, imagefolder) == 0
    assert "3 instance images" in capsys.readouterr().out

    shards = tmp_path / "shards"
    for i, half in enumerate((slice(0, 2), slice(2, 4))):
        _dataset(_images()[half], text=CAPTIONS[half]).save_to_disk(str(shards / f"part{i}"))
        shutil.copy(next((shards / f"part{i}").glob("*.arrow")), tmp_path / f"toy-{i}.arrow")
    assert _dry_run(tiny_model, tmp_path, tmp_path / "toy-*.arrow") == 0
    assert "4 instance images" in capsys.readouterr().out


def test_plain_images_take_the_instance_prompt(tiny_model, tmp_path, capsys):
    source = tmp_path / "plain.parquet"
    _dataset(_images()).to_parquet(str(source))  # no caption column
    assert _dry_run(tiny_model, tmp_path, source) == 0  # the recipe's data.instance_prompt captions them
    assert "4 instance images" in capsys.readouterr().out
    (folder,) = [f for f in _entries()
                 if json.loads((f.parent / "source.json").read_text())["dataset"] == str(source)]
    assert not (folder / "metadata.jsonl").exists()
    problems: list[str] = []
    assert materialize(str(source), "train", None, None, None, problems) is None
    assert problems[0].startswith("data.caption_column: ") and "data.instance_prompt" in problems[0]


# --------------------------------------------------------------------------------------------------------
# Problems, each naming its key


def test_unknown_split_missing_and_ambiguous_columns_are_named(tiny_model, tmp_path, capsys):
    source = _parquet(tmp_path)
    assert _dry_run(tiny_model, tmp_path, source, "data.dataset_split=test") == 2
    err = capsys.readouterr().err
    assert f"error: data.dataset_split: {source} has no split 'test' (its splits: train)" in err

    assert _dry_run(tiny_model, tmp_path, source, "data.caption_column=caption",
                    "data.image_column=photo") == 2
    err = capsys.readouterr().err
    assert (f"error: data.caption_column: {source} has no column 'caption' (its columns: image (image), "
            "text (string)); fix: data.caption_column=text") in err
    assert f"error: data.image_column: {source} has no column 'photo'" in err
    assert "; fix: data.image_column=image" in err

    two = _parquet(tmp_path, "two.parquet", mask=_images(), text=CAPTIONS)
    assert _dry_run(tiny_model, tmp_path, two) == 2
    err = capsys.readouterr().err
    assert "error: data.image_column: " in err and "several image columns (image, mask)" in err
    assert _dry_run(tiny_model, tmp_path, two, "data.image_column=mask") == 0  # naming one settles it
    capsys.readouterr()

    assert _dry_run(tiny_model, tmp_path, source, "data.caption_column=image") == 2
    assert "error: data.caption_column: 'image' of " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_one_line_each(tmp_path):
    cases = {
        str(tmp_path / "none-*.parquet"): "data.dataset: no file matches",
        str(tmp_path / "missing"): "data.dataset: ",
        str(Path(__file__)): "is a file but not .parquet or .arrow",
        str(tmp_path): "holds no images and no .parquet or .arrow files",  # a folder with no data files
    }
    for source, expected in cases.items():
        problems: list[str] = []
        assert materialize(source, "train", None, None, None, problems) is None
        assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0], problems


def test_empty_and_null_rows_are_problems(tmp_path):
    empty = tmp_path / "empty.parquet"
    _dataset([], text=[]).to_parquet(str(empty))
    problems: list[str] = []
    assert materialize(str(empty), "train", None, None, None, problems) is None
    # datasets itself refuses a split of no rows (sdtune checks the length too, for loaders that do not)
    assert len(problems) == 1 and problems[0].startswith(f"data.dataset: cannot load {empty} ")
    assert "corresponds to no data" in problems[0]

    nulls = tmp_path / "nulls.parquet"
    _dataset(_images(), text=[CAPTIONS[0], None, CAPTIONS[2], None]).to_parquet(str(nulls))
    problems = []
    assert materialize(str(nulls), "train", None, None, None, problems) is None
    assert problems == ["data.caption_column: 'text' is empty in 2 of 4 rows (row 1, 3); fix: fill them in, "
                        "or choose another data.caption_column"]


def test_rows_without_an_image_are_a_problem_and_nothing_is_kept(tmp_path):
    source = tmp_path / "holes.parquet"
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in _images(2)] + [None], "text": CAPTIONS[:3]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.to_parquet(str(source))
    before = _entries()
    problems: list[str] = []
    assert materialize(str(source), "train", None, None, None, problems) is None
    assert problems == [f"data.image_column: 'image' of {source} has no readable image in 1 row(s) (row 2); "
                        "fix: remove those rows, or choose another data.image_column"]
    assert _entries() == before and not list((cache_root() / "datasets").glob("*/.images.*.tmp"))


def test_a_parquet_of_paths_whose_files_are_gone_says_so(tmp_path):
    """`to_parquet` alone stores each image's path: the source folder moved, the rows name files that are not
    there, and the fix offered was "remove those rows, or choose another column"."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(_images(2)):
        (photos / f"{i}.png").write_bytes(data)
    ds = datasets.Dataset.from_dict({"image": [str(photos / "0.png"), str(photos / "1.png")], "text": CAPTIONS[:2]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    source = tmp_path / "paths.parquet"
    ds.to_parquet(str(source))
    (photos / "1.png").unlink()
    problems: list[str] = []
    assert materialize(str(source), "train", None, None, None, problems) is None
    assert problems == [f"data.image_column: 'image' of {source} has no readable image in 1 row(s) (row 1); its rows "
                        f"name image files that are not there (e.g. {photos / '1.png'}): the dataset stores paths, not "
                        "the images; fix: put the files back, or write it again with the images embedded (README, "
                        "'Train from a Hugging Face dataset')"]


def test_a_hub_id_offline_names_the_offline_switch(tmp_path):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("the Hub is not switched off (HF_HUB_OFFLINE)")
    problems: list[str] = []
    assert materialize("nobody-sdtune/no-such-dataset", "train", None, None, "p", problems) is None
    assert problems[0].startswith("data.dataset: nobody-sdtune/no-such-dataset is not in the datasets cache")
    assert "and HF_HUB_OFFLINE is set" in problems[0]  # the variable the user set (here: conftest)


def test_a_resume_on_changed_dataset_images_names_data_dataset():
    from sdtune.resume import refuse_data_drift

    saved = {"00000.jpg": {"size": 1, "sha256": "a", "caption": "a photo of sks toy"}}
    state = {"config": {"data": {"dataset": "toy.parquet", "instance_dir": None}},
             "data": {"instance": saved}}
    changed = {"00000.jpg": {**saved["00000.jpg"], "sha256": "b"}}
    problem = refuse_data_drift(Path("step-000002"), state, "instance", changed)
    assert problem is not None and "content changed: 00000.jpg" in problem
    assert "restore data.dataset as it was" in problem


def test_eval_finds_the_subject_photos_of_a_dataset_run(tmp_path):
    from sdtune.cli.eval import _dataset_photos

    source = str(_parquet(tmp_path))
    problems: list[str] = []
    folder = materialize(source, "train", None, None, None, problems)
    assert _dataset_photos({"dataset": source, "dataset_split": "train"}) == str(folder)
    assert _dataset_photos({"instance_dir": "x"}) is None


# --------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow  # a short real training run on CPU
def test_training_from_a_parquet_dataset_writes_the_lora(tiny_model, tmp_path):
    from sdtune.config import load_config
    from sdtune.plan import check_run
    from sdtune.train import train

    source = _parquet(tmp_path)
    out = tmp_path / "run"
    args = [o for o in overrides(tiny_model("sd15"), out, "train.max_steps=2")
            if not o.startswith("data.instance_dir=")]
    cfg = load_config(None, [*args, f"data.dataset={source}"])
    plan = check_run(cfg)
    assert plan.instance_dir.parent.parent == cache_root() / "datasets"
    assert [(e.path.name, e.caption) for e in plan.examples] == list(zip(
        ["00000.jpg", "00001.png", "00002.jpg", "00003.png"], CAPTIONS, strict=True))
    train(cfg, plan)
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert f"dataset: {source}" in (out / "config.yaml").read_text()


def test_a_dataset_override_replaces_the_recipes_instance_dir():
    """The recipes set data.instance_dir; data.dataset=... on the command line means "these photos instead"."""
    from sdtune.config import ConfigError, load_config

    cfg = load_config(ROOT / "recipes" / "micro_dreambooth.yaml", ["data.dataset=toy.parquet"])
    assert (cfg.data.instance_dir, cfg.data.dataset) == (None, "toy.parquet")
    cfg = load_config(ROOT / "recipes" / "micro_dreambooth.yaml", ["data.instance_dir=photos"])
    assert (cfg.data.instance_dir, cfg.data.dataset) == ("photos", None)
    with pytest.raises(ConfigError, match="give one of data.instance_dir .* not both"):
        load_config(ROOT / "recipes" / "micro_dreambooth.yaml", ["data.dataset=toy.parquet", "data.instance_dir=photos"])
