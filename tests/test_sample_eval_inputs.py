"""QA round 5 on `sdtune sample` and `sdtune eval`: world metrics only on the micro model, one Hub probe for the
paper's metric models, PEFT export folders sampled like the run, a LoRA of other widths in one line, one prompt-file
rule, validated flags, de-duplicated cells, long prompts named, wrapped grid titles."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from sdtune.cli import main
from sdtune.errors import SdtuneError


def one_error(capsys, rc: int) -> str:
    """The command's single stderr line (asserting exit code 2 and nothing else on stderr)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def fake_run(folder: Path, model: Path) -> Path:
    """A run folder that names ``model`` and holds a (header-valid) LoRA file: enough for the checks made before
    anything loads."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = {"model": {"pretrained": str(model)}, "data": {"identifier": "sks", "instance_prompt": "a photo of sks toy"},
           "prior": {"class_prompt": "a photo of a toy"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, folder / "pytorch_lora_weights.safetensors")
    return folder


# --------------------------------------------------------------------------------------------------------
# 1. --metrics world: the micro model only, and none of the paper's flags


def test_world_metrics_refuse_a_model_that_is_not_the_micro_model(tiny_model, tmp_path, capsys):
    run = fake_run(tmp_path / "sdxl-run", tiny_model("sdxl"))
    capsys.readouterr()  # the tiny model's first writing shows progress
    line = one_error(capsys, main(["eval", str(run), "--metrics", "world", "--out", str(tmp_path / "e")]))
    assert line.startswith(f"error: --metrics world: {tiny_model('sdxl')} is not the micro model (it is SDXL at 64 px")
    assert "use --metrics paper" in line and not (tmp_path / "e").exists()

    from sdtune.cli.eval import check_world_model
    from sdtune.micro.model import write_model

    check_world_model(str(write_model(tmp_path / "micro")), None)  # the micro model itself passes


@pytest.mark.parametrize("flags, named", [
    (["--pres"], "--pres"),
    (["--prompts", "p.txt"], "--prompts FILE"),
    (["--dino", "some/dino", "--clip", "some/clip"], "--dino, --clip"),
    (["--live"], "--live / --object"),
])
def test_world_metrics_refuse_the_paper_flags(tiny_model, tmp_path, capsys, flags, named):
    run = fake_run(tmp_path / "run", tiny_model("sd15"))
    capsys.readouterr()  # the tiny model's first writing shows progress
    line = one_error(capsys, main(["eval", str(run), "--metrics", "world", *flags, "--out", str(tmp_path / "e")]))
    assert line.startswith(f"error: {named}: not read by --metrics world")


# --------------------------------------------------------------------------------------------------------
# 2. the paper's metric models with no network: one probe, then the cache at once


def test_paper_metric_models_ask_the_hub_once_when_it_cannot_be_reached(unreachable_hub):
    import os

    from huggingface_hub import constants

    from sdtune.eval.paper import Embedder

    start = time.monotonic()
    with pytest.raises(SdtuneError) as e:
        Embedder("nobody-here/dino-not-cached", "nobody-here/clip-not-cached")
    assert time.monotonic() - start < 10  # not 5 retries (~25 s) per file
    assert str(e.value).startswith("--dino: could not load nobody-here/dino-not-cached: it is not in the Hugging "
                                   "Face cache (the Hub cannot be reached from here); pass --dino PATH")
    assert len(unreachable_hub) == 1 and constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------------------------------------
# 3 + 4. a PEFT export folder samples like its run; a LoRA of other widths is one line


def cells(grid: Path) -> list[np.ndarray]:
    folder = grid.with_name(grid.stem + "_cells")
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("cell-*.png"))]


@pytest.mark.slow
def test_a_peft_export_samples_the_runs_pixels(checkpointed_run, tiny_model, tmp_path, capsys):
    from sdtune.export import export_run

    run = checkpointed_run
    peft = export_run(run, "peft", tmp_path / "peft")[0]
    common = ["--prompt", "a photo of sks toy", "--seeds", "0,1", "--steps", "2", "--guidance", "7.5",
              "--lora-scale", "0,1", "--model", str(tiny_model("sd15"))]
    for target, out in ((run, "run.png"), (peft, "peft.png"), (peft / "unet" / "adapter_model.safetensors", "u.png")):
        assert main(["sample", str(target), *common, "--out", str(tmp_path / out)]) == 0, capsys.readouterr()
    ran, exported, component = (cells(tmp_path / n) for n in ("run.png", "peft.png", "u.png"))
    assert len(ran) == 4 and not np.array_equal(ran[0], ran[2])  # scale 0 vs 1: the LoRA draws something
    for a, b, c in zip(ran, exported, component):
        assert np.array_equal(a, b) and np.array_equal(a, c)  # bit for bit
    sidecar = json.loads((tmp_path / "peft_cells" / "cell-0002.json").read_text())
    assert sidecar["lora"] == str(peft.resolve()) and len(sidecar["lora_sha256"]) == 64
    assert main(["sample", "--replay", str(tmp_path / "peft_cells" / "cell-0002.json"),
                 "--out", str(tmp_path / "replay.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "replay.png")), exported[2])


@pytest.mark.slow
def test_a_lora_of_other_layer_widths_is_one_line(checkpointed_run, tmp_path, capfd):
    from sdtune.export import export_run
    from sdtune.micro.model import write_model

    micro = write_model(tmp_path / "micro")  # SD1.x too, its UNet 48 wide where the run's is 32
    peft = export_run(checkpointed_run, "peft", tmp_path / "peft")[0]
    for target in (checkpointed_run, peft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(["sample", str(target), "--model", str(micro), "--prompt", "x", "--seeds", "0", "--steps", "1",
                       "--out", str(tmp_path / "b.png")])
        err = capfd.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "made for a model of other layer widths than this SD1.x model (" in err[0]
        widths = re.search(r"\((\S+): (?:input|output) width (\d+) in the LoRA, (\d+) in the model", err[0])
        assert widths and widths[2] != widths[3] and "lora" not in widths[1], err[0]  # a layer of the model, named
        assert not [w for w in caught if "PEFT" in str(w.message)]  # PEFT's list of every module: held, dropped


# --------------------------------------------------------------------------------------------------------
# 5. one prompt-file rule


def test_sample_and_eval_read_prompt_files_alike(tmp_path):
    from sdtune.cli.sample import read_prompts
    from sdtune.eval.prompts import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_text("a photo of sks toy\n# comment?\n\n   # indented comment\nsks toy on the beach\n")
    args = SimpleNamespace(prompt=None, prompts_file=str(f))
    assert read_prompts(args, {}) == read_prompt_file(f) == ["a photo of sks toy", "sks toy on the beach"]
    f.write_text("# only a comment\n")
    with pytest.raises(SdtuneError, match="holds no prompt"):
        read_prompts(args, {})


# --------------------------------------------------------------------------------------------------------
# 6 + 7. flags, help, duplicates, checkpoints of a checkpoint, long prompts, titles


def test_sample_help_and_flags(tiny_model, tmp_path, capsys):
    from sdtune.cli import build_parser

    sample = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "sample")[1]
    text = " ".join(sample.format_help().split())
    assert "sample.scheduler" not in text and "default: dpmpp_2m, what training's grids use" in text
    assert "(default: 0,1, without and with the LoRA)" in text and "'#' (comments) are skipped" in text
    run = fake_run(tmp_path / "run", tiny_model("sd15"))
    capsys.readouterr()  # the tiny model's first writing shows progress
    line = one_error(capsys, main(["sample", str(run), "--guidance", "-1", "--out", str(tmp_path / "g.png")]))
    assert line == "error: --guidance: guidance scales must be 0 or more, as sample.guidance_scale; got -1"
    assert "must be 0 or more" in one_error(capsys, main(["eval", str(run), "--guidance", "-1"]))


def test_checkpoints_all_on_a_checkpoint_names_the_run_folder(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000020"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: {pretrained: m}\n")
    (checkpoint / "state.json").write_text(json.dumps({"config": {"model": {"pretrained": "m"}}}))
    line = one_error(capsys, main(["sample", str(checkpoint), "--checkpoints", "all"]))
    assert line == (f"error: --checkpoints all: {checkpoint} is one checkpoint; give its run folder "
                    f"({tmp_path / 'run'}) to draw every checkpoint")


def test_repeated_prompts_seeds_and_scales_are_drawn_once(tiny_model, tmp_path, capsys):
    from sdtune.cli import build_parser
    from sdtune.cli.sample import _request

    run = fake_run(tmp_path / "run", tiny_model("sd15"))
    capsys.readouterr()  # the tiny model's first writing shows progress
    args = build_parser().parse_args(["sample", str(run), "--prompt", "A", "--prompt", "A", "--seeds", "0,0,1",
                                      "--lora-scale", "1,1", "--out", str(tmp_path / "g.png")])
    req, _ = _request(args)
    assert [(c.prompt, c.seed, c.lora_scale) for c in req.cells] == [("A", 0, 1.0), ("A", 1, 1.0)]
    err = capsys.readouterr().err
    assert "note: prompts: 1 repeat(s) left out, 1 distinct" in err and "note: --seeds: 1 repeat(s)" in err
    assert "note: --lora-scale: 1 repeat(s)" in err


def test_a_prompt_over_the_token_limit_is_named_once(monkeypatch):
    from sdtune import families, sample
    from sdtune.grid import Cell, Settings
    from sdtune.tokens import clip_tokenizer

    said: list[str] = []
    monkeypatch.setattr(sample.logger, "warning", said.append)
    monkeypatch.setattr(sample, "_warned", set())
    long = "a photo of sks toy " + "on a very long beach " * 20
    req = sample.Request(model="m", lora=[], cells=[Cell(long, 0), Cell(long, 1), Cell("short", 0)],
                         settings=Settings())
    pipe = SimpleNamespace(tokenizer=clip_tokenizer())
    for _ in range(2):  # eval renders once per checkpoint: said once
        sample._warn_truncated(pipe, families.get("sd15"), req)
    assert len(said) == 1 and said[0].startswith(f"prompt '{long[:40]}': it is ")
    assert "CLIP" in said[0] and "reads 77" in said[0]


def test_a_long_title_wraps_on_a_narrow_grid():
    from sdtune.grid import make_grid

    image = [[Image.new("RGB", (64, 64))]]
    short = make_grid(image, ["row"], ["seed 0"], title="micro")
    long = make_grid(image, ["row"], ["seed 0"], title="micro: step-000020 to step-000060 on micro-model-folder")
    assert long.width == short.width and long.height > short.height  # a second title line, not a cut


def test_no_prompt_names_the_files_identifier_not_a_made_up_one():
    """A LoRA file outside its run (a kohya file with a trigger phrase) and no --prompt: the message said "the
    run has none; pass --prompt 'a photo of sks dog'", for a file with no run and the identifier ohwx."""
    import argparse

    from sdtune.cli.sample import read_prompts

    args = argparse.Namespace(prompt=None, prompts_file=None)
    cases = [({"data": {"identifier": "ohwx"}}, "a LoRA file outside its run has no grid prompts; pass --prompt "
              "'a photo of ohwx ...'"),
             ({}, "pass --prompt 'a photo of <its identifier> <class>'"),
             ({"train": {}, "data": {"identifier": "zwx"}, "sample": {"prompts": []}}, "the run has none; pass "
              "--prompt 'a photo of zwx ...'")]
    for run_cfg, said in cases:
        with pytest.raises(SdtuneError, match=re.escape(said)):
            read_prompts(args, run_cfg)
