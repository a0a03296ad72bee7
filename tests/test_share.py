import getpass
from pathlib import Path

import pytest
import yaml

from conftest import overrides
from sdtune import share
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.lora import WEIGHT_NAME
from sdtune.runs import KOHYA_SUFFIX
from sdtune.share import files_to_push, push
from sdtune.train import train


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "run"
    train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=2",
                                      "data.instance_prompt=a photo of sks toy")))
    return out


def test_model_card_front_matter_and_privacy(run):
    text = (run / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["instance_prompt"] == "a photo of sks toy"
    assert "lora" in front["tags"] and "dreambooth" in front["tags"]
    assert "base_model" not in front  # a local base model is not named by its path
    assert "samples/step-000002.png" in text and "load_lora_weights" in text
    assert str(run.parent) not in text and "/tmp" not in text


def test_push_dry_run_lists_only_publishable_files(run, capsys):
    assert main(["push", str(run), "--repo", "me/toy-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload: README.md" in out and "would upload: pytorch_lora_weights.safetensors" in out
    assert "config.yaml" not in out and "checkpoints" not in out and "(private)" in out


def test_push_errors_are_one_line(run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run), "--repo", "not a repo"]) == 2
    assert "--repo: 'not a repo'" in capsys.readouterr().err
    assert main(["push", str(run), "--repo", "me/toy-lora"]) == 2  # offline: the upload cannot happen
    err = capsys.readouterr().err
    assert err.startswith("error: push to me/toy-lora failed") and "Traceback" not in err
    assert getpass.getuser() not in (run / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------
# push against a fake HfApi: what is sent, in how many commits, and what a failure leaves behind


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records every call; create_commit raises if ``fail`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = False

    def api(self, *args, **kwargs):
        hub = self

        class Api:
            def __init__(self, *a, **kw):
                hub.calls.append(("__init__", kw))

            def create_repo(self, repo_id, **kw):
                hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

            def create_commit(self, repo_id, operations, **kw):
                hub.calls.append(("create_commit", {"repo_id": repo_id, "operations": list(operations), **kw}))
                if hub.fail:
                    raise RuntimeError("boom: 403 Forbidden\nsecond line of the server's answer")

            def upload_file(self, **kw):
                hub.calls.append(("upload_file", kw))

            def upload_folder(self, **kw):
                hub.calls.append(("upload_folder", kw))

        return Api(*args, **kwargs)

    def named(self, name: str) -> list[dict]:
        return [kw for call, kw in self.calls if call == name]


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # push refuses offline mode before it calls the hub
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    return hub


@pytest.fixture
def finished_run(tmp_path):
    """A run folder as training leaves it, without training: card, weights, kohya file, grids, private files
    (tiny but whole: push verifies every file it uploads)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    run_dir = tmp_path / "alice-private-photos"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "README.md").write_text("---\ntags: [lora]\n---\n# card\n")
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, str(run_dir / WEIGHT_NAME))
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(run_dir / f"sks{KOHYA_SUFFIX}"))
    Image.new("RGB", (8, 8)).save(run_dir / "samples" / "step-000001.png")
    Image.new("RGB", (8, 8), "white").save(run_dir / "samples" / "step-000002.png")
    (run_dir / "config.yaml").write_text(f"data:\n  instance_dir: {tmp_path}/photos\n")
    (run_dir / "checkpoints" / "step-2" / "state.pt").write_bytes(b"state")
    return run_dir


def test_push_is_one_private_commit_of_every_file(finished_run, fake_hub):
    names = push(finished_run, "me/toy-lora")

    files = files_to_push(finished_run)
    assert names == [f.relative_to(finished_run).as_posix() for f in files]
    assert names == ["README.md", WEIGHT_NAME, f"sks{KOHYA_SUFFIX}", "samples/step-000002.png"]
    assert [call for call, _ in fake_hub.calls] == ["__init__", "create_repo", "create_commit"]
    assert fake_hub.named("__init__") == [{}]  # no token passed: it comes from the environment or hf auth login
    [repo] = fake_hub.named("create_repo")
    assert repo["repo_id"] == "me/toy-lora" and repo["private"] is True and repo["repo_type"] == "model"
    [commit] = fake_hub.named("create_commit")
    assert commit["repo_id"] == "me/toy-lora" and commit["repo_type"] == "model"
    assert [op.path_in_repo for op in commit["operations"]] == names
    assert [Path(op.path_or_fileobj) for op in commit["operations"]] == files
    # the commit message names no local folder
    assert finished_run.name not in commit["commit_message"] and "/" not in commit["commit_message"]


def test_push_public(finished_run, fake_hub):
    push(finished_run, "me/toy-lora", public=True)
    [repo] = fake_hub.named("create_repo")
    assert repo["private"] is False
    assert len(fake_hub.named("create_commit")) == 1


def test_failed_commit_is_one_error_line_and_nothing_partial(finished_run, fake_hub):
    fake_hub.fail = True
    with pytest.raises(SdtuneError) as info:
        push(finished_run, "me/toy-lora")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("push to me/toy-lora failed: RuntimeError: boom: 403 Forbidden")
    assert "hf auth login" in message and "second line" not in message
    assert len(fake_hub.named("create_commit")) == 1
    assert fake_hub.named("upload_file") == [] and fake_hub.named("upload_folder") == []


def test_vanished_file_fails_before_the_repo_is_created(finished_run, fake_hub, monkeypatch):
    monkeypatch.setattr(share, "files_to_push", lambda run_dir: [run_dir / "README.md", run_dir / "gone.png"])
    with pytest.raises(SdtuneError, match=r"^push: 1 of 2 files are not fit to upload: gone.png: No such file") as info:
        push(finished_run, "me/toy-lora")
    assert "\n" not in str(info.value)
    assert fake_hub.named("create_repo") == [] and fake_hub.named("create_commit") == []


def test_dry_run_and_refusals_call_nothing(finished_run, fake_hub, tmp_path):
    assert push(finished_run, "me/toy-lora", dry_run=True) == [
        "README.md", WEIGHT_NAME, f"sks{KOHYA_SUFFIX}", "samples/step-000002.png"]
    with pytest.raises(SdtuneError, match=r"^--repo: 'me/my lora' is not a Hugging Face repo id"):
        push(finished_run, "me/my lora")
    (finished_run / "README.md").unlink()
    with pytest.raises(SdtuneError, match="no README.md model card"):
        push(finished_run, "me/toy-lora")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "README.md").write_text("# card\n")
    with pytest.raises(SdtuneError, match=f"no {WEIGHT_NAME}; push a finished run folder"):
        push(unfinished, "me/toy-lora")
    assert fake_hub.calls == []
