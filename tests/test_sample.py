import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEMO_DATA, overrides
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.grid import Cell, Settings, layout
from sdtune.sample import render_cells
from sdtune.train import train


@pytest.fixture(scope="module")
def run(checkpointed_run):
    return checkpointed_run


def _cells(grid):
    return sorted((grid.parent / f"{grid.stem}_cells").glob("cell-*.png"))


def test_grid_axes_sidecars_and_replay(run, tmp_path, capsys):
    grid = tmp_path / "g.png"
    code = main(["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", "0,1", "--lora-scale", "0,1",
                 "--guidance", "3,7.5", "--steps", "2", "--batch-size", "2", "--out", str(grid)])
    assert code == 0, capsys.readouterr().err
    cells = _cells(grid)
    assert len(cells) == 8  # 1 prompt x 2 scales x 2 guidance x 2 seeds
    side = json.loads(cells[5].with_suffix(".json").read_text())
    assert set(side) >= {"model", "lora", "lora_sha256", "cell", "settings", "dtype", "device"}
    assert side["cell"]["seed"] in (0, 1) and side["settings"]["steps"] == 2
    # LoRA x0 is the base model; LoRA x1 differs from it
    by = {(json.loads(c.with_suffix(".json").read_text())["cell"]["lora_scale"],
           json.loads(c.with_suffix(".json").read_text())["cell"]["guidance_scale"],
           json.loads(c.with_suffix(".json").read_text())["cell"]["seed"]): np.asarray(Image.open(c)) for c in cells}
    assert not np.array_equal(by[(0.0, 3.0, 0)], by[(1.0, 3.0, 0)])
    # replay renders the same pixels: it batches the cell with the same seeds as the grid did (batched kernels
    # may round differently, so a cell rendered alone can differ by a pixel level)
    assert side["batch_seeds"] == [0, 1]
    from sdtune.sample import request_from_sidecar

    req = request_from_sidecar(cells[5].with_suffix(".json"))
    assert [c.seed for c in req.cells] == [0, 1] and req.target.seed == side["cell"]["seed"]
    replay = tmp_path / "again.png"
    assert main(["sample", "--replay", str(cells[5].with_suffix(".json")), "--out", str(replay)]) == 0
    assert np.array_equal(np.asarray(Image.open(replay)), np.asarray(Image.open(cells[5])))
    # a LoRA that changed since (a resumed run rewrites its file): refused, not other pixels without a word
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(Path(side["lora"]).read_bytes())
    sidecar = tmp_path / "cell.json"
    sidecar.write_text(json.dumps({**side, "lora": str(changed)}))
    capsys.readouterr()
    with changed.open("ab") as f:
        f.write(b" ")
    assert main(["sample", "--replay", str(sidecar), "--out", str(tmp_path / "x.png")]) == 2
    assert "has changed since cell.json was rendered" in capsys.readouterr().err


def test_checkpoints_all_gives_one_row_per_checkpoint(run, tmp_path):
    grid = tmp_path / "ckpt.png"
    assert main(["sample", str(run), "--checkpoints", "all", "--lora-scale", "1", "--seeds", "0", "--steps", "2",
                 "--out", str(grid)]) == 0
    labels = {json.loads(c.with_suffix(".json").read_text())["cell"]["checkpoint"] for c in _cells(grid)}
    assert labels == {"step-000002", "step-000004"}


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "outpaint"])
def test_image_modes_with_lora(mode, run, tmp_path):
    init = DEMO_DATA / "toy_00.png"  # 128 x 128
    args = ["sample", str(run), "--seeds", "0", "--steps", "3", "--lora-scale", "1", "--init-image", str(init),
            "--out", str(tmp_path / "g.png")]
    if mode == "inpaint":
        mask = Image.new("L", (128, 128), 0)
        mask.paste(255, (32, 32, 96, 96))
        mask.save(tmp_path / "mask.png")
        args += ["--mask", str(tmp_path / "mask.png")]
    if mode == "outpaint":
        args += ["--outpaint", "0,0,64,0"]
    assert main(args) == 0
    [cell] = _cells(tmp_path / "g.png")
    assert Image.open(cell).size == ((192, 128) if mode == "outpaint" else (128, 128))
    assert json.loads(cell.with_suffix(".json").read_text())["settings"]["mode"] == mode


