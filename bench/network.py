"""Benchmark hpcdnn across nodes: the virtual cluster of tests/cluster, links unshaped, 10 and 1 Gbit/s (root only).

    python bench/network.py                        # this venv's MPI (make bench runs it for .venv and .venv-mpich)
    python bench/network.py --rates off,1 --floats 262144 --json out.json

Brings up its own cluster (4 nodes hb1..hb4 on 10.79.0.0/24; hb1 runs the launcher, one rank on each of hb2, hb3,
hb4) and takes it down at the end. For each link rate, every node's link shaped with tbf (both directions):

  link        a plain TCP stream hb2 -> hb3 (Python sockets inside the namespaces, network_tcp.py)
  downpour    the real push and fetch (ParamServer, DownpourWorker.push/fetch, fashion_downpour's Adagrad) of a
              --floats slice, server on hb2, worker on hb3: seconds, bytes on the worker's link per push and fetch
              (its eth0 counters), push + fetch against the link limit 2 x vector bytes / link rate (one vector
              out, one back), and an MPI_Put of the same slice (what a server-side update would send)
  allreduce   in-place Allreduce of the same slice over hb2, hb3, hb4 vs the ring bound 2(p-1)/p x bytes / rate
  training    alexnet_small images/s (network_train.py): local (one node), allreduce (3 nodes) ours vs torch DDP
              over gloo, Downpour (server on hb2, workers on hb3 and hb4)
The link rate of an unshaped link is the TCP stream's. AlexNet figures (60,965,224 floats) are extrapolated
linearly from the slice, and say so. All nodes share this machine's cores: 3 ranks on 2 cores compete for CPU.
vcluster.sh sizes tbf's burst as one 250 Hz tick at the rate (5 MB at 10 Gbit/s, 512 KB at 1 Gbit/s), so one 4 MB
transfer after an idle moment can beat a 10 Gbit/s link's rate: at 10 Gbit/s a single operation's figure is a bound.
Prints one table per part with the load average beside every figure; always exits 0 (it reports, it does not gate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "cluster"))
from vcluster import VirtualCluster, available  # noqa: E402  (tests/cluster/vcluster.py)

from hpcdnn.mpirun import flavour  # noqa: E402

ALEXNET = 60_965_224  # parameters of the paper's AlexNet (README)
NAME, SUBNET = "hb", "10.79.0"
RANKS = ["hb2", "hb3", "hb4"]  # rank i on RANKS[i]; hb1 runs the launcher
TCP_PORT = 5201


def load() -> float:
    return round(os.getloadavg()[0], 2)


def kill_nodes(vc: VirtualCluster) -> None:
    """After a timeout: end every process left inside our nodes (all of them ours)."""
    for node in vc.nodes:
        vc.kill(node)


def tcp_stream(vc: VirtualCluster, seconds: float) -> dict:
    """hb2 sends to hb3 for `seconds`: the receiver's rate, and what crossed hb2's link meanwhile."""
    script = str(HERE / "network_tcp.py")
    recv = subprocess.Popen([*vc.as_node("hb3"), sys.executable, script, "recv", str(TCP_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        recv.stdout.readline()  # "listening"
        before = vc.wire_bytes()
        subprocess.run([*vc.as_node("hb2"), sys.executable, script, "send", vc.addr("hb3"), str(TCP_PORT), str(seconds)],
                       check=True, timeout=seconds + 30)  # fmt: skip
        got = json.loads(recv.stdout.readline())
        wire = vc.wire_bytes(since=before)["hb2"][0]
    finally:
        recv.wait(timeout=30)
    return {"gbit": got["bytes"] * 8 / got["s"] / 1e9, "bytes": got["bytes"], "wire_bytes": wire, "load": load()}


def run_case(vc: VirtualCluster, mode: str, argv: list[str], timeout: float) -> dict:
    """network_case.py `mode` with one rank per node of RANKS; its RESULT, or {"error": why}."""
    cmd = [*vc.mpirun(RANKS), sys.executable, "-m", "mpi4py", str(HERE / "network_case.py"), mode, *argv]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_nodes(vc)
        return {"error": f"{mode}: did not finish in {timeout:.0f} s (raise --timeout)"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        return {"error": f"{mode}: exited {r.returncode}: {r.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1][7:]) | {"wall_s": time.perf_counter() - t}


def measure(vc: VirtualCluster, rate: float | None, args) -> dict:
    """Everything at one link rate."""
    for node in vc.nodes:
        vc.shape(node, rate)
    row = {"rate_gbit": rate, "link": max((tcp_stream(vc, args.tcp_seconds) for _ in range(2)), key=lambda x: x["gbit"])}
    common = [f"--repeats={args.repeats}"]
    row["vector"] = run_case(vc, "vector", [*common, f"--floats={args.floats}"], args.timeout)
    row["train"] = run_case(vc, "train", [*common, f"--batch={args.batch}", f"--steps={args.steps}",
                                          f"--downpour-steps={args.downpour_steps}"], args.timeout)  # fmt: skip
    return row


def md(cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def header(cells) -> None:
    print(md(cells) + "\n" + md("---" for _ in cells))


def label(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Gbit/s"


def report_vector(rows: list[dict], floats: int) -> None:
    """The link, Downpour push/fetch and Allreduce table, then the AlexNet extrapolation."""
    mb = floats * 4 / 1e6
    print(f"\nLink, Downpour push/fetch (Adagrad) and Allreduce of {floats:,} float32 ({mb:.1f} MB), median; B/param = bytes on the "
          "worker's link per parameter, sent + received (out/in; allreduce: the busiest node); limit = 2 x bytes / link rate; ring = 2(p-1)/p x bytes / rate, p = 3")  # fmt: skip
    head = ("link", "TCP Gbit/s", "push s", "push B/param (out/in)", "fetch s", "fetch B/param (out/in)", "push+fetch / limit",
            "put s (B/param)", "allreduce s", "ring bound / allreduce", "allreduce B/param (out/in)", "load")  # fmt: skip
    header(head)
    for row in rows:
        v, link = row["vector"], row["link"]
        if "error" in v:
            print(md((label(row["rate_gbit"]), f"{link['gbit']:.2f}", v["error"])))
            continue
        d, a = v["downpour"], v["allreduce"]
        rate = (row["rate_gbit"] or link["gbit"]) * 1e9 / 8  # bytes/s
        limit = 2 * floats * 4 / rate
        ring = 2 * (a["ranks"] - 1) / a["ranks"] * floats * 4 / rate
        per = {
            k: f"{(x['sent'] + x['received']) / floats:.1f} ({x['sent'] / floats:.1f}/{x['received'] / floats:.1f})"
            for k, x in (*d.items(), ("ar", a))
        }
        cells = (label(row["rate_gbit"]), f"{link['gbit']:.2f}", f"{d['push']['s']:.3f}", per["push"], f"{d['fetch']['s']:.3f}", per["fetch"],
                 f"{limit / (d['push']['s'] + d['fetch']['s']):.3f}", f"{d['put']['s']:.4f} ({(d['put']['sent'] + d['put']['received']) / floats:.1f})",
                 f"{a['s']:.4f}", f"{ring / a['s']:.2f}", per["ar"], f"{link['load']}/{d['push']['load']}/{a['load']}")  # fmt: skip
        print(md(cells))
    print(f"\nAlexNet ({ALEXNET:,} floats, 244 MB), EXTRAPOLATED linearly from the {mb:.1f} MB slice:")
    for row in rows:
        if "error" in row["vector"]:
            continue
        d, a = row["vector"]["downpour"], row["vector"]["allreduce"]
        f = ALEXNET / floats
        rate = (row["rate_gbit"] or row["link"]["gbit"]) * 1e9 / 8
        print(f"  {label(row['rate_gbit']):<12} push {d['push']['s'] * f:8.1f} s, fetch {d['fetch']['s'] * f:7.1f} s, put {d['put']['s'] * f:6.2f} s, "
              f"allreduce {a['s'] * f:6.2f} s; link limit of push+fetch {2 * ALEXNET * 4 / rate:.2f} s")  # fmt: skip


def report_train(rows: list[dict], args) -> None:
    """The images/s table."""
    print(f"\nalexnet_small images/s (all ranks), 1 torch thread per rank, batch {args.batch} per rank; local and allreduce: median of "
          f"{args.repeats} timings of {args.steps} steps; Downpour: {args.downpour_steps} steps per worker after one warm-up")  # fmt: skip
    head = ("link", "local (1 node)", "allreduce ours (3 nodes)", "DDP gloo (3 nodes)", "ours/DDP (paired)", "ours overlap/DDP",
            "Downpour (1 server + 2 workers)", "Downpour/local", "Downpour step s (push+fetch share)", "load")  # fmt: skip
    header(head)
    for row in rows:
        t = row["train"]
        if "error" in t:
            print(md((label(row["rate_gbit"]), t["error"])))
            continue
        loc, ar, dp = t["local"]["img_s"], t["allreduce"], t["downpour"]
        ours = ar[ar["default"]]
        cells = (label(row["rate_gbit"]), f"{loc:.0f}", f"{ours['img_s']:.0f} ({ar['default']})", f"{ar['ddp']['img_s']:.0f}",
                 f"{ours['vs_ddp']:.2f}", f"{ar['overlap']['vs_ddp']:.2f}", f"{dp['img_s']:.1f}", f"{dp['img_s'] / loc:.3f}",
                 f"{dp['step_s']:.2f} ({100 * dp['push_fetch_share']:.0f}%)", f"{t['local']['load']}/{ar['load']}/{dp['load']}")  # fmt: skip
        print(md(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="off,10,1", help="link rates in Gbit/s, comma-separated; off = unshaped")
    ap.add_argument("--floats", type=int, default=1 << 20, help="slice pushed/fetched/reduced (1M floats = 4 MB)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per measurement (median kept)")
    ap.add_argument("--batch", type=int, default=32, help="images per rank per training step")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timing (local, allreduce, DDP)")
    ap.add_argument("--downpour-steps", type=int, default=2, help="timed Downpour steps per worker")
    ap.add_argument("--tcp-seconds", type=float, default=1.5, help="length of each TCP stream (best of 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before one MPI job is killed")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"bench/network.py: skipped: {why} (run `make bench` as root)")
        return 0
    rates = [None if r.strip() == "off" else float(r) for r in args.rates.split(",")]
    mpi = flavour()
    vc, rows, t0 = VirtualCluster(nodes=4, name=NAME, subnet=SUBNET), [], time.perf_counter()
    print(
        f"bench/network.py: {mpi}, nodes {', '.join(RANKS)} (launcher on hb1), links {', '.join(map(label, rates))}; load {load()}",
        flush=True,
    )
    try:
        vc.up()
        for rate in rates:
            rows.append(measure(vc, rate, args))
            print(f"  {label(rate)} done after {time.perf_counter() - t0:.0f} s (load {load()})", flush=True)
    finally:
        vc.down()
    mpi_version = next((r[k]["mpi"] for r in rows for k in ("vector", "train") if "mpi" in r[k]), mpi)
    print(f"\n{mpi_version.strip(chr(0)).strip()} | {os.cpu_count()} CPUs shared by all nodes | load = 1-min load average")
    report_vector(rows, args.floats)
    report_train(rows, args)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"mpi": mpi, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
