"""The original (LDM / SGM) single-file layout (sdtune/ldm.py): tiny random models of every family go to one
file and come back bitwise; the key names and counts are the real checkpoints'; damaged or foreign files are
refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.ldm import (
    load_original,
    load_vae,
    read_single_file,
    text_encoder_prefixes,
    to_original,
    vae_to_original,
    write_single_file,
)

FAMILIES = ("sd15", "sd2", "sdxl")
# Names the real checkpoints of the family have (v1-5-pruned-emaonly, v2-1_768-ema-pruned, sd_xl_base_1.0), or
# would have with the tiny models' fewer blocks
REAL_KEYS = {
    "sd15": ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
             "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
             "model.diffusion_model.middle_block.1.proj_in.weight",
             "model.diffusion_model.out.2.weight",
             "first_stage_model.encoder.down.0.block.0.conv1.weight",
             "first_stage_model.decoder.up.3.block.0.norm1.weight",
             "first_stage_model.encoder.mid.attn_1.q.weight",
             "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
             "cond_stage_model.transformer.text_model.embeddings.position_ids"],
    "sd2": ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
            "cond_stage_model.model.positional_embedding", "cond_stage_model.model.ln_final.weight"],
    "sdxl": ["model.diffusion_model.label_emb.0.0.weight",
             "model.diffusion_model.input_blocks.3.1.proj_in.weight",  # 2 blocks of 1 layer: real is 4.1
             "model.diffusion_model.output_blocks.1.2.conv.weight",  # the upsampler after an attention
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
             "conditioner.embedders.1.model.text_projection"],
}


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of a module."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _bitwise_differences(got: torch.nn.Module, want: torch.nn.Module) -> list[str]:
    a, b = _tensors(got), _tensors(want)
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory):
    """single_file(family) -> (components seeded 1, config folder (a random model seeded 0), their file)."""
    made = {}

    def get(name: str):
        if name not in made:
            family = families.get(name)
            torch.manual_seed(1)  # not the config folder's weights (seed 0): they must come from the file
            components = family.random_components("tiny")
            path = write_single_file(components, family, tmp_path_factory.mktemp(name) / "model.safetensors",
                                     metadata={"note": name})
            made[name] = components, tiny_model(name), path
        return made[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_bitwise(single_file, name):
    family = families.get(name)
    components, config_dir, path = single_file(name)
    checkpoint = read_single_file(path)
    assert set(checkpoint) == set(to_original(components, family))
    unet, vae, encoders = load_original(checkpoint, family, config_dir)
    assert _bitwise_differences(unet, components.denoiser) == []
    assert _bitwise_differences(vae, components.vae) == []
    assert len(encoders) == len(components.text_encoders)
    for got, want in zip(encoders, components.text_encoders, strict=True):
        assert type(got) is type(want)
        assert _bitwise_differences(got, want) == []


@pytest.mark.parametrize("name", FAMILIES)
def test_file_has_the_real_key_names(single_file, name):
    family = families.get(name)
    components, _, path = single_file(name)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata == {"format": "pt", "note": name}
    assert [k for k in REAL_KEYS[name] if k not in keys] == []
    prefixes = ["model.diffusion_model.", "first_stage_model.", *text_encoder_prefixes(family)]
    assert [k for k in keys if not k.startswith(tuple(prefixes))] == []
    # nothing left in diffusers' naming
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_norm_out")
    assert [k for k in keys if any(w in k for w in diffusers_words)] == []
    assert [k for k in keys if k.startswith("first_stage_model.") and ("to_q" in k or "group_norm" in k)] \
        == []


def test_openclip_tensors_are_fused_and_transposed(single_file):
    components, _, path = single_file("sdxl")
    checkpoint = read_single_file(path)
    te2 = components.text_encoders[1]
    layer = te2.text_model.encoder.layers[0].self_attn
    prefix = "conditioner.embedders.1.model."
    fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(checkpoint[prefix + "transformer.resblocks.0.attn.in_proj_weight"], fused)  # (96, 32)
    assert torch.equal(checkpoint[prefix + "text_projection"], te2.text_projection.weight.T)
    # SD2's encoder has no projection in diffusers, so none is written
    assert not [k for k in read_single_file(single_file("sd2")[2]) if k.endswith("text_projection")]


def test_load_to_dtype(single_file):
    family = families.get("sd15")
    components, config_dir, path = single_file("sd15")
    checkpoint = read_single_file(path)
    unet, vae, (encoder,) = load_original(checkpoint, family, config_dir, torch_dtype=torch.float16)
    pairs = ((unet, components.denoiser), (vae, components.vae), (encoder, components.text_encoders[0]))
    for got, want in pairs:
        want16 = {k: v.half() if v.is_floating_point() else v for k, v in _tensors(want).items()}
        tensors = _tensors(got)
        assert tensors.keys() == want16.keys()
        assert [k for k, v in tensors.items()
                if v.dtype != want16[k].dtype or not torch.equal(v, want16[k])] == []
        assert {v.dtype for v in got.parameters()} == {torch.float16}


def test_missing_unet_tensor_is_refused(single_file):
    family = families.get("sd15")
    _, config_dir, path = single_file("sd15")
    checkpoint = read_single_file(path)
    del checkpoint["model.diffusion_model.output_blocks.1.0.out_layers.3.bias"]
    with pytest.raises(SdtuneError, match=r"1 tensor\(s\) of the UNet are missing .*1\.0\.out_layers"):
        load_original(checkpoint, family, config_dir)


def test_file_without_vae(single_file):
    family = families.get("sd15")
    components, config_dir, path = single_file("sd15")
    checkpoint = {k: v for k, v in read_single_file(path).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(SdtuneError, match=r"tensor\(s\) of the VAE are missing"):
        load_original(checkpoint, family, config_dir)
    unet, vae, (encoder,) = load_original(checkpoint, family, config_dir, with_vae=False)
    assert vae is None
    assert _bitwise_differences(unet, components.denoiser) == []
    assert _bitwise_differences(encoder, components.text_encoders[0]) == []


def test_foreign_and_misshapen_tensors_are_refused(single_file):
    family = families.get("sd15")
    _, config_dir, path = single_file("sd15")
    checkpoint = read_single_file(path)
    checkpoint["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(SdtuneError, match=r"not part of the UNet .*input_blocks\.99"):
        load_original(checkpoint, family, config_dir)
    checkpoint = read_single_file(path)
    checkpoint["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    with pytest.raises(SdtuneError, match=r"decoder\.conv_out\.weight has shape \(3, 8, 1, 1\)"):
        load_original(checkpoint, family, config_dir)


def test_file_of_another_family_is_refused(single_file):
    # an SDXL file read as SD2: its encoders sit under conditioner.embedders, not cond_stage_model
    _, config_dir, _ = single_file("sd2")
    checkpoint = read_single_file(single_file("sdxl")[2])
    with pytest.raises(SdtuneError, match="missing"):
        load_original(checkpoint, families.get("sd2"), config_dir)


def test_real_sd2_extras_are_accepted(single_file):
    """Real SD2 files carry a 24th OpenCLIP layer and a projection that diffusers' 23-layer CLIPTextModel has
    no place for, and open_clip's logit_scale: they load, and the result is still bitwise the components."""
    family = families.get("sd2")
    components, config_dir, path = single_file("sd2")
    checkpoint = read_single_file(path)
    prefix = "cond_stage_model.model."
    n = components.text_encoders[0].config.num_hidden_layers
    extra = {k.replace("resblocks.0.", f"resblocks.{n}."): v.clone() + 1 for k, v in checkpoint.items()
             if k.startswith(prefix + "transformer.resblocks.0.")}
    checkpoint.update(extra)
    checkpoint[prefix + "text_projection"] = torch.ones(32, 32)  # (width, projection), OpenCLIP's way round
    checkpoint[prefix + "logit_scale"] = torch.ones(())
    unet, vae, (encoder,) = load_original(checkpoint, family, config_dir)
    assert _bitwise_differences(encoder, components.text_encoders[0]) == []
    # ... but not on SDXL's bigG, whose every layer diffusers keeps
    checkpoint = read_single_file(single_file("sdxl")[2])
    checkpoint["conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight"] = torch.ones(32)
    with pytest.raises(SdtuneError, match="not part of the OpenCLIP"):
        load_original(checkpoint, families.get("sdxl"), single_file("sdxl")[1])


