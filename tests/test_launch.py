"""``sdtune launch``: accelerate's launcher in-process, a failed process ending in its own error line and one
line with its exit code instead of accelerate's traceback; and the quiet processes of a multi-process launch
letting the first one say a recipe's problems."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, overrides
from sdtune.cli import main

BAD_RECIPE = [str(ROOT / "recipes/tiny_cpu.yaml"), "train.max_step=3"]  # a typo: the recipe's problems, exit 2
LAUNCH = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("processes", [["--cpu", "--num_processes", "1"], ["--multi_gpu", "--num_processes", "2"]])
def test_a_failed_launch_says_the_error_and_its_exit_code_without_a_traceback(processes, tmp_path):
    """`accelerate launch -m sdtune train BAD` ended in accelerate's CalledProcessError traceback (one process)
    or torch's ChildFailedError report (several), exit code 1; `sdtune launch` ends in the process's own lines
    and one more, with the process's exit code. Under torch elastic the first process says the problems even
    when a quiet one fails first (elastic stops the rest at the first failure)."""
    cmd = [sys.executable, "-m", "sdtune", "launch", *processes, *LAUNCH, "--main_process_port", str(_free_port()),
           "train", *BAD_RECIPE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "FAILED" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: train.max_step: unknown key; did you mean 'train.max_steps'?") == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("error: launch: `sdtune train` exited with code 2 (its messages are above)" if "--cpu" in processes
                    else "error: launch: process 0 of 2 (the first to fail) exited with code 2 (its messages are above)")


def _launch_raising(monkeypatch, exc):
    def launch_command(args):
        assert args.module and args.training_script == "sdtune"
        assert args.training_script_args[:2] == ["train", "r.yaml"]
        raise exc

    monkeypatch.setattr("accelerate.commands.launch.launch_command", launch_command)


def test_launch_exit_codes_and_lines(monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    args = ["launch", "--num_processes", "2", "train", "r.yaml", "--dry-run"]
    _launch_raising(monkeypatch, subprocess.CalledProcessError(-signal.SIGKILL, ["python"]))
    assert main(args) == 128 + signal.SIGKILL
    assert capsys.readouterr().err == ("error: launch: `sdtune train` was ended by SIGKILL (the system may have run "
                                       "out of memory)\n")
    _launch_raising(monkeypatch, subprocess.CalledProcessError(130, ["python"]))  # Ctrl-C: the process said it
    assert main(args) == 130 and capsys.readouterr().err == ""

    failures = {0: ProcessFailure(0, 11, -signal.SIGTERM, "<N/A>"), 1: ProcessFailure(1, 12, 3, "<N/A>")}
    failures[0].timestamp, failures[1].timestamp = 20, 10  # process 1 failed first; elastic stopped process 0
    _launch_raising(monkeypatch, ChildFailedError("sdtune", failures))
    assert main(args) == 3
    assert capsys.readouterr().err == "error: launch: process 1 of 2 (the first to fail) exited with code 3 " \
                                      "(its messages are above)\n"
    _launch_raising(monkeypatch, SignalException("got SIGTERM", signal.SIGTERM))
    assert main(args) == 128 + signal.SIGTERM and capsys.readouterr().err == "stopped by SIGTERM\n"
    _launch_raising(monkeypatch, RuntimeError("a bug in the launcher"))
    assert main(args) == 1 and "RuntimeError: a bug in the launcher" in capsys.readouterr().err


def test_launch_usage_mistakes_are_one_line(capsys):
    assert main(["launch", "--num_processes", "2"]) == 2
    assert capsys.readouterr().err == ("error: launch: no sdtune command in `--num_processes 2`; fix: name it after "
                                       "accelerate's options, e.g. `sdtune launch --num_processes 2 train RECIPE`\n")
    assert main(["launch", "--num_procs", "2", "train", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: launch: unrecognized arguments: --num_procs; fix: see `accelerate launch --help` for "
                   "its options\n"), err
    assert main(["launch"]) == 2  # a mistake too, not a help page and exit 0
    assert capsys.readouterr().err.startswith("error: launch: no sdtune command; fix: name it after")
    assert main(["launch", "--help"]) == 0
    assert "usage: sdtune launch [ACCELERATE LAUNCH OPTIONS] {train,class-images} RECIPE" in capsys.readouterr().out


def test_ctrl_c_is_left_to_the_launched_process(monkeypatch, capsys):
    """Ctrl-C reaches the launched process from the terminal: it stops after its step and saves, and the
    launch waits for it, then exits with its code (the launch used to end at once, the process still saving)."""
    def launch_command(args):
        os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends this process (and the launched one)
        raise subprocess.CalledProcessError(130, ["python"])  # the launched process's exit, after its save

    monkeypatch.setattr("accelerate.commands.launch.launch_command", launch_command)
    before = signal.getsignal(signal.SIGINT)
    assert main(["launch", "train", "r.yaml"]) == 130
    assert capsys.readouterr().err == ""
    assert signal.getsignal(signal.SIGINT) is before


def test_quiet_processes_let_the_first_say_a_recipes_problems_under_elastic(monkeypatch, capsys):
    """Under torch elastic a process other than the first waits before it exits quietly on a recipe's problems:
    elastic stops every process at the first failure, and a quiet one failing first stopped the first before it
    said them (the launch then ended without a word of why). Outside elastic, no wait."""
    slept = []
    monkeypatch.setattr("sdtune.cli.time.sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = ["train", *BAD_RECIPE, "--dry-run"]
    assert main(args) == 2 and slept == [] and capsys.readouterr().err == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert main(args) == 2 and len(slept) == 1 and slept[0] >= 5 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 2 and len(slept) == 1
    assert "error: train.max_step: unknown key" in capsys.readouterr().err


def test_a_launch_that_succeeds_exits_0(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "sdtune", "launch", "--cpu", "--num_processes", "1", *LAUNCH, "train",
           str(ROOT / "recipes/tiny_cpu.yaml"), *overrides(tiny_model("sd15"), tmp_path / "run"), "--dry-run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok: " in proc.stdout and "error" not in proc.stderr, proc.stdout + proc.stderr


def test_a_stop_is_said_once_by_the_first_process(monkeypatch, capsys):
    """Ctrl-C reaches every process of a launch, and each stops at the same step with the same line: the first
    says it (it was printed once per process), all exit 130."""
    from sdtune.errors import Interrupted

    def stopped(args):
        raise Interrupted("stopped by SIGINT at step 190; checkpoint saved in out/checkpoints; continue with "
                          "train.resume=latest", 130)

    monkeypatch.setattr("sdtune.cli.train.cmd_train", stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "stopped by SIGINT at step 190; checkpoint saved in out/checkpoints; "
                                        "continue with train.resume=latest\n")):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "r.yaml"]) == 130
        assert capsys.readouterr().err == said


def test_under_accelerate_launch_a_note_points_past_its_traceback(monkeypatch, capsys):
    """`accelerate launch -m sdtune train BAD` still ends in accelerate's traceback (its launcher's, not
    sdtune's): the first process says so after its error lines, and names `sdtune launch`; a process that
    `sdtune launch` started, or a plain `sdtune train`, does not."""
    monkeypatch.delenv("SDTUNE_LAUNCH", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = ["train", *BAD_RECIPE, "--dry-run"]
    assert main(args) == 2 and "note:" not in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: train.max_step: unknown key")
    assert err[-1].startswith("note: the traceback below is accelerate launch's report of this exit (code 2)") and "`sdtune launch`" in err[-1]
    monkeypatch.setenv("SDTUNE_LAUNCH", "1")
    assert main(args) == 2 and "note:" not in capsys.readouterr().err
