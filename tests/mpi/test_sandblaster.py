"""Sandblaster L-BFGS under a real mpirun: one rank equals torch.optim.LBFGS, three ranks equal one, a straggler's
portions are backed up and every sample counts exactly once, and the driver checkpoints and resumes.

The scenarios run in tests/mpi/sandblaster_cases.py (two launches in all); each launch has a timeout, so a hung
collective or RMA epoch fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, mpirun, signal_once_logging
from test_tensorboard import assert_same, expected_events

sys.path.insert(0, str(Path(__file__).parent))
from sandblaster_cases import SAMPLES, SCENARIOS, WEIGHT_DECAY, logistic_problem, loss_and_grad  # noqa: E402

from hpcdnn import checkpoint as ck  # noqa: E402

pytestmark = pytest.mark.mpi
CASES = Path(__file__).parent / "sandblaster_cases.py"
PORTIONS = 12  # the convex scenarios' default


def launch(n: int, *args, timeout: float = 240) -> str:
    """Run a scenario under `mpirun -n n python -m mpi4py`; its stdout, or an AssertionError with both streams."""
    cmd = [*mpirun(n), sys.executable, "-m", "mpi4py", str(CASES), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r.stdout


@pytest.fixture(scope="module")
def convex(tmp_path_factory):
    """load(ranks, scenario) -> the root's npz of that run."""
    d = tmp_path_factory.mktemp("convex")
    launch(3, "convex", d, "plain,armijo,wolfe", "plain,armijo,wolfe,straggler,static")  # 1 rank (COMM_SELF), then 3
    return lambda ranks, name: np.load(d / str(ranks) / f"{name}.npz")


def torch_lbfgs_iterates(iters: int, history: int = 5) -> np.ndarray:
    """torch.optim.LBFGS with a fixed step (line_search_fn=None, lr=1) on the same problem, one iteration per step()."""
    X, labels, x0 = logistic_problem()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(labels)
    p = torch.tensor(x0, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=1, history_size=history, tolerance_grad=0.0, tolerance_change=0.0)
    c, f = 4, X.shape[1]

    def closure():
        opt.zero_grad()
        logits = Xt @ p[: c * f].view(c, f).T + p[c * f :]
        loss = torch.nn.functional.cross_entropy(logits, yt) + 0.5 * WEIGHT_DECAY * (p @ p)
        loss.backward()
        return loss

    out = [x0]
    for _ in range(iters):
        opt.step(closure)
        out.append(p.detach().numpy().copy())
    return np.array(out)


def test_one_rank_equals_torch_lbfgs(convex):
    ours = convex(1, "plain")["iterates"]
    want = torch_lbfgs_iterates(SCENARIOS["plain"]["iters"])
    assert np.abs(want[-1] - want[0]).max() > 0.1  # the iterates move: the comparison means something
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["armijo", "wolfe"])
def test_line_searches_reach_the_scipy_minimum(convex, mode):
    from scipy.optimize import minimize

    X, labels, x0 = logistic_problem()

    def fun(x):
        f, g = loss_and_grad(x, X, labels)
        return f / SAMPLES + 0.5 * WEIGHT_DECAY * x @ x, g / SAMPLES + WEIGHT_DECAY * x

    best = minimize(fun, x0, jac=True, method="L-BFGS-B", options=dict(gtol=1e-12, ftol=1e-16, maxiter=2000))
    for ranks in (1, 3):
        run = convex(ranks, mode)
        losses = run["losses"]
        assert np.all(np.diff(losses) <= 1e-15), "steps with sufficient decrease never increase the loss"
        assert losses[-1] - best.fun < 1e-9, (losses[-1], best.fun)
        np.testing.assert_allclose(run["iterates"][-1], best.x, atol=1e-4)


@pytest.mark.parametrize("name", ["plain", "armijo", "wolfe", "static"])
def test_three_ranks_give_the_iterates_of_one(convex, name):
    three = convex(3, name)
    one = convex(1, "plain" if name == "static" else name)
    assert int(three["ranks"]) == 3
    np.testing.assert_allclose(three["iterates"], one["iterates"], rtol=0, atol=1e-12)


