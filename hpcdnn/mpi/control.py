"""The parameter server's words: one int64 array on every server, its layout, and what is read out of it.

Layout of a server's words (index: meaning; W = active workers, R = rows kept, R >= W after a resume with fewer):
  VERSION            updates applied to this shard; the published parameters are buffer VERSION % 2
  WRITING            the update being written (VERSION, or VERSION + 1 while the server writes the other buffer)
  STOP, WARM         a worker asked the run to stop / the warmstart is over (set on every server)
  FINISHED           workers that have finished
  SEQ + w            worker-written: pushes worker w has posted to this shard (its inbox slot holds the last one)
  DONE + w           server-written: pushes of worker w this shard has applied (a credit: SEQ - DONE is 0 or 1)
  CLOCK + w          worker-written: steps worker w had done at its last push (bounded-delay mode; FINISHED_CLOCK after)
  POST + ROW*w       worker-written: the header of the posted push (its row, below)
  ROWS + ROW*w       server-written: the row of worker w's last applied push (a copy of its header), w < R

A row is a worker's own cumulative accounting, carried by every push, so a shard's words say exactly which pushes
its parameters contain: LR (the push's -lr*scale as float64 bits), SENT, STEPS, EPOCH, BATCH (where the worker's
next step starts), APPLIED, REJ_NONFINITE, REJ_STALE, SCALED, STALE_SUM, STALE_MAX, WAIT_US (bounded-delay waits),
HIST .. HIST+HIST_BINS-1 (staleness of applied pushes: bin 0 = 0, bin k = [2^(k-1), 2^k), the last bin open-ended).
"""

from __future__ import annotations

import numpy as np

VERSION, WRITING, STOP, WARM, FINISHED = range(5)
HEAD = 8
LR, SENT, STEPS, EPOCH, BATCH, APPLIED, REJ_NONFINITE, REJ_STALE, SCALED, STALE_SUM, STALE_MAX, WAIT_US = range(12)
HIST, HIST_BINS = 12, 16
ROW = HIST + HIST_BINS
FINISHED_CLOCK = 1 << 62  # a finished worker never holds the others back


class Layout:
    """Word offsets for `workers` active workers and `rows` rows (rows >= workers)."""

    def __init__(self, workers: int, rows: int | None = None) -> None:
        self.workers, self.rows = workers, max(workers, rows or 0)
        self.seq, self.done, self.clock = HEAD, HEAD + workers, HEAD + 2 * workers
        self.post = HEAD + 3 * workers
        self.row0 = self.post + ROW * workers
        self.size = self.row0 + ROW * self.rows
        self.head = self.post  # flags, SEQ, DONE and CLOCK: what a worker reads in one go

    def row(self, w: int) -> slice:
        return slice(self.row0 + ROW * w, self.row0 + ROW * (w + 1))

    def posted(self, w: int) -> slice:
        return slice(self.post + ROW * w, self.post + ROW * (w + 1))

    def rows_of(self, words) -> np.ndarray:
        return np.asarray(words[self.row0 : self.size], np.int64).reshape(self.rows, ROW)


def staleness_bin(tau: int) -> int:
    return min(HIST_BINS - 1, int(tau).bit_length())


def lr_bits(nlr: float) -> int:
    return int(np.array([nlr], np.float64).view(np.int64)[0])


def lr_of(bits) -> float:
    return float(np.array([bits], np.int64).view(np.float64)[0])


def resume_rows(rows: np.ndarray) -> np.ndarray:
    """Every worker's row to resume from out of the shards' rows (shards x workers x ROW): per worker, the shard that
    had applied the fewest of its pushes (a periodic checkpoint may catch a push applied on some shards only: its
    worker redoes that step, so the other shards apply it twice; nothing is lost)."""
    rows = np.asarray(rows, np.int64)
    least = rows[:, :, SENT].argmin(axis=0)
    return rows[least, np.arange(rows.shape[1])]


def summary(rows: np.ndarray, workers: int) -> dict:
    """summary.json / metrics fields out of the rows (one shard's, or `resume_rows`)."""
    rows = np.asarray(rows, np.int64)
    applied = int(rows[:, APPLIED].sum())
    hist = [int(x) for x in rows[:, HIST : HIST + HIST_BINS].sum(axis=0)]
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    rej_nf, rej_stale = int(rows[:, REJ_NONFINITE].sum()), int(rows[:, REJ_STALE].sum())
    return {
        "workers": workers,
        "pushes_sent": int(rows[:, SENT].sum()),
        "pushes_applied": applied,
        "pushes_rejected": rej_nf + rej_stale,
        "rejected_nonfinite": rej_nf,
        "rejected_stale": rej_stale,
        "scaled_stale": int(rows[:, SCALED].sum()),
        "staleness_mean": round(float(rows[:, STALE_SUM].sum()) / max(applied, 1), 3),
        "staleness_max": int(rows[:, STALE_MAX].max(initial=0)),
        "staleness_hist": hist,  # bin 0: 0; bin k: [2^(k-1), 2^k)
        "delay_wait_s": round(float(rows[:, WAIT_US].sum()) / 1e6, 3),
        "worker_steps": [int(x) for x in rows[:workers, STEPS]],
        "worker_pushes": [
            {"sent": int(r[SENT]), "applied": int(r[APPLIED]), "rejected": int(r[REJ_NONFINITE] + r[REJ_STALE])} for r in rows
        ],  # fmt: skip
    }
