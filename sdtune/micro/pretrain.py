"""`sdtune micro pretrain`: train the micro model from scratch on the procedural world.

Three stages, all seeded (the same seed, thread count and torch build give the same weights):
1. render ``num_images`` scenes of ``sdtune.micro.world`` at 64 px with their captions;
2. train the VAE (reconstruction + a small KL term), then encode every image once and set the VAE's
   ``scaling_factor`` so that the UNet sees unit-variance latents (as SD's 0.18215 does);
3. train the UNet and the text encoder together on the cached latents (v-prediction loss, captions dropped
   10% of the time so classifier-free guidance works, an EMA of the weights is what gets saved), scoring
   prompt following with the world's detector every ``eval_every`` steps and writing the pipeline folder
   each time (so a long run can be stopped and still leaves a usable model).

This is a from-scratch pretraining loop, not DreamBooth: sdtune's LoRA trainer (``sdtune.train``) is what
users run on top of the result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from sdtune.micro import measure, world
from sdtune.micro import model as micro
from sdtune.train import training_step

logger = logging.getLogger(__name__)

# Captions are seen with these prefixes, so "a photo of sks toy" is phrased the way the model knows.
PREFIXES = ("", "", "a photo of ", "a picture of ")


@dataclass(frozen=True)
class PretrainConfig:
    out: str
    seed: int = 0
    num_images: int = 30000
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    unet_width: int = 48
    eval_every: int = 500
    eval_images: int = 64
    threads: int = 0  # 0: torch's default
    init_from: str | None = None  # a micro pipeline folder to continue from (its VAE is kept, not retrained)
    device: str = "cpu"  # "cuda" on a GPU machine (the same recipe; other random draws, so other weights)
    seconds: float = 0.0  # > 0: fit the UNet stage into this many seconds (fewer steps, its schedule kept whole)
    decoder_steps: int = 0  # > 0: train the VAE's decoder alone this long first (the latents stay the same)
    decoder_lr: float = 5e-4


def _render_chunk(scenes: list[world.Scene]) -> np.ndarray:
    return np.stack([np.asarray(world.render(s, micro.RESOLUTION)) for s in scenes])


def render_world(n: int, seed: int) -> tuple[np.ndarray, list[str], list[world.Scene]]:
    """(n, 64, 64, 3) uint8 images, their captions (with a random prefix) and scenes.

    Scenes and prefixes are drawn in one sequence (the same seed gives the same world on any machine); the
    rendering, a pure function of each scene (~0.7 ms), runs in processes when there are many."""
    rng = random.Random(seed)
    captions, scenes = [], []
    for _ in range(n):
        scene = world.sample_scene(rng)
        captions.append(world.caption(scene, prefix=rng.choice(PREFIXES)))
        scenes.append(scene)
    workers = min(os.cpu_count() or 1, 16)
    chunks = [scenes[i: i + 2048] for i in range(0, n, 2048)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, chunks))
    else:
        parts = [_render_chunk(c) for c in chunks]
    images = np.concatenate(parts) if parts else np.empty((0, micro.RESOLUTION, micro.RESOLUTION, 3), np.uint8)
    return images, captions, scenes


# A time budget re-plans the run once: the steps from WARM_STEPS to CALIBRATE_STEPS are timed (the first ones
# also pick kernels), then one evaluation.
WARM_STEPS, CALIBRATE_STEPS = 20, 100


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run behind the Python that launched them
    return time.time()


def steps_within(seconds: float, spent: float, done: int, rate: float, planned: int, eval_every: int,
                 eval_seconds: float) -> int:
    """How many steps in all fit a budget of ``seconds``, when ``done`` steps took ``spent`` seconds, a step
    now takes ``rate`` seconds and each evaluation (every ``eval_every`` steps) ``eval_seconds``; at most
    ``planned``, at least ``done``. 10% of the budget is kept back for the last save."""
    per_step = rate + eval_seconds / max(eval_every, 1)
    return max(done, min(planned, done + int((0.9 * seconds - spent) / per_step)))


def _to_tensor(images: np.ndarray):
    # (n, H, W, 3) uint8 -> (n, 3, H, W) in [-1, 1], the VAE's input range
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, seed: int, log) -> float:
    """Train the VAE in place (on its device); returns the final reconstruction PSNR (dB) on 256 held-in images."""
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 + math.cos(math.pi * s / steps)) / 2))
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = _to_tensor(images[idx.numpy()]).to(device)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g if device.type == "cpu" else None)).sample
        # L1 keeps flat colours and edges crisp; the KL only keeps the latent space smooth and bounded.
        rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        loss = rec_loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    return psnr(vae, images)


def tune_decoder(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, seed: int, log) -> None:
    """Train the VAE's decoder alone, in place, on posterior samples of ``images``: the encoder (and so every
    latent a UNet learnt) stays as it is, only the pixels decoded from latents get sharper. The shipped VAE
    decodes small stars with rounded points (read as circles: bench/MICRO_PRETRAIN.md)."""
    device = next(vae.parameters()).device
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (0.05 + 0.95 * (1 + math.cos(math.pi * s / steps)) / 2))
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = _to_tensor(images[idx.numpy()]).to(device)
        with torch.no_grad():  # latents: (B, 4, 16, 16), a sample of the fixed encoder's posterior
            z = vae.encode(x).latent_dist.sample(generator=g if device.type == "cpu" else None)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
    vae.requires_grad_(False)
    vae.eval()


def psnr(vae, images: np.ndarray) -> float:
    """Reconstruction PSNR (dB) of the VAE on the first 256 images."""
    with torch.no_grad():
        x = _to_tensor(images[:256]).to(next(vae.parameters()).device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = (rec - x).pow(2).mean().item() / 4  # in [0, 1] units
    return 10 * math.log10(1.0 / max(mse, 1e-12))


VAE_STAGE = "stage-vae"  # the trained VAE (fp16) and what it was trained with, reused by a rerun


def vae_stage(cfg: PretrainConfig, vae, images: np.ndarray, log):
    """Stage 2: train the VAE, or reuse ``OUT/stage-vae`` when it was trained with the same settings.

    Either way the VAE goes on rounded to fp16, as it ships: the UNet learns exactly the shipped latents."""

    stage = Path(cfg.out) / VAE_STAGE
    key = {k: getattr(cfg, k) for k in ("seed", "num_images", "vae_steps", "vae_batch_size", "vae_lr")}
    marker = stage / "stage.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        log(f"vae: reusing {stage} (trained with the same settings)")
        return AutoencoderKL.from_pretrained(stage, torch_dtype=torch.float32).eval()
    train_vae(vae, images, cfg.vae_steps, cfg.vae_batch_size, cfg.vae_lr, cfg.seed, log)
    vae = vae.to(torch.float16).to(torch.float32)
    copy.deepcopy(vae).to(torch.float16).save_pretrained(stage, safe_serialization=True)
    marker.write_text(json.dumps({"key": key}) + "\n")
    return vae


def load_parts(folder: Path):
    """(text_encoder, vae, unet) of a micro pipeline folder in fp32, to continue pretraining from."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
            AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))


