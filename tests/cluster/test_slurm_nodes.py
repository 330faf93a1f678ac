"""The sbatch scripts on a real multi-node Slurm: one slurmd in each node of a virtual cluster (tests/cluster/slurm-up.sh),
so every job below has its ranks on different nodes, which talk over the nodes' links (TCP), not shared memory.

Run with `make test-slurm-nodes` (pytest -m slurm tests/cluster/test_slurm_nodes.py; root), not in the same session as
`make test-slurm`: when the one-host Slurm (../shared/ci/slurm-up.sh) is up and idle, the fixture stops it and starts
it again afterwards; when it runs jobs, these tests skip. Each rank's interpreter is a wrapper that first prints
"hpcdnn-rank R host NODE role ROLE parent P" (P: the process that started it, slurmstepd under srun, prted under
mpirun), so a job's output says where every rank ran and how it was launched. Jobs are tiny (alexnet_small, 600
generated 28x28 images, a few steps, one thread per rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from vcluster import VirtualCluster, available

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "slurm"))
from model_parallel_nodes import test_model_parallel_replicas_each_on_one_node  # noqa: E402, F401  (collected here, with these fixtures)
from slurmjobs import CI_DIR, REPO, SLURM_DIR, Slurm, make_idx_input, shard_idx  # noqa: E402

pytestmark = pytest.mark.slurm
NAME, SUBNET = "sn", "10.81.0"  # not hv: the `vcluster` fixture's cluster may be up at the same time
ARGS = ["--batch_size=16", "--lr_schedule=constant", "--lr=0.01", "--log_every=5", "--epochs=100"]
ONE_HOST = Path(os.environ.get("SLURM_STATE_DIR", "/tmp/hpcdnn-slurm"))  # the one-host Slurm's state (slurmjobs.cluster)
WRAPPER = """#!/bin/sh
echo "hpcdnn-rank ${PMIX_RANK:-${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-0}}} host $(hostname) role ${HPCDNN_ROLE:--} \\
parent $(cat /proc/$PPID/comm)" >&2
exec %s "$@"
"""


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _pause_one_host() -> bool:
    """Stop the one-host Slurm if it is up and idle (True: it was up); skip if it runs jobs, those are someone's."""
    if not _alive(ONE_HOST / "slurmctld.pid"):
        return False
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # its clients read /etc/slurm/slurm.conf
    jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30, env=env).stdout.split()
    if jobs:
        pytest.skip(f"the one-host Slurm ({ONE_HOST}) is running jobs {jobs}: run these tests when it is idle or down")
    subprocess.run(["bash", str(CI_DIR / "slurm-down.sh")], capture_output=True, timeout=180, env=env, check=True)
    return True


def _resume_one_host() -> None:
    """Start the one-host Slurm again, as slurmjobs.cluster starts it."""
    env = {**{k: v for k, v in os.environ.items() if k != "SLURM_CONF"}, "SLURM_NODES": "2", "SLURM_CPUS": "4"}
    subprocess.run(["bash", str(CI_DIR / "slurm-up.sh")], capture_output=True, timeout=600, env=env, check=True)


