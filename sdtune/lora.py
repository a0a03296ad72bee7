"""LoRA adapters (PEFT) on the denoiser and text encoders, and saving them in diffusers' format.

``lora.type`` picks the adapter: ``lora`` (PEFT's LoraConfig, optionally DoRA), or LyCORIS' ``loha``
(Hadamard product of two low-rank products) and ``lokr`` (Kronecker product), PEFT's LoHaConfig and
LoKrConfig. Every kind is saved, checkpointed and resumed through PEFT's own state dict.

The saved file (``pytorch_lora_weights.safetensors``) holds keys prefixed by component name (``unet.``,
``text_encoder.``, ``text_encoder_2.``) plus each adapter's PEFT config (rank, alpha, DoRA; for LoHa/LoKr
its ``peft_type`` and factorisation) in the safetensors metadata. For LoRA it is what
``pipe.load_lora_weights(output_dir)`` reads, an ``alpha`` different from ``rank`` with the right scale. For
LoHa/LoKr it holds PEFT's own keys (``...to_q.hada_w1_a``), which diffusers' ``load_lora_weights`` refuses
(it reads LoRA keys only): ``sdtune sample`` puts them back with PEFT (``inject_adapter``), and the run's
kohya file (``sdtune.export``, LyCORIS keys) is the one for AUTOMATIC1111, ComfyUI and Forge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune import __version__
from sdtune.errors import SdtuneError, first_line
from sdtune.export import public_name, sorted_config
from sdtune.families import Family
from sdtune.fsdp import full_state, shard_like
from sdtune.layout import canonical_text_encoder_keys, keys_for_module, rewrite_safetensors_header
from sdtune.runs import MARK_KEY, WEIGHT_NAME

# What a parameter or state-dict key of each adapter kind contains (PEFT's attribute names, as LyCORIS's).
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")


def is_adapter_key(key: str) -> bool:
    """Whether a parameter or state-dict key is an adapter's (LoRA, LoHa or LoKr)."""
    return any(marker in key for marker in ADAPTER_MARKERS)


def adapter_config(
    kind: str, rank: int, alpha: float | None, target_modules: list[str], dropout: float = 0.0,
    use_dora: bool = False,
) -> Any:
    """PEFT's config for ``lora.type`` ``kind``: ``LoraConfig`` (lora), ``LoHaConfig`` (loha), ``LoKrConfig``
    (lokr). ``alpha`` None means ``rank`` (scale 1); every kind scales its update by alpha / rank."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = alpha if alpha is not None else rank
    if kind == "lora":
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            # as diffusers' DreamBooth: A ~ N(0, 1/r), B = 0, so training starts at the base model
            init_lora_weights="gaussian",
            target_modules=target_modules,
            use_dora=use_dora,
        )
    if kind not in ("loha", "lokr"):
        raise SdtuneError(f"lora.type: unknown adapter type '{kind}'; choose lora, loha or lokr")
    if dropout or use_dora:  # check_run refuses both first; this guards other callers
        key = "lora.dropout" if dropout else "lora.use_dora"
        raise SdtuneError(f"{key}: not available with lora.type={kind}; fix: remove it, or lora.type=lora")
    if kind == "loha":
        # PEFT's init, as LyCORIS': w1_a, w1_b, w2_a random, w2_b = 0, so training starts at the base model
        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_modules)
    # LyCORIS' defaults: factor -1 (the most square split of each dimension), only the larger Kronecker factor
    # rank-decomposed, and its init (w1 random, w2 or w2_b = 0) rather than PEFT's (w1 = 0), so a LoKr
    # trains as it would under kohya + LyCORIS
    return LoKrConfig(r=rank, alpha=alpha, target_modules=target_modules, decompose_factor=-1,
                      decompose_both=False, init_weights="lycoris")


def add_lora(
    module: torch.nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: list[str],
    dropout: float = 0.0,
    use_dora: bool = False,
    key: str = "lora.target_modules",
    kind: str = "lora",
    unread_layers: int = 0,
) -> None:
    """Freeze ``module`` and add a trainable adapter named ``default`` of ``kind`` (``lora.type``: lora, loha,
    lokr) to its ``target_modules``; none on the last ``unread_layers`` layers of a transformers text encoder
    (``TextEncoderSpec.unread_layers``)."""
    module.requires_grad_(False)
    config = adapter_config(kind, rank, alpha, target_modules, dropout, use_dora)
    try:
        module.add_adapter(config)
    except ValueError as e:
        raise SdtuneError(f"{key}: {first_line(e, 200)}") from None
    if unread_layers:
        _drop_last_layers(module, unread_layers, key)


def _drop_last_layers(module: torch.nn.Module, n: int, key: str) -> None:
    """Take the adapter off the last ``n`` of a text encoder's ``encoder.layers.N`` again, and record which
    layers keep it in its config (PEFT's ``layers_to_transform``), which the LoRA file carries: diffusers'
    ``load_lora_weights``, ``sdtune sample`` and a resume then build the same layout. Which wrapped modules go
    is what PEFT's own target matching says of that config.

    Added everywhere first and taken off here, rather than limited by the config from the start, so that
    the random draws of its init and of every adapter added after it (PEFT initialises each LoRA Linear from
    the global generator) stay those of a run with all layers: the rest of the run trains bitwise as before
    (the dropped LoRAs never changed anything: lora_B starts at zero and got no gradient)."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    layers = module.config.num_hidden_layers
    if n >= layers:
        raise SdtuneError(f"{key}: the text encoder has {layers} layers, and the model reads none of their "
                          "outputs")
    config = module.peft_config["default"]
    config.layers_to_transform, config.layers_pattern = list(range(layers - n)), "layers"
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer) and not check_target_module_exists(config, name):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())


