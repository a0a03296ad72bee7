"""sdtune export: a kohya file that renders exactly like the diffusers LoRA and whose every key ComfyUI and
AUTOMATIC1111 place on a module; the real alpha; public-only metadata; DoRA; PEFT folders; CLI errors.

The loaders' key rules are re-implemented below from their source code, as facts: a key neither maps is what
ComfyUI logs as "lora key not loaded" and A1111 as "Failed to match keys when loading network".
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import DEMO_DATA, overrides
from sdtune import export, families
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.export import Adapter, kohya_warnings, read_run, to_kohya, write_kohya
from sdtune.hub import public_model_id
from sdtune.layout import canonical_text_encoder_keys
from sdtune.lora import WEIGHT_NAME, add_lora
from sdtune.models import inspect_model, load_components
from sdtune.train import train

# the families whose kohya names are their diffusers paths (FLUX's original BFL layout: tests/test_flux.py)
FAMILIES = tuple(n for n in families.names()
                 if families.get(n).kohya_prefixes and not getattr(families.get(n), "kohya_modules", ()))
F = families.get  # the tests name families as recipes do; the library takes Family objects


def kohya_module_name(family: str, component: str, module: str) -> str:
    return export.kohya_module_name(F(family), component, module)


def export_run(run_dir, fmt, out):
    return export.export_run(run_dir, fmt, out)[0]

RANK, ALPHA = 4, 2.0  # alpha != rank, so a file carrying alpha = rank renders differently
# Images are float32 in [0, 1]; the kohya path hands PEFT the same tensors and scales, so the same pixels up
# to float rounding. Observed difference: exactly 0.
TOLERANCE = 1e-5
ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
# Beyond attention: transformer projections, feed-forward, resnets (3x3 and 1x1 convs, time embedding) and,
# for SD1/SD2, the samplers and the UNet's first and last convs.
EVERY_KIND = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
UNET_TARGETS = {family: EVERY_KIND + ["conv", "conv_in", "conv_out"] for family in ("sd15", "sd2")}
UNET_TARGETS["sdxl"] = EVERY_KIND
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TEXT_ENCODERS = {"sd15": ["text_encoder"], "sd2": ["text_encoder"],
                 "sdxl": ["text_encoder", "text_encoder_2"]}


def wide(family: str) -> str:
    return f"lora.target_modules=[{','.join(UNET_TARGETS[family])}]"


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """run(family, *overrides) -> folder of a tiny trained run: rank 4, alpha 2, the default attention targets
    (``wide(family)`` for every module kind) and all six projections of each text encoder."""
    made: dict[tuple, Path] = {}

    def get(family: str, *extra: str) -> Path:
        if (family, *extra) not in made:
            out = tmp_path_factory.mktemp(f"export-{family}") / "run"
            train(load_config(None, overrides(
                tiny_model(family), out, f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                "lora.train_text_encoder=true", f"lora.text_encoder_target_modules=[{','.join(TE_TARGETS)}]",
                "train.learning_rate=0.01", "train.max_steps=2", *extra,
            )))
            made[(family, *extra)] = out
        return made[(family, *extra)]

    return get


def _direct(out: Path):
    """A pipeline setup that puts the run's adapters in with PEFT itself: the ground truth."""
    from sdtune.lora import load_adapter_state_dict

    run_lora = read_run(out)
    lora = run_lora.config["lora"]
    # as training leaves them: no LoRA on text-encoder layers the family never reads (SDXL's CLIP-L's last)
    specs = inspect_model(run_lora.base_model).family.text_encoders
    unread = {spec.name: spec.unread_layers for spec in specs}

    def setup(pipe) -> None:
        for component, adapter in run_lora.adapters.items():
            module = getattr(pipe, component)
            targets = lora["target_modules"] if component == "unet" else lora["text_encoder_target_modules"]
            add_lora(module, RANK, ALPHA, targets, use_dora=lora["use_dora"],
                     unread_layers=unread.get(component, 0))
            load_adapter_state_dict(module, adapter.tensors)
            module.eval()

    return setup


def _render(family: str, model: Path, lora_dir: Path | None = None, weight_name: str | None = None,
            setup=None):
    pipe = F(family).pipeline(load_components(str(model), F(family)))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    if setup is not None:
        setup(pipe)
    images = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    return images, pipe


