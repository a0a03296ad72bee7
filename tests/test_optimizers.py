"""train.optimizer: Prodigy, Adafactor, Lion, 8-bit Lion and the schedule-free AdamW and Prodigy beside AdamW,
with their authors' LoRA settings; train.optimizer_args checked against each optimizer's real signature at plan
time; exact resume with each; a schedule-free run shows and saves its average."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import overrides
from sdtune.config import ConfigError, load_config
from sdtune.export import read_run
from sdtune.lora import WEIGHT_NAME
from sdtune.optim import (
    OPTIMIZERS,
    averaged_weights,
    make_optimizer,
    optimizer_problems,
    start_training,
    step_size_logs,
)
from sdtune.plan import check_run
from sdtune.train import train

BETAS, EPS, WD = (0.9, 0.999), 1e-8, 0.0


def _make(name, params, lr, **args):
    optimizer = make_optimizer(name, [{"params": params, "lr": lr}], BETAS, EPS, WD, args)
    start_training(optimizer)  # as the loop does: a schedule-free optimizer steps in its training mode only
    return optimizer


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("adamw8bit", 1e-2), ("prodigy", 1.0),
                                     ("adafactor", 1e-2), ("lion", 1e-2), ("lion8bit", 1e-2),
                                     ("adamw_schedulefree", 1e-2), ("prodigy_schedulefree", 1.0)])
def test_every_optimizer_fits_a_small_problem(name, lr):
    """Each choice builds from its name alone and trains: 200 steps on a least-squares problem."""
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(64, 16, generator=g), torch.randn(16, 72, generator=g)
    w = torch.nn.Parameter(torch.zeros(16, 72))  # 1,152 values: under 8-bit state's 4,096, as a LoRA's A is
    opt = _make(name, [w], lr)

    def loss():
        return ((x @ w - x @ w_true) ** 2).mean()

    start = loss().item()
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5 * start, (name, start, loss().item())


def test_prodigy_has_its_authors_diffusion_settings_and_finds_its_step_size():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = _make("prodigy", [w], 1.0)
    group = opt.param_groups[0]
    assert group["use_bias_correction"] and group["safeguard_warmup"] and group["d_coef"] == 1.0
    assert _make("prodigy", [w], 1.0, d_coef=2, safeguard_warmup=False).param_groups[0]["d_coef"] == 2
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(100):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    # the step size d starts at d0 = 1e-6 and grows to the problem's scale by itself (the lr stays 1.0)
    assert step_size_logs(opt)["d"] > 1e-3
    assert step_size_logs(_make("adafactor", [w], 1e-2)) == {}  # its param group's "d" is a clip threshold
    assert step_size_logs(_make("lion", [w], 1e-3)) == {}


def test_adafactor_steps_at_the_fixed_learning_rate():
    """torch's Adafactor scales its step by max(eps2, RMS(weight)): with its default eps2 = 1e-3 a
    zero-initialised tensor (lora_B) would move 1000x slower than the learning rate. sdtune's eps2 = 1.0 makes
    the step the learning rate itself, as kohya's relative_step=False, scale_parameter=False."""
    lr = 1e-3
    w = torch.nn.Parameter(torch.zeros(32))
    opt = _make("adafactor", [w], lr)
    w.grad = torch.randn(32, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert torch.allclose(w.detach().abs(), torch.full((32,), lr), rtol=1e-5)
    assert torch.equal(torch.sign(w.detach()), -torch.sign(w.grad))
    matrix = torch.nn.Parameter(torch.zeros(16, 8))  # factored second moments
    opt = _make("adafactor", [matrix], lr)
    matrix.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    opt.step()
    assert 0.3 * lr < matrix.detach().pow(2).mean().sqrt() <= lr * 1.0001


@pytest.mark.parametrize("name", ["lion", "lion8bit"])
def test_lion_moves_every_weight_by_the_learning_rate(name):
    """Lion's update is a sign: every weight moves by the full learning rate (why its lr is 3-10x below
    AdamW's)."""
    lr = 1e-3
    w = torch.nn.Parameter(torch.zeros(64, 80))  # 5,120 values: 8-bit state for lion8bit
    opt = _make(name, [w], lr)
    w.grad = torch.randn(64, 80, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert torch.allclose(w.detach(), -lr * torch.sign(w.grad))
    if name == "lion8bit":
        assert opt.state[w]["state1"].dtype == torch.uint8


def test_our_lion8bit_updates_exactly_as_bitsandbytes():
    """The 8-bit optimizers' step without bitsandbytes' per-tensor host syncs: the same numbers."""
    import bitsandbytes as bnb

    def run(make):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 128, generator=g)),
                  torch.nn.Parameter(torch.randn(8, generator=g))]
        opt = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params

    ours = run(lambda ps: make_optimizer("lion8bit", [{"params": ps, "lr": 1e-3}], (0.9, 0.99), 1e-8, 0.01))
    theirs = run(lambda ps: bnb.optim.Lion8bit([{"params": ps, "lr": 1e-3}], betas=(0.9, 0.99),
                                               weight_decay=0.01))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# --------------------------------------------------------------------------------------------------------
