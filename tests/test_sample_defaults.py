"""`sdtune sample RUN` (and the model options `sdtune eval` shares with it) default to what the run did: its grids'
guidance, steps, seeds, negative prompt and prompts, its quantization and, on a GPU, its mixed precision. Checked
on the pixels: the run's last grid drawn again, bit for bit, from the cells `sdtune sample RUN` renders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import overrides
from sdtune.cli import build_parser, main
from sdtune.cli.sample import _request, quantization, run_dtype, run_grid_prompts
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.grid import Cell, layout


def _cells(grid: Path) -> list[Path]:
    return sorted((grid.parent / f"{grid.stem}_cells").glob("cell-*.png"))


def _sidecar(cell: Path) -> dict:
    return json.loads(cell.with_suffix(".json").read_text())


def _as_training_grid(grid: Path, title: str) -> np.ndarray:
    """The cells of ``sdtune sample``'s ``grid`` laid out as training lays out its grid (cells without a LoRA
    scale, the step as title): the picture training wrote, if every cell is the same."""
    cells = _cells(grid)
    keys = [Cell(s["cell"]["prompt"], s["cell"]["seed"], s["cell"]["guidance_scale"]) for s in map(_sidecar, cells)]
    return np.asarray(layout(keys, [Image.open(c).convert("RGB") for c in cells], title=title))


def _picture(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def guided_run(tiny_model, tmp_path_factory):
    """A tiny SDXL run whose grids use none of sdtune sample's defaults: guidance 5 (the SDXL recipe's), 3 steps,
    seeds 3 and 5, a negative prompt, two prompts of its own (without sample.prompts, training's grid shows each
    concept's first caption, which the run's config does not hold: the demo photos' captions differ)."""
    from sdtune.train import train

    out = tmp_path_factory.mktemp("guided") / "run"
    train(load_config(None, overrides(tiny_model("sdxl"), out, "train.learning_rate=5e-2", "sample.guidance_scale=5.0",
                                      "sample.steps=3", "sample.seeds=[3,5]", "sample.negative_prompt=blurry",
                                      "sample.prompts=[a photo of sks toy, a photo of sks toy on the moon]")))
    return out


def test_sample_run_draws_its_last_grid_again(guided_run, tmp_path, capsys):
    grid = tmp_path / "g.png"
    assert main(["sample", str(guided_run), "--lora-scale", "1", "--out", str(grid)]) == 0, capsys.readouterr().err
    sides = [_sidecar(c) for c in _cells(grid)]
    assert [(s["cell"]["prompt"][-7:], s["cell"]["seed"], s["cell"]["guidance_scale"]) for s in sides] == [
        ("sks toy", 3, 5.0), ("sks toy", 5, 5.0), ("he moon", 3, 5.0), ("he moon", 5, 5.0)]
    assert {(s["settings"]["steps"], s["settings"]["negative_prompt"], s["dtype"]) for s in sides} == \
        {(3, "blurry", "fp32")}
    assert np.array_equal(_as_training_grid(grid, "step 4"), _picture(guided_run / "samples" / "step-000004.png"))
    # a cell's sidecar replays it with the run's settings it recorded
    replay = tmp_path / "again.png"
    assert main(["sample", "--replay", str(_cells(grid)[1].with_suffix(".json")), "--out", str(replay)]) == 0
    assert np.array_equal(_picture(replay), _picture(_cells(grid)[1]))

    # a flag given wins: sdtune's old defaults, given, draw other pixels
    flags = tmp_path / "flags.png"
    assert main(["sample", str(guided_run), "--lora-scale", "1", "--guidance", "7.5", "--steps", "25",
                 "--negative-prompt", "", "--seeds", "3,5", "--out", str(flags)]) == 0
    sides = [_sidecar(c) for c in _cells(flags)]
    assert {(s["cell"]["guidance_scale"], s["settings"]["steps"], s["settings"]["negative_prompt"]) for s in sides} \
        == {(7.5, 25, "")}
    assert not np.array_equal(_picture(_cells(flags)[0]), _picture(_cells(grid)[0]))


def test_a_lora_file_outside_its_run_keeps_the_plain_defaults(guided_run, tmp_path):
    alone = tmp_path / "alone.safetensors"
    shutil.copy(guided_run / "pytorch_lora_weights.safetensors", alone)
    model = load_config(guided_run / "config.yaml").model.pretrained
    args = build_parser().parse_args(["sample", str(alone), "--model", model, "--prompt", "a photo of sks toy"])
    req, out = _request(args)
    assert [(c.seed, c.guidance_scale) for c in req.cells if c.lora_scale == 1] == [(s, None) for s in range(4)]
    assert (req.settings.steps, req.settings.negative_prompt, req.settings.scheduler, req.dtype) == \
        (25, "", "dpmpp_2m", "fp32")
    # in the run: its grids' settings (a checkpoint folder's own config, the same here)
    req, _ = _request(build_parser().parse_args(["sample", str(guided_run / "pytorch_lora_weights.safetensors")]))
    assert [(c.seed, c.guidance_scale) for c in req.cells if c.lora_scale == 1] == [(3, 5.0), (5, 5.0)] * 2
    assert (req.settings.steps, req.settings.negative_prompt) == (3, "blurry")


def test_the_grid_prompts_are_the_runs_with_its_class_prompts():
    run = {"data": {"instance_prompt": "a photo of sks dog"}, "prior": {"class_prompt": "a photo of a dog"},
           "sample": {"prompts": []}}
    assert run_grid_prompts(run) == ["a photo of sks dog", "a photo of a dog"]
    concepts = {"data": {"concepts": [{"instance_prompt": "a sks dog", "class_prompt": "a dog"},
                                      {"instance_prompt": "a ohwx cat", "class_prompt": "a dog"}]}}
    assert run_grid_prompts(concepts) == ["a sks dog", "a ohwx cat", "a dog"]
    assert run_grid_prompts({**run, "sample": {"prompts": ["a sks dog on the moon"]}}) == ["a sks dog on the moon"]
    assert run_grid_prompts({}) == []


def test_dtype_follows_the_run_on_a_gpu_only():
    bf16 = {"train": {"mixed_precision": "bf16"}}
    assert run_dtype(None, "cuda", bf16) == "bf16"
    assert run_dtype(None, "cuda:1", {"train": {"mixed_precision": "fp16"}}) == "fp16"
    assert run_dtype(None, "cpu", bf16) == "fp32"  # a CPU computes half precision slowly (fp16 hardly at all)
    assert run_dtype(None, "cuda", {"train": {"mixed_precision": "no"}}) == run_dtype(None, "cuda", {}) == "fp32"
    assert run_dtype("fp16", "cpu", bf16) == "fp16"  # --dtype wins


def _flags(quantize=None, text=None):
    from types import SimpleNamespace

    return SimpleNamespace(quantize=quantize, quantize_text_encoders=text)


def test_quantization_is_the_runs_unless_a_flag_says(monkeypatch, capsys):
    run = {"quantize": "nf4", "quantize_text_encoders": "fp8", "vae": "v"}
    assert quantization(dict(run), _flags()) == run
    assert "the run's model.quantize=nf4: quantized as in training (--quantize none" in capsys.readouterr().out
    assert quantization(dict(run), _flags("none", "none")) == {"vae": "v"}
    assert quantization(dict(run), _flags("fp8")) == {**run, "quantize": "fp8"}
    assert quantization({}, _flags("nf4", "none")) == {"quantize": "nf4"}

    # no bitsandbytes here: the run's nf4 is left out, in one line; asked for with the flag, refused in one
    import sdtune.quantize

    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(sdtune.quantize, "_bitsandbytes", missing)
    capsys.readouterr()
    assert quantization(dict(run), _flags()) == {"quantize_text_encoders": "fp8", "vae": "v"}
    note = capsys.readouterr().out.splitlines()
    assert note[0].startswith("note: the run's model.quantize=nf4 needs bitsandbytes") and "unquantized" in note[0]
    with pytest.raises(SdtuneError, match="--quantize: nf4 needs bitsandbytes; pip install bitsandbytes, or "
                       "--quantize fp8"):
        quantization(dict(run), _flags("nf4"))


def test_sample_of_a_quantized_run_is_quantized_as_its_grids(tiny_model, tmp_path, capsys):
    """The FLUX 16 GB recipe's quantization (NF4 transformer and text encoders), on the CPU: `sdtune sample RUN`
    loads the model as training did, and its cells are the run's grid's, bit for bit."""
    from sdtune.train import train

    run = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("flux"), run, "model.quantize=nf4",
                                      "model.quantize_text_encoders=nf4", "train.learning_rate=5e-2",
                                      "sample.prompts=[a photo of sks toy]")))
    capsys.readouterr()
    grid = tmp_path / "q.png"
    assert main(["sample", str(run), "--lora-scale", "1", "--out", str(grid)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "the run's model.quantize=nf4: quantized as in training" in out
    assert "the run's model.quantize_text_encoders=nf4" in out
    side = _sidecar(_cells(grid)[0])
    assert side["model_options"] == {"quantize": "nf4", "quantize_text_encoders": "nf4"}
    assert side["cell"]["guidance_scale"] == 3.5  # FLUX.1's, which the run's config records
    trained = _picture(run / "samples" / "step-000004.png")
    assert np.array_equal(_as_training_grid(grid, "step 4"), trained)

    plain = tmp_path / "plain.png"  # unquantized, as asked: other pixels
    assert main(["sample", str(run), "--lora-scale", "1", "--quantize", "none", "--quantize-text-encoders", "none",
                 "--out", str(plain)]) == 0
    assert _sidecar(_cells(plain)[0])["model_options"] == {}
    assert not np.array_equal(_as_training_grid(plain, "step 4"), trained)


def test_a_prompts_file_without_a_prompt_is_refused_not_replaced_by_the_runs(tmp_path, capsys):
    """An empty --prompts-file (or one of blank lines) is a mistake to name, not a cue to draw the run's prompts
    instead; one with prompts gives them, stripped, after any --prompt."""
    from types import SimpleNamespace

    from sdtune.cli.sample import read_prompts

    run_cfg = {"sample": {"prompts": ["a photo of sks toy"]}}
    listed = tmp_path / "prompts.txt"
    for text in ("", "\n  \n\t\n"):
        listed.write_text(text)
        code = main(["sample", "--model", str(tmp_path / "no-model"), "--prompts-file", str(listed),
                     "--out", str(tmp_path / "g.png")])
        assert code == 2 and capsys.readouterr().err == (f"error: --prompts-file: {listed} holds no prompt; write "
                                                         "one prompt per line\n")
        with pytest.raises(SdtuneError, match="holds no prompt"):  # a --prompt beside it does not excuse it
            read_prompts(SimpleNamespace(prompt=["a dog"], prompts_file=str(listed)), run_cfg)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "g_cells").exists()
    listed.write_text(" a sks toy on grass \n\na sks toy at night\n")
    assert read_prompts(SimpleNamespace(prompt=["a dog"], prompts_file=str(listed)), run_cfg) == [
        "a dog", "a sks toy on grass", "a sks toy at night"]
    assert read_prompts(SimpleNamespace(prompt=None, prompts_file=None), run_cfg) == ["a photo of sks toy"]
