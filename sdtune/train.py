"""DreamBooth LoRA training: one loop, under Hugging Face Accelerate.

``sdtune train RECIPE`` and ``accelerate launch -m sdtune train RECIPE`` run this same code; Accelerate decides
how many processes there are. ``train()`` reads as setup -> loop -> finish:

- ``setup`` turns a checked recipe (``sdtune.plan.RunPlan``) into a ``Run``: the model's parts on the device,
  class images, the dataset and its caches, LoRA adapters, optimizer and schedule, a resumed step;
- ``loop`` runs optimizer steps to ``train.max_steps``, watched by the guards of ``sdtune.guards``;
- ``finish`` saves the last checkpoint, the LoRA files, a summary, a sample grid and the model card.

One batch: cached latent distributions (or pixels) -> ``batch_latents``; captions -> ``batch_conditioning``
(text cache or the family's text encoders, then ``Family.conditioning``); both -> ``training_step``, a pure
function of its inputs and a random generator that tests call directly: the family's ``Objective`` draws noise
and timesteps and gives the target, ``Family.predict`` runs the denoiser, the loss is their MSE (or the Huber /
smooth-L1 loss of ``train.loss``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, offload_models
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sdtune import fsdp, trackers
from sdtune.cache import LatentStore, TextCache, cache_latents, note_identity, shard, vae_identity
from sdtune.checkpoint import clean_temporary, load_checkpoint, rewind, save_checkpoint
from sdtune.config import Config, ConfigError
from sdtune.data import (
    BucketBatchSampler,
    CaptionRules,
    DreamBoothDataset,
    MaskRules,
    StreamBatchSampler,
    assign_buckets,
    collate,
    list_images,
    upright_size,
)
from sdtune.ema import AdapterEMA, ema_summary, ema_weights, make_ema
from sdtune.errors import DiskFull, Interrupted, SdtuneError
from sdtune.export import (
    WRITERS,
    ImageSet,
    bucket_info,
    data_summary,
    public_name,
    run_files,
    write_data_summary,
    write_run_files,
)
from sdtune.families import Components, Family, TextEncoderSpec
from sdtune.files import cache_root, free_bytes, is_disk_full, mib, write_text
from sdtune.grid import Settings
from sdtune.guards import NonFiniteGuard, Pause, StalledLoraGuard, StepTimer, StopSignals
from sdtune.locks import Busy, cache_lock, run_lock
from sdtune.lora import adapter_state_dict, add_lora, has_adapter, save_diffusers_lora, trainable_parameters
from sdtune.memory import estimate
from sdtune.models import load_components, model_identity, torch_dtype
from sdtune.objectives import MSE, LossFunction, Objective, scale_latents
from sdtune.optim import (
    MIN_8BIT_SIZE,
    averaged_weights,
    eight_bit_share,
    is_schedule_free,
    make_optimizer,
    start_training,
    state_copies,
    step_size_logs,
)
from sdtune.pivotal import Embeddings
from sdtune.pivotal import create as create_embeddings
from sdtune.plan import (
    FP16_ON_CPU,
    RunPlan,
    base_identity,
    check_run,
    class_fingerprint,
    class_images_dir,
    class_sets,
    default_sample_prompts,
    with_family_defaults,
)
from sdtune.prior import ensure_class_images, missing_class_indices, other_class_images
from sdtune.quantize import frozen_size, quantize
from sdtune.resume import flat_keys, refuse_data_drift
from sdtune.runs import CARD, CHECKPOINTS, CONFIG, EMBEDDINGS_DIR, LOSSES, RUN_MARKER, WEIGHT_NAME
from sdtune.sample import render_grid, save_image
from sdtune.schedulers import sampling_scheduler
from sdtune.share import write_model_card
from sdtune.validation import Validator, build_validator, validation_summary


class _MainProcessLogger(logging.LoggerAdapter):
    """Logs on the main process only (as ``accelerate.logging.get_logger`` does, without its "[RANK 0]" prefix
    on every line)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if PartialState().is_main_process:
            super().log(level, msg, *args, **kwargs)


logger = _MainProcessLogger(logging.getLogger(__name__))

# --------------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar that is back-propagated
    instance_loss: torch.Tensor  # scalar, detached
    prior_loss: torch.Tensor | None  # scalar, detached; None without prior preservation


def training_step(
    denoiser: torch.nn.Module,
    family: Family,
    objective: Objective,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    generator: torch.Generator,
    *,
    prior_preservation: bool = False,
    prior_loss_weight: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    loss_function: LossFunction = MSE,
) -> StepOutput:
    """DreamBooth loss for one batch.

    latents: (B, C, h, w) in the denoiser's latent space (``scale_latents``). With prior preservation the first
    B/2 rows are instance examples and the last B/2 class examples (one forward pass serves both).
    conditioning: the denoiser's other inputs (``Family.conditioning``), e.g. encoder_hidden_states (B, 77, D).
    All randomness (noise, timesteps) comes from ``generator``.
    loss_function: MSE, Huber or smooth-L1 (``train.loss``), per element before any mask or weight.
    loss_mask: (B, 1, h, w) weights of each latent pixel's loss (data.masked_loss), applied before the mean.
    """
    noise, timesteps = objective.sample(latents, generator)
    noisy_latents = objective.add_noise(latents, noise, timesteps)
    model_pred = family.predict(denoiser, noisy_latents, timesteps, conditioning)
    target = objective.target(latents, noise, timesteps)

    # Per-example loss, (B,), in fp32 whatever the compute dtype.
    per_element = loss_function.per_element(objective, model_pred, target, timesteps)  # (B, C, h, w)
    if loss_mask is not None:
        per_element = per_element * loss_mask  # (B, 1, h, w): the same weight for every channel of a pixel
    mse = per_element.mean(dim=tuple(range(1, target.dim())))
    weights = objective.loss_weights(timesteps)
    if weights is not None:
        mse = mse * weights
    if prior_preservation:
        instance, prior = mse.chunk(2)
        instance_loss, prior_loss = instance.mean(), prior.mean()
        loss = instance_loss + prior_loss_weight * prior_loss
        return StepOutput(loss, instance_loss.detach(), prior_loss.detach())
    loss = mse.mean()
    return StepOutput(loss, loss.detach(), None)


# --------------------------------------------------------------------------------------------------------
# The run's state


@dataclass
class Run:
    """Everything the loop and ``finish`` work with, built by ``setup``."""

    cfg: Config
    plan: RunPlan
    accelerator: Accelerator
    components: Components  # the model's parts (unwrapped; the trained ones carry the LoRA adapters)
    options: Any  # the family's own options (its recipe section), or None
    objective: Objective
    generator: torch.Generator  # every random draw of a step; its state is in each checkpoint
    weight_dtype: torch.dtype
    class_paths: list[Path]
    dataset: DreamBoothDataset
    latent_cache: LatentStore | None  # the cached latents, read per batch from their files
    text_cache: TextCache | None
    offloaded: bool  # VAE and frozen text encoders are kept off the GPU (caches make them unneeded)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # trained, as prepared, by component name
    text_encoders: list[torch.nn.Module] = field(default_factory=list)  # what encodes prompts in a step
    optimizer: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)  # what the optimizer trains, in its order
    lr_scheduler: Any = None
    loader: Any = None
    global_step: int = 0
    timing: dict[str, float] = field(default_factory=dict)  # the loop's times, for train_summary.json
    data: dict[str, dict] = field(default_factory=dict)  # fingerprints of the instance and class images
    ema: AdapterEMA | None = None  # train.ema: the average of the LoRA weights (sdtune.ema)
    validator: Validator | None = None  # train.validation_every: the held-out images (sdtune.validation)
    embeddings: Embeddings | None = None  # pivotal tuning: the identifiers' trained token embeddings

    @property
    def pivot_step(self) -> int:
        """Pivotal tuning trains the embeddings in steps [0, pivot_step), then only the LoRA: the first
        ``pivotal.fraction`` of ``train.max_steps``, or the step they stopped at in an earlier part of the run."""
        if self.embeddings is not None and self.embeddings.stopped_at is not None:
            return self.embeddings.stopped_at
        return max(1, round(self.cfg.pivotal.fraction * self.cfg.train.max_steps))

    def embeddings_training(self) -> bool:
        return self.embeddings is not None and self.global_step < self.pivot_step

    @property
    def family(self) -> Family:
        return self.plan.family

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def sharded(self) -> bool:
        """Whether the denoiser is sharded by FSDP (``sdtune.fsdp``): then every process takes part in each of
        its forward passes (sampling, validation) and in reading its weights."""
        return fsdp.is_sharded(self.accelerator)

    def whole_params(self) -> list[torch.Tensor]:
        """The trained tensors whole, in the optimizer's order: gathered under FSDP (every process calls this),
        else ``params`` themselves."""
        return [fsdp.full_tensor(p.detach()) for p in self.params] if self.sharded else self.params

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        """The trained modules without Accelerate's wrappers or torch.compile's, by component name: their
        state dicts have the model's own key names (a compiled module's would start with ``_orig_mod.``), and
        sampling with them never triggers a compilation."""
        return {name: self.accelerator.unwrap_model(m, keep_torch_compile=False) for name, m in self.modules.items()}

    def save(self) -> Path:
        """A verified checkpoint of this step (all processes take part)."""
        return save_checkpoint(self.accelerator, self.output_dir, self.global_step, self.unwrapped(), self.optimizer,
                               self.lr_scheduler, self.generator, self.cfg.model_dump(mode="json"), self.family,
                               self.cfg.train.checkpoints_total_limit, data=self.data, ema=self.ema,
                               embeddings=self.embeddings)

    def sync(self) -> None:
        """Wait for the device (for timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# setup writes the run folder's first byte last (``_claim_output``); class images and cache entries are written one
# by one into their own caches, which the next run completes instead of starting over
SETUP_INTERRUPTED = ("interrupted before the first step: nothing to resume and the run folder is as it was; the class "
                     "images and cached latents made so far are kept, and the same command again reuses them")


def train(cfg: Config, plan: RunPlan | None = None) -> Path:
    """Run DreamBooth LoRA training as configured; return the output folder."""
    plan = plan or check_run(cfg)  # every config problem is reported before any weight loads
    # what the run folder records: absolute paths (commands on it then work from any folder) and the family's
    # defaults (as check_run saw them)
    cfg = with_family_defaults(cfg.resolved_paths(), plan.family)
    accelerator = make_accelerator(cfg)
    with _exclusive(accelerator, Path(cfg.train.output_dir)):  # one run per folder
        try:
            run = setup(cfg, plan, accelerator)
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM: sdtune.cli) while loading, generating or caching
            raise Interrupted(SETUP_INTERRUPTED, 130) from None
        loop(run)
        return finish(run)


@contextmanager
def _exclusive(accelerator: Accelerator, output_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock (``sdtune.locks.run_lock``) on the main process; every process raises the
    main one's refusal, so none is left waiting for the others."""
    refusal: list[str | None] = [None]
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            try:
                stack.enter_context(run_lock(output_dir))
            except Busy as e:
                refusal = [str(e)]
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list(refusal)
        if refusal[0]:
            raise Busy(refusal[0])
        yield


