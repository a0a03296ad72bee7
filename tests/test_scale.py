"""Issue 19: what a run keeps in memory does not grow with the data. The text cache lives in files (one per
caption, under the encoders' identity) with a bounded set of recent entries on the device, and a rerun encodes
nothing; the latent cache is tested beside the training tests (test_train.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sdtune.cache import TextCache
from sdtune.errors import SdtuneError


def _encoder(calls: list[str]):
    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        calls.extend(chunk)
        # (B, 4, 3) hidden states and (B, 3) pooled, distinct per caption and in fp16 like a mixed-precision run
        codes = torch.tensor([[float(sum(map(ord, c)) % 97)] for c in chunk])
        return {"prompt_embeds": (codes[:, :, None] * torch.arange(12.0).view(1, 4, 3) / 7).half(),
                "pooled": (codes * torch.ones(1, 3) / 3).half()}
    return encode


def test_text_cache_writes_files_keeps_a_few_and_a_rerun_encodes_nothing(tmp_path):
    captions = [f"a photo of sks toy {i}" for i in range(10)] + [""]
    calls: list[str] = []
    cache = TextCache(captions, _encoder(calls), tmp_path, "enc-a", keep=3)
    assert sorted(calls) == sorted(captions) and len(list((tmp_path / "enc-a").glob("*.safetensors"))) == 11
    expected = _encoder([])(captions)
    for start in range(0, 11, 2):
        batch = captions[start:start + 2]
        got = cache[batch]
        for name, value in got.items():  # bitwise what the encoder gave, dtype kept
            assert value.dtype == torch.float16 and torch.equal(value, expected[name][start:start + 2])
        assert len(cache._recent) <= 3  # the memory held is bounded, whatever the number of captions
    calls.clear()
    again = TextCache(captions, _encoder(calls), tmp_path, "enc-a", keep=3)
    assert calls == [] and torch.equal(again[["", captions[4]]]["pooled"], cache[["", captions[4]]]["pooled"])
    # another encoder identity is another cache; a damaged file is encoded again
    TextCache(captions[:2], _encoder(calls), tmp_path, "enc-b")
    assert calls == captions[:2]
    victim = again.files[captions[0]]
    victim.write_bytes(victim.read_bytes()[:-8])
    calls.clear()
    TextCache(captions, _encoder(calls), tmp_path, "enc-a")
    assert calls == [captions[0]]


def test_runs_share_the_text_cache(tiny_model, tmp_path, monkeypatch):
    """A second run of the same model and captions reads the first one's text embeddings from the cache (its
    encode never runs) and trains bitwise the same LoRA."""
    from safetensors.torch import load_file

    from conftest import overrides
    from sdtune import cache as cache_module
    from sdtune.config import load_config
    from sdtune.lora import WEIGHT_NAME
    from sdtune.train import train

    common = ("data.instance_prompt=a photo of sks toy", "train.max_steps=2")
    first = train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "a", *common)))
    original = cache_module.TextCache._encode

    def refuse(self, todo, *args, **kwargs):
        if todo:
            raise AssertionError(f"encoded again: {todo}")
        return original(self, todo, *args, **kwargs)

    monkeypatch.setattr(cache_module.TextCache, "_encode", refuse)
    second = train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "b", *common)))
    a, b = load_file(first / WEIGHT_NAME), load_file(second / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep", [1, 2])
def test_recent_entries_are_the_last_used(tmp_path, keep):
    captions = ["x", "y", "z"]
    cache = TextCache(captions, _encoder([]), tmp_path, "enc", keep=keep)
    cache[["x"]]
    cache[["z"]]
    assert list(cache._recent)[-1] == "z" and len(cache._recent) == keep


def test_prep_of_many_images_writes_a_bounded_contact_sheet(tmp_path):
    """A 10,000-image contact sheet passed JPEG's 65,500-pixel limit and prep failed (found by
    bench/scale_bench.py); past SHEET_MAX cells it shows every flagged or dropped photo and an even sample."""
    from PIL import Image

    from sdtune.prep import SHEET, SHEET_MAX, Result, prep, sheet_sample

    results = [Result(source=f"{i:05d}.jpg", status="kept") for i in range(1000)]
    for i in (5, 500, 999):
        results[i].flags.append("BLUR")
    shown = sheet_sample(results, limit=10)
    assert len(shown) == 10 and {r.source for r in shown} >= {"00005.jpg", "00500.jpg", "00999.jpg"}
    assert shown == sorted(shown, key=lambda r: r.source)  # in the sheet's order
    assert sheet_sample(results[:7], limit=10) == results[:7]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(SHEET_MAX + 30):
        Image.new("RGB", (72, 72), ((i * 37) % 256, (i * 91) % 256, (i * 11) % 256)).save(src / f"{i:04d}.png")
    report = prep(src, tmp_path / "out", resolution=64, crop="center", caption="a photo of sks toy", workers=1,
                  progress=False)
    assert report["summary"]["images"] == SHEET_MAX + 30 and report["summary"]["contact_sheet"] == SHEET_MAX
    with Image.open(tmp_path / "out" / SHEET) as sheet:
        assert sheet.height < 65500


def test_a_rescan_of_unchanged_images_decodes_none(tmp_path, monkeypatch):
    """Found by bench/scale_bench.py: every start decoded every image to check it (most of a 10,000-image
    rerun's start-up). Now a decode that passed is remembered per file version; a file changed since is
    decoded (and refused) again."""
    import shutil

    from conftest import DEMO_DATA
    from sdtune import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", folder / f"{i}.png")
    first = data.scan_instance_dir(folder, "sks", "a photo of sks toy")
    assert not first.problems and len(first.examples) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "read_image", no_decoding)
    again = data.scan_instance_dir(folder, "sks", "a photo of sks toy")
    assert not again.problems and [e.path for e in again.examples] == [e.path for e in first.examples]
    monkeypatch.undo()
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:200])  # a photo broken since
    broken = data.scan_instance_dir(folder, "sks", "a photo of sks toy")
    assert any("1.png" in p for p in broken.problems)


def test_duplicate_checks_stay_near_linear_and_agree(tmp_path):
    """check_set over many photos: exact duplicates by a dict (not a scan of every earlier photo), near
    duplicates by popcount of 64-bit XORs; the popcount agrees with counting unpacked bits."""
    import numpy as np

    from sdtune.prep import _popcount

    x = np.random.default_rng(0).integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    assert np.array_equal(_popcount(x), np.unpackbits(x.view(np.uint8)).reshape(1000, 64).sum(axis=1))


def test_prep_keeps_each_photos_bytes_on_disk_not_in_memory(tmp_path, monkeypatch):
    """Every processed photo's bytes, mask and thumbnail wait in OUT/.sdtune-prep-stage (not in memory) until
    the names are known; OUT ends with the same files as before and no stage folder."""
    import shutil
    from pathlib import Path

    from conftest import DEMO_DATA
    from sdtune import prep as prep_module

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", src / f"{i}.png")
    seen = {}
    original = prep_module._finish

    def inspect(src_dir, out_dir, previous, ledger, *args):
        kept = [ledger.read(i) for i in range(len(ledger)) if ledger.status[i] < 2]  # kept, fixed
        seen["in_memory"] = sum(len(r.encoded) + len(r.mask_encoded) for r in kept) + sum(r.thumb is not None
                                                                                           for r in kept)
        seen["staged"] = all(Path(r.staged).is_file() and Path(f"{r.staged}.thumb.png").is_file() for r in kept)
        return original(src_dir, out_dir, previous, ledger, *args)

    monkeypatch.setattr(prep_module, "_finish", inspect)
    prep_module.prep(src, tmp_path / "out", resolution=64, crop="center", caption="a photo of sks toy", workers=1,
                     progress=False)
    assert seen == {"in_memory": 0, "staged": True}
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["001.png", "002.png", "003.png", "004.png", "contact_sheet.jpg", "metadata.jsonl",
                   "prep_report.json"]
    # a prep that fails leaves no OUT behind
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdtuneError):
        prep_module.prep(tmp_path / "empty", tmp_path / "out2", resolution=64, caption="x", progress=False)
    assert not (tmp_path / "out2").exists()


def test_one_manifest_per_folder_survives_the_process_and_sees_edits(tmp_path, monkeypatch):
    """What is remembered of a folder's files (hashes, decodes, sizes) lives in one manifest file per folder,
    read back by the next process (no file is hashed again), and an edited file is hashed again."""
    from sdtune import files

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.bin").write_bytes(bytes([i]) * 1000)
    digests = [files.content_hash(folder / f"{i}.bin") for i in range(5)]
    files.flush_manifests()
    manifests = list((files.cache_root() / "manifests").glob("*.json"))
    assert any(f"{i}.bin" in m.read_text() for m in manifests for i in range(5))
    monkeypatch.setattr(files, "_MANIFESTS", {})  # a new process: only the file on disk
    monkeypatch.setattr(files, "sha256_file", lambda p: (_ for _ in ()).throw(AssertionError(f"hashed {p}")))
    assert [files.content_hash(folder / f"{i}.bin") for i in range(5)] == digests
    (folder / "3.bin").write_bytes(b"edited")
    monkeypatch.undo()
    assert files.content_hash(folder / "3.bin") != digests[3]


def test_real_path_is_resolve(tmp_path, monkeypatch):
    """files.real_path (its folder resolved once) names what Path.resolve names: through a linked folder, a
    linked file, and a relative path."""
    from sdtune.files import real_path

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "y.png").symlink_to(tmp_path / "a" / "x.png")
    for p in (tmp_path / "link" / "x.png", tmp_path / "a" / "y.png", tmp_path / "a" / "x.png"):
        assert real_path(p) == p.resolve()
    monkeypatch.chdir(tmp_path)
    assert real_path("link/x.png") == (tmp_path / "a" / "x.png").resolve()


def test_entries_this_run_wrote_are_not_read_back_by_the_next(tmp_path, monkeypatch):
    """A cache entry is known whole once written (its header is not read again by the next process), and the
    manifests are written whole less and less often as they grow (a fixed interval made a 100,000-photo first
    run write 20 whole manifests)."""
    from sdtune import cache as cache_module
    from sdtune import files

    captions = [f"a photo of sks toy {i}" for i in range(6)]
    TextCache(captions, _encoder([]), tmp_path, "enc-a")
    files.flush_manifests()
    monkeypatch.setattr(files, "_MANIFESTS", {})  # a new process: only the manifest files on disk
    monkeypatch.setattr(files, "_BY_FOLDER", {})
    monkeypatch.setattr(cache_module, "safetensors_header",
                        lambda f: (_ for _ in ()).throw(AssertionError(f"header read: {f}")))
    calls: list[str] = []
    TextCache(captions, _encoder(calls), tmp_path, "enc-a")
    assert calls == []
    monkeypatch.undo()

    writes: list[int] = []
    manifest = files._Manifest(tmp_path / "m.json")
    monkeypatch.setattr(manifest, "FLUSH_EVERY", 2)
    monkeypatch.setattr(files, "write_text", lambda path, text: writes.append(len(json.loads(text))))
    for i in range(64):
        manifest.put(f"{i}.png", "1|2|3", "sha256", "x")
    assert writes == [2, 4, 8, 16, 32, 64]  # each write once the new entries are half of all: O(n) in all


def test_the_report_is_written_row_by_row_as_json_would_write_it_whole(tmp_path):
    """prep streams prep_report.json one row at a time: the same text as json.dumps of the whole report
    (indent 1, UTF-8 as is, a final newline), rows with nested lists, non-ASCII text and escapes included."""
    import io

    from sdtune.prep import _report_writer

    head = {"sdtune_prep": 1, "source": "/photos/é", "settings": {"drop": [], "caption": "a \"quoted\"\nline"},
            "summary": {"files": 2}, "set_warnings": ["every image is grayscale"]}
    rows = [{"source": "ünï/cödé.jpg", "status": "kept", "size": [96, 96], "warnings": ["a", "b\tc"],
             "crop_box": [0, 0, 96, 96], "sharpness": 12.5, "grayscale": False},
            {"source": "x.txt", "status": "ignored", "reason": "text file, not an image"}]
    for some in (rows, rows[:1], []):
        out = io.StringIO()
        with _report_writer(out, head) as write_row:
            for row in some:
                write_row(row)
        assert out.getvalue() == json.dumps({**head, "files": some}, indent=1, ensure_ascii=False) + "\n"


def test_prep_memory_grows_by_little_more_than_the_rows_it_returns(tmp_path):
    """Issue 19: prep keeps each photo's result in a file beside its staged bytes, and in memory only the
    columns the set checks use (sorting, names, duplicates, blur): its Python allocations grow by about 1.5 KB
    a photo, most of it the report rows it returns (they were 5.2 KB: a Result per photo kept to the end, the
    report built whole, then its text)."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from sdtune.prep import prep

    peaks = {}
    for n in (10, 200, 800):  # 10 first: what the first prep imports is not counted
        src = tmp_path / f"src{n}"
        src.mkdir()
        rng = np.random.default_rng(n)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(src / f"{i:04d}.png",
                                                                                   compress_level=0)
        tracemalloc.start()
        report = prep(src, tmp_path / f"out{n}", resolution=64, crop="center", caption="a photo of sks toy",
                      workers=1, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report["summary"]["images"] == n and len(report["files"]) == n
        assert report["files"] == json.loads((tmp_path / f"out{n}" / "prep_report.json").read_text())["files"]
    assert (peaks[800] - peaks[200]) / 600 < 2500
