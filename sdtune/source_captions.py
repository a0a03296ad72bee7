"""The captions a folder of source photos already holds in ``metadata.jsonl`` / ``.csv`` / ``.parquet``, read as
``datasets``' imagefolder reads them, for ``sdtune prep SRC OUT --caption-from metadata``.

As in ``datasets`` (2.x to 5.x): a metadata file may be in SRC or in any subfolder, and each row's
``file_name`` is relative to the folder the file is in (``dogs/metadata.jsonl`` naming ``a.jpg`` captions
``dogs/a.jpg``); a ``file_name`` that is absolute or climbs out with ``..`` is refused; SRC holds metadata
files of one kind (``datasets`` refuses a mix of .jsonl, .csv and .parquet). The caption is the first of the columns
``text``, ``caption``, ``prompt`` that the file has (``sdtune.hfdata.CAPTION_COLUMNS``: what ``data.dataset``
takes by default), with runs of whitespace made one space, as ``--caption-from txt`` reads a .txt.

Only the metadata is read here, not the images: ``datasets.load_dataset("imagefolder")`` would also decode
every image, write an Arrow cache, and fail the whole folder on one unreadable photo, which prep instead
reports photo by photo.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import SdtuneError, error_summary
from sdtune.hfdata import CAPTION_COLUMNS

# what datasets' imagefolder reads captions from (datasets 3 to 5 read all three)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass
class Caption:
    """One image's caption in a metadata file, and where it was read (for messages)."""

    text: str
    file: str  # the metadata file, relative to SRC: "dogs/metadata.jsonl"
    line: int  # a Parquet file's row

    @property
    def where(self) -> str:
        return f"{self.file} {unit_of(self.file)} {self.line}"


@dataclass
class SourceMetadata:
    """Every caption the metadata files of SRC give: source name (relative to SRC, '/'-separated) -> caption;
    how many rows each file gave (``files``), and the rows that name the same image twice (``notes``)."""

    captions: dict[str, Caption] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # metadata file (relative to SRC) -> its rows
    notes: list[str] = field(default_factory=list)

    def names(self) -> str:
        """The metadata files, for messages: 'metadata.jsonl' or 'metadata.jsonl, dogs/metadata.jsonl'."""
        return ", ".join(self.files) or " or ".join(METADATA_FILES)


def is_metadata_file(rel: str) -> bool:
    """Whether the source ``rel`` (relative to SRC) is a metadata file that datasets' imagefolder reads."""
    return posixpath.basename(rel) in METADATA_FILES


def has_metadata(src: str | Path) -> str | None:
    """The name of the metadata file at the top of SRC (metadata.jsonl first), or None: for a hint."""
    return next((name for name in METADATA_FILES if (Path(src) / name).is_file()), None)


def read_metadata(src_dir: Path, files: list[str]) -> SourceMetadata:
    """The captions in the metadata files ``files`` (relative to ``src_dir``, in order). Raises SdtuneError
    (one line naming the file and line) for what ``datasets`` would refuse too: a mix of .jsonl and .csv, a
    row that is not an object with a text ``file_name``, a ``file_name`` outside its folder, or a file with
    none of the caption columns."""
    kinds = sorted({posixpath.splitext(f)[1] for f in files})
    if len(kinds) > 1:
        raise SdtuneError(f"SRC: holds metadata files of two kinds ({', '.join(files[:4])}); datasets' imagefolder "
                          "reads one kind; fix: keep one of metadata.jsonl, metadata.csv and metadata.parquet")
    found = SourceMetadata()
    for rel in files:
        rows = _rows(src_dir / rel, rel)
        column = next((c for c in CAPTION_COLUMNS if any(c in row for _, row in rows)), None)
        if column is None:
            keys = sorted({k for _, row in rows for k in row})
            raise SdtuneError(f"--caption-from metadata: {rel} has no {', '.join(CAPTION_COLUMNS)} column (its "
                              f"columns: {', '.join(keys) or 'none'}); fix: name the caption column text")
        found.files[rel] = len(rows)
        folder = posixpath.dirname(rel)
        for line, row in rows:
            where = f"{rel} {unit_of(rel)} {line}"
            name = _file_name(row.get("file_name"), where)
            source = posixpath.join(folder, name) if folder else name
            value = row.get(column)
            text = " ".join(value.split()) if isinstance(value, str) else ""
            if source in found.captions:
                found.notes.append(f"{where} captions {source} again ({found.captions[source].where} did); the "
                                   f"caption on {where} is used")
            found.captions[source] = Caption(text, rel, line)
    return found


def unit_of(name: str) -> str:
    """What a metadata file's numbers count, for messages: a Parquet file has rows, the text files lines."""
    return "row" if name.endswith(".parquet") else "line"


def _parquet_rows(path: Path, rel: str) -> list[tuple[int, dict]]:
    """The rows of a metadata.parquet as (row number from 1, {column: value})."""
    import pyarrow  # datasets' own dependency; only a folder with a metadata.parquet needs it
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    except (pyarrow.ArrowException, OSError) as e:
        raise SdtuneError(f"--caption-from metadata: cannot read {rel} as Parquet ({error_summary(e, 100)}); fix: "
                          "write it again, e.g. with pandas' DataFrame.to_parquet") from None


def _rows(path: Path, rel: str) -> list[tuple[int, dict]]:
    """The rows of one metadata file as (line number, {column: value}); blank lines are skipped."""
    if rel.endswith(".parquet"):
        return _parquet_rows(path, rel)
    try:
        data = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise SdtuneError(f"--caption-from metadata: cannot read {rel} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SdtuneError(f"--caption-from metadata: {rel} is not UTF-8 text; fix: save it as UTF-8") from None
    if rel.endswith(".csv"):
        # the csv module's default dialect is pandas.read_csv's (datasets reads metadata.csv with pandas): comma
        # separated, double-quoted fields may hold commas and newlines; every value stays text (pandas would
        # make a caption "1984" a number)
        reader = csv.DictReader(io.StringIO(data, newline=""))
        return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    rows = []
    for line, text in enumerate(data.split("\n"), 1):  # only \n ends a JSON Lines record (not U+2028)
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise SdtuneError(f'--caption-from metadata: {rel} line {line} is not a JSON object; fix: e.g. '
                              '{"file_name": "001.png", "text": "a photo of sks dog"}')
        rows.append((line, row))
    return rows


def _file_name(value: object, where: str) -> str:
    """A row's ``file_name`` as a '/'-separated path inside the metadata file's folder; refused (SdtuneError)
    as datasets refuses it: missing, absolute, or climbing out with '..'."""
    if not isinstance(value, str) or not value.strip():
        raise SdtuneError(f"--caption-from metadata: {where} has no file_name; fix: give each row the image's "
                          "file name, e.g. 001.png")
    name = posixpath.normpath(value.replace("\\", "/"))
    if "://" in value or posixpath.isabs(name) or name == ".." or name.startswith("../") or ":" in name[:2]:
        raise SdtuneError(f"--caption-from metadata: {where} names {value!r}, outside its folder; fix: give the "
                          "image's path relative to the metadata file's folder")
    return name