def test_bad_inputs_are_one_line_errors(run, tmp_path, tiny_model, capsys):
    Image.new("L", (64, 64)).save(tmp_path / "small_mask.png")
    cases = [
        (["--init-image", str(DEMO_DATA / "toy_00.png"), "--mask", str(tmp_path / "small_mask.png")],
         "--mask: 64x64 but the init image is 128x128"),
        (["--init-image", str(tmp_path / "missing.png")], "--init-image: cannot read"),
        (["--init-image", str(DEMO_DATA / "metadata.jsonl")], "--init-image: cannot read"),
        (["--depth", "--init-image", str(DEMO_DATA / "toy_00.png")], "not a depth-to-image model"),
        (["--model", str(tmp_path / "nope")], "--model: "),  # the flag typed, not the recipe key
        (["--model", str(tiny_model("sdxl"))], "does not fit the base model"),
        (["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
    ]
    for extra, message in cases:
        code = main(["sample", str(run), "--steps", "1", "--seeds", "0", *extra, "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_a_failing_cell_keeps_the_others():
    class FlakyPipe:
        def __call__(self, prompt, generator, **kw):
            if generator[0].initial_seed() == 1:
                raise RuntimeError("boom")

            class Out:
                images = [Image.new("RGB", (32, 32), "red") for _ in prompt]

            return Out()

    cells = [Cell("p", s) for s in (0, 1, 2)]
    images, errors = render_cells(FlakyPipe(), cells, Settings(width=32, height=32))
    assert errors == [None, "boom", None]
    assert images[0].getpixel((0, 0)) == (255, 0, 0) and images[1].getpixel((0, 0)) != (255, 0, 0)
    assert layout(cells, images).width > 3 * 32


def _tiny_depth_model(sd2: Path, out: Path) -> Path:
    """A tiny SD2 depth-to-image pipeline: the tiny SD2 parts, a 5-channel UNet and a tiny DPT, as diffusers'
    own fast tests build it."""
    import torch
    from diffusers import StableDiffusionDepth2ImgPipeline, UNet2DConditionModel
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from sdtune import families
    from sdtune.models import load_components

    c = load_components(str(sd2), families.get("sd2"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**dict(c.denoiser.config), "in_channels": 5})  # latents + depth
    backbone = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                "hidden_sizes": [96, 192, 384, 768], "num_groups": 2}
    dpt = DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, backbone_out_indices=(0, 1, 2, 3),
        num_attention_heads=4, intermediate_size=37, is_hybrid=True, backbone_config=backbone,
        backbone_featmap_shape=[1, 384, 24, 24])).eval()
    StableDiffusionDepth2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=unet, scheduler=c.noise_scheduler,
        depth_estimator=dpt, feature_extractor=DPTImageProcessor(size={"height": 32, "width": 32}),
    ).save_pretrained(out, safe_serialization=True)
    return out


def test_depth_to_image_with_the_lora(tiny_model, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, overrides(tiny_model("sd2"), run, "train.max_steps=2",
                                      "data.instance_prompt=a photo of sks toy")))
    depth = _tiny_depth_model(tiny_model("sd2"), tmp_path / "depth")
    grid = tmp_path / "g.png"
    assert main(["sample", str(run), "--model", str(depth), "--depth", "--init-image", str(DEMO_DATA / "toy_00.png"),
                 "--seeds", "0", "--steps", "2", "--lora-scale", "0,1", "--out", str(grid)]) == 0
    cells = _cells(grid)
    assert len(cells) == 2 and json.loads(cells[1].with_suffix(".json").read_text())["settings"]["mode"] == "depth"
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))


