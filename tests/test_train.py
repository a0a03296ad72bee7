import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DEMO_DATA, ROOT, assert_resumed_bitwise, interrupted_and_resumed, overrides
from sdtune import families
from sdtune.config import ConfigError, load_config
from sdtune.errors import SdtuneError
from sdtune.layout import canonical_text_encoder_keys
from sdtune.lora import WEIGHT_NAME, add_lora
from sdtune.models import inspect_model, load_components
from sdtune.plan import check_run
from sdtune.train import train, training_step

SD15 = families.get("sd15")


def _unet_with_lora(model, rank=4, family=SD15):
    c = load_components(str(model), family)
    add_lora(c.denoiser, rank, rank, ["to_k", "to_q", "to_v", "to_out.0"])
    return c


def _pipeline(model):
    """The base model's pipeline, as diffusers users load it for inference."""
    info = inspect_model(str(model))
    return info.family.pipeline(load_components(info.pretrained, info.family))


def _step(c, latents, hidden, generator, family=SD15, prediction_type="epsilon", snr_gamma=None, **kw):
    objective = family.objective(c.noise_scheduler, prediction_type, snr_gamma=snr_gamma)
    return training_step(c.denoiser, family, objective, latents, {"encoder_hidden_states": hidden}, generator, **kw)


def test_training_step_is_deterministic_and_splits_prior(tiny_model):
    c = _unet_with_lora(tiny_model("sd15"))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1))
    a = _step(c, latents, hidden, torch.Generator().manual_seed(5), prior_preservation=True, prior_loss_weight=0.5)
    b = _step(c, latents, hidden, torch.Generator().manual_seed(5), prior_preservation=True, prior_loss_weight=0.5)
    assert torch.equal(a.loss, b.loss)
    assert torch.allclose(a.loss, a.instance_loss + 0.5 * a.prior_loss)
    a.loss.backward()
    grads = [p.grad for n, p in c.denoiser.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)  # B = 0 at init, so A's gradient is zero but present
    assert all(p.grad is None for n, p in c.denoiser.named_parameters() if "lora" not in n)


