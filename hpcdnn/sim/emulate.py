"""The emulator: W replicas trained for real in this one process on a simulated clock (no MPI).

    hpcdnn simulate --config fashion_small --topology=allreduce --workers=8 --device=v100 --link-gbit=10
    hpcdnn simulate --config fashion_downpour --workers=16 --servers=2 --device=v100 --link-gbit=10

Every gradient is computed with the real model, kernels, optimizers and loader (train.setup builds them as
`hpcdnn train` does); only time is simulated, from the cost model's terms (cost.py) for the named device and link.
Replica r reads the batches rank r of W would read (ShardLoader rank=r, world=W) and draws dropout from the torch
RNG stream rank r would have (seeded as topologies/sgd.py seeds it), so:
  local / allreduce   one parameter vector: the W replicas' gradients are summed, divided by W, and the replica's
                      FlatOptimizer steps (one replica is `hpcdnn train --topology=local`, step for step);
  downpour            events.py: each replica has its own parameter copy, fetched at its simulated time; pushes are
                      applied by the server's update kernel in simulated-time order, so staleness arises as it would;
  sandblaster         sandblaster.py: the real ShardedLBFGS and Objective on one process, each batch's portions
                      scheduled over the W replicas (claims, stragglers, backup tasks) on the simulated clock.
The run directory is like train's: config.toml, metrics.jsonl (`time` is simulated seconds), summary.json (with the
staleness histogram and the cost terms used), checkpoint.h5 (the final parameters: `hpcdnn eval` reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from hpcdnn import checkpoint as ck
from hpcdnn.atomic import write_bytes
from hpcdnn.data.loader import ShardLoader
from hpcdnn.evaluate import evaluate
from hpcdnn.metrics import MetricsLog
from hpcdnn.optim import FlatOptimizer
from hpcdnn.sim.cost import TOPOLOGY_COST, Cluster, ModelCost, model_cost
from hpcdnn.sim.profiles import DataSet

EMULATED = ("local", "allreduce", "downpour", "sandblaster")
# Downpour knobs the event loop does not model yet, with their off value (the real driver, hpcdnn/mpi/downpour.py, has them)
NOT_EMULATED = {"max_delay": 0, "overlap": False, "mp": 1}


@dataclass(frozen=True)
class SimOptions:
    """The simulated cluster and clock (the config holds the training recipe)."""

    workers: int = 1  # simulated replicas W
    servers: int = 1  # simulated parameter servers P (downpour)
    device: str = "cpu"  # profiles.DEVICES name; cpu = this machine as measured (CALIBRATION)
    link_gbit: float = 10.0  # link speed of every worker and server (not used with --device=cpu: measured RMA/allreduce)
    latency_us: float = 5.0  # one message or one-sided operation
    server_mem_gbs: float = 0.0  # a server's memory bandwidth for its update kernel; 0 = the device's
    compute_cv: float = 0.0  # coefficient of variation of a replica's compute time per step (lognormal; 0 = fixed)
    clock_seed: int = 0  # seeds the compute-time draws (not the training: cfg.seed does that)
    straggler_cv: float = 0.0  # Sandblaster: coefficient of variation of a portion's compute time (lognormal; 0 = fixed)
    target_top1: float = 0.0  # stop at the first evaluation reaching this validation top-1 (0 = train to the end)
    eval_images: int = 0  # evaluate every this many training images, over all replicas (0 = a tenth of an epoch with a target)

    def cluster(self, threads: int) -> Cluster:
        """The cost model's cluster: this machine as measured for cpu, else the device on the given link."""
        if self.device == "cpu":
            return replace(Cluster.here(self.workers, self.servers, threads), straggler_cv=self.straggler_cv)
        return Cluster.of_link(self.device, self.workers, self.servers, self.link_gbit, self.latency_us, self.server_mem_gbs,
                               self.straggler_cv)  # fmt: skip


@dataclass
class Replica:
    """One simulated replica: its loader (rank `index` of W), its dropout RNG state, where it is in the data."""

    index: int
    loader: ShardLoader
    rng: torch.Tensor
    epoch: int = 0
    batch: int = 0
    steps: int = 0
    losses: list = field(default_factory=list)


