"""train.loss: MSE, Huber and smooth-L1 (kohya sd-scripts' ``conditional_loss``) with the threshold schedules
of its ``get_huber_threshold_if_needed``, combined with min-SNR weighting as kohya does; values computed by
hand."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import overrides
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.objectives import DiffusionObjective, LossFunction, huber_threshold, per_element_loss
from sdtune.train import train, training_step

# two examples, (B, C, h, w) = (2, 1, 1, 2): errors d = pred - 0 of [0, 3] and [1, 0]
PRED = torch.tensor([[[[0.0, 3.0]]], [[[1.0, 0.0]]]])
TARGET = torch.zeros_like(PRED)
C = torch.tensor([4.0, 0.75])  # one threshold per example: sqrt(3^2 + 4^2) = 5, sqrt(1 + 0.75^2) = 1.25


@pytest.mark.parametrize("kind,expected", [
    ("mse", [[0.0, 9.0], [1.0, 0.0]]),
    # 2c (sqrt(d^2 + c^2) - c): 2*4*(5 - 4) = 8; 2*0.75*(1.25 - 0.75) = 0.75
    ("huber", [[0.0, 8.0], [0.75, 0.0]]),
    # 2 (sqrt(d^2 + c^2) - c): 2*(5 - 4) = 2; 2*(1.25 - 0.75) = 1
    ("smooth_l1", [[0.0, 2.0], [1.0, 0.0]]),
])
def test_per_element_loss_matches_hand_computed_values(kind, expected):
    loss = per_element_loss(PRED, TARGET, kind, None if kind == "mse" else C)
    assert loss.shape == PRED.shape and loss.dtype == torch.float32  # unreduced: a mask can weight it
    assert torch.equal(loss.view(2, 2), torch.tensor(expected))


def test_per_element_loss_is_fp32_for_half_inputs():
    loss = per_element_loss(PRED.bfloat16(), TARGET.bfloat16(), "huber", C)
    assert loss.dtype == torch.float32
    assert torch.equal(loss.view(2, 2), torch.tensor([[0.0, 8.0], [0.75, 0.0]]))


def test_huber_bounds_the_pull_of_outliers_and_is_mse_for_small_errors():
    """What Huber is for: an outlier's gradient is at most 2c (MSE's grows with the error), while small errors
    are treated as MSE treats them."""
    errors = torch.tensor([1e-3, 10.0, 1000.0]).view(3, 1, 1, 1).requires_grad_()
    c = torch.full((3,), 0.1)
    per_element_loss(errors, torch.zeros_like(errors), "huber", c).sum().backward()
    assert errors.grad.abs().max() <= 0.2 and errors.grad.flatten()[2] > 0.199
    mse_grad = 2 * errors.detach()  # d(d^2)/dd
    assert mse_grad.flatten()[2] == 2000.0
    small = per_element_loss(errors.detach()[:1], torch.zeros(1, 1, 1, 1), "huber", c[:1])
    # = d^2 while d << c (within fp32 rounding: kohya's formula subtracts two close numbers)
    assert small.item() == pytest.approx(1e-6, rel=1e-2)


def test_per_element_loss_refuses_a_missing_threshold():
    with pytest.raises(SdtuneError, match="train.loss: huber"):
        per_element_loss(PRED, TARGET, "huber")


ALPHAS = torch.tensor([0.8, 0.5, 0.2, 0.1])  # a 4-step schedule: sigma = sqrt((1 - a) / a) = 0.5, 1, 2, 3


@pytest.mark.parametrize("schedule,c,timesteps,expected", [
    ("constant", 0.1, [0, 1, 3], [0.1, 0.1, 0.1]),
    # c ** (t / T): 1 at t = 0, sqrt(0.25) at t = T/2, 0.25 at t = T
    ("exponential", 0.25, [0, 2, 4], [1.0, 0.5, 0.25]),
    # (1 - c) / (1 + sigma)^2 + c: 0.9/2.25 + 0.1, 0.9/4 + 0.1, 0.9/9 + 0.1
    ("snr", 0.1, [0, 1, 2], [0.5, 0.325, 0.2]),
])
def test_huber_threshold_schedules_match_hand_computed_values(schedule, c, timesteps, expected):
    found = huber_threshold(schedule, c, torch.tensor(timesteps), ALPHAS)
    assert found.shape == (len(timesteps),) and found.dtype == torch.float32
    assert torch.allclose(found, torch.tensor(expected), atol=1e-7), found


def test_the_snr_schedule_goes_from_mse_at_low_noise_to_huber_c_at_high_noise():
    objective = DiffusionObjective(DDPMScheduler(num_train_timesteps=1000))
    c = objective.huber_threshold(torch.tensor([0, 500, 999]), 0.1, "snr")
    assert c[0] > 0.95 and c[2] == pytest.approx(0.1, abs=1e-3) and c[0] > c[1] > c[2]


def test_huber_with_min_snr_weights_each_examples_mean_as_kohya_does():
    """loss = mean_b(min(SNR_b, gamma) / SNR_b * mean(huber(pred_b - target_b, c(t_b)))), kohya's order."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = DiffusionObjective(scheduler, "epsilon", snr_gamma=5.0)
    family = SimpleNamespace(predict=lambda denoiser, noisy, t, cond: torch.zeros_like(noisy))  # pred = 0
    latents = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    function = LossFunction("huber", 0.1, "snr")
    out = training_step(None, family, objective, latents, {}, torch.Generator().manual_seed(7),
                        loss_function=function)

    noise, t = objective.sample(latents, torch.Generator().manual_seed(7))  # the step's own draws
    a = scheduler.alphas_cumprod[t]
    sigma = ((1 - a) / a).sqrt()
    c = ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).view(3, 1, 1, 1)
    huber = (2 * c * ((noise**2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    snr = a / (1 - a)
    expected = (torch.clamp(snr, max=5.0) / snr * huber).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-6), (out.loss, expected)
    mse = training_step(None, family, objective, latents, {}, torch.Generator().manual_seed(7))
    assert not torch.allclose(out.loss, mse.loss)


def test_loss_function_refuses_unknown_names():
    with pytest.raises(SdtuneError, match="train.loss"):
        LossFunction("l1")
    with pytest.raises(SdtuneError, match="train.huber_schedule"):
        LossFunction("huber", 0.1, "linear")


@pytest.mark.slow
def test_train_loss_keys_reach_the_training_step(tiny_model, tmp_path):
    """train.loss / huber_c / huber_schedule change the logged loss of the same run (same seed and draws)."""
    def first_loss(*extra):
        out = tmp_path / "-".join(extra).replace("=", "_").replace(".", "_") if extra else tmp_path / "mse"
        train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=1", *extra)))
        return json.loads((out / "losses.jsonl").read_text().splitlines()[0])["loss"]

    mse = first_loss()
    huber = first_loss("train.loss=huber", "train.huber_schedule=constant", "train.huber_c=0.05")
    smooth = first_loss("train.loss=smooth_l1", "train.huber_schedule=constant", "train.huber_c=0.05")
    # with a constant c the two robust losses differ by exactly the factor c (2c(...) vs 2(...))
    assert huber == pytest.approx(0.05 * smooth, rel=1e-5)
    assert huber != pytest.approx(mse, rel=1e-3)
