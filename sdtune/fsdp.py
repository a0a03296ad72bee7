"""Fully sharded training (accelerate's FSDP2) for a denoiser that does not fit one GPU.

``accelerate launch --config_file recipes/accelerate/fsdp.yaml -m sdtune train RECIPE`` shards the frozen
denoiser over the processes: each transformer block (the model's ``_no_split_modules``: FLUX.1's
``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``, SD3's ``JointTransformerBlock``) is its own FSDP
unit, every process keeps 1/N of each of its weights and all-gathers one block at a time as it runs. The LoRA
inside those blocks is sharded the same way: FSDP2 makes every parameter a ``DTensor`` holding this process's
rows (dim 0). What sdtune writes is always the whole adapter:

- ``full_state`` gathers a state dict's ``DTensor`` values (the LoRA, the optimizer's moments) into whole
  tensors. A collective: every process calls it, with the same keys in the same order.
- ``shard_like`` and ``shard_optimizer_state`` cut whole tensors read from a checkpoint back into this
  process's shards (every process reads the same file; no communication).
- ``config_problems``: what cannot run sharded, one line each, before any weight loads (``sdtune.plan``).
- ``make_plugin``: accelerate's FSDP plugin with the recipe's precision left to autocast, as under DDP; and
  ``enable_on_cpu``: the same accelerate code on CPU gloo processes, where accelerate itself falls back to DDP.

Only ``fsdp_version: 2`` is supported: FSDP1 flattens all of a block's parameters into one tensor of one
dtype, and the frozen base (bf16) and the LoRA (fp32) are two.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune.data import list_images
from sdtune.errors import SdtuneError
from sdtune.optim import is_schedule_free

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdtune.config import Concept, Config

FSDP_CONFIG = "recipes/accelerate/fsdp.yaml"


def requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config: ``accelerate launch`` sets
    ``ACCELERATE_USE_FSDP`` for ``distributed_type: FSDP`` (and ``FSDP_VERSION`` from ``fsdp_version``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def version() -> int:
    """The launch's ``fsdp_version`` (accelerate's default, 1, where the config names none)."""
    return int(os.environ.get("FSDP_VERSION", "1"))


def version_problem() -> str | None:
    """The one-line refusal of an FSDP launch sdtune cannot run, None for FSDP2 (or no FSDP)."""
    if not requested() or version() == 2:
        return None
    return (f"accelerate config fsdp_version: {version()} flattens each block's frozen weights (bf16) and its "
            f"LoRA (fp32) into one tensor of one dtype, which FSDP1 refuses; fix: fsdp_version: 2 ({FSDP_CONFIG})")


def config_problems(cfg: Config, class_cache: Callable[[Concept], Path] | None = None) -> list[str]:
    """What sdtune refuses in an FSDP launch, one line each naming its key and the fix; nothing otherwise.
    Read from the recipe and the launch's environment only: called before any weight loads. ``class_cache``:
    where a concept's generated class images are (``sdtune.plan.class_images_dir``)."""
    if not requested():
        return []
    t, quantize = cfg.train, cfg.model.quantize
    found = [p for p in [version_problem()] if p]
    why_not_quantized = {
        "nf4": "bitsandbytes' packed 4-bit weights cannot be sharded (accelerate leaves them whole on every GPU)",
        "fp8": "diffusers' layerwise casting re-casts each layer's weights, which FSDP holds sharded (untested)",
    }
    checks = [
        (cfg.lora.train_text_encoder, "lora.train_text_encoder: true trains a second model; accelerate's FSDP2 "
         "prepares one (the sharded denoiser). fix: lora.train_text_encoder=false, or DDP (multi_gpu.yaml)"),
        (quantize != "none", f"model.quantize: {quantize} is not supported under FSDP: "
         f"{why_not_quantized.get(quantize)}. fix: model.quantize=none (FSDP shards the bf16 weights instead), "
         "or one GPU without FSDP"),
        # bitsandbytes' optimizer_update_8bit_blockwise refuses DTensor parameters ("got mixed torch.Tensor and
        # DTensor", seen on CPU gloo processes)
        (t.optimizer.endswith("8bit"), f"train.optimizer: {t.optimizer}'s bitsandbytes update cannot step the "
         "sharded (DTensor) parameters of FSDP2. fix: train.optimizer=adamw"),
        (cfg.pivotal.enabled, "pivotal.enabled: pivotal tuning trains token embeddings outside the sharded "
         "model; not supported under FSDP. fix: pivotal.enabled=false, or DDP (multi_gpu.yaml)"),
        (t.ema, "train.ema: the average of sharded LoRA weights is not supported under FSDP. fix: "
         "train.ema=false, or DDP (multi_gpu.yaml)"),
        (is_schedule_free(t.optimizer), f"train.optimizer: {t.optimizer} switches the LoRA to its "
         "average to sample and save, which sdtune does on one process; not supported under FSDP. fix: "
         "train.optimizer=adamw, or DDP (multi_gpu.yaml)"),
        (t.compile, "train.compile: torch.compile of the sharded denoiser is not supported by sdtune under FSDP. "
         "fix: train.compile=false"),
    ]
    found += [line for bad, line in checks if bad]
    return found + _class_image_problems(cfg, class_cache)


