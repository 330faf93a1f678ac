"""Split the job's communicator once into a parameter-server group and a worker group.

    roles = split_roles(MPI.COMM_WORLD, servers=2, placement="first")   # ranks 0, 1 serve; the rest are workers
    roles = split_roles(comm, servers=0)                                  # allreduce / sandblaster: every rank works

Placement is a config choice: `first` (ranks 0..P-1 serve), `last`, or `env`, where every rank reads HPCDNN_ROLE
(server|worker) from its environment, so a Slurm heterogeneous job can put servers on CPU nodes and workers on GPU
nodes (set the variable per component). Only the driver passes COMM_WORLD; everything here takes `comm`.
Devices and threads per rank are hpcdnn/placement.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ROLE_ENV = "HPCDNN_ROLE"


@dataclass
class Roles:
    """This rank's role, its group communicator, and where everyone else is (ranks of `comm`)."""

    comm: object  # the communicator that was split (every window and teardown uses it)
    group: object  # servers-only or workers-only communicator containing this rank
    role: str  # "server" or "worker"
    servers: list[int]  # ranks of `comm` that serve, in shard order
    workers: list[int]  # ranks of `comm` that train, in worker order

    @property
    def is_server(self) -> bool:
        return self.role == "server"

    @property
    def index(self) -> int:
        """Shard index for a server, replica index for a worker."""
        return self.group.Get_rank()

    @property
    def root(self) -> int:
        """The rank that logs, evaluates and writes checkpoints: the first worker."""
        return self.workers[0]

    @property
    def is_root(self) -> bool:
        return self.comm.Get_rank() == self.root

    def free(self) -> None:
        self.group.Free()


def _role_from_env(env, rank: int) -> str:
    value = env.get(ROLE_ENV, "").strip().lower()
    if value not in ("server", "worker"):
        raise ValueError(
            f"--placement=env but rank {rank} has {ROLE_ENV}={env.get(ROLE_ENV)!r}; export {ROLE_ENV}=server or "
            f"{ROLE_ENV}=worker for each rank (mpirun -x {ROLE_ENV}=... per MPMD block, or per Slurm hetjob component)"
        )
    return value


def split_roles(comm, servers: int, placement: str = "first", env=None) -> Roles:
    """Decide every rank's role (collective over `comm`) and split `comm` into the two groups."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if placement == "env":
        mine = _role_from_env(os.environ if env is None else env, rank)
        roles = comm.allgather(mine)
    elif placement in ("first", "last"):
        if not 0 <= servers < size:
            raise ValueError(
                f"--servers={servers} leaves no worker among {size} rank(s): launch with mpirun -n {servers + 1} or more, "
                f"or lower --servers"
            )
        serving = range(servers) if placement == "first" else range(size - servers, size)
        roles = ["server" if r in serving else "worker" for r in range(size)]
    else:
        raise ValueError(f"--placement={placement!r} is not one of first, last, env")
    server_ranks = [r for r, x in enumerate(roles) if x == "server"]
    worker_ranks = [r for r, x in enumerate(roles) if x == "worker"]
    if not worker_ranks:
        raise ValueError(f"every one of the {size} ranks is a server: {ROLE_ENV}=worker must be set on at least one rank")
    group = comm.Split(0 if roles[rank] == "server" else 1, rank)
    return Roles(comm, group, roles[rank], server_ranks, worker_ranks)


@dataclass
class Replica:
    """A worker's model replica when it spans K ranks (`--mp=K`): worker w is partition w % K of replica w // K, so a
    replica is K consecutive worker ranks (one node under mpirun's and Slurm's default block placement)."""

    comm: object  # the replica's K ranks, in partition order: activations move here (hpcdnn/mpi/exchange.py)
    across: object  # the R ranks holding this partition in every replica, in replica order: gradients move here
    index: int  # which replica (0..R-1): the data-parallel rank (its batches, its Downpour worker number)
    part: int  # which partition (0..K-1)
    size: int  # K
    count: int  # R

    def free(self) -> None:
        self.comm.Free()
        self.across.Free()


def split_replicas(roles: Roles, mp: int) -> Replica:
    """Collective over the worker group: cut the W workers into W / mp replicas of mp consecutive ranks."""
    workers = len(roles.workers)
    if workers % mp:
        raise ValueError(
            f"--mp={mp} needs a worker count divisible by {mp}, not {workers}: launch {mp} x R workers "
            f"(mpirun -n {len(roles.servers) + mp * max(1, workers // mp)} ...) or change --mp"
        )
    w = roles.index
    comm = roles.group.Split(w // mp, w % mp)
    across = roles.group.Split(w % mp, w // mp)
    return Replica(comm, across, w // mp, w % mp, mp, workers // mp)
