"""hpcdnn/memory.py: the per-rank estimate's terms, and the --rank_memory_gb check on WideNet split over K ranks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpcdnn import memory
from hpcdnn.memory import GIB, RUNTIME_BYTES, activation_bytes_per_sample, check_budget, rank_bytes, state_vectors
from hpcdnn.models.wide import WideNet
from hpcdnn.optim import FlatOptimizer
from hpcdnn.topologies import TOPOLOGIES


def rank0_share(model: nn.Module, k: int) -> tuple[int, int]:
    """(parameters, largest parameter) of rank 0 when every conv/linear layer is split by output units over k ranks.

    Shapes only; rank 0 gets the larger part of an uneven split (ceil), as hpcdnn/mpi/exchange.py's split does.
    """
    total, largest = 0, 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            units = -(-m.weight.shape[0] // k)
            weight = units * math.prod(m.weight.shape[1:])
            total, largest = total + weight + units, max(largest, weight)
    return total, largest


@pytest.fixture(scope="module")
def wide() -> nn.Module:
    with torch.device("meta"):
        return WideNet(10, 1, 28)


def wide_need(wide: nn.Module, batch_size: int = 128):
    """K -> the estimate for rank 0 of a WideNet replica split over K ranks (local SGD with momentum)."""
    per_sample = activation_bytes_per_sample(wide, (1, 28, 28))

    def need(k: int) -> int:
        params, largest = rank0_share(wide, k)
        return rank_bytes(params, topology="local", optimizer="sgd", momentum=0.9, batch_size=batch_size,
                          activations_bytes=per_sample, largest_param=largest)  # fmt: skip

    return need


@pytest.mark.parametrize(
    "topology,kwargs,vectors",
    [
        ("local", {}, 3),  # params, grad, momentum buffer
        ("local", {"optimizer": "adagrad"}, 3),  # params, grad, sum of squares
        ("allreduce", {"shards": 4}, 3.25),  # + the ring's scratch, 1/P
        ("allreduce", {}, 4),  # P = 1: the conservative bound
        ("downpour", {}, 2),  # params and grad (the servers keep the optimizer state); 2 while flattening too
        ("downpour", {"n_push": 4}, 3),  # + the gradient sum between pushes
        ("downpour", {"overlap": True}, 4),  # + send and staged buffers of the comm thread
        ("downpour", {"n_push": 4, "overlap": True}, 5),
        ("sandblaster", {}, 6 + 2 * 10 + 3 + 9),  # 6 full vectors, the (2m+3)-row history and 9 shard vectors
        ("sandblaster", {"sb_history": 5, "shards": 4}, 6 + (2 * 5 + 3 + 9) / 4),
    ],
)
def test_state_vectors_table(topology, kwargs, vectors):
    args = {"optimizer": "sgd", "momentum": 0.9, **kwargs}
    assert state_vectors(topology, args.pop("optimizer"), args.pop("momentum"), **args) == pytest.approx(vectors)


def test_rank_bytes_adds_its_terms():
    n, largest, batch, per_sample = 1_000_003, 500_000, 64, 12_345
    base = rank_bytes(n, topology="local", optimizer="sgd", momentum=0.9, batch_size=batch)
    assert base == RUNTIME_BYTES + 3 * 4 * n
    full = rank_bytes(n, topology="local", optimizer="sgd", momentum=0.9, batch_size=batch, activations_bytes=per_sample,
                      largest_param=largest)  # fmt: skip
    assert full == base + 4 * largest + batch * per_sample
    assert rank_bytes(0, topology="downpour", optimizer="adagrad", momentum=0.0, batch_size=1) == RUNTIME_BYTES
    assert rank_bytes(n, topology="downpour", optimizer="sgd", momentum=0.9, batch_size=batch) == RUNTIME_BYTES + 2 * 4 * n
    allreduce = rank_bytes(n, topology="allreduce", optimizer="sgd", momentum=0.9, batch_size=batch, shards=2)
    assert allreduce == RUNTIME_BYTES + math.ceil(3.5 * n) * 4


def test_sgd_buffer_at_zero_momentum_matches_the_optimizer():
    """The estimate counts SGD's buffer at momentum 0 only while hpcdnn/optim.py really allocates it then."""
    opt = FlatOptimizer("sgd", torch.zeros(100), torch.zeros(100), momentum=0.0, weight_decay=0.0, eps=1e-10)
    allocated = sum(v.numel() for v in opt.state.values()) == 100
    assert memory.SGD_BUFFER_AT_ZERO_MOMENTUM == allocated
    assert state_vectors("local", "sgd", 0.0) == max(memory.FLATTEN_VECTORS, 2 + allocated)


