"""Files sdtune writes: whole or not at all, and where its caches live.

``atomic_path`` is the one way sdtune writes a file that a crash must not leave half-written (sample
grids, class images, latent cache entries, LoRA exports): the bytes go to a hidden temporary name beside
the target, which is renamed over it only once complete. ``cache_root`` is the one cache folder (latents,
class images), ``$SDTUNE_CACHE`` or ``~/.cache/sdtune``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

_SHA256 = re.compile(r"[0-9a-f]{64}")
_UMASK = os.umask(0o022)  # read once (the only way to read it is to set it), then put back
os.umask(_UMASK)


def shown_name(name: str) -> str:
    """A file name fit for a one-line report: bytes that are not UTF-8 as \\xNN, and the whole name quoted
    and escaped if it holds a newline or another control character (it would break the line)."""
    try:
        raw = os.fsencode(name)  # undecodable bytes of a name on disk come back as they were
    except UnicodeEncodeError:  # a lone surrogate from elsewhere (a JSON escape)
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else repr(text)


def cache_root() -> Path:
    """sdtune's cache folder: ``$SDTUNE_CACHE``, else ``~/.cache/sdtune`` (not created here)."""
    return Path(os.environ.get("SDTUNE_CACHE") or Path.home() / ".cache" / "sdtune")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed to ``path`` (atomic on
    one filesystem), on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (a rename across filesystems is a copy), hidden, and ending in .tmp so that readers which
    # list a folder by extension (images, *.safetensors) never see it; the pid keeps two processes writing
    # the same cache entry from writing into one temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():  # as a plain open() would make it: some writers (safetensors) create files 0600
            os.chmod(tmp, 0o666 & ~_UMASK)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, through Python's own file writes, so that a full disk is an
    ``OSError`` with errno ENOSPC (safetensors' and torch's own writers report it in other exception types,
    torch.save without saying so at all). Serialise first: ``safetensors.torch.save``, or ``torch.save`` into
    ``io.BytesIO``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception from a write means the disk is full (errno ENOSPC, or a library's message of it)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(e) or "os error 28" in str(e)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Located(NamedTuple):
    """One version of a file (``locate``): what ``remembered`` and ``content_hash`` key on."""

    folder: str  # the real folder (links and relative parts resolved)
    name: str
    version: str  # "size|mtime_ns|inode": any edit or replacement of the file changes one of them
    size: int
    regular: bool  # a regular file (for a link: its target), not a folder, device or pipe
    link: bool  # the path given is a symbolic link


def locate(path: str | Path) -> Located:
    """The real folder, name and version of a file, with one system call for a plain file (an lstat says both
    that it is no link and its version); raises OSError (FileNotFoundError, ...) as ``os.lstat`` does. This
    runs once per photo at every start: on strings and os.path (pathlib objects and a separate islink + stat
    were most of a 100,000-photo rerun's start-up)."""
    p = os.fspath(path)
    st = os.lstat(p)
    link = stat.S_ISLNK(st.st_mode)
    folder, name = _real_parts(p, link)
    if link:  # the version is the target's
        st = os.stat(os.path.join(folder, name))
    return Located(folder, name, f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}", st.st_size,
                   stat.S_ISREG(st.st_mode), link)


def _located(path: str | Path | Located) -> Located:
    return path if isinstance(path, Located) else locate(path)


def _named_by_hash(found: Located) -> str | None:
    """The sha256 of a Hugging Face cache blob, which is its name (LFS files); None for any other file."""
    if os.path.basename(found.folder) == "blobs" and _SHA256.fullmatch(found.name):
        return found.name
    return None


def content_hash(path: str | Path | Located) -> str:
    """Hex sha256 of a file's bytes, computed once per file version.

    A Hugging Face cache blob is named by its sha256 already (LFS files). Otherwise the digest is remembered
    (``remembered``) under the file's real path, size, modification time and inode, so a model's gigabytes are
    read once, and a replaced or rewritten file (any of those changes) is hashed again. ``path`` may be what
    ``locate`` found of it (the file is then not looked at again)."""
    found = _located(path)
    digest = _named_by_hash(found) or _remembered_at(found, "sha256", lambda: sha256_file(_joined(found)))
    assert digest is not None
    return digest


