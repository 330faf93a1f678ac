"""Synchronous allreduce SGD under a real mpirun equals local SGD on the whole batch, on every rank, bit for bit alike.

The runs happen in tests/mpi/allreduce_case.py (one mpirun per rank count, every configuration in it); each test
here checks one property of what the ranks saved.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from allreduce_case import BUCKETS, CONFIGS
from conftest import REPO, mpirun

pytestmark = pytest.mark.mpi

CASE = Path(__file__).with_name("allreduce_case.py")
RTOL, ATOL = 1e-5, 1e-6  # float32 sums in another order over 10 momentum steps: seen <= 6e-8 abs, 8e-6 rel


def run_case(ranks: int, out: Path) -> dict[str, np.ndarray]:
    """mpirun -n ranks python -m mpi4py allreduce_case.py out.npz, killed after 120 s (a hung collective fails)."""
    cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", str(CASE), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    with np.load(out) as f:
        return dict(f)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, np.ndarray]:
    return run_case(3, tmp_path_factory.mktemp("allreduce3") / "out.npz")


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> dict[str, np.ndarray]:
    return run_case(1, tmp_path_factory.mktemp("allreduce1") / "out.npz")


def names() -> list[str]:
    return [f"{mode}/{bucket}" for mode, bucket in CONFIGS]


@pytest.mark.parametrize("name", names())
def test_every_rank_ends_with_bitwise_identical_parameters(three, name):
    for r in (1, 2):
        assert np.array_equal(three[f"{name}/rank{r}"], three[f"{name}/rank0"]), f"rank {r} differs from rank 0 after {name}"


@pytest.mark.parametrize("name", names())
def test_three_ranks_equal_local_sgd_on_the_concatenated_batch(three, name):
    root, got = int(three[f"{name}/root"]), three[f"{name}/rank0"]
    np.testing.assert_allclose(got, three[f"reference/root{root}"], rtol=RTOL, atol=ATOL, err_msg=name)
    for other in {0, 1, 2} - {root}:  # the replicas started from `root`'s initial parameters, not another rank's
        assert not np.allclose(got, three[f"reference/root{other}"], rtol=RTOL, atol=ATOL)


def test_bucket_below_one_parameter_and_above_the_vector(three):
    for mode in ("blocking", "overlap"):
        assert int(three[f"{mode}/tiny/buckets"]) == int(three["params"])  # every parameter its own bucket
        assert 1 < int(three[f"{mode}/mid/buckets"]) < int(three["params"])
        assert int(three[f"{mode}/huge/buckets"]) == 1
    assert BUCKETS["tiny"] * 2**20 < 4 and BUCKETS["huge"] * 2**20 > 4 * int(three["numel"])
    for name in names():  # last layer first, back to back, covering the whole vector
        slices = three[f"{name}/slices"]
        assert slices[0][1] == int(three["numel"]) and slices[-1][0] == 0
        assert all(slices[k + 1][1] == slices[k][0] for k in range(len(slices) - 1)), slices


def test_overlap_starts_buckets_during_backward_and_agrees_with_blocking(three):
    steps, buckets = 10, int(three["overlap/tiny/buckets"])
    assert int(three["overlap/tiny/early"]) == steps * (buckets - 2)  # all but the unused layer's two, every step
    assert int(three["overlap/huge/early"]) == 0  # its one bucket holds the unused layer: started by synchronize()
    assert int(three["blocking/tiny/early"]) == 0
    for bucket in BUCKETS:
        np.testing.assert_allclose(three[f"overlap/{bucket}/rank0"], three[f"blocking/{bucket}/rank0"], rtol=RTOL, atol=ATOL)


def test_misuse_raises_on_every_rank(three):
    assert int(three["double_backward_raised"]) == 3  # a second backward before synchronize()
    assert int(three["use_after_close_raised"]) == 3


@pytest.mark.parametrize("name", names())
def test_one_rank_is_plain_local_sgd_bit_for_bit(one, name):
    assert np.array_equal(one[f"{name}/rank0"], one["reference/root0"]), name
