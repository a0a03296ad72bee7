"""sdtune ui without a browser: path confinement (unit and over HTTP), the POST and auth gates, uploads through
the safe image reader, crop boxes reaching prep, config errors at their fields, and jobs whose state lives in
the workspace (a second server sees them; the server's end stops none)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.prep import prep
from sdtune.ui import jobs, photos
from sdtune.ui.server import make_server
from sdtune.ui.workspace import Workspace, confine

ROOT = Path(__file__).resolve().parents[1]


def png_header(size: tuple[int, int]) -> bytes:
    """A PNG whose header says ``size`` and whose pixel data is one empty row: what a decompression bomb
    looks like to a reader that checks the size first (making a real 20,000 px square one took 15 s)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def png(size=(96, 64), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some detail, so the photo is not flagged blurry against the others
        for y in range(0, size[1], 8):
            if (x + y) % 16 == 0:
                im.putpixel((x, y), (255, 255, 255))
    im.save(buf, "PNG")
    return buf.getvalue()


# -- confinement -------------------------------------------------------------------------------------------


@pytest.fixture
def ws_root(tmp_path):
    root = tmp_path / "ws"
    Workspace(root)
    (root / "runs" / "a.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    os.symlink(tmp_path / "secret.txt", root / "runs" / "link_out")
    os.symlink(tmp_path, root / "dir_out")
    os.symlink(root / "runs" / "a.txt", root / "link_in")
    return root


@pytest.mark.parametrize("bad", [
    "..", "../secret.txt", "runs/../../secret.txt", "runs/../../ws2/x", "/etc/passwd", str(Path("/tmp")),
    "runs/link_out", "dir_out/secret.txt", "dir_out", "runs/a.txt\0", "~/x",
])
def test_confine_refuses_paths_outside(ws_root, bad):
    with pytest.raises(SdtuneError, match="path refused"):
        confine(ws_root, bad)


def test_confine_keeps_paths_inside(ws_root):
    assert confine(ws_root, "runs/a.txt").read_text() == "inside"
    assert confine(ws_root, "runs/../runs/a.txt") == ws_root.resolve() / "runs" / "a.txt"
    assert confine(ws_root, "link_in").read_text() == "inside"  # a link that stays inside is followed
    assert confine(ws_root, "") == ws_root.resolve()
    assert confine(ws_root, "new/file.png") == ws_root.resolve() / "new" / "file.png"  # not there yet: fine


# -- the server over HTTP ------------------------------------------------------------------------------------


@pytest.fixture
def server(ws_root):
    srv = make_server(ws_root, port=0, recipe_dir=ROOT / "recipes")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    if method == "POST":
        headers = {"X-Sdtune": "1", **(headers or {})}
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def test_files_endpoint_refuses_traversal(server):
    assert request(server, "GET", "/files/runs/a.txt") == (200, b"inside")
    assert request(server, "GET", "/files/link_in")[0] == 200
    for path in ["/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/runs/%2e%2e/%2e%2e/secret.txt",
                 "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/runs/link_out", "/files/dir_out/secret.txt",
                 "/files/runs/a.txt%00"]:
        status, body = request(server, "GET", path)
        assert status == 400, path
        assert b"TOPSECRET" not in body and b"root:" not in body
        assert b"path refused" in body
    # writes go through the same function: an upload's name cannot leave photos/
    status, body = request(server, "POST", "/api/upload?name=../../evil.png", png())
    assert status == 200 and json.loads(body)["photo"] == "evil.png"
    assert (server.ws.root / "photos" / "evil.png").is_file() and not (server.ws.root.parent / "evil.png").exists()


def test_post_needs_the_header_and_auth_when_set(server, ws_root):
    status, _ = request(server, "GET", "/api/state")
    assert status == 200
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", "/api/drop", body=b"{}")  # what a form on another site could send
    assert conn.getresponse().status == 403
    with pytest.raises(SdtuneError, match="--auth"):
        make_server(ws_root, host="0.0.0.0", port=0)
    srv = make_server(ws_root, port=0, auth="ann:pw")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert request(srv, "GET", "/api/state")[0] == 401
        assert request(srv, "GET", "/files/runs/a.txt")[0] == 401
        bad = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
        assert request(srv, "GET", "/api/state", headers=bad)[0] == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"ann:pw").decode()}
        assert request(srv, "GET", "/files/runs/a.txt", headers=good) == (200, b"inside")
    finally:
        srv.shutdown()
        srv.server_close()


