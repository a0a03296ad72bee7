"""Validation loss on held-out images (train.validation_every, data.validation_dir; sdtune.validation):
checked with the data before any weight loads, deterministic, invisible to the training (the same LoRA with it
as without), logged with the loss and summarised; in the micro world it rises when a run overfits."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_DATA, overrides
from sdtune.config import ConfigError, load_config
from sdtune.plan import check_run
from sdtune.runs import WEIGHT_NAME
from sdtune.train import make_accelerator, setup, train
from sdtune.validation import fixed_timesteps, validation_summary


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """(training images, held-out images): the demo toy's first five pictures and its last three."""
    train_dir, held_out = tmp_path / "train_images", tmp_path / "held_out"
    train_dir.mkdir()
    held_out.mkdir()
    for i in range(8):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", (train_dir if i < 5 else held_out) / f"toy_{i:02d}.png")
    return train_dir, held_out


def _cfg(model: Path, out: Path, train_dir: Path, *extra: str):
    return load_config(None, overrides(model, out, f"data.instance_dir={train_dir}",
                                       "data.instance_prompt=a photo of sks toy", *extra))


def test_the_plan_checks_the_held_out_images(tiny_model, tmp_path, folders):
    train_dir, held_out = folders
    model = tiny_model("sd15")
    with pytest.raises(ConfigError) as e:
        check_run(_cfg(model, tmp_path / "a", train_dir, "train.validation_every=5"))
    assert any(p.startswith("train.validation_every:") and "data.validation_dir" in p and "fix:" in p
               for p in e.value.problems), e.value.problems

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as e:  # reported with the run's other problems (lora.target_modules)
        check_run(_cfg(model, tmp_path / "b", train_dir, f"data.validation_dir={tmp_path / 'broken'}",
                       "train.validation_every=5", "lora.target_modules=[nope]"))
    problems = e.value.problems
    assert any(p.startswith("data.validation_dir: cannot read bad.png") for p in problems), problems
    assert any(p.startswith("lora.target_modules:") for p in e.value.problems)
    with pytest.raises(ConfigError, match="data.validation_dir: .* holds no images"):
        check_run(_cfg(model, tmp_path / "c", train_dir, f"data.validation_dir={empty}",
                       "train.validation_every=5"))

    shutil.copy(train_dir / "toy_00.png", held_out / "copy.png")  # a training image among the held-out ones
    plan = check_run(_cfg(model, tmp_path / "d", train_dir, f"data.validation_dir={held_out}",
                          "train.validation_every=5"))
    assert [e.path.name for e in plan.validation] == ["copy.png", "toy_05.png", "toy_06.png", "toy_07.png"]
    assert [e.caption for e in plan.validation] == ["a photo of sks toy"] * 4
    warnings = plan.warnings
    assert any("data.validation_dir: copy.png is also training images" in w for w in warnings), warnings
    plan = check_run(_cfg(model, tmp_path / "e", train_dir, f"data.validation_dir={held_out}"))
    assert plan.validation == []
    unused = "data.validation_dir: not used while train.validation_every=0"
    assert any(w.startswith(unused) for w in plan.warnings), plan.warnings


def _streams(run) -> list:
    """Every random stream a training step draws from."""
    return [torch.get_rng_state(), run.generator.get_state(), random.getstate(),
            np.random.get_state()[1].copy()]