def _kohya(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


# --------------------------------------------------------------------------------------------------------
# (1) The kohya file renders like the diffusers LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_renders_like_the_diffusers_lora(family, run, tiny_model, tmp_path):
    from peft import get_peft_model_state_dict

    out = run(family)
    model = tiny_model(family)
    # the reader undoes diffusers' renaming exactly: the same tensors as the checkpoint's PEFT adapters
    adapters = read_run(out).adapters
    assert set(adapters) == {"unet", *TEXT_ENCODERS[family]}
    for component, adapter in adapters.items():
        saved = load_file(out / f"checkpoints/step-000002/adapter-{component}.safetensors")
        assert adapter.tensors.keys() == saved.keys()
        assert all(torch.equal(adapter.tensors[k], saved[k]) for k in saved), component

    kohya = export_run(out, "kohya", tmp_path / "export.safetensors")
    base, _ = _render(family, model)
    truth, _ = _render(family, model, setup=_direct(out))
    want, pipe_diffusers = _render(family, model, out)
    got, pipe_kohya = _render(family, model, tmp_path, kohya.name)
    assert np.abs(truth - base).max() > 0.05, "the LoRA must change the image, or equality proves nothing"
    assert np.abs(want - truth).max() <= TOLERANCE
    assert np.abs(got - want).max() <= TOLERANCE
    # every adapter tensor arrived with its scale, text encoders included (their keys gained text_model.)
    for component in ("unet", *TEXT_ENCODERS[family]):
        a, b = getattr(pipe_diffusers, component), getattr(pipe_kohya, component)
        sa = get_peft_model_state_dict(a, adapter_name=next(iter(a.peft_config)))
        sb = get_peft_model_state_dict(b, adapter_name=next(iter(b.peft_config)))
        assert sa.keys() == sb.keys() and len(sa) == 2 * len(adapters[component].modules()), component
        assert all(torch.allclose(sa[k], sb[k]) for k in sa), component
        assert next(iter(b.peft_config.values())).lora_alpha == ALPHA


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_renders_like_the_adapters_for_every_module_kind(family, run, tiny_model, tmp_path):
    """Projections, feed-forward, 3x3 and 1x1 convs, time embeddings, samplers: still the same pixels."""
    out = run(family, wide(family))
    model = tiny_model(family)
    kohya = export_run(out, "kohya", tmp_path / "export.safetensors")
    base, _ = _render(family, model)
    truth, _ = _render(family, model, setup=_direct(out))
    with _library_warnings() as said:
        got, _ = _render(family, model, tmp_path, kohya.name)
    assert np.abs(truth - base).max() > 0.05
    assert np.abs(got - truth).max() <= TOLERANCE
    # diffusers' kohya converter read every key: no "unexpected keys" / "not loaded" / "not compatible" word
    assert said == []


@contextlib.contextmanager
def _library_warnings():
    """The warnings diffusers, PEFT and transformers log meanwhile (their loggers do not propagate to caplog)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for log in loggers:
        log.addHandler(handler)
    try:
        yield said
    finally:
        for log in loggers:
            log.removeHandler(handler)


def test_diffusers_format_keeps_attention_when_other_modules_are_trained(run, tiny_model):
    out = run("sd15", wide("sd15"))
    truth, _ = _render("sd15", tiny_model("sd15"), setup=_direct(out))
    want, _ = _render("sd15", tiny_model("sd15"), out)
    assert np.abs(want - truth).max() <= TOLERANCE


def test_diffusers_convert_state_dict_to_kohya_writes_alpha_equal_to_rank(run, tiny_model, tmp_path):
    """The trap the exporter avoids: diffusers' converter sets alpha = rank, so alpha 2 at rank 4 doubles."""
    from diffusers.utils import convert_state_dict_to_kohya

    out = run("sd15")
    adapters = read_run(out).adapters
    theirs = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in adapters["unet"].tensors.items()})
    alphas = {float(v) for k, v in theirs.items() if k.endswith(".alpha")}
    assert alphas == {float(RANK)} != {ALPHA}
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    ours, meta = to_kohya(F("sd15"), {"unet": adapters["unet"]})
    save_file(ours, str(tmp_path / "ours.safetensors"), metadata=meta)
    wrong, _ = _render("sd15", tiny_model("sd15"), tmp_path, "theirs.safetensors")
    right, _ = _render("sd15", tiny_model("sd15"), tmp_path, "ours.safetensors")
    assert np.abs(wrong - right).max() > 0.01


# --------------------------------------------------------------------------------------------------------
# (2) Every key maps to a module in ComfyUI and in AUTOMATIC1111 — their rules, re-implemented as facts

