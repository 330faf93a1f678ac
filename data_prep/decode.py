"""Decode one image file into a size x size x 3 uint8 array, or say exactly why it cannot be used.

Every mode Pillow can open is converted to RGB (CMYK, grayscale, palette, alpha, 16-bit); the shorter side is
resized to `size` with an antialiasing filter and the centre size x size kept, done as one resize of the
centre box. JPEGs at least twice the target are first shrunk by the decoder itself (`draft`: DCT scaling),
which is most of the speed on full-size photos.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
JPEG_EXTENSIONS = (".jpeg", ".jpg", ".jpe")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass
class Decoded:
    """The result for one input: pixels, or a rejection reason; `note` says what was converted."""

    array: np.ndarray | None = None
    note: str | None = None
    reason: str | None = None


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of side min(width, height): what survives 'resize shorter side, centre crop'."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to RGB; returns the image and a note naming the conversion (None for RGB)."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in SIXTEEN_BIT:
        a = np.asarray(im).astype(np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB"), f"{mode} (high bit depth) scaled to 8-bit RGB"
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} alpha composited over white"
    return im.convert("RGB"), f"{mode} converted to RGB"


def load_image(path: str, size: int, *, max_pixels: int, resample: str = "bilinear") -> Decoded:
    """Read `path` and return size x size x 3 uint8 pixels, or a Decoded with `reason` set."""
    try:
        nbytes = os.path.getsize(path)
    except OSError as e:
        return Decoded(reason=f"cannot stat: {e.strerror}")
    if nbytes == 0:
        return Decoded(reason="empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_bytes(data, size, max_pixels=max_pixels, resample=resample, ext=os.path.splitext(path)[1])
    except OSError as e:
        return Decoded(reason=f"cannot read: {e}")


def decode_bytes(data: bytes, size: int, *, max_pixels: int, resample: str = "bilinear", ext: str = "") -> Decoded:
    """Decode encoded image bytes (see load_image)."""
    notes = []
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return Decoded(reason=f"decompression bomb: {e}")
    except UnidentifiedImageError:
        return Decoded(reason="not an image: Pillow cannot identify the format")
    except Exception as e:  # a broken header is a bad input, never a crash
        return Decoded(reason=f"unreadable header: {type(e).__name__}: {e}")
    with im:
        width, height = im.size
        if width * height > max_pixels:
            return Decoded(reason=f"decompression bomb: {width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels}")
        if ext.lower() in JPEG_EXTENSIONS and im.format != "JPEG":
            notes.append(f"{im.format} data in a {ext} file, decoded as {im.format}")
        try:
            if im.format == "JPEG" and min(width, height) >= 2 * size:
                scale = size / min(width, height)
                im.draft(None, (int(np.ceil(width * scale)), int(np.ceil(height * scale))))
            im.load()
            rgb, note = to_rgb(im)
            if note:
                notes.append(note)
            out = rgb.resize((size, size), FILTERS[resample], box=center_box(*rgb.size))
            array = np.asarray(out, dtype=np.uint8)
        except Image.DecompressionBombError as e:
            return Decoded(reason=f"decompression bomb: {e}")
        except Exception as e:
            return Decoded(reason=f"truncated or corrupt image data: {type(e).__name__}: {e}")
    return Decoded(array=array, note="; ".join(notes) or None)
