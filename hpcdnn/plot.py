"""`hpcdnn plot RUN [RUN ...] -o out.png`: training loss and validation accuracy of several runs on one figure;
`hpcdnn plot --trace TRACE.json -o out.png`: the timeline of a `--trace` run, one row per rank and track."""

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
    return save(fig, out)


ASYNC_ROW = 1000  # row key of a track's async slices: (pid, ASYNC_ROW + tid), below the process's other tracks


def trace_rows(events: list[dict], window: tuple[float, float] | None = None):
    """The rows of a Chrome trace (hpcdnn/trace.py): {(pid, tid): {"label", "spans": [(start s, dur s, name, depth)],
    "instants": [(t s, name)]}}, in pid then tid order; async slices get a row of their own per process ("comm async")."""
    procs, threads, rows = {}, {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["pid"], e["tid"]] = e["args"]["name"]
    lo, hi = window or (-float("inf"), float("inf"))

    def row(pid, tid, track=None):
        if (pid, tid) not in rows:
            name = track or threads.get((pid, tid), str(tid))
            rows[pid, tid] = {"label": f"{procs.get(pid, f'pid {pid}')} · {name}", "spans": [], "instants": []}
        return rows[pid, tid]

    opened = {}
    for e in sorted((e for e in events if e.get("ph") in ("X", "i", "b", "e")), key=lambda e: (e["ts"], -e.get("dur", 0))):
        t = e["ts"] / 1e6
        if e["ph"] == "X" and t + e["dur"] / 1e6 >= lo and t <= hi:
            row(e["pid"], e["tid"])["spans"].append((t, e["dur"] / 1e6, e["name"]))
        elif e["ph"] == "i" and lo <= t <= hi:
            row(e["pid"], e["tid"])["instants"].append((t, e["name"]))
        elif e["ph"] == "b":
            opened[e["pid"], e["name"], e["id"]] = t
        elif e["ph"] == "e" and (t0 := opened.pop((e["pid"], e["name"], e["id"]), None)) is not None and t >= lo and t0 <= hi:
            track = f"{threads.get((e['pid'], e['tid']), e['tid'])} async"
            row(e["pid"], ASYNC_ROW + e["tid"], track)["spans"].append((t0, t - t0, e["name"]))
    for r in rows.values():  # depth: how many earlier spans of the row still contain this one (they nest)
        stack, spans = [], []
        for t, d, name in r["spans"]:
            while stack and stack[-1] <= t:
                stack.pop()
            spans.append((t, d, name, len(stack)))
            stack.append(t + d)
        r["spans"] = spans
    return dict(sorted(rows.items()))


def plot_trace(trace: str | Path, out: str | Path, window: tuple[float, float] | None = None, title: str | None = None) -> Path:
    """A timeline PNG of a --trace file: one row per rank and track, nested spans stacked inside the row, instant
    events as ticks, the most time-consuming span names in the legend; `window` = (start, end) seconds."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(trace).read_text())
    rows = trace_rows(doc["traceEvents"] if isinstance(doc, dict) else doc, window)
    total: dict[str, float] = {}
    for r in rows.values():
        for _, d, name, _ in r["spans"]:
            total[name] = total.get(name, 0.0) + d
    names = sorted(total, key=total.get, reverse=True) + sorted({n for r in rows.values() for _, n in r["instants"]} - set(total))
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}
    lanes = [1 + max((s[3] for s in r["spans"]), default=0) for r in rows.values()]
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.22 * sum(lanes) + 0.3 * len(rows)))
    y, ticks = 0.0, []
    for r, n in zip(rows.values(), lanes):
        h = 1.0 / n
        for depth in range(n):
            for name in {s[2] for s in r["spans"] if s[3] == depth}:
                bars = [(t, d) for t, d, nm, dp in r["spans"] if dp == depth and nm == name]
                ax.broken_barh(bars, (y + depth * h + 0.05 * h, 0.9 * h), facecolors=color[name], edgecolor="none")
        for t, name in r["instants"]:
            ax.plot([t, t], [y, y + 0.35], color=color[name], lw=0.8)
        ticks.append((y + 0.5, r["label"]))
        y += 1.3
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
    ax.set_ylim(y - 0.2, -0.2)
    ax.set_xlabel("seconds since the trace's zero (a Barrier at start-up)")
    if window:
        ax.set_xlim(*window)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[n]) for n in names[:24]]
    ax.legend(handles, names[:24], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or Path(trace).name, fontsize=9)
    return save(fig, out)


def save(fig, out) -> Path:
    """Lay out, write (parent directories made) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
