"""AlexNet's data augmentation as a pure function on arrays: crop, flip, mean subtraction, PCA lighting, scale.

One operation, three twins that the tests hold equal: `augment` (Numba, `prange` over the batch, GIL-free, for
the CPU loader thread), `augment_reference` (plain numpy, obviously correct) and `augment_torch` (torch ops on
any device: the CUDA path). For every image n, channel c and output pixel (y, x) of an S x S crop:

    out[n, c, y, x] = (img[n, oy + y, ox + x', c] - mean[oy + y, ox + x', c] + shift[n, c]) * scale[c]

with (oy, ox) = offsets[n] and x' = S-1-x when flips[n] else x. Offsets may reach outside the image (padded crops,
e.g. 28x28 with pad 2): a pixel there counts as equal to the mean, so it is 0 after mean subtraction and becomes
shift[n, c] * scale[c] (lighting applies to the padding as it would to a padded image).

The random parameters come from `draw` (one numpy Generator per batch, so a batch is reproducible from its seed);
`center_offsets` and `ten_crop_views` give the evaluation views.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from hpcdnn.kernels.jit import kernel


@kernel(parallel=True)
def augment(images, out, offsets, flips, mean, shift, scale):
    """Crop, flip, normalise C-contiguous uint8 (N,H,W,C) images into float32 out (N,C,S,S); see the module docstring.

    Per output row: subtract the mean over the contiguous (x, c) run into a small buffer (vectorises), then write
    each channel's row forwards or backwards. That beats writing NCHW straight from NHWC (strided stores).
    """
    n, h, w, c = images.shape
    s = out.shape[2]
    for i in prange(n):
        oy, ox = offsets[i, 0], offsets[i, 1]
        flip = flips[i] != 0
        x0 = min(max(-ox, 0), s)  # crop columns [x0, x1) fall inside the image; the rest is padding
        x1 = max(min(w - ox, s), x0)
        centred = np.zeros((s, c), np.float32)  # padding stays 0 (the mean, subtracted)
        flat = centred.reshape(s * c)
        for y in range(s):
            sy = oy + y
            if sy < 0 or sy >= h:
                for ch in range(c):
                    out[i, ch, y, :] = (np.float32(0.0) + shift[i, ch]) * scale[ch]
                continue
            src = images[i, sy].reshape(w * c)[(ox + x0) * c : (ox + x1) * c]
            m = mean[sy].reshape(w * c)[(ox + x0) * c : (ox + x1) * c]
            dst = flat[x0 * c : x1 * c]
            for k in range(dst.size):  # zero-based views: LLVM vectorises this loop, not the offset form (2x)
                dst[k] = np.float32(src[k]) - m[k]
            for ch in range(c):
                sh, sc = shift[i, ch], scale[ch]
                row = out[i, ch, y]
                if flip:
                    for x in range(s):
                        row[s - 1 - x] = (centred[x, ch] + sh) * sc
                else:
                    for x in range(s):
                        row[x] = (centred[x, ch] + sh) * sc


def augment_reference(images, offsets, flips, mean, shift, scale, crop: int) -> np.ndarray:
    """The same operation in plain numpy, as the tests' reference: pad the mean-subtracted images with 0, then slice."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    centred = images.astype(np.float32) - np.asarray(mean, dtype=np.float32)[None]
    p = int(max(0, -offsets.min(initial=0), (offsets[:, 0] + crop - h).max(initial=0), (offsets[:, 1] + crop - w).max(initial=0)))
    padded = np.pad(centred, ((0, 0), (p, p), (p, p), (0, 0)))  # zero after mean subtraction = the mean before
    out = np.empty((n, c, crop, crop), np.float32)
    for i in range(n):
        top, left = offsets[i] + p
        view = padded[i, top : top + crop, left : left + crop]
        if flips[i]:
            view = view[:, ::-1]
        out[i] = ((view + np.asarray(shift, np.float32)[i]) * np.asarray(scale, np.float32)).transpose(2, 0, 1)
    return out


