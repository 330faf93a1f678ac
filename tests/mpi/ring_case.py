"""Our ring allreduce (hpcdnn/mpi/ring.py) under a real mpirun, for tests/mpi/test_ring.py; rank 0 saves the results.

    mpirun -n 3 python -m mpi4py tests/mpi/ring_case.py OUT.npz

vectors:   every SIZES vector summed by a RingAllreduce, all in flight at once (one tag each), twice, against the
           same sum in the ring's documented order done by numpy on rank 0 (bitwise) and MPI's Allreduce (tolerance)
training:  GradAllreduce with every bucket on the ring (ring_min_mb=0), blocking and overlapped, tiny and mid buckets,
           against local SGD on the whole batch (tests/mpi/allreduce_case.py's net and reference)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from allreduce_case import BUCKETS, LR, batches, local_sgd, replica

SIZES = [0, 1, 2, 3, 5, 7, 1000, 12345, (1 << 18) + 7]  # fewer elements than ranks, uneven chunks, several MiB


def ring_order(parts: list[np.ndarray]) -> np.ndarray:
    """The sum the ring promises: chunk k of p is ((g_k + g_k+1) + ...) + g_k+p-1, ranks mod p, in float32."""
    p, n = len(parts), parts[0].size
    out = np.empty(n, np.float32)
    for k in range(p):
        lo, hi = n * k // p, n * (k + 1) // p
        acc = parts[k][lo:hi].copy()
        for j in range(1, p):
            acc = acc + parts[(k + j) % p][lo:hi]
        out[lo:hi] = acc
    return out


def vectors(comm) -> dict[str, np.ndarray]:
    from mpi4py import MPI

    from hpcdnn.mpi.ring import RingAllreduce, wait_all

    rank, size = comm.Get_rank(), comm.Get_size()
    data = [np.random.default_rng([n, rank]).standard_normal(n).astype(np.float32) for n in SIZES]
    out, runs = {}, []
    for _ in range(2):
        bufs = [d.copy() for d in data]
        rings = [RingAllreduce(b, comm=comm, tag=t, scratch=np.empty(-(-b.size // size) + 1, np.float32)) for t, b in enumerate(bufs)]
        for ring in rings:
            ring.start()
        wait_all(rings)
        runs.append(bufs)
    everyone = comm.gather(runs[0])
    originals = comm.gather(data)
    for k, n in enumerate(SIZES):
        mpi = data[k].copy()
        comm.Allreduce(MPI.IN_PLACE, mpi, MPI.SUM)
        if rank == 0:
            out[f"{n}/ring"], out[f"{n}/again"], out[f"{n}/mpi"] = runs[0][k], runs[1][k], mpi
            out[f"{n}/order"] = ring_order([o[k] for o in originals])
            out[f"{n}/ranks_equal"] = np.array(all(np.array_equal(e[k], runs[0][k]) for e in everyone))
    return out


def training(comm) -> dict[str, np.ndarray]:
    from hpcdnn.mpi.allreduce import GradAllreduce

    rank, size = comm.Get_rank(), comm.Get_size()
    xs, ys = batches()
    part = slice(rank * len(ys[0]) // size, (rank + 1) * len(ys[0]) // size)
    out = {}
    for mode in ("blocking", "overlap"):
        for bucket in ("tiny", "mid", "huge"):
            model, flat, opt = replica(100 + rank)
            ar = GradAllreduce(flat, comm, bucket_mb=BUCKETS[bucket], overlap=mode == "overlap", ring_min_mb=0)
            ar.broadcast_parameters(root=0)
            for x, y in zip(xs, ys):
                flat.zero_grad()
                F.cross_entropy(model(x[part]), y[part]).backward()
                ar.synchronize()
                opt.step(LR)
            everyone = comm.gather(flat.to_numpy().copy())
            if rank == 0:
                out[f"{mode}/{bucket}/rank0"] = everyone[0]
                out[f"{mode}/{bucket}/ranks_equal"] = np.array(all(np.array_equal(e, everyone[0]) for e in everyone))
                out[f"{mode}/{bucket}/rings"] = np.array(sum(r is not None for r in ar._rings) if size > 1 else len(ar.buckets))
                out[f"{mode}/{bucket}/buckets"] = np.array(len(ar.buckets))
            ar.close()
    if rank == 0:
        out["reference"] = local_sgd(100)
    return out


def main(path: str) -> None:
    from mpi4py import MPI

    from hpcdnn.placement import set_threads

    set_threads(1)
    torch.manual_seed(0)
    comm = MPI.COMM_WORLD
    results = vectors(comm) | training(comm)
    if comm.Get_rank() == 0:
        results["size"] = np.array(comm.Get_size())
        np.savez(path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
