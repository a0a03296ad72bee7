"""What a denoiser is trained to predict: noising, the loss target and the per-example loss weights.

``training_step`` asks an ``Objective`` for noise and timesteps, the noisy latents, the target and the
weights; a model family names its objective (``Family.objective``). DDPM-trained families (SD1.x, SD2.x,
SDXL) use ``DiffusionObjective``; a flow-matching family (SD3, FLUX: sigmas instead of a beta schedule,
``noisy = (1 - sigma) * latents + sigma * noise``, target ``noise - latents``) adds another class with the
same four methods and needs no change in the loop. A new loss weighting goes into ``loss_weights``.

torch is imported inside the two methods that need it: model families name their objective, and the
command line reads the families (``--family`` choices) without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    """Noising and loss target of one family. All randomness comes from the generator passed in."""

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise shaped like ``latents``, timesteps (B,))."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``noisy_latents``: the forward process at ``timesteps``."""
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should output."""
        ...

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-example weights (B,) of the MSE, or None for a plain mean."""
        ...


@dataclass
class DiffusionObjective:
    """The DDPM forward process of SD1.x, SD2.x and SDXL, predicting the noise (epsilon) or the velocity
    (v_prediction), with an optional noise offset and min-SNR-gamma weighting."""

    noise_scheduler: Any  # a diffusers DDPMScheduler: alphas_cumprod, add_noise, get_velocity
    prediction_type: str = "epsilon"
    noise_offset: float = 0.0
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SdtuneError(f"model: unsupported prediction type '{self.prediction_type}'")

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        bsz, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.noise_offset:
            # A per-channel constant shift lets the model learn overall brightness (very dark / light images).
            offset = torch.randn((bsz, channels, 1, 1), generator=generator, device=latents.device,
                                 dtype=latents.dtype)
            noise = noise + self.noise_offset * offset
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (bsz,), generator=generator, device=latents.device).long()
        return noise, timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        import torch
        from diffusers.training_utils import compute_snr

        # Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, (B,) fp32.
        snr = compute_snr(self.noise_scheduler, timesteps).float()
        weight = torch.clamp(snr, max=self.snr_gamma)
        return weight / (snr if self.prediction_type == "epsilon" else snr + 1)


def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latents -> the denoiser's latent space: ``(latents - shift_factor) * scaling_factor`` (SD's VAEs
    have no shift; SD3's and FLUX's have one)."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae_config.scaling_factor
