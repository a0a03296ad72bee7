"""lora.type loha / lokr on the flow-matching families (FLUX.1, SD3): trained, resumed bitwise, and written in
SimpleTuner's LyCORIS layout (``lycoris_<diffusers module path>``), which ComfyUI and Forge map onto the original
model's fused weights (comfy/lora.py model_lora_keys_unet, Flux and SD3 branches, re-implemented below); the
exported file samples the pixels of the run's own file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune import families
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.export import LYCORIS_FACTORS
from sdtune.models import load_components
from sdtune.train import train


def _comfy_lycoris_keys(transformer: torch.nn.Module) -> dict[str, str]:
    """ComfyUI's rule for these files: for each diffusers weight ``k`` of the transformer (its flux_to_diffusers /
    mmdit_to_diffusers tables list the diffusers names), ``"lycoris_" + k[:-len(".weight")].replace(".", "_")``."""
    return {"lycoris_" + name.replace(".", "_"): name for name, layer in transformer.named_modules()
            if isinstance(layer, torch.nn.Linear)}


def _render(target: Path, model: Path, out: Path, scale: str) -> np.ndarray:
    assert main(["sample", str(target), "--model", str(model), "--prompt", "a photo of sks toy", "--seeds", "0",
                 "--steps", "2", "--lora-scale", scale, "--out", str(out)]) == 0
    cells = sorted(out.parent.glob(f"{out.stem}_cells/*.png"))
    assert len(cells) == 1
    return np.asarray(Image.open(cells[0]).convert("RGB")).astype(float)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_flow_lycoris_trains_exports_comfy_names_and_samples_the_same_pixels(family, kind, tiny_model, tmp_path):
    model = tiny_model(family)
    run = tmp_path / "run"
    train(load_config(None, overrides(model, run, f"lora.type={kind}", "lora.alpha=2", "train.learning_rate=5e-2",
                                      "lora.train_text_encoder=true", "sample.every=0")))
    losses = [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    kohya = run / "run_kohya.safetensors"
    with safe_open(kohya, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    transformer = load_components(str(model), families.get(family)).denoiser
    comfy = _comfy_lycoris_keys(transformer)
    denoiser_names = {k.split(".")[0] for k in keys if k.startswith("lycoris_")}
    assert denoiser_names and denoiser_names <= set(comfy)  # every module found by ComfyUI's rule
    assert any("_attn_to_q" in n for n in denoiser_names)
    assert {k.split(".")[0] for k in keys} - denoiser_names  # the CLIP LoRA, in kohya's lora_te names
    assert all(k.startswith(("lycoris_", "lora_te")) for k in keys)
    assert {k.split(".", 1)[1] for k in keys} <= {*LYCORIS_FACTORS[kind], "alpha"}
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind

    base = _render(run, model, tmp_path / "base.png", "0")
    ours = _render(run, model, tmp_path / "run.png", "1")
    exported = _render(kohya, model, tmp_path / "kohya.png", "1")
    assert np.abs(ours - base).max() > 2, "the adapter must change the image, or equality proves nothing"
    assert np.array_equal(ours, exported)


@pytest.mark.parametrize(("family", "kind"), [("flux", "loha"), ("sd3", "lokr")])
def test_flow_lycoris_without_text_encoder_samples_its_kohya_file(family, kind, tiny_model, tmp_path):
    """No CLIP adapter: the kohya file holds lycoris_ keys alone, no lora_te* (sample took it for a diffusers
    file: "unexpected key lycoris_transformer_blocks_0_..."); it renders the run's own pixels."""
    model = tiny_model(family)
    run = tmp_path / "run"
    train(load_config(None, overrides(model, run, f"lora.type={kind}", "lora.alpha=2",
                                      "train.learning_rate=5e-2", "sample.every=0")))
    kohya = run / "run_kohya.safetensors"
    with safe_open(kohya, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lycoris_") for k in keys)
    base = _render(run, model, tmp_path / "base.png", "0")
    ours = _render(run, model, tmp_path / "run.png", "1")
    exported = _render(kohya, model, tmp_path / "kohya.png", "1")
    assert np.abs(ours - base).max() > 2, "the adapter must change the image, or equality proves nothing"
    assert np.array_equal(ours, exported)


@pytest.mark.slow
def test_flux_loha_resumes_bitwise(tiny_model, tmp_path):
    straight, split = interrupted_and_resumed(tiny_model("flux"), tmp_path, 4, 2, "lora.type=loha",
                                              "train.learning_rate=1e-3", "sample.every=0", "data.random_flip=true")
    assert_resumed_bitwise(straight, split, 4, "transformer")
