"""Long work as ``sdtune ...`` processes whose whole state lives in WORKSPACE/jobs/NAME/:

    job.json   {"name", "kind", "argv", "run_dir", "started"} (written once; never a token)
    pid        the ``sdtune`` process's id;  rc  its exit code, written when it ends;  log  its output

Each job is started through this module's ``__main__`` (a watcher in its own session: closing the page or
killing the web server stops neither), which runs the command, waits, and writes ``rc``. Any server (a second
tab's, a restarted one) reads a job's state from those files alone. Stop sends SIGTERM to the ``sdtune``
process: training finishes its step and saves a checkpoint (``sdtune.guards.StopSignals``), exit code 143.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.ui.workspace import Workspace, write_json

JOBS = "jobs"
NAME = re.compile(r"^[a-z]+-\d{3,}$")


def start(ws: Workspace, kind: str, args: list[str], run_dir: str | None = None,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``sdtune ARGS`` as job KIND-NNN (``env``: extra variables for that process alone, e.g. a token,
    never written). Returns the job's status."""
    return launch(ws, kind, [sys.executable, "-m", "sdtune", *args], run_dir, env)


def launch(ws: Workspace, kind: str, argv: list[str], run_dir: str | None = None,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start any command ARGV as job KIND-NNN (``start`` is this for ``sdtune`` commands)."""
    folder = _new_folder(ws, kind)
    write_json(folder / "job.json", {"name": folder.name, "kind": kind, "argv": argv, "run_dir": run_dir,
                                     "started": time.time()})
    with open(folder / "log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "sdtune.ui.jobs", str(folder)], cwd=ws.root,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                         start_new_session=True)  # its own session: the server's end or Ctrl-C leaves it
    for _ in range(100):  # the watcher writes the pid within moments; a status without one would read "lost"
        if (folder / "pid").is_file():
            break
        time.sleep(0.05)
    return status(ws, folder.name)


def _new_folder(ws: Workspace, kind: str) -> Path:
    root = ws.path(JOBS)
    taken = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{kind}-*") if NAME.match(p.name)]
    for n in range(max(taken, default=0) + 1, max(taken, default=0) + 100):
        folder = root / f"{kind}-{n:03d}"
        try:
            folder.mkdir()  # atomic: two tabs starting at once get two folders
            return folder
        except FileExistsError:
            continue
    raise SdtuneError(f"cannot create a job folder in {root}")


def names(ws: Workspace, kind: str | None = None) -> list[str]:
    """Job names, oldest first."""
    root = ws.path(JOBS)
    found = [p.name for p in root.iterdir() if NAME.match(p.name) and (p / "job.json").is_file()]
    found = [n for n in found if kind is None or n.rsplit("-", 1)[0] == kind]
    return sorted(found, key=lambda n: json.loads((root / n / "job.json").read_text())["started"])


def folder_of(ws: Workspace, name: str) -> Path:
    if not NAME.match(name) or not ws.path(f"{JOBS}/{name}/job.json").is_file():
        raise SdtuneError(f"no such job: {name!r}")
    return ws.path(f"{JOBS}/{name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) has ended
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def status(ws: Workspace, name: str, log_lines: int = 20) -> dict[str, Any]:
    """A job's state from its folder: running / finished / failed / stopped / lost (ended without an exit
    code: its watcher was killed), with the last lines of its log."""
    folder = folder_of(ws, name)
    job = json.loads((folder / "job.json").read_text())
    rc = _read_int(folder / "rc")
    pid = _read_int(folder / "pid")
    if rc is not None:
        state = "finished" if rc == 0 else "stopped" if rc in (130, 143) else "failed"
    elif pid is not None and _alive(pid):
        state = "running"
    else:
        state = "lost" if pid is not None else "starting"
    log = _tail(folder / "log") if log_lines else []
    return {"name": name, "kind": job["kind"], "state": state, "rc": rc, "pid": pid, "run_dir": job.get("run_dir"),
            "command": " ".join(["sdtune", *job["argv"][3:]]), "started": job["started"],
            "log": [line.split("\r")[-1] for line in log[-log_lines:]]}


def _tail(path: Path, size: int = 65536) -> list[str]:
    """The last lines of a log (its last ``size`` bytes: a long training log is read on every poll)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


ENDED = ("finished", "failed", "stopped", "lost")  # states of a job whose process is gone
STARTING_S = 5.0  # how long Stop waits for a job that is starting (no pid yet) to start


def stop(ws: Workspace, name: str) -> dict[str, Any]:
    """SIGTERM to a running job's process (training saves a checkpoint, then exits). A job that has already
    ended (another tab's Stop, or its own end) is left as it is and its status returned, not an error: two
    tabs may show the same job. A second SIGTERM to a job that is stopping is harmless (a training ignores it
    while it saves: ``sdtune.guards.StopSignals``)."""
    s = status(ws, name, log_lines=0)
    deadline = time.monotonic() + STARTING_S
    while s["state"] == "starting" and time.monotonic() < deadline:  # Stop pressed as the job starts
        time.sleep(0.05)
        s = status(ws, name, log_lines=0)
    if s["state"] in ENDED:
        return status(ws, name)
    if s["state"] != "running":
        raise SdtuneError(f"job {name} has not started in {STARTING_S:.0f} s; fix: press Stop again in a moment")
    try:
        os.kill(s["pid"], signal.SIGTERM)
    except ProcessLookupError:  # it ended between the status and the signal
        pass
    return status(ws, name)


def argv_of(ws: Workspace, name: str) -> list[str]:
    """The ``sdtune`` arguments a job ran with (to run it again, e.g. with train.resume=latest)."""
    return json.loads((folder_of(ws, name) / "job.json").read_text())["argv"][3:]


def _watch(folder: Path) -> int:
    """Run the job's command, record its pid and exit code (``rc``, written last and atomically)."""
    job = json.loads((folder / "job.json").read_text())
    child = subprocess.Popen(job["argv"], stdin=subprocess.DEVNULL)
    (folder / "pid").write_text(str(child.pid))
    # the watcher outlives a stop request: the child handles SIGTERM itself, the watcher records its end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = child.wait()
    rc = 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N
    tmp = folder / "rc.tmp"
    tmp.write_text(str(rc))
    os.replace(tmp, folder / "rc")
    return 0


if __name__ == "__main__":
    sys.exit(_watch(Path(sys.argv[1])))
