"""DreamBooth LoRA training: one loop, under Hugging Face Accelerate.

``sdtune train RECIPE`` and ``accelerate launch -m sdtune train RECIPE`` run this same code; Accelerate
decides how many processes there are. The maths of one step is ``training_step``, a pure function of its
inputs and a random generator, which tests call directly.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdtune.checkpoint import clean_temporary, find_checkpoint, flat_keys, load_checkpoint, save_checkpoint
from sdtune.config import Config, RunPlan, check_run
from sdtune.errors import Interrupted, SdtuneError

# --------------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar that is back-propagated
    instance_loss: torch.Tensor  # scalar, detached
    prior_loss: torch.Tensor | None  # scalar, detached; None without prior preservation


def training_step(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    *,
    prediction_type: str = "epsilon",
    prior_preservation: bool = False,
    prior_loss_weight: float = 1.0,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> StepOutput:
    """DreamBooth loss for one batch.

    latents: (B, 4, h, w), already scaled by the VAE's scaling factor. With prior preservation the first
    B/2 rows are instance examples and the last B/2 class examples (one forward pass serves both).
    encoder_hidden_states: (B, 77, D). All randomness (noise, timesteps) comes from ``generator``.
    """
    bsz, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # A per-channel constant shift lets the model learn overall brightness (very dark / light images).
        offset = torch.randn((bsz, channels, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (bsz,), generator=generator, device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise SdtuneError(f"model: unsupported prediction type '{prediction_type}'")

    # Per-example MSE, (B,), in fp32 whatever the compute dtype.
    mse = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        # Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        weight = torch.clamp(snr, max=snr_gamma)
        mse = mse * weight / (snr if prediction_type == "epsilon" else snr + 1)

    if prior_preservation:
        instance, prior = mse.chunk(2)
        instance_loss, prior_loss = instance.mean(), prior.mean()
        loss = instance_loss + prior_loss_weight * prior_loss
        return StepOutput(loss, instance_loss.detach(), prior_loss.detach())
    loss = mse.mean()
    return StepOutput(loss, loss.detach(), None)


# --------------------------------------------------------------------------------------------------------
# Text conditioning


def encode_prompt(
    text_encoders: list[torch.nn.Module], input_ids: list[torch.Tensor], family: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states (B, 77, D), pooled (B, D2) for SDXL else None), as the pipelines compute them."""
    if family != "sdxl":
        return text_encoders[0](input_ids[0], return_dict=True).last_hidden_state, None
    # SDXL: penultimate hidden states of both encoders side by side (768 + 1280 = 2048 wide) and the
    # projected pooled output of the second one.
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(
    original_sizes: list[tuple[int, int]],
    crops: list[tuple[int, int]],
    target_sizes: list[tuple[int, int]],
    crop_conditioning: bool,
) -> torch.Tensor:
    """SDXL micro-conditioning, (B, 6): original (h, w) + crop top-left (y, x) + target (h, w).

    The target is the size each example was cropped to: (resolution, resolution), or its aspect bucket's."""
    rows = [
        [*orig, *(crop if crop_conditioning else (0, 0)), *target]
        for orig, crop, target in zip(original_sizes, crops, target_sizes)
    ]
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# Stopping


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current step (which then saves a
    checkpoint); any further signal, e.g. a second Ctrl-C during that save, is ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=print):
        self.signum: int | None = None
        self._say, self._old = say, {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._say(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")
        else:
            self._say(f"\n{signal.Signals(signum).name} ignored: saving the checkpoint, please wait")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            # Once asked to stop, further signals are ignored until the process exits with 130 / 143.
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)


# --------------------------------------------------------------------------------------------------------
# The run


def _make_optimizer(name: str, groups: list[dict], betas, eps: float, weight_decay: float):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # chosen explicitly: never fall back silently to fp32 AdamW
            raise SdtuneError(
                f"train.optimizer: adamw8bit needs bitsandbytes ({e}); pip install bitsandbytes, "
                "or set train.optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps, weight_decay=weight_decay)
    # Fused kernels (CUDA and CPU): one launch for all LoRA tensors, and they can skip a non-finite step on
    # the device (``found_inf``), which lets the loop run without a host sync per step.
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def skips_on_device(optimizer: Any, scaler: Any) -> bool:
    """Whether a non-finite step can be skipped without the host looking: fp16's grad scaler skips it
    itself, and fused torch AdamW takes a ``found_inf`` flag. Otherwise (8-bit AdamW, foreach) the loop
    must read the flag before ``optimizer.step()``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return scaler is not None or bool(getattr(inner, "defaults", {}).get("fused"))


def _log_grid(accelerator: Any, grid: Any, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)


def train(cfg: Config, plan: RunPlan | None = None) -> Path:
    """Run DreamBooth LoRA training as configured; return the output folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from sdtune.cache import cache_latents, cache_root, cache_text, vae_identity
    from sdtune.data import (
        BucketBatchSampler,
        DreamBoothDataset,
        StreamBatchSampler,
        assign_buckets,
        collate,
        list_images,
        tokenize,
    )
    from sdtune.export import write_kohya
    from sdtune.identifier import check_identifier
    from sdtune.lora import WEIGHT_NAME, add_lora, save_diffusers_lora, trainable_parameters
    from sdtune.memory import estimate
    from sdtune.models import Components, build_pipeline, load_components
    from sdtune.prior import ensure_class_images
    from sdtune.sample import Settings, render_grid, sampling_scheduler, save_image
    from sdtune.share import KOHYA_SUFFIX, write_model_card

    plan = plan or check_run(cfg)  # every config problem is reported before any weight loads
    info, resolution, t = plan.model, plan.resolution, cfg.train
    output_dir = Path(t.output_dir)
    # Accelerate keeps process-wide state; forget the last run's precision and accumulation so train()
    # can run again in one process (notebooks, tests). The distributed state itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Launched as several processes (accelerate launch --multi_gpu, torchrun) on a machine without a GPU:
    # Accelerate uses gloo on the CPU only when told cpu=True, else every process would think it is alone.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    accelerator = Accelerator(
        cpu=launched and not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        dynamo_backend="inductor" if t.compile else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    device = accelerator.device
    if t.mixed_precision == "fp16" and device.type == "cpu":
        raise SdtuneError("train.mixed_precision: fp16 needs a GPU; on CPU use bf16 or no")
    main = accelerator.is_main_process
    say = accelerator.print
    if os.environ.get("MASTER_PORT") and accelerator.num_processes == 1 and not launched:
        say("note: `accelerate launch --cpu` starts one process unless MPI is set up; for N processes on the "
            "CPU use `accelerate launch --multi_gpu --num_processes N` (sdtune then runs them on the CPU with gloo)")
    for w in plan.warnings:
        say(f"warning: {w}")
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg.to_yaml())
        for leftover in clean_temporary(output_dir):
            say(f"removed {leftover.name}: a checkpoint save that was interrupted (the earlier ones are intact)")

    # Same base seed everywhere (identical LoRA init on every process); noise differs per process.
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    generator = torch.Generator(device).manual_seed(t.seed * 1000 + accelerator.process_index)
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    say(f"model: {info.pretrained} ({info.family}, {info.prediction_type}), {resolution} px, {weight_dtype}")
    c: Components = load_components(info.pretrained, info.family, cfg.model.revision, cfg.model.variant,
                                    cfg.model.allow_unsafe_pickle)
    # Is the identifier a single, rare, meaningless token for this model's tokenizer(s)? (sdtune check-token)
    report = check_identifier(cfg.data.identifier, c.tokenizers)
    if report.verdict != "good":
        say(f"warning: data.identifier {report.summary} (see `sdtune check-token {cfg.data.identifier}`, "
            "`sdtune suggest-tokens`)")
    # Frozen weights in the compute dtype; the SDXL VAE overflows in fp16, so it stays fp32 (force_upcast).
    vae_dtype = torch.float32 if c.vae.config.force_upcast else weight_dtype
    c.vae.requires_grad_(False).to(device, vae_dtype)
    c.unet.requires_grad_(False).to(device, weight_dtype)
    for te in c.text_encoders:
        te.requires_grad_(False).to(device, weight_dtype)
    sampler_scheduler = sampling_scheduler(c.noise_scheduler.config)

    # Prior preservation: class images from the base model, before any adapter exists.
    class_paths: list[Path] = []
    if cfg.prior.enabled:
        assert plan.class_dir is not None and cfg.prior.class_prompt
        pipe = build_pipeline(c, info.family, sampler_scheduler)
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            for w in ensure_class_images(
                pipe, plan.class_dir, cfg.prior.class_prompt, cfg.prior.num_class_images,
                resolution=resolution, batch_size=cfg.prior.generation_batch_size, steps=cfg.prior.generation_steps,
                guidance_scale=cfg.prior.generation_guidance, seed=t.seed, model_id=info.pretrained,
                process_index=accelerator.process_index, num_processes=accelerator.num_processes, progress=main,
            ):
                say(f"warning: {w}")
        accelerator.wait_for_everyone()
        class_paths = list_images(plan.class_dir)[: cfg.prior.num_class_images]
        say(f"prior preservation: {len(class_paths)} class images in {plan.class_dir}")
        del pipe

    # Aspect-ratio buckets: each instance image at the `sdtune prep --crop bucket` bucket nearest its shape,
    # among those whose sides the UNet takes without resampling (VAE factor x 2 per UNet downsampling:
    # 64 for SD1.x/2.x, 32 for SDXL, 16 for the tiny test models). Buckets are centre crops.
    buckets = None
    if cfg.data.aspect_buckets:
        multiple = 2 ** (len(c.vae.config.block_out_channels) - 1) * 2 ** (len(c.unet.config.down_block_types) - 1)
        buckets = assign_buckets([e.path for e in plan.examples], resolution, multiple)
        say("aspect buckets: " + ", ".join(f"{w}x{h} ({k} images)" for (w, h), k in sorted(Counter(buckets).items())))
    dataset = DreamBoothDataset(
        plan.examples, resolution, cfg.data.center_crop, cfg.data.random_flip, cfg.data.repeats,
        class_paths or None, cfg.prior.class_prompt, seed=t.seed, buckets=buckets,
    )

    # Caches: the frozen VAE and text encoders run once per image / caption instead of every step.
    lora = cfg.lora
    latent_cache = None
    if t.cache_latents and not dataset.center_crop:  # buckets are centre crops too
        say("note: train.cache_latents is off because data.center_crop=false takes a new random crop every step")
    elif t.cache_latents:
        vae_id = vae_identity(info.pretrained, cfg.model.revision, cfg.model.variant, c.vae.config, str(vae_dtype))
        # Every (image, size) the data can ask for: a class image once per bucket it is paired with.
        items = [(path, flip, size) for path, size in dataset.targets()
                 for flip in ((False, True) if cfg.data.random_flip else (False,))]
        # Each process encodes what it needs from the shared disk cache; the main one first, so the others
        # mostly read its files.
        with accelerator.main_process_first():
            latent_cache = cache_latents(c.vae, items, vae_id, cache_root() / "latents", progress=main)
        dataset.latents = latent_cache
    text_cache = None
    if t.cache_text_embeddings and not lora.train_text_encoder:
        captions = [e.caption for e in plan.examples] + ([cfg.prior.class_prompt] if class_paths else [])
        with torch.no_grad(), accelerator.autocast():
            text_cache = cache_text(
                captions,
                lambda caps: encode_prompt(c.text_encoders, [i.to(device) for i in tokenize(c.tokenizers, caps)],
                                           info.family),
            )
    offloaded = t.offload_frozen and device.type != "cpu" and latent_cache is not None and text_cache is not None
    if offloaded:
        # Nothing in the step needs them now; sampling brings them back for a moment.
        for m in (c.vae, *c.text_encoders):
            m.to("cpu")
        torch.cuda.empty_cache()
    if t.channels_last and device.type == "cuda":
        c.unet.to(memory_format=torch.channels_last)

    # LoRA adapters; their parameters are trained in fp32 even under mixed precision.
    add_lora(c.unet, lora.rank, lora.alpha, lora.target_modules, lora.dropout, lora.use_dora)
    trained: dict[str, torch.nn.Module] = {"unet": c.unet}
    if lora.train_text_encoder:
        add_lora(c.text_encoder, lora.rank, lora.alpha, lora.text_encoder_target_modules, lora.dropout,
                 lora.use_dora, key="lora.text_encoder_target_modules")
        trained["text_encoder"] = c.text_encoder
        if info.family == "sdxl" and cfg.sdxl.train_text_encoder_2:
            add_lora(c.text_encoder_2, lora.rank, lora.alpha, lora.text_encoder_target_modules, lora.dropout,
                     lora.use_dora, key="lora.text_encoder_target_modules")
            trained["text_encoder_2"] = c.text_encoder_2
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if t.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        for name in ("text_encoder", "text_encoder_2"):
            if name in trained:
                trained[name].gradient_checkpointing_enable()

    groups = [{"params": trainable_parameters(c.unet), "lr": t.learning_rate}]
    te_params = trainable_parameters(*(m for n, m in trained.items() if n != "unet"))
    if te_params:
        groups.append({"params": te_params, "lr": lora.text_encoder_lr or t.learning_rate})
    optimizer = _make_optimizer(t.optimizer, groups, (t.adam_beta1, t.adam_beta2), t.adam_epsilon, t.weight_decay)
    if t.optimizer == "adamw8bit":
        # bitsandbytes keeps tensors under 4096 elements in 32-bit state (small tensors quantise badly);
        # at low LoRA ranks that is most of them, so say how much is really 8-bit.
        tensors = [p for g in groups for p in g["params"]]
        big = [p for p in tensors if p.numel() >= 4096]
        say(f"8-bit AdamW: 8-bit state for {len(big)} of {len(tensors)} LoRA tensors "
            f"({sum(p.numel() for p in big):,} of {sum(p.numel() for p in tensors):,} values); "
            "bitsandbytes keeps tensors under 4096 values in 32-bit")
    # A pre-flight estimate of peak GPU memory (printed on every device; on a CPU it says what a GPU needs).
    def count(*ms):
        return sum(p.numel() for m in ms for p in m.parameters())

    fp32_vae = c.vae.dtype == torch.float32
    est = estimate(
        unet_params=count(c.unet) - count_trainable(groups),
        frozen_on_gpu_params=0 if offloaded else count(*c.text_encoders) + (0 if fp32_vae else count(c.vae)),
        fp32_on_gpu_params=count(c.vae) if fp32_vae and not offloaded else 0,
        trainable_params=count_trainable(groups), weight_bytes=torch.finfo(weight_dtype).bits // 8,
        images_per_micro_batch=t.batch_size * (2 if class_paths else 1), resolution=resolution,
        gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
        latents_cached=latent_cache is not None, vae_bytes=torch.finfo(vae_dtype).bits // 8,
    )
    say(est.line())
    # Stepped once per optimizer step by this loop (not prepared), so no num_processes scaling is needed.
    lr_scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps
    )
    prepared = accelerator.prepare(*trained.values(), optimizer)
    modules = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    unet = modules["unet"]
    text_encoders = [modules.get("text_encoder", c.text_encoder)]
    if info.family == "sdxl":
        text_encoders.append(modules.get("text_encoder_2", c.text_encoder_2))

    config_dict = cfg.model_dump(mode="json")
    global_step = 0
    if t.resume:
        ckpt = find_checkpoint(output_dir, t.resume)
        if ckpt is None:
            say(f"train.resume=latest: no checkpoint in {output_dir / 'checkpoints'} yet; starting at step 0")
        else:
            global_step = load_checkpoint(ckpt, accelerator, trained, optimizer, lr_scheduler, generator, config_dict)
            say(f"resumed from {ckpt} at step {global_step}")

    # This process's micro-batches from the one the resumed step needs (global micro-batch k = step x accumulation).
    start = global_step * t.gradient_accumulation_steps
    if buckets is not None:  # batches of one bucket each (one tensor shape per step)
        batch_sampler = BucketBatchSampler([dataset.size(i) for i in range(len(dataset))], t.batch_size, t.seed,
                                           accelerator.process_index, accelerator.num_processes, start=start)
    else:
        batch_sampler = StreamBatchSampler(len(dataset), t.batch_size, t.seed, accelerator.process_index,
                                           accelerator.num_processes, start=start)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=t.dataloader_workers,
        pin_memory=device.type == "cuda", persistent_workers=t.dataloader_workers > 0,
        # Its own generator: creating the iterator would otherwise draw from the global RNG, which a resume
        # has just restored (dropout must see the same stream as in the uninterrupted run).
        generator=torch.Generator().manual_seed(t.seed),
    )

    if accelerator.is_main_process and accelerator.trackers == [] and t.report_to != "none":
        init = {"wandb": {"dir": str(output_dir)}} if t.report_to == "wandb" else {}
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_keys(config_dict).items()}
        accelerator.init_trackers("sdtune", config=hparams, init_kwargs=init)

    def sample(step: int) -> Path | None:
        """Render the fixed-seed grid with the live adapters; runs on the main process only."""
        path = None
        if main:
            prompts = cfg.sample.prompts or list(dict.fromkeys(
                [plan.examples[0].caption if plan.examples else cfg.data.instance_prompt]
                + ([cfg.prior.class_prompt] if cfg.prior.class_prompt else [])
            ))
            parts = Components(
                tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, vae=c.vae, noise_scheduler=c.noise_scheduler,
                unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoders[0]),
                text_encoder_2=accelerator.unwrap_model(text_encoders[1]) if len(text_encoders) > 1 else None,
            )
            pipe = build_pipeline(parts, info.family, sampler_scheduler)
            pipe.set_progress_bar_config(disable=True)
            if offloaded:
                for m in (c.vae, *c.text_encoders):
                    m.to(device)
            for m in trained.values():
                m.eval()
            with accelerator.autocast():
                settings = Settings(negative_prompt=cfg.sample.negative_prompt, steps=cfg.sample.steps,
                                    width=resolution, height=resolution)
                grid = render_grid(pipe, prompts, cfg.sample.seeds, settings,
                                   guidance_scale=cfg.sample.guidance_scale, title=f"step {step}")
            for m in trained.values():
                m.train()
            if offloaded:
                for m in (c.vae, *c.text_encoders):
                    m.to("cpu")
                torch.cuda.empty_cache()
            path = save_image(grid, output_dir / "samples" / f"step-{step:06d}.png")
            _log_grid(accelerator, grid, step)
        accelerator.wait_for_everyone()
        return path

    say(
        f"training {sum(p.numel() for g in groups for p in g['params']):,} LoRA parameters "
        f"({', '.join(trained)}) for {t.max_steps} steps, batch {t.batch_size} x {t.gradient_accumulation_steps} "
        f"accumulation x {accelerator.num_processes} processes"
        + (f", with {len(class_paths)} class images" if class_paths else "")
    )
    for m in trained.values():
        m.train()
    params = [p for g in groups for p in g["params"]]
    progress = tqdm(total=t.max_steps, initial=global_step, desc="train", disable=not main, unit="step")
    # Steady-state speed is timed from `timing_from` to the end (two host syncs in the whole run).
    timing_from = min(global_step + 10, (global_step + t.max_steps) // 2)
    timer_start, timer_step = time.perf_counter(), global_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_sum = torch.zeros((), device=device)  # summed on device; read (a host sync) only every log_every
    loss_count = torch.zeros((), device=device)
    last_log_time, last_log_step = time.perf_counter(), global_step
    # Whether each step's loss and gradients were finite, as device flags; read in one go at the next log,
    # checkpoint or sample (`check_steps`), so the loop itself never waits for the GPU.
    defer = skips_on_device(optimizer, accelerator.scaler)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    pending: list[tuple[int, torch.Tensor, list[str]]] = []  # (step, finite flag, batch files)
    nonfinite_in_a_row = nonfinite_total = 0

    def check_steps() -> None:
        """Warn about each skipped (non-finite) step since the last check; stop after too many in a row."""
        nonlocal nonfinite_in_a_row, nonfinite_total
        if not pending:
            return
        flags = torch.stack([flag for _, flag, _ in pending]).tolist()  # the one host sync
        for (step, _, paths), ok in zip(pending, flags):
            if ok:
                nonfinite_in_a_row = 0
                continue
            nonfinite_in_a_row, nonfinite_total = nonfinite_in_a_row + 1, nonfinite_total + 1
            files = ", ".join(sorted({Path(p).name for p in paths}))
            say(f"warning: step {step}: loss or gradients not finite, update skipped (batch: {files})")
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise SdtuneError(
                    f"loss or gradients were not finite for {nonfinite_in_a_row} steps in a row (last batch: {files});"
                    " stopped. Nothing non-finite was saved. Try a lower train.learning_rate, bf16 instead of fp16,"
                    " or check those images"
                )
        pending.clear()

    # A LoRA that has not moved after a few steps never will (lr 0, nothing trainable, A = B = 0).
    initial_step, change_check_step = global_step, min(global_step + 5, t.max_steps)
    initial_params = [p.detach().clone() for p in params]
    data_iter = iter(loader)
    with StopSignals(say) as stop:  # SIGINT / SIGTERM handlers during the loop only
        while global_step < t.max_steps:
            batch = next(data_iter)
            with accelerator.accumulate(*modules.values()):
                with torch.no_grad():
                    if latent_cache is not None:
                        # cached (B, 8, h, w) mean + log-variance; a fresh sample every step, as uncached
                        latent_params = batch["latent_params"].to(device, non_blocking=True)
                        latents = DiagonalGaussianDistribution(latent_params).sample(generator=generator)
                    else:
                        pixel_values = batch["pixel_values"].to(device, vae_dtype, non_blocking=True)
                        # (B, 3, H, W) -> (B, 4, H/8, W/8)
                        latents = c.vae.encode(pixel_values).latent_dist.sample(generator=generator)
                    latents = (latents * c.vae.config.scaling_factor).to(weight_dtype)
                if text_cache is not None:
                    cached = [text_cache[caption] for caption in batch["captions"]]
                    encoder_hidden_states = torch.stack([hidden for hidden, _ in cached])  # (B, 77, D)
                    pooled = torch.stack([p for _, p in cached]) if info.family == "sdxl" else None
                else:
                    input_ids = [ids.to(device) for ids in tokenize(c.tokenizers, batch["captions"])]
                    with torch.set_grad_enabled(lora.train_text_encoder):
                        encoder_hidden_states, pooled = encode_prompt(text_encoders, input_ids, info.family)
                added_cond_kwargs = None
                if info.family == "sdxl":
                    time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"],
                                             cfg.sdxl.crop_conditioning)
                    added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(device, weight_dtype)}
                with accelerator.autocast():
                    out = training_step(
                        unet, c.noise_scheduler, latents, encoder_hidden_states, generator,
                        prediction_type=info.prediction_type, prior_preservation=bool(class_paths),
                        prior_loss_weight=cfg.prior.loss_weight, noise_offset=t.noise_offset, snr_gamma=t.snr_gamma,
                        added_cond_kwargs=added_cond_kwargs,
                    )
                accelerator.backward(out.loss)
                finite = torch.isfinite(out.loss.detach())  # () bool, on the device
                step_ok = True
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
                    # A NaN/inf loss or gradient must never reach the weights.
                    finite = finite & torch.isfinite(grad_norm)
                    if not defer:
                        step_ok = bool(finite)  # a host sync: this optimizer cannot skip on its own
                    elif accelerator.scaler is None:
                        inner_optimizer.found_inf = (~finite).float()  # the fused kernel skips the update
                if step_ok or accelerator.scaler is not None:  # fp16: the grad scaler skips inf steps itself
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += torch.where(finite, out.loss.detach(), 0.0)
            loss_count += finite
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            pending.append((global_step, finite, batch["paths"]))
            if not defer:
                check_steps()
            if global_step == change_check_step:
                check_steps()
                # Relative to the weights' size: a learning rate of 1e-30 "moves" lora_B off zero, uselessly.
                delta = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(params, initial_params))
                scale = max(float(p0.abs().max()) for p0 in initial_params)
                if delta <= 1e-7 * max(scale, 1e-12):
                    raise SdtuneError(
                        f"the LoRA weights did not change in {global_step - initial_step} steps (learning rate "
                        f"{lr_scheduler.get_last_lr()[0]:g}, {nonfinite_total} skipped steps); training on would "
                        "produce an empty LoRA. Check train.learning_rate, lr_warmup_steps and lora settings"
                    )
                del initial_params[:]
            if accelerator.num_processes > 1 and global_step % t.log_every == 0:
                # all processes must stop at the same step: agree on the flag (a sync, so not every step)
                flag = accelerator.reduce(torch.tensor(stop.signum or 0, device=device), reduction="max")
                stop.signum = int(flag.item()) or None
            if stop.signum is not None and (accelerator.num_processes == 1 or global_step % t.log_every == 0):
                check_steps()
                save_checkpoint(accelerator, output_dir, global_step, trained_unwrapped(accelerator, modules),
                                optimizer, lr_scheduler, generator, config_dict, info.family, t.checkpoints_total_limit)
                progress.close()
                raise Interrupted(
                    f"stopped by {signal.Signals(stop.signum).name} at step {global_step}; checkpoint saved in "
                    f"{output_dir / 'checkpoints'}; continue with train.resume=latest", 128 + stop.signum,
                )
            if global_step == timing_from:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timer_start, timer_step = time.perf_counter(), global_step
            if global_step % t.log_every == 0 or global_step == t.max_steps:
                check_steps()
                # mean over the finite steps of all processes (0 / 0 = nan when none was), one host sync
                loss = float(accelerator.reduce(loss_sum, reduction="sum") / accelerator.reduce(loss_count, reduction="sum"))
                now = time.perf_counter()
                logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0],
                        "steps_per_s": (global_step - last_log_step) / max(now - last_log_time, 1e-9)}
                if out.prior_loss is not None:
                    logs["prior_loss"] = out.prior_loss.item()
                if not math.isfinite(loss):
                    say(f"warning: loss is {loss} at step {global_step}")
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                if main:  # a plain record too, one line per log point (a resume appends)
                    with open(output_dir / "losses.jsonl", "a") as f:
                        f.write(json.dumps({"step": global_step, **logs}) + "\n")
                loss_sum.zero_()
                loss_count.zero_()
                last_log_time, last_log_step = now, global_step
            if t.checkpoint_every and global_step % t.checkpoint_every == 0 and global_step < t.max_steps:
                check_steps()
                save_checkpoint(accelerator, output_dir, global_step, trained_unwrapped(accelerator, modules),
                                optimizer, lr_scheduler, generator, config_dict, info.family, t.checkpoints_total_limit)
            if cfg.sample.every and global_step % cfg.sample.every == 0 and global_step < t.max_steps:
                check_steps()
                sample(global_step)
    check_steps()
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steady_steps = global_step - timer_step
    s_per_step = (time.perf_counter() - timer_start) / steady_steps if steady_steps else float("nan")
    images_per_step = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    summary = {
        "global_step": global_step,
        "timed_steps": steady_steps,
        "s_per_step": s_per_step,
        "img_per_s": images_per_step / s_per_step if steady_steps else float("nan"),
        "images_per_step": images_per_step,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "mixed_precision": accelerator.mixed_precision,
        "optimizer": t.optimizer,
    }

    final = trained_unwrapped(accelerator, modules)
    save_checkpoint(accelerator, output_dir, global_step, final, optimizer, lr_scheduler, generator, config_dict,
                    info.family, t.checkpoints_total_limit)
    if main:
        save_diffusers_lora(output_dir, info.family, **final)
        # The single file AUTOMATIC1111, ComfyUI, Forge and InvokeAI load (kohya names, real alpha).
        write_kohya(output_dir / f"{output_dir.name}{KOHYA_SUFFIX}", info.family, **final,
                    trigger_word=cfg.data.identifier, base_model=info.pretrained,
                    prediction_type=info.prediction_type, resolution=resolution)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    grid = sample(global_step)
    accelerator.end_training()
    if main:
        card = write_model_card(output_dir, config_dict, info.family)
        say(f"LoRA: {output_dir / WEIGHT_NAME}")
        say(f"samples: {grid}")
        say(f"model card: {card}")
    return output_dir


def count_trainable(groups: list[dict]) -> int:
    return sum(p.numel() for g in groups for p in g["params"])


def trained_unwrapped(accelerator: Any, modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return {name: accelerator.unwrap_model(m) for name, m in modules.items()}

