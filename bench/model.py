"""Benchmark forward+backward images/s of our model stack against a plain torch loop, side by side in one run.

    make bench-model
    python bench/model.py [--batch 32] [--steps 8] [--small-batch 128] [--small-steps 30] [--repeats 3] [--optimizer]

Two cases: AlexNet (227x227x3, K=1000) at --batch, and alexnet_small (28x28x1, K=10) at --small-batch.
For each, two replicas are built by `hpcdnn.models.build_model` from the same seed:

  plain  the nn.Module as is; a step is `opt.zero_grad()` (torch's default: grads set to None, so backward allocates
         fresh gradient tensors), forward, cross-entropy, backward. `opt` is torch.optim.SGD(model.parameters()).
  ours   the same module with its parameters in `FlatParams`; a step is `flat.zero_grad()` (one memset of the flat
         gradient; autograd then accumulates into its views), forward, cross-entropy, backward.

With --optimizer both steps also take an SGD step (lr 0.01, momentum 0.9): plain on the module's parameters (foreach),
ours on the flat vector alone (`torch.optim.SGD([flat.data])`). Inputs are fixed random batches (no data loading).
Torch threads = usable cores. After one warm-up step each, the variants run --repeats times, interleaved (the order
alternating per repeat), and the BEST images/s of each is kept; overhead = plain time / our time - 1 (goal <= 5%).
Always exits 0: it reports, it does not gate.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

from hpcdnn.models import FlatParams, build_model, default_crop
from hpcdnn.placement import set_threads, usable_cpus


def make_step(name: str, image_shape: tuple[int, int, int], classes: int, batch: int, flat: bool, optimizer: bool) -> Callable[[], None]:
    """One training step (zero grad, forward, loss, backward[, SGD]) for a fresh replica of `name`, seeded identically."""
    torch.manual_seed(0)
    model = build_model(name, classes, image_shape, crop=default_crop(name, image_shape))
    size = getattr(model, "input_size", image_shape[0])
    x = torch.randn(batch, image_shape[2], size, size)
    y = torch.randint(0, classes, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    if flat:
        fp = FlatParams(model)
        opt = torch.optim.SGD([fp.data], lr=0.01, momentum=0.9)

        def step() -> None:
            fp.zero_grad()
            loss_fn(model(x), y).backward()
            if optimizer:
                opt.step()

    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if optimizer:
                opt.step()

    step()  # warm-up: allocator, oneDNN primitives, Numba LRN kernels
    return step


def images_per_second(step: Callable[[], None], steps: int, batch: int) -> float:
    """Images/s over `steps` consecutive steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def compare(name: str, image_shape: tuple[int, int, int], classes: int, batch: int, steps: int, repeats: int, optimizer: bool) -> None:
    """Build both variants, time them interleaved, print best images/s of each and our overhead."""
    t0 = time.perf_counter()
    variants = {"plain": make_step(name, image_shape, classes, batch, False, optimizer)}
    variants["ours"] = make_step(name, image_shape, classes, batch, True, optimizer)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for key in variants if r % 2 == 0 else reversed(variants):
            samples[key].append(images_per_second(variants[key], steps, batch))
    plain, ours = max(samples["plain"]), max(samples["ours"])
    overhead = plain / ours - 1
    shape = "x".join(map(str, image_shape))
    print(
        f"{name:<14} {shape:>9} {batch:>5} {steps:>5} {plain:>12.1f} {ours:>12.1f} {overhead:>+9.1%}   ({time.perf_counter() - t0:.0f} s)"
    )
    for key, vals in samples.items():
        print(f"{'':<14} {key} samples: " + ", ".join(f"{v:.1f}" for v in vals))


def main(argv: list[str] | None = None) -> int:
    """Parse options, print the machine and both comparisons; always returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="AlexNet batch size")
    ap.add_argument("--steps", type=int, default=8, help="AlexNet steps per timing")
    ap.add_argument("--small-batch", type=int, default=128, help="alexnet_small batch size")
    ap.add_argument("--small-steps", type=int, default=30, help="alexnet_small steps per timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings per variant; the best is kept")
    ap.add_argument("--optimizer", action="store_true", help="include an SGD momentum step in both variants")
    ap.add_argument("--skip-alexnet", action="store_true", help="only the small model")
    args = ap.parse_args(argv)

    threads = usable_cpus()
    set_threads(threads)  # torch's and Numba's: one OpenMP runtime, hpcdnn/placement.py's rule
    print(
        f"{platform.processor() or platform.machine()} | {threads} torch threads | torch {torch.__version__} | python {sys.version.split()[0]}"
    )
    what = "zero_grad + forward + backward" + (" + SGD step" if args.optimizer else "")
    print(f"step = {what}; images/s, best of {args.repeats} interleaved; overhead = plain time / ours - 1 (goal <= 5%)\n")
    print(f"{'model':<14} {'input':>9} {'batch':>5} {'steps':>5} {'plain img/s':>12} {'ours img/s':>12} {'overhead':>9}")
    cases = [("alexnet_small", (28, 28, 1), 10, args.small_batch, args.small_steps)]
    if not args.skip_alexnet:
        cases.insert(0, ("alexnet", (227, 227, 3), 1000, args.batch, args.steps))
    for name, shape, classes, batch, steps in cases:
        try:
            compare(name, shape, classes, batch, steps, args.repeats, args.optimizer)
        except Exception:  # report and go on: a benchmark never fails the build
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
