"""AlexNet's two towers on two ranks, as the paper splits it over two GPUs (Krizhevsky et al. 2012, section 3.2 and fig. 2).

    towers = AlexNetTowers(AlexNet(1000), comm)      # comm: the replica's 2 ranks; rank r holds tower r + 1
    logits = towers(images)                          # (N, 1000) on both ranks: the replicated loss follows

Each tower is built from the same whole model's weights (so both ranks together start where the 1-rank model starts):
conv1 split 48/48 by output maps; conv2, conv4 and conv5 (groups=2 in hpcdnn.models.AlexNet) stay on their tower,
each a plain conv of its group's weight rows over its own tower's maps; conv3, fc6, fc7 and fc8 take input from both
towers, their output units split 50/50. LRN sums over adjacent maps of one GPU, so each tower normalises its own maps
(AlexNet's `groups=2` LRN does the same on one device). Activations stay split by channel: before conv3 and each FC
layer the towers all-gather their halves; in backward each tower holds only a partial gradient of the gathered input
(its own output units' share), so the gradients are summed over the towers and each keeps its half (reduce-scatter).
The logits are all-gathered for the replicated loss; their backward needs no message (each keeps its slice).

Sent per rank per step for a batch of N images and C classes (float32; both ranks alike, the second logit share
rounded down): forward 4N x (128x13x13 conv3 input + 128x6x6 fc6 input + 2048 fc7 + 2048 fc8 inputs + C/2 logits)
= 4N x (30,336 + C/2) bytes, backward 4N x 30,336 bytes (the same four inputs' gradient halves; none for the logits).
hpcdnn.mpi.exchange.STATS counts them; the test checks the count against this formula. Data parallelism instead
sends the whole gradient, about 61M floats, each step whatever N is.

Why all-gather and reduce-scatter rather than point-to-point for two ranks: the bytes are the same (each rank sends
its half, or the other's half of its partial sum), but collectives match by call order, and autograd runs the same
graph in the same order on both ranks, so there are no tags to keep apart and no send/send deadlock to avoid; MPI
picks its own shared-memory or network path and does the sum; and the same calls serve K ranks (hpcdnn/mpi/partition.py).

Dropout: each tower draws its own mask for its own units (2048 of fc6's and of fc7's outputs) from its rank's torch
generator; seed the two ranks differently if the halves' masks should be independent. The masks then differ from a
1-rank model's, so equality with it holds with dropout off (p=0 or eval()).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hpcdnn.models.alexnet import INPUT_SIZE, AlexNet, LocalResponseNorm, overlapping_pool
from hpcdnn.mpi.exchange import all_gather, split

TOWERS = 2
# layer -> (whole model's output units, its groups there): checked against the model handed in
SHAPES = {"conv1": (96, 1), "conv2": (256, 2), "conv3": (384, 1), "conv4": (384, 2), "conv5": (256, 2), "fc6": (4096, 1), "fc7": (4096, 1)}


class Gather(nn.Module):
    """all_gather along the channel dim as a layer, so a tower reads top to bottom like AlexNet."""

    def __init__(self, comm, backward: str, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.comm, self.backward, self.sizes = comm, backward, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather(x, self.comm, dim=1, backward=self.backward, sizes=self.sizes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, backward={self.backward}"


def _lrn(like: LocalResponseNorm) -> LocalResponseNorm:
    """The whole model's LRN, over one tower's maps only."""
    return LocalResponseNorm(like.size, like.alpha, like.beta, like.k)


class AlexNetTowers(nn.Module):
    """This rank's tower of `full` (rank 0 tower 1, rank 1 tower 2); forward returns all the logits on both ranks.

    Parameters keep the whole model's names; `rows[name]` = (lo, hi) is the range of the whole parameter's rows
    (output units) this tower holds, so `full[name][lo:hi]` is where its values and gradients belong.
    """

    own_dropout = True  # each tower masks its own units: the driver seeds the two ranks of a replica apart

    def __init__(self, full: AlexNet, comm) -> None:
        super().__init__()
        if comm is None or comm.Get_size() != TOWERS:
            got = 1 if comm is None else comm.Get_size()
            raise ValueError(
                f"AlexNetTowers needs a communicator of exactly {TOWERS} ranks (one per tower), not {got}: use partition_model for other sizes"
            )
        f, c = full.features, full.classifier
        for name, (out, groups) in SHAPES.items():
            layer = getattr(f, name) if hasattr(f, name) else getattr(c, name)
            got = (layer.out_channels, layer.groups) if isinstance(layer, nn.Conv2d) else (layer.out_features, 1)
            if got != (out, groups):
                raise ValueError(
                    f"{name} of the model has (outputs, groups) {got}, not the paper's {(out, groups)}: pass an hpcdnn.models.AlexNet"
                )
        self.comm, self.tower = comm, comm.Get_rank()
        self.num_classes = c.fc8.out_features
        self.rows: dict[str, tuple[int, int]] = {}
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", self._conv(f, "conv1")),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", _lrn(f.norm1)),
                    ("pool1", overlapping_pool()),
                    ("conv2", self._conv(f, "conv2")),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", _lrn(f.norm2)),
                    ("pool2", overlapping_pool()),
                    ("gather3", self._gather(f.conv2.out_channels, "reduce_scatter")),
                    ("conv3", self._conv(f, "conv3")),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", self._conv(f, "conv4")),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", self._conv(f, "conv5")),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", overlapping_pool()),
                ]
            )
        )
        self.gather6 = self._gather(f.conv5.out_channels, "reduce_scatter")  # (N, 128, 6, 6) halves -> (N, 256, 6, 6)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", self._linear(c, "fc6")),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(c.drop6.p)),
                    ("gather7", self._gather(c.fc6.out_features, "reduce_scatter")),
                    ("fc7", self._linear(c, "fc7")),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(c.drop7.p)),
                    ("gather8", self._gather(c.fc7.out_features, "reduce_scatter")),
                    ("fc8", self._linear(c, "fc8")),
                ]
            )
        )
        self.logits = self._gather(self.num_classes, "slice")  # the loss is replicated: each rank keeps its slice

    def _gather(self, units: int, backward: str) -> Gather:
        """A gather of the two towers' shares of `units` channels (split() order: tower 1's first)."""
        return Gather(self.comm, backward, tuple(hi - lo for lo, hi in split(units, TOWERS)))

    @torch.no_grad()
    def _conv(self, features: nn.Sequential, name: str) -> nn.Conv2d:
        """This tower's output maps of conv `name` as a plain conv: its weight rows over the maps it receives."""
        whole: nn.Conv2d = getattr(features, name)
        lo, hi = split(whole.out_channels, TOWERS)[self.tower]
        # a groups=2 conv's group k reads exactly tower k's maps; conv1 and conv3 read everything they are given
        conv = nn.Conv2d(whole.in_channels // whole.groups, hi - lo, whole.kernel_size, whole.stride, whole.padding, bias=True)
        conv.weight.copy_(whole.weight[lo:hi])
        conv.bias.copy_(whole.bias[lo:hi])
        self.rows[f"features.{name}.weight"] = self.rows[f"features.{name}.bias"] = (lo, hi)
        return conv

    @torch.no_grad()
    def _linear(self, classifier: nn.Sequential, name: str) -> nn.Linear:
        """This tower's output units of FC layer `name`: its weight rows over the whole (gathered) input."""
        whole: nn.Linear = getattr(classifier, name)
        lo, hi = split(whole.out_features, TOWERS)[self.tower]
        fc = nn.Linear(whole.in_features, hi - lo)
        fc.weight.copy_(whole.weight[lo:hi])
        fc.bias.copy_(whole.bias[lo:hi])
        self.rows[f"classifier.{name}.weight"] = self.rows[f"classifier.{name}.bias"] = (lo, hi)
        return fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) on both ranks for the same float batch (N, 3, 227, 227) on both."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"AlexNet takes {INPUT_SIZE}x{INPUT_SIZE} inputs, not {tuple(x.shape[-2:])}: crop 256-px images to 227")
        x = self.gather6(self.features(x))
        return self.logits(self.classifier(torch.flatten(x, 1)))