def content_hashes(paths: Iterable[str | Path]) -> list[str]:
    """``content_hash`` of each of ``paths``, each file looked at once; the ones not hashed before are read in
    threads when they come to more than 64 MiB (hashlib lets go of the GIL on large reads; known ones are a
    lookup each, where threads would only add their overhead)."""
    digests: list[str | None] = []
    todo: list[tuple[int, Located]] = []  # (index, file) of each one to read
    for p in paths:
        f = locate(p)
        digests.append(_named_by_hash(f) or _manifest(f.folder).get(f.name, f.version, "sha256"))
        if digests[-1] is None:
            todo.append((len(digests) - 1, f))
    if sum(f.size for _, f in todo) > 1 << 26:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            read = list(pool.map(lambda item: sha256_file(_joined(item[1])), todo))
    else:
        read = [sha256_file(_joined(f)) for _, f in todo]
    for (i, f), digest in zip(todo, read, strict=True):  # stored here, not in the threads: one manifest writer
        _manifest(f.folder).put(f.name, f.version, "sha256", digest)
        digests[i] = digest
    return digests  # type: ignore[return-value]


def remembered(path: str | Path | Located, kind: str, compute: Callable[[], str | None]) -> str | None:
    """``compute()`` once per version of the file at ``path`` (its real path, size, modification time and
    inode; or what ``locate`` found of it): kept in its folder's manifest (``_Manifest``), so a rerun over
    100,000 unchanged images looks each up instead of hashing, decoding or parsing it. A None result (a
    problem to report) is not kept: it is computed, and said, every time."""
    return _remembered_at(_located(path), kind, compute)


def _remembered_at(found: Located, kind: str, compute: Callable[[], str | None]) -> str | None:
    manifest = _manifest(found.folder)
    value = manifest.get(found.name, found.version, kind)
    if value is None:
        value = compute()
        if value is not None:
            manifest.put(found.name, found.version, kind, value)
    return value


def _joined(found: Located) -> str:
    return os.path.join(found.folder, found.name)


class _Manifest:
    """What ``remembered`` found of the files of one folder, one JSON file per folder under
    ``cache_root()/manifests``: ``{name: "version<TAB>kind<TAB>value<TAB>kind<TAB>value..."}``, one string per
    file (one version per file: an edited file's entries are replaced). Strings, not a dict per file: they
    load faster, take half the memory (a 100,000-photo folder's dicts were 55 MiB) and the garbage collector
    never walks them. The older form, ``{name: {"v": version, kind: value}}``, is read too and written back
    in this one. Read once per process; written back atomically (merged with what another process wrote
    meanwhile) once the new entries reach ``FLUSH_EVERY`` and the number known before them (each write is the
    whole file, so writes get rarer as it grows: a 100,000-file first run wrote 20 whole manifests, 40 s of
    JSON, at a fixed 5,000), by ``flush_manifests`` and at exit. A lost write costs a rerun the work again."""

    FLUSH_EVERY = 5000

    def __init__(self, file: Path):
        self.file, self.new = file, 0
        self.entries: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        try:
            entries = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        if all(type(e) is str for e in entries.values()):
            return entries
        self.new += 1  # an older form: written back in this one at the next flush
        return {name: text for name, e in entries.items() if (text := _entry_text(e)) is not None}

    def get(self, name: str, version: str, kind: str) -> str | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        fields = entry.split("\t")
        if fields[0] != version:
            return None
        for i in range(1, len(fields) - 1, 2):
            if fields[i] == kind:
                return fields[i + 1]
        return None

    def put(self, name: str, version: str, kind: str, value: str) -> None:
        if "\t" in kind or "\t" in value:  # cannot be kept in one string: computed again next time
            return
        entry = self.entries.get(name)
        fields = entry.split("\t") if entry is not None else []
        if fields[:1] != [version]:
            fields = [version]
        pairs = [(fields[i], fields[i + 1]) for i in range(1, len(fields) - 1, 2) if fields[i] != kind]
        self.entries[name] = "\t".join([version, *(x for pair in pairs for x in pair), kind, value])
        self.new += 1
        if self.new >= max(self.FLUSH_EVERY, len(self.entries) - self.new):
            self.flush()

    def flush(self) -> None:
        if not self.new:
            return
        merged = {**self._read(), **self.entries}
        with contextlib.suppress(OSError):  # a read-only cache only costs the next run the work again
            write_text(self.file, json.dumps(merged, separators=(",", ":")))
        self.entries, self.new = merged, 0


