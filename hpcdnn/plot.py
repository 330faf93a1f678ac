"""`hpcdnn plot RUN [RUN ...] -o out.png`: training loss and validation accuracy of several runs on one figure."""

from __future__ import annotations

from pathlib import Path

from hpcdnn.metrics import read_metrics


def plot_runs(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Loss and val top-1 vs wall time and vs epoch (2x2 panels), one line per run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, run in enumerate(runs):
        records = read_metrics(run)
        label = labels[i] if labels else Path(run).name
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_top1" in r]
        for col, x in enumerate(("time", "epoch")):
            axes[0, col].plot([r[x] for r in train], [r["loss"] for r in train], label=label, lw=1)
            axes[1, col].plot([r[x] for r in val], [r["val_top1"] for r in val], marker="o", ms=3, label=label)
    for col, x in enumerate(("wall time (s)", "epoch")):
        axes[0, col].set(xlabel=x, ylabel="training loss", yscale="log")
        axes[1, col].set(xlabel=x, ylabel="validation top-1 accuracy")
        for row in (0, 1):
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
