"""Files that travel: every weight file sdtune writes has the canonical key layout (what the hub's SD models
use, and what transformers 4.x, every diffusers version and ComfyUI read), names no local path, and the kohya
file carries the metadata AUTOMATIC1111 shows (kohya-ss sd-scripts' formats, re-implemented below as facts).

The transformers 4.x layout of a CLIP text encoder is spelled out here (``transformers4_clip_keys``) rather
than derived with sdtune's own rule, so a test fails if the rule and the real layout ever part.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import families
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.export import (
    DATA_SUMMARY,
    export_run,
    public_name,
    read_run,
    tag_frequency,
)
from sdtune.layout import canonical_text_encoder_folder
from sdtune.lora import WEIGHT_NAME
from sdtune.micro import model as micro
from sdtune.models import write_random_model
from sdtune.runs import CARD, safetensors_header
from sdtune.share import files_to_push
from sdtune.train import train

BASE_NAME = "my-base-sd15"  # the local base model's folder name: all of its path an artifact may hold
PRIVATE = ("private-models", "secret-photos")  # folders above the model and the photos: never in an artifact
CLASS_PROMPT = "a photo of a toy"
REPEATS = 2
# commas split tags; case and spaces are normalised, empty tags dropped (kohya's set_tag_frequency)
CAPTIONS = [
    "sks toy, Red Background, studio light",
    "sks toy,grass , ",
    "sks toy, red background",
    "sks toy",
    "SKS toy, grass, studio light",
    "sks toy, red background,, blurry",
    "sks toy, grass",
    "sks toy, studio light",
]
LORA_TE_KEY = re.compile(
    r"text_encoder\.text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.lora_(A|B)\.weight")


def transformers4_clip_keys(layers: int, projection: bool = False) -> set[str]:
    """The state-dict keys of a transformers 4.x CLIPTextModel (CLIPTextModelWithProjection with
    ``projection``): everything under ``text_model.``, as in every SD checkpoint on the hub."""
    keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{layer}.{part}.weight", f"{layer}.{part}.bias"}
    return keys | ({"text_projection.weight"} if projection else set())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _check_text_encoder_folder(folder: Path, model_class: str) -> None:
    """(a) canonical keys, the transformers 4.x set exactly; loads with no missing or unexpected key and
    bitwise-equal tensors on the installed transformers."""
    import transformers

    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    saved = _tensors(files[0])
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    projection = model_class == "CLIPTextModelWithProjection"
    assert set(saved) == transformers4_clip_keys(layers, projection)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in saved)
    model, info = getattr(transformers, model_class).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    wrapped = hasattr(model, "text_model")  # transformers >= 5 flattened CLIPTextModel only
    # the dtype the config names (the micro model's fp16 file says float32: it loads beside an fp32 UNet), else
    # the file's; fp16 -> fp32 is exact, so the values still compare bitwise
    config = json.loads((folder / "config.json").read_text())
    named = config.get("dtype") or config.get("torch_dtype")
    for key, tensor in saved.items():
        name = key if wrapped or not key.startswith("text_model.") else key.removeprefix("text_model.")
        expected = getattr(torch, named) if named else tensor.dtype
        assert state[name].dtype == expected and torch.equal(state[name], tensor.to(expected)), key


# --------------------------------------------------------------------------------------------------------
# (a) Text-encoder weight files: random models, micro models


@pytest.mark.parametrize("family", families.names())
def test_random_model_text_encoders_have_the_canonical_layout(family, tiny_model):
    model = tiny_model(family)
    for spec in families.get(family).text_encoders:
        if spec.model_class.startswith("CLIP"):  # the canonical layout is CLIP's (FLUX's and SD3's T5 have theirs)
            _check_text_encoder_folder(model / spec.name, spec.model_class)
        assert _metadata(next((model / spec.name).glob("*.safetensors"))).get("format") == "pt"


@pytest.mark.slow  # builds and saves a micro model (~10 s on two cores)
def test_micro_model_files_have_the_canonical_layout(tmp_path):
    shipped = micro.shipped_dir() / "text_encoder"
    _check_text_encoder_folder(shipped, "CLIPTextModel")
    assert _metadata(shipped / "model.safetensors") == {"format": "pt"}  # the metadata it was shipped with
    written = micro.write_model(tmp_path / "written")
    _check_text_encoder_folder(written / "text_encoder", "CLIPTextModel")
    te_file = "model.safetensors"
    assert (written / "text_encoder" / te_file).read_bytes() == (shipped / te_file).read_bytes()
    tokenizer, text_encoder, vae, unet = micro.build(seed=1, unet_width=16)
    saved = micro.save_pipeline(tmp_path / "saved", tokenizer, text_encoder, vae, unet)
    _check_text_encoder_folder(saved / "text_encoder", "CLIPTextModel")


def test_canonical_rewrite_keeps_tensors_and_metadata_bitwise(tmp_path):
    """A flat (transformers 5) file: only the names change; data bytes and metadata stay; a second pass is a
    no-op; mixed layouts are refused; other model classes are left alone; a shard index follows."""
    flat = {"embeddings.token_embedding.weight": torch.randn(10, 4),
            "encoder.layers.0.mlp.fc1.bias": torch.randn(8), "final_layer_norm.weight": torch.randn(4)}
    folder = tmp_path / "te"
    folder.mkdir()
    save_file(flat, str(folder / "model.safetensors"), metadata={"format": "pt", "note": "kept"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": dict.fromkeys(flat, "model.safetensors")}))

    def data(path: Path) -> bytes:
        raw = path.read_bytes()
        return raw[8 + struct.unpack("<Q", raw[:8])[0]:]

    before = data(folder / "model.safetensors")
    assert len(canonical_text_encoder_folder(folder, "CLIPTextModel")) == 2
    assert data(folder / "model.safetensors") == before
    after = _tensors(folder / "model.safetensors")
    assert set(after) == {f"text_model.{k}" for k in flat}
    assert all(torch.equal(after[f"text_model.{k}"], v) for k, v in flat.items())
    assert _metadata(folder / "model.safetensors") == {"format": "pt", "note": "kept"}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after) and index["metadata"] == {"total_size": 1}
    raw = (folder / "model.safetensors").read_bytes()
    assert canonical_text_encoder_folder(folder, "CLIPTextModel") == []  # already canonical: untouched
    assert (folder / "model.safetensors").read_bytes() == raw

    other = tmp_path / "t5"
    other.mkdir()
    save_file(flat, str(other / "model.safetensors"))
    assert canonical_text_encoder_folder(other, "T5EncoderModel") == []
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"final_layer_norm.weight": torch.ones(2), "text_model.final_layer_norm.weight": torch.ones(2)},
              str(mixed / "model.safetensors"))
    with pytest.raises(SdtuneError, match="both layouts"):
        canonical_text_encoder_folder(mixed, "CLIPTextModel")


def test_public_names():
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert public_name(hub_id) == hub_id
    assert public_name("../models/sd15") == "sd15"
    assert public_name("/home/someone/models/sd15/") == "sd15"
    assert public_name("~/checkpoints/dreamshaper_8.safetensors") == "dreamshaper_8.safetensors"
    assert public_name("C:\\Users\\someone\\models\\v1-5.safetensors") == "v1-5.safetensors"
    assert public_name(None) is None and public_name("") is None


def test_tag_frequency_counts_as_kohya():
    assert tag_frequency(CAPTIONS) == {"sks toy": 8, "red background": 3, "studio light": 3, "grass": 3,
                                       "blurry": 1}


# --------------------------------------------------------------------------------------------------------
# A trained run: a local base model and photos in private folders, captions with tags, buckets, repeats,
# prior preservation, a trained text encoder and a checkpoint


@pytest.fixture(scope="module")
def travel(tmp_path_factory, bucketed_toy):
    root = tmp_path_factory.mktemp("travel")
    model = write_random_model(root / "private-models" / BASE_NAME, "sd15", "tiny")
    photos = root / "secret-photos" / "toy-set"
    photos.mkdir(parents=True)
    images = sorted(p for p in bucketed_toy.iterdir() if p.suffix == ".png")
    assert len(images) == len(CAPTIONS)
    lines = []
    for image, caption in zip(images, CAPTIONS, strict=True):
        shutil.copy(image, photos / image.name)
        lines.append(json.dumps({"file_name": image.name, "text": caption}))
    (photos / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "runs" / "travel-run"
    started = time.time()
    with pytest.MonkeyPatch.context() as mp:  # a module fixture: the autouse cache isolation is not on yet
        mp.setenv("SDTUNE_CACHE", str(root / "cache"))
        _train(model, photos, out)
    return {"root": root, "model": model, "photos": photos, "run": out, "started": started,
            "ended": time.time()}


def _train(model: Path, photos: Path, out: Path) -> None:
    train(load_config(None, [
        f"model.pretrained={model}", f"data.instance_dir={photos}", "data.identifier=sks",
        "data.resolution=64",
        "data.aspect_buckets=true", f"data.repeats={REPEATS}", f"train.output_dir={out}", "train.max_steps=2",
        "train.batch_size=1", "train.report_to=none", "train.checkpoint_every=2", "train.log_every=1",
        "train.learning_rate=1e-2", "sample.steps=2", "sample.seeds=[0]", "lora.train_text_encoder=true",
        "prior.enabled=true", f"prior.class_prompt={CLASS_PROMPT}", "prior.num_class_images=2",
    ]))


def _te_keys(path: Path) -> list[str]:
    return [k for k in _tensors(path) if k.startswith("text_encoder.")]


@pytest.mark.slow  # trains a tiny run
def test_run_lora_text_encoder_keys_are_canonical_and_load_into_every_module(travel, tmp_path):
    """(b) The run's LoRA (and the checkpoint's and `export --format diffusers`'s copies): canonical
    text-encoder keys, and load_lora_weights fills every text-encoder LoRA module with the saved tensors."""
    from diffusers import StableDiffusionPipeline

    run = travel["run"]
    files = [run / WEIGHT_NAME, run / "checkpoints" / "step-000002" / WEIGHT_NAME]
    files.append(export_run(run, "diffusers", tmp_path / "exported.safetensors")[0])
    for path in files:
        keys = _te_keys(path)
        assert keys and all(LORA_TE_KEY.fullmatch(k) for k in keys), (path, keys[:3])
        assert any(".lora_B." in k and _tensors(path)[k].abs().max() > 0 for k in keys), "B trained"

    for path in files:
        pipe = StableDiffusionPipeline.from_pretrained(travel["model"], safety_checker=None)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sks")
        saved = _tensors(path)
        filled = set()
        for name, module in pipe.text_encoder.named_modules():
            if hasattr(module, "lora_A") and "sks" in module.lora_A:
                stem = "text_encoder." + ("" if name.startswith("text_model.") else "text_model.") + name
                for ab in ("A", "B"):
                    weight = getattr(module, f"lora_{ab}")["sks"].weight.detach()
                    assert torch.equal(weight, saved[f"{stem}.lora_{ab}.weight"]), (path, name)
                    filled.add(f"{stem}.lora_{ab}.weight")
        assert filled == set(_te_keys(path)), path  # every saved text-encoder tensor is in a module
        unet_modules = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "sks" in m.lora_A}
        assert {f"unet.{n}.lora_A.weight" for n in unet_modules} == {k for k in saved if k.startswith("unet.")
                                                                    and k.endswith(".lora_A.weight")}


@pytest.mark.slow  # trains a tiny run
def test_no_artifact_names_a_local_path(travel, tmp_path):
    run = travel["run"]
    kohya = next(run.glob("*_kohya.safetensors"))
    peft = export_run(run, "peft", tmp_path / "peft")[0]
    diffusers_file = export_run(run, "diffusers", tmp_path / "d.safetensors")[0]
    texts = {CARD: (run / CARD).read_text()}
    for path in (run / WEIGHT_NAME, run / "checkpoints" / "step-000002" / WEIGHT_NAME, kohya, diffusers_file,
                 *peft.rglob("*.safetensors")):
        texts[str(path)] = json.dumps(_metadata(path))
    for path in peft.rglob("adapter_config.json"):
        texts[str(path)] = path.read_text()
    for where, text in texts.items():
        for private in (*PRIVATE, str(travel["root"]), str(Path.home()) + "/"):
            assert private not in text, (where, private)

    # the base model by its folder name: in every adapter config, the kohya metadata and the card's text
    for path in (run / WEIGHT_NAME, run / "checkpoints" / "step-000002" / WEIGHT_NAME, diffusers_file):
        configs = json.loads(_metadata(path)["lora_adapter_metadata"])
        names = {k: v for k, v in configs.items() if k.endswith("base_model_name_or_path")}
        assert names == {f"{c}.base_model_name_or_path": BASE_NAME for c in ("unet", "text_encoder")}, path
    for path in peft.rglob("adapter_config.json"):
        assert json.loads(path.read_text())["base_model_name_or_path"] == BASE_NAME
    assert _metadata(kohya)["ss_sd_model_name"] == BASE_NAME
    card = (run / CARD).read_text()
    assert f"a local base model (`{BASE_NAME}`)" in card
    assert "base_model:" not in card.split("---")[1]  # the hub accepts only hub ids there
    # what push uploads: the card, the LoRA files, a grid; not config.yaml, data_summary.json, checkpoints
    pushed = {p.name for p in files_to_push(run)}
    assert pushed >= {CARD, WEIGHT_NAME, kohya.name} and not pushed & {"config.yaml", DATA_SUMMARY}


def a1111_metadata(path: Path) -> dict:
    """modules/sd_models.read_metadata_from_safetensors: values that start with '{' are parsed as JSON."""
    out = {}
    for k, v in safetensors_header(path)["__metadata__"].items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def a1111_training_tags(metadata: dict) -> dict[str, int]:
    """extensions-builtin/Lora/ui_edit_user_metadata.py build_tags (comma tag sets)."""
    tags: dict[str, int] = {}
    for _, tags_dict in metadata.get("ss_tag_frequency", {}).items():
        for tag, count in tags_dict.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    return tags


def kohya_hashes(path: Path) -> tuple[str, str]:
    """kohya library/train_util.py precalculate_safetensors_hashes, applied to the file's tensors and its
    ``ss_*`` metadata: (addnet_hash_safetensors, addnet_hash_legacy)."""
    from io import BytesIO

    import safetensors.torch

    metadata = {k: v for k, v in _metadata(path).items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(_tensors(path), metadata))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    return model_hash, hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]


@pytest.mark.slow  # trains a tiny run
def test_kohya_metadata_automatic1111_reads(travel):
    run = travel["run"]
    kohya = next(run.glob("*_kohya.safetensors"))
    meta = _metadata(kohya)
    parsed = a1111_metadata(kohya)
    class_dir = read_run(run).data["reg_dataset_dirs"]
    (class_name,) = class_dir

    assert meta["ss_output_name"] == kohya.stem == meta["modelspec.title"]
    assert meta["ss_sd_model_name"] == BASE_NAME and meta["ss_clip_skip"] == "1"
    assert travel["started"] <= float(meta["ss_training_started_at"]) <= travel["ended"]
    assert parsed["ss_tag_frequency"] == {"toy-set": tag_frequency(CAPTIONS),
                                          class_name: {CLASS_PROMPT: 2}}
    assert a1111_training_tags(parsed)["sks toy"] == 8 and a1111_training_tags(parsed)[CLASS_PROMPT] == 2
    assert parsed["ss_dataset_dirs"] == {"toy-set": {"n_repeats": REPEATS, "img_count": len(CAPTIONS)}}
    assert parsed["ss_reg_dataset_dirs"] == {class_name: {"n_repeats": 1, "img_count": 2}}
    buckets = parsed["ss_bucket_info"]["buckets"]
    assert sum(b["count"] for b in buckets.values()) == len(CAPTIONS) * REPEATS
    shapes = {tuple(b["resolution"]) for b in buckets.values()}
    assert shapes == {(48, 80), (64, 64), (80, 48)}  # the buckets training logged for these photos
    assert 0 <= parsed["ss_bucket_info"]["mean_img_ar_error"] < 0.5

    # how it was trained, as kohya records it (civitai and the UIs show these)
    config = read_run(run).config
    assert meta["ss_learning_rate"] == str(config["train"]["learning_rate"])
    assert meta["ss_max_train_steps"] == str(config["train"]["max_steps"]) and meta["ss_optimizer"] == "adamw"
    assert meta["ss_loss_type"] == "l2" and "ss_huber_c" not in meta and meta["ss_caption_dropout_rate"] == "0.0"

    model_hash, legacy_hash = kohya_hashes(kohya)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (model_hash, legacy_hash)
    raw = kohya.read_bytes()  # A1111's own hash of the file (hashes.addnet_hash_safetensors) agrees
    assert hashlib.sha256(raw[8 + struct.unpack("<Q", raw[:8])[0]:]).hexdigest() == model_hash
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.slow  # trains a tiny run
def test_export_of_a_checkpoint_an_old_run_and_the_recipe_clip_skip(travel, tmp_path, caplog):
    run = travel["run"]
    full = _metadata(next(run.glob("*_kohya.safetensors")))
    path, warnings = export_run(run / "checkpoints" / "step-000002", "kohya", tmp_path / "ckpt.safetensors")
    meta = _metadata(path)
    assert meta["ss_tag_frequency"] == full["ss_tag_frequency"] and meta["ss_output_name"] == "ckpt"
    assert not any("training tags" in w for w in warnings)

    # a run from an older sdtune: no data summary, flat text-encoder keys; it exports and says what is missing
    old = tmp_path / "old-run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "*.lock*"))
    (old / DATA_SUMMARY).unlink()
    tensors, lora_meta = _tensors(old / WEIGHT_NAME), _metadata(old / WEIGHT_NAME)
    flat = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()}
    save_file(flat, str(old / WEIGHT_NAME), metadata=lora_meta)
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["model"]["clip_skip"] = 2
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    path, warnings = export_run(old, "kohya", tmp_path / "old.safetensors")
    meta = _metadata(path)
    assert any(DATA_SUMMARY in w and "ss_tag_frequency" in w for w in warnings)
    assert not {"ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_training_started_at"} & set(meta)
    assert meta["ss_clip_skip"] == "2" and meta["ss_output_name"] == "old" and meta["sshs_model_hash"]
    assert _tensors(path).keys() == _tensors(tmp_path / "ckpt.safetensors").keys()  # the same kohya names
    exported = export_run(old, "diffusers", tmp_path / "old-diffusers.safetensors")[0]
    keys = _te_keys(exported)
    assert keys and all(LORA_TE_KEY.fullmatch(k) for k in keys)  # made canonical on the way out


@pytest.mark.slow  # trains a tiny run
def test_peft_export_has_the_canonical_layout_and_loads(travel, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import CLIPTextModel

    run = travel["run"]
    folder = export_run(run, "peft", tmp_path / "peft")[0]
    saved = _tensors(folder / "text_encoder" / "adapter_model.safetensors")
    peft_key = r"base_model\.model\.text_model\.encoder\.layers\.\d+\..+\.lora_[AB]\.weight"
    assert saved and all(re.fullmatch(peft_key, k) for k in saved)
    # transformers' load_adapter reads it on transformers 4 (text_model) and 5 (flattened) alike
    encoder = CLIPTextModel.from_pretrained(travel["model"], subfolder="text_encoder")
    encoder.load_adapter(str(folder / "text_encoder"))
    loaded = get_peft_model_state_dict(encoder)
    assert len(loaded) == len(saved)
    for key, tensor in loaded.items():
        canonical = key if key.startswith("text_model.") else f"text_model.{key}"
        assert torch.equal(tensor, saved[f"base_model.model.{canonical}"]), key
    unet = UNet2DConditionModel.from_pretrained(travel["model"], subfolder="unet")
    model = PeftModel.from_pretrained(unet, str(folder / "unet"))
    unet_saved = _tensors(folder / "unet" / "adapter_model.safetensors")
    loaded = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    assert {f"base_model.model.{k}" for k in loaded} == set(unet_saved)
    assert all(torch.equal(v, unet_saved[f"base_model.model.{k}"]) for k, v in loaded.items())


def test_adapters_load_from_either_layout(tiny_model):
    """Checkpoints hold canonical keys now; ones written under transformers 5 before held flat keys. Both load
    into the installed text encoder, and what comes back out is canonical."""
    from sdtune.lora import adapter_state_dict, add_lora, load_adapter_state_dict
    from sdtune.models import load_components

    c = load_components(str(tiny_model("sd15")), families.get("sd15"))
    encoder = c.text_encoders[0]
    add_lora(encoder, 4, 4, ["q_proj", "v_proj"])
    state = adapter_state_dict(encoder)
    assert state and all(k.startswith("text_model.encoder.layers.") for k in state)
    flat = {k.removeprefix("text_model."): torch.full_like(v, 0.5) for k, v in state.items()}
    load_adapter_state_dict(encoder, flat)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in adapter_state_dict(encoder).values())
    load_adapter_state_dict(encoder, {k: torch.full_like(v, 0.25) for k, v in state.items()})
    assert all(torch.equal(v, torch.full_like(v, 0.25)) for v in adapter_state_dict(encoder).values())
    with pytest.raises(SdtuneError, match="does not match the LoRA layout"):
        load_adapter_state_dict(encoder, {"text_model.encoder.layers.9.self_attn.q_proj.lora_A.weight":
                                          torch.ones(4, 32)})


@pytest.mark.slow  # trains three tiny runs
def test_resume_with_a_trained_text_encoder_is_exact(tiny_model, tmp_path):
    from conftest import overrides

    common = ["lora.train_text_encoder=true", "train.learning_rate=1e-2", "train.max_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, overrides(tiny_model("sd15"), straight, *common)))
    train(load_config(None, overrides(tiny_model("sd15"), split, *common, "train.checkpoint_every=2")))
    shutil.rmtree(split / "checkpoints" / "step-000004")
    (split / WEIGHT_NAME).unlink()
    train(load_config(None, overrides(tiny_model("sd15"), split, *common, "train.checkpoint_every=2",
                                      "train.resume=latest")))
    a, b = _tensors(straight / WEIGHT_NAME), _tensors(split / WEIGHT_NAME)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.text_model.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
