"""The loss log and the checkpoints around a stop and a rewind.

A signal stops a run after a step: that step is the last line of ``losses.jsonl`` and its checkpoint, and a
resume continues the log at the next step. A resume from an earlier checkpoint than the run's newest (a rewind)
sets the later checkpoints, grids, final files and log lines aside, so the log reads in step order and
``train.resume=latest`` never picks the abandoned branch. A stop while the final files are written says how
to continue, as every other stop does. Signals are sent to this process in the middle of a step (or of the
final grid), so each test is deterministic and runs in-process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, overrides
from sdtune import train as training
from sdtune.checkpoint import rewind
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.errors import Interrupted
from sdtune.lora import WEIGHT_NAME
from sdtune.resume import find_checkpoint, verify
from sdtune.runs import complete_checkpoints
from sdtune.train import train


@pytest.fixture
def signals():
    """SIGINT and SIGTERM handlers as they were after the test (a stopped run leaves them ignored, as a process
    that is ending wants them). Meanwhile a SIGTERM that no sdtune handler catches fails the test instead of
    killing pytest."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached no sdtune handler: it would have killed the process, silently")

    signal.signal(signal.SIGTERM, unhandled)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _signal_during(monkeypatch, name, signum, call=1):
    """Send ``signum`` to this process from inside the ``call``-th call of ``sdtune.train.<name>``."""
    real, calls = getattr(training, name), []

    def sending(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, name, sending)
    return real


def _records(folder):
    return [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]


def _steps(folder):
    return [r["step"] for r in _records(folder)]


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum,log_every", [pytest.param(signal.SIGTERM, 1, id="SIGTERM-every-step-logged"),
                                             pytest.param(signal.SIGINT, 4, id="SIGINT-off-a-log-point")])
def test_a_stop_logs_its_step_and_the_resume_continues_the_log(signum, log_every, tiny_model, tmp_path,
                                                                monkeypatch, signals):
    model, straight, split = tiny_model("sd15"), tmp_path / "straight", tmp_path / "split"
    train(load_config(None, overrides(model, straight, "train.max_steps=6")))  # every step logged
    loss = {r["step"]: r["loss"] for r in _records(straight)}
    args = overrides(model, split, "train.max_steps=6", f"train.log_every={log_every}")

    real = _signal_during(monkeypatch, "forward_backward", signum, call=3)  # during step 3
    with pytest.raises(Interrupted) as stopped:
        train(load_config(None, args))
    name = signal.Signals(signum).name
    assert stopped.value.exit_code == 128 + signum
    assert f"stopped by {name} at step 3;" in str(stopped.value)
    assert "continue with train.resume=latest" in str(stopped.value)
    # the step it stopped at is the log's last line and the checkpoint's step; off a log point (log_every=4)
    # that line holds the mean loss of steps 1-3
    assert _steps(split) == ([1, 2, 3] if log_every == 1 else [3])
    expected = loss[3] if log_every == 1 else (loss[1] + loss[2] + loss[3]) / 3
    assert _records(split)[-1]["loss"] == pytest.approx(expected, rel=1e-6)
    assert [p.name for p in complete_checkpoints(split)] == ["step-000003"]

    monkeypatch.setattr(training, "forward_backward", real)
    train(load_config(None, [*args, "train.resume=latest"]))
    if log_every == 1:  # no gap, no repeat, and the losses of the run that never stopped (a bitwise resume)
        assert _steps(split) == [1, 2, 3, 4, 5, 6]
        assert [r["loss"] for r in _records(split)] == [loss[k] for k in range(1, 7)]
    else:  # step 4 (a log point), then the last step: the mean of 5 and 6
        assert _steps(split) == [3, 4, 6]
        assert [r["loss"] for r in _records(split)[1:]] == pytest.approx([loss[4], (loss[5] + loss[6]) / 2], rel=1e-6)


def test_a_rewind_sets_the_later_steps_aside_and_the_run_files_agree(tiny_model, tmp_path, capsys):
    model, out = tiny_model("sd15"), tmp_path / "run"
    common = ("train.checkpoint_every=2", "sample.every=4")
    train(load_config(None, overrides(model, out, "train.max_steps=8", *common)))
    first, first_final = _records(out), load_file(out / WEIGHT_NAME)
    capsys.readouterr()

    start = out / "checkpoints/step-000004"
    train(load_config(None, overrides(model, out, "train.max_steps=6", f"train.resume={start}", *common)))
    said = capsys.readouterr().out

    # the log: steps 1-6, each once and in order; 5 and 6 trained again as they were (a bitwise resume)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in first[:6]]
    # the run's checkpoints end at its last step (step-000002 went when the first run saved its fourth: the
    # default train.checkpoints_total_limit is 3); the abandoned branch's are aside, whole, with its log tail,
    # its grid past step 4 and its final LoRA
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004", "step-000006"]
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-000006", "step-000008"]
    assert verify(aside / "step-000008") is None
    assert _steps(aside) == [5, 6, 7, 8]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000004.png", "step-000006.png"]
    assert [p.name for p in (aside / "samples").iterdir()] == ["step-000008.png"]
    assert _same_tensors(load_file(aside / WEIGHT_NAME), first_final)
    # the files agree: latest is the run's last step, whose LoRA is the run's final one
    assert find_checkpoint(out, "latest") == out / "checkpoints/step-000006"
    assert _same_tensors(load_file(out / WEIGHT_NAME), load_file(out / "checkpoints/step-000006" / WEIGHT_NAME))
    assert not _same_tensors(load_file(out / WEIGHT_NAME), first_final)
    assert "rewinding to step 4" in said and "step-000006, step-000008" in said and str(aside) in said