# --------------------------------------------------------------------------------------------------------
# Setup


def setup(cfg: Config, plan: RunPlan, accelerator: Accelerator) -> Run:
    """Everything before the first step, in an order that keeps runs reproducible (seed, then adapters).
    Every check runs before the run folder's first byte is written (``_claim_output``, at the end)."""
    t = cfg.train
    for w in plan.warnings:
        logger.warning(w)
    saved_processes = plan.resume_state.get("num_processes", accelerator.num_processes)
    if plan.resume_from and saved_processes != accelerator.num_processes:
        raise SdtuneError(f"train.resume: {plan.resume_from} was written by {saved_processes} processes, this run "
                          f"has {accelerator.num_processes}; the data order would change. Launch with the same count")
    set_seed(t.seed)  # the same base seed everywhere: identical LoRA init on every process
    generator = torch.Generator(accelerator.device).manual_seed(t.seed * 1000 + accelerator.process_index)
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    components, weight_dtype = _load_model(cfg, plan, accelerator)
    identity = base_identity(cfg, plan.family)  # the base model's bytes: class images' key, and what resume checks
    class_paths = _class_images(cfg, plan, components, accelerator, identity)
    dataset = _dataset(cfg, plan, class_paths, components)
    run = Run(
        cfg=cfg, plan=plan, accelerator=accelerator, components=components, options=cfg.family_options(plan.family),
        objective=plan.family.objective(components.noise_scheduler, plan.model.prediction_type,
                                        noise_offset=t.noise_offset, snr_gamma=t.snr_gamma,
                                        options=cfg.family_options(plan.family)),
        generator=generator, weight_dtype=weight_dtype, class_paths=class_paths, dataset=dataset,
        latent_cache=_latent_cache(cfg, plan, components, dataset, accelerator),
        text_cache=None, offloaded=False,
        # what a resume checks it continues on: the photos, the class images, and the base model's bytes
        data={"instance": plan.data, "class": class_fingerprint(cfg, class_paths),
              "model": {"identity": identity}},
    )
    # pivotal tuning changes what a caption encodes to while it trains: captions are encoded in each step
    run.text_cache = _text_cache(run) if not cfg.pivotal.enabled else None
    run.validator = build_validator(cfg, plan.validation, plan.resolution, plan.model.bucket_multiple,
                                    components, plan.family, run.options, run.objective, run.device,
                                    weight_dtype, accelerator.autocast)  # while the VAE and encoders are here
    run.offloaded = t.offload_frozen and run.device.type != "cpu" and run.latent_cache is not None \
        and run.text_cache is not None
    if run.offloaded:  # nothing in the step needs them now; sampling brings them back for a moment
        for m in (components.vae, *components.text_encoders):
            m.to("cpu")
        torch.cuda.empty_cache()
    if t.channels_last and run.device.type == "cuda":
        components.denoiser.to(memory_format=torch.channels_last)

    if t.compile and dataset.buckets:
        # one graph per bucket: past Dynamo's recompile limit (8) the step would fall back to eager, silently
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(set(dataset.buckets)) + 2)
    trained = _add_adapters(cfg, plan.family, run.options, components, plan.resume_from)
    run.embeddings = _embeddings(cfg, plan.family, components)
    if run.embeddings is not None and run.validator is not None:
        run.validator.rewrite = run.embeddings.rewrite
    optimizer = _optimizer(cfg, plan.family, trained, run.embeddings)
    _log_memory_estimate(run, trained, optimizer)
    # Stepped once per optimizer step by this loop (not prepared), so no num_processes scaling is needed.
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    _frozen_stay_local(trained.values())
    *prepared, run.optimizer = accelerator.prepare(*trained.values(), optimizer)
    run.modules, run.lr_scheduler = dict(zip(trained, prepared)), lr_scheduler
    if run.sharded:
        fsdp.outputs_in_fp32(run.modules[plan.family.denoiser_name], accelerator)
        _log_sharding(run)
    run.params = [p for group in optimizer.param_groups for p in group["params"]]
    run.ema = make_ema(run.params, t.ema, t.ema_decay, t.ema_on_cpu)
    run.text_encoders = [run.modules.get(spec.name, encoder)
                         for spec, encoder in zip(plan.family.text_encoders, components.text_encoders)]
    _check_space(run)
    run.global_step = _resume(run)
    _claim_output(run)
    run.loader = _loader(run)
    _log_epoch_intervals(run)
    _init_trackers(run)
    return run


def _frozen_stay_local(modules: Iterable[torch.nn.Module]) -> None:
    """Tell DDP to leave each module's frozen parameters and its buffers alone. Wrapping a module, it broadcasts
    every parameter and buffer from the main process (and the buffers again before each forward); the frozen
    ones are the same in every process, read from the same files. So a FLUX.1 transformer's 24 GB are not sent
    at the start, and weights stored in fp8 (model.quantize=fp8), which gloo cannot send at all, stay put. The
    trained ones are still broadcast: every process starts from the main one's LoRA. (FSDP does not read it.)"""
    for module in modules:
        local = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, local)


def _log_sharding(run: Run) -> None:
    """What FSDP shards: the denoiser's FSDP units by block class, over how many processes."""
    name = run.family.denoiser_name
    units = ", ".join(f"{cls} x {n}" for cls, n in fsdp.sharded_units(run.modules[name]).items())
    logger.info(f"FSDP: the {name} is sharded over {run.accelerator.num_processes} processes, in units of "
                f"{units or 'one: no block class of the model was wrapped'} and the rest; the memory estimate "
                "above is for one process holding it whole")


def _claim_output(run: Run) -> None:
    """The run's first writes into its folder, once every check has passed: the marker that makes it sdtune's
    (``sdtune.runs.claimed_by_sdtune``), the resolved recipe, and the removal of an interrupted save's leftovers."""
    if not run.main:
        return
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RUN_MARKER, "This folder is an sdtune run: sdtune may replace the files it wrote here.\n")
    write_text(out / CONFIG, run.cfg.to_yaml())
    for leftover in clean_temporary(out):
        logger.info(f"removed {leftover.name}: a checkpoint save that was interrupted (the earlier ones are intact)")


def _lora_bytes(run: Run) -> int:
    """The trained LoRA's size in fp32, as every file that holds it stores it."""
    return sum(p.numel() * 4 for p in run.params)


def _final_files_bytes(run: Run) -> int:
    """What the final LoRA files take: the diffusers file and one per run format (the kohya file)."""
    return (1 + len(WRITERS)) * _lora_bytes(run)


