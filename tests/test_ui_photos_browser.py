"""The Photos tab in headless Chromium (Debian's ``chromium``, driven by Playwright), as the QA tester drove
it: a caption file that holds HTML is shown as text and runs nothing; a folder upload keeps each subfolder
in the photo's name; an analysis error (resolution 60) lands in the status line instead of leaving it at
"uploading..."; a box moved by hand survives a new starting crop; a reloaded page says the dataset is
prepared; and the page asks for no /favicon.ico."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from sdtune.ui.server import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [  # about 20 s on 2 cores, most of it Chromium's start
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make install` installs it)"),
]

ROOT = Path(__file__).resolve().parents[1]
XSS = "a photo of sks dog</textarea><img src=x onerror=\"document.title='pwned'\"><b>bold</b>"


def png(color, seed=0) -> bytes:
    im = Image.new("RGB", (96, 64), color)
    for x in range(0, 96, 8):  # some detail, so no photo is flagged blurry against the others
        for y in range(0, 64, 8):
            if (x + y + seed) % 16 == 0:
                im.putpixel((x, y), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def base(tmp_path):
    srv = make_server(tmp_path / "ws", port=0, recipe_dir=ROOT / "recipes")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.url, srv.ws
    srv.shutdown()
    srv.server_close()


def status_is(page, start: str, bad: bool | None = None) -> None:
    cls = "" if bad is None else f" && s.classList.contains('bad') == {str(bad).lower()}"
    try:
        page.wait_for_function(f"(() => {{ const s = document.getElementById('prep-status'); "
                               f"return s.textContent.startsWith({start!r}){cls}; }})()", timeout=60_000)
    except Exception:  # say what the page said instead
        shown = page.evaluate("[document.getElementById('prep-status').textContent, "
                              "document.getElementById('prep-status').className]")
        raise AssertionError(f"status never {start!r} (bad={bad}): {shown}") from None


def test_photos_tab_is_safe_and_says_what_happened(base, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[ui]'")
    url, ws = base
    files = tmp_path / "files"
    (files / "pick" / "dog").mkdir(parents=True)
    (files / "pick" / "backpack").mkdir()
    (files / "01.png").write_bytes(png((200, 30, 30)))
    (files / "01.txt").write_text(XSS)
    (files / "pick" / "dog" / "00.png").write_bytes(png((30, 200, 30), 1))
    (files / "pick" / "dog" / "00.txt").write_text("a photo of sks dog")
    (files / "pick" / "backpack" / "00.png").write_bytes(png((30, 30, 200), 2))
    (files / "pick" / "backpack" / "00.txt").write_text("a photo of sks dog")
    (files / "02.png").write_bytes(png((200, 200, 30), 3))
    (files / "02.txt").write_text("a photo of sks dog")
    requested: list[str] = []
    errors: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)

        # A: the caption's HTML is text in the textarea; nothing of it runs or becomes an element
        page.set_input_files("#files", [str(files / "01.png"), str(files / "01.txt")])
        page.wait_for_function("document.querySelectorAll('.card').length == 1")
        page.wait_for_timeout(300)  # an onerror handler would have run by now
        assert page.title() == "sdtune"
        assert page.evaluate("document.querySelectorAll('img[src=x], .card b').length") == 0
        assert page.evaluate("document.querySelector('.card textarea').value") == XSS
        status_is(page, "2 of 2 files added", bad=False)
        page.click("nav button[data-tab=identifier]")
        page.evaluate("document.getElementById('token-verdict').textContent = ''")
        page.fill("#identifier", "<img src=x onerror=\"document.title='pwned2'\">")
        page.wait_for_function("document.getElementById('token-verdict').textContent.length > 0")
        assert page.title() == "sdtune" and page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
        # the caption placeholders follow the subject (they said "sks toy" whatever the identifier and class)
        page.fill("#identifier", "ohwx")
        page.fill("#class", "dog")
        assert page.evaluate("document.querySelector('.card textarea').placeholder") == \
            "caption, e.g. a photo of ohwx dog"
        page.click("nav button[data-tab=photos]")

        # D: a folder upload keeps the subfolder: two 00.png, two photos, each with its caption
        page.set_input_files("#folder", str(files / "pick"))
        status_is(page, "4 of 4 files added", bad=False)
        names = sorted(p.name for p in (ws.root / "photos").iterdir())
        assert names == ["01.png", "01.txt", "backpack_00.png", "backpack_00.txt", "dog_00.png", "dog_00.txt"]

        # B: a box moved by hand is kept when the starting crop changes (and the card says so)
        r = page.request.post(url + "api/box", headers={"X-Sdtune": "1"},
                              data={"name": "dog_00.png", "box": [4, 4, 44, 44]})
        assert r.ok, r.text()
        page.select_option("#crop", "center")
        status_is(page, "analysed 3 photos", bad=False)
        moved = next(ph for ph in page.request.get(url + "api/state").json()["photos"] if ph["name"] == "dog_00.png")
        assert moved["box"] == [4, 4, 44, 44] and moved["moved"]
        assert page.locator(".card[data-name='dog_00.png'] .moved").count() == 1

        # E: an analysis error is the status line (it stayed at "uploading 2 files..." before)
        page.fill("#resolution", "60")
        page.set_input_files("#files", [str(files / "02.png"), str(files / "02.txt")])
        status_is(page, "2 of 2 files added", bad=True)
        assert "--resolution: 60 is not a multiple of 8" in page.text_content("#prep-status")
        page.wait_for_function("document.querySelectorAll('.card').length == 4")  # the photo is shown all the same
        page.fill("#resolution", "1e999")
        page.click("#analyse")
        status_is(page, 'analyse: resolution: "" is not a whole number', bad=True)  # what Chromium makes of it

        # F: prepared, then reloaded: the page says the dataset is there and shows its contact sheet
        page.fill("#resolution", "64")
        page.click("#prepare")
        status_is(page, "prepared: 4 images", bad=False)
        page.reload()
        status_is(page, "dataset prepared earlier: 4 images")
        page.wait_for_selector("#sheet img")
        assert page.evaluate("document.querySelector('#sheet img').naturalWidth") > 0
        assert page.title() == "sdtune"
        browser.close()
    assert not errors, errors
    assert not [u for u in requested if u.endswith("/favicon.ico")]
