"""Single-file checkpoints: the ``.safetensors`` files in Stability's original layout that Civitai and most model
pages share (Juggernaut XL, DreamShaper, epicRealism, Pony, ...), as ``model.pretrained``.

What a file is comes from its safetensors header alone (key names, shapes, metadata; no tensor is read): its
family, whether it predicts noise or v, and the diffusers configs of its parts. sdtune writes those configs once
into a small folder in its cache (``config_folder``), which then stands for the model wherever sdtune reads a
model's config files, so the family checks, LoRA target checks and resolution read it like any diffusers
folder. Nothing is fetched: diffusers' own single-file loader looks the configs up on the Hub, which fails
offline and for the files of fine-tuners that never published a diffusers folder.

The configs are derived from the tensor shapes with the rules of the real architectures (SD1.x: 8 attention heads
per block; SD2.x and SDXL: 64 channels per head; CLIP and OpenCLIP: 64 channels per head; 32 norm groups). A
file sdtune wrote itself (``sdtune random-model --single-file``) carries its exact configs in its metadata, so
tiny test models with other head counts round-trip too. ``sdtune.ldm`` converts the weights.

FLUX.1 and SD3.x files (the transformer in Black Forest Labs' or Stability's MMDiT layout, paired with
``model.base``) are ``sdtune.transformer_file``'s; they share this module's header reading and cache folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.families import Family
from sdtune.files import cache_root
from sdtune.ldm import UNET_PREFIX as UNET
from sdtune.ldm import VAE_PREFIX as VAE
from sdtune.ldm import text_encoder_prefixes
from sdtune.runs import safetensors_header
from sdtune.tokens import clip_tokenizer, write_clip_tokenizer_files

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_KEY = "sdtune.diffusers_configs"  # metadata of files sdtune writes: their exact diffusers configs (JSON)
DERIVATION = "1"  # bump when the derived configs change, so cached config folders are written again


def is_single_file(pretrained: str) -> bool:
    """Whether ``model.pretrained`` names one checkpoint file (not a diffusers folder or hub id)."""
    path = Path(pretrained).expanduser()
    return path.suffix.lower() in SUFFIXES + PICKLES and not path.is_dir()


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint's header says."""

    path: Path
    family: Family
    prediction_type: str  # "epsilon" | "v_prediction"
    said_by: str  # where the prediction type came from, for messages
    zero_snr: bool  # trained with zero terminal SNR (a "ztsnr" key, NoobAI-style v-pred models)
    has_vae: bool
    shapes: dict[str, list[int]]
    metadata: dict[str, str]


def read_header(pretrained: str) -> tuple[Path, dict[str, list[int]], dict[str, str]]:
    """(path, {key: shape}, metadata) of a ``.safetensors`` checkpoint, from its header alone; one SdtuneError
    naming ``model.pretrained`` for a pickle or a missing file."""
    path = Path(pretrained).expanduser()
    if path.suffix.lower() in PICKLES:
        raise SdtuneError(f"model.pretrained: {pretrained} is a pickle checkpoint ({path.suffix}), which can run code "
                          "when loaded; sdtune reads single-file checkpoints as .safetensors. fix: download the "
                          ".safetensors version of the model (model pages offer both) or convert it")
    if not path.is_file():
        raise SdtuneError(f"model.pretrained: {pretrained} does not exist; fix the path")
    header = safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: list(v.get("shape", [])) for k, v in header.items() if isinstance(v, dict)}
    return path, shapes, {str(k): str(v) for k, v in metadata.items()}


TRANSFORMER_FILE = ("is a transformer checkpoint sdtune does not read as one file (a diffusers transformer saved "
                    "alone, or a FLUX.1 file without its single blocks); use a diffusers-format model folder")


def _not_trainable(pretrained: str, keys: list[str], shapes: dict[str, list[int]]) -> str | None:
    """Why a file is not an SD1.x / SD2.x / SDXL text-to-image checkpoint, None if it is one."""
    if not any(k.startswith(UNET) for k in keys):
        adapter = (".lora_", ".lora.", ".hada_", ".lokr_")  # LoRA, and LyCORIS' LoHa / LoKr in any layout
        if any(k.startswith(("lora_unet_", "lora_te")) or any(a in k for a in adapter) for k in keys):
            return "is a LoRA, not a base model; train on the checkpoint it was made for, sample it with --lora"
        if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
            return "is a VAE alone; give it as model.vae beside a full checkpoint"
        if any(k.startswith(("double_blocks.", "joint_blocks.", "transformer_blocks.")) for k in keys):
            # a whole FLUX.1 or SD3 transformer in its original layout is sdtune.transformer_file's: not here
            return TRANSFORMER_FILE
        return "has no UNet (model.diffusion_model.*); is it a Stable Diffusion checkpoint?"
    if any(k.startswith((UNET + "double_blocks.", UNET + "joint_blocks.")) for k in keys):
        return TRANSFORMER_FILE
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if not conv_in or len(conv_in) != 4:
        return "is not an SD1.x, SD2.x or SDXL UNet (no input_blocks.0.0 convolution)"
    if conv_in[1] != 4:
        return (f"is a UNet with {conv_in[1]} input channels (inpainting, depth or instruct model); sdtune trains "
                "text-to-image models: use the base text-to-image checkpoint")
    return None


