"""`hpcdnn simulate`: the cost model's plan for a cluster (--plan), or an emulated run that trains for real on a
simulated clock (hpcdnn/sim/emulate.py). Knobs of the simulated cluster are below; the training recipe is a Config
(--config PRESET and any --key=value override, as `hpcdnn train` takes them).

  hpcdnn simulate --plan --config imagenet_alexnet --device=gtx580 --workers=2 --link-gbit=64     # the AlexNet paper
  hpcdnn simulate --plan --config imagenet_alexnet --device=v100 --workers=64 --servers=8 --link-gbit=100
  hpcdnn simulate --config fashion_downpour --workers=8 --servers=2 --device=v100 --link-gbit=10 --run_dir=runs/sim8
  hpcdnn simulate --config fashion_small --topology=allreduce --workers=4 --device=cpu --max_steps=100
  hpcdnn simulate --config fashion_sandblaster --workers=16 --device=v100 --link-gbit=10 --straggler-cv=0.3 --slow_rank=3 --slow_factor=5
  hpcdnn simulate --terms                                                                          # the cost terms
"""

from __future__ import annotations

import argparse
import sys

from hpcdnn.sim.profiles import DATASETS, DEVICES


def build_parser() -> argparse.ArgumentParser:
    """The simulated cluster's knobs; everything else on the command line is a Config override."""
    p = argparse.ArgumentParser(prog="hpcdnn simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Any other --key=value is a training Config key (hpcdnn train --help lists them): --topology, "
                                       "--optimizer, --batch_size, --epochs, --max_steps, --n_fetch, --n_push, --push_dtype, "
                                       "--warmstart_steps, --bucket_mb, --sb_*, --run_dir, --seed ...")  # fmt: skip
    p.add_argument("--config", help="preset name in hpcdnn/configs or a .toml path (the training recipe)")
    p.add_argument("--plan", action="store_true", help="print predicted images/s and time per epoch of every topology; no training")
    p.add_argument("--terms", action="store_true", help="print the cost model's terms as a Markdown table and exit")
    p.add_argument("--overwrite", action="store_true", help="emulator: replace the run in RUN_DIR (as train --overwrite)")
    p.add_argument("--json", action="store_true", help="with --plan: print the prediction as JSON")
    p.add_argument("--workers", type=int, default=1, help="simulated replicas W (default 1)")
    p.add_argument("--servers", type=int, default=1, help="simulated parameter servers P for downpour (default 1)")
    p.add_argument("--device", default="cpu", help=f"device profile of a replica: {', '.join(DEVICES)} (cpu = this machine, measured)")
    p.add_argument("--link-gbit", "--link_gbit", type=float, default=10.0, help="link speed of every worker and server, Gbit/s (10)")
    p.add_argument("--latency-us", "--latency_us", type=float, default=5.0, help="latency of one message or one-sided operation, us (5)")
    p.add_argument("--server-mem-gbs", "--server_mem_gbs", type=float, default=0.0,
                   help="a parameter server's memory bandwidth for its update, GB/s (0 = the device's)")  # fmt: skip
    p.add_argument("--compute-cv", "--compute_cv", type=float, default=0.0,
                   help="emulator: coefficient of variation of a replica's compute time per step, lognormal (0 = fixed)")  # fmt: skip
    p.add_argument("--straggler-cv", "--straggler_cv", type=float, default=0.0,
                   help="Sandblaster portion-time coefficient of variation: emulator, a lognormal draw of mean 1 per portion "
                        "(seeded by --clock-seed); plan, the slowest of W by the normal tail (0 = none)")  # fmt: skip
    p.add_argument("--clock-seed", "--clock_seed", type=int, default=0,
                   help="emulator: seed of the compute-time and portion-time draws (not of the training: --seed)")  # fmt: skip
    p.add_argument("--target-top1", "--target_top1", type=float, default=0.0,
                   help="emulator: stop at the first evaluation whose validation top-1 reaches this; summary.json gets "
                        "time_to_target_s and images_to_target (null if never reached) (0 = train to the end)")  # fmt: skip
    p.add_argument("--eval-images", "--eval_images", type=int, default=0,
                   help="emulator: evaluate every this many training images over all replicas, logged at simulated time "
                        "(0 = a tenth of an epoch when --target-top1 is set, else only after each epoch)")  # fmt: skip
    p.add_argument("--dataset", help=f"plan: {', '.join(DATASETS)} (default: the config's data directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Plan or emulate as the arguments say; errors print one line and return 2, as `hpcdnn train` does."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return run(args, rest)
    except (ValueError, FileNotFoundError) as err:
        print(f"hpcdnn simulate: error: {err}", file=sys.stderr, flush=True)
        return 2


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Check the knobs (each error names the flag), then print the terms, print the plan, or emulate."""
    from hpcdnn.config import load_config
    from hpcdnn.sim.emulate import SimOptions

    if args.terms:
        from hpcdnn.sim.plan import terms_table

        print(terms_table())
        return 0
    for name in ("workers", "servers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}: must be >= 1")
    for name in ("link_gbit", "latency_us", "server_mem_gbs", "compute_cv", "straggler_cv"):
        if not getattr(args, name) >= 0 or (name == "link_gbit" and args.link_gbit == 0):
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a number >= 0 (link > 0)")
    if not 0 <= args.target_top1 <= 1 or args.eval_images < 0:
        raise ValueError(f"--target-top1={args.target_top1} --eval-images={args.eval_images}: the target is a fraction in [0, 1], "
                         "the interval >= 0 images")  # fmt: skip
    if args.device not in DEVICES:
        raise ValueError(f"--device={args.device!r} is not a known profile; known: {', '.join(DEVICES)} (hpcdnn/sim/profiles.py)")
    cfg = load_config(args.config, rest)
    sim = SimOptions(args.workers, args.servers, args.device, args.link_gbit, args.latency_us, args.server_mem_gbs, args.compute_cv,
                     args.clock_seed, args.straggler_cv, args.target_top1, args.eval_images)  # fmt: skip
    if args.plan:
        from dataclasses import replace

        from hpcdnn.sim.plan import plan

        cluster = replace(sim.cluster(cfg.threads or 2), straggler_cv=args.straggler_cv)
        print(plan(cfg, cluster, args.dataset, as_json=args.json))
        return 0
    from hpcdnn.sim.emulate import emulate

    s = emulate(cfg, sim, overwrite=args.overwrite)
    print(f"hpcdnn simulate: {s['topology']} x {s['workers']} on {s['device']}: {s['steps']} steps in {s['train_time_s']:.3f} simulated s "
          f"({s.get('training_images_per_s', s['images_per_s'])} img/s; predicted {s['predicted_images_per_s']}), val top-1 {s['val_top1']:.4f}; summary in {cfg.run_dir}")  # fmt: skip
    if args.target_top1:
        t = s["time_to_target_s"]
        print(f"hpcdnn simulate: top-1 {args.target_top1} " + (f"reached at {t:.3f} simulated s after {s['images_to_target']} training images"
              if t is not None else "not reached"))  # fmt: skip
    return 0
