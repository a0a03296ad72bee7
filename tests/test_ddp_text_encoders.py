"""A text-encoder LoRA under DDP (``accelerate launch --multi_gpu``): DDP refuses a step in which a trained
parameter got no gradient, so no LoRA goes on text-encoder layers whose output the family never reads
(``TextEncoderSpec.unread_layers``: SDXL's CLIP-L, read at its penultimate layer). Checked per family on one
backward, bitwise against the old layout (a LoRA on every layer) in one process, through a resume, and by
2-process launches of SDXL and SD3 on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdtune.train as train_module
from conftest import ROOT, assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune.config import load_config
from sdtune.lora import WEIGHT_NAME, add_lora
from sdtune.models import inspect_model, load_components
from sdtune.plan import with_family_defaults
from sdtune.train import _add_adapters, train, training_step

CLIP_ALL = "lora.text_encoder_target_modules=[q_proj,k_proj,v_proj,out_proj,fc1,fc2]"
LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backward(model: Path, unread: bool) -> dict[str, torch.nn.Module]:
    """The run's trained modules (``train._add_adapters``, every CLIP projection targeted) after one training
    step's backward on two captions; ``unread=False``: the old layout, a LoRA on every layer."""
    info = inspect_model(str(model))
    family = info.family
    recipe = overrides(model, Path("unused"), "lora.train_text_encoder=true", CLIP_ALL)
    cfg = with_family_defaults(load_config(None, recipe), family)
    options = cfg.family_options(family)
    c = load_components(str(model), family)
    torch.manual_seed(0)
    if unread:
        trained = _add_adapters(cfg, family, options, c)
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "add_lora", lambda *a, unread_layers=0, **kw: add_lora(*a, **kw))
            trained = _add_adapters(cfg, family, options, c)
    ids = family.tokenize(c.tokenizers, ["a photo of sks toy", "a toy on a table"])
    prompt_embeds = family.encode_prompt(c.text_encoders, ids)
    batch = {"geometry": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}  # (B, 6) SDXL's size and crop ids
    conditioning = family.conditioning(prompt_embeds, batch, options, torch.device("cpu"), torch.float32)
    latents = torch.randn(2, c.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    objective = family.objective(c.noise_scheduler, info.prediction_type, noise_offset=0.0, snr_gamma=None,
                                 options=options)
    training_step(c.denoiser, family, objective, latents, conditioning,
                  torch.Generator().manual_seed(2)).loss.backward()
    return trained


def _without_gradient(trained: dict[str, torch.nn.Module]) -> set[str]:
    return {f"{name}.{n}" for name, module in trained.items() for n, p in module.named_parameters()
            if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3", "flux"])
def test_every_trained_parameter_gets_a_gradient(family, tiny_model):
    """What DDP without find_unused_parameters needs of each step. And the family's unread layers are exactly
    right: with a LoRA on every layer, the parameters left without a gradient are theirs, and only theirs."""
    specs = {spec.name: spec for spec in inspect_model(str(tiny_model(family))).family.text_encoders}
    trained = _backward(tiny_model(family), unread=True)
    assert len(trained) > 1 and _without_gradient(trained) == set()  # the denoiser and the text encoder(s)

    every_layer = _backward(tiny_model(family), unread=False)
    in_unread = {f"{name}.{n}" for name, module in every_layer.items() if name in specs
                 for n, p in module.named_parameters() if p.requires_grad
                 and int(LAYER.search(n)[1]) >= module.config.num_hidden_layers - specs[name].unread_layers}
    assert _without_gradient(every_layer) == in_unread
    assert bool(in_unread) == (family == "sdxl")  # SDXL's CLIP-L: the one encoder with an unread layer
    for name, module in trained.items():  # and those layers alone lost their LoRA
        if name in specs:
            adapted = {int(LAYER.search(n)[1]) for n, p in module.named_parameters() if p.requires_grad}
            assert adapted == set(range(module.config.num_hidden_layers - specs[name].unread_layers)), name


@pytest.mark.slow  # six tiny SDXL runs
def test_sdxl_trains_as_before_without_the_unread_layer_and_resumes(tiny_model, tmp_path, monkeypatch):
    """In one process, no LoRA on CLIP-L's last layer changes nothing else (that layer's lora_B stayed zero: it
    never got a gradient; equal to float rounding, bitwise with one thread); the run resumes bitwise, in the same
    layout, and a checkpoint of the old layout resumes bitwise in its own."""
    # one thread: with two, the runs of this test were not reproducible among themselves in the full suite
    # (about 1e-7 at step 4, cause not found); with one they are bitwise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sdxl_runs(tiny_model, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _sdxl_runs(tiny_model, tmp_path, monkeypatch) -> None:
    model = tiny_model("sdxl")
    common = ["lora.train_text_encoder=true", "train.learning_rate=5e-2", "sample.every=0"]
    straight, split = interrupted_and_resumed(model, tmp_path, 4, 2, *common)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert_resumed_bitwise(straight, split, 4, component)

    monkeypatch.setattr(train_module, "add_lora", lambda *a, unread_layers=0, **kw: add_lora(*a, **kw))
    old = tmp_path / "every_layer"
    train(load_config(None, overrides(model, old, *common)))
    new, before = load_file(straight / WEIGHT_NAME), load_file(old / WEIGHT_NAME)
    last = {k for k in before if k.startswith("text_encoder.text_model.encoder.layers.1.")}
    assert last and set(before) - set(new) == last and set(new) <= set(before)
    assert all(not before[k].any() for k in last if ".lora_B." in k)
    # the same maths without the no-op layer; not bitwise across the two runs: with several threads, CPU kernels
    # may reduce in another order where the tensors lie at other addresses (make test uses 2 threads)
    assert all(torch.allclose(new[k], before[k], rtol=1e-4, atol=1e-6) for k in new)
    assert any(new[k].any() for k in new if k.startswith("text_encoder.") and ".lora_B." in k)  # it trained

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]

    assert losses(straight) == pytest.approx(losses(old), rel=1e-5)

    # a checkpoint of the old layout (an earlier sdtune) resumes in it, exactly
    split_old = tmp_path / "old_split"
    train(load_config(None, overrides(model, split_old, "train.checkpoint_every=2", *common)))
    shutil.rmtree(split_old / "checkpoints/step-000004")
    (split_old / WEIGHT_NAME).unlink()
    monkeypatch.undo()  # today's add_lora, which leaves the last CLIP-L layer out of a new run
    train(load_config(None, overrides(model, split_old, "train.resume=latest", *common)))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert_resumed_bitwise(old, split_old, 4, component)
    assert load_file(split_old / WEIGHT_NAME).keys() == before.keys()


@pytest.mark.slow  # launches two processes, twice
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_two_processes_train_the_text_encoders(family, tiny_model, tmp_path):
    """SDXL failed at step 2 (no gradient for CLIP-L's last layer's LoRA), SD3 at step 1 (the DDP wrapper has
    no dtype); both now train both CLIPs' LoRAs in 2 gloo processes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "sdtune", "train",
           str(ROOT / "recipes/tiny_cpu.yaml"),
           *overrides(tiny_model(family), out, "prior.enabled=false", "train.max_steps=2",
                      "train.batch_size=1", "lora.train_text_encoder=true", "train.learning_rate=5e-2",
                      CLIP_ALL)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["images_per_step"] == 2
    lora = load_file(out / WEIGHT_NAME)
    for component in ("text_encoder", "text_encoder_2"):
        ups = {k: v for k, v in lora.items() if k.startswith(f"{component}.") and ".lora_B." in k}
        assert ups and all(v.any() for v in ups.values()), component  # every text-encoder LoRA trained
    last_clip_l = [k for k in lora if k.startswith("text_encoder.text_model.encoder.layers.1.")]
    assert bool(last_clip_l) == (family == "sd3")  # SD3 reads CLIP-L's last layer (pooled), SDXL does not
