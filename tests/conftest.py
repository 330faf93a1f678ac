"""Shared test helpers: fake inputs (tests/fakes.py), running data-prep in-process or as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FASHION, fashion_subset, make_fashion_like, make_idx_dataset  # noqa: E402

from data_prep.cli import main  # noqa: E402
from hpcdnn.mpirun import mpirun  # noqa: E402, F401  (tests call conftest.mpirun(n): the one command builder)

REPO = Path(__file__).resolve().parent.parent


def prep(*args: str | os.PathLike) -> int:
    """Run data-prep in this process; returns its exit code."""
    return main([str(a) for a in args])


def signal_once_logging(cmd: list[str], run_dir: Path, sig=signal.SIGUSR1, timeout: float = 120) -> tuple[int, str]:
    """Start `cmd` (a training job), send `sig` to it once RUN_DIR/metrics.jsonl has a line (mpirun forwards it to
    every rank), wait for the exit; returns (exit code, stderr). Fails if the run ends or stays silent first."""
    metrics = Path(run_dir) / "metrics.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + timeout
        while not metrics.exists() or not metrics.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the run never logged a step (exit {proc.poll()})\n{proc.communicate()[1][-3000:]}")
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def prep_process(*args, timeout: float = 120, mpi: int = 0, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run data-prep as a real process (under `mpirun -n mpi` when mpi > 0), with a timeout so nothing hangs CI."""
    cmd = [sys.executable, "-m", "data_prep", *map(str, args)]
    if mpi:
        cmd = [*mpirun(mpi), sys.executable, "-m", "mpi4py", *cmd[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest/mean, by name: for byte-identical comparisons."""
    names = sorted(p.name for p in out.glob("*.h5")) + ["manifest.json", "mean.npy"]
    return {n: (out / n).read_bytes() for n in names}


def read_split(out: Path, manifest: dict, split: str) -> dict:
    """{key: (label, image)} over every shard of a split, read back through the shared schema."""
    from hpcdnn.data.schema import ShardReader

    got = {}
    for s in manifest["splits"][split]["shards"]:
        with ShardReader(out / s["file"]) as r:
            for i in range(len(r)):
                got[r.keys[i]] = (int(r.labels[i]), r.image(i))
    return got


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """120 + 40 Fashion-MNIST-shaped IDX samples (noise, balanced random labels) as shards of 50: runs that check
    mechanics (resume, checkpoints, accounting), not learning."""
    d = tmp_path_factory.mktemp("tiny")
    make_idx_dataset(d / "idx", n_train=120, n_test=40, seed=3)
    assert prep("idx", "--dir", d / "idx", "--out", d / "data", "--shard-size", "50") == 0
    return d / "data"


@pytest.fixture(scope="session")
def fashion_tiny(tmp_path_factory) -> Path:
    """640 + 128 learnable 28x28 images as shards of 128: the first real Fashion-MNIST samples when the data set is
    installed (CI), else fakes.make_fashion_like's stand-ins. Random labels would not do: training on them is chaotic,
    and the distributed-vs-local equality tests see last-ulp differences explode."""
    d = tmp_path_factory.mktemp("fashion_tiny")
    if FASHION.is_dir():
        fashion_subset(d / "idx", n_train=640, n_test=128, source=FASHION)
    else:
        make_fashion_like(d / "idx", n_train=640, n_test=128)
    assert prep("idx", "--dir", d / "idx", "--out", d / "data", "--shard-size", "128") == 0
    return d / "data"


@pytest.fixture(scope="session")
def idx_data(tmp_path_factory):
    """150 train / 30 test 28x28x1 images in shards of 40 (a batch spans shards; uneven last shard). Read-only."""
    root = tmp_path_factory.mktemp("idx")
    make_idx_dataset(root / "in", n_train=150, n_test=30, seed=3)
    assert prep("idx", "--dir", root / "in", "--out", root / "out", "--shard-size", "40") == 0
    return root / "out"


@pytest.fixture(scope="session")
def imagenet2012(tmp_path_factory):
    """A fake ILSVRC-2012 tree with devkit (real JPEGs), shared read-only by the tests."""
    from fakes import make_imagenet_2012

    return make_imagenet_2012(tmp_path_factory.mktemp("ilsvrc2012"), n_train_per_class=10, n_val=9)


@pytest.fixture(scope="module")
def vcluster():
    """A 4-node virtual cluster (tests/cluster/vcluster.py) for one test module, removed at its end even when tests
    fail (up and down take a fraction of a second; the rest of the suite runs without its bridge in the way).
    Skipped with the reason where it cannot exist (not root, no iproute2); under CI it must."""
    sys.path.insert(0, str(Path(__file__).parent / "cluster"))
    from vcluster import VirtualCluster, available

    reason = available()
    if reason:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the cross-node tests: {reason}")
        pytest.skip(reason)
    with VirtualCluster(nodes=4) as vc:
        yield vc


@pytest.fixture
def read_events():
    """tag -> [(step, value)] of a run directory's TensorBoard events, read with tensorboard's own EventAccumulator."""
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs hpcdnn[tensorboard] (Makefile): there this test must run
        pytest.skip("tensorboard is not installed: pip install 'hpcdnn[tensorboard]'")

    def read(run_dir):
        acc = ea.EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={ea.SCALARS: 0})  # 0: keep every event
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    return read