def _check_space(run: Run) -> None:
    """Refuse a run whose checkpoints and LoRA files cannot fit on the output folder's disk, before it starts."""
    t = run.cfg.train
    lora_bytes = _lora_bytes(run)
    kept = min(t.checkpoints_total_limit or 10**9, _checkpoint_count(run)) + 1
    # each checkpoint: adapters, the optimizer's state (AdamW: two moments), the EMA weights and a diffusers LoRA
    # file; then the final LoRA files
    per_checkpoint = (2 + state_copies(t.optimizer) + t.ema) * lora_bytes
    need = kept * (per_checkpoint + 2**16) + _final_files_bytes(run) + 2**20 * 4
    free = free_bytes(run.output_dir)
    if free < need:
        raise DiskFull(f"train.output_dir: not enough free space in {run.output_dir}: this run writes about "
                       f"{mib(need)} ({kept} checkpoints of {mib(per_checkpoint)}, "
                       "LoRA files, samples), "
                       f"{mib(free)} is free. fix: free space, lower train.checkpoints_total_limit, or choose "
                       "a folder on another disk")


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: precision, accumulation, trackers, torch.compile, and the CPU/gloo case."""
    t = cfg.train
    # Accelerate keeps process-wide state; forget the last run's precision and accumulation so train() can
    # run again in one process (notebooks, tests). The distributed state itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Launched as several processes (accelerate launch --multi_gpu, torchrun) on a machine without a GPU:
    # Accelerate uses gloo on the CPU only when told cpu=True, else every process would think it is alone.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    dynamo = None
    if t.compile:
        # compiled artifacts are kept between runs, so a rerun does not pay the compilation again
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        # static shapes: one graph per aspect bucket (what CUDA graphs replay), never a dynamic-shape graph
        dynamo = TorchDynamoPlugin(backend=t.compile_backend, mode=t.compile_mode, dynamic=False)
    # launched with an FSDP config (recipes/accelerate/fsdp.yaml): sdtune's plugin, the recipe's precision kept
    fsdp_plugin = fsdp.make_plugin() if fsdp.requested() else None
    accelerator = Accelerator(
        cpu=launched and not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        dynamo_plugin=dynamo,
        fsdp_plugin=fsdp_plugin,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")),
    )
    if fsdp_plugin is not None:
        fsdp.enable_on_cpu(accelerator, fsdp_plugin)  # CPU gloo processes (the tests); GPUs need nothing
    if t.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SdtuneError(FP16_ON_CPU)  # check_run says so too; this is for library callers that skip it
    if os.environ.get("MASTER_PORT") and accelerator.num_processes == 1 and not launched:
        logger.info("note: `accelerate launch --cpu` starts one process unless MPI is set up; for N processes on "
                    "the CPU use `accelerate launch --multi_gpu --num_processes N` (sdtune then runs them on the "
                    "CPU with gloo)")
    return accelerator


def _load_model(cfg: Config, plan: RunPlan, accelerator: Accelerator,
                on_cpu: bool = False) -> tuple[Components, torch.dtype]:
    """The model's parts, frozen, on the device (``on_cpu``: left on the CPU, for diffusers' offload to move)
    in the compute dtype; returns (components, weight_dtype)."""
    info, device = plan.model, torch.device("cpu") if on_cpu else accelerator.device
    weight_dtype = torch_dtype(accelerator.mixed_precision)
    logger.info(f"model: {info.pretrained} ({info.family.label}, {info.prediction_type}), {plan.resolution} px, "
                f"{weight_dtype}")
    m = cfg.model
    c = load_components(info.pretrained, info.family, m.revision, m.variant, m.allow_unsafe_pickle, vae=m.vae,
                        prediction_type=m.prediction_type, clip_skip=m.clip_skip, base=m.base,
                        bundled_text_encoders=m.bundled_text_encoders,
                        tokenizers=plan.tokenizers or None,  # check_run's: read once per run
                        # read in half precision where the run computes in it: FLUX.1 + T5 take 34 GB of RAM, not 68
                        dtype=None if weight_dtype == torch.float32 else weight_dtype)
    # Frozen weights in the compute dtype; a VAE that overflows in fp16 (SDXL's) asks for fp32 (force_upcast).
    c.vae.requires_grad_(False).to(device, torch.float32 if c.vae.config.force_upcast else weight_dtype)
    frozen = [(info.family.denoiser_name, c.denoiser, m.quantize, "model.quantize=")] + [
        (spec.name, encoder, m.quantize_text_encoders, "model.quantize_text_encoders=")
        for spec, encoder in zip(info.family.text_encoders, c.text_encoders)]
    # under FSDP the denoiser waits in host memory: prepare() moves it to the GPUs a shard at a time, so no GPU
    # ever holds it whole
    sharded = info.family.denoiser_name if fsdp.is_sharded(accelerator) else None
    for name, module, mode, key in frozen:
        if mode == "none":
            module.requires_grad_(False).to(None if name == sharded else device, weight_dtype)
        else:  # cast on the CPU, then quantized layer by layer as it moves: the device never holds it unquantized
            done = quantize(module.requires_grad_(False).to(weight_dtype), mode, weight_dtype, device)
            logger.info(done.line(name, key=key))
    return c, weight_dtype


def make_class_images(cfg: Config, offload: str = "none") -> list[Path]:
    """``sdtune class-images``: prior preservation's class images, made as ``train`` makes them (the same
    folders, seeds, sizes and model), and no run folder. A run started later finds them where it looks: one
    under FSDP, which cannot generate them, too. ``offload``: diffusers' "model" or "sequential" CPU offload,
    for a GPU that cannot hold the whole model at once; "none" keeps it on the device."""
    if not cfg.prior.enabled:
        raise SdtuneError("prior.enabled: false, and class images are for prior preservation; fix: "
                          "prior.enabled=true with a prior.class_prompt")
    if fsdp.requested():
        raise SdtuneError("class images are made without FSDP: run `sdtune class-images` on its own, or under "
                          "`accelerate launch --multi_gpu` (each process makes its share)")
    plan = check_run(cfg, run_folder=False)  # every problem of the recipe but its run folder's, at once
    cfg = with_family_defaults(cfg.resolved_paths(), plan.family)
    accelerator = make_accelerator(cfg)
    if offload != "none" and accelerator.device.type != "cuda":
        raise SdtuneError(f"--offload {offload}: diffusers' CPU offload moves the model to a CUDA GPU in parts; "
                          f"this process runs on {accelerator.device.type}. fix: --offload none")
    for w in plan.warnings:
        logger.warning(w)
    components, _ = _load_model(cfg, plan, accelerator, on_cpu=offload != "none")
    return _class_images(cfg, plan, components, accelerator, base_identity(cfg, plan.family), offload)


def _class_images(cfg: Config, plan: RunPlan, c: Components, accelerator: Accelerator, identity: str,
                  offload: str = "none") -> list[Path]:
    """Prior preservation: each concept's class images from the base model, before any adapter exists:
    ``prior.num_class_images`` of each, in concept order (``sdtune.plan.class_sets``). Generated into a cache
    folder named by the model's ``identity`` (``base_identity``: the bytes of its files) and the class prompt,
    one run at a time."""
    if not cfg.prior.enabled:
        return []
    family = plan.family
    pipe = family.pipeline(c, sampling_scheduler(c.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":  # one component on the GPU at a time
        pipe.enable_model_cpu_offload(device=accelerator.device)
    elif offload == "sequential":  # one layer at a time: any size, much slower
        pipe.enable_sequential_cpu_offload(device=accelerator.device)
    concepts, paths = cfg.concepts(), []
    for concept, given in zip(concepts, plan.class_dirs or [plan.class_dir], strict=True):
        assert concept.class_prompt
        class_dir = given or class_images_dir(cfg, plan.resolution, identity, concept)
        if accelerator.is_main_process and not given:
            # keyed by the model's absolute path (cfg's, resolved): `.cache/tiny/sd15` typed in two folders is
            # two models, and the second was said to have "changed"
            note = note_identity(cache_root() / "class_images", plan.model.pretrained, identity, "class images",
                                 key=f"{cfg.model.pretrained}|{concept.class_prompt}|{plan.resolution}")
            if note:
                logger.info(note)
        # the user's folder made for another model (its files: the plan compared names only), before any image
        other = other_class_images(class_dir, concept.class_prompt, plan.model.pretrained, identity) if given else None
        if other and plan.strict and other not in plan.warnings:
            raise ConfigError([f"{other} (--strict)"])
        with contextlib.ExitStack() as stack, accelerator.autocast():
            if accelerator.is_main_process:  # the other processes of this run generate beside it (other images)
                stack.enter_context(cache_lock(class_dir, "class images"))
            # every process lists what is missing (the folder held by this run) before any writes: each then
            # takes its share of the same list
            accelerator.wait_for_everyone()
            missing = missing_class_indices(class_dir, cfg.prior.num_class_images)
            accelerator.wait_for_everyone()
            for w in ensure_class_images(
                pipe, class_dir, concept.class_prompt, cfg.prior.num_class_images, resolution=plan.resolution,
                batch_size=cfg.prior.generation_batch_size, steps=cfg.prior.generation_steps,
                guidance_scale=cfg.prior.generation_guidance, seed=cfg.train.seed, model_id=plan.model.pretrained,
                model_identity=identity, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, progress=accelerator.is_main_process,
                max_sequence_length=family.max_sequence_length, missing=missing,
            ):
                if w not in plan.warnings:  # said by the plan already
                    logger.warning(w)
            accelerator.wait_for_everyone()
        class_paths = list_images(class_dir)[: cfg.prior.num_class_images]
        if len(concepts) > 1 and len(class_paths) != cfg.prior.num_class_images:
            # each concept's share of the list is found by position (sdtune.plan.class_sets)
            raise SdtuneError(f"{concept.key_of('class_dir')}: {class_dir} holds {len(class_paths)} class images, "
                              f"not prior.num_class_images={cfg.prior.num_class_images}; fix: fill or empty it")
        for_whom = f" for {concept.identifier} ('{concept.class_prompt}')" if len(concepts) > 1 else ""
        logger.info(f"prior preservation: {len(class_paths)} class images in {class_dir}{for_whom}")
        paths += class_paths
    return paths


def _dataset(cfg: Config, plan: RunPlan, class_paths: list[Path], c: Components) -> DreamBoothDataset:
    """The training stream: each concept's examples x its repeats, each paired with a class image of its own
    concept (prior preservation)."""
    # Aspect-ratio buckets: each instance image at the `sdtune prep --crop bucket` bucket nearest its shape, among
    # those whose sides the denoiser takes without resampling (ModelInfo.bucket_multiple). Buckets are centre crops.
    buckets = None
    if cfg.data.aspect_buckets:
        buckets = assign_buckets([e.path for e in plan.examples], plan.resolution, plan.model.bucket_multiple)
        logger.info("aspect buckets: " + ", ".join(f"{w}x{h} ({k} images)"
                                                   for (w, h), k in sorted(Counter(buckets).items())))
    d, concepts = cfg.data, cfg.concepts()
    repeats = plan.repeats or [d.repeats] * len(concepts)
    if len(concepts) > 1:
        photos = Counter(e.concept for e in plan.examples)
        balanced = " (balanced)" if d.balance_concepts and any(k.repeats is None for k in concepts) else ""
        logger.info("concepts: " + ", ".join(f"{k.identifier} {_count(photos[i], 'photo')} x {repeats[i]}"
                                             for i, k in enumerate(concepts)) + balanced)
    captions = CaptionRules(d.caption_dropout, d.shuffle_tags, d.keep_tokens) \
        if d.caption_dropout or d.shuffle_tags else None
    # masks are averaged onto the latent grid: the VAE's downsampling, as diffusers' vae_scale_factor
    factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    masks = MaskRules(d.unmasked_weight, factor) if d.masked_loss else None
    return DreamBoothDataset(
        plan.examples, plan.resolution, d.center_crop, d.random_flip, [repeats[e.concept] for e in plan.examples],
        seed=cfg.train.seed, buckets=buckets, captions=captions, masks=masks,
        classes=class_sets(cfg, class_paths) if class_paths else None,
    )


def _latent_cache(cfg: Config, plan: RunPlan, c: Components, dataset: DreamBoothDataset,
                  accelerator: Accelerator) -> LatentStore | None:
    """Each image (and its mirror) encoded once: the frozen VAE leaves the step."""
    if not cfg.train.cache_latents:
        return None
    if not dataset.center_crop:  # buckets are centre crops too
        logger.info("note: train.cache_latents is off because data.center_crop=false takes a new random crop every step")
        return None
    weights_id = model_identity(plan.model.pretrained, cfg.model.revision, ["vae"], cfg.model.vae, base=cfg.model.base)
    vae_id = vae_identity(weights_id, c.vae.config, str(c.vae.dtype))
    directory = cache_root() / "latents"
    if accelerator.is_main_process:
        note = note_identity(directory, plan.model.pretrained, weights_id, "its latents", key=cfg.model.pretrained)
        if note:
            logger.info(note)
    # Every (image, size) the data can ask for: a class image once per bucket it is paired with.
    items = [(path, flip, size) for path, size in dataset.targets()
             for flip in ((False, True) if cfg.data.random_flip else (False,))]
    if accelerator.num_processes > 1:
        # each process encodes the missing latents of its share of the photos into the shared disk cache (N GPUs
        # encode N times faster; the shares are disjoint, so no lock between them), then all look every one up
        cache_latents(c.vae, shard(items, accelerator.process_index, accelerator.num_processes), vae_id, directory,
                      progress=accelerator.is_main_process, lock=False)
        accelerator.wait_for_everyone()
    cache = cache_latents(c.vae, items, vae_id, directory, progress=accelerator.is_main_process)
    # read per batch from the files (in the loader's workers when there are any), as mean and standard deviation:
    # resident memory does not grow with the number of images
    dataset.latents = cache.as_mean_std()
    return dataset.latents


def _text_cache(run: Run) -> TextCache | None:
    """Each caption encoded once, while the text encoders are frozen."""
    if not run.cfg.train.cache_text_embeddings or run.cfg.lora.train_text_encoder:
        return None
    if run.cfg.data.shuffle_tags:  # a new tag order is a new caption: a cache would grow every step
        logger.info("note: captions are encoded in each step (not cached) because data.shuffle_tags=true "
                    "gives them a new tag order every step")
        return None
    # every concept's class prompt (prior preservation)
    captions = [e.caption for e in run.plan.examples] + [k.prompt for k in run.dataset.classes]
    captions += [""] if run.cfg.data.caption_dropout else []  # a dropped caption is the empty one
    c, family = run.components, run.family

    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        return family.encode_prompt(c.text_encoders, [ids.to(run.device) for ids in family.tokenize(c.tokenizers, chunk)])

    # what the embeddings depend on: the encoders' and tokenizers' files, clip skip, family, dtypes, device kind
    parts = [n for e in family.text_encoders for n in (e.name, e.tokenizer_name)]
    weights = model_identity(run.plan.model.pretrained, run.cfg.model.revision, parts, None, run.cfg.model.clip_skip,
                             base=run.cfg.model.base, bundled_text_encoders=run.cfg.model.bundled_text_encoders)
    stored = run.cfg.model.quantize_text_encoders  # quantized encoders encode to other numbers: another cache
    tokens = [f"t5={family.max_sequence_length}"] if family.max_sequence_length else []  # T5's (B, L, D): L
    identity = hashlib.sha256("|".join([weights, family.name, str(run.weight_dtype), run.accelerator.mixed_precision,
                                        run.device.type, *([stored] if stored != "none" else []), *tokens]).encode()
                              ).hexdigest()[:16]
    # every process writes what it lacks into the shared folder; the main one first, so the others mostly read
    with run.accelerator.autocast(), run.accelerator.main_process_first():
        return TextCache(captions, encode, cache_root() / "text", identity, run.device, progress=run.main)


def _unread_layers(spec: TextEncoderSpec, encoder: torch.nn.Module, resume_from: Path | None) -> int:
    """The text encoder's last layers that get no LoRA (``TextEncoderSpec.unread_layers``), or none where the
    checkpoint a run resumes has one there: sdtune before 2026-12-01 put a LoRA on SDXL's last CLIP-L layer too
    (it never learnt anything there), and such a checkpoint resumes exactly in its own layout."""
    saved = resume_from / f"adapter-{spec.name}.safetensors" if resume_from else None
    if not spec.unread_layers or saved is None or not saved.is_file():
        return spec.unread_layers
    last = encoder.config.num_hidden_layers - 1
    with safe_open(str(saved), "pt") as f:
        old_layout = any(f".layers.{last}." in k for k in f.keys())
    if old_layout:
        logger.info(f"{resume_from.name} has a LoRA on the last layer of {spec.label} (written by an earlier "
                    "sdtune): the run keeps it, to resume exactly")
    return 0 if old_layout else spec.unread_layers


def _add_adapters(cfg: Config, family: Family, options: Any, c: Components,
                  resume_from: Path | None = None) -> dict[str, torch.nn.Module]:
    """LoRA adapters on the denoiser (and text encoders); returns the trained modules by component name.
    Their parameters are trained in fp32 even under mixed precision. ``resume_from``: the checkpoint the run
    continues, whose adapter layout is kept."""
    lora = cfg.lora
    add_lora(c.denoiser, lora.rank, lora.alpha, lora.target_modules, lora.dropout, lora.use_dora, kind=lora.type)
    trained = {family.denoiser_name: c.denoiser}
    if lora.train_text_encoder:
        chosen = family.trained_text_encoders(options)
        for spec, encoder in zip(family.text_encoders, c.text_encoders):
            if spec.name in chosen:
                add_lora(encoder, lora.rank, lora.alpha, lora.text_encoder_target_modules, lora.dropout,
                         lora.use_dora, key="lora.text_encoder_target_modules", kind=lora.type,
                         unread_layers=_unread_layers(spec, encoder, resume_from))
                trained[spec.name] = encoder
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if cfg.train.mixed_precision != "no":
        # PEFT casts each LoRA input to the adapter's fp32 and autocast casts it straight back: two kernels per
        # LoRA layer and step for the same numbers (outputs and gradients bitwise equal; tests/test_speed.py)
        for module in trained.values():
            for layer in module.modules():
                if hasattr(layer, "cast_input_dtype_enabled"):
                    layer.cast_input_dtype_enabled = False
    if cfg.train.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        for module in trained.values():
            if module is not c.denoiser:
                module.gradient_checkpointing_enable()
    return trained


def _embeddings(cfg: Config, family: Family, c: Components) -> Embeddings | None:
    """Pivotal tuning: each identifier's token embeddings, initialised and routed into the text encoders."""
    p = cfg.pivotal
    if not p.enabled:
        return None
    embeddings = create_embeddings(family, cfg.identifiers(), c.tokenizers, c.text_encoders, p.new_tokens, p.init,
                                   seed=cfg.train.seed)
    embeddings.install(c.tokenizers, c.text_encoders)
    said = ", ".join(f"{i} -> {''.join(t)}" for i, t in embeddings.tokens.items())
    start = "from the identifiers' own rows" if embeddings.mode == "own" else f"from '{p.init}'" if p.init else \
        "from random vectors"
    logger.info(f"pivotal tuning: {said} ({embeddings.rows[0].shape[0]} vectors per text encoder, {start}), "
                f"trained for the first {max(1, round(p.fraction * cfg.train.max_steps))} steps")
    return embeddings


