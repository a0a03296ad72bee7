"""`sdtune eval`: the metric maths on hand-made embeddings, the prompt handling, the evaluation core's writers on
hand-made rows (a new metric reaches every output), and an end-to-end run on a tiny trained LoRA with tiny
random DINO and CLIP models (their numbers mean nothing; the plumbing is what is tested)."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEMO_DATA
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.eval.core import EvalSpec, Metric, Rendered, Row, cell_path, eval_cells, read_rendered
from sdtune.eval.dreambench import METRICS, dreambench, is_live, recommend
from sdtune.eval.paper import PaperScorer, subject_images
from sdtune.eval.prompts import class_noun_from, fill, read_prompt_file, strip_identifier
from sdtune.eval.report import plot_metrics, shown_metrics, table, write_reports
from sdtune.metrics import cosine_matrix, diversity, mean_pairwise_similarity, paired_similarity
from sdtune.runs import run_root
from sdtune.ui import tasks
from sdtune.ui.tasks import recommended_checkpoint
from sdtune.ui.workspace import Workspace

# --------------------------------------------------------------------------------------------------------
# Metric maths


def test_identical_orthogonal_and_opposite_embeddings():
    e = torch.eye(4)
    assert mean_pairwise_similarity(e[:1] * 3, e[:1]) == pytest.approx(1.0)  # the scale does not matter
    assert mean_pairwise_similarity(e[:1], e[1:2]) == pytest.approx(0.0)
    assert mean_pairwise_similarity(e[:1], -e[:1]) == pytest.approx(-1.0)
    # every (generated, real) pair counts once: one identical and one orthogonal pair average to 0.5
    assert mean_pairwise_similarity(e[:1], e[:2]) == pytest.approx(0.5)
    assert cosine_matrix(e[:2], e[:3]).shape == (2, 3)


def test_clip_t_pairs_each_image_with_its_own_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert paired_similarity(images, images.clone()) == pytest.approx(1.0)
    assert paired_similarity(images, images.flip(0)) == pytest.approx(0.0)  # each image vs the other prompt
    with pytest.raises(ValueError):
        paired_similarity(images, images[:1])


def test_diversity_of_identical_and_different_images():
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)
    assert diversity([same]) == pytest.approx(0.0, abs=1e-9)
    assert diversity([torch.eye(3)]) == pytest.approx(1.0)
    # prompts weigh equally; a prompt with one image has no pair and does not count
    assert diversity([same, torch.eye(3), torch.ones(1, 3)]) == pytest.approx(0.5)
    assert diversity([torch.ones(1, 3)]) is None


# --------------------------------------------------------------------------------------------------------
# Prompts


def test_dreambench_prompts_are_the_papers_25_and_25():
    data = dreambench()
    assert len(data["object"]) == 25 and len(data["live"]) == 25
    assert "CC-BY" in data["license"] and "Ruiz" in data["credit"]
    assert fill(data["live"][10], "sks", "dog") == "a sks dog wearing a red hat"  # accessorization
    assert fill(data["object"][-1], "sks", "backpack") == "a cube shaped sks backpack"  # property modification
    assert data["classes"]["bear_plushie"] == "stuffed animal"
    assert sum(c in ("dog", "cat") for c in data["classes"].values()) == 9  # the paper's 9 live subjects


def test_clip_t_prompt_has_the_identifier_removed(tmp_path):
    assert strip_identifier("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert strip_identifier("sks, a photo of sks dog", "sks") == ", a photo of dog"
    assert strip_identifier("a sksy dog", "sks") == "a sksy dog"  # whole words only
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\na {} on the moon\n\na {identifier} {class} as a painting\na photo of sks toy\n")
    prompts = [fill(t, "sks", "toy") for t in read_prompt_file(f)]
    assert prompts == ["a sks toy on the moon", "a sks toy as a painting", "a photo of sks toy"]
    assert [strip_identifier(p, "sks") for p in prompts] == ["a toy on the moon", "a toy as a painting",
                                                             "a photo of toy"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SdtuneError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


def test_class_noun_and_prompt_set_from_the_run():
    assert class_noun_from({"prior": {"class_prompt": "a photo of a dog"}}) == "dog"
    assert class_noun_from({"prior": {"class_prompt": "a photo of a stuffed animal"}}) == "stuffed animal"
    assert class_noun_from({"prior": {"class_prompt": "A cat"}}) == "cat"
    assert class_noun_from({"data": {"identifier": "sks", "instance_prompt": "a photo of sks toy, red"}}) == "toy"
    assert class_noun_from({"data": {"identifier": "sks"}}) is None
    assert is_live("dog") and is_live("Cat") and not is_live("stuffed animal") and not is_live("backpack")


# --------------------------------------------------------------------------------------------------------
# Recommendation, table, plot


def _row(step, scale, dino, clip_t):
    return Row(f"step-{step:06d}", step, scale, {"dino": dino, "clip_i": dino, "clip_t": clip_t}, images=4)


def test_recommendation_trades_a_little_prompt_fidelity_for_identity():
    rows = [_row(100, 0, 0.30, 0.33), _row(100, 1, 0.55, 0.320), _row(200, 1, 0.66, 0.305),
            _row(300, 1, 0.70, 0.280)]
    # scale 0 (the base model) is never recommended; 0.305 is within 0.02 of the best LoRA CLIP-T 0.320,
    # 0.280 is not
    assert recommend(rows) is rows[2]
    assert recommend(rows, tolerance=0.05) is rows[3]
    assert recommend(rows, tolerance=0.0) is rows[1]
    assert recommend([_row(100, 0, 0.3, 0.3)]) is None
    text = table(PaperScorer(), rows, rows[2])
    assert "* " in text.splitlines()[4] and "paper: DreamBooth (SD)" in text and "0.668" in text
    # the paper's rows are matched by metric: Real images has no CLIP-T ("-"); no paper row has DIV (blank)
    real = next(line for line in text.splitlines() if "paper: Real images" in line)
    assert real.split()[-3:] == ["0.774", "0.885", "-"]
    assert "DIV" not in text  # an optional metric no row measured is left out


def test_plot_draws_single_points_and_unknown_steps(tmp_path):
    rows = [Row("final", None, 1.0, {"dino": 0.5, "clip_i": 0.7, "clip_t": 0.3}, images=1)]
    path = plot_metrics(rows, tmp_path / "m.png", shown_metrics(METRICS, rows), rows[0])
    with Image.open(path) as im:
        assert im.width == 3 * 380  # DINO, CLIP-I, CLIP-T panels (no DIV, no PRES measured)


# --------------------------------------------------------------------------------------------------------
# The evaluation core: cells on disk -> rows -> every output, for any scorer


def _spec(**kw) -> EvalSpec:
    loras = [("step-000010", "a.safetensors"), ("step-000020", "b.safetensors")]
    return EvalSpec(run="runs/x", model="model", loras=loras,
                    subject_dir=Path("photos"), identifier="sks", class_noun="toy", prompt_set="test",
                    prompts=["a sks toy", "a sks toy in the snow"], steps={"step-000010": 10, "step-000020": 20},
                    images_per_prompt=2, lora_scales=[0.0, 1.0], class_prompt="a photo of a toy", **kw)


BRIGHT = Metric("bright", "bright", True, "mean pixel value of the images, 0..1")
DARK = Metric("dark", "dark share", False, "share of pixels darker than 64 (the metric a test adds)")


@dataclass
class PixelScorer:
    """A scorer with no model: numbers from pixel values. ``dark``: one more metric."""

    dark: bool = False

    name = "pixels"
    title = "sdtune eval (pixels)"
    references = None
    quote = ("bright",)
    class_images = False
    steps = 1
    guidance = 1.0
    rule = "the brightest row"

    @property
    def metrics(self):
        return (BRIGHT, DARK) if self.dark else (BRIGHT,)

    def templates(self, class_noun):
        return ["a {} in the snow"], "test"

    def prepare(self, spec):
        pass

    def score(self, spec, rendered):
        rows = []
        for r in rendered:
            pixels = np.stack([np.asarray(im, dtype=float) for ims in r.images.values() for im in ims])
            values = {"bright": pixels.mean() / 255}
            if self.dark:
                values["dark"] = float((pixels < 64).mean())
            rows.append(r.row(values, len(pixels), [{"prompt": p, "bright": np.mean(ims) / 255}
                                                    for p, ims in r.images.items()]))
        return rows

    def recommend(self, rows):
        return max((r for r in rows if r.lora_scale > 0), key=lambda r: r.metrics["bright"], default=None)

    def report_fields(self, spec):
        return {"pixels": True}

    def report_lines(self, spec):
        return []

    def notes(self, spec):
        return ["- pixel values only"]


def _rendered(spec) -> list[Rendered]:
    """Hand-made images: brighter with the LoRA and with training."""
    return [Rendered(label, spec.steps[label], scale,
                     {p: [Image.new("RGB", (8, 8), (v, v, v))] * 2 for p in spec.prompts})
            for label in spec.steps for scale in spec.lora_scales
            for v in [int(40 + 60 * scale + spec.steps[label])]]


def test_the_ui_export_defaults_to_the_checkpoint_eval_recommends(tmp_path):
    """sdtune ui's Export reads eval's report.json (as write_reports writes it) for its default checkpoint; none
    when the checkpoint is gone (a rewind) or the base model did best (LoRA scale 0)."""
    run = tmp_path / "run"
    for label in ("step-000010", "step-000020"):
        (run / "checkpoints" / label).mkdir(parents=True)
        (run / "checkpoints" / label / "COMPLETE").write_text("")
    assert recommended_checkpoint(run) is None  # no report yet
    spec, scorer = _spec(), PixelScorer()
    rows = scorer.score(spec, _rendered(spec))
    (run / "eval").mkdir()
    write_reports(run / "eval", spec, scorer, rows, scorer.recommend(rows))
    got = recommended_checkpoint(run)
    assert got["checkpoint"] == "step-000020" and got["why"].startswith("recommended by eval (bright ")
    assert got["why"].endswith(": the brightest row")
    assert tasks.progress(Workspace(tmp_path), "run")["recommended"] == got

    base_best = next(r for r in rows if r.lora_scale == 0)
    write_reports(run / "eval", spec, scorer, rows, base_best)
    assert recommended_checkpoint(run) is None
    write_reports(run / "eval", spec, scorer, rows, scorer.recommend(rows))
    (run / "checkpoints" / "step-000020" / "COMPLETE").unlink()
    assert recommended_checkpoint(run) is None


def test_a_new_metric_reaches_the_table_both_reports_and_the_plot(tmp_path):
    spec = _spec()
    outputs = {}
    for dark in (False, True):
        scorer = PixelScorer(dark)
        rows = scorer.score(spec, _rendered(spec))
        best = scorer.recommend(rows)
        out = tmp_path / str(dark)
        out.mkdir()
        assert [p.name for p in write_reports(out, spec, scorer, rows, best)] == ["report.json", "report.md",
                                                                                   "metrics.png"]
        with Image.open(out / "metrics.png") as im:
            outputs[dark] = (table(scorer, rows, best), json.loads((out / "report.json").read_text()),
                             (out / "report.md").read_text(), im.size)
    (text, report, md, size), (text0, report0, md0, size0) = outputs[True], outputs[False]
    assert best.checkpoint == "step-000020" and best.lora_scale == 1.0

    assert "dark share ↓" in text.splitlines()[0] and "dark share" not in text0
    # step 10 at LoRA x0: pixel value 50, all dark; 2 prompts x 2 images
    assert text.splitlines()[2].split()[-2:] == ["1.000", "4"]
    assert [r["metrics"]["dark"] for r in report["rows"]] == [1.0, 0.0, 1.0, 0.0]
    assert report["metrics"]["dark"] == {"label": "dark share", "higher_is_better": False,
                                         "description": DARK.description}
    assert "dark" not in report0["metrics"] and "dark" not in report0["rows"][0]["metrics"]
    assert report["recommendation"]["metrics"]["dark"] == 0.0 and report["recommendation"]["rule"] == scorer.rule
    assert report["scorer"] == "pixels" and report["pixels"] is True and report["class_prompt"] is None
    assert "| dark share ↓ |" in md and f"- dark share ↓: {DARK.description}" in md and "dark share" not in md0
    assert "**Recommended: `step-000020` at LoRA scale 1** (bright 0.471)" in md
    assert size == (2 * 380, 280 + 28) and size0 == (380, 280 + 28)  # one panel more


def test_cells_are_read_back_per_checkpoint_and_scale(tmp_path):
    spec = _spec()
    cells = eval_cells(spec, "step-000010", class_images=True)
    assert len(cells) == 3 * 2 * 2 and cells[-1].prompt == "a photo of a toy"  # (prompts + class) x scales x seeds
    folders = {label: tmp_path / label for label in spec.steps}
    for label, folder in folders.items():
        folder.mkdir()
        for i, cell in enumerate(eval_cells(spec, label, class_images=True)):
            if not (label == "step-000020" and i == 0):  # one failed cell
                shade = int(100 * cell.lora_scale) + cell.seed
                Image.new("RGB", (4, 4), (shade, 0, 0)).save(cell_path(folder, i))
    rows = list(read_rendered(spec, folders, class_images=True))
    assert [(r.checkpoint, r.step, r.lora_scale, r.failed) for r in rows] == [
        ("step-000010", 10, 0.0, 0), ("step-000010", 10, 1.0, 0), ("step-000020", 20, 0.0, 1),
        ("step-000020", 20, 1.0, 0)]
    assert [im.getpixel((0, 0))[0] for im in rows[1].images["a sks toy in the snow"]] == [100, 101]  # seed order
    assert len(rows[2].images["a sks toy"]) == 1 and len(rows[2].images["a photo of a toy"]) == 2


# --------------------------------------------------------------------------------------------------------
# End to end on tiny models


def eval_main(argv: list[str]) -> int:
    """`sdtune eval ...` as the CLI runs it: SdtuneError -> one `error:` line and exit code 2; log lines on
    stdout."""
    return main(["eval", *argv])


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """Tiny random DINO (ViT) and CLIP folders, each with a preprocessor_config.json written in code."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from sdtune.tokens import VOCAB_SIZE, clip_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    dino = root / "dino"
    ViTModel(ViTConfig(**small, image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(dino)
    (dino / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    clip = root / "clip"
    CLIPModel(CLIPConfig(text_config={**small, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 77},
                         vision_config={**small, "image_size": 32, "patch_size": 16}, projection_dim=16)
              ).save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    clip_tokenizer().save_pretrained(clip)
    return dino, clip


@pytest.fixture(scope="module")
def run(checkpointed_run):
    return checkpointed_run


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a {} on the beach\na {identifier} {class} in the snow\n")
    return f


def test_eval_end_to_end(run, metric_models, prompt_file, tmp_path, capsys):
    dino, clip = metric_models
    out = tmp_path / "report"
    argv = [str(run), "--checkpoints", "all", "--images-per-prompt", "2", "--prompts", str(prompt_file),
            "--lora-scale", "0,1", "--pres", "--steps", "2", "--dino", str(dino), "--clip", str(clip),
            "--out", str(out)]
    assert eval_main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "paper: DreamBooth (SD)" in printed and "recommended: step-00000" in printed
    assert "subject: " in printed and "rendering 12 images" in printed  # library log lines reach the terminal

    report = json.loads((out / "report.json").read_text())
    assert report["class_noun"] == "toy"  # from data.instance_prompt: the run has no class prompt
    assert report["prompts"] == ["a sks toy on the beach", "a sks toy in the snow"]
    assert report["clip_t_prompts"] == ["a toy on the beach", "a toy in the snow"]
    rows = report["rows"]
    assert [(r["checkpoint"], r["step"], r["lora_scale"]) for r in rows] == [
        ("step-000002", 2, 0.0), ("step-000002", 2, 1.0), ("step-000004", 4, 0.0), ("step-000004", 4, 1.0)]
    for r in rows:
        assert r["images"] == 4 and r["failed"] == 0
        for key in ("dino", "clip_i", "clip_t", "div", "pres"):
            assert -1.0 <= r["metrics"][key] <= 1.0, (key, r)
        assert {p["clip_text"] for p in r["per_prompt"]} == {"a toy on the beach", "a toy in the snow"}
    # LoRA x0 is the base model: the same pixels, so the same numbers, at every checkpoint
    assert rows[0]["metrics"]["dino"] == pytest.approx(rows[2]["metrics"]["dino"])
    rec = report["recommendation"]
    assert rec["lora_scale"] == 1.0 and rec["checkpoint"] in ("step-000002", "step-000004") and "CLIP-T" in rec["rule"]
    md = (out / "report.md").read_text()
    assert "Recommended" in md and "paper: Real images" in md and "LPIPS" in md
    with Image.open(out / "metrics.png") as im:
        assert im.size == (3 * 380, 2 * 280 + 28)  # DINO, CLIP-I, CLIP-T; DIV, PRES
    cells = sorted((out / "samples" / "step-000004_cells").glob("cell-*.png"))
    assert len(cells) == (2 + 1) * 2 * 2  # (prompts + the class prompt) x scales x images
    assert json.loads(cells[0].with_suffix(".json").read_text())["cell"]["checkpoint"] == "step-000004"

    # Same settings again: every image is reused (nothing re-rendered), the numbers are the same.
    stamp = cells[0].stat().st_mtime_ns
    assert eval_main(argv) == 0
    assert "reusing 12 images" in capsys.readouterr().out
    assert cells[0].stat().st_mtime_ns == stamp
    assert json.loads((out / "report.json").read_text())["rows"] == rows


def test_user_mistakes_are_one_line_errors(run, metric_models, prompt_file, tmp_path, capsys):
    dino, clip = metric_models
    base = ["--prompts", str(prompt_file), "--images-per-prompt", "1", "--steps", "1", "--out", str(tmp_path / "r")]
    cases = [
        ([str(tmp_path / "nope"), *base], "no such run folder"),
        ([str(run), "--subject-dir", str(tmp_path / "missing"), *base], "--subject-dir: --subject-dir"),
        ([str(run), "--subject-dir", str(tmp_path), *base, "--dino", str(dino), "--clip", str(clip)],
         "holds no subject photos"),
        ([str(run), *base, "--clip", str(clip)], "--dino: could not load facebook/dino-vits16"),
        ([str(run), *base, "--dino", str(clip), "--clip", str(clip)], "--dino: " + str(clip) + " is a clip model"),
        ([str(run), *base, "--dino", str(dino), "--clip", str(dino)], "--clip: " + str(dino) + " is a vit model"),
        ([str(run), "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")], "--prompts: cannot"),
        ([str(run), *base, "--lora-scale", "x"], "--lora-scale: expected comma-separated numbers"),
    ]
    for argv, message in cases:
        code = eval_main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "r" / "samples").exists()  # nothing was rendered before the models were checked


def test_subject_photos_follow_metadata_jsonl(tmp_path):
    assert len(subject_images(DEMO_DATA)) == len(
        [line for line in (DEMO_DATA / "metadata.jsonl").read_text().splitlines() if line.strip()])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "contact_sheet.jpg")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a sks toy"}\n')
    assert [p.name for p in subject_images(tmp_path)] == ["a.png"]


