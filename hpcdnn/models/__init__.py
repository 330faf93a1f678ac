"""Models by name: the paper's AlexNet, a small AlexNet for 28/32 px images, and the flat parameter vector (flat.py).

Nothing here imports mpi4py or hpcdnn.data; the driver picks a model from the manifest's image shape:

    model = build_model(default_model(shape), num_classes, shape, crop=default_crop(default_model(shape), shape))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hpcdnn.models.alexnet import INPUT_SIZE, AlexNet
from hpcdnn.models.flat import FlatParams, shard_ranges
from hpcdnn.models.small import AlexNetSmall
from hpcdnn.models.wide import WideNet

__all__ = ["MODELS", "AlexNet", "AlexNetSmall", "FlatParams", "build_model", "default_crop", "default_model", "shard_ranges"]


def _alexnet(num_classes: int, in_channels: int, image_size: int) -> AlexNet:
    """AlexNet, which only takes the paper's 227x227 inputs."""
    if image_size != INPUT_SIZE:
        raise ValueError(
            f"alexnet takes {INPUT_SIZE}x{INPUT_SIZE} inputs, not {image_size}: pass crop={INPUT_SIZE} (the paper's random crops of 256 px images)"
        )
    return AlexNet(num_classes, in_channels)


# name -> builder(num_classes, in_channels, image_size), image_size being the side of the square input the net sees.
MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "alexnet": _alexnet,
    "alexnet_small": AlexNetSmall,
    "wide": WideNet,  # 274 M parameters: too big for one rank, made for --mp=K (hpcdnn/models/wide.py)
}


def default_model(image_shape: tuple[int, int, int]) -> str:
    """The model for stored images of shape (H, W, C): the paper's AlexNet from 200 px up, else the small one."""
    return "alexnet" if image_shape[0] >= 200 else "alexnet_small"


def default_crop(name: str, image_shape: tuple[int, int, int]) -> int:
    """The one default-crop rule: 227 for alexnet (the paper's 224 + its padding), the whole image side for the others."""
    _check_name(name)
    return INPUT_SIZE if name == "alexnet" else min(image_shape[0], image_shape[1])


def build_model(name: str, num_classes: int, image_shape: tuple[int, int, int], crop: int | None = None) -> nn.Module:
    """Build model `name` for images of shape (H, W, C), fed as crop x crop (or the whole square image when crop is None)."""
    _check_name(name)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), not {image_shape!r}")
    h, w, c = image_shape
    if crop is None:
        if h != w:
            raise ValueError(f"images of {h}x{w} are not square: pass crop=<side> (at most {min(h, w)})")
        size = h
    elif not 0 < crop <= min(h, w):
        raise ValueError(f"crop must be in 1..{min(h, w)} for {h}x{w} images, not {crop}")
    else:
        size = crop
    return MODELS[name](num_classes, c, size)


def _check_name(name: str) -> None:
    """Reject an unknown model name, listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
