"""Any conv/FC model spread over the K ranks of one replica by output units, activations replicated on every rank.

    model = partition_model(AlexNetSmall(10, 1, 28), comm)     # comm: this replica's K ranks; the model is changed in place

Every nn.Conv2d and nn.Linear becomes a `ColumnParallel` layer holding only its output units [lo, hi) of
`split(out, K)` (weight rows and bias entries). It computes `all_gather(layer_k(reduce_grad(x)), backward="slice")`:
its input and its gathered output are the same on all K ranks, so ReLU, LRN, pooling and the loss run unchanged and
identically everywhere, and so does dropout, provided every rank of a replica draws the same mask, i.e. seeds torch
alike on all of them; then the replica also computes what the 1-rank model computes (tests/mpi/test_model_parallel.py).
Parameters and weight gradients are 1/K per rank; what crosses per layer and image (float32):
forward 4 x (own units x output positions) x (K - 1) bytes sent per rank (all-gather),
backward 4 x 2(K - 1)/K x (input units x input positions) (allreduce of the input gradient; none for the first layer,
whose input needs no gradient, and none for the output: every rank holds the same logits' gradient).
The towers of hpcdnn/mpi/towers.py move far less for AlexNet on 2 ranks, because activations there stay split.

A grouped conv is split so results stay exact: in whole groups when K divides `groups`, else each group's output
units are split K ways (the gathered maps are then put back in the original order), else it is refused.
A model built on the `meta` device (too big to materialise whole) gets only its slices allocated, Kaiming-normal
(fan_in, ReLU) weights and zero biases as AlexNetSmall initialises: the same distribution as a whole-model init, not
the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpcdnn.mpi.exchange import all_gather, comm_size, reduce_grad, split


@dataclass(frozen=True)
class Plan:
    """What one rank holds of a conv/linear layer: its output units (original indices, in local order) and how to run them."""

    rows: tuple[int, ...]  # original output units on this rank, in the order its local layer produces them
    sizes: tuple[int, ...]  # output units per rank, for the gather
    groups: int  # the local conv's groups
    inputs: tuple[int, int] | None  # input channels [lo, hi) the local conv reads (whole-group split), None for all
    restore: tuple[int, ...] | None  # gathered position of each original unit, None when the gather is already in order


def plan(layer: nn.Conv2d | nn.Linear, k: int, rank: int, name: str = "layer") -> Plan:
    """Rank `rank`'s share of `layer` among k ranks (shapes only: works on meta layers)."""
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    if out < k:
        raise ValueError(f"{name} has {out} output units, fewer than the {k} ranks of a replica: use at most {out} ranks per replica")
    if groups == 1:
        parts = split(out, k)
        return Plan(tuple(range(*parts[rank])), tuple(hi - lo for lo, hi in parts), 1, None, None)
    per_out, per_in = out // groups, layer.in_channels // groups
    if groups % k == 0:  # whole groups per rank: a smaller grouped conv on its groups' input channels
        lo, hi = split(groups, k)[rank]
        sizes = tuple(per_out * (b - a) for a, b in split(groups, k))
        return Plan(tuple(range(lo * per_out, hi * per_out)), sizes, hi - lo, (lo * per_in, hi * per_in), None)
    if per_out < k:
        raise ValueError(
            f"{name} (groups={groups}, {out} output channels) cannot be split exactly over {k} ranks: "
            f"use a number of ranks that divides {groups}, or at most {per_out} (its output channels per group)"
        )
    parts = split(per_out, k)
    owned = [[g * per_out + u for g in range(groups) for u in range(lo, hi)] for lo, hi in parts]
    gathered = [unit for units in owned for unit in units]
    restore = [0] * out
    for position, unit in enumerate(gathered):
        restore[unit] = position
    return Plan(tuple(owned[rank]), tuple(len(u) for u in owned), groups, None, tuple(restore))