# Plan-time checks: before any weight loads


def test_unknown_optimizer_args_are_refused_with_the_real_names():
    problems, _ = optimizer_problems("prodigy", {"d_coeff": 2}, 1.0)
    assert problems == ["train.optimizer_args.d_coeff: Prodigy has no argument 'd_coeff'; it takes beta3, "
                        "d0, d_coef, decouple, fsdp_in_use, growth_rate, safeguard_warmup, slice_p, "
                        "use_bias_correction"]
    problems, _ = optimizer_problems("lion", {"eps": 1e-6}, 1e-5, adam_beta2=0.99)
    assert problems == ["train.optimizer_args.eps: Lion has no argument 'eps'; it takes "
                        "decoupled_weight_decay, use_triton"]
    args = {"d_coef": 2, "safeguard_warmup": False, "slice_p": 11}
    assert optimizer_problems("prodigy", args, 1.0) == ([], [])
    assert optimizer_problems("adamw", {"amsgrad": True}, 1e-4) == ([], [])


@pytest.mark.parametrize("name,args,expected", [
    ("prodigy", {"lr": 2.0},
     "train.optimizer_args.lr: Prodigy's lr is set from train.learning_rate; set it there"),
    ("adamw", {"betas": 0.9}, "train.optimizer_args.betas: AdamW's betas is set from train.adam_beta1 and "
                              "train.adam_beta2; set it there"),
    ("adafactor", {"eps": 1e-3}, "train.optimizer_args.eps: sdtune sets Adafactor's eps to (None, 1.0)"),
    ("prodigy", {"d_coef": "large"},
     "train.optimizer_args.d_coef: Prodigy's d_coef is a number (default 1.0), got 'large'"),
    ("prodigy", {"slice_p": 1.5}, "train.optimizer_args.slice_p: Prodigy's slice_p is a whole number"),
    ("prodigy", {"use_bias_correction": 1}, "train.optimizer_args.use_bias_correction: Prodigy's "
                                            "use_bias_correction is true or false (default False), got 1"),
    # the optimizer's own range checks, run on a dummy tensor
    ("prodigy", {"d0": -1.0}, "train.optimizer_args: Prodigy refuses d0=-1.0: Invalid d0 value: -1.0"),
    ("adafactor", {"beta2_decay": 0.5},
     "train.optimizer_args: Adafactor refuses beta2_decay=0.5: beta2_decay"),
    # a value only its step reads (no default to compare with): the check steps the dummy once
    ("prodigy", {"beta3": "high"}, "train.optimizer_args: Prodigy refuses beta3='high': "),
    # a hostile value is shown cut short
    ("prodigy", {"d_coef": "x" * 10**6}, "train.optimizer_args.d_coef: Prodigy's d_coef is a number (default "
                                         "1.0), got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxx"),
])
def test_optimizer_args_problems_name_the_key_and_the_fix(name, args, expected):
    problems, _ = optimizer_problems(name, args, 1.0 if name == "prodigy" else 1e-4)
    assert len(problems) == 1 and problems[0].startswith(expected) and len(problems[0]) < 300, problems


def test_a_missing_package_is_refused_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt raises ImportError
    problems, _ = optimizer_problems("prodigy", {}, 1.0)
    assert len(problems) == 1 and problems[0].startswith("train.optimizer: prodigy needs prodigyopt (")
    assert "pip install prodigyopt, or set train.optimizer=adamw" in problems[0]
    with pytest.raises(Exception, match="pip install prodigyopt"):
        _make("prodigy", [torch.nn.Parameter(torch.zeros(2))], 1.0)


