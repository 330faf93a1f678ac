"""Benchmark hpcdnn across nodes: the virtual cluster of tests/cluster, links unshaped and 1 Gbit/s (root only).

    python bench/network.py                        # this venv's MPI (make bench runs it for .venv and .venv-mpich)
    python bench/network.py --rates off,10,1 --floats 262144 --json out.json

Brings up its own cluster (4 nodes hb1..hb4 on 10.79.0.0/24; hb1 runs the launcher, ranks on hb2, hb3, hb4) and
takes it down at the end, also on failure. For each link rate, every node's link shaped with tbf (both directions):

  link        a plain TCP stream hb2 -> hb3 (Python sockets inside the namespaces, network_tcp.py)
  push/fetch  Downpour's push and fetch of a --floats slice, server on hb2, worker on hb3, fashion_downpour's Adagrad,
              for the server-side update (the library: fp32 and bf16 push) and the deleted worker-side one
              (network_case.WorkerSide: Get_accumulate(SUM) of g^2 + Accumulate of the step; fetch
              Get_accumulate(NO_OP)), with a plain Put of the slice: seconds, and bytes on the worker's link per
              parameter (its eth0 counters); push + fetch against the link limit 2 x vector bytes / link rate, and
              beside the measured seconds the cost model's push_s and fetch_s + apply_s (hpcdnn/sim/cost.py)
  allreduce   in-place Allreduce of the same slice over hb2, hb3, hb4 vs the ring bound 2(p-1)/p x bytes / rate
  training    alexnet_small images/s (network_train.py): local (one node) and allreduce (3 nodes) ours vs torch DDP
              over gloo; Downpour 1 server + 2 workers, both designs, server on hb2 and workers on hb3 (and, with
              --overlap if the library has it, at 1 Gbit/s), against the same 3 ranks all on hb2
The link rate of an unshaped link is the TCP stream's. AlexNet figures (60,965,224 floats) are extrapolated
linearly from the slice, and say so. All nodes share this machine's cores: 3 ranks on 2 cores compete for CPU.
vcluster.sh sizes tbf's burst as one 250 Hz tick at the rate (512 KB at 1 Gbit/s), so one transfer after an idle
moment can beat the link's rate by that much.
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

from hpcdnn.config import Config  # noqa: E402
from hpcdnn.mpirun import flavour  # noqa: E402

ALEXNET = 60_965_224  # parameters of the paper's AlexNet (README)
NAME, SUBNET = "hb", "10.79.0"
RANKS = ["hb2", "hb3", "hb4"]  # rank i on RANKS[i]; hb1 runs the launcher
SPLIT = ["hb2", "hb3", "hb3"]  # Downpour across nodes: the server on its own node, both workers on another
ONE_HOST = ["hb2", "hb2", "hb2"]  # the same ranks on one node
HAS_OVERLAP = "overlap" in Config.__dataclass_fields__  # the Downpour worker's communication thread (--overlap)
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


def run_case(vc: VirtualCluster, mode: str, argv: list[str], timeout: float, hosts: list[str] = RANKS) -> dict:
    """network_case.py `mode` with rank i on hosts[i]; its RESULT, or {"error": why}."""
    cmd = [*vc.mpirun(hosts), sys.executable, "-m", "mpi4py", str(HERE / "network_case.py"), mode, *argv]
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


def downpour(vc: VirtualCluster, hosts: list[str], design: str, args, overlap: bool = False) -> dict:
    steps = args.downpour_steps if design == "server" else args.worker_side_steps
    argv = [f"--design={design}", f"--batch={args.batch}", f"--steps={steps}"] + (["--overlap"] if overlap else [])
    return run_case(vc, "downpour", argv, args.timeout, hosts)


def measure(vc: VirtualCluster, rate: float | None, args) -> dict:
    """Everything at one link rate."""
    for node in vc.nodes:
        vc.shape(node, rate)
    row = {"rate_gbit": rate, "link": max((tcp_stream(vc, args.tcp_seconds) for _ in range(2)), key=lambda x: x["gbit"])}
    row["vector"] = run_case(vc, "vector", [f"--repeats={args.repeats}", f"--floats={args.floats}"], args.timeout)
    row["train"] = run_case(vc, "train", [f"--repeats={args.repeats}", f"--batch={args.batch}", f"--steps={args.steps}"], args.timeout)
    row["downpour"] = {d: downpour(vc, SPLIT, d, args) for d in ("server", "worker")}
    if rate == 1 and HAS_OVERLAP:
        row["downpour"]["server overlap"] = downpour(vc, SPLIT, "server", args, overlap=True)
    return row


def md(cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def header(cells) -> None:
    print(md(cells) + "\n" + md("---" for _ in cells))


def label(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Gbit/s"


def link_rate(row: dict) -> float:
    """The link's bytes/s: the shaped rate, or the TCP stream's when unshaped."""
    return (row["rate_gbit"] or row["link"]["gbit"]) * 1e9 / 8


def per_param(x: dict, floats: int) -> str:
    return f"{(x['sent'] + x['received']) / floats:.2f} ({x['sent'] / floats:.2f}/{x['received'] / floats:.2f})"


def report_bytes(rows: list[dict], floats: int) -> None:
    """Bytes on the worker's link per parameter, per push and per fetch, every design."""
    print(f"\n1. Bytes on the worker's link (hb3 eth0 counters) per parameter, {floats:,} float32 ({floats * 4 / 1e6:.1f} MB), "
          "median; total (out/in); goal: <= 1.1 x 4 = 4.4 B/param in total per push and per fetch")  # fmt: skip
    header(("link", "design", "push B/param (out/in)", "fetch B/param (out/in)", "goal met", "load"))
    for row in rows:
        v = row["vector"]
        if "error" in v:
            print(md((label(row["rate_gbit"]), v["error"])))
            continue
        for name, d in v["downpour"].items():
            goal = max(d[k]["sent"] + d[k]["received"] for k in ("push", "fetch")) <= 4.4 * floats
            print(md((label(row["rate_gbit"]), name, per_param(d["push"], floats), per_param(d["fetch"], floats),
                      "yes" if goal else "no", f"{d['push']['load']}")))  # fmt: skip
        put = v["downpour"]["worker-side"]["put"]
        print(md((label(row["rate_gbit"]), "plain Put (reference)", per_param(put, floats), "", "", put["load"])))


