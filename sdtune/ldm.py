"""The original (LDM / SGM) single-file layout of Stable Diffusion checkpoints, both directions.

Community checkpoints (Civitai downloads such as DreamShaper or Juggernaut XL) are one ``.safetensors`` file
with Stability's key names, not a diffusers folder:

- ``model.diffusion_model.*``: the UNet (``time_embed``, ``label_emb`` for SDXL, ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``out``);
- ``first_stage_model.*``: the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` with 1x1-conv q/k/v/proj_out);
- the text encoders, under the prefixes of :func:`text_encoder_prefixes`: one encoder under
  ``cond_stage_model.`` (LDM: SD1.x, SD2.x), several under ``conditioner.embedders.N.`` (SGM: SDXL);
  OpenAI CLIP in Hugging Face's layout (``transformer.text_model.*``), OpenCLIP in its own (``model.*``:
  ``transformer.resblocks.N`` with fused ``attn.in_proj_weight``, ``text_projection`` transposed).

:func:`to_original` and :func:`write_single_file` go from loaded components to that layout (tests and random
single-file models build checkpoints in code); :func:`load_original` and :func:`load_vae` come back through
diffusers' own single-file loaders, after checking that the file holds every tensor the diffusers configs
ask for, and nothing else under the components' prefixes: a truncated or foreign file is one ``SdtuneError``,
never a silently random model.

The reverse mappings follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``scripts/convert_diffusers_to_original_sdxl.py`` (Apache-2.0), written here for any block count and layers
per block (those scripts hard-code the real models' 4 / 3 blocks of 2 layers; tiny test models have 2 of 1).

torch, diffusers, transformers, accelerate and safetensors are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError, error_summary, first_line
from sdtune.families import Components, Family, TextEncoderSpec
from sdtune.files import atomic_path
from sdtune.layout import sort_metadata
from sdtune.runs import safetensors_header

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# prefixes a standalone VAE file may carry (diffusers' LDM_VAE_KEYS)
VAE_FILE_PREFIXES = (VAE_PREFIX, "vae.")
POSITION_IDS = "embeddings.position_ids"

# (diffusers name, original name) of the parts inside one module, applied to the key after its module prefix
_Renames = tuple[tuple[str, str], ...]
_UNET_RESNET: _Renames = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
                          ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
                          ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET: _Renames = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION: _Renames = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                            ("to_out.0", "proj_out"))
_OPENCLIP_LAYER: _Renames = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn", "attn"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
# {diffusers module prefix: (original prefix, renames inside the module)}
_Table = dict[str, tuple[str, _Renames]]


# ---------------------------------------------------------------------------------------------------------
# Where each component lives


def text_encoder_prefixes(family: Family) -> list[str]:
    """The key prefix of each text encoder of ``family`` in its original file, in the family's order:
    ``cond_stage_model.transformer.`` (SD1.x), ``cond_stage_model.model.`` (SD2.x),
    ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.`` (SDXL)."""
    _check_family(family)
    specs = family.text_encoders
    # LDM models have one conditioning model (FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder); SGM models a
    # GeneralConditioner whose embedders are numbered. OpenAI CLIP sits in a Hugging Face CLIPTextModel
    # (".transformer"), OpenCLIP in open_clip's own model (".model").
    roots = [f"conditioner.embedders.{i}." for i in range(len(specs))]
    if len(specs) == 1:
        roots = ["cond_stage_model."]
    return [root + ("model." if s.openclip else "transformer.") for root, s in zip(roots, specs, strict=True)]


def _check_family(family: Family) -> None:
    if family.denoiser_name != "unet":
        raise SdtuneError(f"--family: {family.label} models have no original (LDM/SGM) single-file layout in "
                          "sdtune; use a diffusers-format model folder")


# ---------------------------------------------------------------------------------------------------------
# diffusers -> original


def _rename(state: dict[str, Any], table: _Table, what: str) -> dict[str, Any]:
    """``state`` with each key's longest module prefix found in ``table`` replaced, and the renames of that
    module applied to the rest of the key."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        candidates = (".".join(parts[:n]) + "." for n in range(len(parts) - 1, 0, -1))  # longest first
        prefix = next((p for p in candidates if p in table), None)
        if prefix is None:
            raise SdtuneError(f"{what}: its tensor {key} has no place in the original single-file layout; "
                              "only the standard Stable Diffusion architectures can be written as one file")
        new_prefix, renames = table[prefix]
        rest = key[len(prefix):]
        for old, new in renames:
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[new_prefix + rest] = value
    return out


