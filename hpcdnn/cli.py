"""`hpcdnn` command line: train, eval, plot.

  hpcdnn train [--config PRESET|FILE.toml] [--resume] [--key=value ...]
  mpirun -n N python -m mpi4py -m hpcdnn train --topology=downpour|allreduce|sandblaster [...]
  hpcdnn eval  --run-dir RUN [--ten-crop] [--data DIR]
  hpcdnn plot  RUN [RUN ...] -o out.png
  hpcdnn plot  --trace TRACE.json -o timeline.png [--window START,END]     (a run's --trace=TRACE.json)
  hpcdnn launch [--heartbeat_timeout=S] -- mpirun ... hpcdnn train ... --run_dir R   (ends the job when a rank is lost)
  hpcdnn simulate [--plan] [--workers W --servers P --device D --link-gbit G] [--key=value ...]   (docs/scaling.md)
Presets live in hpcdnn/configs/ (fashion_small, imagenet_alexnet); every Config field is a --key=value override
(`hpcdnn train --help` lists them). Flags take dashes or underscores alike: --run-dir or --run_dir.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys

from hpcdnn import heartbeat, tensorboard, watchdog
from hpcdnn.atomic import NoSpaceError
from hpcdnn.config import describe_fields, load_config


def config_help() -> str:
    """Every Config key with its type, default and source comment, grouped as in hpcdnn/config.py (the epilog of train --help)."""
    docs = describe_fields()
    keys = [f"--{d.name}={d.default}" for d in docs]
    width = min(max(map(len, keys)), 32)
    lines = ["config keys: --key=value or --key value, '-' or '_' in names; a preset sets them first, the command line last"]
    group = None
    for d, key in zip(docs, keys):
        if d.group != group:
            group = d.group
            lines.append(f"\n  # {group}")
        lines.append(f"  {key:<{width}}  {d.type:<5}  {d.comment}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The subcommands and their options; every flag takes both spellings (--run-dir and --run_dir)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="hpcdnn", description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # allow_abbrev=False: an override like --res=... must reach the config (and be refused there), not become --resume
    t = sub.add_parser("train", help="train a model; any Config key as --key=value (see train --help)", formatter_class=raw,
                       usage="hpcdnn train [-h] [--config PRESET|FILE.toml] [--resume] [--overwrite] [--show-config] [--key=value ...]",
                       epilog=config_help(), allow_abbrev=False)  # fmt: skip
    t.add_argument("--config", help="preset name in hpcdnn/configs or a .toml path")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.h5")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a RUN_DIR that holds another run (its files are replaced)")
    t.add_argument("--show-config", "--show_config", action="store_true", help="print the resolved config and exit")
    e = sub.add_parser("eval", help="top-1/top-5 of a run's checkpoint (centre crop, optionally 10-crop)")
    e.add_argument("--run-dir", "--run_dir", required=True)
    e.add_argument("--ten-crop", "--ten_crop", action="store_true")
    e.add_argument("--data", help="evaluate on another data-prep directory")
    e.add_argument("--split", help="split to evaluate (default: the run's validation split)")
    sub.add_parser("launch", help="run a launcher command, watch every rank's heartbeat, end the job when one is lost (launch --help)")
    sub.add_parser("simulate", help="plan (--plan) or emulate training on a simulated cluster (simulate --help)")
    p = sub.add_parser("plot", help="loss and accuracy curves of one or more runs, or the timeline of a --trace file")
    p.add_argument("runs", nargs="*")
    p.add_argument("--trace", help="draw this trace file (hpcdnn train --trace=PATH) instead: one row per rank and track")
    p.add_argument("--window", help="with --trace: START,END in seconds since the trace's zero")
    p.add_argument("-o", "--out", default="runs.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    process = argv is None  # the command line (not a call from Python): the handlers may stay until exit
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # everything after it is the launcher's command line
        from hpcdnn.launch import main as launch

        return launch(argv[1:])
    if argv[:1] == ["simulate"]:  # its own parser: cluster knobs, then Config overrides (hpcdnn/sim/cli.py)
        from hpcdnn.sim.cli import main as simulate

        return simulate(argv[1:])
    if argv[:1] == ["train"]:
        from hpcdnn import stop

        # before torch, MPI and the data load, and (as a process) until exit: a USR1 at start-up or while the ranks
        # tear down must not kill a rank
        stop.install(hold=process)
        try:  # SIGUSR2: a hung rank prints where it is (slurm/env.sh asks before ending a stuck launcher)
            faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
        except (AttributeError, OSError, ValueError):  # no file-backed stderr (embedded interpreters): no dumps
            pass
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    comm = None
    try:
        if args.command == "train":
            cfg = load_config(args.config, rest)
            if args.show_config:
                print(cfg.to_toml(), end="")
                return 0
            if cfg.tensorboard:  # now, not after the data load and model build
                tensorboard.require()
            from hpcdnn.topologies import topology
            from hpcdnn.train import train

            if topology(cfg.topology).n_servers(cfg) is not None:  # a topology that runs under MPI
                from mpi4py import MPI

                comm = MPI.COMM_WORLD
                tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
                if comm.Get_size() == 1 and tasks > 1 and "SLURM_STEP_ID" in os.environ:
                    raise ValueError(
                        f"this is a one-rank MPI job but Slurm started {tasks} tasks: the launcher did not wire them into one "
                        "job (Open MPI under srun needs --mpi=pmix; see `srun --mpi=list`), or use mpirun inside the allocation"
                    )
            with watchdog.watched(cfg.stall_timeout, comm):  # launcher gone: exit; no step for --stall_timeout s: end the job
                with heartbeat.watched(cfg.run_dir, comm) as beat:  # hpcdnn launch's watcher, if one runs
                    beat.end(train(cfg, resume=args.resume, comm=comm, overwrite=args.overwrite))
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        elif args.command == "eval":
            from hpcdnn.evaluate import evaluate_run

            print(json.dumps(evaluate_run(args.run_dir, ten_crop=args.ten_crop, data=args.data, split=args.split), indent=1))
        elif args.command == "plot":
            from hpcdnn import plot

            if bool(args.trace) == bool(args.runs):
                parser.error("plot takes run directories (loss curves) or --trace TRACE.json (a timeline): give exactly one of them")
            window = None
            if args.window:
                try:
                    window = tuple(float(v) for v in args.window.split(","))
                except ValueError:
                    window = ()
                if len(window) != 2 or window[0] >= window[1]:
                    raise ValueError(f"--window={args.window!r}: expected START,END in seconds with START < END, e.g. --window=2,3.5")
            out = plot.plot_trace(args.trace, args.out, window) if args.trace else plot.plot_runs(args.runs, args.out)
            print(f"hpcdnn: wrote {out}")
        return 0
    except (ValueError, FileNotFoundError, tensorboard.MissingTensorBoard) as err:
        where = f" (rank {comm.Get_rank()})" if comm is not None and comm.Get_size() > 1 else ""
        print(f"hpcdnn: error{where}: {err}", file=sys.stderr, flush=True)
        code = 1 if isinstance(err, NoSpaceError) else 2  # a full disk is not bad input: exit 1, as data-prep does
        if where:
            comm.Abort(code)  # the other ranks may be waiting in a collective or on a window: end the whole job now
        if isinstance(err, NoSpaceError) and err.in_hdf5:  # HDF5 cannot close that file again: it would crash at exit
            sys.stdout.flush()
            os._exit(code)
        return code
