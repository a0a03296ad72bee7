"""Bad and awkward inputs for ``sdtune prep``, built in code: every file a phone, a camera or a zip archive
can hand a user, each small enough that a whole corpus preps in well under a second."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import sdtune.images  # noqa: F401  (registers pillow-heif's HEIF plugin, used here to write HEIC)

RED, GREEN, BLUE, GRAY = (230, 20, 20), (20, 200, 20), (20, 20, 230), (128, 128, 128)


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A textured, photo-like picture (colour field, shapes with edges, fine noise): sharp and distinct."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(h // 10, h // 3))
        draw.rectangle((x - r, y - r, x + r, y + r // 2), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.normal(0, 6, (h, w, 1))
    return Image.fromarray(np.clip(np.asarray(im, np.float64) + noise, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image, quality: int = 95, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# EXIF orientation


def upright_marker() -> Image.Image:
    """A landscape picture with a red block top-left and a green block top-right: every one of the 8
    orientations (rotations and mirrors) puts them somewhere else."""
    im = Image.new("RGB", (300, 200), GRAY)
    draw = ImageDraw.Draw(im)
    draw.rectangle((20, 30, 100, 100), fill=RED)
    draw.rectangle((200, 30, 280, 100), fill=GREEN)
    return im


# The stored pixels for EXIF orientation k are the upright picture put through the inverse of the transform
# that orientation k asks a viewer to apply (EXIF 2.32, tag 0x0112); 6 and 8 are each other's inverse.
_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented_jpeg(orientation: int) -> bytes:
    up = upright_marker()
    stored = up.transpose(_STORED[orientation]) if _STORED[orientation] is not None else up
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(stored, exif=exif.tobytes())


# --------------------------------------------------------------------------------------------------------
# Files Pillow must be told how to read


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header declaring a 10-gigapixel image: 40 bytes that would ask for 30 GB once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def swapped_primaries_icc() -> bytes:
    """An ICC v2 RGB display profile whose red and blue colorants are sRGB's blue and red, so a correctly
    colour-managed pure red pixel comes out blue (and an ignored profile leaves it red)."""
    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    name = b"Swapped primaries (test)\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(4) + bytes(4) + bytes(2) + bytes(1) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233) + bytes(2)  # gamma 2.2 (u8Fixed8), padded
    srgb_red, srgb_green, srgb_blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*srgb_blue)),
            (b"gXYZ", xyz(*srgb_green)), (b"bXYZ", xyz(*srgb_red)), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def png16_gray(value: int) -> bytes:
    return encoded(Image.fromarray(np.full((80, 96), value, np.uint16)), "PNG")


def png16_rgb(rgb16: tuple[int, int, int]) -> bytes:
    """A 48-bit PNG (OpenCV writes them; Pillow cannot)."""
    a = np.zeros((80, 96, 3), np.uint16)
    a[...] = rgb16[::-1]  # OpenCV is BGR
    ok, buf = cv2.imencode(".png", a)
    assert ok
    return buf.tobytes()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (96, 80), c) for c in (RED, GREEN, BLUE)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def half_transparent_png() -> bytes:
    """Left half fully transparent (its hidden colour is red), right half opaque blue."""
    im = Image.new("RGBA", (96, 80), (*BLUE, 255))
    im.paste((*RED, 0), (0, 0, 48, 80))
    return encoded(im, "PNG")


def format_corpus(folder: Path) -> dict[str, bytes]:
    """One file per reading case, keyed by its name in ``folder`` (written there too)."""
    red = Image.new("RGB", (96, 80), RED)
    icc_red = io.BytesIO()
    red.save(icc_red, "PNG", icc_profile=swapped_primaries_icc())
    palette = photo((96, 80), 7).quantize(16)
    palette_alpha = Image.new("P", (96, 80), 0)
    palette_alpha.putpalette([*RED, *BLUE] + [0] * 762)
    palette_alpha.paste(1, (48, 0, 96, 80))
    files = {
        "plain.png": encoded(photo((96, 80), 1), "PNG"),
        "cmyk.jpg": jpeg(Image.new("CMYK", (96, 80), (0, 255, 255, 0))),
        "alpha.png": half_transparent_png(),
        "gray16.png": png16_gray(40000),
        "rgb48.png": png16_rgb((40000, 1000, 0)),
        "gray16.tif": encoded(Image.fromarray(np.full((80, 96), 40000, np.uint16)), "TIFF"),
        "palette.gif": encoded(palette, "GIF"),
        "palette_alpha.png": encoded(palette_alpha, "PNG", transparency=0),
        "la.png": encoded(Image.new("LA", (96, 80), (90, 255)), "PNG"),
        "bw.png": encoded(Image.new("1", (96, 80), 1), "PNG"),
        "icc.png": icc_red.getvalue(),
        "animated.gif": animated("GIF"),
        "animated.webp": animated("WEBP"),
        "photo.webp": encoded(photo((96, 80), 2), "WEBP", quality=90),
        "photo.bmp": encoded(photo((96, 80), 3), "BMP"),
        "photo.heic": encoded(Image.new("RGB", (96, 80), RED), "HEIF", quality=90),
        "photo.avif": encoded(Image.new("RGB", (96, 80), RED), "AVIF", quality=90),
        "truncated.jpg": jpeg(photo((200, 150), 4))[:3000],
        "notes.jpg": b"these are my notes, not a photo\n" * 10,
        "png_in_disguise.jpg": encoded(photo((96, 80), 5), "PNG"),
        "bomb.png": bomb_png(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def checks_corpus(folder: Path) -> None:
    """Four distinct sharp photos, their re-encoded / resized / byte-identical copies, and a blurred one."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (folder / f"shot{i}.jpg").write_bytes(jpeg(photo((240, 180), 10 + i)))
    base = photo((240, 180), 10)
    (folder / "shot0_reencoded.jpg").write_bytes(jpeg(base, quality=60))
    (folder / "shot0_smaller.png").write_bytes(encoded(base.resize((216, 162), Image.Resampling.LANCZOS), "PNG"))
    (folder / "shot1_copy.jpg").write_bytes((folder / "shot1.jpg").read_bytes())
    (folder / "soft.jpg").write_bytes(jpeg(photo((240, 180), 20).filter(ImageFilter.GaussianBlur(6))))
