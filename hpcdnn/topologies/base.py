"""What every topology gives the one training driver (hpcdnn/train.py), and what the driver gives it (`Run`).

The driver owns setup, the step count, logging, signals, checkpoints, evaluation and the summary; a topology owns
what a step is. For every topology the driver calls, on every rank of the job:

  Kind.n_servers(cfg)           ranks set apart as servers (split by mpi/roles.py); None: one process, no MPI
  Kind.check(cfg)               reject settings this topology cannot run (from Config.validate)
  Kind.same_world               True: a resume needs the checkpoint's replica count (allreduce, sandblaster)
  topo = Kind(run)              collective: windows, communicators, restored optimizer state
  topo.serve()                  server ranks only: serve until every worker is done
  topo.position(saved)          (step, epoch, steps done in that epoch) to continue from
  topo.steps_in_epoch(epoch)    steps one epoch takes on this rank
  topo.epoch(epoch, start)      a generator: runs the epoch's steps from `start`, yields one StepResult per step
  topo.stop_requested(signal)   True on every rank once any rank was signalled (a consistent place to stop)
  topo.log_fields()             root: extra fields for a metrics line (push counts, ...)
  topo.refresh()                root, before an evaluation: make the model hold the current parameters
  topo.share(value)             the root's value (an evaluation, the summary) for every rank that needs it
  topo.state()                  collective where the state is spread: (params, optim, extra, rng) on the root, else None
  topo.finish(epoch, pos)       after the loop (Downpour: last push, report done; the root waits for the others)
  topo.images(step)             images trained on by all replicas in the run's `step` steps (for images/s)
  topo.summary()                collective: extra summary.json fields (used on the root)
  topo.close()                  collective teardown
A new topology is one module here and one line in TOPOLOGIES (hpcdnn/topologies/__init__.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcdnn import checkpoint as ck
from hpcdnn.models.flat import FlatParams
from hpcdnn.optim import Schedule


@dataclass
class Run:
    """Everything the driver has set up for a topology: config, ranks, device, model, data set, saved state."""

    cfg: object  # hpcdnn.config.Config
    comm: object  # the job's communicator (None: one process)
    roles: object  # hpcdnn.mpi.roles.Roles (None: one process)
    device: torch.device
    threads: int
    model: torch.nn.Module
    flat: FlatParams
    model_name: str
    crop: int
    manifest: dict
    sched: Schedule
    saved: ck.Checkpoint | None = None
    replica: object = None  # hpcdnn.mpi.roles.Replica when a replica spans several ranks (--mp > 1), else None
    param_total: int = 0  # parameters of the whole model (every partition of a replica)
    data_sha256: str = ""  # the data's manifest fingerprint (checkpoint.manifest_sha256): checkpoints keep it

    @property
    def is_root(self) -> bool:
        return self.roles is None or self.roles.is_root

    @property
    def is_server(self) -> bool:
        return self.roles is not None and self.roles.is_server

    @property
    def rank(self) -> int:
        """This replica's index among the replicas (0 for one process): its batches, seeds and worker number."""
        if self.replica is not None:
            return self.replica.index
        return self.roles.index if self.roles is not None and not self.is_server else 0

    @property
    def world(self) -> int:
        """Replicas in the job (workers / mp)."""
        if self.replica is not None:
            return self.replica.count
        return len(self.roles.workers) if self.roles is not None else 1

    @property
    def worker(self) -> int:
        """This rank's index among all worker ranks (= rank without model parallelism)."""
        return self.roles.index if self.roles is not None and not self.is_server else 0

    @property
    def in_root_replica(self) -> bool:
        """A rank of the replica that evaluates (every rank of it takes part in its forward passes)."""
        return self.is_root if self.replica is None else (not self.is_server and self.replica.index == 0)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def loader_args(self) -> dict:
        return dict(crop=self.crop, pad=self.cfg.pad, device=self.device)


@dataclass
class StepResult:
    """One step as the driver logs it."""

    loss: float  # the step's training loss (the metrics line logs the mean over its window)
    images: int  # images this rank's step went through (for the metrics line's images/s)
    bar: dict = field(default_factory=dict)  # progress-bar postfix
    log: dict = field(default_factory=dict)  # fields for the metrics line (the window's last step wins)


