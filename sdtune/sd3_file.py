"""SD3 / SD3.5 single files: Stability's ``sd3_medium.safetensors``, ``sd3.5_medium.safetensors``,
``sd3.5_large.safetensors`` and the community fine-tunes shared like them, holding the MMDiT under
``model.diffusion_model.`` in Stability's original layout (``joint_blocks.N.x_block.attn.qkv``,
``joint_blocks.N.context_block.attn.qkv``, ``x_embedder.proj``, ``context_embedder``, ``y_embedder``,
``t_embedder``, ``pos_embed``, ``final_layer``; SD3.5's q/k RMS norms ``attn.ln_q`` / ``ln_k``, SD3.5 Medium's
second attention ``x_block.attn2`` in its first blocks), usually the VAE under ``first_stage_model.``, and
sometimes CLIP-L, CLIP-G and T5 under ``text_encoders.`` (``sd3_medium_incl_clips_t5xxlfp8.safetensors``).
Such a file is ``model.pretrained`` beside ``model.base``, the SD3.x diffusers model (hub id or folder) whose
tokenizers and scheduler it goes with, and the text encoders it does not bundle.

This module is SD3's ``LAYOUT`` for ``sdtune.transformer_file`` (header reading, the config folder, the
memory-mapped load, the ``model.base`` checks): a file is SD3's when its transformer keys hold ``joint_blocks.``.
``derived_config`` gives ``SD3Transformer2DModel``'s config from the tensor shapes (``sample_size`` comes from
the base's transformer config), and the weights are renamed by diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers``, which splits each fused qkv in three equal parts at any
width. A bundled VAE loads in place of the base's (diffusers' LDM VAE converter, ``sdtune.ldm.load_vae``), and
so do bundled text encoders (``TEXT_ENCODERS``, ``sdtune.bundled_encoders``; CLIP-G in transformers' or
OpenCLIP's layout); the base's are used for those the file does not bundle.

diffusers is imported inside the function that uses it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError
from sdtune.families.sd3 import model_type
from sdtune.ldm import VAE_PREFIX
from sdtune.transformer_file import Layout, TransformerFile, Width, indices, shape, written_config

if TYPE_CHECKING:
    import torch

BLOCKS = ("joint_blocks.",)
# every released SD3 and SD3.5: 64 channels per attention head (the MMDiT is 64 x depth wide)
HEAD_DIM = 64
SAMPLE_SIZE = 128  # their transformers' latent size (1024 px), for a base without a transformer config
# the base's config files the folder copies (the transformer's own is derived from the file)
BASE_CONFIGS = ("model_index.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "text_encoder_3/config.json")
# kohya's model type (families.sd3.model_type) -> (the release, the diffusers model diffusers' single-file
# loader pairs such a file with: its DIFFUSERS_DEFAULT_PIPELINE_PATHS)
VARIANTS = {"medium": ("SD3 Medium", "stabilityai/stable-diffusion-3-medium-diffusers"),
            "5-medium": ("SD3.5 Medium", "stabilityai/stable-diffusion-3.5-medium"),
            "5-large": ("SD3.5 Large", "stabilityai/stable-diffusion-3.5-large")}
# the text encoders a file may bundle, under text_encoders.<name>. (ComfyUI's SD3ClipModel, Stability's files) ->
# StableDiffusion3Pipeline's
TEXT_ENCODERS = (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))
_QK_NORM = "joint_blocks.0.x_block.attn.ln_q.weight"  # the image queries' RMSNorm scale: (head_dim,)


def _dual_attention_layers(tf: TransformerFile) -> list[int]:
    """The blocks with SD3.5 Medium's second, image-only attention (MMDiT-X)."""
    return indices(tf, "joint_blocks.", "x_block.attn2.")


def _type(tf: TransformerFile) -> str:
    return model_type({"qk_norm": _QK_NORM in tf.shapes, "dual_attention_layers": _dual_attention_layers(tf)})


def variant(tf: TransformerFile) -> str:
    return VARIANTS[_type(tf)][0]


def example_base(tf: TransformerFile) -> str:
    return VARIANTS[_type(tf)][1]


