"""Learning-rate schedules and the flat optimizer wrapper against torch.optim."""

import pytest
import torch

from hpcdnn.optim import FlatOptimizer, Schedule


def schedule(kind, **kw):
    args = dict(factor=0.1, step_epochs=3, patience=1, epochs=10, warmup=0) | kw
    return Schedule(kind, 0.1, **args)


def test_step_and_cosine_and_warmup():
    s = schedule("step")
    assert [round(s.lr(e), 6) for e in (0, 2.9, 3, 6.5)] == [0.1, 0.1, 0.01, 0.001]
    c = schedule("cosine")
    assert c.lr(0) == pytest.approx(0.1) and c.lr(5) == pytest.approx(0.05) and c.lr(10) == pytest.approx(0.0)
    w = schedule("constant", warmup=2)
    assert w.lr(0) == pytest.approx(0.01) and w.lr(1) == pytest.approx(0.055) and w.lr(2) == pytest.approx(0.1)


def test_plateau_divides_after_patience_and_round_trips():
    s = schedule("plateau")
    for acc in (0.5, 0.6, 0.6, 0.6):
        s.end_epoch(acc)
    assert s.lr(4) == pytest.approx(0.01)
    t = schedule("plateau")
    t.load(s.state())
    assert t.lr(0) == s.lr(0) and t.state() == s.state()


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_flat_optimizer_matches_torch(kind):
    torch.manual_seed(0)
    p = torch.randn(257)
    ref = p.clone().requires_grad_(True)
    flat_p, flat_g = p.clone(), torch.zeros(257)
    if kind == "sgd":
        torch_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        torch_opt = torch.optim.Adagrad([ref], lr=0.1, weight_decay=5e-4, eps=1e-10)
    ours = FlatOptimizer(kind, flat_p, flat_g, momentum=0.9, weight_decay=5e-4, eps=1e-10)
    for _ in range(10):
        g = torch.randn(257)
        ref.grad = g.clone()
        torch_opt.step()
        flat_g.copy_(g)
        ours.step(0.1)
    torch.testing.assert_close(flat_p, ref.detach(), rtol=1e-5, atol=1e-6)
