"""The metadata files of a Hugging Face ``imagefolder`` (``metadata.jsonl`` / ``.csv`` / ``.parquet``), read as
``datasets`` reads them: one parser per kind (``metadata_rows``) for the two readers of captions, a training
folder (``sdtune.data``: bare file names, every problem reported) and the sources of ``sdtune prep SRC OUT
--caption-from metadata`` (``read_metadata``: files in subfolders too).

Each kind names an image per row in ``file_name`` and its caption in the first of the columns ``text``,
``caption``, ``prompt`` it has (``sdtune.hfdata.CAPTION_COLUMNS``: what ``data.dataset`` takes by default); a
row that ``datasets`` would refuse (a CSV line with a field too many, a JSON line that is not an object, a
missing caption) is a problem naming its line, never a caption cut short.

For prep, as in ``datasets`` (2.x to 5.x): a metadata file may be in SRC or in any subfolder, and each row's
``file_name`` is relative to the folder the file is in (``dogs/metadata.jsonl`` naming ``a.jpg`` captions
``dogs/a.jpg``); a ``file_name`` that is absolute or climbs out with ``..`` is refused; SRC holds metadata
files of one kind (``datasets`` refuses a mix of .jsonl, .csv and .parquet). Captions have runs of whitespace
made one space, as ``--caption-from txt`` reads a .txt. Only the metadata is read there, not the images:
``datasets.load_dataset("imagefolder")`` would also decode every image, write an Arrow cache, and fail the
whole folder on one unreadable photo, which prep instead reports photo by photo.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError, error_summary
from sdtune.files import shown_name
from sdtune.hfdata import CAPTION_COLUMNS

# what datasets' imagefolder reads captions from (datasets 3 to 5 read all three)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
BOM = b"\xef\xbb\xbf"  # Windows editors start UTF-8 files with it

_ANY_CAPTION = f"a caption ({', '.join(CAPTION_COLUMNS[:-1])} or {CAPTION_COLUMNS[-1]})"
_BLANK = object()  # a blank metadata.jsonl line (json.loads("null") is None: a bad row, not a blank one)
Parsed = tuple[tuple[str, str] | None, str | None]  # ((file_name as written, caption), None) or (None, why refused)
Row = tuple[int, tuple[str, str] | None, str | None]  # the same after its line number (a Parquet row's; 0: the file)


def unit_of(name: str) -> str:
    """What a metadata file's numbers count, for messages: a Parquet file has rows, the text files lines."""
    return "row" if name.endswith(".parquet") else "line"


def metadata_rows(data: bytes, name: str) -> Iterator[Row]:
    """The rows of the metadata file ``name`` (its bytes ``data``), each (line, (file_name as written, caption),
    None) or (line, None, why it is refused; a "fix: ..." after "; "). Blank lines are no rows; line 0 is a
    problem of the whole file. Whether a ``file_name`` may name a subfolder is the caller's rule."""
    kind = posixpath.splitext(name)[1]
    return {".csv": _csv_rows, ".parquet": _parquet_rows}.get(kind, _jsonl_rows)(data)