def test_an_sd3_kohya_file_samples_and_one_beyond_the_layout_says_what_to_sample(tiny_model, tmp_path, capsys):
    """diffusers has no reader for SD3's kohya layout: sdtune reads the layout it writes (q, k, v split back
    from the fused qkv), with the pixels of the same LoRA's diffusers file. A file with a module beyond it
    (the final layer) is read by neither: load_lora_weights puts nothing on the transformer, which read as
    "another family or format?"; the line says so and names what samples it."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from sdtune import families
    from sdtune.export import Adapter, RunLora, _write_diffusers, write_kohya
    from sdtune.models import load_components

    model, sd3 = tiny_model("sd3"), families.get("sd3")
    c = load_components(str(model), sd3)
    c.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    for name, p in c.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    adapters = {"transformer": Adapter.from_module(c.denoiser)}
    kohya = write_kohya(tmp_path / "k.safetensors", sd3, adapters, base_model=str(model),
                        prediction_type="flow_matching")
    diffusers_file = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    _write_diffusers(RunLora(diffusers_file, adapters, {"model": {"pretrained": str(model)}}), diffusers_file)

    def sample(lora: Path, name: str) -> int:
        return main(["sample", str(lora), "--model", str(model), "--prompt", "a toy", "--seeds", "0",
                     "--lora-scale", "1", "--steps", "2", "--out", str(tmp_path / f"{name}.png")])

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / f"{name}_cells" / "cell-0000.png")).astype(int)

    assert sample(kohya, "kohya") == 0 and sample(diffusers_file, "diffusers") == 0
    assert np.abs(pixels("kohya") - pixels("diffusers")).max() <= 1
    assert main(["sample", "--model", str(model), "--prompt", "a toy", "--seeds", "0", "--steps", "2",
                 "--no-lora", "--out", str(tmp_path / "base.png")]) == 0
    assert np.abs(pixels("kohya") - pixels("base")).max() > 8  # the LoRA is on
    beyond = tmp_path / "beyond.safetensors"
    save_file({**load_file(kohya), "lora_unet_final_layer_linear.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(16, 4)}, str(beyond))
    capsys.readouterr()
    code = sample(beyond, "beyond")
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert code == 2 and "SD3.x kohya file" in line and "beyond the LoRA / DoRA" in line and "sdtune sample RUN" in line
    assert "pytorch_lora_weights.safetensors" in line and "another family or format" not in line


def test_a_second_grid_at_the_same_name_says_it_replaces_the_first(run, tmp_path, capsys):
    """Two `sdtune sample RUN` commands (the README's quick start) both write RUN/grid.png: the second replaced the
    first without a word."""
    args = ["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", "0", "--lora-scale", "1", "--steps", "1",
            "--out", str(tmp_path / "g.png")]
    assert main(args) == 0
    assert "replaces the earlier grid" not in capsys.readouterr().out
    assert main([*args, "--guidance", "2"]) == 0
    assert "(it replaces the earlier grid of that name; --out NAME.png keeps both)" in capsys.readouterr().out


def test_sigterm_during_a_grid_keeps_its_cells_and_says_so(run, tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's limit, `kill`, the UI's Stop) during `sdtune sample` takes Ctrl-C's path: the
    finished cells stay, the command says where, and it exits 143. Python's default ended it without a word."""
    import os
    import signal

    from diffusers import StableDiffusionPipeline

    render = StableDiffusionPipeline.__call__
    calls: list[int] = []

    def call(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return render(self, *args, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    grid, cells_dir = tmp_path / "g.png", tmp_path / "g_cells"
    # 4 cells in 2 pipeline calls (seeds 0,1 at LoRA x0, then at x1); SIGTERM in the second
    assert main(["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", "0,1", "--lora-scale", "0,1",
                 "--steps", "2", "--batch-size", "2", "--out", str(grid)]) == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"interrupted: 2 of 4 cells are written in {cells_dir} (each with its .json sidecar)")
    assert len(list(cells_dir.glob("cell-*.png"))) == 2 and not grid.exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_interrupted_grid_keeps_its_cells_and_the_same_command_finishes_it(run, tmp_path, capsys, monkeypatch):
    """Ctrl-C during `sdtune sample`: every finished cell is on disk with its sidecar, the command says how many
    and where (exit 130), and the same command again renders only the others: a grid equal, bit for bit, to one
    rendered in one go."""
    from diffusers import StableDiffusionPipeline

    render = StableDiffusionPipeline.__call__
    calls: list[int] = []

    def counted(interrupt_at: int | None):
        def call(self, *args, **kw):
            calls.append(len(kw["prompt"]))
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt  # as Ctrl-C does, in the middle of a pipeline call
            return render(self, *args, **kw)
        return call

    def sample(out: Path, seeds: str, *extra: str) -> int:
        return main(["sample", str(run), "--prompt", "a photo of sks toy", "--seeds", seeds, "--lora-scale", "0,1",
                     "--steps", "2", "--batch-size", "2", "--out", str(out), *extra])

    grid, cells_dir = tmp_path / "g.png", tmp_path / "g_cells"
    assert sample(grid, "0,1,2,3") == 0  # an earlier grid of 8 cells at the same --out
    capsys.readouterr()
    # 6 cells in 4 pipeline calls (x0 seeds 0,1 | 2, x1 seeds 0,1 | 2); Ctrl-C in the third
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted(interrupt_at=3))
    assert sample(grid, "0,1,2") == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"interrupted: 3 of 6 cells are written in {cells_dir} (each with its .json sidecar); the same "
                   f"command again reuses them, renders the other 3 and draws the grid g.png; {grid} is still an "
                   "earlier grid")
    # the finished cells (LoRA x0), each with its sidecar; the earlier grid's 8 cells are gone, not mixed in
    assert sorted(p.name for p in cells_dir.glob("cell-*")) == [f"cell-{i:04d}.{e}" for i in range(3)
                                                                for e in ("json", "png")]
    scales = [json.loads((cells_dir / f"cell-{i:04d}.json").read_text())["cell"]["lora_scale"] for i in range(3)]
    assert scales == [0, 0, 0]
    assert (cells_dir / "unfinished.json").is_file()

    calls.clear()
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted(interrupt_at=None))
    assert sample(grid, "0,1,2") == 0
    assert "reusing 3 of 6 cells that an interrupted run of this grid left in" in capsys.readouterr().out
    assert calls == [2, 1]  # only the LoRA x1 cells were rendered
    assert len(_cells(grid)) == 6 and not (cells_dir / "unfinished.json").exists()
    straight = tmp_path / "straight.png"
    assert sample(straight, "0,1,2") == 0
    assert calls == [2, 1, 2, 1, 2, 1]
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(straight)))
    for a, b in zip(_cells(grid), _cells(straight), strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        # the sidecars name the same cell and batch, so each cell replays the same
        assert json.loads(a.with_suffix(".json").read_text()) == json.loads(b.with_suffix(".json").read_text())

    # another command on that folder reuses nothing: its cells are other pixels (here: 3 steps, not 2)
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted(interrupt_at=1))
    assert sample(grid, "0,1,2", "--steps", "3") == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"interrupted before the first of 6 cells was finished; "
                                                        f"{grid} is still an earlier grid")
    assert not list(cells_dir.glob("cell-*"))  # what was there was no cell of this grid