def encode_latents(vae, images: np.ndarray, batch_size: int = 256):
    """Posterior means and stds of every image: (n, 4, 16, 16) each, unscaled."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            dist = vae.encode(_to_tensor(images[i: i + batch_size]).to(next(vae.parameters()).device)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = logger.info) -> dict:
    """Run all stages; write the pipeline to ``cfg.out`` and ``cfg.out/pretrain_report.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report: dict = {"config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads()}

    images, captions, _ = render_world(cfg.num_images, cfg.seed)
    log(f"rendered {len(images)} scenes in {time.time() - t0:.0f} s")
    tokenizer, text_encoder, vae, unet = micro.build(cfg.seed, cfg.unet_width)
    if cfg.init_from:
        text_encoder, vae, unet = load_parts(Path(cfg.init_from))
        log(f"continuing from {cfg.init_from} (its VAE, UNet and text encoder)")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes every step
    text_encoder, vae, unet = text_encoder.to(device), vae.to(device), unet.to(device)

    t1 = time.time()
    if not cfg.init_from:
        vae = vae_stage(cfg, vae, images, log)
    if cfg.decoder_steps:
        tune_decoder(vae, images, cfg.decoder_steps, 32, cfg.decoder_lr, cfg.seed, log)
    vae_psnr = psnr(vae, images)
    means, stds = encode_latents(vae, images)
    # a continued model keeps its VAE's factor: its UNet learned latents scaled by it
    scaling_factor = float(vae.config.scaling_factor) if cfg.init_from else float(1.0 / means.std())
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    vae.requires_grad_(False)
    report["vae"] = {"psnr_db": round(vae_psnr, 2), "scaling_factor": round(scaling_factor, 5),
                     "seconds": round(time.time() - t1)}
    log(f"vae: PSNR {vae_psnr:.1f} dB, scaling_factor {scaling_factor:.4f}, {time.time() - t1:.0f} s")

    # Token ids once: (n, 77). Caption dropout swaps in the empty prompt's ids per step.
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids, empty_ids = ids.to(device), empty_ids.to(device)

    # the same DreamBooth step as `sdtune train` (one definition of the diffusion loss): v-prediction on the
    # micro model's cosine schedule
    family = micro.family()
    objective = family.objective(micro.noise_scheduler(), micro.SCHEDULE["prediction_type"])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    # total[0]: the steps of the run; with a time budget it is re-planned once, early in the warmup (so the
    # cosine schedule still ends at its floor, at the last step that fits)
    total = [cfg.steps]
    lr_at = lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.05 + 0.95 * (1 + math.cos(math.pi * s / total[0])) / 2)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    g = torch.Generator(device).manual_seed(cfg.seed + 1)  # on the device: the step draws its noise with it
    unet.train()
    text_encoder.train()
    t2, history = time.time(), []

    def save_and_score(step: int) -> None:
        ema_unet.eval()
        ema_text.eval()
        pipe = micro.pipeline(tokenizer, ema_text, vae, ema_unet)
        pipe.set_progress_bar_config(disable=True)
        scores = measure.prompt_following(pipe, cfg.eval_images, seed=cfg.seed)
        history.append({"step": step, "seconds": round(time.time() - t2), **asdict(scores)})
        log(f"eval step {step}: {asdict(scores)}")
        micro.save_pipeline(out, tokenizer, ema_text, vae, ema_unet)
        report.update(steps_done=step, unet_seconds=round(time.time() - t2), history=history,
                      total_seconds=round(time.time() - t0))
        (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")

    budget, marks = cfg.seconds > 0 and cfg.steps > CALIBRATE_STEPS, {}
    step = 0
    while step < total[0]:
        step += 1
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g, device=device)
        # latents: (B, 4, 16, 16), a fresh sample of each image's posterior, scaled to unit variance
        noise = torch.randn(means[idx].shape, generator=g, device=device)
        latents = (means[idx] + stds[idx] * noise) * scaling_factor
        input_ids = ids[idx]
        drop = torch.rand(cfg.batch_size, generator=g, device=device) < cfg.caption_dropout
        input_ids[drop] = empty_ids
        conditioning = family.conditioning(family.encode_prompt([text_encoder], [input_ids]), {}, None,
                                           latents.device, latents.dtype)
        loss = training_step(unet, family, objective, latents, conditioning, g).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        if budget and step in (WARM_STEPS, CALIBRATE_STEPS):
            marks[step] = _now(device)
        if budget and step == CALIBRATE_STEPS:
            rate = (marks[CALIBRATE_STEPS] - marks[WARM_STEPS]) / (CALIBRATE_STEPS - WARM_STEPS)
            save_and_score(step)  # also times one evaluation
            total[0] = steps_within(cfg.seconds, _now(device) - t2, step, rate, cfg.steps, cfg.eval_every,
                                    _now(device) - marks[step])
            report["steps_planned"] = total[0]
            log(f"time budget {cfg.seconds:.0f} s: {rate:.4f} s/step, {total[0]} steps")
        if step % 50 == 0:
            rate = (time.time() - t2) / step
            log(f"step {step}/{total[0]} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{rate:.3f} s/step, ~{rate * (total[0] - step) / 60:.0f} min left")
        if (step % cfg.eval_every == 0 or step == total[0]) and not (history and history[-1]["step"] == step):
            save_and_score(step)
    return report
