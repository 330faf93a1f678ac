"""Restartability and integrity: killed runs resume to identical bytes, verify catches corruption."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, prep, shard_bytes
from fakes import make_imagenet_2012

from data_prep.pipeline import PARTS


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Enough images for ~60 one-image shards, so a kill lands mid-run."""
    return make_imagenet_2012(tmp_path_factory.mktemp("many"), n_train_per_class=20, n_val=3, size=(120, 90))


def args(info, out):
    return ["imagenet", "--root", info["root"], "--out", out, "--size", "48", "--shard-size", "1", "--threads", "1"]


def test_killed_run_resumes_to_identical_bytes(many, tmp_path):
    clean = tmp_path / "clean"
    assert prep(*args(many, clean)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", *map(str, args(many, out))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / PARTS).glob("*.json"))) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list((out / PARTS).glob("*.json")))
    total = len(list(clean.glob("*.h5")))
    assert 3 <= done < total, f"kill must land mid-run ({done} of {total} shards finished)"
    assert not (out / "manifest.json").exists()

    # damage the way crashes and disks do: a torn shard, a shard without its record
    finished = sorted(p for p in out.glob("*.h5"))
    finished[0].write_bytes(finished[0].read_bytes()[:1000])
    (out / PARTS / f"{finished[1].name}.json").unlink()

    assert prep(*args(many, out)) == 0
    assert shard_bytes(out) == shard_bytes(clean)
    assert not list(out.glob("*.tmp.*")), "no temporaries left behind"


def test_same_input_gives_identical_bytes_and_rerun_is_a_no_op(imagenet2012, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert prep(*args(imagenet2012, a)[:-4], "--shard-size", "4") == 0
    assert prep(*args(imagenet2012, b)[:-4], "--shard-size", "4", "--threads", "2") == 0
    assert shard_bytes(a) == shard_bytes(b)
    capsys.readouterr()
    assert prep(*args(imagenet2012, a)[:-4], "--shard-size", "4") == 0
    assert "wrote 0 shards" in capsys.readouterr().out


def test_verify_catches_one_flipped_byte(imagenet2012, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep(*args(imagenet2012, out)[:-4], "--shard-size", "16") == 0
    assert prep("verify", out) == 0
    shard = sorted(out.glob("train-*.h5"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert prep("verify", out) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "sha256" in err
    assert len(err.strip().splitlines()) == 1, "only the damaged shard is named"


def test_verify_catches_label_out_of_range(imagenet2012, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep(*args(imagenet2012, out)[:-4]) == 0
    m = json.loads((out / "manifest.json").read_text())
    m["classes"] = m["classes"][:1]  # labels 1 and 2 now out of range
    (out / "manifest.json").write_text(json.dumps(m))
    assert prep("verify", out) == 1
    assert "outside [0, 1)" in capsys.readouterr().err


def test_inspect_summarises(imagenet2012, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep(*args(imagenet2012, out)[:-4]) == 0
    capsys.readouterr()
    assert prep("inspect", out) == 0
    text = capsys.readouterr().out
    assert "train" in text and "tench=10" in text and "rejected 0" in text
