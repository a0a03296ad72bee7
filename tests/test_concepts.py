"""Several subjects in one run (``data.concepts``): config problems, balancing, per-concept prior preservation,
and a tiny two-concept run that trains, resumes bitwise, samples and exports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DEMO_DATA, ROOT, overrides
from sdtune.config import ConfigError, load_config
from sdtune.data import ClassImages, DreamBoothDataset, Example, concept_repeats
from sdtune.lora import WEIGHT_NAME
from sdtune.plan import check_run, class_fingerprint, class_images_dir, default_sample_prompts
from sdtune.train import train

CAPTION = {"sks": "a photo of sks toy", "ohwx": "a photo of ohwx toy"}


def _folder(root: Path, name: str, first: int, count: int) -> Path:
    """``count`` demo photos from toy_<first> on, without captions (the concept's instance_prompt gives them)."""
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(first, first + count):
        shutil.copy(DEMO_DATA / f"toy_{i:02d}.png", folder)
    return folder


def _concepts(*entries: dict) -> str:
    """A ``data.concepts=[...]`` override."""
    return "data.concepts=" + json.dumps(list(entries))


def _concept(folder: Path, word: str, **extra) -> dict:
    return {"instance_dir": str(folder), "identifier": word, "instance_prompt": "a photo of {identifier} toy",
            **extra}


@pytest.fixture
def two(tmp_path) -> tuple[Path, Path]:
    """A 2-photo and a 6-photo subject."""
    return _folder(tmp_path, "rex", 0, 2), _folder(tmp_path, "tom", 2, 6)


def _cfg(model: Path, out: Path, *extra: str):
    """The conftest run, with its single subject replaced by the concepts in ``extra``."""
    base = [o for o in overrides(model, out) if not o.startswith(("data.instance_dir=", "data.identifier="))]
    return load_config(None, [*base, *extra])


def _problems(excinfo) -> list[str]:
    return excinfo.value.problems


# --------------------------------------------------------------------------------------------------------
# The recipe


def test_both_styles_and_twice_the_same_identifier_are_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=m", "data.instance_dir=a", "data.identifier=sks",
                           _concepts({"instance_dir": "b", "identifier": "ohwx"})])
    assert _problems(e) == ["data.concepts: each concept names its subject's folder, identifier and prompt; remove "
                            "data.instance_dir, data.identifier (or move it into a concept)"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=m", _concepts({"instance_dir": "a", "identifier": "sks"},
                                                           {"instance_dir": "b", "identifier": "sks"})])
    assert _problems(e) == ["data.concepts: two concepts have the identifier sks; give each subject its own word"]
    # a concept's own keys are named as the user writes them
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=m", _concepts({"instance_dir": "a", "identifier": "sks"},
                                                           {"instance_dir": "b", "identifer": "ohwx"})])
    assert _problems(e) == ["data.concepts[1].identifier: required (the rare word that names this subject, e.g. sks)",
                            "data.concepts[1].identifer: unknown key; did you mean 'data.concepts[1].identifier'?"]
    # the index of a list of values stays dotted, as before
    with pytest.raises(ConfigError, match=r"^sample\.seeds\.1: "):
        load_config(None, ["model.pretrained=m", "data.instance_dir=a", "data.identifier=sks", "sample.seeds=[0, -1]"])


