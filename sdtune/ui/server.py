"""The ``sdtune ui`` HTTP server: the page (static/), a JSON API over ``photos``, ``tasks`` and ``jobs``, and
``/files/REL``, which serves workspace files through ``confine``.

Python's ``http.server`` (threaded: a tab's polling never waits for another's upload) is enough for one
user on one machine and adds no dependency. Every POST must carry the header ``X-Sdtune: 1``, which a page
from another site cannot send without the browser asking first (a CORS preflight this server never allows):
no other site can drive the UI through the user's browser. With ``auth``, every request needs HTTP basic
auth (``user:password``) or ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import mimetypes
import threading
import traceback
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sdtune.errors import SdtuneError
from sdtune.identifier import check_identifiers, suggest_identifiers
from sdtune.prep import MAX_FILE_BYTES
from sdtune.ui import jobs, photos, tasks
from sdtune.ui.workspace import Workspace

MAX_JSON_BYTES = 1 << 20
log = logging.getLogger(__name__)  # a bug's traceback goes to the server's terminal, not into the page
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}


class UIServer(ThreadingHTTPServer):
    """One workspace, its recipes, and the optional credentials every request must carry."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], workspace: str | Path, recipe_dir: str | Path | None = None,
                 auth: str | None = None):
        super().__init__(address, Handler)
        self.ws = Workspace(workspace)
        self.recipe_dir = Path(recipe_dir) if recipe_dir else None
        self.auth = auth
        self.lock = threading.Lock()  # one writer of ui_state.json at a time (two tabs, parallel uploads)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def _authorised(header: str | None, auth: str | None) -> bool:
    if auth is None:
        return True
    if not header:
        return False
    kind, _, value = header.partition(" ")
    if kind.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), auth.encode())
    if kind.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        # a bare token also works as the password of any user name (a browser's login box has no token field)
        return hmac.compare_digest(given, auth.encode()) or (
            ":" not in auth and hmac.compare_digest(given.partition(b":")[2], auth.encode()))
    return False


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the library never prints; requests are noise
        pass

    # -- plumbing ------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:  # a refused body left unread (``_body``): the socket is not reused
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _gate(self) -> bool:
        """Credentials (when required) and, for a POST, the X-Sdtune header; answers the refusal itself."""
        if not _authorised(self.headers.get("Authorization"), self.server.auth):
            self._send(401, b"login required", "text/plain", {"WWW-Authenticate": 'Basic realm="sdtune"'})
            return False
        if self.command == "POST" and self.headers.get("X-Sdtune") != "1":
            self._json(403, {"error": "missing X-Sdtune header (requests from other sites are refused)"})
            return False
        return True

    def _body(self, limit: int, what: str = "the request body") -> bytes:
        """The request's body, up to ``limit`` bytes; ``what`` names it in the refusal (e.g. the file)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= limit:
            self.close_connection = True  # the unread body must not be read as the next request
            size = f"{length} bytes" if length >= 0 else "a body of unknown length"
            raise SdtuneError(f"{what}: {size} is over the {limit // 2**20} MiB limit" if length > limit else
                              f"{what}: {size}; send it with a Content-Length")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, routes: dict[str, Callable[..., Any]]) -> None:
        if not self._gate():
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = unquote(url.path)
        try:
            if path.startswith("/files/") and self.command in ("GET", "HEAD"):
                return self._file(path[len("/files/"):], query.get("download") == "1")
            if self.command == "GET" and path in STATIC:
                name, content_type = STATIC[path]
                return self._send(200, resources.files("sdtune.ui").joinpath("static", name).read_bytes(), content_type)
            handler = routes.get(path)
            if handler is None:
                return self._json(404, {"error": f"no such endpoint: {path}"})
            self._json(200, handler(self, query))
        except tasks.FieldError as e:
            self._json(400, {"error": str(e), "fields": e.fields})
        except SdtuneError as e:
            self._json(400, {"error": str(e)})
        except (OSError, ValueError) as e:
            self._json(400, {"error": f"{type(e).__name__}: {e}"})
        except Exception as e:  # a bug: one line for the page, the traceback for the terminal; it serves on
            # the message carries the traceback: sdtune's terminal handler prints messages only
            trace = traceback.format_exc().rstrip()
            log.error("%s %s failed (a bug in sdtune):\n%s", self.command, path, trace)
            self._json(500, {"error": f"internal error (a bug in sdtune; the server's terminal has the "
                                      f"traceback): {type(e).__name__}: {e}"})

    def _file(self, rel: str, download: bool) -> None:
        file = self.server.ws.path(rel)  # refuses .., absolute paths, links out of the workspace
        if file.is_dir() and download and rel.strip("/"):  # a PEFT export is a folder: one .zip of it
            return self._send(200, _zipped(self.server.ws, file), "application/zip",
                              {"Content-Disposition": f'attachment; filename="{file.name}.zip"'})
        if not file.is_file():
            return self._json(404, {"error": f"no such file: {rel}"})
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        headers = {"Content-Disposition": f'attachment; filename="{file.name}"'} if download else {}
        self._send(200, file.read_bytes(), content_type, headers)

    def _form(self) -> dict[str, Any]:
        try:
            value = json.loads(self._body(MAX_JSON_BYTES) or b"{}")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise SdtuneError(f"the request body is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise SdtuneError("the request body must be a JSON object")
        return value

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._dispatch(GET_ROUTES)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(GET_ROUTES)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(POST_ROUTES)


def _zipped(ws: Workspace, folder: Path) -> bytes:
    """A folder's files as a .zip (stored: safetensors do not compress); each path through ``confine`` too."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for file in sorted(folder.rglob("*")):
            try:
                inside = ws.path(ws.rel(file))  # rel: ValueError for a link that leads out of the workspace
            except (ValueError, SdtuneError):
                continue
            if inside.is_file():
                z.write(inside, file.relative_to(folder).as_posix())
    return buf.getvalue()


