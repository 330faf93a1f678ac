"""Run configuration: one typed dataclass, TOML presets (hpcdnn/configs/*.toml) and checked --key=value overrides.

    cfg = load_config("fashion_small", ["--epochs=3", "--lr", "0.02"])
Unknown keys and badly typed values are rejected with the list of valid keys / the expected type.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from hpcdnn.models import MODELS, default_crop, default_model
from hpcdnn.topologies import TOPOLOGIES, topology

PRESETS = Path(__file__).parent / "configs"


@dataclass
class Config:
    """Everything a training run needs; every field is settable from a preset or the command line."""

    # data and model
    data: str = "data/fashion-mnist"  # data-prep output directory (holds manifest.json)
    val_split: str = "auto"  # split to evaluate on: auto = val if present, else test
    model: str = (
        "auto"  # hpcdnn.models.MODELS: alexnet | alexnet_small | wide (274M parameters) | auto (alexnet from 200 px, else alexnet_small)
    )
    crop: int = 0  # training crop side; 0 = 227 for alexnet (the paper's 224 + its padding), the image side for small nets
    pad: int = 0  # zero-pad (after mean subtraction) for random crops of small images
    flip: bool = True  # random horizontal flips
    pca_std: float = 0.1  # AlexNet's PCA lighting: sigma of the per-eigenvector alpha (0 disables)
    # optimisation (AlexNet paper defaults)
    optimizer: str = "sgd"  # sgd (momentum, weight decay) | adagrad
    lr: float = 0.01  # initial learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty added to the gradient
    adagrad_eps: float = 1e-10  # Adagrad epsilon in lr / (sqrt(sum g^2) + eps)
    batch_size: int = 128  # per replica
    epochs: int = 90  # passes over the training split
    lr_schedule: str = "plateau"  # plateau (divide by lr_factor when val top-1 stalls) | step | cosine | constant
    lr_factor: float = 0.1  # multiplier applied by plateau/step schedules
    lr_step_epochs: int = 30  # step schedule: multiply by lr_factor every this many epochs
    plateau_patience: int = 1  # plateau schedule: epochs without improvement before the lr drops
    warmup_epochs: int = 0  # linear lr warm-up from lr/10 (0 = none)
    # runtime
    topology: str = "local"  # hpcdnn.topologies.TOPOLOGIES: local (one process) | allreduce | downpour | sandblaster (mpirun)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = the CPUs of this process
    seed: int = 0  # seeds the model init, the sample order and the augmentation (0 .. 2**32 - 1)
    run_dir: str = "runs/default"  # config, metrics.jsonl, summary.json, checkpoints, plots
    log_every: int = 50  # steps between metrics lines
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch only
    eval_ten_crop: bool = False  # final evaluation also with AlexNet's 10-crop (slower)
    tensorboard: bool = False  # also write metrics and summary as TensorBoard scalars in run_dir/tensorboard (needs hpcdnn[tensorboard])
    max_steps: int = 0  # stop after this many steps in total (0 = no limit; for tests and smoke runs)
    trace: str = ""  # write a Chrome-trace/Perfetto timeline of every rank to this JSON path (hpcdnn/trace.py); empty = off
    stall_timeout: float = 600.0  # seconds a rank may go without finishing a step before it prints what it waits for and its stacks, then ends the job (0 = off)
    # distributed runs: mpirun -n N python -m mpi4py -m hpcdnn train --topology=...
    servers: int = 1  # downpour: parameter-server ranks, each owning one shard of the flat parameter vector
    placement: str = "first"  # which ranks serve: first (ranks 0..servers-1) | last | env (HPCDNN_ROLE=server|worker per rank)
    n_fetch: int = 1  # downpour: a worker fetches the parameters every n_fetch steps
    n_push: int = 1  # downpour: a worker pushes its accumulated gradient every n_push steps
    warmstart_steps: int = 0  # downpour: worker 0 trains alone this many steps before the others fetch and start
    max_staleness: int = (
        0  # downpour: pushes staler than this many server updates are dropped (and the worker re-fetches) or scaled (0 = unbounded)
    )
    staleness_policy: str = "drop"  # downpour, with max_staleness: drop the push | scale it by 1/staleness
    max_delay: int = 0  # downpour bounded delay (SSP-like): a worker more than this many steps ahead of the slowest waits (0 = off)
    overlap: bool = False  # downpour: push and fetch on a communication thread while the next step computes (gradients one fetch older)
    push_dtype: str = "fp32"  # downpour: gradients on the wire as fp32 | bf16 | fp16 (the servers keep fp32 parameters)
    mp: int = 1  # ranks per model replica (model parallelism): each holds 1/mp of every layer's units; alexnet with 2: the paper's towers
    rank_memory_gb: float = 0.0  # refuse at start a model whose estimated memory per rank exceeds this (0 = no check); the fix names --mp
    bucket_mb: float = 1.0  # allreduce: gradient bucket size in MiB; small buckets let the ring start during backward (README)
    # sandblaster (L-BFGS; batch_size is the global batch, cut into portions that the ranks claim)
    sb_history: int = 10  # L-BFGS memory m: (s, y) pairs kept, each vector sharded across the ranks
    sb_portions: int = 0  # portions per batch; 0 = auto: max(4 x ranks, batch_size / 256)
    sb_chunk: int = 64  # samples per forward/backward inside a portion; a rank drops a portion finished elsewhere between chunks
    sb_dynamic: bool = True  # claim portions from the coordinator's counter, with backup tasks; false = static equal split (baseline)
    sb_backup_after: float = 0.5  # an idle rank re-runs an unfinished portion after waiting this many of its mean portion times
    sb_line_search: str = "wolfe"  # wolfe (weak Wolfe: steps may grow or shrink) | armijo (backtracking) | none (fixed sb_step)
    sb_step: float = 1.0  # first trial step of the line search (1 = the quasi-Newton step); the fixed step with sb_line_search=none
    sb_ls_max: int = 10  # evaluations per line search before the step is rejected and the history dropped
    sb_batch_iters: int = 4  # L-BFGS iterations on one batch before the next batch is drawn (Ngiam et al. 2011)
    sb_batch_growth: float = 1.0  # progressive batching: batch_size grows by this factor every epoch, up to the training split
    sb_dropout: bool = False  # dropout in the objective (masks fixed per batch and portion); off = a deterministic objective
    slow_rank: int = -1  # straggler simulation (tests, benchmarks): this rank sleeps (slow_factor - 1) x its compute time; -1 = none
    slow_factor: float = 1.0  # how many times slower slow_rank computes

    def validate(self) -> None:
        """Reject values no run could use, naming the key and the fix."""
        choices = {
            "optimizer": ("sgd", "adagrad"),
            "lr_schedule": ("plateau", "step", "cosine", "constant"),
            "topology": tuple(TOPOLOGIES),
            "placement": ("first", "last", "env"),
            "staleness_policy": ("drop", "scale"),
            "push_dtype": ("fp32", "bf16", "fp16"),
            "model": ("auto", *MODELS),
            "sb_line_search": ("wolfe", "armijo", "none"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for f in fields(self):  # NaN passes every comparison below: reject it (and infinities) first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name}={value!r} must be a finite number")
        for key in ("sb_history", "sb_chunk", "sb_step", "sb_ls_max", "sb_batch_iters"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key}={getattr(self, key)!r} must be positive")
        if self.sb_portions < 0 or self.sb_backup_after < 0:
            raise ValueError(
                f"--sb_portions={self.sb_portions} and --sb_backup_after={self.sb_backup_after} must be >= 0 (0 = auto / at once)"
            )
        if self.sb_batch_growth < 1 or self.slow_factor < 1:
            raise ValueError(
                f"--sb_batch_growth={self.sb_batch_growth} and --slow_factor={self.slow_factor} must be >= 1 (1 = fixed batch / not slowed)"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"--device={self.device!r} is not one of auto, cpu, cuda, cuda:N (N: a GPU index)")
        if not 0 <= self.seed < 2**32:  # numpy's seed range; torch and the loader's generators take it whole
            raise ValueError(f"--seed={self.seed} is outside [0, 2**32 - 1 = {2**32 - 1}]")
        if self.slow_rank < -1:
            raise ValueError(f"--slow_rank={self.slow_rank}: give a rank number, or -1 for no straggler")
        for key in ("lr", "batch_size", "epochs", "lr_factor", "log_every", "servers", "n_fetch", "n_push", "bucket_mb", "mp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key}={getattr(self, key)!r} must be positive")
        for key in (
            "momentum",
            "weight_decay",
            "pca_std",
            "crop",
            "pad",
            "threads",
            "checkpoint_every",
            "max_steps",
            "warmup_epochs",
            "warmstart_steps",
            "max_staleness",
            "max_delay",
            "rank_memory_gb",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key}={getattr(self, key)!r} must be >= 0")
        if self.max_delay and self.max_delay < self.n_push:
            raise ValueError(
                f"--max_delay={self.max_delay} < --n_push={self.n_push}: a worker's clock advances only when it pushes, so the "
                f"slowest could wait for the others; use --max_delay >= n_push"
            )
        if self.mp > 1 and self.topology not in ("allreduce", "downpour", "sandblaster"):
            raise ValueError(
                f"--mp={self.mp} with --topology={self.topology}: model-parallel replicas run under --topology=allreduce (R replicas "
                f"x {self.mp} ranks; one replica = pure model parallelism), downpour or sandblaster"
            )
        topology(self.topology).check(self)  # what only that topology rules out

    def to_toml(self) -> str:
        """The resolved config as TOML (what the run directory keeps)."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            lines.append(f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


