import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, overrides
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.train import train


def test_python_m_sdtune_help():
    proc = subprocess.run([sys.executable, "-m", "sdtune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train", "sample", "random-model", "doctor"):
        assert command in proc.stdout


def test_sample_grid_from_a_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2",
                                      "data.instance_prompt=a photo of sks toy")))
    capsys.readouterr()
    grid_path = tmp_path / "grid.png"
    code = main(["sample", str(out), "--seeds", "0,1", "--lora-scale", "0,1", "--steps", "2",
                 "--prompt", "a photo of sks toy", "--prompt", "sks toy in the snow", "--out", str(grid_path)])
    assert code == 0
    assert f"grid: {grid_path}" in capsys.readouterr().out
    with Image.open(grid_path) as grid:
        # 2 prompts x 2 scales rows, 2 seed columns, plus labels
        assert grid.width > 2 * 64 and grid.height > 4 * 64


def test_sample_errors(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "no such run folder, checkpoint folder or LoRA file" in capsys.readouterr().err
    assert main(["sample", str(tmp_path)]) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_dry_run_reports_and_writes_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), f"model.pretrained={tiny_model('sd15')}",
                 f"train.output_dir={out}", f"prior.class_dir={tmp_path / 'cls'}", "--dry-run"])
    assert code == 0
    assert "8 instance images at 64 px" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "cls").exists()


def test_a_typo_and_the_runs_own_problems_are_said_at_once(tmp_path, capsys):
    """A mistyped key was reported alone: the missing model and folder came on the next try. The run's checks
    now run on the recipe without its unknown keys, and every problem is said at once."""
    code = main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), "train.learnign_rate=1e-4",
                 f"model.pretrained={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'run'}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: train.learnign_rate: unknown key; did you mean 'train.learning_rate'?" in err
    assert f"error: model.pretrained: {tmp_path / 'nope'}" in err or "error: model.pretrained: '" in err, err
    assert not (tmp_path / "run").exists()
    # a problem other than an unknown key: the recipe's own lines only (no config to check the run with)
    assert main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), "train.max_steps=-1", "train.learnign_rate=1",
                 f"model.pretrained={tmp_path / 'nope'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "model.pretrained" not in err


def test_a_recipes_problems_are_printed_by_the_first_process_only(tmp_path, capsys, monkeypatch):
    """Under `accelerate launch`, every process checks the same recipe: the first prints its problems, the others
    exit with the same code without printing them again. Other errors are printed by whichever process has them."""
    from sdtune.errors import SdtuneError

    args = ["train", str(ROOT / "recipes/tiny_cpu.yaml"), "train.max_step=3", "--dry-run"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert ("error: train.max_step: unknown key; did you mean 'train.max_steps'?" in err) == printed, err
    monkeypatch.setattr("sdtune.cli.train.cmd_train", lambda a: (_ for _ in ()).throw(SdtuneError("disk full")))
    code = main(["train", "x.yaml"])
    assert code == 2 and "error: disk full" in capsys.readouterr().err


def test_information_is_printed_by_the_first_process_only(capsys, monkeypatch):
    """Library modules log as every process of a launch runs them ("validation: 6 held-out images ..." came twice
    under DDP): the console prints information from the first process, warnings from every one."""
    import logging

    log = logging.getLogger("sdtune.validation")
    monkeypatch.setenv("RANK", "1")
    log.info("validation: 6 held-out images")
    log.warning("disk nearly full here")
    assert capsys.readouterr().out == "warning: disk nearly full here\n"
    monkeypatch.setenv("RANK", "0")
    log.info("validation: 6 held-out images")
    assert capsys.readouterr().out == "validation: 6 held-out images\n"


def test_ctrl_c_or_sigterm_during_setup_says_what_is_kept_and_writes_no_run_folder(tiny_model, tmp_path, capsys,
                                                                                   monkeypatch):
    """Ctrl-C before the first step (loading, class images, caching) said only "interrupted": now it says that
    there is nothing to resume and what is kept. SIGTERM takes the same path with its own exit code (Python's
    default ended the process without a word), and the CLI puts the default SIGTERM handling back after."""
    import os
    import signal

    def stop_in_setup(signum: int | None):
        def cache(*a, **kw):
            if signum is None:
                raise KeyboardInterrupt  # as Ctrl-C does
            os.kill(os.getpid(), signum)
        return cache

    out = tmp_path / "run"
    for signum, code in ((None, 130), (signal.SIGTERM, 143)):
        monkeypatch.setattr("sdtune.train._latent_cache", stop_in_setup(signum))
        assert main(["train", str(ROOT / "recipes/tiny_cpu.yaml"),
                     *overrides(tiny_model("sd15"), out)]) == code
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("interrupted before the first step: nothing to resume"), err
        assert "the same command again reuses them" in err[-1]
        assert not out.exists()  # the lock taken at the start leaves no folder behind
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_overrides_may_follow_a_flag(tiny_model, tmp_path, capsys):
    """kohya and OneTrainer users put flags anywhere: `sdtune train R --dry-run key=value` takes the override
    (argparse alone refused it as an unrecognized argument); anything else left over is still refused."""
    out = tmp_path / "never"
    code = main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), f"model.pretrained={tiny_model('sd15')}",
                 "--dry-run", f"train.output_dir={out}", "train.max_steps=7", "--print-config"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"output_dir: {out}" in printed and "max_steps: 7" in printed
    assert main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), "--dry-run", "--bogus", "a.b=1"]) == 2
    assert "unrecognized arguments: --bogus a.b=1" in capsys.readouterr().err
    assert main(["check-token", "sks", "a.b=1"]) == 2  # a command without overrides
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err


@pytest.mark.slow  # subprocess runs
def test_train_bench_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/train_bench.py"), "--size", "tiny", "--steps", "2",
                           "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["family"] == "sd15" and result["s_per_step"] > 0 and result["device"] == "cpu"


@pytest.mark.slow  # subprocess runs
def test_sample_bench_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/sample_bench.py"), "--size", "tiny", "--steps", "2",
                           "--seeds", "2", "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 2 and result["s_per_grid_with_load"] > 0


@pytest.mark.slow  # subprocess runs
def test_step_overhead_bench_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/step_overhead.py"), "--steps", "3"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ratio"] > 0 and result["sdtune_ops_per_step"] > result["bare_ops_per_step"] > 0