def _optimizer(cfg: Config, family: Family, trained: dict[str, torch.nn.Module],
               embeddings: Embeddings | None = None) -> Any:
    t = cfg.train
    groups = [{"params": trainable_parameters(trained[family.denoiser_name]), "lr": t.learning_rate}]
    te_params = trainable_parameters(*(m for n, m in trained.items() if n != family.denoiser_name))
    if te_params:
        groups.append({"params": te_params, "lr": cfg.lora.text_encoder_lr or t.learning_rate})
    if embeddings is not None:
        # no weight decay: it would pull the vectors towards zero, and a token's norm is part of its meaning
        groups.append({"params": embeddings.rows, "lr": cfg.pivotal.learning_rate or t.learning_rate,
                       "weight_decay": 0.0})
    optimizer = make_optimizer(t.optimizer, groups, (t.adam_beta1, t.adam_beta2), t.adam_epsilon, t.weight_decay,
                               t.optimizer_args)
    if t.optimizer == "adamw8bit":
        # bitsandbytes keeps small tensors in 32-bit state; at low LoRA ranks that is most of them, so say how
        # much is really 8-bit, and what it saves: 6 of AdamW's 8 bytes of state per 8-bit value.
        big, tensors, big_values, values = eight_bit_share([p for g in groups for p in g["params"]])
        saved_mib = big_values * 6 / 2**20
        logger.info(f"8-bit AdamW: 8-bit state for {big} of {tensors} LoRA tensors ({big_values:,} of {values:,} "
                    f"values, {saved_mib:.1f} MiB saved); bitsandbytes keeps tensors under {MIN_8BIT_SIZE} values "
                    "in 32-bit")
        if big_values < values / 2:
            logger.warning(f"8-bit AdamW saves {saved_mib:.1f} MiB at lora.rank={cfg.lora.rank}; fused AdamW "
                           "(train.optimizer=adamw) skips non-finite steps without waiting for the GPU")
    return optimizer


