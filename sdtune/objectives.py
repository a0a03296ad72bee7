"""What a denoiser is trained to predict: noising, the loss target and the per-example loss weights.

``training_step`` asks an ``Objective`` for noise and timesteps, the noisy latents, the target and the
weights; a model family names its objective (``Family.objective``). DDPM-trained families (SD1.x, SD2.x,
SDXL) use ``DiffusionObjective``; flow-matching families (FLUX, next SD3: sigmas instead of a beta schedule,
``noisy = (1 - sigma) * latents + sigma * noise``, target ``noise - latents``) use ``FlowMatchingObjective``,
with the same four methods (a fifth, ``huber_threshold``, only for ``train.loss`` huber / smooth_l1): the
loop does not change. A new loss weighting goes into ``loss_weights``.

How the error becomes a loss is ``LossFunction`` (``train.loss``): MSE, or kohya sd-scripts' Huber and
smooth-L1 (``conditional_loss``) with a threshold that varies with the timestep (``huber_threshold``, kohya's
``get_huber_threshold_if_needed``). ``per_element_loss`` gives the unreduced (B, C, h, w) loss that masks
weight before the per-example mean; min-SNR weights (``loss_weights``) then multiply each example's mean, as
kohya does.

torch is imported inside the functions that need it: model families name their objective, and the
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

    def huber_threshold(self, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
        """The Huber / smooth-L1 threshold (B,) at ``timesteps`` (only asked for with ``train.loss`` huber or
        smooth_l1)."""
        ...

    def fixed_timesteps(self, count: int) -> torch.Tensor:
        """``count`` timesteps (count,) evenly spread over what ``sample`` draws from: the validation loss's."""
        ...


