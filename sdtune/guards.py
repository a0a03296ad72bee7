"""What watches a training run: steps that are not finite, a LoRA that does not move, stop signals, and the
steady-state step time. Each is a small class the loop calls at fixed points; none needs a model, so each is
tested on its own (tests/test_guards.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import SdtuneError


class NonFiniteGuard:
    """Keeps NaN / inf losses and gradients out of the weights, names the batches they came from, and stops
    the run after ``max_in_a_row`` of them in a row.

    Reading a flag on the host waits for the GPU, so where the optimizer can skip a step on the device by itself
    (fp16's grad scaler; fused AdamW with ``found_inf``) the step's flag is kept on the device and read with
    the others at the next ``check()`` (the loop calls it at log, checkpoint and sample points). Other optimizers
    (8-bit AdamW, foreach) need one read per step, in ``allow()``.
    """

    def __init__(self, optimizer: Any, scaler: Any, max_in_a_row: int, warn: Callable[[str], None]):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
        self.scaler = scaler
        self.fused = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        self.max_in_a_row, self.warn = max_in_a_row, warn
        self.pending: list[tuple[int, torch.Tensor | bool, list[str]]] = []  # (step, finite flag, batch files)
        self.in_a_row = self.total = 0
        self._read: bool | None = None  # the flag allow() already read on the host, for record()

    @property
    def on_device(self) -> bool:
        """Whether a non-finite step is skipped without the host looking."""
        return self.scaler is not None or self.fused

    def allow(self, finite: torch.Tensor) -> bool:
        """Whether ``optimizer.step()`` may run for a step whose loss and gradient norm are ``finite`` (a 0-d
        bool tensor). True where the optimizer skips by itself; then the skip happens on the device."""
        if self.scaler is not None:
            return True  # the grad scaler finds the inf gradients and skips the update itself
        if self.fused:
            self.optimizer.found_inf = (~finite).float()  # the fused kernel skips the update when it is 1
            return True
        self._read = bool(finite)  # a host sync: this optimizer cannot skip on its own
        return self._read

    def record(self, step: int, finite: torch.Tensor, paths: list[str]) -> None:
        """Note an optimizer step's flag; checked now unless the skip happens on the device."""
        read, self._read = self._read, None
        self.pending.append((step, finite if read is None else read, paths))  # not read twice
        if not self.on_device:
            self.check()

    def check(self) -> None:
        """Warn about each skipped step since the last check (one host sync); raise after too many in a row."""
        if not self.pending:
            return
        on_device = [flag for _, flag, _ in self.pending if isinstance(flag, torch.Tensor)]
        read = iter(torch.stack(on_device).tolist() if on_device else [])  # the one host sync for all of them
        flags = [next(read) if isinstance(flag, torch.Tensor) else flag for _, flag, _ in self.pending]
        pending, self.pending = self.pending, []
        for (step, _, paths), ok in zip(pending, flags):
            if ok:
                self.in_a_row = 0
                continue
            self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
            files = ", ".join(sorted({Path(p).name for p in paths}))
            self.warn(f"step {step}: loss or gradients not finite, update skipped (batch: {files})")
            if self.in_a_row >= self.max_in_a_row:
                raise SdtuneError(
                    f"loss or gradients were not finite for {self.in_a_row} steps in a row (last batch: {files});"
                    " stopped. Nothing non-finite was saved. Try a lower train.learning_rate, bf16 instead of fp16,"
                    " or check those images"
                )


class StalledLoraGuard:
    """Stops a run whose LoRA has not moved ``after`` steps in: it never will (learning rate 0 or tiny,
    nothing trainable, A = B = 0), and training on would produce an empty LoRA."""

    def __init__(self, params: list[torch.Tensor], start_step: int, max_steps: int, after: int = 5):
        self.start_step, self.at_step = start_step, min(start_step + after, max_steps)
        self.initial = [p.detach().clone() for p in params]

    def check(self, step: int, params: list[torch.Tensor], lr: float, skipped: int) -> None:
        """At the check step, raise if no weight moved; otherwise nothing (and the copy is freed after)."""
        if step != self.at_step or not self.initial:
            return
        # Relative to the weights' size: a learning rate of 1e-30 "moves" lora_B off zero, uselessly.
        delta = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(params, self.initial))
        scale = max(float(p0.abs().max()) for p0 in self.initial)
        self.initial = []
        if delta <= 1e-7 * max(scale, 1e-12):
            raise SdtuneError(
                f"the LoRA weights did not change in {step - self.start_step} steps (learning rate {lr:g}, "
                f"{skipped} skipped steps); training on would produce an empty LoRA. Check train.learning_rate, "
                "lr_warmup_steps and lora settings"
            )


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current step (which then saves a
    checkpoint); any further signal, e.g. a second Ctrl-C during that save, is ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say: Callable[[str], None] = print):
        self.signum: int | None = None
        self._say, self._old = say, {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self._say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")
        else:
            self._say(f"{signal.Signals(signum).name} ignored: saving the checkpoint, please wait")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            # Once asked to stop, further signals are ignored until the process exits with 130 / 143.
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal, as shells report a process killed by it."""
        return 128 + (self.signum or signal.SIGTERM)


class StepTimer:
    """Steady-state seconds per step: timed from a few steps in (after compilation, caches and warm-up) to the
    end of the run, so it costs two device syncs in all. ``sync`` waits for the device (a no-op on CPU).

    Work between steps (sample grids, checkpoints) runs ``with timer.paused(what):``; it is left out of the
    step time and added up by kind in ``paused_s``.
    """

    def __init__(self, start_step: int, max_steps: int, sync: Callable[[], None] = lambda: None):
        self.from_step = min(start_step + 10, (start_step + max_steps) // 2)
        self.sync = sync
        self.started, self.start_step = time.perf_counter(), start_step
        self.step = start_step
        self.paused_s: Counter[str] = Counter()  # seconds left out, by kind: {"sample": 12.3, "checkpoint": 1.2}

    def tick(self, step: int) -> None:
        """Call after each optimizer step: restarts the clock at the first steady step."""
        self.step = step
        if step == self.from_step:
            self.sync()
            self.started, self.start_step = time.perf_counter(), step

    @contextmanager
    def paused(self, what: str) -> Iterator[Pause]:
        """Leave what runs inside out of the step time; yields a ``Pause`` whose ``seconds`` is set on exit."""
        if self.step >= self.from_step:
            # Steps still queued on the device belong to the step time, not to the pause. Only at a pause, which
            # waits for the device anyway (a grid is read back, a checkpoint copied to the host).
            self.sync()
        pause, start = Pause(what), time.perf_counter()
        try:
            yield pause
        finally:
            pause.seconds = time.perf_counter() - start
            self.started += pause.seconds  # before the first steady step the clock restarts anyway
            self.paused_s[what] += pause.seconds

    def result(self, step: int) -> tuple[int, float]:
        """(timed steps, seconds per step) at the end of the run; NaN when no step was timed."""
        self.sync()
        steps = step - self.start_step
        return steps, (time.perf_counter() - self.started) / steps if steps else float("nan")


@dataclass
class Pause:
    """One pause of a ``StepTimer``: what ran, and for how long (set when it ends)."""

    what: str
    seconds: float = 0.0
