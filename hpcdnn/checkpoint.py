"""Atomic HDF5 checkpoints: flat parameters, optimizer state, position, RNG states and the config. No pickle.

A checkpoint is written to a temporary file, fsynced and renamed, so a run killed at any moment leaves the previous
checkpoint intact. Layout:
  /params            float32 (P,)        the model's flat parameter vector
  /optim/<name>      float32 (P,)        optimizer state vectors (momentum buffer, Adagrad sum of squares)
  /rng/torch_cpu     uint8               torch's CPU generator (dropout); /rng/torch_cuda_<i> likewise
  attrs              step, epoch, batch (next batch in that epoch), config (TOML text), state (JSON: schedule etc.),
                     checksum (sha256 of every array), manifest_sha256 (the data it trained on), world, workers, mp
A checkpoint is untrusted input (like torch's `weights_only`): `load` reads nothing but a plain file of hard-linked
float/uint8 datasets in this layout, refuses HDF5 external storage, virtual datasets and soft/external links before
reading any array, then checks the checksum and that the parameters are finite.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdnn import trace
from hpcdnn.atomic import NoSpaceError, atomic_path, remove_stale_tmp
from hpcdnn.data.schema import foreign_storage, open_readonly

LATEST = "checkpoint.h5"
FORMAT_VERSION = 2  # 2: checksum, manifest fingerprint and world sizes (version 1 had none: refused, see load)
ATTRS = ("step", "epoch", "batch", "config", "state", "checksum", "manifest_sha256", "world", "workers", "mp")
DTYPES = {"params": np.float32, "optim": np.float32, "rng": np.uint8}  # the only datasets a checkpoint holds


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
    manifest_sha256: str = ""  # sha256 of the data's manifest.json it trained on (a resume on re-prepared data is refused)
    world: int = 1  # replicas that wrote it (allreduce/sandblaster positions count in batches of this many replicas)
    workers: int = 1  # worker ranks that wrote it (world x mp)
    mp: int = 1  # ranks per replica


def manifest_sha256(data_dir: str | Path) -> str:
    """The fingerprint of a data-prep directory: sha256 of its manifest.json bytes ("" if it has none)."""
    path = Path(data_dir) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def checksum(params: np.ndarray, optim: dict[str, np.ndarray], rng: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in a fixed order: a flipped byte changes it."""
    h = hashlib.sha256()
    named = [("params", params)] + [(f"optim/{k}", optim[k]) for k in sorted(optim)] + [(f"rng/{k}", rng[k]) for k in sorted(rng)]
    for name, arr in named:
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\0".encode())
        h.update(arr.data)
    return h.hexdigest()


