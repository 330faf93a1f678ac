"""FlatParams (parameters and gradients as views into two flat vectors) and shard_ranges."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hpcdnn.models import FlatParams, build_model, shard_ranges


def tiny() -> nn.Module:
    """A small conv net whose parameter sizes (27, 3, 30, 10) are not multiples of 16, so padding shows up."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,))


def twin_and_flat(make=tiny) -> tuple[nn.Module, nn.Module, FlatParams]:
    """An unflattened copy and a flattened module with the same weights."""
    module = make()
    twin = copy.deepcopy(module)
    return twin, module, FlatParams(module)


@pytest.mark.parametrize("align", [1, 3, 16])
def test_shard_ranges_cover_balance_align(align):
    for n in [*range(0, 70), 1000, 4097, 60_965_224]:
        for parts in range(1, 12):
            ranges = shard_ranges(n, parts, align)
            assert len(ranges) == parts
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
            assert all(start <= stop for start, stop in ranges)
            assert all(stop % align == 0 for _, stop in ranges[:-1])
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= align, (n, parts, sizes)


def test_shard_ranges_examples_and_errors():
    assert shard_ranges(100, 1) == [(0, 100)]
    assert shard_ranges(64, 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert shard_ranges(33, 2) == [(0, 16), (16, 33)]
    assert shard_ranges(5, 3) == [(0, 0), (0, 0), (0, 5)]
    for bad in ({"parts": 0}, {"parts": -1}, {"parts": 2, "align": 0}):
        with pytest.raises(ValueError):
            shard_ranges(10, **bad)
    with pytest.raises(ValueError):
        shard_ranges(-1, 2)


def test_parameters_become_views_with_aligned_zero_padding():
    twin, module, flat = twin_and_flat()
    assert flat.param_count == sum(p.numel() for p in twin.parameters()) == 27 + 3 + 480 + 10 + 30 + 3
    offsets = [off for _, off, _ in flat.layout]
    assert all(off % 16 == 0 for off in offsets) and offsets == sorted(offsets)
    assert flat.numel == offsets[-1] + 3 and flat.data.dtype == flat.grad.dtype == torch.float32
    base = flat.data.data_ptr()
    for (name, off, shape), (pname, p), (_, q) in zip(flat.layout, module.named_parameters(), twin.named_parameters()):
        assert name == pname and tuple(p.shape) == shape
        assert p.data_ptr() == base + 4 * off and p.grad.data_ptr() == flat.grad.data_ptr() + 4 * off
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    used = torch.zeros(flat.numel, dtype=torch.bool)
    for _, off, shape in flat.layout:
        used[off : off + int(np.prod(shape))] = True
    assert (~used).sum() > 0 and torch.all(flat.data[~used] == 0)
    flat.check()


def test_gradients_accumulate_in_the_flat_buffer():
    twin, module, flat = twin_and_flat()
    x, y = batch()
    for _ in range(2):  # two backward passes: autograd must add into the views, not replace them
        nn.functional.cross_entropy(module(x), y).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
    assert flat.grad.abs().sum() > 0
    for (name, off, shape), q in zip(flat.layout, twin.parameters()):
        torch.testing.assert_close(flat.grad[off : off + q.numel()].view(shape), q.grad, msg=name)
    flat.check()
    flat.zero_grad()
    assert torch.all(flat.grad == 0) and all(p.grad is not None for p in module.parameters())
    nn.functional.cross_entropy(module(x), y).backward()
    twin.zero_grad()
    nn.functional.cross_entropy(twin(x), y).backward()
    torch.testing.assert_close(flat.grad[flat.layout[-1][1] :], twin[-1].bias.grad)
    used = torch.zeros(flat.numel, dtype=torch.bool)
    for _, off, shape in flat.layout:
        used[off : off + int(np.prod(shape))] = True
    assert torch.all(flat.grad[~used] == 0)  # padding never gets a gradient


def test_optimizer_step_on_flat_buffer_reaches_the_module():
    twin, module, flat = twin_and_flat()
    x, y = batch()
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_flat = torch.optim.SGD([flat.data], lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt_twin.zero_grad()
        flat.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        nn.functional.cross_entropy(module(x), y).backward()
        opt_twin.step()
        opt_flat.step()
    torch.testing.assert_close(module(x), twin(x))
    flat.data.add_(flat.grad, alpha=-0.5)  # a hand-written update on the flat vector is seen too (same last grads)
    with torch.no_grad():
        for q in twin.parameters():
            q.add_(q.grad, alpha=-0.5)
    torch.testing.assert_close(module(x), twin(x))
    flat.check()


def test_optimizer_on_module_parameters_writes_the_flat_buffer():
    _, module, flat = twin_and_flat()
    before = flat.state_dict_flat()
    x, y = batch()
    nn.functional.cross_entropy(module(x), y).backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    torch.testing.assert_close(flat.data, before - 0.1 * flat.grad)


def test_torch_zero_grad_is_repaired_and_detected():
    _, module, flat = twin_and_flat()
    torch.optim.SGD(module.parameters(), lr=0.1).zero_grad()  # set_to_none=True detaches the views
    with pytest.raises(RuntimeError, match="flat.zero_grad"):
        flat.check()
    flat.zero_grad()
    flat.check()


def test_state_dict_load_and_numpy_views():
    twin, module, flat = twin_and_flat()
    saved = flat.state_dict_flat()
    assert saved.data_ptr() != flat.data.data_ptr()
    arr = flat.to_numpy()
    assert arr.dtype == np.float32 and arr.shape == (flat.numel,) and np.shares_memory(arr, flat.to_numpy())
    arr[:] = 0.5  # zero-copy: the module sees it (padding included here; load_flat below restores zeros)
    assert torch.all(module[0].weight == 0.5)
    noisy = saved.double().numpy() + 0.0
    noisy[flat._pads[0][0]] = 7.0  # garbage in a padding slot must not survive
    flat.load_flat(noisy)
    torch.testing.assert_close(flat.data, saved)
    x, _ = batch()
    torch.testing.assert_close(module(x), twin(x))
    flat.load_flat(saved * 2)
    assert torch.equal(flat.data, saved * 2)
    with pytest.raises(ValueError, match=f"shape \\({flat.numel},\\)"):
        flat.load_flat(np.zeros(flat.numel + 1, np.float32))
    assert np.shares_memory(flat.to_numpy(grad=True), flat.grad.numpy())


def test_device_follows_the_module_and_meta_works():
    _, _, flat = twin_and_flat()
    assert flat.device == torch.device("cpu")
    module = tiny()
    flat = FlatParams(module, device="meta")  # any device: nothing assumes CPU except to_numpy
    assert flat.data.device.type == "meta" and all(p.device.type == "meta" for p in module.parameters())
    with pytest.raises(RuntimeError, match="meta"):
        flat.to_numpy()
    with pytest.raises(ValueError, match="no parameters"):
        FlatParams(nn.ReLU())


def test_tied_parameters_appear_once():
    lin = nn.Linear(4, 4)
    module = nn.Sequential(lin, nn.ReLU(), lin)
    flat = FlatParams(module)
    assert [name for name, _, _ in flat.layout] == ["0.weight", "0.bias"]
    module(torch.randn(3, 4)).sum().backward()
    assert flat.grad.abs().sum() > 0


def test_alexnet_small_flat_gradients_match():
    twin, module, flat = twin_and_flat(lambda: build_model("alexnet_small", 10, (28, 28, 1), None))
    twin.eval()
    module.eval()
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    nn.functional.cross_entropy(module(x), y).backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    for (name, off, shape), q in zip(flat.layout, twin.parameters()):
        torch.testing.assert_close(flat.grad[off : off + q.numel()].view(shape), q.grad, msg=name)
    assert flat.param_count == sum(p.numel() for p in twin.parameters())


def test_alexnet_flat():
    torch.manual_seed(0)
    model = build_model("alexnet", 1000, (256, 256, 3), crop=227)
    flat = FlatParams(model)
    assert flat.param_count == flat.numel == 60_965_224  # every AlexNet tensor but fc8.bias is a multiple of 16 long
    assert [name for name, _, _ in flat.layout][:2] == ["features.conv1.weight", "features.conv1.bias"]
    torch.manual_seed(2)
    model(torch.randn(1, 3, 227, 227)).logsumexp(1).sum().backward()
    flat.check()
    for (name, off, shape), p in zip(flat.layout, model.parameters()):
        assert torch.equal(flat.grad[off : off + p.numel()].view(shape), p.grad), name
    assert flat.grad[flat.layout[-1][1] :].abs().sum() > 0  # fc8.bias got its gradient in the flat buffer
    ranges = shard_ranges(flat.numel, 3)
    assert sum(b - a for a, b in ranges) == flat.numel
