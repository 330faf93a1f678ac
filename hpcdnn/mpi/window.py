"""One small class per RMA window: a typed array exposed by every rank of `comm` (possibly empty), passive target only.

    with Window(n_local, np.float32, comm=comm) as w:   # collective: every rank allocates its own part
        w.get_atomic(out, target=0, offset=128)         # MPI_Get_accumulate(NO_OP) under a shared lock
        w.accumulate(delta, target=0, offset=128)       # element-wise atomic MPI_SUM
        old = w.fetch_and_op(1, target=0, index=3)      # counters
    # freed (collective) on leaving the block, or by w.free(); any use afterwards raises

Memory comes from `MPI.Win.Allocate` (on one node it is shared memory, much faster than `Win.Create`). Offsets are
in elements; large transfers are cut into pieces below MPI's 2^31-element count limit. Two ways to hold the lock:

- `Window`: every operation is one short epoch, shared lock -> operation -> unlock, so the data has reached the
  target (or the origin buffer) when the call returns, no rank ever holds a lock across compute, and nobody takes an
  exclusive lock. Threads of one process take turns (a mutex per window): MPI forbids two concurrent lock epochs of
  one process on one window, and MPICH asserts on it (Downpour's --overlap thread and the main thread share windows). It has the bulk transfers (put, get, accumulate, ...) and the single-element operations.
- `SharedWindow`: one shared `Lock_all` epoch from creation to `free`; an operation is op + Flush. Only the
  single-element operations exist on it: a method taking its own Lock inside Lock_all would be erroneous MPI.

Both share `BaseWindow` (allocation, bounds checks, the single-element operations, `free`, `with`).
"""

from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from hpcdnn import watchdog

CHUNK = 1 << 28  # elements per MPI call (counts are C ints)


class BaseWindow:
    """`local` is this rank's part (a numpy view of the window memory); other ranks' parts are reached by RMA.

    Subclasses say how one operation's access epoch starts and completes (`_start`, `_complete`).
    """

    def __init__(self, count: int, dtype, *, comm) -> None:
        self.dtype = np.dtype(dtype)
        self.comm = comm
        self.mpi_type = MPI._typedict[self.dtype.char]
        self._win = MPI.Win.Allocate(int(count) * self.dtype.itemsize, self.dtype.itemsize, comm=comm)
        self.local = np.frombuffer(self._win.tomemory(), dtype=self.dtype, count=int(count)) if count else np.empty(0, self.dtype)
        self.local[:] = 0
        self._mutex = threading.Lock()  # Window: serialises this process's epochs (a comm thread and the main thread)
        self._ranks = [watchdog.world_rank(comm, r) for r in range(comm.Get_size())]  # targets as a stall report names them
        self._waiting = False  # Window: this epoch recorded a wait (watchdog.begin), cleared by _complete
        self.counts = comm.allgather(int(count))  # each rank's part, to check offsets before MPI sees them
        comm.Barrier()  # everyone's part is zeroed before anyone reads it

    # -- bookkeeping
    @property
    def win(self) -> MPI.Win:
        if self._win is None:
            raise RuntimeError(f"this RMA window was freed; create a new {type(self).__name__}")
        return self._win

    def _check(self, target: int, offset: int, n: int) -> None:
        if not 0 <= target < len(self.counts):
            raise ValueError(f"target rank {target} is outside the window's communicator of {len(self.counts)} ranks")
        if offset < 0 or offset + n > self.counts[target]:
            raise ValueError(f"elements [{offset}, {offset + n}) are outside rank {target}'s part of {self.counts[target]} elements")

    def _pieces(self, n: int):
        for start in range(0, n, CHUNK):
            yield start, min(n, start + CHUNK)

    def _buf(self, array: np.ndarray, lo: int, hi: int):
        return [array[lo:hi], hi - lo, self.mpi_type]

    def _start(self, target: int) -> None:
        """Open access to `target` for one operation."""
        raise NotImplementedError(f"{type(self).__name__} must say how an access epoch starts: subclass Window or SharedWindow")

    def _complete(self, target: int) -> None:
        """Finish the operation on `target`: its data has arrived when this returns."""
        raise NotImplementedError(f"{type(self).__name__} must say how an access epoch completes: subclass Window or SharedWindow")

    # -- single elements (counters and flags)
    def fetch_and_op(self, value, target: int, index: int, op=MPI.SUM):
        """Atomically return target[index] and apply `op` with `value` (MPI.NO_OP reads, MPI.REPLACE writes)."""
        self._check(target, index, 1)
        w = self.win
        origin, result = np.array([value], self.dtype), np.empty(1, self.dtype)
        self._start(target)
        w.Fetch_and_op(origin, result, target, index, op=op)
        self._complete(target)
        return result[0].item()

    def compare_and_swap(self, expected, value, target: int, index: int):
        """Atomically set target[index] = value if it equals `expected`; returns the old value (== expected on success)."""
        self._check(target, index, 1)
        w = self.win
        origin, compare, result = np.array([value], self.dtype), np.array([expected], self.dtype), np.empty(1, self.dtype)
        self._start(target)
        w.Compare_and_swap(origin, compare, result, target, index)
        self._complete(target)
        return result[0].item()

    def read(self, target: int, index: int = 0, count: int = 1) -> np.ndarray:
        """A few elements read atomically (Get_accumulate NO_OP): counters another rank may be updating."""
        self._check(target, index, count)
        w = self.win
        out = np.empty(count, self.dtype)
        self._start(target)
        for lo, hi in self._pieces(count):
            w.Get_accumulate(self._buf(out, lo, hi), self._buf(out, lo, hi), target, [index + lo, hi - lo, self.mpi_type], op=MPI.NO_OP)
        self._complete(target)
        return out

    # -- lifetime
    def free(self) -> None:
        """Collective over `comm`. The `local` view dies with the memory."""
        if self._win is not None:
            self.local = None
            self._win.Free()
            self._win = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Free on a normal exit. Not on an exception: Free is collective, and a rank raising alone would wait in it
        forever for the others instead of reaching `python -m mpi4py`'s abort."""
        if exc_type is None:
            self.free()


