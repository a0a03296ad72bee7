"""The micro model: its format, reproducible pretraining, the shipped weights and the world measures."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.cli import main
from sdtune.eval.core import Row
from sdtune.micro import measure, world
from sdtune.micro import model as micro
from sdtune.micro.pretrain import CALIBRATE_STEPS, PretrainConfig, pretrain, render_world, steps_within
from sdtune.models import inspect_model, load_components


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of each weight file of the pipeline (not of the reusable stage-vae/ beside it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors")) if not p.relative_to(folder).parts[0].startswith("stage-")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A micro model pretrained for a handful of steps (the format, not the quality)."""
    out = tmp_path_factory.mktemp("micro") / "a"
    pretrain(PretrainConfig(out=str(out), num_images=48, vae_steps=3, vae_batch_size=4, steps=4, batch_size=8,
                            eval_every=4, eval_images=4), log=lambda _: None)
    return out


def test_pretraining_writes_a_diffusers_sd1_model_with_a_report(pretrained):
    info = inspect_model(str(pretrained))
    assert (info.family.name, info.prediction_type, info.resolution) == ("sd15", "v_prediction", micro.RESOLUTION)
    report = json.loads((pretrained / "pretrain_report.json").read_text())
    assert report["steps_done"] == 4 and report["history"][-1]["images"] == 4
    assert 0 <= report["history"][-1]["all"] <= 1 and report["vae"]["scaling_factor"] > 0
    vae_config = json.loads((pretrained / "vae/config.json").read_text())
    assert vae_config["scaling_factor"] == report["vae"]["scaling_factor"]  # latents of unit variance
    c = load_components(str(pretrained), info.family)
    assert c.tokenizers[0]("a photo of sks toy").input_ids[4] == 48136  # the real CLIP vocabulary
    assert c.denoiser.config.sample_size * 4 == 64 and c.text_encoders[0].config.vocab_size == 49408


@pytest.mark.slow  # pretrains twice
def test_pretraining_is_reproducible(pretrained, tmp_path):
    again, lines = tmp_path / "b", []
    pretrain(PretrainConfig(out=str(again), num_images=48, vae_steps=3, vae_batch_size=4, steps=4, batch_size=8,
                            eval_every=4, eval_images=4), log=lambda _: None)
    assert _digests(again) == _digests(pretrained) and len(_digests(again)) == 3
    # a rerun into the same folder reuses the trained VAE stage and still gives the same model
    before = _digests(again)
    pretrain(PretrainConfig(out=str(again), num_images=48, vae_steps=3, vae_batch_size=4, steps=4, batch_size=8,
                            eval_every=4, eval_images=4), log=lambda line: lines.append(line))
    assert any("reusing" in line for line in lines) and _digests(again) == before


@pytest.mark.slow  # pretrains twice
def test_the_pretrain_command_reuses_its_own_folder_and_refuses_others(tmp_path, capsys):
    args = ["micro", "pretrain", str(tmp_path / "m"), "--num-images", "48", "--vae-steps", "3", "--steps", "2",
            "--batch-size", "8", "--eval-every", "2", "--eval-images", "2"]
    assert main(args) == 0 and "micro model:" in capsys.readouterr().out
    assert main(args) == 0  # a rerun into its own folder: the VAE stage is reused
    assert "vae: reusing" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main([*args[:2], str(other), *args[3:]]) == 2
    assert "earlier `sdtune micro pretrain` folder" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_shipping_drops_the_tokenizer_and_writing_the_model_restores_it(pretrained, tmp_path):
    shipped = micro.ship(pretrained, tmp_path / "assets" / "micro")
    assert not (shipped / "tokenizer").exists() and (shipped / "unet").is_dir()
    folder = micro.write_model(tmp_path / "model", source=shipped)
    assert _digests(folder) == _digests(pretrained)
    c = load_components(str(folder), micro.family())
    assert c.tokenizers[0].model_max_length == 77 and (folder / "tokenizer" / "merges.txt").is_file()


