"""Decoding: every odd input is converted or rejected with a reason; resizing is the centre crop of a resize; the shard JPEG codec."""

import io

import numpy as np
import pytest
from fakes import INVALID_BAD_KINDS, VALID_BAD_KINDS, make_bad_inputs, make_jpeg, photo_array
from PIL import Image

from data_prep.decode import center_box, decode_bytes, load_image
from hpcdnn.data.jpeg import decode_jpeg, encode_jpeg

LIMIT = 1_000_000


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, make_bad_inputs(d, np.random.default_rng(0))


@pytest.mark.parametrize("kind", VALID_BAD_KINDS)
def test_odd_but_valid_inputs_become_rgb(bad, kind):
    d, names = bad
    r = load_image(str(d / names[kind]), 32, max_pixels=LIMIT)
    assert r.reason is None, r.reason
    assert r.array.shape == (32, 32, 3) and r.array.dtype == np.uint8
    assert r.note, "a conversion must be recorded"


EXPECTED_REASON = {"truncated": "truncated", "zero_byte": "empty file", "not_image": "not an image", "bomb": "decompression bomb"}


@pytest.mark.parametrize("kind", INVALID_BAD_KINDS)
def test_bad_inputs_rejected_with_reason(bad, kind):
    d, names = bad
    r = load_image(str(d / names[kind]), 32, max_pixels=LIMIT)
    assert r.array is None
    assert r.reason.startswith(EXPECTED_REASON[kind]), r.reason


def test_bomb_over_pillows_own_limit_is_rejected_not_raised():
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # Pillow itself raises DecompressionBombError at open
    try:
        r = decode_bytes(buf.getvalue(), 16, max_pixels=10**9)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert r.reason.startswith("decompression bomb")


def test_sixteen_bit_is_scaled_not_clipped(bad):
    d, names = bad
    r = load_image(str(d / names["gray16"]), 60, max_pixels=LIMIT)
    assert r.array.max() >= 250 and r.array.min() <= 5  # full 0..65535 ramp -> full 0..255
    assert (r.array[..., 0] == r.array[..., 2]).all()


def test_png_named_jpeg_is_noted(bad):
    d, names = bad
    assert "PNG data in a .JPEG file" in load_image(str(d / names["png_named_jpeg"]), 16, max_pixels=LIMIT).note


@pytest.mark.parametrize("w,h", [(120, 80), (80, 120), (64, 64), (20, 10)])
def test_centre_box_resize_equals_resize_then_crop(w, h):
    """One resize of the centre box == resize shorter side to 32 then centre-crop 32 (up to interpolation at the edges)."""
    arr = photo_array(w, h, np.random.default_rng(3))
    im = Image.fromarray(arr)
    ours = np.asarray(im.resize((32, 32), Image.Resampling.BILINEAR, box=center_box(w, h)), dtype=np.float64)
    s = 32 / min(w, h)
    big = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    left, top = (big.width - 32) // 2, (big.height - 32) // 2
    ref = np.asarray(big.crop((left, top, left + 32, top + 32)), dtype=np.float64)
    assert np.abs(ours - ref)[2:-2, 2:-2].mean() < 3.0


def test_large_jpeg_uses_draft_and_stays_close(tmp_path):
    """A 1024x768 JPEG is shrunk by the decoder first; the result is close to a full decode + resize."""
    path = tmp_path / "big.JPEG"
    make_jpeg(path, 1024, 768, np.random.default_rng(4))
    fast = load_image(str(path), 256, max_pixels=LIMIT).array.astype(np.float64)
    full = Image.open(path).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR, box=center_box(1024, 768))
    assert np.abs(fast - np.asarray(full, dtype=np.float64)).mean() < 4.0


def test_missing_file_is_a_reason_not_a_crash(tmp_path):
    assert load_image(str(tmp_path / "nope.JPEG"), 16, max_pixels=LIMIT).reason.startswith("cannot stat")


@pytest.mark.parametrize("channels", [3, 1])
def test_shard_jpeg_round_trip_keeps_shape_and_is_deterministic(channels):
    image = photo_array(48, 32, np.random.default_rng(3))[:, :, :channels]
    data = encode_jpeg(image)
    assert data == encode_jpeg(image.copy())  # no timestamps or metadata: the same pixels give the same bytes
    back = decode_jpeg(np.frombuffer(data, np.uint8))  # as h5py returns a vlen row
    assert back.shape == image.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - image).mean() < 12  # q90 on a grainy image; swapped channels or a flip give > 30


def test_shard_jpeg_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match=r"not float32 \(4, 4, 3\)"):
        encode_jpeg(np.zeros((4, 4, 3), np.float32))
