"""RMA window checks for tests/mpi/test_window.py, written once and run on COMM_SELF, then on COMM_WORLD.

    mpirun -n 3 python -m mpi4py tests/mpi/window_cases.py OUT.json

Each rank records what it saw per communicator; rank 0 of COMM_WORLD writes every rank's findings as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcdnn.mpi.portions import Portions
from hpcdnn.mpi.window import SharedWindow, Window

LOCK_PER_OP = ("put", "get", "get_atomic", "accumulate", "get_accumulate", "update_many")  # each takes its own Lock
INCREMENTS = 20  # fetch_and_op calls per rank on the shared counter


def errors(fn) -> str | None:
    """The message of the ValueError or RuntimeError fn() raises, or None."""
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def shared_window(comm) -> dict:
    """A counter every rank increments, a flag only one rank wins, bounds, `with` and use after free."""
    rank, size = comm.Get_rank(), comm.Get_size()
    found = {"missing_on_window": [m for m in LOCK_PER_OP if not hasattr(Window, m)]}
    found["present_on_shared"] = [m for m in LOCK_PER_OP if hasattr(SharedWindow, m)]
    with SharedWindow(4 if rank == 0 else 0, np.int64, comm=comm) as w:
        found["tickets"] = [w.fetch_and_op(1, 0, 0) for _ in range(INCREMENTS)]
        found["won_flag"] = w.compare_and_swap(0, rank + 1, 0, 1) == 0
        comm.Barrier()  # every increment and swap is done before anyone reads the totals
        found["counter_and_flag"] = w.read(0, 0, 2).tolist()
        found["bounds"] = errors(lambda: w.read(0, 3, 2))
        found["bad_target"] = errors(lambda: w.fetch_and_op(1, size, 0))
    found["freed"] = errors(lambda: w.read(0))
    return found


def window_with(comm) -> dict:
    """`with Window(...)` frees on a normal exit and keeps the window on an exception (Free is collective)."""
    rank = comm.Get_rank()
    with Window(8 if rank == 0 else 0, np.float32, comm=comm) as w:
        w.accumulate(np.full(8, rank + 1, np.float32), 0)
        comm.Barrier()
        found = {"sum": w.read(0, 0, 8).tolist()}
    found["freed"] = errors(lambda: w.read(0))
    try:
        with Window(1, np.float32, comm=comm) as kept:
            raise KeyError("on every rank")
    except KeyError:
        found["kept_after_exception"] = kept._win is not None
        kept.free()
    return found


def portions(comm) -> dict:
    """Portions (SharedWindow's user) over two evaluations: every portion committed exactly once across ranks."""
    work = Portions(12, comm=comm)
    committed, claims = [], 0
    for _ in range(2):
        claims += work.run(lambda k, keep_going: keep_going(), committed.append)
        comm.Barrier()  # the Objective's Allreduce: no rank claims for the next evaluation before all ended this one
    work.free()
    return {"committed": committed, "claims": claims, "expected_claims": work.expected_claims()}


def main(out: Path) -> None:
    world = MPI.COMM_WORLD
    found = {}
    for name, comm in (("self", MPI.COMM_SELF), ("world", world)):
        found[name] = {"shared": shared_window(comm), "window": window_with(comm), "portions": portions(comm)}
    everyone = world.gather(found, root=0)
    if world.Get_rank() == 0:
        out.write_text(json.dumps(everyone))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
