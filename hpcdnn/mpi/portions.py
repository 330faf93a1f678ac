"""Sandblaster's work distribution: a batch cut into portions that ranks claim from a counter, backup tasks for
stragglers, and the distributed objective that sums the results (a Reduce_scatter of the gradient, so each rank gets
only the shard its L-BFGS history holds, and a small Allreduce of the loss and counts).

    portions = Portions(48, comm=comm)                          # windows on the coordinator (rank 0)
    objective = Objective(portion_fn, portions, x, comm=comm)   # portion_fn(k, keep_going) -> (loss_sum, grad_sum, count)
    f, g = objective()                                          # collective: mean loss; this rank's shard of the gradient

Protocol of one evaluation e (e = 1, 2, ... in this process):
  claim     k = Fetch_and_op(+1) on the coordinator's counter, minus the counter's value when e began; k < P: compute
            portion k. Every rank claims until its first k >= P, so each evaluation adds exactly P + size to the
            counter and every rank knows the next base without a reset.
  backup    a rank without claims reads the P flags; portions whose flag is not e are unfinished. After waiting
            `backup_after` of its mean portion time it re-runs one of them (a DistBelief/MapReduce backup task;
            backup_after = inf turns backups off).
  commit    after computing portion k a rank Compare_and_swaps flag[k] from e-1 to e; only the winner adds the result
            to its sums, so no portion counts twice and none is lost. Flags carry evaluation numbers: nothing is reset.
  abandon   between chunks a rank reads flag[k]; if another copy already won it stops (a straggler does not hold up the
            allreduce), counted with the losers of the CAS as discarded.
  done      when every flag is e, the gradient sums go into one Reduce_scatter (rank r receives columns
            shard_ranges(n, size)[r], the ones ShardedLBFGS keeps) and the loss, samples, claims and stop votes into
            one small Allreduce (every rank must see the same loss bits: the line search decides on it).

Model-parallel replicas (--mp=K, `follow=` the replica's communicator): a replica claims as one. Its rank 0 (the
leader) alone touches the windows; it tells its partners over `follow` which portion to compute, after every chunk
whether to go on (the abandon check), and whether the result won its commit, so the K ranks run the same chunks in
lock step (each chunk's forward pass is collective over the replica). Each rank sums its partition's gradient; the
sum over replicas runs among the ranks holding the same partition (`shard_comm=`), while the loss and the counts,
from the leaders only, go into the Allreduce over every rank.

Summation is float64: each rank adds the float32 portion gradients it won in float64, the Reduce_scatter sums in
float64, the mean is rounded to float32 once. Which rank won which portion changes the float64 rounding (~1e-16 relative)
but, except for values within that distance of a float32 rounding boundary, not the float32 gradient; so a run is
reproducible for a given seed and rank count up to those rare last-bit ties (tests compare with a tolerance).
The windows live in one shared Lock_all epoch (`SharedWindow`): with per-operation locks MPICH grants the lock
only when the target makes MPI progress, so a claim waited for the coordinator's whole forward pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np
from mpi4py import MPI

from hpcdnn import trace, watchdog
from hpcdnn.models.flat import shard_ranges
from hpcdnn.mpi.window import SharedWindow

POLL_S = 0.0005  # an idle rank re-reads the flags this often (sleeping in between: cores may be shared)


@dataclass
class PortionStats:
    """This rank's counts (sum them over ranks for the run's totals)."""

    won: int = 0  # portions whose result this rank contributed
    backup: int = 0  # backup runs started (re-runs of a portion claimed by another rank)
    backup_won: int = 0  # backup runs whose result counted
    discarded: int = 0  # computations thrown away: CAS lost, or abandoned because another copy won
    abandoned: int = 0  # of those, stopped between chunks

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=np.int64)


class Portions:
    """Which portions of each evaluation this rank computes: dynamic claims with backups, or a static equal split.

    `comm` has one rank per claimer; with `follow` (a model-parallel replica's communicator) only follow's rank 0
    claims, and `comm` is, on every rank, the communicator of the ranks holding its partition (one per replica):
    partition 0's is the claimers', the others' create no windows.
    """

    def __init__(self, count: int, *, comm, coordinator: int = 0, dynamic: bool = True, backup_after: float = 0.5,
                 slow_rank: int = -1, slow_factor: float = 1.0, follow=None) -> None:  # fmt: skip
        size = comm.Get_size()
        if count < 1:
            raise ValueError(f"{count} portions: need at least 1 (4 per rank or more lets fast ranks take more)")
        if not 0 <= coordinator < size:
            raise ValueError(f"coordinator rank {coordinator} outside the communicator of {size} ranks")
        if not -1 <= slow_rank < size:
            raise ValueError(f"--slow_rank={slow_rank} but there are {size} ranks: use 0..{size - 1}, or -1 for none")
        self.comm, self.count, self.coordinator, self.dynamic = comm, count, coordinator, dynamic
        self.coordinator_rank = watchdog.world_rank(comm, coordinator)  # named by a stall report
        self.rank, self.size = comm.Get_rank(), size
        self.follow = follow  # the replica's ranks (--mp): its rank 0 decides, the others follow
        self.leads = follow is None or follow.Get_rank() == 0  # claims, and counts its results (the partners do not)
        self.backup_after, self.slow = backup_after, (slow_factor - 1.0 if self.leads and comm.Get_rank() == slow_rank else 0.0)
        here, windows = comm.Get_rank() == coordinator, dynamic and self.leads  # all or none of comm's ranks lead
        if here and windows:
            trace.set_role("coordinator")  # the timeline names the rank that holds the counter and the flags
        self.claims = SharedWindow(1 if here else 0, np.int64, comm=comm) if windows else None
        self.flags = SharedWindow(count if here else 0, np.int64, comm=comm) if windows else None
        self.evaluation = 0  # evaluations run; flag[k] == e once portion k of evaluation e is done
        self.base = 0  # the claim counter's value when the current evaluation began
        self.stats = PortionStats()
        self.portion_time = 0.0  # seconds per portion on this rank, a moving average (for the backup wait)

    def run(self, compute, commit) -> int:
        """Compute portions until all of this evaluation's are done; `commit(k)` for each result that counts.

        compute(k, keep_going) computes portion k, calling keep_going() after each chunk and stopping (returning False)
        when it says so. Returns how many claims this rank made (the objective checks the total). Collective in
        effect: consecutive calls must be separated by a collective over `comm` (the objective's Allreduce is one),
        or a fast rank's claims for the next evaluation would mix with a slow rank's for this one.
        """
        self.evaluation += 1
        if not self.dynamic:
            for k in range(self.rank, self.count, self.size):  # round robin: equal shares, no windows
                self._compute(k, compute, lambda k: True, "portion")
                commit(k)
                self.stats.won += self.leads
            return 0
        if not self.leads:
            return self._follow(compute, commit)
        e, claims, idle_since, idle_t = self.evaluation, 0, None, 0
        while True:
            backup = idle_since is not None
            if not backup:
                with watchdog.Waiting("a portion claim (Fetch_and_op on the coordinator)", self.coordinator_rank):
                    k = self.claims.fetch_and_op(1, self.coordinator, 0) - self.base
                claims += 1
                if k >= self.count:
                    idle_since, idle_t = time.perf_counter(), trace.now()
                    continue
                trace.instant("claim", "sandblaster", "comm", k=int(k), evaluation=e)
            else:
                pending = np.flatnonzero(self.flags.read(self.coordinator, 0, self.count) != e)
                if not pending.size:
                    break
                if self.backup_after == math.inf or time.perf_counter() - idle_since < self.backup_after * self.portion_time:
                    with watchdog.Waiting(f"the last portions of evaluation {e}, computed elsewhere"):
                        time.sleep(POLL_S)
                    continue
                k = int(pending[self.rank % pending.size])
                self.stats.backup += 1
                trace.complete("idle", idle_t, "sandblaster", pending=int(pending.size))
            name = "backup portion" if backup else "portion"
            self._tell((int(k), backup))
            finished = self._compute(k, compute, lambda k: self._tell(bool(self.flags.read(self.coordinator, k)[0] != e)), name)
            won = bool(finished) and self.flags.compare_and_swap(e - 1, e, self.coordinator, k) == e - 1
            self._tell(won)
            if not finished:
                self.stats.discarded += 1
                self.stats.abandoned += 1
                trace.instant("discarded", "sandblaster", k=int(k), reason="abandoned: another copy won")
            elif won:
                commit(k)
                self.stats.won += 1
                self.stats.backup_won += backup
                trace.instant("won", "sandblaster", k=int(k), backup=backup)
            else:
                self.stats.discarded += 1
                trace.instant("discarded", "sandblaster", k=int(k), reason="lost the commit")
            if backup:
                idle_since, idle_t = time.perf_counter(), trace.now()
        trace.complete("idle", idle_t, "sandblaster", pending=0)  # waiting for the last portions elsewhere
        self._tell((-1, False))
        self.base += self.count + self.size
        return claims

    def _tell(self, word):
        """The leader's decision for its partners (--mp; a broadcast over the replica), or nothing to tell."""
        return word if self.follow is None else self.follow.bcast(word, root=0)

    def _follow(self, compute, commit) -> int:
        """A partner in a replica: compute what the leader decided, chunk by chunk, and commit what it won."""
        while True:
            k, backup = self._tell(None)
            if k < 0:
                return 0
            self._compute(k, compute, lambda k: self._tell(None), "backup portion" if backup else "portion")
            if self._tell(None):
                commit(k)

    def _compute(self, k: int, compute, still_needed, name: str) -> bool:
        """Run compute(k) with the straggler's sleep and the abandon check between chunks; time it (a span `name`)."""
        t0 = last = time.perf_counter()
        t_trace = trace.now()

        def keep_going() -> bool:
            nonlocal last
            if self.slow:
                time.sleep(self.slow * (time.perf_counter() - last))
                last = time.perf_counter()
            return still_needed(k)

        finished = compute(k, keep_going)
        trace.complete(name, t_trace, "sandblaster", k=int(k), evaluation=self.evaluation, finished=bool(finished))
        if finished:  # a moving average: it follows a rank whose speed changes (a shared node)
            took = time.perf_counter() - t0
            self.portion_time = took if not self.portion_time else 0.8 * self.portion_time + 0.2 * took
        return finished

    def expected_claims(self) -> int:
        """Claims all ranks together make per evaluation: every portion once, plus one failed claim per rank."""
        return self.count + self.size if self.dynamic else 0

    def free(self) -> None:
        """Collective: release the windows."""
        for w in (self.claims, self.flags):
            if w is not None:
                w.free()


class Objective:
    """f(x) = mean loss over the batch + weight_decay/2 |x|^2 and its gradient, at the current `x` (collective).

    portion_fn(k, keep_going) -> (loss_sum, grad_sum, count) or None if keep_going() said stop; grad_sum is a
    float32/float64 vector of len(x), valid until the next call. `expected` is the batch size: the summed sample
    count must equal it, or the evaluation raises (a portion lost or counted twice).
    Returns (f, g): g is this rank's shard, columns [lo, hi) = shard_ranges(len(x), size)[rank], in x's dtype;
    gradient="full" returns the whole vector through one Allreduce instead (the baseline bench/sandblaster.py times).
    shard_comm (--mp): the ranks holding x's partition, one per replica, over which the gradient is summed and
    sharded (size and rank above are its); `comm` then spans every partition and sums the loss, counts and |x|^2.
    """

    def __init__(self, portion_fn, portions: Portions, x: np.ndarray, *, comm, weight_decay: float = 0.0, gradient: str = "shard",
                 shard_comm=None) -> None:  # fmt: skip
        if gradient not in ("shard", "full"):
            raise ValueError(f"gradient={gradient!r}: use 'shard' (Reduce_scatter, for ShardedLBFGS) or 'full' (Allreduce)")
        self.fn, self.portions, self.x, self.comm, self.wd, self.full = portion_fn, portions, x, comm, weight_decay, gradient == "full"
        self.shards = comm if shard_comm is None else shard_comm
        self.n = x.size
        ranges = shard_ranges(self.n, self.shards.Get_size())
        self.lo, self.hi = ranges[self.shards.Get_rank()]
        self.counts = [hi - lo for lo, hi in ranges]
        self.buf = np.zeros(self.n + 5)  # gradient sum, loss sum, samples, claims, stop votes, |x|^2 (by shards)
        self.shard = np.empty(self.hi - self.lo)  # this rank's columns of the summed gradient
        self.expected = 0
        self.evaluations = 0
        self.samples = 0  # samples counted over all evaluations
        self.stop_vote = False  # set by a signal handler: the run stops when any rank votes
        self.stop_agreed = False

    @trace.traced("evaluation", "sandblaster")  # one objective evaluation: portions, then the reduction
    def __call__(self) -> tuple[float, np.ndarray]:
        n, buf = self.n, self.buf
        buf[:] = 0.0
        result = None

        def compute(k, keep_going) -> bool:
            nonlocal result
            result = self.fn(k, keep_going)
            return result is not None

        def commit(k) -> None:
            loss, grad, count = result
            np.add(buf[:n], grad, out=buf[:n])
            if self.portions.leads:  # a replica's loss and samples count once, not once per partition (--mp)
                buf[n] += loss
                buf[n + 1] += count

        buf[n + 2] = self.portions.run(compute, commit)
        buf[n + 3] = float(self.stop_vote)
        x = self.x if self.full else self.x[self.lo : self.hi]
        if self.wd:  # by shards, summed in the allreduce: every rank gets the same bits (decisions depend on f)
            mine = self.x[self.lo : self.hi].astype(np.float64)
            buf[n + 4] = mine @ mine
        waiting = watchdog.Waiting("the Sandblaster objective's Allreduce (loss, gradient, claims, stop votes)")
        with trace.span("objective reduce", "comm", "comm", full=self.full), waiting:  # also the stop agreement (the votes)
            if self.full and self.shards is self.comm:
                self.comm.Allreduce(MPI.IN_PLACE, buf)
                g = buf[:n]
            else:  # the gradient among the ranks holding this partition (all ranks without --mp), the scalars over all
                if self.full:
                    self.shards.Allreduce(MPI.IN_PLACE, buf[:n])
                else:
                    self.shards.Reduce_scatter(buf[:n], self.shard, self.counts, op=MPI.SUM)
                self.comm.Allreduce(MPI.IN_PLACE, buf[n:])
                g = buf[:n] if self.full else self.shard
        count, claims = int(buf[n + 1]), int(buf[n + 2])
        if count != self.expected or claims != self.portions.expected_claims():
            raise RuntimeError(
                f"evaluation {self.portions.evaluation}: {count} samples counted for a batch of {self.expected}, {claims} claims "
                f"for {self.portions.expected_claims()} expected: a portion was lost or counted twice (a bug, please report)"
            )
        self.evaluations += 1
        self.samples += count
        self.stop_agreed = buf[n + 3] > 0
        if self.stop_agreed:
            trace.instant("stop agreed", "comm", "comm", votes=int(buf[n + 3]))
        f = buf[n] / count + 0.5 * self.wd * buf[n + 4]
        g = g / count
        if self.wd:
            g += self.wd * x.astype(np.float64)
        return float(f), g.astype(self.x.dtype)
