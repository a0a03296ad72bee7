"""Hostile arguments and hostile files: every command answers with one ``error:`` line (never a traceback),
refuses before anything loads, and never replaces a file that sdtune did not write unless told --overwrite.

One test per class of failure: unexpected exceptions, a user's OSErrors, export / sample / eval targets,
LoRA files that are not LoRA files, push verification, and argument values (negative, nan, not UTF-8...).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from conftest import DEMO_DATA, overrides
from sdtune import __version__
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.runs import KOHYA_SUFFIX, MARK_KEY, SOFTWARE, WEIGHT_NAME
from sdtune.train import train


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """A tiny sd15 run, trained once for this module: 2 steps, a checkpoint at each."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2", "train.checkpoint_every=1",
                                      "data.instance_prompt=a photo of sks toy")))
    return out


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a model or rendering."""
    import sdtune.cli.sample
    import sdtune.eval.run
    import sdtune.sample

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(sdtune.sample, "run_sample", loaded)
    monkeypatch.setattr(sdtune.cli.sample, "with_size", loaded)
    monkeypatch.setattr(sdtune.eval.run, "run_eval", loaded)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(capsys, code: int, expected_code: int = 2) -> str:
    """The single ``error:`` line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def write_foreign(path: Path, data: bytes = b"my own notes, not sdtune's\n") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha(path)


# --------------------------------------------------------------------------------------------------------
# 1. Unexpected exceptions: one line that says "bug"; --debug / SDTUNE_DEBUG=1 show the traceback


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    import sdtune.cli.share

    def boom(args):
        raise RuntimeError("kaboom\nsecond line of detail")

    monkeypatch.setattr(sdtune.cli.share, "cmd_export", boom)
    argv = ["export", str(tmp_path), "-o", str(tmp_path / "x.safetensors")]
    line = one_error(capsys, main(argv), 1)
    assert line == ("error: unexpected RuntimeError: kaboom; this is a bug in sdtune: please report it with the "
                    "output of `sdtune doctor` (run again with --debug for the traceback)")

    assert main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "second line of detail" in err
    monkeypatch.setenv("SDTUNE_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.delenv("SDTUNE_DEBUG")

    def no_memory(args):
        raise MemoryError()

    monkeypatch.setattr(sdtune.cli.share, "cmd_export", no_memory)
    assert "out of memory (MemoryError)" in one_error(capsys, main(argv), 1)

    def reader_gone(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # `sdtune suggest-tokens | head -1`

    monkeypatch.setattr(sdtune.cli.share, "cmd_export", reader_gone)
    assert main(argv) == 1 and capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------------------
# 2. OSErrors about the user's paths: a user error naming the path (exit 2), not "a bug"


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out/.grid.png.123.tmp"),
     "error: permission denied: /data/out/grid.png (check its permissions, or choose another path)"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/.w.9.tmp", "/data/w"),
     "error: /data/w is a folder, not a file (give a file name)"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file.txt/grid.png"),
     "error: /data/file.txt/grid.png: a part of this path is a file, not a folder (check the path)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/gone.png"),
     "error: no such file or folder: /data/gone.png (check the path)"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/big.safetensors"),
     "error: disk full writing /data/big.safetensors (free some space, or write somewhere else)"),
    (RuntimeError("safetensors: No space left on device (os error 28)"),
     "error: disk full (free some space, or write somewhere else)"),
])
def test_os_errors_of_user_paths_name_the_path(error, expected, monkeypatch, tmp_path, capsys):
    import sdtune.cli.share

    def fail(args):
        raise error

    monkeypatch.setattr(sdtune.cli.share, "cmd_export", fail)
    assert one_error(capsys, main(["export", str(tmp_path), "-o", str(tmp_path / "x.safetensors")])) == expected