class Window(BaseWindow):
    """A window whose every operation is its own shared-lock epoch (lock -> operation -> unlock)."""

    def _start(self, target: int) -> None:
        self._mutex.acquire()  # one epoch per window at a time in this process: a second thread's Lock would be erroneous MPI
        self._waiting = watchdog.begin("an RMA epoch (Lock, operation, Unlock) on a window", self._ranks[target])
        try:
            self.win.Lock(target, MPI.LOCK_SHARED)
        except BaseException:
            self._complete_wait()
            self._mutex.release()
            raise

    def _complete(self, target: int) -> None:
        try:
            self.win.Unlock(target)
        finally:
            self._complete_wait()
            self._mutex.release()

    def _complete_wait(self) -> None:
        if self._waiting:
            self._waiting = False
            watchdog.end()

    # -- bulk transfers (one lock epoch each)
    def put(self, array: np.ndarray, target: int, offset: int = 0) -> None:
        """Overwrite target's elements [offset, offset+len) (not atomic against concurrent accumulates)."""
        self._check(target, offset, array.size)
        w = self.win
        self._start(target)
        for lo, hi in self._pieces(array.size):
            w.Put(self._buf(array, lo, hi), target, [offset + lo, hi - lo, self.mpi_type])
        self._complete(target)

    def get(self, out: np.ndarray, target: int, offset: int = 0) -> None:
        """Plain MPI_Get into `out`: fastest; per-element atomicity against accumulates is not guaranteed by MPI."""
        self._check(target, offset, out.size)
        w = self.win
        self._start(target)
        for lo, hi in self._pieces(out.size):
            w.Get(self._buf(out, lo, hi), target, [offset + lo, hi - lo, self.mpi_type])
        self._complete(target)

    def get_atomic(self, out: np.ndarray, target: int, offset: int = 0) -> None:
        """MPI_Get_accumulate with NO_OP (the origin is ignored): each element is read atomically against concurrent accumulates."""
        self._check(target, offset, out.size)
        w = self.win
        self._start(target)
        for lo, hi in self._pieces(out.size):
            w.Get_accumulate(self._buf(out, lo, hi), self._buf(out, lo, hi), target, [offset + lo, hi - lo, self.mpi_type], op=MPI.NO_OP)
        self._complete(target)

    def accumulate(self, array: np.ndarray, target: int, offset: int = 0, op=MPI.SUM) -> None:
        """Element-wise atomic target[offset+i] = op(target[offset+i], array[i]); concurrent accumulates never lose one."""
        self._check(target, offset, array.size)
        w = self.win
        self._start(target)
        for lo, hi in self._pieces(array.size):
            w.Accumulate(self._buf(array, lo, hi), target, [offset + lo, hi - lo, self.mpi_type], op=op)
        self._complete(target)

    def get_accumulate(self, array: np.ndarray, out: np.ndarray, target: int, offset: int = 0, op=MPI.SUM) -> None:
        """Atomically out[i] = target[offset+i]; target[offset+i] = op(target[offset+i], array[i])."""
        self._check(target, offset, array.size)
        w = self.win
        self._start(target)
        for lo, hi in self._pieces(array.size):
            w.Get_accumulate(self._buf(array, lo, hi), self._buf(out, lo, hi), target, [offset + lo, hi - lo, self.mpi_type], op=op)
        self._complete(target)

    def update_many(self, target: int, items: list[tuple[int, object, object]]) -> None:
        """Several single-element accumulates [(index, value, op), ...] in one lock epoch (counters updated together)."""
        for index, _, _ in items:
            self._check(target, index, 1)
        w = self.win
        origins = [np.array([value], self.dtype) for _, value, _ in items]
        self._start(target)
        for (index, _, op), origin in zip(items, origins):
            w.Accumulate([origin, 1, self.mpi_type], target, [index, 1, self.mpi_type], op=op)
        self._complete(target)

    def put_then_update(self, array: np.ndarray, target: int, offset: int, items: list[tuple[int, object, object]]) -> None:
        """Put `array` at `offset`, then, once it has arrived (Flush), the single-element accumulates `items`, in one
        lock epoch: a rank that sees the updated words sees the array (a message and its doorbell)."""
        self._check(target, offset, array.size)
        for index, _, _ in items:
            self._check(target, index, 1)
        w = self.win
        origins = [np.array([value], self.dtype) for _, value, _ in items]
        self._start(target)
        for lo, hi in self._pieces(array.size):
            w.Put(self._buf(array, lo, hi), target, [offset + lo, hi - lo, self.mpi_type])
        w.Flush(target)
        for (index, _, op), origin in zip(items, origins):
            w.Accumulate([origin, 1, self.mpi_type], target, [index, 1, self.mpi_type], op=op)
        self._complete(target)

    def sync(self) -> None:
        """A memory barrier on this rank's own part (MPI_Win_sync in a lock epoch on itself): writes that other ranks
        completed are visible to this rank's loads, and this rank's stores to their Gets."""
        me = self.comm.Get_rank()
        self._start(me)
        self.win.Sync()
        self._complete(me)


class SharedWindow(BaseWindow):
    """A window held in one shared `Lock_all` epoch from creation to `free`: single-element ops are op + Flush.

    Why: with a per-operation Lock, MPICH grants the lock only when the target next enters MPI, so a target busy in
    compute delays every claim; inside Lock_all a Fetch_and_op completes at once on MPICH and Open MPI. The lock is
    shared: no rank is ever excluded, as with `Window`. Bulk transfers and anything that takes its own Lock do not
    exist here (a Lock inside Lock_all is erroneous MPI).
    """

    def __init__(self, count: int, dtype, *, comm) -> None:
        super().__init__(count, dtype, comm=comm)
        self.win.Lock_all()

    def _start(self, target: int) -> None:
        """Nothing to open: the Lock_all epoch is always open."""

    def _complete(self, target: int) -> None:
        waiting = watchdog.begin("an RMA Flush on a window", self._ranks[target])
        try:
            self.win.Flush(target)
        finally:
            if waiting:
                watchdog.end()

    def free(self) -> None:
        """Collective over `comm`: end the Lock_all epoch, then free."""
        if self._win is not None:
            self._win.Unlock_all()
        super().free()
