"""Epoch-based intervals: train.checkpoint_every_epochs and sample.every_epochs. An epoch is what the batch
sampler streams once: each instance example x data.repeats (or each class image where there are more), or,
with aspect buckets, the epoch's batches; a checkpoint / grid lands on the step that completes the epoch."""

import pytest

from conftest import overrides
from sdtune.config import ConfigError, load_config
from sdtune.data import BucketBatchSampler, StreamBatchSampler
from sdtune.plan import check_run
from sdtune.train import _epoch_steps, epoch_units, epochs_done, train


@pytest.mark.parametrize("sampler,accumulation", [
    (StreamBatchSampler(5, 2, seed=0), 1),  # 2.5 steps an epoch: batches straddle epochs
    (StreamBatchSampler(8, 3, seed=0, rank=0, world_size=2), 2),
    (BucketBatchSampler(["a", "a", "a", "b", "b"], 2, seed=0), 1),  # 3 batches an epoch
    (BucketBatchSampler(["a", "b", "a", "c", "b", "a", "a"], 2, seed=0, rank=0, world_size=3), 2),
])
def test_epochs_done_counts_what_the_sampler_streamed(sampler, accumulation):
    """After s optimizer steps the next micro-batch the sampler gives belongs to epoch epochs_done(s) (its
    positions are epoch x n + index): the epoch arithmetic and the sampler agree, with buckets and several
    processes too."""
    units = epoch_units(sampler, accumulation)
    for step in range(40):
        first = sampler.batch(step * accumulation)[0]
        assert first // sampler.n == epochs_done(step, units), step


def test_epoch_steps_are_the_steps_that_complete_an_epoch():
    assert _epoch_steps((3, 16), 1, max_steps=100) == [6, 11, 16, 22, 27, 32]  # 16 / 3 = 5.33 steps an epoch
    assert _epoch_steps((3, 16), 2, max_steps=100, first=3) == [11, 22, 32]
    assert _epoch_steps((3, 16), 1, max_steps=11) == [6]  # step 11 is the last: the run's own checkpoint
    assert _epoch_steps((8, 2), 1, max_steps=5) == [1, 2, 3, 4]  # 4 epochs a step: each step ends some


@pytest.mark.parametrize("extra,message", [
    (["train.checkpoint_every=100", "train.checkpoint_every_epochs=2"],
     "train.checkpoint_every_epochs: 2 is set together with train.checkpoint_every: 100; choose one. fix: "
     "train.checkpoint_every=0 to act every 2 epochs, or remove train.checkpoint_every_epochs"),
    (["sample.every=10", "sample.every_epochs=1"],
     "sample.every_epochs: 1 is set together with sample.every: 10; choose one"),
])
def test_step_and_epoch_intervals_together_are_refused(extra, message, tiny_model, tmp_path):
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", *extra)))
    assert message in str(e.value)


def test_an_epoch_interval_beside_the_default_step_interval_is_fine(tiny_model, tmp_path):
    """train.checkpoint_every left at its default (500) is no choice: the epoch interval is used."""
    recipe = overrides(tiny_model("sd15"), tmp_path / "run", "sample.every_epochs=1",
                       "train.checkpoint_every_epochs=3")
    cfg = load_config(None, [o for o in recipe if o != "train.checkpoint_every=0"])
    assert cfg.train.checkpoint_every == 500
    check_run(cfg)


@pytest.mark.slow
def test_checkpoints_and_samples_land_on_epoch_ends(tiny_model, tmp_path, caplog):
    """8 photos x data.repeats=2 at batch 3: an epoch is 16/3 = 5.33 steps. Checkpoints every epoch land at
    steps 6 and 11 (then the last, 12); a grid every 2 epochs at step 11 (then the last)."""
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="sdtune")
    train(load_config(None, overrides(
        tiny_model("sd15"), out, "data.repeats=2", "train.batch_size=3", "train.max_steps=12",
        "train.checkpoint_every_epochs=1", "train.checkpoints_total_limit=10", "sample.every_epochs=2",
    )))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000006", "step-000011", "step-000012"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000011.png", "step-000012.png"]
    assert "train.checkpoint_every_epochs=1: an epoch is 5.333 steps, so at steps 6, 11" in caplog.text


def test_an_epoch_override_replaces_the_recipes_step_interval():
    """The recipes set train.checkpoint_every and sample.every; typing the epoch form means "by epochs instead"."""
    from conftest import ROOT

    cfg = load_config(ROOT / "recipes" / "micro_dreambooth.yaml",
                      ["train.checkpoint_every_epochs=2", "sample.every_epochs=1"])
    assert "checkpoint_every" not in cfg.train.model_fields_set and cfg.train.checkpoint_every_epochs == 2
    assert "every" not in cfg.sample.model_fields_set and cfg.sample.every_epochs == 1
    both = load_config(ROOT / "recipes" / "micro_dreambooth.yaml",
                       ["train.checkpoint_every_epochs=2", "train.checkpoint_every=50"])
    assert both.train.checkpoint_every == 50 and both.train.checkpoint_every_epochs == 2