# -- endpoints: each takes the handler and the query, returns a JSON-ready value ---------------------------


def get_state(h: Handler, q: dict) -> dict:
    ws = h.server.ws
    state = ws.state()
    names = photos.photo_names(ws)
    info = state.get("photos", {})
    report = ws.path("dataset/prep_report.json")
    return {
        "workspace": str(ws.root),
        "photos": [{"name": n, "preview": f"previews/{n}.jpg", "caption": photos.caption_of(ws, n), **info.get(n, {})}
                   for n in names],
        "crop": state.get("crop", "smart"), "resolution": state.get("resolution", 64),
        "max_upload_bytes": MAX_FILE_BYTES,
        "dataset": json.loads(report.read_text())["summary"] if report.is_file() else None,
        "recipes": tasks.recipes(h.server.recipe_dir), "default_recipe": tasks.DEFAULT_RECIPE,
        "runs": sorted(p.name for p in ws.path("runs").iterdir() if p.is_dir()),
        "jobs": [jobs.status(ws, n, log_lines=0) for n in jobs.names(ws)],
    }


def _text(form: dict, key: str, default: str | None = None) -> str:
    """Field ``key`` of a request, a string (``default`` when absent; required without one)."""
    value = form.get(key, default)
    if not isinstance(value, str):
        raise SdtuneError(f"{key}: missing" if value is None else f"{key}: {json.dumps(value)[:60]} is not text")
    return value


def _whole(form: dict, key: str, default: int) -> int:
    """Field ``key`` of a request, a whole number (a JSON number or its digits as text: the page sends what
    was typed, so "1e999" is refused as typed, not as the null that JSON makes of Infinity)."""
    value = form.get(key, default)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    raise SdtuneError(f"{key}: {json.dumps(value)[:60]} is not a whole number; e.g. 512")


def post_upload(h: Handler, q: dict) -> dict:
    name = q.get("name", "")
    if not name:
        raise SdtuneError("name: the upload has no file name (/api/upload?name=NAME.jpg)")
    data = h._body(MAX_FILE_BYTES, what=name)
    with h.server.lock:
        return photos.add_upload(h.server.ws, name, data)


def post_analyse(h: Handler, q: dict) -> dict:
    form = h._form()
    crop, resolution = _text(form, "crop", "smart"), _whole(form, "resolution", 64)
    with h.server.lock:
        return photos.analyse(h.server.ws, crop, resolution)


def post_box(h: Handler, q: dict) -> dict:
    form = h._form()
    name = _text(form, "name")
    with h.server.lock:
        photos.set_box(h.server.ws, name, form.get("box"))
    return {"ok": True}