@pytest.mark.parametrize("case", ["plain", "buckets", "text_encoder"])
def test_two_evaluations_agree_and_draw_from_no_training_stream(case, tiny_model, tmp_path, folders,
                                                                  bucketed_toy):
    train_dir, held_out = folders
    extra = {"plain": [], "buckets": ["data.aspect_buckets=true", f"data.validation_dir={bucketed_toy}"],
             "text_encoder": ["lora.train_text_encoder=true", "lora.dropout=0.1"]}[case]
    cfg = _cfg(tiny_model("sd15"), tmp_path / "run", train_dir, f"data.validation_dir={held_out}",
               "train.validation_every=1", *extra)
    run = setup(cfg, check_run(cfg), make_accelerator(cfg))
    validator = run.validator
    assert validator is not None
    assert validator.timesteps.tolist() == fixed_timesteps(1000) == list(range(62, 1000, 125))
    sizes = {tuple(image.latents.shape[2:]) for image in validator.images}
    assert len(sizes) > 1 if case == "buckets" else sizes == {(8, 8)}  # 64 px images, latents 8x smaller
    for module in run.modules.values():
        module.train()
    before = _streams(run)
    first = validator.loss(run.unwrapped())
    second = validator.loss(run.unwrapped())
    after = _streams(run)
    assert first == second and 0 < first < 10
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2] == after[2] and np.array_equal(before[3], after[3])
    assert all(m.training for m in run.modules.values())  # back in training mode (LoRA dropout on)
    # the weights change, so does the loss (it measures them)
    with torch.no_grad():
        for p in run.params:
            p.add_(0.05)
    assert validator.loss(run.unwrapped()) != first


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3"])
def test_a_run_with_validation_trains_the_same_lora_and_logs_it(family, tiny_model, tmp_path, folders):
    train_dir, held_out = folders
    common = ["train.max_steps=4", "train.log_every=3", "train.learning_rate=1e-2", "lora.dropout=0.1",
              "data.random_flip=true", "sample.every=0"]
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    train(_cfg(tiny_model(family), plain, train_dir, *common))
    train(_cfg(tiny_model(family), validated, train_dir, *common, f"data.validation_dir={held_out}",
               "train.validation_every=2"))
    a, b = load_file(plain / WEIGHT_NAME), load_file(validated / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]

    # a validation step is a log point too: steps 2 and 4 carry val_loss beside the loss, step 3 is plain
    logged = records(validated)
    assert [r["step"] for r in logged] == [2, 3, 4]
    assert ["val_loss" in r for r in logged] == [True, False, True]
    # both runs logged at step 3, so step 4's loss is that one step's in both: the same
    assert {r["step"]: r["loss"] for r in logged}[4] == {r["step"]: r["loss"] for r in records(plain)}[4]
    val = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}
    summary = json.loads((validated / "train_summary.json").read_text())
    best = min(val, key=val.get)
    assert summary["validation"]["val_loss"] == {"best_step": best, "best": val[best], "last_step": 4,
                                                 "last": val[4]}
    assert summary["validation_s"] > 0
    assert "validation" not in json.loads((plain / "train_summary.json").read_text())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_families_validate_at_their_schedules_timesteps(family, tiny_model, tmp_path, folders):
    # a flow schedule's timesteps are its table's entries (shifted: not integers); each is looked up exactly
    train_dir, held_out = folders
    cfg = _cfg(tiny_model(family), tmp_path / "run", train_dir, f"data.validation_dir={held_out}",
               "train.validation_every=1", "lora.dropout=0.1")
    run = setup(cfg, check_run(cfg), make_accelerator(cfg))
    validator = run.validator
    table = run.components.noise_scheduler.timesteps
    assert validator.timesteps.tolist() == [table[i].item() for i in fixed_timesteps(len(table))]
    sigmas = run.objective.sigmas(validator.timesteps).tolist()
    assert sigmas == sorted(sigmas, reverse=True) and 0 < min(sigmas) and max(sigmas) < 1
    for module in run.modules.values():
        module.train()
    first = validator.loss(run.unwrapped())
    assert first == validator.loss(run.unwrapped()) and 0 < first < 10
    assert all(m.training for m in run.modules.values())
    with torch.no_grad():
        for p in run.params:
            p.add_(0.05)
    assert validator.loss(run.unwrapped()) != first


def test_the_summary_reads_a_resumed_record(tmp_path):
    log = tmp_path / "losses.jsonl"
    rows = [{"step": 2, "loss": 1.0, "val_loss": 0.5}, {"step": 4, "loss": 1.0, "val_loss": 0.3},
            {"step": 6, "loss": 1.0, "val_loss": 0.2},  # a crashed run's steps 4-6, then a resume from 3:
            {"step": 4, "loss": 1.0, "val_loss": 0.4}, {"step": 5, "loss": 1.0},
            {"step": 6, "loss": 1.0, "val_loss": 0.45, "val_loss_ema": 0.41}, {"step": 8, "val_loss": 0.1}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert validation_summary(log, last_step=6) == {"validation": {
        "val_loss": {"best_step": 4, "best": 0.4, "last_step": 6, "last": 0.45},
        "val_loss_ema": {"best_step": 6, "best": 0.41, "last_step": 6, "last": 0.41}}}
    assert validation_summary(tmp_path / "missing.jsonl", 6) == {}


@pytest.mark.slow  # trains the micro model twice (a minute or two on a CPU)
def test_the_validation_loss_rises_when_a_run_overfits_in_the_micro_world(tmp_path):
    """Two photos of the micro world's subject, a high learning rate: the loss on the training photos keeps
    falling while the loss on four other photos of the subject falls, then rises (measured: 0.130, 0.120, then
    up to 0.143 at step 60; the training photos 0.139 -> 0.098). Since validation never changes the training,
    the second run (validating on the training photos themselves) trained the same weights."""
    from sdtune.micro import model as micro
    from sdtune.micro.world import write_subject_photos

    model = micro.write_model(tmp_path / "model")
    photos = write_subject_photos(tmp_path / "photos", n=2, seed=0)
    held_out = write_subject_photos(tmp_path / "held_out", n=4, seed=1)
    common = [f"model.pretrained={model}", f"data.instance_dir={photos}", "data.identifier=sks",
              "train.max_steps=60", "train.learning_rate=3e-3", "lora.rank=16", "train.batch_size=2",
              "train.validation_every=10", "train.checkpoint_every=0", "train.report_to=none",
              "train.log_every=50",
              "sample.steps=1", "sample.seeds=[0]",
              "lora.target_modules=[to_k, to_q, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, "
              "conv1, conv2]"]
    curves = {}
    for name, folder in (("held_out", held_out), ("training", photos)):
        out = tmp_path / f"run-{name}"
        train(load_config(None, [*common, f"data.validation_dir={folder}", f"train.output_dir={out}"]))
        records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
        curves[name] = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    held, seen = curves["held_out"], curves["training"]
    assert list(held) == list(seen) == list(range(10, 61, 10))
    best = min(held, key=held.get)
    assert held[10] > held[best] and best < 60 and held[60] > 1.05 * held[best], held  # falls, then rises
    assert seen[60] < 0.9 * seen[10], seen  # while the training photos keep getting easier
    gap = {s: held[s] - seen[s] for s in held}
    assert gap[60] - gap[10] > 0.02, gap
    summary = json.loads((tmp_path / "run-held_out" / "train_summary.json").read_text())
    assert summary["validation"]["val_loss"]["best_step"] == best
