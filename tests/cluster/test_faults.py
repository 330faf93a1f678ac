"""Node failures across the virtual cluster (tests/cluster/vcluster.py), under `hpcdnn launch` (hpcdnn/launch.py), on
whichever MPI this venv has: a killed node or a cut link ends the job with exit 75 naming the rank and node whatever
the launcher does (Open MPI's mpirun exits 0 when a node's processes all die; a cut link hangs it), the checkpoint
survives and `--resume` finishes with every push accounted for; a slow link slows its own Downpour worker, not the
others, and slows allreduce to its pace.

Node hv1 runs the launcher; Downpour's server is rank 0 on hv2, its workers ranks 1 (the root) on hv3 and 2 on hv4
(names from the fixture: `vc.nodes[1:4]`).
Push rates come from the root's metrics.jsonl (training time per step, n_push = 1) and the watcher's ranks.json.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_launch import Watch

from hpcdnn.launch import EXIT_LOST
from hpcdnn.mpirun import flavour, launcher

pytestmark = [pytest.mark.mpi, pytest.mark.cluster]
TIMEOUT_S = 10  # --heartbeat_timeout: a cut link is noticed after this, the launcher ended 10 s (grace) later
COMMON = ["--config=fashion_small", "--batch_size=32", "--log_every=1", "--threads=1", "--lr_schedule=constant", "--lr=0.02"]
# SGD, n_push = n_fetch = 1: a Put of the gradient and a Get of the parameters per step (the servers apply it)
DOWNPOUR = ["--topology=downpour", "--servers=1", "--optimizer=sgd"]


def job(vc, data: Path, run_dir: Path, *args) -> Watch:
    """The watcher around mpirun with rank i on node i + 2; Open MPI's mpirun forwards HPCDNN_WATCH only when told."""
    forward = ["-x", "HPCDNN_WATCH"] if flavour(str(launcher())) == "openmpi" else []
    train = [sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *COMMON, f"--data={data}", f"--run_dir={run_dir}", *args]
    return Watch(run_dir, [*vc.mpirun(vc.nodes[1:4], *forward), *train], timeout_s=TIMEOUT_S)


def clean(vc) -> None:
    """Whatever a failed job left on the nodes (ranks whose daemon died, a launcher that was killed)."""
    vc.link(vc.nodes[3], up=True)
    vc.shape(vc.nodes[3], None)
    for node in vc.nodes:
        vc.kill(node)


def checkpoint_step(run_dir: Path) -> int:
    """The step of an intact checkpoint (readable, finite parameters)."""
    with h5py.File(run_dir / "checkpoint.h5", "r") as f:
        assert np.isfinite(f["params"][...]).all()
        return int(f.attrs["step"])


