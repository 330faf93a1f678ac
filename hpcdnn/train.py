"""Train one model replica: config → data → model → optimizer → loop → evaluation, checkpoints and metrics.

    hpcdnn train --config fashion_small --run_dir runs/fm              # Fashion-MNIST, alexnet_small, 2 CPU cores
    hpcdnn train --config fashion_small --run_dir runs/fm --resume     # continue exactly where it stopped
    hpcdnn train --config imagenet_alexnet --data /scratch/imagenet --run_dir runs/alexnet
    hpcdnn eval --run_dir runs/fm [--ten_crop]

    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_small --topology=downpour --servers=1 --optimizer=adagrad
    mpirun -n 2 python -m mpi4py -m hpcdnn train --config fashion_small --topology=allreduce
    mpirun -n 3 python -m mpi4py -m hpcdnn train --config fashion_sandblaster --topology=sandblaster

One loop serves the local, allreduce and Downpour topologies (hpcdnn/topology.py: what happens after backward);
Downpour's server ranks only serve (hpcdnn/mpi/param_server.py); Sandblaster, a batch optimizer, has its own loop.
SIGUSR1 or SIGTERM (Slurm's --signal=B:USR1@lead, preemption, time limit): every rank finishes its step, the root
writes a checkpoint and run_dir/preempted.json, and the run exits 0; `--resume` continues it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn import checkpoint as ck
from hpcdnn import stop as stopsig
from hpcdnn.atomic import write_bytes
from hpcdnn.config import Config, apply
from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import load_manifest
from hpcdnn.evaluate import evaluate
from hpcdnn.metrics import Bar, MetricsLog, write_summary
from hpcdnn.models import build_model, default_model
from hpcdnn.models.flat import FlatParams
from hpcdnn.mpi.roles import set_threads
from hpcdnn.optim import Schedule
from hpcdnn.topologies.sgd import Allreduce, Downpour, Local, restore_servers

# keys that may differ between a run and its resumption: they do not change the trajectory (the Sandblaster timing
# knobs change only which rank computes which portion)
RESUMABLE = {"epochs", "max_steps", "log_every", "checkpoint_every", "eval_ten_crop", "device", "threads", "run_dir", "placement",
             "slow_rank", "slow_factor", "sb_backup_after", "sb_dynamic"}  # fmt: skip


def pick_device(name: str, local: int = 0) -> torch.device:
    """CUDA when present (or asked for), else CPU; never hard-coded. Ranks sharing a node take GPUs round-robin."""
    if name == "auto":
        return torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but torch sees no CUDA device; use --device=auto or cpu")
    return torch.device(name)


def local_rank(comm) -> int:
    """This rank's index among the ranks of `comm` on the same node (collective)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = node.Get_rank()
    node.Free()
    return rank


def resolve(cfg: Config, manifest: dict) -> tuple[str, str, int]:
    """The model name, evaluation split and crop implied by `cfg` and the data set."""
    shape = tuple(manifest["image_shape"])
    model = cfg.model if cfg.model != "auto" else default_model(shape)
    splits = manifest["splits"]
    val = cfg.val_split if cfg.val_split != "auto" else ("val" if "val" in splits else "test")
    if val not in splits:
        raise ValueError(f"--val_split={val}: {cfg.data} has splits {sorted(splits)}")
    crop = cfg.crop or (227 if model == "alexnet" else shape[0])
    return model, val, crop


def check_resume(cfg: Config, saved: Config) -> None:
    """A resumed run must keep every setting that shapes its trajectory."""
    diff = [k for k in vars(cfg) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k)]
    if diff:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise ValueError(f"--resume with settings that differ from the checkpoint ({detail}); drop those overrides or use a new --run_dir")


def rng_states(topo, roles) -> dict | None:
    """The RNG state(s) a checkpoint keeps: this process's, or (allreduce) every rank's gathered on the root."""
    mine = ck.capture_rng()
    if not isinstance(topo, Allreduce):
        return mine
    every = roles.comm.gather(mine, root=roles.root)
    if every is None:
        return None
    return {(f"w{r}_{k}" if r else k): v for r, states in enumerate(every) for k, v in states.items()}