def test_every_topology_has_an_estimate():
    assert set(memory.TOPOLOGY_NAMES) == set(TOPOLOGIES)


def test_bad_arguments_name_the_known_values():
    with pytest.raises(ValueError, match="known: local, allreduce, downpour, sandblaster"):
        state_vectors("ring", "sgd", 0.9)
    with pytest.raises(ValueError, match="known: sgd, adagrad"):
        rank_bytes(10, topology="local", optimizer="adam", momentum=0.9, batch_size=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        rank_bytes(-1, topology="local", optimizer="sgd", momentum=0.9, batch_size=1)


def test_activation_bytes_count_leaf_outputs_on_meta_and_real_models():
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2), nn.ReLU())

    expected = memory.ACTIVATION_FACTOR * 4 * (3 + 0 + 2 + 2) + 4 * 4  # the in-place ReLU adds nothing; plus the input
    with torch.device("meta"):
        meta = net()
    assert activation_bytes_per_sample(meta, (4,)) == expected == activation_bytes_per_sample(net(), (4,))
    real = net()
    activation_bytes_per_sample(real, (4,))
    assert not real._forward_hooks and all(not m._forward_hooks for m in real.modules())  # the hooks are removed


def test_wide_refused_on_one_rank_and_accepted_split_over_4(wide):
    need, budget = wide_need(wide), 1.75  # GiB: between the estimates for 3 and 4 ranks (batch 128)
    assert need(1) > 4 * GIB and need(3) > budget * GIB >= need(4)  # so 4 is the smallest K that fits
    with pytest.raises(ValueError) as err:
        check_budget(budget, need, 1, what="wide on 28x28x1")
    msg = str(err.value)
    assert msg.startswith(f"wide on 28x28x1 needs about {need(1) / GIB:.2f} GiB per rank with --mp=1")
    assert "over --rank_memory_gb=1.75: use --mp=4 (about" in msg and msg.endswith("or raise --rank_memory_gb")
    with pytest.raises(ValueError, match="with --mp=2 .*: use --mp=4 "):
        check_budget(budget, need, 2, what="wide")
    check_budget(budget, need, 4, what="wide")  # fits: no error
    check_budget(budget, need, 8, what="wide")
    with pytest.raises(ValueError, match="use --mp=3 "):  # the smallest K that fits, a power of 2 or not
        check_budget(2.0, need, 1, what="wide")


def test_budget_zero_never_refuses(wide):
    check_budget(0, wide_need(wide), 1, what="wide")
    check_budget(0.0, lambda k: 10**15, 1, what="anything")


def test_no_k_fits_says_raise_the_budget():
    with pytest.raises(ValueError, match=r"even --mp=64 needs about .* GiB: raise --rank_memory_gb"):
        check_budget(0.25, lambda k: RUNTIME_BYTES + GIB // k, 1, what="tiny budget")


def test_check_budget_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"--rank_memory_gb=-1 must be >= 0 \(0 = no memory check\)"):
        check_budget(-1, lambda k: 0, 1, what="x")
    with pytest.raises(ValueError, match="--mp=0 must be >= 1"):
        check_budget(1.0, lambda k: 0, 0, what="x")


def test_rank0_share_matches_partition_numel(wide):
    partition = pytest.importorskip("hpcdnn.mpi.partition")
    for k in (1, 2, 3, 4):
        assert rank0_share(wide, k)[0] == partition.partition_numel(wide, k, 0)
