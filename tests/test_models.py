"""Models: AlexNet as in the 2012 paper (parameter count, shapes, init, LRN formula), AlexNetSmall, and the registry."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hpcdnn.kernels.lrn import lrn_backward, lrn_forward, window
from hpcdnn.models import MODELS, AlexNet, AlexNetSmall, build_model, default_crop, default_model
from hpcdnn.models.alexnet import PARAMETERS_1000, LocalResponseNorm


@pytest.fixture(scope="module")
def alexnet() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet()


def numpy_lrn(a: np.ndarray, n: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75) -> np.ndarray:
    """The paper's formula, written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2) ** beta."""
    b = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        window = a[:, max(0, i - n // 2) : min(channels - 1, i + n // 2) + 1]
        b[:, i] = a[:, i] / (k + alpha * (window**2).sum(axis=1)) ** beta
    return b


def test_alexnet_parameter_count(alexnet):
    assert sum(p.numel() for p in alexnet.parameters()) == PARAMETERS_1000 == 60_965_224


def test_alexnet_shape_flow(alexnet):
    seen = {}
    hooks = [
        getattr(alexnet.features, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
        for n in ("conv1", "pool1", "conv2", "pool2", "conv5", "pool5")
    ]
    alexnet.eval()
    with torch.no_grad():
        out = alexnet(torch.randn(2, 3, 227, 227))
    for h in hooks:
        h.remove()
    assert seen == {
        "conv1": (2, 96, 55, 55),
        "pool1": (2, 96, 27, 27),
        "conv2": (2, 256, 27, 27),
        "pool2": (2, 256, 13, 13),
        "conv5": (2, 256, 13, 13),
        "pool5": (2, 256, 6, 6),
    }
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_alexnet_layers_as_in_the_paper(alexnet):
    f, c = alexnet.features, alexnet.classifier
    convs = [
        (f.conv1, 96, 11, 4, 0, 1),
        (f.conv2, 256, 5, 1, 2, 2),
        (f.conv3, 384, 3, 1, 1, 1),
        (f.conv4, 384, 3, 1, 1, 2),
        (f.conv5, 256, 3, 1, 1, 2),
    ]
    for conv, out, kernel, stride, pad, groups in convs:
        assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.groups) == (
            out,
            (kernel,) * 2,
            (stride,) * 2,
            (pad,) * 2,
            groups,
        )
    for pool in (f.pool1, f.pool2, f.pool5):
        assert (pool.kernel_size, pool.stride) == (3, 2)
    for norm in (f.norm1, f.norm2):
        assert (norm.size, norm.k, norm.alpha, norm.beta) == (5, 2.0, 1e-4, 0.75)
    names = [n for n, _ in f.named_children()]
    assert names.index("norm1") == names.index("relu1") + 1 and names.index("pool1") == names.index("norm1") + 1
    assert [(m.in_features, m.out_features) for m in (c.fc6, c.fc7, c.fc8)] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    order = [n for n, _ in c.named_children()]
    assert order == ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]  # dropout on fc6 and fc7 outputs
    assert c.drop6.p == c.drop7.p == 0.5


def test_alexnet_init(alexnet):
    layers = {**dict(alexnet.features.named_children()), **dict(alexnet.classifier.named_children())}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        w, b = layers[name].weight, layers[name].bias
        assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.01, rel=0.05 if w.numel() > 30000 else 0.2)
        expected = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(b == expected), name


