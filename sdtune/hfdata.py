"""Hugging Face datasets as training data (``data.dataset``), opened with ``datasets`` and written once as a
folder of images.

``materialize`` opens a hub dataset, a ``save_to_disk`` folder, another local folder (an ``imagefolder``,
a folder of parquet files) or ``.parquet`` / ``.arrow`` files (globs too), picks its split and its image
and caption columns, and writes that split once into sdtune's cache as the folder ``data.instance_dir``
would be: images named by row (``00000.jpg``, ...) plus ``metadata.jsonl`` (``file_name``, ``text``) when
there is a caption column, plain images otherwise (``data.instance_prompt`` captions them). Everything
downstream (the scan's checks, the latent cache, buckets, class images, resume fingerprints) then works on
that folder exactly as on a folder of photos.

The folder is keyed by the dataset's own fingerprint (which ``datasets`` derives from the data files'
paths and modification times, or a hub revision, and keeps in a ``save_to_disk`` folder), the split and
the columns: an unchanged dataset is a cache hit, a changed one a new folder. Images keep their encoded
bytes (a JPEG stays that JPEG) so that their content hashes, and with them the latent cache and a resume's
fingerprint, are the same on every run.

``datasets`` is imported inside the functions that use it: the command line builds its parser without it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image as PILImage

from sdtune.files import cache_root, write_text
from sdtune.hub import is_hub_id, offline_reason, offline_unless_reachable
from sdtune.images import DECODERS, IMAGE_EXTENSIONS
from sdtune.locks import cache_lock

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

KEY = "data.dataset"
LAYOUT = "1"  # the layout written here; a new one never reuses folders of an old one
IMAGES = "images"  # the folder the scan reads, inside the cache entry (which holds the lock and source.json)
SOURCE = "source.json"
CAPTION_COLUMNS = ("text", "caption", "prompt")  # the default caption column: the first of these that is text
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # datasets' packaged loaders for single files
# Pillow's format name -> the extension the scan reads as that format (MPO: the JPEG of many phones)
_SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
             "GIF": ".gif", "HEIF": ".heic", "AVIF": ".avif"}
_SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict, a Dataset)


class _NoImage(Exception):
    """A row whose image cell is empty, or names a file that cannot be fetched."""


def materialize(dataset: str, split: str, image_column: str | None, caption_column: str | None,
                instance_prompt: str | None, problems: list[str]) -> Path | None:
    """The folder of ``dataset``'s ``split`` as training data (written once into sdtune's cache, then reused),
    or None after appending every problem found (a line each, naming the key as the user writes it) to
    ``problems``. ``instance_prompt`` is only asked whether images without a caption column get one."""
    ds = _open(dataset, split, problems)
    if ds is None:
        return None
    columns = _columns(ds, dataset, image_column, caption_column, problems)
    if columns is None:
        return None
    image, caption = columns
    if caption is None and instance_prompt is None:
        problems.append(f"data.caption_column: {dataset} has no caption column "
                        f"({', '.join(CAPTION_COLUMNS)}; its columns: {_listing(ds)}); fix: name one with "
                        "data.caption_column, or set "
                        "data.instance_prompt (e.g. 'a photo of {identifier} dog') for every image")
        return None
    if len(ds) == 0:
        problems.append(f"data.dataset_split: the split '{split}' of {dataset} has no rows; fix: choose "
                        "another split, or add images to it")
        return None
    if caption is not None and not _captions_complete(ds, caption, problems):
        return None
    entry = cache_root() / "datasets" / _key(ds, dataset, split, image, caption)
    try:
        return _cached(ds, dataset, split, image, caption, entry, problems)
    except OSError as e:
        problems.append(f"{KEY}: cannot write its images into {entry} ({e.strerror or e}); fix: free disk "
                        "space, or point SDTUNE_CACHE at a folder you can write to")
        return None


def _cached(ds: Dataset, dataset: str, split: str, image: str, caption: str | None, entry: Path,
            problems: list[str]) -> Path | None:
    """``entry``'s images folder, written under the entry's lock if no earlier run wrote it."""
    folder = entry / IMAGES
    if folder.is_dir():  # written whole by an os.replace, so complete whenever it exists
        logger.debug(f"{KEY}: {dataset} ({split}) is already in {folder}")
        return folder
    with cache_lock(entry, f"the images of {dataset}"):
        if not folder.is_dir():  # another run may have written it while this one waited
            logger.info(f"{KEY}: writing the {len(ds)} images of {dataset} ({split}) into {folder} (once)")
            # what the folder was made from, for a person reading the cache (written first: images => source)
            write_text(entry / SOURCE, json.dumps({"dataset": dataset, "split": split, "image_column": image,
                                                   "caption_column": caption, "rows": len(ds),
                                                   "fingerprint": ds._fingerprint}, indent=2) + "\n")
            empty = _write(ds, image, caption, entry)
            if empty:
                rows, gone = [row for row, _ in empty], next((path for _, path in empty if path), None)
                # a parquet made by to_parquet alone stores its images' paths: moved or deleted, no row has one
                why = (f"; its rows name image files that are not there (e.g. {gone}): the dataset stores paths, "
                       "not the images; fix: put the files back, or write it again with the images embedded "
                       "(README, 'Train from a Hugging Face dataset')") if gone else \
                    "; fix: remove those rows, or choose another data.image_column"
                problems.append(f"data.image_column: '{image}' of {dataset} has no readable image in "
                                f"{len(rows)} row(s) ({_rows(rows)}){why}")
                return None
    return folder


# --------------------------------------------------------------------------------------------------------
# Opening a dataset and choosing its split


def _open(dataset: str, split: str, problems: list[str]) -> Dataset | None:
    """The split of ``dataset`` (every kind of source ``data.dataset`` takes), or None after a problem."""
    path = Path(dataset)
    if _is_glob(dataset) or path.suffix.lower() in FILE_BUILDERS:
        return _open_files(dataset, split, problems)
    if path.is_dir():
        if any((path / name).is_file() for name in _SAVED):
            return _open_saved(path, split, problems)
        return _open_folder(path, split, problems)
    if path.exists():
        problems.append(f"{KEY}: {dataset} is a file but not .parquet or .arrow; fix: give .parquet or "
                        ".arrow files, a folder (an imagefolder, or one written by save_to_disk) or a hub id")
        return None
    if is_hub_id(dataset):
        return _open_hub(dataset, split, problems)
    problems.append(f"{KEY}: {dataset} is no file or folder here, and not a hub id (owner/name); fix: give a "
                    ".parquet or .arrow file, a folder, or a dataset id such as user/my-dog-photos")
    return None


def _open_folder(folder: Path, split: str, problems: list[str]) -> Dataset | None:
    """A local folder that ``save_to_disk`` did not write: its .parquet / .arrow files as datasets infers them,
    else its images through the ``imagefolder`` builder, named rather than inferred: datasets infers the
    ``text`` builder for a folder with as many .txt captions as images, as ``sdtune prep`` and ``sdtune micro
    subject`` write them (a metadata.jsonl, .csv or .parquet beside the images still captions them)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    suffixes = _suffixes(folder)
    if suffixes & set(FILE_BUILDERS):
        return _load(str(folder), split, problems, path=str(folder))
    if suffixes & set(ImageFolder.EXTENSIONS):
        return _load("imagefolder", split, problems, path=str(folder), data_dir=str(folder))
    problems.append(f"{KEY}: {folder} holds no images and no .parquet or .arrow files (subfolders included); "
                    "fix: give a folder of images, data files or a hub id (a folder of photos trains as "
                    "data.instance_dir too, with no copy into the cache)")
    return None