def test_v_prediction_and_min_snr_change_the_loss(tiny_model):
    c = _unet_with_lora(tiny_model("sd2"), family=families.get("sd2"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, 32)
    losses = [
        _step(c, latents, hidden, torch.Generator().manual_seed(1), families.get("sd2"), p, g).loss.item()
        for p, g in [("epsilon", None), ("v_prediction", None), ("v_prediction", 5.0)]
    ]
    assert len(set(losses)) == 3


def test_loss_goes_down_when_overfitting(tiny_model):
    """Train on 2 fixed latents; loss on a fixed held-out set of noise and timesteps must fall clearly."""
    c = _unet_with_lora(tiny_model("sd15"), rank=8)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    params = [p for p in c.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            return sum(_step(c, latents, hidden, torch.Generator().manual_seed(1000 + i)).loss.item()
                       for i in range(8)) / 8

    before = eval_loss()
    train_gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        out = _step(c, latents, hidden, train_gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def _lora_keys_match(pipe_module, adapter_file):
    """Every tensor of the trained adapter is in the module loaded by diffusers, with equal values."""
    from peft import get_peft_model_state_dict

    adapter_name = next(iter(pipe_module.peft_config))
    loaded = get_peft_model_state_dict(pipe_module, adapter_name=adapter_name)
    loaded = canonical_text_encoder_keys(loaded, type(pipe_module).__name__)  # as sdtune's files name them
    trained = load_file(adapter_file)
    assert set(loaded) == set(trained), set(loaded) ^ set(trained)
    for k, v in trained.items():
        assert torch.equal(loaded[k].float(), v), k


def test_sd15_prior_text_encoder_adamw8bit_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(
        tiny_model("sd15"), out, "prior.enabled=true", "prior.class_prompt=a photo of a toy",
        "prior.num_class_images=3", "prior.generation_steps=2", f"prior.class_dir={tmp_path / 'class'}",
        "lora.train_text_encoder=true", "train.optimizer=adamw8bit", "lora.rank=64", "lora.alpha=32",
        "train.checkpoint_every=2", "sample.every=2",
    ))
    train(cfg)
    printed = capsys.readouterr().out
    assert "prior preservation: 3 class images" in printed
    assert "8-bit AdamW: 8-bit state for " in printed and "8-bit state for 0 of" not in printed
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [f"class-0000{i}.png" for i in range(3)]
    for name in ["config.yaml", WEIGHT_NAME, "train_summary.json", "samples/step-000002.png",
                 "samples/step-000004.png", "checkpoints/step-000002/COMPLETE", "checkpoints/step-000004/COMPLETE"]:
        assert (out / name).exists(), name
    opt_state = torch.load(out / "checkpoints/step-000004/optimizer.pt", weights_only=True)

    def tensors(node):
        if torch.is_tensor(node):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from tensors(v)

    assert any(v.dtype == torch.uint8 for v in tensors(opt_state["state"])), "8-bit AdamW keeps uint8 state"

    # diffusers loads it with every key, and it changes the output
    pipe = _pipeline(tiny_model("sd15"))
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    pipe.load_lora_weights(str(out))
    _lora_keys_match(pipe.unet, out / "checkpoints/step-000004/adapter-unet.safetensors")
    _lora_keys_match(pipe.text_encoder, out / "checkpoints/step-000004/adapter-text_encoder.safetensors")
    assert abs(render() - base).max() > 1e-4

    # a second run with the same model and class prompt reuses the class images
    train(load_config(None, overrides(
        tiny_model("sd15"), tmp_path / "run2", "prior.enabled=true", "prior.class_prompt=a photo of a toy",
        "prior.num_class_images=3", f"prior.class_dir={tmp_path / 'class'}", "train.max_steps=1",
    )))
    assert "class images:" not in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_train_and_load(family, tiny_model, tmp_path):
    out = tmp_path / family
    extra = ["lora.train_text_encoder=true", "train.mixed_precision=bf16", "train.snr_gamma=5"]
    if family == "sdxl":
        extra.append("sdxl.crop_conditioning=false")
    train(load_config(None, overrides(tiny_model(family), out, *extra)))
    lora = load_file(out / WEIGHT_NAME)
    prefixes = {k.split(".")[0] for k in lora}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"})
    assert all(torch.isfinite(v).all() for v in lora.values())
    pipe = _pipeline(tiny_model(family))
    pipe.load_lora_weights(str(out))
    _lora_keys_match(pipe.unet, out / "checkpoints/step-000004/adapter-unet.safetensors")
    if family == "sdxl":
        _lora_keys_match(pipe.text_encoder_2, out / "checkpoints/step-000004/adapter-text_encoder_2.safetensors")


RESUME_CASES = {
    # random crops (no latent cache), dropout, gradient accumulation, a cosine schedule
    "uncached": ["train.gradient_accumulation_steps=2", "train.batch_size=1", "lora.dropout=0.1",
                 "data.random_flip=true", "data.center_crop=false", "train.lr_scheduler=cosine",
                 "train.learning_rate=1e-3"],
    # cached latents (both flips) and text, prior preservation, 8-bit AdamW
    "cached_prior_8bit": ["data.random_flip=true", "train.optimizer=adamw8bit", "lora.rank=64",
                          "prior.enabled=true", "prior.class_prompt=a photo of a toy", "prior.num_class_images=2",
                          "prior.generation_steps=1", "train.learning_rate=1e-3"],
    # aspect-ratio buckets (mixed shapes), cached latents per bucket, prior preservation, accumulation: the
    # resume lands mid-epoch (4 bucket batches an epoch, 2 micro-batches a step, checkpoint at step 3)
    "buckets": ["data.aspect_buckets=true", "data.instance_dir={bucketed_toy}", "data.random_flip=true",
                "train.gradient_accumulation_steps=2", "prior.enabled=true", "prior.class_prompt=a photo of a toy",
                "prior.num_class_images=3", "prior.generation_steps=1", "train.learning_rate=1e-3"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_at_the_exact_step(case, tiny_model, tmp_path, bucketed_toy):
    common = [a.replace("{bucketed_toy}", str(bucketed_toy)) for a in RESUME_CASES[case]]
    common.append(f"prior.class_dir={tmp_path / 'class'}")
    # the same run, "crashed" after its step-3 checkpoint: later artifacts gone, then resumed
    straight, split = interrupted_and_resumed(tiny_model("sd15"), tmp_path, 6, 3, *common)
    state = json.loads((split / "checkpoints/step-000006/state.json").read_text())
    assert state["global_step"] == 6
    # per-step losses: the resumed run logged steps 4-6 again; they equal the uninterrupted run's
    assert_resumed_bitwise(straight, split, 6, "unet")


def test_config_drift_ignores_options_one_version_does_not_have():
    from sdtune.checkpoint import config_drift

    saved = {"lora": {"rank": 4}, "train": {"max_steps": 10}}
    assert config_drift(saved, {"lora": {"rank": 4}, "train": {"max_steps": 20}, "data": {"aspect_buckets": False}}) == []
    assert config_drift(saved, {"lora": {"rank": 8}, "train": {"max_steps": 10}}) == ["lora.rank"]


def test_resume_refuses_a_changed_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2")))
    # a fresh start in the same folder would overwrite its checkpoints: refused before any weight loads
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2")))
    with pytest.raises(SdtuneError, match="lora.rank"):
        train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=4", "train.resume=latest",
                                          "lora.rank=8")))


def test_resume_refuses_other_base_weights_at_the_same_path(tiny_model, tmp_path):
    """Replacing a model folder's weights keeps model.pretrained the same string: the checkpoint records what the
    base *is* (its files' bytes), so a resume on other weights is refused before any weight loads, and the same
    bytes copied elsewhere (another mtime, another folder) still resume."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd15"), model)
    out = tmp_path / "run"
    train(load_config(None, overrides(str(model), out, "train.max_steps=2", "prior.enabled=false")))
    state = json.loads((out / "checkpoints/step-000002/state.json").read_text())
    assert len(state["data"]["model"]["identity"]) == 16
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)  # the same bytes in another folder, new mtimes: the base is the same, it resumes
    train(load_config(None, overrides(str(moved), out, "train.max_steps=3", "train.resume=latest",
                                      "prior.enabled=false")))
    assert (out / "checkpoints/step-000003").is_dir()
    weights = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1.0  # a fine-tune saved over the base
    save_file(tensors, weights)
    with pytest.raises(ConfigError, match=r"train.resume: the base model is not the one .*step-000003 was trained on: "
                                          r"the files of model.pretrained .* changed since"):
        check_run(load_config(None, overrides(str(model), out, "train.max_steps=4", "train.resume=latest",
                                              "prior.enabled=false")))
    with pytest.raises(ConfigError, match="lora.rank"):  # the other keys are still compared
        check_run(load_config(None, overrides(str(moved), out, "train.max_steps=4", "train.resume=latest",
                                              "prior.enabled=false", "lora.rank=8")))


def test_wandb_offline_and_tensorboard_logs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "wb"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.report_to=wandb", "train.max_steps=2")))
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote an offline run"
    out = tmp_path / "tb"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.report_to=tensorboard", "train.max_steps=2")))
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # launches two processes
@pytest.mark.parametrize("mode, extra", [("--cpu", ()), ("--multi_gpu", ()),
                                         ("--multi_gpu", ("model.quantize=fp8", "train.gradient_checkpointing=true")),
                                         ("--multi_gpu", ("train.optimizer=adamw_schedulefree",))])
def test_two_process_cpu_launch(mode, extra, tiny_model, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine runs 2 gloo processes.
    `--cpu --num_processes 2` works too, but accelerate itself starts one process there unless MPI is set
    up; sdtune says so. DDP leaves the frozen weights where each process read them: fp8-stored ones, which
    gloo cannot broadcast, train too. A schedule-free optimizer's checkpoints hold its average (x) as the LoRA
    file and the weights it steps (y) as the adapters, under DDP as in one process."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "sdtune", "train", str(ROOT / "recipes/tiny_cpu.yaml"),
           *overrides(tiny_model("sd15"), out, "prior.enabled=false", "train.checkpoint_every=2", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / WEIGHT_NAME).is_file()
    processes = 2 if mode == "--multi_gpu" else 1
    state = json.loads((out / "checkpoints/step-000004/state.json").read_text())
    assert state["num_processes"] == processes
    assert len(list((out / "checkpoints/step-000004").glob("rng-*.pt"))) == processes
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["images_per_step"] == 2 * processes  # batch 2 on each process
    if mode == "--cpu":
        assert "accelerate launch --multi_gpu --num_processes N" in proc.stdout
    if "train.optimizer=adamw_schedulefree" in extra:
        lora = load_file(out / "checkpoints/step-000004" / WEIGHT_NAME)
        adapters = load_file(out / "checkpoints/step-000004/adapter-unet.safetensors")
        assert {f"unet.{k}" for k in adapters} == set(lora)
        assert not all(torch.equal(lora[f"unet.{k}"], adapters[k]) for k in adapters)  # x is not y


def test_dora_noise_offset_checkpointing_and_retention(tiny_model, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, overrides(
        tiny_model("sd15"), out, "lora.use_dora=true", "train.noise_offset=0.1", "train.gradient_checkpointing=true",
        "train.checkpoint_every=1", "train.checkpoints_total_limit=2", "train.max_steps=4",
        "train.lr_scheduler=linear", "train.lr_warmup_steps=2",
    )))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"]  # retention keeps the newest 2, no temporary folders left
    lora = load_file(out / WEIGHT_NAME)
    assert any("lora_magnitude_vector" in k or "dora_scale" in k for k in lora), "DoRA magnitudes are saved"
    pipe = _pipeline(tiny_model("sd15"))
    pipe.load_lora_weights(str(out))
    _lora_keys_match(pipe.unet, out / "checkpoints/step-000004/adapter-unet.safetensors")


def test_missing_class_images_continue_where_a_crash_stopped(tmp_path):
    from sdtune.prior import missing_class_indices

    for i in (0, 1, 3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"class-{i:05d}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "my_own_dog.jpg")  # user-supplied images count too
    assert missing_class_indices(tmp_path, 6) == [2, 4]
    assert missing_class_indices(tmp_path, 3) == []


def test_processes_share_one_list_of_missing_class_images(tmp_path):
    """Process 1 must not list the folder after process 0 wrote its share: its own listing would skip indices
    that nobody then generates (found with 2 processes: 6 of 8 class images, and a resume refused)."""
    from sdtune.prior import ensure_class_images, missing_class_indices

    class Pipe:
        def __call__(self, prompts, **kwargs):
            return type("Out", (), {"images": [Image.new("RGB", (8, 8)) for _ in prompts]})()

    missing = missing_class_indices(tmp_path, 8)  # listed by every process before any writes
    for rank in (0, 1):
        ensure_class_images(Pipe(), tmp_path, "a dog", 8, resolution=8, batch_size=2, steps=1, guidance_scale=1.0,
                            seed=0, model_id="m", process_index=rank, num_processes=2, progress=False,
                            missing=missing)
    assert missing_class_indices(tmp_path, 8) == []
    assert sorted(p.name for p in tmp_path.glob("class-*.png")) == [f"class-{i:05d}.png" for i in range(8)]


def test_latent_cache_is_written_once_and_reused(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "a", "data.random_flip=true",
                                      "train.max_steps=1")))
    files = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(files) == 8 * 2  # 8 images x (mirrored or not)
    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "b", "data.random_flip=true",
                                      "train.max_steps=1")))
    assert "caching latents" not in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert load_file(files[0])["params"].shape == (8, 8, 8)  # mean + log-variance, 64 px / 8


# --------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


@pytest.mark.parametrize("family,cached", [("sd15", True), ("sdxl", True), ("sdxl", False)])
def test_aspect_buckets_train_with_prior_and_cached_latents(family, cached, tiny_model, tmp_path, bucketed_toy,
                                                           monkeypatch, capsys):
    """A folder of portrait, landscape and square images (`sdtune prep --crop bucket` at 64 px) trains in
    batches of one bucket each; class images follow their instance images' buckets; SDXL is told each crop."""
    import sdtune.train as train_module
    from sdtune.data import center_crop_top_left

    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    seen = []
    real_step = train_module.training_step

    def recording_step(denoiser, family, objective, latents, conditioning, generator, **kw):
        time_ids = (conditioning.get("added_cond_kwargs") or {}).get("time_ids")
        if torch.is_grad_enabled():  # the training steps, not finish's health check
            seen.append((tuple(latents.shape), None if time_ids is None else time_ids.float().cpu()))
        return real_step(denoiser, family, objective, latents, conditioning, generator, **kw)

    monkeypatch.setattr(train_module, "training_step", recording_step)
    out = tmp_path / "run"
    extra = ["sdxl.crop_conditioning=true"] if family == "sdxl" else []
    train(load_config(None, overrides(
        tiny_model(family), out, f"data.instance_dir={bucketed_toy}", "data.aspect_buckets=true",
        "data.random_flip=true", "prior.enabled=true", "prior.class_prompt=a photo of a toy",
        "prior.num_class_images=3", "prior.generation_steps=1", f"prior.class_dir={tmp_path / 'class'}",
        f"train.cache_latents={str(cached).lower()}", *extra,
    )))
    assert "aspect buckets: 48x80 (2 images), 64x64 (4 images), 80x48 (2 images)" in capsys.readouterr().out
    assert (out / WEIGHT_NAME).is_file() and all(torch.isfinite(v).all() for v in load_file(out / WEIGHT_NAME).values())
    # 4 steps of batch 2 = one epoch of 4 bucket batches: every bucket, each batch one shape, class rows included
    assert sorted(shape for shape, _ in seen) == [(4, 4, 6, 10), (4, 4, 8, 8), (4, 4, 8, 8), (4, 4, 10, 6)]
    # latents cached per (image, flip, bucket): each bucket's (8, h/8, w/8), class images in their pairs' buckets
    shapes = [tuple(load_file(f)["params"].shape) for f in (tmp_path / "cache" / "latents").glob("*.safetensors")]
    if cached:
        assert set(shapes) == {(8, 10, 6), (8, 6, 10), (8, 8, 8)} and len(shapes) >= 2 * (8 + 3)
    else:
        assert not shapes
    assert (out / "samples" / "step-000004.png").is_file()  # sampling (square, data.resolution) still runs
    if family == "sdxl":
        crops = set()
        for (b, _, lh, lw), time_ids in seen:
            th, tw = lh * 8, lw * 8
            assert time_ids.shape == (b, 6)
            for i, (oh, ow, top, left, h, w) in enumerate(time_ids.int().tolist()):
                assert (h, w) == (th, tw)  # the bucket, not (64, 64)
                if i >= b // 2:  # class images are generated 64 px squares
                    assert (oh, ow) == (64, 64)
                # the centre crop of the image resized to cover the bucket, e.g. 56x72 -> 64x82 -> (9, 0)
                assert (top, left) == center_crop_top_left(ow, oh, (tw, th))
                crops.add((top, left))
        assert len(crops) > 1  # some crops are not at the corner


def test_latent_cache_takes_a_size_per_item(tiny_model, tmp_path):
    from sdtune.cache import cache_latents

    c = load_components(str(tiny_model("sd15")), SD15)
    image = DEMO_DATA / "toy_00.png"
    items = [(image, False, (48, 80)), (image, True, (48, 80)), (image, False, (64, 64)), (image, False, (80, 48))]
    got = cache_latents(c.vae, items, "vae", tmp_path, batch_size=8, progress=False)
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        (str(image), False, (48, 80)): (8, 10, 6), (str(image), True, (48, 80)): (8, 10, 6),
        (str(image), False, (64, 64)): (8, 8, 8), (str(image), False, (80, 48)): (8, 6, 10)}
    assert not torch.equal(got[(str(image), False, (48, 80))], got[(str(image), True, (48, 80))])
    # the same as encoding each alone (sizes are batched apart), and read back from disk the second time
    alone = cache_latents(c.vae, items[2:3], "vae", tmp_path / "alone", progress=False)
    assert torch.allclose(alone[(str(image), False, (64, 64))], got[(str(image), False, (64, 64))], atol=1e-5)

    class NoVAE:
        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            raise AssertionError("encoded again")

    again = cache_latents(NoVAE(), items, "vae", tmp_path, progress=False)
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_latent_cache_is_read_per_batch_not_held(tiny_model, tmp_path):
    """Issue 19: the cache holds file names, not tensors (resident memory flat in the number of images), pickles
    small into DataLoader workers, and a truncated entry is found by its header and encoded again."""
    import pickle

    from sdtune.cache import LatentStore, cache_latents

    c = load_components(str(tiny_model("sd15")), SD15)
    items = [(DEMO_DATA / f"toy_{i:02d}.png", flip, (64, 64)) for i in range(4) for flip in (False, True)]
    store = cache_latents(c.vae, items, "vae", tmp_path, progress=False)
    assert isinstance(store, LatentStore) and len(store) == 8
    assert all(isinstance(f, Path) and f.is_file() for f in store.files.values())
    first = {k: store[k].clone() for k in store}  # (load_file maps the file; the test rewrites one in place)
    assert len(pickle.dumps(store)) < 400 * len(store)  # about a path per entry; a latent here is 2 KiB
    victim = store.files[(str(items[0][0]), False, (64, 64))]
    victim.write_bytes(victim.read_bytes()[:-16])
    again = cache_latents(c.vae, items, "vae", tmp_path, progress=False)
    assert all(torch.allclose(again[k], first[k], atol=1e-5) for k in first)  # encoded alone: rounding
    assert victim.stat().st_size > 16 and again.files[(str(items[0][0]), False, (64, 64))] == victim


