"""AlexNetSmall: AlexNet's structure (conv-ReLU-LRN-overlapping pool stages, more convs, dropout FCs) for 24-32 px images.

Sized to train on two CPU cores: for 28x28x1 (Fashion-MNIST) or 24x24 crops, and 32x32x3 (CIFAR-like) inputs.
Spatial flow for 28 px: 28 -conv1-> 28 -pool-> 13 -conv2-> 13 -pool-> 6 -conv3,conv4-> 6 -pool-> 2; fc 128*2*2 -> 512 -> 512 -> K.
Widths 32-64-128-128 (AlexNet's 1:2.7:4:4 ratio, roughly): wider first layers cost throughput mostly in the 28x28
maps (`python bench/model.py` measures this model's images/s; the README has the table).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hpcdnn.models.alexnet import overlapping_pool, paper_lrn

MIN_SIZE = 15  # the smallest input whose three 3x3/2 pools still leave 1x1


def pooled(size: int) -> int:
    """Spatial size after one 3x3 stride-2 max-pool without padding (floor mode, as in the paper's 55 -> 27)."""
    return (size - 3) // 2 + 1


@torch.no_grad()
def kaiming_relu_init(module: nn.Module) -> None:
    """Kaiming-normal (fan_in, ReLU) weights and zero biases for every conv and FC layer of `module` (no-op on meta)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                layer.bias.zero_()


class AlexNetSmall(nn.Module):
    """A small AlexNet for 15-64 px inputs, Kaiming-initialised.

    Why not the paper's N(0, 0.01^2) init: with std 0.01 every layer shrinks the signal (fan_in * 0.01^2 << 2), so a
    net trained from scratch without the paper's 90 epochs sits on a plateau for a long time; Kaiming-normal
    (fan_in, ReLU) keeps the activation variance constant through the ReLUs, so it trains in a few epochs.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        widths: tuple[int, int, int, int] = (32, 64, 128, 128),
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"AlexNetSmall needs num_classes >= 1 and in_channels >= 1, not {num_classes} and {in_channels}")
        if not MIN_SIZE <= image_size <= 64:
            raise ValueError(f"AlexNetSmall takes square inputs of {MIN_SIZE}..64 px, not {image_size}: use alexnet for large images")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = image_size
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", paper_lrn()),
                    ("pool1", overlapping_pool()),
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", paper_lrn()),
                    ("pool2", overlapping_pool()),
                    ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("pool4", overlapping_pool()),
                ]
            )
        )
        side = pooled(pooled(pooled(image_size)))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc5", nn.Linear(c4 * side * side, hidden)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("drop5", nn.Dropout(dropout)),
                    ("fc6", nn.Linear(hidden, hidden)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(dropout)),
                    ("fc7", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_relu_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for a float batch (N, C, S, S) with S = image_size."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this AlexNetSmall was built for {self.input_size}x{self.input_size} inputs, not {tuple(x.shape[-2:])}")
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
