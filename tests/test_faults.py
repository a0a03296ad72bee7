"""Fault injection: kills, signals, full disks, corrupted files, NaNs, config drift, leaked secrets.

Each test asserts the promise (a resumable checkpoint survives, nothing corrupt or non-finite is loaded or
written, the user gets one clear line), not just "no crash".
"""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, overrides
from sdtune import checkpoint as ckpt
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.lora import WEIGHT_NAME
from sdtune.train import train


def _cmd(model, out, *extra):
    return [sys.executable, "-m", "sdtune", "train", str(ROOT / "recipes/tiny_cpu.yaml"),
            *overrides(model, out, "prior.enabled=false", "train.checkpoint_every=1",
                       "train.checkpoints_total_limit=2", *extra)]


def _start(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _wait_for_checkpoint(out, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list((out / "checkpoints").glob("step-*/COMPLETE")) if (out / "checkpoints").is_dir() else []:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _complete_checkpoints_verify(out):
    done = sorted((out / "checkpoints").glob("step-*"))
    assert done, "a checkpoint must survive"
    for d in done:
        assert (d / "COMPLETE").is_file(), f"{d} has no marker but is not a temporary folder"
        assert ckpt.verify(d) is None, ckpt.verify(d)


@pytest.mark.slow  # subprocess runs
def test_kill_9_at_random_moments_leaves_a_resumable_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1234)
    for trial in range(4):
        extra = ["train.max_steps=100000"] + (["train.resume=latest"] if trial else [])
        proc = _start(_cmd(tiny_model("sd15"), out, *extra), tmp_path)
        _wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in a step or in a save (saves every step)
        proc.kill()
        proc.wait()
        _complete_checkpoints_verify(out)
    # the next start cleans leftovers and continues from the newest checkpoint
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = json.loads((newest / "state.json").read_text())["global_step"]
    train(load_config(ROOT / "recipes/tiny_cpu.yaml", overrides(
        tiny_model("sd15"), out, "prior.enabled=false", "train.resume=latest", f"train.max_steps={step + 2}",
        "train.checkpoint_every=1", "train.checkpoints_total_limit=2")))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert json.loads((out / f"checkpoints/step-{step + 2:06d}/state.json").read_text())["global_step"] == step + 2


@pytest.mark.slow  # subprocess runs
@pytest.mark.parametrize("signals,code", [([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)])
def test_sigterm_and_double_ctrl_c_save_a_checkpoint_and_exit(signals, code, tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = _start(_cmd(tiny_model("sd15"), out, "train.max_steps=100000"), tmp_path)
    _wait_for_checkpoint(out, proc)
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "checkpoint saved" in err and "Traceback" not in err
    _complete_checkpoints_verify(out)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert f"step {json.loads((newest / 'state.json').read_text())['global_step']};" in err


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = overrides(tiny_model("sd15"), out, "train.max_steps=3", "train.checkpoint_every=1")
    real = ckpt.write_manifest
    calls = {"n": 0}

    def crash_on_second(folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands in for a kill between writing the files and the rename
        real(folder)

    monkeypatch.setattr(ckpt, "write_manifest", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step-000002", "step-000001"]
    monkeypatch.setattr(ckpt, "write_manifest", real)
    train(load_config(None, [*args, "train.resume=latest"]))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002", "step-000003"]  # leftover removed, resumed from step 1


def test_disk_full_during_a_save(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ckpt.write_bytes
    calls = {"n": 0}

    def full_disk(path, data):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", full_disk)
    with pytest.raises(ckpt.DiskFull, match="disk full while saving checkpoint step 2 .* a checkpoint needs about"):
        train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=3", "train.checkpoint_every=1")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # temporary files removed
    assert ckpt.verify(out / "checkpoints/step-000001") is None


def test_a_flipped_byte_in_any_checkpoint_file_is_named_and_never_loaded(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_model("sd15"), out, "train.max_steps=2", "train.checkpoint_every=1")
    train(load_config(None, args))
    newest = out / "checkpoints/step-000002"
    names = [*json.loads((newest / ckpt.MANIFEST).read_text()), ckpt.MANIFEST]
    assert len(names) >= 7
    for name in names:
        path = newest / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(SdtuneError, match=r"step-000002 is corrupt .*it was not loaded"):
            train(load_config(None, [*args, "train.resume=latest", "train.max_steps=4"]))
        path.write_bytes(original)
    assert not (out / "checkpoints/step-000003").exists()  # never silently restarted or continued


def test_nan_losses_are_skipped_then_stop_the_run(tiny_model, tmp_path, monkeypatch, capsys):
    import sdtune.train as tr

    real = tr.training_step
    bad_steps = {2}

    def sometimes_nan(*a, **kw):
        out = real(*a, **kw)
        sometimes_nan.calls += 1
        if sometimes_nan.calls in bad_steps or "all" in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    sometimes_nan.calls = 0
    monkeypatch.setattr(tr, "training_step", sometimes_nan)
    out = tmp_path / "one"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=4")))
    assert "step 2: loss or gradients not finite, update skipped (batch: toy_0" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in load_file(out / WEIGHT_NAME).values())

    bad_steps.add("all")
    with pytest.raises(SdtuneError, match=r"not finite for 3 steps in a row \(last batch: toy_0"):
        train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "all", "train.max_steps=20",
                                          "train.max_nonfinite_steps=3", "train.checkpoint_every=1")))
    for f in (tmp_path / "all").rglob("*.safetensors"):  # nothing non-finite was ever written
        assert all(torch.isfinite(v).all() for v in load_file(f).values()), f


def test_nan_steps_are_skipped_on_the_device_and_reported_at_the_next_log(tiny_model, tmp_path, monkeypatch,
                                                                          capsys):
    """Fused AdamW skips a non-finite step by itself (found_inf), so the loop reads the flags only every
    log_every steps; the step and its batch are still named, and the logged loss averages finite steps."""
    import sdtune.train as tr

    real = tr.training_step

    def nan_at_three(*a, **kw):
        out = real(*a, **kw)
        nan_at_three.calls += 1
        if nan_at_three.calls == 3:
            out.loss = out.loss * float("nan")
        return out

    nan_at_three.calls = 0
    monkeypatch.setattr(tr, "training_step", nan_at_three)
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=12", "train.log_every=10")))
    printed = capsys.readouterr().out
    assert "step 3: loss or gradients not finite, update skipped (batch: toy_0" in printed
    assert all(torch.isfinite(v).all() for v in load_file(out / WEIGHT_NAME).values())
    logged = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 12] and all(math.isfinite(r["loss"]) for r in logged)


def test_a_lora_that_does_not_learn_is_reported_early(tiny_model, tmp_path):
    with pytest.raises(SdtuneError, match="did not change in 5 steps"):
        train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", "train.learning_rate=1e-30",
                                          "train.max_steps=1000")))


