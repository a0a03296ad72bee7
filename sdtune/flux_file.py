"""FLUX.1 transformer files: the one ``.safetensors`` file most shared FLUX.1 fine-tunes are (Civitai, model
pages), holding the transformer alone in Black Forest Labs' original layout (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``img_in``, ``txt_in``, ``final_layer``; ComfyUI saves them under
``model.diffusion_model.``, often in fp8 or bf16). Such a file is ``model.pretrained`` beside ``model.base``,
the FLUX.1 model (hub id or diffusers folder) whose text encoders, tokenizers, VAE and scheduler it goes with.

As for Stable Diffusion files (``sdtune.single_file``), the header alone says what the file is: FLUX.1 when
its transformer keys hold ``double_blocks.`` and ``single_blocks.``, FLUX.1-dev when it has the guidance
embedding (``guidance_in.``), FLUX.1-schnell otherwise. The transformer's diffusers config is derived from the
tensor shapes and written, with the base's other config files, once into a folder of sdtune's cache
(``config_folder``), which stands for the model wherever sdtune reads config files (family, LoRA targets,
resolution). Nothing is fetched but the base's config files.

``load_transformer`` memory-maps the file, casts each tensor (fp8, bf16) to the dtype the model is built in,
and renames the keys with diffusers' converter; the other parts load from the base with the family's loader.

torch, diffusers and accelerate are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune import families
from sdtune.errors import SdtuneError, error_summary
from sdtune.families import ModelFiles
from sdtune.single_file import CONFIG_KEY, DERIVATION, cache_folder, is_single_file, read_header

if TYPE_CHECKING:
    import torch

PREFIX = "model.diffusion_model."  # the transformer's, in ComfyUI's files and ones bundling CLIP / T5 / VAE
BLOCKS = ("double_blocks.", "single_blocks.")
# a LoRA (kohya's, PEFT's, LyCORIS') in BFL's layout, not a model
ADAPTER_MARKS = (".lora_", ".lora.", ".lora_A.", ".lora_B.", ".hada_", ".lokr_", ".alpha")
# FLUX.1's rotary embedding splits its 128 channels per head into (index, row, column) axes: BFL's util.py
FLUX1_HEAD_DIM, FLUX1_ROPE = 128, [16, 56, 56]
DIFFUSERS_WIDTH = 3072  # the only transformer width diffusers' converter splits (its ``inner_dim = 3072``)
# the base's config files the folder copies (the transformer's own is derived from the file)
BASE_CONFIGS = ("model_index.json", "vae/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder_2/config.json")


@dataclass(frozen=True)
class FluxFile:
    """What a FLUX.1 transformer file's header says."""

    path: Path
    prefix: str  # "" or PREFIX
    shapes: dict[str, list[int]]  # the transformer's tensors, keys without the prefix
    others: int  # tensors outside the transformer (a bundled CLIP / T5 / VAE), which sdtune does not use
    metadata: dict[str, str]

    @property
    def guidance(self) -> bool:
        """Whether it embeds a guidance scale (FLUX.1-dev, guidance-distilled), unlike FLUX.1-schnell."""
        return any(k.startswith("guidance_in.") for k in self.shapes)

    @property
    def variant(self) -> str:
        return "FLUX.1-dev" if self.guidance else "FLUX.1-schnell"

    @property
    def example_base(self) -> str:
        return f"black-forest-labs/{self.variant}"


def read_flux_file(pretrained: str) -> FluxFile | None:
    """The FLUX.1 transformer file ``pretrained`` is, from its header; None for any other model or file."""
    if not is_single_file(pretrained) or not Path(pretrained).expanduser().is_file():
        return None
    path, shapes, metadata = read_header(pretrained)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    own = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    if not all(any(k.startswith(b) for k in own) for b in BLOCKS) or \
            any(m in k for k in own for m in ADAPTER_MARKS):
        return None
    return FluxFile(path, prefix, own, len(shapes) - len(own), metadata)


# --------------------------------------------------------------------------------------------------------
# The transformer's diffusers config from the tensor shapes


def _shape(ff: FluxFile, key: str) -> list[int]:
    if key not in ff.shapes:
        raise SdtuneError(f"model.pretrained: {ff.path.name} has FLUX.1's double and single blocks but no "
                          f"{ff.prefix}{key}: it is not a whole FLUX.1 transformer in Black Forest Labs' "
                          "layout")
    return ff.shapes[key]


