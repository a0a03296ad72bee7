"""An exponential moving average (EMA) of the trained LoRA weights (``train.ema``).

The average is diffusers' own ``EMAModel`` over the optimizer's parameters (the LoRA tensors only, never the
frozen model), updated once per optimizer step (not per micro-batch): after optimizer step n,

    ema = ema - (1 - d_n) * (ema - weights),  d_n = min(train.ema_decay, n / (9 + n)),  d_1 = 0

so the first update copies the weights and the decay ramps up to ``train.ema_decay`` (diffusers' warm-up:
a LoRA run of a few hundred steps would otherwise average mostly its zero-initialised start).

With ``train.ema_on_cpu`` the average lives in (pinned) CPU memory between steps and visits the device for its
update, as diffusers' ``--offload_ema`` does: the arithmetic, and so every number, is the same either way.

When EMA is on, sample grids, each checkpoint's LoRA file and the final LoRA files hold the averaged weights:
``applied()`` swaps them into the model and swaps the training weights back, bitwise, afterwards. A
checkpoint keeps both (``adapter-*.safetensors``: the training weights; ``ema.pt``: the average), so a
resume continues both exactly.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from sdtune.errors import SdtuneError

EMA_FILE = "ema.pt"  # in each checkpoint folder, beside the adapters


class AdapterEMA:
    """The EMA of ``params`` (the optimizer's LoRA parameters, in its order)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, on_cpu: bool = False):
        self.params = params
        self.device = params[0].device if params else torch.device("cpu")
        # foreach: one kernel per update for all LoRA tensors instead of one per tensor
        self.model = EMAModel(params, decay=decay, foreach=True)
        self.on_cpu = on_cpu and self.device.type != "cpu"
        if self.on_cpu:
            self.model.to("cpu")
            if self.device.type == "cuda":
                self.model.pin_memory()  # so that the copies to and from the device can be asynchronous

    @property
    def updates(self) -> int:
        """How many optimizer steps the average has seen."""
        return self.model.optimization_step

    @property
    def decay(self) -> float:
        """The decay of the last update (``train.ema_decay`` once the warm-up is over); 0 before the first."""
        return float(self.model.cur_decay_value or 0.0)

    def step(self) -> None:
        """Fold the current weights into the average (call once per optimizer step)."""
        if self.on_cpu:
            # non-blocking both ways (from pinned memory, into pinned memory): ordered on the device's
            # stream, so no host sync per step; ``_settled`` waits before the host reads the copy
            self.model.to(self.device, non_blocking=True)
        self.model.step(self.params)
        if self.on_cpu:
            self.model.to("cpu", non_blocking=True)

    def _settled(self) -> None:
        if self.on_cpu and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (sampling, saving a LoRA file); the training
        weights are put back exactly afterwards, whatever happens inside."""
        self._settled()
        self.model.store(self.params)  # a CPU copy of the training weights
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state_bytes(self) -> bytes:
        """The average and its step count, as ``ema.pt`` holds them (read back by ``load``)."""
        self._settled()
        state = self.model.state_dict()
        state["shadow_params"] = [p.detach().to("cpu") for p in state["shadow_params"]]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load(self, path: Path) -> None:
        """Restore the average saved by ``state_bytes`` (a checkpoint's ``ema.pt``), refusing one of another
        LoRA layout."""
        state = torch.load(path, weights_only=True, map_location="cpu")
        shadow = state.get("shadow_params") or []
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(s.shape) for s in shadow] != shapes:
            raise SdtuneError(f"train.resume: {path} holds the EMA of another LoRA layout "
                              f"({len(shadow)} tensors, this run trains {len(shapes)}); fix: resume with the "
                              "settings it was trained with")
        state["shadow_params"] = [s.to(self.device if not self.on_cpu else "cpu", p.dtype)
                                  for s, p in zip(shadow, self.params)]
        self.model.load_state_dict(state)
        if self.on_cpu and self.device.type == "cuda":
            self.model.pin_memory()

    def restart(self) -> None:
        """Start the average anew from the current weights (a resumed checkpoint that holds none)."""
        self.__init__(self.params, self.model.decay, self.on_cpu)

    def summary(self) -> dict[str, Any]:
        """What train_summary.json says about the average."""
        return {"used_for": "the saved LoRA files (final and checkpoints) and the sample grids",
                "decay": self.model.decay, "last_decay": self.decay, "updates": self.updates,
                "on_cpu": self.on_cpu}


def make_ema(params: list[torch.nn.Parameter], enabled: bool, decay: float,
             on_cpu: bool) -> AdapterEMA | None:
    """The run's EMA (``train.ema``), or None when it is off."""
    return AdapterEMA(params, decay, on_cpu) if enabled else None


def ema_summary(ema: AdapterEMA | None) -> dict[str, Any]:
    """For train_summary.json: which weights the saved LoRA holds, and the average's settings when on."""
    return {"lora_weights": "ema", "ema": ema.summary()} if ema is not None else {"lora_weights": "trained"}


@contextlib.contextmanager
def ema_weights(ema: AdapterEMA | None) -> Iterator[None]:
    """``ema.applied()``, or nothing when there is no EMA: the weights a run shows and saves."""
    if ema is None:
        yield
        return
    with ema.applied():
        yield
