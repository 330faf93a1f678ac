"""Activations moved between the K ranks of one model-parallel replica, as autograd functions on its communicator.

    y = all_gather(layer_k(x), comm, dim=1, backward="slice")          # every rank: all K ranks' output units, in rank order
    x = reduce_grad(x, comm)                                           # identity; the input's gradient summed over ranks

`all_gather`'s backward depends on who consumes the gathered tensor. "slice": the consumer is replicated (every rank
computes the same loss from the same gathered logits), so the incoming gradient is already the whole gradient and
each rank keeps its own slice, with no message. "reduce_scatter": each rank's consumer sees only its own output units
(the next layer's rows on that rank), so every rank holds a partial gradient of the whole gathered tensor; they are
summed over the ranks and each rank receives its own slice. `reduce_grad` is the input of a layer whose output units
are split while its input is replicated: each rank's gradient of that input is partial, and all ranks need the sum.

Tensors travel as contiguous numpy copies (Allgatherv / Reduce_scatter with per-rank counts, so pieces may differ in
size); a CUDA tensor is staged through host memory and the result goes back to its device. float32 and float64 only.
`STATS` counts the bytes each rank sends, per direction, as a direct exchange would send them (module docstring of
hpcdnn/mpi/towers.py has the per-step totals): all-gather (K-1) x own piece, reduce-scatter the K-1 slices of the
others, allreduce 2(K-1)/K x the tensor (ring). mpi4py is imported inside the functions: importing this module (as the
model-building code does for K = 1) never initialises MPI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd.function import once_differentiable

BACKWARDS = ("reduce_scatter", "slice")  # all_gather's two backward modes (module docstring)
DTYPES = (torch.float32, torch.float64)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Balanced contiguous [lo, hi) ranges of n units over `parts` ranks: sizes differ by at most 1, earlier ones larger."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, not {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    base, extra = divmod(n, parts)
    ranges, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        ranges.append((lo, hi))
        lo = hi
    return ranges


@dataclass
class ExchangeStats:
    """Bytes this rank sent (and exchange calls it made) in forward and in backward, since the last reset()."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_calls: int = 0
    backward_calls: int = 0

    def add(self, direction: str, nbytes: int) -> None:
        """Count one exchange of `nbytes` sent by this rank; direction is "forward" or "backward"."""
        setattr(self, f"{direction}_bytes", getattr(self, f"{direction}_bytes") + int(nbytes))
        setattr(self, f"{direction}_calls", getattr(self, f"{direction}_calls") + 1)

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.forward_calls = self.backward_calls = 0


STATS = ExchangeStats()  # per process, i.e. per rank; a benchmark resets it around the steps it measures


def comm_size(comm) -> int:
    """Ranks in `comm`; None counts as 1 (no model parallelism)."""
    return 1 if comm is None else comm.Get_size()


def _host(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array with t's values: a view for a contiguous CPU tensor, else a host copy."""
    if t.dtype not in DTYPES:
        raise TypeError(f"model-parallel exchanges move float32 or float64 tensors, not {t.dtype}: keep activations in float32")
    return t.detach().to("cpu").contiguous().numpy()


def _device(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """The array as a tensor on like's device (no copy on CPU)."""
    return torch.from_numpy(a).to(like.device)


def _gather(x: torch.Tensor, comm, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Every rank's x concatenated along dim in rank order (Allgatherv on copies with dim moved to the front)."""
    send = _host(x.movedim(dim, 0))
    inner = int(np.prod(send.shape[1:]))
    recv = np.empty((sum(sizes), *send.shape[1:]), dtype=send.dtype)
    comm.Allgatherv(send, [recv, [s * inner for s in sizes]])  # displacements: the running sum of the counts
    STATS.add("forward", send.nbytes * (len(sizes) - 1))
    return _device(recv, x).movedim(0, dim).contiguous()


def _reduce_scatter(g: torch.Tensor, comm, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Sum of every rank's g, this rank's slice along dim (Reduce_scatter with counts)."""
    from mpi4py import MPI

    send = _host(g.movedim(dim, 0))
    inner = int(np.prod(send.shape[1:]))
    rank = comm.Get_rank()
    recv = np.empty((sizes[rank], *send.shape[1:]), dtype=send.dtype)
    comm.Reduce_scatter(send, recv, [s * inner for s in sizes], op=MPI.SUM)
    STATS.add("backward", send.nbytes - recv.nbytes)
    return _device(recv, g).movedim(0, dim).contiguous()


def _allreduce(g: torch.Tensor, comm) -> torch.Tensor:
    """Sum of every rank's g (into a new buffer: the incoming gradient may be shared by other autograd nodes)."""
    from mpi4py import MPI

    send = _host(g)
    recv = np.empty_like(send)
    comm.Allreduce(send, recv, op=MPI.SUM)
    k = comm.Get_size()
    STATS.add("backward", 2 * (k - 1) * send.nbytes // k)
    return _device(recv, g)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm, dim: int, mode: str, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.comm, ctx.dim, ctx.mode, ctx.sizes = comm, dim, mode, sizes
        return _gather(x, comm, dim, sizes)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        if ctx.mode == "reduce_scatter":
            return _reduce_scatter(g, ctx.comm, ctx.dim, ctx.sizes), None, None, None, None
        rank = ctx.comm.Get_rank()
        return g.narrow(ctx.dim, sum(ctx.sizes[:rank]), ctx.sizes[rank]).contiguous(), None, None, None, None


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        return _allreduce(g, ctx.comm), None


def _sizes(x: torch.Tensor, comm, dim: int, sizes) -> tuple[int, ...]:
    """Every rank's extent along dim: checked against x when given, else exchanged (one small allgather)."""
    k, rank = comm.Get_size(), comm.Get_rank()
    if sizes is not None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != k or sizes[rank] != x.shape[dim]:
            raise ValueError(
                f"sizes {sizes} must give one extent per rank ({k}) and this rank's ({rank}) must be x.shape[{dim}] = {x.shape[dim]}"
            )
        return sizes
    shapes = comm.allgather(tuple(x.shape))
    others = {s[:dim] + s[dim + 1 :] for s in shapes}
    if len(others) != 1:
        raise ValueError(f"all_gather along dim {dim} needs the same shape elsewhere on every rank, got {shapes}")
    return tuple(s[dim] for s in shapes)


def all_gather(x: torch.Tensor, comm, dim: int = 1, backward: str = "reduce_scatter", sizes=None) -> torch.Tensor:
    """Every rank's x concatenated along dim in rank order (collective over comm); `backward` as in the module docstring.

    `sizes` (each rank's extent along dim) saves the exchange of shapes when the caller knows them. With one rank
    (comm None or of size 1) x itself comes back.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, not {backward!r}")
    if comm_size(comm) == 1:
        return x
    dim %= x.dim()
    return _AllGather.apply(x, comm, dim, backward, _sizes(x, comm, dim, sizes))


def reduce_grad(x: torch.Tensor, comm) -> torch.Tensor:
    """x unchanged; in backward, the gradient summed over comm (collective): the input of a layer split by output units."""
    if comm_size(comm) == 1:
        return x
    return _ReduceGrad.apply(x, comm)
