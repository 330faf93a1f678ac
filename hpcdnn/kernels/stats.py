"""Image statistics for mean subtraction and AlexNet's PCA lighting, accumulated exactly.

Sums are int64, so partial results from shards, ranks and job-array tasks merge exactly and in any order
(the same input always gives the same manifest). Values are in uint8 pixel units (0..255).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from hpcdnn.kernels.jit import kernel


@kernel(parallel=True)
def accumulate(images, pixel_sum, channel_sum, cross_sum):
    """Add uint8 images (N,H,W,C) into pixel_sum (H,W,C), channel_sum (C) and cross_sum (C,C), all int64."""
    n, h, w, c = images.shape
    row_chan = np.zeros((h, c), dtype=np.int64)
    row_cross = np.zeros((h, c, c), dtype=np.int64)
    for y in numba.prange(h):
        for i in range(n):
            for x in range(w):
                for a in range(c):
                    va = np.int64(images[i, y, x, a])
                    pixel_sum[y, x, a] += va
                    row_chan[y, a] += va
                    for b in range(c):
                        row_cross[y, a, b] += va * np.int64(images[i, y, x, b])
    for y in range(h):
        for a in range(c):
            channel_sum[a] += row_chan[y, a]
            for b in range(c):
                cross_sum[a, b] += row_cross[y, a, b]


@dataclass
class ImageStats:
    """Exact running sums over a set of (H, W, C) uint8 images."""

    count: int
    pixel_sum: np.ndarray  # int64 (H, W, C)
    channel_sum: np.ndarray  # int64 (C,)
    cross_sum: np.ndarray  # int64 (C, C): sum of v_a * v_b over every pixel

    @classmethod
    def zeros(cls, image_shape) -> ImageStats:
        h, w, c = image_shape
        return cls(0, np.zeros((h, w, c), np.int64), np.zeros(c, np.int64), np.zeros((c, c), np.int64))

    def add(self, images: np.ndarray) -> None:
        """Accumulate a batch of uint8 (N, H, W, C) images."""
        if len(images):
            accumulate(np.ascontiguousarray(images, dtype=np.uint8), self.pixel_sum, self.channel_sum, self.cross_sum)
            self.count += len(images)

    def merge(self, other: ImageStats) -> None:
        """Add another partial result (exact: integer sums)."""
        self.count += other.count
        self.pixel_sum += other.pixel_sum
        self.channel_sum += other.channel_sum
        self.cross_sum += other.cross_sum

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.int64(self.count), "pixel_sum": self.pixel_sum, "channel_sum": self.channel_sum, "cross_sum": self.cross_sum}

    @classmethod
    def from_arrays(cls, d) -> ImageStats:
        return cls(int(d["count"]), d["pixel_sum"].astype(np.int64), d["channel_sum"].astype(np.int64), d["cross_sum"].astype(np.int64))

    def mean_image(self) -> np.ndarray:
        """Per-pixel mean, float32 (H, W, C)."""
        return (self.pixel_sum / max(self.count, 1)).astype(np.float32)

    def summary(self) -> dict:
        """Per-channel mean/std and the eigen-decomposition of the C x C pixel covariance (AlexNet's PCA).

        Eigenvalues descend; each eigenvector (a column) has its largest component positive, so the result is unique.
        """
        pixels = max(self.count * self.pixel_sum.shape[0] * self.pixel_sum.shape[1], 1)
        mean = self.channel_sum / pixels
        cov = self.cross_sum / pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        signs = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(eigvec.shape[1])])
        eigvec = eigvec * np.where(signs == 0, 1, signs)
        return {
            "channel_mean": mean.tolist(),
            "channel_std": np.sqrt(np.clip(np.diag(cov), 0, None)).tolist(),
            "pca": {"eigval": np.clip(eigval, 0, None).tolist(), "eigvec": eigvec.tolist()},
        }
