"""model.quantize: the frozen denoiser stored in NF4 (bitsandbytes) or fp8 (diffusers' layerwise casting) under
an fp32 LoRA: the bytes it takes, that it still computes the model, that the LoRA starts where an unquantized
run's starts, and a run that trains, resumes bitwise and exports."""

import copy
import json

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from conftest import assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.lora import adapter_state_dict, add_lora
from sdtune.memory import estimate
from sdtune.plan import check_run
from sdtune.quantize import FP8, frozen_size, nf4_bytes, planned_bytes, problems, quantize

CPU = torch.device("cpu")


def _denoiser(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return families.get(family).random_components("tiny").denoiser.requires_grad_(False).to(dtype)


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    with init_empty_weights():
        return type(model).from_config(model.config)


def _forward(family: str, model: torch.nn.Module) -> torch.Tensor:
    """The denoiser on fixed random inputs of its tiny shapes."""
    g = torch.Generator().manual_seed(1)
    c = model.config
    if family == "flux":
        return model(hidden_states=torch.randn(2, 16, c.in_channels, generator=g),
                     encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([0.3, 0.7]), img_ids=torch.rand(16, 3, generator=g),
                     txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0, 1.0])).sample
    if family == "sd3":
        return model(hidden_states=torch.randn(2, c.in_channels, 8, 8, generator=g),
                     encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([300.0, 700.0])).sample
    return model(torch.randn(2, c.in_channels, 8, 8, generator=g), torch.tensor([300, 700]),
                 encoder_hidden_states=torch.randn(2, 4, c.cross_attention_dim, generator=g)).sample


@pytest.mark.parametrize("family", ["flux", "sd3", "sd15"])
@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_quantized_denoiser_takes_the_planned_bytes_and_still_computes_the_model(family, mode):
    reference = _denoiser(family)
    expected = _forward(family, reference)
    model = copy.deepcopy(reference)
    done = quantize(model, mode, torch.float32, CPU)

    assert done.layers > 0 and done.bytes_after < done.bytes_before
    # what the meta-device plan says (bench/quantized_weights.py's figures) is what the real layers take
    assert frozen_size(model)[1] == done.bytes_after == planned_bytes(_skeleton(reference), mode, torch.float32)
    assert frozen_size(model)[0] == frozen_size(reference)[0]  # an NF4 weight counts as its original values
    if mode == "nf4":
        import bitsandbytes as bnb

        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == done.layers
    else:
        assert sum(p.dtype == FP8 for p in model.parameters()) >= done.layers
        assert all(p.dtype != FP8 for n, p in model.named_parameters() if "norm" in n)  # diffusers' skip list
    out = _forward(family, model)
    # the same model, a few percent off: quantization error, not another function
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    assert cos > 0.9, cos
    assert not torch.equal(out, expected)


def _saved_copies(model: torch.nn.Module, checkpointing: bool) -> int:
    """Bytes the forward pass saves for the backward pass that are not the model's own parameters."""
    if checkpointing:
        model.enable_gradient_checkpointing()
        model.train()
    params, total = {p.untyped_storage().data_ptr() for p in model.parameters()}, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += 0 if t.untyped_storage().data_ptr() in params else t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _forward("flux", model)
    out.pow(2).mean().backward()
    return total


def test_fp8_saves_memory_in_training_only_with_gradient_checkpointing(tiny_model, tmp_path):
    # layerwise casting upcasts each layer's weights for its forward pass; autograd keeps those copies for the
    # backward pass: all layers' at once, unless checkpointing recomputes the forward block by block
    runs = {}
    for mode in ("none", "fp8"):
        for checkpointing in (False, True):
            model = _denoiser("flux")
            if mode == "fp8":
                quantize(model, mode, torch.float32, CPU)
                upcast = sum(p.numel() * 4 for p in model.parameters() if p.dtype == FP8)
            add_lora(model, 4, None, ["to_q", "to_k", "to_v"])
            for p in model.parameters():
                p.data = p.data.float() if p.requires_grad else p.data
            runs[mode, checkpointing] = _saved_copies(model, checkpointing)
    # (the layers before the first LoRA, the embedders, take inputs that need no gradient: they save nothing)
    assert runs["fp8", False] - runs["none", False] >= 0.4 * upcast
    assert runs["fp8", True] <= runs["none", True]
    base = overrides(tiny_model("flux"), tmp_path / "run", "model.quantize=fp8")
    assert any("train.gradient_checkpointing" in w for w in check_run(load_config(None, base)).warnings)
    assert not any("model.quantize" in w for w in check_run(load_config(
        None, [*base, "train.gradient_checkpointing=true"])).warnings)