def test_identifier_placeholders(tmp_path):
    entries = [{"instance_dir": "a", "identifier": "sks", "instance_prompt": "a photo of {identifier} dog"},
               {"instance_dir": "b", "identifier": "ohwx", "instance_prompt": "a {identifier} cat"}]
    cfg = load_config(None, ["model.pretrained=m", _concepts(*entries)])
    assert [c.instance_prompt for c in cfg.concepts()] == ["a photo of sks dog", "a ohwx cat"]
    assert [c.key for c in cfg.concepts()] == ["data.concepts[0]", "data.concepts[1]"]
    assert cfg.concepts()[1].key_of("class_prompt") == "data.concepts[1].class_prompt"
    assert "{identifier}" not in cfg.to_yaml()
    # in a sample prompt, {identifier} could be either subject
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=m", _concepts(*entries),
                           "sample.prompts=['{identifier} on the beach', 'sks dog in the snow']"])
    assert _problems(e) == ["sample.prompts: in '{identifier} on the beach', {identifier} could be any of the 2 "
                            "concepts (sks, ohwx); fix: write the word, e.g. 'sks on the beach'"]
    # one concept: its word
    one = load_config(None, ["model.pretrained=m", _concepts(entries[1]), "sample.prompts=['{identifier} cat']"])
    assert one.sample.prompts == ["ohwx cat"]
    # a recipe without concepts is one concept of data.* and prior.*
    single = load_config(None, ["model.pretrained=m", "data.instance_dir=d", "data.identifier=sks",
                                "prior.class_prompt=a dog"])
    (c,) = single.concepts()
    assert (c.key, c.instance_dir, c.class_prompt, c.key_of("class_prompt")) == ("data", "d", "a dog",
                                                                                  "prior.class_prompt")


def test_an_override_of_concepts_replaces_the_recipes_subject(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {pretrained: m}\n"
                      "data: {instance_dir: d, identifier: sks, instance_prompt: 'a photo of {identifier} dog'}\n")
    cfg = load_config(recipe, [_concepts({"instance_dir": "a", "identifier": "ohwx"},
                                         {"instance_dir": "b", "identifier": "zwx"})])
    assert (cfg.data.instance_dir, cfg.data.identifier, cfg.data.instance_prompt) == (None, None, None)
    assert cfg.identifiers() == ["ohwx", "zwx"]
    # and back: a folder on the command line replaces the recipe's concepts
    recipe.write_text("model: {pretrained: m}\ndata: {concepts: [{instance_dir: a, identifier: ohwx}]}\n")
    cfg = load_config(recipe, ["data.instance_dir=d", "data.identifier=sks"])
    assert cfg.data.concepts == [] and cfg.identifiers() == ["sks"]
    # what a run folder records: each concept's folder as an absolute path
    cfg = load_config(recipe, [])
    assert cfg.resolved_paths().data.concepts[0].instance_dir == os.path.abspath("a")
    # no data section at all: what it needs, in one line
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=m"])
    assert _problems(e) == ["data.identifier: required (the rare word that names the subject, e.g. sks), or give "
                            "data.concepts"]


def test_plan_problems_name_each_concepts_keys(tiny_model, tmp_path, two):
    rex, tom = two
    cfg = _cfg(tiny_model("sd15"), tmp_path / "out", _concepts(
        _concept(rex, "sks", instance_prompt="a photo of a toy"),  # its identifier missing from its prompt
        _concept(tom, "ohwx", class_prompt="a photo of sks toy"),  # another concept's identifier in a class prompt
        _concept(rex, "zwx", class_prompt="a photo of a toy"),  # a folder twice
        _concept(tmp_path / "nowhere", "qwe", class_prompt="a photo of a toy")),
        "prior.enabled=true", "prior.class_prompt=a photo of a toy", "sample.prompts=['a toy', 'a photo of a toy']")
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    problems = _problems(e)
    expected = [
        "data.concepts[0].instance_prompt: 'a photo of a toy' does not contain data.concepts[0].identifier 'sks' as "
        "a word; fix: e.g. 'a photo of sks dog'",
        "data.concepts[0].class_prompt: required with prior.enabled=true; fix: e.g. 'a photo of a dog'",
        "data.concepts[1].class_prompt: 'a photo of sks toy' contains the identifier 'sks'; the class prompt names "
        "the class only, e.g. 'a photo of a dog'",
        f"data.concepts[2].instance_dir: {rex} is also data.concepts[0].instance_dir; fix: give each concept a "
        "folder of its own photos (one subject per folder)",
        "prior.class_prompt: not used with data.concepts, where each concept has its own; fix: move it into each "
        "concept (data.concepts[0].class_prompt, ...) and remove prior.class_prompt",
    ]
    for line in expected:
        assert line in problems, line
    assert any(p.startswith(f"data.concepts[3].instance_dir: {tmp_path / 'nowhere'} is not a folder") for p in problems)
    # a sample prompt that names no concept is a warning (checked once the rest is right)
    fine = _cfg(tiny_model("sd15"), tmp_path / "out", _concepts(_concept(rex, "sks"), _concept(tom, "ohwx")),
                "sample.prompts=['a photo of zwx toy', 'sks toy and ohwx toy']")
    assert [w for w in check_run(fine).warnings if w.startswith("sample.prompts:")] == [
        "sample.prompts: 'a photo of zwx toy' does not use any of the identifiers of data.concepts (sks, ohwx), so "
        "the grids will not show what was trained; write one of them in it"]