def _json_line(raw: bytes) -> tuple[Any, str | None]:
    """One metadata.jsonl line -> (its JSON value, None), (_BLANK, None) if blank, (None, None) if it is not
    JSON (``_json_row`` refuses it), or (None, why it is refused) if it is not UTF-8."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                      "fix: save the file as UTF-8")
    if not line.strip():
        return _BLANK, None
    try:
        return json.loads(line), None
    except ValueError:
        return None, None


def _json_row(row: Any, caption_key: str | None) -> Parsed:
    """One parsed metadata.jsonl line -> ((file_name, caption), None) or (None, why it is refused)."""
    if isinstance(row, dict) and not (isinstance(row.get("file_name"), str) and row["file_name"].strip()):
        return None, "has no file_name (a text); fix: give each row the image's file name, e.g. 001.png"
    if not (isinstance(row, dict) and caption_key and isinstance(row.get(caption_key), str)):
        wanted = f"{caption_key} (the caption key of its first row: one key per file)" if caption_key \
            else _ANY_CAPTION
        return None, (f"is not a JSON object with file_name and {wanted}; fix: e.g. "
                      f'{{"file_name": "001.png", "{caption_key or "text"}": "a photo of sks dog"}}')
    return (row["file_name"], row[caption_key]), None


def _jsonl_rows(data: bytes) -> Iterator[Row]:
    """metadata.jsonl's rows. Its caption key is the first of ``CAPTION_COLUMNS`` (as data.dataset's caption
    column) on its first row that names a file; every row must use that key."""
    caption_key = None
    # bytes.splitlines: only \n and \r end a line; str.splitlines would also split a caption at U+2028
    for n, raw in enumerate(data.removeprefix(BOM).splitlines(), 1):
        row, problem = _json_line(raw)
        if row is _BLANK:
            continue
        if caption_key is None and isinstance(row, dict) and isinstance(row.get("file_name"), str):
            caption_key = next((c for c in CAPTION_COLUMNS if isinstance(row.get(c), str)), None)
        yield (n, None, problem) if problem else (n, *_json_row(row, caption_key))


def _csv_columns(header: list[str]) -> tuple[int, int, int, str] | str:
    """(fields per line, file_name's index, the caption's index, the caption key) of a metadata.csv header
    line, or why it is refused."""
    caption_key = next((c for c in CAPTION_COLUMNS if c in header), None)
    if "file_name" in header and caption_key:
        return len(header), header.index("file_name"), header.index(caption_key), caption_key
    return (f"is a header without file_name and {_ANY_CAPTION} ({shown_name(','.join(header)) or 'empty'}); "
            "fix: a first line such as file_name,text")


def _csv_row(cells: list[str], columns: tuple[int, int, int, str]) -> Parsed:
    """One metadata.csv line -> ((file_name, caption), None) or (None, why it is refused)."""
    width, name_at, caption_at, caption_key = columns
    if len(cells) != width:  # as pandas (datasets' reader) does: a stray comma is an error, not a new field
        return None, (f"has {len(cells)} fields, its header {width}; fix: one value per column (a caption "
                      'that holds a comma in double quotes: "a photo of sks dog, smiling")')
    if not cells[caption_at].strip():  # an empty cell is no caption (datasets reads it as null)
        return None, f"has an empty {caption_key}; fix: fill it in, or remove the line"
    if not cells[name_at].strip():
        return None, "has an empty file_name; fix: give each row the image's file name, e.g. 001.png"
    return (cells[name_at], cells[caption_at]), None


def _csv_rows(data: bytes) -> Iterator[Row]:
    """metadata.csv's rows, as datasets' imagefolder reads them: a header line naming file_name and a caption
    column (the first of ``CAPTION_COLUMNS`` in it), then one image per line. Every value stays text (pandas
    would make a caption "1984" a number)."""
    data = data.removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield (data[:e.start].count(b"\n") + 1, None,
               f"is not UTF-8 text (byte 0x{data[e.start]:02x}); fix: save the file as UTF-8")
        return
    # newline="": the csv module itself ends lines (\n, \r\n or \r) outside quotes, never at U+2028; its default
    # dialect is pandas.read_csv's: comma separated, double-quoted fields may hold commas and newlines
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        columns = _csv_columns(next(reader, []))
        if isinstance(columns, str):
            yield 1, None, columns
            return
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield (reader.line_num, *_csv_row(cells, columns))
    except csv.Error as e:  # a NUL byte, a field over the csv module's size limit
        yield reader.line_num, None, f"cannot be read as CSV ({e}); fix: save it again as CSV"


def _parquet_rows(data: bytes) -> Iterator[Row]:
    """metadata.parquet's rows (numbered from 1), as datasets' imagefolder reads them: a ``file_name`` column
    and a caption column (the first of ``CAPTION_COLUMNS`` it has), one image per row. A problem of the whole
    file is row 0."""
    import pyarrow as pa  # datasets' own dependency; only a folder with a metadata.parquet needs it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        yield 0, None, (f"cannot be read as Parquet ({error_summary(e, 100)}); fix: write it again, e.g. with "
                        "pandas' DataFrame.to_parquet")
        return
    caption_key = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
    if "file_name" not in table.column_names or caption_key is None:
        yield 0, None, (f"has no file_name and {_ANY_CAPTION} columns (its columns: "
                        f"{shown_name(', '.join(table.column_names)) or 'none'}); fix: name them file_name and text")
        return
    names, captions = table.column("file_name").to_pylist(), table.column(caption_key).to_pylist()
    for n, (name, caption) in enumerate(zip(names, captions), 1):
        if not isinstance(name, str) or not name.strip() or not isinstance(caption, str) or not caption.strip():
            what = "file_name" if not isinstance(name, str) or not name.strip() else caption_key
            yield n, None, f"has no {what} (empty or not text); fix: fill it in, or remove the row"
            continue
        yield n, (name, caption), None


# --------------------------------------------------------------------------------------------------------
# prep's sources: --caption-from metadata


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
    row ``metadata_rows`` refuses, or a ``file_name`` outside its folder."""
    kinds = sorted({posixpath.splitext(f)[1] for f in files})
    if len(kinds) > 1:
        raise SdtuneError(f"SRC: holds metadata files of two kinds ({', '.join(files[:4])}); datasets' imagefolder "
                          "reads one kind; fix: keep one of metadata.jsonl, metadata.csv and metadata.parquet")
    found = SourceMetadata()
    for rel in files:
        rows = _captioned_rows(src_dir, rel)
        found.files[rel] = len(rows)
        folder = posixpath.dirname(rel)
        for line, (file_name, caption) in rows:
            where = f"{rel} {unit_of(rel)} {line}"
            name = _file_name(file_name, where)
            source = posixpath.join(folder, name) if folder else name
            if source in found.captions:
                found.notes.append(f"{where} captions {source} again ({found.captions[source].where} did); the "
                                   f"caption on {where} is used")
            found.captions[source] = Caption(" ".join(caption.split()), rel, line)
    return found