def _count(ff: FluxFile, block: str) -> int:
    """How many blocks named ``block``.N. the file holds."""
    return len({m.group(1) for k in ff.shapes if (m := re.match(re.escape(block) + r"(\d+)\.", k))})


def _rope_axes(ff: FluxFile, head_dim: int) -> list[int]:
    """How the rotary position embedding splits a head's channels: FLUX.1's at its 128 channels, else what a
    file sdtune wrote says (``CONFIG_KEY``: tiny test models)."""
    if head_dim == FLUX1_HEAD_DIM:
        return FLUX1_ROPE
    try:
        axes = json.loads(ff.metadata.get(CONFIG_KEY, "{}")).get("transformer", {}).get("axes_dims_rope")
    except (ValueError, AttributeError):
        axes = None
    if isinstance(axes, list) and all(isinstance(a, int) for a in axes) and sum(axes) == head_dim:
        return axes
    raise SdtuneError(f"model.pretrained: {ff.path.name} has {head_dim} channels per attention head, not "
                      f"FLUX.1's {FLUX1_HEAD_DIM}, and does not say how its rotary embedding splits them "
                      "(axes_dims_rope); sdtune reads FLUX.1-sized transformer files, and the ones it writes "
                      "itself")


def derived_config(ff: FluxFile) -> dict[str, Any]:
    """``FluxTransformer2DModel``'s constructor arguments for the file's transformer, from its shapes."""
    hidden, in_channels = _shape(ff, "img_in.weight")
    # the q/k RMSNorm's scale: (head_dim,)
    head_dim = _shape(ff, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if hidden % head_dim:
        raise SdtuneError(f"model.pretrained: {ff.path.name}: its width {hidden} (img_in) is not a whole "
                          f"number of {head_dim}-channel heads; the file is damaged or not FLUX.1")
    out = _shape(ff, "final_layer.linear.weight")[0]  # (patch_size**2 * out_channels, hidden), patch size 1
    return dict(
        patch_size=1, in_channels=in_channels, out_channels=None if out == in_channels else out,
        num_layers=_count(ff, "double_blocks."), num_single_layers=_count(ff, "single_blocks."),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        joint_attention_dim=_shape(ff, "txt_in.weight")[1],  # T5's width
        pooled_projection_dim=_shape(ff, "vector_in.in_layer.weight")[1],  # CLIP's pooled width
        guidance_embeds=ff.guidance, axes_dims_rope=_rope_axes(ff, head_dim),
    )


# --------------------------------------------------------------------------------------------------------
# The base, and the folder that stands for the pair


def _read_base(base: str, revision: str | None) -> dict[str, dict]:
    """{file name: config} of the base's parts other than the transformer; one error naming ``model.base``."""
    if is_single_file(base):
        raise SdtuneError(f"model.base: {base} is a single file; give the diffusers folder or hub id of a "
                          "FLUX.1 model, e.g. model.base=black-forest-labs/FLUX.1-dev")
    files = ModelFiles(base, revision)
    try:
        family = families.detect(files)
        if family.name != "flux":
            raise SdtuneError(f"model.base: {base} is a {family.label} model; a FLUX.1 transformer file "
                              "takes its text encoders, tokenizers, VAE and scheduler from a FLUX.1 model, "
                              "e.g. model.base=black-forest-labs/FLUX.1-dev")
        return {name: files.read(name) for name in BASE_CONFIGS}
    except SdtuneError as e:  # read_model_file's lines name model.pretrained, the usual key of a model
        raise SdtuneError(str(e).replace("model.pretrained:", "model.base:", 1)) from None


def _check_pair(ff: FluxFile, config: dict[str, Any], configs: dict[str, dict], base: str) -> None:
    """The base's text encoders give the widths the transformer takes; else training would stop at its first
    step on a shape error."""
    t5, clip = configs["text_encoder_2/config.json"], configs["text_encoder/config.json"]
    pairs = [("T5 encoder", t5.get("d_model"), config["joint_attention_dim"], "txt_in"),
             ("CLIP encoder", clip.get("hidden_size"), config["pooled_projection_dim"], "vector_in")]
    for what, gives, takes, key in pairs:
        if gives != takes:
            raise SdtuneError(f"model.base: {base}'s {what} gives {gives}-wide embeddings, but the "
                              f"transformer of {ff.path.name} takes {takes} ({key}); give the FLUX.1 model "
                              f"it was fine-tuned from, e.g. model.base={ff.example_base}")


def _write(folder: Path, config: dict[str, Any], configs: dict[str, dict]) -> None:
    for name, value in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", **config}, indent=2), encoding="utf-8")


def needs_base(ff: FluxFile) -> str:
    """The one line that refuses a transformer file without ``model.base``."""
    return (f"model.base: {ff.path.name} holds only a {ff.variant} transformer (Black Forest Labs' layout); "
            "set model.base to the FLUX.1 model whose text encoders, tokenizers, VAE and scheduler go with "
            f"it, e.g. model.base={ff.example_base} (sdtune sample: --base)")


def config_folder(pretrained: str, base: str | None, revision: str | None = None) -> tuple[FluxFile, Path]:
    """The transformer file and the folder of the pair's diffusers configs in sdtune's cache (the derived
    transformer config and the base's others, written the first time; a few KiB). ``revision`` is the
    base's."""
    ff = read_flux_file(pretrained)
    if ff is None:
        raise SdtuneError(f"model.pretrained: {pretrained} is not a FLUX.1 transformer file")
    if not base:
        raise SdtuneError(needs_base(ff))
    config = derived_config(ff)
    configs = _read_base(base, revision)
    _check_pair(ff, config, configs, base)
    index = configs["model_index.json"]
    configs["model_index.json"] = {**index, "transformer": ["diffusers", "FluxTransformer2DModel"]}
    key = json.dumps([DERIVATION, "flux", config, configs], sort_keys=True)
    folder = cache_folder(key, lambda tmp: _write(tmp, config, configs))
    return ff, folder


def pair_warnings(ff: FluxFile, base: str, revision: str | None = None) -> list[str]:
    """What a user should know about a file and its base that does not stop a run."""
    warnings = []
    if ff.others:
        warnings.append(f"model.pretrained: {ff.path.name} also holds {ff.others} tensors outside its "
                        f"transformer ({PREFIX}*): a bundled CLIP, T5 or VAE, which sdtune does not use; "
                        "model.base's are used")
    try:
        base_config = ModelFiles(base, revision).read("transformer/config.json")
        base_guidance = base_config.get("guidance_embeds", False)  # FluxTransformer2DModel's default
    except SdtuneError:  # a base without its own transformer: nothing to compare
        base_guidance = ff.guidance
    if base_guidance != ff.guidance:
        base_variant = "FLUX.1-dev" if base_guidance else "FLUX.1-schnell"
        warnings.append(f"model.base: {ff.path.name} is a {ff.variant} transformer and {base} a "
                        f"{base_variant} model: the text encoders and VAE are the same, but the grids sample "
                        f"with {base}'s scheduler; for {ff.variant}'s, set model.base={ff.example_base}")
    return warnings


def param_count_problem(ff: FluxFile, folder: Path) -> str | None:
    """Whether the transformer the derived config describes has as many weights as the file holds (built
    empty, on the meta device): a layout the derivation does not know is refused here, not mid-load."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
    expected = sum(p.numel() for p in model.parameters())
    found = sum(math.prod(s) for s in ff.shapes.values())
    if expected == found:
        return None
    return (f"model.pretrained: {ff.path.name} holds a transformer of {found:,} weights, but the FLUX.1 "
            f"architecture read from its key names has {expected:,}; sdtune cannot tell this file's layout")


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


def load_transformer(ff: FluxFile, folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The file's transformer as ``FluxTransformer2DModel`` (of the config in ``folder``), in ``dtype``
    (default float32, what diffusers' ``from_pretrained`` gives a folder of the same weights). The file is
    memory-mapped and each tensor read once, cast as it is read: an fp8 (float8_e4m3fn) or bf16 file computes
    in ``dtype``."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    config = FluxTransformer2DModel.load_config(folder / "transformer")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    state = {}
    with safe_open(str(ff.path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(ff.prefix):
                state[key[len(ff.prefix):]] = f.get_tensor(key).to(dtype or torch.float32)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    try:
        model.load_state_dict(to_diffusers(state, hidden), strict=True, assign=True)
    except (KeyError, RuntimeError) as e:
        raise SdtuneError(f"model.pretrained: {ff.path.name} does not hold the transformer its header "
                          f"describes ({error_summary(e, 160)})") from None
    return model.eval()
