"""The guards of the training loop, without a model: non-finite steps, a LoRA that does not move, stop
signals, step timing."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.guards import NonFiniteGuard, StalledLoraGuard, StepTimer, StopSignals


def _flag(ok: bool) -> torch.Tensor:
    return torch.tensor(ok)


def _adamw(**kw):
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], **kw)


def test_non_finite_steps_are_read_per_step_when_the_optimizer_cannot_skip_itself():
    warned = []
    guard = NonFiniteGuard(_adamw(foreach=True), None, max_in_a_row=2, warn=warned.append)
    assert not guard.on_device

    def step(n: int, ok: bool, files: list[str]) -> None:
        assert guard.allow(_flag(ok)) is ok  # the host looks, once: record() reuses what allow() read
        guard.record(n, _flag(ok), files)

    step(1, True, ["a.png"])
    step(2, False, ["b.png", "c.png"])
    assert warned == ["step 2: loss or gradients not finite, update skipped (batch: b.png, c.png)"]
    step(3, True, ["d.png"])  # a finite step resets the count
    step(4, False, ["e.png"])
    with pytest.raises(SdtuneError, match=r"not finite for 2 steps in a row \(last batch: f.png\)"):
        step(5, False, ["f.png"])
    assert guard.total == 3


def test_fused_adamw_skips_on_the_device_and_the_flags_are_read_later():
    optimizer = _adamw(fused=True)
    warned = []
    guard = NonFiniteGuard(optimizer, None, max_in_a_row=5, warn=warned.append)
    assert guard.on_device
    assert guard.allow(_flag(False)) is True and float(optimizer.found_inf) == 1.0  # the kernel skips it
    assert guard.allow(_flag(True)) is True and float(optimizer.found_inf) == 0.0
    guard.record(7, _flag(False), ["x.png"])
    assert warned == []  # nothing read yet: no host sync per step
    guard.check()
    assert warned == ["step 7: loss or gradients not finite, update skipped (batch: x.png)"]
    guard.check()  # each step is reported once
    assert len(warned) == 1


def test_fp16_grad_scaler_skips_by_itself():
    guard = NonFiniteGuard(_adamw(foreach=True), scaler=object(), max_in_a_row=5, warn=print)
    assert guard.on_device and guard.allow(_flag(False)) is True


def test_a_lora_that_does_not_move_is_stopped_at_its_check_step():
    p = torch.nn.Parameter(torch.zeros(4))
    guard = StalledLoraGuard([p], start_step=10, max_steps=100, after=5)
    assert guard.at_step == 15
    guard.check(14, [p], lr=1e-4, skipped=0)  # not the check step: nothing happens
    with pytest.raises(SdtuneError, match=r"did not change in 5 steps \(learning rate 1e-30, 2 skipped"):
        guard.check(15, [p], lr=1e-30, skipped=2)


def test_a_lora_that_moves_passes_and_a_short_run_is_checked_at_its_end():
    p = torch.nn.Parameter(torch.zeros(4))
    guard = StalledLoraGuard([p], start_step=0, max_steps=3)
    assert guard.at_step == 3
    with torch.no_grad():
        p += 1e-3
    guard.check(3, [p], lr=1e-4, skipped=0)
    guard.check(3, [p], lr=1e-4, skipped=0)  # checked once; its copy of the weights is freed


def test_first_signal_asks_to_stop_and_the_second_is_ignored():
    said = []
    with StopSignals(said.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C during the save: ignored, not a KeyboardInterrupt
        assert stop.signum == signal.SIGTERM
    assert said[0].startswith("SIGTERM: finishing this step") and "ignored" in said[1]
    # once asked to stop, the process keeps ignoring signals until it exits
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_handlers_are_restored_when_no_signal_came():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(print) as stop:
        assert signal.getsignal(signal.SIGINT) != before
    assert stop.signum is None and signal.getsignal(signal.SIGINT) == before


def test_step_timer_times_the_steady_steps_only():
    syncs = []
    timer = StepTimer(start_step=0, max_steps=100, sync=lambda: syncs.append(1))
    assert timer.from_step == 10
    for step in range(1, 31):
        timer.tick(step)
    steps, seconds = timer.result(30)
    assert steps == 20 and seconds >= 0 and len(syncs) == 2  # the whole run costs two device syncs
    short = StepTimer(start_step=4, max_steps=6)
    assert short.from_step == 5
    assert short.result(4)[0] == 0 and short.result(4)[1] != short.result(4)[1]  # NaN: nothing timed
