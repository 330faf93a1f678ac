"""Model parallelism (issue 13): AlexNet's two towers and the general partition compute what the 1-rank model computes.

The runs happen in tests/mpi/model_parallel_case.py under a real mpirun (2 ranks: towers; 4 ranks: the partition with
K = 4 and K = 2, the exchange primitives with K = 3); each test here checks one property of what they saved. The
tests without mpirun use a stand-in communicator that only answers Get_size/Get_rank: building a partitioned model
sends nothing, so its shapes, refusals and meta-device initialisation are checked without MPI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, mpirun
from model_parallel_case import ALEXNET_BATCH, CLASSES, PIECES, STEPS, Grouped
from torch import nn

from hpcdnn.models import AlexNet, AlexNetSmall
from hpcdnn.models.alexnet import PARAMETERS_1000, LocalResponseNorm
from hpcdnn.mpi.exchange import all_gather, split
from hpcdnn.mpi.partition import ColumnParallel, partition_model, partition_numel, plan
from hpcdnn.mpi.towers import AlexNetTowers

pytestmark = pytest.mark.mpi

CASE = Path(__file__).with_name("model_parallel_case.py")
TOL, STEP_TOL = 1e-5, 1e-4  # of max |reference| per tensor: logits and gradients; parameters after STEPS of SGD
# ... plus, for AlexNet's parameters, a few float32 ulps of its N(0, 0.01) weights: a bias that starts at 0 has moved
# only ~1e-7 after STEPS at lr 1e-4, and its 10 gradients (sums over 55x55 positions) differ in the last bits
PARAM_ATOL = 1e-8
TOWER_FLOATS = 128 * 13 * 13 + 128 * 6 * 6 + 2048 + 2048  # per image: conv3, fc6, fc7, fc8 inputs (towers.py docstring)
PARTITIONS = ["k4/dropout0.0", "k4/dropout0.5", "k4/grouped", "k2/dropout0.0", "k2/dropout0.5", "k2/grouped"]


def within(err: float, scale: float, tol: float, atol: float = 0.0) -> bool:
    """The one comparison of every test here: the largest difference at most tol times the reference's largest value."""
    return err <= tol * scale + atol


def close(got, ref, tol: float) -> bool:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return within(float(np.abs(got - ref).max()), float(np.abs(ref).max()), tol)


def run_case(mode: str, ranks: int, out: Path) -> dict[str, np.ndarray]:
    """mpirun -n ranks python -m mpi4py model_parallel_case.py mode out.npz, killed after 180 s (a hung collective fails)."""
    cmd = [*mpirun(ranks), sys.executable, "-m", "mpi4py", str(CASE), mode, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    with np.load(out) as f:
        return dict(f)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, np.ndarray]:
    return run_case("towers", 2, tmp_path_factory.mktemp("towers") / "out.npz")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, np.ndarray]:
    return run_case("partition", 4, tmp_path_factory.mktemp("partition") / "out.npz")