def capture_rng() -> dict[str, np.ndarray]:
    """torch's generator states as uint8 arrays (the only RNG consumed during training: dropout)."""
    rng = {"torch_cpu": torch.get_rng_state().numpy().copy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s.numpy().copy()
    return rng


def restore_rng(rng: dict[str, np.ndarray]) -> None:
    """Put torch's generator states back (the CPU one, and the CUDA ones when there is CUDA)."""
    if "torch_cpu" in rng:
        torch.set_rng_state(torch.from_numpy(rng["torch_cpu"].copy()))
    cuda = [torch.from_numpy(rng[k].copy()) for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@trace.traced("checkpoint write", "driver", "driver")
def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Atomically write `ckpt` to `path`; a full disk raises NoSpaceError and keeps the previous checkpoint."""
    path = Path(path)
    params = np.asarray(ckpt.params, dtype=np.float32)
    optim = {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.optim.items()}
    rng = {k: np.asarray(v, dtype=np.uint8) for k, v in ckpt.rng.items()}
    remove_stale_tmp(path)
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=params)
            g = f.create_group("optim")
            for name, arr in sorted(optim.items()):
                g.create_dataset(name, data=arr)
            r = f.create_group("rng")
            for name, arr in sorted(rng.items()):
                r.create_dataset(name, data=arr)
            f.attrs.update(
                {
                    "format_version": FORMAT_VERSION,
                    "step": ckpt.step,
                    "epoch": ckpt.epoch,
                    "batch": ckpt.batch,
                    "config": ckpt.config,
                    "state": json.dumps(ckpt.state, sort_keys=True),
                    "checksum": checksum(params, optim, rng),
                    "manifest_sha256": ckpt.manifest_sha256,
                    "world": ckpt.world,
                    "workers": ckpt.workers,
                    "mp": ckpt.mp,
                }
            )
    except NoSpaceError as e:  # atomic_path removed the temporary; say which checkpoint survives
        kept = f"the previous checkpoint {path} (step {step_of(path)}) is kept" if path.is_file() else "no earlier checkpoint exists"
        message = f"no space left on device writing {path}; {kept}. Free space or move --run_dir, then --resume"
        raise NoSpaceError(message, path, e.in_hdf5) from None


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint file was written at, without reading its arrays (None if unreadable)."""
    try:
        with open_readonly(path) as f:
            return int(f.attrs["step"])
    except (OSError, KeyError, ValueError):
        return None


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save`, refusing anything else with an error naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; start without --resume, or point --run_dir at the run to continue")
    try:
        with open_readonly(path, "resume from an earlier checkpoint, or start afresh") as f:  # no lock: Lustre/GPFS without flock
            arrays = check_layout(path, f)  # before any array is read
            attrs = read_attrs(path, f)
            if arrays["params"].ndim != 1:
                raise ValueError(bad(path, f"/params has shape {arrays['params'].shape}, expected a flat vector"))
            values = {name: ds[...] for name, ds in arrays.items()}
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 checkpoint ({e}); it may be truncated — use an earlier one") from e
    optim = {k[len("optim/") :]: v for k, v in values.items() if k.startswith("optim/")}
    rng = {k[len("rng/") :]: v for k, v in values.items() if k.startswith("rng/")}
    got, recorded = checksum(values["params"], optim, rng), attrs.pop("checksum")
    if got != recorded:
        raise ValueError(bad(path, f"its arrays' sha256 is {got[:16]}…, the checkpoint records {recorded[:16]}… (corrupted)"))
    if not np.isfinite(values["params"]).all():
        raise ValueError(bad(path, f"{int((~np.isfinite(values['params'])).sum()):,} of its parameters are NaN or infinite"))
    return Checkpoint(params=values["params"], optim=optim, rng=rng, **attrs)


def bad(path: Path, what: str) -> str:
    """The error for a checkpoint that is not what `save` writes: the file, the fault and the fix."""
    return f"{path}: refused as a checkpoint: {what}; resume from an intact checkpoint, or start afresh (--overwrite or a new --run_dir)"


def check_layout(path: Path, f: h5py.File) -> dict[str, h5py.Dataset]:
    """The datasets of `f` by name ("params", "optim/NAME", "rng/NAME"), checked without reading any data: each a
    hard link to a dataset stored in this file (schema.foreign_storage: no external storage, virtual mapping, soft or
    external link), of the layout's dtype. Walks one level at a time and never follows a link (visititems would)."""
    missing = [name for name in DTYPES if name not in f.keys()]
    if missing:
        raise ValueError(bad(path, f"/{', /'.join(missing)} missing"))
    found = {}
    for name in f.keys():
        if name == "params":
            found[name] = plain_dataset(path, f, name, name)
        elif name in DTYPES and isinstance(f.get(name, getlink=True), h5py.HardLink) and isinstance(f[name], h5py.Group):
            found.update({f"{name}/{sub}": plain_dataset(path, f[name], sub, f"{name}/{sub}") for sub in f[name].keys()})
        else:
            raise ValueError(bad(path, f"/{name} is not part of a checkpoint (expected /params, /optim/NAME, /rng/NAME as stored)"))
    return found


def plain_dataset(path: Path, group: h5py.Group, name: str, full: str) -> h5py.Dataset:
    """Dataset `name` of `group` if its bytes are in this file and its dtype is the layout's (see check_layout)."""
    why = foreign_storage(group, name)
    if why:
        raise ValueError(bad(path, f"/{full} {why}"))
    want = np.dtype(DTYPES[full.split("/")[0]])
    if group[name].dtype != want:
        raise ValueError(bad(path, f"/{full} has dtype {group[name].dtype}, expected {want}"))
    return group[name]


def read_attrs(path: Path, f: h5py.File) -> dict:
    """The position, config, state, checksum, fingerprint and world sizes, each present and of its type."""
    version = f.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {version}, this hpcdnn reads {FORMAT_VERSION} (format 1 has no checksum or data "
            "fingerprint, so it cannot be trusted); resume it with the hpcdnn that wrote it, or start a new --run_dir"
        )
    missing = [k for k in ATTRS if k not in f.attrs]
    if missing:
        raise ValueError(bad(path, f"attribute(s) {', '.join(missing)} missing"))
    out = {}
    for key in ATTRS:
        value = f.attrs[key]
        want = str if key in ("config", "state", "checksum", "manifest_sha256") else int
        if want is str and isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str if want is str else (int, np.integer)):
            raise ValueError(bad(path, f"attribute {key} is {type(value).__name__} {value!r}, expected {want.__name__}"))
        out[key] = want(value)
    try:
        out["state"] = json.loads(out["state"])
    except json.JSONDecodeError as e:
        raise ValueError(bad(path, f"its state attribute is not valid JSON ({e})")) from None
    try:
        tomllib.loads(out["config"])
    except tomllib.TOMLDecodeError as e:
        raise ValueError(bad(path, f"its config attribute is not valid TOML ({e})")) from None
    if not isinstance(out["state"], dict):
        raise ValueError(bad(path, f"its state attribute is JSON {type(out['state']).__name__}, expected an object"))
    return out


def claim_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Create `run_dir` for a run, refusing (before any byte in it changes) a fresh run into another run's directory:
    its checkpoint, summary, preemption mark or metrics would be lost. --overwrite removes them and starts afresh."""
    from hpcdnn.metrics import METRICS, SUMMARY
    from hpcdnn.stop import PREEMPTED

    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError(f"--resume continues the run in {run_dir}, --overwrite replaces it: give one of them")
    if not resume:
        theirs = [n for n in (LATEST, SUMMARY, PREEMPTED, METRICS) if (run_dir / n).is_file() and (run_dir / n).stat().st_size]
        if theirs and not overwrite:
            raise ValueError(
                f"--run_dir={run_dir} holds another run ({', '.join(theirs)}); nothing in it was changed. Give --resume to "
                "continue it, --overwrite to replace it, or a new --run_dir"
            )
        for name in (LATEST, SUMMARY, PREEMPTED):  # --overwrite: nothing of the old run may pass for the new one's
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_fit(saved: Checkpoint, cfg, world: int, same_world: bool) -> None:
    """A resume continues on the data the checkpoint trained on and, where a position counts batches of every replica
    (allreduce, sandblaster), under the world it was written by; else the samples it has seen would be reinterpreted."""
    path, now = Path(cfg.run_dir) / LATEST, manifest_sha256(cfg.data)
    if saved.manifest_sha256 != now:
        raise ValueError(
            f"{path} was trained on data whose manifest.json had sha256 {saved.manifest_sha256[:16]}…, but "
            f"{Path(cfg.data) / 'manifest.json'} now has {now[:16] or 'none'}…: the data were re-prepared or changed since. Resume "
            "on the data it trained on, or start afresh on these (--overwrite or a new --run_dir)"
        )
    if same_world and saved.world != world:
        raise ValueError(
            f"{path} was written by {saved.world} replica(s) ({saved.workers} worker ranks), this run has {world}: "
            f"--topology={cfg.topology} counts its position (epoch {saved.epoch}, batch {saved.batch}) in batches of every replica, "
            f"which {world} replica(s) would reinterpret; resume with the {saved.workers} worker ranks it was written by, or start a "
            "new --run_dir"
        )