def _entry_text(entry: object) -> str | None:
    """An entry of the older form, ``{"v": version, kind: value}``, as one string; None if it is neither."""
    if not (isinstance(entry, dict) and isinstance(entry.get("v"), str)):
        return None
    pairs = [(k, v) for k, v in entry.items() if k != "v" and isinstance(v, str) and "\t" not in k + v]
    return "\t".join([entry["v"], *(x for pair in pairs for x in pair)])


_MANIFESTS: dict[Path, _Manifest] = {}


_BY_FOLDER: dict[tuple[str, str], _Manifest] = {}


def _manifest(folder: str) -> _Manifest:
    """The manifest of ``folder`` in the current cache (``$SDTUNE_CACHE`` may change within a process)."""
    key = (os.environ.get("SDTUNE_CACHE", ""), folder)  # a lookup per file: no path arithmetic on the way
    manifest = _BY_FOLDER.get(key)
    if manifest is None:
        file = cache_root() / "manifests" / f"{hashlib.sha256(os.fsencode(folder)).hexdigest()[:32]}.json"
        if file not in _MANIFESTS:
            _MANIFESTS[file] = _Manifest(file)
        manifest = _BY_FOLDER[key] = _MANIFESTS[file]
    return manifest


_real_folder = functools.lru_cache(maxsize=4096)(os.path.realpath)


def _real_parts(path: str | Path, link: bool | None = None) -> tuple[str, str]:
    """(real folder, name) of a file: ``os.path.realpath`` with its folder's resolution done once per folder
    (it costs a system call per path component: 400,000 of them were a third of a 100,000-photo rerun's
    start-up). A link is resolved whole, as realpath does; ``link``: whether it is one, if already known."""
    p = os.fspath(path)
    if os.path.islink(p) if link is None else link:
        return os.path.split(os.path.realpath(p))
    head, name = os.path.split(p)
    if os.path.isabs(head) and name not in ("", ".", ".."):
        # an absolute folder is resolved as given (realpath normalises it): no abspath per file
        return _real_folder(head), name
    folder, name = os.path.split(os.path.abspath(p))
    return _real_folder(folder), name


def real_path(path: str | Path) -> Path:
    """``Path(path).resolve()`` for a file, its folder resolved once per folder (``_real_parts``)."""
    return Path(os.path.join(*_real_parts(path)))


def flush_manifests() -> None:
    """Write every manifest with new entries (``remembered``), e.g. once a run's checks are done."""
    for manifest in _MANIFESTS.values():
        manifest.flush()


atexit.register(flush_manifests)


def unhashed_bytes(paths: list[Path]) -> int:
    """How many bytes ``content_hash`` would have to read for ``paths`` (the ones not hashed before)."""
    total = 0
    for p in paths:
        f = locate(p)
        if _named_by_hash(f) is None and _manifest(f.folder).get(f.name, f.version, "sha256") is None:
            total += f.size
    return total


def existing_ancestor(path: str | Path) -> Path:
    """``path`` (absolute, ``~`` expanded) or its nearest existing ancestor: where a folder that does not exist
    yet would be created."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds ``path`` (or would hold it: its nearest existing folder)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def mib(n: float) -> str:
    """A byte count for messages: '12.3 MiB'."""
    return f"{n / 2**20:,.1f} MiB"


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
