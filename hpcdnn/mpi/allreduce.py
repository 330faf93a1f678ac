"""Synchronous data-parallel SGD: every replica's flat gradient is averaged over `comm` in buckets (Horovod/DDP style).

    flat = FlatParams(model); ar = GradAllreduce(flat, comm=roles.group, bucket_mb=cfg.bucket_mb)
    ar.broadcast_parameters(root=0)                  # once, after building (or loading) the model: identical replicas
    flat.zero_grad(); loss.backward(); ar.synchronize(); opt.step(lr)    # every step; ar.close() at the end

`flat.grad` is one contiguous float32 vector, so a bucket is a slice of it: consecutive parameters in reverse layout
order (backward produces the last layer's gradient first), closed once it holds `bucket_mb` MiB (a parameter larger
than that gets a bucket of its own), summed in place and then divided by the number of ranks. No packing. Buckets
are always started in the same order on every rank, and on a private duplicate of `comm`, so the messages match
whatever the caller does with `comm` in between.

How a bucket is summed: one of at least `ring_min_mb` MiB (RING_MIN_MB) by our ring (hpcdnn/mpi/ring.py: Isend/Irecv,
2(p-1)/p of the bucket on each rank's link, where both MPIs' own Allreduce sent ~2 vectors for 3 ranks, and a sum
order fixed by rank indices, so one node and three nodes give the same bits); a smaller one by MPI's Iallreduce
(latency matters more there). Without overlap, `synchronize()` starts every bucket; if none is for the ring, it
reduces the whole vector in ONE blocking Allreduce instead (MPI pipelines a large message; buckets only add calls).

Overlap (`overlap=True`): a `register_post_accumulate_grad_hook` on every parameter counts the gradients that have
arrived; when a bucket is complete (and all before it have started) its ring or Iallreduce starts while backward goes
on, and each later hook advances what is in flight (MPI moves data only inside calls). `synchronize()` starts what is
left (parameters without a gradient never fire their hook) and waits: it polls the rings and yields the core while
nothing arrives (ring.wait_all), which beat blocking in MPI when ranks outnumber cores.

Defaults, measured against DDP/gloo on the virtual cluster of tests/cluster (3 nodes, bench/network.py's setting) and
on one host, both MPIs, numbers in the README: buckets of 1 MiB, summed by the ring and overlapped with backward on both MPIs (small buckets let the ring start early; the
ring's bytes and overlap are what beat DDP/gloo across nodes). Where no bucket reaches RING_MIN_MB, overlap stays on
only for MPICH: Open MPI's libnbc Iallreduce is much slower than its blocking Allreduce on one host.

CUDA: with a CUDA-aware MPI (`MPIX_Query_cuda_support()`, or HPCDNN_CUDA_AWARE_MPI=1) the device slices go to MPI
directly, else each bucket is staged through one pinned host buffer (the device-to-host copies of all buckets are
queued first, so the copy of bucket i+1 runs while bucket i is reduced). On CUDA the reduction always starts in
`synchronize()` after one stream synchronisation: hooks fire when kernels are queued, not when they finish.
"""

from __future__ import annotations

import ctypes
import os

import torch
from mpi4py import MPI

from hpcdnn import trace, watchdog
from hpcdnn.models.flat import FlatParams
from hpcdnn.mpi.ring import RingAllreduce, wait_all

MIB = 1 << 20
RING_MIN_MB = 0.25  # buckets of at least this many MiB are summed by our ring (hpcdnn/mpi/ring.py), smaller ones by MPI
CUDA_AWARE_ENV = "HPCDNN_CUDA_AWARE_MPI"