def model_times(floats: int, rate_bps: float, design: str) -> tuple[float, float] | None:
    """The cost model's push_s and fetch_s + apply_s (a fetch waits for its push's apply, as measured here) for a
    `floats` slice on one link of rate_bps bytes/s, 1 server, fashion_downpour's Adagrad; None for the worker-side
    design (the model describes the library's server-side one)."""
    if not design.startswith("server"):
        return None
    from hpcdnn.config import load_config
    from hpcdnn.sim.cost import Cluster, ModelCost, apply_s, fetch_s, push_s

    cfg = load_config("fashion_downpour", [f"--push_dtype={design.split()[1]}"])
    model, cluster = ModelCost("slice", floats, 0.0, 0), Cluster.of_link("cpu", 1, 1, rate_bps * 8 / 1e9)
    return push_s(model, cluster, cfg), fetch_s(model, cluster) + apply_s(model, cluster, cfg)


def model_cells(d: dict, floats: int, rate_bps: float, design: str) -> tuple[str, ...]:
    """Predicted push and fetch + apply seconds and measured / predicted, or blanks where the model says nothing."""
    got = model_times(floats, rate_bps, design)
    if got is None:
        return "", "", ""
    push, fetch = got
    return f"{push:.4f}", f"{fetch:.4f}", f"{d['push']['s'] / push:.2f} / {d['fetch']['s'] / fetch:.2f}"


