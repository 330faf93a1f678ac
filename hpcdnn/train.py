"""The one training driver: config → roles and placement → data set and model → topology → loop → checkpoints,
evaluation, metrics and summary, for every topology (hpcdnn/topologies: local, allreduce, downpour, sandblaster).

    hpcdnn train --config fashion_small --run_dir runs/fm              # Fashion-MNIST, alexnet_small, 2 CPU cores
    hpcdnn train --config fashion_small --run_dir runs/fm --resume     # continue exactly where it stopped
    hpcdnn train --config fashion_small --run_dir runs/fm --overwrite  # replace it (without either: refused, nothing changed)
    hpcdnn train --config imagenet_alexnet --data /scratch/imagenet --run_dir runs/alexnet
    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_downpour --servers=1
    mpirun -n 2 python -m mpi4py -m hpcdnn train --config fashion_small --topology=allreduce
    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster

A topology says what a step is (hpcdnn/topologies/base.py); this file counts steps, logs, checkpoints, evaluates
and stops. SIGUSR1 or SIGTERM (Slurm's --signal=B:USR1@lead, preemption, time limit): every rank finishes its step,
the root writes a checkpoint and run_dir/preempted.json, and the run exits 0; `--resume` continues it.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcdnn import checkpoint as ck
from hpcdnn import heartbeat, trace, watchdog
from hpcdnn import stop as stopsig
from hpcdnn.atomic import write_bytes
from hpcdnn.config import Config, apply, resolve
from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import load_manifest
from hpcdnn.evaluate import evaluate
from hpcdnn.metrics import MetricsLog
from hpcdnn.models import build_model
from hpcdnn.models.flat import FlatParams
from hpcdnn.optim import Schedule
from hpcdnn.placement import Placement
from hpcdnn.progress import Bar
from hpcdnn.topologies import topology
from hpcdnn.topologies.base import Run

# keys a resumed run may change: they do not change the trajectory (topologies add their own: `resumable`)
RESUMABLE = {"epochs", "max_steps", "log_every", "checkpoint_every", "eval_ten_crop", "device", "threads", "run_dir", "placement",
             "tensorboard", "trace", "stall_timeout"}  # fmt: skip


@dataclass
class Position:
    """Where the run is: steps so far, the epoch, steps done in it, training seconds, the last evaluation."""

    step: int
    epoch: int
    pos: int
    elapsed: float = 0.0
    last_val: dict = field(default_factory=dict)


def train(cfg: Config, resume: bool = False, comm=None, overwrite: bool = False) -> dict:
    """Run (or continue) training as `cfg` says; returns the summary (also written to run_dir/summary.json).

    `comm` (MPI.COMM_WORLD from the CLI) is required by every topology but local.
    """
    kind = topology(cfg.topology)
    stop = stopsig.install()  # from here on SIGUSR1/SIGTERM only set a flag, on every rank (servers too)
    run, val_split = setup(cfg, resume, comm, kind, overwrite)
    heartbeat.note(role="server" if run.is_server else "worker")  # for `hpcdnn launch`'s watcher (no-op without one)
    trace.start(cfg.trace, run.roles.comm if run.roles else None, "server" if run.is_server else "worker", run.is_root)  # collective
    topo = kind(run)  # collective: windows, communicators, restored state
    if run.is_server:  # Downpour's servers serve until every worker is done
        topo.serve()
        topo.close()
        trace.finish()  # collective: rank 0 writes cfg.trace
        stopsig.end_cleanly(run.roles, run.run_dir, 0, None, stopped=False, servers=True)  # tell the root: ended cleanly
        run.roles.free()
        stop.close()
        return {}
    saved = run.saved
    at = Position(*topo.position(saved))
    if saved:
        at.elapsed, at.last_val = saved.state["elapsed"], saved.state.get("last_val", {})
    total = sum(topo.steps_in_epoch(e) for e in range(cfg.epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if run.is_root:
        write_bytes(run.run_dir / "config.toml", cfg.to_toml().encode())
        servers = f", {len(run.roles.servers)} server(s)" if run.roles and run.roles.servers else ""
        mp = f" x {cfg.mp} ranks (model parallel)" if run.replica is not None else ""
        print(f"hpcdnn: {run.model_name} ({run.param_total:,} parameters) on {run.device}, {cfg.topology}: {run.world} worker(s){mp}"
              f"{servers}, {run.manifest['splits']['train']['count']} training images, {topo.steps_in_epoch(at.epoch)} steps/epoch per "
              f"worker, {'resuming at step ' + str(at.step) if saved else 'starting'} → {total} steps", flush=True)  # fmt: skip
    log = MetricsLog(run.run_dir, enabled=run.is_root, resume_step=at.step if saved else None, tensorboard=cfg.tensorboard)
    val_data = ShardLoader(cfg.data, val_split, 256, train=False, **run.loader_args()) if run.in_root_replica else None
    stopped = loop(run, topo, at, total, log, val_data, stop)
    stop.close()
    with watchdog.paused():  # the slowest worker may finish long after the rest, and the root evaluates alone
        topo.finish(at.epoch, at.pos)  # Downpour: last push, report done; the root waits for every worker
        if topo.final_checkpoint:
            save_checkpoint(run, topo, at)
        summary = {"preempted": True, "steps": at.step} if stopped else final_summary(run, topo, at, log, val_data, val_split)
    log.close()
    if val_data is not None:
        val_data.close()
    # a stop is a preemption (root: preempted.json) only if every rank ends cleanly: workers before teardown, servers after
    stopsig.end_cleanly(run.roles, run.run_dir, at.step, stop.received, stopped, servers=False)
    topo.close()
    trace.finish()
    stopsig.end_cleanly(run.roles, run.run_dir, at.step, stop.received, stopped, servers=True)
    if run.replica is not None:
        run.replica.free()
    if run.roles:
        run.roles.free()
    return summary


def setup(cfg: Config, resume: bool, comm, kind, overwrite: bool = False) -> tuple[Run, str]:
    """Roles, placement, the run directory, the checkpoint to resume from, the data set's manifest and the model (collective)."""
    n_servers, roles = kind.n_servers(cfg), None
    if n_servers is not None:
        if comm is None:
            raise ValueError(f"--topology={cfg.topology} runs under MPI: mpirun -n N python -m mpi4py -m hpcdnn train ...")
        from hpcdnn.mpi.roles import split_roles

        roles = split_roles(comm, n_servers, cfg.placement)
    is_root, is_server = roles is None or roles.is_root, roles is not None and roles.is_server
    replica = None
    if cfg.mp > 1 and not is_server:
        from hpcdnn.mpi.roles import split_replicas

        replica = split_replicas(roles, cfg.mp)  # collective over the workers
    root_result(roles, lambda: ck.claim_run_dir(cfg.run_dir, resume, overwrite) if is_root else None)  # another run's dir: refused
    place = Placement.decide(cfg.device, cfg.threads, roles.comm if roles else None, computing=not is_server)
    saved = root_result(roles, lambda: ck.load(Path(cfg.run_dir) / ck.LATEST) if resume else None)
    if saved:
        check_resume(cfg, apply(Config(), tomllib.loads(saved.config), "checkpoint"), RESUMABLE | kind.resumable)
    torch.manual_seed(cfg.seed)
    manifest = load_manifest(cfg.data)
    model_name, val_split, crop = resolve(cfg, manifest)
    model = make_model(cfg, model_name, manifest, crop, replica, is_server)
    model = model if next(model.parameters()).is_meta else model.to(place.device)
    sched = Schedule(cfg.lr_schedule, cfg.lr, factor=cfg.lr_factor, step_epochs=cfg.lr_step_epochs, patience=cfg.plateau_patience,
                     epochs=cfg.epochs, warmup=cfg.warmup_epochs)  # fmt: skip
    if saved and "schedule" in saved.state:
        sched.load(saved.state["schedule"])
    run = Run(cfg, comm, roles, place.device, place.threads, model, FlatParams(model), model_name, crop, manifest, sched, saved,
              replica)  # fmt: skip
    run.param_total = replica.comm.allreduce(run.flat.param_count) if replica is not None else run.flat.param_count
    run.data_sha256 = ck.manifest_sha256(cfg.data)
    if saved:  # every rank: re-prepared data, another world size
        ck.check_fit(saved, cfg, run.world, kind.same_world)
    return run, val_split