def cuda_aware_mpi() -> bool:
    """True if the MPI library takes CUDA device buffers: HPCDNN_CUDA_AWARE_MPI=0/1 decides, else MPIX_Query_cuda_support()."""
    env = os.environ.get(CUDA_AWARE_ENV)
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no")
    try:  # dlsym on mpi4py's extension also searches the libmpi it links (Open MPI and MPICH both export this)
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def make_buckets(flat: FlatParams, bucket_mb: float) -> list[tuple[int, int, list[int]]]:
    """(start, stop, parameter indices) per bucket, last layer first; each slice includes its parameters' padding."""
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, not {bucket_mb} (1 is ours and 25 DDP's default; a huge value gives one bucket)")
    cap = bucket_mb * MIB
    offsets = [off for _, off, _ in flat.layout] + [flat.numel]
    buckets, members = [], []
    for i in reversed(range(len(flat.layout))):
        members.append(i)
        if (offsets[members[0] + 1] - offsets[i]) * flat.grad.element_size() >= cap or i == 0:
            buckets.append((offsets[i], offsets[members[0] + 1], members))
            members = []
    return buckets


class GradAllreduce:
    """Average FlatParams.grad over `comm` in buckets; optionally start each bucket from backward (overlap)."""

    def __init__(
        self, flat: FlatParams, comm, bucket_mb: float = 1.0, overlap: bool | None = None, ring_min_mb: float = RING_MIN_MB
    ) -> None:
        self.flat = flat
        self.comm = comm.Dup()  # private: our (non-blocking) collectives never interleave with the caller's
        self.size = self.comm.Get_size()
        self.buckets = make_buckets(flat, bucket_mb)
        self.device = flat.grad.device
        self.cuda = self.device.type == "cuda"
        self._rings = self._make_rings(ring_min_mb)  # per bucket: its RingAllreduce, or None (MPI's Iallreduce)
        # measured default (module docstring): overlap whenever our ring sums a bucket; else only MPICH's Iallreduce
        self.auto_overlap = any(self._rings) or "MPICH" in MPI.Get_library_version()
        self.overlap = (self.auto_overlap if overlap is None else overlap) and not self.cuda
        self.cuda_aware = self.cuda and cuda_aware_mpi()
        self._host = torch.empty(flat.numel, dtype=torch.float32, pin_memory=True) if self.cuda and not self.cuda_aware else None
        self._bucket_of = [0] * len(flat.layout)
        for b, (_, _, members) in enumerate(self.buckets):
            for i in members:
                self._bucket_of[i] = b
        self._requests: list[MPI.Request] = []
        self._error = ""  # name of a parameter whose gradient arrived twice before synchronize()
        self._hooks = []
        self.early = 0  # buckets started from backward hooks in the current step
        self.last_early = 0  # ... and in the last synchronized step (0 without overlap)
        self._reset()
        if self.overlap:
            for i, p in enumerate(flat._params):
                if p.requires_grad:  # frozen parameters never fire: synchronize() starts their buckets
                    self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._on_grad(i)))

    def _make_rings(self, ring_min_mb: float) -> list[RingAllreduce | None]:
        """A ring for every bucket of at least ring_min_mb MiB (CPU, 2+ ranks), each with its own scratch chunk."""
        if not ring_min_mb >= 0:
            raise ValueError(f"ring_min_mb must be >= 0, not {ring_min_mb} (0: every bucket by the ring; inf: none)")
        if self.cuda or self.size == 1:
            return [None] * len(self.buckets)
        big = [(stop - start) * self.flat.grad.element_size() >= ring_min_mb * MIB for start, stop, _ in self.buckets]
        chunk = [-(-(stop - start) // self.size) if ring else 0 for (start, stop, _), ring in zip(self.buckets, big)]
        scratch, grad, rings, at = torch.empty(sum(chunk)).numpy(), self.flat.grad.detach().numpy(), [], 0
        for b, (start, stop, _) in enumerate(self.buckets):
            ring = RingAllreduce(grad[start:stop], comm=self.comm, tag=b, scratch=scratch[at : at + chunk[b]]) if big[b] else None
            rings.append(ring)
            at += chunk[b]
        return rings

    def _reset(self) -> None:
        self._pending = [len(members) for _, _, members in self.buckets]
        self._next = 0  # buckets start strictly in order, so every rank issues the same sequence of collectives
        self._open: dict[int, RingAllreduce | MPI.Request] = {}  # buckets in flight, not yet seen done (the trace)

    def _start(self, grad: torch.Tensor, where: str) -> None:
        """Start the next bucket's ring or Iallreduce; the trace shows it in flight until a test reports it done."""
        start, stop, _ = self.buckets[self._next]
        ring = self._rings[self._next]
        if ring is not None:
            ring.start()
            self._open[self._next] = ring
        else:
            self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self._buffer(grad[start:stop]), MPI.SUM))
            self._open[self._next] = self._requests[-1]
        trace.async_begin(f"bucket {self._next}", self._next, issued=where, bytes=(stop - start) * grad.element_size())
        self._next += 1

    def _progress(self) -> None:
        """Advance every bucket in flight without blocking (MPI moves data only inside calls); end the finished ones."""
        for b, work in list(self._open.items()):
            if work.advance() if isinstance(work, RingAllreduce) else work.Test():
                trace.async_end(f"bucket {b}", b)
                del self._open[b]

    def _wait(self) -> None:
        """Finish every bucket in flight (rings first, then MPI's Iallreduce requests)."""
        wait_all([w for w in self._open.values() if isinstance(w, RingAllreduce)], self._requests)
        for b in self._open:
            trace.async_end(f"bucket {b}", b)
        self._open = {}

    def _live(self) -> FlatParams:
        if self.comm == MPI.COMM_NULL:
            raise RuntimeError("this GradAllreduce was closed; create a new one (collective over the workers)")
        return self.flat

    def _buffer(self, tensor: torch.Tensor):
        """What MPI reads and writes: a zero-copy numpy view on CPU, the tensor itself for a CUDA-aware MPI."""
        return tensor.detach().numpy() if tensor.device.type == "cpu" else tensor.detach()

    # ---- overlap: called by autograd after a parameter's gradient is accumulated into its view of flat.grad
    def _on_grad(self, i: int) -> None:
        b = self._bucket_of[i]
        self._pending[b] -= 1
        if self._pending[b] < 0:
            self._error = self._error or self.flat.layout[i][0]
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._start(self.flat.grad, "backward")
            self.early += 1
        self._progress()

    # ---- public API
    @trace.traced("broadcast parameters", "comm", "comm")
    def broadcast_parameters(self, root: int = 0) -> None:
        """Make flat.data on every rank a copy of root's (collective): call once after building or loading the model."""
        data = self._live().data
        if self._host is not None:
            self._host.copy_(data)
            self.comm.Bcast(self._host.numpy(), root=root)
            data.copy_(self._host)
        else:
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self.comm.Bcast(self._buffer(data), root=root)

    def synchronize(self) -> None:
        """After loss.backward(): sum every bucket over the ranks and divide by their number (collective).

        flat.grad then holds the mean gradient, identical on every rank. One backward per synchronize(): a second
        backward would add into buckets already in flight, which raises RuntimeError here (on every rank).
        """
        grad = self._live().grad
        if self.cuda:
            with (
                trace.span("allreduce", "comm", "comm", buckets=len(self.buckets), mode="cuda"),
                watchdog.Waiting("MPI Allreduce of the gradient (CUDA)"),
            ):
                self._synchronize_cuda(grad)
        elif self.overlap or any(self._rings):  # rings need the buckets: blocking mode starts them all here
            while self._next < len(self.buckets):
                self._start(grad, "synchronize")
            with trace.span("allreduce wait", "comm", "comm", in_flight=len(self._open)):
                self._wait()
        else:  # one call: MPI pipelines a large message itself, and each extra bucket costs a call (see the docstring)
            with (
                trace.span("allreduce", "comm", "comm", bytes=grad.numel() * grad.element_size()),
                watchdog.Waiting("MPI Allreduce of the gradient"),
            ):
                self.comm.Allreduce(MPI.IN_PLACE, self._buffer(grad), MPI.SUM)
        if self.size > 1:
            grad.div_(self.size)
        self._requests, error, self._error = [], self._error, ""
        self.last_early, self.early = self.early, 0
        self._reset()
        if error:
            raise RuntimeError(
                f"parameter {error!r} received a gradient after its bucket was already being reduced: call "
                "GradAllreduce.synchronize() after every backward (accumulate over micro-batches with overlap=False)"
            )

    def _synchronize_cuda(self, grad: torch.Tensor) -> None:
        """Reduce the device gradient: directly with a CUDA-aware MPI, else pipelined through the pinned host buffer."""
        stream = torch.cuda.current_stream(self.device)
        if self._host is None:
            stream.synchronize()  # the gradient kernels have finished before MPI reads device memory
            for start, stop, _ in self.buckets:
                self.comm.Allreduce(MPI.IN_PLACE, self._buffer(grad[start:stop]), MPI.SUM)
            return
        events = []
        for start, stop, _ in self.buckets:  # queue every device-to-host copy; each bucket waits only for its own
            self._host[start:stop].copy_(grad[start:stop], non_blocking=True)
            events.append(torch.cuda.Event())
            events[-1].record(stream)
        for (start, stop, _), event in zip(self.buckets, events):  # copies in both directions overlap the reductions
            event.synchronize()
            self.comm.Allreduce(MPI.IN_PLACE, self._host[start:stop].numpy(), MPI.SUM)
            grad[start:stop].copy_(self._host[start:stop], non_blocking=True)  # queued after every d2h, before the optimizer

    def close(self) -> None:
        """Remove the hooks, finish anything in flight, free the private communicator (collective). Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.comm != MPI.COMM_NULL:
            self._wait()
            self._requests = []
            self.comm.Free()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{(stop - start) * self.flat.grad.element_size() / MIB:.2f}" for start, stop, _ in self.buckets)
        mode = "overlap" if self.overlap else ("cuda-aware" if self.cuda_aware else "staged" if self.cuda else "blocking")
        rings = sum(r is not None for r in self._rings)
        return f"GradAllreduce({self.size} ranks, {len(self.buckets)} buckets [{sizes}] MiB ({rings} by ring), {mode})"