class Emulator:
    """What every emulated topology shares: the real model and loaders, gradients on given parameters, the clock's
    draws, evaluation and the run directory."""

    def __init__(self, cfg, sim: SimOptions, overwrite: bool = False) -> None:
        from hpcdnn.topologies.sgd import Local
        from hpcdnn.train import setup

        if cfg.topology not in EMULATED:
            raise ValueError(f"--topology={cfg.topology}: the emulator runs {', '.join(EMULATED)}")
        if sim.workers < 1 or sim.servers < 1:
            raise ValueError(f"--workers={sim.workers} --servers={sim.servers}: both must be >= 1")
        unsupported = [f"--{k}={getattr(cfg, k)}" for k, off in NOT_EMULATED.items() if getattr(cfg, k) != off]
        if cfg.topology == "downpour" and unsupported:
            raise ValueError(f"{' '.join(unsupported)}: not emulated yet (the real driver has them); drop them or run `hpcdnn train`")
        if cfg.topology == "sandblaster" and cfg.mp != 1:
            raise ValueError(f"--mp={cfg.mp}: Sandblaster's model-parallel replicas are not emulated yet; drop --mp or run `hpcdnn train`")
        if sim.compute_cv if cfg.topology == "sandblaster" else sim.straggler_cv:  # the knob of the other kind of run
            which = "--straggler-cv (a portion's time)" if cfg.topology == "sandblaster" else "--compute-cv (a step's time)"
            raise ValueError(f"--compute-cv={sim.compute_cv} --straggler-cv={sim.straggler_cv}: --topology={cfg.topology} draws "
                             f"its times with {which} only; drop the other")  # fmt: skip
        if cfg.topology == "local" and sim.workers != 1:
            raise ValueError(f"--topology=local is one replica, not --workers={sim.workers}: use --topology=allreduce or downpour")
        self.cfg, self.sim = cfg, sim
        self.run, self.val_split = setup(cfg, False, None, Local, overwrite)  # the model, flat vector, schedule as train builds them
        run = self.run
        self.replicas = self.make_replicas() if cfg.topology != "sandblaster" else []  # sandblaster.py reads portions itself
        self.steps_per_epoch = len(self.replicas[0].loader) if self.replicas else 0
        total = self.steps_per_epoch * cfg.epochs
        self.total = min(total, cfg.max_steps) if cfg.max_steps else total  # steps per replica, as train counts them
        m = run.manifest
        data = DataSet(tuple(m["image_shape"]), len(m["classes"]), int(m["splits"]["train"]["count"]), run.crop)
        self.model_cost: ModelCost = model_cost(run.model_name, data)
        self.cluster = sim.cluster(run.threads)
        self.cost = TOPOLOGY_COST[cfg.topology](self.model_cost, self.cluster, cfg)
        self.draws = np.random.default_rng(sim.clock_seed)
        self.val = ShardLoader(cfg.data, self.val_split, 256, train=False, **run.loader_args())
        write_bytes(run.run_dir / "config.toml", cfg.to_toml().encode())
        self.log = MetricsLog(run.run_dir)
        self.last_val: dict = {}
        self.eval_every = sim.eval_images or (max(cfg.batch_size, data.train_images // 10) if sim.target_top1 else 0)
        self.next_eval, self.reached = self.eval_every, None

    def make_replicas(self) -> list[Replica]:
        """Replica r's loader (rank r of W) and dropout stream (rank 0 keeps the one after the model's initialisation)."""
        cfg, run = self.cfg, self.run
        first, replicas = torch.get_rng_state(), []  # as topologies/sgd.py seeds the ranks
        for r in range(self.sim.workers):
            if r:
                torch.manual_seed(cfg.seed + r)
            loader = ShardLoader(cfg.data, "train", cfg.batch_size, rank=r, world=self.sim.workers, seed=cfg.seed, train=True,
                                 flip=cfg.flip, pca_std=cfg.pca_std, prefetch=1, **run.loader_args())  # fmt: skip
            replicas.append(Replica(r, loader, first if r == 0 else torch.get_rng_state()))
        return replicas

    # ---- the real work
    def gradient(self, rep: Replica, params: np.ndarray | None = None) -> float:
        """Forward and backward of replica `rep`'s next batch on `params` (None: the model's current parameters);
        the gradient is left in run.flat.grad. Returns the loss; advances the replica's position."""
        run, flat = self.run, self.run.flat
        if params is not None:
            flat.load_flat(params)
        loader = rep.loader
        idx = loader.batch_indices(rep.epoch, rep.batch)
        x, y = loader.read_samples(idx, *loader.batch_draws(rep.epoch, rep.batch, len(idx)))
        torch.set_rng_state(rep.rng)
        run.model.train()
        flat.zero_grad()
        loss = F.cross_entropy(run.model(x), y)
        loss.backward()
        rep.rng = torch.get_rng_state()
        rep.steps, rep.batch = rep.steps + 1, rep.batch + 1
        if rep.batch == self.steps_per_epoch:
            rep.epoch, rep.batch = rep.epoch + 1, 0
        rep.losses.append(loss.item())
        if not math.isfinite(rep.losses[-1]):  # as train ends a diverged run
            raise ValueError(f"training diverged: the loss is {rep.losses[-1]} at replica {rep.index}'s step {rep.steps}; lower --lr "
                             f"(now {self.cfg.lr:g}), add --warmup_epochs or, for downpour, --warmstart_steps")  # fmt: skip
        return rep.losses[-1]

    def lr(self, rep: Replica) -> float:
        """The rate at the replica's position, as sgd.py asks the schedule before its step."""
        return self.run.sched.lr(rep.epoch + rep.batch / self.steps_per_epoch)

    def lognormal(self, cv: float) -> float:
        """A time factor of mean 1 and coefficient of variation cv, drawn from the clock's stream (1 if cv is 0)."""
        if not cv:
            return 1.0
        sigma = math.sqrt(math.log1p(cv * cv))
        return float(self.draws.lognormal(-sigma * sigma / 2, sigma))

    def compute_time(self) -> float:
        """One replica's simulated compute time for one batch: compute_s times a draw of --compute-cv."""
        return self.cost.terms["compute_s"] * self.lognormal(self.sim.compute_cv)

    def straggler_draw(self) -> float:
        """A Sandblaster portion's time factor: a draw of --straggler-cv."""
        return self.lognormal(self.sim.straggler_cv)

    def end_epoch(self, params: np.ndarray, step: int, epoch: int, time_s: float) -> None:
        """Evaluate `params` (the root's refresh), adapt the schedule, log the validation line."""
        self.run.flat.load_flat(params)
        self.last_val = evaluate(self.run.model, self.val)
        self.run.sched.end_epoch(self.last_val["top1"])
        v = self.last_val
        self.log.log(step=step, epoch=epoch, time=round(time_s, 9), val_top1=v["top1"], val_top5=v["top5"], val_loss=v["loss"])

    def watch(self, params: np.ndarray | None, images: int, time_s: float, step: int, epoch: float) -> bool:
        """Every eval_every training images (counted over all replicas) evaluate `params` (None: the model holds them)
        and log the validation line at simulated time; True once --target-top1 is reached: the caller stops there."""
        if not self.eval_every or images < self.next_eval:
            return False
        self.next_eval = (images // self.eval_every + 1) * self.eval_every
        if params is not None:
            self.run.flat.load_flat(params)
        v = evaluate(self.run.model, self.val)
        self.log.log(step=step, epoch=round(epoch, 4), time=round(time_s, 9), images=images, val_top1=v["top1"], val_top5=v["top5"],
                     val_loss=v["loss"])  # fmt: skip
        return self.reach(v["top1"], time_s, images, step)

    def reach(self, top1: float, time_s: float, images: int, step: int) -> bool:
        """Record the first evaluation whose top-1 reaches --target-top1; True if this one did."""
        if self.reached is not None or not self.sim.target_top1 or top1 < self.sim.target_top1:
            return False
        self.reached = {"time_to_target_s": round(time_s, 9), "images_to_target": images, "step_at_target": step, "top1_at_target": top1}
        return True

    def target_fields(self) -> dict:
        """summary.json's time to target: the simulated seconds and training images at the first evaluation reaching it."""
        if not self.sim.target_top1:
            return {}
        return {"target_top1": self.sim.target_top1, "eval_images": self.eval_every,
                **(self.reached or {"time_to_target_s": None, "images_to_target": None})}  # fmt: skip

    def finish(self, params: np.ndarray, optim: dict, step: int, time_s: float, images: int, extra: dict,
               position: tuple[int, int] | None = None) -> dict:  # fmt: skip
        """Final evaluation, checkpoint.h5 and summary.json (simulated time), as train's final_summary writes them."""
        cfg, run = self.cfg, self.run
        run.flat.load_flat(params)
        final = evaluate(run.model, self.val)
        self.reach(final["top1"], time_s, images, step)  # reached only at the budget's end, after the last periodic check
        epoch, batch = position if position is not None else (self.replicas[0].epoch, self.replicas[0].batch)
        state = {"schedule": run.sched.state(), "elapsed": time_s, "model": run.model_name, "simulated": True}
        ck.save(run.run_dir / ck.LATEST, ck.Checkpoint(params, optim, step, epoch, batch, cfg.to_toml(), state,
                                                       ck.capture_rng(), ck.manifest_sha256(cfg.data)))  # fmt: skip
        summary = {
            "topology": cfg.topology, "simulated": True, "model": run.model_name, "parameters": run.flat.param_count,
            "device": self.sim.device, "workers": self.sim.workers, "epochs": round(step / self.steps_per_epoch, 3) if self.replicas else epoch,
            "steps": step, "images_per_s": round(images / max(time_s, 1e-12), 1), "train_time_s": round(time_s, 9),
            "predicted_images_per_s": round(self.cost.images_per_s, 1), "cost_terms_s": self.cost.terms,
            "cluster": vars(self.cluster), "val_split": self.val_split, "val_top1": final["top1"], "val_top5": final["top5"],
            "val_loss": final["loss"], **self.target_fields(), **extra,
        }  # fmt: skip
        self.log.write_summary(summary)
        return summary

    def close(self) -> None:
        """Close the metrics log and every loader (their files and threads)."""
        self.log.close()
        self.val.close()
        for rep in self.replicas:
            rep.loader.close()


def run_sync(em: Emulator) -> dict:
    """local / allreduce: each step every replica's gradient on the same parameters, summed in replica order and
    divided by W (GradAllreduce's mean), then the replica's optimizer; the clock advances by the slowest replica's
    compute plus allreduce_s and update_s."""
    cfg, flat = em.cfg, em.run.flat
    opt = FlatOptimizer(cfg.optimizer, flat.data, flat.grad, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eps=cfg.adagrad_eps)
    W, terms = len(em.replicas), em.cost.terms
    total_grad = torch.zeros_like(flat.grad)
    clock, window_t, window_images, window_loss, step = 0.0, 0.0, 0, [], 0
    while step < em.total:
        lr = em.lr(em.replicas[0])
        epoch0 = em.replicas[0].epoch
        for rep in em.replicas:
            em.gradient(rep)
            total_grad.copy_(flat.grad) if rep.index == 0 else total_grad.add_(flat.grad)
        flat.grad.copy_(total_grad.div_(W) if W > 1 else total_grad)
        opt.step(lr)
        step += 1
        clock += max(em.compute_time() for _ in range(W)) + terms.get("allreduce_s", 0.0) + terms["update_s"]
        window_images += W * cfg.batch_size
        rep0 = em.replicas[0]
        window_loss.append(rep0.losses[-1])  # replica 0's loss, as the root logs its own under allreduce
        if step % cfg.log_every == 0 or step == em.total:
            em.log.log(step=step, epoch=round(rep0.epoch + rep0.batch / em.steps_per_epoch, 4), time=round(clock, 9),
                       loss=float(np.mean(window_loss)), images_per_s=round(window_images / max(clock - window_t, 1e-12), 1), lr=lr)  # fmt: skip
            window_t, window_images, window_loss = clock, 0, []
        if rep0.epoch > epoch0:
            em.end_epoch(flat.to_numpy().copy(), step, rep0.epoch, clock)
        if em.watch(None, step * W * cfg.batch_size, clock, step, rep0.epoch + rep0.batch / em.steps_per_epoch):
            break
    params = flat.state_dict_flat().cpu().numpy()
    extra = {"servers": 0, "optimizer_steps": opt.steps}
    return em.finish(params, opt.state_arrays(), step, clock, step * W * cfg.batch_size, extra)


def emulate(cfg, sim: SimOptions, overwrite: bool = False) -> dict:
    """Run the emulation `cfg.topology` says on the cluster `sim` describes; returns the summary."""
    em = Emulator(cfg, sim, overwrite)
    try:
        if cfg.topology == "downpour":
            from hpcdnn.sim.events import run_downpour

            return run_downpour(em)
        if cfg.topology == "sandblaster":
            from hpcdnn.sim.sandblaster import run_sandblaster

            return run_sandblaster(em)
        return run_sync(em)
    finally:
        em.close()
