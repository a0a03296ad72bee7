"""What the flow-matching families (FLUX.1, SD3.x) share: their recipe options for drawing timesteps, the
objective built from them, and the recipe options they cannot train with yet."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from sdtune.errors import SdtuneError
from sdtune.objectives import FlowMatchingObjective


class FlowOptions(BaseModel):
    """How timesteps are drawn (``diffusers.training_utils.compute_density_for_timestep_sampling``); a family's
    recipe section (``flux``, ``sd3``) subclasses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weighting_scheme: Literal["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"] = Field(
        "logit_normal", description="how timesteps are drawn (and for sigma_sqrt / cosmap the loss weighted); "
        "diffusers' FLUX and SD3 scripts use logit_normal")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 tokens per prompt, in training and in every sample (a longer prompt is "
        "cut there): unset, the model's own: FLUX.1-dev 512, FLUX.1-schnell 256 (as Black Forest Labs' code and "
        "kohya's t5xxl_max_token_length), SD3.x 256 (StableDiffusion3Pipeline's default; diffusers' SD3 script "
        "trains with 77)")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        refuse_bool_number(value, str(cls.model_fields[info.field_name].annotation) if info.field_name else "")
        return value


def refuse_bool_number(value: Any, annotation: str) -> None:
    """A true/false value for a number field (``annotation``, as ``str()`` of it) is a mistake: pydantic's lax mode
    reads `true` as 1 (``max_steps: true``, ``flux.max_sequence_length=true``). Used by every recipe section."""
    if isinstance(value, bool) and "bool" not in annotation and ("int" in annotation or "float" in annotation):
        raise PydanticCustomError("bool_number", "expected a number, got a true/false value")


def flow_objective(noise_scheduler: Any, options: FlowOptions, label: str, noise_offset: float,
                   snr_gamma: float | None) -> FlowMatchingObjective:
    """The objective of a flow-matching family with its recipe options."""
    if noise_offset or snr_gamma is not None:
        raise SdtuneError(f"train.noise_offset / train.snr_gamma: DDPM options, not available for {label}")
    o = options
    return FlowMatchingObjective(noise_scheduler, o.weighting_scheme, o.logit_mean, o.logit_std, o.mode_scale,
                                 precondition=getattr(o, "precondition_outputs", False))


def flow_config_problems(cfg: Any, label: str, section: str) -> list[str]:
    """The recipe options a flow-matching family cannot train with yet, one line each naming its key."""
    t, problems = cfg.train, []
    if t.noise_offset:
        problems.append(f"train.noise_offset: a DDPM option; {label} trains with flow matching: remove it")
    if t.snr_gamma is not None:
        problems.append(f"train.snr_gamma: min-SNR is a DDPM weighting; for {label} use {section}.weighting_scheme")
    if cfg.model.prediction_type:
        problems.append(prediction_type_problem(label, "model.prediction_type"))
    return problems


def prediction_type_problem(label: str, key: str) -> str:
    """The line refusing a prediction type (``model.prediction_type``, ``--prediction-type``) for a flow family."""
    return f"{key}: {label} models predict the flow (noise - latents); remove it"
