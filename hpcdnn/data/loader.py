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
after a restart yields bitwise the batches an uninterrupted run would have seen.

Reading: HDF5 files are opened lazily by the thread that reads them and closed when it ends (never shared across
threads or a fork). A raw shard is read one image per `ds[i]` call, or one slice per run of neighbouring samples;
never with a list index (h5py reads ~60 img/s that way). JPEG shards decode on `workers` threads (Pillow frees the GIL).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import torch

from hpcdnn.data.schema import ShardReader, decode_jpeg, load_manifest
from hpcdnn.kernels.augment import augment, augment_torch, center_offsets, draw, ten_crop_views

_KERNEL_LOCK = threading.Lock()  # Numba's workqueue threading layer must not run two parallel kernels at once
_END = object()
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
        self.workers = workers or len(os.sched_getaffinity(0))
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
        self.mean = np.ascontiguousarray(np.load(self.directory / self._manifest["mean"]), dtype=np.float32)
        if self.mean.shape != (h, w, c):
            raise ValueError(f"{self._manifest['mean']}: shape {self.mean.shape}, expected the image shape {(h, w, c)}")
        if scale is None:
            if "channel_std" not in self._manifest:
                raise ValueError(f"{self.directory / 'manifest.json'} has no channel_std for the default scale: pass scale=")
            std = np.asarray(self._manifest["channel_std"], dtype=np.float64)
            scale = 1.0 / np.where(std > 0, std, 1.0)
        self.scale = np.ascontiguousarray(np.broadcast_to(np.asarray(scale, dtype=np.float32), (c,)))
        pca = self._manifest.get("pca") or {"eigval": [0.0] * c, "eigvec": np.eye(c).tolist()}
        self.eigval, self.eigvec = np.asarray(pca["eigval"], np.float64), np.asarray(pca["eigvec"], np.float64)
        self.per_rank = self.total // world
        self.num_batches = self.per_rank // batch_size if self.drop_last else -(-self.per_rank // batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{split}: {self.total} samples over {world} ranks give no full batch of {batch_size}; lower batch_size")
        self.epoch = 0
        self._iterators: weakref.WeakSet = weakref.WeakSet()

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

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> _BatchIterator:
        """Batches start_batch .. len(self)-1 of `epoch`, prefetched by a background thread."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches}]")
        it = _BatchIterator(self, epoch, start_batch)
        self._iterators.add(it)
        return it

    def close(self) -> None:
        """Stop every running prefetch thread (they close their files)."""
        for it in list(self._iterators):
            it.close()

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
            if self.encoding != "raw":
                jpegs.extend((j, r.images[i]) for j, i in zip(range(k, end), range(a, b)))
            elif (end - k) * out[0].nbytes >= 1 << 21:  # >= 2 MiB: read_direct skips a temporary (1.4x at 32 x 256x256x3)
                r.images.read_direct(out, np.s_[a:b], np.s_[k:end])
            elif end - k > 1:  # shorter runs: one slice beats per-image reads 1.5-5x on small images (read_direct costs ~90 us)
                out[k:end] = r.images[a:b]
            else:
                out[k] = r.images[a]
        if jpegs:
            decode = self._decoder(out)
            list(pool.map(decode, jpegs)) if pool else [decode(item) for item in jpegs]
        return labels

    def _decoder(self, out: np.ndarray):
        def decode(item):
            j, data = item
            image = decode_jpeg(data)
            if image.shape != out.shape[1:]:
                raise ValueError(f"{self.split} sample {j} of a batch decodes to {image.shape}, manifest says {out.shape[1:]}")
            out[j] = image

        return decode

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

    def _make_batch(self, readers: dict, part: np.ndarray, epoch: int, batch: int, staging, pool):
        """Read, augment and deliver batch `batch`: (x, y) on the loader's device."""
        idx = self._batch_of(part, batch)
        images = staging.images(len(idx))
        labels = self._read(readers, idx, images, pool)
        offsets, flips, shift = self._params(epoch, batch, len(idx))
        if self.device.type == "cuda":
            pixels = staging.to_device(len(idx))
            pixels = pixels.repeat_interleave(10, dim=0) if self.ten_crop else pixels
            x = augment_torch(pixels, offsets, flips, self._device_mean(), shift, self.scale, self.crop)
            y = torch.from_numpy(labels).pin_memory().to(self.device, non_blocking=True)
            return x, y
        if self.ten_crop:
            images = np.repeat(images, 10, axis=0)
        out = staging.output((len(images), self.image_shape[2], self.crop, self.crop))
        with _KERNEL_LOCK:
            # small batches run on one thread: a parallel region costs a scheduler tick (~8 ms) whenever a core is busy
            numba.set_num_threads(1 if out.size < SERIAL_BELOW else min(self.workers, numba.config.NUMBA_NUM_THREADS))
            augment(images, out, offsets, flips, self.mean, shift, self.scale)
        x, y = torch.from_numpy(out), torch.from_numpy(labels)
        return (x, y) if self.device.type == "cpu" else (x.to(self.device), y.to(self.device))

    def _device_mean(self) -> torch.Tensor:
        if getattr(self, "_mean_dev", None) is None:
            self._mean_dev = torch.from_numpy(self.mean).to(self.device)
        return self._mean_dev