class FakeComm:
    """Get_size/Get_rank only: enough to build a partitioned model or towers, which send nothing until forward."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank

    def Get_size(self) -> int:  # noqa: N802 (mpi4py's name)
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank


# ---- two towers on 2 ranks == AlexNet on 1


def test_towers_logits_equal_the_one_rank_model(towers):
    for r in (0, 1):
        assert close(towers[f"towers/rank{r}/logits"], towers["reference/logits"], TOL), r
    assert np.array_equal(towers["towers/rank0/logits"], towers["towers/rank1/logits"])  # both ranks hold the same logits


@pytest.mark.parametrize("kind,tol,atol", [("grad", TOL, 0.0), ("param", STEP_TOL, PARAM_ATOL)])
def test_towers_gradients_and_sgd_steps_equal_the_one_rank_model(towers, kind, tol, atol):
    names = [k.split("/", 2)[2] for k in towers if k.startswith(f"scale/{kind}/")]
    assert len(names) == 16  # weight and bias of conv1-5 and fc6-8
    for n in names:
        for r in (0, 1):
            assert within(float(towers[f"towers/rank{r}/{kind}/{n}"]), float(towers[f"scale/{kind}/{n}"]), tol, atol), (r, n)
    moved, _ = towers["moved/classifier.fc8.weight"]  # SGD really moved the parameters, far beyond the tolerance
    assert moved > 100 * STEP_TOL * float(towers["scale/param/classifier.fc8.weight"])


def test_towers_send_what_the_docstring_says(towers):
    for r in (0, 1):
        share = int(towers[f"towers/rank{r}/share"])
        assert share == split(CLASSES, 2)[r][1] - split(CLASSES, 2)[r][0]
        assert int(towers[f"towers/rank{r}/forward_bytes"]) == STEPS * 4 * ALEXNET_BATCH * (TOWER_FLOATS + share)
        assert int(towers[f"towers/rank{r}/backward_bytes"]) == STEPS * 4 * ALEXNET_BATCH * TOWER_FLOATS


def test_a_wrong_exchange_fails_the_comparison(towers, parts):
    """Gathering the halves in the wrong order must be caught by the same checks the tests above pass."""
    assert not close(towers["towers/rank0/swapped/logits"], towers["reference/logits"], TOL)
    bad = [n for n in (k.split("/", 2)[2] for k in towers if k.startswith("scale/grad/")) if not within(
        float(towers[f"towers/rank0/swapped/grad/{n}"]), float(towers[f"scale/grad/{n}"]), TOL)]  # fmt: skip
    assert len(bad) == 16
    assert not close(parts["k4/swapped/logits"], parts["k4/swapped/reference/logits"], TOL)


def test_towers_refuse_other_sizes_and_models():
    with torch.device("meta"):
        wrong = AlexNet(10)
    with pytest.raises(ValueError, match="exactly 2 ranks"):
        AlexNetTowers(wrong, FakeComm(3))
    wrong.features.conv2 = nn.Conv2d(96, 256, 5, padding=2)  # no groups: not the paper's connectivity
    with pytest.raises(ValueError, match="conv2"):
        AlexNetTowers(wrong, FakeComm(2))


def test_grouped_lrn_normalises_each_half_alone():
    x = torch.randn(2, 96, 5, 5, dtype=torch.float64) * 30
    halves = torch.cat([LocalResponseNorm()(x[:, :48]), LocalResponseNorm()(x[:, 48:])], 1)
    torch.testing.assert_close(LocalResponseNorm(groups=2)(x), halves)
    assert not torch.allclose(LocalResponseNorm()(x), halves)  # the halves' edges really differ
    with torch.device("meta"):
        alexnet = AlexNet()
    assert alexnet.features.norm1.groups == alexnet.features.norm2.groups == 2
    assert sum(p.numel() for p in alexnet.parameters()) == PARAMETERS_1000


# ---- the general partition with K = 2 and 4 == the 1-rank model


@pytest.mark.parametrize("name", PARTITIONS)
def test_partition_equals_the_one_rank_model(parts, name):
    assert close(parts[f"{name}/logits"], parts[f"{name}/reference/logits"], TOL)
    for kind, tol in (("grad", TOL), ("param", STEP_TOL)):
        keys = [k for k in parts if k.startswith(f"{name}/{kind}/")]
        assert len(keys) == (8 if "grouped" in name else 14)  # weight and bias of every layer
        for key in keys:
            ref = parts[key.replace(f"{name}/", f"{name}/reference/", 1)]
            assert close(parts[key], ref, tol), key
    if name.startswith("k2/"):  # the second pair of ranks computed the same
        assert np.array_equal(parts[f"{name}/logits"], parts[f"{name}/pair1/logits"])


def test_dropout_was_on_and_the_same_seed_gave_the_same_masks(parts):
    for k in ("k2", "k4"):
        assert not close(parts[f"{k}/dropout0.5/reference/logits"], parts[f"{k}/dropout0.0/reference/logits"], 1e-2)


def test_one_rank_leaves_the_model_alone(parts):
    model = AlexNetSmall(10, 1, 28)
    assert partition_model(model, None) is model and partition_model(model, FakeComm(1)) is model
    assert bool(parts["self_unchanged"])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_partition_numel_and_meta_slices(k):
    """partition_numel adds up to the whole model; a meta model gets exactly those parameters, Kaiming-initialised."""
    with torch.device("meta"):
        whole = AlexNetSmall(10, 1, 28)
    total = sum(p.numel() for p in whole.parameters())
    assert sum(partition_numel(whole, k, r) for r in range(k)) == total
    for r in range(k):
        with torch.device("meta"):
            model = partition_model(AlexNetSmall(10, 1, 28), FakeComm(k, r))
        assert sum(p.numel() for p in model.parameters()) == partition_numel(whole, k, r)
        for m in model.modules():
            if isinstance(m, ColumnParallel):
                assert m.weight.device.type == "cpu" and torch.all(m.bias == 0)
                assert m.weight.std().item() == pytest.approx((2 / m.weight[0].numel()) ** 0.5, rel=0.35)
    with torch.device("meta"):
        alexnet = AlexNet()
    assert sum(partition_numel(alexnet, 2, r) for r in range(2)) == PARAMETERS_1000


def test_grouped_convs_split_exactly_or_refuse():
    b = Grouped().b  # 12 -> 8 channels in 2 groups
    whole = plan(b, 2, 1)
    assert whole.rows == tuple(range(4, 8)) and whole.groups == 1 and whole.inputs == (6, 12) and whole.restore is None
    per_group = plan(b, 4, 1)  # 2 groups over 4 ranks: each group's 4 maps split 1 per rank
    assert per_group.rows == (1, 5) and per_group.groups == 2 and per_group.sizes == (2, 2, 2, 2)
    assert [per_group.restore[u] for u in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(ValueError, match="cannot be split exactly over 3 ranks"):
        plan(nn.Conv2d(8, 4, 1, groups=4), 3, 0)
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        partition_model(nn.Sequential(nn.Linear(3, 3)), FakeComm(4))


def test_split_and_all_gather_arguments():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)] and split(2, 3) == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="parts"):
        split(4, 0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backward must be one of"):
        all_gather(x, FakeComm(2), backward="sum")
    with pytest.raises(ValueError, match="x.shape\\[1\\] = 3"):
        all_gather(x, FakeComm(2), sizes=(2, 3))
    assert all_gather(x, None) is x


# ---- the exchange primitives on K = 3 against plain torch


@pytest.mark.parametrize("op", ["reduce_scatter/sizes", "reduce_scatter/exchanged", "slice/sizes", "slice/exchanged", "reduce_grad"])
@pytest.mark.parametrize("dim", [1, 2])
def test_exchange_primitives_match_plain_torch(parts, op, dim):
    for r in range(3):
        key = f"exchange/rank{r}/dim{dim}/{op}"
        for direction in ("forward", "backward"):
            err, scale = parts[f"{key}/{direction}"]
            assert within(err, scale, 1e-6), (key, direction)  # float32 sums of 3 terms in another order
        sent_forward, sent_backward, own = (int(v) for v in parts[f"{key}/bytes"])  # own: the input's bytes
        if op == "reduce_grad":  # counted as a ring: 2(K-1)/K of the tensor
            assert (sent_forward, sent_backward) == (0, 2 * 2 * own // 3)
        else:  # all-gather: own piece to the 2 others; reduce-scatter: the others' slices of this rank's partial sum
            others = own * sum(PIECES) // PIECES[r] - own
            assert (sent_forward, sent_backward) == (2 * own, others if op.startswith("reduce_scatter") else 0)
