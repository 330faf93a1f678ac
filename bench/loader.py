"""Benchmark ShardLoader (images/s) against a torch DataLoader over an h5py Dataset with torch-op transforms.

    python bench/loader.py [--data FASHION_SHARDS_DIR] [--images 2000] [--repeats 2] [--workdir DIR]

Two data sets, both as hpcdnn shards made by data-prep in a temporary directory:
  fashion-mnist  60000 x 28x28x1 raw (`data-prep idx` from /usr/share/datasets/fashion-mnist, unless --data is given);
                 crop 28 with pad 2
  rgb-256        --images (2000) generated photo-like JPEGs (320x256 q90, 4 classes) through `data-prep folder`,
                 stored raw 256x256x3; crop 224
Both loaders do the same training augmentation, batch 128, shuffled:
  ours   ShardLoader(train=True): one prefetch thread reading with ds[i]/slices, the Numba kernel (per-pixel mean
         image, PCA lighting, flip, padded crop) into float32 NCHW.
  torch  torch.utils.data.DataLoader over a Dataset whose __getitem__ reads one sample with h5py (files opened lazily
         in each worker, dataset handles kept) and applies torchvision-style transforms written with torch ops
         (torchvision cannot be installed here): RandomCrop(padding, zero fill), RandomHorizontalFlip, ToTensor (/255),
         Lighting (fb.resnet: eigvec @ (alpha * eigval) in [0, 1] units), Normalize (per-channel mean/std); default
         collate; num_workers 0 and 2 (torch.set_num_threads(1) in the main process too, as DataLoader sets in its
         workers: per-sample ops on 2 threads fall to ~40 img/s when another process holds a core), the better counts.
Each variant is timed in steady state (after 3 warm-up batches, so Numba's compile and worker start-up are excluded),
--repeats times interleaved, best kept. The machine is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_prep import cli
from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import load_manifest, open_readonly

FASHION = Path("/usr/share/datasets/fashion-mnist")
BATCH = 128
TRAINING_RATES = {"AlexNet-224 forward+backward, batch 32": 28, "small net 28x28x1": 200}  # img/s, bench/model.py on this machine


def quiet_prep(*args: str | Path) -> None:
    """Run data-prep in this process with its output silenced; raise when it fails."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"data-prep {' '.join(map(str, args))} exited {code}:\n{err.getvalue()}")


