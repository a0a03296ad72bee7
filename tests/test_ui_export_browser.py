"""The Export tab in headless Chromium (Debian's ``chromium``, driven by Playwright): a run with an eval report
offers the checkpoint eval recommends as the default and says why; the user's own pick stands when the list
refreshes (new checkpoints appear while a run trains); a run without a report keeps the final weights."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from sdtune.runs import MARKER, WEIGHT_NAME
from sdtune.ui.server import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [  # about 15 s on 2 cores, most of it Chromium's start
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make install` installs it)"),
]

ROOT = Path(__file__).resolve().parents[1]


def fake_run(ws: Path, name: str, recommended: str | None) -> None:
    run = ws / "runs" / name
    for step in (10, 20, 30):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / MARKER).write_text("")
    (run / WEIGHT_NAME).write_bytes(b"x")
    if recommended:  # the fields of report.json the page reads (tests/test_eval.py writes a real one)
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps({"sdtune_version": "0", "recommendation": {
            "checkpoint": recommended, "step": 20, "lora_scale": 1.0, "metrics": {"subject": 0.75},
            "rule": "the best subject score"}}))


@pytest.fixture
def base(tmp_path):
    ws = tmp_path / "ws"
    fake_run(ws, "evaluated", "step-000020")
    fake_run(ws, "plain", None)
    srv = make_server(ws, port=0, recipe_dir=ROOT / "recipes")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.url
    srv.shutdown()
    srv.server_close()


def test_export_defaults_to_the_recommended_checkpoint(base):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(base)
        page.click("nav button[data-tab=export]")
        page.select_option("#export-run", "runs/evaluated")
        page.wait_for_function("document.getElementById('checkpoint').value === 'step-000020'", timeout=20_000)
        hint = page.text_content("#recommended")
        assert hint == "step-000020: recommended by eval (subject 0.750): the best subject score"
        assert page.evaluate("document.querySelector('#checkpoint option:checked').textContent") == \
            "step-000020 (recommended by eval)"

        page.select_option("#checkpoint", "")  # the user wants the final weights: a refresh keeps that
        page.evaluate("document.getElementById('checkpoint').dataset.at = 0; listCheckpoints()")
        page.wait_for_timeout(500)
        assert page.input_value("#checkpoint") == ""

        page.select_option("#export-run", "runs/plain")  # no report: the final weights, and no hint
        page.wait_for_function("document.getElementById('checkpoint').options.length === 4", timeout=20_000)
        page.wait_for_timeout(500)
        assert page.input_value("#checkpoint") == "" and page.text_content("#recommended") == ""
        browser.close()
