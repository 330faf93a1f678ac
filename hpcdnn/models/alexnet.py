"""AlexNet exactly as in Krizhevsky, Sutskever & Hinton (NIPS 2012): 227x227 input, 60,965,224 parameters for 1000 classes.

The paper's two-GPU split is kept as `groups=2` in conv2, conv4 and conv5 (conv3 and the FC layers see both halves),
so the parameter count and the connectivity match the paper; on one device the groups are just a sparser conv.
LRN after conv1 and conv2 normalises each half of the maps on its own (`groups=2`): the paper sums over "adjacent
kernel maps" on one GPU, so a window never reaches into the other GPU's half. One device then computes exactly what
the two towers of hpcdnn/mpi/towers.py compute on two ranks.
Shapes for one image: 3x227x227 -conv1-> 96x55x55 -pool-> 96x27x27 -conv2-> 256x27x27 -pool-> 256x13x13
-conv3-> 384x13x13 -conv4-> 384x13x13 -conv5-> 256x13x13 -pool-> 256x6x6 = 9216 -fc6-> 4096 -fc7-> 4096 -fc8-> K.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from hpcdnn.kernels.jit import ENABLED as JIT_ENABLED
from hpcdnn.kernels.jit import run_parallel
from hpcdnn.kernels.lrn import lrn_backward, lrn_forward, window

INPUT_SIZE = 227  # the paper's "224" only works out with 227 (or padding): (227 - 11) / 4 + 1 = 55
PARAMETERS_1000 = 60_965_224  # parameter count for K = 1000, asserted by the tests

# Local response normalisation, paper section 3.3 (kernels: hpcdnn/kernels/lrn.py): the paper's n, k, alpha, beta.
LRN_SIZE = 5
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75


def _as_array(t: torch.Tensor) -> np.ndarray:
    """Zero-copy (N, C, H*W) numpy view of a contiguous CPU tensor."""
    return t.detach().view(t.shape[0], t.shape[1], -1).numpy()


class _LRNFunction(torch.autograd.Function):
    """LRN forward/backward on CPU through the Numba kernels of hpcdnn/kernels/lrn.py (one fused pass each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        x = x.contiguous()
        out, scale = torch.empty_like(x), torch.empty_like(x)
        dt = _as_array(x).dtype.type
        run_parallel(lrn_forward, _as_array(x), _as_array(out), _as_array(scale), *window(size), dt(alpha), dt(beta), dt(k))
        ctx.save_for_backward(x, scale)
        ctx.hyper = (size, alpha, beta)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, scale = ctx.saved_tensors
        size, alpha, beta = ctx.hyper
        g = g.contiguous()
        grad = torch.empty_like(x)
        dt = _as_array(x).dtype.type
        run_parallel(lrn_backward, _as_array(x), _as_array(scale), _as_array(g), _as_array(grad), *window(size), dt(alpha), dt(beta))
        return grad, None, None, None, None


class LocalResponseNorm(nn.Module):
    """The paper's LRN across channels, with the paper's alpha (torch's nn.LocalResponseNorm wants alpha * size instead).

    The window of channel c is [c - size // 2, c + (size - 1) // 2], zero-padded at the ends, as in the paper and torch.
    With `groups` > 1 the channels are cut into that many equal consecutive blocks, each normalised on its own (zero
    padding at block edges too): AlexNet's two GPU halves. On CPU (float32/64, JIT on) it runs the fused Numba
    kernels; elsewhere torch's formula on any device.
    """

    def __init__(self, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K, groups: int = 1) -> None:
        super().__init__()
        window(size)  # rejects size < 1 here, not at the first forward
        if groups < 1:
            raise ValueError(f"LRN groups must be >= 1, not {groups} (1: one window over all channels; AlexNet uses 2)")
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised activations, same shape as x (N, C, H, W)."""
        shape = x.shape
        if self.groups > 1:  # (N, C, ...) -> (N * groups, C / groups, ...): a view, each block one "sample"
            if x.dim() < 2 or shape[1] % self.groups:
                raise ValueError(f"LRN with groups={self.groups} needs (N, C, ...) inputs with C divisible by it, not {tuple(shape)}")
            x = x.reshape(shape[0] * self.groups, shape[1] // self.groups, *shape[2:])
        if x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and JIT_ENABLED:
            out = _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        else:
            out = F.local_response_norm(x, self.size, alpha=self.alpha * self.size, beta=self.beta, k=self.k)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


def paper_lrn(groups: int = 1) -> LocalResponseNorm:
    """The paper's LRN: n=5, k=2, alpha=1e-4, beta=0.75; `groups` blocks of channels normalised separately."""
    return LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K, groups)


def overlapping_pool() -> nn.MaxPool2d:
    """The paper's overlapping max-pool (z=3, s=2), which it reports lowers top-1 error by 0.4% against 2x2/2."""
    return nn.MaxPool2d(kernel_size=3, stride=2)


class AlexNet(nn.Module):
    """The 2012 AlexNet (groups=2 for the two-GPU split in conv2/4/5 and LRN, LRN after conv1/conv2, dropout on fc6/fc7 outputs), paper init."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"AlexNet needs num_classes >= 1 and in_channels >= 1, not {num_classes} and {in_channels}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = INPUT_SIZE
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 96, kernel_size=11, stride=4)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", paper_lrn(groups=2)),  # each GPU half on its own (module docstring)
                    ("pool1", overlapping_pool()),
                    ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", paper_lrn(groups=2)),
                    ("pool2", overlapping_pool()),
                    ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", overlapping_pool()),
                ]
            )
        )
        # Dropout on the outputs of the two hidden FC layers (paper section 4.2: "dropout in the first two
        # fully-connected layers"), i.e. on the inputs of fc7 and fc8, as in Caffe's reference model.
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(4096, num_classes)),
                ]
            )
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper section 5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7 (ReLUs start positive), else 0."""
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
        for name, layer in [*self.features.named_children(), *self.classifier.named_children()]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.normal_(0.0, 0.01)
                layer.bias.fill_(1.0 if name in ones else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for a float batch (N, C, 227, 227)."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"AlexNet takes {INPUT_SIZE}x{INPUT_SIZE} inputs, not {tuple(x.shape[-2:])}: crop 256-px images to 227")
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
