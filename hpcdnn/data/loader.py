"""Training and evaluation batches from hpcdnn shards: a seeded per-epoch shuffle split across ranks, read and
augmented in a background thread, handed over as float32 NCHW tensors.

    loader = ShardLoader("data/fashion-mnist", "train", 128, rank=r, world=w, seed=0, crop=28, pad=2)
    for epoch in range(epochs):
        for x, y in loader.iter_epoch(epoch):        # or loader.set_epoch(epoch); for x, y in loader
            ...
    loader.close()

Order: epoch e shuffles all samples of the split with `default_rng([seed, e])`; rank r takes the r-th of `world`
equal parts (the < world left-over samples sit out that epoch), so every rank runs `len(loader)` steps and no MPI
is needed. Batch b of that part is a set of samples; inside a batch they come in storage order, so neighbours read
as one slice. Its augmentation draws from `default_rng([seed, e, rank, b])` only, so `iter_epoch(e, start_batch=b)`
after a restart yields bitwise the batches an uninterrupted run would have seen. `read_samples(idx, *draws)` reads and
augments an explicit list of samples in the calling thread, with draws from `batch_draws` (or any): Sandblaster reads
only the portions of a batch a rank computes, and gets the rows that iteration would have given.

Reading: HDF5 files are opened lazily by the thread that reads them and closed when it ends (never shared across
threads or a fork; the prefetch thread is hpcdnn/data/prefetch.py). A raw shard is read one image per `ds[i]` call, or
one slice per run of neighbouring samples; never with a list index (h5py's point selection is orders of magnitude
slower). JPEG shards decode on `workers` threads (Pillow frees the GIL).

Trust: the constructor refuses, before step 1, a data directory whose manifest, mean image or shards of the split fail
hpcdnn.data.trust (non-finite statistics, shard paths leading outside it, counts, labels outside the classes); a
sample that fails to read or decode later raises an error naming its shard file, index and key.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hpcdnn import trace
from hpcdnn.data.prefetch import BatchIterator, stop_producers
from hpcdnn.data.schema import MANIFEST, ShardReader, decode_jpeg, load_manifest
from hpcdnn.data.trust import manifest_problems, shards_problems
from hpcdnn.kernels.augment import augment, augment_torch, center_offsets, draw, ten_crop_views
from hpcdnn.kernels.jit import numba_threads
from hpcdnn.placement import usable_cpus

_KERNEL_LOCK = threading.Lock()  # Numba's workqueue threading layer must not run two parallel kernels at once
SERIAL_BELOW = 1 << 20  # output floats under which the augmentation kernel runs on one thread (~1 ms of work)


class ShardLoader:
    """Batches (x float32 (N,C,S,S), y int64 (N,)) of one split, for one rank of `world`; see the module docstring.

    train=True: random S x S crop of the image padded by `pad`, horizontal flip (p=0.5 when `flip`), PCA lighting
    (sigma `pca_std`, the manifest's `pca`), mean subtraction (the manifest's per-pixel `mean.npy`), then `scale`.
    train=False: centre crop (all 10 AlexNet views per sample, sample-major, with `ten_crop=True`), no flip or lighting.
    `scale` defaults to 1 / the manifest's per-channel std (uint8 units), so inputs come out standardised.
    `crop` defaults to the image's shorter side; `shuffle` and `drop_last` default to `train` (evaluation reads
    every sample in storage order). `workers` threads run the augmentation kernel and JPEG decoding (default: all CPUs).
    On CUDA the uint8 batch goes to the device through pinned memory and is augmented there (`augment_torch`).
    """

    def __init__(self, directory, split: str, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, train: bool = True,
                 crop: int | None = None, pad: int = 0, flip: bool = True, pca_std: float = 0.1, scale=None, prefetch: int = 2,
                 device=None, drop_last: bool | None = None, shuffle: bool | None = None, ten_crop: bool = False,
                 workers: int | None = None):  # fmt: skip
        self.directory = Path(directory)
        self._manifest = load_manifest(self.directory)
        splits = self._manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} not in {self.directory / 'manifest.json'}; present: {', '.join(sorted(splits))}")
        self._refuse_untrusted(split)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, world={world})")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be >= 1, not {batch_size} and {prefetch}")
        if ten_crop and train:
            raise ValueError("ten_crop=True is an evaluation view: use it with train=False")
        self.split, self.batch_size, self.rank, self.world, self.seed, self.train = split, batch_size, rank, world, seed, train
        self.pad, self.flip, self.pca_std, self.prefetch, self.ten_crop = pad, flip, pca_std, prefetch, ten_crop
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.workers = workers or usable_cpus()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shards = splits[split]["shards"]
        self.files = [self.directory / s["file"] for s in shards]
        self.starts = np.concatenate([[0], np.cumsum([int(s["count"]) for s in shards], dtype=np.int64)])
        self.total = int(self.starts[-1])
        self.encoding = self._manifest["encoding"]
        h, w, c = self.image_shape
        self.crop = crop or min(h, w)
        if train and (self.crop > h + 2 * pad or self.crop > w + 2 * pad):
            raise ValueError(f"crop {self.crop} with pad {pad} does not fit the {h}x{w} images; use crop <= {min(h, w) + 2 * pad}")
        self.mean = np.ascontiguousarray(np.load(self.directory / self._manifest["mean"]), dtype=np.float32)  # checked by trust
        if scale is None:  # channel_std is finite and > 0 (trust.manifest_problems)
            scale = 1.0 / np.asarray(self._manifest["channel_std"], dtype=np.float64)
        self.scale = np.ascontiguousarray(np.broadcast_to(np.asarray(scale, dtype=np.float32), (c,)))
        pca = self._manifest["pca"]
        self.eigval, self.eigvec = np.asarray(pca["eigval"], np.float64), np.asarray(pca["eigvec"], np.float64)
        self.per_rank = self.total // world
        self.num_batches = self.per_rank // batch_size if self.drop_last else -(-self.per_rank // batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{split}: {self.total} samples over {world} ranks give no full batch of {batch_size}; lower batch_size")
        self.epoch = 0
        self._iterators: weakref.WeakSet = weakref.WeakSet()
        self._threads: list[threading.Thread] = []  # every producer started, joined by close()
        self._own: tuple[dict, ThreadPoolExecutor | None] | None = None  # read_samples' files and decode pool (caller's thread)

    def _refuse_untrusted(self, split: str) -> None:
        """Raise before step 1 if the manifest or a shard of `split` cannot be trusted (statistics, paths, counts,
        labels: see hpcdnn.data.trust), rather than train on NaN or drop samples silently or fail mid-run."""
        problems = manifest_problems(self.directory, self._manifest)
        if not problems:  # a shard path outside the directory is never opened
            problems = shards_problems(self.directory, self._manifest, split)
        if problems:
            shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ValueError(
                f"{self.directory / MANIFEST}: the data set cannot be trusted:\n  {shown}\n"
                f"Prepare it again with data-prep into a new --out; `data-prep verify {self.directory}` lists every problem"
            )

    # ---- what the data set is
    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def num_classes(self) -> int:
        return len(self._manifest["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Stored (H, W, C); batches are (N, C, crop, crop)."""
        return tuple(int(v) for v in self._manifest["image_shape"])

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self.num_batches

    # ---- which samples
    def rank_indices(self, epoch: int) -> np.ndarray:
        """Global sample indices this rank visits in `epoch`, in visiting order (before sorting within batches)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.total) if self.shuffle else np.arange(self.total)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """Global sample indices of batch `batch` of `epoch`, sorted: the order of the rows of x and y."""
        return self._batch_of(self.rank_indices(epoch), batch)

    def _batch_of(self, part: np.ndarray, batch: int) -> np.ndarray:
        return np.sort(part[batch * self.batch_size : (batch + 1) * self.batch_size])

    # ---- iteration
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that plain `for x, y in loader` iterates."""
        self.epoch = epoch

    def __iter__(self):
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> BatchIterator:
        """Batches start_batch .. len(self)-1 of `epoch`, prefetched by a background thread."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches}]")
        it = BatchIterator(self, epoch, start_batch)
        self._iterators.add(it)
        self._threads = [*(t for t in self._threads if t.is_alive()), it.thread]
        return it

    def close(self) -> None:
        """Stop every running prefetch thread (they close their files); close the files read_samples opened."""
        for it in list(self._iterators):
            it.close()
        stop_producers(self._threads)  # also those whose iterator was dropped mid-epoch (a `break`, --max_steps)
        self._threads = []
        if self._own is not None:
            readers, pool = self._own
            self._own = None
            if pool:
                pool.shutdown(wait=True)
            for r in readers.values():
                r.close()

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- explicit samples, read in the calling thread (Sandblaster: each rank reads only the portions it computes)
    def batch_draws(self, epoch: int, batch: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, flips, shift) for the n rows of batch `batch` of `epoch`, exactly those iteration uses (with this
        rank, world and batch_size n): a function of (seed, epoch, rank, batch), so row i is the same whoever asks."""
        return self._params(epoch, batch, n)

    @trace.traced("read samples", "data")  # in the calling thread: on its compute track
    def read_samples(self, idx, offsets, flips, shift) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of global sample indices `idx` augmented with row i of each draw for sample i; sorted indices read
        as slices of neighbours (never a list index). Runs in the calling thread; its files stay open until close()."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = len(idx) * (10 if self.ten_crop else 1)
        if len(offsets) != rows or len(flips) != rows or len(shift) != rows:
            raise ValueError(f"{len(idx)} samples but {len(offsets)}, {len(flips)}, {len(shift)} draws: pass {rows} rows (batch_draws)")
        if idx.size and (idx.min() < 0 or idx.max() >= self.total):
            raise ValueError(f"sample indices {idx.min()}..{idx.max()} outside the {self.total} samples of {self.split!r}")
        if self._own is None:
            self._own = ({}, ThreadPoolExecutor(self.workers) if self.encoding != "raw" and self.workers > 1 else None)
        images = np.empty((len(idx), *self.image_shape), np.uint8)
        labels = self._read(self._own[0], idx, images, self._own[1])
        pixels = torch.from_numpy(images).to(self.device) if self.device.type == "cuda" else None
        return self._augment(images, labels, (offsets, flips, shift), pixels, lambda shape: np.empty(shape, np.float32))

    # ---- producing one batch (runs in the prefetch thread)
    def _read(self, readers: dict, idx: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor | None) -> np.ndarray:
        """Read sorted global indices `idx` into uint8 `out` (N,H,W,C); returns their labels."""
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        local = idx - self.starts[shard]
        cuts = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1  # runs of neighbours in one shard
        bounds, shard, local = [0, *cuts.tolist(), len(idx)], shard.tolist(), local.tolist()
        labels = np.empty(len(idx), np.int64)
        jpegs = []
        for k, end in zip(bounds[:-1], bounds[1:]):
            if shard[k] not in readers:
                readers[shard[k]] = ShardReader(self.files[shard[k]])
            r, a, b = readers[shard[k]], local[k], local[k] + end - k
            labels[k:end] = r.labels[a:b]
            try:
                if self.encoding != "raw":
                    jpegs.extend((j, r, i, r.images[i]) for j, i in zip(range(k, end), range(a, b)))
                elif (end - k) * out[0].nbytes >= 1 << 21:  # >= 2 MiB: read_direct skips a temporary (1.4x at 32 x 256x256x3)
                    r.images.read_direct(out, np.s_[a:b], np.s_[k:end])
                elif end - k > 1:  # shorter runs: one slice beats per-image reads 1.5-5x on small images (read_direct costs ~90 us)
                    out[k:end] = r.images[a:b]
                else:
                    out[k] = r.images[a]
            except OSError as e:  # a damaged chunk: name where, not just h5py's "can't read data"
                raise self._bad_sample(r, a, f"cannot be read ({e})", b - a) from e
        if jpegs:
            decode = self._decoder(out)
            list(pool.map(decode, jpegs)) if pool else [decode(item) for item in jpegs]
        return labels

    def _decoder(self, out: np.ndarray):
        def decode(item):
            j, r, i, data = item
            try:
                image = decode_jpeg(data)
            except Exception as e:  # noqa: BLE001 - Pillow raises many kinds; the message names the sample
                raise self._bad_sample(r, i, f"does not decode as JPEG ({type(e).__name__}: {e})") from e
            if image.shape != out.shape[1:]:
                raise self._bad_sample(r, i, f"decodes to {image.shape}, the manifest says {out.shape[1:]}")
            out[j] = image

        return decode

    def _bad_sample(self, reader: ShardReader, index: int, what: str, run: int = 1) -> ValueError:
        """The error for sample `index` (and the `run` - 1 after it) of a shard that fails mid-run: file, index, key, fix."""
        which = (
            f"sample {index} (key {reader.keys[index]!r})"
            if run == 1
            else f"samples {index}..{index + run - 1} (first key {reader.keys[index]!r})"
        )
        return ValueError(
            f"{reader.path}: {which} {what}; the shard is damaged: `data-prep verify {self.directory}` checks every shard, "
            "re-run data-prep into a new --out to replace it"
        )

    def _params(self, epoch: int, batch: int, n: int):
        """Crop offsets, flips and colour shifts for one batch: a function of (seed, epoch, rank, batch) only."""
        h, w, c = self.image_shape
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, self.rank, batch])
            return draw(rng, n, (h, w), self.crop, self.pad, self.flip, self.eigval, self.eigvec, self.pca_std)
        if self.ten_crop:
            offsets, flips = ten_crop_views((h, w), self.crop)
            return np.tile(offsets, (n, 1)), np.tile(flips, n), np.zeros((10 * n, c), np.float32)
        return center_offsets(n, (h, w), self.crop), np.zeros(n, bool), np.zeros((n, c), np.float32)

    @trace.traced("load batch", "data", "loader")  # the prefetch thread's own track
    def _make_batch(self, readers: dict, part: np.ndarray, epoch: int, batch: int, staging, pool):
        """Read, augment and deliver batch `batch`: (x, y) on the loader's device."""
        idx = self._batch_of(part, batch)
        images = staging.images(len(idx))
        labels = self._read(readers, idx, images, pool)
        params = self._params(epoch, batch, len(idx))
        pixels = staging.to_device(len(idx)) if self.device.type == "cuda" else None
        return self._augment(images, labels, params, pixels, staging.output)

    def _augment(self, images: np.ndarray, labels: np.ndarray, params, pixels, output):
        """(x, y) on the loader's device from uint8 images (on CUDA: `pixels`, their copy there); output(shape) gives x."""
        offsets, flips, shift = params
        if self.device.type == "cuda":
            pixels = pixels.repeat_interleave(10, dim=0) if self.ten_crop else pixels
            x = augment_torch(pixels, offsets, flips, self._device_mean(), shift, self.scale, self.crop)
            y = torch.from_numpy(labels).pin_memory().to(self.device, non_blocking=True)
            return x, y
        if self.ten_crop:
            images = np.repeat(images, 10, axis=0)
        out = output((len(images), self.image_shape[2], self.crop, self.crop))
        with _KERNEL_LOCK:
            # small batches run on one thread: a parallel region costs a scheduler tick (~8 ms) whenever a core is busy
            numba_threads(1 if out.size < SERIAL_BELOW else self.workers)
            augment(images, out, offsets, flips, self.mean, shift, self.scale)
        x, y = torch.from_numpy(out), torch.from_numpy(labels)
        return (x, y) if self.device.type == "cpu" else (x.to(self.device), y.to(self.device))

    def _device_mean(self) -> torch.Tensor:
        if getattr(self, "_mean_dev", None) is None:
            self._mean_dev = torch.from_numpy(self.mean).to(self.device)
        return self._mean_dev
