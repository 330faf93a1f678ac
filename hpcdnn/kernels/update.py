"""Optimizer updates (SGD, Adagrad) in place on flat float32 vectors: a replica's buffer or a server's shard slice.

The arithmetic follows torch.optim.SGD / torch.optim.Adagrad step for step, in float32, in the same order and with
the same roundings: where torch's vectorised kernels fuse a multiply-add (`add(x, alpha=a)`, `addcmul`) we round
once too (`fma32`). SGD then matches torch bit for bit on AVX2; Adagrad's sum of squares does too, its parameters
differ by torch's sqrt (MKL, not always correctly rounded: 1 ulp in the step). The numpy references reproduce the
kernels exactly.

Dispatch: numpy arrays and CPU tensors (zero-copy `.numpy()`) go to Numba `prange` kernels (one pass over
memory, no temporaries, fastmath off); CUDA tensors go to torch in-place ops. `backend="torch"` forces the torch
path (any device), `backend="numba"` the kernels. Every array must be C-contiguous float32 of one size.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from hpcdnn.kernels.jit import kernel

Array = np.ndarray | torch.Tensor
BACKENDS = ("auto", "numba", "torch")


# ---- Numba kernels: pure functions on 1-D float32 arrays; scalars arrive as np.float32 ----


def fma32(a, b, c):
    """a * b + c rounded once to float32, as torch's vectorised kernels compute `x.add(y, alpha=a)` and `addcmul`.

    Plain Python (and `.py_func`) rounds the exact float64 product-sum to float32; compiled code is one `llvm.fma`
    (a vfmadd on AVX2), which differs from that only by a double rounding in about 1e-9 of cases.
    """
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@intrinsic
def _llvm_fma_f32(typingctx, a, b, c):
    """The LLVM fused multiply-add intrinsic on float32 (not fastmath: it is always fused, never split)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


@overload(fma32, jit_options={"nogil": True})
def _fma32_compiled(a, b, c):
    """Inside compiled kernels fma32 is the LLVM intrinsic."""
    return lambda a, b, c: _llvm_fma_f32(np.float32(a), np.float32(b), np.float32(c))


@kernel(parallel=True)
def sgd_kernel(param, out, grad, buf, nlr, momentum, weight_decay, one_minus_dampening, nesterov, first_step):
    """One torch SGD step per element, the new parameters written to `out` (`param` itself for in place; a parameter
    server's other buffer); nlr is -lr. With momentum 0, buf is not touched (pass any array)."""
    for i in prange(param.size):
        g = grad[i]
        if weight_decay != 0:
            g = fma32(param[i], weight_decay, g)
        if momentum != 0:
            if first_step:
                b = g
            else:
                b = fma32(g, one_minus_dampening, buf[i] * momentum)
            buf[i] = b
            if nesterov:
                g = fma32(b, momentum, g)
            else:
                g = b
        out[i] = fma32(g, nlr, param[i])


@kernel(parallel=True)
def adagrad_kernel(param, out, grad, sum_sq, nclr, eps, weight_decay):
    """One torch Adagrad step per element into `out` (may be `param`); nclr is -lr / (1 + (step - 1) * lr_decay)."""
    for i in prange(param.size):
        g = grad[i]
        if weight_decay != 0:
            g = fma32(param[i], weight_decay, g)
        s = fma32(g, g, sum_sq[i])
        sum_sq[i] = s
        out[i] = param[i] + nclr * g / (np.sqrt(s) + eps)


@kernel(parallel=True)
def count_nonfinite(x):
    """How many elements of a float32 vector are NaN or +-Inf (exponent bits all ones), in one parallel pass."""
    bits = x.view(np.int32)
    bad = 0
    for i in prange(bits.size):
        bad += (bits[i] & 0x7F800000) == 0x7F800000
    return bad


@kernel(parallel=True)
def axpy_kernel(y, x, alpha):
    """y += alpha * x, fused like torch's y.add_(x, alpha=alpha)."""
    for i in prange(y.size):
        y[i] = fma32(x[i], alpha, y[i])


# ---- numpy references: the same float32 operations in the same order, one whole-array op at a time ----


def _fma(a, b, c) -> np.ndarray:
    """Elementwise `fma32` for arrays."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def sgd_reference(param, grad, momentum_buf, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False, *, first_step=False):
    """The SGD step as plain numpy (with temporaries), for tests: bit-equal to `sgd_kernel`."""
    f = np.float32
    g = _fma(param, f(weight_decay), grad) if weight_decay != 0 else grad
    if momentum != 0:
        momentum_buf[...] = g if first_step else _fma(g, f(1 - dampening), momentum_buf * f(momentum))
        g = _fma(momentum_buf, f(momentum), g) if nesterov else momentum_buf
    param[...] = _fma(g, f(-lr), param)


def adagrad_reference(param, grad, sum_sq, lr, eps=1e-10, weight_decay=0.0, lr_decay=0.0, step=1):
    """The Adagrad step as plain numpy (with temporaries), for tests: bit-equal to `adagrad_kernel`."""
    f = np.float32
    g = _fma(param, f(weight_decay), grad) if weight_decay != 0 else grad
    sum_sq[...] = _fma(g, g, sum_sq)
    param += f(-lr / (1 + (step - 1) * lr_decay)) * g / (np.sqrt(sum_sq) + f(eps))


# ---- dispatch ----


def _flat_numpy(x: Array, name: str, size: int | None = None) -> np.ndarray:
    """A 1-D float32 numpy view of x (no copy), or a ValueError naming what is wrong and the fix."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; backend='numba' needs CPU tensors or numpy arrays (use backend='auto' or 'torch')")
        x = x.detach().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, not {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} has dtype {x.dtype}, expected float32; convert once with .astype(np.float32) when building the buffer")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; updates happen in place on flat buffers, pass a contiguous slice")
    if size is not None and x.size != size:
        raise ValueError(f"{name} has {x.size} elements, expected {size} (the size of param)")
    return x.reshape(-1)


