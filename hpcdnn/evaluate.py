"""Top-1 / top-5 accuracy on a split: AlexNet's centre crop, or its 10-crop test (4 corners + centre, and their
mirrors; the softmax outputs of the 10 views are averaged, as in the paper).

    hpcdnn eval --run_dir runs/fm --ten_crop
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from hpcdnn import checkpoint as ck
from hpcdnn.config import Config, apply, resolve


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> dict:
    """{top1, top5, loss, count} of `model` over every batch of `loader` (train=False; ten_crop loaders average views)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum, count = 0.0, 0
    for x, y in loader.iter_epoch(0):
        logits = model(x)
        if logits.shape[0] != y.shape[0]:  # 10 views per sample, sample-major
            probs = F.softmax(logits.float(), dim=1).view(y.shape[0], -1, logits.shape[1]).mean(dim=1)
            loss_sum += F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, reduction="sum").item()
        else:
            probs = logits
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += y.shape[0]
    model.train(was_training)
    if not count:
        raise ValueError(f"{loader.directory}: split {loader.split!r} gave no samples to evaluate; evaluate another split")
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count, "count": count}


def evaluate_run(run_dir: str | Path, ten_crop: bool = False, data: str | None = None, split: str | None = None) -> dict:
    """Evaluate the checkpoint of a run (its config decides model, crop and data unless `data`/`split` say otherwise)."""
    from hpcdnn.data.loader import ShardLoader
    from hpcdnn.data.schema import load_manifest
    from hpcdnn.models import build_model
    from hpcdnn.models.flat import FlatParams
    from hpcdnn.placement import pick_device

    if not (Path(run_dir) / ck.LATEST).is_file():  # ck.load's message is about --resume
        raise FileNotFoundError(f"{Path(run_dir) / ck.LATEST} not found: --run_dir must name a run directory with a checkpoint")
    saved = ck.load(Path(run_dir) / ck.LATEST)
    cfg = apply(Config(), tomllib.loads(saved.config), "checkpoint")
    if data:
        cfg = apply(cfg, {"data": data}, "--data")
    if split:
        cfg = apply(cfg, {"val_split": split}, "--split")
    manifest = load_manifest(cfg.data)
    model_name, split, crop = resolve(cfg, manifest, "--split" if split else "--val_split")
    device = pick_device(cfg.device)
    model = build_model(model_name, len(manifest["classes"]), tuple(manifest["image_shape"]), crop).to(device)
    FlatParams(model).load_flat(saved.params)
    result = {"run_dir": str(run_dir), "data": cfg.data, "split": split, "model": model_name, "step": saved.step}
    views = [("", False)] + ([("_10crop", True)] if ten_crop else [])
    for suffix, ten in views:
        loader = ShardLoader(cfg.data, split, 128, train=False, crop=crop, pad=cfg.pad, device=device, ten_crop=ten)
        r = evaluate(model, loader)
        loader.close()
        result.update({f"top1{suffix}": r["top1"], f"top5{suffix}": r["top5"], f"loss{suffix}": r["loss"], "count": r["count"]})
    return result
