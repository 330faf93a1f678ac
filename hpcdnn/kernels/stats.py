"""Image statistics for mean subtraction and AlexNet's PCA lighting, accumulated exactly.

Sums are int64, so partial results from shards, ranks and job-array tasks merge exactly and in any order
(the same input always gives the same manifest). Values are in uint8 pixel units (0..255).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from hpcdnn.kernels.jit import kernel


@kernel()
def accumulate(image, pixel_sum, channel_sum, cross_sum):
    """Add one uint8 image (H,W,C) into pixel_sum (H,W,C), channel_sum (C) and cross_sum (C,C), all int64.

    Serial and GIL-free: decoding threads each call it on their own partial sums. RGB has an unrolled path
    (faster than the generic per-channel loop).
    """
    h, w, c = image.shape
    pix = image.reshape(h * w, c)
    acc = pixel_sum.reshape(h * w, c)
    if c == 3:
        s0 = s1 = s2 = p00 = p01 = p02 = p11 = p12 = p22 = np.int64(0)
        for k in range(h * w):
            r, g, b = np.int64(pix[k, 0]), np.int64(pix[k, 1]), np.int64(pix[k, 2])
            acc[k, 0] += r
            acc[k, 1] += g
            acc[k, 2] += b
            s0, s1, s2 = s0 + r, s1 + g, s2 + b
            p00, p01, p02, p11, p12, p22 = p00 + r * r, p01 + r * g, p02 + r * b, p11 + g * g, p12 + g * b, p22 + b * b
        sums = np.array([s0, s1, s2])
        cross = np.array([[p00, p01, p02], [p01, p11, p12], [p02, p12, p22]])
    else:
        sums = np.zeros(c, np.int64)
        cross = np.zeros((c, c), np.int64)
        for k in range(h * w):
            for a in range(c):
                va = np.int64(pix[k, a])
                acc[k, a] += va
                sums[a] += va
                for b in range(c):
                    cross[a, b] += va * np.int64(pix[k, b])
    for a in range(c):
        channel_sum[a] += sums[a]
        for b in range(c):
            cross_sum[a, b] += cross[a, b]


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
        for image in images:
            self.add_one(image)

    def add_one(self, image: np.ndarray) -> None:
        """Accumulate one uint8 (H, W, C) image."""
        accumulate(np.ascontiguousarray(image, dtype=np.uint8), self.pixel_sum, self.channel_sum, self.cross_sum)
        self.count += 1

    def merge(self, other: ImageStats) -> None:
        """Add another partial result (exact: integer sums)."""
        self.count += other.count
        self.pixel_sum += other.pixel_sum
        self.channel_sum += other.channel_sum
        self.cross_sum += other.cross_sum

    def to_json(self) -> dict:
        """A JSON-able exact copy (the per-pixel sums as base64 little-endian int64)."""
        return {
            "count": self.count,
            "channel_sum": self.channel_sum.tolist(),
            "cross_sum": self.cross_sum.tolist(),
            "pixel_sum_shape": list(self.pixel_sum.shape),
            "pixel_sum_b64": base64.b64encode(self.pixel_sum.astype("<i8").tobytes()).decode(),
        }

    @classmethod
    def from_json(cls, d: dict) -> ImageStats:
        pixel_sum = np.frombuffer(base64.b64decode(d["pixel_sum_b64"]), "<i8").reshape(d["pixel_sum_shape"]).astype(np.int64)
        return cls(int(d["count"]), pixel_sum, np.array(d["channel_sum"], np.int64), np.array(d["cross_sum"], np.int64))

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
