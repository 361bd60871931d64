"""Measure ``pyvirtio serve vsock`` with a real guest: throughput, connection setup, CPU per byte.

A user-mode Linux guest (its vsock driver is Linux 6.1's, the same as under QEMU;
UML runs it natively, so the guest is not a TCG-slowed bottleneck) runs a Python
script; the host side is this process.  Each boot measures, in order:

1. **guest to host**: the guest streams ``--mib`` MiB to a host listener on
   ``UDS_PATH_1234``;
2. **host to guest**: a host program ``CONNECT 5000`` and streams ``--mib`` MiB to
   the guest's listener;
3. **guest connects**: ``--conns`` guest connections to a host port, each opened,
   one byte echoed, closed;
4. **host connects**: ``--conns`` host ``CONNECT``s to a guest listener, the same.

For each phase: the rate, and the daemon's CPU time (``/proc/PID/stat``) per MiB or
per connection.  No in-kernel reference is measurable here (the host has no vsock
transport for a guest: no vhost-vsock over vhost-user, no loopback), so the figure
that compares is the CPU cost.  Variants run alternately (A, B, A, B...) in the same
run, and their ratios are reported: ``packed`` (what UML takes by default) against
``split`` (``--no-packed``), and ``--tx-buffer-size`` 256K against 64K.

Usage: ``python benchmarks/vsock_bench.py [--mib N] [--conns N] [--repeat N]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pyvirtio.devices.vsock.bridge import connect_guest
from pyvirtio.guestkit.backends import BackendProcess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.test_uml import UmlGuest  # noqa: E402 - the UML runner of the e2e tests

MiB = 1 << 20
VSOCK_MODULES = ["net/vmw_vsock/vsock.ko", "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                 "net/vmw_vsock/vmw_vsock_virtio_transport.ko"]
VARIANTS = {
    "packed 256K": [],
    "split 256K": ["--no-packed"],
    "packed 64K": ["--tx-buffer-size", "64K"],
}

GUEST = r'''
import socket, sys, time
AF = socket.AF_VSOCK
mib, conns = int(sys.argv[1]), int(sys.argv[2])
block = bytes(range(256)) * 256  # 64 KiB
listener = socket.socket(AF, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 5000))
listener.listen(64)
print("PHASE g2h", flush=True)
s = socket.socket(AF, socket.SOCK_STREAM)
s.connect((2, 1234))
for _ in range(mib * 16):
    s.sendall(block)
s.close()
print("PHASE h2g", flush=True)
conn, _ = listener.accept()
total = 0
while part := conn.recv(1 << 20):
    total += len(part)
conn.close()
print(f"RESULT h2g_bytes={total}", flush=True)
print("PHASE gconn", flush=True)
for _ in range(conns):
    s = socket.socket(AF, socket.SOCK_STREAM)
    s.connect((2, 1235))
    s.sendall(b"x")
    s.recv(1)
    s.close()
print("PHASE hconn", flush=True)
for _ in range(conns):
    conn, _ = listener.accept()
    conn.sendall(conn.recv(1))
    conn.close()
print("PHASE end", flush=True)
'''


def _cpu(pid: int) -> float:
    """The process's user + system CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    sock.settimeout(120)
    return sock