def _suffixes(folder: Path) -> set[str]:
    """The lower-case extensions of the files in ``folder`` and its subfolders (datasets reads split folders
    such as train/ and test/), hidden ones left out as datasets leaves them."""
    found: set[str] = set()
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        found.update(os.path.splitext(f)[1].lower() for f in files if not f.startswith((".", "__")))
    return found


def _open_hub(dataset: str, split: str, problems: list[str]) -> Dataset | None:
    """A hub dataset, after the one probe models get (``sdtune.hub.offline_unless_reachable``): with no
    network, datasets then reads its cache at once instead of retrying each request five times (about 30 s
    of retry lines) before failing."""
    if offline_unless_reachable():
        import datasets

        # datasets reads HF_HUB_OFFLINE once, at its import, which may have come before the probe switched
        # huggingface_hub offline (HF_DATASETS_OFFLINE is the same switch's old name)
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return _load(dataset, split, problems, path=dataset)


def _is_glob(text: str) -> bool:
    """Whether ``text`` is a pattern (``*``, ``?`` or ``[``) rather than one path, as glob reads it."""
    return any(c in text for c in "*?[")


def _open_files(pattern: str, split: str, problems: list[str]) -> Dataset | None:
    """``.parquet`` / ``.arrow`` files, or a glob of them, through datasets' loader for that format."""
    # sorted: the rows, and so the file names written, keep one order from run to run
    files = sorted(os.path.abspath(f) for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        problems.append(f"{KEY}: no file matches {pattern}; fix: the path of .parquet or .arrow files (a "
                        "glob such as data/*.parquet is fine)")
        return None
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    if len(suffixes) != 1 or suffixes[0] not in FILE_BUILDERS:
        problems.append(f"{KEY}: {pattern} matches other files than only .parquet or only .arrow ones "
                        f"({', '.join(suffixes)}); fix: a glob of one kind, e.g. data/*.parquet")
        return None
    return _load(FILE_BUILDERS[suffixes[0]], split, problems, path=pattern, data_files=files)


def _open_saved(folder: Path, split: str, problems: list[str]) -> Dataset | None:
    """A folder written by ``save_to_disk``: a DatasetDict (its split) or a single Dataset."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as e:  # pyarrow's and datasets' many errors of a damaged folder: one line
        problems.append(f"{KEY}: cannot read {folder} as a save_to_disk folder ({_one_line(e)}); fix: save "
                        "it again with Dataset.save_to_disk")
        return None
    if isinstance(loaded, DatasetDict):
        return _split(loaded, str(folder), split, problems)
    if split != "train":  # a single Dataset has no splits to choose from: another split cannot be honoured
        problems.append(f"data.dataset_split: {folder} holds one dataset, not splits, so '{split}' cannot be "
                        "chosen; fix: remove data.dataset_split (or save a DatasetDict)")
        return None
    return loaded


def _load(name: str, split: str, problems: list[str], path: str, **kwargs: Any) -> Dataset | None:
    """``load_dataset(name, **kwargs)``'s split; ``path`` is the dataset as the user named it, for messages.
    All splits are loaded and then one chosen, rather than ``split=``, so that an unknown split is a problem
    listing the real ones (datasets prepares every split either way)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, **kwargs)
    except ConnectionError as e:
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", False) or datasets.config.HF_DATASETS_OFFLINE
        problems.append(_offline_problem(path, e) if offline else
                        f"{KEY}: cannot reach {path} on the Hub ({_one_line(e)}); fix: check the network, or "
                        "use a local copy")
        return None
    except Exception as e:  # the loaders raise many types (not found, gated, bad files)
        problems.append(f"{KEY}: cannot load {path} with the datasets library ({_one_line(e)}); fix: check "
                        "the id or path (and `huggingface-cli login` for a gated or private dataset)")
        return None
    return _split(loaded, path, split, problems)


