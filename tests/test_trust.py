"""Untrusted data directories (issue 14): tampered statistics, shard paths leading outside, wrong counts and labels,
damaged shards and JSON are refused by `data-prep verify` and by ShardLoader before step 1, naming the file; shards
read without HDF5 file locking. Each test tampers with a copy of a real data-prep output."""

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, prep
from fakes import make_folder_tree

from hpcdnn.data.loader import ShardLoader
from hpcdnn.data.schema import ShardReader, load_manifest, sha256_file

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def data(tiny, tmp_path) -> Path:
    """A private copy of the session's `tiny` IDX data set (10 classes, train shards of 50/50/20), free to tamper with."""
    return Path(shutil.copytree(tiny, tmp_path / "data"))


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory) -> Path:
    """A folder data set of 2 classes x 4 images stored as JPEG, in shards of 4."""
    root = tmp_path_factory.mktemp("jpeg")
    make_folder_tree(root / "train", classes=("a", "b"), n_per_class=4, size=(40, 36), seed=2)
    assert prep("folder", "--train", root / "train", "--out", root / "out", "--size", "32", "--shard-size", "4", "--encoding", "jpeg") == 0
    return root / "out"


def edit_manifest(directory: Path, change) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    change(m)
    (directory / "manifest.json").write_text(json.dumps(m))  # NaN/Infinity as Python's json writes and reads them


def rehash(directory: Path) -> None:
    """Record every shard's current sha256 and size, so a test sees only the check it is about."""

    def update(m):
        for info in m["splits"].values():
            for s in info["shards"]:
                s["sha256"], s["bytes"] = sha256_file(directory / s["file"]), (directory / s["file"]).stat().st_size

    edit_manifest(directory, update)


def assert_refused(directory: Path, capsys, *needles: str) -> None:
    """`data-prep verify` fails and ShardLoader refuses at construction, both saying every needle."""
    capsys.readouterr()
    assert prep("verify", directory) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    with pytest.raises(ValueError) as refused:
        ShardLoader(directory, "train", 8)
    for needle in (*needles, "data-prep verify"):
        assert needle in str(refused.value), str(refused.value)


@pytest.mark.parametrize("value", [NAN, INF, 300.0, -1.0])
def test_bad_mean_image_is_refused(data, capsys, value):
    mean = np.load(data / "mean.npy")
    mean[3, 4, 0] = value
    np.save(data / "mean.npy", mean)
    assert_refused(data, capsys, str(data / "mean.npy"))


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("channel_std", [-1.0], "channel_std [-1.0]"),
        ("channel_std", [NAN], "channel_std [nan] is not finite"),
        ("channel_std", [0.0], "channel_std [0.0]"),
        ("channel_mean", [300.0], "channel_mean [300.0]"),
        ("eigval", [-5.0], "pca eigval [-5.0]"),
        ("eigval", [NAN], "pca eigval [nan] is not finite"),
        ("eigvec", [[INF]], "pca eigvec [[inf]] is not finite"),
        ("eigvec", [[7.0]], "orthonormal"),
    ],
)
def test_tampered_statistic_is_refused(data, capsys, key, value, says):
    edit_manifest(data, lambda m: (m["pca"] if key.startswith("eig") else m).__setitem__(key, value))
    assert_refused(data, capsys, str(data / "manifest.json"), says)


