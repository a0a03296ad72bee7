"""QA round 5: export never takes a run's own files, the micro model loads in plain diffusers, the model card's
snippet runs as written on a CPU, ``micro check --grid`` is checked before rendering, the micro commands refuse
nonsense values, and ``bench/techniques.py`` resolves a relative ``--work`` against the caller's folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from conftest import overrides
from sdtune.cli import build_parser, main
from sdtune.config import load_config
from sdtune.micro import model as micro
from sdtune.runs import CARD, KOHYA_SUFFIX, written_by_sdtune
from sdtune.train import train

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(capsys, code: int) -> str:
    """The single ``error:`` line a failed command printed (exit 2, no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """A tiny sd15 run: 2 steps, a checkpoint at each, its kohya file and model card."""
    out = tmp_path_factory.mktemp("qa5") / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2", "train.checkpoint_every=1",
                                      "data.instance_prompt=a photo of sks toy")))
    return out


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    return micro.write_model(tmp_path_factory.mktemp("qa5-micro") / "micro-model")


# --------------------------------------------------------------------------------------------------------
# 1. export: a run's own kohya file and embeddings are no export target, even with --overwrite


def test_export_never_replaces_a_runs_own_files_with_another_lora(run, tmp_path, capsys):
    kohya = run / f"run{KOHYA_SUFFIX}"
    before = sha(kohya)
    other = shutil.copytree(run, tmp_path / "other")  # another run folder, with its own final LoRA
    embeddings = run / "embeddings" / "sks.safetensors"
    embeddings.parent.mkdir(exist_ok=True)
    shutil.copy(kohya, embeddings)
    cases = [
        ([str(run / "checkpoints" / "step-000001"), "-o", str(kohya)], "is the run's own kohya file"),
        ([str(run / "checkpoints" / "step-000001"), "-o", str(kohya), "--overwrite"], "is the run's own kohya file"),
        ([str(other), "-o", str(kohya), "--overwrite"], f"the LoRA of {other} must not replace it"),
        ([str(other), "-o", str(run / f"renamed{KOHYA_SUFFIX}")], "would pass for the run's own kohya file"),
        ([str(run), "-o", str(embeddings), "--overwrite"], "is in the run's embeddings folder"),
    ]
    for argv, message in cases:
        line = one_error(capsys, main(["export", *argv]))
        assert message in line and line.endswith("choose another name"), (argv, line)
    assert sha(kohya) == before and not (run / f"renamed{KOHYA_SUFFIX}").exists()
    shutil.rmtree(embeddings.parent)
    # the same run writing the same file again (what training does) is allowed: the same bytes
    assert main(["export", str(run), "-o", str(kohya)]) == 0 and sha(kohya) == before
    assert main(["export", str(other), "-o", str(other / f"run{KOHYA_SUFFIX}")]) == 0


# --------------------------------------------------------------------------------------------------------
# 2. the micro model loads in plain diffusers, in fp32 everywhere, from the same fp16 weight files


def _plain_diffusers_image(folder: Path):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    return pipe("a small yellow star on a white background", num_inference_steps=1, output_type="np").images


