"""The one progress bar, for training steps and data-prep images alike.

On a terminal it is a tqdm bar; otherwise (Slurm and mpirun logs) a plain line every `every` seconds, so batch
logs stay readable instead of filling with carriage returns.
"""

from __future__ import annotations

import sys
import time


class Bar:
    """Progress of `total` units from `initial` on; `update(n, **postfix)` counts n more and shows the postfix values."""

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, every: float = 30.0, *, unit: str = "step", desc: str = "hpcdnn"
    ):
        self.total, self.n, self.initial = total, initial, initial
        self.enabled, self.every, self.unit, self.desc = enabled, every, unit, desc
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, /, **postfix) -> None:
        """Count `n` more units; `postfix` (e.g. loss="0.512", any name, even n) is shown beside the count."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(self.line(postfix), file=sys.stderr, flush=True)

    def line(self, postfix: dict) -> str:
        """The plain log line: `[desc] done/total unit, rate unit/s` and the postfix, e.g. `[hpcdnn] 50/900 step, R step/s loss=0.5`."""
        rate = (self.n - self.initial) / max(time.perf_counter() - self.start, 1e-9)
        extra = "".join(f" {k}={v}" for k, v in postfix.items())
        shown = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
        return f"[{self.desc}] {self.n}/{self.total} {self.unit}, {shown} {self.unit}/s{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
