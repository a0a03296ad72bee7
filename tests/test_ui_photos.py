"""sdtune ui's Photos side, as a user drives it: one naming rule for a photo and its caption (any script,
spaces, brackets), uploads that never overwrite (a clash gets a new name and says so, a folder upload keeps
its subfolder, dropped copies are kept), crop boxes moved by hand that survive another upload or another
starting crop, and request errors that are one 400 line naming the field (a 500, without a trace, only for
a bug)."""

from __future__ import annotations

import http.client
import io
import json
import threading
import unicodedata
from pathlib import Path

import pytest
from PIL import Image
from test_ui import request as raw_request

from sdtune.errors import SdtuneError
from sdtune.ui import photos
from sdtune.ui.server import make_server
from sdtune.ui.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def png(size=(96, 64), color=(200, 30, 30), seed=0) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some detail, so no photo is flagged blurry against the others
        for y in range(0, size[1], 8):
            if (x + y + seed) % 16 == 0:
                im.putpixel((x, y), (255, 255, 255))
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    srv = make_server(tmp_path / "ws", port=0, recipe_dir=ROOT / "recipes")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None) -> tuple[int, dict]:
    status, data = raw_request(srv, method, path, body, headers)
    return status, json.loads(data)


def upload(srv, name: str, data: bytes) -> tuple[int, dict]:
    from urllib.parse import quote

    return request(srv, "POST", "/api/upload?name=" + quote(name), data)


# -- C: one naming rule for a photo and its caption -----------------------------------------------------------


NAMES = ["IMG (1).jpg", "my dog été 🐶.jpg", "犬.jpg", unicodedata.normalize("NFD", "Zoë.png")]


@pytest.mark.parametrize("name", NAMES)
def test_a_photo_of_any_name_gets_its_caption(tmp_path, name):
    ws = Workspace(tmp_path / "ws")
    suffix = Path(name).suffix
    image = png() if suffix == ".png" else _jpeg()
    stored = photos.add_upload(ws, name, image)["photo"]
    assert stored == unicodedata.normalize("NFC", name)  # letters of any script, spaces, brackets kept
    # its .txt uploaded beside it, and a caption typed under it, both land where prep reads them
    assert "note" not in photos.add_upload(ws, str(Path(name).with_suffix(".txt")), b"a photo of sks dog")
    assert photos.caption_of(ws, stored) == "a photo of sks dog"
    photos.set_caption(ws, Path(stored).stem, "a photo of sks dog on a sofa")
    assert photos.caption_of(ws, stored) == "a photo of sks dog on a sofa"
    assert sorted(p.name for p in (ws.root / "photos").iterdir()) == sorted([stored, Path(stored).stem + ".txt"])
    photos.analyse(ws, "center", 64)
    report = photos.prepare(ws, 64, "center")  # refused before: "IMG_1_.jpg has no caption"
    row = next(r for r in report["files"] if r["source"] == stored)
    assert row["status"] == "kept" and row["caption"] == "a photo of sks dog on a sofa"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png())).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(("given", "stored"), [
    ("dog/00.jpg", "dog_00.jpg"), ("../../evil.png", "evil.png"), ("a:b?.png", "a_b_.png"),
    ("con.png", "_con.png"), (".hidden.png", "hidden.png"), ("tab\there\n.png", "tab here.png"),
])
def test_only_what_is_unsafe_on_disk_is_replaced(given, stored):
    assert photos.safe_name(given) == stored
    assert photos.safe_name(stored) == stored  # a stored name maps to itself: photo and caption agree
    long = photos.safe_name("é" * 300 + ".png")
    assert len((long + ".jpg").encode()) <= photos.MAX_NAME_BYTES and long.endswith(".png")


# -- D: no upload overwrites another ------------------------------------------------------------------------------