def test_uploads_go_through_the_safe_reader(server):
    status, body = request(server, "POST", "/api/upload?name=fake.png", b"not a png at all")
    assert status == 400 and b"fake.png" in body
    assert not (server.ws.root / "photos" / "fake.png").exists()
    status, body = request(server, "POST", "/api/upload?name=bomb.png", png_header((20000, 20000)))
    assert status == 400 and b"bomb.png" in body  # over Pillow's pixel limit, as prep refuses it
    assert request(server, "POST", "/api/upload?name=ok.png", png())[0] == 200
    assert request(server, "POST", "/api/upload?name=ok.txt", b"a photo of sks toy")[0] == 200
    state = json.loads(request(server, "GET", "/api/state")[1])
    assert [(p["name"], p["caption"]) for p in state["photos"]] == [("ok.png", "a photo of sks toy")]


def test_train_form_errors_land_at_their_fields(server):
    status, body = request(server, "POST", "/api/train",
                           json.dumps({"steps": -1, "rank": "x", "advanced": "foo.bar=1", "run": "ok"}))
    assert status == 400
    fields = json.loads(body)["fields"]
    assert set(fields) == {"steps", "rank", "advanced"}
    assert "train.max_steps" in fields["steps"] and "foo" in fields["advanced"]
    status, body = request(server, "POST", "/api/train", json.dumps({"run": "../x"}))
    assert json.loads(body)["fields"] == {"run": "'../x' is not a run name (letters, digits, _ and -)"}


def test_a_transformer_files_base_model_is_a_field_of_the_train_form(tmp_path):
    from sdtune.ui.tasks import train_overrides

    ws = Workspace(tmp_path / "ws")
    _, given = train_overrides(ws, {"run": "r", "base": "x.safetensors", "model_base": "black-forest-labs/FLUX.1-dev"})
    assert "model.base=black-forest-labs/FLUX.1-dev" in given
    _, plain = train_overrides(ws, {"run": "r", "base": "micro", "model_base": ""})
    assert not any(o.startswith("model.base=") for o in plain)


# -- photos: starting boxes, a moved box, prep ----------------------------------------------------------


def test_moved_crop_box_reaches_prep(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        photos.add_upload(ws, f"p{i}.png", png((96, 64), color))
        photos.set_caption(ws, f"p{i}", "a photo of sks toy")
    state = photos.analyse(ws, "center", 64)
    assert state["photos"]["p0.png"]["box"] == [16, 0, 80, 64]  # the centre square of 96x64
    photos.set_box(ws, "p1.png", [0, 8, 48, 56])
    with pytest.raises(SdtuneError, match="not inside"):
        photos.set_box(ws, "p1.png", [60, 0, 120, 60])
    report = photos.prepare(ws, 64, "center")
    rows = {r["source"]: r for r in report["files"] if r["status"] == "kept"}
    assert rows["p1.png"]["crop"] == "user" and rows["p1.png"]["crop_box"] == [0, 8, 48, 56]
    assert rows["p0.png"]["crop"] == "center" and rows["p0.png"]["crop_box"] == [16, 0, 80, 64]
    assert (ws.root / "dataset" / "metadata.jsonl").is_file() and (ws.root / "dataset" / "contact_sheet.jpg").is_file()
    photos.drop_photo(ws, "p2.png")
    assert photos.photo_names(ws) == ["p0.png", "p1.png"] and (ws.root / "photos_dropped" / "p2.png").is_file()


def test_prep_crop_boxes_are_checked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png((96, 64)))
    two = Image.new("RGB", (96, 64), (255, 0, 0))
    two.paste((0, 90, 0), (40, 0, 96, 64))  # red left of x=40, green from it
    two.save(src / "b.png")
    report = prep(src, tmp_path / "out", resolution=64, caption="x", workers=1, progress=False,
                  crop_boxes={"a.png": (0, 0, 64, 40), "b.png": (40, 0, 96, 56)})
    rows = {r["source"]: r for r in report["files"]}
    assert rows["a.png"]["status"] == "skipped" and "not square" in rows["a.png"]["reason"]
    assert rows["b.png"]["status"] == "kept" and rows["b.png"]["crop_box"] == [40, 0, 96, 56]
    # the output is that crop, resized: all green, none of the red left of x=40
    out = Image.open(tmp_path / "out" / rows["b.png"]["output"]).convert("RGB")
    assert out.size == (64, 64)
    inner = out.crop((3, 0, 64, 64))  # (the resize filter reaches a pixel or two past the box edge)
    assert inner.getextrema()[0][1] < 5 and inner.getextrema()[1][0] > 80