WHOLE_FIRST = 256 << 20  # parameter bytes up to which a model is built whole and then sliced (same init as --mp=1)


def make_model(cfg: Config, name: str, manifest: dict, crop: int, replica, is_server: bool) -> torch.nn.Module:
    """The model this rank holds: the whole model, or its partition of a replica (--mp=K). alexnet with --mp=2 is the
    paper's two towers (hpcdnn/mpi/towers.py); any other split is by output units (hpcdnn/mpi/partition.py). A model
    bigger than WHOLE_FIRST is never built whole with --mp > 1: each rank initialises only its slices."""
    shape, classes = tuple(manifest["image_shape"]), len(manifest["classes"])
    with torch.device("meta"):
        meta = build_model(name, classes, shape, crop)
    budget_check(cfg, meta, crop, shape[2])
    if replica is None:
        return meta if is_server and cfg.mp > 1 else build_model(name, classes, shape, crop)  # servers use only sizes
    if name == "alexnet" and replica.size == 2:
        from hpcdnn.mpi.towers import AlexNetTowers

        return AlexNetTowers(build_model(name, classes, shape, crop), replica.comm)
    from hpcdnn.mpi.partition import partition_model

    whole = sum(p.numel() for p in meta.parameters()) * 4 <= WHOLE_FIRST
    return partition_model(build_model(name, classes, shape, crop) if whole else meta, replica.comm)


