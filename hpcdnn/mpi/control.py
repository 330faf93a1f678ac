"""The parameter server's control words: one int64 array on the first server, its layout, and every read and write.

    ctl = Control(comm, head=roles.servers[0], n_workers=len(roles.workers))   # collective (Win.Allocate)
    ctl.add(APPLIED); ctl.counter(STOP); ctl.report(worker, sent, steps, epoch, batch)
    words = ctl.read_all(); row = worker_row(words, w); ctl.summary(words)    # checkpoints, resume, summary.json

Layout (index: meaning):
  APPLIED        pushes applied to the servers (the global version a fetch is "at least as new as")
  STOP           any worker asked the run to stop (a signal): every worker stops at its next step
  WARM           the warmstart is over: workers other than 0 may fetch and start
  DONE           workers that have finished (the servers end when it reaches the worker count)
  REJ_NONFINITE, REJ_STALE, SCALED     pushes rejected as non-finite / as too stale; pushes scaled by 1/staleness
  STALE_SUM, STALE_MAX                 staleness of applied pushes: sum and maximum
  HIST .. HIST+HIST_BINS-1             staleness histogram: bin 0 = 0, bin k = [2^(k-1), 2^k), the last bin open-ended
  WORKER_BASE + PER_WORKER*w + field   worker w's SENT (pushes sent), STEPS, EPOCH, BATCH (its position, for resume)
Every word is read and written with element-wise atomic RMA (fetch-and-op, accumulate REPLACE), so workers never
lock each other out; a checkpoint keeps the whole array and a resume puts it back (`for_resume`).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcdnn.mpi.window import Window

APPLIED, STOP, WARM, DONE, REJ_NONFINITE, REJ_STALE, SCALED, STALE_SUM, STALE_MAX = range(9)
HIST, HIST_BINS = 16, 16
WORKER_BASE, PER_WORKER = HIST + HIST_BINS, 4
SENT, STEPS, EPOCH, BATCH = range(PER_WORKER)


def n_words(n_workers: int) -> int:
    return WORKER_BASE + PER_WORKER * n_workers


def worker_row(words, worker: int):
    """Worker `worker`'s (pushes sent, steps, epoch, batch) out of the control words (a checkpoint's or `read_all()`)."""
    start = WORKER_BASE + PER_WORKER * worker
    return words[start : start + PER_WORKER]


def staleness_bin(tau: int) -> int:
    return min(HIST_BINS - 1, int(tau).bit_length())


def for_resume(words, n_workers: int) -> np.ndarray:
    """A checkpoint's control words made ready to restart with: same worker count, not done, not stopped, warm."""
    words = np.array(words, np.int64)
    if words.size != n_words(n_workers):
        raise ValueError(
            f"the checkpoint was written by a Downpour run with another number of workers "
            f"({(words.size - WORKER_BASE) // PER_WORKER}, now {n_workers}); resume with the same mpirun -n and --servers"
        )
    words[[DONE, STOP]] = 0
    words[WARM] = 1
    return words


def summary(words, n_workers: int) -> dict:
    """summary.json / metrics fields out of the control words."""
    rows = np.asarray(words[WORKER_BASE : n_words(n_workers)]).reshape(n_workers, PER_WORKER)
    applied = int(words[APPLIED])
    hist = [int(x) for x in words[HIST : HIST + HIST_BINS]]
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    return {
        "workers": n_workers,
        "pushes_sent": int(rows[:, SENT].sum()),
        "pushes_applied": applied,
        "pushes_rejected": int(words[REJ_NONFINITE] + words[REJ_STALE]),
        "rejected_nonfinite": int(words[REJ_NONFINITE]),
        "rejected_stale": int(words[REJ_STALE]),
        "scaled_stale": int(words[SCALED]),
        "staleness_mean": round(float(words[STALE_SUM]) / max(applied, 1), 3),
        "staleness_max": int(words[STALE_MAX]),
        "staleness_hist": hist,  # bin 0: 0; bin k: [2^(k-1), 2^k)
        "worker_steps": [int(x) for x in rows[:, STEPS]],
    }


class Control:
    """The control words in a window on rank `head` of `comm` (collective constructor and `free`)."""

    def __init__(self, comm, head: int, n_workers: int) -> None:
        self.head, self.n_workers = head, n_workers
        self.win = Window(n_words(n_workers) if comm.Get_rank() == head else 0, np.int64, comm=comm)

    def counter(self, index: int) -> int:
        return int(self.win.fetch_and_op(0, self.head, index, op=MPI.NO_OP))

    def add(self, index: int, value: int = 1) -> None:
        self.win.fetch_and_op(value, self.head, index, op=MPI.SUM)

    def set(self, index: int, value: int) -> None:
        self.win.fetch_and_op(value, self.head, index, op=MPI.REPLACE)

    def read(self, first: int, count: int) -> np.ndarray:
        """Words first .. first+count-1, atomically element by element."""
        return self.win.read(self.head, first, count)

    def read_all(self) -> np.ndarray:
        return self.read(0, n_words(self.n_workers))

    def record_push(self, worker: int, row: tuple[int, int, int, int], tau: int = 0, scaled: bool = False,
                    rejected: int | None = None) -> None:  # fmt: skip
        """Count a push — applied, after its updates completed, with its staleness; or `rejected` (REJ_NONFINITE or
        REJ_STALE) — together with the worker's row (sent, steps, epoch, batch), in one lock epoch: `snapshot` sees
        the count and the row that goes with it, or neither, so a resumed run neither recounts nor loses a push."""
        start = WORKER_BASE + PER_WORKER * worker
        items = [(start + i, int(v), MPI.REPLACE) for i, v in enumerate(row)]
        if rejected is not None:
            items.append((rejected, 1, MPI.SUM))
        else:
            items += [(STALE_SUM, tau, MPI.SUM), (STALE_MAX, tau, MPI.MAX), (HIST + staleness_bin(tau), 1, MPI.SUM)]
            items += [(SCALED, 1, MPI.SUM)] if scaled else []
            items.append((APPLIED, 1, MPI.SUM))
        self.win.update_many(self.head, items)

    def snapshot(self) -> np.ndarray:
        """Every word, under an exclusive lock: no push's count without its row (a checkpoint's counters)."""
        return self.win.read_exclusive(self.head, 0, n_words(self.n_workers))

    def report(self, worker: int, sent: int, steps: int, epoch: int, batch: int) -> None:
        """Publish a worker's counts and position, atomically per word."""
        start = WORKER_BASE + PER_WORKER * worker
        self.win.accumulate(np.array([sent, steps, epoch, batch], np.int64), self.head, start, op=MPI.REPLACE)

    def restore(self, words: np.ndarray) -> None:
        """Overwrite every word (resume; workers must not be running)."""
        self.win.put(np.ascontiguousarray(words, dtype=np.int64), self.head, 0)

    def summary(self) -> dict:
        return summary(self.read_all(), self.n_workers)

    def free(self) -> None:
        self.win.free()