@pytest.mark.parametrize("layout", ["original", "original-prefixed", "diffusers"])
def test_load_vae_reads_standalone_files(single_file, tmp_path, layout):
    components, config_dir, _ = single_file("sd15")
    vae = components.vae
    original = vae_to_original(vae)
    state = {"original": original, "diffusers": vae.state_dict(),
             "original-prefixed": {f"first_stage_model.{k}": v for k, v in original.items()}}[layout]
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert _bitwise_differences(load_vae(path, config_dir), vae) == []  # the pipeline folder's vae/
    assert _bitwise_differences(load_vae(str(path), config_dir / "vae"), vae) == []  # the VAE's own folder
    broken = read_single_file(path)
    broken.pop(sorted(broken)[0])
    with pytest.raises(SdtuneError, match=r"1 tensor\(s\) of the VAE are missing"):
        load_vae(broken, config_dir)


def test_write_never_replaces_a_file(single_file, tmp_path):
    components, _, _ = single_file("sd15")
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"the user's")
    with pytest.raises(SdtuneError, match="exists"):
        write_single_file(components, families.get("sd15"), path)
    assert path.read_bytes() == b"the user's"
    assert list(tmp_path.iterdir()) == [path]


# Full-size shapes on the meta device: no memory, no weights, a few seconds. Expected counts are those of the
# real files (v1-5-pruned-emaonly: 686 UNet, 248 VAE, 196 CLIP tensors + position_ids; sd_xl_base_1.0: 1680
# UNet, 197 CLIP-L, 389 bigG + logit_scale, which the transformers model has no place for), and every tensor
# must land, with its shape, on the diffusers model through diffusers' own forward conversion.
FULL = {"sd15": {"model.diffusion_model.": 686, "first_stage_model.": 248,
                 "cond_stage_model.transformer.": 197},
        "sdxl": {"model.diffusion_model.": 1680, "first_stage_model.": 248,
                 "conditioner.embedders.0.transformer.": 197, "conditioner.embedders.1.model.": 389}}
