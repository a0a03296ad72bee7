"""Issue 19, the rerun's start-up: over 100,000 unchanged photos a rerun looks each photo up (one lstat and a
manifest lookup per check) instead of decoding, hashing or encoding it again; these tests hold that a photo
changed among unchanged ones is still noticed and read again, and that the faster paths give what the plain
ones gave."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import data, files
from sdtune.cache import cache_latents
from sdtune.data import DreamBoothDataset, Example, scan_instance_dir

CAPTION = "a photo of sks toy"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own: its manifests are the only ones there."""
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))


def _photos(folder: Path, n: int, metadata: bool = True) -> list[Path]:
    """``n`` distinct 40 x 40 BMPs (a BMP's size does not depend on its pixels: an edit can keep the size),
    captioned in metadata.jsonl as `sdtune prep` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.bmp"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": p.name, "text": CAPTION}) + "\n"
                                                       for p in paths))
    return paths


def _edit(path: Path, seed: int) -> None:
    """New pixels, the same size in bytes; a modification time a second later (a rewrite within the same clock
    tick would keep it: a real edit comes later than the run that saw the photo)."""
    before = path.stat()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def _new_process(monkeypatch) -> None:
    """What a new process starts with: the manifests on disk, nothing in memory."""
    files.flush_manifests()
    monkeypatch.setattr(files, "_MANIFESTS", {})
    monkeypatch.setattr(files, "_BY_FOLDER", {})


def _counting(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_rescan_looks_each_photo_up_once_and_rereads_the_edited_one(tmp_path, monkeypatch):
    """A rescan of unchanged photos decodes and reads no header (one lstat each: the link check and both
    lookups share it); one photo edited among them (same size in bytes) is decoded and hashed again, alone."""
    paths = _photos(tmp_path / "photos", 12)
    first = scan_instance_dir(tmp_path / "photos", "sks", None, resolution=64)
    assert not first.problems and [e.path for e in first.examples] == paths
    digests = [files.content_hash(p) for p in paths]
    _new_process(monkeypatch)

    with monkeypatch.context() as m:
        decoded = _counting(m, data, "read_image")
        headers = _counting(m, data, "_upright_size")
        lstats = _counting(m, os, "lstat")
        stats = _counting(m, os, "stat")
        again = scan_instance_dir(tmp_path / "photos", "sks", None, resolution=64)
    assert [e.path for e in again.examples] == paths and [e.caption for e in again.examples] == [CAPTION] * 12
    assert decoded == [] and headers == []
    assert len(lstats) == 12 and len(stats) <= 3  # the folder, metadata.jsonl: no stat per photo

    _edit(paths[5], seed=99)
    _new_process(monkeypatch)
    decoded = _counting(monkeypatch, data, "read_image")
    headers = _counting(monkeypatch, data, "_upright_size")
    edited = scan_instance_dir(tmp_path / "photos", "sks", None, resolution=64)
    assert not edited.problems and len(decoded) == 1 and headers == [paths[5]]
    hashed = _counting(monkeypatch, files, "sha256_file")
    assert files.content_hashes(paths) == digests[:5] + [files.content_hash(paths[5])] + digests[6:]
    assert digests[5] != files.content_hash(paths[5]) and hashed == [str(paths[5])]

    # an edit that breaks the photo is seen too (the decode that passed before is not trusted)
    paths[7].write_bytes(paths[7].read_bytes()[:100])
    assert any("007.bmp" in p for p in scan_instance_dir(tmp_path / "photos", "sks", None, resolution=64).problems)


def test_the_latent_cache_encodes_again_only_the_edited_photo(tiny_model, tmp_path, monkeypatch):
    """A rerun's latent cache encodes nothing; with one photo edited among the others it encodes that one (its
    content hash names a new entry) and reads the rest, bitwise as before."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model("sd15") / "vae")
    paths = _photos(tmp_path / "photos", 6, metadata=False)
    items = [(p, flip, (32, 32)) for p in paths for flip in (False, True)]
    encoded: list[int] = []
    original = vae.encode

    def counting_encode(pixels):
        encoded.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(vae, "encode", counting_encode)
    first = cache_latents(vae, items, "vae", tmp_path / "latents", progress=False)
    assert sum(encoded) == 12
    before = {k: first[k].clone() for k in first}
    encoded.clear()
    files.flush_manifests()
    monkeypatch.setattr(files, "_MANIFESTS", {})
    monkeypatch.setattr(files, "_BY_FOLDER", {})
    again = cache_latents(vae, items, "vae", tmp_path / "latents", progress=False)
    assert encoded == [] and again.files == first.files

    _edit(paths[2], seed=7)
    edited = cache_latents(vae, items, "vae", tmp_path / "latents", progress=False)
    assert sum(encoded) == 2  # the edited photo and its mirror image
    changed = {k for k in first.files if edited.files[k] != first.files[k]}
    assert changed == {(str(paths[2]), False, (32, 32)), (str(paths[2]), True, (32, 32))}
    assert all(torch.equal(edited[k], before[k]) for k in before if k not in changed)
    assert not torch.equal(edited[(str(paths[2]), False, (32, 32))], before[(str(paths[2]), False, (32, 32))])


