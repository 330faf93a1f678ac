"""The ring allreduce (hpcdnn/mpi/ring.py) under mpirun -n 3: MPI's sum within float tolerance, bitwise the
documented order (so placement cannot change it) and run to run, and allreduce SGD on the ring equals local SGD."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, mpirun
from ring_case import SIZES
from test_allreduce import ATOL, RTOL

pytestmark = pytest.mark.mpi
CASE = Path(__file__).with_name("ring_case.py")


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ring3") / "out.npz"
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", str(CASE), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)  # a hung ring fails, not hangs
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    with np.load(out) as f:
        return dict(f)


@pytest.mark.parametrize("n", SIZES)
def test_ring_sums_like_mpi_in_its_documented_order(three, n):
    ring = three[f"{n}/ring"]
    assert ring.shape == (n,)
    np.testing.assert_allclose(ring, three[f"{n}/mpi"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(ring, three[f"{n}/order"]), "the ring's sum order depends on rank indices only"
    assert np.array_equal(ring, three[f"{n}/again"]), "run to run"
    assert bool(three[f"{n}/ranks_equal"])


@pytest.mark.parametrize("mode", ["blocking", "overlap"])
@pytest.mark.parametrize("bucket", ["tiny", "mid", "huge"])
def test_sgd_on_the_ring_equals_local_sgd(three, mode, bucket):
    name = f"{mode}/{bucket}"
    assert int(three[f"{name}/rings"]) == int(three[f"{name}/buckets"]) > 0  # ring_min_mb=0: every bucket by the ring
    assert bool(three[f"{name}/ranks_equal"])
    np.testing.assert_allclose(three[f"{name}/rank0"], three["reference"], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("bucket", ["tiny", "mid", "huge"])
def test_blocking_and_overlap_give_the_same_bits_on_the_ring(three, bucket):
    assert np.array_equal(three[f"blocking/{bucket}/rank0"], three[f"overlap/{bucket}/rank0"])
