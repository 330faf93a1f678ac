"""DistBelief's Figure 4 on our emulator: time to a target test accuracy vs replicas, for Downpour + Adagrad,
Downpour + SGD, synchronous allreduce SGD and Sandblaster L-BFGS, on a stated cluster profile.

    python -m hpcdnn.sim.figure4 --replicas 1,4,16,64 --target 0.85 --device k40 --link-gbit 10 --out docs/figure4
    python -m hpcdnn.sim.figure4 --data-set imagenet --data data/imagenet --target 0.16 ...   # the paper's own target

Each point is one `hpcdnn simulate` run (a subprocess, its run directory under --runs), stopped at the first
evaluation (every --eval-images training images; Sandblaster: every 4 x --eval-images samples evaluated, as
its line searches evaluate each batch ~1.3 times) reaching --target, or at the recipe's epoch budget. A point whose
run directory already holds a summary of the same command is read, not re-run, so an interrupted figure resumes.
Writes OUT/results.json (every run's command and time to target), OUT/table.md and OUT/figure4.png.
Downpour gets P = ceil(W / 2) servers (--servers-per-worker), so its servers are not the bottleneck
(server_s x W / P stays below a worker's step), and the recipe's learning rate / sqrt(W) (--downpour-lr): with the
single replica's rate, 16 Adagrad workers starting together from the warmstart blew the loss up to ~140 and left every
ReLU dead (top-1 0.10). Synchronous SGD keeps the recipe's rate on the mean of the W gradients, as `hpcdnn train
--topology=allreduce` does. A run that diverges is kept as such.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from hpcdnn.config import load_config

# The recipes: (config preset, overrides) per method and data set. Constant learning rates: a schedule over the
# epoch budget would differ by W's stopping point. Sandblaster's portion count is fixed so that its trajectory is the
# same for every W (docs/scaling.md): only its clock differs.
# One torch thread per run: the time is simulated, and two runs side by side use the 2 cores better than one run
# whose 2 threads contend with anything else running (LIMITS.md: oversubscribed threads halve throughput).
FASHION = ["--threads=1"]
IMAGENET = ["--lr_schedule=constant", "--eval_ten_crop=false", "--epochs=10"]
METHODS = {
    "fashion-mnist": {
        "downpour_adagrad": ("fashion_downpour", ["--epochs=6", *FASHION]),
        "downpour_sgd": ("fashion_downpour", ["--optimizer=sgd", "--lr=0.1", "--momentum=0", "--epochs=6", *FASHION]),
        "allreduce": ("fashion_small", ["--topology=allreduce", "--lr_schedule=constant", "--epochs=6", *FASHION]),
        "sandblaster": ("fashion_sandblaster", ["--sb_portions=64", "--epochs=3", *FASHION]),
    },
    "imagenet": {  # AlexNet; one-crop checks (the 10-crop test is for the final number), 10 epochs at most
        "downpour_adagrad": ("imagenet_alexnet", ["--topology=downpour", "--optimizer=adagrad", "--warmstart_steps=500", *IMAGENET]),
        "downpour_sgd": ("imagenet_alexnet", ["--topology=downpour", "--momentum=0", "--warmstart_steps=500", *IMAGENET]),
        "allreduce": ("imagenet_alexnet", ["--topology=allreduce", *IMAGENET]),
        "sandblaster": ("imagenet_alexnet", ["--topology=sandblaster", "--sb_portions=256", "--batch_size=4096", *IMAGENET]),
    },
}
LABELS = {"downpour_adagrad": "Downpour SGD + Adagrad", "downpour_sgd": "Downpour SGD", "allreduce": "synchronous SGD (allreduce)",
          "sandblaster": "Sandblaster L-BFGS"}  # fmt: skip


def command(args, method: str, workers: int, run_dir: Path) -> list[str]:
    """The `hpcdnn simulate` command of one point."""
    preset, overrides = METHODS[args.data_set][method]
    cmd = [sys.executable, "-m", "hpcdnn", "simulate", "--config", preset, *overrides, f"--workers={workers}", f"--device={args.device}",
           f"--link-gbit={args.link_gbit}", f"--target-top1={args.target}", f"--eval-images={args.eval_images * (4 if method == 'sandblaster' else 1)}",
           f"--run_dir={run_dir}", "--overwrite"]  # fmt: skip
    if method.startswith("downpour"):
        cmd.append(f"--servers={max(1, math.ceil(workers * args.servers_per_worker))}")
        if workers > 1 and args.downpour_lr == "sqrt":  # W pushes land on nearly the same parameters: a 1/sqrt(W) rate
            cmd.append(f"--lr={load_config(preset, overrides).lr / math.sqrt(workers):.6g}")
    if args.data:
        cmd.append(f"--data={args.data}")
    return cmd


def point(args, method: str, workers: int) -> dict:
    """Run (or read back) one point: time to target in simulated seconds, or why there is none."""
    run_dir = Path(args.runs) / f"{method}_w{workers}"
    cmd = command(args, method, workers, run_dir)
    key = " ".join(cmd[1:])
    record = run_dir / "figure4.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("command") == key:
            return old
    if args.collect:
        return {}
    print(f"figure4: {method} x {workers}: {key}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"method": method, "workers": workers, "command": key, "exit": proc.returncode}
    if proc.returncode == 0:
        s = json.loads((run_dir / "summary.json").read_text())
        out.update({k: s.get(k) for k in ("time_to_target_s", "images_to_target", "train_time_s", "steps", "val_top1", "images_per_s",
                                          "training_images_per_s", "staleness_applied_mean", "servers")})  # fmt: skip
    else:
        out["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][-300:]
    record.write_text(json.dumps(out, indent=1, sort_keys=True))
    t = out.get("time_to_target_s")
    print(
        f"figure4: {method} x {workers}: " + (f"{t:.3f} s to {args.target}" if t is not None else out.get("error", "target not reached")),
        flush=True,
    )
    return out


def table(args, results: list[dict]) -> str:
    """The Markdown table: one row per method, one column per replica count (simulated seconds to target)."""
    counts = sorted({r["workers"] for r in results})
    lines = [f"| method (time to test top-1 {args.target}, simulated s; {args.device}, {args.link_gbit:g} Gbit/s) | "
             + " | ".join(f"W={w}" for w in counts) + " |", "|---|" + "---|" * len(counts)]  # fmt: skip
    for method in METHODS[args.data_set]:
        cells = []
        for w in counts:
            r = next((r for r in results if r["method"] == method and r["workers"] == w), None)
            if r is None:
                cells.append("")
            elif r.get("exit"):
                cells.append("diverged" if "diverged" in r.get("error", "") else "failed")
            elif r["time_to_target_s"] is None:
                cells.append(f"> {r['train_time_s']:.3g} (not reached, top-1 {r['val_top1']:.3f})")
            elif r.get("images_to_target") is None:  # reached by the final evaluation only
                cells.append(f"{r['time_to_target_s']:.3g} (at the budget's end)")
            else:
                cells.append(f"{r['time_to_target_s']:.3g} ({r['images_to_target'] / 1000:.0f}k img)")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args, results: list[dict], path: Path) -> None:
    """Time to target vs replicas, log-log, one line per method; runs that never reached it are drawn hollow at their end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in METHODS[args.data_set]:
        rows = sorted((r for r in results if r["method"] == method and not r.get("exit")), key=lambda r: r["workers"])
        hit = [r for r in rows if r["time_to_target_s"] is not None]
        (line,) = ax.plot([r["workers"] for r in hit], [r["time_to_target_s"] for r in hit], marker="o", label=LABELS[method])
        miss = [r for r in rows if r["time_to_target_s"] is None]
        ax.plot([r["workers"] for r in miss], [r["train_time_s"] for r in miss], ls="none", marker="o", mfc="none", color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="replicas W", ylabel=f"simulated seconds to test top-1 {args.target}",
           title=f"{args.data_set}: time to accuracy ({args.device}, {args.link_gbit:g} Gbit/s)")  # fmt: skip
    counts = sorted({r["workers"] for r in results})
    ax.set_xticks(counts, [str(w) for w in counts])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.01, "hollow: target not reached; drawn where the run's budget ended (a lower bound)", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hpcdnn.sim.figure4", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-set", default="fashion-mnist", choices=sorted(METHODS), help="which recipes (fashion-mnist)")
    p.add_argument("--data", help="the prepared data directory (default: the presets' own)")
    p.add_argument("--replicas", default="1,4,16,64", help="comma-separated replica counts W (1,4,16,64)")
    p.add_argument("--methods", default=",".join(METHODS["fashion-mnist"]), help="comma-separated methods (all four)")
    p.add_argument("--target", type=float, default=0.85, help="target test top-1 (0.85)")
    p.add_argument("--eval-images", type=int, default=6400, help="evaluate every this many training images (6400)")
    p.add_argument("--device", default="k40", help="device profile (k40)")
    p.add_argument("--link-gbit", type=float, default=10.0, help="link speed, Gbit/s (10)")
    p.add_argument("--servers-per-worker", type=float, default=0.5, help="Downpour servers P = ceil(W x this) (0.5)")
    p.add_argument("--downpour-lr", default="sqrt", choices=("sqrt", "fixed"),
                   help="Downpour's rate at W replicas: the recipe's / sqrt(W) (sqrt, default) or the recipe's (fixed)")  # fmt: skip
    p.add_argument("--runs", default="runs/figure4", help="where the run directories go (runs/figure4)")
    p.add_argument("--collect", action="store_true", help="run nothing: gather the points already run into the table and figure")
    p.add_argument("--out", default="docs/figure4", help="where results.json, table.md and figure4.png go (docs/figure4)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.replicas.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS[args.data_set]))
    if unknown or min(counts) < 1:
        p.error(f"--methods {unknown} unknown (known: {', '.join(METHODS[args.data_set])}) or a replica count < 1: {counts}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [r for r in (point(args, m, w) for w in counts for m in methods) if r]
    for r in results:  # reached by the final evaluation at the budget's end, after the last periodic one
        if not r.get("exit") and r["time_to_target_s"] is None and r["val_top1"] >= args.target:
            r["time_to_target_s"] = r["train_time_s"]
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    mine = {(r["method"], r["workers"]) for r in results}
    results = sorted([r for r in old if (r["method"], r["workers"]) not in mine] + results, key=lambda r: (r["method"], r["workers"]))
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    (out / "table.md").write_text(table(args, results))
    plot(args, results, out / "figure4.png")
    print(table(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
