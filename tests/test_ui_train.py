"""sdtune ui's Train / Compare / Evaluate / Export side without a browser: Train checks the config the job will
run (model, captions vs identifier, the prepared resolution, the run folder) and shows each problem at its
field; the Class field; a followed job's settings; a double click's twin job refused; Export from a
checkpoint; a PEFT folder downloaded as a .zip; Evaluate's metrics per base model; `sdtune ui`'s port errors."""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sdtune.config import load_config
from sdtune.ui import jobs, photos, tasks
from sdtune.ui.server import make_server
from sdtune.ui.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def png(color: tuple[int, int, int]) -> bytes:
    im = Image.new("RGB", (96, 96), color)
    for x in range(0, 96, 8):  # some detail, so no photo is flagged blurry
        for y in range(0, 96, 8):
            if (x + y) % 16 == 0:
                im.putpixel((x, y), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workspace with 3 photos captioned 'a photo of sks dog', prepared at 64 px, and the micro model."""
    ws = Workspace(tmp_path_factory.mktemp("train") / "ws")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        photos.add_upload(ws, f"p{i}.png", png(color))
        photos.set_caption(ws, f"p{i}", "a photo of sks dog")
    photos.analyse(ws, "center", 64)
    photos.prepare(ws, 64, "center")
    tasks.base_model(ws, tasks.MICRO)
    return ws


@pytest.fixture
def started(monkeypatch):
    """jobs.start recorded instead of run: the command Train would start."""
    calls = []
    monkeypatch.setattr(tasks.jobs, "start", lambda ws, kind, args, run_dir=None, env=None:
                        calls.append(args) or {"name": f"{kind}-001", "argv": args})
    return calls


def form(**given):
    return {"run": "dog1", "steps": "20", "identifier": "sks", "advanced": "prior.num_class_images=4", **given}


def refused(ws, **given) -> dict[str, str]:
    with pytest.raises(tasks.FieldError) as e:
        tasks.start_training(ws, ROOT / "recipes", form(**given))
    return e.value.fields


def test_train_checks_the_final_config_at_its_fields(prepared, started, tmp_path, monkeypatch):
    ws = prepared
    # captions say sks: training ohwx would sample a word it never learnt
    fields = refused(ws, identifier="ohwx")
    assert list(fields) == ["identifier"] and "'a photo of sks dog'" in fields["identifier"]
    assert "do not name 'ohwx'" in fields["identifier"]
    assert "whitespace" in refused(ws, identifier="a photo")["identifier"]  # the Identifier tab's "bad"
    assert "type an identifier" in refused(ws, identifier="")["identifier"]
    # a base model folder relative to where `sdtune ui` started (the job runs in the workspace)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mm").mkdir()
    assert f"{tmp_path / 'mm'} has no model_index.json" in refused(ws, base="mm")["base"]
    assert f"read from {tmp_path}" in refused(ws, base="nothere")["base"]
    # an SDXL recipe on the micro model (SD1.x): at the recipe, in the page's terms
    fields = refused(ws, recipe="sdxl_dreambooth_lora.yaml", advanced="train.mixed_precision=no")
    assert list(fields) == ["recipe"] and "sdxl_dreambooth_lora.yaml does not fit this base model" in fields["recipe"]
    # an SD1.5 recipe trains at 512 px: the photos prepared at 64 are refused, not upscaled x8
    fields = refused(ws, recipe="sd15_dreambooth_lora_prior.yaml", advanced="train.mixed_precision=no")
    assert fields == {"dataset": "the photos were prepared at 64 px, and this run trains at 512 px: set the "
                                 "Photos tab's resolution to 512 and Prepare again"}
    # a run name that holds a run already
    (ws.root / "runs" / "old" / "checkpoints" / "step-000010").mkdir(parents=True)
    assert "choose a new run name" in refused(ws, run="old")["run"]
    assert started == []  # nothing started on any refusal


def test_class_field_sets_the_class_the_prompts_and_the_samples(prepared, started):
    ws = prepared
    tasks.start_training(ws, ROOT / "recipes", form(**{"class": "dog"}))
    args = started[0]
    assert args[0] == "train" and args[2] == f"model.pretrained={ws.root / 'models' / 'micro'}"
    cfg = load_config(args[1], args[2:])
    assert cfg.prior.class_prompt == "a photo of a dog"
    assert cfg.data.instance_prompt == "a photo of sks dog"
    # the recipe's scenes stay, with the user's class in place of the recipe's (toy)
    assert cfg.sample.prompts[0] == "a photo of sks dog on a green background"
    assert cfg.sample.prompts[-1] == "a photo of a dog" and not any("toy" in p for p in cfg.sample.prompts)
    assert "not a class noun" in refused(ws, **{"class": "<b>"})["class"]
    # a tab that follows this job shows its settings
    shown = tasks.form_of(ws, args)
    assert shown["base"] == "micro" and shown["class"] == "dog" and shown["run"] == "dog1"
    assert shown["steps"] == "20" and shown["advanced"] == "prior.num_class_images=4\n"
    # without a class, prompts the user typed under "advanced" stay there
    own = tasks.form_of(ws, ["train", "r.yaml", 'sample.prompts=["x {identifier}"]'])
    assert own["advanced"] == 'sample.prompts=["x {identifier}"]\n' and "class" not in own


def test_train_settings_are_checked_before_the_model(tmp_path, started):
    """The form's own errors come first, without a dataset or a model (no check_run)."""
    ws = Workspace(tmp_path / "ws")
    fields = refused(ws, steps="-1")
    assert list(fields) == ["steps"]
    assert refused(ws) == {"dataset": "no prepared dataset yet: press Prepare on the Photos tab first"}


def fake_run(ws: Workspace, name: str, final: bool, steps=(10, 20)) -> Path:
    run = ws.root / "runs" / name
    for step in steps:
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").write_text("")
    (run / "config.yaml").write_text(f"model: {{pretrained: {ws.root / 'models' / 'micro'}}}\n")
    if final:
        (run / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    return run


def test_export_takes_a_checkpoint(tmp_path, started):
    ws = Workspace(tmp_path / "ws")
    stopped = fake_run(ws, "stopped", final=False)
    job = tasks.start_export(ws, {"run": "runs/stopped", "format": "kohya"})  # no final weights: the latest
    assert started[-1][1] == str(stopped / "checkpoints" / "step-000020")
    assert job["file"] == "exports/stopped_step-000020_kohya.safetensors"
    tasks.start_export(ws, {"run": "runs/stopped", "format": "peft", "checkpoint": "step-000010"})
    assert started[-1][1] == str(stopped / "checkpoints" / "step-000010")
    with pytest.raises(tasks.FieldError, match="no complete checkpoint 'step-5'"):
        tasks.start_export(ws, {"run": "runs/stopped", "format": "kohya", "checkpoint": "step-5"})
    done = fake_run(ws, "done", final=True)
    tasks.start_export(ws, {"run": "runs/done", "format": "kohya"})
    assert started[-1][1] == str(done)


def test_eval_metrics_follow_the_base_model(tmp_path, started):
    ws = Workspace(tmp_path / "ws")
    fake_run(ws, "micro", final=True)
    other = fake_run(ws, "sd15", final=True)
    (other / "config.yaml").write_text("model: {pretrained: stable-diffusion-v1-5/stable-diffusion-v1-5}\n")
    tasks.start_eval(ws, {"run": "runs/micro"})
    tasks.start_eval(ws, {"run": "runs/sd15"})
    assert [a[a.index("--metrics") + 1] for a in started] == ["world", "paper"]


def test_a_second_identical_compare_is_refused_and_outputs_are_unique(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    fake_run(ws, "r", final=True)
    form = {"run": "runs/r", "prompts": "a photo of sks dog", "seeds": "0", "scales": "0,1"}
    real_start, outs = jobs.start, []

    def slow_start(ws, kind, args, run_dir=None, env=None):  # a job that runs (sleeps) with the sample command
        outs.append(args[args.index("--out") + 1])
        return jobs.launch(ws, kind, [sys.executable, "-c", "import time; time.sleep(30)", *args], run_dir)

    monkeypatch.setattr(tasks.jobs, "start", slow_start)
    first = tasks.start_compare(ws, form)
    try:
        with pytest.raises(tasks.FieldError, match=f"{first['name']} is doing exactly this already"):
            tasks.start_compare(ws, form)
        second = tasks.start_compare(ws, {**form, "seeds": "1"})  # another grid: fine, into another file
        assert len(set(outs)) == 2 and first["grid"] != second["grid"]
        jobs.stop(ws, second["name"])
    finally:
        jobs.stop(ws, first["name"])
    with pytest.raises(tasks.FieldError, match="whole numbers >= 0"):
        tasks.start_compare(ws, {**form, "seeds": "-1"})
    monkeypatch.setattr(tasks.jobs, "start", real_start)


def get(srv, path):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()


def test_a_peft_folder_downloads_as_a_zip(tmp_path):
    srv = make_server(tmp_path / "ws", port=0, recipe_dir=ROOT / "recipes")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        peft = srv.ws.root / "exports" / "r_final_peft"
        (peft / "unet").mkdir(parents=True)
        (peft / "unet" / "adapter_model.safetensors").write_bytes(b"weights")
        (peft / "unet" / "adapter_config.json").write_text("{}")
        (tmp_path / "secret.txt").write_text("TOPSECRET")
        (peft / "leak.txt").symlink_to(tmp_path / "secret.txt")  # a link out of the workspace is not served
        status, kind, body = get(srv, "/files/exports/r_final_peft?download=1")
        assert status == 200 and kind == "application/zip"
        z = zipfile.ZipFile(io.BytesIO(body))
        assert sorted(z.namelist()) == ["unet/adapter_config.json", "unet/adapter_model.safetensors"]
        assert z.read("unet/adapter_model.safetensors") == b"weights"
        assert get(srv, "/files/?download=1")[0] == 404  # never the whole workspace
    finally:
        srv.shutdown()
        srv.server_close()


def ui(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtune", "ui", *args], capture_output=True, text=True, timeout=60)


def test_ui_port_errors_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = ui("--workspace", str(tmp_path / "ws"), "--port", str(port))
    assert r.returncode == 2  # sdtune's exit code for a user error
    assert r.stderr.strip() == (f"error: port {port} is in use by another program: --port 0 picks a free one, "
                                "or give another number")
    r = ui("--port", "99999")
    assert r.returncode == 2 and "99999: ports are 0-65535 (0: any free port)" in r.stderr
    assert "bug" not in r.stderr


def test_a_finished_jobs_output_is_found_again(tmp_path):
    ws = Workspace(tmp_path / "ws")
    fake_run(ws, "r", final=True)
    job = jobs.launch(ws, "export", [sys.executable, "-c", "pass", "export", str(ws.root / "runs" / "r"),
                                     "--format", "kohya", "-o", str(ws.root / "exports" / "r.safetensors")])
    end = time.monotonic() + 30
    while jobs.status(ws, job["name"])["state"] != "finished" and time.monotonic() < end:
        time.sleep(0.1)
    assert tasks.output_of(ws, job["name"]) == {"file": "exports/r.safetensors"}
    assert json.loads(json.dumps(tasks.output_of(ws, job["name"])))  # JSON-ready for /api/job
