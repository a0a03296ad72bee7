"""Tests for sdtune/hub.py: the one rule for Hugging Face hub ids. Offline; nothing is looked up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdtune import hub, share
from sdtune.errors import SdtuneError
from sdtune.hub import check_repo_id, is_hub_id, public_model_id

VALID = ["user/my-dog-lora", "stable-diffusion-v1-5/stable-diffusion-v1-5", "Org_1/model.v2", "a/b"]
INVALID = [
    "user/my model",  # a space
    "a/b/c",  # more than one "/"
    "my-dog-lora",  # no owner: the Hub allows it, sdtune wants owner/name
    "user/",
    "/name",
    "",
    "user/my--lora",
    "user/my..lora",
    "user/lora.git",
    "user/-lora",
    "user/" + "x" * 97,
    "./x",
    "../x/y",
    "/abs/path",
    "~/x",
    "~user/x",
    ".hidden/x",
]


@pytest.mark.parametrize("name", VALID)
def test_valid_ids(name: str) -> None:
    assert is_hub_id(name)
    assert public_model_id(name) == name
    check_repo_id(name, "--repo")  # does not raise


@pytest.mark.parametrize("name", INVALID)
def test_invalid_ids(name: str) -> None:
    assert not is_hub_id(name)
    assert public_model_id(name) is None
    with pytest.raises(SdtuneError) as info:
        check_repo_id(name, "--repo")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--repo: '{name}' is not a Hugging Face repo id (")
    assert "fix: use owner/name, like user/my-dog-lora" in message


def test_check_repo_id_names_the_option() -> None:
    with pytest.raises(SdtuneError, match=r"^model\.pretrained: 'user/my model' .*letters, digits"):
        check_repo_id("user/my model", "model.pretrained")
    with pytest.raises(SdtuneError, match="exactly one '/'"):
        check_repo_id("a/b/c", "--repo")


def test_existing_local_folder_is_not_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user" / "my-dog-lora").mkdir(parents=True)
    (tmp_path / "user" / "weights.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    for name in ("user/my-dog-lora", "user/weights.safetensors"):
        assert not is_hub_id(name)
        assert public_model_id(name) is None
        # push --repo names a destination on the Hub: a local folder of that name is no reason to refuse
        check_repo_id(name, "--repo")
    assert is_hub_id("user/other-lora")


def test_home_folder_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not is_hub_id("~/x")
    assert not is_hub_id(str(tmp_path))


@pytest.mark.parametrize("model", [None, ""])
def test_nothing_is_no_public_id(model: str | None) -> None:
    assert public_model_id(model) is None


def test_the_model_card_names_only_hub_ids(tmp_path: Path) -> None:
    from sdtune import families

    config = {"model": {"pretrained": ""}, "data": {"identifier": "sks"}, "train": {"max_steps": 1, "batch_size": 1,
              "learning_rate": 1e-4, "lr_scheduler": "constant", "optimizer": "adamw", "mixed_precision": "no"},
              "lora": {"rank": 4, "target_modules": ["to_q"]}}
    for name in [*VALID, *INVALID, str(tmp_path)]:
        config["model"]["pretrained"] = name
        card = share.model_card(config, families.get("sd15"), None, None)
        assert (f"base_model: {name}" in card) == (public_model_id(name) is not None), name


def test_the_model_card_of_a_transformer_file_loads_it_into_its_base(tmp_path: Path) -> None:
    """A FLUX.1 / SD3.x transformer file beside model.base: the snippet loads the file's transformer into the base's
    pipeline (in bf16, as these families run), names the file by its name only, and the base by its hub id."""
    from sdtune import families

    config = {"model": {"pretrained": str(tmp_path / "my-finetune.safetensors"), "base": "black-forest-labs/FLUX.1-dev"},
              "data": {"identifier": "sks"}, "train": {"max_steps": 1, "batch_size": 1, "learning_rate": 1e-4,
              "lr_scheduler": "constant", "optimizer": "adamw", "mixed_precision": "bf16"},
              "lora": {"rank": 4, "target_modules": ["to_q"]}}
    card = share.model_card(config, families.get("flux"), None, None)
    assert "transformer = FluxTransformer2DModel.from_single_file('my-finetune.safetensors', " \
           "config='black-forest-labs/FLUX.1-dev', subfolder='transformer', dtype=dtype)" in card
    assert "dtype = torch.bfloat16 if device == 'cuda' else torch.float32" in card
    assert "FluxPipeline.from_pretrained('black-forest-labs/FLUX.1-dev', transformer=transformer" in card
    assert str(tmp_path) not in card and "base_model:" not in card  # the fine-tune is not on the Hub
    assert "max_sequence_length=512).images[0]" in card  # FLUX.1-dev's T5 length, said in the call
    schnell = share.model_card({**config, "flux": {"max_sequence_length": 128}}, families.get("flux"), None,
                               "x.safetensors")
    assert "max_sequence_length=128).images[0]" in schnell and "<lora:x:1>" in schnell
    assert "## ComfyUI, Forge\n" in schnell and "AUTOMATIC1111" not in schnell  # the UIs that load FLUX LoRAs
    config["model"] = {"pretrained": "x/sd35.safetensors", "base": str(tmp_path / "sd35-medium")}  # a local base
    card = share.model_card(config, families.get("sd3"), None, None)
    assert "SD3Transformer2DModel.from_single_file('sd35.safetensors', config='BASE_MODEL'" in card
    assert str(tmp_path) not in card
    config["model"] = {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    card = share.model_card(config, families.get("sd15"), None, None)
    assert "StableDiffusionPipeline.from_pretrained('stable-diffusion-v1-5/stable-diffusion-v1-5', " \
           "dtype=dtype).to(device)" in card and "max_sequence_length" not in card


def test_import_is_light() -> None:
    """The CLI imports sdtune modules while building its parser; huggingface_hub is loaded only on use."""
    code = (
        "import sys\n"
        "import sdtune.hub as hub\n"
        "before = sorted(m for m in ('huggingface_hub', 'torch') if m in sys.modules)\n"
        "hub.is_hub_id('user/x')\n"
        "print(before, 'huggingface_hub' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["[]", "True"], result.stdout + result.stderr
    assert hub.__all__ == ["check_repo_id", "is_hub_id", "offline_reason", "offline_unless_reachable", "public_model_id"]