def test_straggler_is_backed_up_and_every_sample_counts_once(convex):
    run = convex(3, "straggler")
    won, backup, backup_won, discarded, abandoned = run["stats"].tolist()
    evaluations = int(run["evaluations"])
    assert evaluations == SCENARIOS["straggler"]["iters"] + 1
    assert int(run["samples"]) == evaluations * SAMPLES  # summed sample counts == batch size, every evaluation
    assert won == evaluations * PORTIONS  # each portion's result counted exactly once
    assert backup > 0 and discarded > 0, run["stats"]  # backups ran; the losing copies were thrown away
    assert abandoned <= discarded and backup_won <= backup
    np.testing.assert_allclose(run["iterates"], convex(1, "plain")["iterates"], rtol=0, atol=1e-12)
    assert convex(3, "static")["stats"][1] == 0  # the static split never backs up


DRIVER_ARGS = ["--batch_size=48", "--epochs=2", "--sb_batch_iters=2", "--threads=1", "--sb_chunk=4", "--sb_portions=12",
               "--log_every=1", "--sb_batch_growth=1", "--tensorboard=true"]  # fmt: skip


@pytest.fixture(scope="module")
def driver(tiny, tmp_path_factory):
    """Runs a (2 epochs), b (3 iterations, then --resume), c (rank 1 slowed 3x, batch 48 then 96) of the driver, 3 ranks."""
    runs = tmp_path_factory.mktemp("runs")
    out = launch(3, "train", runs, tiny, *DRIVER_ARGS, timeout=300)
    summaries = [json.loads(line[len("SUMMARY ") :]) for line in out.splitlines() if line.startswith("SUMMARY ")]
    assert [(s["run"], s["resume"]) for s in summaries] == [("a", False), ("b", False), ("b", True), ("c", False)]
    return runs, summaries


def test_driver_summary_and_run_directory(driver, read_events):
    runs, (a, *_) = driver
    for key in ("topology", "model", "parameters", "device", "steps", "images_per_s", "train_time_s", "val_split", "val_top1",
                "val_top5", "val_loss", "portions_total", "portions_backup", "portions_discarded", "lbfgs_iterations",
                "line_search_evals"):  # fmt: skip
        assert key in a, key
    assert a["topology"] == "sandblaster" and a["model"] == "alexnet_small" and a["ranks"] == 3
    assert a["steps"] == a["lbfgs_iterations"] == 2 * (120 // 48) * 2
    assert a["portions_total"] == 12 * a["gradient_evals"] and a["samples_counted"] == 48 * a["gradient_evals"]
    assert a["line_search_evals"] >= a["steps"]
    saved = json.loads((runs / "a" / "summary.json").read_text())
    assert saved == {k: v for k, v in a.items() if k not in ("run", "resume")}
    records = [json.loads(line) for line in (runs / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, a["steps"] + 1))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], losses  # it learns
    assert sum("val_top1" in r for r in records) == 2
    events = read_events(runs / "a")  # TensorBoard holds what metrics.jsonl and summary.json say, line-search counts too
    assert_same(events, expected_events(runs / "a"))
    assert {"train/line_search_evals", "train/step_length", "summary/portions_backup", "summary/gradient_evals"} <= set(events)


def test_resume_continues_the_same_trajectory(driver):
    runs, (a, b_first, b, _) = driver
    assert b_first["steps"] == 3 and b["steps"] == a["steps"]
    ca, cb = ck.load(runs / "a" / ck.LATEST), ck.load(runs / "b" / ck.LATEST)
    assert ca.optim["lbfgs_basis"].shape == (2 * 10 + 3, ca.params.size)  # the gathered history is in the checkpoint
    np.testing.assert_allclose(cb.params, ca.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cb.optim["lbfgs_basis"], ca.optim["lbfgs_basis"], rtol=1e-4, atol=1e-6)
    assert cb.state["lbfgs"]["order"] == ca.state["lbfgs"]["order"]
    assert b["gradient_evals"] == a["gradient_evals"] and b["portions_total"] == a["portions_total"]