def budget_check(cfg: Config, meta: torch.nn.Module, crop: int, channels: int) -> None:
    """--rank_memory_gb: refuse at start a model whose estimated memory on one rank exceeds the budget, naming --mp.
    Activations count whole on every rank (a partitioned model's activations are replicated)."""
    if not cfg.rank_memory_gb:
        return
    from hpcdnn.memory import activation_bytes_per_sample, check_budget, rank_bytes
    from hpcdnn.mpi.partition import layers, partition_numel, plan

    acts = activation_bytes_per_sample(meta, (channels, crop, crop))

    def need(k: int) -> int:
        worst = 0
        for r in range(k):
            largest = max((len(plan(layer, k, r, name).rows) * math.prod(layer.weight.shape[1:]) for _, _, name, layer in layers(meta)),
                          default=0)  # fmt: skip
            worst = max(worst, rank_bytes(partition_numel(meta, k, r), topology=cfg.topology, optimizer=cfg.optimizer,
                                          momentum=cfg.momentum, batch_size=cfg.batch_size, activations_bytes=acts,
                                          largest_param=largest, n_push=cfg.n_push, overlap=cfg.overlap))  # fmt: skip
        return worst

    check_budget(cfg.rank_memory_gb, need, cfg.mp, f"{type(meta).__name__} on {crop}x{crop}x{channels}")


def loop(run: Run, topo, at: Position, total: int, log: MetricsLog, val_data, stop) -> bool:
    """Epoch after epoch of the topology's steps, logging, checkpointing and evaluating; True if a signal stopped it."""
    cfg, stopped = run.cfg, False
    bar = Bar(total, at.step, enabled=run.is_root)
    window_t, window_images, window_loss = time.perf_counter(), 0, []
    while at.step < total and not stopped:
        t_last = time.perf_counter()  # training time counts waiting for data, not evaluation
        n = topo.steps_in_epoch(at.epoch)
        steps = topo.epoch(at.epoch, at.pos)
        for result in steps:
            at.step, at.pos = at.step + 1, at.pos + 1
            now = time.perf_counter()
            at.elapsed, t_last = at.elapsed + now - t_last, now
            window_images += result.images
            window_loss.append(result.loss)
            if not math.isfinite(result.loss):  # every rank checks its own; the CLI ends the whole job (exit 2)
                raise ValueError(diverged(run, f"the loss is {result.loss} at step {at.step}"))
            bar.update(loss=f"{result.loss:.3f}", **result.bar)
            heartbeat.note(step=at.step)
            if at.step % cfg.log_every == 0 or at.step == total:
                log.log(step=at.step, epoch=round(at.epoch + at.pos / n, 4), time=round(at.elapsed, 3), loss=float(np.mean(window_loss)),
                        images_per_s=round(window_images / max(now - window_t, 1e-9), 1), **result.log,
                        **(topo.log_fields() if run.is_root else {}))  # fmt: skip
                window_t, window_images, window_loss = time.perf_counter(), 0, []
            if topo.stop_requested(stop.received is not None):
                stopped = True
                break
            if cfg.checkpoint_every and at.step % cfg.checkpoint_every == 0:
                save_checkpoint(run, topo, at)
            if at.step >= total:
                break
        steps.close()
        if not stopped and at.pos < n and at.step < total:  # the topology ended the epoch early: only a stop does that
            stopped = topo.stop_requested(stop.received is not None)
            if not stopped:
                raise RuntimeError(f"epoch {at.epoch} ended after {at.pos} of {n} steps without a stop (a bug, please report)")
        if at.pos >= n:  # a full epoch: evaluate (root), adapt the rate, checkpoint
            with watchdog.paused():  # the other ranks wait for the root's evaluation: no stall
                end_epoch(run, topo, at, log, val_data)
            window_t = time.perf_counter()
        save_checkpoint(run, topo, at)  # Downpour: the root's snapshot of the servers while the others keep pushing
    bar.close()
    return stopped


