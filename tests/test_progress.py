"""What a practitioner sees of a run's time: sample grids and checkpoints taken during training are said on
the terminal (with how long they took) and are left out of the step time in train_summary.json and of the
progress bar's rate and ETA."""

from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

from tqdm import tqdm

from conftest import overrides
from sdtune.config import load_config
from sdtune.guards import StepTimer
from sdtune.train import Run, _aside, train

PAUSE = 1.0  # seconds each sample grid and checkpoint is made to take: far longer than a tiny step


def test_samples_and_checkpoints_are_said_and_left_out_of_the_step_time(tiny_model, tmp_path, monkeypatch, capsys):
    import sdtune.train as tr

    real_render, real_save = tr.render_grid, Run.save
    busy: list[float] = []  # seconds in each step's forward-backward and update, in order

    def slow_render(*args, **kw):
        time.sleep(PAUSE)
        return real_render(*args, **kw)

    def slow_save(self):
        time.sleep(PAUSE)
        return real_save(self)

    def timed(fn):
        def wrapper(*args, **kw):
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                busy.append(time.perf_counter() - start)
        return wrapper

    monkeypatch.setattr(tr, "render_grid", slow_render)
    monkeypatch.setattr(Run, "save", slow_save)
    monkeypatch.setattr(tr, "forward_backward", timed(tr.forward_backward))
    monkeypatch.setattr(tr, "optimizer_update", timed(tr.optimizer_update))
    out = tmp_path / "run"
    # steps 3-4 are timed (from step 2 on); the grid and the checkpoint of step 2 come after its tick
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=4", "sample.every=2",
                                      "train.checkpoint_every=2")))

    summary = json.loads((out / "train_summary.json").read_text())
    timed_s = summary["s_per_step"] * summary["timed_steps"]
    assert summary["timed_steps"] == 2 and len(busy) == 8  # two calls a step
    assert summary["sample_s"] >= PAUSE and summary["checkpoint_s"] >= PAUSE  # the one grid and checkpoint of step 2
    # A step's time on a shared CPU varies by seconds, so compare with what steps 3-4 really took: beyond that,
    # the timed span holds only the loop's bookkeeping, not the two pauses (2 * PAUSE) it used to.
    assert timed_s - sum(busy[4:]) < PAUSE, (summary, busy)
    assert summary["wall_s"] >= timed_s + summary["sample_s"] + summary["checkpoint_s"], summary
    assert summary["img_per_s"] == summary["images_per_step"] / summary["s_per_step"]

    said = capsys.readouterr().out
    assert "step 2: rendering the sample grid (1 prompt x 1 seed, 2 steps each)" in said, said
    assert re.search(r"^step 2: samples/step-000002\.png \(\d+\.\d s\)$", said, re.M), said
    assert re.search(r"^step 2: checkpoint saved \(\d+\.\d s\)$", said, re.M), said
    assert said.index("step 2: rendering") < said.index("step 2: samples/")
    assert "step 4: rendering the sample grid" in said  # the final grid too


def test_a_pause_is_left_out_of_the_timer_the_progress_bar_and_steps_per_s():
    syncs = []
    timer = StepTimer(start_step=0, max_steps=4, sync=lambda: syncs.append(1))
    bar = tqdm(total=4, file=io.StringIO(), mininterval=0)
    losses = SimpleNamespace(clock=time.perf_counter())
    clock = losses.clock
    for step in (1, 2):
        timer.tick(step)
        bar.update(1)
    assert syncs == [1]  # the clock started at step 2
    with _aside(timer, "sample", bar, losses) as pause:
        time.sleep(0.3)
    assert syncs == [1, 1]  # steps queued on the device are step time, not pause time
    bar.update(1)
    timer.tick(3)
    assert pause.seconds >= 0.3 and timer.paused_s == {"sample": pause.seconds}
    assert bar.format_dict["elapsed"] < 0.3  # so the rate and the ETA are the steps' alone
    assert losses.clock == clock + pause.seconds
    steps, seconds = timer.result(3)
    assert steps == 1 and seconds < 0.3
    bar.close()


def test_a_pause_before_the_timed_steps_costs_no_device_wait():
    syncs = []
    timer = StepTimer(start_step=0, max_steps=100, sync=lambda: syncs.append(1))
    timer.tick(1)
    with timer.paused("checkpoint"):
        pass
    assert syncs == [] and set(timer.paused_s) == {"checkpoint"}
