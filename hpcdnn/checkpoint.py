"""Atomic HDF5 checkpoints: flat parameters, optimizer state, position, RNG states and the config. No pickle.

A checkpoint is written to a temporary file, fsynced and renamed, so a run killed at any moment leaves the previous
checkpoint intact. Layout:
  /params            float32 (P,)        the model's flat parameter vector
  /optim/<name>      float32 (P,)        optimizer state vectors (momentum buffer, Adagrad sum of squares)
  /rng/torch_cpu     uint8               torch's CPU generator (dropout); /rng/torch_cuda_<i> likewise
  attrs              step, epoch, batch (next batch in that epoch), config (TOML text), state (JSON: schedule etc.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdnn import trace
from hpcdnn.atomic import atomic_path, remove_stale_tmp

LATEST = "checkpoint.h5"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a run needs to continue exactly where it stopped."""

    params: np.ndarray
    optim: dict[str, np.ndarray]
    step: int
    epoch: int
    batch: int  # the next batch to run in `epoch`
    config: str  # TOML
    state: dict = field(default_factory=dict)  # JSON-able extras: lr schedule, best metric, wall time so far
    rng: dict[str, np.ndarray] = field(default_factory=dict)


def capture_rng() -> dict[str, np.ndarray]:
    """torch's generator states as uint8 arrays (the only RNG consumed during training: dropout)."""
    rng = {"torch_cpu": torch.get_rng_state().numpy().copy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s.numpy().copy()
    return rng


def restore_rng(rng: dict[str, np.ndarray]) -> None:
    if "torch_cpu" in rng:
        torch.set_rng_state(torch.from_numpy(rng["torch_cpu"].copy()))
    cuda = [torch.from_numpy(rng[k].copy()) for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@trace.traced("checkpoint write", "driver", "driver")
def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Atomically write `ckpt` to `path`."""
    path = Path(path)
    remove_stale_tmp(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("params", data=np.asarray(ckpt.params, dtype=np.float32))
        g = f.create_group("optim")
        for name, arr in sorted(ckpt.optim.items()):
            g.create_dataset(name, data=np.asarray(arr, dtype=np.float32))
        r = f.create_group("rng")
        for name, arr in sorted(ckpt.rng.items()):
            r.create_dataset(name, data=np.asarray(arr, dtype=np.uint8))
        f.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "step": ckpt.step,
                "epoch": ckpt.epoch,
                "batch": ckpt.batch,
                "config": ckpt.config,
                "state": json.dumps(ckpt.state, sort_keys=True),
            }
        )


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint file was written at, without reading its arrays (None if unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["step"])
    except (OSError, KeyError, ValueError):
        return None


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; start without --resume, or point --run_dir at the run to continue")
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: checkpoint format {version!r}, this hpcdnn reads {FORMAT_VERSION}")
            return Checkpoint(
                params=f["params"][...],
                optim={k: v[...] for k, v in f["optim"].items()},
                step=int(f.attrs["step"]),
                epoch=int(f.attrs["epoch"]),
                batch=int(f.attrs["batch"]),
                config=str(f.attrs["config"]),
                state=json.loads(f.attrs["state"]),
                rng={k: v[...] for k, v in f["rng"].items()},
            )
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 checkpoint ({e}); it may be truncated — use an earlier one") from e