def _offline_problem(path: str, e: Exception) -> str:
    """The line of a dataset datasets did not find in its cache while offline, saying why it is offline: the
    Hub did not answer sdtune's probe, or a variable the user set (never one sdtune set itself)."""
    from huggingface_hub import constants

    why = offline_reason() if constants.is_offline_mode() else "HF_DATASETS_OFFLINE is set"
    return (f"{KEY}: {path} is not in the datasets cache ({os.fspath(_hf_cache())}), and {why} "
            f"({_one_line(e)}); fix: load it once with the Hub in reach, or give a local copy (.parquet files, "
            "a save_to_disk folder or a folder of images)")


def _hf_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def _split(loaded: Any, path: str, split: str, problems: list[str]) -> Dataset | None:
    """``loaded[split]`` of a DatasetDict, or a problem listing its splits."""
    if split in loaded:
        return loaded[split]
    names = ", ".join(loaded) or "none"
    problems.append(f"data.dataset_split: {path} has no split '{split}' (its splits: {names}); fix: "
                    f"data.dataset_split={next(iter(loaded), 'train')}")
    return None


# --------------------------------------------------------------------------------------------------------
# Columns


def _kind(feature: Any) -> str:
    """A column's type in a few words: 'image', 'string', 'list', ..."""
    from datasets import Image, Value

    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, Value):
        return feature.dtype
    return type(feature).__name__.lower()