def test_processes_encode_disjoint_shares_then_find_every_latent(tiny_model, tmp_path, monkeypatch):
    """Several processes of one run: each encodes the photos of its share (all their flips), without waiting for
    the folder's lock (which another process of the run holds), and the lookup over every item afterwards encodes
    nothing."""
    from diffusers import AutoencoderKL

    from sdtune import locks
    from sdtune.cache import shard

    paths = _photos(tmp_path / "photos", 5, metadata=False)
    items = [(p, flip, (32, 32)) for p in paths for flip in (False, True)]
    shares = [shard(items, i, 3) for i in range(3)]
    assert sorted(it for s in shares for it in s) == sorted(items)  # disjoint and complete
    assert [len({p for p, _, _ in s}) for s in shares] == [2, 2, 1]  # by photo: a photo's flips stay together
    assert shard(items, 0, 1) == items

    vae = AutoencoderKL.from_pretrained(tiny_model("sd15") / "vae")
    encoded: list[int] = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: (encoded.append(len(pixels)), original(pixels))[1])
    with locks.cache_lock(tmp_path / "latents", "latents"):  # held as by another process of the run
        for s in shares:
            cache_latents(vae, s, "vae", tmp_path / "latents", progress=False, lock=False)
    assert sum(encoded) == 10
    encoded.clear()
    every = cache_latents(vae, items, "vae", tmp_path / "latents", progress=False)
    assert encoded == [] and set(every.files) == {(str(p), f, s) for p, f, s in items}


def test_manifests_are_one_string_per_file_and_older_ones_are_read(tmp_path, monkeypatch):
    """A manifest maps each name to one string (version, then kind and value pairs); one written in the older
    form ({"v": version, kind: value}) is read, its entries found, and written back in the new form."""
    photo = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(photo)
    found = files.locate(photo)
    digest = files.content_hash(photo)
    files.flush_manifests()
    (file,) = [f for f in (files.cache_root() / "manifests").glob("*.json") if "a.png" in f.read_text()]
    assert json.loads(file.read_text()) == {"a.png": f"{found.version}\tsha256\t{digest}"}

    file.write_text(json.dumps({"a.png": {"v": found.version, "sha256": "0" * 64, "upright": "8,8"},
                                "gone.png": {"v": "1|2|3", "sha256": "1" * 64}, "odd.png": [1, 2]}))
    monkeypatch.setattr(files, "_MANIFESTS", {})
    monkeypatch.setattr(files, "_BY_FOLDER", {})
    assert files.content_hash(photo) == "0" * 64  # what the older manifest says of this version
    assert files.remembered(photo, "upright", lambda: "9,9") == "8,8"
    files.flush_manifests()
    assert json.loads(file.read_text()) == {"a.png": f"{found.version}\tsha256\t{'0' * 64}\tupright\t8,8",
                                            "gone.png": f"1|2|3\tsha256\t{'1' * 64}"}

    # a new version of the file replaces its entry (every kind of the old one goes); a value that cannot be
    # kept in one string is computed every time, not stored
    os.utime(photo, ns=(0, 10**9))
    assert files.content_hash(photo) == digest
    assert files.remembered(photo, "odd", lambda: "a\tb") == "a\tb"
    assert files.remembered(photo, "odd", lambda: "again") == "again"
    files.flush_manifests()
    entry = json.loads(file.read_text())["a.png"].split("\t")
    assert entry == [files.locate(photo).version, "sha256", digest, "odd", "again"]


