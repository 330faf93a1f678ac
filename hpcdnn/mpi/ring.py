"""Ring allreduce of one float32 bucket over Isend/Irecv, advanced step by step (used by GradAllreduce).

    ring = RingAllreduce(bucket_view, comm=comm, tag=b, scratch=np.empty(-(-bucket_view.size // size), np.float32))
    ring.start(); ...; ring.advance()        # non-blocking: True once every step is done
    wait_all([ring])                         # or drive it to the end

Reduce-scatter then allgather (Patarasuk and Yuan's bandwidth-optimal ring): the bucket is cut into `size` chunks; in
p-1 steps each rank passes a partial sum to its right neighbour and adds what its left neighbour sent, then in p-1
more steps the finished chunks travel round. Each rank sends and receives 2(p-1)/p of the bucket, the least any
allreduce can (Open MPI's and MPICH's own Allreduce sent ~2 whole vectors per rank over 3 nodes, bench/network.py).

Deterministic: chunk k is summed as ((g_k + g_k+1) + g_k+2) + ... (rank indices mod p), whatever the transport or
placement, so a run on one node and on three nodes give the same bits; every rank copies the owner's finished chunk.
Like every MPI point-to-point over TCP or shared memory, a step moves only inside MPI calls, so the owner calls
advance() often (GradAllreduce does from its backward hooks).
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from hpcdnn import watchdog


class RingAllreduce:
    """Sum `buf` (a 1-D float32 array) in place over `comm` with a ring; start() posts the first step."""

    def __init__(self, buf: np.ndarray, *, comm, tag: int, scratch: np.ndarray) -> None:
        self.comm, self.tag = comm, tag
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        p = self.size
        bounds = [buf.size * k // p for k in range(p + 1)]  # chunks differ by at most one element; some may be empty
        self.chunks = [buf[bounds[k] : bounds[k + 1]] for k in range(p)]
        if scratch.size < max(c.size for c in self.chunks):
            raise ValueError(f"scratch holds {scratch.size} floats, a chunk {max(c.size for c in self.chunks)}: a bug, please report")
        self.scratch = scratch
        self.left, self.right = (self.rank - 1) % p, (self.rank + 1) % p
        self.left_rank = watchdog.world_rank(comm, self.left)  # whom a stall report says this ring waits for
        self.step = 2 * (p - 1)  # not started: nothing to do
        self._reqs: list[MPI.Request] = []
        self._into = -1  # chunk the current reduce-scatter step adds into

    @property
    def done(self) -> bool:
        return self.step >= 2 * (self.size - 1)

    def start(self) -> None:
        """Post step 0 (collective over `comm` in the sense that every rank must start it)."""
        if self._reqs:
            raise RuntimeError(f"ring {self.tag} started twice before it finished: a bug, please report")
        self.step = 0
        if not self.done:
            self._post()

    def _post(self) -> None:
        p, r, s = self.size, self.rank, self.step
        if s < p - 1:  # reduce-scatter: pass the partial sum of chunk r-s, receive chunk r-s-1's
            send, self._into = self.chunks[(r - s) % p], (r - s - 1) % p
            recv = self.scratch[: self.chunks[self._into].size]
        else:  # allgather: pass the finished chunk r+1-t, receive chunk r-t into place
            t = s - (p - 1)
            send, recv, self._into = self.chunks[(r + 1 - t) % p], self.chunks[(r - t) % p], -1
        self._reqs = [self.comm.Irecv(recv, self.left, self.tag), self.comm.Isend(send, self.right, self.tag)]

    def _finish_step(self) -> None:
        if self._into >= 0:
            into = self.chunks[self._into]
            np.add(into, self.scratch[: into.size], out=into)
        self._reqs = []
        self.step += 1
        if not self.done:
            self._post()

    def advance(self) -> bool:
        """Complete as many steps as have arrived, posting the next; never blocks. True once the sum is in place."""
        while self._reqs and MPI.Request.Testall(self._reqs):
            self._finish_step()
        return self.done


def wait_all(rings: list[RingAllreduce], requests: list[MPI.Request] | None = None) -> None:
    """Drive `rings` to the end, then wait for `requests` (Iallreduce).

    Polls, yielding the core (time.sleep(0)) whenever no step arrived: measured faster than blocking in MPI_Waitany,
    whose spin keeps a core from ranks still computing when ranks outnumber cores (the virtual cluster of tests/cluster
    and one host, both MPIs; README).
    """
    first = None
    with watchdog.Waiting("ring allreduce") as waiting:  # a stall names the bucket and the left neighbour it needs
        while rings:
            if rings[0] is not first:
                first = rings[0]
                waiting.update(f"ring allreduce of bucket {first.tag} (receiving from its left neighbour)", first.left_rank)
            before = sum(ring.step for ring in rings)
            for ring in rings:
                ring.advance()
            if sum(ring.step for ring in rings) == before:
                time.sleep(0)
            rings = [ring for ring in rings if not ring.done]
        if requests:
            waiting.update("MPI Iallreduce of the small gradient buckets")
            MPI.Request.Waitall(requests)