FULL_SHAPES = {"sd15": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                        "model.diffusion_model.time_embed.0.weight": (1280, 320),
                        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
                        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
               "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight":
                            (1280, 2048),
                        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight":
                            (3840, 1280),
                        "conditioner.embedders.1.model.text_projection": (1280, 1280),
                        "conditioner.embedders.1.model.positional_embedding": (77, 1280)}}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_full_size_layout_matches_the_real_files(name):
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    family = families.get(name)
    with init_empty_weights():
        components = family.random_components("full")
    original = to_original(components, family)
    assert {p: sum(k.startswith(p) for k in original) for p in FULL[name]} == FULL[name]
    assert len(original) == sum(FULL[name].values())
    assert {k: tuple(original[k].shape) for k in FULL_SHAPES[name]} == FULL_SHAPES[name]
    unet, vae = components.denoiser, components.vae
    for converted, model in ((convert_ldm_unet_checkpoint(original, unet.config), unet),
                             (convert_ldm_vae_checkpoint(original, vae.config), vae)):
        assert _shapes(converted) == _shapes(model.state_dict())
    clip = convert_ldm_clip_checkpoint({k: v for k, v in original.items() if ".transformer.text_model." in k})
    want = {k if k.startswith("text_model.") else f"text_model.{k}": tuple(v.shape)
            for k, v in components.text_encoders[0].state_dict().items()}
    assert {k: s for k, s in _shapes(clip).items() if not k.endswith("position_ids")} == want
