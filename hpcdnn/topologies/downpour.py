"""Downpour SGD (`--topology=downpour`): replicas train asynchronously against a sharded parameter server.

    mpirun -n 4 python -m mpi4py -m hpcdnn train --config fashion_downpour --servers=1

Server ranks serve (hpcdnn/mpi/param_server.py: they apply every push to their shard) until the root worker ends
them; each worker runs the SGD step loop and hands every gradient to its DownpourWorker (hpcdnn/mpi/downpour.py:
push every n_push, fetch every n_fetch). The root worker logs, evaluates and checkpoints a snapshot of the servers
(parameters, optimizer state, every worker's row: position and counts) while the others keep pushing.
"""

from __future__ import annotations

import numpy as np

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
        state_name = "sum_sq" if cfg.optimizer == "adagrad" else "momentum_buffer"
        rows = resume = None
        if saved:
            if "ps_rows" not in saved.state:
                raise ValueError(
                    "this Downpour checkpoint was written before the servers applied the updates (its counters are the old "
                    "layout); it cannot be resumed by this version: start a new --run_dir"
                )
            rows = np.array(saved.state["ps_rows"], np.int64)  # shards x rows x ROW
            if rows.shape[0] != cfg.servers:
                raise ValueError(
                    f"the checkpoint was written with --servers={rows.shape[0]}, now {cfg.servers}; resume with the same --servers"
                )
            resume = ctl.resume_rows(rows)
        initial = None
        if roles.is_root:  # the servers hold the starting point before any worker fetches
            if saved:
                initial = saved.params, saved.optim.get(state_name), rows
            else:
                initial = run.flat.data.detach().cpu().numpy(), None, None
        self.ps = ParamServer(roles, run.flat.numel, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              eps=cfg.adagrad_eps, push_dtype=cfg.push_dtype, rows=None if rows is None else rows.shape[1],
                              initial=initial)  # fmt: skip
        self.run, self.cfg, self.state_name = run, cfg, state_name
        self.rows = resume
        if roles.is_server:
            return
        super().__init__(run)
        from hpcdnn.mpi.downpour import DownpourWorker

        row = resume[roles.index] if resume is not None and roles.index < resume.shape[0] else None
        self.worker = DownpourWorker(self.ps, run.flat, cfg, roles.index, row=row)
        if saved:
            restore_rng(saved, run.rank, per_rank=False)
        self.worker.start(resumed=saved is not None)

    def serve(self) -> None:
        self.ps.serve()

    def position(self, saved) -> tuple[int, int, int]:
        """Where this worker resumes: its own row (steps, epoch, batch). A worker the checkpoint did not have starts
        at step 0 at the beginning of the epoch the slowest old worker was in."""
        from hpcdnn.mpi import control as ctl

        if not saved:
            return super().position(saved)
        rows, w = self.rows, self.run.roles.index
        if w < rows.shape[0] and rows[w, ctl.SENT] > 0:
            if self.run.is_root:
                return super().position(saved)
            return int(rows[w, ctl.STEPS]), int(rows[w, ctl.EPOCH]), int(rows[w, ctl.BATCH])
        active = rows[rows[:, ctl.SENT] > 0]
        return 0, int(active[:, ctl.EPOCH].min()) if active.size else saved.epoch, 0

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        self.worker.step(lr, epoch, next_batch)

    @trace.traced("stop agreement", "comm", "comm")  # the STOP control word: set on a signal, read every step
    def stop_requested(self, signalled: bool) -> bool:
        if signalled:
            self.worker.request_stop()
            return True
        return self.worker.stop_requested()

    def log_fields(self) -> dict:
        s = self.ps.summary()
        return {"pushes_applied": s["pushes_applied"], "staleness_mean": s["staleness_mean"]}

    def refresh(self) -> None:
        self.worker.fetch()

    def state(self):
        if not self.run.is_root:
            return None
        # Each shard is taken between two of its updates, with the rows of the pushes it holds; shards may differ by
        # pushes in flight. A resume starts every worker from the shard that had applied the fewest of its pushes
        # (control.resume_rows): a push caught half-applied is redone, so some shards apply it twice; none is lost,
        # and the counts stay exact (sent == applied + rejected). After a stop, every push is everywhere: exact.
        params, state, rows = self.ps.snapshot()
        optim = {self.state_name: state} if state is not None else {}
        extra = {"ps_rows": rows.tolist(), "optimizer_steps": 0}
        return params, optim, extra, ck.capture_rng()

    def finish(self, epoch: int, pos: int) -> None:
        self.worker.finish(self.lr, epoch, pos)
        if self.run.is_root:
            self.ps.wait_done(report=lambda m: print(f"hpcdnn: {m}", flush=True))

    def images(self, step: int) -> int:
        return sum(self.ps.summary()["worker_steps"]) * self.cfg.batch_size

    def summary(self) -> dict:
        return self.ps.summary() if self.run.is_root else {}

    def close(self) -> None:
        if not self.run.is_server:
            super().close()
        if self.run.is_root:
            self.ps.end()
        self.ps.free()