def _log_memory_estimate(run: Run, trained: dict[str, torch.nn.Module], optimizer: Any) -> None:
    """A pre-flight estimate of peak GPU memory (printed on every device; on a CPU it says what a GPU needs)."""
    c, t = run.components, run.cfg.train

    def count(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    fp32_vae = c.vae.dtype == torch.float32
    unet_params, unet_bytes = frozen_size(c.denoiser)  # as stored: 4-bit or fp8 with model.quantize
    est = estimate(
        unet_params=unet_params, unet_bytes=unet_bytes,
        frozen_on_gpu_params=0 if run.offloaded else count(*c.text_encoders) + (0 if fp32_vae else count(c.vae)),
        fp32_on_gpu_params=count(c.vae) if fp32_vae and not run.offloaded else 0,
        trainable_params=trainable, weight_bytes=torch.finfo(run.weight_dtype).bits // 8,
        images_per_micro_batch=t.batch_size * (2 if run.class_paths else 1), resolution=run.plan.resolution,
        gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
        latents_cached=run.latent_cache is not None, vae_bytes=torch.finfo(c.vae.dtype).bits // 8,
        constants=run.family.memory,
    )
    logger.info(est.line())
    logger.info(
        f"training {trainable:,} LoRA parameters ({', '.join(trained)}"
        f"{' + token embeddings' if run.embeddings else ''}) for {t.max_steps} steps, batch "
        f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation x {run.accelerator.num_processes} processes"
        + (f", with {len(run.class_paths)} class images" if run.class_paths else "")
    )


def _resume(run: Run) -> int:
    """The step to start at: 0, or the checkpoint's that ``check_run`` verified, with every state it holds
    restored (its class images are checked first: the instance images were, by ``check_run``)."""
    checkpoint = run.plan.resume_from
    if not run.cfg.train.resume:
        return 0
    if checkpoint is None:
        logger.info(f"train.resume=latest: no checkpoint in {run.output_dir / 'checkpoints'} yet; starting at step 0")
        return 0
    problem = refuse_data_drift(checkpoint, run.plan.resume_state, "class", run.data["class"])
    if problem:
        raise SdtuneError(problem)
    step = load_checkpoint(checkpoint, run.accelerator, run.unwrapped(), run.optimizer, run.lr_scheduler,
                           run.generator, run.cfg.model_dump(mode="json"), ema=run.ema, embeddings=run.embeddings)
    logger.info(f"resumed from {checkpoint} at step {step}")
    e, planned = run.embeddings, max(1, round(run.cfg.pivotal.fraction * run.cfg.train.max_steps))
    if e is not None and e.stopped_at is not None and e.stopped_at != planned:
        logger.info(f"pivotal tuning: the embeddings stopped training at step {e.stopped_at} and stay as they are "
                    f"(pivotal.fraction of this train.max_steps would end their training at step {planned})")
    return step


def _loader(run: Run) -> torch.utils.data.DataLoader:
    """This process's micro-batches from the one the resumed step needs (global micro-batch k = step x accum)."""
    t, dataset = run.cfg.train, run.dataset
    batch_sampler = _batch_sampler(run, start=run.global_step * t.gradient_accumulation_steps)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=t.dataloader_workers,
        pin_memory=run.device.type == "cuda", persistent_workers=t.dataloader_workers > 0,
        # Its own generator: creating the iterator would otherwise draw from the global RNG, which a resume has
        # just restored (dropout must see the same stream as in the uninterrupted run).
        generator=torch.Generator().manual_seed(t.seed),
    )


def _batch_sampler(run: Run, start: int) -> Any:
    """This process's batch sampler from global micro-batch ``start``: with aspect buckets, batches of one
    bucket each (one tensor shape per step)."""
    t, acc, dataset = run.cfg.train, run.accelerator, run.dataset
    if dataset.buckets is not None:
        return BucketBatchSampler([dataset.size(i) for i in range(len(dataset))], t.batch_size, t.seed,
                                  acc.process_index, acc.num_processes, start=start)
    return StreamBatchSampler(len(dataset), t.batch_size, t.seed, acc.process_index, acc.num_processes, start=start)


def epoch_units(sampler: Any, accumulation: int) -> tuple[int, int]:
    """(units one optimizer step takes, units in an epoch), as the batch sampler counts its stream: dataset
    items for ``StreamBatchSampler`` (an epoch: each instance example x data.repeats, or each class image where
    there are more), batches for ``BucketBatchSampler``. A step takes ``accumulation`` micro-batches from
    every process."""
    if isinstance(sampler, BucketBatchSampler):
        return accumulation * sampler.world_size, sampler.batches_per_epoch
    return accumulation * sampler.world_size * sampler.batch_size, sampler.n


def epochs_done(step: int, units: tuple[int, int]) -> int:
    """Whole epochs completed after ``step`` optimizer steps (``units`` from ``epoch_units``)."""
    per_step, per_epoch = units
    return step * per_step // per_epoch


def _due(run: Run, step: int, every_steps: int, every_epochs: int | None) -> bool:
    """Whether an interval ends at ``step``: at the step that completes every ``every_epochs``-th epoch when
    that is set, else every ``every_steps`` steps (0: never). A pure function of the step: a resume agrees."""
    if every_epochs:
        units = epoch_units(run.loader.batch_sampler, run.cfg.train.gradient_accumulation_steps)
        return epochs_done(step, units) // every_epochs > epochs_done(step - 1, units) // every_epochs
    return bool(every_steps) and step % every_steps == 0


