"""slurm/train_model_parallel.sbatch on a real Slurm: a heterogeneous Downpour job whose replicas span K ranks (--mp=K).

Run with `make test-slurm` (the session's one-host Slurm has two slurmd 'nodes', which a heterogeneous job needs: its
components never share a node). Tiny job: alexnet_small on 600 generated 28x28 images, a few steps, one thread per rank.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from slurmjobs import *  # noqa: F403  (the fixtures: cluster, slurm, idx_input, dataset)

pytestmark = pytest.mark.slurm

ARGS = ["--batch_size=16", "--lr_schedule=constant", "--lr=0.01", "--log_every=5", "--epochs=100"]


def env_for(dataset, run_dir, **more) -> dict:
    return {"CONFIG": "fashion_small", "DATA": str(dataset), "RUN_DIR": str(run_dir), **more}


def assert_completed(slurm, jid):
    info = slurm.show(jid)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"{info.get('JobState')} {info.get('ExitCode')}\n{slurm.out(jid)}"
    )


def test_model_parallel_replica_of_two_ranks_with_a_server(slurm, dataset, tmp_path):
    """Component 0: 1 server; component 1: one node, 2 tasks per node = 1 replica x 2 ranks (K taken from the tasks per
    node, not from MP). One srun heterogeneous step; each partition's pushes are all accounted for."""
    run = tmp_path / "run"
    pmix = tmp_path / "pmix"  # two slurmd on one host: keep their PMIx directories apart
    opts = ("--ntasks=1", "--cpus-per-task=1", ":", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0")
    jid = slurm.sbatch("train_model_parallel.sbatch", *ARGS, "--max_steps=3", "--n_fetch=3", "--n_push=3", opts=opts,
                       env=env_for(dataset, run, LAUNCHER="srun", HET_PMIX_TMPDIR=str(pmix)), wait=240)  # fmt: skip
    assert_completed(slurm, jid)
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert "--mp=2" in out and "--het-group=0" in out, out
    assert "downpour: 1 worker(s) x 2 ranks (model parallel), 1 server(s)" in out, out
    record = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
    assert "NumTasks=2" in record, record  # component 1: one replica of two ranks
    s = json.loads((run / "summary.json").read_text())
    assert s["topology"] == "downpour" and s["steps"] == 3, s
    parts = s["partition_pushes"]
    assert len(parts) == 2 and all(p["pushes_sent"] > 0 for p in parts), s
    assert all(p["pushes_sent"] == p["pushes_applied"] + p["pushes_rejected"] for p in parts), parts