def test_default_report_folder_is_in_the_run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}")
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert run_root(ckpt) == run_root(ckpt / "pytorch_lora_weights.safetensors") == tmp_path / "run"
    assert run_root(tmp_path / "run") == tmp_path / "run"
    assert run_root(tmp_path) == tmp_path  # not a run: beside the target


# --------------------------------------------------------------------------------------------------------
# Defaults from the run (its grids' guidance, its quantization) and from a LoRA file's metadata


def test_a_lora_files_metadata_names_its_subject():
    from sdtune.eval.prompts import config_from_metadata

    sdtune_file = {"modelspec.trigger_phrase": "ohwx", "ss_dataset_dirs": '{"dog64": {"img_count": 5}}',
                   "ss_tag_frequency": '{"dog64": {"ohwx": 9, "a photo of ohwx dog": 5, "grass": 2}}'}
    cfg = config_from_metadata(sdtune_file)
    assert cfg == {"data": {"identifier": "ohwx", "instance_prompt": "a photo of ohwx dog", "folder_names": ["dog64"]}}
    assert class_noun_from(cfg) == "dog"  # the caption that names a class after the identifier, not the bare tag
    # kohya's DreamBooth folder "<repeats>_<identifier> <class>", no trigger phrase
    kohya = config_from_metadata({"ss_tag_frequency": '{"10_sks man": {"smiling": 3, "outdoors": 1}}'})
    assert kohya["data"]["identifier"] == "sks" and class_noun_from(kohya) == "man"
    several = config_from_metadata({"modelspec.trigger_phrase": "sks, ohwx",
                                    "ss_tag_frequency": '{"a": {"a sks toy": 3}, "b": {"ohwx cat, grass": 2}}'})
    assert several["data"]["concepts"] == [{"identifier": "sks", "instance_prompt": "a sks toy"},
                                           {"identifier": "ohwx", "instance_prompt": "ohwx cat, grass"}]
    assert config_from_metadata({}) == config_from_metadata({"ss_tag_frequency": "not json"}) == {}
    assert config_from_metadata({"ss_dataset_dirs": '{"photos": {}}'}) == {"data": {"folder_names": ["photos"]}}