def _listing(ds: Dataset) -> str:
    return ", ".join(f"{name} ({_kind(f)})" for name, f in ds.features.items())


def _is_text(feature: Any) -> bool:
    return _kind(feature) in ("string", "large_string")


def _columns(ds: Dataset, dataset: str, image_column: str | None, caption_column: str | None,
             problems: list[str]) -> tuple[str, str | None] | None:
    """(image column, caption column or None): the ones named, else the defaults; None after a problem."""
    before = len(problems)
    image = _image_column(ds, dataset, image_column, problems)
    caption = _caption_column(ds, dataset, caption_column, problems)
    if len(problems) > before or image is None:
        return None
    return image, caption


def _unusable(ds: Dataset, dataset: str, key: str, named: str, wanted: str, fix: str) -> str:
    """The problem line of a column named in ``key`` that does not exist or does not hold ``wanted``."""
    features = ds.features
    what = (f"{dataset} has no column '{named}'" if named not in features
            else f"'{named}' of {dataset} holds {_kind(features[named])}, not {wanted}")
    return f"{key}: {what} (its columns: {_listing(ds)}); fix: {fix}"


def _image_column(ds: Dataset, dataset: str, named: str | None, problems: list[str]) -> str | None:
    images = [name for name, f in ds.features.items() if _kind(f) == "image"]
    if named is not None:
        if named in images:
            return named
        fix = f"data.image_column={images[0]}" if images else "give a dataset with an image column"
        problems.append(_unusable(ds, dataset, "data.image_column", named, "images", fix))
        return None
    if len(images) == 1:
        return images[0]
    which = f"several image columns ({', '.join(images)})" if images else "no image column (datasets.Image)"
    fix = f"data.image_column={images[0]}" if images else "give a dataset with an image column"
    problems.append(f"data.image_column: {dataset} has {which} (its columns: {_listing(ds)}); fix: {fix}")
    return None


def _caption_column(ds: Dataset, dataset: str, named: str | None, problems: list[str]) -> str | None:
    texts = [name for name, f in ds.features.items() if _is_text(f)]
    if named is None:
        return next((c for c in CAPTION_COLUMNS if c in texts), None)
    if named not in texts:
        fix = (f"data.caption_column={texts[0]}" if texts
               else "remove data.caption_column and set data.instance_prompt for every image")
        problems.append(_unusable(ds, dataset, "data.caption_column", named, "text", fix))
    return named


def _captions_complete(ds: Dataset, column: str, problems: list[str]) -> bool:
    """Whether every row has a caption (a null one has no meaning to train on: a problem, never skipped)."""
    missing = [i for i, text in enumerate(ds.select_columns([column])[column]) if text is None]
    if missing:
        problems.append(f"data.caption_column: '{column}' is empty in {len(missing)} of {len(ds)} rows "
                        f"({_rows(missing)}); fix: fill them in, or choose another data.caption_column")
    return not missing


def _rows(rows: list[int]) -> str:
    return "row " + ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


# --------------------------------------------------------------------------------------------------------
# Writing the folder


