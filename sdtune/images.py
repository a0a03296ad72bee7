"""Reading untrusted photos safely: upright, sRGB, 8-bit RGB, at a working size fit for resizing.

Only the decoders in ``DECODERS`` are ever invoked, whatever a file's name says: Pillow sniffs the content
and tries just those. Files over the decompression-bomb limit are refused before any pixel is decoded.
Large images are decoded small where the format allows it (JPEG's DCT scaling via ``Image.draft``, to at
least the output size: 50 dB PSNR against a full decode) and reduced by an integer box filter to at least
twice the output size otherwise, so the final Lanczos resize is fast and as sharp as a full-size one.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageCms, UnidentifiedImageError

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    import numpy as np

try:  # HEIC/HEIF from iPhones; pillow-heif registers a Pillow opener named "HEIF"
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a declared dependency; without it HEIC files are reported unreadable
    pillow_heif = None

# The JPEG decoder also opens the multi-picture JPEGs many phones write (format "MPO"); AVIF is Pillow's own
# (11.2 and later). Only decoders this Pillow has are named: Image.open fails on an unknown one.
Image.init()
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF", "AVIF")  # what the reader opens, all plugins present
DECODERS: tuple[str, ...] = tuple(f for f in _FORMATS if f in Image.OPEN)

# EXIF orientation -> the transpose that makes the stored pixels upright (as in ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXTENSION_FORMATS = {  # what a file's extension claims, to report names that lie about the content
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".webp": "WEBP",
    ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF", ".heic": "HEIF", ".heif": "HEIF",
    ".hif": "HEIF", ".avif": "AVIF",
}
# The names of image files sdtune reads (training and class images; prep sniffs every file instead). A format whose
# plugin is missing keeps its names here, so its files are reported unreadable rather than silently passed over.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(ext for ext, fmt in _EXTENSION_FORMATS.items() if fmt in _FORMATS)
_PLUGINS = {"HEIF": "pip install pillow-heif", "AVIF": "pip install -U 'pillow>=11.2'"}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class Unreadable(Exception):
    """This file cannot be used; the message is the reason, one line, for the report."""


@dataclass
class Decoded:
    """An upright sRGB RGB image at working size, and what it took to get there."""

    image: Image.Image
    format: str
    size: tuple[int, int]  # upright size of the full-resolution source, (width, height)
    fixes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    animated: bool = False  # only the first frame was used
    alpha: Image.Image | None = None  # the source's transparency (mode L, image's size) where it had some

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per working pixel, (x, y)."""
        return self.size[0] / self.image.width, self.size[1] / self.image.height