def augment_torch(images, offsets, flips, mean, shift, scale, crop: int):
    """The same operation with torch ops on `images`' device (uint8 (N,H,W,C) tensor); returns float32 (N,C,S,S).

    The other arguments may be numpy arrays or tensors; they are moved to the images' device.
    """
    import torch

    dev = images.device
    n, h, w, c = images.shape
    off = torch.as_tensor(np.asarray(offsets) if not torch.is_tensor(offsets) else offsets, device=dev).long().reshape(n, 2)
    flip = torch.as_tensor(np.asarray(flips) if not torch.is_tensor(flips) else flips, device=dev).bool().reshape(n)
    mean_t = torch.as_tensor(mean, device=dev, dtype=torch.float32)
    shift_t = torch.as_tensor(shift, device=dev, dtype=torch.float32).reshape(n, c)
    scale_t = torch.as_tensor(scale, device=dev, dtype=torch.float32).reshape(c)
    ar = torch.arange(crop, device=dev)
    ys = off[:, :1] + ar  # (N, S) source rows
    xs = off[:, 1:] + ar  # (N, S) source columns, left to right
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (N, S, S)
    yc, xc = ys.clamp(0, h - 1)[:, :, None], xs.clamp(0, w - 1)[:, None, :]
    pixels = images[torch.arange(n, device=dev)[:, None, None], yc, xc]  # (N, S, S, C) uint8 gather
    centred = pixels.float() - mean_t[yc, xc]
    centred = torch.where(inside[..., None], centred, torch.zeros((), device=dev))
    return ((centred + shift_t[:, None, None, :]) * scale_t).permute(0, 3, 1, 2).contiguous()


def lighting(rng: np.random.Generator, n: int, eigval, eigvec, pca_std: float = 0.1) -> np.ndarray:
    """AlexNet's PCA lighting: per-image colour shift float32 (N,C) in uint8 pixel units.

    The paper adds sum_i alpha_i * lambda_i * p_i with alpha_i ~ N(0, pca_std), where (lambda_i, p_i) are the
    eigenpairs of the covariance of RGB values. That sum is not unit-free (lambda is a variance), so the scale of
    the pixel values matters; like fb.resnet.torch and its descendants we work in [0, 1] units. The manifest's
    eigenvalues are in uint8 units (0..255)^2, hence shift_255 = 255 * eigvec @ (alpha * eigval_255 / 255**2).
    For one channel (eigvec [[1]]) this is a brightness shift with the same formula.
    """
    eigval = np.asarray(eigval, dtype=np.float64).reshape(-1)
    eigvec = np.asarray(eigvec, dtype=np.float64).reshape(-1, eigval.size)
    alpha = rng.normal(0.0, pca_std, size=(n, eigval.size)) if pca_std > 0 else np.zeros((n, eigval.size))
    return (255.0 * (alpha * (eigval / 255.0**2)) @ eigvec.T).astype(np.float32)


def draw(rng: np.random.Generator, n: int, image_hw, crop: int, pad: int, flip: bool, eigval, eigvec, pca_std: float = 0.1):
    """Random training parameters for n images: (offsets int32 (N,2), flips bool (N,), shift float32 (N,C)).

    Crops are uniform over every position of an S x S window inside the image padded by `pad` on each side;
    flips have p = 0.5 when `flip`; shift is `lighting(...)`. The draws happen in this fixed order.
    """
    h, w = image_hw
    if crop < 1 or pad < 0 or crop > h + 2 * pad or crop > w + 2 * pad:
        raise ValueError(f"crop {crop} with pad {pad} does not fit a {h}x{w} image: need 1 <= crop <= side + 2*pad")
    tops = rng.integers(-pad, h - crop + pad, size=n, endpoint=True)
    lefts = rng.integers(-pad, w - crop + pad, size=n, endpoint=True)
    offsets = np.stack([tops, lefts], axis=1).astype(np.int32)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    return offsets, flips, lighting(rng, n, eigval, eigvec, pca_std)


def center_offsets(n: int, image_hw, crop: int) -> np.ndarray:
    """Offsets int32 (N,2) of the centre S x S crop (negative, i.e. padded, when the crop is larger than the image)."""
    h, w = image_hw
    return np.tile(np.array([(h - crop) // 2, (w - crop) // 2], dtype=np.int32), (n, 1))


def ten_crop_views(image_hw, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """AlexNet's 10 test views: offsets int32 (10,2) and flips bool (10,) for 4 corners + centre, then the same flipped."""
    h, w = image_hw
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]
    offsets = np.array(corners * 2, dtype=np.int32)
    flips = np.repeat(np.array([False, True]), 5)
    return offsets, flips