@pytest.mark.parametrize("name,lr,te_lr,beta2,expected", [
    ("prodigy", 1e-4, None, 0.999, ["train.learning_rate: 0.0001 with train.optimizer=prodigy"]),
    ("prodigy", 1.0, 1e-5, 0.999, ["lora.text_encoder_lr: 1e-05 with train.optimizer=prodigy"]),
    ("prodigy", 1.0, None, 0.999, []),
    ("prodigy", 0.5, 2.0, 0.999, []),  # within [0.1, 10]: a deliberate scale
    ("lion", 1e-4, None, 0.99, ["train.learning_rate: 0.0001 looks like an AdamW learning rate"]),
    ("lion8bit", 2e-5, None, 0.999, ["train.adam_beta2: 0.999 with Lion, whose authors use 0.99"]),
    ("lion", 2e-5, None, 0.99, []),
    ("adafactor", 1e-4, None, 0.999, []),
    ("prodigy_schedulefree", 1e-4, None, 0.999, ["train.learning_rate: 0.0001 with train.optimizer=prodigy_sched"]),
    ("adamw_schedulefree", 1e-3, None, 0.999, []),
])
def test_learning_rate_advice(name, lr, te_lr, beta2, expected):
    problems, warnings = optimizer_problems(name, {}, lr, te_lr, beta2)
    assert problems == []
    assert len(warnings) == len(expected)
    assert [w[: len(e)] for w, e in zip(warnings, expected, strict=True)] == expected


