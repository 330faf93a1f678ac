"""`hpcdnn launch`: run the MPI launcher, hear every rank's heartbeat, and end the job when a rank is lost.

    hpcdnn launch -- mpirun -n 4 -x HPCDNN_WATCH python -m mpi4py -m hpcdnn train --config fashion_downpour --run_dir R
    hpcdnn launch --heartbeat_timeout=60 -- srun python -m mpi4py -m hpcdnn train ... --run_dir R

Why: when every process of a node dies, Open MPI's mpirun can exit 0 ("PRTE has lost communication with a remote
daemon"), and a node whose link goes down can hang the job; a job script trusting the launcher would call that a
success. The watcher listens on TCP; each rank of `hpcdnn train` (hpcdnn/heartbeat.py) connects, says which rank,
host, pid and role it is, sends its step about once a second and a last "finished"/"preempted"/"error" line.

Ranks find the watcher through HPCDNN_WATCH=TOKEN@HOST:PORT,... (this host's addresses), which srun and MPICH's Hydra
forward by themselves and Open MPI's mpirun forwards with `-x HPCDNN_WATCH`; else through RUN_DIR/watch.json when
the run directory is on a file system every node sees. A rank that reaches neither warns once and trains on.

Exit status:
  the launcher's    the run finished (every rank said goodbye, or a fresh summary.json / preempted.json)
  75 (EX_TEMPFAIL)  a rank was lost: its connection closed without a goodbye (the process or its node died) or it
                    was silent for --heartbeat_timeout seconds (link down, frozen); or the launcher exited 0 but
                    the run did not finish. The launcher's process group is ended (SIGTERM, 10 s, SIGKILL) and
                    RUN_DIR/failed.json names the ranks, hosts and last steps: `--resume` continues from the last
                    checkpoint once the nodes are healthy.
  1                 the launcher exited 0 after a rank reported an error
SIGUSR1/SIGUSR2/SIGTERM/SIGINT/SIGHUP to the watcher go to the launcher (which forwards them to the ranks).
RUN_DIR/ranks.json is rewritten every few seconds: each rank's host, role, step, steps/s and last heartbeat.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from hpcdnn import heartbeat
from hpcdnn.atomic import write_json

EXIT_LOST = 75  # EX_TEMPFAIL: lost a rank; resumable
GRACE_S = 10.0  # between SIGTERM and SIGKILL to the launcher's process group
SETTLE_S = 1.0  # after the launcher's exit: the ranks' last messages still in flight
STATUS_EVERY_S = 2.0
TEARDOWN_S = 60.0  # at least this long (or --heartbeat_timeout) for a launcher to exit once every rank said goodbye
STATUS, FAILED = "ranks.json", "failed.json"
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GOODBYES = ("finished", "preempted", "error")


def run_dir_of(cmd: list[str]) -> Path | None:
    """The --run_dir (or --run-dir) of the training command inside the launcher command, absolute."""
    for i, arg in enumerate(cmd):
        for flag in ("--run_dir", "--run-dir"):
            if arg.startswith(flag + "="):
                return Path(arg.split("=", 1)[1]).absolute()
            if arg == flag and i + 1 < len(cmd):
                return Path(cmd[i + 1]).absolute()
    return None


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, the loopback last (ranks on this host can always use it)."""
    found = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # SIOCGIFADDR: interfaces without an IPv4 address raise
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                found.append(socket.inet_ntoa(raw[20:24]))
    outside = [a for a in dict.fromkeys(found) if not a.startswith("127.")]
    return [*outside, "127.0.0.1"]


def exit_status(code: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code


class Rank:
    """What the watcher knows of one rank."""

    def __init__(self, msg: dict, now: float) -> None:
        self.rank, self.host, self.pid, self.world = int(msg["rank"]), str(msg["host"]), int(msg["pid"]), int(msg["world"])
        self.role, self.step, self.heard, self.state = str(msg.get("role", "?")), 0, now, "running"
        self.reason, self.closed_at, self.wall, self.mpi_error = "", 0.0, time.time(), False
        self.history: deque[tuple[float, int]] = deque(maxlen=12)  # (time, step) of recent heartbeats: steps/s

    def update(self, msg: dict, now: float) -> None:
        self.role, self.step, self.heard, self.wall = str(msg.get("role", self.role)), int(msg.get("step", self.step)), now, time.time()
        self.history.append((now, self.step))
        if msg.get("t") in GOODBYES:
            self.state, self.reason, self.mpi_error = msg["t"], str(msg.get("error", "")), bool(msg.get("mpi"))

    def rate(self) -> float:
        if len(self.history) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.history[0], self.history[-1]
        return round((s1 - s0) / (t1 - t0), 3) if t1 > t0 else 0.0

    def describe(self) -> str:
        return f"rank {self.rank} ({self.role}) on {self.host} (pid {self.pid}), last step {self.step}"

    def record(self, now: float) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "role": self.role, "step": self.step, "state": self.state,
                "reason": self.reason, "heard_s_ago": round(now - self.heard, 1), "last_heard": self.wall, "steps_per_s": self.rate()}  # fmt: skip


