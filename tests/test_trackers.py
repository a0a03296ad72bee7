"""The run's tracker (``sdtune.trackers``): W&B without an API key is refused before anything loads, a W&B
that fails to start is one error line, a resume continues the same W&B run, and TensorBoard shows each step
once after a rewind (read back with TensorBoard's own event reader)."""

import json
import re
import time

import pytest
import wandb
from accelerate.tracking import WandBTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, overrides
from sdtune import trackers
from sdtune.cli import main
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.plan import check_run
from sdtune.train import train

KEY = "0123456789abcdef0123456789abcdef01234567"  # the form of a W&B API key (40 characters); never sent


@pytest.fixture
def wandb_online(monkeypatch, tmp_path):
    """W&B in online mode with no credentials anywhere: no WANDB_API_KEY, no .netrc, no settings file. wandb
    reads its settings once per process, so they are read again now, and after the test (the suite's
    WANDB_MODE=offline)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no-wandb-config"))
    wandb.teardown()
    yield monkeypatch
    wandb.teardown()


def _records(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_wandb_without_a_key_is_refused_before_anything_loads(wandb_online, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"),
            *overrides(tiny_model("sd15"), out, "prior.enabled=false", "train.report_to=wandb")]
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "train.report_to" in x)
    assert "wandb has no API key configured" in line
    for fix in ("`wandb login`", "WANDB_API_KEY", "WANDB_MODE=offline"):
        assert fix in line
    assert main(args) == 2  # a run says the same, before it loads or writes anything
    assert "wandb has no API key configured" in capsys.readouterr().err
    assert not out.exists()

    cfg = load_config(None, overrides(tiny_model("sd15"), out, "prior.enabled=false",
                                      "train.report_to=wandb"))
    wandb_online.setenv("WANDB_API_KEY", "not-a-key")  # wandb's own check of the key's form, in its words
    wandb.teardown()
    with pytest.raises(ConfigError, match=r"train.report_to: wandb: WANDB_API_KEY invalid: .*40\+ char"):
        check_run(cfg)
    for env, value in (("WANDB_API_KEY", KEY), ("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled")):
        wandb_online.delenv("WANDB_API_KEY", raising=False)
        wandb_online.setenv("WANDB_MODE", "online")
        wandb_online.setenv(env, value)
        wandb.teardown()
        assert trackers.problems("wandb") == [], f"{env}={value}"
        check_run(cfg)  # no problem: a key (never sent anywhere here), or a mode that needs none


def test_a_wandb_that_fails_to_start_is_one_error_line(tiny_model, tmp_path, monkeypatch, capsys):
    def refuse(self):
        raise wandb.errors.CommError("Failed to get resume status for run abc: context deadline exceeded")

    monkeypatch.setattr(WandBTracker, "start", refuse)
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_model("sd15"), out, "train.report_to=wandb", "train.max_steps=1"))
    said = r"^train.report_to: wandb could not start its run: Failed to get resume status .* exceeded"
    with pytest.raises(SdtuneError, match=said + r"; fix: .*WANDB_MODE=offline"):
        train(cfg)
    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"),
            *overrides(tiny_model("sd15"), tmp_path / "run2", "prior.enabled=false", "train.report_to=wandb",
                       "train.max_steps=1")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "wandb could not start its run" in err and "bug in sdtune" not in err and "Traceback" not in err


def test_a_resume_continues_the_same_wandb_run(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    model, out = tiny_model("sd15"), tmp_path / "wbrun"
    common = ("train.report_to=wandb", "train.checkpoint_every=1")
    train(load_config(None, overrides(model, out, "train.max_steps=2", *common)))
    run_id = (out / trackers.WANDB_RUN_ID).read_text().strip()
    assert len(run_id) >= 8
    train(load_config(None, overrides(model, out, "train.max_steps=3", "train.resume=latest", *common)))
    # each start writes an offline run folder named after the run's id: both are the same W&B run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(_of_run(p.name, run_id) for p in runs), runs
    assert (out / trackers.WANDB_RUN_ID).read_text().strip() == run_id
    kwargs, notes = trackers.init_kwargs("wandb", out, 3, resumed=True)
    assert kwargs == {"wandb": {"dir": str(out), "id": run_id, "resume": "allow", "name": "wbrun"}}
    assert not notes

    capsys.readouterr()  # a rewind: W&B keeps the steps it has, and the log says so
    train(load_config(None, overrides(model, out, "train.max_steps=3",
                                      f"train.resume={out / 'checkpoints/step-000001'}", *common)))
    said = capsys.readouterr().out
    assert f"W&B run {run_id} keeps steps 2-3, which an earlier run logged past step 1" in said
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(_of_run(p.name, run_id) for p in runs), runs


def _of_run(folder: str, run_id: str) -> bool:
    """Whether a W&B offline folder belongs to run ``run_id``: offline-run-DATE_TIME-ID, and wandb adds -N when
    two starts of the run fall in the same second."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?", folder) is not None


def _tensorboard(out):
    """(loss events, sample grid steps) as TensorBoard shows them: its own reader, purging included."""
    events = EventAccumulator(str(out / "logs/sdtune"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events.Scalars("loss"), [e.step for e in events.Images("samples")]


def test_tensorboard_shows_each_step_once_after_a_rewind(tiny_model, tmp_path):
    model, out = tiny_model("sd15"), tmp_path / "run"
    common = ("train.report_to=tensorboard", "train.checkpoint_every=1", "sample.every=1")
    train(load_config(None, overrides(model, out, "train.max_steps=2", *common)))
    train(load_config(None, overrides(model, out, "train.max_steps=3", "train.resume=latest", *common)))
    started = time.time()  # a rewind to step 2: step 3 is trained, logged and sampled again
    train(load_config(None, overrides(model, out, "train.max_steps=3",
                                      f"train.resume={out / 'checkpoints/step-000002'}", *common)))
    assert list((out / "checkpoints").glob("abandoned-*/step-000003"))
    loss, grids = _tensorboard(out)
    assert [e.step for e in loss] == [1, 2, 3]  # before: 1, 2, 3, 3 (the abandoned step 3 too)
    assert grids == [1, 2, 3]
    assert loss[-1].wall_time >= started  # the step 3 shown is this run's
    kept = {r["step"]: r["loss"] for r in _records(out)}
    assert [e.value for e in loss] == pytest.approx([kept[1], kept[2], kept[3]], rel=1e-6)


@pytest.mark.slow  # two short trainings with prior preservation
def test_prior_loss_is_the_same_windows_mean_as_the_loss(tiny_model, tmp_path):
    """losses.jsonl's loss is the mean over the steps since the last log point; its prior_loss was the last
    micro-batch's alone, so `loss - prior_loss` meant nothing once log_every > 1."""
    prior = ("prior.enabled=true", "prior.class_prompt=a photo of a toy", "prior.num_class_images=2",
             "prior.generation_steps=1", "train.max_steps=4", f"prior.class_dir={tmp_path / 'class'}")
    rows = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        train(load_config(None, overrides(tiny_model("sd15"), out, *prior, f"train.log_every={every}")))
        rows[every] = {r["step"]: r for r in map(json.loads, (out / "losses.jsonl").read_text().splitlines())}
    for step in (2, 4):
        for key in ("loss", "prior_loss"):
            mean = (rows[1][step - 1][key] + rows[1][step][key]) / 2
            assert rows[2][step][key] == pytest.approx(mean, rel=1e-5), (step, key)