def run_once(variant: str, options: list[str], mib: int, conns: int) -> dict[str, Any]:
    """One boot, the four phases; returns rates and the daemon's CPU per unit."""
    with tempfile.TemporaryDirectory(prefix="pyvirtio-vsock-bench-") as tmp:
        folder = Path(tmp)
        uds = folder / "v.uds"
        daemon = BackendProcess("vsock", folder / "v.sock",
                                ["--guest-cid", "3", "--uds-path", str(uds), *options],
                                log_level="warning")
        try:
            pid = daemon.process.pid
            script = folder / "guest.py"
            script.write_text(GUEST)
            stream = _listen(f"{uds}_1234")
            echo = _listen(f"{uds}_1235")
            marks: dict[str, tuple[float, float]] = {}
            received = [0]

            def g2h() -> None:
                conn, _ = stream.accept()
                with conn:
                    while part := conn.recv(1 << 20):
                        received[0] += len(part)

            def echoes() -> None:
                for _ in range(conns):
                    conn, _ = echo.accept()
                    with conn:
                        conn.sendall(conn.recv(1))

            threads = [threading.Thread(target=g2h, daemon=True),
                       threading.Thread(target=echoes, daemon=True)]
            for thread in threads:
                thread.start()
            guest = UmlGuest(folder, "bench", f"python3 {script} {mib} {conns}",
                             [f"{daemon.socket_path}:19"], VSOCK_MODULES)
            with guest:
                for phase in ("g2h", "h2g", "gconn", "hconn", "end"):
                    guest.wait_for(f"PHASE {phase}", 600)
                    marks[phase] = (time.monotonic(), _cpu(pid))
                    if phase == "h2g":
                        block = hashlib.sha256(b"vsock").digest() * 2048  # 64 KiB
                        with connect_guest(uds, 5000)[0] as sock:
                            for _ in range(mib * 16):
                                sock.sendall(block)
                    if phase == "hconn":
                        for _ in range(conns):
                            with connect_guest(uds, 5000)[0] as sock:
                                sock.sendall(b"y")
                                sock.recv(1)
                results = guest.finish(600)
            threads[0].join(60)
            assert received[0] == mib * MiB, (received[0], guest.console[-2000:])
            assert results.get("h2g_bytes") == str(mib * MiB), guest.console[-2000:]
        finally:
            daemon.stop()

    def span(a: str, b: str) -> tuple[float, float]:
        return marks[b][0] - marks[a][0], marks[b][1] - marks[a][1]

    out: dict[str, Any] = {"variant": variant}
    for name, (a, b) in {"g2h": ("g2h", "h2g"), "h2g": ("h2g", "gconn")}.items():
        seconds, cpu = span(a, b)
        out[name] = {"mib_per_s": round(mib / seconds, 1),
                     "daemon_cpu_us_per_mib": round(cpu * 1e6 / mib),
                     "daemon_cpu_share": round(cpu / seconds, 2)}
    for name, (a, b) in {"guest_connects": ("gconn", "hconn"),
                         "host_connects": ("hconn", "end")}.items():
        seconds, cpu = span(a, b)
        out[name] = {"per_s": round(conns / seconds), "daemon_cpu_us_per_conn":
                     round(cpu * 1e6 / conns)}
    return out


def _print(result: dict[str, Any]) -> None:
    g, h = result["g2h"], result["h2g"]
    gc, hc = result["guest_connects"], result["host_connects"]
    print(f"{result['variant']:>12}: guest->host {g['mib_per_s']:7.1f} MiB/s "
          f"({g['daemon_cpu_us_per_mib']} us CPU/MiB, {g['daemon_cpu_share']:.0%}); "
          f"host->guest {h['mib_per_s']:7.1f} MiB/s ({h['daemon_cpu_us_per_mib']} us/MiB, "
          f"{h['daemon_cpu_share']:.0%}); connects guest {gc['per_s']}/s "
          f"({gc['daemon_cpu_us_per_conn']} us), host {hc['per_s']}/s "
          f"({hc['daemon_cpu_us_per_conn']} us)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB each way (256)")
    parser.add_argument("--conns", type=int, default=300, help="connections each way (300)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the variants (2)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    print(f"vsock bench: {args.mib} MiB each way, {args.conns} connections each way, "
          f"{args.repeat} rounds of {', '.join(VARIANTS)} (alternating); "
          f"{platform.node()}, {os.cpu_count()} CPUs")
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        for variant, options in VARIANTS.items():
            result = run_once(variant, options, args.mib, args.conns)
            _print(result)
            runs.append(result)
    base = [r for r in runs if r["variant"] == "packed 256K"]
    print("ratios to 'packed 256K' (mean of the rounds; > 1: the variant costs more CPU):")
    for variant in list(VARIANTS)[1:]:
        other = [r for r in runs if r["variant"] == variant]
        ratios = []
        for key, unit in (("g2h", "daemon_cpu_us_per_mib"), ("h2g", "daemon_cpu_us_per_mib"),
                          ("guest_connects", "daemon_cpu_us_per_conn"),
                          ("host_connects", "daemon_cpu_us_per_conn")):
            a = sum(r[key][unit] for r in base) / len(base)
            b = sum(r[key][unit] for r in other) / len(other)
            ratios.append(f"{key} {b / a:.2f}")
        print(f"  {variant}: CPU per unit " + ", ".join(ratios))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