def report_speed(rows: list[dict], floats: int) -> None:
    """Push + fetch against the link limit, new vs old, and the AlexNet extrapolation."""
    print(f"\n2. Push + fetch of {floats:,} float32 vs the link limit 2 x {floats * 4 / 1e6:.1f} MB / link rate (seconds, median; the "
          "fetch waits until the server has applied the push); new/old = worker-side time / server-side time")  # fmt: skip
    print("   model = the cost model's push_s and fetch_s + apply_s (hpcdnn/sim/cost.py) for this slice at the link rate "
          "(unshaped: the TCP stream's), 5 us latency, apply at the 'cpu' profile's memory bandwidth")  # fmt: skip
    header(("link", "TCP Gbit/s", "design", "push s", "fetch s", "model push s", "model fetch+apply s", "measured/model push / fetch",
            "limit / (push+fetch)", "new/old speed-up", f"AlexNet push+fetch s (EXTRAPOLATED x{ALEXNET / floats:.1f})", "AlexNet limit s",
            "load"))  # fmt: skip
    for row in rows:
        v, link = row["vector"], row["link"]
        if "error" in v:
            continue
        limit = 2 * floats * 4 / link_rate(row)
        old = v["downpour"]["worker-side"]
        t_old = old["push"]["s"] + old["fetch"]["s"]
        for name, d in v["downpour"].items():
            t = d["push"]["s"] + d["fetch"]["s"]
            cells = (label(row["rate_gbit"]), f"{link['gbit']:.2f}", name, f"{d['push']['s']:.4f}", f"{d['fetch']['s']:.4f}",
                     *model_cells(d, floats, link_rate(row), name), f"{limit / t:.3f}",
                     f"{t_old / t:.1f}x" if name != "worker-side" else "1", f"{t * ALEXNET / floats:.2f}",
                     f"{2 * ALEXNET * 4 / link_rate(row):.2f}", f"{link['load']}/{d['push']['load']}/{d['fetch']['load']}")  # fmt: skip
            print(md(cells))
        put = old["put"]
        print(md((label(row["rate_gbit"]), f"{link['gbit']:.2f}", "plain Put", f"{put['s']:.4f}", "", "", "", "", f"{limit / 2 / put['s']:.3f} (one way)",
                  "", f"{put['s'] * ALEXNET / floats:.2f} (one way)", "", put["load"])))  # fmt: skip


def report_allreduce(rows: list[dict], floats: int) -> None:
    print(f"\n3. In-place Allreduce of {floats:,} float32 over hb2, hb3, hb4 (median); ring = 2(p-1)/p x bytes / rate, p = 3; "
          "B/param on the busiest node's link")  # fmt: skip
    header(("link", "TCP Gbit/s", "allreduce s", "ring bound / allreduce", "B/param (out/in)", "AlexNet s (EXTRAPOLATED)", "load"))
    for row in rows:
        v = row["vector"]
        if "error" in v:
            continue
        a = v["allreduce"]
        ring = 2 * (a["ranks"] - 1) / a["ranks"] * floats * 4 / link_rate(row)
        print(md((label(row["rate_gbit"]), f"{row['link']['gbit']:.2f}", f"{a['s']:.4f}", f"{ring / a['s']:.2f}", per_param(a, floats),
                  f"{a['s'] * ALEXNET / floats:.2f}", a["load"])))  # fmt: skip


def report_train(rows: list[dict], one_host: dict, args) -> None:
    """The images/s tables: local/allreduce/DDP, then Downpour across nodes vs one host."""
    print(f"\n4. alexnet_small images/s (all ranks), 1 torch thread per rank, batch {args.batch} per rank, median of "
          f"{args.repeats} timings of {args.steps} steps (interleaved)")  # fmt: skip
    header(("link", "local (1 node)", "allreduce ours (3 nodes)", "DDP gloo (3 nodes)", "ours/DDP (paired)", "ours overlap/DDP", "load"))
    for row in rows:
        t = row["train"]
        if "error" in t:
            print(md((label(row["rate_gbit"]), t["error"])))
            continue
        loc, ar = t["local"]["img_s"], t["allreduce"]
        ours = ar[ar["default"]]
        print(md((label(row["rate_gbit"]), f"{loc:.0f}", f"{ours['img_s']:.0f} ({ar['default']})", f"{ar['ddp']['img_s']:.0f}",
                  f"{ours['vs_ddp']:.2f}", f"{ar['overlap']['vs_ddp']:.2f}", f"{t['local']['load']}/{ar['load']}")))  # fmt: skip
    print(f"\n5. Downpour (fashion_downpour: Adagrad, n_push = n_fetch = 1, no warmstart), alexnet_small, 1 server + 2 workers, "
          f"1 torch thread per rank, batch {args.batch} per worker, {args.downpour_steps} timed steps per worker ({args.worker_side_steps} for "
          "the worker-side design) after one warm-up; "
          f"across = server on {SPLIT[0]}, workers on {SPLIT[1]}; one host = all 3 ranks on {ONE_HOST[0]}; "
          f"comm = share of the step in push+fetch (the worker's wait)")  # fmt: skip
    header(("placement", "design", "images/s", "vs one host (same design)", "step s (comm share)", "load"))
    for name, d in one_host.items():
        print(md(("one host", name, *train_cells(d, None))))
    for row in rows:
        for name, d in row["downpour"].items():
            print(md((f"across, {label(row['rate_gbit'])}", name, *train_cells(d, one_host.get(name.split()[0])))))


