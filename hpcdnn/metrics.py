"""Run bookkeeping on the root rank: metrics.jsonl (one JSON object per line), a progress bar, summary.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hpcdnn.atomic import write_json

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class MetricsLog:
    """Append-only JSONL log; on resume, lines past the checkpoint's step are dropped so the log matches the state."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = run_dir / METRICS
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")

    def log(self, **record) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, sort_keys=True) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (hpcdnn train --run_dir ...)?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json(run_dir / SUMMARY, summary)


class Bar:
    """tqdm on a terminal, else a plain line every `every` seconds (batch logs stay readable)."""

    def __init__(self, total: int, initial: int, enabled: bool, every: float = 30.0):
        self.enabled, self.every, self.last, self.bar = enabled, every, time.perf_counter(), None
        self.total, self.n = total, initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, **postfix) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"[hpcdnn] step {self.n}/{self.total} {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
