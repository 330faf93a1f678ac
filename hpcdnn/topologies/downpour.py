"""Downpour SGD (`--topology=downpour`): replicas train asynchronously against a sharded parameter server.

    mpirun -n 4 python -m mpi4py -m hpcdnn train --config fashion_downpour --servers=1

Server ranks serve (hpcdnn/mpi/param_server.py: they apply every push to their shard) until the root worker ends
them; each worker runs the SGD step loop and hands every gradient to its DownpourWorker (hpcdnn/mpi/downpour.py:
push every n_push, fetch every n_fetch). The root worker logs, evaluates and checkpoints a snapshot of the servers
(parameters, optimizer state, every worker's row: position and counts) while the others keep pushing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hpcdnn import checkpoint as ck
from hpcdnn import trace
from hpcdnn.mpi import control as ctl
from hpcdnn.topologies.base import Run, my_part, part_sizes, restore_rng
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
            rows = np.array(saved.state["ps_rows"], np.int64)  # (partitions x) shards x rows x ROW
            rows = rows[None] if rows.ndim == 3 else rows
            if rows.shape[1] != cfg.servers:
                raise ValueError(
                    f"the checkpoint was written with --servers={rows.shape[1]}, now {cfg.servers}; resume with the same --servers"
                )
            resume = [ctl.resume_rows(r) for r in rows]
        # One parameter server per partition (--mp=K; one without): partition k's vector is sharded over every server,
        # and its workers are the ranks holding partition k, numbered by replica.
        sizes = part_sizes(run) if cfg.mp > 1 else [run.flat.numel]
        part = run.replica.part if run.replica is not None else 0
        self.pss = []
        for k, numel in enumerate(sizes):
            view = replace(roles, workers=roles.workers[k :: len(sizes)])
            initial = None
            if view.is_root:  # the servers hold the starting point before any worker fetches
                if saved:
                    initial = (my_part(run, saved.params, saved.state.get("mp_sizes")),
                               my_part(run, saved.optim[state_name], saved.state.get("mp_sizes")) if state_name in saved.optim else None,
                               None if rows is None else rows[k])  # fmt: skip
                else:
                    initial = run.flat.data.detach().cpu().numpy(), None, None
            self.pss.append(ParamServer(view, numel, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                        eps=cfg.adagrad_eps, push_dtype=cfg.push_dtype, rows=None if rows is None else rows.shape[2],
                                        initial=initial))  # fmt: skip
        self.ps, self.sizes = self.pss[part], sizes
        self.run, self.cfg, self.state_name = run, cfg, state_name
        self.rows = None if resume is None else resume[part]
        if roles.is_server:
            return
        super().__init__(run)
        from hpcdnn.mpi.downpour import DownpourWorker

        w = run.rank  # the replica: this rank's worker number on its partition's server
        row = self.rows[w] if self.rows is not None and w < self.rows.shape[0] else None
        self.worker = DownpourWorker(self.ps, run.flat, cfg, w, row=row)
        if saved:
            restore_rng(saved, run.rank, per_rank=False)
        self.worker.start(resumed=saved is not None)

    def serve(self) -> None:
        from hpcdnn.mpi.param_server import serve_all

        serve_all(self.pss)

    def position(self, saved) -> tuple[int, int, int]:
        """Where this worker resumes: its own row (steps, epoch, batch). A worker the checkpoint did not have starts
        at step 0 at the beginning of the epoch the slowest old worker was in."""

        if not saved:
            return super().position(saved)
        rows, w, at = self.rows, self.run.rank, None
        if self.run.in_root_replica:
            at = super().position(saved)
        elif w < rows.shape[0] and rows[w, ctl.SENT] > 0:
            at = int(rows[w, ctl.STEPS]), int(rows[w, ctl.EPOCH]), int(rows[w, ctl.BATCH])
        else:
            active = rows[rows[:, ctl.SENT] > 0]
            at = 0, int(active[:, ctl.EPOCH].min()) if active.size else saved.epoch, 0
        # the ranks of a replica step together: all take partition 0's position (--mp)
        return self.run.replica.comm.bcast(at, root=0) if self.run.replica is not None else at

    def apply(self, lr: float, epoch: int, next_batch: int) -> None:
        self.worker.step(lr, epoch, next_batch)

    @trace.traced("stop agreement", "comm", "comm")  # the STOP control word: set on a signal, read every step
    def stop_requested(self, signalled: bool) -> bool:
        if signalled:
            for ps in self.pss:  # every partition's workers read the STOP word of their own server
                ps.set_everywhere(ctl.STOP, 1)
        stop = signalled or self.worker.stop_requested()
        if self.run.replica is None:
            return stop
        from mpi4py import MPI

        return bool(self.run.replica.comm.allreduce(int(stop), op=MPI.MAX))  # a replica's ranks stop at the same step

    def totals(self) -> dict:
        """Push counts of every partition's server (one-sided reads of their rows), summed; staleness of partition 0."""
        every = [ps.summary() for ps in self.pss]
        out = dict(every[0])
        if len(every) > 1:
            for key in ("pushes_sent", "pushes_applied", "pushes_rejected", "rejected_nonfinite", "rejected_stale", "scaled_stale"):
                out[key] = sum(e[key] for e in every)
            out["partition_pushes"] = [{k: e[k] for k in ("pushes_sent", "pushes_applied", "pushes_rejected")} for e in every]
        return out

    def log_fields(self) -> dict:
        s = self.totals()
        return {"pushes_applied": s["pushes_applied"], "staleness_mean": s["staleness_mean"]}

    def refresh(self) -> None:
        self.worker.fetch()

    def state(self):
        if not self.run.in_root_replica:
            return None
        # Each shard is taken between two of its updates, with the rows of the pushes it holds; shards may differ by
        # pushes in flight. A resume starts every worker from the shard that had applied the fewest of its pushes
        # (control.resume_rows): a push caught half-applied is redone, so some shards apply it twice; none is lost,
        # and the counts stay exact (sent == applied + rejected). After a stop, every push is everywhere: exact.
        params, state, rows = self.ps.snapshot()
        extra = {"ps_rows": rows.tolist(), "optimizer_steps": 0}
        if self.run.replica is not None:  # every partition root snapshots its own server; the job root keeps them all
            got = self.run.replica.comm.gather((params, state, rows), root=0)
            if got is None:
                return None
            params = np.concatenate([p for p, _, _ in got])
            state = np.concatenate([s for _, s, _ in got]) if state is not None else None
            extra = {"ps_rows": [r.tolist() for _, _, r in got], "optimizer_steps": 0, "mp_sizes": self.sizes}
        optim = {self.state_name: state} if state is not None else {}
        return params, optim, extra, ck.capture_rng()

    def finish(self, epoch: int, pos: int) -> None:
        self.worker.finish(self.lr, epoch, pos)
        if self.run.in_root_replica:  # each partition's root: its server holds every worker's last push
            self.ps.wait_done(report=lambda m: print(f"hpcdnn: {m}", flush=True) if self.run.is_root else None)

    def images(self, step: int) -> int:
        return sum(self.ps.summary()["worker_steps"]) * self.cfg.batch_size

    def summary(self) -> dict:
        if not self.run.is_root:
            return {}
        totals = self.totals()
        error, warning = push_health(totals, self.cfg)
        if error:
            raise ValueError(error)
        if warning:
            print(f"hpcdnn: warning: {warning}", flush=True)
        return totals

    def close(self) -> None:
        if not self.run.is_server:
            super().close()
            if self.run.in_root_replica:
                self.ps.end()
        for ps in self.pss:
            ps.free()


def push_health(s: dict, cfg) -> tuple[str | None, str | None]:
    """(error, warning) from a finished run's push counts. When most pushes were rejected the model did not train, and
    a run that says "done" would hide it: the loss can stay finite while every gradient overflows on the wire."""
    sent, rejected = s["pushes_sent"], s["pushes_rejected"]
    counts = f"the servers rejected {rejected} of {sent} pushes ({s['rejected_nonfinite']} non-finite, {s['rejected_stale']} stale)"
    if rejected * 2 <= sent:
        return None, (counts if rejected * 10 > sent else None)  # over a tenth rejected: worth a warning
    fixes = []
    if s["rejected_nonfinite"]:
        fp16 = " or --push_dtype=bf16 (fp16 overflows above 65504)" if cfg.push_dtype == "fp16" else ""
        fixes.append(f"non-finite gradients: lower --lr (now {cfg.lr:g}){fp16}")
    if s["rejected_stale"]:
        fixes.append(f"stale pushes: raise --max_staleness (now {cfg.max_staleness}) or use --staleness_policy=scale")
    return f"{counts}, so the model barely trained; the checkpoint holds the servers' finite parameters. Fix {'; '.join(fixes)}", None