def test_a_concept_without_captions_names_its_own_prompt_key(tiny_model, tmp_path, two):
    rex, tom = two
    cfg = _cfg(tiny_model("sd15"), tmp_path / "out", _concepts(
        _concept(rex, "sks"), {"instance_dir": str(tom), "identifier": "ohwx"}))
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    assert "data.concepts[1].instance_dir: toy_02.png has no caption; fix: set data.concepts[1].instance_prompt " \
           "(e.g. 'a photo of ohwx dog') or give it one in metadata.jsonl" in _problems(e)


def test_validation_captions_name_one_of_the_identifiers(tiny_model, tmp_path, two):
    rex, tom = two
    held = _folder(tmp_path, "held", 0, 2)
    (held / "toy_00.txt").write_text("a photo of ohwx toy")
    (held / "toy_01.txt").write_text("a photo of a toy")
    cfg = _cfg(tiny_model("sd15"), tmp_path / "out", _concepts(_concept(rex, "sks"), _concept(tom, "ohwx")),
               f"data.validation_dir={held}", "train.validation_every=2")
    plan = check_run(cfg)
    assert [e.path.name for e in plan.validation] == ["toy_00.png", "toy_01.png"]
    assert [w for w in plan.warnings if "toy_0" in w and "caption" in w] == [
        "toy_01.png: caption 'a photo of a toy' does not contain any of the identifiers 'sks', 'ohwx'"]
    (held / "toy_01.txt").unlink()  # no caption, and no instance prompt could say which subject it is
    with pytest.raises(ConfigError, match=r"data\.validation_dir: toy_01\.png has no caption; fix: give it one in "
                                          r"metadata\.jsonl or a \.txt beside it"):
        check_run(cfg)


# --------------------------------------------------------------------------------------------------------
# Balancing and pairing


def test_balancing_counts():
    assert concept_repeats([2, 6], [None, None], True, 1) == [3, 1]
    assert concept_repeats([2, 6], [5, None], True, 1) == [5, 1]  # its own repeats win
    assert concept_repeats([2, 6], [None, None], False, 1) == [1, 1]
    assert concept_repeats([2, 6], [None, None], True, 2) == [6, 2]  # x data.repeats
    assert concept_repeats([5, 20], [None, None], True, 1) == [4, 1]
    assert concept_repeats([7], [None], True, 3) == [3]  # one subject: data.repeats, as before


def test_plan_balances_and_the_epoch_shows_each_concept_equally(tiny_model, tmp_path, two, capsys):
    rex, tom = two
    plan = check_run(_cfg(tiny_model("sd15"), tmp_path / "out", _concepts(_concept(rex, "sks"), _concept(tom, "ohwx"))))
    assert plan.repeats == [3, 1] and [e.concept for e in plan.examples] == [0, 0] + [1] * 6
    assert {e.caption for e in plan.examples if e.concept == 1} == {CAPTION["ohwx"]}
    explicit = check_run(_cfg(tiny_model("sd15"), tmp_path / "out", _concepts(
        _concept(rex, "sks", repeats=5), _concept(tom, "ohwx", repeats=2))))
    assert explicit.repeats == [5, 2]

    examples = plan.examples
    ds = DreamBoothDataset(examples, 64, repeats=[plan.repeats[e.concept] for e in examples])
    assert len(ds) == 2 * 3 + 6
    shown = [ds[i]["instance"]["path"] for i in range(len(ds))]
    assert sorted(shown.count(str(e.path)) for e in examples) == [1] * 6 + [3, 3]
    assert sum(CAPTION["sks"] == ds[i]["instance"]["caption"] for i in range(len(ds))) == 6  # as often as ohwx


