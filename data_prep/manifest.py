"""finalize (merge the shards' records into the manifest), verify (re-hash and re-check) and inspect (a summary).

The manifest's format and its writer live in `hpcdnn.data.schema`; this module only gathers what goes into it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.pipeline import PLAN, record_path
from data_prep.sources.base import PrepError
from hpcdnn.atomic import write_json
from hpcdnn.data.schema import SCHEMA_VERSION, ShardReader, check_shard, load_manifest, read_json_object, sha256_file, write_manifest
from hpcdnn.data.trust import manifest_problems, outside
from hpcdnn.kernels.stats import ImageStats


def load_plan(out: Path) -> dict:
    """DIR/plan.json, with an error naming the fix when DIR is not a data-prep output or is from another schema version."""
    path = out / PLAN
    if not path.is_file():
        raise PrepError(
            f"{path} not found: {out} is not a data-prep output directory (run `data-prep imagenet|folder|idx --out {out}` first)"
        )
    fix = f"the plan of this output directory is damaged; choose a new --out, or delete {out} and prepare again"
    plan = read_json_object(path, fix, PrepError)
    missing = [k for k in ("splits", "source", "settings", "image_shape", "classes") if k not in plan]
    if missing and plan.get("schema_version") == SCHEMA_VERSION:
        raise PrepError(f"{path}: keys {missing} missing; {fix}")
    if plan.get("schema_version") != SCHEMA_VERSION:
        raise PrepError(
            f"{path}: schema_version {plan.get('schema_version')!r}, this data-prep writes {SCHEMA_VERSION}; "
            "finalize it with the data-prep that started it, or prepare it again into a new --out"
        )
    return plan


def finalize(out: Path, max_reject_fraction: float) -> dict:
    """Merge every shard record into manifest.json (and mean.npy); fail listing unfinished shards or too many rejects."""
    plan = load_plan(out)
    missing, records = [], {}
    for info in plan["splits"].values():
        for shard in info["shards"]:
            rec = record_path(out, shard["file"])
            if rec.is_file():
                records[shard["file"]] = read_json_object(
                    rec, "delete it and re-run the same data-prep command (that shard is made again)", PrepError
                )
            else:
                missing.append(shard["file"])
    if missing:
        raise PrepError(
            f"{len(missing)} of {len(missing) + len(records)} shards are not finished ({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); "
            "re-run the same data-prep command (it resumes) or the job-array tasks that failed, then finalize again"
        )
    stats_split = "train" if "train" in plan["splits"] else next(iter(plan["splits"]))
    stats = ImageStats.zeros(plan["image_shape"])
    splits, rejected, converted = {}, [], []
    for split, info in plan["splits"].items():
        shards = [records[shard["file"]] for shard in info["shards"]]
        for r in shards:
            rejected += [dict(x, split=split) for x in r["rejected"]]
            converted += [dict(x, split=split) for x in r["converted"]]
            if split == stats_split:
                stats.merge(ImageStats.from_json(r["stats"]))
        splits[split] = {"planned": info["planned"], "shards": shards}
    planned = sum(info["planned"] for info in plan["splits"].values())
    if planned and len(rejected) / planned > max_reject_fraction:
        write_json(out / "rejected.json", rejected)
        reasons = Counter(r["reason"].split(":")[0] for r in rejected).most_common(5)
        raise PrepError(
            f"{len(rejected)} of {planned} inputs ({len(rejected) / planned:.3%}) were rejected, above --max-reject-fraction {max_reject_fraction}; "
            f"top reasons: {reasons}. Every reject is listed in {out / 'rejected.json'}. Fix the inputs, or accept them by re-running with "
            "a larger --max-reject-fraction (finished shards are kept)"
        )
    return write_manifest(
        out,
        source=plan["source"],
        settings=plan["settings"],
        image_shape=plan["image_shape"],
        classes=plan["classes"],
        splits=splits,
        stats=stats,
        stats_split=stats_split,
        rejected=rejected,
        converted=converted,
    )


def verify(out: Path) -> list[str]:
    """Every problem found checking the manifest's statistics, paths and counts and re-hashing and re-checking the
    shards against it, each naming its file. A shard whose path leads outside `out` is reported, never opened."""
    manifest = load_manifest(out)
    problems = manifest_problems(out, manifest)
    for info in manifest["splits"].values():
        for s in info["shards"]:
            path = out / s["file"]
            if outside(out, s["file"]):
                continue  # manifest_problems named it
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            digest = sha256_file(path)
            if digest != s["sha256"]:
                problems.append(
                    f"{path}: sha256 {digest[:16]}… does not match the manifest's {s['sha256'][:16]}… (file changed or corrupt)"
                )
            for p in check_shard(
                path,
                count=s["count"],
                num_classes=len(manifest["classes"]),
                image_shape=manifest["image_shape"],
                encoding=manifest["encoding"],
            ):
                problems.append(f"{path}: {p}")
    return problems


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def describe(out: Path, per_class: bool = True) -> str:
    """A one-screen human summary of a finished output directory."""
    m = load_manifest(out)
    lines = [f"{out}: {m['source']}, {len(m['classes'])} classes, images {'x'.join(map(str, m['image_shape']))} {m['encoding']}"]
    for split, info in m["splits"].items():
        nbytes = sum(s["bytes"] for s in info["shards"])
        lines.append(f"  {split:<5} {info['count']:>9} images in {len(info['shards']):>5} shards, {human_bytes(nbytes)}")
        if per_class:
            counts = Counter()
            for s in info["shards"]:
                if outside(out, s["file"]):
                    continue  # never opened: `data-prep verify` names it
                with ShardReader(out / s["file"]) as r:
                    counts.update({int(k): int(v) for k, v in zip(*np.unique(r.labels, return_counts=True))})
            shown = ", ".join(f"{m['classes'][k]['name'].split(',')[0]}={counts[k]}" for k in sorted(counts)[:12])
            more = f" … ({len(counts)} classes)" if len(counts) > 12 else ""
            lines.append(f"        per class: {shown}{more}")
    mean = ", ".join(f"{x:.1f}" for x in m["channel_mean"])
    std = ", ".join(f"{x:.1f}" for x in m["channel_std"])
    lines.append(f"  pixel mean [{mean}], std [{std}] over {m['stats_split']}; PCA eigenvalues {[round(v, 2) for v in m['pca']['eigval']]}")
    lines.append(f"  converted {len(m['converted'])} inputs; rejected {len(m['rejected'])}")
    for why, n in Counter(r["reason"].split(":")[0] for r in m["rejected"]).most_common(8):
        lines.append(f"    {n:>6} × {why}")
    for r in m["rejected"][:5]:
        lines.append(f"    e.g. {r['path']}: {r['reason']}")
    return "\n".join(lines)
