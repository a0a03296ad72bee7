"""Validation loss on held-out images (``train.validation_every``, ``data.validation_dir``).

Images the run never trains on (their own folder, the layout of ``data.instance_dir``: captions from
metadata.jsonl, .txt files or ``data.instance_prompt``; with ``data.concepts`` each caption names one of the
identifiers) are checked with the training data
(``check_validation``, called by ``sdtune.plan.check_run``), then encoded once when the run starts (the VAE's
latent mean, centre crop, no flip; each at its aspect bucket with ``data.aspect_buckets``). Every
``train.validation_every`` steps (and at the last) ``Validator.measure`` computes the denoising loss of the
current LoRA on each image at ``VALIDATION_TIMESTEPS`` evenly spaced timesteps (``Objective.fixed_timesteps``:
DDPM's integers, or a flow-matching family's scheduler-table entries) with fixed noise (drawn once
from a generator of its own, seeded from ``train.seed``): the same weights always give the same number, so
the curve moves only when the weights do. It is the training objective's MSE with the same min-SNR weights
(whatever ``train.loss`` is), under ``torch.no_grad`` in eval mode (no LoRA dropout), and it draws from no
random stream of the training loop, so a run with validation trains exactly the LoRA it trains without.

``val_loss`` (and ``val_loss_ema``, the averaged weights, with ``train.ema``) goes to the trackers, the
progress line and ``losses.jsonl`` with the training loss; ``validation_summary`` reads the record back for
train_summary.json: the step of the lowest validation loss, the point past which the run overfits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sdtune.config import Config
from sdtune.data import Example, Size, assign_buckets, load_image, scan_instance_dir
from sdtune.families import Components, Family
from sdtune.files import content_hash
from sdtune.objectives import Objective, evenly_spaced, scale_latents

if TYPE_CHECKING:  # sdtune.plan imports this module: it must not pull in diffusers (sdtune.ema does)
    from sdtune.ema import AdapterEMA

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = 8  # per image, evenly spaced over the schedule: 62, 187, ..., 937 of 1000
_SEED_SALT = 7_919  # the noise generator's seed is train.seed + this: a stream no training draw shares


# --------------------------------------------------------------------------------------------------------
# Checks (plan time: headers only, no weights)


def check_validation(cfg: Config, resolution: int | None, training: list[Example], problems: list[str],
                     warnings: list[str]) -> list[Example]:
    """The held-out examples of ``data.validation_dir`` when ``train.validation_every`` asks for them; their
    problems and warnings are added to the run's, with the training images'."""
    d, every = cfg.data, cfg.train.validation_every
    if not d.validation_dir:
        if every:
            problems.append(f"train.validation_every: {every} needs held-out images; fix: set "
                            "data.validation_dir to a folder of photos that are not in the training data "
                            "(laid out as data.instance_dir), or train.validation_every=0")
        return []
    if not every:
        warnings.append("data.validation_dir: not used while train.validation_every=0; fix: e.g. "
                        "train.validation_every=50 (or remove data.validation_dir)")
        return []
    # with several concepts a held-out caption names one of them; no instance prompt could say which
    words = cfg.identifiers()
    scan = scan_instance_dir(d.validation_dir, words if d.concepts else words[0], d.instance_prompt,
                             key="data.validation_dir", resolution=resolution,
                             prompt_key=None if d.concepts else "data.instance_prompt",
                             template=d.caption_template)  # held-out captions read like the training ones
    problems += scan.problems
    warnings += scan.warnings
    trained = {content_hash(e.path) for e in training}
    shared = [e.path.name for e in scan.examples if content_hash(e.path) in trained]
    if shared:
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        verb = "is" if len(shared) == 1 else "are"
        warnings.append(f"data.validation_dir: {shown} {verb} also training images, so the validation loss "
                        "cannot show overfitting on them; fix: keep held-out photos out of the training data")
    return scan.examples


# --------------------------------------------------------------------------------------------------------
# The loss


def fixed_timesteps(num_train_timesteps: int, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """``count`` timesteps at the middles of equal parts of a DDPM schedule (``Objective.fixed_timesteps``)."""
    return evenly_spaced(num_train_timesteps, count)


@dataclass
class _Image:
    """One held-out image, ready to evaluate."""

    latents: torch.Tensor  # (1, C, h, w), the VAE's mean in the denoiser's space and compute dtype
    caption: str
    geometry: torch.Tensor  # (1, 6): original (h, w), crop top-left (y, x), target (h, w), as ``collate``'s
    noise: torch.Tensor  # (T, C, h, w), one fixed draw per timestep
    embeds: dict[str, torch.Tensor] | None  # the caption's prompt embeddings (1, ...), text encoders frozen


class Validator:
    """The validation loss of the current weights on a fixed set of held-out images."""

    def __init__(self, images: list[_Image], timesteps: torch.Tensor, family: Family, objective: Objective,
                 components: Components, options: Any, batch_size: int,
                 autocast: Callable[[], AbstractContextManager], device: torch.device, dtype: torch.dtype):
        self.images, self.family, self.objective = images, family, objective
        self.components, self.options, self.batch_size = components, options, batch_size
        self.autocast, self.device, self.dtype = autocast, device, dtype
        self.timesteps = timesteps.to(device)  # (T,): DDPM's integers, a flow schedule's table entries
        self.rewrite: Callable[[str], str] = str  # pivotal tuning's caption rewrite (Embeddings.rewrite)

    def _conditioning(self, image: _Image, rows: int, text_encoders: list[Any]) -> dict[str, Any]:
        """The denoiser's other inputs for ``rows`` copies of the image's caption."""
        embeds = image.embeds
        if embeds is None:  # trained text encoders: their current weights
            tokens = self.family.tokenize(self.components.tokenizers, [self.rewrite(image.caption)])
            ids = [i.to(self.device) for i in tokens]
            embeds = self.family.encode_prompt(text_encoders, ids)
        prompt = {k: v.expand(rows, *v.shape[1:]) for k, v in embeds.items()}
        batch = {"captions": [image.caption] * rows, "geometry": image.geometry.expand(rows, -1)}
        return self.family.conditioning(prompt, batch, self.options, self.device, self.dtype)

    def _image_loss(self, image: _Image, denoiser: torch.nn.Module, text_encoders: list[Any]) -> torch.Tensor:
        """The sum over the image's timesteps of the (weighted) per-example MSE, a 0-dim device tensor."""
        total = torch.zeros((), device=self.device)
        for start in range(0, len(self.timesteps), self.batch_size):  # never more rows than a training batch
            t = self.timesteps[start : start + self.batch_size]  # (n,)
            noise = image.noise[start : start + self.batch_size]  # (n, C, h, w)
            latents = image.latents.expand(len(t), *image.latents.shape[1:])
            noisy = self.objective.add_noise(latents, noise, t)
            pred = self.family.predict(denoiser, noisy, t, self._conditioning(image, len(t), text_encoders))
            target = self.objective.target(latents, noise, t)
            mse = F.mse_loss(pred.float(), target.float(), reduction="none")  # (n, C, h, w)
            mse = mse.mean(dim=tuple(range(1, target.dim())))  # (n,)
            weights = self.objective.loss_weights(t)
            total += (mse * weights if weights is not None else mse).sum()
        return total

    def loss(self, modules: dict[str, torch.nn.Module]) -> float:
        """The mean validation loss of ``modules`` (the trained modules, unwrapped, by component name), in
        eval mode and without gradients; their training mode is restored afterwards."""
        denoiser = modules[self.family.denoiser_name]
        text_encoders = [modules.get(spec.name, te) for spec, te in zip(self.family.text_encoders,
                                                                         self.components.text_encoders)]
        modes = [(m, m.training) for m in modules.values()]
        try:
            for m, _ in modes:
                m.eval()
            with torch.no_grad(), self.autocast():
                total = sum(self._image_loss(image, denoiser, text_encoders) for image in self.images)
            return float(total) / (len(self.images) * len(self.timesteps))  # one host sync per evaluation
        finally:
            for m, training in modes:
                m.train(training)

    def measure(self, modules: dict[str, torch.nn.Module], ema: AdapterEMA | None = None) -> dict[str, float]:
        """``{"val_loss": ...}`` of the training weights, and ``val_loss_ema`` of the average with ``ema``."""
        values = {"val_loss": self.loss(modules)}
        if ema is not None:
            with ema.applied():
                values["val_loss_ema"] = self.loss(modules)
        return values


