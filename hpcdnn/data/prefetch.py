"""The background side of ShardLoader: one thread per epoch iterator makes batches in order into a bounded queue,
owning its HDF5 files, decode pool and reusable buffers; the consumer re-raises its errors (hpcdnn/data/loader.py).

Every producer is stopped and joined before the interpreter finalizes, even one whose iterator was dropped mid-epoch
(a run that ends at --max_steps): a daemon thread still inside torch or HDF5 when Python tears down is killed with
pthread_exit, which aborts the process ("terminate called without an active exception") or deadlocks its exit.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcdnn.data.schema import ShardReader

if TYPE_CHECKING:
    from hpcdnn.data.loader import ShardLoader

END = object()  # the producer's last item
RUNNING: dict[threading.Thread, threading.Event] = {}  # live producers and their stop events (strong references)


def stop_producers(threads=None) -> None:
    """Stop and join the given producer threads (default: all); each ends within one queue timeout."""
    for thread in list(RUNNING) if threads is None else threads:
        stop = RUNNING.get(thread)
        if stop is not None:
            stop.set()
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join()
        RUNNING.pop(thread, None)


atexit.register(stop_producers)  # atexit runs before finalization abandons daemon threads


class Buffers:
    """The producer's buffers. uint8 input: one reused array on the CPU; on CUDA two pinned ones, each reused once its
    copy to the device is done. float32 output: recycled once no tensor refers to it any more (a fresh AlexNet-size
    array per batch costs about as much in page faults as the kernel); one still held is never touched.
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


class BatchIterator:
    """Consumer side of one epoch's prefetch thread; errors raised in the thread are re-raised here."""

    def __init__(self, loader: ShardLoader, epoch: int, start_batch: int):
        self.queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.stop = threading.Event()
        self.finished = False
        # the thread gets the queue and the event, not self: dropping the iterator (a `break`) stops it via __del__
        self.thread = threading.Thread(target=produce, args=(loader, epoch, start_batch, self.queue, self.stop), daemon=True,
                                       name=f"hpcdnn-loader-{loader.split}-e{epoch}")  # fmt: skip
        for done in [t for t in RUNNING if not t.is_alive()]:
            RUNNING.pop(done, None)
        RUNNING[self.thread] = self.stop
        self.thread.start()

    def __iter__(self) -> BatchIterator:
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
            if item is END:
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
        stop_producers([self.thread])

    def __del__(self) -> None:
        if getattr(self, "thread", None) is not None:
            self.stop.set()


def produce(loader: ShardLoader, epoch: int, start_batch: int, q: queue.Queue, stop: threading.Event) -> None:
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
        staging = Buffers(loader)
        for b in range(start_batch, loader.num_batches):
            if stop.is_set() or not put(loader._make_batch(readers, part, epoch, b, staging, pool)):
                return
        put(END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(e)
    finally:
        if pool:
            pool.shutdown(wait=True)
        for r in readers.values():
            r.close()
