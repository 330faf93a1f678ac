"""Downpour SGD (`--topology=downpour`): replicas train asynchronously against a sharded parameter server.

    mpirun -n 4 python -m mpi4py -m hpcdnn train --config fashion_downpour --servers=1

Server ranks only serve (hpcdnn/mpi/param_server.py) until every worker reports done; each worker runs the SGD step
loop and hands every gradient to its DownpourWorker (hpcdnn/mpi/downpour.py: push every n_push, fetch every
n_fetch). The root worker logs, evaluates and checkpoints a snapshot of the servers (parameters, Adagrad
accumulator, the control words with every worker's position) while the others keep pushing.
"""

from __future__ import annotations

from hpcdnn import checkpoint as ck
from hpcdnn import trace
from hpcdnn.topologies.base import Run, restore_rng
from hpcdnn.topologies.sgd import SGD


class Downpour(SGD):
    name = "downpour"
    final_checkpoint = True  # the servers' state settles only when every worker is done

    @classmethod
    def n_servers(cls, cfg) -> int | None:
        return cfg.servers

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.lr_schedule == "plateau":
            raise ValueError(
                "--topology=downpour with --lr_schedule=plateau: only the root worker evaluates, so the others could not "
                "follow a plateau schedule; use --lr_schedule=cosine, step or constant"
            )

    def __init__(self, run: Run) -> None:
        from hpcdnn.mpi import control as ctl
        from hpcdnn.mpi.param_server import ParamServer

        cfg, roles, saved = run.cfg, run.roles, run.saved
        self.ps = ParamServer(roles, run.flat.numel, adagrad=cfg.optimizer == "adagrad", atomic_fetch=cfg.atomic_fetch)
        if roles.is_root:  # the servers hold the starting point before any worker fetches
            if saved:
                self.ps.load(saved.params, saved.optim.get("sum_sq"))
                self.ps.control.restore(ctl.for_resume(saved.state["ps_counters"], len(roles.workers)))
            else:
                self.ps.load(run.flat.data.detach().cpu().numpy())
        roles.comm.Barrier()
        self.run, self.cfg = run, cfg
        if roles.is_server:
            return
        super().__init__(run)
        from hpcdnn.mpi.downpour import DownpourWorker

        self.worker = DownpourWorker(self.ps, run.flat, cfg, roles.index)
        if saved:  # every worker continues its own counts and position
            row = ctl.worker_row(saved.state["ps_counters"], roles.index)
            self.worker.sent, self.worker.steps = int(row[ctl.SENT]), int(row[ctl.STEPS])
            restore_rng(saved, run.rank, per_rank=False)
        self.worker.start(resumed=saved is not None)

    def serve(self) -> None:
        self.ps.serve()

    def position(self, saved) -> tuple[int, int, int]:
        from hpcdnn.mpi import control as ctl

        if not saved or self.run.is_root:
            return super().position(saved)
        row = ctl.worker_row(saved.state["ps_counters"], self.run.rank)
        return int(row[ctl.STEPS]), int(row[ctl.EPOCH]), int(row[ctl.BATCH])

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        self.worker.step(lr, epoch, next_batch)

    @trace.traced("stop agreement", "comm", "comm")  # the STOP control word: set on a signal, read every step
    def stop_requested(self, signalled: bool) -> bool:
        if signalled:
            self.worker.request_stop()
            return True
        return self.worker.stop_requested()

    def log_fields(self) -> dict:
        s = self.ps.control.summary()
        return {"pushes_applied": s["pushes_applied"], "staleness_mean": s["staleness_mean"]}

    def refresh(self) -> None:
        self.worker.fetch()

    def state(self):
        if not self.run.is_root:
            return None
        # Counters first, then parameters: every push counted is in the parameters (its count is written after its
        # updates); a push that lands in between is in the parameters but not counted, so its worker redoes that step
        # after a resume: at least once, never lost, and sent == applied + rejected stays exact. (A stop, unlike a
        # periodic checkpoint, waits for every worker and is exact.)
        counters = self.ps.control.snapshot()
        params, sum_sq = self.ps.snapshot()
        optim = {"sum_sq": sum_sq} if sum_sq is not None else {}
        extra = {"ps_counters": [int(x) for x in counters], "optimizer_steps": 0}
        return params, optim, extra, ck.capture_rng()

    def finish(self, epoch: int, pos: int) -> None:
        self.worker.finish(self.lr, epoch, pos)
        if self.run.is_root:
            self.ps.wait_done(report=lambda m: print(f"hpcdnn: {m}", flush=True))

    def images(self, step: int) -> int:
        return sum(self.ps.control.summary()["worker_steps"]) * self.cfg.batch_size

    def summary(self) -> dict:
        return self.ps.summary() if self.run.is_root else {}

    def close(self) -> None:
        if not self.run.is_server:
            super().close()
        self.ps.free()