def test_the_micro_model_loads_in_plain_diffusers(micro_model, tmp_path):
    shipped = micro.shipped_dir()
    assert json.loads((shipped / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    for part in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        assert sha(micro_model / part) == sha(shipped / part)  # the weights the micro world is calibrated on
    assert _plain_diffusers_image(micro_model).shape == (1, micro.RESOLUTION, micro.RESOLUTION, 3)
    # what `micro pretrain` writes (fp16 weights) says float32 too
    saved = micro.save_pipeline(tmp_path / "saved", *micro.build(0, 16))
    assert json.loads((saved / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    assert _plain_diffusers_image(saved).shape[0] == 1
    # a folder from an older sdtune (fp16 in its config) is shipped with float32, its weights untouched
    config = micro_model / "text_encoder" / "config.json"
    old = shutil.copytree(micro_model, tmp_path / "old")
    (old / "text_encoder" / "config.json").write_text(config.read_text().replace('"float32"', '"float16"'))
    target = micro.ship(old, tmp_path / "assets")
    assert json.loads((target / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    assert sha(target / "unet/diffusion_pytorch_model.safetensors") == sha(old / "unet/diffusion_pytorch_model.safetensors")


# --------------------------------------------------------------------------------------------------------
# 3. the model card's diffusers snippet runs as written on a machine without CUDA


def test_the_model_cards_snippet_runs_on_a_cpu(run, tiny_model):
    card = (run / CARD).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "torch_dtype=torch" not in code and "dtype=dtype).to(device)" in code  # chosen in the snippet
    assert "num_inference_steps=2, guidance_scale=7.5" in code  # the run's own grids' settings
    # what the card says to fill in: the base model, and where the LoRA is (the run folder here)
    code = code.replace("'BASE_MODEL'", repr(str(tiny_model("sd15")))).replace("'REPO_OR_FOLDER'", repr(str(run)))
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "model card", "exec"), namespace)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert namespace["device"] == expected and namespace["pipe"].device.type == expected
    assert namespace["pipe"].get_list_adapters()  # the LoRA was loaded
    assert namespace["image"].size[0] > 0


# --------------------------------------------------------------------------------------------------------
# 4. micro check --grid: refused before rendering, marked, replaced only when sdtune wrote it


def test_micro_check_grid_is_checked_before_anything_loads(micro_model, tmp_path, capsys, monkeypatch):
    import sdtune.models

    mine = tmp_path / "mine.png"
    mine.write_bytes(b"mine\n")
    folder = tmp_path / "folder"
    folder.mkdir()

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    with monkeypatch.context() as m:
        m.setattr(sdtune.models, "inspect_model", loaded)
        base = ["micro", "check", str(micro_model), "--n", "2", "--steps", "1", "--grid"]
        for grid, message in ((mine, "sdtune did not write it"), (tmp_path / "out.txt", "ending in .png"),
                              (folder, "is a folder")):
            assert message in one_error(capsys, main([*base, str(grid)]))
    assert mine.read_bytes() == b"mine\n" and not (tmp_path / "out.txt").exists()
    grid = tmp_path / "new" / "check.png"
    assert main([*base, str(grid)]) == 0 and written_by_sdtune(grid)
    assert main([*base, str(grid)]) == 0  # its own grid: replaced
    assert main([*base, str(mine), "--overwrite"]) == 0 and written_by_sdtune(mine)


# --------------------------------------------------------------------------------------------------------
# 5. micro subject / model / pretrain: every option explained, nonsense refused in one line


def test_micro_options_have_help_and_refuse_nonsense(tmp_path, capsys):
    parser = build_parser()
    micro_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("micro"))
    for name, sub in micro_parser._subparsers._group_actions[0].choices.items():
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert not undocumented, (name, undocumented)
    out = tmp_path / "photos"
    cases = [(["subject", str(out), "--n", "0"], "--n: must be at least 1"),
             (["subject", str(out), "--size", "7"], "--size: must be a multiple of 8 from 64 to 4096 pixels, got 7 (e.g. 64)"),
             (["subject", str(out), "--identifier", ""], "--identifier: expected one word"),
             (["pretrain", str(out), "--vae-steps", "-1"], "--vae-steps: must be at least 1"),
             (["pretrain", str(out), "--batch-size", "0"], "--batch-size: must be at least 1"),
             (["pretrain", str(out), "--warmup", "0"], "--warmup: must be at least 1"),
             (["pretrain", str(out), "--lr", "nan"], "--lr: expected a finite number")]
    for argv, message in cases:
        assert message in one_error(capsys, main(["micro", *argv])), argv
    assert not out.exists()
    assert main(["micro", "subject", str(out), "--n", "2", "--size", "64"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["subject_00.png", "subject_01.png"]


# --------------------------------------------------------------------------------------------------------
# 6. bench/techniques.py: a relative --work / --out is the caller's, and the note counts the seeds used


def test_the_technique_bench_resolves_its_paths_in_the_callers_folder(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("techniques", ROOT / "bench" / "techniques.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen: list[Path] = []
    monkeypatch.setattr(bench, "prepare", lambda work, log: seen.append(work) or {})
    row = {"subject": 0.5, "context": 1.0, "class_subject": 0.1, "wall_s": 1.0}
    monkeypatch.setattr(bench, "one", lambda name, seed, steps, base, work, log: seen.append(work) or row)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["techniques.py", "--only", "baseline", "--seeds", "0", "--work", "tech",
                                      "--out", "table.md"])
    bench.main()
    assert seen == [tmp_path / "tech", tmp_path / "tech"] and (tmp_path / "tech").is_dir()
    note = (tmp_path / "table.md").read_text()
    assert "One seed gives no spread" in note and "Three seeds" not in note
    assert "3 seeds are few" in bench.table({"baseline": [row] * 3}, "x", 10, [0, 1, 2])
