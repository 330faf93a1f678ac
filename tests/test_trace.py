"""`--trace`: the recorder without MPI (hpcdnn/trace.py), a local run with and without it, and Downpour, allreduce and
Sandblaster runs of 3 ranks under a real mpirun whose one JSON file must be a well-formed Chrome trace: a named track
per rank, the expected events, durations >= 0, and spans on one (pid, tid) that nest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REPO, mpirun

from hpcdnn import trace

COMMON = ["--config=fashion_small", "--threads=1", "--log_every=2", "--lr_schedule=constant", "--lr=0.02"]


class OneRank:
    """The communicator methods the recorder calls, for one rank without MPI."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Dup(self):
        return self

    def Free(self) -> None:
        pass

    def Barrier(self) -> None:
        pass

    def allgather(self, x):
        return [x]


def load(path: Path) -> list[dict]:
    doc = json.loads(Path(path).read_text())
    assert set(doc) >= {"traceEvents", "otherData"} and isinstance(doc["traceEvents"], list)
    return doc["traceEvents"]


def check_well_formed(events: list[dict], ranks: int) -> dict[int, str]:
    """Every rank has a named process and named threads; complete events have dur >= 0 and nest per (pid, tid); async
    begins and ends pair up. Returns pid -> process name."""
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names) == list(range(ranks)), names
    threads = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = defaultdict(list)
    for e in events:
        assert e["ph"] in ("M", "X", "i", "b", "e", "C"), e
        if e["ph"] != "M":
            assert e["pid"] in names and (e["pid"], e["tid"]) in threads and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
            spans[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for track, items in spans.items():  # sorted by start, longest first: each span must end inside every open one
        open_ends = []
        for a, b, name in sorted(items, key=lambda s: (s[0], -s[1])):
            while open_ends and open_ends[-1][0] <= a:
                open_ends.pop()
            assert not open_ends or b <= open_ends[-1][0] + 1e-3, f"{name} [{a}, {b}] overlaps {open_ends[-1][1]} on {track}"
            open_ends.append((b, name))
    opened = defaultdict(int)
    for e in events:
        if e["ph"] in ("b", "e"):
            opened[e["pid"], e["name"], e["id"]] += 1 if e["ph"] == "b" else -1
    assert all(v == 0 for v in opened.values()), dict(opened)
    return names


def names_of(events: list[dict], pid: int, ph: str = "X") -> set[str]:
    return {e["name"] for e in events if e["pid"] == pid and e["ph"] == ph}


def test_recorder_without_mpi(tmp_path):
    """Off: one shared no-op, nothing written. On: spans, instants, async, counters, the decorator and the timed
    iterator land in the file with their tracks; the event list is bounded and says how much it dropped."""
    assert not trace.enabled() and trace.span("x") is trace.span("y") and trace.finish() is None
    trace.instant("nothing")
    assert list(trace.iterate(iter([1, 2]))) == [1, 2] and not list(tmp_path.iterdir())

    @trace.traced("decorated", "driver", "driver")
    def work(x):
        return x + 1

    assert trace.start(str(tmp_path / "t.json"), OneRank(), role="worker", root=True)
    with trace.span("outer", a=1) as s:
        with trace.span("inner", "comm", "comm"):
            assert work(1) == 2
        s.set(late=2)
    trace.instant("won", k=3)
    trace.async_begin("bucket 0", 0)
    trace.async_end("bucket 0", 0)
    trace.counter("pushes applied", 5)
    trace.set_role("coordinator")
    assert list(trace.iterate([7, 8])) == [7, 8]
    assert trace.finish() == tmp_path / "t.json" and not trace.enabled()
    events = load(tmp_path / "t.json")
    assert "coordinator (root)" in check_well_formed(events, 1)[0]
    assert names_of(events, 0) == {"outer", "inner", "decorated", "data wait"}
    assert [e["args"] for e in events if e["name"] == "outer"] == [{"a": 1, "late": 2}]
    assert {e["name"] for e in events if e["ph"] in ("i", "C", "b")} == {"won", "pushes applied", "bucket 0"}
    tids = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert {e["name"]: e["tid"] for e in events if e["ph"] == "X"} == {"outer": tids["compute"], "inner": tids["comm"],
                                                                        "decorated": tids["driver"], "data wait": tids["data"]}  # fmt: skip

    trace.start(str(tmp_path / "small.json"), max_events=3)
    for _ in range(5):
        trace.instant("tick")
    trace.finish()
    doc = json.loads((tmp_path / "small.json").read_text())
    assert doc["otherData"]["dropped"] == 2 and sum(e["name"] == "tick" for e in doc["traceEvents"]) == 3


def test_trace_is_a_leaf():
    """hpcdnn.trace imports the standard library and hpcdnn.atomic only (an allow-list: test_layout's rule is a deny-list)."""
    from test_layout import import_graph

    ours_or_third_party = {m for m in import_graph()["hpcdnn.trace"] if m.split(".")[0] not in sys.stdlib_module_names}
    assert ours_or_third_party == {"hpcdnn.atomic"}


def test_local_run_with_and_without_trace(tiny, tmp_path):
    """One process, no MPI: --trace writes one file with rank 0's steps; without it nothing but the run directory."""
    from hpcdnn.config import load_config
    from hpcdnn.train import train

    args = [*COMMON[1:], f"--data={tiny}", "--batch_size=16", "--max_steps=3"]
    train(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'off'}"]))
    assert not trace.enabled() and sorted(p.name for p in tmp_path.iterdir()) == ["off"]
    assert not [p for p in (tmp_path / "off").rglob("*") if p.is_file() and b"traceEvents" in p.read_bytes()]
    train(load_config("fashion_small", [*args, f"--run_dir={tmp_path / 'on'}", f"--trace={tmp_path / 'on.json'}"]))
    events = load(tmp_path / "on.json")
    assert "worker (root)" in check_well_formed(events, 1)[0]
    assert {"forward", "backward", "apply", "data wait", "checkpoint", "checkpoint write", "final evaluation"} <= names_of(events, 0)


def run_traced(tmp_path: Path, *args: str) -> list[dict]:
    """`hpcdnn train ... --trace` on 3 ranks under mpirun (timeout: a hung collective fails, never hangs); its events."""
    out = tmp_path / "trace.json"
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *COMMON, *args, f"--run_dir={tmp_path / 'run'}",
           f"--trace={out}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return load(out)


STEP = {"forward", "backward", "apply", "data wait", "checkpoint"}


@pytest.mark.mpi
def test_downpour_trace(tiny, tmp_path):
    """1 server + 2 workers: push and fetch per shard on the workers, the server's serve and apply spans and its shard
    version counter; the timeline renders."""
    from hpcdnn.plot import plot_trace

    events = run_traced(tmp_path, f"--data={tiny}", "--topology=downpour", "--servers=1", "--batch_size=16", "--epochs=2")
    procs = check_well_formed(events, 3)
    assert "server" in procs[0] and "worker (root)" in procs[1] and "worker @" in procs[2]
    assert {"serve", "apply"} <= names_of(events, 0) and "shard version" in names_of(events, 0, "C")
    for pid in (1, 2):
        assert STEP | {"push", "push shard 0", "fetch", "fetch shard 0", "stop agreement"} <= names_of(events, pid)
    assert {"evaluate", "checkpoint write", "final evaluation", "wait for workers"} <= names_of(events, 1)
    png = plot_trace(tmp_path / "trace.json", tmp_path / "trace.png")
    assert png.stat().st_size > 10_000


@pytest.mark.mpi
def test_allreduce_trace(tiny, tmp_path):
    """3 workers: the reduction on every rank, blocking (one call) or as buckets in flight from issue to completion."""
    events = run_traced(tmp_path, f"--data={tiny}", "--topology=allreduce", "--batch_size=16", "--bucket_mb=0.5", "--max_steps=3")
    check_well_formed(events, 3)
    for pid in range(3):
        names = names_of(events, pid)
        buckets = {e["name"] for e in events if e["pid"] == pid and e["ph"] == "b"}
        assert STEP | {"stop agreement", "broadcast parameters"} <= names
        assert "allreduce" in names or ("allreduce wait" in names and {"bucket 0", "bucket 1"} <= buckets), (names, buckets)


@pytest.mark.mpi
def test_sandblaster_trace(tiny, tmp_path):
    """3 ranks, rank 0 the coordinator: claims, portions and who won them, line searches of objective evaluations."""
    events = run_traced(tmp_path, f"--data={tiny}", "--topology=sandblaster", "--batch_size=48", "--sb_portions=12", "--sb_chunk=4",
                        "--sb_batch_iters=2", "--max_steps=3")  # fmt: skip
    procs = check_well_formed(events, 3)
    assert "coordinator (root)" in procs[0]
    won = sum(e["name"] == "won" for e in events)
    evaluations = sum(e["name"] == "evaluation" for e in events) // 3  # every rank takes part in every evaluation
    assert won == 12 * evaluations and evaluations >= 4, (won, evaluations)
    for pid in range(3):
        assert {"evaluation", "L-BFGS iteration", "line search", "lbfgs direction", "objective reduce"} <= names_of(events, pid)
        assert {"claim", "won"} <= names_of(events, pid, "i") and "portion" in names_of(events, pid)
    assert {"checkpoint", "checkpoint write", "final evaluation"} <= names_of(events, 0)
