"""WideNet: a DistBelief-flavoured wide network for 28-32 px images, too big for one rank's memory budget by design.

The point of this model is model parallelism (`--mp=K`): a small conv stem, then three wide fully-connected layers
holding almost all of its 274,149,130 parameters (28x28x1, 10 classes; 293,813,130 for 32x32x3). Every layer is a
plain nn.Conv2d or nn.Linear with only ReLU, max-pool and dropout between them, so a rank can hold just its share of
every layer's output units (the general column partition) and nothing else needs splitting.
Spatial flow for 28 px: 28 -conv1-> 28 -pool-> 14 -conv2-> 14 -pool-> 7; fc 128*7*7 -> H -> H -> H -> K, H = hidden.
Build it on the meta device (`with torch.device("meta"): WideNet(10, 1, 28)`) to count or split it without
allocating a byte; `hidden=` shrinks it for tests.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hpcdnn.models.small import kaiming_relu_init

HIDDEN = 10240  # default width of the FC layers: 2^11 * 5, so it splits evenly over any power-of-2 K up to 2048
PARAMETERS_28_1_10 = 274_149_130  # parameters for 28x28x1 inputs and 10 classes at the default widths (the tests check it)
MIN_SIZE, MAX_SIZE = 8, 64  # two 2x2 pools leave at least 2x2; above 64 px fc1 alone would outgrow the rest


class WideNet(nn.Module):
    """conv-ReLU-pool x2, then FC-ReLU-dropout x3 of `hidden` units and a linear classifier; Kaiming-initialised.

    Kaiming-normal (fan_in, ReLU) weights and zero biases, as AlexNetSmall: the activation variance stays put through
    the three wide layers, where small-std inits would shrink the signal by the fan-in at every layer. Train it at
    small learning rates (around 1e-4 for SGD with momentum, not alexnet_small's 0.05): what one SGD step changes in a
    layer's output grows with the width of its input, and rates that suit narrow nets kill the wide ReLU layers.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        hidden: int = HIDDEN,
        widths: tuple[int, int] = (64, 128),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or hidden < 1 or min(widths) < 1:
            raise ValueError(
                f"WideNet needs num_classes, in_channels, hidden and widths >= 1, not {num_classes}, {in_channels}, {hidden}, {widths}"
            )
        if not MIN_SIZE <= image_size <= MAX_SIZE:
            raise ValueError(f"WideNet takes square inputs of {MIN_SIZE}..{MAX_SIZE} px, not {image_size}: use alexnet for large images")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = image_size
        c1, c2 = widths
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", nn.MaxPool2d(2)),
                ]
            )
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc3", nn.Linear(c2 * side * side, hidden)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("drop3", nn.Dropout(dropout)),
                    ("fc4", nn.Linear(hidden, hidden)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("drop4", nn.Dropout(dropout)),
                    ("fc5", nn.Linear(hidden, hidden)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("drop5", nn.Dropout(dropout)),
                    ("fc6", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_relu_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for a float batch (N, C, S, S) with S = image_size."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this WideNet was built for {self.input_size}x{self.input_size} inputs, not {tuple(x.shape[-2:])}")
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