def test_eval_of_a_lora_file_outside_its_run_reads_its_metadata(run, metric_models, prompt_file, tmp_path, capsys,
                                                                 tiny_model):
    from safetensors.torch import load_file, save_file

    from sdtune.runs import safetensors_metadata

    dino, clip = metric_models
    shared = tmp_path / "k.safetensors"  # the run's kohya file, shared: no run folder around it
    shutil.copy(run / "run_kohya.safetensors", shared)
    assert safetensors_metadata(shared)["modelspec.trigger_phrase"] == "sks"
    common = ["--model", str(tiny_model("sd15")), "--prompts", str(prompt_file), "--images-per-prompt", "1",
              "--steps", "1", "--dino", str(dino), "--clip", str(clip)]
    assert eval_main([str(shared), *common, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    # the identifier and class came from the file; its photos' folder it names, but not where it is
    assert err.strip() == (f"error: --subject-dir: {shared} names its photos' folder ('demo_toy') but not where it "
                           "is; pass --subject-dir DIR with the photos")
    assert eval_main([str(shared), *common, "--subject-dir", str(DEMO_DATA), "--out", str(tmp_path / "r")]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (report["identifier"], report["class_noun"]) == ("sks", "toy")
    assert report["prompts"] == ["a sks toy on the beach", "a sks toy in the snow"]

    # a file that says nothing: the flags it needs, in one line each
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(shared), bare)
    assert eval_main([str(bare), *common, "--subject-dir", str(DEMO_DATA), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--identifier: " in err and "its metadata has no modelspec.trigger_phrase" in err and "sks" not in err
    assert eval_main([str(bare), *common, "--identifier", "sks", "--subject-dir", str(DEMO_DATA),
                      "--out", str(tmp_path / "b")]) == 2
    assert "--class-noun: " in capsys.readouterr().err


def test_eval_defaults_to_the_runs_guidance_quantization_and_dtype(run, tmp_path):
    import yaml

    from sdtune.cli import build_parser
    from sdtune.cli.eval import make_scorer, spec_from_args

    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(run / "pytorch_lora_weights.safetensors", copied)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] |= {"quantize": "nf4", "quantize_text_encoders": "fp8"}
    cfg["sample"] |= {"guidance_scale": 5.0, "negative_prompt": "blurry"}
    cfg["train"]["mixed_precision"] = "bf16"
    (copied / "config.yaml").write_text(yaml.safe_dump(cfg))

    def spec(*flags):
        args = build_parser().parse_args(["eval", str(copied), "--metrics", "world", *flags])
        return spec_from_args(args, make_scorer(args))

    ran = spec()
    assert ran.model_options == {"quantize": "nf4", "quantize_text_encoders": "fp8"}
    assert (ran.guidance, ran.settings.negative_prompt, ran.settings.steps) == (5.0, "blurry", 20)  # steps: world's
    assert ran.dtype == ("bf16" if torch.cuda.is_available() else "fp32")  # half precision on a GPU only
    given = spec("--quantize", "none", "--quantize-text-encoders", "nf4", "--guidance", "3", "--negative-prompt", "",
                 "--dtype", "fp16")
    assert given.model_options == {"quantize_text_encoders": "nf4"}
    assert (given.guidance, given.settings.negative_prompt, given.dtype) == (3.0, "", "fp16")
    # the family's own guidance (SD: 7.5) is no choice of the run's: the scorer's stands (the micro world's 4)
    cfg["sample"]["guidance_scale"] = 7.5
    (copied / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert spec().guidance == 4.0


def test_world_metrics_ask_for_no_subject_photos(run, tiny_model, tmp_path, capsys):
    """The micro world's detector reads the subject from pixels: `--metrics world` on a LoRA file outside its
    run (which names its photos' folder but not where it is) needs no --subject-dir, and one given changes
    nothing (it says so); the paper's metrics still ask for the photos."""
    from sdtune.cli import build_parser
    from sdtune.cli.eval import make_scorer, spec_from_args

    shared = tmp_path / "k.safetensors"
    shutil.copy(run / "run_kohya.safetensors", shared)

    def spec(*flags: str) -> EvalSpec:
        args = build_parser().parse_args(["eval", str(shared), "--model", str(tiny_model("sd15")), *flags])
        return spec_from_args(args, make_scorer(args))

    with pytest.raises(SdtuneError, match=r"--subject-dir: .* names its photos' folder \('demo_toy'\)"):
        spec("--metrics", "paper")
    world = spec("--metrics", "world")
    assert world.subject_dir is None and (world.identifier, world.class_noun) == ("sks", "toy")
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    for photos in (empty, DEMO_DATA):
        assert spec("--metrics", "world", "--subject-dir", str(photos)) == world  # so the same images and scores
        assert capsys.readouterr().err == ("note: --subject-dir is not read: --metrics world scores the images "
                                           "without subject photos\n")


def test_an_interrupted_eval_keeps_its_cells_and_the_same_command_finishes_it(run, tmp_path, capsys, monkeypatch):
    """Ctrl-C during eval's rendering: the finished checkpoints and the finished cells of the one it was on stay,
    the line says which, and the same command again renders only the rest, to the same numbers."""
    from diffusers import StableDiffusionPipeline

    render = StableDiffusionPipeline.__call__
    calls: list[int] = []

    def counted(interrupt_at: int | None):
        def call(self, *args, **kw):
            calls.append(1)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return render(self, *args, **kw)
        return call

    def world_eval(out: Path) -> int:
        # per checkpoint: (1 prompt + the class prompt) x 2 images, one pipeline call each
        return eval_main([str(run), "--metrics", "world", "--checkpoints", "all", "--world-prompts", "1",
                          "--images-per-prompt", "2", "--steps", "2", "--out", str(out)])

    out = tmp_path / "report"
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted(interrupt_at=6))  # step-000004's second
    assert world_eval(out) == 130
    cells = out / "samples" / "step-000004_cells"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"step-000004 (2/2 checkpoints): interrupted: 1 of 4 cells are written in {cells} (each with its .json "
        "sidecar); the same command again reuses them, renders the other 3 and draws the grid step-000004.png")
    assert len(list((out / "samples" / "step-000002_cells").glob("cell-*.png"))) == 4
    assert len(list(cells.glob("cell-*.png"))) == 1 and not (out / "report.json").exists()

    calls.clear()
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted(interrupt_at=None))
    assert world_eval(out) == 0
    assert len(calls) == 3  # step-000002 reused whole, step-000004's first cell reused
    assert world_eval(tmp_path / "straight") == 0
    assert len(calls) == 3 + 8
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert rows == json.loads((tmp_path / "straight" / "report.json").read_text())["rows"] and len(rows) == 2
