"""Across the virtual cluster's nodes (tests/cluster/vcluster.py), on whichever MPI this venv has: ranks on different
nodes talk through TCP over their links (proved by the selected components and by the bytes each link carried), and
allreduce, Downpour, Sandblaster and data-prep give what they give on one host.

Node hv1 runs the launcher (and, in the one-node runs, every rank); hv2..hv4 are the job's nodes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, prep, shard_bytes

pytestmark = [pytest.mark.mpi, pytest.mark.cluster]
HERE = Path(__file__).parent
MPI_TESTS = HERE.parent / "mpi"
NODES = ["hv2", "hv3", "hv4"]  # one rank per node
COMMON = ["--config=fashion_small", "--batch_size=32", "--log_every=5", "--threads=1", "--lr_schedule=constant", "--lr=0.02"]


def run(vc, hosts: list[str], *args, timeout: float = 240, verbose: bool = False) -> subprocess.CompletedProcess:
    """`python -m mpi4py ARGS` with rank i on hosts[i]; fails with both streams unless it exits 0."""
    cmd = [*vc.mpirun(hosts, verbose=verbose), sys.executable, "-m", "mpi4py", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def train(vc, hosts: list[str], *args, **kw) -> subprocess.CompletedProcess:
    return run(vc, hosts, "-m", "hpcdnn", "train", *COMMON, *args, **kw)


def params(run_dir: Path) -> np.ndarray:
    with h5py.File(run_dir / "checkpoint.h5", "r") as f:
        return f["params"][...]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_ranks_talk_through_the_network(vcluster):
    """RMA (Put, Accumulate, Get) and Allreduce between three nodes: right values, the MPI library chose its network
    path (Open MPI osc/rdma over btl/tcp; MPICH's UCX netmod on tcp/eth0 for inter-node peers), and every node's
    link carried at least the bytes the ranks exchanged, so shared memory did not carry them."""
    floats = 1 << 18  # 1 MiB per rank and operation
    before = vcluster.wire_bytes()
    r = run(vcluster, NODES, HERE / "transport_case.py", floats, verbose=True)
    wire = vcluster.wire_bytes(since=before)
    out = r.stdout + r.stderr
    assert sorted(re.findall(r"rank (\d) host (\w+) ok", r.stdout)) == [("0", "hv2"), ("1", "hv3"), ("2", "hv4")]
    if "UCX netmod" in out:  # MPICH
        inter = set(re.findall(r"\[(hv\d):\d+:\d+\].*inter-node cfg#\d+ .*rma_am\(tcp/eth0\)", out))
        assert inter == set(NODES), f"UCX inter-node transports: {inter}\n{out[-3000:]}"
        assert not re.search(r"inter-node cfg#\d+ .*(posix|sysv|cma|xpmem)", out), out[-3000:]
    else:  # Open MPI
        osc = dict(re.findall(r"\[(hv\d):\d+\] .*select: component (\w+) selected", out))
        assert osc == {n: "rdma" for n in NODES}, f"osc components: {osc}\n{out[-3000:]}"
    payload = floats * 4
    for node in ("hv3", "hv4"):  # each origin sent its Put and Accumulate and received its Get across its link
        sent, received = wire[node]
        assert sent >= 2 * payload and received >= payload, (node, wire)
    assert wire["hv2"][1] >= 4 * payload, wire  # the window's node received both origins' Puts and Accumulates


def test_allreduce_across_nodes_is_bitwise_the_one_node_run(vcluster, fashion_tiny, tmp_path):
    args = [f"--data={fashion_tiny}", "--topology=allreduce", "--max_steps=12"]
    train(vcluster, ["hv1"] * 3, *args, f"--run_dir={tmp_path / 'one'}")
    before = vcluster.wire_bytes()
    train(vcluster, NODES, *args, f"--run_dir={tmp_path / 'three'}")
    wire = vcluster.wire_bytes(since=before)
    np.testing.assert_array_equal(params(tmp_path / "three"), params(tmp_path / "one"))
    vector = params(tmp_path / "one").nbytes
    assert all(wire[n][0] >= 12 * vector / 3 for n in NODES), wire  # ≥ a third of the gradient per step, each node


def test_downpour_servers_on_their_own_node(vcluster, fashion_tiny, tmp_path):
    """Server on hv2, workers on hv3 and hv4, Adagrad: every push accounted for; the pushes crossed hv2's link."""
    run_dir = tmp_path / "dp"
    before = vcluster.wire_bytes()
    train(vcluster, NODES, f"--data={fashion_tiny}", f"--run_dir={run_dir}", "--topology=downpour", "--servers=1",
          "--optimizer=adagrad", "--max_steps=8", "--warmstart_steps=2")  # fmt: skip
    wire = vcluster.wire_bytes(since=before)
    s = summary(run_dir)
    assert s["pushes_sent"] == s["pushes_applied"] + s["pushes_rejected"] and s["pushes_applied"] > 0, s
    assert s["servers"] == 1
    vector = params(run_dir).nbytes
    assert wire["hv2"][1] >= s["pushes_sent"] * vector, (wire, s)  # each push brought at least the gradient to hv2


def test_downpour_one_worker_equals_torch_sgd(vcluster, tmp_path):
    """Two servers (hv2, hv3) + one worker (hv4), n_fetch = n_push = 1: 50 momentum-SGD pushes == torch.optim.SGD."""
    run(vcluster, NODES, MPI_TESTS / "downpour_cases.py", "sgd_vs_torch", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["pushes_applied"] == r["pushes_sent"] == 50 and r["servers"] == 2
    assert r["max_abs_diff"] < 1e-5


def test_sandblaster_three_nodes_give_the_iterates_of_one_rank(vcluster, tmp_path):
    run(vcluster, NODES, MPI_TESTS / "sandblaster_cases.py", "convex", tmp_path, "plain,wolfe", "plain,wolfe")
    for name in ("plain", "wolfe"):
        one, three = np.load(tmp_path / "1" / f"{name}.npz"), np.load(tmp_path / "3" / f"{name}.npz")
        np.testing.assert_allclose(three["iterates"], one["iterates"], rtol=0, atol=1e-12)


def test_data_prep_across_nodes_writes_the_serial_bytes(vcluster, imagenet2012, tmp_path):
    common = ["imagenet", "--root", imagenet2012["root"], "--size", "40", "--shard-size", "3", "--encoding", "raw"]
    assert prep(*common, "--out", tmp_path / "serial") == 0
    r = run(vcluster, NODES, "-m", "data_prep", *common, "--out", tmp_path / "nodes", timeout=180)
    assert "3 rank(s)" in r.stdout
    assert shard_bytes(tmp_path / "nodes") == shard_bytes(tmp_path / "serial")