def test_one_repeat_count_keeps_the_single_subject_stream():
    paths = sorted(DEMO_DATA.glob("toy_*.png"))
    examples = [Example(p, "a photo of sks toy") for p in paths[:3]]
    classes = paths[3:8]
    old = DreamBoothDataset(examples, 64, repeats=2, class_images=classes, class_prompt="a toy")
    new = DreamBoothDataset(examples, 64, repeats=[2, 2, 2], classes=[ClassImages(classes, "a toy")])
    assert len(old) == len(new) == 6
    # as before concepts: item i shows instance i mod n and class image i mod (class images)
    for ds in (old, new):
        assert [ds[i]["instance"]["path"] for i in range(12)] == [str(examples[i % 3].path) for i in range(12)]
        assert [ds[i]["class"]["path"] for i in range(12)] == [str(classes[i % 6 % 5]) for i in range(12)]


def test_each_instance_is_paired_with_its_own_concepts_class_images():
    paths = sorted(DEMO_DATA.glob("toy_*.png"))
    examples = [Example(paths[0], CAPTION["sks"], 0), Example(paths[1], CAPTION["sks"], 0)] + \
        [Example(p, CAPTION["ohwx"], 1) for p in paths[2:5]]
    dogs, cats = ClassImages(paths[5:8], "a photo of a dog"), ClassImages(paths[0:5], "a photo of a cat")
    ds = DreamBoothDataset(examples, 64, repeats=[2, 2, 1, 1, 1], classes=[dogs, cats])
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        mine = dogs if item["instance"]["caption"] == CAPTION["sks"] else cats
        assert item["class"]["caption"] == mine.prompt
        assert Path(item["class"]["path"]) in mine.paths
    # one epoch pairs every class image of each concept at least once, and no longer than it takes
    assert {Path(i["class"]["path"]) for i in items if i["class"]["caption"] == cats.prompt} == set(cats.paths)
    assert {Path(i["class"]["path"]) for i in items if i["class"]["caption"] == dogs.prompt} == set(dogs.paths)
    # a pass is [sks0, sks1, ohwx0, ohwx1, ohwx2, sks0, sks1]: ohwx's 5th item, for its 5th class image, is the
    # 11th of the stream
    assert len(ds) == 11
    assert {p for p, _ in ds.targets()} == set(paths[:8])
    with pytest.raises(ValueError, match="class images"):
        DreamBoothDataset(examples, 64, classes=[dogs])  # ohwx has none


def test_default_prompts_fingerprints_and_class_folders(tiny_model, tmp_path, two):
    rex, tom = two
    shutil.copy(rex / "toy_00.png", tom / "toy_00.png")  # one file name in both folders
    cfg = _cfg(tiny_model("sd15"), tmp_path / "out", _concepts(
        _concept(rex, "sks", class_prompt="a photo of a dog"), _concept(tom, "ohwx", class_prompt="a photo of a cat")),
        "prior.enabled=true")
    plan = check_run(cfg)
    assert default_sample_prompts(cfg, plan.examples) == [CAPTION["sks"], CAPTION["ohwx"], "a photo of a dog",
                                                          "a photo of a cat"]
    # both toy_00.png are in the fingerprint, each under its concept
    assert {"sks/toy_00.png", "ohwx/toy_00.png", "ohwx/toy_07.png"} <= set(plan.data) and len(plan.data) == 9
    a, b = (class_images_dir(cfg, 64, "model-id", c) for c in cfg.concepts())
    assert a != b  # a cache folder per class prompt
    fp = class_fingerprint(cfg, [tmp_path / "rex/toy_00.png", tmp_path / "rex/toy_01.png"])
    assert fp["sks/toy_00.png"]["caption"] == "a photo of a dog" and fp["ohwx/toy_01.png"]["caption"] == "a photo of a cat"


# --------------------------------------------------------------------------------------------------------
# A tiny two-concept run


