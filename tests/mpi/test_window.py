"""RMA windows under a real mpirun: SharedWindow has no lock-per-operation methods and still counts, swaps and reads
right; both window classes free themselves in `with`. The checks run in tests/mpi/window_cases.py on COMM_SELF and on
COMM_WORLD (3 ranks), in one launch with a timeout (a hung epoch fails instead of blocking CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, mpirun

pytestmark = pytest.mark.mpi
CASES = Path(__file__).with_name("window_cases.py")
RANKS = 3
INCREMENTS = 20  # as in window_cases.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 3 ranks found, per communicator ("self", "world")."""
    out = tmp_path_factory.mktemp("window") / "result.json"
    cmd = [*mpirun(RANKS), sys.executable, "-m", "mpi4py", str(CASES), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    found = json.loads(out.read_text())
    assert len(found) == RANKS
    return found


def groups(ranks: list[dict], comm: str, part: str) -> list[list[dict]]:
    """The findings of `part` per communicator: on COMM_SELF every rank is a group of one."""
    if comm == "self":
        return [[rank["self"][part]] for rank in ranks]
    return [[rank["world"][part] for rank in ranks]]


def test_shared_window_has_no_lock_per_operation_methods(ranks):
    for rank in ranks:
        shared = rank["self"]["shared"]
        assert shared["present_on_shared"] == [], "SharedWindow must not offer methods that Lock inside its Lock_all epoch"
        assert shared["missing_on_window"] == []


@pytest.mark.parametrize("comm", ["self", "world"])
def test_shared_window_counts_swaps_and_reads(ranks, comm):
    for found in groups(ranks, comm, "shared"):
        check_shared(found)


def check_shared(found: list[dict]) -> None:
    size = len(found)
    tickets = sorted(t for f in found for t in f["tickets"])
    assert tickets == list(range(size * INCREMENTS))  # fetch_and_op: every increment seen once, none lost
    assert sum(f["won_flag"] for f in found) == 1  # compare_and_swap: exactly one rank wins
    winner = [i for i, f in enumerate(found) if f["won_flag"]][0]
    assert all(f["counter_and_flag"] == [size * INCREMENTS, winner + 1] for f in found)
    assert all("outside rank 0's part of 4" in f["bounds"] for f in found)
    assert all(f"target rank {size} is outside" in f["bad_target"] for f in found)
    assert all("freed" in f["freed"] and "SharedWindow" in f["freed"] for f in found)


@pytest.mark.parametrize("comm", ["self", "world"])
def test_window_frees_on_leaving_with_and_keeps_on_exception(ranks, comm):
    for found in groups(ranks, comm, "window"):
        size = len(found)
        assert all(f["sum"] == [size * (size + 1) / 2] * 8 for f in found)  # ranks add 1, 2, ... concurrently
        assert all("freed" in f["freed"] and "Window" in f["freed"] for f in found)
        assert all(f["kept_after_exception"] for f in found)


@pytest.mark.parametrize("comm", ["self", "world"])
def test_portions_commit_every_portion_once(ranks, comm):
    """Sandblaster's Portions (built on SharedWindow): two evaluations of 12 portions, each committed exactly once."""
    for found in groups(ranks, comm, "portions"):
        assert sorted(k for f in found for k in f["committed"]) == sorted(list(range(12)) * 2)
        assert sum(f["claims"] for f in found) == 2 * found[0]["expected_claims"] == 2 * (12 + len(found))