@pytest.mark.parametrize("shape", [(64, 32), (3072, 3072), (100, 70)])
def test_nf4_bytes_is_what_bitsandbytes_stores(shape):
    layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).requires_grad_(False)
    quantize(layer, "nf4", torch.float32, CPU)
    assert frozen_size(layer) == (shape[0] * shape[1], nf4_bytes(shape[0] * shape[1]))
    assert nf4_bytes(shape[0] * shape[1]) < shape[0] * shape[1] * 0.53 + 1100


@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_lora_starts_where_an_unquantized_run_starts(mode):
    # PEFT gives each LoRA layer its base layer's dtype: fp8 would round the initial values to 3 mantissa bits
    plain, quantized = _denoiser("flux"), _denoiser("flux")
    quantize(quantized, mode, torch.float32, CPU)
    for model in (plain, quantized):
        torch.manual_seed(3)
        add_lora(model, 4, None, ["to_q", "to_k", "to_v"])
    a, b = adapter_state_dict(plain), adapter_state_dict(quantized)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 for n, p in quantized.named_parameters() if "lora_" in n)


def test_quantize_refuses_what_peft_cannot_put_on_a_quantized_layer(tiny_model, tmp_path):
    assert problems("none", "loha", True) == []
    assert any(p.startswith("lora.use_dora:") for p in problems("nf4", "lora", True))
    assert any(p.startswith("lora.type:") for p in problems("fp8", "lokr", False))
    base = overrides(tiny_model("sd15"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"lora\.use_dora: DoRA reads the base weights"):
        check_run(load_config(None, [*base, "model.quantize=nf4", "lora.use_dora=true"]))
    with pytest.raises(ConfigError, match=r"model\.quantize"):
        load_config(None, [*base, "model.quantize=int4"])
    check_run(load_config(None, [*base, "model.quantize=fp8"]))


def test_memory_estimate_counts_the_stored_bytes():
    kw = dict(unet_params=12_000_000_000, frozen_on_gpu_params=0, fp32_on_gpu_params=0, trainable_params=10**7,
              weight_bytes=2, images_per_micro_batch=1, resolution=1024, gradient_checkpointing=True,
              optimizer="adamw", latents_cached=True)
    plain, nf4 = estimate(**kw), estimate(**kw, unet_bytes=nf4_bytes(12_000_000_000))
    assert plain.weights_gib == pytest.approx(24e9 / 2**30)
    assert nf4.weights_gib == pytest.approx(nf4_bytes(12_000_000_000) / 2**30)
    assert nf4.activations_gib == plain.activations_gib  # the same model computes: activations unchanged


@pytest.mark.slow
def test_nf4_flux_trains_resumes_bitwise_and_exports(tiny_model, tmp_path, caplog):
    common = ["model.quantize=nf4", "train.learning_rate=1e-3", "sample.every=0"]
    straight, split = interrupted_and_resumed(tiny_model("flux"), tmp_path, 4, 2, *common)
    assert_resumed_bitwise(straight, split, 4, "transformer")
    losses = [json.loads(line)["loss"] for line in (straight / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    # the LoRA is a plain LoRA of the unquantized model's modules: a file any FLUX loader reads
    from sdtune.train import train

    train(load_config(None, overrides(tiny_model("flux"), tmp_path / "plain", "sample.every=0")))
    assert load_file(straight / "pytorch_lora_weights.safetensors").keys() == \
        load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors").keys()
    assert (straight / "straight_kohya.safetensors").is_file()
    assert "model.quantize=nf4: 30 layers of the transformer stored in 4-bit NF4" in caplog.text
    assert "base model stored in nf4" in (straight / "README.md").read_text()


@pytest.mark.slow
def test_fp8_unet_trains_and_the_loss_falls(tiny_model, tmp_path):
    from sdtune.train import train

    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "model.quantize=fp8", "train.max_steps=30",
                                      "train.learning_rate=1e-2", "sample.every=0", "data.random_flip=false")))
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-10:]) < sum(losses[:10])
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())