# ComfyUI comfy/lora.py LORA_CLIP_MAP: the only CLIP modules model_lora_keys_clip names
COMFY_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
# ComfyUI comfy/utils.py TRANSFORMER_BLOCKS, UNET_MAP_ATTENTIONS, UNET_MAP_RESNET, UNET_MAP_BASIC, as modules
COMFY_TRANSFORMER_BLOCK = ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] + [
    f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
]
COMFY_ATTENTION = ["proj_in", "proj_out", "norm"]
COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
COMFY_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
COMFY_CLIPS = {"sd15": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
               "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


def comfy_unet_config(config: dict) -> dict:
    """What comfy/model_detection.py detect_unet_config reads off an LDM checkpoint of this diffusers UNet.
    transformer_depth_output runs from the last output block to the first (it is consumed with pop())."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = [depth[x] if "CrossAttn" in t else 0
            for x, t in enumerate(config["down_block_types"]) for _ in range(per)]
    up = [depth[::-1][x] if "CrossAttn" in t else 0
          for x, t in enumerate(config["up_block_types"]) for _ in range(per + 1)]
    return {"num_res_blocks": [per] * levels, "channel_mult": [1] * levels, "transformer_depth": down,
            "transformer_depth_output": up[::-1], "transformer_depth_middle": depth[-1]}


def comfy_unet_to_diffusers(uc: dict) -> dict[str, str]:  # noqa: C901 (ComfyUI's function, kept in its shape)
    """comfy/utils.py unet_to_diffusers, per module: diffusers module name -> LDM module name."""
    out: dict[str, str] = {}
    num_res = uc["num_res_blocks"]
    depth, depth_out = list(uc["transformer_depth"]), list(uc["transformer_depth_output"])

    def attention(diffusers: str, ldm: str, layers: int) -> None:
        for b in COMFY_ATTENTION:
            out[f"{diffusers}.{b}"] = f"{ldm}.{b}"
        for t in range(layers):
            for b in COMFY_TRANSFORMER_BLOCK:
                out[f"{diffusers}.transformer_blocks.{t}.{b}"] = f"{ldm}.transformer_blocks.{t}.{b}"

    for x in range(len(uc["channel_mult"])):
        n = 1 + (num_res[x] + 1) * x
        for i in range(num_res[x]):
            for ldm, d in COMFY_RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{ldm}"
            layers = depth.pop(0)
            if layers > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", layers)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", uc["transformer_depth_middle"])
    for i, n in enumerate([0, 2]):
        for ldm, d in COMFY_RESNET.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{ldm}"
    num_res = list(reversed(num_res))
    for x in range(len(uc["channel_mult"])):
        n, per = (num_res[x] + 1) * x, num_res[x] + 1
        for i in range(per):
            for ldm, d in COMFY_RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{ldm}"
            c = 1
            layers = depth_out.pop()
            if layers > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", layers)
            if i == per - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update(COMFY_BASIC)
    return out


def comfy_key_map(family: str, unet_map: dict[str, str], te_layers: dict[str, int]) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet + model_lora_keys_clip: LoRA name -> model weight it patches."""
    key_map = {}
    for diffusers, ldm in unet_map.items():
        # LDM-named and diffusers-named LoRAs
        key_map["lora_unet_" + ldm.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
        key_map["lora_unet_" + diffusers.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
    # the model's state dict holds layer b of an encoder only if it has that many layers (checked up to 32)
    layers = {COMFY_CLIPS[family][component]: n for component, n in te_layers.items()}
    for b in range(32):
        for c, flat in COMFY_CLIP_MAP.items():
            for clip in ("clip_h", "clip_l"):  # te and te1 both name CLIP-H (SD2) / CLIP-L (SD1, SDXL)
                if b < layers.get(clip, 0):
                    weight = f"{clip}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = weight
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{flat}"] = weight
            if b < layers.get("clip_g", 0) and "clip_l" in layers:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{flat}"] = (
                    f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
                )
    return key_map


def comfy_not_loaded(keys: set[str], key_map: dict[str, str]) -> set[str]:
    """comfy/lora.py load_lora's bookkeeping for LoRA/LoCon keys: what it logs as 'lora key not loaded'."""
    loaded = set()
    for x in key_map:
        loaded |= {f"{x}.{part}" for part in ("alpha", "dora_scale") if f"{x}.{part}" in keys}
        if f"{x}.lora_up.weight" in keys:
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
            loaded |= {f"{x}.lora_mid.weight"} & keys
    return keys - loaded


# AUTOMATIC1111 extensions-builtin/Lora/networks.py
A1111_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                       "conv_shortcut": "skip_connection"}
A1111_PARTS = {"lora_up.weight", "lora_down.weight", "alpha", "dora_scale"}  # read by NetworkModule(Lora)


def a1111_convert(key: str, is_sd2: bool, per_level: int = 3) -> str:
    """convert_diffusers_name_to_compvis. A1111 hard-codes per_level = 3 LDM blocks per UNet level, i.e.
    layers_per_block + 1 with the layers_per_block = 2 of every real SD1/SD2/SDXL UNet; the tiny test models
    have 1, so those tests pass per_level = 2 and test_real_layouts_* checks the constant itself."""
    def match(pattern: str) -> list | None:
        r = re.match(pattern, key)
        return [int(g) if re.match(r"\d+", g) else g for g in r.groups()] if r else None

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        block, inner = 1 + m[0] * per_level + m[2], 1 if m[1] == "attentions" else 0
        return f"diffusion_model_input_blocks_{block}_{inner}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET_SUFFIX.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = A1111_RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        block, inner = m[0] * per_level + m[2], 1 if m[1] == "attentions" else 0
        return f"diffusion_model_output_blocks_{block}_{inner}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{per_level + m[0] * per_level}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{per_level - 1 + m[0] * per_level}_{2 if m[0] > 0 else 1}_conv"
    def open_clip(name: str) -> str:  # if mlp_fc1 / elif mlp_fc2 / else self_attn -> attn
        old = next((o for o in ("mlp_fc1", "mlp_fc2") if o in name), "self_attn")
        return name.replace(old, {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "self_attn": "attn"}[old])

    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            return f"model_transformer_resblocks_{m[0]}_{open_clip(m[1])}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        return f"1_model_transformer_resblocks_{m[0]}_{open_clip(m[1])}"
    return key


def a1111_layers(family: str, unet_map: dict[str, str], te_layers: dict[str, int]) -> dict[str, str]:
    """sd_model.network_layer_mapping (assign_network_names_to_compvis_modules), weighted modules only:
    name -> kind. The UNet is LDM/SGM; SD1's text encoder is transformers' CLIP under ``transformer``, SD2's
    and SDXL's second are OpenCLIP (``model.transformer.resblocks``, fused nn.MultiheadAttention); SDXL's
    embedders are numbered 0 and 1."""
    def hf(n: int) -> dict[str, str]:
        return {f"text_model_encoder_layers_{b}_{m}": "weight" for b in range(n)
                for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                          "mlp_fc1", "mlp_fc2")}

    def open_clip(n: int) -> dict[str, str]:
        return {f"model_transformer_resblocks_{b}_{m}": kind for b in range(n)
                for m, kind in (("attn", "mha"), ("attn_out_proj", "weight"), ("mlp_c_fc", "weight"),
                                ("mlp_c_proj", "weight"))}

    layers = {"diffusion_model_" + ldm.replace(".", "_"): "weight" for ldm in unet_map.values()}
    if family == "sd15":
        layers |= {f"transformer_{k}": v for k, v in hf(te_layers["text_encoder"]).items()}
    elif family == "sd2":
        layers |= open_clip(te_layers["text_encoder"])
    else:
        layers |= {f"0_transformer_{k}": v for k, v in hf(te_layers["text_encoder"]).items()}
        layers |= {f"1_{k}": v for k, v in open_clip(te_layers["text_encoder_2"]).items()}
    return layers


