"""Pivotal tuning's token embeddings go with every export format (``sdtune.export.embeddings_folder``: a diffusers
file's ``<name>_embeddings/``, a PEFT folder's ``embeddings/``, the kohya file's ``bundle_emb.*``), and
``sdtune sample`` of each export renders the run's pixels; a run's own kohya file in an original layout that
diffusers' loader cannot read (SD3) is sampled from the run's diffusers file beside it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import overrides
from sdtune.cli import main
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.export import Adapter, RunLora, _write_diffusers, export_run, write_kohya
from sdtune.grid import Cell, Settings
from sdtune.runs import WEIGHT_NAME
from sdtune.sample import Request, request_from_sidecar, run_sample
from sdtune.train import train


@pytest.fixture(scope="module")
def pivotal_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pivotal") / "run"
    return train(load_config(None, overrides(tiny_model("sd15"), out, "train.max_steps=4", "pivotal.enabled=true",
                                             "train.learning_rate=1e-2", "data.instance_prompt=a photo of sks toy")))


def _sample(target: Path, out: Path, *extra: str) -> np.ndarray:
    code = main(["sample", str(target), "--prompt", "a photo of sks toy", "--seeds", "0", "--steps", "2",
                 "--lora-scale", "1", "--width", "64", "--height", "64", "--out", str(out), *extra])
    assert code == 0
    return np.asarray(Image.open(out.parent / f"{out.stem}_cells" / "cell-0000.png"))


def test_diffusers_and_peft_exports_carry_the_embeddings_and_sample_the_runs_pixels(
        pivotal_run, tiny_model, tmp_path, capsys):
    model = str(tiny_model("sd15"))
    run_emb = load_file(pivotal_run / "embeddings" / "sks.safetensors")
    diffusers_file, _ = export_run(pivotal_run, "diffusers", tmp_path / "sks_diffusers.safetensors")
    peft_dir, _ = export_run(pivotal_run, "peft", tmp_path / "sks_peft")
    # beside the diffusers file under its own name (a second export into the folder keeps its own), inside
    # the PEFT folder; the tensors as the run's
    for path in (tmp_path / "sks_diffusers_embeddings" / "sks.safetensors", peft_dir / "embeddings" / "sks.safetensors"):
        exported = load_file(path)
        assert exported.keys() == run_emb.keys() and all(torch.equal(exported[k], run_emb[k]) for k in run_emb)
    export_run(pivotal_run, "diffusers", tmp_path / "other.safetensors")
    assert (tmp_path / "other_embeddings" / "sks.safetensors").is_file()
    # the command line says where they went
    assert main(["export", str(pivotal_run), "--format", "diffusers", "-o", str(tmp_path / "cli.safetensors")]) == 0
    assert f"token embeddings (pivotal tuning): {tmp_path / 'cli_embeddings' / 'sks.safetensors'}" in capsys.readouterr().out

    from_run = _sample(pivotal_run, tmp_path / "run.png")
    assert np.array_equal(from_run, _sample(diffusers_file, tmp_path / "diffusers.png", "--model", model))
    assert np.array_equal(from_run, _sample(peft_dir, tmp_path / "peft.png", "--model", model))
    # the embeddings make the difference: the LoRA file alone renders other pixels
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(diffusers_file, bare / "sks_diffusers.safetensors")
    assert not np.array_equal(from_run, _sample(bare / "sks_diffusers.safetensors", tmp_path / "bare.png",
                                                "--model", model))


def test_an_export_replaces_only_embedding_files_sdtune_wrote(pivotal_run, tmp_path):
    target = tmp_path / "lora.safetensors"
    foreign = tmp_path / "lora_embeddings" / "sks.safetensors"
    foreign.parent.mkdir()
    save_file({"clip_l": torch.zeros(1, 32)}, str(foreign))
    with pytest.raises(SdtuneError, match="lora_embeddings/sks.safetensors exists and sdtune did not write it"):
        export_run(pivotal_run, "diffusers", target)
    assert not target.exists()
    export_run(pivotal_run, "diffusers", target, overwrite=True)
    assert load_file(foreign)["clip_l"].shape == (2, 32)
    # an earlier export's file of an identifier this run has not is removed: sample would install it too
    stale = foreign.with_name("old.safetensors")
    shutil.copy(foreign, stale)
    export_run(pivotal_run, "diffusers", target)
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["sks.safetensors"]


def _sd3_lora(model: Path, seed: int) -> dict[str, Adapter]:
    """A random (non-zero) LoRA on the tiny SD3's attention."""
    from peft import LoraConfig

    from sdtune import families
    from sdtune.models import load_components

    c = load_components(str(model), families.get("sd3"))
    c.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapter = Adapter.from_module(c.denoiser)
    generator = torch.Generator().manual_seed(seed)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) * 0.5 if "lora_B" in k else v
                       for k, v in adapter.tensors.items()}
    return {"transformer": adapter}