def test_check_run_reports_optimizer_problems_and_advice_before_weights(tiny_model, tmp_path):
    model = tiny_model("sd15")
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(model, tmp_path / "a", "train.optimizer=prodigy",
                                              "train.optimizer_args={d_coeff: 2}")))
    assert "train.optimizer_args.d_coeff: Prodigy has no argument 'd_coeff'; it takes beta3, d0, d_coef" \
        in str(e.value)
    plan = check_run(load_config(None, overrides(model, tmp_path / "b", "train.optimizer=lion")))
    advice = "train.learning_rate: 0.0001 looks like an AdamW learning rate"
    assert any(w.startswith(advice) for w in plan.warnings)
    with pytest.raises(ConfigError, match=r"train.adam_beta2: 0.999 with Lion.*\(--strict\)"):
        check_run(load_config(None, overrides(model, tmp_path / "c", "train.optimizer=lion",
                                              "train.learning_rate=2e-5")), strict=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_optimizer_choice_of_the_recipe_has_a_spec():
    from typing import get_args

    from sdtune.config import TrainConfig

    assert set(get_args(TrainConfig.model_fields["optimizer"].annotation)) == set(OPTIMIZERS)


# --------------------------------------------------------------------------------------------------------
# Exact resume: the optimizer's state is in the checkpoint


RESUME = {
    "prodigy": ["train.optimizer=prodigy", "train.learning_rate=1.0", "train.optimizer_args={d_coef: 2}",
                "train.lr_scheduler=cosine"],
    "lion": ["train.optimizer=lion", "train.learning_rate=3e-4", "train.adam_beta2=0.99"],
    "adafactor": ["train.optimizer=adafactor", "train.learning_rate=1e-3"],
    # the split run's step-3 checkpoint and a sample grid switch the LoRA to the average and back: the straight
    # run, which does neither, must still train bit for bit the same
    "adamw_schedulefree": ["train.optimizer=adamw_schedulefree", "train.learning_rate=1e-3",
                           "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=2"],
    "prodigy_schedulefree": ["train.optimizer=prodigy_schedulefree", "train.learning_rate=1.0",
                             "train.max_grad_norm=0", "train.adam_beta2=0.99"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME))
def test_resume_with_the_optimizer_continues_bitwise(case, tiny_model, tmp_path):
    """A run stopped after its step-3 checkpoint and resumed ends with the same weights, bit for bit, and logs
    the same losses (and Prodigy's step size d) as the run that never stopped."""
    common = ["train.max_steps=6", "lora.rank=8", *RESUME[case]]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, overrides(tiny_model("sd15"), straight, *common)))
    train(load_config(None, overrides(tiny_model("sd15"), split, "train.checkpoint_every=3", "sample.every=2",
                                      *common)))
    shutil.rmtree(split / "checkpoints/step-000006")
    (split / WEIGHT_NAME).unlink()
    train(load_config(None, overrides(tiny_model("sd15"), split, "train.resume=latest", *common)))

    def logs(run):
        return {r["step"]: r for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}

    keys = ("loss", "d") if case == "prodigy" else ("loss",)
    assert [[logs(split)[k][key] for key in keys] for k in range(1, 7)] == \
        [[logs(straight)[k][key] for key in keys] for k in range(1, 7)]
    a = load_file(straight / "checkpoints/step-000006/adapter-unet.safetensors")
    b = load_file(split / "checkpoints/step-000006/adapter-unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(split / "checkpoints/step-000003/adapter-unet.safetensors")
    assert any(not torch.equal(before[k], a[k]) for k in a)  # the resumed steps trained


# --------------------------------------------------------------------------------------------------------
# Schedule-free: trains at y, shows and saves the average x


def test_averaged_weights_switch_to_the_average_and_back_bit_for_bit():
    """Inside, the parameters are Schedule-Free's x = y + (1 - 1/beta1)(z - y) (its eval()); after, exactly
    the y the steps left (its train() would lerp back and round); nested, the inner block changes nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    opt = _make("adamw_schedulefree", [w], 1e-2)
    for _ in range(5):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    y, z = w.detach().clone(), opt.state[w]["z"].clone()
    with averaged_weights(opt) as averaged:
        assert averaged
        assert torch.allclose(w, y + (1 - 1 / BETAS[0]) * (z - y), atol=1e-6) and not torch.equal(w, y)
        x = w.detach().clone()
        with averaged_weights(opt) as inner:
            assert not inner and torch.equal(w, x)
        assert torch.equal(w, x)
    assert torch.equal(w, y) and opt.param_groups[0]["train_mode"]
    plain = _make("adamw", [w], 1e-2)
    with averaged_weights(plain) as averaged:
        assert not averaged and torch.equal(w, y)


@pytest.mark.slow
def test_a_schedule_free_run_saves_its_average_and_resumes_from_its_training_point(tiny_model, tmp_path):
    """Each checkpoint's LoRA file (and the final one) holds x; its adapters, what a resume continues, hold y,
    and with the optimizer's z they give that x: x = y + (1 - 1/beta1)(z - y)."""
    run = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd15"), run, "train.max_steps=4", "train.checkpoint_every=2",
                                      "train.optimizer=adamw_schedulefree", "train.learning_rate=1e-2")))
    for step in ("step-000002", "step-000004"):
        folder = run / "checkpoints" / step
        y = load_file(folder / "adapter-unet.safetensors")
        x = read_run(folder).adapters["unet"].tensors  # the LoRA file, in PEFT's names as the adapters
        zs = [s["z"] for s in torch.load(folder / "optimizer.pt", weights_only=True)["state"].values()]
        assert x.keys() == y.keys() and len(zs) == len(y)
        for name in y:
            assert not torch.equal(x[name], y[name]), name
            # the z of this tensor (matched by value, not by an order the files need not share)
            assert any(z.shape == y[name].shape and torch.allclose(x[name], y[name] + (1 - 1 / 0.9) * (z - y[name]),
                                                                   atol=1e-6) for z in zs), name
    assert json.loads((run / "train_summary.json").read_text())["lora_weights"] == "schedule-free average"
    final, last = load_file(run / WEIGHT_NAME), load_file(run / "checkpoints/step-000004" / WEIGHT_NAME)
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_schedule_free_settings_are_checked_before_weights(tiny_model, tmp_path):
    model = tiny_model("sd15")
    with pytest.raises(ConfigError, match=r"train.ema: train.optimizer=adamw_schedulefree already averages"):
        check_run(load_config(None, overrides(model, tmp_path / "a", "train.optimizer=adamw_schedulefree",
                                              "train.ema=true")))
    plan = check_run(load_config(None, overrides(model, tmp_path / "b", "train.optimizer=prodigy_schedulefree",
                                                 "train.learning_rate=1.0", "train.lr_scheduler=cosine")))
    assert any(w.startswith("train.lr_scheduler: cosine with train.optimizer=prodigy_schedulefree") for w in
               plan.warnings)
    assert any(w.startswith("train.max_grad_norm: 1 with train.optimizer=prodigy_schedulefree") for w in
               plan.warnings)
    plan = check_run(load_config(None, overrides(model, tmp_path / "c", "train.optimizer=adamw_schedulefree",
                                                 "train.lr_scheduler=constant_with_warmup",
                                                 "train.lr_warmup_steps=2")))
    assert not [w for w in plan.warnings if "schedulefree" in w]
    assert not any((tmp_path / n).exists() for n in "abc")
