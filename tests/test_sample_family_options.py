"""`sdtune sample` (and `eval`, training's checks) against what a model's family cannot take: a prediction type or
clip skip on FLUX.1 / SD3.x (refused in the words training uses, before anything loads), a width or height its
pipeline does not render, a negative prompt FLUX.1 ignores, guidance on a FLUX.1 model without a guidance input
(schnell), and --base on a whole model. Each is one line naming the option as the user wrote it."""

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import overrides
from sdtune.cli import build_parser, main
from sdtune.cli.sample import _request, family_sampling
from sdtune.config import ConfigError, load_config
from sdtune.models import inspect_model
from sdtune.plan import check_run


@pytest.fixture(autouse=True)
def _nothing_loads(monkeypatch):
    """Every refusal here comes before any weight loads: loading one is a test failure."""
    import sdtune.sample

    def loaded(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(sdtune.sample, "load_components", loaded)


@pytest.fixture(scope="module")
def schnell(tiny_model, tmp_path_factory) -> Path:
    """The tiny FLUX.1 model without a guidance embedding: FLUX.1-schnell's transformer config."""
    folder = tmp_path_factory.mktemp("schnell") / "m"
    shutil.copytree(tiny_model("flux"), folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"guidance_embeds": False}))
    return folder


def _sample(model: Path, tmp_path: Path, *flags: str) -> list[str]:
    return ["sample", "--model", str(model), "--prompt", "a photo of sks toy", "--seeds", "0", "--steps", "1",
            "--out", str(tmp_path / "g.png"), *flags]


