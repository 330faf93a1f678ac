"""test_slurm_nodes.py's model-parallel test, kept here because that module is at its size limit (350 lines).

test_slurm_nodes.py imports the test function, so pytest collects it there and it runs on that module's virtual-cluster
Slurm with that module's fixtures (`slurm`, `dataset`); this module is not collected on its own (no test_ prefix).
"""

from __future__ import annotations

import re
import subprocess

import pytest


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_model_parallel_replicas_each_on_one_node(slurm, dataset, tmp_path, launcher):
    """slurm/train_model_parallel.sbatch: component 0 (1 server) on one node, component 1 as 2 nodes x 2 tasks = 2 replicas
    x 2 ranks (--mp=2 from the tasks per node). Worker w is partition w % 2 of replica w // 2, so each replica's two ranks
    (its activation exchanges) share a node; the server and the two replicas sit on three different nodes. Under srun (one
    heterogeneous step) and under mpirun (MPMD blocks, daemons through het-agent.sh): each places the ranks its own way."""
    from test_slurm_nodes import ARGS, finished, hostnames, ranks, summary, train_env

    run = tmp_path / "run"
    opts = ("--ntasks=1", "--cpus-per-task=1", ":", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0")
    jid = slurm.sbatch("train_model_parallel.sbatch", *ARGS, "--max_steps=3", "--n_fetch=3", "--n_push=3", opts=opts,
                       env=train_env(dataset, run, LAUNCHER=launcher))  # fmt: skip
    out = finished(slurm, jid)
    assert "--mp=2" in out and ("srun --het-group=0" if launcher == "srun" else "het-agent.sh") in out, out
    assert "downpour: 2 worker(s) x 2 ranks (model parallel), 1 server(s)" in out, out
    where = ranks(out)  # ranks 0..S-1: component 0 (servers); then component 1's tasks in order, 2 per node
    assert [where.get(r, ("", "?"))[1] for r in range(5)] == ["server"] + ["worker"] * 4 and len(where) == 5, out
    replicas = [{where[1][0], where[2][0]}, {where[3][0], where[4][0]}]
    assert [len(r) for r in replicas] == [1, 1] and len({where[0][0]} | replicas[0] | replicas[1]) == 3, (where, out)
    record = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
    components = [hostnames(c) for c in re.findall(r"\bNodeList=(\S+)", record)]
    assert components == [{where[0][0]}, replicas[0] | replicas[1]], (components, where)
    s = summary(run)
    assert s["topology"] == "downpour" and s["steps"] == 3, s
    parts = s["partition_pushes"]
    assert len(parts) == 2 and parts[0]["pushes_sent"] == parts[1]["pushes_sent"] > 0, s  # a replica's ranks push together
    assert all(p["pushes_sent"] == p["pushes_applied"] + p["pushes_rejected"] for p in parts), parts
    assert s["pushes_sent"] == sum(p["pushes_sent"] for p in parts), s