def _encode_image(vae: Any, path: Path, size: Size, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """((1, C, h, w) latents in the denoiser's space, (1, 6) geometry) of the centre crop at ``size``."""
    pixels, original, crop = load_image(path, size, True, False, random.Random(0))  # (3, H, W) in [-1, 1]
    latents = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.mean
    geometry = torch.tensor([[*original, *crop, size[1], size[0]]], dtype=torch.float32)
    return scale_latents(latents, vae.config).to(dtype), geometry


def build_validator(cfg: Config, examples: list[Example], resolution: int, bucket_multiple: int,
                    components: Components, family: Family, options: Any, objective: Objective,
                    device: torch.device, dtype: torch.dtype,
                    autocast: Callable[[], AbstractContextManager]) -> Validator | None:
    """Encode the held-out images once (call while the VAE and text encoders are on the device, before any
    adapter exists); None when validation is off."""
    t = cfg.train
    if not t.validation_every or not examples:
        return None
    paths = [e.path for e in examples]
    sizes = assign_buckets(paths, resolution, bucket_multiple) if cfg.data.aspect_buckets \
        else [(resolution, resolution)] * len(paths)
    timesteps = objective.fixed_timesteps(VALIDATION_TIMESTEPS)
    frozen = not cfg.lora.train_text_encoder and not cfg.pivotal.enabled  # else encoded with the current weights
    # on the CPU: the same noise on any device
    generator = torch.Generator("cpu").manual_seed(t.seed + _SEED_SALT)
    images = []
    with torch.no_grad(), autocast():
        for example, size in zip(examples, sizes):
            latents, geometry = _encode_image(components.vae, example.path, size, device, dtype)
            noise = torch.randn((len(timesteps), *latents.shape[1:]), generator=generator).to(device, dtype)
            embeds = None
            if frozen:
                ids = [i.to(device) for i in family.tokenize(components.tokenizers, [example.caption])]
                embeds = family.encode_prompt(components.text_encoders, ids)
            images.append(_Image(latents, example.caption, geometry, noise, embeds))
    rows = t.batch_size * (2 if cfg.prior.enabled else 1)  # a training micro-batch's rows: known to fit
    logger.info(f"validation: {len(images)} held-out images from data.validation_dir, the loss at "
                f"{len(timesteps)} fixed timesteps and noise each, every {t.validation_every} steps")
    return Validator(images, timesteps, family, objective, components, options, rows, autocast, device, dtype)


# --------------------------------------------------------------------------------------------------------
# The record


def validation_summary(losses_file: Path, last_step: int) -> dict[str, dict]:
    """For train_summary.json, from ``losses.jsonl``: ``{"validation": {series: {best_step, best,
    last_step, last}}}`` for each validation series (``val_loss``, ``val_loss_ema``): the step of the lowest
    loss is where the run stopped generalising. A resumed run logged some steps twice; the later line of a
    step counts. {} when the run logged no validation loss."""
    latest: dict[int, dict] = {}
    with contextlib.suppress(OSError):
        for line in losses_file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                record = json.loads(line)
                latest[int(record["step"])] = record
    summary = {}
    for key in ("val_loss", "val_loss_ema"):
        series = {step: float(r[key]) for step, r in sorted(latest.items())
                  if step <= last_step and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
        if series:
            best = min(series, key=lambda s: series[s])  # the first step with the lowest value
            last = max(series)
            summary[key] = {"best_step": best, "best": series[best], "last_step": last, "last": series[last]}
    return {"validation": summary} if summary else {}