def test_alexnet_rejects_other_sizes(alexnet):
    with pytest.raises(ValueError, match="227"):
        alexnet(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize("shape", [(2, 7, 3, 3), (3, 96, 5, 4), (1, 3, 2, 2)])
def test_lrn_matches_the_paper_formula(shape):
    a = np.random.default_rng(1).normal(0, 30, shape).astype(np.float64)  # large enough that the denominator matters
    expected = numpy_lrn(a)
    ours = LocalResponseNorm()(torch.from_numpy(a)).numpy()
    torch_twin = nn.LocalResponseNorm(5, alpha=1e-4 * 5, beta=0.75, k=2.0)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    np.testing.assert_allclose(torch_twin, expected, rtol=1e-12)
    assert np.abs(expected - a / 2**0.75).max() > 1e-3 * np.abs(a).max()  # the squares really changed the result


def test_lrn_gradient():
    x = (torch.randn(2, 9, 3, 4, dtype=torch.float64) * 20).requires_grad_()
    assert torch.autograd.gradcheck(LocalResponseNorm(), (x,))
    assert torch.autograd.gradcheck(LocalResponseNorm(size=4, beta=0.6, k=1.0, alpha=1e-3), (x,))


def test_lrn_float32_matches_torch_forward_and_backward():
    x = torch.randn(8, 64, 7, 7) * 10
    g = torch.randn_like(x)
    ref, ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(ref)
    out_ref.backward(g)
    out = LocalResponseNorm()(ours)
    out.backward(g)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(ours.grad, ref.grad)


def test_lrn_keeps_torch_thread_count():
    """Numba's OpenMP pool start-up must not change torch's thread count (ranks x threads <= cores)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        LocalResponseNorm()(x).sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lrn_kernels_uncompiled_agree():
    """The Numba kernels' Python twins (HPCDNN_JIT=0 mode) compute the same as the compiled ones."""
    a = np.random.default_rng(2).normal(0, 20, (2, 6, 5)).astype(np.float32)
    g = np.random.default_rng(3).normal(0, 1, a.shape).astype(np.float32)
    results = []
    for fwd, bwd in ((lrn_forward, lrn_backward), (lrn_forward.py_func, lrn_backward.py_func)):
        out, scale, grad = np.empty_like(a), np.empty_like(a), np.empty_like(a)
        one = np.float32
        fwd(a, out, scale, 2, 2, one(1e-4), one(0.75), one(2.0))
        bwd(a, scale, g, grad, 2, 2, one(1e-4), one(0.75))
        results.append((out, grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[0][0], numpy_lrn(a.reshape(2, 6, 5, 1)).reshape(a.shape), rtol=1e-5)


def test_lrn_window_and_bad_size():
    """Channel c's window is [c - size // 2, c + (size - 1) // 2]; a size below 1 fails when the layer is built."""
    assert window(5) == (2, 2) and window(4) == (2, 1) and window(1) == (0, 0)
    with pytest.raises(ValueError, match="LRN size 0"):
        LocalResponseNorm(size=0)


@pytest.mark.parametrize("size,channels", [(28, 1), (24, 1), (32, 3)])
def test_small_shapes_and_backward(size, channels):
    torch.manual_seed(0)
    model = AlexNetSmall(10, channels, size)
    x = torch.randn(4, channels, size, size)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        model(torch.zeros(1, channels, size + 1, size + 1))


def test_small_structure_and_kaiming_init():
    torch.manual_seed(0)
    model = AlexNetSmall(10, 1, 28)
    names = [n for n, _ in model.features.named_children()]
    assert names[:4] == ["conv1", "relu1", "norm1", "pool1"] and names[4:8] == ["conv2", "relu2", "norm2", "pool2"]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules()) == 2
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)
            assert torch.all(m.bias == 0)


def test_small_rejects_bad_sizes():
    with pytest.raises(ValueError, match="alexnet"):
        AlexNetSmall(10, 3, 227)
    with pytest.raises(ValueError):
        AlexNetSmall(0, 1, 28)


def test_registry_builds_by_name():
    assert set(MODELS) == {"alexnet", "alexnet_small", "wide"}
    assert isinstance(build_model("alexnet_small", 10, (28, 28, 1), crop=None), AlexNetSmall)
    small = build_model("alexnet_small", 10, (28, 28, 1), crop=24)
    assert small.input_size == 24 and small.in_channels == 1
    assert build_model("alexnet_small", 100, (32, 32, 3), None)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_registry_alexnet_needs_227_crop():
    with pytest.raises(ValueError, match="crop=227"):
        build_model("alexnet", 1000, (256, 256, 3), crop=None)
    assert default_crop("alexnet", (256, 256, 3)) == 227
    assert default_crop("alexnet_small", (28, 28, 1)) == 28  # the whole image side (one crop rule for every model)


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match="known models: alexnet, alexnet_small"):
        build_model("vgg16", 10, (28, 28, 1), None)
    with pytest.raises(ValueError, match="crop must be in 1..28"):
        build_model("alexnet_small", 10, (28, 28, 1), crop=30)
    with pytest.raises(ValueError, match="not square"):
        build_model("alexnet_small", 10, (28, 32, 1), crop=None)


@pytest.mark.parametrize(
    "shape,name", [((256, 256, 3), "alexnet"), ((200, 300, 3), "alexnet"), ((28, 28, 1), "alexnet_small"), ((32, 32, 3), "alexnet_small")]
)
def test_default_model(shape, name):
    assert default_model(shape) == name


def test_importing_models_does_not_touch_mpi_or_data():
    code = "import sys, hpcdnn.models; bad = [m for m in sys.modules if m.startswith(('mpi4py', 'hpcdnn.data'))]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