def test_loader_workers_read_the_cache_and_train_the_same(tiny_model, tmp_path):
    """Batches read by two DataLoader worker processes train bitwise the same LoRA as batches read in-process."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(load_config(None, overrides(tiny_model("sd15"), out, f"train.dataloader_workers={workers}",
                                          "data.instance_prompt=a photo of sks toy", "data.random_flip=true")))
        runs[workers] = load_file(out / WEIGHT_NAME)
    assert runs[0].keys() == runs[2].keys() and all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_sdxl_time_ids_use_each_crops_target_size():
    from sdtune.data import collate
    from sdtune.families.sdxl import time_ids

    def example(original, crop, target):
        return {"instance": {"pixel_values": torch.zeros(3, 8, 8), "caption": "", "original_size": original,
                             "crop_top_left": crop, "target_size": target, "path": "x.png"}}

    batch = collate([example((768, 1024), (0, 32), (896, 1152)), example((1024, 1024), (64, 0), (1024, 1024))])
    assert time_ids(batch["geometry"], True).tolist() == [[768, 1024, 0, 32, 896, 1152], [1024, 1024, 64, 0, 1024, 1024]]
    assert time_ids(collate([example((8, 8), (1, 2), (64, 48))])["geometry"], False).tolist() == [[8, 8, 0, 0, 64, 48]]


@pytest.mark.slow  # launches two processes
def test_two_processes_on_a_busy_folder_both_refuse(tiny_model, tmp_path):
    """The main process takes the run folder's lock; when another run holds it, every process of the launch
    gets the refusal (none is left waiting in a collective) and the launch exits non-zero, writing nothing."""
    out = tmp_path / "busy"
    hold = ("import sys\nfrom sdtune.locks import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "sdtune", "train", str(ROOT / "recipes/tiny_cpu.yaml"),
               *overrides(tiny_model("sd15"), out, "prior.enabled=false")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode != 0
        assert proc.stderr.count(f"is in use by another sdtune run, pid {holder.pid}") == 2, proc.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == before  # only the holder's lock files
    finally:
        holder.kill()
        holder.wait()


def test_a_run_reads_each_tokenizer_once(tiny_model, tmp_path, monkeypatch):
    """check_run reads the tokenizers for the token check and the run trains with those: each tokenizer folder
    is read once per run (it was read again with the weights), and again by the next run (no cache between runs)."""
    from transformers import CLIPTokenizer

    real = CLIPTokenizer.from_pretrained.__func__
    reads: list[tuple[str, str | None]] = []

    def counting(cls, source, *args, **kwargs):
        reads.append((str(source), kwargs.get("subfolder")))
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(counting))
    model = tiny_model("sdxl")
    for run in ("a", "b"):
        reads.clear()
        train(load_config(None, overrides(model, tmp_path / run, "train.max_steps=1", "sdxl.crop_conditioning=false")))
        assert sorted(reads) == [(str(model), "tokenizer"), (str(model), "tokenizer_2")], reads
        assert (tmp_path / run / WEIGHT_NAME).is_file()
