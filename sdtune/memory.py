"""A pre-flight estimate of peak GPU memory for a training run, printed before the first step.

weights (frozen parts in the compute dtype, where they live during the step) + LoRA parameters, gradients and
optimizer state + activations. Activations are the uncertain part: per image they scale with UNet size x
latent pixels; the constants are calibrated on measured H200 runs in bench/RESULTS.md (SD1.5 512 px: about
1.05 GiB per image without gradient checkpointing; gradient checkpointing keeps about a fifth). Expect +-30%.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# GiB of activations per image, per billion UNet parameters, per 64x64 latent pixels (calibrated, see above)
ACTIVATIONS_PER_IMAGE = 1.22
CHECKPOINTING_FACTOR = 0.21


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    trainable_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        # + 0.5 GiB: CUDA context, allocator slack, cuDNN workspaces
        return self.weights_gib + self.trainable_gib + self.activations_gib + 0.5

    def line(self) -> str:
        return (f"pre-flight estimate: ~{self.total_gib:.1f} GiB peak GPU memory (weights {self.weights_gib:.1f}, "
                f"LoRA + optimizer {self.trainable_gib:.2f}, activations {self.activations_gib:.1f}; +-30%)")


def estimate(
    unet_params: int,
    frozen_on_gpu_params: int,
    fp32_on_gpu_params: int,
    trainable_params: int,
    weight_bytes: int,
    images_per_micro_batch: int,
    latent_pixels: int,
    gradient_checkpointing: bool,
    optimizer: str,
) -> Estimate:
    """Peak memory from parameter counts (frozen in ``weight_bytes`` each, some kept fp32) and batch shape."""
    weights = (unet_params + frozen_on_gpu_params) * weight_bytes + fp32_on_gpu_params * 4
    # fp32 LoRA weight + gradient, AdamW's two moments (8-bit AdamW: about 2 bytes for both)
    trainable = trainable_params * (4 + 4 + (2 if optimizer == "adamw8bit" else 8))
    per_image = ACTIVATIONS_PER_IMAGE * unet_params / 1e9 * latent_pixels / 4096
    if gradient_checkpointing:
        per_image *= CHECKPOINTING_FACTOR
    return Estimate(weights / GIB, trainable / GIB, per_image * images_per_micro_batch * weight_bytes / 2)
