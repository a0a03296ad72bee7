"""LoRA adapters (PEFT) on the denoiser and text encoders, and saving them in diffusers' format.

The saved file is what ``pipe.load_lora_weights(output_dir)`` reads: keys prefixed by component name
(``unet.``, ``text_encoder.``, ``text_encoder_2.``) plus each adapter's PEFT config (rank, alpha, DoRA) in
the safetensors metadata, so an ``alpha`` different from ``rank`` loads with the right scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.export import public_name
from sdtune.families import Family
from sdtune.layout import canonical_text_encoder_keys, keys_for_module, rewrite_safetensors_header
from sdtune.runs import MARK_KEY, WEIGHT_NAME


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
        # as diffusers' DreamBooth: A ~ N(0, 1/r), B = 0, so training starts at the base model
        init_lora_weights="gaussian",
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
    """The adapter's tensors in PEFT naming (``...q_proj.lora_A.weight``), keys in the canonical layout
    (``sdtune.layout``: a CLIP text encoder's under ``text_model.``, whatever the installed transformers
    calls its modules), as every LoRA file and checkpoint holds it; ``load_adapter_state_dict`` reads it."""
    from peft import get_peft_model_state_dict

    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items()
    }
    return canonical_text_encoder_keys(state, type(module).__name__)


def load_adapter_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put tensors from ``adapter_state_dict`` (or a LoRA file's, canonical keys) back into ``module``'s
    adapter, refusing any mismatch. A CLIP text encoder's keys are renamed to the installed transformers'
    layout first (``sdtune.layout.keys_for_module``), so a checkpoint from transformers 4 resumes on 5."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, keys_for_module(state, module), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise SdtuneError(
            f"checkpoint does not match the LoRA layout of this run ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})"
        )


def save_diffusers_lora(output_dir: str | Path, family: Family, trained: dict[str, torch.nn.Module],
                        base_model: str | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in diffusers' format for the trained modules
    ({component name: PEFT-injected module}); ``pipe.load_lora_weights(output_dir)`` reads it back.

    Text-encoder keys are canonical (``text_encoder.text_model.encoder.layers.0...``, ``sdtune.layout``),
    which every diffusers version loads, whatever the installed transformers names the modules. Each
    adapter's config names the base model (``base_model``, else what PEFT recorded) only publicly: a hub id,
    or a local model's folder or file name, never its path (``sdtune.export.public_name``)."""
    import diffusers

    kwargs = {}
    for name, module in trained.items():
        # PEFT key names (lora_A / lora_B), as diffusers' own training scripts now save them. Converting them
        # to the old diffusers names renames only attention keys; diffusers' loader then guesses the format
        # from the first key and silently drops the others when a run trains more than attention.
        kwargs[f"{name}_lora_layers"] = adapter_state_dict(module)
        config = module.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = public_name(base_model or config.get("base_model_name_or_path"))
        kwargs[f"{name}_lora_adapter_metadata"] = config
    getattr(diffusers, family.lora_pipeline).save_lora_weights(output_dir, safe_serialization=True, **kwargs)
    path = Path(output_dir) / WEIGHT_NAME
    mark_safetensors(path)
    return path


def mark_safetensors(path: str | Path) -> None:
    """Add sdtune's mark (``MARK_KEY``: version) to the metadata of a .safetensors that a library wrote for us
    (diffusers' writer takes no extra metadata). Only the header is rewritten; the tensor bytes are copied
    as they are, and the file is replaced whole or not at all."""
    rewrite_safetensors_header(path, lambda header: {
        **header, "__metadata__": {**(header.get("__metadata__") or {}), MARK_KEY: __version__}})