class Watcher:
    """Runs `cmd` in its own process group and follows the ranks' heartbeats until the run ends; `run()` -> exit code."""

    def __init__(self, cmd: list[str], run_dir: Path, timeout_s: float = 30.0, address: str | None = None) -> None:
        self.cmd, self.run_dir, self.timeout_s = cmd, run_dir, timeout_s
        self.ranks: dict[int, Rank] = {}
        self.conns: dict[socket.socket, tuple[bytearray, list[int]]] = {}  # buffer, rank (once it said hello)
        self.sel = selectors.DefaultSelector()
        self.server = socket.create_server(("", 0), backlog=256)
        port = self.server.getsockname()[1]
        self.spec = f"{secrets.token_hex(8)}@" + ",".join(f"{a}:{port}" for a in ([address] if address else local_addresses()))
        self.token = self.spec.split("@")[0]
        self.sel.register(self.server, selectors.EVENT_READ)
        self.proc: subprocess.Popen | None = None
        self.started = time.time()
        self.status_at = 0.0
        self.stuck = False  # the watcher ended a launcher that outlived its finished ranks

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / FAILED).unlink(missing_ok=True)  # an earlier attempt's: this one is about to be watched
        write_json(self.run_dir / heartbeat.FILE, {"watch": self.spec, "pid": os.getpid(), "host": socket.gethostname()})
        old = {}
        try:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, heartbeat.ENV: self.spec}, start_new_session=True)
            old = {s: signal.signal(s, self._forward) for s in FORWARDED}
            return self._watch()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.proc is not None and self.proc.poll() is None:  # only if the watcher itself failed: no orphaned job
                self._end_launcher()
            (self.run_dir / heartbeat.FILE).unlink(missing_ok=True)
            self.sel.close()
            self.server.close()

    def _forward(self, signum, frame) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def _watch(self) -> int:
        exited_at = None
        while True:
            for key, _ in self.sel.select(timeout=0.2):
                self._accept() if key.fileobj is self.server else self._read(key.fileobj)
            now = time.monotonic()
            lost = self._lost(now)
            if lost:
                return self._fail(lost, "")
            if now - self.status_at >= STATUS_EVERY_S:
                self._write_status(now)
            if exited_at is None and self.proc.poll() is not None:
                exited_at = now
            if exited_at is None:
                self._end_lingering(now)
            if exited_at is not None and now - exited_at >= SETTLE_S:
                return self._ended(self.proc.returncode, now)

    def _end_lingering(self, now: float) -> None:
        """End a launcher that outlives its job: a rank failed, or every rank said goodbye, long ago."""
        errors = [r.heard for r in self.ranks.values() if r.state == "error"]
        done = self._said_goodbye()
        if errors and now - min(errors) > self.timeout_s:
            why = f"a rank failed {now - min(errors):.0f} s ago"
        elif done is not None and now - done > max(self.timeout_s, TEARDOWN_S):
            why, self.stuck = f"every rank said goodbye {now - done:.0f} s ago", True
        else:
            return
        print(f"hpcdnn launch: {why} and the launcher is still running: ending it", file=sys.stderr, flush=True)
        self._end_launcher()

    def _accept(self) -> None:
        conn, _ = self.server.accept()
        conn.setblocking(False)
        self.conns[conn] = (bytearray(), [])
        self.sel.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        buf, who = self.conns[conn]
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf += data
        *lines, rest = buf.split(b"\n")
        buf[:] = rest
        now = time.monotonic()
        for line in lines:
            try:
                msg = json.loads(line)
                if msg.get("t") == "hello":
                    if msg.get("token") != self.token:  # another run's rank (a stale watch.json): not ours
                        raise ValueError("wrong token")
                    self.ranks[int(msg["rank"])] = Rank(msg, now)
                    who.append(int(msg["rank"]))
                elif who:
                    self.ranks[who[0]].update(msg, now)
            except (ValueError, KeyError, TypeError):
                data = b""  # not our protocol: drop the connection
                break
        if not data:
            self.sel.unregister(conn)
            conn.close()
            del self.conns[conn]
            r = self.ranks.get(who[0]) if who else None
            if r is not None and r.state == "running":
                r.state, r.closed_at = "closed", now

    def _lost(self, now: float) -> list[Rank]:
        """Ranks whose connection closed without a goodbye, or silent for longer than the timeout. A closure after
        some rank reported an error is that error's consequence (the launcher aborts the job), not a lost node; but
        not after an MPI error: that is what a survivor raises when a peer died (MPICH), whichever the watcher hears first."""
        first_error = min((r.heard for r in self.ranks.values() if r.state == "error" and not r.mpi_error), default=float("inf"))
        lost = []
        for r in self.ranks.values():
            if r.state == "closed" and r.closed_at < first_error:
                r.reason = "its connection closed without a goodbye: the process or its node died"
                lost.append(r)
            elif r.state == "running" and now - r.heard > self.timeout_s and first_error == float("inf"):
                r.reason = f"no heartbeat for {now - r.heard:.0f} s (> --heartbeat_timeout={self.timeout_s:g}): link down or frozen"
                lost.append(r)
        return lost

    def _ended(self, code: int, now: float) -> int:
        """The launcher has exited with `code`: lost ranks, a finished run, or an unfinished one."""
        code = exit_status(code)
        lost = self._lost(now)
        if lost:
            return self._fail(lost, f"the launcher exited {code}; ")
        self._write_status(now)
        missing = self._missing()
        errors = [r for r in self.ranks.values() if r.state == "error"]
        for r in errors:
            print(f"hpcdnn launch: {r.describe()} failed: {r.reason}", file=sys.stderr, flush=True)
        if not missing or self._fresh("summary.json") or self._fresh("preempted.json"):
            return 0 if self.stuck else code or (1 if errors else 0)
        names = "; ".join(missing)
        if code or errors:
            print(f"hpcdnn launch: the launcher exited {code}; never said goodbye: {names}", file=sys.stderr, flush=True)
            return code or 1
        why = f"the launcher exited 0 but the run did not finish (no fresh summary.json or preempted.json in {self.run_dir}); "
        return self._fail([r for r in self.ranks.values() if r.state not in GOODBYES], why + f"never said goodbye: {names}; ")

    def _said_goodbye(self) -> float | None:
        """When the last rank said "finished" or "preempted", once every rank of the job has; else None."""
        world = max((r.world for r in self.ranks.values()), default=0)
        if not world or len(self.ranks) < world or any(r.state not in GOODBYES[:2] for r in self.ranks.values()):
            return None
        return max(r.heard for r in self.ranks.values())

    def _missing(self) -> list[str]:
        """Every rank that has not said goodbye, the ones never heard of included."""
        world = max((r.world for r in self.ranks.values()), default=0)
        out = [r.describe() for r in sorted(self.ranks.values(), key=lambda r: r.rank) if r.state not in GOODBYES]
        unseen = [i for i in range(world) if i not in self.ranks]
        out += [f"rank {i} (never connected)" for i in unseen]
        return out or (["no rank reached the watcher"] if not self.ranks else [])

    def _fresh(self, name: str) -> bool:
        path = self.run_dir / name
        return path.exists() and path.stat().st_mtime >= self.started - 1.0

    def _fail(self, lost: list[Rank], why: str) -> int:
        """Name the lost ranks, end the launcher's process group, write RUN_DIR/failed.json; EXIT_LOST."""
        for r in lost:
            r.state = "lost"
            print(f"hpcdnn launch: error: lost {r.describe()}: {r.reason}", file=sys.stderr, flush=True)
        hosts = sorted({r.host for r in lost})
        print(f"hpcdnn launch: {why}ending the job (lost node(s): {', '.join(hosts) or '?'}); exit {EXIT_LOST}: "
              f"`--resume` continues from the last checkpoint in {self.run_dir} once the nodes are healthy", file=sys.stderr, flush=True)  # fmt: skip
        self._end_launcher()
        now = time.monotonic()
        write_json(self.run_dir / FAILED, {"time": time.time(), "exit": EXIT_LOST, "reason": (why + "lost rank(s)") if lost else why.rstrip("; "),
                                           "lost": [r.record(now) for r in lost], "hosts": hosts, "command": self.cmd,
                                           "launcher_exit": exit_status(self.proc.returncode)})  # fmt: skip
        self._write_status(now)
        return EXIT_LOST

    def _end_launcher(self) -> None:
        """SIGTERM to the launcher's process group, GRACE_S to end, then SIGKILL to whatever of the group is left."""
        pgid = self.proc.pid  # start_new_session: the launcher leads its own group
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()

    def _write_status(self, now: float) -> None:
        self.status_at = now
        ranks = [r.record(now) for r in sorted(self.ranks.values(), key=lambda r: r.rank)]
        with contextlib.suppress(OSError):
            write_json(self.run_dir / STATUS, {"time": time.time(), "launcher_pid": self.proc.pid, "ranks": ranks})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpcdnn launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="hpcdnn launch [-h] [--heartbeat_timeout S] [--address HOST] -- LAUNCHER ... hpcdnn train ... --run_dir R")  # fmt: skip
    parser.add_argument("--heartbeat_timeout", "--heartbeat-timeout", type=float, default=30.0, metavar="S",
                        help="a rank silent this long is lost (default 30 s)")  # fmt: skip
    parser.add_argument("--address", help="the one address ranks should use to reach this host (default: all of its IPv4 addresses)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command, after --")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no launcher command: hpcdnn launch -- mpirun -n 4 python -m mpi4py -m hpcdnn train ... --run_dir R")
    if args.heartbeat_timeout <= 0:
        parser.error(f"--heartbeat_timeout must be a positive number of seconds, not {args.heartbeat_timeout:g}")
    run_dir = run_dir_of(cmd)
    if run_dir is None:
        parser.error("the training command has no --run_dir=DIR: the watcher needs it for failed.json and to tell a finished "
                     "run from a lost one; add --run_dir=DIR (the preset's run_dir is not read here)")  # fmt: skip
    return Watcher(cmd, run_dir, args.heartbeat_timeout, args.address).run()
