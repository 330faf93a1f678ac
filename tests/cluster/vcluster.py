"""The virtual cluster from Python (tests/cluster/vcluster.sh does the work): nodes, links, faults, the launcher.

    with VirtualCluster(nodes=4) as vc:                   # up on entry, everything removed on exit
        cmd = [*vc.mpirun(["hv2", "hv3", "hv3"]), sys.executable, "-m", "mpi4py", "script.py"]
        before = vc.wire_bytes()
        subprocess.run(cmd, ...)                         # rank 0 on hv2, ranks 1-2 on hv3; launched from hv1
        sent = vc.wire_bytes(since=before)               # {node: (bytes sent, bytes received)} on its link
        vc.shape("hv3", 0.1); vc.link("hv3", up=False); vc.kill("hv3")

The launcher (`mpirun` / Hydra's `mpiexec`) runs on the first node, as a batch script runs on a job's first node;
ranks go where the host list says. Each node is a network namespace with its own hostname, so to the MPI library
ranks on different nodes are different hosts and talk through TCP over the node's veth link: Open MPI with
`btl self,sm,tcp` and `osc rdma` (shared memory only between ranks of one node), MPICH's UCX netmod with
`UCX_TLS=tcp` (UCX would otherwise find the other namespaces' ranks on the same machine and use shared memory).
`wire_bytes` reads the host side of each node's veth, so a test can prove bytes really crossed a link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hpcdnn.mpirun import flavour, launcher

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "vcluster.sh"
AGENT = HERE / "agent.sh"


def available() -> str | None:
    """None if this machine can build a virtual cluster, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the virtual cluster needs root (network namespaces)"
    for tool in ("ip", "tc", "unshare", "flock"):
        if shutil.which(tool) is None:
            return f"the virtual cluster needs `{tool}` (apt-get install iproute2 util-linux)"
    return None


class VirtualCluster:
    def __init__(self, nodes: int = 4, name: str = "hv", subnet: str = "10.77.0", link_gbit: float | None = None):
        self.n, self.name, self.subnet, self.link_gbit = nodes, name, subnet, link_gbit
        self.env = {**os.environ, "VCLUSTER_NAME": name, "VCLUSTER_SUBNET": subnet}
        self.nodes = [f"{name}{i}" for i in range(1, nodes + 1)]

    def sh(self, *args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run vcluster.sh with this cluster's name and subnet."""
        r = subprocess.run([str(SCRIPT), *map(str, args)], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"vcluster.sh {' '.join(map(str, args))} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def up(self) -> VirtualCluster:
        self.sh("up", "--nodes", self.n, "--link-gbit", self.link_gbit or "off")
        return self

    def down(self) -> None:
        self.sh("down", timeout=120)

    def __enter__(self) -> VirtualCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def addr(self, node: str) -> str:
        return f"{self.subnet}.{10 + int(node[len(self.name) :])}"

    def shape(self, node: str, gbit: float | None) -> None:
        """Set `node`'s link rate in Gbit/s (both directions); None removes the shaping."""
        self.sh("shape", node, gbit or "off")

    def link(self, node: str, up: bool) -> None:
        self.sh("link", node, "up" if up else "down")

    def kill(self, node: str) -> None:
        """SIGKILL every process on `node`: the node fails."""
        self.sh("kill", node)

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def wire_bytes(self, since: dict | None = None) -> dict[str, tuple[int, int]]:
        """{node: (bytes the node sent, bytes it received)} on its link; minus `since` when given."""
        out = {}
        for node in self.nodes:
            stats = Path(f"/sys/class/net/{node}-h/statistics")
            sent, received = int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())
            if since:
                sent, received = sent - since[node][0], received - since[node][1]
            out[node] = (sent, received)
        return out

    def as_node(self, node: str) -> list[str]:
        """Command prefix that runs what follows on `node` (its namespace and hostname)."""
        return [str(SCRIPT), "exec", node]

    def mpirun(self, hosts: list[str], *extra: str, head: str | None = None, verbose: bool = False) -> list[str]:
        """Launcher prefix for len(hosts) ranks, rank i on node hosts[i] (consecutive ranks share a node), started
        on `head` (default: the first node). `verbose` makes the MPI library print the components it selects."""
        counts: dict[str, int] = {}
        for h in hosts:
            counts[h] = counts.get(h, 0) + 1
        if (
            list(counts) != list(dict.fromkeys(hosts))
            or sum(counts.values()) != len(hosts)
            or any(hosts[i] != hosts[i + 1] and hosts[i + 1] in hosts[:i] for i in range(len(hosts) - 1))
        ):
            raise ValueError(f"ranks of one node must be consecutive: {hosts}")
        spec = ",".join(f"{h}:{c}" for h, c in counts.items())
        exe, net = str(launcher()), f"{self.subnet}.0/24"
        env = [f"VCLUSTER_NAME={self.name}", f"VCLUSTER_SUBNET={self.subnet}"]
        if flavour(exe) == "openmpi":
            cmd = [exe, "-n", str(len(hosts)), "--host", spec, "--prtemca", "plm_ssh_agent", str(AGENT)]
            cmd += ["--prtemca", "oob_tcp_if_include", net, "--mca", "btl_tcp_if_include", net]
            cmd += ["--mca", "btl", "self,sm,tcp", "--mca", "osc", "rdma", "--bind-to", "none"]
            cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
            cmd += ["--mca", "osc_base_verbose", "100", "--mca", "btl_base_verbose", "100"] if verbose else []
        else:  # MPICH's Hydra; UCX over TCP only (its shared-memory transports would see one machine)
            cmd = [exe, "-launcher", "ssh", "-launcher-exec", str(AGENT), "-hosts", spec, "-n", str(len(hosts))]
            env += ["UCX_TLS=tcp", "UCX_NET_DEVICES=eth0"] + (["MPIR_CVAR_DEBUG_SUMMARY=1", "UCX_LOG_LEVEL=info"] if verbose else [])
        return [*self.as_node(head or self.nodes[0]), "env", *env, *cmd, *map(str, extra)]