def test_driver_with_a_straggler_and_a_growing_batch(driver):
    runs, (*_, c) = driver
    assert c["portions_total"] == 12 * c["gradient_evals"]  # every evaluation: each portion counted once
    assert c["portions_backup"] > 0 and c["portions_discarded"] > 0, c  # the slow rank's portions were re-run elsewhere
    sizes = [r["batch_size"] for r in map(json.loads, (runs / "c" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sizes == [48] * 4 + [96] * 2 and c["steps"] == 6 and c["batch_size"] == 96  # 2 batches of 48, then 1 of 96


def test_signal_checkpoints_and_resume_equals_uninterrupted(driver, tiny, tmp_path):
    """SIGUSR1 to mpirun mid-run (the CLI, 3 ranks): every rank finishes its iteration and exits 0, the root leaves
    checkpoint + preempted.json; --resume (without the straggler that kept the run slow enough to be caught) ends
    where the uninterrupted run `a` ended."""
    runs, (a, *_) = driver
    run = tmp_path / "run"
    args = ["--config", "fashion_sandblaster", f"--data={tiny}", f"--run_dir={run}", *DRIVER_ARGS]
    cmd = [*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *args]
    slow = ["--slow_rank=0", "--slow_factor=40", "--sb_dynamic=false"]  # static split: every iteration waits for rank 0
    code, err = signal_once_logging([*cmd, *slow], run)
    assert code == 0, err[-3000:]
    stopped = json.loads((run / "preempted.json").read_text())
    assert 0 < stopped["step"] < a["steps"] and not (run / "summary.json").exists(), stopped
    assert ck.load(run / ck.LATEST).step == stopped["step"]
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == a["steps"] and s["portions_total"] == a["portions_total"], s
    assert not (run / "preempted.json").exists()
    np.testing.assert_allclose(ck.load(run / ck.LATEST).params, ck.load(runs / "a" / ck.LATEST).params, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_an_older_version_is_refused(driver, tiny, tmp_path):
    """A checkpoint that keeps batch and inner step apart (the format before positions counted steps in the epoch)
    is refused with the fix named, on every rank, instead of resuming at the wrong place; the file is left alone."""
    runs, _ = driver
    saved = ck.load(runs / "a" / ck.LATEST)
    saved.state["inner"] = 0
    run = tmp_path / "old"
    run.mkdir()
    ck.save(run / ck.LATEST, saved)
    before = (run / ck.LATEST).read_bytes()
    args = ["--config", "fashion_sandblaster", f"--data={tiny}", f"--run_dir={run}", *DRIVER_ARGS, "--resume"]
    r = subprocess.run([*mpirun(3), sys.executable, "-m", "mpi4py", "-m", "hpcdnn", "train", *args], capture_output=True, text=True,
                       timeout=120, cwd=REPO)  # fmt: skip
    assert r.returncode != 0 and "written by an older hpcdnn" in r.stderr and "new --run_dir" in r.stderr, r.stderr[-2000:]
    assert (run / ck.LATEST).read_bytes() == before


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_gradient_does_not_poison_the_history(tmp_path, kind):
    """One non-finite g_new handed to propose: its pair is rejected, and L-BFGS goes on with the pairs it had (it
    must not fall back to steepest descent for the rest of the run because the bad slot still holds NaN or inf)."""
    from sandblaster_cases import POISON_AT

    launch(2, "convex", tmp_path, kind, kind)  # 1 rank (COMM_SELF), then 2
    for ranks in (1, 2):
        run = np.load(tmp_path / str(ranks) / f"{kind}.npz")
        steepest, losses = run["steepest"], run["losses"]
        assert int(run["rejected"]) == 1, (ranks, int(run["rejected"]))
        assert steepest[0] and not steepest[1:].any(), (ranks, steepest.astype(int).tolist())  # history used after the poison
        assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) <= 1e-15), losses
        assert len(steepest) > POISON_AT + 5


def test_reduce_scatter_gives_the_allreduce_trajectory(tmp_path):
    """Each rank receiving only its shard of the gradient (Reduce_scatter) follows the iterates of the full-gradient
    Allreduce; the shards gathered (what a checkpoint stores) are the gradient at the last iterate."""
    launch(3, "convex", tmp_path, "", "wolfe,full")
    shard, full = np.load(tmp_path / "3" / "wolfe.npz"), np.load(tmp_path / "3" / "full.npz")
    np.testing.assert_allclose(shard["iterates"], full["iterates"], rtol=0, atol=1e-12)
    X, labels, _ = logistic_problem()
    for run in (shard, full):
        x = run["iterates"][-1]
        want = loss_and_grad(x, X, labels)[1] / SAMPLES + WEIGHT_DECAY * x
        np.testing.assert_allclose(run["g"], want, rtol=1e-9, atol=1e-15)