def _family(keys: set[str]) -> Family | None:
    """The family whose text encoders sit under this file's prefixes, with or without SDXL-style size/crop
    micro-conditioning (``label_emb``) as the family has it."""
    micro = UNET + "label_emb.0.0.weight" in keys
    for family in families.registered():
        layout = family.original_layout
        if layout is None or layout.micro_conditioning != micro:
            continue
        if all(any(k.startswith(prefix) for k in keys) for prefix in text_encoder_prefixes(family)):
            return family
    return None


def _prediction(family: Family, keys: set[str], metadata: dict[str, str]) -> tuple[str, str]:
    """(prediction type, what said so: "" when assumed). Files say it in kohya / ModelSpec metadata or with a
    ``v_pred`` key (the convention ComfyUI reads); an SD2.x file that says nothing is most likely 768-v."""
    if "v_pred" in keys:
        return "v_prediction", "its v_pred key"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction"):
        return "v_prediction", "its modelspec.prediction_type"
    if spec in ("epsilon", "eps"):
        return "epsilon", "its modelspec.prediction_type"
    if metadata.get("ss_v_parameterization", "").lower() == "true":
        return "v_prediction", "its ss_v_parameterization"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture:
        return ("v_prediction" if architecture.endswith("-v") else "epsilon"), "its modelspec.architecture"
    assert family.original_layout is not None
    if family.original_layout.assume_v:
        return "v_prediction", ""
    return "epsilon", "its family"


def read_checkpoint(pretrained: str, for_training: bool = True) -> Checkpoint:
    """What the single-file checkpoint ``pretrained`` is, from its header; one SdtuneError naming
    ``model.pretrained`` and the fix when it is not a checkpoint sdtune can use."""
    path, shapes, metadata = read_header(pretrained)
    keys = list(shapes)
    why = _not_trainable(pretrained, keys, shapes)
    family = _family(set(keys)) if why is None else None
    if why is None and family is None:
        why = ("has a UNet but not the text encoder(s) of SD1.x, SD2.x or SDXL base (an SDXL refiner, or a UNet "
               "alone?)")
    if why:
        raise SdtuneError(f"model.pretrained: {pretrained} {why}")
    assert family is not None
    prediction, said_by = _prediction(family, set(keys), metadata)
    return Checkpoint(path=path, family=family, prediction_type=prediction, said_by=said_by,
                      zero_snr="ztsnr" in shapes, has_vae=any(k.startswith(VAE) for k in keys), shapes=shapes,
                      metadata=metadata)


# --------------------------------------------------------------------------------------------------------
# Diffusers configs from the tensor shapes


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct integers fill ``{}`` in ``pattern`` among ``keys``."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _unet_levels(shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per resolution level of the LDM UNet's input blocks: channels, resnets and transformer depth."""
    keys = [k for k in shapes if k.startswith(UNET + "input_blocks.")]
    levels: list[dict[str, Any]] = [{"channels": 0, "resnets": 0, "depth": 0}]
    for i in range(1, _count(keys, UNET + "input_blocks.{}.")):
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"channels": 0, "resnets": 0, "depth": 0})
            continue
        level = levels[-1]
        level["channels"] = shapes[block + "0.out_layers.3.weight"][0]
        level["resnets"] += 1
        level["depth"] = max(level["depth"], _count(keys, block + "1.transformer_blocks.{}."))
    return levels