def wait_for(what: str, check, w: Watch, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while not check():
        assert w.proc.poll() is None and time.time() < deadline, f"never saw {what} (watcher exit {w.proc.poll()})\n{w.output()}"
        time.sleep(0.2)


def kill_node_and_wait(vc, w: Watch, node: str) -> float:
    """SIGKILL every process of `node`; the watcher must exit 75 within 60 s. Returns the time it took."""
    t0 = time.time()
    vc.kill(node)
    assert w.wait(timeout=90) == EXIT_LOST, w.output()
    took = time.time() - t0
    assert took < 60, took
    return took


def test_killed_worker_node_then_killed_server_node_resume_accounts_for_every_push(vcluster, fashion_tiny, tmp_path):
    """(a) hv4 (a worker) killed: exit 75 naming rank 2 on hv4, checkpoint intact; (c) the resumed run's server node
    hv2 killed: exit 75 naming rank 0 on hv2, checkpoint intact; the second resume, all nodes healthy, runs 4 steps
    past the checkpoint and finishes with every worker at (at least) its step count and one push counted per step."""
    run = tmp_path / "dp"
    args = [*DOWNPOUR, "--epochs=10000", "--checkpoint_every=2"]  # only the faults end the first two attempts
    took = {}
    for attempt, (node, rank, role) in enumerate([(vcluster.nodes[3], 2, "worker"), (vcluster.nodes[1], 0, "server")]):
        before = checkpoint_step(run) if attempt else 0
        w = job(vcluster, fashion_tiny, run, *args, *(["--resume"] if attempt else []))
        try:
            wait_for("a new checkpoint", lambda b=before: (run / "checkpoint.h5").exists() and checkpoint_step(run) > b, w)
            wait_for("every rank's heartbeat", lambda w=w: len(w.ranks()) == 3, w)
            took[node] = kill_node_and_wait(vcluster, w, node)
        finally:
            clean(vcluster)
        assert f"lost rank {rank} ({role}) on {node}" in w.output(), w.output()
        f = json.loads((run / "failed.json").read_text())
        assert f["hosts"] == [node] and [x["rank"] for x in f["lost"]] == [rank], f
        assert checkpoint_step(run) > before  # intact, and from this attempt
    end = checkpoint_step(run) + 4
    w = job(vcluster, fashion_tiny, run, *args, "--resume", f"--max_steps={end}")
    assert w.wait(timeout=240) == 0, w.output()
    s = json.loads((run / "summary.json").read_text())
    # the root stops at `end`; the other worker may have been further ahead at the checkpoint (asynchronous), and
    # resumes there: it never goes back. One push per step (n_push = 1): every step's push is counted exactly once.
    assert s["steps"] == end and s["worker_steps"][0] == end and s["worker_steps"][1] >= end, s
    assert s["pushes_sent"] == s["pushes_applied"] + s["pushes_rejected"] == sum(s["worker_steps"]), s
    assert not (run / "failed.json").exists()
    print(f"\nfaults: job ended {', '.join(f'{t:.1f} s after {n} was killed' for n, t in took.items())}")


def root_times(run_dir: Path) -> dict[int, float]:
    """step -> training time of the root worker's logged steps (metrics.jsonl, --log_every=1)."""
    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def measure(vc, w: Watch, run_dir: Path, seconds: float, min_steps: int = 0) -> dict:
    """Over `seconds` (longer, up to 60 s, until every rank moved `min_steps`): the root's steps/s (metrics), every
    rank's steps/s (ranks.json) and the last node's link bytes/s."""
    first = max(root_times(run_dir))
    r0, t0, wire = w.ranks(), time.time(), vc.wire_bytes()
    time.sleep(seconds)
    moved = lambda: min(w.ranks()[r]["step"] - r0[r]["step"] for r in r0 if r0[r]["role"] == "worker")  # noqa: E731
    while moved() < min_steps and time.time() - t0 < 60:
        time.sleep(0.5)
    r1, dt, wire = w.ranks(), time.time() - t0, vc.wire_bytes(since=wire)
    times = root_times(run_dir)
    last = max(times)
    root = (last - first) / max(times[last] - times[first], 1e-9)
    return {"root": root, "ranks": {r: (r1[r]["step"] - r0[r]["step"]) / dt for r in r1}, "slow_Bps": max(wire[vc.nodes[3]]) / dt}


def slow_link_run(vc, w: Watch, run_dir: Path, window: float) -> tuple[dict, dict, float]:
    """Baseline window, then hv4's link shaped to a tenth of what it carried, then the slow window."""

    def started() -> bool:
        workers = [r["step"] for r in w.ranks().values() if r["role"] == "worker"]
        return len(w.ranks()) == 3 and min(workers) >= 2 and len(root_times(run_dir)) >= 2

    wait_for("every worker past step 2", started, w)
    base = measure(vc, w, run_dir, window, min_steps=3)  # enough steps to tell a rate from a stall
    gbit = base["slow_Bps"] * 8 / 1e9 / 10
    vc.shape(vc.nodes[3], gbit)
    time.sleep(3)  # the queue that built up at the old rate drains
    slow = measure(vc, w, run_dir, window)
    return base, slow, gbit


def test_slow_link_slows_only_its_downpour_worker_then_a_cut_link_ends_the_job(vcluster, fashion_tiny, tmp_path):
    """(b) hv4's link at a tenth of what it carried: the other worker keeps >= (N-1)/N of its push rate (N = 2
    workers) while hv4's own rate falls; then hv4's link is cut: exit 75 within 60 s naming rank 2 on hv4."""
    run = tmp_path / "dp"
    w = job(vcluster, fashion_tiny, run, *DOWNPOUR, "--epochs=10000")
    try:
        base, slow, gbit = slow_link_run(vcluster, w, run, window=15)
        t0 = time.time()
        vcluster.link(vcluster.nodes[3], up=False)
        assert w.wait(timeout=90) == EXIT_LOST, w.output()
        cut = time.time() - t0
    finally:
        clean(vcluster)
    print(f"\nDownpour, hv4 at {gbit * 1e3:.1f} Mbit/s (it carried {base['slow_Bps'] / 1e6:.2f} MB/s): root worker (hv3) "
          f"{base['root']:.3f} -> {slow['root']:.3f} pushes/s, hv4 worker {base['ranks'][2]:.3f} -> {slow['ranks'][2]:.3f} "
          f"steps/s; link cut: job ended after {cut:.1f} s")  # fmt: skip
    assert cut < 60 and f"lost rank 2 (worker) on {vcluster.nodes[3]}" in w.output() and "no heartbeat for" in w.output(), w.output()
    assert json.loads((run / "failed.json").read_text())["hosts"] == [vcluster.nodes[3]]
    assert slow["ranks"][2] < 0.5 * base["ranks"][2], ("the shaped link did not slow hv4's worker", base, slow)
    assert slow["root"] >= (2 - 1) / 2 * base["root"], (base, slow)  # N = 2 workers keep (N - 1)/N of their rate


def test_slow_link_slows_allreduce_to_its_pace(vcluster, fashion_tiny, tmp_path):
    """(b) allreduce waits for its slowest link: measured and reported, asserted only to slow down; then SIGUSR1 to
    the watcher stops the job cleanly across the nodes (exit 0, preempted.json, no failure)."""
    run = tmp_path / "ar"
    w = job(vcluster, fashion_tiny, run, "--topology=allreduce", "--epochs=10000")
    try:
        base, slow, gbit = slow_link_run(vcluster, w, run, window=10)
        vcluster.shape(vcluster.nodes[3], None)
        w.proc.send_signal(signal.SIGUSR1)
        code = w.wait(timeout=120)
    finally:
        clean(vcluster)
    print(f"\nallreduce, hv4 at {gbit * 1e3:.1f} Mbit/s (it carried {base['slow_Bps'] / 1e6:.2f} MB/s): "
          f"{base['root']:.3f} -> {slow['root']:.3f} steps/s ({slow['root'] / base['root']:.2f}x)")  # fmt: skip
    assert code == 0 and (run / "preempted.json").exists() and not (run / "failed.json").exists(), w.output()
    assert slow["root"] < base["root"], (base, slow)
