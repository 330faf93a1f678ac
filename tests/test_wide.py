"""WideNet (hpcdnn/models/wide.py): its exact size, meta-device construction, shapes, init and registry entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcdnn.models import MODELS, build_model
from hpcdnn.models.wide import HIDDEN, PARAMETERS_28_1_10, WideNet


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_is_exact_and_over_250m():
    with torch.device("meta"):
        model = WideNet(10, 1, 28)
    assert numel(model) == PARAMETERS_28_1_10 == 274_149_130 >= 250_000_000
    # by hand: conv1 1*64*25+64, conv2 64*128*9+128, fc3 6272*H+H, fc4 and fc5 H*H+H, fc6 H*10+10
    h = HIDDEN
    assert PARAMETERS_28_1_10 == (25 * 64 + 64) + (64 * 128 * 9 + 128) + (128 * 7 * 7 * h + h) + 2 * (h * h + h) + (h * 10 + 10)
    with torch.device("meta"):
        assert numel(WideNet(10, 3, 32)) == 293_813_130  # the 32x32x3 figure of the module docstring


def test_layer_shapes():
    with torch.device("meta"):
        model = WideNet(10, 1, 28)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")}
    assert shapes == {
        "features.conv1.weight": (64, 1, 5, 5),
        "features.conv2.weight": (128, 64, 3, 3),
        "classifier.fc3.weight": (HIDDEN, 128 * 7 * 7),
        "classifier.fc4.weight": (HIDDEN, HIDDEN),
        "classifier.fc5.weight": (HIDDEN, HIDDEN),
        "classifier.fc6.weight": (10, HIDDEN),
    }
    kinds = {type(m) for m in model.modules() if not list(m.children())}
    assert kinds == {nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Dropout}  # what the column partition can split


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = build_model("wide", 10, (28, 28, 1))
    assert isinstance(model, WideNet) and model.input_size == 28 and model.in_channels == 1
    assert all(p.is_meta for p in model.parameters())
    assert all(p.untyped_storage().data_ptr() == 0 for p in model.parameters())  # no memory behind any parameter
    with torch.device("meta"):
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # shapes propagate on meta too


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_forward_backward_at_reduced_width(size, channels):
    torch.manual_seed(0)
    model = WideNet(10, channels, size, hidden=64)
    out = model(torch.randn(4, channels, size, size))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        model(torch.zeros(1, channels, size + 4, size + 4))


def test_kaiming_init_and_zero_bias():
    torch.manual_seed(0)
    model = WideNet(10, 1, 28, hidden=256)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)
            assert torch.all(m.bias == 0)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules()) == 3


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="8..64 px, not 227"):
        WideNet(10, 3, 227)
    with pytest.raises(ValueError, match="hidden"):
        WideNet(10, 1, 28, hidden=0)


def test_registered_as_wide():
    assert MODELS["wide"] is WideNet
    with pytest.raises(ValueError, match="known models: .*wide"):
        build_model("widenet", 10, (28, 28, 1))
