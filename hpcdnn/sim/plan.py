"""`hpcdnn simulate --plan`: predicted images/s and time per epoch of every topology for a model on a cluster, no
training (cost.py's terms, profiles.py's devices and data sets).

    hpcdnn simulate --plan --config imagenet_alexnet --device=gtx580 --workers=2 --link-gbit=64   # the AlexNet paper
    hpcdnn simulate --plan --config imagenet_alexnet --device=v100 --workers=64 --servers=8 --link-gbit=100
"""

from __future__ import annotations

import json
from pathlib import Path

from hpcdnn.sim.cost import TERMS, Cluster, ModelCost, model_cost, predict
from hpcdnn.sim.profiles import DATASETS, DataSet, dataset

# what the paper reports for its setting: AlexNet (Krizhevsky et al. 2012, section 5) on two GTX 580, ~90 epochs
PAPER = {"model": "alexnet", "dataset": "imagenet", "device": "gtx580", "workers": 2,
         "text": "the AlexNet paper: 'five to six days on two GTX 580 3GB GPUs' for ~90 epochs (two model-parallel towers)"}  # fmt: skip


def data_profile(name: str | None, cfg) -> tuple[str, DataSet]:
    """The data set to plan for: --dataset by name, else the config's data directory's manifest, else its name."""
    if name:
        return name, dataset(name)
    manifest = Path(cfg.data) / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        shape = tuple(m["image_shape"])
        from hpcdnn.models import default_crop

        model = cfg.model if cfg.model != "auto" else None
        crop = cfg.crop or default_crop(model or ("alexnet" if shape[0] >= 200 else "alexnet_small"), shape)
        return cfg.data, DataSet(shape, len(m["classes"]), int(m["splits"]["train"]["count"]), crop)
    for known in DATASETS:
        if known.replace("-", "") in cfg.data.replace("-", "").lower():
            return known, dataset(known)
    raise ValueError(f"--data={cfg.data} has no manifest.json and names no known data set: pass --dataset={'|'.join(DATASETS)}")


def model_name(cfg, data: DataSet) -> str:
    """The config's model, or what `auto` picks for these images (hpcdnn/models)."""
    from hpcdnn.models import default_model

    return cfg.model if cfg.model != "auto" else default_model(data.image_shape)


def plan(cfg, cluster: Cluster, data_name: str | None = None, as_json: bool = False) -> str:
    """The plan as printed: one row per topology (images/s, epoch, cfg.epochs epochs, bounding term, terms in ms)."""
    name, data = data_profile(data_name, cfg)
    model = model_cost(model_name(cfg, data), data)
    costs = predict(model, cluster, cfg)
    if as_json:
        rows = {t: {"images_per_s": c.images_per_s, "epoch_s": c.epoch_s(model), "bound": c.bound, **c.terms} for t, c in costs.items()}
        return json.dumps({"model": model.name, "parameters": model.params, "fwd_flops": model.fwd_flops, "cluster": vars(cluster),
                           "epochs": cfg.epochs, "topologies": rows}, indent=1)  # fmt: skip
    return "\n".join(header(model, name, cluster, cfg) + table(costs, model, cfg.epochs) + reference(model, name, cluster))


def header(model: ModelCost, data_name: str, cluster: Cluster, cfg) -> list[str]:
    """What is planned: the model, data set, cluster and knobs, and the column names."""
    gbit = cluster.push_bps * 8 / 1e9
    return [
        f"hpcdnn simulate --plan: {model.name} ({model.params:,} parameters, {3 * model.fwd_flops / 1e9:.3g} GFLOP/image forward+backward)"
        f" on {data_name} ({model.train_images:,} training images), batch {cfg.batch_size}, --optimizer={cfg.optimizer}",
        f"  cluster: {cluster.workers} x {cluster.device}, {cluster.servers} parameter server(s), {gbit:g} Gbit/s, "
        f"{cluster.latency_s * 1e6:g} us latency; n_fetch={cfg.n_fetch}, n_push={cfg.n_push}, push_dtype={cfg.push_dtype}",
        f"{'topology':<12} {'images/s':>10} {'epoch':>10} {f'{cfg.epochs} epochs':>12}  {'bound':<13} terms (ms)",
    ]


def duration(seconds: float) -> str:
    """Seconds as s, min, h or days, whichever reads best."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def table(costs: dict, model: ModelCost, epochs: int) -> list[str]:
    """One line per topology: images/s, one epoch, all epochs, the bounding term, every term in ms."""
    out = []
    for t, c in costs.items():
        terms = ", ".join(f"{k[:-2]} {v * 1e3:.3g}" for k, v in c.terms.items())
        epoch = c.epoch_s(model)
        out.append(f"{t:<12} {c.images_per_s:>10.1f} {duration(epoch):>10} {duration(epoch * epochs):>12}  {c.bound:<13} {terms}")
    return out


def reference(model: ModelCost, data_name: str, cluster: Cluster) -> list[str]:
    """The paper's reported time next to the plan when the plan is the paper's setting."""
    if (model.name, data_name, cluster.device, cluster.workers) != (PAPER["model"], PAPER["dataset"], PAPER["device"], PAPER["workers"]):
        return []
    return [f"reference: {PAPER['text']}"]


def terms_table() -> str:
    """Every cost term as a Markdown table (docs/scaling.md holds this output)."""
    rows = ["| term | unit | what | formula |", "|---|---|---|---|"]
    rows += [f"| `{name}` | {unit} | {what} | {formula} |" for name, (unit, what, formula) in TERMS.items()]
    return "\n".join(rows)
