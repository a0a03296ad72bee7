"""FSDP (recipes/accelerate/fsdp.yaml): the refusals, read in-process from the launch's environment, and one
sharded run of 2 CPU gloo processes on the tiny FLUX model: what it writes (whole LoRA tensors, the keys and
shapes of a one-process run's), its sample grids during training, and an exact resume of its checkpoint."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DEMO_DATA, ROOT, overrides
from sdtune.config import ConfigError, load_config
from sdtune.lora import WEIGHT_NAME
from sdtune.plan import check_run
from sdtune.train import train

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `accelerate launch` sets for fsdp.yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refusals(cfg_overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, cfg_overrides))
    return e.value.problems


def test_fsdp_refuses_what_cannot_run_sharded_one_line_each(tiny_model, tmp_path, monkeypatch):
    base = overrides(tiny_model("flux"), tmp_path / "run", "prior.enabled=false")
    check_run(load_config(None, base))  # FSDP's keys, with a launch that is not FSDP: no refusal
    bad = ["lora.train_text_encoder=true", "model.quantize=nf4", "train.optimizer=adamw8bit", "pivotal.enabled=true",
           "train.ema=true", "train.compile=true"]
    assert check_run(load_config(None, [*base, *bad[2:]]))  # nothing refused outside FSDP (nf4 / TE need others)

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    check_run(load_config(None, base))  # a plain LoRA run shards fine
    problems = _refusals([*base, *bad, "prior.enabled=true", "prior.class_prompt=a photo of a toy"])
    for key in ("lora.train_text_encoder", "model.quantize", "train.optimizer", "pivotal.enabled", "train.ema",
                "train.compile", "prior.class_dir"):
        mine = [p for p in problems if p.startswith(f"{key}:") and ("FSDP" in p)]
        assert len(mine) == 1, (key, problems)
        assert "\n" not in mine[0] and "fix:" in mine[0], mine[0]

    # class images made beforehand are used as they are; too few are refused with the count
    classes = tmp_path / "classes"
    classes.mkdir()
    for i in range(3):
        shutil.copy(DEMO_DATA / f"toy_0{i}.png", classes / f"c{i}.png")
    prior = ["prior.enabled=true", "prior.class_prompt=a photo of a toy", f"prior.class_dir={classes}"]
    check_run(load_config(None, [*base, *prior, "prior.num_class_images=3"]))
    (line,) = _refusals([*base, *prior, "prior.num_class_images=4"])
    assert line.startswith("prior.class_dir:") and "holds 3 of prior.num_class_images=4" in line

    monkeypatch.setenv("FSDP_VERSION", "1")
    (line,) = _refusals(base)
    assert line.startswith("accelerate config fsdp_version: 1") and "fix: fsdp_version: 2" in line


def test_class_images_made_beforehand_are_what_an_fsdp_run_and_a_plain_run_use(tiny_model, tmp_path, monkeypatch,
                                                                                 capsys):
    """`sdtune class-images RECIPE overrides` makes the class images where a run of the same recipe looks (the
    cache folder keyed by the model's bytes), and writes no run folder; an FSDP launch, which cannot generate
    them, then finds them, and a plain run uses them as they are."""
    from sdtune.cli import main

    out = tmp_path / "run"
    args = overrides(tiny_model("sd15"), out, "prior.class_dir=null", "prior.enabled=true",  # the recipe's folder off
                     "prior.class_prompt=a photo of a toy", "prior.num_class_images=3", "prior.generation_steps=2",
                     "prior.generation_batch_size=2")
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    (line,) = _refusals(args)
    assert line.startswith("prior.class_dir: under FSDP") and "sdtune's cache holds 0 of prior.num_class_images=3" \
        in line and "fix: run `sdtune class-images` with the same recipe and overrides first" in line
    assert main(["class-images", str(ROOT / "recipes/tiny_cpu.yaml"), *args]) == 2  # not under FSDP itself
    assert "class images are made without FSDP" in capsys.readouterr().err
    for key in FSDP_ENV:
        monkeypatch.delenv(key)

    assert main(["class-images", str(ROOT / "recipes/tiny_cpu.yaml"), *args]) == 0
    printed = capsys.readouterr().out
    folder = Path(printed.split("class images: 3 in ")[1].split()[0])
    made = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert len(made) == 3 and not out.exists()
    assert main(["class-images", str(ROOT / "recipes/tiny_cpu.yaml"), *args, "--offload", "model"]) == 2
    assert "--offload model: diffusers' CPU offload" in capsys.readouterr().err

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    check_run(load_config(None, args))  # found: no refusal
    for key in FSDP_ENV:
        monkeypatch.delenv(key)
    train(load_config(None, args))
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == made  # used, not made again
    assert main(["class-images", str(ROOT / "recipes/tiny_cpu.yaml"), *args, "prior.enabled=false"]) == 2
    assert "prior.enabled: false, and class images are for prior preservation" in capsys.readouterr().err


def _launch(model, out, tmp_path, *extra):
    """sdtune train on 2 CPU gloo processes under recipes/accelerate/fsdp.yaml (as its header's command)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "sdtune", "train", str(ROOT / "recipes/tiny_cpu.yaml"),
           *overrides(model, out, "prior.enabled=false", "train.max_steps=4", "train.checkpoint_every=2",
                      "sample.every=2", "train.validation_every=2", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(run):
    return {r["step"]: r for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


@pytest.mark.slow  # two launches of two processes, and a one-process run: about 60 s on 2 cores
def test_fsdp_run_writes_whole_lora_samples_and_resumes_exactly(tiny_model, tmp_path):
    model, out = tiny_model("flux"), tmp_path / "fsdp"
    held = tmp_path / "held"  # held-out photos: the validation loss is measured by both processes together
    held.mkdir()
    for name in ("toy_06.png", "toy_07.png"):
        shutil.copy(DEMO_DATA / name, held / name)
    stdout = _launch(model, out, tmp_path, f"data.validation_dir={held}")
    # really sharded (accelerate alone falls back to DDP on CPU processes): one FSDP unit per block
    assert "FSDP: the transformer is sharded over 2 processes, in units of FluxTransformerBlock x 1, " \
        "FluxSingleTransformerBlock x 1" in stdout, stdout[-2000:]

    one = tmp_path / "one"  # the same recipe in one plain process
    train(load_config(ROOT / "recipes/tiny_cpu.yaml",
                      overrides(model, one, "prior.enabled=false", "train.max_steps=1", "sample.every=0")))
    lora, reference = load_file(out / WEIGHT_NAME), load_file(one / WEIGHT_NAME)
    assert lora.keys() == reference.keys() and lora
    assert all(lora[k].shape == reference[k].shape and lora[k].dtype == torch.float32 for k in lora)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at zero)
    checkpoint = load_file(out / "checkpoints/step-000004/adapter-transformer.safetensors")
    assert {k: v.shape for k, v in checkpoint.items()} == {k.removeprefix("transformer."): v.shape
                                                           for k, v in lora.items()}
    # whole optimizer moments (what a DDP run writes), not one process's shards
    moments = torch.load(out / "checkpoints/step-000004/optimizer.pt", weights_only=True)["state"]
    assert sorted(tuple(s["exp_avg"].shape) for s in moments.values()) == sorted(tuple(v.shape)
                                                                                   for v in checkpoint.values())
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in losses.values())
    assert all(math.isfinite(losses[s]["val_loss"]) for s in (2, 4))
    for step in (2, 4):  # rendered by both processes together during training and at the end
        with Image.open(out / f"samples/step-{step:06d}.png") as grid:
            assert grid.convert("L").getextrema()[1] > 0

    # "crashed" after the step-2 checkpoint, then resumed sharded: the same losses and bitwise the same LoRA
    split = tmp_path / "split"
    shutil.copytree(out, split)
    shutil.rmtree(split / "checkpoints/step-000004")
    (split / WEIGHT_NAME).unlink()
    (split / "losses.jsonl").write_text("".join(json.dumps(_losses(out)[s]) + "\n" for s in (1, 2)))
    _launch(model, split, tmp_path, f"data.validation_dir={held}", "train.resume=latest")
    assert [_losses(split)[s]["loss"] for s in (3, 4)] == [losses[s]["loss"] for s in (3, 4)]
    resumed = load_file(split / WEIGHT_NAME)
    assert resumed.keys() == lora.keys() and all(torch.equal(resumed[k], lora[k]) for k in lora)