class OpenWatch:
    """inotify on one file: did any process open it since the watch began? (The kernel's word, not the code's.)"""

    IN_OPEN, IN_ACCESS = 0x20, 0x01

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0 and self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN | self.IN_ACCESS) >= 0

    def opened(self) -> bool:
        try:
            return len(os.read(self.fd, 4096)) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shard_path_outside_the_directory_is_refused_and_never_opened(data, capsys, kind):
    m = load_manifest(data)
    last = m["splits"]["train"]["shards"][-1]["file"]
    outside = data.parent / "outside.h5"
    shutil.copyfile(data / last, outside)  # the same bytes and count: only the path is wrong
    name = {"dotdot": "../outside.h5", "absolute": str(outside), "symlink": "link.h5"}[kind]
    if kind == "symlink":
        (data / "link.h5").symlink_to(outside)
    edit_manifest(data, lambda m: m["splits"]["train"]["shards"][-1].__setitem__("file", name))
    watch = OpenWatch(outside)
    try:
        assert_refused(data, capsys, str(data / "manifest.json"), f"lists the shard {name!r}")
        assert not watch.opened(), "the file outside the data directory was opened"
    finally:
        watch.close()


@pytest.mark.parametrize("how", ["external", "virtual", "external_link"])
def test_shard_dataset_stored_in_another_file_is_refused_and_never_opened(data, capsys, how):
    """HDF5 can keep a dataset's bytes in any other file; the shard's sha256 then says nothing about what is read."""
    shard = data / load_manifest(data)["splits"]["train"]["shards"][0]["file"]
    outside = data.parent / ("outside.bin" if how == "external" else "outside.h5")
    with h5py.File(shard, "r") as f:
        images, labels, keys, attrs = f["images"][...], f["labels"][...], f["keys"][...], dict(f.attrs)
    if how == "external":
        outside.write_bytes(images.tobytes())
    else:
        with h5py.File(outside, "w") as g:
            g["images"] = images
    with h5py.File(shard, "w") as f:
        if how == "external":
            f.create_dataset("images", images.shape, np.uint8, external=[(str(outside), 0, h5py.h5f.UNLIMITED)])
        elif how == "virtual":
            layout = h5py.VirtualLayout(images.shape, np.uint8)
            layout[...] = h5py.VirtualSource(str(outside), "images", images.shape, np.uint8)
            f.create_virtual_dataset("images", layout)
        else:
            f["images"] = h5py.ExternalLink(str(outside), "images")
        f["labels"], f["keys"] = labels, keys
        f.attrs.update(attrs)
    rehash(data)
    watch = OpenWatch(outside)
    try:
        assert_refused(data, capsys, f"{shard}: dataset 'images' ")
        with pytest.raises(ValueError, match="dataset 'images' "):
            ShardReader(shard)
        assert not watch.opened(), "the file the shard points at was opened"
    finally:
        watch.close()


def test_manifest_count_smaller_than_the_shard_is_refused(data, capsys):
    def shrink(m):
        m["splits"]["train"]["shards"][0]["count"] -= 1  # the loader would silently never read the shard's last sample
        m["splits"]["train"]["count"] -= 1

    edit_manifest(data, shrink)
    first = load_manifest(data)["splits"]["train"]["shards"][0]["file"]
    assert_refused(data, capsys, f"{data / first}: images/labels/keys have 50/50/50 rows, manifest says 49")


def test_split_count_not_the_sum_of_its_shards_is_refused(data, capsys):
    edit_manifest(data, lambda m: m["splits"]["train"].__setitem__("count", 100))
    assert_refused(data, capsys, "split 'train' has count 100 but its shards hold 120 samples")


def test_classes_with_duplicate_indices_are_refused(data, capsys):
    edit_manifest(data, lambda m: m["classes"][1].__setitem__("index", 0))
    assert_refused(data, capsys, str(data / "manifest.json"), "class 1 of 10 has index 0")


@pytest.mark.parametrize("label", [-100, 12])  # -100: torch's ignore_index (silently skipped); 12 of 10 classes
def test_label_outside_the_classes_is_refused_naming_shard_and_index(data, capsys, label):
    shard = data / load_manifest(data)["splits"]["train"]["shards"][1]["file"]
    with h5py.File(shard, "a") as f:
        f["labels"][7] = label
        key = f["keys"][7].decode()
    rehash(data)
    assert_refused(data, capsys, str(shard), f"the first label {label} at index 7 (key {key!r})")


