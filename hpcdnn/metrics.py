"""Run bookkeeping on the root rank: metrics.jsonl (one JSON object per line), summary.json; optionally TensorBoard."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hpcdnn.atomic import NoSpaceError, finite, is_no_space, write_json
from hpcdnn.tensorboard import TB_DIR, TensorBoardLog, scalar_tags

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class MetricsLog:
    """Append-only JSONL log; on resume, lines past the checkpoint's step are dropped so the log matches the state.

    With tensorboard=True every line also goes to run_dir/tensorboard as scalars at its `step` (tags: hpcdnn/tensorboard.py),
    and a resumed run purges the events past resume_step there too.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = False):
        self.run_dir, self.path = run_dir, run_dir / METRICS
        self.enabled, self.tb = enabled, None
        self.last_step = resume_step or 0  # where write_summary puts the summary's scalars
        if not enabled:
            return
        if tensorboard:  # first: a missing package fails before metrics.jsonl is touched
            self.tb = TensorBoardLog(run_dir / TB_DIR, resume_step=resume_step)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")

    def log(self, **record) -> None:
        """One metrics line (and, with TensorBoard, its numeric fields at record['step'])."""
        if not self.enabled:
            return
        if self.tb is not None and "step" not in record:
            raise ValueError(f"metrics record {sorted(record)} has no step: TensorBoard needs log(step=..., ...) for its x-axis")
        try:
            self.file.write(json.dumps(finite(record), sort_keys=True, allow_nan=False) + "\n")  # strict JSON: NaN -> null
            self.file.flush()
        except OSError as e:
            if not is_no_space(e):
                raise
            with contextlib.suppress(OSError):  # drop the unwritten line: close() must not raise it again at exit
                self.file.close()
            self.enabled = False
            raise NoSpaceError(f"no space left on device writing {self.path}; free space or move --run_dir, then --resume "
                               "continues from the last checkpoint (if one was written)", self.path) from None  # fmt: skip
        if "step" in record:
            self.last_step = max(self.last_step, int(record["step"]))
        if self.tb is not None:
            self.tb.scalars(int(record["step"]), scalar_tags(record))

    def write_summary(self, summary: dict) -> None:
        """summary.json, and with TensorBoard its numbers as summary/<key> scalars at the last step logged."""
        if not self.enabled:
            return
        write_summary(self.run_dir, summary)
        if self.tb is not None:
            self.tb.scalars(self.last_step, scalar_tags(summary, group="summary"))

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (hpcdnn train --run_dir ...)?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json, written atomically (MetricsLog.write_summary also adds it to TensorBoard)."""
    write_json(run_dir / SUMMARY, summary)
