"""Hostile inputs and failing hardware against `sdtune train`: checks before writes, caches keyed by what a
model is, resumes that refuse changed data, one run per folder, inputs that would silently do less, and full
disks. Each test asserts what the user is promised: one `error:` line, and the files on disk as they were.

(Recipes: tests/test_hostile_config.py; data folders: tests/test_hostile_data.py; other commands:
tests/test_hostile_cli.py.)
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import sdtune.cache
import sdtune.plan
import sdtune.train
from conftest import DEMO_DATA, overrides
from sdtune import cli
from sdtune.config import ConfigError, load_config
from sdtune.errors import DiskFull
from sdtune.locks import cache_lock
from sdtune.models import write_random_model
from sdtune.plan import check_run
from sdtune.runs import WEIGHT_NAME
from sdtune.train import train


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what earlier steps of the test printed
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> None:
    assert err.strip(), "no error printed"
    assert "Traceback" not in err
    # the progress bars are on stderr, and so are the blank lines tqdm clears them with when a line is logged
    lines = [line for line in err.strip().splitlines() if "%|" not in line and line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("{}\n")  # everything comes from overrides()
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """A copy of the demo subject (8 images captioned in metadata.jsonl) that a test may change."""
    return Path(shutil.copytree(DEMO_DATA, tmp_path / "photos"))


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def _write_metadata(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------------
# 1. Every check before the first byte is written


def test_a_refused_resume_changes_no_file_of_the_run(tiny_model, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_model(), out, "train.max_steps=2", "train.checkpoint_every=1")
    train(load_config(None, args))
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", str(recipe), *args, "data.identifier=ohwx", "train.resume=latest")
    assert code == 2
    one_line_error(err)
    assert "data.identifier" in err and "different config" in err
    assert snapshot(out) == before  # config.yaml still names the trigger word that was trained


def test_an_output_dir_of_the_users_own_files_is_refused_untouched(tiny_model, tmp_path, recipe, capsys):
    out = tmp_path / "my_project"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "config.yaml").write_text("mine: true\n")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), out))
    assert code == 2
    one_line_error(err)
    assert "already holds files that sdtune did not write (README.md, config.yaml)" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml"]
    # names that sdtune's runs use do not make a folder sdtune's (another trainer's run, or a copy of a run)
    (out / "losses.jsonl").write_text('{"step": 1, "loss": 0.1}\n')
    (out / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), out), "train.resume=latest")
    assert code == 2 and "already holds files that sdtune did not write" in err
    assert snapshot(out) == before


def test_a_finished_run_is_never_replaced_by_a_new_one(tiny_model, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model(), out, "train.max_steps=2")))
    shutil.rmtree(out / "checkpoints")  # to save space: the run is done
    before = snapshot(out)
    for extra in ([], ["train.resume=latest"]):
        code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), out, "data.identifier=zwx"), *extra)
        assert code == 2 and "holds a finished run" in err
        one_line_error(err)
    assert snapshot(out) == before


def test_a_resume_below_its_checkpoints_step_is_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_model(), out, "train.max_steps=3", "train.checkpoint_every=1")
    train(load_config(None, args))
    with pytest.raises(ConfigError, match=r"train.max_steps: 2 is below the step of .*step-000003 \(3\)"):
        check_run(load_config(None, [*args, "train.max_steps=2", "train.resume=latest"]))


def test_an_empty_folder_and_a_run_folder_are_accepted(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    check_run(load_config(None, overrides(tiny_model(), empty)))
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model(), out, "train.max_steps=1")))
    assert (out / ".sdtune-run").is_file()
    # a run folder is sdtune's: what stops a fresh start there is its checkpoints (resume them, or start
    # elsewhere), never its files
    with pytest.raises(ConfigError) as e:
        check_run(load_config(None, overrides(tiny_model(), out)))
    assert e.value.problems == [
        f"train.output_dir: {out} already holds checkpoints of a run (newest step-000001); fix: train.resume=latest "
        "to continue it, or another train.output_dir"]


def test_an_output_dir_that_is_a_file_or_not_writable(tiny_model, tmp_path, recipe, capsys, monkeypatch):
    a_file = tmp_path / "run"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), a_file), "--dry-run")
    assert code == 2 and "train.output_dir: " in err and "is a file" in err
    one_line_error(err)
    assert a_file.read_text() == "x"
    # a read-only folder (tests may run as root, whom chmod does not stop: the permission check is faked)
    real_access = os.access
    monkeypatch.setattr(sdtune.plan.os, "access", lambda p, mode: False if "ro" in str(p) else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), tmp_path / "ro" / "run"), "--dry-run")
    assert code == 2 and "cannot write in" in err
    one_line_error(err)


def test_a_run_refused_in_setup_leaves_no_folder_behind(tiny_model, tmp_path, photos, recipe, capsys):
    rows = _metadata(photos)
    rows[0]["text"] = "a photo of " + "very " * 80 + "sks toy"
    _write_metadata(photos, rows)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), out, f"data.instance_dir={photos}"),
                          "--strict")
    assert code == 2
    one_line_error(err)
    assert f"{rows[0]['file_name']}: its caption is" in err and "The identifier 'sks' is in the part cut off" in err
    assert not out.exists()


def test_a_dry_run_names_a_cut_caption_and_strict_refuses_it(tiny_model, tmp_path, photos, recipe, capsys):
    """The model's tokenizers (no weights) are read by the checks, so --dry-run sees what training would warn
    of, and --dry-run --strict refuses it with the other problems, before anything is loaded or written."""
    rows = _metadata(photos)
    rows[0]["text"] = "a photo of " + "very " * 80 + "sks toy"
    _write_metadata(photos, rows)
    args = ["train", str(recipe), *overrides(tiny_model(), tmp_path / "run", f"data.instance_dir={photos}"), "--dry-run"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    assert f"warning: {rows[0]['file_name']}: its caption is 87 tokens, CLIP ViT-L/14 reads 77" in out
    code, _, err = run_cli(capsys, *args, "--strict")
    assert code == 2 and f"{rows[0]['file_name']}: its caption is 87 tokens" in err and "(--strict)" in err
    assert not (tmp_path / "run").exists()


def test_a_dry_run_says_what_training_would_warn_of_and_strict_refuses_it(tiny_model, tmp_path, recipe, capsys):
    """A weak identifier ('cat': a common word) and a class folder sdtune made for another prompt were warned of
    only after the weights loaded: `--dry-run` did not show them and `--strict` trained through them."""
    from sdtune.prior import MANIFEST

    classes = tmp_path / "classes"
    shutil.copytree(DEMO_DATA, classes, ignore=shutil.ignore_patterns("*.jsonl"))
    (classes / MANIFEST).write_text(json.dumps({"model": "other-model", "class_prompt": "a photo of a ball"}))
    args = ["train", str(recipe), *overrides(tiny_model(), tmp_path / "run", "data.identifier=cat",
                                             "data.instance_prompt=a photo of cat toy", "prior.enabled=true",
                                             "prior.class_prompt=a photo of a toy", f"prior.class_dir={classes}",
                                             "prior.num_class_images=4"), "--dry-run"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "warning: data.identifier bad: 'cat'" in out
    assert f"warning: {classes} holds class images made for 'a photo of a ball' with other-model, not 'a photo " \
        "of a toy'" in out
    code, _, err = run_cli(capsys, *args, "--strict")
    assert code == 2 and "data.identifier bad: 'cat'" in err and "holds class images made for" in err
    assert not (tmp_path / "run").exists()


def test_a_class_folder_is_the_same_models_however_its_path_is_written(tmp_path, monkeypatch):
    """Training records the model's absolute path in the class folder; a recipe that writes it relative
    (`models/sd15`) named the same model and was warned of (and refused by --strict) as another. A moved model
    with the same files is the same model; the same path with other files is not."""
    from sdtune.prior import MANIFEST, other_class_images

    model, classes = tmp_path / "models" / "sd15", tmp_path / "classes"
    model.mkdir(parents=True)
    classes.mkdir()
    record = {"model": str(model), "identity": "abc", "class_prompt": "a photo of a dog"}
    (classes / MANIFEST).write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    assert other_class_images(classes, "a photo of a dog", "models/sd15") is None  # the plan: names only
    assert other_class_images(classes, "a photo of a dog", "models/sd15", "abc") is None
    assert other_class_images(classes, "a photo of a dog", "/elsewhere/sd15", "abc") is None  # moved, same files
    assert "the same name, but its files have changed since" in other_class_images(
        classes, "a photo of a dog", "models/sd15", "def")
    assert "made for 'a photo of a dog'" in other_class_images(classes, "a photo of a dog", "other/model")
    assert "not 'a photo of a cat'" in other_class_images(classes, "a photo of a cat", "models/sd15", "abc")


def test_an_unreadable_class_image_is_refused_before_anything_is_written(tiny_model, tmp_path, recipe, capsys):
    """A bad file among the class images training takes passed the checks; the run then generated into the
    folder and failed on it. It is one line of the plan now."""
    classes = tmp_path / "classes"
    classes.mkdir()
    for name in ("toy_00.png", "toy_01.png"):
        shutil.copy(DEMO_DATA / name, classes / name)
    (classes / "bad.jpg").write_bytes(b"x")
    before = snapshot(classes)
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(
        tiny_model(), tmp_path / "run", "prior.enabled=true", "prior.class_prompt=a photo of a toy",
        f"prior.class_dir={classes}", "prior.num_class_images=4", "prior.generation_steps=1"))
    assert code == 2 and "error: prior.class_dir: cannot read bad.jpg" in err
    one_line_error(err)
    assert snapshot(classes) == before and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------
# 2. Caches keyed by what a model is, not by its name


def test_a_replaced_model_folder_is_not_served_from_the_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    write_random_model(model, "sd15", "tiny", seed=0)
    prior = ["prior.enabled=true", "prior.class_prompt=a photo of a toy", "prior.num_class_images=2",
             "prior.generation_steps=1", "train.max_steps=1"]
    train(load_config(None, overrides(model, tmp_path / "run1", *prior)))
    first = capsys.readouterr().out
    latents = tmp_path / "cache" / "latents"
    cached = {p.name for p in latents.glob("*.safetensors")}
    assert cached and "is not the model it was" not in first

    shutil.rmtree(model)  # the same path, another model (a new download, a merge saved over the old one)
    write_random_model(model, "sd15", "tiny", seed=1)
    train(load_config(None, overrides(model, tmp_path / "run2", *prior)))
    second = capsys.readouterr().out
    assert f"{model} is not the model it was when its latents were cached" in second
    assert f"{model} is not the model it was when class images were cached" in second
    assert cached < {p.name for p in latents.glob("*.safetensors")}  # encoded again, by the new VAE
    class_dirs = [line.rsplit(" in ", 1)[1] for text in (first, second) for line in text.splitlines()
                  if line.startswith("prior preservation:")]
    assert len(class_dirs) == 2 and class_dirs[0] != class_dirs[1]


def test_two_models_at_the_same_relative_path_in_two_folders_are_two_models(tmp_path, monkeypatch, capsys):
    """The caches' "its files changed" note was keyed by model.pretrained as typed: `model` in folder a, then
    another `model` in folder b, was said to be a model whose files had changed. Each is its own model."""
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    prior = ["prior.enabled=true", "prior.class_prompt=a photo of a toy", "prior.num_class_images=2",
             "prior.generation_steps=1", "train.max_steps=1"]
    for seed, folder in enumerate((tmp_path / "a", tmp_path / "b")):
        write_random_model(folder / "model", "sd15", "tiny", seed=seed)
        monkeypatch.chdir(folder)
        train(load_config(None, overrides(Path("model"), folder / "run", *prior)))
        assert "is not the model it was" not in capsys.readouterr().out


def test_a_truncated_latent_cache_file_is_encoded_again(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    train(load_config(None, overrides(tiny_model(), tmp_path / "run1", "train.max_steps=1")))
    files = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    for f in files:
        f.write_bytes(f.read_bytes()[:40])
    capsys.readouterr()
    train(load_config(None, overrides(tiny_model(), tmp_path / "run2", "train.max_steps=1")))
    assert "is damaged" in capsys.readouterr().out
    assert all(f.stat().st_size > 40 for f in files)


# --------------------------------------------------------------------------------------------------------
# 3. A resume refuses data that changed since its checkpoint


def test_resume_refuses_added_edited_and_recaptioned_photos(tiny_model, tmp_path, photos):
    out = tmp_path / "run"
    args = overrides(tiny_model(), out, f"data.instance_dir={photos}", "train.max_steps=1", "train.checkpoint_every=1")
    train(load_config(None, args))
    resume = load_config(None, [*args, "train.max_steps=2", "train.resume=latest"])
    check_run(resume)  # unchanged: fine
    rows = _metadata(photos)
    first = photos / rows[0]["file_name"]

    shutil.copy(first, photos / "new.png")
    _write_metadata(photos, [*rows, {"file_name": "new.png", "text": "a photo of sks toy"}])
    with pytest.raises(ConfigError, match=r"the instance images changed since step-000001 \(added: new.png\)"):
        check_run(resume)
    (photos / "new.png").unlink()
    _write_metadata(photos, rows)

    with Image.open(first) as im:
        edited = im.convert("RGB")
    edited.putpixel((0, 0), (255 - edited.getpixel((0, 0))[0], 0, 0))
    original = first.read_bytes()
    edited.save(first)
    with pytest.raises(ConfigError, match=f"content changed: {first.name}"):
        check_run(resume)
    first.write_bytes(original)

    _write_metadata(photos, [{**rows[0], "text": "a photo of sks toy, on a beach"}, *rows[1:]])
    with pytest.raises(ConfigError, match=f"caption changed: {first.name}"):
        check_run(resume)
    _write_metadata(photos, rows)
    train(resume)  # as it was: resumes
    assert (out / "checkpoints" / "step-000002").is_dir()


# --------------------------------------------------------------------------------------------------------
# 4. One run per folder; caches take turns


HOLD = textwrap.dedent("""
    import sys, time
    from sdtune.locks import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_a_second_train_on_a_busy_folder_names_the_first_ones_pid(tiny_model, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "train", str(recipe), *overrides(tiny_model(), out, "train.max_steps=1"))
        assert code == 2
        one_line_error(err)
        assert f"is in use by another sdtune run, pid {holder.pid} on" in err
        assert not (out / WEIGHT_NAME).exists()
    finally:
        holder.kill()  # a killed holder leaves no stale lock: the kernel drops it
        holder.wait()
    train(load_config(None, overrides(tiny_model(), out, "train.max_steps=1")))
    assert (out / WEIGHT_NAME).is_file()


