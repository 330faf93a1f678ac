"""One-sided and collective traffic between ranks on different nodes, checked for the right values.

    mpirun ... python -m mpi4py tests/cluster/transport_case.py FLOATS

Rank 0 exposes a window of FLOATS float32 per other rank (Win.Allocate, as the parameter server does); every other
rank Puts its slice, Accumulates ones onto it, Gets it back and checks it; then all ranks Allreduce FLOATS floats.
Prints one line per rank: `rank R host H ok`.
"""

from __future__ import annotations

import socket
import sys

import numpy as np
from mpi4py import MPI


def main(n: int) -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    win = MPI.Win.Allocate(n * 4 * (size - 1) if rank == 0 else 0, disp_unit=4, comm=comm)
    if rank:
        mine = np.full(n, rank, np.float32)
        offset = (rank - 1) * n
        win.Lock(0)
        win.Put(mine, 0, target=(offset, n, MPI.FLOAT))
        win.Flush(0)
        win.Accumulate(np.ones(n, np.float32), 0, target=(offset, n, MPI.FLOAT), op=MPI.SUM)
        win.Flush(0)
        back = np.empty(n, np.float32)
        win.Get(back, 0, target=(offset, n, MPI.FLOAT))
        win.Unlock(0)
        assert (back == rank + 1).all(), f"rank {rank} read back {back[:4]}..., wanted {rank + 1}"
    comm.Barrier()
    total = np.empty(n, np.float32)
    comm.Allreduce(np.full(n, rank, np.float32), total, MPI.SUM)
    assert (total == size * (size - 1) // 2).all(), f"allreduce gave {total[:4]}"
    win.Free()
    print(f"rank {rank} host {socket.gethostname()} ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