def open_image(path: str | Path, key: str, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A whole input image (init image, mask, subject photo) at full size, upright and sRGB, through the same
    safe reader as training data; one SdtuneError naming the option ``key`` if it cannot be used."""
    path = Path(path)
    try:
        # a short side this large asks for no reduction: the full-resolution pixels
        return read_image(path.read_bytes(), path.suffix, 1 << 30, Image.MAX_IMAGE_PIXELS, background).image
    except (OSError, Unreadable) as e:
        raise SdtuneError(f"{key}: cannot read {path} ({_one_line(e)})") from None


def missing_decoder(suffix: str) -> str | None:
    """For a file named ``*suffix``: the format its name claims, and how to install the decoder this Pillow
    lacks for it; None when the decoder is here (or the name claims no format)."""
    fmt = _EXTENSION_FORMATS.get(suffix.lower())
    if fmt is None or fmt in DECODERS:
        return None
    return f"{fmt} needs a decoder that is not installed; fix: {_PLUGINS.get(fmt, 'install it')}, or convert it to PNG"


def read_image(
    data: bytes, suffix: str, min_short_side: int, max_pixels: int | None, background: tuple[int, int, int]
) -> Decoded:
    """Decode ``data`` (a file's bytes; ``suffix`` its extension) to an upright sRGB RGB image whose short
    side is at least ``min_short_side`` where the source allows; raise ``Unreadable`` with the reason."""
    try:
        return _read(data, suffix, min_short_side, max_pixels, background)
    except Unreadable:
        raise
    except Exception as e:  # a malformed file can make a decoder plugin raise anything, anywhere
        raise Unreadable(f"cannot decode: {type(e).__name__}: {_one_line(e)}") from None


def _read(
    data: bytes, suffix: str, min_short_side: int, max_pixels: int | None, background: tuple[int, int, int]
) -> Decoded:
    fixes: list[str] = []
    notes: list[str] = []
    im = _open(data, max_pixels, notes)
    fmt = im.format or "?"
    claimed = _EXTENSION_FORMATS.get(suffix.lower())
    if claimed and claimed != fmt and {claimed, fmt} != {"JPEG", "MPO"}:
        fixes.append(f"content is {fmt}, not {claimed} as the name says")
    animated = getattr(im, "is_animated", False) and fmt != "MPO"  # MPO's extra frames are previews/depth
    if animated:
        frames = im.n_frames
        fixes.append(f"animated ({frames} frames): first frame used")
        notes.append(f"animated ({frames} frames): only the first frame is used")
    sixteen = _sixteen_bit(im)  # the decoder's raw mode says it; only known before loading
    stored_size = im.size
    if fmt in ("JPEG", "MPO"):
        # Stored (not yet rotated) dims: asking both sides for min_short_side bounds the short side.
        im.draft(None, (min_short_side, min_short_side))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying "broken file"
        raise Unreadable(f"truncated or corrupt {fmt}: {_one_line(e)}") from None
    orientation, note = _orientation(im)  # after load: PNG keeps its EXIF chunk anywhere in the file
    if note:
        notes.append(note)
    size = stored_size if orientation < 5 else stored_size[::-1]

    icc = im.info.get("icc_profile")
    if sixteen and im.mode in ("RGB", "RGBA"):
        fixes.append("16 bits per channel scaled to 8")  # Pillow does it while decoding (high byte)
    im = _normalise_mode(im, fixes)
    im = _reduce(im, 2 * min_short_side)
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
        fixes.append(f"rotated upright (EXIF orientation {orientation})")
    im = _to_srgb(im, icc, fixes, notes)
    # kept before flattening: masked loss and `sdtune prep`'s NAME.mask.png read the subject from it
    alpha = im.getchannel("A") if im.mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255 else None
    im = _flatten(im, background, fixes)
    return Decoded(image=im, format=fmt, size=size, fixes=fixes, warnings=notes, animated=animated,
                   alpha=alpha)


def _open(data: bytes, max_pixels: int | None, notes: list[str]) -> Image.Image:
    """The image in ``data``, not yet loaded; what Pillow warns about it goes to ``notes``."""
    try:
        with _pillow_warnings() as said:
            im = Image.open(io.BytesIO(data), formats=DECODERS)
        notes += said
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Unreadable(f"refused as a decompression bomb: {_one_line(e)}") from None
    except UnidentifiedImageError:
        raise Unreadable(f"not an image in an allowed format ({', '.join(DECODERS)})") from None
    except Exception as e:  # a malformed header can raise anything from inside a decoder plugin
        raise Unreadable(f"corrupt image header: {_one_line(e)}") from None
    width, height = im.size
    if max_pixels and width * height > max_pixels:
        raise Unreadable(
            f"refused as a decompression bomb: {width}x{height} = {width * height} pixels is over the "
            f"limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise Unreadable(f"empty image ({width}x{height})")
    return im


def _sixteen_bit(im: Image.Image) -> bool:
    tile = getattr(im, "tile", None) or []
    args = tile[0].args if tile else None
    rawmode = args[0] if isinstance(args, tuple) and args else args  # PNG: a string; raw/TIFF: a tuple
    return isinstance(rawmode, str) and ";16" in rawmode


def _orientation(im: Image.Image) -> tuple[int, str | None]:
    """EXIF orientation 1-8 (pillow-heif applies it while decoding and keeps it as original_orientation)."""
    if "original_orientation" in im.info:
        o = im.info.get("original_orientation") or 1
        return 1, (f"upright per HEIF orientation {o}" if o != 1 else None)
    try:
        with _pillow_warnings() as said:
            o = int(im.getexif().get(0x0112, 1))
    except Exception:  # broken EXIF is common and harmless once stripped; keep the pixels as stored
        return 1, "unreadable EXIF ignored (orientation unknown)"
    if o not in range(1, 9):
        return 1, f"invalid EXIF orientation {o} ignored"
    return o, ("; ".join(said) if said else None)


@contextlib.contextmanager
def _pillow_warnings() -> Iterator[list[str]]:
    """What Pillow warns about a file (e.g. "Corrupt EXIF data"), collected as one-line notes for that file:
    on the terminal they would name no file, and a prep's summary would not count them."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Pillow only warns between 1x and 2x its limit; a bomb is refused, never half-trusted.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield said
    said += list(dict.fromkeys(f"Pillow: {_one_line(w.message)}" for w in caught))


def _normalise_mode(im: Image.Image, fixes: list[str]) -> Image.Image:
    """Any mode -> RGB, RGBA, CMYK or LAB (the last two for the colour step), 8 bits per channel."""
    mode = im.mode
    if mode in ("RGB", "RGBA", "CMYK", "LAB"):
        return im
    if mode.startswith("I") or mode == "F":
        fixes.append(f"{_depth_name(mode)} scaled to 8-bit")
        return Image.fromarray(_to_uint8(im, mode)).convert("RGB")
    if mode in ("P", "PA"):
        fixes.append("palette converted to RGB")
        return im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    if mode == "1":
        fixes.append("1-bit black and white converted to RGB")
        return im.convert("RGB")
    if mode in ("L", "LA", "La"):
        fixes.append(f"grayscale ({mode}) converted to RGB")
        return im.convert("RGBA" if mode != "L" else "RGB")
    fixes.append(f"{mode} converted to RGB")
    return im.convert("RGBA" if "A" in mode else "RGB")


def _depth_name(mode: str) -> str:
    return "32-bit float" if mode == "F" else "32-bit integer" if mode == "I" else "16-bit"


def _to_uint8(a: Image.Image, mode: str) -> np.ndarray:
    """High-bit-depth grayscale -> 0..255 (Pillow's convert clips at 255): 16-bit by the range it can hold, float
    0..1 (or 0..255), 32-bit integers by what they hold (8-bit values as they are, beyond 16 bits by their
    maximum)."""
    import numpy as np  # here: the command line imports this module, and only rare images need numpy

    a = np.asarray(a).astype(np.float64)
    top = float(np.nanmax(a)) if a.size else 0.0
    if mode == "F":
        a = a * 255.0 if top <= 1.0 else a  # float images are 0..1 by convention
    elif mode == "I" and top <= 255:  # 32-bit integers hold no convention: 8-bit values stay as they are
        pass
    elif mode == "I" and top > 65535:  # beyond 16 bits: by the image's own range
        a = a * (255.0 / top)
    else:
        a = a / 257.0  # 16-bit: 0..65535 -> 0..255 exactly at both ends
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def _reduce(im: Image.Image, min_short_side: int) -> Image.Image:
    """Integer box reduction that keeps the short side >= min_short_side (cheap; Lanczos comes later)."""
    factor = min(im.size) // max(1, min_short_side)
    return im.reduce(factor) if factor >= 2 else im


def _to_srgb(im: Image.Image, icc: bytes | None, fixes: list[str], notes: list[str]) -> Image.Image:
    """Colour-manage to sRGB with the embedded ICC profile; CMYK/LAB without one by Pillow's formulas."""
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    base = im.convert("RGB") if im.mode == "RGBA" else im
    converted = None
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            name = ImageCms.getProfileDescription(src).strip() or "unnamed"
            space = src.profile.xcolor_space.strip().upper()
            if space == "GRAY":
                pass  # a grayscale tone curve: the gray pixels are already RGB, and close enough
            elif space != base.mode:
                notes.append(f"ICC profile '{name}' is for {space}, not {base.mode}; ignored")
            elif not _is_srgb(name):
                converted = ImageCms.profileToProfile(base, src, _SRGB, outputMode="RGB")
                fixes.append(f"{base.mode} with ICC profile '{name}' converted to sRGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as e:
            notes.append(f"unusable ICC profile ignored ({_one_line(e)}); colours may be off")
    if converted is None and base.mode == "LAB":
        lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
        converted = ImageCms.profileToProfile(base, lab, _SRGB, outputMode="RGB")
        fixes.append("LAB converted to sRGB")
    if converted is None and base.mode == "CMYK":
        converted = base.convert("RGB")
        fixes.append("CMYK converted to RGB (no ICC profile: naive formula)")
    out = converted if converted is not None else base
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(alpha)
    return out


def _is_srgb(description: str) -> bool:
    return "srgb" in description.lower().replace(" ", "").replace("-", "")


def _flatten(im: Image.Image, background: tuple[int, int, int], fixes: list[str]) -> Image.Image:
    """Composite any transparency onto ``background``; fully opaque alpha is just dropped."""
    if im.mode != "RGBA":
        return im
    alpha = im.getchannel("A")
    if alpha.getextrema()[0] < 255:
        fixes.append("transparency composited on #{:02x}{:02x}{:02x}".format(*background))
        flat = Image.new("RGB", im.size, background)
        flat.paste(im, mask=alpha)
        return flat
    return im.convert("RGB")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