def resolve(cfg: Config, manifest: dict, option: str = "--val_split") -> tuple[str, str, int]:
    """The model name, evaluation split and crop that `cfg` means for the data set described by `manifest` (`option`:
    the flag that chose the split, for the errors)."""
    shape = tuple(manifest["image_shape"])
    model = cfg.model if cfg.model != "auto" else default_model(shape)
    splits = manifest["splits"]
    val = cfg.val_split if cfg.val_split != "auto" else ("val" if "val" in splits else "test")
    if val not in splits:
        raise ValueError(f"{option}={val}: {cfg.data} has splits {', '.join(sorted(splits))}")
    check_split(cfg.data, manifest, val, option)
    return model, val, cfg.crop or default_crop(model, shape)


def check_split(data: str, manifest: dict, split: str, option: str) -> None:
    """An evaluation split must hold samples (the loader's "no full batch" would blame a batch size the user never set)."""
    splits = manifest["splits"]
    if not splits[split].get("count", 0):
        others = [f"{k} ({v.get('count', 0)})" for k, v in sorted(splits.items()) if k != split]
        raise ValueError(f"{option}={split}: {data} has no samples in split {split!r}; choose another split: {', '.join(others) or 'none'}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _coerce(key: str, raw, typ: str):
    """Convert an override or TOML value to the field's type, or raise naming the key and the expected type."""
    try:
        if typ == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if typ == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ValueError(f"--{key}={raw!r}: expected {typ}") from None


def apply(cfg: Config, values: dict, where: str) -> Config:
    """Set `values` on a copy of `cfg`, type-checked; unknown keys raise listing the valid ones."""
    known = {f.name: f.type for f in fields(Config)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **{k: _coerce(k, v, known[k]) for k, v in values.items()})


def parse_overrides(args: list[str]) -> dict:
    """['--a=1', '--b', '2'] -> {'a': '1', 'b': '2'} (dashes in keys become underscores)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value (--{key}=VALUE)")
            i, value = i + 1, args[i + 1]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset (a name in hpcdnn/configs or a .toml path), then command-line overrides; validated."""
    cfg = Config()
    if preset:
        path = Path(preset) if preset.endswith(".toml") else PRESETS / f"{preset}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESETS.glob("*.toml"))
            raise ValueError(f"config {preset!r} not found; presets: {', '.join(names)} (or give a path to a .toml file)")
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid TOML ({e}); fix the file, or start from a preset: --config fashion_small") from None
        cfg = apply(cfg, values, str(path))
    cfg = apply(cfg, parse_overrides(overrides or []), "command line")
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class FieldDoc:
    """One Config key as `hpcdnn train --help` lists it."""

    group: str  # the comment heading above the field in the source ("data and model"); "" before the first heading
    name: str
    type: str  # bool | int | float | str
    default: str  # as the command line spells it (true, 0.01, runs/default; "" for an empty string)
    comment: str  # the comment at the end of the field's line; "" when it has none (tests/test_config.py refuses that)


def describe_fields(cls: type = Config) -> list[FieldDoc]:
    """Every field of the dataclass `cls` in source order, with the comment written beside it.

    The source comments are the documentation (a comment on every default), so the help prints them instead of a copy
    that could drift; they are read with tokenize (comments) and ast (field lines), not a regex over the text.
    """
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}  # line -> (text, whole line is a comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    by_name = {f.name: f for f in fields(cls)}
    out, group, after = [], "", 0
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in by_name):
            continue  # the docstring, methods, ClassVars
        headings = [comments[n][0] for n in range(after + 1, node.lineno) if comments.get(n, ("", False))[1]]
        group = headings[-1] if headings else group
        beside = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments and not comments[n][1]]
        f = by_name[node.target.id]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        default = (default or '""') if isinstance(default, str) else _toml_value(default)
        out.append(FieldDoc(group, f.name, f.type if isinstance(f.type, str) else f.type.__name__, default, beside[-1] if beside else ""))
        after = node.end_lineno
    return out
