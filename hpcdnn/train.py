"""Train one model replica: config → data → model → optimizer → loop → evaluation, checkpoints and metrics.

    hpcdnn train --config fashion_small --run_dir runs/fm              # Fashion-MNIST, alexnet_small, 2 CPU cores
    hpcdnn train --config fashion_small --run_dir runs/fm --resume     # continue exactly where it stopped
    hpcdnn train --config imagenet_alexnet --data /scratch/imagenet --run_dir runs/alexnet
    hpcdnn eval --run_dir runs/fm [--ten_crop]

This is the `local` topology (one process). The distributed topologies (Downpour, allreduce, Sandblaster) reuse
the same pieces: the flat parameter buffer, the loader with rank/world, the update kernels and the bookkeeping.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn import checkpoint as ck
from hpcdnn.atomic import write_bytes
from hpcdnn.config import Config, apply
from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import load_manifest
from hpcdnn.evaluate import evaluate
from hpcdnn.metrics import Bar, MetricsLog, write_summary
from hpcdnn.models import build_model, default_model
from hpcdnn.models.flat import FlatParams
from hpcdnn.optim import FlatOptimizer, Schedule

# keys that may differ between a run and its resumption (they do not change the trajectory)
RESUMABLE = {"epochs", "max_steps", "log_every", "checkpoint_every", "eval_ten_crop", "device", "threads", "run_dir"}


def pick_device(name: str) -> torch.device:
    """CUDA when present (or asked for), else CPU; never hard-coded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but torch sees no CUDA device; use --device=auto or cpu")
    return torch.device(name)


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


def train(cfg: Config, resume: bool = False, is_root: bool = True) -> dict:
    """Run (or continue) training as `cfg` says; returns the summary (also written to run_dir/summary.json)."""
    # ---- setup
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
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
    opt = FlatOptimizer(cfg.optimizer, flat.data, flat.grad, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eps=cfg.adagrad_eps)
    loader_args = dict(crop=crop, pad=cfg.pad, device=device)
    train_data = ShardLoader(
        cfg.data, "train", cfg.batch_size, seed=cfg.seed, train=True, flip=cfg.flip, pca_std=cfg.pca_std, **loader_args
    )
    val_data = ShardLoader(cfg.data, val_split, 256, train=False, **loader_args)
    steps_per_epoch = len(train_data)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    sched = Schedule(cfg.lr_schedule, cfg.lr, factor=cfg.lr_factor, step_epochs=cfg.lr_step_epochs, patience=cfg.plateau_patience,
                     epochs=cfg.epochs, warmup=cfg.warmup_epochs)  # fmt: skip
    step, epoch, batch, elapsed, last_val = 0, 0, 0, 0.0, {}
    if saved:
        flat.load_flat(saved.params)
        opt.load_state(saved.optim, saved.state["optimizer_steps"])
        sched.load(saved.state["schedule"])
        ck.restore_rng(saved.rng)
        step, epoch, batch, elapsed = saved.step, saved.epoch, saved.batch, saved.state["elapsed"]
        last_val = saved.state.get("last_val", {})
    if is_root:
        write_bytes(run_dir / "config.toml", cfg.to_toml().encode())
        print(f"hpcdnn: {model_name} ({flat.param_count:,} parameters) on {device}, {manifest['splits']['train']['count']} training images, "
              f"{steps_per_epoch} steps/epoch, {'resuming at step ' + str(step) if saved else 'starting'} → {total} steps")  # fmt: skip
    log = MetricsLog(run_dir, enabled=is_root, resume_step=step if saved else None)

    def save_checkpoint(next_epoch: int, next_batch: int) -> None:
        if is_root:
            state = {"optimizer_steps": opt.steps, "schedule": sched.state(), "elapsed": elapsed, "last_val": last_val, "model": model_name}
            ckpt = ck.Checkpoint(
                flat.state_dict_flat().cpu().numpy(),
                opt.state_arrays(),
                step,
                next_epoch,
                next_batch,
                cfg.to_toml(),
                state,
                ck.capture_rng(),
            )
            ck.save(run_dir / ck.LATEST, ckpt)

    # ---- the loop: one epoch after another, evaluating and checkpointing at each end
    bar = Bar(total, step, enabled=is_root)
    window_t, window_images, window_loss = time.perf_counter(), 0, []
    while step < total:
        model.train()
        t_last = time.perf_counter()  # training time counts waiting for data, not evaluation
        for x, y in train_data.iter_epoch(epoch, start_batch=batch):
            lr = sched.lr(epoch + batch / steps_per_epoch)
            flat.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(lr)
            now = time.perf_counter()
            elapsed, t_last = elapsed + now - t_last, now
            step, batch = step + 1, batch + 1
            window_images += len(y)
            window_loss.append(loss.item())
            bar.update(loss=f"{window_loss[-1]:.3f}", lr=f"{lr:.2g}")
            if step % cfg.log_every == 0 or step == total:
                rate = window_images / (time.perf_counter() - window_t)
                log.log(step=step, epoch=epoch + batch / steps_per_epoch, time=round(elapsed, 3), loss=float(np.mean(window_loss)), lr=lr,
                        images_per_s=round(rate, 1))  # fmt: skip
                window_t, window_images, window_loss = time.perf_counter(), 0, []
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(epoch, batch)
            if step >= total:
                break
        if batch >= steps_per_epoch:  # a full epoch: evaluate, adapt the rate, checkpoint
            last_val = evaluate(model, val_data)
            sched.end_epoch(last_val["top1"])
            epoch, batch = epoch + 1, 0
            log.log(
                step=step,
                epoch=epoch,
                time=round(elapsed, 3),
                val_top1=last_val["top1"],
                val_top5=last_val["top5"],
                val_loss=last_val["loss"],
            )
            if is_root:
                print(f"hpcdnn: epoch {epoch}: val top-1 {last_val['top1']:.4f}, top-5 {last_val['top5']:.4f} ({elapsed:.0f} s training)")
            window_t = time.perf_counter()
        save_checkpoint(epoch, batch)
    bar.close()

    # ---- final evaluation and summary
    final = evaluate(model, val_data)
    if cfg.eval_ten_crop:
        ten = ShardLoader(cfg.data, val_split, 64, train=False, ten_crop=True, **loader_args)
        final |= {f"{k}_10crop": v for k, v in evaluate(model, ten).items()}
        ten.close()
    summary = {
        "topology": cfg.topology,
        "model": model_name,
        "parameters": flat.param_count,
        "device": str(device),
        "epochs": round(step / steps_per_epoch, 3),
        "steps": step,
        "images_per_s": round(step * cfg.batch_size / max(elapsed, 1e-9), 1),
        "train_time_s": round(elapsed, 2),
        "val_split": val_split,
        "val_top1": final["top1"],
        "val_top5": final["top5"],
        "val_loss": final["loss"],
    }
    if cfg.eval_ten_crop:
        summary.update(val_top1_10crop=final["top1_10crop"], val_top5_10crop=final["top5_10crop"])
    log.close()
    if is_root:
        write_summary(run_dir, summary)
        print(
            f"hpcdnn: done: val top-1 {final['top1']:.4f}, top-5 {final['top5']:.4f}; {summary['images_per_s']} img/s; summary in {run_dir}"
        )
    train_data.close()
    val_data.close()
    return summary