def test_steps_logged_after_the_last_checkpoint_are_not_logged_twice(tiny_model, tmp_path, monkeypatch, capsys):
    """A run killed after logging steps it did not save (here: a crash after the loop) trains them again on
    resume: their first lines go, said in one line, and nothing is set aside (nothing was lost)."""
    model, out = tiny_model("sd15"), tmp_path / "run"
    args = overrides(model, out, "train.max_steps=3", "train.checkpoint_every=2")

    def crash(run):
        raise RuntimeError("killed")

    real = training.finish
    monkeypatch.setattr(training, "finish", crash)
    with pytest.raises(RuntimeError):
        train(load_config(None, args))
    before = _records(out)
    assert _steps(out) == [1, 2, 3] and [p.name for p in complete_checkpoints(out)] == ["step-000002"]
    monkeypatch.setattr(training, "finish", real)
    capsys.readouterr()
    train(load_config(None, [*args, "train.resume=latest"]))
    assert _steps(out) == [1, 2, 3]
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in before]
    assert "losses.jsonl: removed 1 line past step 2" in capsys.readouterr().out
    assert not list((out / "checkpoints").glob("abandoned-*"))


def test_rewind_repairs_a_log_that_a_rewind_appended_out_of_order(tmp_path, monkeypatch):
    """What the bug wrote (steps 1-20, then a rewind's 9-16 appended, then a line a kill cut short) is cut back
    to 1-16 in order, each step's later line kept; the rest is set aside with the later checkpoint, never
    deleted. A second call finds nothing to do. The run folder is named relative (train.output_dir=runs/x),
    its final files absolute (as sdtune.export.run_files names them)."""
    monkeypatch.chdir(tmp_path)
    out = Path("run")
    for step in (8, 16, 20):
        (out / f"checkpoints/step-{step:06d}").mkdir(parents=True)
        (out / f"checkpoints/step-{step:06d}/COMPLETE").write_text("ok\n")
    old = [{"step": s, "loss": 1.0} for s in range(1, 21)]
    rewound = [{"step": s, "loss": 2.0} for s in range(9, 17)]
    (out / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + rewound) + '{"step": 17, "lo')
    (out / WEIGHT_NAME).write_bytes(b"the final LoRA of step 20")
    said = rewind(out, 16, [tmp_path / "run" / WEIGHT_NAME, out / "train_summary.json"])
    assert [(r["step"], r["loss"]) for r in _records(out)] == [(s, 1.0) for s in range(1, 9)] + \
        [(s, 2.0) for s in range(9, 17)]
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    assert [p.name for p in complete_checkpoints(out)] == ["step-000008", "step-000016"]
    assert [p.name for p in aside.glob("step-*")] == ["step-000020"]
    assert (aside / WEIGHT_NAME).read_bytes() == b"the final LoRA of step 20" and not (out / WEIGHT_NAME).exists()
    tail = (aside / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in tail[:-1]] == list(range(9, 21)) and tail[-1] == '{"step": 17, "lo'
    assert len(said) == 1 and "step-000020" in said[0] and str(aside) in said[0]
    assert rewind(out, 16, [out / WEIGHT_NAME]) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_final_grid_renders_says_how_to_continue(signum, tiny_model, tmp_path, monkeypatch,
                                                                  capsys, signals):
    out = tmp_path / "run"
    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"),
            *overrides(tiny_model("sd15"), out, "prior.enabled=false", "train.max_steps=2")]
    real = _signal_during(monkeypatch, "_render_grid", signum)
    assert main(args) == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} at step 2;" in err
    assert "continue with train.resume=latest" in err and "Traceback" not in err
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002"] and not list(out.glob("samples/*.png"))

    monkeypatch.setattr(training, "_render_grid", real)
    assert main([*args, "train.resume=latest"]) == 0
    assert (out / "samples/step-000002.png").is_file() and (out / "README.md").is_file()
    assert _steps(out) == [1, 2]  # nothing trained, nothing logged again


@pytest.mark.slow  # two launches of two processes (about 30 s)
def test_two_processes_stop_at_a_log_point_that_the_log_holds(tiny_model, tmp_path):
    """SIGTERM to a two-process launch (its whole process group, as a terminal's Ctrl-C or a scheduler sends):
    both processes stop at the same log point, whose line is the log's last and whose checkpoint is saved; the
    resume continues the log at the next log point."""
    out = tmp_path / "ddp"

    def launch(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(port), "-m", "sdtune", "train", str(ROOT / "recipes/tiny_cpu.yaml"),
                *overrides(tiny_model("sd15"), out, "prior.enabled=false", "train.log_every=3", *extra)]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(launch("train.max_steps=100000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    log, started = out / "losses.jsonl", time.time()
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - started < 300, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stopped = _steps(out)[-1]
    assert err.count("stopped by SIGTERM at step") == 1, err[-3000:]  # said by the first process, not by each
    assert stopped % 3 == 0 and _steps(out) == list(range(3, stopped + 1, 3))
    assert [p.name for p in complete_checkpoints(out)][-1] == f"step-{stopped:06d}"

    done = subprocess.run(launch(f"train.max_steps={stopped + 4}", "train.resume=latest"), capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(out) == [*range(3, stopped + 4, 3), stopped + 4]