def post_caption(h: Handler, q: dict) -> dict:
    form = h._form()
    name, caption = _text(form, "name"), _text(form, "caption")
    with h.server.lock:
        if name not in photos.photo_names(h.server.ws):
            raise SdtuneError(f"name: {name!r} is not a photo here")
        photos.set_caption(h.server.ws, Path(name).stem, caption)
    return {"ok": True}


def post_drop(h: Handler, q: dict) -> dict:
    form = h._form()
    with h.server.lock:
        photos.drop_photo(h.server.ws, str(form["name"]))
    return {"ok": True}


def post_prepare(h: Handler, q: dict) -> dict:
    form = h._form()
    with h.server.lock:
        report = photos.prepare(h.server.ws, _whole(form, "resolution", 64), _text(form, "crop", "smart"),
                                [d for d in form.get("drop", []) if d])
    return {"summary": report["summary"], "contact_sheet": "dataset/contact_sheet.jpg",
            "files": report["files"]}


def get_token(h: Handler, q: dict) -> dict:
    word = q.get("word", "").strip()
    if not word:
        raise SdtuneError("type an identifier, e.g. sks")
    report = check_identifiers([word])[0]
    suggestions = suggest_identifiers(5) if report.verdict != "good" else []
    return {"word": word, "verdict": report.verdict, "summary": report.summary, "reasons": report.reasons,
            "pieces": report.pieces, "suggestions": suggestions}


def post_train(h: Handler, q: dict) -> dict:
    return tasks.start_training(h.server.ws, h.server.recipe_dir, h._form())


def get_job(h: Handler, q: dict) -> dict:
    ws = h.server.ws
    s = jobs.status(ws, q.get("name", ""), log_lines=30)
    if s["kind"] == "train" and s["run_dir"]:
        s["progress"] = tasks.progress(ws, s["run_dir"])
        s["form"] = tasks.form_of(ws, jobs.argv_of(ws, s["name"]))  # a reloaded tab shows the run's settings
    elif s["state"] == "finished":
        s.update(tasks.output_of(ws, s["name"]))  # the grid / file / report it made, shown again after a reload
    return s


def post_stop(h: Handler, q: dict) -> dict:
    return jobs.stop(h.server.ws, str(h._form().get("name", "")))


def post_resume(h: Handler, q: dict) -> dict:
    return tasks.resume_training(h.server.ws, str(h._form().get("name", "")))


def get_progress(h: Handler, q: dict) -> dict:
    return tasks.progress(h.server.ws, q.get("run", ""))


def get_report(h: Handler, q: dict) -> dict:
    file = h.server.ws.path(f"{q.get('run', '')}/eval/report.md")
    # folder: where the report's images (metrics.png) are, for the page to show them
    return {"report": file.read_text() if file.is_file() else None, "folder": h.server.ws.rel(file.parent)}


GET_ROUTES: dict[str, Callable[[Handler, dict], Any]] = {
    "/api/state": get_state, "/api/token": get_token, "/api/job": get_job, "/api/progress": get_progress,
    "/api/report": get_report,
}
POST_ROUTES: dict[str, Callable[[Handler, dict], Any]] = {
    "/api/upload": post_upload, "/api/analyse": post_analyse, "/api/box": post_box, "/api/caption": post_caption,
    "/api/drop": post_drop, "/api/prepare": post_prepare, "/api/train": post_train, "/api/stop": post_stop,
    "/api/resume": post_resume,
    "/api/compare": lambda h, q: tasks.start_compare(h.server.ws, h._form()),
    "/api/eval": lambda h, q: tasks.start_eval(h.server.ws, h._form()),
    "/api/export": lambda h, q: tasks.start_export(h.server.ws, h._form()),
    "/api/push": lambda h, q: tasks.start_push(h.server.ws, h._form()),
}


def make_server(workspace: str | Path, host: str = "127.0.0.1", port: int = 7980,
                recipe_dir: str | Path | None = None, auth: str | None = None) -> UIServer:
    """The server, bound (port 0: any free port); ``serve_forever()`` runs it."""
    if host not in ("127.0.0.1", "localhost", "::1") and not auth:
        raise SdtuneError(f"--host {host}: listening beyond this machine needs --auth user:password (or a token)")
    return UIServer((host, port), workspace, recipe_dir, auth)
