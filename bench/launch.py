"""The mpirun prefix the self-launching benchmarks use (imported as `launch`: scripts run as `python bench/x.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def mpirun(ranks: int) -> list[str]:
    """mpirun from this interpreter's venv, with the flags its MPI needs (Open MPI: root, oversubscription, no UCX)."""
    exe = str(Path(sys.executable).parent / "mpirun")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" not in version:
        return [exe, "-n", str(ranks)]  # MPICH (Hydra)
    extra = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    if ranks > len(os.sched_getaffinity(0)):
        extra.append("--oversubscribe")
    return [exe, "-n", str(ranks), *extra, "--mca", "osc", "^ucx"]