def evenly_spaced(length: int, count: int) -> list[int]:
    """``count`` indices into ``length`` at the middles of equal parts: 62, 187, ..., 937 of 1000 for 8."""
    return [(2 * k + 1) * length // (2 * count) for k in range(count)]


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

    def huber_threshold(self, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
        return huber_threshold(schedule, huber_c, timesteps, self.noise_scheduler.alphas_cumprod)

    def fixed_timesteps(self, count: int) -> torch.Tensor:
        import torch

        return torch.tensor(evenly_spaced(self.noise_scheduler.config.num_train_timesteps, count), dtype=torch.long)


LOSSES = ("mse", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class LossFunction:
    """How the error of a prediction becomes the loss (``train.loss``, ``train.huber_c``,
    ``train.huber_schedule``); the default is MSE."""

    kind: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise SdtuneError(f"train.loss: unknown loss '{self.kind}'; choose from {', '.join(LOSSES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise SdtuneError(f"train.huber_schedule: unknown schedule '{self.huber_schedule}'; choose from "
                              f"{', '.join(HUBER_SCHEDULES)}")

    def per_element(self, objective: Objective, model_pred: torch.Tensor, target: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
        """The unreduced loss (B, C, h, w) in fp32 of a batch whose examples are at ``timesteps`` (B,)."""
        threshold = None if self.kind == "mse" else objective.huber_threshold(timesteps, self.huber_c,
                                                                               self.huber_schedule)
        return per_element_loss(model_pred, target, self.kind, threshold)


MSE = LossFunction()


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The Huber threshold (B,) fp32 at ``timesteps`` (B,) of a DDPM schedule whose cumulative alphas are
    ``alphas_cumprod`` (T,), as kohya's ``get_huber_threshold_if_needed`` (its huber_scale is 1):

    - constant: ``huber_c``;
    - exponential: ``huber_c ** (t / T)``: 1 at the clean end, ``huber_c`` at pure noise;
    - snr: ``(1 - huber_c) / (1 + sigma_t) ** 2 + huber_c`` with ``sigma_t = sqrt((1 - a_t) / a_t)``: near 1
      (MSE-like) where the noise is small, ``huber_c`` (robust) where it dominates.
    """
    import torch

    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        return huber_c ** (timesteps.float() / alphas_cumprod.numel())
    if schedule == "snr":
        alphas = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
        sigmas = ((1 - alphas) / alphas) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise SdtuneError(f"train.huber_schedule: unknown schedule '{schedule}'; choose from "
                      f"{', '.join(HUBER_SCHEDULES)}")


def per_element_loss(model_pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss (B, C, h, w), fp32 whatever the inputs' dtype, as kohya's ``conditional_loss``:

    - mse: ``d ** 2`` with ``d = model_pred - target``;
    - huber (pseudo-Huber): ``2 c (sqrt(d ** 2 + c ** 2) - c)``: ``d ** 2`` for small errors, ``2 c |d|``
      for large ones (the gradient never exceeds ``2 c``);
    - smooth_l1: ``2 (sqrt(d ** 2 + c ** 2) - c)``: ``d ** 2 / c`` for small errors, ``2 |d|`` for large ones.

    ``huber_c``: the threshold per example (B,) (``huber_threshold``), needed by huber and smooth_l1.
    """
    import torch.nn.functional as F

    model_pred, target = model_pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(model_pred, target, reduction="none")
    if kind not in LOSSES:
        raise SdtuneError(f"train.loss: unknown loss '{kind}'; choose from {', '.join(LOSSES)}")
    if huber_c is None:
        raise SdtuneError(f"train.loss: {kind} needs a threshold per example (train.huber_c)")
    c = huber_c.float().view(-1, *([1] * (model_pred.dim() - 1)))  # (B, 1, 1, 1): one threshold per example
    robust = 2 * (((model_pred - target) ** 2 + c**2).sqrt() - c)
    return c * robust if kind == "huber" else robust


def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latents -> the denoiser's latent space: ``(latents - shift_factor) * scaling_factor`` (SD's VAEs
    have no shift; SD3's and FLUX's have one)."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae_config.scaling_factor


WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatchingObjective:
    """Rectified flow (SD3, FLUX): ``noisy_latents = (1 - sigma) * latents + sigma * noise``, target
    ``noise - latents``, as diffusers' ``train_dreambooth_lora_flux.py`` trains.

    Timesteps are drawn as that script draws them: ``u`` from ``compute_density_for_timestep_sampling``
    (``weighting_scheme`` logit_normal, mode, none = uniform; sigma_sqrt and cosmap draw uniformly and weight
    the loss), ``indices = (u * num_train_timesteps).long()``, ``timesteps = scheduler.timesteps[indices]``,
    and each timestep's sigma looked up in the scheduler's sigmas. Loss weights come from
    ``compute_loss_weighting_for_sd3`` (None where they are all ones). A pure function of its inputs and the
    generator.

    The Huber threshold schedules use sigma in place of the DDPM noise-to-signal ratio: ``exponential`` is
    ``huber_c ** sigma``, ``snr`` is ``(1 - huber_c) / (1 + sigma / (1 - sigma)) ** 2 + huber_c`` (sigma's
    noise-to-signal ratio, as ``sqrt((1 - a_t) / a_t)`` is for DDPM); ``constant`` is ``huber_c``.
    """

    noise_scheduler: Any  # a diffusers FlowMatchEulerDiscreteScheduler as built from the model's config
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # EDM's output preconditioning (diffusers' SD3 script, ``--precondition_outputs``): the loss on the predicted
    # clean latents, ``noisy_latents - sigma * model_pred`` against ``latents``, which is sigma * (target -
    # model_pred): the flow loss weighted by sigma ** 2 per example, so it is a loss weight here
    precondition: bool = False

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise SdtuneError(f"flux.weighting_scheme: unknown '{self.weighting_scheme}'; choose from "
                              f"{', '.join(WEIGHTING_SCHEMES)}")

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=latents.shape[0], logit_mean=self.logit_mean,
            logit_std=self.logit_std, mode_scale=self.mode_scale, device=generator.device, generator=generator)
        indices = (u * self.noise_scheduler.config.num_train_timesteps).long().cpu()  # (B,) in [0, T)
        timesteps = self.noise_scheduler.timesteps[indices].to(latents.device)  # (B,) float, in (0, 1000]
        return noise, timesteps

    def sigmas(self, timesteps: torch.Tensor, n_dim: int = 1) -> torch.Tensor:
        """Each timestep's sigma (B,) fp32, viewed (B, 1, ..., 1) for ``n_dim`` dimensions: the reference's
        ``get_sigmas`` (an exact lookup of the timestep in the scheduler's table, not a division by 1000,
        which a shifted schedule would break)."""
        import torch

        schedule = self.noise_scheduler.timesteps.to(timesteps.device)
        step_indices = (schedule[None, :] == timesteps[:, None]).float().argmax(dim=1)  # (B,)
        sigma = self.noise_scheduler.sigmas.to(timesteps.device, torch.float32)[step_indices]
        return sigma.view(-1, *([1] * (n_dim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps, latents.dim()).to(latents.dtype)  # (B, 1, 1, 1)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def fixed_timesteps(self, count: int) -> torch.Tensor:
        # entries of the scheduler's table, as ``sample`` draws them (``sigmas`` looks each one up exactly)
        table = self.noise_scheduler.timesteps
        return table[evenly_spaced(len(table), count)].clone()  # (count,) float

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = self.sigmas(timesteps)  # (B,) fp32
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float() \
            if self.weighting_scheme in ("sigma_sqrt", "cosmap") else None  # the others' are ones: a plain mean
        if self.precondition:
            weights = sigmas**2 if weights is None else weights * sigmas**2
        return weights  # (B,) or None

    def huber_threshold(self, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
        import torch

        sigma = self.sigmas(timesteps)  # (B,) fp32
        if schedule == "constant":
            return torch.full(timesteps.shape, huber_c, dtype=torch.float32, device=timesteps.device)
        if schedule == "exponential":
            return huber_c**sigma
        if schedule == "snr":
            ratio = sigma / (1 - sigma).clamp(min=1e-6)  # noise-to-signal of x_t = (1 - s) x0 + s noise
            return (1 - huber_c) / (1 + ratio) ** 2 + huber_c
        raise SdtuneError(f"train.huber_schedule: unknown schedule '{schedule}'; choose from "
                          f"{', '.join(HUBER_SCHEDULES)}")