# --------------------------------------------------------------------------------------------------------
# The transformer's diffusers config from the tensor shapes


def _head_dim(tf: TransformerFile, hidden: int) -> int:
    """Channels per attention head: the q norm's width (SD3.5), else what a file sdtune wrote says
    (``CONFIG_KEY``: tiny test models), else SD3's 64."""
    if _QK_NORM in tf.shapes:
        return tf.shapes[_QK_NORM][0]
    written = written_config(tf).get("attention_head_dim")
    if isinstance(written, int) and written > 0 and hidden % written == 0:
        return written
    if hidden % HEAD_DIM:
        raise SdtuneError(f"model.pretrained: {tf.path.name} is {hidden} channels wide (x_embedder), not a whole "
                          f"number of SD3's {HEAD_DIM}-channel attention heads, and has no q/k norm (ln_q) that "
                          "would say its head width; sdtune reads SD3-sized transformer files, and the ones it "
                          "writes itself")
    return HEAD_DIM


def derived_config(tf: TransformerFile) -> dict[str, Any]:
    """``SD3Transformer2DModel``'s constructor arguments for the file's transformer, from its shapes
    (``sample_size``: SD3's; ``transformer_file.config_folder`` takes the base's)."""
    hidden, in_channels, patch, _ = shape(tf, "x_embedder.proj.weight")  # the patchifying conv: (hidden, C, p, p)
    head_dim = _head_dim(tf, hidden)
    caption, joint = shape(tf, "context_embedder.weight")  # (hidden, T5's width)
    positions = shape(tf, "pos_embed")[1]  # (1, pos_embed_max_size ** 2, hidden)
    return dict(
        sample_size=SAMPLE_SIZE, patch_size=patch, in_channels=in_channels,
        num_layers=len(indices(tf, "joint_blocks.")), attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim, joint_attention_dim=joint, caption_projection_dim=caption,
        pooled_projection_dim=shape(tf, "y_embedder.mlp.0.weight")[1],  # both CLIPs' pooled widths
        out_channels=shape(tf, "final_layer.linear.weight")[0] // patch**2,  # (p * p * C, hidden)
        pos_embed_max_size=math.isqrt(positions), dual_attention_layers=_dual_attention_layers(tf),
        qk_norm="rms_norm" if _QK_NORM in tf.shapes else None,
    )


def _widths(config: dict[str, Any], configs: dict[str, dict]) -> list[Width]:
    t5 = configs["text_encoder_3/config.json"].get("d_model")
    # the pooled input: CLIP-L's and CLIP-G's projected pooled outputs side by side (768 + 1280)
    pooled = sum(configs[f"{n}/config.json"].get("projection_dim") or 0 for n in ("text_encoder", "text_encoder_2"))
    latents = configs["vae/config.json"].get("latent_channels")
    return [(f"T5 encoder gives {t5}-wide embeddings", t5, config["joint_attention_dim"], "context_embedder"),
            (f"CLIP encoders give {pooled}-wide pooled embeddings", pooled, config["pooled_projection_dim"],
             "y_embedder"),
            (f"VAE gives {latents}-channel latents", latents, config["in_channels"], "x_embedder")]


# --------------------------------------------------------------------------------------------------------
# The weights


def to_diffusers(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A transformer's state dict in Stability's layout (prefix removed) in diffusers' ``SD3Transformer2DModel``
    layout, by diffusers' own converter; a tensor it leaves unplaced is an error, not dropped."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    rest = dict(state)  # the converter pops what it places
    converted = convert_sd3_transformer_checkpoint_to_diffusers(rest)
    if rest:
        raise SdtuneError(f"model.pretrained: its tensor {next(iter(rest))} has no place in an SD3 transformer")
    return converted


LAYOUT = Layout(family="sd3", label="SD3.x", name="Stability's MMDiT layout", model_class="SD3Transformer2DModel",
                blocks=BLOCKS, base_configs=BASE_CONFIGS, derive=derived_config, widths=_widths, variant=variant,
                example_base=example_base, to_diffusers=to_diffusers, from_base=("sample_size",),
                vae_prefix=VAE_PREFIX, text_encoders=TEXT_ENCODERS)
