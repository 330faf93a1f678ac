"""TensorBoard scalars of a run (config key `tensorboard`): the records of metrics.jsonl and summary.json in run_dir/tensorboard.

Users who already watch their jobs in TensorBoard point it at the run directory (`tensorboard --logdir runs`). The x-axis is a
record's `step`; tags follow one fixed mapping (`scalar_tags`):
    training line    loss, lr, images_per_s, epoch, time, ...   -> train/loss, train/lr, train/images_per_s, train/epoch, ...
    evaluation line  (has a val_* field) val_top1, epoch, ...   -> val/top1, val/top5, val/loss, val/epoch, val/time
    summary.json     val_top1, images_per_s, steps, ...         -> summary/val_top1, summary/images_per_s, ... at the last step
Only numbers are written. Bools, strings and lists are skipped: a list (a Downpour summary's staleness_hist, worker_steps) holds
per-bin or per-worker counts of the finished run, not a series over steps, and stays in summary.json.
"""

from __future__ import annotations

from pathlib import Path

TB_DIR = "tensorboard"  # under the run directory
EVENTS = "events.out.tfevents."  # prefix of TensorBoard's event files
INSTALL = "pip install 'hpcdnn[tensorboard]'"


class MissingTensorBoard(ImportError):
    """--tensorboard=true without the optional `tensorboard` package (the CLI prints it as an error, not a traceback)."""


def require() -> type:
    """torch's SummaryWriter, or MissingTensorBoard naming the install command (checked before a run starts, not at its end)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingTensorBoard(
            f"--tensorboard=true needs the tensorboard package ({err}); install it with {INSTALL}, or run with --tensorboard=false"
        ) from None
    return SummaryWriter


def is_number(value) -> bool:
    """Written as a scalar: ints and floats, not bools (True is an int to Python, but not a metric)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def scalar_tags(record: dict, group: str | None = None) -> dict[str, float]:
    """tag -> value for the numeric fields of one record except `step` (the x-axis); `group` overrides train/val detection."""
    if group is None:
        group = "val" if any(k.startswith("val_") for k in record) else "train"
    out = {}
    for key, value in record.items():
        if key == "step" or not is_number(value):
            continue
        name = key[len("val_") :] if group == "val" and key.startswith("val_") else key
        out[f"{group}/{name}"] = float(value)
    return out


class TensorBoardLog:
    """One SummaryWriter on run_dir/tensorboard; a resumed run purges the events past its checkpoint, as metrics.jsonl drops lines."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        writer_class = require()
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:  # a fresh run: the directory holds this run only, as metrics.jsonl is emptied
            for old in log_dir.glob(EVENTS + "*"):
                old.unlink()
        # purge_step: TensorBoard hides every earlier event at a step >= resume_step + 1 (metrics.jsonl keeps step <= resume_step)
        self.writer = writer_class(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write tag -> value at `step` and flush, so an open dashboard sees each line as metrics.jsonl does."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
