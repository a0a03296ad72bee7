"""The frozen denoiser's weights at the real models' shapes with ``model.quantize`` none / fp8 / nf4 (issue #17).

    .venv/bin/python bench/quantized_weights.py            # a Markdown table, no weights loaded (a CPU, seconds)

Each family's denoiser (``random_configs("full")``: FLUX.1-dev, SD3.5 Medium, SD 1.5, SDXL; and SD3.5 Large) is built on the meta
device from its real config, and ``sdtune.quantize.planned_bytes`` says what ``model.quantize`` leaves it with:
bf16 (and fp16) as stored, fp8 by casting the skeleton exactly as training does, NF4 by bitsandbytes' storage
formula (``nf4_bytes``; tests/test_quantize.py checks it equal to the bytes of real quantized layers). The
flow families' text encoders are listed too, as stored and under ``model.quantize_text_encoders`` (NF4): by
default they are not quantized, and with cached text embeddings they leave the GPU before the first step (T5-XXL,
4.76B weights, 8.9 GiB in bf16, is on the GPU while captions are encoded). These are the weights only:
activations, LoRA, optimizer state and the CUDA context come on top (``sdtune.memory``; not calibrated for the
flow-matching families: no GPU figure is claimed here).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from accelerate import init_empty_weights

from sdtune import families
from sdtune.quantize import planned_bytes

MODELS = {"flux": "FLUX.1-dev", "sd3": "SD3.5 Medium", "sd15": "SD 1.5", "sdxl": "SDXL 1.0"}


def skeleton(family: Any) -> torch.nn.Module:
    """The family's full-size denoiser on the meta device (no memory, no weights)."""
    import diffusers

    config = family.random_configs("full")[family.denoiser_name]
    cls = {"unet": diffusers.UNet2DConditionModel, "transformer": None}[family.denoiser_name] or \
        {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel}[family.name]
    with init_empty_weights():
        return cls(**config)


def sd35_large() -> torch.nn.Module:
    """SD3.5 Large's transformer (stabilityai/stable-diffusion-3.5-large, transformer/config.json: 38 blocks of
    38 heads x 64, no dual attention, a 192-wide position table) on the meta device."""
    import diffusers

    medium = families.get("sd3").random_configs("full")["transformer"]
    config = {**medium, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 38 * 64,
              "pos_embed_max_size": 192, "dual_attention_layers": ()}
    with init_empty_weights():
        return diffusers.SD3Transformer2DModel(**config)


def text_encoders() -> dict[str, Callable[[], torch.nn.Module]]:
    """The flow families' text encoders at their real shapes, on the meta device (``model.quantize_text_encoders``)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from sdtune.families.sd import clip_text_config
    from sdtune.families.t5 import t5_config

    def build(cls: Any, config: Any) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            with init_empty_weights():
                return cls(config)
        return make

    clip_l, clip_g = families.get("sd3").random_configs("full")["clip"]
    return {"T5-XXL encoder": build(T5EncoderModel, t5_config("full")),
            "CLIP-L": build(CLIPTextModelWithProjection, clip_text_config(**clip_l, openclip=False)),
            "CLIP-G (bigG)": build(CLIPTextModelWithProjection, clip_text_config(**clip_g, openclip=True))}


def row(label: str, make: Callable[[], torch.nn.Module]) -> str:
    count = sum(p.numel() for p in make().parameters())
    sizes = [planned_bytes(make(), mode, torch.bfloat16) / 2**30 for mode in ("none", "fp8", "nf4")]
    return f"| {label} | {count / 1e9:.2f}B | " + " | ".join(f"{s:.2f}" for s in sizes) + " |"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print("| model | weights | bf16 GiB | fp8 GiB | nf4 GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, label in MODELS.items():
        family = families.get(name)
        print(row(label, lambda family=family: skeleton(family)))
    print(row("SD3.5 Large", sd35_large))
    for label, make in text_encoders().items():
        print(row(label, make))


if __name__ == "__main__":
    main()
