"""The statistics kernel against a numpy reference, compiled and as plain Python."""

import numpy as np
import pytest

from hpcdnn.kernels.stats import ImageStats, accumulate


def reference(images):
    x = images.astype(np.int64)
    pix = x.reshape(-1, x.shape[-1])
    return x.sum(0), pix.sum(0), pix.T @ pix


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("shape", [(5, 7, 9, 3), (4, 28, 28, 1), (1, 3, 2, 3), (2, 4, 4, 2)])
def test_accumulate_matches_numpy(compiled, shape):
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    h, w, c = shape[1:]
    sums = np.zeros((h, w, c), np.int64), np.zeros(c, np.int64), np.zeros((c, c), np.int64)
    fn = accumulate if compiled else accumulate.py_func
    for image in [*images, *images]:  # accumulates, does not overwrite
        fn(image, *sums)
    for got, want in zip(sums, reference(images)):
        np.testing.assert_array_equal(got, 2 * want)


def test_merge_is_exact_and_summary_matches_numpy():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
    whole = ImageStats.zeros((6, 5, 3))
    whole.add(images)
    parts = [ImageStats.zeros((6, 5, 3)) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(images, 3)):
        part.add(chunk)
    merged = ImageStats.zeros((6, 5, 3))
    for part in reversed(parts):
        merged.merge(part)
    assert merged.summary() == whole.summary()  # exact, whatever the order
    np.testing.assert_array_equal(merged.mean_image(), images.mean(0).astype(np.float32))

    pix = images.reshape(-1, 3).astype(np.float64)
    s = whole.summary()
    np.testing.assert_allclose(s["channel_mean"], pix.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["channel_std"], pix.std(0), rtol=1e-9)
    cov = np.cov(pix.T, bias=True)
    val, vec = np.array(s["pca"]["eigval"]), np.array(s["pca"]["eigvec"])
    np.testing.assert_allclose(cov @ vec, vec * val, atol=1e-6)  # eigenpairs of the covariance
    assert list(val) == sorted(val, reverse=True)


def test_empty_batch_changes_nothing():
    s = ImageStats.zeros((4, 4, 3))
    s.add(np.zeros((0, 4, 4, 3), np.uint8))
    assert s.count == 0 and not s.pixel_sum.any()