def test_a_cache_writer_waits_for_the_other_and_says_for_whom(tmp_path, capsys):
    folder = tmp_path / "cache"
    order = []
    with cache_lock(folder, "latents"):
        def second():
            with cache_lock(folder, "latents"):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    assert f"waiting for pid {os.getpid()}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# 5. Inputs that would silently do less than asked


def test_a_long_caption_is_named_per_image(tiny_model, tmp_path, photos, capsys):
    rows = _metadata(photos)
    rows[1]["text"] = "a photo of " + "very " * 80 + "sks toy"
    _write_metadata(photos, rows)
    train(load_config(None, overrides(tiny_model(), tmp_path / "run", f"data.instance_dir={photos}",
                                      "train.max_steps=1")))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "its caption is" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {rows[1]['file_name']}: its caption is 87 tokens, CLIP ViT-L/14 reads 77")


def test_an_exploded_lora_is_refused_before_any_final_file(tiny_model, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", str(recipe),
                          *overrides(tiny_model(), out, "train.max_steps=2", "train.learning_rate=1e30"))
    assert code == 2
    one_line_error(err)
    assert "the trained LoRA has exploded at step 2" in err and "train.learning_rate" in err
    assert not (out / WEIGHT_NAME).exists() and not list(out.glob("*_kohya.safetensors"))
    assert not (out / "checkpoints").exists()