def _epoch_steps(units: tuple[int, int], every_epochs: int, max_steps: int, first: int = 6) -> list[int]:
    """The first ``first`` steps before ``max_steps`` that complete an ``every_epochs``-th epoch: epoch e ends
    at step ceil(e x units per epoch / units per step)."""
    per_step, per_epoch = units
    steps: list[int] = []
    step = 0
    while len(steps) < first:
        # the next epoch to act on after this step (a step can end several: a tiny dataset, a big batch)
        epoch = (epochs_done(step, units) // every_epochs + 1) * every_epochs
        step = -(-epoch * per_epoch // per_step)
        if step >= max_steps:
            break
        steps.append(step)
    return steps


def _checkpoint_count(run: Run) -> int:
    """How many checkpoints the run writes before its last one, at most."""
    t = run.cfg.train
    if t.checkpoint_every_epochs:
        units = epoch_units(_batch_sampler(run, 0), t.gradient_accumulation_steps)
        return epochs_done(t.max_steps - 1, units) // t.checkpoint_every_epochs
    return t.max_steps // t.checkpoint_every if t.checkpoint_every else 0


def _log_epoch_intervals(run: Run) -> None:
    """With epoch intervals: how long an epoch is, and the steps they fall on (or that none does)."""
    t = run.cfg.train
    units = epoch_units(run.loader.batch_sampler, t.gradient_accumulation_steps)
    for key, every in (("train.checkpoint_every_epochs", t.checkpoint_every_epochs),
                       ("sample.every_epochs", run.cfg.sample.every_epochs)):
        if not every:
            continue
        steps = _epoch_steps(units, every, t.max_steps, first=7)
        where = (f"at steps {', '.join(map(str, steps[:6]))}{', ...' if len(steps) > 6 else ''}" if steps else
                 f"never before train.max_steps={t.max_steps} (only at the end)")
        logger.log(logging.INFO if steps else logging.WARNING,
                   f"{key}={every}: an epoch is {units[1] / units[0]:.4g} steps, so {where}")


def _init_trackers(run: Run) -> None:
    """Start ``train.report_to``'s tracker on the main process; a resume continues its run, from the resumed
    step (``sdtune.trackers``). A tracker that cannot start is one ``SdtuneError``."""
    t, acc = run.cfg.train, run.accelerator
    if acc.is_main_process and acc.trackers == [] and t.report_to != "none":
        init, notes = trackers.init_kwargs(t.report_to, run.output_dir, run.global_step, bool(t.resume))
        for note in notes:
            logger.warning(note)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flat_keys(run.cfg.model_dump(mode="json")).items()}
        try:
            acc.init_trackers("sdtune", config=hparams, init_kwargs=init)
        except Exception as e:
            error = trackers.start_error(t.report_to, e)
            if error is None:
                raise
            raise error from e


# --------------------------------------------------------------------------------------------------------
# The loop


def batch_latents(run: Run, batch: dict) -> torch.Tensor:
    """(B, C, h, w) latents in the denoiser's space and compute dtype, a fresh sample of each image's latent
    distribution: from the cache, or from the VAE."""
    if "latent_mean_std" in batch:
        # cached (B, 2C, h, w) mean and std; sampled every step, exactly as DiagonalGaussianDistribution.sample
        mean, std = batch["latent_mean_std"].to(run.device, non_blocking=True).chunk(2, dim=1)
        latents = mean + std * randn_tensor(mean.shape, generator=run.generator, device=mean.device, dtype=mean.dtype)
    else:
        vae = run.components.vae
        pixel_values = batch["pixel_values"].to(run.device, vae.dtype, non_blocking=True)  # (B, 3, H, W)
        latents = vae.encode(pixel_values).latent_dist.sample(generator=run.generator)
    return scale_latents(latents, run.components.vae.config).to(run.weight_dtype)


def batch_conditioning(run: Run, batch: dict) -> dict[str, Any]:
    """The denoiser's other inputs for a batch: prompt embeddings (cached, or from the text encoders, with
    gradients when they are trained) and whatever else the family adds (SDXL's size and crop ids)."""
    family = run.family
    if run.text_cache is not None:
        prompt_embeds = run.text_cache[batch["captions"]]
    else:
        captions = [run.embeddings.rewrite(c) for c in batch["captions"]] if run.embeddings else batch["captions"]
        input_ids = [ids.to(run.device) for ids in family.tokenize(run.components.tokenizers, captions)]
        with torch.set_grad_enabled(run.cfg.lora.train_text_encoder or run.embeddings_training()):
            prompt_embeds = family.encode_prompt(run.text_encoders, input_ids)
    return family.conditioning(prompt_embeds, batch, run.options, run.device, run.weight_dtype)


def forward_backward(run: Run, batch: dict) -> StepOutput:
    """One micro-batch: latents, conditioning, ``training_step``, backward."""
    if run.cfg.train.compile and run.cfg.train.compile_mode == "reduce-overhead":
        # CUDA graphs replay into the same memory: tell them where a step begins (nothing is kept across steps)
        torch.compiler.cudagraph_mark_step_begin()
    with torch.no_grad():
        latents = batch_latents(run, batch)
    if run.embeddings is not None:  # past the pivot the vectors stay as they are (no gradient, no update)
        training = run.embeddings_training()
        if not training and run.embeddings.stopped_at is None:
            run.embeddings.stopped_at = run.pivot_step
        run.embeddings.set_training(training)
    conditioning = batch_conditioning(run, batch)
    with run.accelerator.autocast():
        out = training_step(
            run.modules[run.family.denoiser_name], run.family, run.objective, latents, conditioning, run.generator,
            prior_preservation=bool(run.class_paths), prior_loss_weight=run.cfg.prior.loss_weight,
            loss_mask=batch["loss_mask"].to(run.device, non_blocking=True) if "loss_mask" in batch else None,
            loss_function=LossFunction(run.cfg.train.loss, run.cfg.train.huber_c, run.cfg.train.huber_schedule),
        )
    run.accelerator.backward(out.loss)
    return out


def optimizer_update(run: Run, loss: torch.Tensor, nonfinite: NonFiniteGuard) -> torch.Tensor:
    """Clip, step and zero the gradients (Accelerate makes the step a no-op while accumulating); returns
    whether the loss (and, at a real step, the gradient norm) was finite, as a device flag."""
    t, acc = run.cfg.train, run.accelerator
    step_ok = True
    if acc.sync_gradients:
        if run.embeddings is not None and acc.num_processes > 1 and run.embeddings_training():
            # the rows are no module's parameters, so DDP does not average their gradients: do it here
            for rows in run.embeddings.rows:
                rows.grad = acc.reduce(rows.grad, reduction="mean")
        if t.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.params, t.max_grad_norm)
        else:  # no clipping: the norm alone, for the finite check (no multiply by a clip factor of 1)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
        grad_norm = fsdp.full_tensor(grad_norm)  # under FSDP a DTensor: the norm over every process's shards
        # A NaN/inf loss or gradient must never reach the weights; one flag for both (inf - inf is NaN too).
        finite = torch.isfinite(loss.detach() + grad_norm)  # () bool, on the device
        step_ok = nonfinite.allow(finite)
    else:
        finite = torch.isfinite(loss.detach())
    if step_ok:
        run.optimizer.step()
        if acc.sync_gradients:
            run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return finite