def _class_image_problems(cfg: Config, class_cache: Callable[[Concept], Path] | None) -> list[str]:
    """Prior preservation under FSDP uses class images that already exist: sdtune generates them before the
    model is sharded, which needs the whole model on one GPU, the very thing FSDP avoids. ``class_cache``: the
    cache folder a concept's generated class images are in (``sdtune.plan.class_images_dir``)."""
    if not cfg.prior.enabled:
        return []
    found = []
    for concept in cfg.concepts():
        key, need = concept.key_of("class_dir"), cfg.prior.num_class_images
        folder = Path(concept.class_dir) if concept.class_dir else class_cache(concept) if class_cache else None
        have = len(list_images(folder)) if folder and folder.is_dir() else 0
        if have < need:
            where = f"{concept.class_dir} holds {have} of prior.num_class_images={need}" if concept.class_dir \
                else f"sdtune's cache holds {have} of prior.num_class_images={need} for it"
            found.append(f"{key}: under FSDP sdtune does not generate class images (that needs the whole model on "
                         f"one GPU), and {where}; fix: run `sdtune class-images` with the same recipe and "
                         f"overrides first, without the FSDP config, or {key}=FOLDER of {need} class images, or "
                         "prior.enabled=false")
    return found


def make_plugin() -> Any:
    """accelerate's FSDP plugin for this launch (its other settings from the ``FSDP_*`` environment the
    config gives): no cast at all-gather and fp32 gradient reduction. sdtune already stores the frozen base in
    the compute dtype and the LoRA in fp32, and autocast computes in the recipe's precision, exactly as under
    DDP; accelerate's default policy for bf16 would also reduce the LoRA's fp32 gradients in bf16."""
    problem = version_problem()
    if problem:  # check_run says so first; this is for library callers that skip it
        raise SdtuneError(problem)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # torch warns, at every step, that a block returned a view (FLUX's single blocks return their text and image
    # halves as slices, and the model a slice of them): an in-place op on it would skip the all-gather. Nothing
    # here writes into them in place (diffusers' next block concatenates them anew, the objectives compute out of
    # place), and tests/test_fsdp.py finds the LoRA, optimizer state and losses bitwise equal to a DDP run's.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    return FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=MixedPrecisionPolicy())


def enable_on_cpu(accelerator: Accelerator, plugin: Any) -> None:
    """Run accelerate's FSDP2 code on CPU gloo processes (the tests' launch). accelerate turns FSDP on only
    for GPU-like process groups (``AcceleratorState``) and otherwise falls back to DDP without a word; torch's
    FSDP2 itself shards on a CPU mesh with gloo. So the state is set as a GPU launch sets it, and ``prepare``,
    ``clip_grad_norm_`` and the rest take their FSDP2 paths. A no-op anywhere but a CPU process group."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    # both shared states: AcceleratorState copies PartialState's whenever it is constructed again
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the trained model is sharded by FSDP in this run."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def outputs_in_fp32(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under mixed precision, make the sharded module's floating outputs fp32, as accelerate's ``prepare_model``
    does for a DDP or single-process model (and its FSDP2 path does not): a sampling pipeline's scheduler then
    steps on the same numbers as in any other run, and the grids match a DDP run's (training and validation
    cast the prediction to fp32 themselves)."""
    if not accelerator.native_amp:
        return
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    module.forward = MethodType(convert_outputs_to_fp32(module.forward.__func__), module)


def sharded_units(module: torch.nn.Module) -> dict[str, int]:
    """How many modules of each class are FSDP units of their own (the root excluded), e.g.
    ``{"FluxTransformerBlock": 19, "FluxSingleTransformerBlock": 38}``."""
    from torch.distributed.fsdp import FSDPModule

    counts: dict[str, int] = {}
    for name, m in module.named_modules():
        if name and isinstance(m, FSDPModule):
            # FSDP2 makes the module an instance of a subclass named FSDP<class>: report the model's own class
            cls = type(m).__name__.removeprefix("FSDP")
            counts[cls] = counts.get(cls, 0) + 1
    return counts


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard (a collective all-gather), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every ``DTensor`` gathered whole (a collective per sharded tensor: every process calls
    this with the same keys in the same order)."""
    return {k: full_tensor(v) for k, v in state.items()}


def _shard(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` cut as ``like`` (a ``DTensor`` parameter or state) is sharded: this process's rows of it,
    taken from its own copy (``src_data_rank=None``: every process read the same file, nothing is sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(whole, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def shard_like(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of ``state`` sharded as the tensors of ``reference`` under the same key (a module's own
    state dict); keys it lacks are left for the loader to refuse."""
    return {k: _shard(v, reference[k]) if k in reference else v for k, v in state.items()}


def full_optimizer_state(optimizer: Any) -> dict:
    """``optimizer.state_dict()`` with its sharded moments gathered whole: the same file a DDP run writes (a
    collective under FSDP: every process calls it)."""
    state = optimizer.state_dict()
    return {**state, "state": {i: full_state(s) for i, s in state["state"].items()}}


def shard_optimizer_state(optimizer: Any, state: dict) -> dict:
    """A whole optimizer state dict (``full_optimizer_state``, or a DDP run's) with each parameter's moments
    sharded as that parameter is in this run; unchanged when nothing is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {i: {k: _shard(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                   for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": sharded}
