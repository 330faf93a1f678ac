"""Per-rank memory: an estimate from the parameter count, and the start-of-run check against --rank_memory_gb.

    need = lambda k: rank_bytes(partition_numel(model, k, 0), topology=cfg.topology, optimizer=cfg.optimizer,
                                momentum=cfg.momentum, batch_size=cfg.batch_size, activations_bytes=per_sample)
    check_budget(cfg.rank_memory_gb, need, cfg.mp, what="wide on 28x28x1")   # ValueError naming --mp=K

Pure arithmetic: no MPI, and no model is allocated (`activation_bytes_per_sample` runs a meta-device model, or one
sample through a real one). A rank holds, in float32 vectors of its parameter count n (`state_vectors`), with m =
sb_history and P = shards (ranks the history or ring scratch is divided over; 1 = the conservative bound):

    topology     params  grad  optimizer state                 other vectors
    local          1      1    1 (sgd momentum / adagrad sum)  -
    allreduce      1      1    1 (the same)                    ring scratch 1/P (hpcdnn/mpi/allreduce.py)
    downpour       1      1    0: the servers keep it           +1 gradient sum if n_push > 1, +2 with overlap
    sandblaster    1      1    history (2m+3)/P                +2 float64 gradient sum, +1 direction, +1 line-search
                                                                 start, +9/P gradient shards and their temporaries

and never fewer than 2 (FLATTEN_VECTORS): FlatParams moves the module's tensors into its data vector one by one (each
tensor's storage freed as it goes) before it allocates the gradient, so flattening never holds three copies.
SGD's momentum buffer is counted at momentum 0 too: hpcdnn/optim.py's FlatOptimizer zero-fills it whatever the
momentum (SGD_BUFFER_AT_ZERO_MOMENTUM; the tests check that this still holds). On top of the vectors:
RUNTIME_BYTES (Python, torch, numpy, MPI, Numba kernels, the data loader), the largest parameter's gradient once more
(autograd computes it into a fresh tensor before adding it to the flat gradient), and batch_size x activations_bytes.
Evaluation (batches of 256 without autograd) keeps about a third of that per sample, under the training term for
batch_size >= 86. Not counted: parameter-server ranks, the bf16/fp16 push buffer (at most half a vector over the
servers), and the full L-BFGS history that a sandblaster checkpoint gathers on the root ((2m+3) n twice, there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

FLOAT_BYTES = 4  # parameters, gradients and optimizer state are float32
MIB, GIB = 1 << 20, 1 << 30  # --rank_memory_gb is in GiB, as Slurm's --mem=<n>G
# Peak RSS of a rank without its model's terms: hpcdnn.train imported, MPI initialised, a model built on the meta device
# (torch's meta machinery), the SGD and Adagrad kernels loaded from Numba's cache, the data loader and its prefetched
# batches. Rounded up from a run of the driver with a tiny model and batch 1; bench/model_parallel.py prints its
# own runtime (all but the loader) beside its peaks.
RUNTIME_BYTES = 512 * MIB
SGD_BUFFER_AT_ZERO_MOMENTUM = True  # FlatOptimizer allocates momentum_buffer even at momentum 0
ACTIVATION_FACTOR = 3  # per output kept for backward: itself, its gradient, and pool indices / dropout masks (bounded)
FLATTEN_VECTORS = 2  # while flattening: module tensors + flat data, then data + grad (models/flat.py)
MAX_MP = 64  # the largest --mp the budget check suggests
TOPOLOGY_NAMES = ("local", "allreduce", "downpour", "sandblaster")  # hpcdnn.topologies.TOPOLOGIES (the tests compare)


def state_vectors(
    topology: str, optimizer: str, momentum: float, *, sb_history: int = 10, shards: int = 1, n_push: int = 1, overlap: bool = False
) -> float:
    """How many float32 vectors of its parameter count a rank of `topology` keeps (the table above)."""
    if topology not in TOPOLOGY_NAMES:
        raise ValueError(f"topology {topology!r} has no memory estimate; known: {', '.join(TOPOLOGY_NAMES)}")
    if optimizer not in ("sgd", "adagrad"):
        raise ValueError(f"optimizer {optimizer!r} has no memory estimate; known: sgd, adagrad")
    if shards < 1 or sb_history < 1 or n_push < 1:
        raise ValueError(f"shards={shards}, sb_history={sb_history} and n_push={n_push} must all be >= 1")
    optimizer_state = 1.0 if optimizer == "adagrad" or momentum > 0 or SGD_BUFFER_AT_ZERO_MOMENTUM else 0.0
    if topology == "local":
        steady = 2 + optimizer_state
    elif topology == "allreduce":
        steady = 2 + optimizer_state + 1 / shards
    elif topology == "downpour":
        steady = 2 + (n_push > 1) + 2 * overlap
    else:  # sandblaster: hpcdnn/mpi/portions.py (float64 sum), mpi/lbfgs.py (history, direction), kernels/lbfgs.py (x0)
        steady = 2 + 2 + 1 + 1 + (2 * sb_history + 3 + 9) / shards
    return max(FLATTEN_VECTORS, steady)


def rank_bytes(
    params_on_rank: int,
    *,
    topology: str,
    optimizer: str,
    momentum: float,
    batch_size: int,
    activations_bytes: int = 0,
    largest_param: int = 0,
    sb_history: int = 10,
    shards: int = 1,
    n_push: int = 1,
    overlap: bool = False,
) -> int:
    """Bytes one rank needs at its peak: runtime, state vectors, the largest gradient's temporary, activations.

    activations_bytes is per sample (`activation_bytes_per_sample`) and batch_size the samples of one forward pass (for
    sandblaster: sb_chunk); largest_param is the element count of the rank's largest parameter tensor (0: not counted).
    """
    if params_on_rank < 0 or batch_size < 0 or activations_bytes < 0 or largest_param < 0:
        raise ValueError(
            f"params_on_rank={params_on_rank}, batch_size={batch_size}, activations_bytes={activations_bytes} and "
            f"largest_param={largest_param} must be >= 0"
        )
    vectors = state_vectors(topology, optimizer, momentum, sb_history=sb_history, shards=shards, n_push=n_push, overlap=overlap)
    state = math.ceil(vectors * params_on_rank) * FLOAT_BYTES
    return RUNTIME_BYTES + state + largest_param * FLOAT_BYTES + batch_size * activations_bytes


def activation_bytes_per_sample(model, sample_shape: tuple[int, ...]) -> int:
    """Bytes of activations one sample costs in training: ACTIVATION_FACTOR x the outputs of every leaf module.

    `model` may live on the meta device (nothing is allocated) or on a real one (one sample runs through it, without
    autograd). sample_shape is one input as the model takes it, (C, S, S). In-place modules (ReLU(inplace=True))
    reuse their input and add nothing. For a model split over K ranks this is an upper bound: a rank keeps every
    layer's full input (gathered) but only its share of the outputs.
    """
    import torch

    leaves = [m for m in model.modules() if not list(m.children())]
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if not getattr(module, "inplace", False) and isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    device = next(model.parameters()).device
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            x = torch.zeros((1, *sample_shape), device=device)
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return ACTIVATION_FACTOR * total + math.prod(sample_shape) * FLOAT_BYTES


def smallest_fitting_mp(budget_bytes: int, bytes_needed_by_k: Callable[[int], int]) -> int | None:
    """The smallest K in 1..MAX_MP whose estimate fits `budget_bytes`, or None if none does."""
    return next((k for k in range(1, MAX_MP + 1) if bytes_needed_by_k(k) <= budget_bytes), None)


def check_budget(budget_gb: float, bytes_needed_by_k: Callable[[int], int], mp: int, what: str) -> None:
    """Raise ValueError if a rank of `what` split over --mp=`mp` needs more than --rank_memory_gb; 0 = no check.

    bytes_needed_by_k(K) is the per-rank estimate with the model split over K ranks (`rank_bytes` of that rank's
    share). The error names the estimate, the budget and the fix: the smallest --mp=K that fits, or a bigger budget.
    """
    if not budget_gb >= 0:
        raise ValueError(f"--rank_memory_gb={budget_gb!r} must be >= 0 (0 = no memory check)")
    if mp < 1:
        raise ValueError(f"--mp={mp} must be >= 1 (ranks per model replica)")
    if budget_gb == 0:
        return
    budget = int(budget_gb * GIB)
    need = bytes_needed_by_k(mp)
    if need <= budget:
        return
    head = f"{what} needs about {need / GIB:.2f} GiB per rank with --mp={mp} (hpcdnn/memory.py), over --rank_memory_gb={budget_gb:g}"
    k = smallest_fitting_mp(budget, bytes_needed_by_k)
    if k is None:
        raise ValueError(
            f"{head}; even --mp={MAX_MP} needs about {bytes_needed_by_k(MAX_MP) / GIB:.2f} GiB: raise --rank_memory_gb "
            f"(or use a smaller model or batch)"
        )
    raise ValueError(f"{head}: use --mp={k} (about {bytes_needed_by_k(k) / GIB:.2f} GiB per rank) or raise --rank_memory_gb")
