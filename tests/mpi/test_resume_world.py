"""A resume under MPI: the root decides about the run directory and every rank learns it; an allreduce checkpoint
resumed by another number of replicas is refused (its sample position counts batches of every replica)."""

from __future__ import annotations

import pytest
from test_downpour import COMMON, hpcdnn

from hpcdnn import checkpoint as ck

pytestmark = pytest.mark.mpi


def test_allreduce_checkpoint_of_two_ranks_is_refused_under_three(fashion_tiny, tmp_path):
    run = tmp_path / "run"
    args = [*COMMON, f"--data={fashion_tiny}", "--topology=allreduce", "--batch_size=16", "--epochs=1", f"--run_dir={run}"]
    hpcdnn(2, *args, "--max_steps=3")
    before = (run / ck.LATEST).read_bytes()
    r = hpcdnn(3, *args, "--resume", ok=False)
    assert r.returncode != 0, r.stderr[-3000:]
    assert f"{run / ck.LATEST} was written by 2 replica(s) (2 worker ranks), this run has 3" in r.stderr, r.stderr[-3000:]
    assert (run / ck.LATEST).read_bytes() == before
    r = hpcdnn(2, *args, "--max_steps=4", ok=False)  # a fresh run into it: refused by the root, every rank exits
    assert r.returncode != 0 and "holds another run" in r.stderr, r.stderr[-3000:]
    assert (run / ck.LATEST).read_bytes() == before
    hpcdnn(2, *args, "--max_steps=4", "--resume")  # the same world continues
    assert ck.load(run / ck.LATEST).step == 4