def test_os_error_without_a_user_path_is_a_bug(monkeypatch, tmp_path, capsys):
    import sdtune.cli.share

    def fail(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(sdtune.cli.share, "cmd_export", fail)
    line = one_error(capsys, main(["export", str(tmp_path), "-o", str(tmp_path / "x.safetensors")]), 1)
    assert line.startswith("error: unexpected OSError: [Errno 9] Bad file descriptor; this is a bug in sdtune")


# --------------------------------------------------------------------------------------------------------
# 3. export: never a foreign file without --overwrite, never a run's own LoRA file


def _marked(path: Path) -> bool:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(MARK_KEY) == __version__


def test_export_replaces_only_what_sdtune_wrote(run, tmp_path, capsys):
    assert _marked(run / WEIGHT_NAME) and _marked(run / f"run{KOHYA_SUFFIX}")  # training marks its files
    target = tmp_path / "mine.safetensors"
    before = write_foreign(target)
    line = one_error(capsys, main(["export", str(run), "-o", str(target)]))
    assert "mine.safetensors exists and sdtune did not write it" in line and "--overwrite" in line
    assert sha(target) == before

    assert main(["export", str(run), "-o", str(target), "--overwrite"]) == 0
    assert _marked(target)
    assert main(["export", str(run), "--format", "diffusers", "-o", str(target)]) == 0  # sdtune's: replaced
    assert _marked(target)
    capsys.readouterr()

    # peft: a folder of someone else's things is refused; an earlier peft export is replaced
    folder = tmp_path / "photos"
    photo = folder / "me.jpg"
    before = write_foreign(photo)
    line = one_error(capsys, main(["export", str(run), "--format", "peft", "-o", str(folder)]))
    assert "is a folder that sdtune did not export to" in line
    assert sha(photo) == before and sorted(folder.iterdir()) == [photo]
    peft = tmp_path / "peft"
    assert main(["export", str(run), "--format", "peft", "-o", str(peft)]) == 0
    assert _marked(peft / "unet" / "adapter_model.safetensors")
    assert main(["export", str(run), "--format", "peft", "-o", str(peft)]) == 0


def test_export_never_writes_a_runs_own_files(run, tmp_path, capsys):
    final, checkpoint = run / WEIGHT_NAME, run / "checkpoints" / "step-000001"
    before = {p: sha(p) for p in (final, checkpoint / WEIGHT_NAME, checkpoint / "adapter-unet.safetensors")}
    cases = [
        # another checkpoint's LoRA onto the run's final one, even with --overwrite
        ([str(run / "checkpoints" / "step-000002"), "--format", "diffusers", "-o", str(final)], "run or checkpoint"),
        ([str(run / "checkpoints" / "step-000002"), "--format", "diffusers", "-o", str(final), "--overwrite"],
         "run or checkpoint"),
        ([str(run), "--format", "diffusers", "-o", str(checkpoint / "adapter-unet.safetensors"), "--overwrite"],
         "run or checkpoint"),
        ([str(run), "--format", "diffusers", "-o", str(checkpoint / WEIGHT_NAME), "--overwrite"], "run or checkpoint"),
        ([str(run), "--format", "peft", "-o", str(checkpoint), "--overwrite"], "is a run or checkpoint folder"),
        ([str(run), "--format", "diffusers", "-o", str(final)], "the run's own LoRA file"),
        ([str(run), "-o", str(tmp_path / "notes.txt" / "x.safetensors")], "is a file, so"),
    ]
    (tmp_path / "notes.txt").write_text("notes\n")
    for argv, message in cases:
        assert message in one_error(capsys, main(["export", *argv])), argv
    assert {p: sha(p) for p in before} == before


# --------------------------------------------------------------------------------------------------------
# 4. sample --out: refused before anything loads; sdtune's own grids are replaced


def test_sample_out_is_checked_before_anything_loads(run, tmp_path, capsys, nothing_loads):
    base = ["sample", str(run), "--steps", "1", "--seeds", "0", "--lora-scale", "1"]
    folder = tmp_path / "folder"
    folder.mkdir()
    foreign = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(foreign)
    cells_clash = tmp_path / "g2_cells" / "cell-0000.png"
    cells_clash.parent.mkdir()
    Image.new("RGB", (8, 8), "blue").save(cells_clash)  # a picture, but not one sdtune wrote
    write_foreign(tmp_path / "g3_cells")  # a file where the cells folder goes
    write_foreign(tmp_path / "notes.txt")
    watched = [foreign, cells_clash, tmp_path / "g3_cells", tmp_path / "notes.txt"]
    before = {p: sha(p) for p in watched}
    cases = [
        (folder, "is a folder; give a file name inside it"),
        (foreign, "photo.png exists and sdtune did not write it"),
        (tmp_path / "g2.png", "g2_cells/cell-0000.png exists and sdtune did not write it"),
        (tmp_path / "g3.png", "g3_cells (where the cells go) is a file"),
        (tmp_path / "g.jpg", "give a name ending in .png"),
        (tmp_path / "notes.txt" / "g.png", "is a file, so"),
    ]
    for out, message in cases:
        assert message in one_error(capsys, main([*base, "--out", str(out)])), out
    assert {p: sha(p) for p in watched} == before and list(folder.iterdir()) == []
    replay = tmp_path / "cell.json"
    replay.write_text(json.dumps({"cell": {}}))
    line = one_error(capsys, main(["sample", "--replay", str(replay)]))
    assert line.startswith("error: --replay: ") and "is not an sdtune cell sidecar" in line


def test_sample_replaces_its_own_grid_and_overwrites_only_when_told(run, tmp_path, capsys):
    base = ["sample", str(run), "--steps", "1", "--seeds", "0", "--lora-scale", "1"]
    grid = tmp_path / "g.png"
    assert main([*base, "--out", str(grid)]) == 0
    with Image.open(grid) as im:
        assert im.info["Software"] == SOFTWARE  # marked as sdtune's
    with Image.open(tmp_path / "g_cells" / "cell-0000.png") as im:
        assert im.info["Software"] == SOFTWARE
    assert main([*base, "--out", str(grid)]) == 0  # sdtune's own grid and cells: replaced without asking
    foreign = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(foreign)
    capsys.readouterr()
    assert main([*base, "--out", str(foreign), "--overwrite"]) == 0
    with Image.open(foreign) as im:
        assert im.info["Software"] == SOFTWARE


# --------------------------------------------------------------------------------------------------------
# 5. eval --out: the same rule for its report folder


def test_eval_report_folder_is_checked_before_anything_loads(run, tmp_path, capsys, nothing_loads):
    base = ["eval", str(run), "--metrics", "world", "--images-per-prompt", "1", "--steps", "1"]
    photos = tmp_path / "photos"
    before = write_foreign(photos / "me.jpg")
    stale = tmp_path / "old" / "samples" / "run_cells" / "cell-0000.png"
    stale_before = write_foreign(stale)  # eval deletes old cell-* files: this one is not sdtune's
    report = tmp_path / "report.md"
    write_foreign(report)
    cases = [
        (report, "report.md is a file; eval writes a report folder"),
        (photos, "photos is a folder that holds no eval report; choose a new or empty folder"),
        (tmp_path / "old", "cell-0000.png exists and sdtune did not write it"),
    ]
    for out, message in cases:
        assert message in one_error(capsys, main([*base, "--out", str(out)])), out
    assert sha(photos / "me.jpg") == before and sha(stale) == stale_before
    assert sorted(p.name for p in photos.iterdir()) == ["me.jpg"]


def test_an_earlier_eval_report_is_its_own(tmp_path):
    from sdtune.cli.eval import check_report_folder
    from sdtune.errors import SdtuneError
    from sdtune.sample import save_image

    (tmp_path / "report.json").write_text(json.dumps({"sdtune_version": __version__}))
    (tmp_path / "report.md").write_text("# report\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "metrics.png")  # report.json vouches for its neighbours
    save_image(Image.new("RGB", (8, 8)), tmp_path / "samples" / "step-000002.png")
    cells = tmp_path / "samples" / "step-000002_cells"
    cells.mkdir()
    Image.new("RGB", (8, 8)).save(cells / "cell-0000.png")  # an older, unmarked cell: its sidecar vouches for it
    (cells / "cell-0000.json").write_text(json.dumps({"sdtune_version": "0.0.9"}))
    check_report_folder(tmp_path)  # no refusal
    (tmp_path / "report.json").write_text("{}")  # not sdtune's any more: neither are report.md, metrics.png
    with pytest.raises(SdtuneError, match="report.json exists and sdtune did not write it"):
        check_report_folder(tmp_path)
    check_report_folder(tmp_path, overwrite=True)


# --------------------------------------------------------------------------------------------------------
# 6. LoRA files that are not LoRA files: one line wherever a LoRA file is read


def _bad_dtype_file(path: Path) -> None:
    """A header that parses, whose dtype safetensors itself rejects (so the reader's own error is caught)."""
    header = json.dumps({"unet.a.lora_A.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def test_broken_lora_files_are_one_line(run, tmp_path, tiny_model, capsys, nothing_loads):
    text = tmp_path / "x.safetensors"
    text.write_text("this is a text file\n")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((run / WEIGHT_NAME).read_bytes()[:20000])
    broken_runs = {}
    for name, write in (("text", lambda p: shutil.copy(text, p)), ("cut", lambda p: shutil.copy(truncated, p)),
                        ("dtype", _bad_dtype_file)):
        folder = tmp_path / f"run-{name}"
        folder.mkdir()
        shutil.copy(run / "config.yaml", folder / "config.yaml")
        write(folder / WEIGHT_NAME)
        broken_runs[name] = folder
    model = str(tiny_model("sd15"))
    cases = [
        (["sample", str(text), "--model", model, "--prompt", "a sks toy", "--out", str(tmp_path / "g.png")], text),
        (["sample", str(truncated), "--model", model, "--prompt", "a sks toy"], truncated),
        (["sample", str(broken_runs["cut"]), "--out", str(tmp_path / "g.png")], broken_runs["cut"] / WEIGHT_NAME),
        (["eval", str(text), "--metrics", "world", "--model", model, "--identifier", "sks", "--class-noun", "toy",
          "--subject-dir", str(DEMO_DATA), "--out", str(tmp_path / "ev")], text),
        (["eval", str(broken_runs["text"]), "--metrics", "world", "--out", str(tmp_path / "ev")],
         broken_runs["text"] / WEIGHT_NAME),
    ] + [(["export", str(folder), "-o", str(tmp_path / "e.safetensors")], folder / WEIGHT_NAME)
         for folder in broken_runs.values()]
    for argv, bad in cases:
        line = one_error(capsys, main(argv))
        assert line.startswith(f"error: {bad} is not a readable safetensors file (truncated or corrupt: "), line
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------------------------------
# 7. push: every file verified (dry run too); offline mode says so


def test_push_verifies_every_file_and_knows_offline_mode(run, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error(capsys, main(["push", str(copy), "--repo", "me/toy-lora"]))
    assert "offline mode" in line and "unset HF_HUB_OFFLINE" in line and "log in" not in line

    kohya = copy / f"run{KOHYA_SUFFIX}"
    kohya.write_bytes(kohya.read_bytes()[:-100])
    grid = sorted((copy / "samples").glob("step-*.png"))[-1]
    grid.write_bytes(grid.read_bytes()[:200])
    (copy / "README.md").write_bytes(b"\xff\xfe not utf-8")
    for argv in (["--dry-run"], []):  # the dry run checks exactly what the push would
        line = one_error(capsys, main(["push", str(copy), "--repo", "me/toy-lora", *argv]))
        assert line.startswith("error: push: 3 of 4 files are not fit to upload: "), line
        for name in ("README.md: not UTF-8", f"run{KOHYA_SUFFIX}: not a readable safetensors file",
                     f"samples/{grid.name}: "):
            assert name in line, (name, line)


# --------------------------------------------------------------------------------------------------------
# 8. Argument values: negative, zero, nan, too big, not UTF-8: the parser's (or the command's) one line


def test_hostile_values_are_one_line_errors(run, tmp_path, capsys, nothing_loads):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("une photo de sks \xe9t\xe9\n".encode("latin-1"))
    sample = ["sample", str(run), "--out", str(tmp_path / "g.png")]
    evaluation = ["eval", str(run), "--metrics", "world", "--out", str(tmp_path / "ev")]
    cases = [
        (sample + ["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
        (sample + ["--steps", "0"], "argument --steps: must be at least 1"),
        (sample + ["--width", "-64"], "argument --width: must be at least 1"),
        (sample + ["--width", "7"], "argument --width: must be a multiple of 8"),
        (sample + ["--height", "100000"], "argument --height: must be a multiple of 8 between 8 and 4096"),
        (sample + ["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (sample + ["--strength", "5"], "argument --strength: must be greater than 0 and at most 1"),
        (sample + ["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
        (sample + ["--seeds", ""], "--seeds: expected comma-separated integers"),
        (sample + ["--seeds", "-1"], "--seeds: each value must be at least 0"),
        (sample + ["--lora-scale", "nan"], "--lora-scale: expected comma-separated finite numbers"),
        (sample + ["--lora-scale", ","], "--lora-scale: expected comma-separated finite numbers"),
        (sample + ["--guidance", "inf"], "--guidance: expected comma-separated finite numbers"),
        (sample + ["--prompts-file", str(latin1)], "is not UTF-8 text"),
        (sample + ["--prompts-file", str(tmp_path)], "--prompts-file: cannot read"),
        (evaluation + ["--images-per-prompt", "0"], "argument --images-per-prompt: must be at least 1"),
        (evaluation + ["--world-prompts", "-2"], "argument --world-prompts: must be at least 1"),
        (evaluation + ["--steps", "0"], "argument --steps: must be at least 1"),
        (evaluation + ["--width", "7"], "argument --width: must be a multiple of 8"),
        (evaluation + ["--guidance", "nan"], "argument --guidance: expected a finite number"),
        (evaluation + ["--clip-t-tolerance", "-1"], "argument --clip-t-tolerance: must be 0 or more"),
        (evaluation + ["--lora-scale", "nan"], "--lora-scale: expected comma-separated finite numbers"),
    ]
    for argv, message in cases:
        assert message in one_error(capsys, main(argv)), argv
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------------------------------------
# 6. Found by the held-out style probe: damaged run files, damaged model configs, text that is not UTF-8


def test_damaged_run_files_are_one_line(run, tmp_path, capsys, nothing_loads):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    config = copy / "config.yaml"
    for damaged in (b"model: [unclosed\n", b"- a list\n- of things\n", b"model: \xff\xfe\n"):
        config.write_bytes(damaged)
        one_error(capsys, main(["export", str(copy), "-o", str(tmp_path / "a.safetensors")]))
        line = one_error(capsys, main(["sample", str(copy), "--steps", "1", "--seeds", "0"]))
        assert str(config) in line
    state = copy / "checkpoints" / "step-000002" / "state.json"
    state.write_text("{not json")
    line = one_error(capsys, main(["export", str(state.parent), "-o", str(tmp_path / "b.safetensors")]))
    assert str(state) in line and "cannot be read" in line
    one_error(capsys, main(["sample", str(run / WEIGHT_NAME), "--checkpoints", "all"]))


def test_damaged_model_configs_are_one_line(tiny_model, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    model = Path(shutil.copytree(tiny_model("sd15"), tmp_path / "model"))
    unet = model / "unet" / "config.json"
    good = json.loads(unet.read_text())
    for damaged in ([1, 2], {**good, "sample_size": "big"}, {**good, "cross_attention_dim": None}):
        unet.write_text(json.dumps(damaged))
        line = one_error(capsys, main(["train", str(recipe), *overrides(model, tmp_path / "out"), "--dry-run"]))
        assert line.startswith("error: model.pretrained: ") and "config" in line
    assert not (tmp_path / "out").exists()


def test_text_arguments_must_be_utf8_and_devices_must_exist(run, tmp_path, capsys, nothing_loads):
    not_utf8 = b"sk\xffs".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    for argv in (["check-token", not_utf8], ["prep", str(DEMO_DATA), str(tmp_path / "p"), "--caption", not_utf8],
                 ["sample", str(run), "--prompt", not_utf8]):
        assert "is not UTF-8 text" in one_error(capsys, main(argv))
    assert not (tmp_path / "p").exists()
    import torch

    if not torch.cuda.is_available():
        assert "CUDA GPU(s)" in one_error(capsys, main(["sample", str(run), "--device", "cuda"]))
    assert "is not a device" in one_error(capsys, main(["sample", str(run), "--device", "nosuch"]))


def test_a_run_file_never_takes_another_formats_content(run, tmp_path, capsys):
    kohya = next(run.glob(f"*{KOHYA_SUFFIX}"))
    before = sha(kohya)
    line = one_error(capsys, main(["export", str(run), "--format", "diffusers", "-o", str(kohya), "--overwrite"]))
    assert "is the run's kohya file" in line and sha(kohya) == before


def test_written_files_are_readable_by_others_as_the_umask_says(run, tmp_path, capsys):
    """A LoRA copied into a ComfyUI / A1111 folder served by another account must be readable there."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        for fmt, out in (("kohya", tmp_path / "k.safetensors"), ("diffusers", tmp_path / "d.safetensors")):
            assert main(["export", str(run), "--format", fmt, "-o", str(out)]) == 0
            assert stat.S_IMODE(out.stat().st_mode) == 0o644, (fmt, oct(out.stat().st_mode))
    finally:
        os.umask(umask)
    for f in (*run.glob("*.safetensors"), run / "README.md"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f


def test_prep_resolution_and_doctor_output_dir(tmp_path, capsys):
    assert "must be" in one_error(capsys, main(["prep", str(DEMO_DATA), str(tmp_path / "o"),
                                                                "--resolution", "0"]))
    said = one_error(capsys, main(["prep", str(DEMO_DATA), str(tmp_path / "o"), "--resolution", "32"]))
    assert "must be a multiple of 8 from 64 to 4096 pixels, got 32 (e.g. 64)" in said
    said = one_error(capsys, main(["prep", str(DEMO_DATA), str(tmp_path / "o"), "--resolution", "500"]))
    assert "must be a multiple of 8 from 64 to 4096 pixels, got 500 (e.g. 496)" in said
    assert not (tmp_path / "o").exists()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert "is a file" in one_error(capsys, main(["doctor", "--output-dir", str(a_file)]))