def test_an_sd3_runs_own_kohya_file_samples_from_the_runs_diffusers_file(tiny_model, tmp_path, caplog):
    from sdtune import families

    model, sd3 = tiny_model("sd3"), families.get("sd3")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(model)}}))
    adapters = _sd3_lora(model, 0)
    _write_diffusers(RunLora(run / WEIGHT_NAME, adapters, {}), run / WEIGHT_NAME)
    kohya = write_kohya(run / "run_kohya.safetensors", sd3, adapters, base_model=str(model),
                        prediction_type="flow_matching")

    def render(name: str, lora: Path | None) -> np.ndarray:
        req = Request(model=str(model), lora=[(name, str(lora))] if lora else [],
                      cells=[Cell("a toy", 0, None, 1.0 if lora else None, name if lora else None)],
                      settings=Settings(steps=2, width=64, height=64))
        run_sample(req, tmp_path / f"{name}.png", progress=False)
        return np.asarray(Image.open(tmp_path / f"{name}_cells/cell-0000.png"))

    with caplog.at_level(logging.INFO, logger="sdtune"):
        from_kohya = render("kohya", kohya)
    assert f"run_kohya.safetensors is the LoRA of {run / WEIGHT_NAME} in kohya's SD3.x layout" in caplog.text
    assert np.array_equal(from_kohya, render("diffusers", run / WEIGHT_NAME))
    assert not np.array_equal(from_kohya, render("base", None))  # the LoRA is on
    # another LoRA's kohya file in the run folder is not taken for the run's: it is read as itself (sdtune's
    # reader of the original layout, as for a kohya file anywhere), giving that LoRA's own pixels
    caplog.clear()
    other_adapters = _sd3_lora(model, 1)
    other = write_kohya(run / "other.safetensors", sd3, other_adapters, base_model=str(model),
                        prediction_type="flow_matching")
    elsewhere = tmp_path / "elsewhere" / WEIGHT_NAME
    _write_diffusers(RunLora(elsewhere, other_adapters, {}), elsewhere)
    from_other = render("other", other)
    assert "is the LoRA of" not in caplog.text and not np.array_equal(from_other, from_kohya)
    assert np.abs(from_other.astype(int) - render("other_diffusers", elsewhere)).max() <= 1


def test_a_kohya_export_writes_the_standalone_embedding_files_beside_it(pivotal_run, tmp_path):
    """ComfyUI and Forge read no bundle_emb.* tensors: the export writes the run's files beside the kohya file too
    (its name's own folder), never over a file sdtune did not write; the run's own kohya file, beside the run's
    embeddings/, bundles them and adds no second copy."""
    run_emb = load_file(pivotal_run / "embeddings" / "sks.safetensors")
    assert [p.name for p in pivotal_run.glob("*_embeddings")] == []
    with safe_open(str(next(pivotal_run.glob("*_kohya.safetensors"))), "pt") as f:
        assert {k for k in f.keys() if k.startswith("bundle_emb.")} == {f"bundle_emb.sks.{k}" for k in run_emb}

    foreign = tmp_path / "sks_embeddings" / "sks.safetensors"
    foreign.parent.mkdir()
    save_file({"clip_l": torch.zeros(1, 32)}, str(foreign))
    assert main(["export", str(pivotal_run), "--format", "kohya", "-o", str(tmp_path / "sks.safetensors")]) == 2
    assert not (tmp_path / "sks.safetensors").exists() and load_file(foreign)["clip_l"].shape == (1, 32)
    foreign.unlink()

    kohya, _ = export_run(pivotal_run, "kohya", tmp_path / "sks.safetensors")
    exported = load_file(foreign)
    assert exported.keys() == run_emb.keys() and all(torch.equal(exported[k], run_emb[k]) for k in run_emb)
    with safe_open(str(kohya), "pt") as f:  # and still bundled, for AUTOMATIC1111
        assert all(torch.equal(f.get_tensor(f"bundle_emb.sks.{k}"), run_emb[k]) for k in run_emb)


def test_a_replay_notices_the_token_embeddings_changing(pivotal_run, tiny_model, tmp_path, capsys):
    """The LoRA file's sha256 does not cover the embedding files sample installs with it: the sidecar records
    theirs beside it, and a replay refuses changed, added or removed ones (an old sidecar: its LoRA only)."""
    folder = tmp_path / "copy"
    diffusers_file, _ = export_run(pivotal_run, "diffusers", folder / "sks.safetensors")
    _sample(diffusers_file, tmp_path / "grid.png", "--model", str(tiny_model("sd15")))
    sidecar = tmp_path / "grid_cells" / "cell-0000.json"
    recorded = json.loads(sidecar.read_text())
    assert len(recorded["embeddings_sha256"]) == 64
    replay = ["sample", "--replay", str(sidecar), "--out", str(tmp_path / "again.png")]

    embedding = folder / "sks_embeddings" / "sks.safetensors"
    tensors = load_file(embedding)
    save_file({k: v + 1 for k, v in tensors.items()}, str(embedding))
    capsys.readouterr()
    assert main(replay) == 2
    err = capsys.readouterr().err
    assert f"the token embeddings read with {diffusers_file.resolve()}" in err and "have changed since" in err
    embedding.unlink()
    assert main(replay) == 2
    assert "now none" in capsys.readouterr().err
    # a sidecar written before embeddings_sha256 existed: checked for its LoRA file only
    del recorded["embeddings_sha256"]
    sidecar.write_text(json.dumps(recorded))
    assert request_from_sidecar(sidecar).lora == [(recorded["cell"]["checkpoint"], recorded["lora"])]