def has_adapter(layer: torch.nn.Module, adapter_name: str = "default") -> bool:
    """Whether ``layer`` is a PEFT layer (LoRA, LoHa or LoKr) holding ``adapter_name``'s weights."""
    return hasattr(layer, "get_delta_weight") and adapter_name in getattr(layer, "r", {})


def trainable_parameters(*modules: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def adapter_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT naming (``...q_proj.lora_A.weight``), keys in the canonical layout
    (``sdtune.layout``: a CLIP text encoder's under ``text_model.``, whatever the installed transformers
    calls its modules), as every LoRA file and checkpoint holds it; ``load_adapter_state_dict`` reads it.

    Always the whole tensors: a module sharded by FSDP has them gathered here, which is a collective (every
    process calls this, on the same module; ``sdtune.fsdp``)."""
    from peft import get_peft_model_state_dict

    sharded = get_peft_model_state_dict(module, save_embedding_layers=False)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in full_state(sharded).items()}
    return canonical_text_encoder_keys(state, type(module).__name__)


def load_adapter_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Put tensors from ``adapter_state_dict`` (or a LoRA file's, canonical keys) back into ``module``'s
    adapter, refusing any mismatch. A CLIP text encoder's keys are renamed to the installed transformers'
    layout first (``sdtune.layout.keys_for_module``), so a checkpoint from transformers 4 resumes on 5."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = keys_for_module(state, module)
    # a module sharded by FSDP takes each tensor as its own parameter is sharded (this process's rows)
    state = shard_like(state, get_peft_model_state_dict(module, adapter_name=adapter_name,
                                                        save_embedding_layers=False))
    try:
        result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    except RuntimeError as e:  # torch's "size mismatch for ...": another rank or factorisation
        why = str(e).splitlines()[-1].strip()[:200]
        raise SdtuneError(f"checkpoint does not match the LoRA layout of this run ({why})") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if is_adapter_key(k)]
    if unexpected or missing:
        raise SdtuneError(
            f"checkpoint does not match the LoRA layout of this run ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})"
        )


def peft_config_from_dict(config: dict[str, Any]) -> Any:
    """The PEFT config object of a saved config dict (``peft_type`` LORA, LOHA or LOKR; a dict without it is
    LoRA's), keeping only the fields this PEFT version has (a file from another version may carry others)."""
    import dataclasses

    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kinds = {"LORA": LoraConfig, "LOHA": LoHaConfig, "LOKR": LoKrConfig}
    peft_type = str(config.get("peft_type") or "LORA").rsplit(".", 1)[-1].upper()  # "PeftType.LOHA" or "LOHA"
    if peft_type not in kinds:
        raise SdtuneError(f"an adapter of type {peft_type}: sdtune reads LORA, LOHA and LOKR")
    cls = kinds[peft_type]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in config.items() if k in names and k not in ("peft_type", "inference_mode")}
    return cls(**kwargs)


def inject_adapter(module: torch.nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor],
                   adapter_name: str) -> None:
    """Add an adapter named ``adapter_name`` built from ``config`` (a saved PEFT config dict) to ``module``
    (a diffusers denoiser or a transformers text encoder, which both have ``add_adapter``) and load
    ``state`` into it (canonical keys, as ``adapter_state_dict`` gives them), refusing any mismatch.

    For the adapters diffusers' ``load_lora_weights`` cannot read (LoHa, LoKr): the pipeline's
    ``set_adapters`` and ``unload_lora_weights`` then work on them as on a LoRA it loaded."""
    peft_config = peft_config_from_dict(config)
    try:
        module.add_adapter(peft_config, adapter_name=adapter_name)
    except ValueError as e:  # a target module this model does not have
        raise SdtuneError(f"the adapter does not fit this model ({first_line(e, 160)})") from None
    load_adapter_state_dict(module, state, adapter_name)


def save_diffusers_lora(output_dir: str | Path, family: Family, trained: dict[str, torch.nn.Module],
                        base_model: str | None = None,
                        states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in diffusers' format for the trained modules
    ({component name: PEFT-injected module}); ``pipe.load_lora_weights(output_dir)`` reads it back.
    ``states``: their ``adapter_state_dict``s when the caller has them already (under FSDP every process
    gathers them, and only one writes), else read here.

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
        kwargs[f"{name}_lora_layers"] = states[name] if states is not None else adapter_state_dict(module)
        config = sorted_config(module.peft_config["default"].to_dict())
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
