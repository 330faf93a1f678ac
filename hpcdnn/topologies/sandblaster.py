"""Sandblaster L-BFGS (DistBelief, Dean et al. 2012) with allreduce: `hpcdnn train --topology=sandblaster`.

    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster --data=DIR --run_dir=runs/sandblaster-fm --threads=1
    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster --data=DIR --run_dir=runs/sandblaster-fm --resume
    mpirun -n 3 python -m mpi4py -m hpcdnn train ... --slow_rank=1 --slow_factor=3      # one straggler: backup tasks at work

One iteration: the gradient of the batch (portions claimed from rank 0's counter, summed by one Allreduce:
mpi/portions.py), a direction from the sharded history (mpi/lbfgs.py), a line search on the same batch, and the new
(s, y) pair. `batch_size` is the global batch (all ranks together); a new batch is drawn every `sb_batch_iters`
iterations and may grow every epoch (`sb_batch_growth`, progressive batching). Every rank reads the whole batch, so any
rank can compute any portion. Within a batch the objective is a fixed function: no dropout unless --sb_dropout (then the
masks are seeded by batch and portion), augmentation drawn once per batch. Rank 0 coordinates, evaluates, logs and
checkpoints (the history is gathered to it); `lr`, `momentum` and `optimizer` are not used (see sb_step).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hpcdnn import checkpoint as ck
from hpcdnn import stop as stopsig
from hpcdnn.atomic import write_bytes
from hpcdnn.config import Config, apply
from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import load_manifest
from hpcdnn.evaluate import evaluate
from hpcdnn.metrics import Bar, MetricsLog, write_summary
from hpcdnn.models import build_model
from hpcdnn.models.flat import FlatParams
from hpcdnn.mpi.lbfgs import ShardedLBFGS, line_search
from hpcdnn.mpi.portions import Objective, Portions, PortionStats
from hpcdnn.mpi.roles import set_threads, threads_per_rank
from hpcdnn.topologies.sandblaster_data import ModelPortions, auto_portions

COUNTERS = ("lbfgs_iterations", "gradient_evals", "line_search_evals", "line_search_failures", "samples_counted")


def train_sandblaster(cfg: Config, resume: bool = False, comm=None) -> dict:
    """Run (or continue) Sandblaster L-BFGS as `cfg` says on every rank of `comm`; returns the summary on every rank."""
    from hpcdnn.train import check_resume, pick_device, resolve

    # ---- setup: ranks, threads, checkpoint (read on the root, broadcast), data, model
    if comm is None:
        raise ValueError("--topology=sandblaster runs under MPI: mpirun -n N python -m mpi4py -m hpcdnn train --topology=sandblaster ...")
    rank, world = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    run_dir = Path(cfg.run_dir)
    if is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    threads = cfg.threads or threads_per_rank(comm)
    set_threads(threads)
    saved = _bcast_result(comm, lambda: ck.load(run_dir / ck.LATEST) if resume else None)
    if saved:
        import tomllib

        check_resume(cfg, apply(Config(), tomllib.loads(saved.config), "checkpoint"))
    torch.manual_seed(cfg.seed)
    manifest = load_manifest(cfg.data)
    model_name, val_split, crop = resolve(cfg, manifest)
    model = build_model(model_name, len(manifest["classes"]), tuple(manifest["image_shape"]), crop).to(device)
    model.train(cfg.sb_dropout)  # LRN and pooling act the same either way; dropout only if asked for
    flat = FlatParams(model)
    n_train = manifest["splits"]["train"]["count"]

    def batch_size(epoch: int) -> int:
        return min(n_train, round(cfg.batch_size * cfg.sb_batch_growth**epoch))

    def batches(epoch: int) -> int:
        return n_train // batch_size(epoch)

    total = cfg.sb_batch_iters * sum(batches(e) for e in range(cfg.epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    count = cfg.sb_portions or auto_portions(cfg.batch_size, world)
    portions = Portions(count, comm=comm, dynamic=cfg.sb_dynamic, backup_after=cfg.sb_backup_after, slow_rank=cfg.slow_rank,
                        slow_factor=cfg.slow_factor)  # fmt: skip
    fn = ModelPortions(model, flat, count, cfg.sb_chunk, dropout=cfg.sb_dropout, seed=cfg.seed)
    x = fn.x
    objective = Objective(fn, portions, x, comm=comm, weight_decay=cfg.weight_decay)
    opt = ShardedLBFGS(flat.numel, cfg.sb_history, comm=comm, dtype=np.float32)
    loader_args = dict(crop=crop, pad=cfg.pad, device=device, workers=threads)
    val_data = ShardLoader(cfg.data, val_split, 256, train=False, **loader_args) if is_root else None

    step, epoch, batch, inner, elapsed, last_val = 0, 0, 0, 0, 0.0, {}
    f, g = 0.0, None  # loss and gradient at x on the current batch (None: evaluate first)
    batch_loss = float("nan")  # the loss of the current batch before any step on it
    base = dict.fromkeys(COUNTERS, 0)  # counts of earlier processes of this run (resume)
    portion_base = np.zeros(len(PortionStats().as_array()), np.int64)
    if saved:
        st = saved.state
        x[:] = saved.params
        opt.load_state(saved.optim["lbfgs_basis"], st["lbfgs"])
        step, epoch, batch, inner, elapsed, last_val = saved.step, saved.epoch, saved.batch, st["inner"], st["elapsed"], st["last_val"]
        f, g = (st["f"], saved.optim["grad"].copy()) if "grad" in saved.optim else (0.0, None)
        batch_loss = st["batch_loss"]
        base, portion_base = st["counters"], np.array(st["portion_stats"], np.int64)
    ls_evals, ls_failures = base["line_search_evals"], base["line_search_failures"]

    def counters() -> dict:
        return {"lbfgs_iterations": step, "gradient_evals": base["gradient_evals"] + objective.evaluations, "line_search_evals": ls_evals,
                "line_search_failures": ls_failures, "samples_counted": base["samples_counted"] + objective.samples}  # fmt: skip

    def portion_totals() -> np.ndarray:  # collective
        return portion_base + comm.allreduce(portions.stats.as_array(), op=MPI.SUM)

    def save_checkpoint() -> None:  # collective: gathers the sharded history on the root
        crcs = comm.allgather(zlib.crc32(x.view(np.uint8)))
        if len(set(crcs)) > 1:  # every rank applies the same steps to its replica: they must stay bitwise equal
            raise RuntimeError(f"replicas diverged by step {step}: parameter CRC32 per rank {crcs} (a bug, please report)")
        basis, meta = opt.state()
        totals = portion_totals()
        if is_root:
            optim = {"lbfgs_basis": basis} | ({"grad": g} if g is not None else {})
            state = {"inner": inner, "f": f, "batch_loss": batch_loss, "lbfgs": meta, "elapsed": elapsed, "last_val": last_val, "model": model_name,
                     "counters": counters(), "portion_stats": totals.tolist()}  # fmt: skip
            ck.save(run_dir / ck.LATEST, ck.Checkpoint(x.copy(), optim, step, epoch, batch, cfg.to_toml(), state, ck.capture_rng()))

    if is_root:
        write_bytes(run_dir / "config.toml", cfg.to_toml().encode())
        print(f"hpcdnn: sandblaster L-BFGS, {model_name} ({flat.param_count:,} parameters) on {device}, {world} rank(s), batch "
              f"{batch_size(epoch)} in {count} portions, history {cfg.sb_history}, {'resuming at step ' + str(step) if saved else 'starting'}"
              f" → {total} iterations", flush=True)  # fmt: skip
    log = MetricsLog(run_dir, enabled=is_root, resume_step=step if saved else None)

    # ---- the loop: epochs of batches; on each batch sb_batch_iters L-BFGS iterations
    stop, stopped = stopsig.install(), False
    bar = Bar(total, step, enabled=is_root)
    window_t, window_samples = time.perf_counter(), counters()["samples_counted"]
    while step < total and not stopped:
        objective.expected = batch_size(epoch)
        train_data = ShardLoader(cfg.data, "train", batch_size(epoch), seed=cfg.seed, train=True, flip=cfg.flip, pca_std=cfg.pca_std,
                                 prefetch=1, **loader_args)  # fmt: skip
        t_last = time.perf_counter()
        for images, labels in train_data.iter_epoch(epoch, start_batch=batch):
            if step >= total:
                break
            fn.set_batch(images, labels, (epoch, batch))
            objective.stop_vote = stop.received is not None
            if g is None:  # a new batch: its gradient at the current point (its loss estimates the training loss)
                f, g = objective()
                batch_loss = f
            while inner < cfg.sb_batch_iters and step < total and not objective.stop_agreed:
                d, gtd = opt.direction(g)
                objective.stop_vote = stop.received is not None
                ls = line_search(objective, x, d, f, gtd, opt.first_step(cfg.sb_step), mode=cfg.sb_line_search, max_evals=cfg.sb_ls_max,
                                 slope=lambda g_new, d=d: opt.dot(g_new, d))  # fmt: skip
                if ls.ok:
                    opt.propose(ls.t, d, ls.g)
                    f, g = ls.f, ls.g
                else:
                    opt.reset()  # x is back where it was; steepest descent with a short first step next
                step, inner, ls_evals, ls_failures = step + 1, inner + 1, ls_evals + ls.evals, ls_failures + (not ls.ok)
                now = time.perf_counter()
                elapsed, t_last = elapsed + now - t_last, now
                bar.update(loss=f"{f:.4f}", t=f"{ls.t:.2g}")
                if step % cfg.log_every == 0 or step == total:
                    samples = counters()["samples_counted"]
                    log.log(step=step, epoch=round(epoch + (batch + inner / cfg.sb_batch_iters) / batches(epoch), 4), time=round(elapsed, 3),
                            loss=f, new_batch_loss=batch_loss, step_length=ls.t, line_search_evals=ls.evals, batch_size=batch_size(epoch),
                            images_per_s=round((samples - window_samples) / max(now - window_t, 1e-9), 1))  # fmt: skip
                    window_t, window_samples = now, samples
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save_checkpoint()
            stopped = objective.stop_agreed
            if inner < cfg.sb_batch_iters or stopped:
                break
            batch, inner, g = batch + 1, 0, None
        train_data.close()
        if batch >= batches(epoch):  # a full epoch: evaluate on the root, checkpoint
            if is_root:
                fn.load_params()
                last_val = evaluate(model, val_data)
                log.log(step=step, epoch=epoch + 1, time=round(elapsed, 3), val_top1=last_val["top1"], val_top5=last_val["top5"],
                        val_loss=last_val["loss"])  # fmt: skip
                print(f"hpcdnn: epoch {epoch + 1}: val top-1 {last_val['top1']:.4f}, train loss {f:.4f} ({elapsed:.0f} s)", flush=True)
            epoch, batch = epoch + 1, 0
        save_checkpoint()
    bar.close()
    stop.close()

    # ---- final evaluation and summary on the root, shared with every rank
    totals = portion_totals()
    summary = {}
    if stopped:
        if is_root:
            stopsig.mark_preempted(run_dir, step, stop.received)
        summary = {"preempted": True, "steps": step}
    elif is_root:
        fn.load_params()
        final = evaluate(model, val_data)
        won, backup, backup_won, discarded, abandoned = totals.tolist()
        last = min(epoch, cfg.epochs - 1)
        summary = {
            "topology": cfg.topology, "model": model_name, "parameters": flat.param_count, "device": str(device), "ranks": world,
            "epochs": round(epoch + batch / batches(last), 3), "steps": step,
            "images_per_s": round(counters()["samples_counted"] / max(elapsed, 1e-9), 1), "train_time_s": round(elapsed, 2),
            "val_split": val_split, "val_top1": final["top1"], "val_top5": final["top5"], "val_loss": final["loss"],
            "train_loss": f, "batch_size": batch_size(last), "portions": count, "portions_total": won, "portions_backup": backup,
            "portions_backup_won": backup_won, "portions_discarded": discarded, "portions_abandoned": abandoned, **counters(),
            "pairs_rejected": opt.pairs_rejected,
        }  # fmt: skip
        write_summary(run_dir, summary)
        (run_dir / stopsig.PREEMPTED).unlink(missing_ok=True)
        print(f"hpcdnn: done: val top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}; {summary['images_per_s']} img/s; "
              f"{backup} backup portions; summary in {run_dir}", flush=True)  # fmt: skip
    summary = comm.bcast(summary, root=0)
    log.close()
    if val_data is not None:
        val_data.close()
    portions.free()
    return summary


def _bcast_result(comm, fn):
    """Run fn on rank 0 and broadcast its result, or the exception it raised (every rank raises it)."""
    result = None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except (OSError, ValueError) as e:
            result = e
    result = comm.bcast(result, root=0)
    if isinstance(result, Exception):
        raise result
    return result