# -- jobs: state in the workspace ----------------------------------------------------------------------------


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_job_state_is_in_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    job = jobs.start(ws, "version", ["--version"])
    assert wait_for(lambda: jobs.status(ws, job["name"])["state"] == "finished")
    again = Workspace(tmp_path / "ws")  # another server on the same folder
    s = jobs.status(again, job["name"])
    assert s["rc"] == 0 and any("sdtune" in line for line in s["log"])
    assert jobs.names(again) == [job["name"]]


def test_stop_and_a_killed_server_leave_jobs_alone(tmp_path):
    """The server runs as its own process; a job it started survives its SIGKILL, a restarted server finds it
    running, and Stop (SIGTERM) ends it as 'stopped'."""
    ws_dir = tmp_path / "ws"
    server = subprocess.Popen([sys.executable, "-m", "sdtune", "ui", "--workspace", str(ws_dir), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "sdtune ui: http://127.0.0.1:" in line
        ws = Workspace(ws_dir)
        job = jobs.launch(ws, "sleep", [sys.executable, "-c", "import time; time.sleep(60)"])
        assert job["state"] == "running"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        time.sleep(0.5)
        assert jobs.status(Workspace(ws_dir), job["name"])["state"] == "running"
        jobs.stop(Workspace(ws_dir), job["name"])
        assert wait_for(lambda: jobs.status(ws, job["name"])["state"] == "stopped")
        assert jobs.status(ws, job["name"])["rc"] == 143
    finally:
        if server.poll() is None:
            server.kill()


def test_push_token_is_never_written(tmp_path):
    from sdtune.ui import tasks

    ws = Workspace(tmp_path / "ws")
    run = ws.root / "runs" / "r"
    run.mkdir()
    (run / "config.yaml").write_text("train: {max_steps: 1}\n")
    job = tasks.start_push(ws, {"run": "runs/r", "repo": "me/x", "token": "hf_SECRET123", "dry_run": True})
    assert wait_for(lambda: jobs.status(ws, job["name"])["state"] not in ("running", "starting"))
    for file in ws.root.rglob("*"):
        if file.is_file():
            assert b"hf_SECRET123" not in file.read_bytes(), file
    assert "hf_SECRET123" not in json.dumps(jobs.status(ws, job["name"]))


def test_two_tabs_stopping_the_same_job_both_succeed(server):
    """Two tabs follow the same training and both press Stop: the job gets its SIGTERM and ends 'stopped'; the
    second Stop (sent while it stops, and again once it has ended) answers with the job's state, not an error
    box (it said 'job ... is not running (stopped)')."""
    ws = server.ws
    # a job that, like a training, takes a moment to stop after SIGTERM and exits 143
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(143)))\n"
              "time.sleep(60)\n")
    job = jobs.launch(ws, "train", [sys.executable, "-c", script])
    assert wait_for(lambda: jobs.status(ws, job["name"])["state"] == "running")
    time.sleep(0.3)  # the handler is installed
    body = json.dumps({"name": job["name"]}).encode()
    headers = {"Content-Type": "application/json"}
    first = request(server, "POST", "/api/stop", body, headers)
    second = request(server, "POST", "/api/stop", body, headers)  # the other tab, while the job stops
    assert first[0] == 200 and second[0] == 200, (first, second)
    assert wait_for(lambda: jobs.status(ws, job["name"])["state"] == "stopped")
    status, answer = request(server, "POST", "/api/stop", body, headers)  # a tab that polled late
    assert status == 200 and json.loads(answer)["state"] == "stopped"
    assert jobs.status(ws, job["name"])["rc"] == 143


def test_stop_pressed_as_a_job_starts_waits_for_it(tmp_path, monkeypatch):
    """Stop on a job whose process has not written its pid yet ('starting') waits for it, then stops it (it
    said 'not running (starting)'); one that never starts is one line after STARTING_S."""
    from sdtune.ui.workspace import write_json

    ws = Workspace(tmp_path / "ws")
    folder = ws.path("jobs") / "train-001"
    folder.mkdir()
    write_json(folder / "job.json", {"name": "train-001", "kind": "train", "argv": ["python", "-m", "sdtune"],
                                     "run_dir": None, "started": time.time()})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        late = threading.Timer(0.5, lambda: (folder / "pid").write_text(str(child.pid)))
        late.start()
        assert jobs.stop(ws, "train-001")["pid"] == child.pid
        assert child.wait(10) == -signal.SIGTERM  # (no watcher here writes its rc: its state then reads 'lost')
    finally:
        child.kill()
    (folder / "pid").unlink()
    monkeypatch.setattr(jobs, "STARTING_S", 0.2)
    with pytest.raises(SdtuneError, match="train-001 has not started in 0 s; fix: press Stop again"):
        jobs.stop(ws, "train-001")
