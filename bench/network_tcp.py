"""One plain TCP stream between two nodes: the link's own rate, to hold MPI's figures against (bench/network.py runs it).

    python bench/network_tcp.py recv PORT            # on one node: accept one connection, print {"bytes", "s"}
    python bench/network_tcp.py send ADDR PORT SECS  # on another: send zeros for SECS seconds, then close

The receiver times from its first byte to the sender's close, so connection set-up is not in the figure.
"""

from __future__ import annotations

import json
import socket
import sys
import time

BLOCK = 1 << 20  # bytes per send/recv call


def recv(port: int) -> None:
    """Accept one connection, count what arrives until EOF, print bytes and seconds as JSON."""
    with socket.create_server(("0.0.0.0", port), reuse_port=True) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        buf = bytearray(BLOCK)
        with conn:
            n = conn.recv_into(buf)
            t0, total = time.perf_counter(), 0
            while n:
                total += n
                n = conn.recv_into(buf)
            seconds = time.perf_counter() - t0
    print(json.dumps({"bytes": total, "s": seconds}), flush=True)


def send(addr: str, port: int, seconds: float) -> None:
    """Connect (retrying while the receiver starts) and send zeros for `seconds`."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    block = bytes(BLOCK)
    with conn:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.sendall(block)


if __name__ == "__main__":
    if sys.argv[1:2] == ["recv"]:
        recv(int(sys.argv[2]))
    elif sys.argv[1:2] == ["send"]:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
