"""``sdtune ui``: the workflow in a browser (``sdtune.ui``), served on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path
from typing import Any

from sdtune.config import shipped_recipes
from sdtune.errors import SdtuneError

# not 7860: AUTOMATIC1111's web UI, Forge, kohya_ss and every Gradio app start there, and Gradio tries
# 7860-7959 when it is taken; a user of sdtune often has one of them running
DEFAULT_PORT = 7980


def port(text: str) -> int:
    """--port: a TCP port, 0-65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (0-65535; 0: any free port)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: ports are 0-65535 (0: any free port)")
    return value


def add_commands(sub: Any) -> None:
    """Add ``ui`` to the ``sdtune`` subparsers."""
    p = sub.add_parser("ui", help="the workflow in a browser: photos, identifier, train, compare, export",
                       description="Start a local web app over the same functions the CLI uses. Every file it "
                       "reads or writes stays inside the workspace folder.")
    p.add_argument("--workspace", default="sdtune-workspace", help="the folder it works in (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; any other needs --auth)")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help="(default %(default)s; 0: any free port)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require HTTP basic auth (or a bare token as password)")
    p.add_argument("--recipes", metavar="DIR", help="the recipes offered (default: ./recipes, else sdtune's own)")
    p.set_defaults(func=cmd_ui)


def _recipe_dir(given: str | None) -> Path | None:
    if given:
        if not Path(given).is_dir():
            raise SdtuneError(f"--recipes: {given} is not a folder")
        return Path(given).resolve()
    shipped = shipped_recipes()  # a pip install has no recipes/ beside it: the package's own
    for folder in (Path("recipes"), shipped):
        if folder is not None and folder.is_dir():
            return folder.resolve()
    return None


def _bind_problem(e: OSError, host: str, number: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {number} is in use by another program: --port 0 picks a free one, or give another number"
    if e.errno == errno.EACCES:
        return f"port {number} needs administrator rights (ports below 1024): give --port 0 or one above 1024"
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
        return f"--host {host}: not an address of this machine ({e.strerror or e})"
    raise e


def cmd_ui(args: argparse.Namespace) -> int:
    from sdtune.ui.server import make_server

    try:
        server = make_server(args.workspace, args.host, args.port, _recipe_dir(args.recipes), args.auth)
    except OSError as e:
        raise SdtuneError(_bind_problem(e, args.host, args.port)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"listening on {args.host}: other machines can reach it; every request needs the --auth "
              "credentials", file=sys.stderr)
    print(f"sdtune ui: {server.url} (workspace {server.ws.root}); Ctrl-C stops the server, not its jobs",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