def _key(ds: Dataset, dataset: str, split: str, image: str, caption: str | None) -> str:
    """The cache entry of this split and these columns of this version of ``dataset``."""
    # datasets' own fingerprint (a private attribute, but the one datasets keys its own cache by): the data
    # files' paths and mtimes, or the hub revision, plus every transform since. A save_to_disk folder keeps
    # the fingerprint it was saved with, so its files' sizes and mtimes are added (one rewritten in place is
    # new).
    # A local path as an absolute one: a run folder records it so, and a run from another folder is the same.
    local = _is_glob(dataset) or Path(dataset).exists()
    source = os.path.abspath(dataset) if local else dataset
    parts = [LAYOUT, source, split, image, caption or "", ds._fingerprint, _stamp(Path(dataset))]
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _stamp(folder: Path) -> str:
    """Sizes and modification times of a save_to_disk folder's files ('' for anything else)."""
    if not (folder.is_dir() and any((folder / name).is_file() for name in _SAVED)):
        return ""
    stats = [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
             for p in sorted(folder.rglob("*")) if p.is_file()]
    return "|".join(stats)


def _write(ds: Dataset, image: str, caption: str | None, entry: Path) -> list[tuple[int, str | None]]:
    """Write the images (and metadata.jsonl) into ``entry/images`` through a temporary folder renamed into
    place once whole. Returns the rows without an image, each with the file it names if that is not there
    (then nothing is kept)."""
    from datasets import Image

    for stale in entry.glob(f".{IMAGES}.*.tmp"):  # of a killed run (the lock is ours: nobody writes there)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = entry / f".{IMAGES}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True)
    try:
        columns = [image] + ([caption] if caption else [])
        # decode=False: each cell is {"bytes", "path"}, the image as encoded, never decoded and re-encoded
        rows = ds.select_columns(columns).cast_column(image, Image(decode=False))
        width = max(5, len(str(len(ds) - 1)))
        metadata, empty = [], []
        for i, row in enumerate(rows):
            try:
                data, source = _image_bytes(row[image])
            except _NoImage as e:
                empty.append((i, e.args[0] if e.args else None))
                continue
            name = f"{i:0{width}d}{_suffix(data, source)}"
            (tmp / name).write_bytes(data)
            if caption:
                line = json.dumps({"file_name": name, "text": row[caption]}, ensure_ascii=False)
                metadata.append(line + "\n")
        if empty:
            shutil.rmtree(tmp)
            return empty
        if caption:
            (tmp / "metadata.jsonl").write_text("".join(metadata), encoding="utf-8")
        os.replace(tmp, entry / IMAGES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return []


def _image_bytes(cell: dict | None) -> tuple[bytes, str | None]:
    """(the image's encoded bytes, its source file name if any) from an undecoded Image cell."""
    if cell is None or not (cell.get("bytes") or cell.get("path")):
        raise _NoImage
    path = cell.get("path")
    if cell.get("bytes"):
        return cell["bytes"], path
    if os.path.isfile(path):
        return Path(path).read_bytes(), path
    if os.path.isabs(path) and not os.path.exists(path):  # a local file named, gone (a URL is not absolute)
        raise _NoImage(path)
    # a file only datasets can reach (a hub URL): decoded there, stored losslessly as PNG here
    from datasets import Image

    try:
        with Image().decode_example(cell) as im:
            out = io.BytesIO()
            im.save(out, format="PNG")
    except Exception as e:  # whatever the fetch or the decoder raised: this row has no image
        raise _NoImage from e
    return out.getvalue(), None


def _suffix(data: bytes, source: str | None) -> str:
    """The extension the scan reads ``data`` by: from its content (Pillow's sniffing, only sdtune's decoders),
    else the source file's own, else .png (the scan then reports the row's image as unreadable)."""
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # sizes are the scan's to judge
        with PILImage.open(io.BytesIO(data), formats=DECODERS) as im:
            if im.format in _SUFFIXES:
                return _SUFFIXES[im.format]
    own = Path(source).suffix.lower() if source else ""
    return own if own in IMAGE_EXTENSIONS else ".png"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
