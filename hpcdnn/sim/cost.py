"""The cost model: seconds per step of each topology for a model on a cluster, every term named (TERMS) and
documented in docs/scaling.md, and the training images per second they add up to.

    cluster = Cluster.of_link("v100", workers=64, servers=8, link_gbit=100)
    costs = predict(model_cost("alexnet", dataset("imagenet")), cluster, cfg)   # one Cost per topology

No term overlaps another: a replica computes, then communicates (the drivers' default, --overlap=false); a
parameter server applies one push at a time. Images per second is training images consumed per second for every
topology (Sandblaster: a batch's line-search evaluations over it count once), so time per epoch compares directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hpcdnn.models import build_model
from hpcdnn.sim.profiles import CALIBRATION, DataSet, device

HEADER_BYTES = 250  # a push's header and control words per shard (hpcdnn/mpi/param_server.py)
WIRE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per gradient element on the wire (--push_dtype)
TOPOLOGIES = ("local", "allreduce", "downpour", "sandblaster")

# name: (unit, what it is, formula) - the one table docs/scaling.md prints (`hpcdnn simulate --terms`)
TERMS = {
    "compute_s": ("s", "forward + backward of one batch B on one replica",
                  "B x 3 x F / (peak x efficiency); on 'cpu': B / measured images/s (CALIBRATION)"),
    "update_s": ("s", "a replica's optimizer pass over its N parameters (local, allreduce)",
                 "u x N / device memory bandwidth; 0 on 'cpu' (inside the measured images/s)"),
    "allreduce_s": ("s", "bucketed ring allreduce of the N-float gradient over W replicas",
                    "2 (W-1)/W x 4N / link + buckets x 2 (W-1) x latency"),
    "push_s": ("s", "a Downpour worker sends its gradient to the P shards",
               "P x latency + (w x N + 250 P) / link"),
    "fetch_s": ("s", "a Downpour worker reads the N parameters from the P shards", "P x latency + 4N / link"),
    "apply_s": ("s", "one server applies one push to its shard of N/P parameters", "u x N/P / server memory bandwidth"),
    "server_s": ("s", "one server's busy time per worker step (the Downpour server bound)",
                 "max(apply_s / n_push, (w N/P / n_push + 4N/P / n_fetch) / link)"),
    "portion_s": ("s", "Sandblaster: one portion of B_g / portions images on one replica", "compute_s x portion / B"),
    "straggler_s": ("s", "Sandblaster: expected lateness of the slowest of W replicas (normal, cv = --straggler_cv)",
                    "portion_s x cv x sqrt(2 ln W)"),
    "coordinator_s": ("s", "Sandblaster: claims on the coordinator's counter, 2 round trips per portion a replica runs",
                      "ceil(portions / W) x 2 x latency"),
    "lbfgs_s": ("s", "Sandblaster: two-loop recursion over the sharded history + its scalar allreduces",
                "(4m + 6) x 4N/W / memory bandwidth + (2m + 4) x 2 log2(W) x latency"),
}  # fmt: skip
UPDATE_BYTES = {"sgd": 20, "sgd_plain": 12, "adagrad": 20}  # u: bytes per parameter an update streams (read p, g, state; write state, p)


@dataclass(frozen=True)
class ModelCost:
    """A model as the cost model sees it: parameters N and forward FLOPs F per image (convolutions and linears)."""

    name: str
    params: int
    fwd_flops: float
    train_images: int


def model_cost(name: str, data: DataSet) -> ModelCost:
    """Count a model's parameters and forward FLOPs on the meta device (nothing is allocated or computed)."""
    with torch.device("meta"):
        model = build_model(name, data.classes, data.image_shape, data.crop)
    flops = 0

    def count(module: nn.Module, inputs, output) -> None:
        """Add one image's multiply-adds x 2 of a convolution or linear layer."""
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
            flops += 2 * output[0].numel() * k  # output[0]: one image's outputs
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model(torch.zeros((1, data.image_shape[2], data.crop, data.crop), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return ModelCost(name, sum(p.numel() for p in model.parameters()), float(flops), data.train_images)


@dataclass(frozen=True)
class Cluster:
    """The hardware: a device per replica, W replicas, P servers, bandwidths (bytes/s) per operation, latency (s)."""

    device: str
    workers: int
    servers: int
    push_bps: float  # a worker's link as a push uses it
    fetch_bps: float  # ... as a fetch uses it
    allreduce_bps: float  # ... as the ring uses it
    latency_s: float  # one message or one-sided operation
    server_mem_bps: float  # a server's memory bandwidth as its update kernel uses it
    threads: int = 2  # torch threads per replica ('cpu': picks the calibration entry)
    straggler_cv: float = 0.0  # Sandblaster: coefficient of variation of a portion's compute time
    images_per_s: float = 0.0  # 'cpu': one replica's measured images/s of the planned model (0 = CALIBRATION's)

    @classmethod
    def of_link(cls, device_name: str, workers: int, servers: int, link_gbit: float, latency_us: float = 5.0,
                server_mem_gbs: float = 0.0, straggler_cv: float = 0.0) -> Cluster:  # fmt: skip
        """Every worker and server on one link speed; server_mem_gbs 0 = the device's memory bandwidth."""
        bps = link_gbit * 1e9 / 8
        mem = (server_mem_gbs or device(device_name).mem_gbs) * 1e9
        return cls(device_name, workers, servers, bps, bps, bps, latency_us * 1e-6, mem, straggler_cv=straggler_cv)

    @classmethod
    def here(cls, workers: int, servers: int, threads: int, images_per_s: float = 0.0) -> Cluster:
        """This machine as measured (CALIBRATION): RMA Put/Get for push/fetch, MPI Allreduce, the Adagrad kernel;
        images_per_s > 0: a replica's compute as just measured (bench/sim_validate.py) instead of CALIBRATION's."""
        c = CALIBRATION
        return cls("cpu", workers, servers, c["rma_put_gbs"] * 1e9, c["rma_get_gbs"] * 1e9, c["allreduce_gbs"] * 1e9,
                   c["latency_us"] * 1e-6, c["apply_gbs"] * 1e9, threads, images_per_s=images_per_s)  # fmt: skip


@dataclass
class Cost:
    """One topology's prediction: images/s, the terms of its step (seconds) and the term that bounds it."""

    topology: str
    images_per_s: float
    terms: dict = field(default_factory=dict)
    bound: str = ""

    def epoch_s(self, model: ModelCost) -> float:
        """Seconds for one pass over the training images."""
        return model.train_images / self.images_per_s


def compute_s(model: ModelCost, cluster: Cluster, batch: int) -> float:
    """Forward + backward of `batch` images on one replica (the measured images/s on 'cpu', else FLOPs / sustained)."""
    if cluster.device == "cpu" and cluster.images_per_s:
        return batch / cluster.images_per_s
    if cluster.device == "cpu":
        key = (model.name, cluster.threads)
        if key not in CALIBRATION["images_per_s"]:
            known = ", ".join(f"{m} on {t} thread(s)" for m, t in CALIBRATION["images_per_s"])
            raise ValueError(f"no measured images/s for {model.name} on {cluster.threads} thread(s) of this machine; measured: {known}")
        return batch / CALIBRATION["images_per_s"][key]
    return batch * 3 * model.fwd_flops / device(cluster.device).sustained_flops


def update_bytes(cfg) -> int:
    """u: bytes per parameter an optimizer step streams through memory."""
    return UPDATE_BYTES["adagrad"] if cfg.optimizer == "adagrad" else UPDATE_BYTES["sgd" if cfg.momentum else "sgd_plain"]


def update_s(model: ModelCost, cluster: Cluster, cfg) -> float:
    """A replica's optimizer pass through device memory (0 on 'cpu': the measured images/s include it)."""
    if cluster.device == "cpu":
        return 0.0
    return update_bytes(cfg) * model.params / (device(cluster.device).mem_gbs * 1e9)


def allreduce_s(model: ModelCost, cluster: Cluster, cfg) -> float:
    """Ring allreduce bound of the gradient (4N bytes) plus each bucket's 2 (W-1) latencies."""
    W = cluster.workers
    if W == 1:
        return 0.0
    buckets = math.ceil(4 * model.params / (cfg.bucket_mb * 2**20))
    return 2 * (W - 1) / W * 4 * model.params / cluster.allreduce_bps + buckets * 2 * (W - 1) * cluster.latency_s


def predict(model: ModelCost, cluster: Cluster, cfg) -> dict[str, Cost]:
    """Every topology's Cost for `model` on `cluster` with cfg's batch size and knobs (n_fetch, n_push, push_dtype, ...)."""
    return {t: TOPOLOGY_COST[t](model, cluster, cfg) for t in TOPOLOGIES}


def local_cost(model: ModelCost, cluster: Cluster, cfg) -> Cost:
    """One replica: compute, then its optimizer."""
    B = cfg.batch_size
    terms = {"compute_s": compute_s(model, cluster, B), "update_s": update_s(model, cluster, cfg)}
    return Cost("local", B / sum(terms.values()), terms, "compute_s")


def allreduce_cost(model: ModelCost, cluster: Cluster, cfg) -> Cost:
    """W replicas in lock step: compute, the gradient's ring allreduce, the optimizer (no overlap)."""
    B, W = cfg.batch_size, cluster.workers
    terms = {"compute_s": compute_s(model, cluster, B), "allreduce_s": allreduce_s(model, cluster, cfg),
             "update_s": update_s(model, cluster, cfg)}  # fmt: skip
    return Cost("allreduce", W * B / sum(terms.values()), terms, max(terms, key=terms.get))


def push_s(model: ModelCost, cluster: Cluster, cfg) -> float:
    """A Downpour worker's push: one latency per shard, w bytes per parameter and a header per shard on its link."""
    P = cluster.servers
    return P * cluster.latency_s + (WIRE_BYTES[cfg.push_dtype] * model.params + HEADER_BYTES * P) / cluster.push_bps


def fetch_s(model: ModelCost, cluster: Cluster) -> float:
    """A Downpour worker's fetch of the N float32 parameters from the P shards."""
    return cluster.servers * cluster.latency_s + 4 * model.params / cluster.fetch_bps


def apply_s(model: ModelCost, cluster: Cluster, cfg) -> float:
    """One server's update of its N/P parameters for one push, through its memory."""
    return update_bytes(cfg) * model.params / cluster.servers / cluster.server_mem_bps


def downpour_terms(model: ModelCost, cluster: Cluster, cfg) -> dict:
    """Downpour's terms: compute, push, fetch, apply and the server's busy time per worker step."""
    N, P, w = model.params, cluster.servers, WIRE_BYTES[cfg.push_dtype]
    push, fetch, apply = push_s(model, cluster, cfg), fetch_s(model, cluster), apply_s(model, cluster, cfg)
    link = (w * N / P / cfg.n_push + 4 * N / P / cfg.n_fetch) / cluster.push_bps
    return {"compute_s": compute_s(model, cluster, cfg.batch_size), "push_s": push, "fetch_s": fetch, "apply_s": apply,
            "server_s": max(apply / cfg.n_push, link)}  # fmt: skip


def downpour_cost(model: ModelCost, cluster: Cluster, cfg) -> Cost:
    """W workers each step compute + push/n_push + fetch/n_fetch (a fetch waits for its own push's apply); the
    servers bound the rate at one worker step per server_s."""
    t = downpour_terms(model, cluster, cfg)
    worker_step = t["compute_s"] + t["push_s"] / cfg.n_push + (t["fetch_s"] + t["apply_s"]) / cfg.n_fetch
    steps_per_s = min(cluster.workers / worker_step, 1 / t["server_s"])
    bound = "server_s" if 1 / t["server_s"] < cluster.workers / worker_step else max(
        ("compute_s", "push_s", "fetch_s"), key=t.get)  # fmt: skip
    return Cost("downpour", steps_per_s * cfg.batch_size, t, bound)


def sandblaster_evals(cfg) -> float:
    """Objective evaluations per L-BFGS iteration, at least: the line search's one, plus each batch's first
    evaluation shared by its sb_batch_iters iterations (the emulator counts the real number: hpcdnn/sim/sandblaster.py)."""
    return 1.0 + 1.0 / cfg.sb_batch_iters


def sandblaster_cost(model: ModelCost, cluster: Cluster, cfg, evals: float | None = None) -> Cost:
    """One L-BFGS iteration on the global batch B_g = batch_size: `evals` objective evaluations (each: the portions
    over W replicas, a straggler's tail, the gradient's reduction; None: sandblaster_evals, the least there can be)
    and the two-loop recursion; sb_batch_iters iterations per batch, so a batch's images count once per sb_batch_iters
    iterations."""
    evals = sandblaster_evals(cfg) if evals is None else evals
    W, Bg, m = cluster.workers, cfg.batch_size, cfg.sb_history
    portions = min(cfg.sb_portions or max(4 * W, -(-Bg // 256)), Bg)  # at most one image per portion
    mem = device(cluster.device).mem_gbs * 1e9
    t = {"portion_s": compute_s(model, cluster, Bg) / portions, "allreduce_s": allreduce_s(model, cluster, cfg),
         "coordinator_s": math.ceil(portions / W) * 2 * cluster.latency_s,
         "lbfgs_s": (4 * m + 6) * 4 * model.params / W / mem + (2 * m + 4) * 2 * math.log2(max(W, 2)) * cluster.latency_s}  # fmt: skip
    t["straggler_s"] = t["portion_s"] * cluster.straggler_cv * math.sqrt(2 * math.log(W)) if W > 1 else 0.0
    evaluation = math.ceil(portions / W) * t["portion_s"] + t["straggler_s"] + t["coordinator_s"] + t["allreduce_s"]
    iteration = evals * evaluation + t["lbfgs_s"]
    t["compute_s"] = math.ceil(portions / W) * t["portion_s"]
    bound = max(("compute_s", "straggler_s", "allreduce_s", "lbfgs_s", "coordinator_s"), key=t.get)
    return Cost("sandblaster", Bg / (iteration * cfg.sb_batch_iters), t, bound)


TOPOLOGY_COST = {"local": local_cost, "allreduce": allreduce_cost, "downpour": downpour_cost, "sandblaster": sandblaster_cost}