@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_damaged_shard_error_names_the_file(data, capsys, damage):
    shard = data / load_manifest(data)["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    shard.write_bytes(b"\x17" * 1024 + raw[1024:] if damage == "garble" else raw[: len(raw) // 3])
    assert_refused(data, capsys, str(shard))
    with pytest.raises(ValueError, match="cannot be read as HDF5") as e:
        ShardReader(shard)
    assert str(shard) in str(e.value) and "re-run data-prep" in str(e.value)


def test_undecodable_sample_names_shard_index_and_key(jpeg_data, tmp_path):
    """A JPEG that fails mid-run (the shard's structure is sound, so the constructor cannot see it)."""
    data = Path(shutil.copytree(jpeg_data, tmp_path / "data"))
    shard = data / load_manifest(data)["splits"]["train"]["shards"][1]["file"]
    with h5py.File(shard, "a") as f:
        f["images"][2] = np.frombuffer(b"\xff\xd8\xff not a jpeg", np.uint8)
        key = f["keys"][2].decode()
    rehash(data)
    loader = ShardLoader(data, "train", 8, train=False)
    with pytest.raises(ValueError) as e:
        list(loader)
    loader.close()
    assert f"{shard}: sample 2 (key {key!r}) does not decode as JPEG" in str(e.value) and "data-prep verify" in str(e.value)


@pytest.mark.parametrize(
    "text, says", [("{not json", "not valid JSON"), ("[1, 2]", "a JSON list, expected an object"), (None, "'splits' missing")]
)
def test_malformed_manifest_names_the_file(data, capsys, text, says):
    path = data / "manifest.json"
    if text is None:
        edit_manifest(data, lambda m: m.pop("splits"))
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=says) as e:
        load_manifest(data)
    assert str(path) in str(e.value) and "data-prep finalize" in str(e.value)
    with pytest.raises(ValueError, match=says):
        ShardLoader(data, "train", 8)
    capsys.readouterr()
    assert prep("verify", data) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"data-prep: error: {path}") and says in err and "Traceback" not in err


@pytest.mark.parametrize("which, fix", [("plan", "choose a new --out"), ("record", "re-run the same data-prep command")])
def test_malformed_plan_or_shard_record_names_the_file(data, capsys, which, fix):
    path = data / "plan.json" if which == "plan" else next((data / ".parts").glob("*.json"))
    path.write_bytes(path.read_bytes()[:40])  # a torn write
    capsys.readouterr()
    assert prep("finalize", data) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"data-prep: error: {path} is not valid JSON") and fix in err and "Traceback" not in err, err


def test_shards_are_read_without_file_locking(data, capsys):
    """A process holding a shard open for writing (HDF5's default locking) stops a locking reader; ours reads on, as on
    Lustre/GPFS without flock (h5py #1804). A user who sets HDF5_USE_FILE_LOCKING gets locking back."""
    shard = data / load_manifest(data)["splits"]["train"]["shards"][0]["file"]
    hold = "import h5py, sys\nf = h5py.File(sys.argv[1], 'a')\nprint('open', flush=True)\nsys.stdin.read()\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(shard)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        rehash(data)  # opening for writing rewrites part of the file
        with pytest.raises(OSError, match="unable to lock file"):
            h5py.File(shard, "r", locking=True)
        with ShardReader(shard) as r:
            assert len(r) == 50 and r.image(49).shape == (28, 28, 1)
        with ShardLoader(data, "train", 40, train=False) as loader:
            assert sum(len(y) for _, y in loader) == 120
        capsys.readouterr()
        assert prep("verify", data) == 0, capsys.readouterr().err
        read = f"from hpcdnn.data.schema import ShardReader\nShardReader({str(shard)!r})\n"
        env = {**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"}
        chosen = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
        assert chosen.returncode != 0 and "unable to lock file" in chosen.stderr, chosen.stderr[-2000:]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