def _refused(argv: list[str], tmp_path: Path, capsys) -> str:
    """The one error line `sdtune` exits with (2: a user error), having written no grid."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and not (tmp_path / "g.png").exists()
    return err[0].removeprefix("error: ")


def _training_problems(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(model, tmp_path / "run", *extra)), strict=True)
    return e.value.problems


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_prediction_type_and_clip_skip_are_refused_as_training_refuses_them(family, tiny_model, tmp_path, capsys):
    model = tiny_model(family)
    # was: "unexpected AttributeError: 'FrozenDict' object has no attribute 'prediction_type'" once loaded
    line = _refused(_sample(model, tmp_path, "--prediction-type", "v_prediction"), tmp_path, capsys)
    trained = [p for p in _training_problems(model, tmp_path, "model.prediction_type=v_prediction")
               if p.startswith("model.prediction_type")]
    assert trained == [line.replace("--prediction-type", "model.prediction_type")]
    assert "predict the flow (noise - latents); remove it" in line
    # was: accepted, and the images changed; training refused it (FLUX: in two different lines)
    line = _refused(_sample(model, tmp_path, "--clip-skip", "2"), tmp_path, capsys)
    trained = [p for p in _training_problems(model, tmp_path, "model.clip_skip=2") if "clip_skip" in p]
    assert trained == [line.replace("--clip-skip", "model.clip_skip")] and line.startswith("--clip-skip: ")


@pytest.mark.parametrize(("family", "label", "flag", "side", "fix"), [
    ("flux", "FLUX.1", "--width", 72, "64 or 80"), ("flux", "FLUX.1", "--height", 40, "32 or 48"),
    ("sd3", "SD3.x", "--width", 72, "64 or 80")])
def test_a_size_the_pipeline_does_not_render_is_refused(family, label, flag, side, fix, tiny_model, tmp_path, capsys):
    # was: FLUX drew 64 px and recorded 72; SD3 loaded, then failed every cell with diffusers' own message. (SD's
    # multiple, 8, is --width / --height's own argument check.)
    line = _refused(_sample(tiny_model(family), tmp_path, flag, str(side)), tmp_path, capsys)
    assert line == f"{flag}: {side} is not a multiple of 16, the sides {label}'s pipeline renders; fix: {flag} {fix}"


def test_sizes_each_pipeline_renders_are_taken(tiny_model, tmp_path):
    # SD's pipelines take any multiple of 8 (its UNet resamples), FLUX.1 and SD3.x multiples of 16
    for family, width in (("sd15", 72), ("flux", 80), ("sd3", 48)):
        args = build_parser().parse_args(_sample(tiny_model(family), tmp_path, "--width", str(width)))
        assert _request(args)[0].settings.width == width


def test_flux_negative_prompts_are_refused_or_left_out(tiny_model, tmp_path, capsys):
    flux = tiny_model("flux")
    # was: drawn pixel-identical to no negative prompt, while the sidecar recorded it
    line = _refused(_sample(flux, tmp_path, "--negative-prompt", "blurry, dog"), tmp_path, capsys)
    assert line.startswith("--negative-prompt: FLUX.1 is guidance-distilled") and "true_cfg_scale" in line
    # a run's sample.negative_prompt: left out (no sidecar records it), with a note
    info = inspect_model(str(flux), for_training=False)
    _, _, shared = family_sampling(Namespace(guidance=None, negative_prompt=None), info, [None], [0],
                                   {"negative_prompt": "blurry", "steps": 1})
    assert shared == {"negative_prompt": "", "steps": 1}
    assert "note: the run's sample.negative_prompt: FLUX.1 is guidance-distilled" in capsys.readouterr().err
    # an SD3.x model samples with classifier-free guidance: its negative prompt stays
    args = build_parser().parse_args(_sample(tiny_model("sd3"), tmp_path, "--negative-prompt", "blurry"))
    assert _request(args)[0].settings.negative_prompt == "blurry"
    # training: a warning (--strict: refused), where --dry-run said nothing
    plan = check_run(load_config(None, overrides(flux, tmp_path / "run", "sample.negative_prompt=blurry")))
    assert [w for w in plan.warnings if w.startswith("sample.negative_prompt: FLUX.1 is guidance-distilled")]
    assert any(p.startswith("sample.negative_prompt") and p.endswith("(--strict)")
               for p in _training_problems(flux, tmp_path, "sample.negative_prompt=blurry"))


def test_eval_refuses_a_flux_negative_prompt(tiny_model, tmp_path, capsys):
    from sdtune.cli.eval import _settings

    args = Namespace(negative_prompt="blurry", steps=1, scheduler="dpmpp_2m", width=None, height=None, batch_size=1)
    with pytest.raises(Exception, match="^--negative-prompt: FLUX.1 is guidance-distilled"):
        _settings(args, Namespace(steps=1), str(tiny_model("flux")), None, {})


def test_schnell_guidance_is_said_to_do_nothing_and_drawn_once(schnell, tiny_model, tmp_path, capsys):
    from sdtune.sample import with_family_defaults

    # was: two rows of the same pixels, labelled 0.0 and 3.5, without a word
    args = build_parser().parse_args(_sample(schnell, tmp_path, "--guidance", "0,3.5"))
    req = with_family_defaults(_request(args)[0])
    assert [c.guidance_scale for c in req.cells] == [0.0]  # one row, at schnell's own guidance
    err = capsys.readouterr().err
    assert "note: --guidance: " in err and "no guidance input (guidance_embeds: false" in err
    # FLUX.1-dev's guidance is an input: both rows stay, no note
    args = build_parser().parse_args(_sample(tiny_model("flux"), tmp_path, "--guidance", "0,3.5"))
    assert [c.guidance_scale for c in _request(args)[0].cells] == [0.0, 3.5]
    assert "no guidance input" not in capsys.readouterr().err
    # training: flux.guidance_scale on schnell is a warning (--strict: refused); dev takes it silently
    plan = check_run(load_config(None, overrides(schnell, tmp_path / "run", "flux.guidance_scale=3.0")))
    assert [w for w in plan.warnings if w.startswith("flux.guidance_scale: this FLUX.1 model has no guidance input")]
    assert any(p.startswith("flux.guidance_scale") for p in _training_problems(schnell, tmp_path,
                                                                                "flux.guidance_scale=3.0"))
    plan = check_run(load_config(None, overrides(tiny_model("flux"), tmp_path / "dev", "flux.guidance_scale=3.0")))
    assert not [w for w in plan.warnings if "guidance" in w]
    # the run's grids (and its model card's snippet) sample schnell at its own 0.0, not dev's 3.5
    plan = check_run(load_config(None, overrides(schnell, tmp_path / "run")))
    assert plan.model.family.sampling.guidance_scale == 0.0


def test_base_on_a_whole_model_names_the_flag(tiny_model, tmp_path, capsys):
    flux = tiny_model("flux")
    line = _refused(_sample(flux, tmp_path, "--base", str(flux)), tmp_path, capsys)
    assert line.startswith("--base: only a FLUX.1 or SD3.x transformer file") and line.endswith("fix: remove --base")
    assert "model.base" not in line


def test_the_model_card_shows_a_negative_prompt_only_where_the_pipeline_uses_one():
    """A FLUX.1 run's card showed `negative_prompt=...`, which FluxPipeline ignores at its defaults."""
    from sdtune import families, share

    config = {"model": {"pretrained": "x"}, "sample": {"negative_prompt": "blurry"}}
    assert "negative_prompt" not in share._call_options(config, families.get("flux"))
    assert "negative_prompt='blurry'" in share._call_options(config, families.get("sd15"))


def test_fp16_training_of_flux_is_warned(tiny_model, tmp_path):
    """FLUX.1 in fp16 went non-finite on the GPU (bench/RESULTS.md, Run 3) as kohya's users report: the family
    warns of it (check_run adds its config warnings, refused under --strict: the negative-prompt test above; fp16
    itself needs a GPU, so the plan on this CPU refuses it first); bf16, and SD3.x in fp16, say nothing."""
    for model, precision, warned in (("flux", "fp16", True), ("flux", "bf16", False), ("sd3", "fp16", False)):
        path = tiny_model(model)
        cfg = load_config(None, overrides(path, tmp_path / "run", f"train.mixed_precision={precision}"))
        warnings = inspect_model(str(path), for_training=False).family.config_warnings(cfg)
        said = [w for w in warnings if w.startswith("train.mixed_precision: fp16 overflows FLUX.1's activations")]
        assert bool(said) == warned, (model, precision, warnings)
