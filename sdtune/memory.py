"""A pre-flight estimate of peak GPU memory for a training run, printed before the first step.

peak = weights on the GPU + LoRA weights, gradients and optimizer state + the larger of
  (a) the UNet's activations for the micro-batch (forward + backward), and
  (b) the VAE encoder's activations, when latents are encoded every step instead of cached.
The activation constants are the family's (``Family.memory``). Those of the SD families are calibrated on
the H200 runs in bench/RESULTS.md (2026-11-26): SD1.5 at 512 px takes about 1.08 GiB per image; SDXL at
1024 px with gradient checkpointing about 0.75 GiB; the SDXL VAE encoding one 1024 px image in fp32 about
3.1 GiB. Expect +-30% elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtune.families import MemoryConstants
from sdtune.optim import state_copies

GIB = 2**30
SD_CONSTANTS = MemoryConstants()  # the SD families' (the default)
OVERHEAD = 0.15  # CUDA context, allocator slack, workspaces


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    calibrated: bool = True  # whether the activation constants were measured for this family

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_gib + self.activations_gib + OVERHEAD

    def line(self) -> str:
        activations = f"activations {self.activations_gib:.1f}" + (
            "; +-30%" if self.calibrated else ", a guess from SD's constants: not measured for this family")
        return (f"pre-flight estimate: ~{self.total_gib:.1f} GiB peak GPU memory (weights {self.weights_gib:.1f}, "
                f"LoRA + optimizer {self.trainable_gib:.2f}, {activations})")


def estimate(
    unet_params: int,
    frozen_on_gpu_params: int,
    fp32_on_gpu_params: int,
    trainable_params: int,
    weight_bytes: int,
    images_per_micro_batch: int,
    resolution: int,
    gradient_checkpointing: bool,
    optimizer: str,
    latents_cached: bool,
    vae_bytes: int = 4,
    constants: MemoryConstants = SD_CONSTANTS,
    unet_bytes: int | None = None,
) -> Estimate:
    """Peak memory from parameter counts (frozen in ``weight_bytes`` each, some kept fp32) and batch shape;
    ``unet_bytes``: the frozen denoiser's bytes as stored, where they are not ``weight_bytes`` a weight
    (``model.quantize``)."""
    denoiser = unet_params * weight_bytes if unet_bytes is None else unet_bytes
    weights = denoiser + frozen_on_gpu_params * weight_bytes + fp32_on_gpu_params * 4
    # fp32 LoRA weight + gradient + the optimizer's state: AdamW two copies, Prodigy four, Lion one; fp32, or
    # one byte each for the 8-bit optimizers
    state = state_copies(optimizer) * (1 if optimizer.endswith("8bit") else 4)
    trainable = trainable_params * (4 + 4 + state)
    latent_pixels = (resolution // 8) ** 2
    unet = constants.unet_activation_gib * unet_params / 1e9 * latent_pixels / 4096 * weight_bytes / 2
    if gradient_checkpointing:
        unet *= constants.checkpointing_factor
    vae = 0.0 if latents_cached else constants.vae_activation_gib * (resolution / 1024) ** 2 * vae_bytes / 4
    activations = max(unet, vae) * images_per_micro_batch
    return Estimate(weights / GIB, trainable / GIB, activations, constants.calibrated)
