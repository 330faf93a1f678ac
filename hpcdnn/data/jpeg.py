"""The JPEG codec of `--encoding jpeg` shards: data_prep encodes with it, the shard reader and loader decode with it.

Kept in one module so the writer's settings (quality, subsampling, channel layout) and the reader's inverse agree.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

JPEG_QUALITY = 90  # Pillow quality of stored JPEGs; part of the shard bytes, so changing it changes every jpeg shard


def encode_jpeg(array: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encode uint8 (H, W, C) pixels, C = 1 or 3, as JPEG bytes (4:2:0 subsampling, no metadata: deterministic)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"encode_jpeg takes uint8 (H, W, 1|3) pixels, not {array.dtype} {array.shape}; convert the image first")
    im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    """Decode stored JPEG bytes to uint8 (H, W, C); grayscale comes back as (H, W, 1), like it was stored."""
    with Image.open(io.BytesIO(bytes(data))) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr
