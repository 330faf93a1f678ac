"""A model's parameters and gradients as two contiguous float32 vectors, with the module's tensors as views into them.

Every communication (fetch, push, allreduce) and every optimizer kernel works on the flat vectors or on slices from
`shard_ranges`, so fetching parameters is one copy and the gradient is already one buffer after `loss.backward()`:
autograd accumulates in place into an existing `.grad`, and each `p.grad` is a view into `FlatParams.grad`.

Each parameter starts on a multiple of `align` floats (16 floats = one 64-byte cache line), so shard boundaries and
parameters share cache lines as little as possible; the few padding floats between parameters stay zero in both
vectors (nothing writes them: no parameter views them, and `load_flat` re-zeroes them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ALIGN = 16  # float32 elements per 64-byte cache line


def _round_up(x: int, align: int) -> int:
    """The smallest multiple of align that is >= x."""
    return -(-x // align) * align


def shard_ranges(n: int, parts: int, align: int = ALIGN) -> list[tuple[int, int]]:
    """Split [0, n) into `parts` contiguous (start, stop) slices whose sizes differ by at most `align`.

    Every boundary is a multiple of `align` except the final stop (= n), so shards never split a cache line.
    Units of `align` elements are dealt out evenly; the extra units go to the last parts, so the short final unit lands
    on a part that also got an extra one. With fewer units than parts, the first parts are empty (start == stop).
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, not {parts}")
    if align < 1:
        raise ValueError(f"align must be >= 1, not {align}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    units = _round_up(n, align) // align
    base, extra = divmod(units, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = min(n, start + align * (base + (i >= parts - extra)))
        ranges.append((start, stop))
        start = stop
    return ranges


class FlatParams:
    """Owns one float32 vector `.data` for all parameters of `module` and one `.grad` for their gradients.

    The module's parameters become views into `.data` (same Parameter objects, so optimizers built on
    `module.parameters()` still work) and their `.grad` views into `.grad`. `.data.grad` is `.grad`, so a torch
    optimizer can also run on the flat vector alone: `torch.optim.SGD([flat.data], lr=0.01)`.
    Move the module first (`module.to(device)`) or pass `device`; moving it after flattening breaks the views.
    Call `flat.zero_grad()`, not `optimizer.zero_grad()` (which sets grads to None, so backward would allocate new ones);
    `zero_grad()` re-attaches any view that was replaced, and `check()` says whether all are in place.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None, align: int = ALIGN) -> None:
        if device is not None:
            module.to(device)  # first: moving may replace the Parameter objects; buffers follow too
        named = list(module.named_parameters())  # shared (tied) parameters appear once
        if not named:
            raise ValueError(f"{type(module).__name__} has no parameters to flatten")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}: pass device=")
        device = devices.pop()
        self.device = torch.device(device)
        self.align = align
        self.layout: list[tuple[str, int, tuple[int, ...]]] = []
        offset = 0
        for name, p in named:
            offset = _round_up(offset, align)
            self.layout.append((name, offset, tuple(p.shape)))
            offset += p.numel()
        self._params = [p for _, p in named]
        self._data_views: list[torch.Tensor] = []
        self._grad_views: list[torch.Tensor] = []
        # parameters first, then the gradient: each tensor's own storage is freed as it moves into the flat vector, so
        # at most two copies of the parameters exist at once (three would be the peak of a big model's whole run)
        self.data = torch.zeros(offset, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for (_, off, shape), p in zip(self.layout, self._params):
                data_view = self.data[off : off + p.numel()].view(shape)
                data_view.copy_(p.detach())
                p.data = data_view
                self._data_views.append(data_view)
            self.grad = torch.zeros_like(self.data)
            for (_, off, shape), p in zip(self.layout, self._params):
                grad_view = self.grad[off : off + p.numel()].view(shape)
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                p.grad = grad_view
                self._grad_views.append(grad_view)
        self.data.grad = self.grad
        ends = [off + int(np.prod(shape, dtype=np.int64)) for _, off, shape in self.layout]
        starts = [off for _, off, _ in self.layout[1:]]
        self._pads = [(e, s) for e, s in zip(ends, starts) if s > e]  # zero-filled gaps between parameters
        self.param_count = sum(p.numel() for p in self._params)

    @property
    def numel(self) -> int:
        """Length of the flat vectors (parameters plus alignment padding)."""
        return self.data.numel()

    def zero_grad(self) -> None:
        """Zero the flat gradient in one pass, re-attaching any parameter .grad that is no longer a view into it."""
        self.grad.zero_()
        self.data.grad = self.grad
        for p, view in zip(self._params, self._grad_views):
            if p.grad is not view:
                p.grad = view

    def check(self) -> None:
        """Raise RuntimeError naming the first parameter whose data or grad is no longer a view into the flat vectors."""
        for (name, _, _), p, dv, gv in zip(self.layout, self._params, self._data_views, self._grad_views):
            if p.data_ptr() != dv.data_ptr() or p.device != self.device:
                raise RuntimeError(f"parameter {name!r} no longer views FlatParams.data (module moved or .data reassigned?)")
            if p.grad is None or p.grad.data_ptr() != gv.data_ptr():
                raise RuntimeError(
                    f"parameter {name!r} has a gradient outside FlatParams.grad: call flat.zero_grad(), not optimizer.zero_grad()"
                )

    def state_dict_flat(self) -> torch.Tensor:
        """A copy of the flat parameter vector (for checkpoints and evaluation snapshots)."""
        return self.data.detach().clone()

    @torch.no_grad()
    def load_flat(self, values: torch.Tensor | np.ndarray) -> None:
        """Copy a flat vector (tensor or ndarray, any float dtype, any device) into the parameters, in one copy."""
        src = torch.from_numpy(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else values
        if tuple(src.shape) != (self.numel,):
            raise ValueError(f"expected a flat vector of shape ({self.numel},), not {tuple(src.shape)}: was it saved from another model?")
        self.data.copy_(src)
        for start, stop in self._pads:
            self.data[start:stop] = 0

    def to_numpy(self, grad: bool = False) -> np.ndarray:
        """Zero-copy numpy view of the flat parameters (or gradient) on CPU, for MPI buffers and Numba kernels."""
        if self.device.type != "cpu":
            raise RuntimeError(f"the flat vector lives on {self.device}; copy it with flat.data.cpu().numpy() instead")
        return (self.grad if grad else self.data).detach().numpy()

    def __repr__(self) -> str:
        return f"FlatParams({len(self.layout)} tensors, {self.param_count:,} parameters, numel={self.numel:,}, device={self.device})"


class FlatVector:
    """A bare flat parameter vector and its gradient (numpy, on the CPU) with the part of FlatParams's interface a
    Downpour worker reads: the parameter server's tests and benchmarks push and fetch vectors without a model."""

    def __init__(self, data: np.ndarray, grad: np.ndarray | None = None) -> None:
        self.data, self.grad = data, np.zeros_like(data) if grad is None else grad
        self.numel, self.device = data.size, torch.device("cpu")

    def to_numpy(self, grad: bool = False) -> np.ndarray:
        return self.grad if grad else self.data