@pytest.mark.slow
def test_sample_quantize_renders_records_and_replays_it(tiny_model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sdtune.cli import main
    from sdtune.train import train

    run = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("flux"), run, "sample.every=0", "train.max_steps=2")))
    grid = tmp_path / "g.png"
    assert main(["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", "0,1", "--steps", "2",
                 "--quantize", "nf4", "--out", str(grid)]) == 0
    cells = tmp_path / "g_cells"
    sidecar = json.loads((cells / "cell-0003.json").read_text())
    assert sidecar["model_options"]["quantize"] == "nf4"
    assert "--quantize nf4: 30 layers of the transformer" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main(["sample", "--replay", str(cells / "cell-0003.json"), "--out", str(again)]) == 0
    image = np.asarray(Image.open(cells / "cell-0003.png"))
    assert np.array_equal(np.asarray(Image.open(again)), image) and image.std() > 5
    # unquantized: the same LoRA, other pixels (the base model's weights differ by the quantization error)
    plain = tmp_path / "plain.png"
    assert main(["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", "0,1", "--steps", "2",
                 "--out", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain_cells" / "cell-0003.png")), image)
    # the run's PEFT export on the quantized model: the same pixels (its width check read the packed 4-bit
    # weights' (n, 1) shape and refused it as "made for a model of other layer widths")
    peft = tmp_path / "peft"
    assert main(["export", str(run), "--format", "peft", "-o", str(peft)]) == 0
    assert main(["sample", str(peft), "--model", str(tiny_model("flux")), "--prompt", "a photo of sks toy",
                 "--seeds", "0,1", "--steps", "2", "--quantize", "nf4", "--out", str(tmp_path / "p.png")]) == 0, \
        capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p_cells" / "cell-0003.png")), image)

    loha = tmp_path / "loha"
    train(load_config(None, overrides(tiny_model("sd15"), loha, "sample.every=0", "train.max_steps=2",
                                      "lora.type=loha")))
    capsys.readouterr()
    assert main(["sample", str(loha), "--prompt", "a photo of sks toy", "--seeds", "0", "--steps", "2",
                 "--quantize", "fp8", "--out", str(tmp_path / "l.png")]) != 0
    err = capsys.readouterr().err
    assert "--quantize: " in err and "is a loha file" in err and "Traceback" not in err


@pytest.mark.slow
def test_quantized_text_encoders_train_under_a_lora_and_cache_apart(tiny_model, tmp_path, monkeypatch, caplog):
    import bitsandbytes as bnb

    from sdtune.plan import class_images_dir
    from sdtune.train import make_accelerator, setup, train

    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("flux")
    common = ["sample.every=0", "prior.class_prompt=a photo of a toy"]
    plain = load_config(None, overrides(model, tmp_path / "plain", *common))
    quantized = load_config(None, overrides(model, tmp_path / "q", "model.quantize_text_encoders=nf4",
                                            "lora.train_text_encoder=true", *common))
    run = setup(quantized, check_run(quantized), make_accelerator(quantized))
    clip, t5 = run.components.text_encoders
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in t5.modules())
    assert not any(type(m) is torch.nn.Linear for n, m in t5.named_modules() if not n.endswith(".wo"))
    # CLIP, trained: PEFT's LoRA for 4-bit layers on top (QLoRA), fp32
    lora = [m for m in clip.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora)
    assert "model.quantize_text_encoders=nf4: 12 layers of the text_encoder_2" in caplog.text
    # quantized encoders encode to other numbers: a text cache of their own, class images of their own
    train(load_config(None, overrides(model, tmp_path / "plain2", *common)))
    frozen = load_config(None, overrides(model, tmp_path / "q2", "model.quantize_text_encoders=nf4", *common))
    train(frozen)
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2
    assert class_images_dir(plain, 64, "id") != class_images_dir(frozen, 64, "id")
    assert class_images_dir(plain, 64, "id") == class_images_dir(load_config(None, overrides(model, tmp_path / "x", *common)),
                                                                 64, "id")


def test_text_encoder_quantize_refuses_dora_only_where_the_encoders_train(tiny_model, tmp_path):
    base = overrides(tiny_model("sd15"), tmp_path / "run", "model.quantize_text_encoders=fp8", "lora.use_dora=true")
    check_run(load_config(None, base))  # DoRA on the UNet only: its weights are not quantized
    with pytest.raises(ConfigError, match=r"lora\.use_dora: DoRA reads the base weights directly, not through "
                                          r"model\.quantize_text_encoders=fp8"):
        check_run(load_config(None, [*base, "lora.train_text_encoder=true"]))