def test_sampling_does_not_change_the_training_stream(tiny_model, tmp_path):
    common = ["train.max_steps=4", "lora.dropout=0.2", "data.random_flip=true"]
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "a", *common, "sample.every=1")))
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "b", *common, "sample.every=0")))
    a, b = load_file(tmp_path / "a" / WEIGHT_NAME), load_file(tmp_path / "b" / WEIGHT_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model("sd15"), model)
    for f in list(model.rglob("*.safetensors")):
        # the names diffusers (diffusion_pytorch_model.bin) and transformers (pytorch_model.bin) look for
        pickled = "pytorch_model.bin" if f.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(f), f.with_name(pickled))
        f.unlink()
    with pytest.raises(SdtuneError, match="has only pickle weights"):
        train(load_config(None, overrides(model, tmp_path / "run", "train.max_steps=1")))
    train(load_config(None, overrides(model, tmp_path / "run2", "train.max_steps=1", "model.allow_unsafe_pickle=true")))
    assert (tmp_path / "run2" / WEIGHT_NAME).is_file()


def test_secrets_never_reach_any_artifact(tiny_model, tmp_path, monkeypatch):
    secrets = {"HF_TOKEN": "hf_SECRETtoken1234567890", "WANDB_API_KEY": "wandbSECRETkey0987654321"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2", "train.report_to=wandb",
                                      "train.checkpoint_every=1", "sample.every=1")))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 15
    for p in files:
        data = p.read_bytes()
        for v in secrets.values():
            assert v.encode() not in data, f"{v} leaked into {p}"