def test_uploads_never_overwrite(server):
    root = server.ws.root
    # a folder upload (the page sends webkitRelativePath less the folder picked): the subfolder is in the name
    assert upload(server, "dog/00.png", png(color=(200, 30, 30)))[1]["photo"] == "dog_00.png"
    assert upload(server, "backpack/00.png", png(color=(30, 30, 200)))[1]["photo"] == "backpack_00.png"
    # another photo of a name (or stem) already taken: a new name, said
    first = png(color=(30, 200, 30))
    assert upload(server, "dog_1.png", first)[1] == {"photo": "dog_1.png", "size": [96, 64]}
    status, r = upload(server, "dog_1.png", png(color=(200, 200, 30)))
    assert status == 200 and r["photo"] == "dog_1 (2).png" and "stored as dog_1 (2).png" in r["note"]
    assert upload(server, "DOG_1.jpg", _jpeg())[1]["photo"] == "DOG_1 (3).jpg"  # one stem, one caption file
    assert (root / "photos" / "dog_1.png").read_bytes() == first
    # the same file again is not stored twice
    status, r = upload(server, "dog_1.png", first)
    assert r["photo"] == "dog_1.png" and "already here" in r["note"]
    assert len(list((root / "photos").glob("*.png"))) == 4
    # CJK names are photos, not "jpg: not an image"
    assert upload(server, "犬.png", png(seed=3)) == (200, {"photo": "犬.png", "size": [96, 64]})
    # a caption with no photo of its name is kept, and said
    status, r = upload(server, "nobody.txt", b"a photo of sks dog")
    assert status == 200 and "no photo named nobody" in r["note"]
    assert "note" not in upload(server, "dog_1 (2).txt", b"a photo of sks dog")[1]