class _Buffers:
    """The producer's buffers. uint8 input: one reused array on the CPU; on CUDA two pinned ones, each reused once its
    copy to the device is done. float32 output: recycled once no tensor refers to it any more (a fresh 77 MB array per
    AlexNet batch costs ~10 ms of page faults, as much as the kernel); one still held is never touched.
    """

    def __init__(self, loader: ShardLoader):
        self.shape, self.cuda = (loader.batch_size, *loader.image_shape), loader.device.type == "cuda"
        self.device, self.turn, self.keep = loader.device, 0, loader.prefetch + 3
        self.outputs: list[np.ndarray] = []
        if self.cuda:
            self.pinned = [torch.empty(self.shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.done = [None, None]
        else:
            self.cpu = np.empty(self.shape, np.uint8)

    def images(self, n: int) -> np.ndarray:
        if not self.cuda:
            return self.cpu[:n]
        self.turn ^= 1
        if self.done[self.turn] is not None:
            self.done[self.turn].synchronize()  # the previous copy out of this buffer has finished
        return self.pinned[self.turn][:n].numpy()

    def to_device(self, n: int) -> torch.Tensor:
        """Start copying the first n images of the current pinned buffer to the device (same stream as the consumer)."""
        x = self.pinned[self.turn][:n].to(self.device, non_blocking=True)
        self.done[self.turn] = torch.cuda.Event()
        self.done[self.turn].record()
        return x

    def output(self, shape: tuple[int, ...]) -> np.ndarray:
        for k in range(len(self.outputs)):
            if self.outputs[k].shape == shape and sys.getrefcount(self.outputs[k]) == self.alone:
                return self.outputs[k]
        if len(self.outputs) >= self.keep:
            return np.empty(shape, np.float32)
        self.outputs.append(np.empty(shape, np.float32))
        self.alone = sys.getrefcount(self.outputs[-1])  # only this list holds it: the count that means "free"
        return self.outputs[-1]


class _BatchIterator:
    """Consumer side of one epoch's prefetch thread; errors raised in the thread are re-raised here."""

    def __init__(self, loader: ShardLoader, epoch: int, start_batch: int):
        self.queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.stop = threading.Event()
        self.finished = False
        # the thread gets the queue and the event, not self: dropping the iterator (a `break`) stops it via __del__
        self.thread = threading.Thread(target=_produce, args=(loader, epoch, start_batch, self.queue, self.stop), daemon=True,
                                       name=f"hpcdnn-loader-{loader.split}-e{epoch}")  # fmt: skip
        self.thread.start()

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self):
        while not self.finished:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    self.close()
                    raise RuntimeError("hpcdnn loader: the prefetch thread ended without a result") from None
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):  # raised in the thread (batches are tuples)
                self.close()
                raise item
            return item
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (it closes its HDF5 files) and wait for it."""
        self.finished = True
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)  # unblock a put
            except queue.Empty:
                pass
        self.thread.join()

    def __del__(self) -> None:
        if getattr(self, "thread", None) is not None:
            self.stop.set()


def _produce(loader: ShardLoader, epoch: int, start_batch: int, q: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: make batches in order into `q` until done or stopped; owns its HDF5 files and decode pool."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    readers: dict[int, ShardReader] = {}
    pool = ThreadPoolExecutor(loader.workers) if loader.encoding != "raw" and loader.workers > 1 else None
    try:
        part = loader.rank_indices(epoch)
        staging = _Buffers(loader)
        for b in range(start_batch, loader.num_batches):
            if stop.is_set() or not put(loader._make_batch(readers, part, epoch, b, staging, pool)):
                return
        put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(e)
    finally:
        if pool:
            pool.shutdown(wait=True)
        for r in readers.values():
            r.close()
