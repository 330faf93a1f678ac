"""The one `mpirun` command builder, for the tests, the benchmarks and anything else that launches ranks itself.

    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "script.py"]       # 3 ranks on this host
    cmd = [*mpirun(4, "--host", "a:2,b:2"), sys.executable, ...]          # extra launcher arguments go after -n

It uses the `mpirun` next to this interpreter (the venv's MPI, the one mpi4py was built against) and adds what that
MPI needs: for Open MPI, --allow-run-as-root when running as root (containers, CI), --oversubscribe when there are
more ranks than cores here, and `--mca osc ^ucx` (the wheel's UCX one-sided component prints errors on machines
without UCX devices; docs/cluster.md says when a cluster wants it back). MPICH's Hydra needs none of them.
Importing this module never imports mpi4py, so the launching process does not initialise MPI.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path


def launcher() -> Path:
    """The `mpirun` of this interpreter's environment."""
    exe = Path(sys.executable).parent / "mpirun"
    if not exe.exists():
        raise FileNotFoundError(f"no mpirun next to {sys.executable}: install an MPI into this environment (make install) or activate one")
    return exe


@functools.cache
def flavour(exe: str | None = None) -> str:
    """'openmpi', 'mpich' or 'other', from `mpirun --version` (cached: the launcher does not change while we run)."""
    exe = exe or str(launcher())
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return "openmpi"
    if "HYDRA" in version.upper() or "MPICH" in version.upper():
        return "mpich"
    return "other"  # launched with no extra flags, as MPICH is


def host_cores() -> int:
    """Physical cores among the CPUs this process may run on: Open MPI's slots on this host (one rank per core, so
    4 hardware threads on 2 cores are 2 slots). Not hpcdnn.placement.usable_cpus: that is one rank's thread budget.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs (not Linux, a container hiding it): count CPUs
            return len(cpus)
    return len(cores)


def mpirun(ranks: int, *extra: str) -> list[str]:
    """The launcher prefix for `ranks` ranks: [mpirun, -n, ranks, <flags this MPI needs>, *extra]."""
    if ranks < 1:
        raise ValueError(f"mpirun needs at least 1 rank, not {ranks}")
    exe = str(launcher())
    cmd = [exe, "-n", str(ranks)]
    if flavour(exe) == "openmpi":
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if ranks > host_cores():
            cmd.append("--oversubscribe")
        cmd += ["--mca", "osc", "^ucx"]
    return [*cmd, *map(str, extra)]