def train_cells(d: dict, ref: dict | None) -> tuple:
    if "error" in d:
        return (d["error"][-400:].replace("\n", " "), "", "", "")
    ratio = f"{d['img_s'] / ref['img_s']:.2f}" if ref and "error" not in ref else ""
    return f"{d['img_s']:.1f}", ratio, f"{d['step_s']:.3f} ({100 * d['comm_share']:.0f}%)", d["load"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="off,1", help="link rates in Gbit/s, comma-separated; off = unshaped")
    ap.add_argument("--floats", type=int, default=1 << 20, help="slice pushed/fetched/reduced (1M floats = 4 MB)")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions per measurement (median kept)")
    ap.add_argument("--batch", type=int, default=32, help="images per rank per training step")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timing (local, allreduce, DDP)")
    ap.add_argument("--downpour-steps", type=int, default=5, help="timed Downpour steps per worker")
    ap.add_argument("--worker-side-steps", type=int, default=2, help="timed steps of the worker-side design (~18 s each across nodes)")
    ap.add_argument("--tcp-seconds", type=float, default=1.5, help="length of each TCP stream (best of 2)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before one MPI job is killed")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"bench/network.py: skipped: {why} (run `make bench` as root)")
        return 0
    rates = [None if r.strip() == "off" else float(r) for r in args.rates.split(",")]
    mpi = flavour()
    vc, rows, one_host, t0 = VirtualCluster(nodes=4, name=NAME, subnet=SUBNET), [], {}, time.perf_counter()
    print(f"bench/network.py: {mpi}, nodes {', '.join(RANKS)} (launcher on hb1), links {', '.join(map(label, rates))}; "
          f"Downpour --overlap {'measured at 1 Gbit/s' if HAS_OVERLAP else 'not in this library'}; load {load()}", flush=True)  # fmt: skip
    try:
        vc.up()
        one_host = {d: downpour(vc, ONE_HOST, d, args) for d in ("server", "worker")}
        print(f"  one host done after {time.perf_counter() - t0:.0f} s (load {load()})", flush=True)
        for rate in rates:
            rows.append(measure(vc, rate, args))
            print(f"  {label(rate)} done after {time.perf_counter() - t0:.0f} s (load {load()})", flush=True)
    except Exception as e:  # noqa: BLE001  (a report, not a gate: say what failed, print what was measured)
        print(f"bench/network.py: stopped early: {type(e).__name__}: {e}", flush=True)
    finally:
        try:
            vc.down()
        except Exception as e:  # noqa: BLE001
            print(f"bench/network.py: taking the cluster down failed: {e}; run VCLUSTER_NAME={NAME} tests/cluster/vcluster.sh down")
    results = [r.get(k, {}) for r in rows for k in ("vector", "train")] + list(one_host.values())
    mpi_version = next((x["mpi"] for x in results if "mpi" in x), mpi)
    print(f"\n{mpi_version.strip(chr(0)).strip()} | {os.cpu_count()} CPUs shared by all nodes | load = 1-min load average")
    report_bytes(rows, args.floats)
    report_speed(rows, args.floats)
    report_allreduce(rows, args.floats)
    report_train(rows, one_host, args)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s, load {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mpi": mpi, "args": vars(args), "one_host": one_host, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