class Topology:
    """Defaults shared by every topology; subclasses override what differs."""

    name = ""
    resumable: frozenset[str] = frozenset()  # config keys this topology lets a resumed run change
    final_checkpoint = False  # write one more checkpoint after finish() (state settles only then)
    same_world = False  # a resume must have the checkpoint's replica count (positions count batches of every replica)

    @classmethod
    def n_servers(cls, cfg) -> int | None:
        return 0

    @classmethod
    def check(cls, cfg) -> None:
        pass

    def __init__(self, run: Run) -> None:
        self.run, self.cfg = run, run.cfg

    def serve(self) -> None:
        raise RuntimeError(f"--topology={self.name} has no server ranks (a bug, please report)")

    def position(self, saved) -> tuple[int, int, int]:
        return (saved.step, saved.epoch, saved.batch) if saved else (0, 0, 0)

    def steps_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def epoch(self, epoch: int, start: int) -> Iterator[StepResult]:
        raise NotImplementedError

    def stop_requested(self, signalled: bool) -> bool:
        return signalled

    def log_fields(self) -> dict:
        return {}

    def refresh(self) -> None:
        pass

    def share(self, value):
        return value

    def state(self):
        raise NotImplementedError

    def finish(self, epoch: int, pos: int) -> None:
        pass

    def images(self, step: int) -> int:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def gathered_rng(comm, root: int) -> dict | None:
    """Every rank's RNG states on `root` (collective), keyed w<rank>_<name> for ranks other than 0."""
    every = comm.gather(ck.capture_rng(), root=root)
    if every is None:
        return None
    return {(f"w{r}_{k}" if r else k): v for r, states in enumerate(every) for k, v in states.items()}


def restore_rng(saved, rank: int, per_rank: bool) -> None:
    """Put back this rank's RNG state from a checkpoint (per_rank: the w<rank>_ keys of a gathered checkpoint)."""
    prefix = f"w{rank}_" if per_rank and rank else ""
    ck.restore_rng({k[len(prefix) :]: v for k, v in saved.rng.items() if k.startswith(prefix)})


# ---- model-parallel replicas (--mp=K): a checkpoint holds every partition's flat vector, concatenated in order


def part_sizes(run: Run) -> list[int]:
    """Flat-vector lengths of the K partitions (collective over the job: the root replica's sizes, for every rank)."""
    sizes = run.replica.comm.allgather(run.flat.numel) if run.replica is not None else None
    return run.roles.comm.bcast(sizes, root=run.roles.root)


def my_part(run: Run, vector: np.ndarray, sizes: list[int] | None) -> np.ndarray:
    """This rank's partition of a checkpoint vector (the whole vector without model parallelism)."""
    if run.replica is None:
        if vector.shape[-1:] != (run.flat.numel,):
            raise ValueError(
                f"{run.run_dir / ck.LATEST} holds vectors of shape {vector.shape}, this run's {run.model_name} needs "
                f"{run.flat.numel:,} values: it was written for another model or data set; resume with its settings or start a new --run_dir"
            )
        return vector
    if sizes is None or len(sizes) != run.replica.size or sum(sizes) != vector.size:
        raise ValueError(
            f"the checkpoint holds {vector.size:,} values in partitions {sizes}, this run's --mp={run.replica.size} model "
            f"needs partitions of {run.flat.numel:,} values on partition {run.replica.part}: resume with the --mp it was written with"
        )
    lo = sum(sizes[: run.replica.part])
    return vector[lo : lo + sizes[run.replica.part]]


def gather_parts(run: Run, params: np.ndarray, optim: dict) -> tuple[np.ndarray, dict] | None:
    """Root replica (collective over its ranks): every partition's params and optimizer state, concatenated, on the
    job root; None elsewhere. Without model parallelism: the arguments."""
    if run.replica is None:
        return params, optim
    if run.replica.index != 0:
        return None
    got = run.replica.comm.gather((params, optim), root=0)
    if got is None:
        return None
    return np.concatenate([p for p, _ in got]), {k: np.concatenate([o[k] for _, o in got]) for k in optim}
