"""The frozen denoiser in fewer bytes (``model.quantize``): 4-bit NF4 or fp8 storage under a trained LoRA.

- ``nf4``: every ``nn.Linear`` of the UNet / transformer becomes a bitsandbytes ``Linear4bit`` (NF4, double
  quantization: about 0.52 bytes a weight), computing in the run's mixed-precision dtype; PEFT puts its own
  LoRA layer for ``Linear4bit`` on top (QLoRA). Convolutions, norms and embeddings keep the compute dtype.
- ``fp8``: diffusers' layerwise casting (``ModelMixin.enable_layerwise_casting``): weights stored as
  ``float8_e4m3fn`` (1 byte) and cast up to the compute dtype one layer at a time in the forward pass, what
  kohya's ``--fp8_base`` does. diffusers' skip list stays in the compute dtype: norms, positional embeddings,
  the first and last projections, and (by name) the adaptive norms' modulation layers, which diffusers treats
  as precision-sensitive: 3.2B of FLUX.1-dev's 11.9B weights, so fp8 gives 14.1 GiB there, not 11.1
  (``bench/quantized_weights.py``). Convolutions are kept too (their backward reads the re-cast weight).

``model.quantize_text_encoders`` does the same to the text encoders (transformers models: diffusers'
``apply_layerwise_casting`` with its default skip list for fp8; their ``_keep_in_fp32_modules``, T5's ``wo``,
and the embeddings are kept in either mode).

The LoRA itself stays fp32 either way, and its initial values are those of an unquantized run in the same
compute dtype (PEFT picks the adapter's dtype from the layer's ``compute_dtype``).

Why not diffusers' ``BitsAndBytesConfig`` at ``from_pretrained``: its quantizer refuses to run without a GPU
(``validate_environment``), so the CPU test suite could never run the code path users get on a GPU. Here the
model loads in the compute dtype on the CPU and each layer is quantized as it moves to the device, so the
device never holds the unquantized model; the CPU holds it once, as it does for an unquantized run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
         torch.nn.ConvTranspose3d)


@dataclass(frozen=True)
class Quantized:
    """What ``quantize`` did: how many layers it stored in fewer bytes, and the module's weight bytes."""

    mode: str
    layers: int
    bytes_before: int
    bytes_after: int

    def line(self, name: str, key: str = "model.quantize=") -> str:
        what = {"nf4": "4-bit NF4 (bitsandbytes)", "fp8": "fp8 e4m3 (layerwise casting)"}[self.mode]
        return (f"{key}{self.mode}: {self.layers} layers of the {name} stored in {what}; its weights "
                f"{_size(self.bytes_before)} -> {_size(self.bytes_after)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def nf4_bytes(values: int, blocksize: int = 64) -> int:
    """Bytes of one weight of ``values`` values in NF4 with double quantization, as bitsandbytes stores it:
    two values a byte, an 8-bit scale per block of 64, those scales' own fp32 scale per 256 blocks, and the
    code tables (NF4's 16 fp32 values, the scales' 256)."""
    blocks = -(-values // blocksize)
    return -(-values // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``quantize`` stored ``module`` (or any of its layers) in NF4 or fp8."""
    return any(p.dtype == FP8 or getattr(p, "quant_state", None) is not None for p in module.parameters())


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (NF4 weights: their packed bytes and scales)."""
    return frozen_size(module, trainable_too=True)[1]


def frozen_size(module: torch.nn.Module, trainable_too: bool = False) -> tuple[int, int]:
    """(weights, bytes) of ``module``'s frozen parameters and its buffers as stored: an NF4 weight counts as
    its original shape's values, in its packed bytes plus scales."""
    params = [p for p in module.parameters() if trainable_too or not p.requires_grad]
    count, total = 0, sum(b.numel() * b.element_size() for b in module.buffers())
    for p in params:
        state = getattr(p, "quant_state", None)  # bitsandbytes' NF4 scales live beside the packed weight
        count += state.shape.numel() if state is not None else p.numel()
        total += p.numel() * p.element_size() + (_quant_state_bytes(state) if state is not None else 0)
    return count, total


def _quant_state_bytes(state: Any) -> int:
    tensors = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)  # double quantization: the scales' own scales
    if nested is not None:
        tensors += [nested.absmax, getattr(nested, "code", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def problems(mode: str, lora_type: str, use_dora: bool, key: str = "model.quantize",
             adapters: bool = True) -> list[str]:
    """Recipe options that cannot go with ``key`` (``model.quantize``, ``model.quantize_text_encoders``) set to
    ``mode``, one line each naming its key; ``adapters``: whether the quantized modules get an adapter."""
    if mode == "none":
        return []
    found = []
    if adapters and use_dora:
        # DoRA's magnitude needs the base weight's column norms, read from the stored weight directly
        found.append(f"lora.use_dora: DoRA reads the base weights directly, not through {key}={mode}; "
                     f"fix: remove lora.use_dora, or {key}=none")
    if adapters and lora_type != "lora":
        found.append(f"lora.type: {lora_type} over a quantized model is not supported by PEFT (LoRA is); fix: "
                     f"lora.type=lora, or {key}=none")
    if mode == "nf4":
        try:
            _bitsandbytes()  # the one import of it, quiet about its optional CPU kernels
        except ImportError:
            found.append(f"{key}: nf4 needs bitsandbytes; pip install bitsandbytes, or {key}=fp8")
    return found


def warnings(mode: str, gradient_checkpointing: bool) -> list[str]:
    """What a user of ``model.quantize`` ``mode`` should know before the weights load."""
    if mode == "fp8" and not gradient_checkpointing:
        # each layer's upcast weights are saved for its backward pass: without checkpointing all of them at once
        return ["model.quantize=fp8 without train.gradient_checkpointing=true saves little GPU memory while "
                "training: every layer's weights, cast up for the forward pass, are kept until the backward pass"]
    return []


def quantize(module: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device) -> Quantized:
    """Store ``module``'s weights in ``mode`` (nf4 / fp8) and move it to ``device``. ``module`` must be frozen
    and in ``compute_dtype``; nothing may cast its dtype afterwards (``.to(dtype)`` would reinterpret NF4's
    packed bytes)."""
    before = weight_bytes(module)
    if mode == "nf4":
        layers = _to_nf4(module, compute_dtype, device)
    elif mode == "fp8":
        layers = _to_fp8(module, compute_dtype)
    else:
        raise SdtuneError(f"model.quantize: unknown mode '{mode}'; choose none, nf4 or fp8")
    module.to(device)
    return Quantized(mode, layers, before, weight_bytes(module))


def planned_bytes(module: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """The weight bytes ``quantize`` would leave ``module`` with, computed without quantizing (a model built on
    the meta device from its config gives the real model's figure): NF4 from ``nf4_bytes``, fp8 by casting
    the skeleton as ``quantize`` would. ``module`` is changed for fp8: pass a throwaway skeleton."""
    size = torch.tensor([], dtype=compute_dtype).element_size()
    if mode == "fp8":
        _to_fp8(module.to(compute_dtype), compute_dtype)
        return weight_bytes(module)
    if mode != "nf4":
        return sum(t.numel() for t in (*module.parameters(), *module.buffers())) * size
    nf4 = {id(m.weight) for _, m in _nf4_linears(module)}
    return sum(nf4_bytes(p.numel()) if id(p) in nf4 else p.numel() * size for p in module.parameters()) + \
        sum(b.numel() * size for b in module.buffers())


def _nf4_linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The layers ``model.quantize=nf4`` stores in 4 bits: every ``nn.Linear`` but the model's fp32 ones."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return [(name, m) for name, m in module.named_modules()
            if type(m) is torch.nn.Linear and not any(k in name.split(".") for k in keep)]


def _bitsandbytes() -> Any:
    # on a CPU with AVX512-BF16 bitsandbytes warns at import that an optional faster kernel package (``kernels``,
    # fetched from the Hub) is missing; its own kernels work without it
    chatty = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        chatty.setLevel(level)
    return bitsandbytes


def _to_nf4(module: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    bnb = _bitsandbytes()
    linears = _nf4_linears(module)
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        # bitsandbytes repacks a CPU layer's weight in place for a faster no-grad path the first time it runs
        # in eval mode (sampling during training), which fails for inputs narrower than a block (64) and leaves
        # the weight in another layout for the training steps after it: off, the GPU never takes that path
        q.support_avx512bf16_for_cpu = False
        # .to(device) quantizes (on the CPU too): one layer at a time, so the device never holds the model
        # unquantized, and the unquantized copy of each layer is freed as it goes
        setattr(module.get_submodule(parent_name) if parent_name else module, child, q.to(device))
    return len(linears)


def _to_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    # Convolutions stay in the compute dtype: their backward pass reads the weight tensor itself, which the
    # hook has cast back to fp8 by then (a linear layer's saves the upcast view it multiplied with)
    if hasattr(module, "enable_layerwise_casting"):  # a diffusers model: its own skip list
        module.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_classes=CONVS)
    else:  # a transformers text encoder: diffusers' default skip list (norms), its fp32 modules, the embeddings
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        keep = tuple(rf"(^|\.){name}$" for name in getattr(module, "_keep_in_fp32_modules", None) or ())
        apply_layerwise_casting(module, FP8, compute_dtype, DEFAULT_SKIP_MODULES_PATTERN + keep,
                                (*CONVS, torch.nn.Embedding))
    cast = [m for m in module.modules() if getattr(m, "weight", None) is not None and m.weight.dtype == FP8]
    for m in cast:
        # PEFT gives a LoRA layer the dtype of its base layer's weight, fp8 here, unless the layer says it
        # computes in another (as bitsandbytes' layers do): the LoRA's initial values then match an
        # unquantized run's instead of being rounded to 3 mantissa bits
        m.compute_dtype = compute_dtype
    return len(cast)
