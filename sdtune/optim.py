"""The optimizers of a LoRA run: torch's fused AdamW, or bitsandbytes' 8-bit AdamW without its host syncs.

bitsandbytes' ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after every parameter (it needs to only
for paged state), so an SD1.5 LoRA (256 tensors at the default targets) waited for the GPU 256 times per step.
``make_optimizer`` gives the same kernels in the same order without those waits. The 8-bit state only applies
to tensors of 4,096 values or more (bitsandbytes' ``min_8bit_size``); ``eight_bit_share`` says how much of a
LoRA that is, so a run can say when 8-bit AdamW saves next to nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sdtune.errors import SdtuneError

MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors in 32-bit state (small tensors quantise badly)
# what the sync-free step below calls of bitsandbytes' Optimizer8bit; a version without them keeps its own step
_STEP_PARTS = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


def make_optimizer(name: str, groups: list[dict], betas: tuple[float, float], eps: float, weight_decay: float) -> Any:
    """AdamW over parameter groups: ``adamw`` (fused where the device allows) or ``adamw8bit`` (bitsandbytes)."""
    if name == "adamw8bit":
        return _adamw8bit_class()(groups, betas=betas, eps=eps, weight_decay=weight_decay)
    # Fused kernels (CUDA and CPU): one launch for all LoRA tensors, and they can skip a non-finite step on
    # the device (``found_inf``), which lets the loop run without a host sync per step.
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def eight_bit_share(params: list[torch.Tensor]) -> tuple[int, int, int, int]:
    """(tensors in 8-bit state, all tensors, values in 8-bit state, all values) for 8-bit AdamW."""
    big = [p for p in params if p.numel() >= MIN_8BIT_SIZE]
    return len(big), len(params), sum(p.numel() for p in big), sum(p.numel() for p in params)


@functools.cache
def _adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit with a step that waits for the device only where paged state needs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # chosen explicitly: never fall back silently to fp32 AdamW
        raise SdtuneError(
            f"train.optimizer: adamw8bit needs bitsandbytes ({e}); pip install bitsandbytes, or set "
            "train.optimizer=adamw"
        ) from None
    if not all(hasattr(bnb.optim.AdamW8bit, part) for part in _STEP_PARTS):
        return bnb.optim.AdamW8bit

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            # Optimizer8bit.step of bitsandbytes 0.45-0.50, less its sync_gpu(p) after each parameter: the
            # updates are queued on one stream in order, so nothing needs to wait unless state is paged.
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit
