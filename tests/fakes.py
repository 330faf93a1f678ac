"""Test-only generators of fake-but-real inputs for the ``data-prep`` tool.

Everything is a real file: JPEG/PNG bytes from Pillow, devkit ``meta.mat`` files
from ``scipy.io.savemat`` and MNIST-style IDX files. Output is deterministic for a
given ``seed`` (or ``rng`` state).
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

PathLike = str | os.PathLike

DEFAULT_WNIDS = ("n01440764", "n01443537", "n01484850")
KNOWN_SYNSETS = {  # wnid -> (words, gloss)
    "n01440764": ("tench, Tinca tinca", "freshwater fish of the carp family"),
    "n01443537": ("goldfish, Carassius auratus", "small golden or orange-red fish"),
    "n01484850": (
        "great white shark, white shark, man-eater, Carcharodon carcharias",
        "large aggressive shark of warm seas",
    ),
}
ROOT_WNID = "n00001740"  # non-leaf synset ("entity") listed after the leaves

VALID_BAD_KINDS = (
    "cmyk",
    "png_named_jpeg",
    "grayscale",
    "palette",
    "rgba",
    "la",
    "gray16",
)
INVALID_BAD_KINDS = ("truncated", "zero_byte", "not_image", "bomb")


def _smooth_noise(w: int, h: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Return HxW float32 noise in about [-1, 1], bicubically upsampled from a grid."""
    grid = rng.uniform(-1, 1, size=(max(2, cells * h // max(w, 1)), max(2, cells)))
    img = Image.fromarray(grid.astype(np.float32))
    return np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def photo_array(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Return a photo-like uint8 HxWx3 array: gradients, blobs, texture and noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    out = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-90, 90, size=2).tolist() + [rng.uniform(60, 190)]
        freq, phase = rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        wave = 20 * np.sin(2 * np.pi * freq * (x + y) + phase)
        out[..., c] = base + a * x + b * y + wave
    for _ in range(int(rng.integers(5, 10))):  # soft coloured blobs
        cx, cy = rng.uniform(0, 1, size=2)
        r = rng.uniform(0.05, 0.3)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        out += mask[..., None] * rng.uniform(-80, 80, size=3).astype(np.float32)
    lo, hi = out.min(), out.max()
    if hi - lo > 200:  # squeeze into [25, 225] so texture and noise survive clipping
        out = 25 + (out - lo) * (200 / (hi - lo))
    out += 18 * _smooth_noise(width, height, 40, rng)[..., None]
    out += 16 * _smooth_noise(width, height, 160, rng)[..., None]
    out += rng.normal(0, 10, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_jpeg(
    path: PathLike,
    width: int,
    height: int,
    rng: np.random.Generator,
    mode: str = "RGB",
    quality: int = 90,
) -> None:
    """Save a photo-like JPEG in mode "RGB", "L" or "CMYK" to ``path``."""
    if mode not in ("RGB", "L", "CMYK"):
        raise ValueError(f"unsupported JPEG mode {mode!r}")
    img = Image.fromarray(photo_array(width, height, rng)).convert(mode)
    img.save(path, format="JPEG", quality=quality)


def _jitter_size(size, k: int, rng: np.random.Generator) -> tuple[int, int]:
    """Return a size near ``size`` (w, h); every third image is portrait."""
    w, h = (max(8, round(s * rng.uniform(0.8, 1.25))) for s in size)
    return (min(w, h), max(w, h)) if k % 3 == 2 else (max(w, h), min(w, h))


def _synset(id_, wnid, words, gloss, children, height, n_train) -> tuple:
    """Return one meta.mat ``synsets`` record as a tuple of MATLAB-friendly values."""
    kids = np.array(children, dtype=np.uint16).reshape(1, -1)
    n_kids, height = np.uint8(len(children)), np.uint8(height)
    return (
        np.uint16(id_),
        wnid,
        words,
        gloss,
        n_kids,
        kids,
        height,
        np.uint32(n_train),
    )


def _write_meta_mat(path: Path, id_field: str, ids: dict, words: dict, n: int) -> None:
    """Write a devkit ``meta.mat``: leaves ordered by ILSVRC ID, then one non-leaf."""
    fields = [id_field, "WNID", "words", "gloss", "num_children", "children"]
    fields += ["wordnet_height", "num_train_images"]
    leaves = sorted(ids, key=ids.__getitem__)
    synsets = np.zeros((len(leaves) + 1, 1), dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(leaves):
        gloss = KNOWN_SYNSETS.get(wnid, ("", f"synthetic test synset {wnid}"))[1]
        synsets[i, 0] = _synset(ids[wnid], wnid, words[wnid], gloss, [], 0, n)
    root_id, kids = len(leaves) + 1, [ids[w] for w in leaves]
    gloss = "that which is perceived or known to have its own existence"
    synsets[-1, 0] = _synset(root_id, ROOT_WNID, "entity", gloss, kids, 1, n * len(kids))
    scipy.io.savemat(path, {"synsets": synsets}, format="5")


def _make_imagenet(root, year, wnids, n_train, n_val, n_test, size, seed, devkit):
    """Shared builder for the ILSVRC-2010 and ILSVRC-2012 layouts."""
    root, rng = Path(root), np.random.default_rng(seed)
    wnids = sorted(DEFAULT_WNIDS if wnids is None else wnids)
    if ROOT_WNID in wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"wnids must be unique and must not include {ROOT_WNID}")
    ids = {w: len(wnids) - i for i, w in enumerate(wnids)}  # NOT sorted-WNID order
    words = {w: KNOWN_SYNSETS.get(w, (f"synset {w}",))[0] for w in wnids}
    train: dict[str, str] = {}
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(n_train):
            rel = f"train/{wnid}/{wnid}_{k + 1}.JPEG"
            make_jpeg(root / rel, *_jitter_size(size, k, rng), rng)
            train[rel] = wnid

    def split(name: str, n: int) -> dict[str, str]:
        (root / name).mkdir(parents=True, exist_ok=True)
        order = rng.permutation(max(n, len(wnids)))[:n]  # every class if n allows
        files = {}
        for i, j in enumerate(order, start=1):
            fname = f"ILSVRC{year}_{name}_{i:08d}.JPEG"
            make_jpeg(root / name / fname, *_jitter_size(size, i, rng), rng)
            files[fname] = wnids[j % len(wnids)]
        return files

    out = {"root": root, "devkit": None, "wnids": wnids, "words": words}
    out.update(train=train, val=split("val", n_val), ids=ids)
    if year == 2010:
        out["test"] = split("test", n_test)
    if devkit:
        name = "ILSVRC2010_devkit-1.0" if year == 2010 else "ILSVRC2012_devkit_t12"
        out["devkit"] = root / name
        data = root / name / "data"
        data.mkdir(parents=True, exist_ok=True)
        _write_meta_mat(data / "meta.mat", f"ILSVRC{year}_ID", ids, words, n_train)
        for key, label in (("val", "validation"), ("test", "test")):
            if key in out:
                text = "".join(f"{ids[out[key][f]]}\n" for f in sorted(out[key]))
                (data / f"ILSVRC{year}_{label}_ground_truth.txt").write_text(text)
    return out


def make_imagenet_2012(
    root: PathLike,
    wnids=None,
    n_train_per_class: int = 4,
    n_val: int = 8,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    devkit: bool = True,
) -> dict:
    """Create a tiny ILSVRC-2012 tree (train/, val/, devkit) under ``root``."""
    args = (wnids, n_train_per_class, n_val, 0, size, seed, devkit)
    return _make_imagenet(root, 2012, *args)


def make_imagenet_2010(
    root: PathLike,
    wnids=None,
    n_train_per_class: int = 4,
    n_val: int = 8,
    n_test: int = 8,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    devkit: bool = True,
) -> dict:
    """Create a tiny ILSVRC-2010 tree (train/, val/, test/, devkit) under ``root``."""
    args = (wnids, n_train_per_class, n_val, n_test, size, seed, devkit)
    return _make_imagenet(root, 2010, *args)


def make_folder_tree(
    root: PathLike,
    classes=("cat", "dog", "fish"),
    n_per_class: int = 4,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> dict:
    """Create ``root/<class>/<img>.jpg|.png`` (alternating JPEG and PNG files)."""
    root, rng = Path(root), np.random.default_rng(seed)
    files: dict[str, str] = {}
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n_per_class):
            w, h = _jitter_size(size, k, rng)
            rel = f"{cls}/{cls}_{k:03d}.{'png' if k % 2 else 'jpg'}"
            if k % 2:
                Image.fromarray(photo_array(w, h, rng)).save(root / rel, format="PNG")
            else:
                make_jpeg(root / rel, w, h, rng)
            files[rel] = cls
    return {"root": root, "classes": list(classes), "files": files}


def make_bad_inputs(dir: PathLike, rng: np.random.Generator) -> dict[str, str]:
    """Write one file per bad-input kind into ``dir``; return {kind: filename}."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    pngs = ("palette", "rgba", "la", "gray16", "bomb")
    names = {k: f"{k}.{'png' if k in pngs else 'JPEG'}" for k in VALID_BAD_KINDS}
    names.update({k: f"{k}.{'png' if k in pngs else 'JPEG'}" for k in INVALID_BAD_KINDS})
    w, h = 80, 60
    rgb = Image.fromarray(photo_array(w, h, rng))
    alpha = Image.fromarray(np.linspace(0, 255, w * h).astype(np.uint8).reshape(h, w))
    make_jpeg(d / names["cmyk"], w, h, rng, mode="CMYK")
    rgb.save(d / names["png_named_jpeg"], format="PNG")
    make_jpeg(d / names["grayscale"], w, h, rng, mode="L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.save(d / names["palette"], transparency=0)
    for kind, base in (("rgba", rgb), ("la", rgb.convert("L"))):
        img = base.copy()
        img.putalpha(alpha)
        img.save(d / names[kind])
    ramp = np.round(np.linspace(0, 65535, w * h)).astype(np.uint16).reshape(h, w)
    Image.fromarray(ramp).save(d / names["gray16"])  # "I;16", full 0..65535 range
    make_jpeg(d / names["truncated"], w, h, rng)
    data = (d / names["truncated"]).read_bytes()
    (d / names["truncated"]).write_bytes(data[: int(len(data) * 0.6)])
    (d / names["zero_byte"]).write_bytes(b"")
    (d / names["not_image"]).write_text("this is not an image, just some text\n")
    Image.new("L", (3000, 2000), 128).save(d / names["bomb"], optimize=True)
    return names


def write_idx(path: PathLike, array: np.ndarray, gz: bool = False) -> None:
    """Write a uint8 array as an MNIST-style IDX file, gzipped if ``gz``."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">BBBB{arr.ndim}i", 0, 0, 0x08, arr.ndim, *arr.shape)
    payload = header + arr.tobytes()
    if gz:  # mtime=0 keeps the gzip bytes deterministic
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def make_idx_dataset(dir: PathLike, n_train: int = 50, n_test: int = 20, seed: int = 0, gz: bool = True) -> dict:
    """Write the four MNIST IDX files into ``dir``; return arrays and file paths."""
    d, rng = Path(dir), np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {"files": {}}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = (rng.random((n, 28, 28)) ** 3 * 255).astype(np.uint8)
        for kind, arr, tag in (("images", images, "idx3"), ("labels", labels, "idx1")):
            path = d / f"{prefix}-{kind}-{tag}-ubyte{'.gz' if gz else ''}"
            write_idx(path, arr, gz=gz)
            out[f"{split}_{kind}"], out["files"][f"{split}_{kind}"] = arr, path
    return out


FASHION = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist


def fashion_subset(dir: PathLike, n_train: int, n_test: int, source: PathLike = FASHION) -> Path:
    """The first n_train / n_test real Fashion-MNIST samples as IDX files in ``dir`` (fails, never skips, if absent)."""
    from data_prep.sources.idx import read_idx

    src, d = Path(source), Path(dir)
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {src}: apt-get install dataset-fashion-mnist")
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, tag in (("images", "idx3"), ("labels", "idx1")):
            name = f"{prefix}-{kind}-{tag}-ubyte.gz"
            write_idx(d / name, read_idx(src / name)[:n], gz=True)
    return d


def make_fashion_like(dir: PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Learnable Fashion-MNIST stand-ins as IDX files in ``dir``: 10 fixed smooth 28x28 silhouettes (one per class),
    each sample its class's silhouette at a random brightness and shift, plus noise.

    Unlike make_idx_dataset's noise with random labels, a model learns these, so training stays smooth and runs that
    differ in the last ulp stay close (what the distributed-vs-local equality tests need).
    """
    d, rng = Path(dir), np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:28, 0:28]
    centre = ((y - 13.5) ** 2 + (x - 13.5) ** 2) < 11**2  # garments sit in the middle of the frame
    shapes = [np.clip(0.6 + _smooth_noise(28, 28, 4, rng), 0, 1) * centre for _ in range(10)]
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = np.empty((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            shifted = np.roll(shapes[label], tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            pixels = 255 * shifted * rng.uniform(0.6, 1.0) + rng.normal(0, 12, (28, 28))
            images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels, gz=True)
    return d


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        make_jpeg(t / "photo.jpg", 500, 375, np.random.default_rng(0))
        print(f"500x375 q90 JPEG: {(t / 'photo.jpg').stat().st_size / 1024:.1f} KB")
        for year, fn in ((2012, make_imagenet_2012), (2010, make_imagenet_2010)):
            info, key = fn(t / f"in{year}"), f"ILSVRC{year}_ID"
            meta = info["devkit"] / "data" / "meta.mat"
            sq = scipy.io.loadmat(meta, squeeze_me=True, struct_as_record=False)
            print(year, "ids:", info["ids"], "val:", info["val"])
            for s in sq["synsets"]:
                print("  squeezed:", getattr(s, key), s.WNID, s.words, s.children)
            for r in scipy.io.loadmat(meta)["synsets"][:, 0]:
                print("  default: ", r[key][0, 0], r["WNID"][0], r["num_children"])
            for gt in sorted(meta.parent.glob("*ground_truth.txt")):
                print(f"  {gt.name}: {gt.read_text().split()}")
        print("folder tree:", sorted(make_folder_tree(t / "folder")["files"]))
        idx = make_idx_dataset(t / "mnist")
        print("idx:", {k: v.shape for k, v in idx.items() if k != "files"})
        Image.MAX_IMAGE_PIXELS = 1_000_000
        for kind, name in make_bad_inputs(t / "bad", np.random.default_rng(0)).items():
            p = t / "bad" / name
            try:
                with Image.open(p) as im:
                    im.load()
                    result = f"{im.format} {im.mode} {im.size} {im.info}"
            except Exception as exc:  # noqa: BLE001
                result = f"{type(exc).__name__}: {exc}"
            print(f"  {kind:15s} {p.stat().st_size:7d} B  {result}")