def train(cfg: Config, resume: bool = False, comm=None) -> dict:
    """Run (or continue) training as `cfg` says; returns the summary (also written to run_dir/summary.json).

    `comm` (MPI.COMM_WORLD from the CLI) is required for the distributed topologies and ignored for local.
    """
    if cfg.topology == "sandblaster":
        from hpcdnn.topologies.sandblaster import train_sandblaster

        return train_sandblaster(cfg, resume, comm)
    # ---- roles, threads, checkpoint, data, model
    roles = None
    if cfg.topology != "local":
        from hpcdnn.mpi.roles import split_roles

        if comm is None:
            raise ValueError(f"--topology={cfg.topology} runs under MPI: mpirun -n N python -m mpi4py -m hpcdnn train ...")
        roles = split_roles(comm, cfg.servers if cfg.topology == "downpour" else 0, cfg.placement)
    is_root, is_server = roles is None or roles.is_root, roles is not None and roles.is_server
    stop = stopsig.install()  # from here on SIGUSR1/SIGTERM only set a flag, on every rank (servers too: they end with the workers)
    rank, world = (roles.index, len(roles.workers)) if roles and not is_server else (0, 1)
    run_dir = Path(cfg.run_dir)
    if is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
    node_rank = local_rank(comm) if roles else 0  # collective: every rank, servers too
    device = torch.device("cpu") if is_server else pick_device(cfg.device, node_rank)
    threads = cfg.threads
    if not threads:
        from hpcdnn.mpi.roles import threads_per_rank

        threads = threads_per_rank(comm, computing=not is_server) if roles else len(os.sched_getaffinity(0))
    set_threads(threads)
    saved = ck.load(run_dir / ck.LATEST) if resume else None
    if saved:
        import tomllib

        check_resume(cfg, apply(Config(), tomllib.loads(saved.config), "checkpoint"))
    torch.manual_seed(cfg.seed)
    manifest = load_manifest(cfg.data)
    model_name, val_split, crop = resolve(cfg, manifest)
    num_classes, shape = len(manifest["classes"]), tuple(manifest["image_shape"])
    model = build_model(model_name, num_classes, shape, crop).to(device)
    flat = FlatParams(model)
    if rank:
        torch.manual_seed(cfg.seed + rank)  # same initial model everywhere, different dropout per replica

    # ---- topology: what happens to a gradient (Downpour's servers serve here until every worker is done)
    if cfg.topology == "downpour":
        from hpcdnn.mpi.param_server import ParamServer

        ps = ParamServer(roles, flat.numel, adagrad=cfg.optimizer == "adagrad", atomic_fetch=cfg.atomic_fetch)
        if is_root:
            restore_servers(ps, saved) if saved else ps.load(flat.data.detach().cpu().numpy())
        comm.Barrier()  # the servers hold the starting point before any worker fetches
        if is_server:
            ps.serve()
            ps.free()
            roles.free()
            stop.close()
            return {}
        topo = Downpour(cfg, flat, roles, ps)
    else:
        topo = Allreduce(cfg, flat, roles) if roles else Local(cfg, flat)

    loader_args = dict(crop=crop, pad=cfg.pad, device=device)
    train_data = ShardLoader(
        cfg.data, "train", cfg.batch_size, rank=rank, world=world, seed=cfg.seed, train=True, flip=cfg.flip, pca_std=cfg.pca_std,
        **loader_args,
    )  # fmt: skip
    val_data = ShardLoader(cfg.data, val_split, 256, train=False, **loader_args)
    steps_per_epoch = len(train_data)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    sched = Schedule(cfg.lr_schedule, cfg.lr, factor=cfg.lr_factor, step_epochs=cfg.lr_step_epochs, patience=cfg.plateau_patience,
                     epochs=cfg.epochs, warmup=cfg.warmup_epochs)  # fmt: skip
    step, epoch, batch, elapsed, last_val = 0, 0, 0, 0.0, {}
    if saved:
        if not isinstance(topo, Downpour):
            flat.load_flat(saved.params)
        sched.load(saved.state["schedule"])
        prefix = f"w{rank}_" if rank and isinstance(topo, Allreduce) else ""
        ck.restore_rng({k[len(prefix) :]: v for k, v in saved.rng.items() if k.startswith(prefix)})
        step, epoch, batch, elapsed = saved.step, saved.epoch, saved.batch, saved.state["elapsed"]
        last_val = saved.state.get("last_val", {})
        if isinstance(topo, Downpour) and not is_root:  # each worker continues from its own position
            from hpcdnn.mpi import param_server as psv

            row = psv.worker_row(saved.state["ps_counters"], rank)
            step, epoch, batch = row[psv.STEPS], row[psv.EPOCH], row[psv.BATCH]
    topo.start(saved)
    if is_root:
        write_bytes(run_dir / "config.toml", cfg.to_toml().encode())
        where = f"{cfg.topology}: {world} worker(s)" + (f", {len(roles.servers)} server(s)" if isinstance(topo, Downpour) else "")
        print(f"hpcdnn: {model_name} ({flat.param_count:,} parameters) on {device}, {where}, {manifest['splits']['train']['count']} "
              f"training images, {steps_per_epoch} steps/epoch per worker, {'resuming at step ' + str(step) if saved else 'starting'} "
              f"→ {total} steps", flush=True)  # fmt: skip
    log = MetricsLog(run_dir, enabled=is_root, resume_step=step if saved else None)

    def save_checkpoint(next_epoch: int, next_batch: int) -> None:
        rng = rng_states(topo, roles)  # collective for allreduce: every rank calls save_checkpoint at the same step
        if is_root:
            params, optim, extra = topo.state()
            state = {"schedule": sched.state(), "elapsed": elapsed, "last_val": last_val, "model": model_name, **extra}
            ck.save(run_dir / ck.LATEST, ck.Checkpoint(params, optim, step, next_epoch, next_batch, cfg.to_toml(), state, rng))

    # ---- the loop: one epoch after another, evaluating and checkpointing at each end
    stopped = False
    bar = Bar(total, step, enabled=is_root)
    window_t, window_images, window_loss = time.perf_counter(), 0, []
    lr = sched.lr(epoch + batch / steps_per_epoch)
    while step < total and not stopped:
        model.train()
        t_last = time.perf_counter()  # training time counts waiting for data, not evaluation
        for x, y in train_data.iter_epoch(epoch, start_batch=batch):
            lr = sched.lr(epoch + batch / steps_per_epoch)
            flat.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step, batch = step + 1, batch + 1
            topo.step(lr, epoch, batch)
            if torch.get_num_threads() != threads:  # a first parallel Numba kernel resets the shared OpenMP pool
                torch.set_num_threads(threads)
            now = time.perf_counter()
            elapsed, t_last = elapsed + now - t_last, now
            window_images += len(y)
            window_loss.append(loss.item())
            bar.update(loss=f"{window_loss[-1]:.3f}", lr=f"{lr:.2g}")
            if step % cfg.log_every == 0 or step == total:
                rate = window_images / (time.perf_counter() - window_t)
                extra = {k: v for k, v in topo.summary().items() if k in ("pushes_applied", "staleness_mean")} if is_root else {}
                log.log(step=step, epoch=epoch + batch / steps_per_epoch, time=round(elapsed, 3), loss=float(np.mean(window_loss)), lr=lr,
                        images_per_s=round(rate, 1), **extra)  # fmt: skip
                window_t, window_images, window_loss = time.perf_counter(), 0, []
            if topo.stop_requested(stop.received is not None):
                stopped = True
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(epoch, batch)
            if step >= total:
                break
        if batch >= steps_per_epoch:  # a full epoch: evaluate (root), adapt the rate, checkpoint
            if is_root:
                topo.refresh()
                last_val = evaluate(model, val_data)
            last_val = topo.share(last_val)
            epoch, batch = epoch + 1, 0
            if is_root or last_val:
                sched.end_epoch(last_val["top1"])
                log.log(step=step, epoch=epoch, time=round(elapsed, 3), val_top1=last_val["top1"], val_top5=last_val["top5"],
                        val_loss=last_val["loss"])  # fmt: skip
            if is_root:
                print(f"hpcdnn: epoch {epoch}: val top-1 {last_val['top1']:.4f}, top-5 {last_val['top5']:.4f} ({elapsed:.0f} s training)")
            window_t = time.perf_counter()
        save_checkpoint(epoch, batch)  # Downpour: the root's snapshot of the servers while the others keep pushing
    bar.close()
    stop.close()
    topo.finish(lr, epoch, batch)  # Downpour: last push, report done; the root waits for every worker
    if isinstance(topo, Downpour) and is_root:
        save_checkpoint(epoch, batch)

    # ---- final evaluation and summary on the root; then the collective teardown
    summary = {}
    if stopped:
        if is_root:
            stopsig.mark_preempted(run_dir, step, stop.received)
        summary = {"preempted": True, "steps": step}
    elif is_root:
        summary = finish_run(cfg, model, flat, topo, val_data, loader_args, val_split, model_name, device, step, steps_per_epoch, elapsed)
        (run_dir / stopsig.PREEMPTED).unlink(missing_ok=True)
    log.close()
    train_data.close()
    val_data.close()
    topo.close()
    if isinstance(topo, Downpour):
        topo.ps.free()
    if roles:
        roles.free()
    return summary