def _captioned_rows(src_dir: Path, rel: str) -> list[tuple[int, tuple[str, str]]]:
    """The (line, (file_name, caption)) rows of one metadata file; its first refused row is one SdtuneError
    line, with how many more there are."""
    try:
        data = (src_dir / rel).read_bytes()
    except OSError as e:
        raise SdtuneError(f"--caption-from metadata: cannot read {rel} ({e.strerror or e})") from None
    rows, refused = [], []
    for line, row, problem in metadata_rows(data, rel):
        if problem:
            refused.append((line, problem))
        elif row:
            rows.append((line, row))
    if refused:
        line, problem = refused[0]
        at = f" {unit_of(rel)} {line}" if line else ""
        others = [str(n) for n, _ in refused[1:]]
        more = (f" ({len(others)} more {unit_of(rel)}{'s' if len(others) > 1 else ''} refused: "
                f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''})") if others else ""
        what, _, fix = problem.partition("; fix: ")
        raise SdtuneError(f"--caption-from metadata: {rel}{at} {what}{more}" + (f"; fix: {fix}" if fix else ""))
    return rows


def _file_name(value: str, where: str) -> str:
    """A row's ``file_name`` as a '/'-separated path inside the metadata file's folder; refused (SdtuneError)
    as datasets refuses it: absolute, or climbing out with '..'."""
    name = posixpath.normpath(value.replace("\\", "/"))
    if "://" in value or posixpath.isabs(name) or name == ".." or name.startswith("../") or ":" in name[:2]:
        raise SdtuneError(f"--caption-from metadata: {where} names {value!r}, outside its folder; fix: give the "
                          "image's path relative to the metadata file's folder")
    return name