@pytest.fixture(scope="module")
def nodes_slurm(request):
    """A 4-node virtual cluster with Slurm on it (slurmctld at SUBNET.1, a slurmd per node), SLURM_CONF pointing at its
    config; everything stopped and removed afterwards, /etc/slurm/slurm.conf as it was."""
    if "slurm" not in (request.config.getoption("-m") or ""):
        pytest.skip("multi-node Slurm tests run with `make test-slurm-nodes` (pytest -m slurm tests/cluster/test_slurm_nodes.py)")
    reason = available()
    if reason:
        pytest.skip(reason)
    etc_conf = _digest(Path("/etc/slurm/slurm.conf"))
    paused = _pause_one_host()
    vc = VirtualCluster(nodes=4, name=NAME, subnet=SUBNET)
    state = Path(f"/tmp/hpcdnn-slurm-{NAME}")
    env = {**vc.env, "VCLUSTER_SLURM_DIR": str(state)}
    try:
        vc.up()
        r = subprocess.run(["bash", str(HERE / "slurm-up.sh")], capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:
            pytest.fail(f"slurm-up.sh exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
            yield vc
    finally:
        subprocess.run(["bash", str(HERE / "slurm-down.sh")], capture_output=True, timeout=180, env=env)
        vc.down()
        if paused:
            _resume_one_host()
    assert not state.exists(), f"slurm-down.sh left {state}"
    assert _digest(Path("/etc/slurm/slurm.conf")) == etc_conf, "/etc/slurm/slurm.conf changed"


@pytest.fixture
def slurm(nodes_slurm, tmp_path):
    wrapper = tmp_path / "python-says-where"
    wrapper.write_text(WRAPPER % sys.executable)
    wrapper.chmod(0o755)
    s = Slurm(tmp_path)
    s.env["PYTHON"] = str(wrapper)
    yield s
    s.cancel_all()


@pytest.fixture(scope="module")
def idx_input(tmp_path_factory):  # slurmjobs' fixtures of the same name start the one-host Slurm: not here
    return make_idx_input(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def dataset(idx_input, tmp_path_factory):
    return shard_idx(idx_input, tmp_path_factory.mktemp("data") / "idx")


def ranks(out: str) -> dict[int, tuple[str, str, str]]:
    """{rank: (node, role, parent process)} from the wrapper's lines in a job's output."""
    return {int(r): (h, role, p) for r, h, role, p in re.findall(r"hpcdnn-rank (\d+) host (\S+) role (\S+) parent (\S+)", out)}


def hostnames(nodelist: str) -> set[str]:
    return set(subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30).stdout.split())


def finished(slurm: Slurm, jid: str, timeout: float = 300) -> str:
    """Wait for the job; assert COMPLETED with exit 0; return its output."""
    info = slurm.wait(jid, timeout)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{slurm.out(jid)}"
    return (slurm.tmp / f"slurm-{jid}.out").read_text()


def train_env(dataset, run_dir, **more) -> dict:
    return {"CONFIG": "fashion_small", "DATA": str(dataset), "RUN_DIR": str(run_dir), **more}


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_prep_array_tasks_and_ranks_on_separate_nodes(slurm, idx_input, dataset):
    """slurm/submit_prep.sh: 2 array tasks of 2 MPI ranks each, whole nodes (--exclusive), so the 4 ranks sit on the 4
    nodes; then the afterok finalize job. The shards are the serial run's bytes."""
    out = slurm.tmp / "array"
    cmd = [str(SLURM_DIR / "submit_prep.sh"), "--array=0-1", "--nodes=2", "--ntasks=2", "--cpus-per-task=1", "--exclusive",
           f"--output={slurm.tmp}/slurm-%A_%a.out", "--", "idx", "--dir", str(idx_input), "--out", str(out), "--shard-size", "50"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=slurm.tmp,
                       env={**slurm.env, "FINALIZE_ARGS": f"--output={slurm.tmp}/slurm-%j.out"})  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.split()) == 2, r.stderr
    array, final = r.stdout.split()
    slurm.jobs += [array, final]
    log = finished(slurm, final)
    assert "every shard matches the manifest" in log, log
    hosts = []
    for task in range(2):
        text = (slurm.tmp / f"slurm-{array}_{task}.out").read_text()
        assert f"task {task} of 2 done" in text and "with 2 rank(s)" in text, text
        where = ranks(text)
        assert sorted(where) == [0, 1] and {p for _, _, p in where.values()} == {"slurmstepd"}, text  # srun --mpi=pmix
        hosts += [h for h, _, _ in where.values()]
    assert sorted(hosts) == [f"{NAME}{i}" for i in range(1, 5)], hosts  # 4 ranks, 4 nodes
    names = sorted(p.name for p in dataset.glob("*.h5")) + ["manifest.json", "mean.npy"]
    assert {n: (out / n).read_bytes() for n in names} == {n: (dataset / n).read_bytes() for n in names}


def test_downpour_server_on_its_own_node(slurm, dataset, nodes_slurm, tmp_path):
    """`sbatch -N 3 slurm/train_downpour.sbatch`: 1 server + 2 workers, one per node, under srun --mpi=pmix; the
    parameters cross the links (each worker's link carries at least a fetch and a push of all 771,210 floats)."""
    run = tmp_path / "run"
    before = nodes_slurm.wire_bytes()
    jid = slurm.sbatch("train_downpour.sbatch", *ARGS, "--max_steps=6", "--n_fetch=3", "--n_push=3",
                       opts=("--nodes=3", "--cpus-per-task=1"), env=train_env(dataset, run))  # fmt: skip
    out = finished(slurm, jid)
    wire = nodes_slurm.wire_bytes(since=before)
    assert "srun --mpi=pmix" in out and "downpour: 2 worker(s), 1 server(s)" in out, out
    where = ranks(out)
    assert sorted(where) == [0, 1, 2] and len({h for h, _, _ in where.values()}) == 3, out
    assert {p for _, _, p in where.values()} == {"slurmstepd"}, out
    server = where[0][0]  # ranks 0..SERVERS-1 serve
    assert server not in {where[1][0], where[2][0]}
    params_bytes = 771_210 * 4
    for rank in (1, 2):
        assert sum(wire[where[rank][0]]) >= 2 * params_bytes, (where, wire)
    assert sum(wire[server]) >= 4 * params_bytes, (where, wire)
    s = summary(run)
    assert s["topology"] == "downpour" and s["steps"] == 6


def test_allreduce_across_nodes_equals_one_host(slurm, dataset, nodes_slurm, tmp_path):
    """train_allreduce.sbatch, 3 ranks on 3 nodes under srun --mpi=pmix, against the same run on this one host under
    mpirun (outside Slurm, meanwhile): the final parameters are bitwise equal."""
    from hpcdnn.mpirun import mpirun

    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [*ARGS, "--max_steps=8"]
    before = nodes_slurm.wire_bytes()
    jid = slurm.sbatch("train_allreduce.sbatch", *args, opts=("--nodes=3", "--ntasks=3", "--cpus-per-task=1"),
                       env=train_env(dataset, run))  # fmt: skip
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", "--config", "fashion_small",
           f"--data={dataset}", f"--run_dir={ref}", "--threads=1", "--topology=allreduce", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    except subprocess.TimeoutExpired:  # a hang fails, with every rank's stacks (mpirun forwards SIGUSR2)
        proc.send_signal(signal.SIGUSR2)
        time.sleep(5)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the one-host reference run did not exit in 300 s; its stacks:\n{out[-2000:]}\n{err[-6000:]}") from None
    out = finished(slurm, jid)
    wire = nodes_slurm.wire_bytes(since=before)
    assert "srun --mpi=pmix" in out and "allreduce: 3 worker(s)" in out, out
    where = ranks(out)
    assert sorted(where) == [0, 1, 2] and len({h for h, _, _ in where.values()}) == 3, out
    assert all(sum(wire[h]) >= 8 * 771_210 * 4 for h, _, _ in where.values()), (where, wire)  # a gradient per step
    with h5py.File(run / "checkpoint.h5", "r") as f, h5py.File(ref / "checkpoint.h5", "r") as g:
        got, want = f["params"][...], g["params"][...]
        assert int(f.attrs["step"]) == int(g.attrs["step"]) == 8
    assert np.isfinite(want).all() and np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"


def test_sandblaster_across_nodes(slurm, dataset, tmp_path):
    """train_sandblaster.sbatch (its preset, fashion_sandblaster): 3 ranks on 3 nodes, a few L-BFGS steps."""
    run = tmp_path / "run"
    jid = slurm.sbatch("train_sandblaster.sbatch", "--batch_size=256", "--max_steps=4", "--log_every=2",
                       opts=("--nodes=3", "--ntasks=3", "--cpus-per-task=1"), env={"DATA": str(dataset), "RUN_DIR": str(run)})  # fmt: skip
    out = finished(slurm, jid)
    assert "--config fashion_sandblaster" in out and "srun --mpi=pmix" in out and "sandblaster: 3 worker(s)" in out, out
    where = ranks(out)
    assert sorted(where) == [0, 1, 2] and len({h for h, _, _ in where.values()}) == 3, out
    s = summary(run)
    assert s["topology"] == "sandblaster" and s["steps"] == 4


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_hetjob_components_on_their_own_nodes(slurm, dataset, tmp_path, launcher):
    """train_downpour_hetjob.sbatch: component 0 (1 server) on one node, component 1 (2 workers, --nodes=2) on two
    others; one heterogeneous srun step (no HET_PMIX_TMPDIR: TmpFS is per node), or mpirun through het-agent.sh."""
    run = tmp_path / "run"
    opts = ("--ntasks=1", "--cpus-per-task=1", ":", "--nodes=2", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-task=0")
    jid = slurm.sbatch("train_downpour_hetjob.sbatch", *ARGS, "--max_steps=3", "--n_fetch=3", "--n_push=3", opts=opts,
                       env=train_env(dataset, run, LAUNCHER=launcher))  # fmt: skip
    out = finished(slurm, jid)
    assert "downpour: 2 worker(s), 1 server(s)" in out, out
    assert ("srun --het-group=0" if launcher == "srun" else "het-agent.sh") in out, out
    where = ranks(out)
    assert [where[r][1] for r in (0, 1, 2)] == ["server", "worker", "worker"], out
    assert len({h for h, _, _ in where.values()}) == 3, out
    parents = {"slurmstepd"} if launcher == "srun" else {"prterun", "prted"}  # mpirun's node: prterun starts its rank
    assert {p for _, _, p in where.values()} <= parents, out
    record = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
    components = [hostnames(c) for c in re.findall(r"\bNodeList=(\S+)", record)]
    assert components == [{where[0][0]}, {where[1][0], where[2][0]}], (components, where)
    assert summary(run)["steps"] == 3


def _slurm_up(vc) -> None:
    """slurm-up.sh again (idempotent): restarts the slurmd of a node that was killed and resumes the node."""
    env = {**vc.env, "VCLUSTER_SLURM_DIR": f"/tmp/hpcdnn-slurm-{NAME}"}
    r = subprocess.run(["bash", str(HERE / "slurm-up.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"slurm-up.sh exited {r.returncode}:\n{r.stderr[-3000:]}"


def _checkpoint_step(run_dir: Path) -> int:
    try:
        with h5py.File(run_dir / "checkpoint.h5", "r") as f:
            return int(f.attrs["step"])
    except (OSError, KeyError):
        return 0


def test_lost_node_requeues_the_job_which_resumes_and_finishes(slurm, dataset, nodes_slurm, tmp_path):
    """A node dies mid-run: every process of a worker's node (its rank, the step daemon, slurmd) is killed. The watcher
    (`hpcdnn launch`, started by env.sh) names the lost rank and node and exits 75; the node fails env.sh's probe, so
    the job requeues itself; Slurm starts it again once it has marked the node DOWN (SlurmdTimeout), on the other three
    nodes; the second run resumes from the last periodic checkpoint and finishes with every push accounted for."""
    run = tmp_path / "run"
    args = [*ARGS, "--max_steps=16", "--checkpoint_every=2", "--log_every=2", "--optimizer=sgd"]
    jid = slurm.sbatch("train_downpour.sbatch", *args, opts=("--nodes=3", "--cpus-per-task=1"), env=train_env(dataset, run))
    slurm.wait_until(lambda: (run / "metrics.jsonl").exists() and _checkpoint_step(run) > 0, 180, "a periodic checkpoint", jid)
    where, batch_host = ranks((slurm.tmp / f"slurm-{jid}.out").read_text()), slurm.show(jid)["BatchHost"]
    node = where[2][0]  # rank 2: a worker, not the root worker (rank 1), not the server (rank 0, on the batch host)
    assert node != batch_host, (where, batch_host)
    t0 = time.monotonic()
    try:
        nodes_slurm.kill(node)
        slurm.wait_until(lambda: int(slurm.show(jid).get("Restarts", 0)) >= 1, 90, f"a requeue of job {jid}", jid)
        requeued = time.monotonic() - t0
        slurm.wait_until(lambda: slurm.show(jid).get("JobState") == "RUNNING", 150, f"job {jid} running again")
        restarted = time.monotonic() - t0
        info = slurm.wait(jid, 150, what="after the requeue")
        done = time.monotonic() - t0
    finally:
        _slurm_up(nodes_slurm)  # the node's slurmd again, the node back in service
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{out}"
    assert f"lost rank 2 (worker) on {node}" in out and f"node {node} ({node}) is lost" in out, out
    assert f"lost node(s) {node}: node failure 1 of at most MAX_NODE_FAILURES=3: requeueing" in out, out
    assert f"scontrol requeue {jid}" in out and f"job {jid} restart 1 on" in out and info["Restarts"] == "1", out
    assert node not in hostnames(info["NodeList"]), info  # Slurm marked the dead node DOWN and ran it elsewhere
    resumed = int(re.search(r"resuming at step (\d+) ", out)[1])
    assert resumed > 0 and resumed % 2 == 0, out
    s = summary(run)
    assert s["steps"] == 16 and s["worker_steps"] == [16, 16], s
    assert s["pushes_sent"] == s["pushes_applied"] + s["pushes_rejected"], s
    print(
        f"\nlost node {node}: requeued {requeued:.0f} s, running again {restarted:.0f} s, completed {done:.0f} s after the kill "
        f"(resumed at step {resumed})"
    )


def test_lost_ranks_beyond_max_node_failures_fail_the_job(slurm, dataset, nodes_slurm, tmp_path):
    """The bound: with NODE_PROBE=0 every lost rank counts as a lost node, and with MAX_NODE_FAILURES=0 none is
    requeued. A worker rank killed mid-run ends the job FAILED with the watcher's exit 75, not requeued, and the
    output says why."""
    run = tmp_path / "run"
    env = train_env(dataset, run, NODE_PROBE="0", MAX_NODE_FAILURES="0")
    jid = slurm.sbatch("train_downpour.sbatch", *ARGS, "--max_steps=200", opts=("--nodes=3", "--cpus-per-task=1"), env=env)
    slurm.wait_until(lambda: (run / "metrics.jsonl").exists(), 180, "training (a metrics line)", jid)
    node = ranks((slurm.tmp / f"slurm-{jid}.out").read_text())[2][0]
    victims = [p for p in nodes_slurm.pids(node) if b"hpcdnn" in _cmdline(p) and b"mpi4py" in _cmdline(p)]
    assert len(victims) == 1, [_cmdline(p) for p in nodes_slurm.pids(node)]
    os.kill(victims[0], 9)
    info = slurm.wait(jid, 90, what="after a rank was killed")
    out = (slurm.tmp / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", f"{info}\n{out}"
    assert f"lost rank 2 (worker) on {node}" in out and "more than MAX_NODE_FAILURES=0:" in out and "not requeueing" in out, out
    assert not (run / "summary.json").exists() and (run / "failed.json").exists()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