def test_dropped_copies_are_kept(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for color in [(200, 30, 30), (30, 200, 30)]:
        photos.add_upload(ws, "a.png", png(color=color))
        photos.add_upload(ws, "a.txt", f"caption {color[0]}".encode())
        photos.analyse(ws, "center", 64)
        photos.drop_photo(ws, "a.png")
    dropped = ws.root / "photos_dropped"
    assert sorted(p.name for p in dropped.iterdir()) == ["a (2).png", "a (2).txt", "a.png", "a.txt"]
    assert (dropped / "a.txt").read_text() == "caption 200" and (dropped / "a (2).txt").read_text() == "caption 30"
    assert Image.open(dropped / "a.png").getpixel((1, 1)) == (200, 30, 30)
    with pytest.raises(SdtuneError, match="not a photo"):
        photos.drop_photo(ws, "../ui_state.json")  # a name, not a path into the workspace
    assert (ws.root / "ui_state.json").is_file()


# -- B: boxes moved by hand survive -------------------------------------------------------------------------------


def test_moved_boxes_survive_uploads_and_a_new_starting_crop(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for i in range(3):
        photos.add_upload(ws, f"p{i}.png", png((96, 64), seed=i))
    photos.analyse(ws, "center", 64)
    photos.set_box(ws, "p0.png", [8, 8, 48, 48])
    photos.set_box(ws, "p1.png", [0, 0, 90, 60])  # not square: fine for bucket, not for the others
    photos.add_upload(ws, "p3.png", png((96, 64), seed=3))  # one more photo, analysed again (what the page does)
    state = photos.analyse(ws, "bucket", 64)["photos"]
    assert state["p0.png"]["box"] == [8, 8, 48, 48] and state["p0.png"]["moved"]
    assert state["p1.png"]["box"] == [0, 0, 90, 60] and state["p1.png"]["moved"]
    assert not state["p2.png"].get("moved") and state["p2.png"]["start"] == "bucket"
    assert set(state) == {"p0.png", "p1.png", "p2.png", "p3.png"}
    state = photos.analyse(ws, "center", 64)["photos"]
    assert state["p0.png"]["box"] == [8, 8, 48, 48] and state["p0.png"]["moved"]
    assert state["p2.png"]["box"] == [16, 0, 80, 64]  # the new starting crop, where no box was moved
    # a moved box the new crop cannot use (prep refuses a non-square box but for bucket) is reset, and said
    assert state["p1.png"]["box"] == [16, 0, 80, 64] and not state["p1.png"].get("moved")
    assert any("not square" in w for w in state["p1.png"]["warnings"])
    for name in state:
        photos.set_caption(ws, Path(name).stem, "a photo of sks toy")
    rows = {r["source"]: r for r in photos.prepare(ws, 64, "center")["files"]}
    assert rows["p0.png"]["crop"] == "user" and rows["p0.png"]["crop_box"] == [8, 8, 48, 48]
    assert rows["p1.png"]["crop"] == "center" and rows["p1.png"]["status"] == "kept"


# -- E: one 400 line naming the field; 500 only for a bug, without a trace -----------------------------------------


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/analyse", {"resolution": None}, "resolution"),
    ("/api/analyse", {"resolution": "1e999"}, "resolution"),
    ("/api/analyse", {"resolution": 60}, "resolution"),
    ("/api/analyse", {"crop": 5}, "crop"),
    ("/api/analyse", {"crop": "wide"}, "crop"),
    ("/api/box", {"box": ["a", 1, 2, 3]}, "name"),
    ("/api/box", {"name": "p.png", "box": ["a", 1, 2, 3]}, "box"),
    ("/api/box", {"name": "p.png"}, "box"),
    ("/api/box", {"name": "p.png", "box": [0, 0, 500, 500]}, "box"),
    ("/api/box", {"name": "nope.png", "box": [0, 0, 8, 8]}, "name"),
    ("/api/caption", {"caption": "x"}, "name"),
    ("/api/caption", {"name": "p.png", "caption": None}, "caption"),
    ("/api/caption", {"name": "../ui_state.json", "caption": "x"}, "name"),
    ("/api/prepare", {"resolution": None}, "resolution"),
    ("/api/box", "not json", "JSON"),
])
def test_bad_requests_answer_one_line_naming_the_field(server, path, body, field):
    assert upload(server, "p.png", png())[0] == 200
    assert request(server, "POST", "/api/analyse", json.dumps({"crop": "center", "resolution": 64}))[0] == 200
    status, r = request(server, "POST", path, body if isinstance(body, str) else json.dumps(body))
    assert status == 400, r
    assert set(r) == {"error"} and "\n" not in r["error"] and field in r["error"], r


def test_an_upload_too_big_is_refused_by_its_name(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/upload?name=huge%20photo.jpg")
    conn.putheader("X-Sdtune", "1")
    conn.putheader("Content-Length", str(600 * 2**20))  # the body is never sent: refused from the header
    conn.endheaders()
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 400 and body["error"] == f"huge photo.jpg: {600 * 2**20} bytes is over the 512 MiB limit"
    assert r.getheader("Connection") == "close"  # the unread body is not taken for the next request
    conn.close()
    assert upload(server, "", png()) == (400, {"error": "name: the upload has no file name "
                                                        "(/api/upload?name=NAME.jpg)"})


def test_a_bug_is_a_500_line_without_a_trace(server, monkeypatch, capsys):
    def broken(*args):
        raise TypeError("boom")

    monkeypatch.setattr(photos, "analyse", broken)
    status, r = request(server, "POST", "/api/analyse", "{}")
    assert status == 500 and set(r) == {"error"} and "\n" not in r["error"]
    assert "TypeError: boom" in r["error"] and "a bug in sdtune" in r["error"]
    out = capsys.readouterr().out
    assert "POST /api/analyse failed" in out and "Traceback" in out  # the trace: in the server's terminal


def test_state_says_the_upload_limit_and_the_dataset(server):
    state = request(server, "GET", "/api/state")[1]
    assert state["max_upload_bytes"] == 512 * 2**20 and state["dataset"] is None