def _derived_unet(family: Family, shapes: dict[str, list[int]], prediction: str) -> dict[str, Any]:
    layout = family.original_layout
    assert layout is not None
    levels = _unet_levels(shapes)
    channels = [lv["channels"] for lv in levels]
    attention = [lv["depth"] > 0 for lv in levels]
    if not layout.attention_heads and any(c % layout.head_channels for c in channels):
        raise SdtuneError(f"a UNet with {channels} channels, not multiples of the {layout.head_channels} per head "
                          f"of every {family.label} model, so its head counts cannot be read from the shapes; fix: a "
                          "file sdtune wrote (its configs in the metadata), or the model as a diffusers folder")
    k_weight = next(v for k, v in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in shapes.items() if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    config: dict[str, Any] = dict(
        sample_size=layout.resolutions.get(prediction, max(layout.resolutions.values())) // 8,
        in_channels=shapes[UNET + "input_blocks.0.0.weight"][1], out_channels=shapes[UNET + "out.2.weight"][0],
        block_out_channels=channels, layers_per_block=levels[0]["resnets"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=k_weight[1], use_linear_projection=len(proj_in) == 2, norm_num_groups=32,
        # diffusers' legacy name for the head count: a fixed one (SD1.x: 8), or 64 channels per head
        attention_head_dim=layout.attention_heads or [c // layout.head_channels for c in channels],
        upcast_attention=layout.upcast_attention_v and prediction == "v_prediction",
    )
    if any(lv["depth"] > 1 for lv in levels):
        config["transformer_layers_per_block"] = [lv["depth"] or 1 for lv in levels]
    if layout.micro_conditioning:
        pooled = text_encoder_prefixes(family)[-1] + "text_projection"  # the last encoder's pooled embedding
        total = shapes[UNET + "label_emb.0.0.weight"][1]
        # six size/crop ids of this width each, beside the pooled embedding
        config |= dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=total,
                       addition_time_embed_dim=(total - shapes[pooled][1]) // 6)
    if not any(k.startswith(UNET + "middle_block.1.") for k in shapes):
        config["mid_block_type"] = None
    return config


def _derived_vae(family: Family, shapes: dict[str, list[int]], prefix: str, prediction: str) -> dict[str, Any]:
    layout = family.original_layout
    assert layout is not None
    keys = [k for k in shapes if k.startswith(prefix + "encoder.down.")]
    levels = _count(keys, prefix + "encoder.down.{}.")
    return dict(
        in_channels=3, out_channels=3, latent_channels=shapes[prefix + "encoder.conv_out.weight"][0] // 2,
        block_out_channels=[shapes[f"{prefix}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        layers_per_block=_count(keys, prefix + "encoder.down.0.block.{}."), norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        sample_size=layout.resolutions.get(prediction, max(layout.resolutions.values())),
        scaling_factor=layout.vae_scaling_factor, force_upcast=layout.vae_force_upcast,
    )


def _derived_clip(shapes: dict[str, list[int]], prefix: str, openclip: bool, dropped: int) -> dict[str, Any]:
    """A CLIPTextConfig's arguments for the encoder under ``prefix`` (OpenCLIP's names or Hugging Face's)."""
    if openclip:
        vocab, width = shapes[prefix + "token_embedding.weight"]
        layers = _count(list(shapes), prefix + "transformer.resblocks.{}.")
        mlp = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = shapes[prefix + "positional_embedding"][0]
        projection = shapes.get(prefix + "text_projection", [width, width])[1]
    else:
        vocab, width = shapes[prefix + "text_model.embeddings.token_embedding.weight"]
        layers = _count(list(shapes), prefix + "text_model.encoder.layers.{}.")
        mlp = shapes[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes[prefix + "text_model.embeddings.position_embedding.weight"][0]
        projection = width
    if width % 64:  # the head count is not in the shapes: every CLIP and OpenCLIP text encoder has 64 per head
        raise SdtuneError(f"{prefix.rstrip('.')}: a text encoder {width} wide, not a multiple of the 64 channels "
                          "per head that every CLIP has, so its head count cannot be read from the shapes; fix: a "
                          "file sdtune wrote (its configs in the metadata), or the model as a diffusers folder")
    return dict(
        vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_attention_heads=width // 64,
        # SD2.x conditions on OpenCLIP-H's penultimate layer: diffusers' SD2 encoder keeps 23 of its 24 layers
        num_hidden_layers=layers - dropped, max_position_embeddings=positions,
        hidden_act="gelu" if openclip else "quick_gelu", projection_dim=projection,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if openclip else 49407,
    )


def derived_configs(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """{"unet", "vae", and one per text encoder: config} of the checkpoint: the exact ones a file sdtune wrote
    carries in its metadata, else derived from its tensor shapes ("vae" is {} for a file without one)."""
    if CONFIG_KEY in ckpt.metadata:
        try:
            configs = json.loads(ckpt.metadata[CONFIG_KEY])
            if isinstance(configs, dict) and {"unet", "vae", *(s.name for s in ckpt.family.text_encoders)} <= set(configs):
                return configs
        except ValueError:
            pass
        logger.warning(f"{ckpt.path.name}: its {CONFIG_KEY} metadata is damaged; deriving the configs from its shapes")
    fam, shapes = ckpt.family, ckpt.shapes
    assert fam.original_layout is not None
    try:
        configs: dict[str, dict[str, Any]] = {
            "unet": _derived_unet(fam, shapes, ckpt.prediction_type),
            "vae": _derived_vae(fam, shapes, VAE, ckpt.prediction_type) if ckpt.has_vae else {},
        }
        for spec, prefix in zip(fam.text_encoders, text_encoder_prefixes(fam)):
            configs[spec.name] = _derived_clip(shapes, prefix, spec.openclip, fam.original_layout.text_layers_dropped)
    except SdtuneError as e:  # an architecture's rule does not hold for this file's shapes
        raise SdtuneError(f"model.pretrained: {ckpt.path.name}: {e}") from None
    return configs


def _scheduler(ckpt: Checkpoint) -> Any:
    """The sampling scheduler the family's real checkpoints ship, with the file's prediction type."""
    import diffusers

    base = ckpt.family.random_scheduler()
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if ckpt.zero_snr else {}
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    cls = getattr(diffusers, type(base).__name__)
    return cls.from_config({**config, "prediction_type": ckpt.prediction_type, **extra})


def _write_configs(ckpt: Checkpoint, configs: dict[str, dict[str, Any]], folder: Path) -> None:
    """A diffusers pipeline folder of config and tokenizer files only."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = ckpt.family
    scheduler = _scheduler(ckpt)
    index: dict[str, Any] = {"_class_name": family.lora_pipeline, "_diffusers_version": diffusers.__version__,
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", type(scheduler).__name__]}
    _save_config(UNet2DConditionModel, configs["unet"], folder / "unet")
    if configs.get("vae"):
        _save_config(AutoencoderKL, configs["vae"], folder / "vae")
    scheduler.save_config(folder / "scheduler")
    for spec in family.text_encoders:
        config = transformers.CLIPTextConfig(**configs[spec.name])
        config.architectures = [spec.model_class]
        config.save_pretrained(folder / spec.name)
        clip_tokenizer(pad_token=spec.pad_token).save_pretrained(folder / spec.tokenizer_name)
        write_clip_tokenizer_files(folder / spec.tokenizer_name)  # transformers 4's slow tokenizer reads these
        index[spec.name] = ["transformers", spec.model_class]
        index[spec.tokenizer_name] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _save_config(cls: Any, config: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / cls.config_name).write_text(
        json.dumps({"_class_name": cls.__name__, **config}, indent=2), encoding="utf-8")


def config_folder(pretrained: str, prediction_type: str | None = None) -> tuple[Checkpoint, Path]:
    """The checkpoint and the folder of its diffusers configs in sdtune's cache (written the first time; a few
    KiB). ``prediction_type`` (``model.prediction_type``) overrides what the file says."""
    ckpt = read_checkpoint(pretrained)
    if prediction_type:
        ckpt = Checkpoint(**{**ckpt.__dict__, "prediction_type": prediction_type, "said_by": "model.prediction_type"})
    configs = derived_configs(ckpt)
    key = json.dumps([DERIVATION, ckpt.family.name, ckpt.prediction_type, ckpt.zero_snr, configs], sort_keys=True)
    folder = cache_folder(key, lambda tmp: _write_configs(ckpt, configs, tmp))
    return ckpt, folder


def cache_folder(key: str, write: Callable[[Path], None]) -> Path:
    """The config folder named by ``key`` (what it is derived from) in sdtune's cache: ``write`` fills a
    temporary folder the first time, which then takes the name at once."""
    folder = cache_root() / "single_file" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            write(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process wrote the same folder first: theirs is the same
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def param_count_problem(ckpt: Checkpoint, folder: Path) -> str | None:
    """Whether the UNet the derived config describes has as many weights as the file holds (built empty, on
    the meta device): a file of an architecture the derivation does not know is refused here, not mid-load."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    expected = sum(p.numel() for p in unet.parameters())
    found = sum(_numel(s) for k, s in ckpt.shapes.items() if k.startswith(UNET))
    if expected == found:
        return None
    return (f"model.pretrained: {ckpt.path.name} holds a UNet of {found:,} weights, but the {ckpt.family.label} "
            f"architecture read from its key names has {expected:,}; sdtune cannot tell this file's layout")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def standard_vae_folder(family: Family, prediction_type: str = "epsilon") -> Path:
    """A folder with ``vae/config.json`` of the family's standard VAE (what a checkpoint without one pairs
    with): four levels of 128-512 channels, two blocks each, 4 latent channels."""
    shapes: dict[str, list[int]] = {"vae.encoder.conv_out.weight": [8, 512, 3, 3]}
    for i, c in enumerate((128, 256, 512, 512)):
        for b in range(2):
            shapes[f"vae.encoder.down.{i}.block.{b}.conv2.weight"] = [c, c, 3, 3]
    folder = cache_root() / "single_file" / f"vae-{family.name}-{prediction_type}-{DERIVATION}"
    if not (folder / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        _save_config(AutoencoderKL, _derived_vae(family, shapes, "vae.", prediction_type), folder / "vae")
    return folder