def a1111_resolve(base: str, layers: dict[str, str], is_sd2: bool, per_level: int) -> tuple[str, str] | None:
    """load_network's lookup of one key (less its ".lora_up.weight" part): (network key, layer) or None."""
    key = a1111_convert(base, is_sd2, per_level)
    if key in layers:
        return key, key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m.group(1) in layers:
        return key, m.group(1)
    if "lora_unet" in base:
        key = base.replace("lora_unet", "diffusion_model")
        return (key, key) if key in layers else None
    if "lora_te1_text_model" in base:
        for to in ("0_transformer_text_model", "transformer_text_model"):
            key = base.replace("lora_te1_text_model", to)
            if key in layers:
                return key, key
    return None


def a1111_problems(keys: set[str], layers: dict[str, str], is_sd2: bool, per_level: int) -> list[str]:
    """Keys A1111 fails to match, parts it ignores, groups ModuleTypeLora rejects and fused attention it skips
    (network_apply_weights patches an nn.MultiheadAttention only if its q, k, v and out LoRAs all exist)."""
    problems, groups = [], {}
    for k in sorted(keys):
        base, part = k.split(".", 1)
        hit = a1111_resolve(base, layers, is_sd2, per_level)
        if hit is None:
            problems.append(f"unmatched {k}")
        elif part not in A1111_PARTS:
            problems.append(f"ignored part {k}")
        else:
            groups.setdefault(hit, set()).add(part)
    problems += [f"no up/down {key}" for key, parts in groups.items()
                 if not {"lora_up.weight", "lora_down.weight"} <= parts]
    network_keys = {key for key, _ in groups}
    for layer in sorted({layer for _, layer in groups if layers[layer] == "mha"}):
        missing = {f"{layer}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} - network_keys
        if missing:
            problems.append(f"fused attention {layer} skipped, no {sorted(missing)}")
    return problems


def _check_loaders(family: str, keys: set[str], unet_config: dict, te_layers: dict[str, int], per_level: int,
                   adapters: dict[str, Adapter]) -> list[str]:
    """What ComfyUI or A1111 would not load of ``keys``, and any module the two place differently."""
    unet_map = comfy_unet_to_diffusers(comfy_unet_config(unet_config))
    key_map = comfy_key_map(family, unet_map, te_layers)
    problems = [f"ComfyUI: lora key not loaded: {k}" for k in sorted(comfy_not_loaded(keys, key_map))]
    layers = a1111_layers(family, unet_map, te_layers)
    problems += [f"A1111: {p}" for p in a1111_problems(keys, layers, family == "sd2", per_level)]
    for component, adapter in adapters.items():
        for module in adapter.modules():
            name = kohya_module_name(family, component, module)
            if component == "unet":
                ldm = unet_map.get(module)
                hit = a1111_resolve(name, layers, family == "sd2", per_level)
                if ldm is None or key_map.get(name) != f"diffusion_model.{ldm}.weight":
                    problems.append(f"ComfyUI puts {module} elsewhere")
                elif hit is None or hit[1] != "diffusion_model_" + ldm.replace(".", "_"):
                    problems.append(f"A1111 and ComfyUI disagree on {module}: {hit}")
            else:
                clip = COMFY_CLIPS[family][component]
                inner = module.removeprefix("text_model.")
                if key_map.get(name) != f"{clip}.transformer.text_model.{inner}.weight":
                    problems.append(f"ComfyUI puts {component} {module} elsewhere: {key_map.get(name)}")
    return problems


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kohya_key_loads_in_comfyui_and_a1111(family, run, tmp_path):
    out = run(family, wide(family))
    tensors, _ = _kohya(export_run(out, "kohya", tmp_path / "export.safetensors"))
    adapters = read_run(out).adapters
    components = load_components(str(read_run(out).base_model), F(family))
    te_layers = {name: te.config.num_hidden_layers for name, te in zip(TEXT_ENCODERS[family], components.text_encoders)}
    unet_config = dict(components.denoiser.config)
    assert len(tensors) == 3 * sum(len(a.modules()) for a in adapters.values())  # down, up, alpha each
    per_level = unet_config["layers_per_block"] + 1
    problems = _check_loaders(family, set(tensors), unet_config, te_layers, per_level, adapters)
    assert problems == []
    assert kohya_warnings(F(family), adapters) == []
    # InvokeAI patches the UNet with prefix lora_unet_, SD1/SD2 text encoders with lora_te_ only, SDXL's with
    # lora_te1_ / lora_te2_ (invokeai/app/invocations/compel.py); ComfyUI and A1111 also take lora_te1_ on SD1
    prefixes = {"sd15": ("lora_unet_", "lora_te_"), "sd2": ("lora_unet_", "lora_te_"),
                "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}[family]
    assert {k.startswith(prefixes) for k in tensors} == {True}
    assert {p for p in prefixes if any(k.startswith(p) for k in tensors)} == set(prefixes)


def _skeleton_adapters(family: str) -> tuple[dict[str, Adapter], dict, dict[str, int]]:
    """Adapters with one-number tensors on every targetable module of the real architecture (weights on the
    meta device): names are all that the loaders' rules look at."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        modules = F(family).random_components("full").named_modules(F(family))
    targets = {"unet": UNET_TARGETS["sd15"] + ["linear_1", "linear_2"], "text_encoder": TE_TARGETS,
               "text_encoder_2": TE_TARGETS}
    adapters = {}
    for component, module in modules.items():
        names = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                 and any(n == t or n.endswith("." + t) for t in targets[component])]
        tensors = {f"{n}.lora_{ab}.weight": torch.ones(1, 1) for n in names for ab in "AB"}
        adapters[component] = Adapter(tensors, {"r": 1, "lora_alpha": 1})
    te_layers = {name: m.config.num_hidden_layers for name, m in modules.items() if name != "unet"}
    return adapters, dict(modules["unet"].config), te_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_real_layouts_follow_a1111_and_comfyui(family):
    """At the real SD1.5 / SD2 / SDXL shapes, with A1111's own constant (3 LDM blocks per level), every key of
    attention, projection, feed-forward, resnet, sampler and embedding LoRAs maps, except the SDXL modules
    A1111's rules place wrongly, which are exactly the ones kohya_warnings names."""
    adapters, unet_config, te_layers = _skeleton_adapters(family)
    tensors, _ = to_kohya(F(family), adapters)
    problems = _check_loaders(family, set(tensors), unet_config, te_layers, 3, adapters)
    if family == "sdxl":
        odd = ("up_blocks.0.upsamplers.0.conv", "add_embedding.linear_1", "add_embedding.linear_2")
        assert sorted(problems) == sorted(
            [f"A1111: unmatched lora_unet_{m.replace('.', '_')}.{part}"
             for m in odd for part in ("alpha", "lora_down.weight", "lora_up.weight")]
            + [f"A1111 and ComfyUI disagree on {m}: None" for m in odd]
        )
        assert any("AUTOMATIC1111 cannot place" in w for w in kohya_warnings(F(family), adapters))
    else:
        assert problems == []
        assert kohya_warnings(F(family), adapters) == []


# --------------------------------------------------------------------------------------------------------
# (3) The real alpha, and metadata with the required fields and nothing private


def a1111_detect_version(metadata: dict[str, str]) -> str:
    """extensions-builtin/Lora/network.py NetworkOnDisk.detect_version (decides which checkpoints show it)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_is_real_and_metadata_is_public(family, run, tiny_model, tmp_path):
    out = run(family)
    tensors, meta = _kohya(export_run(out, "kohya", tmp_path / "export.safetensors"))
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(v.dim() == 0 and v.dtype == torch.float32 and v.item() == ALPHA for v in alphas)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    expected = {  # tiny sd2 is v-prediction, like SD2's 768-v checkpoint
        "sd15": ("sd_v1", "stable-diffusion-v1/lora", "epsilon", "SD1"),
        "sd2": ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "v", "SD2"),
        "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "epsilon", "SDXL"),
    }[family]
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.prediction_type"],
            a1111_detect_version(meta)) == expected
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"]
    assert meta["modelspec.title"] == "export" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "sks"

    # nothing private: no path of this machine, no caption, no user name
    # the captions' tags are published on purpose (A1111's training tags, as kohya does: tests/test_travel.py)
    values = "\n".join(v for k, v in meta.items() if k != "ss_tag_frequency")
    for private in (str(tmp_path), str(out), str(tiny_model(family)), str(DEMO_DATA), str(Path.home()),
                    "/tmp"):
        assert private not in values, private
    user = getpass.getuser()
    if len(user) >= 3:
        assert not re.search(rf"\b{re.escape(user)}\b", values), user
    lines = (DEMO_DATA / "metadata.jsonl").read_text().splitlines()
    captions = [json.loads(line)["text"] for line in lines if line.strip()]
    words = {w for c in captions for w in re.findall(r"[a-z-]{4,}", c.lower())} - {"sks"}
    leaked = {w for w in words if re.search(rf"\b{re.escape(w)}\b", values.lower())}
    assert not leaked, leaked
    assert meta["ss_sd_model_name"] == tiny_model(family).name  # a local base model: its folder's name only


def test_public_model_id_and_names():
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert public_model_id(hub_id) == hub_id
    for private in ("/home/someone/models/sd15", "./models/sd15", "~/sd15", "C:\\models\\sd", None, ""):
        assert public_model_id(private) is None
    # transformers >= 5 CLIPTextModel keys lack text_model.; CLIPTextModelWithProjection keys have it
    assert kohya_module_name("sd15", "text_encoder", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert kohya_module_name("sdxl", "text_encoder", "encoder.layers.3.mlp.fc1") == (
        "lora_te1_text_model_encoder_layers_3_mlp_fc1")
    assert kohya_module_name("sdxl", "text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj") == (
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj")
    module = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
    assert kohya_module_name("sd2", "unet", module) == (
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0")
    with pytest.raises(SdtuneError, match="no text_encoder_2"):
        kohya_module_name("sd15", "text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj")


def test_alpha_follows_peft_scaling_rules():
    """kohya alpha = PEFT's scale x rank: lora_alpha / r, lora_alpha / sqrt(r) with rsLoRA, alpha_pattern."""
    tensors = {f"{m}.lora_{ab}.weight": torch.zeros(4, 4) for m in ("a.to_q", "a.to_k") for ab in "AB"}
    out, meta = to_kohya(F("sd15"), {"unet": Adapter(tensors, {"r": 4, "lora_alpha": 2, "alpha_pattern": {"to_q": 8}})})
    assert out["lora_unet_a_to_q.alpha"].item() == 8 and out["lora_unet_a_to_k.alpha"].item() == 2
    out, meta = to_kohya(F("sd15"), {"unet": Adapter(tensors, {"r": 4, "lora_alpha": 2, "use_rslora": True})})
    assert out["lora_unet_a_to_k.alpha"].item() == pytest.approx(4.0) and meta["ss_network_alpha"] == "4.0"


def test_write_kohya_from_trained_modules(tiny_model, tmp_path):
    """train.py's call: PEFT-injected modules in, one file out; a hub id is published, a path would not be."""
    c = load_components(str(tiny_model("sd15")), F("sd15"))
    add_lora(c.denoiser, RANK, ALPHA, ATTENTION)
    add_lora(c.text_encoders[0], RANK, ALPHA, ["q_proj", "v_proj"])
    path = write_kohya(tmp_path / "lora.safetensors", F("sd15"), {"unet": c.denoiser, "text_encoder": c.text_encoders[0]},
                       trigger_word="sks", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    tensors, meta = _kohya(path)
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in tensors
    assert meta["ss_sd_model_name"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["modelspec.title"] == "lora"
    with pytest.raises(SdtuneError, match=r"\.safetensors"):
        write_kohya(tmp_path / "lora.ckpt", F("sd15"), {"unet": c.denoiser})


# --------------------------------------------------------------------------------------------------------
# (4) DoRA


def test_dora_exports_dora_scale_per_output_channel(run, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.lora import load_adapter_state_dict

    out = run("sd15", wide("sd15"), "lora.use_dora=true")
    path = export_run(out, "kohya", tmp_path / "dora.safetensors")
    tensors, meta = _kohya(path)
    downs = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(f"{n}.dora_scale" in tensors for n in downs)
    for n in downs:  # (out, 1) / (out, 1, 1, 1): ComfyUI takes the output axis when shape[0] == out
        up, scale = tensors[f"{n}.lora_up.weight"], tensors[f"{n}.dora_scale"]
        assert scale.shape == (up.shape[0], *[1] * (up.dim() - 1)), n
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    adapters = read_run(out).adapters
    said = [w for w in kohya_warnings(F("sd15"), adapters) if "DoRA" in w]
    assert said and "ComfyUI and Forge apply" in said[0] and "AUTOMATIC1111 assumes per-input" in said[0]
    # the clients named are the family's: no AUTOMATIC1111 loads an SD3 LoRA (kohya_warnings reads the keys only)
    said = [w for w in kohya_warnings(F("sd3"), adapters) if "DoRA" in w]
    assert said and said[0].startswith("DoRA in kohya format: ComfyUI applies") and "AUTOMATIC1111" not in said[0]
    c = load_components(str(tiny_model("sd15")), F("sd15"))
    te_layers = {"text_encoder": c.text_encoders[0].config.num_hidden_layers}
    per_level = c.denoiser.config.layers_per_block + 1
    assert _check_loaders("sd15", set(tensors), dict(c.denoiser.config), te_layers, per_level, adapters) == []

    # The file's numbers rebuild PEFT's merged DoRA weight: W' = m * (W + a/r up@down) / ||W + a/r up@down||,
    # the norm per output channel (LyCORIS wd_on_output; ComfyUI divides by ||W|| instead, an approximation).
    unet, text_encoder = c.denoiser, c.text_encoders[0]
    add_lora(unet, RANK, ALPHA, UNET_TARGETS["sd15"], use_dora=True)
    add_lora(text_encoder, RANK, ALPHA, TE_TARGETS, use_dora=True)
    load_adapter_state_dict(unet, adapters["unet"].tensors)
    load_adapter_state_dict(text_encoder, adapters["text_encoder"].tensors)
    for module, name in [
        (unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        (unet.down_blocks[0].resnets[0].conv1, "lora_unet_down_blocks_0_resnets_0_conv1"),
        (getattr(text_encoder, "text_model", text_encoder).encoder.layers[1].mlp.fc1,
         "lora_te_text_model_encoder_layers_1_mlp_fc1"),
    ]:
        w = module.base_layer.weight.detach().clone()
        module.merge()
        merged = module.base_layer.weight.detach()
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        scale = tensors[f"{name}.alpha"] / down.shape[0]
        calc = w + scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)  # as ComfyUI's calculate_weight
        norm = calc.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        assert torch.allclose(calc * tensors[f"{name}.dora_scale"] / norm, merged, atol=1e-5), name
        assert not torch.allclose(merged, w, atol=1e-4), "DoRA changed the weight"

    # diffusers drops dora_scale keys of kohya files (lora_pipeline.lora_state_dict): `sdtune sample` reads
    # them itself (test_sample_applies_the_dora_of_a_kohya_file_as_the_run_does)
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(path))
    assert not any("magnitude" in k or "dora" in k for k in state_dict)


def _cell(grid: Path) -> np.ndarray:
    [cell] = sorted(grid.parent.glob(f"{grid.stem}_cells/cell-*.png"))
    return np.asarray(Image.open(cell).convert("RGB")).astype(int)


def test_sample_applies_the_dora_of_a_kohya_file_as_the_run_does(run, tiny_model, tmp_path, capsys):
    """`sdtune sample FILE` of a kohya DoRA file puts PEFT's DoRA back (diffusers' loader drops dora_scale),
    and `sdtune sample RUN` loads the trained magnitudes of the text encoder too (diffusers 0.42 with
    transformers 5 left them at the base weights' norms): the two render the same pixels."""
    from peft import get_peft_model_state_dict

    from sdtune.sample import ADAPTER, _apply_lora

    out = run("sd15", wide("sd15"), "lora.use_dora=true")  # every module kind, convs too, and CLIP
    kohya = export_run(out, "kohya", tmp_path / "dora.safetensors")
    model = tiny_model("sd15")
    capsys.readouterr()  # training's own lines
    images = {}
    for name, target, scale in (("base", out, "0"), ("run", out, "1"), ("kohya", kohya, "1")):
        assert main(["sample", str(target), "--model", str(model), "--prompt", "a photo of sks toy",
                     "--seeds", "0", "--steps", "2", "--lora-scale", scale,
                     "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = _cell(tmp_path / f"{name}.png")
    assert "not applied" not in capsys.readouterr().out
    assert np.abs(images["run"] - images["base"]).max() > 2, "DoRA must change the image, or equality is moot"
    assert np.array_equal(images["run"], images["kohya"])

    # what both put in place: the trained magnitudes of every module, bitwise
    trained = read_run(out).adapters
    for target in (out / WEIGHT_NAME, kohya):
        pipe = F("sd15").pipeline(load_components(str(model), F("sd15")))
        _apply_lora(pipe, str(target), F("sd15"))
        for component, adapter in trained.items():
            module = getattr(pipe, component)
            loaded = canonical_text_encoder_keys(get_peft_model_state_dict(module, adapter_name=ADAPTER),
                                                 type(module).__name__)
            magnitudes = [k for k in adapter.tensors if k.endswith(".lora_magnitude_vector")]
            assert magnitudes, component
            for k in magnitudes:
                assert torch.equal(loaded[k], adapter.tensors[k]), (target.name, k)


def test_a_kohya_dora_file_sample_cannot_read_is_sampled_without_it_and_says_so(run, tiny_model, tmp_path,
                                                                              capsys):
    """A kohya DoRA file outside sdtune's layout (here one module without dora_scale: PEFT's DoRA is all or
    nothing): diffusers loads it without the magnitudes, and one warning line says so."""
    from sdtune.sample import _apply_lora

    out = run("sd15", wide("sd15"), "lora.use_dora=true")
    tensors, meta = _kohya(export_run(out, "kohya", tmp_path / "dora.safetensors"))
    dropped = next(k for k in tensors if k.endswith(".dora_scale"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial), metadata=meta)
    capsys.readouterr()
    pipe = F("sd15").pipeline(load_components(str(tiny_model("sd15")), F("sd15")))
    _apply_lora(pipe, str(partial), F("sd15"))
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and printed.startswith("warning:")
    assert "DoRA magnitudes (dora_scale) are not applied" in printed
    assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())  # its LoRA is in, without DoRA
    assert not any("magnitude" in n for n, _ in pipe.unet.named_parameters())


# --------------------------------------------------------------------------------------------------------
# The other formats


def test_peft_folders_load_with_peft(run, tiny_model, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    out = run("sdxl")
    folder = export_run(out, "peft", tmp_path / "peft")
    adapters = read_run(out).adapters
    c = load_components(str(tiny_model("sdxl")), F("sdxl"))
    modules = c.named_modules(F("sdxl"))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        config = json.loads((folder / component / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == tiny_model("sdxl").name and config["lora_alpha"] == ALPHA
        if component == "unet":
            model = PeftModel.from_pretrained(modules[component], str(folder / component))
        else:  # canonical text_model. keys: transformers' load_adapter maps them (sdtune.export._write_peft)
            model = modules[component]
            model.load_adapter(str(folder / component))
        loaded = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
        if component != "unet":
            loaded = canonical_text_encoder_keys(loaded)
        assert loaded.keys() == adapters[component].tensors.keys()
        assert all(torch.equal(loaded[k], v) for k, v in adapters[component].tensors.items())
        scalings = {s for m in model.modules() for s in getattr(m, "scaling", {}).values()}
        assert scalings == {ALPHA / RANK}


def test_diffusers_export_loads_every_module_and_keeps_no_path(run, tiny_model, tmp_path):
    out = run("sd15", wide("sd15"))
    path = export_run(out, "diffusers", tmp_path / "lora.safetensors")
    truth, _ = _render("sd15", tiny_model("sd15"), setup=_direct(out))
    got, _ = _render("sd15", tiny_model("sd15"), tmp_path, path.name)
    assert np.abs(got - truth).max() <= TOLERANCE
    with safe_open(str(path), "pt") as f:
        configs = json.loads(f.metadata()["lora_adapter_metadata"])
    assert configs["unet.lora_alpha"] == ALPHA and configs["text_encoder.r"] == RANK
    names = {v for k, v in configs.items() if k.endswith("base_model_name_or_path")}
    assert names == {tiny_model("sd15").name}  # a local base model: its folder's name, never its path
    assert str(out.parent) not in json.dumps(configs)


# --------------------------------------------------------------------------------------------------------
# (5) Command line


def _main(argv: list[str]) -> int:
    return main(argv)


def test_cli_export_and_its_errors(run, tmp_path, capsys):
    out = run("sd15")
    checkpoint = out / "checkpoints" / "step-000002"
    assert _main(["export", str(checkpoint), "--format", "kohya", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert f"wrote kohya LoRA: {tmp_path / 'a.safetensors'}" in capsys.readouterr().out
    assert _kohya(tmp_path / "a.safetensors")[1]["ss_network_alpha"] == str(ALPHA)

    cases = [
        (["export", str(tmp_path / "nope"), "-o", str(tmp_path / "b.safetensors")], "no such run folder"),
        (["export", str(tmp_path), "-o", str(tmp_path / "b.safetensors")], f"no {WEIGHT_NAME} here"),
        (["export", str(out), "--format", "onnx", "-o", str(tmp_path / "b.onnx")],
         "argument --format: invalid choice: 'onnx'"),
        (["export", str(out), "-o", str(tmp_path / "b.ckpt")], "must end in .safetensors"),
        (["export", str(out), "-o", str(tmp_path)], "is a folder"),
        (["export", str(out), "--format", "diffusers", "-o", str(out / WEIGHT_NAME)], "run's own LoRA file"),
    ]
    for argv, message in cases:
        assert _main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "b.safetensors").exists()


# --------------------------------------------------------------------------------------------------------
# (6) The registry: every format is offered, written, and (where training writes it) found in the run folder


@pytest.mark.parametrize("fmt", list(export.WRITERS))
def test_every_registered_format_exports_and_reads_back(fmt, run, tmp_path):
    from sdtune.cli import build_parser

    out = run("sd15")
    choices = build_parser()._subparsers._group_actions[0].choices["export"]._option_string_actions["--format"].choices
    assert list(choices) == list(export.WRITERS)  # --format offers exactly the registry
    written = export_run(out, fmt, tmp_path / ("peft" if fmt == "peft" else f"{fmt}.safetensors"))
    files = sorted(written.rglob("*.safetensors")) if written.is_dir() else [written]
    assert files and all(load_file(f) for f in files), fmt  # every file holds tensors
    run_file = export.run_files(out).get(fmt)
    if export.WRITERS[fmt].run_file:  # training wrote this format into the run folder, and push uploads it
        assert run_file is not None and run_file.is_file()
        assert run_file in export.existing_run_files(out)[fmt]
    else:
        assert run_file is None


@pytest.mark.slow  # three processes load the tiny model
def test_the_lora_file_bytes_do_not_depend_on_the_hash_seed(tiny_model, tmp_path):
    """PEFT keeps target_modules as a set, whose order follows Python's string hashing (PYTHONHASHSEED, random per
    process): the config written into the file's header made two runs with bitwise equal weights write files
    with other bytes, and `sample --replay` refused the second. Written sorted, the bytes are the same."""
    import hashlib
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from sdtune import families\n"
        "from sdtune.lora import add_lora, save_diffusers_lora\n"
        "from sdtune.models import load_components\n"
        "c = load_components(sys.argv[1], families.get('sd15'))\n"
        "torch.manual_seed(0)\n"
        "add_lora(c.denoiser, 4, 4, ['to_k', 'to_q', 'to_v', 'to_out.0', 'proj_in', 'proj_out', 'ff.net.2'])\n"
        "save_diffusers_lora(sys.argv[2], families.get('sd15'), {'unet': c.denoiser})\n"
    )
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(tiny_model("sd15")), str(out)], check=True, env=env,
                       timeout=300, capture_output=True)
        digests.add(hashlib.sha256((out / WEIGHT_NAME).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_sort_metadata_orders_the_header_in_place(tmp_path):
    """safetensors writes metadata in a per-process hash order; sort_metadata makes the bytes a function of the
    contents (kohya files, embeddings and single files are written through it), and the file still loads."""
    from sdtune.layout import sort_metadata

    path = tmp_path / "m.safetensors"
    metadata = {f"k{i}": str(i) * i for i in (5, 3, 9, 1, 7)}
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    save_file(tensors, path, metadata=metadata)
    size = path.stat().st_size
    sort_metadata(path)
    raw = path.read_bytes()
    assert len(raw) == size and raw.index(b'"k1"') < raw.index(b'"k3"') < raw.index(b'"k5"') < raw.index(b'"k9"')
    with safe_open(path, "pt") as f:
        assert f.metadata() == metadata
    back = load_file(path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_run_in_the_current_folder_names_its_kohya_file_after_it(tiny_model, tmp_path, monkeypatch):
    """train.output_dir=. wrote `_kohya.safetensors` (the name of "." is ""), titled `_kohya` in its metadata
    and the model card: the folder's real name is used."""
    folder = tmp_path / "my-dog"
    folder.mkdir()
    monkeypatch.chdir(folder)
    train(load_config(None, overrides(tiny_model("sd15"), Path("."), "train.max_steps=1", "sample.every=0")))
    assert (folder / "my-dog_kohya.safetensors").is_file() and not (folder / "_kohya.safetensors").exists()
    assert "<lora:my-dog_kohya:1>" in (folder / "README.md").read_text()
