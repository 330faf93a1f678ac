"""Model-parallel replicas against the 1-rank model, for tests/mpi/test_model_parallel.py; rank 0 saves the results.

    mpirun -n 2 python -m mpi4py tests/mpi/model_parallel_case.py towers OUT.npz
    mpirun -n 4 python -m mpi4py tests/mpi/model_parallel_case.py partition OUT.npz

towers: AlexNetTowers on 2 ranks and the AlexNet they were cut from, dropout off: step-0 logits and gradients, then
STEPS of plain SGD; also one step with every gather's halves swapped (the negative check). AlexNet's 57M parameters
are too many to ship, so rank 0 saves per parameter and tower the largest difference from the whole model's rows and
the whole parameter's largest value; logits are saved whole.
partition: partition_model over all 4 ranks (K=4) and over pairs (K=2, both pairs), AlexNetSmall with dropout on
(same seed on every rank and in the reference) and off, a net of grouped convs, a swapped-gather run; whole arrays.
On the first 3 ranks (K=3): the exchange primitives against torch.cat / sums, uneven pieces, with STATS' counts.
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcdnn.models import AlexNet, AlexNetSmall
from hpcdnn.mpi import partition, towers
from hpcdnn.mpi.exchange import STATS, all_gather, reduce_grad
from hpcdnn.mpi.partition import ColumnParallel, partition_model
from hpcdnn.mpi.towers import AlexNetTowers

STEPS, LR, CLASSES = 10, 0.01, 10
ALEXNET_LR = 1e-4  # AlexNet's paper init on 2 images: 1e-3 already makes the loss jump up
ALEXNET_BATCH, SMALL_BATCH = 2, 8
PIECES = (3, 1, 2)  # uneven extents along the gathered dim on the K=3 ranks


def error(got, ref) -> tuple[float, float]:
    """(max |got - ref|, max |ref|): the tests compare the first against a tolerance times the second.

    In the arrays' own precision (float32 for the models): one rounding of the difference, far below the tolerances."""
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def batches(n: int, shape: tuple[int, ...], classes: int = CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Three fixed batches of n images and labels, the same in every process."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, n, *shape, generator=g), torch.randint(0, classes, (3, n), generator=g)


def train(
    model: nn.Module, xs, ys, seeded: bool, steps: int = STEPS, lr: float = LR
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`steps` of plain SGD on the batches in turn: (step-0 logits, step-0 gradients, final parameters).

    seeded: torch's seed is reset before every forward, so dropout draws the same masks in every process."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        if seeded:
            torch.manual_seed(1000 + step)
        opt.zero_grad()
        logits = model(xs[step % len(xs)])
        F.cross_entropy(logits, ys[step % len(ys)]).backward()
        if step == 0:
            first = logits.detach().numpy().copy(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
    return *first, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def assemble(local: dict[str, np.ndarray], rows: dict[str, np.ndarray], comm, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The whole parameters on comm's rank 0 (None elsewhere) from every rank's rows; names without rows are replicated."""
    whole = {}
    for name, part in local.items():
        pieces = comm.gather((rows.get(name), part))
        if comm.Get_rank() == 0:
            if rows.get(name) is None:
                whole[name] = part
                continue
            whole[name] = np.zeros(shapes[name], part.dtype)
            for r, p in pieces:
                whole[name][r] = p
    return whole if comm.Get_rank() == 0 else None


def swapped_gathers(module):
    """Patch module.all_gather so the gathered pieces come back in reverse rank order (a wrong exchange); returns undo."""
    real = module.all_gather

    def wrong(x, comm, dim=1, backward="reduce_scatter", sizes=None):
        y = real(x, comm, dim, backward, sizes)
        dim %= y.dim()
        starts = np.cumsum([0, *sizes])
        return torch.cat([y.narrow(dim, int(starts[r]), s) for r, s in reversed(list(enumerate(sizes)))], dim)

    module.all_gather = wrong
    return lambda: setattr(module, "all_gather", real)


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def send_to_root(arrays: dict[str, np.ndarray], extra, comm) -> None:
    """Ranks > 0: send `extra` and every array to rank 0, waiting asleep (rank 0 trains the reference meanwhile)."""
    from mpi4py import MPI

    requests = [comm.isend((extra, {k: (a.shape, a.dtype.str) for k, a in arrays.items()}), 0, tag=0)]
    requests += [comm.Isend(np.ascontiguousarray(a), 0, tag=1 + i) for i, a in enumerate(arrays.values())]
    while not MPI.Request.Testall(requests):
        time.sleep(0.01)


def receive(source: int, comm) -> tuple[dict[str, np.ndarray], object]:
    """Rank 0: what send_to_root sent from `source`."""
    extra, meta = comm.recv(source=source, tag=0)
    arrays = {k: np.empty(shape, dtype) for k, (shape, dtype) in meta.items()}
    for i, a in enumerate(arrays.values()):
        comm.Recv(a, source, tag=1 + i)
    return arrays, extra


def towers_case(comm) -> dict[str, np.ndarray]:
    """Rank 1 ships its tower's results to rank 0, which trains the whole model and compares both towers' rows with it."""
    rank = comm.Get_rank()
    torch.manual_seed(0)
    full = no_dropout(AlexNet(CLASSES))
    model = AlexNetTowers(full, comm)
    xs, ys = batches(ALEXNET_BATCH, (3, 227, 227))
    undo = swapped_gathers(towers)
    bad_logits, bad_grads, _ = train(AlexNetTowers(full, comm), xs[:1], ys[:1], seeded=False, steps=1)
    undo()
    STATS.reset()
    logits, grads, params = train(model, xs[:2], ys[:2], seeded=False, lr=ALEXNET_LR)
    mine = {"logits": logits, "swapped/logits": bad_logits, "share": np.array(model.logits.sizes[rank])}
    mine |= {"forward_bytes": np.array(STATS.forward_bytes), "backward_bytes": np.array(STATS.backward_bytes)}  # over STEPS
    results = {f"grad/{n}": g for n, g in grads.items()} | {f"swapped/grad/{n}": g for n, g in bad_grads.items()}
    results |= {f"param/{n}": p for n, p in params.items()} | {f"summary/{k}": v for k, v in mine.items()}
    if rank != 0:
        send_to_root(results, model.rows, comm)
        return {}
    rows = model.rows
    del model, grads, bad_grads, params
    before = {n: p.detach().numpy().copy() for n, p in full.named_parameters()}
    ref_logits, ref_grads, ref_params = train(full, xs[:2], ys[:2], seeded=False, lr=ALEXNET_LR)
    ref = {"grad": ref_grads, "swapped/grad": ref_grads, "param": ref_params}
    out = {"reference/logits": ref_logits}
    for r, (got, owned) in enumerate([(results, rows), receive(1, comm)]):
        out |= {f"towers/rank{r}/{k[8:]}": v for k, v in got.items() if k.startswith("summary/")}
        for key, n in (k.rsplit("/", 1) for k in got if not k.startswith("summary/")):
            lo, hi = owned[n]
            out[f"towers/rank{r}/{key}/{n}"] = np.array(error(got[f"{key}/{n}"], ref[key][n][lo:hi])[0])
    for n, p in ref_params.items():  # how far SGD moved each parameter: the check is not vacuous
        out[f"moved/{n}"] = np.array(error(p, before[n]))
        out[f"scale/grad/{n}"] = np.array(np.abs(ref_grads[n]).max())
        out[f"scale/param/{n}"] = np.array(np.abs(p).max())
    return out


class Grouped(nn.Module):
    """Grouped convs every way partition_model splits them for K = 2 and 4, and an FC layer of 5 units (uneven)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, groups=3)  # K=2, 4: each group's 4 maps split
        self.b = nn.Conv2d(12, 8, 3, groups=2)  # K=2: whole groups; K=4: each group's 4 maps split
        self.c = nn.Conv2d(8, 8, 1, groups=4)  # whole groups
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))).flatten(1))


