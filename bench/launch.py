"""How the self-launching benchmarks start themselves under mpirun (imported as `launch`: scripts run as
`python bench/x.py`). The command itself comes from hpcdnn/mpirun.py, shared with the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hpcdnn.mpirun import mpirun

__all__ = ["mpirun", "relaunch", "repo_env"]


def repo_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, for a child run from another directory."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def relaunch(script: str, ranks: int, argv: list[str], child_var: str, timeout: float) -> None:
    """Run `script argv` again as `mpirun -n ranks python -m mpi4py`, with `child_var` set so it runs the rank side and
    the repository on PYTHONPATH. A timeout or a failed run is reported on stderr; benchmarks always exit 0."""
    name = f"bench/{Path(script).name}"
    env = {**repo_env(), child_var: "1"}
    cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", str(Path(script).resolve()), *argv]
    try:
        r = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: mpirun -n {ranks} did not finish in {timeout:.0f} s", file=sys.stderr)
        return
    if r.returncode:
        print(f"{name}: {' '.join(cmd)} exited {r.returncode}", file=sys.stderr)