class ColumnParallel(nn.Module):
    """One conv/linear layer's output units `rows` on this rank; forward returns all units, gathered, on every rank.

    `weight` and `bias` keep the original names (a state dict holds this rank's rows of them); `rows[i]` is the
    original output unit of local row i, so the whole layer is `full[rows] = weight` over the ranks.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, comm, name: str = "layer", device: torch.device | str | None = None) -> None:
        super().__init__()
        p = plan(layer, comm.Get_size(), comm.Get_rank(), name)
        self.comm, self.sizes, self.inputs = comm, p.sizes, p.inputs
        home = (device or "cpu") if layer.weight.is_meta else layer.weight.device  # explicit: also under `with torch.device("meta")`
        self.register_buffer("rows", torch.tensor(p.rows, dtype=torch.long, device=home), persistent=False)
        restore = None if p.restore is None else torch.tensor(p.restore, dtype=torch.long, device=home)
        self.register_buffer("restore", restore, persistent=False)
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            if layer.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode={layer.padding_mode!r} is not supported in a partitioned model, only 'zeros'")
            self.hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=p.groups)
        self.weight = nn.Parameter(self._rows(layer.weight, home, bias=False))
        self.bias = None if layer.bias is None else nn.Parameter(self._rows(layer.bias, home, bias=True))

    @torch.no_grad()
    def _rows(self, full: torch.Tensor, device, bias: bool) -> torch.Tensor:
        """This rank's rows of `full`: a copy, or on `meta` a new slice initialised like AlexNetSmall (module docstring)."""
        if not full.is_meta:
            return full[self.rows]  # advanced indexing copies
        part = torch.empty(len(self.rows), *full.shape[1:], dtype=full.dtype, device=device)
        return part.zero_() if bias else nn.init.kaiming_normal_(part, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # the first layer's input needs no gradient: skip its allreduce
            x = reduce_grad(x, self.comm)
        if self.inputs is not None:
            x = x.narrow(1, self.inputs[0], self.inputs[1] - self.inputs[0])
        y = F.conv2d(x, self.weight, self.bias, **self.hyper) if self.conv else F.linear(x, self.weight, self.bias)
        y = all_gather(y, self.comm, dim=1 if self.conv else -1, backward="slice", sizes=self.sizes)
        if self.restore is not None:
            y = y.index_select(1, self.restore)
        return y

    def extra_repr(self) -> str:
        kind = "conv" if self.conv else "linear"
        return f"{kind}, {len(self.rows)} of {sum(self.sizes)} output units, rank {self.comm.Get_rank()} of {len(self.sizes)}"


def layers(model: nn.Module):
    """(parent, child name, dotted name, layer) for every nn.Conv2d and nn.Linear in model."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                yield parent, child_name, f"{parent_name}.{child_name}".lstrip("."), child


def partition_model(model: nn.Module, comm, *, device: torch.device | str | None = None) -> nn.Module:
    """Replace every nn.Conv2d and nn.Linear of model (in place) by this rank's ColumnParallel share; returns model.

    With one rank (comm None or of size 1) the model comes back unchanged. `device`: where the slices of a model on
    the `meta` device are allocated (default CPU); other models' slices stay where their layer was.
    """
    if comm_size(comm) == 1:
        return model
    if isinstance(model, (nn.Conv2d, nn.Linear)):
        raise ValueError("partition_model needs a container module around the layers (e.g. nn.Sequential(layer)), not a bare layer")
    for parent, child_name, name, layer in list(layers(model)):
        setattr(parent, child_name, ColumnParallel(layer, comm, name, device))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{left} are still on the meta device after partitioning: only nn.Conv2d and nn.Linear are sliced and initialised")
    return model


def partition_numel(model: nn.Module, comm_size: int, rank: int) -> int:
    """Parameters rank `rank` of comm_size would hold after partition_model(model): from shapes only (meta models too)."""
    if not 0 <= rank < comm_size:
        raise ValueError(f"rank must be in [0, {comm_size}), not {rank}")
    if comm_size == 1:
        return sum(p.numel() for p in model.parameters())
    split_params, total = set(), 0
    for _, _, name, layer in layers(model):
        units = len(plan(layer, comm_size, rank, name).rows)
        total += units * math.prod(layer.weight.shape[1:]) + (units if layer.bias is not None else 0)
        split_params.update(id(p) for p in layer.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in split_params)