def test_an_identifier_inside_another_word_and_class_images_from_the_subject(tiny_model, tmp_path):
    args = overrides(tiny_model(), tmp_path / "run")
    with pytest.raises(ConfigError, match="does not contain data.identifier 'o' as a word"):
        check_run(load_config(None, [*args, "data.identifier=o", "data.instance_prompt=a photo of sks dog"]))
    with pytest.raises(ConfigError, match="prior.class_dir: is data.instance_dir"):
        check_run(load_config(None, [*args, "prior.enabled=true", "prior.class_prompt=a photo of a toy",
                                     f"prior.class_dir={DEMO_DATA}"]))


# --------------------------------------------------------------------------------------------------------
# 6. Broken model files and full disks: one sentence


def test_a_truncated_weight_file_is_named_before_loading(tiny_model, tmp_path, recipe, capsys):
    model = Path(shutil.copytree(tiny_model(), tmp_path / "model"))
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    with open(unet, "r+b") as f:
        f.truncate(unet.stat().st_size // 2)
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_text("not weights at all")
    code, _, err = run_cli(capsys, "train", str(recipe), *overrides(model, tmp_path / "run"), "--dry-run")
    assert code == 2
    one_line_error(err)
    assert f"{unet} is not a readable safetensors file (truncated or corrupt" in err
    assert "vae/diffusion_pytorch_model.safetensors is not a readable safetensors file" in err
    assert err.count("fix: copy or download the model again") == 2


def test_too_little_space_is_refused_before_training(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(sdtune.train, "free_bytes", lambda path: 1000)
    out = tmp_path / "run"
    with pytest.raises(DiskFull, match=r"not enough free space in .*this run writes about .* MiB"):
        train(load_config(None, overrides(tiny_model(), out)))
    assert not out.exists()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_caching_latents(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sdtune.cache, "write_bytes", _no_space)
    with pytest.raises(DiskFull, match=r"disk full while caching latents .* the remaining 8 latents need about"):
        train(load_config(None, overrides(tiny_model(), tmp_path / "run")))
    assert not list((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_writing_the_final_lora_keeps_the_checkpoint(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = sdtune.train.save_diffusers_lora
    calls = []

    def full_on_the_final_file(folder, *args):
        if ".tmp-final-" in str(folder):  # the final LoRA (the checkpoint's copy is written first, and fits)
            calls.append(folder)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(folder, *args)

    monkeypatch.setattr(sdtune.train, "save_diffusers_lora", full_on_the_final_file)
    args = overrides(tiny_model(), out, "train.max_steps=2")
    with pytest.raises(DiskFull, match=r"disk full while writing the final LoRA files .* need about .* "
                                       r"checkpoints/step-000002: free space, then .*train.resume=latest"):
        train(load_config(None, args))
    assert calls and not (out / WEIGHT_NAME).exists() and not list(out.glob(".tmp-final-*"))
    monkeypatch.setattr(sdtune.train, "save_diffusers_lora", real)
    train(load_config(None, [*args, "train.resume=latest"]))
    assert (out / WEIGHT_NAME).is_file() and list(out.glob("*_kohya.safetensors"))