def test_located_paths_resolve_as_the_kernel_does(tmp_path, monkeypatch):
    """locate's real folder: links resolved, '..' after a linked folder taken from the link's target (as the
    kernel and Path.resolve do), relative paths from the current folder."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"x")
    (tmp_path / "c" / "x.png").write_bytes(b"y")
    (tmp_path / "c" / "linkb").symlink_to(tmp_path / "a" / "b")
    (tmp_path / "a" / "y.png").symlink_to(tmp_path / "a" / "b" / "x.png")
    monkeypatch.chdir(tmp_path)
    for p in (f"{tmp_path}/c/linkb/x.png", f"{tmp_path}/c/linkb/../b/x.png", f"{tmp_path}/a/./b//x.png",
              "c/linkb/x.png", "a/y.png", f"{tmp_path}/c/x.png"):
        found = files.locate(p)
        assert Path(found.folder, found.name) == Path(p).resolve(), p
        assert found.link == Path(p).is_symlink() and found.regular
    assert files.locate("a/y.png").version == files.locate("a/b/x.png").version  # a link's version: its target's
    with pytest.raises(FileNotFoundError):
        files.locate(tmp_path / "missing.png")


@pytest.mark.parametrize("name,expected", [
    ("001.png", ("001.png", None)), (" spaced name .png", (" spaced name .png", None)),
    ("a..png", ("a..png", None)), ("", (None, "has an empty file_name")), (".", (None, "has an empty file_name")),
    ("..", (None, "outside")), ("../a.png", (None, "outside")), ("/etc/a.png", (None, "outside")),
    ("C:a.png", (None, "outside")), ("sub/a.png", (None, "subfolder")), ("sub\\a.png", (None, "subfolder")),
])
def test_metadata_file_names(name, expected):
    """metadata.jsonl's bare names pass without path parsing; anything else is judged as before."""
    got = data._file_name(name)
    assert got[0] == expected[0] and (got[1] is None if expected[1] is None else expected[1] in got[1])


def test_listing_sorts_and_classifies_as_paths_do(tmp_path):
    """The scan's one directory listing: the same images, in the same order, as Path.iterdir sorted; links to
    files are images, broken links and loops are problems, folders and other files are warnings."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "B.png", "a.JPG", "c.bmp", "..png", "z.txt", "y.doc"):
        Image.new("RGB", (70, 70)).save(folder / name, format="PNG") if name != "z.txt" else (folder / name).write_text("x")
    (folder / "sub.png").mkdir()
    (folder / "ok.png").symlink_to(folder / "b.png")
    (folder / "broken.png").symlink_to(folder / "nothing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    scan = data.Scan()
    images = data._survey(folder, "k", scan)
    expected = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp") and p.is_file()
                      and not p.name.startswith("."))
    assert images == expected and [p.name for p in images] == ["B.png", "a.JPG", "b.png", "c.bmp", "ok.png"]
    assert len(scan.problems) == 3 and any("y.doc" in w for w in scan.warnings)
    assert any("broken.png is a broken link" in p for p in scan.problems)
    assert any("sub.png is a folder" in p for p in scan.problems)
    assert data._entries(folder) == sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("repeats,buckets,classes", [
    (3, False, 0), ([1, 3, 2, 1, 2], True, 0), (2, False, 1), ([2, 1, 1, 3, 1], True, 2)])
def test_targets_are_the_item_by_item_list(tmp_path, repeats, buckets, classes):
    """DreamBoothDataset.targets walks each instance example once: the same list, in the same order, as
    walking every item of an epoch (the latent cache encodes in this order)."""
    from sdtune.data import ClassImages

    instance = [Example(tmp_path / f"{i}.png", CAPTION, concept=i % max(classes, 1)) for i in range(5)]
    instance.append(instance[1])  # the same photo twice (two concepts may share a folder)
    if not isinstance(repeats, int):
        repeats = repeats + [1]
    sizes = [(48, 80), (64, 64), (80, 48)]
    groups = [ClassImages([tmp_path / f"class{k}-{j}.png" for j in range(7)], f"a toy {k}") for k in range(classes)]
    ds = DreamBoothDataset(instance, 64, repeats=repeats, seed=3,
                           buckets=[random.Random(i).choice(sizes) for i in range(6)] if buckets else None,
                           classes=groups or None)
    pairs = [(ds.instance[ds._instance_index(i)].path, ds.size(i)) for i in range(ds.length)]
    if ds.classes:
        pairs += [(ds._class_image(i)[0], ds.size(i)) for i in range(ds.length)]
    assert ds.targets() == list(dict.fromkeys(pairs))


def test_the_command_line_raises_the_collectors_first_threshold():
    """Start-up is mostly imports; the collector at CPython's 700 cost a rerun 1.3 s of 6.5 (bench/SCALE.md)."""
    import gc

    from sdtune.cli import GC_THRESHOLD, main

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        assert main(["--version"]) == 0
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