def _unet_table(config: Any, keys: list[str]) -> _Table:
    """Where each diffusers UNet module sits in ``model.diffusion_model``. Original numbering: input block 0
    is conv_in, then per down block its layers (resnet .0, attention .1) and a downsampler (.0.op) except
    after the last; output blocks are the up blocks' layers + 1, the upsampler after the last layer's resnet
    (.1) or attention (.2)."""
    table: _Table = {
        "time_embedding.linear_1.": ("time_embed.0.", ()), "time_embedding.linear_2.": ("time_embed.2.", ()),
        "add_embedding.linear_1.": ("label_emb.0.0.", ()), "add_embedding.linear_2.": ("label_emb.0.2.", ()),
        "conv_in.": ("input_blocks.0.0.", ()), "conv_norm_out.": ("out.0.", ()), "conv_out.": ("out.2.", ()),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", ()),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    layers = config["layers_per_block"]
    if not isinstance(layers, int):  # diffusers' forward conversion assumes one number for all blocks, too
        raise SdtuneError(f"unet/config.json: layers_per_block is {layers}; the original single-file layout "
                          "needs one number for every block")
    step = layers + 1  # original blocks per diffusers block: its layers and a down/upsampler
    for i in range(len(config["down_block_types"])):
        for j in range(layers):
            table[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{1 + i * step + j}.0.", _UNET_RESNET)
            table[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{1 + i * step + j}.1.", ())
        table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * step}.0.op.", ())
        for j in range(step):
            table[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * step + j}.0.", _UNET_RESNET)
            table[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{i * step + j}.1.", ())
        slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) else 1
        table[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{i * step + layers}.{slot}.", ())
    return table


def original_unet_names(family: Family, unet: Any) -> dict[str, str]:
    """{diffusers module name: its name in the original (LDM / SGM) UNet} for every module of ``unet`` with a
    weight ({} for a family without a UNet). kohya's sd-scripts trains SDXL on that UNet, so its SDXL LoRA and
    LyCORIS files name modules after it (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)."""
    import torch

    if family.denoiser_name != "unet":
        return {}
    table = _unet_table(unet.config, list(unet.state_dict()))
    names = {}
    for name, module in unet.named_modules():
        if not name or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        with contextlib.suppress(SdtuneError):  # a module the original layout has no place for
            names[name] = next(iter(_rename({f"{name}.weight": None}, table, "unet")))[: -len(".weight")]
    return names


def unet_to_original(unet: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel``'s weights under their ``model.diffusion_model.`` names (without
    the prefix). The tensors are the module's own (no copies)."""
    state = unet.state_dict()
    return _rename(state, _unet_table(unet.config, list(state)), "unet")


def _vae_table(config: Any) -> _Table:
    """Where each diffusers VAE module sits in ``first_stage_model``; the decoder's up blocks count down
    (diffusers' up_blocks.0 is the original up.{n-1})."""
    table: _Table = {"quant_conv.": ("quant_conv.", ()), "post_quant_conv.": ("post_quant_conv.", ())}
    for part in ("encoder", "decoder"):
        table.update({
            f"{part}.conv_in.": (f"{part}.conv_in.", ()), f"{part}.conv_out.": (f"{part}.conv_out.", ()),
            f"{part}.conv_norm_out.": (f"{part}.norm_out.", ()),
            f"{part}.mid_block.resnets.0.": (f"{part}.mid.block_1.", _VAE_RESNET),
            f"{part}.mid_block.resnets.1.": (f"{part}.mid.block_2.", _VAE_RESNET),
            f"{part}.mid_block.attentions.0.": (f"{part}.mid.attn_1.", _VAE_ATTENTION),
        })
    blocks = len(config["block_out_channels"])
    for i in range(blocks):
        up = blocks - 1 - i
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", ())
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", ())
        for j in range(config["layers_per_block"] + 1):  # the decoder has one resnet more per block
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{up}.block.{j}.", _VAE_RESNET)
    return table


def vae_to_original(vae: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s weights under their ``first_stage_model.`` names (without the prefix);
    the mid-block attention's linear weights (C, C) become the original 1x1 convolutions (C, C, 1, 1)."""
    out = _rename(vae.state_dict(), _vae_table(vae.config), "vae")
    for key, value in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)  # a view: (C, C) -> (C, C, 1, 1)
    return out


def _hf_clip_state(encoder: Any, position_ids: bool) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights with every name under ``text_model.`` as in transformers 4.x
    (5.x flattens ``CLIPTextModel``: ``embeddings...``, ``encoder.layers...``), ``text_projection.weight``
    left at the top; with ``position_ids``, that buffer too (the original files carry it, transformers
    keeps it out of the state dict)."""
    state = dict(encoder.state_dict())
    if position_ids:
        state.update({n: b for n, b in encoder.named_buffers() if n.endswith(POSITION_IDS)})
    top = ("text_model.", "text_projection.")
    return {k if k.startswith(top) else f"text_model.{k}": v for k, v in state.items()}


def _openclip_state(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP names (``text_model.``-normalised) -> OpenCLIP's: q/k/v fused into ``in_proj``
    (3 * width, width), ``text_projection`` transposed to (width, projection_dim)."""
    import torch

    table: _Table = {f"text_model.encoder.layers.{i}.": (f"transformer.resblocks.{i}.", _OPENCLIP_LAYER)
                     for i in range(layers)}
    out, fused = {}, {}
    for key, value in state.items():
        if key.endswith(POSITION_IDS):  # open_clip keeps no position ids
            continue
        if key == "text_projection.weight":  # HF: y = x @ W.T with W (proj, width); OpenCLIP: y = x @ P
            out["text_projection"] = value.T.contiguous()
        elif key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        else:
            [(name, tensor)] = _rename({key: value}, table, "text encoder").items()
            (fused if re.search(r"\.attn\.[qkv]_proj\.", name) else out)[name] = tensor
    for key in sorted(k for k in fused if ".attn.q_proj." in k):
        # nn.MultiheadAttention's in_proj stacks q, k, v along dim 0: (3 * width, width) and (3 * width,)
        parts = [fused[key.replace(".q_proj.", f".{c}_proj.")] for c in "qkv"]
        out[key.replace(".q_proj.", ".in_proj_")] = torch.cat(parts)
    return out


def text_encoder_to_original(encoder: Any, spec: TextEncoderSpec,
                             position_ids: bool = True) -> dict[str, torch.Tensor]:
    """One text encoder's weights under its original names (without the prefix of
    :func:`text_encoder_prefixes`): Hugging Face's layout for OpenAI CLIP, open_clip's for OpenCLIP."""
    state = _hf_clip_state(encoder, position_ids and not spec.openclip)
    return _openclip_state(state, encoder.config.num_hidden_layers) if spec.openclip else state


def to_original(components: Components, family: Family, *,
                position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The components' weights under the original single-file key names (the modules' own tensors, except
    OpenCLIP's fused attention and transposed projection). ``position_ids``: also write the CLIP encoders'
    position-id buffers, as the original files do."""
    out: dict[str, Any] = {UNET_PREFIX + k: v for k, v in unet_to_original(components.denoiser).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(components.vae).items()})
    encoders = zip(text_encoder_prefixes(family), family.text_encoders, components.text_encoders, strict=True)
    for prefix, spec, encoder in encoders:
        out.update({prefix + k: v for k, v in text_encoder_to_original(encoder, spec, position_ids).items()})
    return out


def write_single_file(components: Components, family: Family, path: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """One .safetensors file in the original layout (contiguous CPU tensors, ``format: pt`` metadata), written
    atomically; an existing file is never replaced."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise SdtuneError(f"{path} exists; choose a new file name (sdtune never replaces an existing file)")
    metadata = {"format": "pt", **(metadata or {})}
    odd = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if odd:
        raise SdtuneError(f"metadata: {odd[0]!r} or its value is not a string; safetensors metadata is text")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_original(components, family).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------
# original -> diffusers


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file (on the CPU), after checking that the file is whole."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)  # a pickle, a truncated download or a non-file is one SdtuneError here
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SdtuneError(f"{path}: cannot read its tensors ({first_line(e, 160)})") from None



_CONFIG_FIX = "fix: give a diffusers model folder with unet/, vae/ and text_encoder/ config files"


def _config_error(config_dir: Path, what: str, e: Exception) -> SdtuneError:
    return SdtuneError(f"{config_dir}: cannot read the {what} config ({error_summary(e)}); {_CONFIG_FIX}")


def _check_config_file(config_dir: Path, subfolder: str | None) -> None:
    # checked here: diffusers and transformers take a missing local folder for a hub id and say so at length
    path = config_dir / (subfolder or "") / "config.json"
    if not path.is_file():
        raise SdtuneError(f"{config_dir}: has no {path.relative_to(config_dir)}; {_CONFIG_FIX}")


def _diffusers_skeleton(class_name: str, config_dir: Path, subfolder: str | None) -> Any:
    """A diffusers model built from its config on the meta device (no memory, no weights)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, class_name)
    _check_config_file(config_dir, subfolder)
    try:
        config = cls.load_config(str(config_dir), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _config_error(config_dir, subfolder or class_name, e) from None
    with init_empty_weights():
        return cls.from_config(config)


def text_encoder_skeleton(spec: TextEncoderSpec, config_dir: Path) -> Any:
    """The text encoder ``spec`` built from ``config_dir/<spec.name>`` with its weights on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(transformers, spec.model_class)
    _check_config_file(config_dir, spec.name)
    try:
        config = cls.config_class.from_pretrained(str(config_dir), subfolder=spec.name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _config_error(config_dir, spec.name, e) from None
    with init_empty_weights():  # buffers (position_ids) stay real: only parameters go to the meta device
        return cls(config)


def _core_shape(shape: Any) -> tuple[int, ...]:
    # a 1x1 convolution (C, C, 1, 1) holds what a linear layer (C, C) does: diffusers reads both
    return tuple(d for d in shape if d != 1)


def _ignorable(rest: str, spec: TextEncoderSpec | None, encoder: Any) -> bool:
    """Tensors of original files that the diffusers model has no place for, by design."""
    if spec is None or not spec.openclip:
        return False
    if rest == "logit_scale":  # open_clip's contrastive temperature: not part of the text tower
        return True
    # SD2.x's encoder: diffusers' CLIPTextModel keeps 23 of the 24 layers (the model conditions on the
    # penultimate layer) and has no projection
    layer = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
    without_projection = not hasattr(encoder, "text_projection")
    return without_projection and (rest == "text_projection" or bool(
        layer and int(layer[1]) >= encoder.config.num_hidden_layers))


def _group_problems(checkpoint: dict[str, Any], expected: dict[str, Any], prefix: str, label: str,
                    ignorable: Any) -> list[str]:
    """What is wrong with one component's tensors in ``checkpoint``: missing, foreign or misshapen ones."""
    present = {k for k in checkpoint if k.startswith(prefix)}
    missing = sorted(k for k in expected if k not in present and not k.endswith(POSITION_IDS))
    foreign = sorted(k for k in present - set(expected) if not ignorable(k[len(prefix):]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the {label} are missing (e.g. {missing[0]})")
    if foreign:
        problems.append(f"{len(foreign)} tensor(s) under '{prefix}' are not part of the {label} "
                        f"(e.g. {foreign[0]})")
    for key in sorted(present & set(expected)):
        shape, wanted = checkpoint[key].shape, expected[key].shape
        if not key.endswith(POSITION_IDS) and _core_shape(shape) != _core_shape(wanted):
            problems.append(f"{key} has shape {tuple(shape)}, the configs' {label} needs {tuple(wanted)}")
            break
    return problems


def _raise_problems(problems: list[str], source: str, fix: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise SdtuneError(f"{source}: {problems[0]}{more}; fix: {fix}")


def _load_diffusers(class_name: str, checkpoint: dict[str, Any], config_dir: Path, subfolder: str | None,
                    torch_dtype: Any, source: str) -> Any:
    """diffusers' ``from_single_file`` on an already checked state dict; a parameter left on the meta device
    (a tensor the conversion did not fill) is an error, not an empty model."""
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_single_file(checkpoint, config=str(config_dir), subfolder=subfolder,
                                     local_files_only=True, torch_dtype=torch_dtype)
    except (ValueError, KeyError, RuntimeError, OSError, AttributeError) as e:
        raise SdtuneError(f"{source}: diffusers could not load its {subfolder or class_name} "
                          f"({error_summary(e)})") from None
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise SdtuneError(f"{source}: {len(empty)} {class_name} weight(s) were not in the file "
                          f"(e.g. {empty[0]})")
    return model


def _diffusers_text_state(checkpoint: dict[str, Any], prefix: str, spec: TextEncoderSpec,
                          encoder: Any) -> dict[str, Any]:
    """One text encoder's tensors under transformers' names, through diffusers' converters (given only the
    tensors under ``prefix``, so that SDXL's two encoders are never told apart by their widths)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    own = {k: v for k, v in checkpoint.items()
           if k.startswith(prefix) and not _ignorable(k[len(prefix):], spec, encoder)}
    if spec.openclip:
        state = convert_open_clip_checkpoint(encoder, own, prefix=prefix)
    else:
        state = convert_ldm_clip_checkpoint(own, remove_prefix=prefix)
    if not hasattr(encoder, "text_model"):  # transformers >= 5 flattens CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _load_text_encoder(checkpoint: dict[str, Any], prefix: str, spec: TextEncoderSpec, encoder: Any,
                       torch_dtype: Any, source: str) -> Any:
    """``encoder`` (a meta-device skeleton) with its weights from ``checkpoint``, all of them."""
    import torch

    wanted = encoder.state_dict()
    state = _diffusers_text_state(checkpoint, prefix, spec, encoder)
    buffers = dict(encoder.named_buffers())
    for key in list(state):
        if key.endswith(POSITION_IDS):  # the model's own arange (some merged files carry damaged ones)
            state.pop(key)
    state.update({k: buffers[k] for k in wanted if k.endswith(POSITION_IDS)})  # transformers 4.x saves it
    dtype = torch_dtype or torch.float32  # as diffusers' from_single_file: the model's dtype unless asked
    state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SdtuneError(f"{source}: the {spec.label} text encoder under {prefix} does not fit its config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                          f"{(missing or unexpected)[0]})")
    return encoder.eval()


def load_original(checkpoint: dict[str, torch.Tensor], family: Family, config_dir: str | Path,
                  torch_dtype: torch.dtype | None = None, *, with_vae: bool = True,
                  source: str = "checkpoint") -> tuple[Any, Any, list[Any]]:
    """(unet, vae, text_encoders in the family's order) from an original-layout state dict, built with the
    diffusers configs in ``config_dir`` (a folder with unet/, vae/, text_encoder/[, text_encoder_2/] config
    files). Every tensor those models need must be in ``checkpoint`` with its shape, and nothing foreign may
    sit under their prefixes; otherwise one SdtuneError names the first offending key (``source`` names the
    file in it). Keys outside the components' prefixes (EMA copies, scheduler tables) are not read.
    ``torch_dtype``: the dtype of the models' floating tensors (None: float32, as diffusers' from_single_file
    does). ``with_vae=False``: the VAE comes from elsewhere (a file without one, or ``model.vae``); its
    tensors are neither checked nor read, and the VAE returned is None."""
    config_dir = Path(config_dir)
    _check_family(family)
    # the original names and shapes of every tensor the configs' models have, from meta-device skeletons
    unet = _diffusers_skeleton("UNet2DConditionModel", config_dir, "unet")
    groups = [(UNET_PREFIX, "UNet", unet_to_original(unet), None, None)]
    if with_vae:
        vae = _diffusers_skeleton("AutoencoderKL", config_dir, "vae")
        groups.append((VAE_PREFIX, "VAE", vae_to_original(vae), None, None))
    encoders = [(prefix, spec, text_encoder_skeleton(spec, config_dir))
                for prefix, spec in zip(text_encoder_prefixes(family), family.text_encoders, strict=True)]
    groups += [(p, f"{s.label} text encoder", text_encoder_to_original(e, s), s, e) for p, s, e in encoders]
    problems = []
    for prefix, label, own, spec, encoder in groups:
        problems += _group_problems(checkpoint, {prefix + k: v for k, v in own.items()}, prefix, label,
                                    lambda rest, s=spec, e=encoder: _ignorable(rest, s, e))
    _raise_problems(problems, source, f"use a complete {family.label} checkpoint matching the configs in "
                    f"{config_dir} (a truncated download, or a file of another model, cannot be loaded)")
    unet = _load_diffusers("UNet2DConditionModel", checkpoint, config_dir, "unet", torch_dtype, source)
    vae = None
    if with_vae:
        vae = _load_diffusers("AutoencoderKL", checkpoint, config_dir, "vae", torch_dtype, source)
    return unet, vae, [_load_text_encoder(checkpoint, p, s, e, torch_dtype, source) for p, s, e in encoders]


def _vae_config_folder(config: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) of a VAE config: a model folder with vae/config.json, or the VAE's own folder."""
    if (config / "vae" / "config.json").is_file():
        return config, "vae"
    if (config / "config.json").is_file():
        return config, None
    raise SdtuneError(f"{config}: no VAE config here (vae/config.json or config.json); fix: give the "
                      "diffusers model folder, or the folder of the VAE's config.json")


def load_vae(path_or_checkpoint: str | Path | dict[str, torch.Tensor],
             config_dir_or_vae_config_folder: str | Path, torch_dtype: torch.dtype | None = None) -> Any:
    """An ``AutoencoderKL`` from a standalone VAE file (or its state dict) in either the original layout
    (``encoder.down.0...``, with or without ``first_stage_model.`` or ``vae.``) or the diffusers layout
    (``encoder.down_blocks.0...``), built with the VAE config of a model folder or of the VAE's own folder.
    A file that lacks a tensor, or holds a foreign one, is one SdtuneError."""
    if isinstance(path_or_checkpoint, dict):
        checkpoint, source = path_or_checkpoint, "vae"
    else:
        checkpoint, source = read_single_file(path_or_checkpoint), str(path_or_checkpoint)
    folder, subfolder = _vae_config_folder(Path(config_dir_or_vae_config_folder))
    # a full checkpoint given as the VAE: its first_stage_model tensors are the VAE
    prefix = next((p for p in VAE_FILE_PREFIXES if any(k.startswith(p) for k in checkpoint)), "")
    state = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    skeleton = _diffusers_skeleton("AutoencoderKL", folder, subfolder)
    diffusers_layout = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state)
    expected = skeleton.state_dict() if diffusers_layout else vae_to_original(skeleton)
    problems = _group_problems(state, expected, "", "VAE", lambda rest: False)
    _raise_problems(problems, source, f"use a whole VAE file of the kind {folder} describes")
    return _load_diffusers("AutoencoderKL", state, folder, subfolder, torch_dtype, source)
