"""How a replica's gradient becomes a parameter update: local, allreduce or downpour, behind one small interface.

The training driver calls, for every topology:
  start(saved)                 before the loop (load optimizer state / make replicas identical / first fetch)
  step(lr, epoch, batch)       after loss.backward()
  stop_requested(signalled)    True on every rank once any rank was signalled (a consistent place to stop)
  finish(lr, epoch, batch)     after the loop (Downpour: last push, report done; root waits for all workers)
  refresh()                    before an evaluation (Downpour: fetch the server-held parameters)
  share(val)                   the root's evaluation for every rank that needs it (allreduce: broadcast)
  state()                      (params, optimizer arrays, JSON extras) for the root's checkpoint
  summary()                    extra summary.json fields
Sandblaster is a batch optimizer with its own loop (hpcdnn/mpi/sandblaster.py).
"""

from __future__ import annotations

import numpy as np

from hpcdnn.models.flat import FlatParams
from hpcdnn.optim import FlatOptimizer


class Local:
    """One process, or the shared part of allreduce: the optimizer runs on this replica's flat vector."""

    name = "local"

    def __init__(self, cfg, flat: FlatParams) -> None:
        self.cfg, self.flat = cfg, flat
        self.opt = FlatOptimizer(
            cfg.optimizer, flat.data, flat.grad, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eps=cfg.adagrad_eps
        )

    def start(self, saved) -> None:
        if saved:
            self.opt.load_state(saved.optim, saved.state["optimizer_steps"])

    def step(self, lr: float, epoch: int, batch: int) -> None:
        self.opt.step(lr)

    def stop_requested(self, signalled: bool) -> bool:
        return signalled

    def finish(self, lr: float, epoch: int, batch: int) -> None:
        pass

    def refresh(self) -> None:
        pass

    def share(self, val: dict) -> dict:
        """The root's evaluation, as every rank that follows the schedule needs it."""
        return val

    def state(self) -> tuple[np.ndarray, dict, dict]:
        return self.flat.state_dict_flat().cpu().numpy(), self.opt.state_arrays(), {"optimizer_steps": self.opt.steps}

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Allreduce(Local):
    """Synchronous data-parallel SGD: gradients averaged over every rank, then the same update everywhere."""

    name = "allreduce"

    def __init__(self, cfg, flat: FlatParams, roles) -> None:
        from hpcdnn.mpi.allreduce import GradAllreduce

        super().__init__(cfg, flat)
        self.comm = roles.comm
        self.sync = GradAllreduce(flat, roles.comm, bucket_mb=cfg.bucket_mb)

    def start(self, saved) -> None:
        super().start(saved)
        self.sync.broadcast_parameters(0)  # identical replicas whatever each rank loaded or initialised

    def step(self, lr: float, epoch: int, batch: int) -> None:
        self.sync.synchronize()
        self.opt.step(lr)

    def stop_requested(self, signalled: bool) -> bool:
        from mpi4py import MPI

        return bool(self.comm.allreduce(int(signalled), op=MPI.MAX))

    def share(self, val: dict) -> dict:
        return self.comm.bcast(val, root=0)

    def summary(self) -> dict:
        return {"workers": self.comm.Get_size(), "servers": 0}

    def close(self) -> None:
        self.sync.close()


class Downpour:
    """A Downpour worker replica; the parameters and the Adagrad state live on the servers."""

    name = "downpour"

    def __init__(self, cfg, flat: FlatParams, roles, ps) -> None:
        from hpcdnn.mpi.downpour import DownpourWorker

        self.cfg, self.flat, self.roles, self.ps = cfg, flat, roles, ps
        self.worker = DownpourWorker(ps, flat, cfg, roles.index)

    def start(self, saved) -> None:
        from hpcdnn.mpi import param_server as psv

        if saved:  # every worker continues its own counts; the root restored the servers before the barrier
            row = psv.worker_row(saved.state["ps_counters"], self.roles.index)
            self.worker.sent, self.worker.steps = row[psv.SENT], row[psv.STEPS]
        self.worker.start(resumed=saved is not None)

    def step(self, lr: float, epoch: int, batch: int) -> None:
        self.worker.step(lr, epoch, batch)

    def stop_requested(self, signalled: bool) -> bool:
        if signalled:
            self.worker.request_stop()
            return True
        return self.worker.stop_requested()

    def finish(self, lr: float, epoch: int, batch: int) -> None:
        self.worker.finish(lr, epoch, batch)
        if self.roles.is_root:
            self.ps.wait_done(report=lambda m: print(f"hpcdnn: {m}", flush=True))
            self.refresh()

    def refresh(self) -> None:
        self.worker.fetch()

    def share(self, val: dict) -> dict:
        return val  # only the root evaluates; the schedules Downpour allows do not depend on it

    def state(self) -> tuple[np.ndarray, dict, dict]:
        params, sum_sq = self.ps.snapshot()
        optim = {"sum_sq": sum_sq} if sum_sq is not None else {}
        return params, optim, {"ps_counters": [int(x) for x in self.ps.counters()], "optimizer_steps": 0}

    def summary(self) -> dict:
        from hpcdnn.mpi.downpour import ps_summary

        return ps_summary(self.ps)

    def close(self) -> None:
        pass


def restore_servers(ps, saved) -> None:
    """Root, before any worker starts: put a checkpoint's parameters, accumulator and counters back on the servers."""
    from hpcdnn.mpi import param_server as psv

    counters = np.array(saved.state["ps_counters"], np.int64)
    if counters.size != ps.ctrl.counts[ps.head]:
        raise ValueError(
            f"the checkpoint was written by a Downpour run with another number of workers "
            f"({(counters.size - psv.WORKER_BASE) // psv.PER_WORKER}, now {len(ps.roles.workers)}); resume with the same mpirun -n"
        )
    counters[[psv.DONE, psv.STOP]] = 0
    counters[psv.WARM] = 1
    ps.load(saved.params, saved.optim.get("sum_sq"))
    ps.restore_counters(counters)