def finish_run(cfg, model, flat, topo, val_data, loader_args, val_split, model_name, device, step, steps_per_epoch, elapsed) -> dict:
    """The root's final evaluation (centre crop, optionally 10-crop) and summary.json."""
    final = evaluate(model, val_data)
    if cfg.eval_ten_crop:
        ten = ShardLoader(cfg.data, val_split, 64, train=False, ten_crop=True, **loader_args)
        final |= {f"{k}_10crop": v for k, v in evaluate(model, ten).items()}
        ten.close()
    extra = topo.summary()
    replicas_steps = sum(extra.get("worker_steps", [])) or step * extra.get("workers", 1)
    summary = {
        "topology": cfg.topology,
        "model": model_name,
        "parameters": flat.param_count,
        "device": str(device),
        "epochs": round(step / steps_per_epoch, 3),
        "steps": step,
        "images_per_s": round(replicas_steps * cfg.batch_size / max(elapsed, 1e-9), 1),
        "train_time_s": round(elapsed, 2),
        "val_split": val_split,
        "val_top1": final["top1"],
        "val_top5": final["top5"],
        "val_loss": final["loss"],
        **extra,
    }
    if cfg.eval_ten_crop:
        summary.update(val_top1_10crop=final["top1_10crop"], val_top5_10crop=final["top5_10crop"])
    write_summary(Path(cfg.run_dir), summary)
    print(
        f"hpcdnn: done: val top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}; {summary['images_per_s']} img/s; summary in {cfg.run_dir}"
    )
    return summary
