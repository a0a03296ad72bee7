"""FLUX.1 transformer files: the one ``.safetensors`` file most shared FLUX.1 fine-tunes are (Civitai, model
pages), holding the transformer alone in Black Forest Labs' original layout (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``img_in``, ``txt_in``, ``final_layer``; ComfyUI saves them under
``model.diffusion_model.``, often in fp8 or bf16). Such a file is ``model.pretrained`` beside ``model.base``,
the FLUX.1 model (hub id or diffusers folder) whose text encoders, tokenizers, VAE and scheduler it goes with.

This module is FLUX.1's ``LAYOUT`` for ``sdtune.transformer_file``, which reads the header, writes the config
folder and loads the weights for every family's transformer files: a FLUX.1 file's transformer keys hold
``double_blocks.`` and ``single_blocks.``; FLUX.1-dev has the guidance embedding (``guidance_in.``),
FLUX.1-schnell not. The transformer's diffusers config is derived from the tensor shapes (``derived_config``)
and its weights renamed by diffusers' converter (``to_diffusers``). CLIP-L and T5-XXL that the file bundles
(ComfyUI's all-in-one ``flux1-dev-fp8.safetensors``: ``text_encoders.clip_l.``, ``text_encoders.t5xxl.``) load
in place of the base's (``TEXT_ENCODERS``, ``sdtune.bundled_encoders``); a VAE it bundles (ComfyUI's ``vae.``)
is not used (a warning says so): the base's is.

torch and diffusers are imported inside the functions that use them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError
from sdtune.families import ModelFiles
from sdtune.transformer_file import Layout, TransformerFile, Width, indices, read, shape, written_config

if TYPE_CHECKING:
    import torch

BLOCKS = ("double_blocks.", "single_blocks.")
# FLUX.1's rotary embedding splits its 128 channels per head into (index, row, column) axes: BFL's util.py
FLUX1_HEAD_DIM, FLUX1_ROPE = 128, [16, 56, 56]
DIFFUSERS_WIDTH = 3072  # the only transformer width diffusers' converter splits (its ``inner_dim = 3072``)
# the base's config files the folder copies (the transformer's own is derived from the file)
BASE_CONFIGS = ("model_index.json", "vae/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder_2/config.json")
# ComfyUI's names of the text encoders a file may bundle (its FluxClipModel's clip_l and t5xxl) -> FluxPipeline's
TEXT_ENCODERS = (("clip_l", "text_encoder"), ("t5xxl", "text_encoder_2"))


def has_guidance(tf: TransformerFile) -> bool:
    """Whether it embeds a guidance scale (FLUX.1-dev, guidance-distilled), unlike FLUX.1-schnell."""
    return any(k.startswith("guidance_in.") for k in tf.shapes)


def variant(tf: TransformerFile) -> str:
    return "FLUX.1-dev" if has_guidance(tf) else "FLUX.1-schnell"


def example_base(tf: TransformerFile) -> str:
    return f"black-forest-labs/{variant(tf)}"


def read_flux_file(pretrained: str) -> TransformerFile | None:
    """The FLUX.1 transformer file ``pretrained`` is, from its header; None for any other model or file."""
    return read(pretrained, [LAYOUT])


# --------------------------------------------------------------------------------------------------------
# The transformer's diffusers config from the tensor shapes


def _rope_axes(tf: TransformerFile, head_dim: int) -> list[int]:
    """How the rotary position embedding splits a head's channels: FLUX.1's at its 128 channels, else what a
    file sdtune wrote says (``CONFIG_KEY``: tiny test models)."""
    if head_dim == FLUX1_HEAD_DIM:
        return FLUX1_ROPE
    axes = written_config(tf).get("axes_dims_rope")
    if isinstance(axes, list) and all(isinstance(a, int) for a in axes) and sum(axes) == head_dim:
        return axes
    raise SdtuneError(f"model.pretrained: {tf.path.name} has {head_dim} channels per attention head, not "
                      f"FLUX.1's {FLUX1_HEAD_DIM}, and does not say how its rotary embedding splits them "
                      "(axes_dims_rope); sdtune reads FLUX.1-sized transformer files, and the ones it writes "
                      "itself")


def derived_config(tf: TransformerFile) -> dict[str, Any]:
    """``FluxTransformer2DModel``'s constructor arguments for the file's transformer, from its shapes."""
    hidden, in_channels = shape(tf, "img_in.weight")
    # the q/k RMSNorm's scale: (head_dim,)
    head_dim = shape(tf, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if hidden % head_dim:
        raise SdtuneError(f"model.pretrained: {tf.path.name}: its width {hidden} (img_in) is not a whole "
                          f"number of {head_dim}-channel heads; the file is damaged or not FLUX.1")
    out = shape(tf, "final_layer.linear.weight")[0]  # (patch_size**2 * out_channels, hidden), patch size 1
    return dict(
        patch_size=1, in_channels=in_channels, out_channels=None if out == in_channels else out,
        num_layers=len(indices(tf, "double_blocks.")), num_single_layers=len(indices(tf, "single_blocks.")),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape(tf, "txt_in.weight")[1],  # T5's width
        pooled_projection_dim=shape(tf, "vector_in.in_layer.weight")[1],  # CLIP's pooled width
        guidance_embeds=has_guidance(tf), axes_dims_rope=_rope_axes(tf, head_dim),
    )


def _widths(config: dict[str, Any], configs: dict[str, dict]) -> list[Width]:
    t5 = configs["text_encoder_2/config.json"].get("d_model")
    clip = configs["text_encoder/config.json"].get("hidden_size")  # the pooled output's width
    return [(f"T5 encoder gives {t5}-wide embeddings", t5, config["joint_attention_dim"], "txt_in"),
            (f"CLIP encoder gives {clip}-wide embeddings", clip, config["pooled_projection_dim"], "vector_in")]


def _warnings(tf: TransformerFile, base: str, revision: str | None) -> list[str]:
    """A schnell file with a dev base (or the other way round) samples with the base's scheduler."""
    try:
        base_config = ModelFiles(base, revision).read("transformer/config.json")
        base_guidance = base_config.get("guidance_embeds", False)  # FluxTransformer2DModel's default
    except SdtuneError:  # a base without its own transformer: nothing to compare
        base_guidance = has_guidance(tf)
    if base_guidance == has_guidance(tf):
        return []
    base_variant = "FLUX.1-dev" if base_guidance else "FLUX.1-schnell"
    return [f"model.base: {tf.path.name} is a {tf.variant} transformer and {base} a {base_variant} model: the "
            f"text encoders and VAE are the same, but the grids sample with {base}'s scheduler; for "
            f"{tf.variant}'s, set model.base={tf.example_base}"]