def compare_run(name: str, build, comm, world, xs, ys, seeded: bool) -> dict[str, np.ndarray]:
    """Train build() partitioned over comm and whole; saves '{name}/...' (+ '/pair1' copies from a second comm group).

    Every rank trains the whole model first, though only rank 0 keeps it: a rank that waited in a collective
    meanwhile would spin (MPI polls), taking the core the reference needs."""
    torch.manual_seed(0)
    whole = build()
    shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
    model = partition_model(copy.deepcopy(whole), comm)
    ref_logits, ref_grads, ref_params = train(whole, xs, ys, seeded)
    rows = {
        f"{m}.{p}".lstrip("."): mod.rows.numpy()
        for m, mod in model.named_modules()
        if isinstance(mod, ColumnParallel)
        for p in ("weight", "bias")
    }
    logits, grads, params = train(model, xs, ys, seeded)
    grads, params = assemble(grads, rows, comm, shapes), assemble(params, rows, comm, shapes)
    mine = None
    if comm.Get_rank() == 0:
        mine = {"logits": logits} | {f"grad/{n}": g for n, g in grads.items()} | {f"param/{n}": p for n, p in params.items()}
    everyone = world.gather(mine)
    if world.Get_rank() != 0:
        return {}
    out = {f"{name}/reference/logits": ref_logits}
    out |= {f"{name}/reference/grad/{n}": g for n, g in ref_grads.items()} | {
        f"{name}/reference/param/{n}": p for n, p in ref_params.items()
    }
    roots = [d for d in everyone if d is not None]
    out |= {f"{name}/{k}": v for k, v in roots[0].items()}
    out |= {f"{name}/pair1/{k}": v for d in roots[1:] for k, v in d.items()}
    return out