@trace.traced("evaluate", "driver", "driver")
def end_epoch(run: Run, topo, at: Position, log: MetricsLog, val_data) -> None:
    if run.in_root_replica:  # every rank of the evaluating replica (--mp) takes part in its forward passes
        topo.refresh()
        at.last_val = evaluate(run.model, val_data)
    at.last_val = topo.share(at.last_val)
    at.epoch, at.pos = at.epoch + 1, 0
    if at.last_val:
        run.sched.end_epoch(at.last_val["top1"])
        log.log(step=at.step, epoch=at.epoch, time=round(at.elapsed, 3), val_top1=at.last_val["top1"], val_top5=at.last_val["top5"],
                val_loss=at.last_val["loss"])  # fmt: skip
    if run.is_root:
        v = at.last_val
        print(f"hpcdnn: epoch {at.epoch}: val top-1 {v['top1']:.4f}, top-5 {v['top5']:.4f} ({at.elapsed:.0f} s training)", flush=True)


@trace.traced("checkpoint", "driver", "driver")
def save_checkpoint(run: Run, topo, at: Position) -> None:
    """Collective where the topology's state is spread over ranks; the root writes."""
    got = topo.state()
    if got is None:
        return
    params, optim, extra, rng = got
    if not np.isfinite(params).all():  # never replace a good checkpoint with a diverged one
        raise ValueError(diverged(run, f"the parameters are not finite at step {at.step}"))
    state = {"schedule": run.sched.state(), "elapsed": at.elapsed, "last_val": at.last_val, "model": run.model_name, **extra}
    ck.save(run.run_dir / ck.LATEST, ck.Checkpoint(params, optim, at.step, at.epoch, at.pos, run.cfg.to_toml(), state, rng, run.data_sha256,
                                                   run.world, len(run.roles.workers) if run.roles else 1, run.cfg.mp))  # fmt: skip


@trace.traced("final evaluation", "driver", "driver")
def final_summary(run: Run, topo, at: Position, log: MetricsLog, val_data, val_split: str) -> dict:
    """The root's final evaluation (centre crop, optionally 10-crop) and summary.json, shared as the topology shares."""
    extra = topo.summary()  # collective (Sandblaster sums its portion counts)
    cfg = run.cfg
    if run.in_root_replica:
        topo.refresh()
        final = evaluate(run.model, val_data)
        if cfg.eval_ten_crop:
            ten = ShardLoader(cfg.data, val_split, 64, train=False, ten_crop=True, **run.loader_args())
            final |= {f"{k}_10crop": v for k, v in evaluate(run.model, ten).items()}
            ten.close()
    if not run.is_root:
        return topo.share({})
    last = min(at.epoch, cfg.epochs - 1)
    summary = {
        "topology": cfg.topology,
        "model": run.model_name,
        "parameters": run.param_total,
        "device": str(run.device),
        "epochs": round(at.epoch + at.pos / topo.steps_in_epoch(last), 3),
        "steps": at.step,
        "images_per_s": round(topo.images(at.step) / max(at.elapsed, 1e-9), 1),
        "train_time_s": round(at.elapsed, 2),
        "val_split": val_split,
        "val_top1": final["top1"],
        "val_top5": final["top5"],
        "val_loss": final["loss"],
        **extra,
    }
    if cfg.eval_ten_crop:
        summary.update(val_top1_10crop=final["top1_10crop"], val_top5_10crop=final["top5_10crop"])
    log.write_summary(summary)  # summary.json (and TensorBoard)
    (run.run_dir / stopsig.PREEMPTED).unlink(missing_ok=True)
    print(
        f"hpcdnn: done: val top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}; {summary['images_per_s']} img/s; summary in {cfg.run_dir}"
    )
    return topo.share(summary)


def diverged(run: Run, what: str) -> str:
    """The divergence error: what went non-finite, which checkpoint is kept, and the fixes."""
    kept = run.run_dir / ck.LATEST
    kept = f"{kept} (step {ck.step_of(kept)}) is kept" if kept.is_file() else "no checkpoint was written"
    return (f"training diverged: {what}; {kept}. Lower --lr (now {run.cfg.lr:g}), add --warmup_epochs, or clip the "
            f"data's outliers; --resume with a lower --lr continues from the checkpoint")  # fmt: skip


def check_resume(cfg: Config, saved: Config, resumable: set[str]) -> None:
    """A resumed run must keep every setting that shapes its trajectory."""
    diff = [k for k in vars(cfg) if k not in resumable and getattr(cfg, k) != getattr(saved, k)]
    if diff:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise ValueError(f"--resume with settings that differ from the checkpoint ({detail}); drop those overrides or use a new --run_dir")


def root_result(roles, fn):
    """fn() on the root, broadcast to every rank with the exception it raised (every rank raises it): one reader."""
    if roles is None:
        return fn()
    result = None
    if roles.is_root:
        try:
            result = fn()
        except (OSError, ValueError) as e:
            result = e
    result = roles.comm.bcast(result, root=roles.root)
    if isinstance(result, Exception):
        raise result
    return result
