"""LoRA adapters (PEFT) on the denoiser and text encoders, and saving them in diffusers' format.

The saved file is what ``pipe.load_lora_weights(output_dir)`` reads: keys prefixed by component name
(``unet.``, ``text_encoder.``, ``text_encoder_2.``) plus each adapter's PEFT config (rank, alpha, DoRA) in
the safetensors metadata, so an ``alpha`` different from ``rank`` loads with the right scale.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.families import Family
from sdtune.files import atomic_path
from sdtune.runs import MARK_KEY, WEIGHT_NAME, safetensors_header


def add_lora(
    module: torch.nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: list[str],
    dropout: float = 0.0,
    use_dora: bool = False,
    key: str = "lora.target_modules",
) -> None:
    """Freeze ``module`` and add a trainable LoRA adapter named ``default`` to its ``target_modules``."""
    from peft import LoraConfig

    module.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # as diffusers' DreamBooth: A ~ N(0, 1/r), B = 0, so training starts at the base model
        target_modules=target_modules,
        use_dora=use_dora,
    )
    try:
        module.add_adapter(config)
    except ValueError as e:
        raise SdtuneError(f"{key}: {str(e).splitlines()[0][:200]}") from None


def trainable_parameters(*modules: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def adapter_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT naming (the form ``set_peft_model_state_dict`` takes back)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items()
    }


def load_adapter_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put tensors from ``adapter_state_dict`` back into ``module``'s adapter, refusing any mismatch."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise SdtuneError(
            f"checkpoint does not match the LoRA layout of this run ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})"
        )


def save_diffusers_lora(output_dir: str | Path, family: Family, trained: dict[str, torch.nn.Module]) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in diffusers' format for the trained modules
    ({component name: PEFT-injected module}); ``pipe.load_lora_weights(output_dir)`` reads it back."""
    import diffusers

    kwargs = {}
    for name, module in trained.items():
        # PEFT key names (lora_A / lora_B), as diffusers' own training scripts now save them. Converting them
        # to the old diffusers names renames only attention keys; diffusers' loader then guesses the format
        # from the first key and silently drops the others when a run trains more than attention.
        kwargs[f"{name}_lora_layers"] = adapter_state_dict(module)
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    getattr(diffusers, family.lora_pipeline).save_lora_weights(output_dir, safe_serialization=True, **kwargs)
    path = Path(output_dir) / WEIGHT_NAME
    mark_safetensors(path)
    return path


def mark_safetensors(path: str | Path) -> None:
    """Add sdtune's mark (``MARK_KEY``: version) to the metadata of a .safetensors that a library wrote for us
    (diffusers' writer takes no extra metadata). Only the header is rewritten; the tensor bytes are copied
    as they are, and the file is replaced whole or not at all."""
    path = Path(path)
    header = safetensors_header(path)
    with open(path, "rb") as src:
        old_size = struct.unpack("<Q", src.read(8))[0]
        header["__metadata__"] = {**(header.get("__metadata__") or {}), MARK_KEY: __version__}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        src.seek(8 + old_size)
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 1 << 20)