def exchange_case(comm) -> dict[str, np.ndarray]:
    """all_gather (both backwards, dims 1 and 2, sizes given or exchanged) and reduce_grad against plain torch on K=3."""
    k, rank = comm.Get_size(), comm.Get_rank()
    g = torch.Generator().manual_seed(5)
    out = {}
    for dim, dtype in ((1, torch.float64), (2, torch.float32)):
        shapes = [(2, 4, 4)[:dim] + (c,) + (2, 4, 4)[dim + 1 :] for c in PIECES]
        pieces = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        whole = torch.cat(pieces, dim)
        weights = [torch.randn(whole.shape, generator=g, dtype=dtype) for _ in range(k)]  # rank r's downstream weights
        lo = sum(PIECES[:rank])
        for backward, w, want in (("reduce_scatter", weights[rank], sum(weights)), ("slice", weights[0], weights[0])):
            for sizes in (PIECES, None):
                x = pieces[rank].clone().requires_grad_()
                STATS.reset()
                y = all_gather(x, comm, dim, backward, sizes)
                (y * w).sum().backward()
                key = f"dim{dim}/{backward}/{'sizes' if sizes else 'exchanged'}"
                out[f"{key}/forward"] = np.array(error(y.detach(), whole))
                out[f"{key}/backward"] = np.array(error(x.grad, want.narrow(dim, lo, PIECES[rank])))
                out[f"{key}/bytes"] = np.array([STATS.forward_bytes, STATS.backward_bytes, x.numel() * x.element_size()])
        x = whole.clone().requires_grad_()
        STATS.reset()
        y = reduce_grad(x, comm)
        (y * weights[rank]).sum().backward()
        out[f"dim{dim}/reduce_grad/forward"] = np.array(error(y.detach(), whole))
        out[f"dim{dim}/reduce_grad/backward"] = np.array(error(x.grad, sum(weights)))
        out[f"dim{dim}/reduce_grad/bytes"] = np.array([STATS.forward_bytes, STATS.backward_bytes, x.numel() * x.element_size()])
    return {f"exchange/rank{rank}/{key}": v for key, v in out.items()}


def partition_case(world) -> dict[str, np.ndarray]:
    from mpi4py import MPI

    rank = world.Get_rank()
    pair = world.Split(rank // 2, rank)
    trio = world.Split(0 if rank < 3 else MPI.UNDEFINED, rank)
    xs, ys = batches(SMALL_BATCH, (1, 28, 28))
    gx, gy = batches(4, (3, 8, 8), classes=5)
    out = {}
    for k, comm in ((4, world), (2, pair)):
        for p in (0.0, 0.5):
            out |= compare_run(f"k{k}/dropout{p}", lambda p=p: AlexNetSmall(CLASSES, 1, 28, dropout=p), comm, world, xs, ys, seeded=True)
        out |= compare_run(f"k{k}/grouped", Grouped, comm, world, gx, gy, seeded=False)
    undo = swapped_gathers(partition)
    out |= compare_run("k4/swapped", lambda: AlexNetSmall(CLASSES, 1, 28, dropout=0.0), world, world, xs, ys, seeded=True)
    undo()
    self_model = AlexNetSmall(CLASSES, 1, 28)  # a 1-rank communicator leaves the model as it is
    out["self_unchanged"] = np.array(partition_model(self_model, MPI.COMM_SELF) is self_model)
    found = world.gather(exchange_case(trio) if trio != MPI.COMM_NULL else {})
    for d in found or []:
        out |= d
    return out


def main(mode: str, path: str) -> None:
    from mpi4py import MPI

    from hpcdnn.placement import set_threads

    set_threads(1)  # ranks x threads <= cores: torch and Numba share one OpenMP runtime
    world = MPI.COMM_WORLD
    out = towers_case(world) if mode == "towers" else partition_case(world)
    if world.Get_rank() == 0:
        np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