# --------------------------------------------------------------------------------------------------------
# The weights

# BFL module -> diffusers module, for the tensors that move whole (norm ``scale``s become ``weight``s)
_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
           "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
           "linear2": "proj_out"}
# fused BFL modules -> the diffusers modules of their output's parts, in order
_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _diffusers_name(key: str) -> tuple[str, str, str]:
    """(diffusers module prefix, BFL module, tensor name) of a BFL key."""
    module, leaf = key.rsplit(".", 1)
    match = re.match(r"(double|single)_blocks\.(\d+)\.(.+)", module)
    if match is None:
        return "", module, leaf
    kind, index, module = match.groups()
    blocks = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
    return f"{blocks}.{index}.", module, leaf


def _convert_any_width(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """``convert_flux_transformer_checkpoint_to_diffusers``'s mapping for any width: diffusers' converter
    splits a single block's fused q/k/v/MLP input at FLUX.1's 3072 channels, a constant, so sdtune's small
    test transformers need this copy of it (tests/test_flux_single_file.py checks the two agree)."""
    import torch

    out = {}
    for key, tensor in state.items():
        prefix, module, leaf = _diffusers_name(key)
        leaf = "weight" if leaf == "scale" else leaf
        if module in _FUSED:  # (3 * hidden [+ mlp], in): q, k, v (and the 4x wider MLP input) on dim 0
            names = _FUSED[module]
            sizes = [hidden] * 3 + [tensor.shape[0] - 3 * hidden] if len(names) == 4 else [hidden] * 3
            for name, part in zip(names, torch.split(tensor, sizes, dim=0), strict=True):
                out[f"{prefix}{name}.{leaf}"] = part.clone()  # its own tensor, as diffusers' torch.cat([q])
            continue
        table = _TOP if not prefix else _DOUBLE if prefix.startswith("transformer_blocks") else _SINGLE
        if module == "final_layer.adaLN_modulation.1":  # BFL's (shift, scale) is diffusers' (scale, shift)
            shift, scale = tensor.chunk(2, dim=0)
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift], dim=0)
        elif module in table:
            out[f"{prefix}{table[module]}.{leaf}"] = tensor
        else:
            raise SdtuneError(f"model.pretrained: its tensor {key} has no place in a FLUX.1 transformer")
    return out


def to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """A transformer's state dict in BFL's layout (prefix removed) in diffusers' ``FluxTransformer2DModel``
    layout: diffusers' own converter at FLUX.1's width (every released FLUX.1 and its fine-tunes), its mapping
    at other widths."""
    if hidden == DIFFUSERS_WIDTH:
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        return convert_flux_transformer_checkpoint_to_diffusers(state)
    return _convert_any_width(state, hidden)


def _to_diffusers(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return to_diffusers(state, config["num_attention_heads"] * config["attention_head_dim"])


LAYOUT = Layout(family="flux", label="FLUX.1", name="Black Forest Labs' layout", model_class="FluxTransformer2DModel",
                blocks=BLOCKS, base_configs=BASE_CONFIGS, derive=derived_config, widths=_widths, variant=variant,
                example_base=example_base, to_diffusers=_to_diffusers, warnings=_warnings,
                text_encoders=TEXT_ENCODERS)