def _run(model: Path, root: Path, out: Path, *extra: str) -> Path:
    rex, tom = root / "rex", root / "tom"
    return train(_cfg(model, out, _concepts(
        _concept(rex, "sks", class_prompt="a photo of a toy"), _concept(tom, "ohwx", class_prompt="a photo of a red toy")),
        "prior.enabled=true", "prior.num_class_images=2", "prior.generation_steps=1", "train.learning_rate=1e-3",
        "data.random_flip=true", *extra))


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def test_two_concepts_train_sample_export_and_resume_bitwise(tiny_model, tmp_path, two, capsys):
    model = tiny_model("sd15")
    straight = _run(model, tmp_path, tmp_path / "straight", "train.max_steps=6")
    printed = capsys.readouterr().out
    assert "concepts: sks 2 photos x 3, ohwx 6 photos x 1 (balanced)" in printed
    assert "prior preservation: 2 class images in " in printed and "for ohwx ('a photo of a red toy')" in printed
    assert "rendering the sample grid (4 prompts x 1 seed" in printed  # both subjects and both class prompts

    assert (straight / WEIGHT_NAME).is_file() and (straight / "samples/step-000006.png").is_file()
    card = (straight / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["instance_prompt"] == "sks, ohwx"
    assert [w["text"] for w in front["widget"]] == [CAPTION["sks"], CAPTION["ohwx"]]
    assert "# DreamBooth LoRA: `sks`, `ohwx`" in card
    assert f"- `sks`: e.g. `{CAPTION['sks']}`" in card and f"- `ohwx`: e.g. `{CAPTION['ohwx']}`" in card

    summary = json.loads((straight / "data_summary.json").read_text())
    assert summary["dataset_dirs"] == {"3_rex": {"n_repeats": 3, "img_count": 2},
                                       "1_tom": {"n_repeats": 1, "img_count": 6}}
    assert summary["tag_frequency"]["3_rex"] == {CAPTION["sks"]: 2}
    assert sorted(summary["reg_dataset_dirs"].values(), key=str) == [{"n_repeats": 1, "img_count": 2}] * 2
    (kohya,) = straight.glob("*_kohya.safetensors")
    with safe_open(kohya, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == summary["dataset_dirs"]
    assert set(json.loads(meta["ss_tag_frequency"])) == {"3_rex", "1_tom", *summary["reg_dataset_dirs"]}
    assert meta["modelspec.trigger_phrase"] == "sks, ohwx"
    state = json.loads((straight / "checkpoints/step-000006/state.json").read_text())
    assert {"sks/toy_00.png", "ohwx/toy_02.png"} <= set(state["data"]["instance"])
    assert {c["caption"] for c in state["data"]["class"].values()} == {"a photo of a toy", "a photo of a red toy"}

    # the same run "crashed" after its step-3 checkpoint, then resumed: the very same steps and LoRA
    split = tmp_path / "split"
    _run(model, tmp_path, split, "train.max_steps=6", "train.checkpoint_every=3")
    shutil.rmtree(split / "checkpoints/step-000006")
    (split / WEIGHT_NAME).unlink()
    _run(model, tmp_path, split, "train.max_steps=6", "train.checkpoint_every=3", "train.resume=latest")
    assert [_losses(split)[k] for k in range(1, 7)] == [_losses(straight)[k] for k in range(1, 7)]
    a = load_file(straight / "checkpoints/step-000006/adapter-unet.safetensors")
    b = load_file(split / "checkpoints/step-000006/adapter-unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a photo of the second concept edited since: the resume is refused, naming it
    (tmp_path / "tom" / "toy_05.png").write_bytes((DEMO_DATA / "toy_00.png").read_bytes())
    with pytest.raises(ConfigError, match=r"content changed: ohwx/toy_05\.png"):
        _run(model, tmp_path, split, "train.max_steps=8", "train.checkpoint_every=3", "train.resume=latest")


def test_eval_picks_a_concept(tmp_path, capsys):
    from types import SimpleNamespace

    from sdtune.cli.eval import _one_concept, _subject
    from sdtune.errors import SdtuneError

    rex, tom = _folder(tmp_path, "rex", 0, 1), _folder(tmp_path, "tom", 1, 1)
    run_cfg = {"data": {"concepts": [
        {"instance_dir": str(rex), "identifier": "sks", "instance_prompt": "a photo of sks dog",
         "class_prompt": "a photo of a dog"},
        {"instance_dir": str(tom), "identifier": "ohwx", "instance_prompt": "a photo of ohwx cat",
         "class_prompt": "a photo of a cat"}]}, "prior": {"enabled": True}}
    args = SimpleNamespace(identifier=None, class_noun=None, subject_dir=None)
    view = _one_concept(args, run_cfg)
    assert "evaluating sks; pass --identifier to choose another" in capsys.readouterr().out
    assert _subject(args, tmp_path, view) == ("sks", "dog", str(rex))
    args.identifier = "ohwx"
    view = _one_concept(args, run_cfg)
    assert _subject(args, tmp_path, view) == ("ohwx", "cat", str(tom)) and view["prior"]["class_prompt"] == "a photo of a cat"
    assert capsys.readouterr().out == ""
    args.identifier = "zwx"
    with pytest.raises(SdtuneError, match=r"--identifier: 'zwx' is none of the run's concepts \(sks, ohwx\)"):
        _one_concept(args, run_cfg)


def test_readme_example_is_a_valid_recipe(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text[text.index("### Several subjects in one run"):].split("```yaml\n")[1].split("```")[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {pretrained: m}\n" + block)
    cfg = load_config(recipe)
    assert cfg.identifiers() == ["sks", "ohwx"] and cfg.concepts()[1].repeats == 2
    assert cfg.concepts()[0].instance_prompt == "a photo of sks dog"


def test_sdtune_sample_defaults_to_every_concepts_prompt():
    from types import SimpleNamespace

    from sdtune.cli.sample import read_prompts

    run_cfg = {"data": {"concepts": [{"identifier": "sks", "instance_prompt": CAPTION["sks"]},
                                     {"identifier": "ohwx", "instance_prompt": CAPTION["ohwx"]}]}, "sample": {}}
    assert read_prompts(SimpleNamespace(prompt=None, prompts_file=None), run_cfg) == [CAPTION["sks"], CAPTION["ohwx"]]


def test_concepts_with_aspect_buckets_count_each_image_with_its_repeats(tiny_model, tmp_path, bucketed_toy):
    small = _folder(tmp_path, "small", 0, 2)
    out = train(_cfg(tiny_model("sd15"), tmp_path / "out", _concepts(
        {"instance_dir": str(bucketed_toy), "identifier": "sks"}, _concept(small, "ohwx")),
        "data.aspect_buckets=true", "train.max_steps=2"))
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["dataset_dirs"] == {f"1_{bucketed_toy.name}": {"n_repeats": 1, "img_count": 8},
                                       "4_small": {"n_repeats": 4, "img_count": 2}}
    buckets = summary["bucket_info"]["buckets"].values()
    assert sum(b["count"] for b in buckets) == 8 * 1 + 2 * 4
    # the two square demo photos x 4, and the 4 squares of the 8 x 1
    assert {"resolution": [64, 64], "count": 2 * 4 + 4} in buckets


def test_caption_templates_wrap_each_concepts_captions(tiny_model, tmp_path, two):
    """A concept's caption_template wraps its images' own captions (.txt here); the others use
    data.caption_template; a template without {caption} is refused as the key the user wrote."""
    rex, tom = two
    for p in rex.glob("*.png"):
        p.with_suffix(".txt").write_text("red background")
    for p in tom.glob("*.png"):
        p.with_suffix(".txt").write_text("blue background")
    plan = check_run(_cfg(tiny_model("sd15"), tmp_path / "run", _concepts(
        _concept(rex, "sks", caption_template="{identifier} toy, {caption}"), _concept(tom, "ohwx")),
        "data.caption_template=a photo of {identifier}, {caption}"))
    captions = {e.caption for e in plan.examples}
    assert captions == {"sks toy, red background", "a photo of ohwx, blue background"}
    with pytest.raises(ConfigError) as e:
        _cfg(tiny_model("sd15"), tmp_path / "run", _concepts(_concept(rex, "sks", caption_template="sks toy")))
    assert _problems(e)[0].startswith("data.concepts[0].caption_template: must contain {caption}")