def test_writing_into_a_used_folder_or_without_weights_is_a_one_line_error(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["micro", "model", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine"
    with pytest.raises(Exception, match="no micro model weights"):
        micro.write_model(tmp_path / "x", source=tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------------
# Measures on rendered (exact) images: what a perfect model would score


def test_subject_similarity_separates_the_subject_from_other_toys():
    rng = random.Random(3)
    subject = [measure.subject_similarity(world.render(world.subject_scene(rng), 64)) for _ in range(40)]
    toys = []
    while len(toys) < 40:
        scene = world.sample_scene(rng)
        if any(t.shape == world.TOY for t in scene.things):
            toys.append(measure.subject_similarity(world.render(scene, 64)))
    assert sum(subject) / 40 >= 0.9 and sum(toys) / 40 <= 0.35, (sum(subject) / 40, sum(toys) / 40)


def test_context_toy_and_diversity_measures_on_rendered_scenes():
    rng = random.Random(4)
    pairs = measure.subject_prompts(12, "sks", "toy", seed=7)
    assert len({p for p, _ in pairs}) == 12 and all(p.startswith("a photo of sks toy") for p, _ in pairs)
    assert sum(measure.context_ok(world.render(s, 64), s) for _, s in pairs) >= 11
    # the same image under another background is wrong context
    _, scene = pairs[0]
    other = world.Background(next(c for c in ("green", "red", "blue") if c not in scene.background.colors))
    assert not measure.context_ok(world.render(world.Scene(scene.things, other), 64), scene)

    toy_images = []
    while len(toy_images) < 20:
        s = world.sample_scene(rng)
        if len(s.things) == 1 and s.things[0].shape == world.TOY:
            toy_images.append(world.render(s, 64))
    assert sum(map(measure.is_toy, toy_images)) >= 16
    plain = world.render(world.Scene((world.Thing("circle", "red"),), world.Background("blue")), 64)
    assert not measure.is_toy(plain)
    assert measure.color_diversity(toy_images) > 0.4
    assert measure.color_diversity([toy_images[0]] * 5) == 0.0
    empty = world.render(world.Scene((), world.Background("blue")), 64)
    assert measure.color_diversity([empty, empty.copy()]) == 0.0  # nothing drawn twice is not diversity


def test_recommendation_stops_before_over_training():
    def row(step, scale, subject, context, drift=0.1):
        return Row(f"step-{step:06d}", step, scale, {"subject": subject, "context": context, "class_subject": drift,
                                                     "class_toy": 1.0, "class_diversity": 0.5})

    rows = [row(100, 0, 0.2, 0.95), row(100, 1, 0.6, 0.9), row(200, 1, 0.85, 0.85),
            row(300, 1, 0.95, 0.5)]  # step 300 is over-trained: the subject wins, the context is lost
    assert measure.recommend(rows).step == 200
    rows = [row(100, 1, 0.6, 1.0, drift=0.2), row(200, 1, 0.7, 1.0, drift=0.25),
            row(300, 1, 0.9, 1.0, drift=0.7)]  # without prior preservation the class turns into the subject
    assert measure.recommend(rows).step == 200
    assert measure.recommend([row(100, 0, 0.2, 0.9)]) is None


def test_pretraining_continues_from_a_model(pretrained, tmp_path):
    """--init-from: a further pretraining starts from a model's weights and keeps its VAE (the latents the UNet
    learnt stay the same)."""
    from safetensors.torch import load_file

    out = tmp_path / "c"
    pretrain(PretrainConfig(out=str(out), num_images=48, steps=2, batch_size=8, eval_every=2, eval_images=4,
                            init_from=str(pretrained)), log=lambda _: None)
    vae_a, vae_b = load_file(pretrained / "vae/diffusion_pytorch_model.safetensors"), \
        load_file(out / "vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    unet_a, unet_b = load_file(pretrained / "unet/diffusion_pytorch_model.safetensors"), \
        load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert not (out / "stage-vae").exists()  # no VAE stage: it was not trained again
    # ... and its scaling factor: the UNet learnt latents scaled by it (it was once re-read from the new scenes)
    factor = json.loads((pretrained / "vae/config.json").read_text())["scaling_factor"]
    assert json.loads((out / "vae/config.json").read_text())["scaling_factor"] == factor


def test_a_time_budget_replans_the_steps_once_and_ends_the_schedule(pretrained, tmp_path):
    """--seconds: after CALIBRATE_STEPS timed steps the run is cut to what fits; the cosine schedule is
    re-planned to end there, the model is saved at the last step, and no step is evaluated twice."""
    assert steps_within(100.0, 10.0, 100, 0.1, 10_000, 500, 5.0) == 100 + int(80 / (0.1 + 5 / 500))
    assert steps_within(100.0, 10.0, 100, 0.1, 300, 500, 5.0) == 300  # never past --steps
    assert steps_within(1.0, 10.0, 100, 0.1, 10_000, 500, 5.0) == 100  # never fewer than done
    out = tmp_path / "d"
    report = pretrain(PretrainConfig(out=str(out), num_images=16, steps=CALIBRATE_STEPS + 50, batch_size=2,
                                     eval_every=CALIBRATE_STEPS, eval_images=2, seconds=1e-3,
                                     init_from=str(pretrained)), log=lambda _: None)
    assert report["steps_planned"] == report["steps_done"] == CALIBRATE_STEPS
    assert [h["step"] for h in report["history"]] == [CALIBRATE_STEPS]


def test_scenes_rendered_in_processes_are_those_of_one_sequence():
    from sdtune.micro.pretrain import PREFIXES

    images, captions, scenes = render_world(4200, seed=3)  # 3 chunks: rendered in processes
    rng = random.Random(3)
    for i in range(4200):
        scene = world.sample_scene(rng)
        assert scene == scenes[i] and captions[i] == world.caption(scene, prefix=rng.choice(PREFIXES))
    for i in (0, 2047, 2048, 4199):
        assert (images[i] == np.asarray(world.render(scenes[i], micro.RESOLUTION))).all()


def test_decoder_tuning_changes_the_decoder_alone(pretrained, tmp_path):
    """--decoder-steps: the VAE's decoder trains and its encoder does not (the latents a UNet learnt stay)."""
    from safetensors.torch import load_file

    out = tmp_path / "e"
    pretrain(PretrainConfig(out=str(out), num_images=16, steps=1, batch_size=2, eval_every=1, eval_images=2,
                            decoder_steps=3, init_from=str(pretrained)), log=lambda _: None)
    a, b = load_file(pretrained / "vae/diffusion_pytorch_model.safetensors"), \
        load_file(out / "vae/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    kept = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
    assert any(not torch.equal(a[k], b[k]) for k in tuned)
