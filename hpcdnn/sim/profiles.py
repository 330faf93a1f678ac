"""Devices, data sets and this machine's calibration: the numbers the cost model (cost.py) starts from.

Every GPU figure is a vendor's fp32 peak times a sustained fraction; the fraction is not measured on that GPU but
anchored on one public training figure (Caffe on a K40, below) and applied to every GPU alike, so a prediction is
a ratio of peaks to that anchor, stated as such. The "cpu" device is this machine, measured (/work/shared/LIMITS.md
2026-11-24, the numbers in CALIBRATION): on it a model's step time comes from its measured images/s, not from FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

# Caffe (caffe.berkeleyvision.org, "Performance"): AlexNet-style training at ~4 ms/image on one K40 = 250 img/s;
# x 4.35 GFLOP per image forward+backward (cost.model_cost for alexnet) = 1.09 TFLOP/s of the K40's 4.29 peak.
GPU_EFFICIENCY = 0.25  # sustained fraction of fp32 peak in conv-net forward+backward (the Caffe K40 anchor above)


@dataclass(frozen=True)
class Device:
    """A compute device: fp32 peak, the sustained fraction of it in training, memory bandwidth, and their source."""

    name: str
    peak_tflops: float  # fp32 peak, TFLOP/s
    efficiency: float  # sustained fraction of the peak in forward+backward of a conv net
    mem_gbs: float  # memory bandwidth, GB/s: a replica's optimizer update streams the flat vectors through it
    source: str  # where peak and bandwidth come from

    @property
    def sustained_flops(self) -> float:
        """FLOP/s in training: peak x efficiency."""
        return self.peak_tflops * 1e12 * self.efficiency


DEVICES = {
    "gtx580": Device("NVIDIA GeForce GTX 580 (the AlexNet paper's GPU)", 1.581, GPU_EFFICIENCY, 192.4,
                     "NVIDIA GTX 580 specifications: 512 CUDA cores x 1544 MHz x 2 FLOP; 192.4 GB/s"),
    "k40": Device("NVIDIA Tesla K40", 4.29, GPU_EFFICIENCY, 288.0, "NVIDIA Tesla K40 datasheet (boost clock); 288 GB/s"),
    "v100": Device("NVIDIA V100 SXM2", 15.7, GPU_EFFICIENCY, 900.0, "NVIDIA V100 datasheet: 15.7 TFLOP/s fp32; 900 GB/s HBM2"),
    "a100": Device("NVIDIA A100 SXM4 40 GB", 19.5, GPU_EFFICIENCY, 1555.0,
                   "NVIDIA A100 datasheet: 19.5 TFLOP/s fp32 (no TF32); 1555 GB/s HBM2"),
    "h100": Device("NVIDIA H100 SXM5", 67.0, GPU_EFFICIENCY, 3350.0, "NVIDIA H100 datasheet: 67 TFLOP/s fp32; 3.35 TB/s HBM3"),
    "cpu": Device("this machine: 2 vCPU AMD EPYC, torch on 2 threads", 0.160, 0.65, 27.0,
                  "LIMITS.md: torch sgemm 160 GFLOP/s on 2 threads, AlexNet at 65-70% of it, numpy copy 26-28 GB/s"),
}  # fmt: skip


@dataclass(frozen=True)
class DataSet:
    """What the plan needs to know of a data set without reading it: image shape, classes, training images."""

    image_shape: tuple[int, int, int]  # stored (H, W, C)
    classes: int
    train_images: int
    crop: int  # training crop side


DATASETS = {
    "imagenet": DataSet((256, 256, 3), 1000, 1_281_167, 227),  # ILSVRC-2012 train split, AlexNet's 227 crops
    "fashion-mnist": DataSet((28, 28, 1), 10, 60_000, 28),
}

# This machine, measured (LIMITS.md, 2026-11-24; noisy, +-15 %): what the "cpu" device's predictions are made of.
CALIBRATION = {
    # images/s of forward+backward+update for one replica, by (model, torch threads of that replica). alexnet_small:
    # `python bench/sim_validate.py` 2026-11-30 09:25 UTC on an otherwise idle machine (load 0.6-1.1), synthetic batch
    # 128 x 28x28x1; 1 thread = per process while 2 processes compute at once (a rank of allreduce or Downpour; one
    # process alone on 1 thread: 1390 img/s). The real training loop runs 15-19 % below these (docs/scaling.md,
    # "Validation"). The earlier 205 / 107.5 were LIMITS.md's figures for a different small AlexNet-like net.
    "images_per_s": {
        ("alexnet_small", 2): 2411.0,  # 2399-2454 img/s over 5 repeats, 2 threads
        ("alexnet_small", 1): 1129.0,  # 1020-1160 img/s per process (median of 10), 2 processes x 1 thread at once
        ("alexnet", 2): 28.5,  # AlexNet-224 forward+backward, batch 32, 27-30 img/s
    },
    "allreduce_gbs": 16 * 2**20 / 5.2e-3 / 1e9,  # MPI Allreduce, 2 ranks, 16 MB float32 in 5.2 ms (not in place)
    "rma_put_gbs": 14.5,  # RMA Win.Allocate Put, 233 MB: 14-15 GB/s (a push)
    "rma_get_gbs": 4.4,  # RMA Win.Allocate Get, 233 MB: 4.4 GB/s (a fetch)
    "latency_us": 1.1,  # Fetch_and_op on Win.Allocate: ~1.1 us (a control word)
    "apply_gbs": 60e6 * 20 / 41e-3 / 1e9,  # Adagrad over 60M float32, numba prange: 33-49 ms (20 bytes per parameter)
}


def device(name: str) -> Device:
    """The named device profile, or an error listing the known ones."""
    if name not in DEVICES:
        raise ValueError(f"--device={name!r} is not a known profile; known: {', '.join(DEVICES)} (hpcdnn/sim/profiles.py)")
    return DEVICES[name]


def dataset(name: str) -> DataSet:
    """The named data-set profile, or an error listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"--dataset={name!r} is not a known data set; known: {', '.join(DATASETS)} (or give --config with its data)")
    return DATASETS[name]
