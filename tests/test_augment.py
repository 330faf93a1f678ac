"""The augmentation twins (Numba compiled, Numba's Python twin, torch) against the numpy reference, and the draws."""

import numpy as np
import pytest
import torch

from hpcdnn.kernels.augment import augment, augment_reference, augment_torch, center_offsets, draw, lighting, ten_crop_views

# (N, H, W, C, crop, pad): square and not, grey and RGB, a crop larger than the image, heavy padding
SHAPES = [(6, 9, 13, 3, 8, 3), (5, 28, 28, 1, 28, 2), (4, 7, 5, 1, 9, 0), (3, 16, 12, 3, 12, 0), (8, 10, 6, 3, 4, 6)]


def random_case(n, h, w, c, crop, pad, seed=0):
    """Random inputs, with offsets anywhere from fully outside on one side to fully outside on the other."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    offsets = rng.integers(-pad - crop, max(h, w) + pad, size=(n, 2)).astype(np.int32)
    offsets[0] = (-pad, -pad)  # always include both padded corners and an exact fit
    offsets[1] = (h - crop + pad, w - crop + pad)
    flips = rng.random(n) < 0.5
    flips[:2] = (True, False)
    mean = (rng.random((h, w, c)) * 255).astype(np.float32)
    shift = rng.normal(0, 5, (n, c)).astype(np.float32)
    scale = (0.5 + rng.random(c)).astype(np.float32) / 64
    return images, offsets, flips, mean, shift, scale


@pytest.mark.parametrize("twin", ["compiled", "py_func", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_twins_match_reference(twin, shape):
    images, offsets, flips, mean, shift, scale = random_case(*shape)
    n, _, _, c, crop, _ = shape
    want = augment_reference(images, offsets, flips, mean, shift, scale, crop)
    if twin == "torch":
        got = augment_torch(torch.from_numpy(images), offsets, torch.from_numpy(flips), mean, shift, scale, crop).numpy()
    else:
        got = np.full((n, c, crop, crop), np.nan, np.float32)  # every element must be written
        (augment if twin == "compiled" else augment.py_func)(images, got, offsets, flips.astype(np.uint8), mean, shift, scale)
    assert got.shape == (n, c, crop, crop) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_by_hand():
    """The reference itself, on a 2x3 RGB image: crop at (0, 1), flipped; a crop reaching past the bottom-right."""
    image = np.arange(18, dtype=np.uint8).reshape(1, 2, 3, 3)
    mean = np.full((2, 3, 3), 1.0, np.float32)
    shift, scale = np.array([[10.0, 20.0, 30.0]], np.float32), np.array([1.0, 0.5, 2.0], np.float32)
    out = augment_reference(image, [[0, 1]], [True], mean, shift, scale, 2)
    # channel 0, row 0: source columns 1, 2 -> flipped to 2, 1: pixels 6 and 3
    np.testing.assert_allclose(out[0, 0, 0], [(6 - 1 + 10) * 1.0, (3 - 1 + 10) * 1.0])
    np.testing.assert_allclose(out[0, 2, 1], [(17 - 1 + 30) * 2.0, (14 - 1 + 30) * 2.0])
    out = augment_reference(image, [[1, 2]], [False], mean, shift, scale, 2)
    np.testing.assert_allclose(out[0, 1], [[(16 - 1 + 20) * 0.5, 20 * 0.5], [20 * 0.5, 20 * 0.5]])  # padding = mean


def test_draw_is_deterministic_and_in_range():
    eigval, eigvec = [5000.0, 300.0, 40.0], np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    a = draw(np.random.default_rng([7, 1]), 500, (30, 20), 16, 3, True, eigval, eigvec)
    b = draw(np.random.default_rng([7, 1]), 500, (30, 20), 16, 3, True, eigval, eigvec)
    c = draw(np.random.default_rng([7, 2]), 500, (30, 20), 16, 3, True, eigval, eigvec)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    offsets, flips, shift = a
    assert offsets.dtype == np.int32 and flips.dtype == bool and shift.dtype == np.float32 and shift.shape == (500, 3)
    assert offsets[:, 0].min() == -3 and offsets[:, 0].max() == 30 - 16 + 3  # every valid position, no other
    assert offsets[:, 1].min() == -3 and offsets[:, 1].max() == 20 - 16 + 3
    assert 0.4 < flips.mean() < 0.6
    offsets, flips, shift = draw(np.random.default_rng(0), 50, (8, 8), 8, 0, False, [1.0], [[1.0]], pca_std=0)
    assert not offsets.any() and not flips.any() and not shift.any()
    with pytest.raises(ValueError, match="does not fit"):
        draw(np.random.default_rng(0), 1, (8, 8), 13, 2, True, [1.0], [[1.0]])


def test_lighting_units():
    """shift_255 = 255 * eigvec @ (alpha * eigval_255 / 255**2), alpha ~ N(0, pca_std): fb.resnet's [0, 1] units."""
    eigval, eigvec = np.array([6000.0, 500.0, 50.0]), np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    shift = lighting(np.random.default_rng(3), 4, eigval, eigvec, 0.1)
    alpha = np.random.default_rng(3).normal(0, 0.1, (4, 3))
    want = np.stack([255 * eigvec @ (a * eigval / 255**2) for a in alpha])
    np.testing.assert_allclose(shift, want, rtol=1e-6)
    grey = lighting(np.random.default_rng(3), 4, [8100.0], [[1.0]], 0.1)  # C=1: a brightness shift
    alpha = np.random.default_rng(3).normal(0, 0.1, (4, 1))
    np.testing.assert_allclose(grey, 255 * alpha * 8100 / 255**2, rtol=1e-6)


def test_center_and_ten_crop_views():
    np.testing.assert_array_equal(center_offsets(2, (256, 250), 224), [[16, 13], [16, 13]])
    np.testing.assert_array_equal(center_offsets(1, (28, 28), 32), [[-2, -2]])
    h, w, c, crop = 11, 9, 3, 6
    offsets, flips = ten_crop_views((h, w), crop)
    assert offsets.shape == (10, 2) and flips.tolist() == [False] * 5 + [True] * 5
    image = np.random.default_rng(0).integers(0, 256, (1, h, w, c), dtype=np.uint8)
    out = np.empty((10, c, crop, crop), np.float32)
    augment(
        np.repeat(image, 10, axis=0),
        out,
        offsets,
        flips,
        np.zeros((h, w, c), np.float32),
        np.zeros((10, c), np.float32),
        np.ones(c, np.float32),
    )
    assert len({v.tobytes() for v in out}) == 10  # ten distinct views of the right size
    np.testing.assert_array_equal(out[5:], out[:5, :, :, ::-1])  # the second five are the first five mirrored
    np.testing.assert_array_equal(out[0], image[0, :crop, :crop].transpose(2, 0, 1))
    np.testing.assert_array_equal(out[3], image[0, h - crop :, w - crop :].transpose(2, 0, 1))