class LossLog:
    """The mean loss (and prior loss) of the finite micro-batches between log points, summed on the device and
    read once per log point (a host sync); written to the trackers, the progress bar and ``losses.jsonl``."""

    def __init__(self, run: Run):
        self.run = run
        self.total = torch.zeros((), device=run.device)
        self.prior_total = torch.zeros((), device=run.device)  # prior preservation's part of the loss, likewise
        self.count = torch.zeros((), device=run.device)
        self.clock, self.clock_step = time.perf_counter(), run.global_step
        self.step = run.global_step  # the last step written (or the one the run started at)
        self.shown: dict[str, str] = {}  # the last validation losses, kept on the progress line

    def add(self, loss: torch.Tensor, finite: torch.Tensor, prior_loss: torch.Tensor | None = None) -> None:
        self.total += torch.where(finite, loss.detach(), 0.0)
        if prior_loss is not None:
            self.prior_total += torch.where(finite, prior_loss.detach(), 0.0)
        self.count += finite

    def write(self, step: int, out: StepOutput, progress: Any,
              validation: dict[str, float] | None = None) -> None:
        acc = self.run.accelerator
        # mean over the finite steps of all processes (0 / 0 = nan when none was)
        loss = float(acc.reduce(self.total, reduction="sum") / acc.reduce(self.count, reduction="sum"))
        now = time.perf_counter()
        logs = {"loss": loss, "lr": self.run.lr_scheduler.get_last_lr()[0],
                "steps_per_s": (step - self.clock_step) / max(now - self.clock, 1e-9)}
        if out.prior_loss is not None:  # the same window's mean as the loss (it was the last micro-batch's alone)
            logs["prior_loss"] = float(acc.reduce(self.prior_total, reduction="sum") /
                                       acc.reduce(self.count, reduction="sum"))
        logs |= step_size_logs(self.run.optimizer)  # Prodigy's d: the step size it found (lr is 1.0)
        if not math.isfinite(loss):
            logger.warning(f"loss is {loss} at step {step}")
        logs |= validation or {}  # val_loss (val_loss_ema) at this step, beside the loss (sdtune.validation)
        self.shown |= {k.replace("_loss", ""): f"{v:.4f}" for k, v in (validation or {}).items()}
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.2e}", **self.shown)
        acc.log(logs, step=step)
        if acc.is_main_process:  # a plain record too, one line per log point (a resume appends)
            with open(self.run.output_dir / LOSSES, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        self.total.zero_()
        self.prior_total.zero_()
        self.count.zero_()
        self.clock, self.clock_step, self.step = now, step, step


def loop(run: Run) -> None:
    """Optimizer steps from ``run.global_step`` to ``train.max_steps``; logs, checkpoints and samples on the way."""
    t, acc = run.cfg.train, run.accelerator
    _rewind(run)
    started = time.perf_counter()
    nonfinite = NonFiniteGuard(run.optimizer, acc.scaler, t.max_nonfinite_steps,
                               warn=lambda message: _say(message, logging.WARNING))
    stalled = StalledLoraGuard(run.whole_params(), run.global_step, t.max_steps)
    timer = StepTimer(run.global_step, t.max_steps, sync=run.sync)
    losses = LossLog(run)
    # redrawn at most twice a second: a redraw per step costs host time on a fast GPU
    progress = tqdm(total=t.max_steps, initial=run.global_step, desc="train", disable=not run.main, unit="step",
                    mininterval=0.5)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    for module in run.modules.values():
        module.train()
    start_training(run.optimizer)  # a schedule-free optimizer steps in its training mode only
    data_iter = iter(run.loader)
    with StopSignals(logger.info) as stop:  # SIGINT / SIGTERM stop after a step (finish has its own handling)
        while run.global_step < t.max_steps:
            batch = next(data_iter)
            with acc.accumulate(*run.modules.values()):
                out = forward_backward(run, batch)
                finite = optimizer_update(run, out.loss, nonfinite)
            losses.add(out.loss, finite, out.prior_loss)
            if not acc.sync_gradients:
                continue
            run.global_step += 1
            if run.ema is not None:
                run.ema.step()  # once per optimizer step, not per micro-batch
            step = run.global_step
            progress.update(1)
            nonfinite.record(step, finite, batch["paths"])
            if step == stalled.at_step:
                nonfinite.check()  # skipped steps are part of the message
                stalled.check(step, run.whole_params(), run.lr_scheduler.get_last_lr()[0], nonfinite.total)
            timer.tick(step)
            _log_point(run, step, out, nonfinite, losses, progress, timer)
            # after the step's log line: the step a stop saves is the last one losses.jsonl holds
            if _stop_requested(run, stop):
                _stop(run, stop, out, nonfinite, losses, progress)
            _periodic(run, step, nonfinite, losses, progress, timer)
    nonfinite.check()
    progress.close()
    timed_steps, s_per_step = timer.result(run.global_step)
    run.timing = {"timed_steps": timed_steps, "s_per_step": s_per_step,  # training steps only
                  "sample_s": timer.paused_s["sample"], "checkpoint_s": timer.paused_s["checkpoint"],
                  "validation_s": timer.paused_s["validation"],
                  "wall_s": time.perf_counter() - started}  # the whole loop, samples and checkpoints included


def _log_point(run: Run, step: int, out: StepOutput, nonfinite: NonFiniteGuard, losses: LossLog, progress: Any,
               timer: StepTimer) -> None:
    """The validation loss when due, and the loss line every ``train.log_every`` steps, at a validation and at
    the last step (each reads the non-finite flags first)."""
    t = run.cfg.train
    validation = _validation(run, step, timer, progress, losses)
    if validation is not None or step % t.log_every == 0 or step == t.max_steps:
        nonfinite.check()
        losses.write(step, out, progress, validation)


def _stop(run: Run, stop: StopSignals, out: StepOutput, nonfinite: NonFiniteGuard, losses: LossLog,
          progress: Any) -> NoReturn:
    """A signal asked the run to stop: log this step (if its log point did not), save its checkpoint, and raise
    ``Interrupted`` (every process, at the same step). A resume continues the log at the next step."""
    step = run.global_step
    nonfinite.check()
    if losses.step != step:  # off a log point (one process stops at any step): the losses since the last line
        losses.write(step, out, progress)
    run.save()
    progress.close()
    raise _interrupted(run, stop.signum, stop.exit_code)


def _interrupted(run: Run, signum: int | None, exit_code: int, then: str = "") -> Interrupted:
    """What every stop by a signal says (after the checkpoint of ``run.global_step`` is saved): where the run
    stopped, and how to continue it; ``then``: what a resume does beyond training on (finish's files)."""
    by = signal.Signals(signum).name if signum else "a signal to another process"
    return Interrupted(f"stopped by {by} at step {run.global_step}; checkpoint saved in {run.output_dir / CHECKPOINTS}; "
                       f"continue with train.resume=latest{then}", exit_code)


def _final_files(out: Path) -> list[Path]:
    """What ``finish`` writes of the run's final LoRA (besides its checkpoint): its files, token embeddings,
    summary and model card."""
    return [out / WEIGHT_NAME, *run_files(out).values(), out / EMBEDDINGS_DIR, out / "train_summary.json", out / CARD]


def _rewind(run: Run) -> None:
    """Before the first step: what lies past the step the run starts at (a resume from an earlier checkpoint than
    the newest, or a run killed after logging steps it did not save) is set aside, said in one line, so that the
    run folder reads as a run at that step (``sdtune.checkpoint.rewind``): ``losses.jsonl`` in step order, and
    ``train.resume=latest`` picking this run's checkpoints."""
    if run.main:
        for line in rewind(run.output_dir, run.global_step, _final_files(run.output_dir)):
            logger.warning(line)
    run.accelerator.wait_for_everyone()


def _periodic(run: Run, step: int, nonfinite: NonFiniteGuard, losses: LossLog, progress: Any,
              timer: StepTimer) -> None:
    """What happens every N steps (or epochs) after the log line: checkpoint, sample grid (each reads the
    non-finite flags first)."""
    t, every = run.cfg.train, run.cfg.sample.every
    if _due(run, step, t.checkpoint_every, t.checkpoint_every_epochs) and step < t.max_steps:
        nonfinite.check()
        with _aside(timer, "checkpoint", progress, losses) as pause:
            run.save()
        _say(f"step {step}: checkpoint saved ({pause.seconds:.1f} s)")
    if _due(run, step, every, run.cfg.sample.every_epochs) and step < t.max_steps:
        nonfinite.check()
        with _aside(timer, "sample", progress, losses):
            sample_grid(run, step)


def _validation(run: Run, step: int, timer: StepTimer, progress: Any,
                losses: LossLog) -> dict[str, float] | None:
    """The validation losses when one is due (every ``train.validation_every`` steps and at the last),
    measured on the main process while the others wait (under FSDP by every process: each forward of the
    sharded denoiser takes them all, and the same images, noise and timesteps give the same numbers); None when
    none is due."""
    t = run.cfg.train
    if run.validator is None or (step % t.validation_every and step != t.max_steps):
        return None
    with _aside(timer, "validation", progress, losses), averaged_weights(run.optimizer):
        values = run.validator.measure(run.unwrapped(), run.ema) if run.main or run.sharded else {}
    run.accelerator.wait_for_everyone()
    return values


@contextmanager
def _aside(timer: StepTimer, what: str, progress: Any, losses: LossLog) -> Iterator[Pause]:
    """Work between steps (a sample grid, a checkpoint), left out of the step time, the progress bar's rate and
    ETA, and the logged steps_per_s."""
    with timer.paused(what) as pause:
        yield pause
    # A minutes-long pause would otherwise read as slow steps: the ETA would jump, then creep back as tqdm's
    # smoothing forgot it. Shift tqdm's clocks as tqdm.unpause() does, but by the pause alone (unpause would
    # also drop the steps since the last redraw).
    if not progress.disable:
        progress.start_t += pause.seconds
        progress.last_print_t += pause.seconds
    losses.clock += pause.seconds


def _say(message: str, level: int = logging.INFO) -> None:
    """Log a line while the progress bar is up: tqdm clears the bar, the line prints, the bar is redrawn."""
    with tqdm.external_write_mode():
        logger.log(level, message)


def _stop_requested(run: Run, stop: StopSignals) -> bool:
    """Whether a signal asked this run to stop. Several processes agree on it every ``train.log_every`` steps
    and at the last (a collective, so not every step) and all stop at the same step."""
    acc, t = run.accelerator, run.cfg.train
    if acc.num_processes == 1:
        return stop.signum is not None
    if run.global_step % t.log_every and run.global_step != t.max_steps:
        return False
    if stop.signum is not None:
        acc.set_trigger()
    return acc.check_trigger()


@contextmanager
def _eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    modules = list(modules)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m in modules:
            m.train()


def sample_grid(run: Run, step: int) -> Path | None:
    """Render the fixed-seed grid with the live adapters (main process) into ``samples/step-NNNNNN.png``.
    Under FSDP every process renders it: each forward of the sharded denoiser takes them all, and the same
    prompts, seeds and steps make the same calls on each (there is no whole copy to sample from: no GPU could
    hold one). Only the main process keeps the grid."""
    path = None
    if run.main or run.sharded:
        started = time.perf_counter()
        grid = _render_grid(run, step)
        if run.main:
            path = save_image(grid, run.output_dir / "samples" / f"step-{step:06d}.png")
            _log_grid(run.accelerator, grid, step)
            _say(f"step {step}: {path.relative_to(run.output_dir)} ({time.perf_counter() - started:.1f} s)")
    run.accelerator.wait_for_everyone()
    return path


def _render_grid(run: Run, step: int) -> Any:
    """The grid of the sample prompts x seeds with the live adapters, as a PIL image."""
    cfg, c, plan = run.cfg, run.components, run.plan
    prompts = cfg.sample.prompts or default_sample_prompts(cfg, plan.examples)
    # sampling can take minutes while the progress bar stands still: say so, then say how long it took
    _say(f"step {step}: rendering the sample grid ({_count(len(prompts), 'prompt')} x "
         f"{_count(len(cfg.sample.seeds), 'seed')}, {cfg.sample.steps} steps each)")
    trained = run.unwrapped()  # not the compiled modules: sampling must not recompile the training graph
    live = replace(c, denoiser=trained[run.family.denoiser_name],
                   text_encoders=[trained.get(spec.name, te) for spec, te in zip(run.family.text_encoders,
                                                                                c.text_encoders)])
    pipe = run.family.pipeline(live, sampling_scheduler(c.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    settings = Settings(negative_prompt=cfg.sample.negative_prompt, steps=cfg.sample.steps,
                        width=plan.resolution, height=plan.resolution,
                        max_sequence_length=run.family.max_sequence_length)
    frozen = [c.vae, *c.text_encoders]
    with offload_models(*frozen, device=run.device, offload=run.offloaded), _eval_mode(run.modules.values()), \
            run.accelerator.autocast(), ema_weights(run.ema), averaged_weights(run.optimizer):
        grid = render_grid(pipe, prompts, cfg.sample.seeds, settings, guidance_scale=cfg.sample.guidance_scale,
                           title=f"step {step}", rewrite=run.embeddings.rewrite if run.embeddings else None)
    if run.offloaded:
        torch.cuda.empty_cache()
    return grid


def _count(n: int, noun: str) -> str:
    """``1 prompt``, ``4 prompts``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _log_grid(accelerator: Accelerator, grid: Any, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)


# --------------------------------------------------------------------------------------------------------
# Finish


MAX_UPDATE_RATIO = 100.0  # a LoRA update this many times the norm of the weight it changes has exploded


def check_health(run: Run) -> None:
    """Refuse to finish a run whose LoRA has blown up (e.g. train.learning_rate=1e30): an update far larger
    than the weight it modifies, or a loss on a training batch that is not finite (its samples would be
    black). The random streams are left as they were, so a saved checkpoint still resumes exactly."""
    worst, where = 0.0, ""
    for name, module in run.unwrapped().items():
        for layer_name, layer in module.named_modules():
            if not has_adapter(layer):  # a LoRA, LoHa or LoKr layer
                continue
            with torch.no_grad():
                # under FSDP both are DTensors: full_tensor() combines the shards' norms (float() of one would
                # read this process's shard alone); every process runs this check
                delta = fsdp.full_tensor(layer.get_delta_weight("default").float().norm())
                ratio = float(delta / (fsdp.full_tensor(layer.get_base_layer().weight.float().norm()) + 1e-12))
            if not math.isfinite(ratio) or ratio > worst:
                worst, where = ratio if math.isfinite(ratio) else math.inf, f"{name}.{layer_name}"
    loss = _probe_loss(run)
    if worst > MAX_UPDATE_RATIO or not math.isfinite(loss):
        raise SdtuneError(
            f"the trained LoRA has exploded at step {run.global_step} (its update of {where} is {worst:.3g} times "
            f"that weight; the loss on a training batch is {loss:.3g}), so no final LoRA was written: its images "
            f"would be noise or black. fix: a lower train.learning_rate (now {run.cfg.train.learning_rate}), "
            f"then train again in a new train.output_dir"
        )


def _check_embeddings_agree(run: Run) -> None:
    """Several processes must end with the same token embeddings (their gradients are averaged by hand, not by
    DDP); refuse to write files from one process's copy if they do not."""
    if run.embeddings is None or run.accelerator.num_processes == 1:
        return
    for rows in run.embeddings.rows:
        gathered = run.accelerator.gather(rows.detach()[None])  # (processes, N, width)
        if not torch.equal(gathered.amin(0), gathered.amax(0)):
            raise SdtuneError("pivotal tuning: the processes ended with different token embeddings; nothing final "
                              "was written. Please report this with the command you ran")


def _probe_loss(run: Run) -> float:
    """The loss of the trained model on its first training example, without dropout, random streams kept."""
    states = (run.generator.get_state(), torch.get_rng_state())
    try:
        batch = collate([run.dataset[0]])
        with torch.no_grad(), _eval_mode(run.modules.values()), offload_models(
                run.components.vae, *run.components.text_encoders, device=run.device, offload=run.offloaded):
            latents = batch_latents(run, batch)
            with run.accelerator.autocast():
                out = training_step(run.unwrapped()[run.family.denoiser_name], run.family, run.objective, latents,
                                    batch_conditioning(run, batch), run.generator,
                                    prior_preservation=bool(run.class_paths))
        return float(out.loss)
    finally:
        run.generator.set_state(states[0])
        torch.set_rng_state(states[1])


def _final_states(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """The final LoRA's tensors by component (the average with train.ema), whole: every process calls this
    (under FSDP gathering them takes all of them)."""
    with ema_weights(run.ema):
        return {name: adapter_state_dict(module) for name, module in run.unwrapped().items()}


def _save_final_lora(run: Run, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """The LoRA (``states``, from ``_final_states``) in every run format, each file whole or not at all; a full
    disk says how much is needed."""
    out = run.output_dir
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-final-") as tmp:
            with ema_weights(run.ema):  # the average with train.ema: the LoRA the run shows and saves
                save_diffusers_lora(tmp, run.family, run.unwrapped(), run.cfg.model.pretrained, states)
                embedding_files = run.embeddings.save(tmp) if run.embeddings else []
            for f in embedding_files:  # each whole or not at all, before the LoRA that needs them
                (out / f.parent.name).mkdir(exist_ok=True)
                os.replace(f, out / f.parent.name / f.name)
            os.replace(Path(tmp) / WEIGHT_NAME, out / WEIGHT_NAME)
        # what the kohya metadata says about the data (caption tags, folders, buckets); export reads it later
        write_data_summary(out, _data_summary(run))
        # the other run formats (the kohya file AUTOMATIC1111, ComfyUI, Forge and InvokeAI load), converted from
        # that file exactly as `sdtune export` converts it
        for line in write_run_files(out):
            logger.warning(line)
    except Exception as e:
        if not is_disk_full(e):
            raise
        need = _final_files_bytes(run) + 2**16
        raise DiskFull(f"disk full while writing the final LoRA files in {out}: nothing half-written was left; "
                       f"they need about {mib(need)} ({mib(free_bytes(out))} free). The trained LoRA is safe in "
                       f"checkpoints/step-{run.global_step:06d}: free space, then run the same command with "
                       "train.resume=latest to write the files") from None


def _data_summary(run: Run) -> dict:
    """The training data as kohya's metadata describes it (``sdtune.export.data_summary``): each folder by its
    name only (with several concepts one per concept, named ``{repeats}_{folder}`` as kohya's folders are), its
    captions' tags and image count, the class images' folders, the buckets, and when this training's loop began."""
    d, dataset, concepts = run.cfg.data, run.dataset, run.cfg.concepts()
    repeats = run.plan.repeats or [d.repeats] * len(concepts)
    instance, reg = [], []
    for i, k in enumerate(concepts):
        name = public_name(k.instance_dir or k.dataset) or "instance"
        if len(concepts) > 1:
            name = f"{repeats[i]}_{name}"
            while name in [s.name for s in instance]:  # two folders of one name (a/photos, b/photos)
                name = f"{name} ({k.identifier})"
        instance.append(ImageSet(name, [e.caption for e in dataset.instance if e.concept == i], repeats[i]))
    for images in dataset.classes:
        # one entry per folder: concepts of one class prompt share the cache folder
        if images.paths and images.paths[0].parent.name not in [s.name for s in reg]:
            reg.append(ImageSet(images.paths[0].parent.name, [images.prompt] * len(images.paths)))
    buckets = None
    if dataset.buckets and len(set(repeats)) == 1:
        buckets = bucket_info(dataset.buckets, [upright_size(e.path) for e in dataset.instance], repeats[0])
    elif dataset.buckets:  # each example counted as often as an epoch shows it (its concept's repeats)
        shown = [dataset.instance[i] for i in dataset.order]
        buckets = bucket_info([dataset.size(j) for j in range(len(shown))], [upright_size(e.path) for e in shown])
    return data_summary(time.time() - run.timing.get("wall_s", 0.0), instance, reg or None, buckets)


def finish(run: Run) -> Path:
    """The last checkpoint, the LoRA in every run format, a summary, a sample grid and the model card."""
    t, acc, out = run.cfg.train, run.accelerator, run.output_dir
    timing = run.timing
    images_per_step = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    cuda = run.device.type == "cuda"
    summary = {
        "global_step": run.global_step,
        **timing,  # timed_steps, s_per_step (training steps only), sample_s, checkpoint_s, wall_s
        "img_per_s": images_per_step / timing["s_per_step"] if timing["timed_steps"] else float("nan"),
        "images_per_step": images_per_step,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name(run.device) if cuda else run.device.type,
        "mixed_precision": acc.mixed_precision,
        "optimizer": t.optimizer,
    }
    summary |= ema_summary(run.ema) | validation_summary(out / "losses.jsonl", run.global_step)
    if is_schedule_free(t.optimizer):  # what the LoRA files hold: its average, not its training point
        summary["lora_weights"] = "schedule-free average"
    with StopSignals(logger.info) as stop:  # the final checkpoint is saved whole, then a signal stops the run
        with averaged_weights(run.optimizer):  # what would be saved (a schedule-free optimizer's average)
            check_health(run)  # an exploded LoRA is refused before anything final is written
        _check_embeddings_agree(run)
        run.save()
        if _stop_requested(run, stop):
            raise _interrupted(run, stop.signum, stop.exit_code, " to write the final LoRA files")
    # from here on the weights shown and saved: a schedule-free optimizer's average (y stays in the checkpoint)
    with _stops_at_once(run), averaged_weights(run.optimizer):
        states = _final_states(run)
        if run.main:
            _save_final_lora(run, states)
            write_text(out / "train_summary.json", json.dumps(summary, indent=2))
        grid = sample_grid(run, run.global_step)
        acc.end_training()
        if run.main:
            card = write_model_card(out, run.cfg.model_dump(mode="json"), run.family)
            logger.info(f"LoRA: {out / WEIGHT_NAME}")
            logger.info(f"samples: {grid}")
            logger.info(f"model card: {card}")
    return out


@contextmanager
def _stops_at_once(run: Run) -> Iterator[None]:
    """Once the final checkpoint is saved, SIGINT and SIGTERM stop the run at once (a sample grid can take
    minutes; each final file is written whole or not at all), with the hint a stop in the loop gives: a resume
    at the last step writes the files again. Further signals are then ignored while the process ends."""
    caught: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        if not caught:
            caught.append(signum)
            for s in StopSignals.SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            raise KeyboardInterrupt

    # Python delivers signals in the main thread only; elsewhere the handlers stay as they are
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handle) for s in StopSignals.SIGNALS} if main_thread else {}
    try:
        yield
    except KeyboardInterrupt:
        signum = caught[0] if caught else signal.SIGINT
        raise _interrupted(run, signum, 128 + signum, " to write the final LoRA files and sample grid") from None
    finally:
        if not caught:
            for s, handler in old.items():
                signal.signal(s, handler)
