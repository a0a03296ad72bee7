"""Sampling schedulers by the names users know from the UIs (``--scheduler dpmpp_2m``).

The names live here, apart from the renderer, because the command line offers them as choices and must
not import diffusers to do so; diffusers is imported when a scheduler is built.
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import SdtuneError

# name -> diffusers class
SCHEDULERS: dict[str, str] = {
    "dpmpp_2m": "DPMSolverMultistepScheduler",  # A1111's "DPM++ 2M"
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}


def sampling_scheduler(config: Any, name: str = "dpmpp_2m") -> Any:
    """A sampling scheduler built from a model's scheduler config (betas, prediction type, spacing)."""
    import diffusers

    if str(dict(config).get("_class_name", "")).startswith("FlowMatch"):
        # a flow-matching model (FLUX) samples with its own scheduler: its pipeline passes it the shifted
        # sigmas (mu) that the DDPM-style schedulers above do not take
        return getattr(diffusers, dict(config)["_class_name"]).from_config(config)
    if name not in SCHEDULERS:
        raise SdtuneError(f"--scheduler: unknown '{name}'; choose one of {', '.join(SCHEDULERS)}")
    # A training (DDPM) config may say clip_sample=True, which sampling schedulers must not inherit.
    return getattr(diffusers, SCHEDULERS[name]).from_config({**dict(config), "clip_sample": False})