def _flat_torch(x: Array, name: str, size: int) -> torch.Tensor:
    """A 1-D torch view of x (no copy), checked like `_flat_numpy`."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(_flat_numpy(x, name, size))
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != size:
        raise ValueError(
            f"{name} must be a contiguous float32 tensor of {size} elements, got {x.dtype}, {tuple(x.shape)}, contiguous={x.is_contiguous()}"
        )
    return x.detach().view(-1)


def _use_torch(param: Array, backend: str) -> bool:
    """True when the torch path runs: forced, or auto with a non-CPU tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return isinstance(param, torch.Tensor) and param.device.type != "cpu"
    return backend == "torch"


def _size(x: Array) -> int:
    """Element count of an array or tensor."""
    return x.numel() if isinstance(x, torch.Tensor) else x.size


def sgd(
    param: Array,
    grad: Array,
    momentum_buf: Array | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    *,
    first_step: bool = False,
    out: Array | None = None,
    backend: str = "auto",
) -> None:
    """torch.optim.SGD's step in place on param (and momentum_buf); with `out`, the new parameters go there and
    param is only read (a parameter server's double buffer).

    torch starts the buffer as a copy of the first gradient: pass first_step=True on the first step. A
    zero-initialised buffer gives the same result without it when dampening == 0. momentum_buf may be None
    when momentum == 0.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum}, dampening={dampening} (as torch.optim.SGD)"
        )
    if momentum != 0 and momentum_buf is None:
        raise ValueError(f"momentum={momentum} needs a momentum_buf the size of param; allocate zeros once and keep it")
    n = _size(param)
    if _use_torch(param, backend):
        p, g = _flat_torch(param, "param", n), _flat_torch(grad, "grad", n)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = _flat_torch(momentum_buf, "momentum_buf", n)
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        if out is None:
            p.add_(g, alpha=-lr)
        else:
            torch.add(p, g, alpha=-lr, out=_flat_torch(out, "out", n))
        return
    p, g = _flat_numpy(param, "param", n), _flat_numpy(grad, "grad", n)
    o = p if out is None else _flat_numpy(out, "out", n)
    buf = _flat_numpy(momentum_buf, "momentum_buf", n) if momentum != 0 else p  # not touched when momentum == 0
    f = np.float32  # torch's float32 scalars; Python floats would make the kernels compute in float64
    sgd_kernel(p, o, g, buf, f(-lr), f(momentum), f(weight_decay), f(1 - dampening), bool(nesterov), bool(first_step))


def adagrad(
    param: Array,
    grad: Array,
    sum_sq: Array,
    lr: float,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    lr_decay: float = 0.0,
    step: int = 1,
    *,
    out: Array | None = None,
    backend: str = "auto",
) -> None:
    """torch.optim.Adagrad's step in place on param and sum_sq (DistBelief Downpour's server-side update); with
    `out`, the new parameters go there and param is only read.

    step counts from 1 (torch's state["step"] after its increment); initial_accumulator_value is just the value
    sum_sq starts filled with.
    """
    if step < 1:
        raise ValueError(f"step={step}; Adagrad steps count from 1 (the first update is step=1)")
    clr = lr / (1 + (step - 1) * lr_decay)
    n = _size(param)
    if _use_torch(param, backend):
        p, g, s = _flat_torch(param, "param", n), _flat_torch(grad, "grad", n), _flat_torch(sum_sq, "sum_sq", n)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        s.addcmul_(g, g, value=1)
        if out is None:
            p.addcdiv_(g, s.sqrt().add_(eps), value=-clr)
        else:
            torch.addcdiv(p, g, s.sqrt().add_(eps), value=-clr, out=_flat_torch(out, "out", n))
        return
    p, g, s = _flat_numpy(param, "param", n), _flat_numpy(grad, "grad", n), _flat_numpy(sum_sq, "sum_sq", n)
    o = p if out is None else _flat_numpy(out, "out", n)
    adagrad_kernel(p, o, g, s, np.float32(-clr), np.float32(eps), np.float32(weight_decay))


def grad_is_finite(grad: Array) -> bool:
    """False if any element is NaN or +-Inf: the parameter server rejects (and counts) such pushes."""
    if isinstance(grad, torch.Tensor) and grad.device.type != "cpu":
        return bool(torch.isfinite(grad).all())
    return count_nonfinite(_flat_numpy(grad, "grad")) == 0


def axpy(y: Array, x: Array, alpha: float) -> None:
    """y += alpha * x in place (a worker summing its gradients between pushes)."""
    if isinstance(y, torch.Tensor) and y.device.type != "cpu":
        y.add_(x, alpha=alpha)
        return
    yy = _flat_numpy(y, "y")
    axpy_kernel(yy, _flat_numpy(x, "x", yy.size), np.float32(alpha))