def make_rgb(work: Path, n: int, seed: int = 0) -> Path:
    """N smooth-noise-plus-grain 320x256 q90 JPEGs in 4 classes, through data-prep folder into raw 256x256x3 shards."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 256), Image.BICUBIC)
        pixels = np.asarray(base, np.float32) + rng.normal(0, 12, (256, 320, 1)).astype(np.float32)
        (work / "src" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(work / "src" / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)
    quiet_prep("folder", "--train", work / "src", "--out", work / "rgb", "--size", "256", "--shard-size", "512")
    return work / "rgb"


class H5Samples(Dataset):
    """The usual PyTorch recipe: one h5py read per sample, then torchvision-style transforms as torch ops."""

    def __init__(self, directory: Path, crop: int, pad: int, pca_std: float = 0.1):
        m = load_manifest(directory)
        shards = m["splits"]["train"]["shards"]
        self.files = [str(directory / s["file"]) for s in shards]
        self.starts = np.cumsum([0] + [s["count"] for s in shards]).tolist()
        self.crop, self.pad, self.pca_std = crop, pad, pca_std
        self.mean = torch.tensor(m["channel_mean"]).view(-1, 1, 1) / 255
        self.std = torch.tensor(m["channel_std"]).view(-1, 1, 1) / 255
        self.eigval = torch.tensor(m["pca"]["eigval"], dtype=torch.float32) / 255**2
        self.eigvec = torch.tensor(m["pca"]["eigvec"], dtype=torch.float32)
        self.images = None  # opened in the process that reads (each DataLoader worker)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        if self.images is None:
            files = [open_readonly(f) for f in self.files]
            self.images, self.labels = [f["images"] for f in files], [f["labels"][...] for f in files]
        k = bisect.bisect_right(self.starts, i) - 1
        img = torch.from_numpy(self.images[k][i - self.starts[k]]).permute(2, 0, 1)  # CHW uint8
        if self.pad:  # RandomCrop(crop, padding=pad)
            img = F.pad(img, (self.pad,) * 4)
        top, left = (int(torch.randint(0, s - self.crop + 1, ())) for s in img.shape[1:])
        img = img[:, top : top + self.crop, left : left + self.crop]
        if torch.rand(()) < 0.5:  # RandomHorizontalFlip
            img = img.flip(-1)
        x = img.float().div(255)  # ToTensor
        alpha = torch.randn(len(self.eigval)) * self.pca_std  # Lighting
        x = x + (self.eigvec @ (alpha * self.eigval)).view(-1, 1, 1)
        return (x - self.mean) / self.std, int(self.labels[k][i - self.starts[k]])  # Normalize


def steady_rate(batches, warm: int, count: int) -> float:
    """Images/s over `count` batches after `warm` untimed ones."""
    it, n = iter(batches), 0
    for _ in range(warm):
        next(it)
    t = time.perf_counter()
    for _ in range(count):
        n += len(next(it)[1])
    return n / (time.perf_counter() - t)


def ours(directory: Path, crop: int, pad: int, count: int) -> float:
    loader = ShardLoader(directory, "train", BATCH, crop=crop, pad=pad, seed=1)

    def forever():
        for epoch in range(10**6):
            yield from loader.iter_epoch(epoch)

    try:
        return steady_rate(forever(), 3, count)
    finally:
        loader.close()


def torch_loader(directory: Path, crop: int, pad: int, count: int, workers: int) -> float:
    data = H5Samples(directory, crop, pad)
    dl = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0)

    def forever():
        while True:
            yield from dl

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader workers: 2 intra-op threads on per-sample ops stall on a busy machine (40 img/s)
    try:
        return steady_rate(forever(), 3, count)
    finally:
        torch.set_num_threads(threads)


def run(name: str, directory: Path, crop: int, pad: int, count: int, repeats: int) -> tuple[float, float]:
    """Print one data set's rows; returns (ours, best torch) img/s."""
    best = {"ours": 0.0, "torch w0": 0.0, "torch w2": 0.0}
    for _ in range(repeats):  # interleaved, best kept
        best["ours"] = max(best["ours"], ours(directory, crop, pad, count))
        best["torch w0"] = max(best["torch w0"], torch_loader(directory, crop, pad, count // 2, 0))
        best["torch w2"] = max(best["torch w2"], torch_loader(directory, crop, pad, count // 2, 2))
    h, w, c = load_manifest(directory)["image_shape"]
    print(f"\n{name}: {h}x{w}x{c} -> crop {crop}{f' pad {pad}' if pad else ''}, batch {BATCH}, train augmentation")
    print(f"  {'ShardLoader (prefetch thread, Numba kernel)':<52} {best['ours']:>9,.0f} img/s")
    print(f"  {'torch DataLoader + h5py Dataset, num_workers=0':<52} {best['torch w0']:>9,.0f} img/s")
    print(f"  {'torch DataLoader + h5py Dataset, num_workers=2':<52} {best['torch w2']:>9,.0f} img/s")
    torch_best = max(best["torch w0"], best["torch w2"])
    ratio = best["ours"] / torch_best
    print(f"  ratio ours / best torch: {ratio:.1f}x (goal >= 3x {'ok' if ratio >= 3 else 'MISSED'})")
    return best["ours"], torch_best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="existing Fashion-MNIST shards (default: made from /usr/share/datasets/fashion-mnist)")
    p.add_argument("--images", type=int, default=2000, help="generated 256x256x3 images (default 2000)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats, best kept (default 2)")
    p.add_argument("--workdir", type=Path, help="keep generated data here (default: a temporary directory)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        fashion = args.data
        if fashion is None:
            if not FASHION.is_dir():
                print(f"{FASHION} missing: install dataset-fashion-mnist or pass --data DIR", file=sys.stderr)
                return 2
            quiet_prep("idx", "--dir", FASHION, "--out", work / "fm", "--shard-size", "8192")
            fashion = work / "fm"
        rgb = make_rgb(work, args.images)
        print(f"bench/loader.py: {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"load average {os.getloadavg()[0]:.1f} before timing; data made in {time.perf_counter() - t0:.0f} s")  # fmt: skip
        fm_ours, _ = run("fashion-mnist", fashion, 28, 2, 150, args.repeats)
        rgb_ours, _ = run(f"rgb-256 ({args.images} generated images)", rgb, 224, 0, 30, args.repeats)
    print("\nwhat training consumes (bench/model.py, this machine, 2 threads) vs what ShardLoader supplies:")
    for (what, rate), ours_rate in zip(TRAINING_RATES.items(), (rgb_ours, fm_ours)):
        print(f"  {what:<40} ~{rate:>4} img/s   loader {ours_rate:>9,.0f} img/s = {ours_rate / rate:,.0f}x headroom")
    print(f"total {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
