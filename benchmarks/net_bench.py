"""Measure pyvirtio's virtio-net back end against real peers, in one run (issue #18).

One command prints every figure (``make bench-net``).  Measurements that are
compared run alternately, round after round, in the same run: on a shared
machine the ratios mean more than the absolute figures.

1. **``pyvirtio bench net``** (pyvirtio's own front-end, two child processes that
   keep a transmit ring full and a receive ring supplied), for each frame size
   (64, 1500 bytes) and topology:
   - ``one daemon``: ``pyvirtio serve net --socket A --socket B --switch S``: the
     frame goes from A's transmit buffer into B's receive buffer inside the daemon;
   - ``two daemons``: one ``serve net`` per port on one switch (batch datagrams);
   - ``baseline`` (with ``--baseline REF``): two daemons of pyvirtio at git
     revision REF (``git archive``), to compare with today's code.
   Interleaved with them, ``pyvirtio bench blk --rw randread --iodepth 32`` against
   ``pyvirtio serve blk``, for the ratio of the net daemon's CPU per 64-byte packet
   to the blk daemon's CPU per 4k read.
2. **DPDK testpmd** ``net_virtio_user`` txonly on A, rxonly on B (one daemon and
   two daemons), every side's count checked after draining; and, for comparison,
   DPDK's own ``net_vhost`` back end io-forwarding between two ports.
3. **Guests**: two TCG guests move ``--guest-mib`` MiB over TCP through pyvirtio
   (one daemon, two daemons) and through QEMU's built-in virtio-net with
   ``-netdev socket`` and with taps on a Linux bridge (:mod:`net_guests`).

Usage: ``python benchmarks/net_bench.py [--time S] [--rounds N] [--baseline REF]
[--guest-mib M] [--skip-python] [--skip-dpdk] [--skip-guest] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # net_guests, next to this file

from net_guests import NETWORKS, guest_tcp, tap_bridge_possible

from pyvirtio.client import ask
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import Daemon, serve_command
from pyvirtio.guestkit.dpdk import TestPmd, vhost, virtio_user

MAC_A = "02:00:0a:d6:00:0a"
MAC_B = "02:00:0a:d6:00:0b"
FRAME_SIZES = (64, 1500)
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLI = [sys.executable, "-m", "pyvirtio.cli"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    dpdk = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpdk-dev"],
                          capture_output=True, text=True, check=False).stdout or "not installed"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, DPDK {dpdk}, load average {' '.join(load)} "
            "at the start")


# -- daemons -----------------------------------------------------------------------------


class Port:
    """One port of a ``serve net`` daemon: its socket, the daemon's process and log."""

    def __init__(self, socket_path: Path, daemon: Daemon) -> None:
        self.socket_path = socket_path
        self.daemon = daemon
        self.process = daemon.process

    @property
    def log(self) -> str:
        return self.daemon.log

    def stats(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = ask(self.socket_path, "stats")
        return snapshot


def _daemon(work: Path, sockets: list[Path], options: list[str],
            src: Path | None = None, device: str = "net") -> Daemon:
    extra: list[str] = []
    for path in sockets[1:]:
        extra += ["--socket", str(path)]
    command = serve_command(device, sockets[0], extra + options, log_level="warning")
    if src is not None:  # the baseline's code
        command = ["env", f"PYTHONPATH={src}", *command]
    daemon = Daemon(command, sockets[0], work / f"{sockets[0].stem}.log")
    deadline = time.monotonic() + 15
    while not all(p.exists() for p in sockets):
        if time.monotonic() > deadline:
            daemon.kill()
            raise SystemExit(f"the daemon did not listen on {sockets}:\n{daemon.log}")
        time.sleep(0.05)
    return daemon


def start_ports(work: Path, switch: str, *, one_daemon: bool,
                src: Path | None = None) -> tuple[Port, Port, list[Daemon]]:
    """Ports A and B of switch ``switch``: in one daemon, or one daemon each."""
    a, b = work / f"{switch}-a.sock", work / f"{switch}-b.sock"
    if one_daemon:
        daemon = _daemon(work, [a, b], ["--switch", switch, "--mac", MAC_A, "--mac", MAC_B])
        return Port(a, daemon), Port(b, daemon), [daemon]
    first = _daemon(work, [a], ["--switch", switch, "--mac", MAC_A], src)
    try:
        second = _daemon(work, [b], ["--switch", switch, "--mac", MAC_B], src)
    except BaseException:
        first.kill()
        raise
    return Port(a, first), Port(b, second), [first, second]


def daemon_counters(daemon: Port) -> dict[str, int]:
    """The port's counters now (``pyvirtio stats``; counts since connection).

    Keys: ``rx`` (frames delivered to the frontend), ``tx`` (frames taken from it),
    ``errors``, ``violations`` and the device's named counts (``switch sent``...).
    """
    counts: dict[str, int] = {"rx": 0, "tx": 0, "errors": 0, "violations": 0}
    for queue in daemon.stats()["queues"]:
        counts["rx" if queue["queue"] % 2 == 0 else "tx"] += queue["requests"]
        counts["errors"] += queue["errors"]
        counts["violations"] += queue["violations"]
        for name, number in queue["kinds"].items():
            counts[name] = counts.get(name, 0) + number
    return counts


def _diagnostics(log: str) -> list[str]:
    """The daemon's warnings and errors (driver violations, drops), de-duplicated."""
    kinds: set[str] = set()
    first: list[str] = []
    for line in log.splitlines():
        if " WARNING " in line or " ERROR " in line:
            text = line.split(" ", 3)[-1]
            kind = re.sub(r"\d+", "N", text)
            if kind not in kinds:
                kinds.add(kind)
                first.append(text[:220])
    return first


# -- 1. pyvirtio bench net, and blk for the ratio ------------------------------------------


def bench_net(work: Path, topology: str, size: int, seconds: float,
              baseline: Path | None) -> dict[str, Any]:
    """One ``pyvirtio bench net --json`` run on fresh daemons of ``topology``."""
    switch = f"b{os.getpid()}{secrets.token_hex(2)}"
    src = baseline if topology == "baseline" else None
    a, b, daemons = start_ports(work, switch, one_daemon=topology == "one daemon", src=src)
    try:
        done = subprocess.run([*CLI, "bench", "net", str(a.socket_path), str(b.socket_path),
                               "--size", str(size), "--time", str(seconds), "--json"],
                              capture_output=True, text=True, timeout=seconds + 120,
                              check=False)
    finally:
        for daemon in daemons:
            daemon.stop()
    if done.returncode != 0:
        raise SystemExit(f"pyvirtio bench net failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["topology"] = topology
    return result


class BlkDaemon:
    """``pyvirtio serve blk`` on a 64 MiB image, for the CPU per 4k read at qd32."""

    def __init__(self, work: Path) -> None:
        image = work / "blk.img"
        with image.open("wb") as f:
            f.write(bytes(64 << 20))
        self.socket = work / "blk.sock"
        self.daemon = _daemon(work, [self.socket], ["--image", str(image)], device="blk")

    def read_qd32(self, seconds: float) -> dict[str, Any]:
        cpu0 = _cpu_seconds(self.daemon.process.pid)
        done = subprocess.run([*CLI, "bench", "blk", str(self.socket), "--rw", "randread",
                               "--iodepth", "32", "--time", str(seconds), "--json", "--quiet"],
                              capture_output=True, text=True, timeout=seconds + 60, check=False)
        cpu = _cpu_seconds(self.daemon.process.pid) - cpu0
        if done.returncode != 0:
            raise SystemExit(f"pyvirtio bench blk failed: {done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout)
        return {"iops": result["iops"], "ios": result["ios"],
                "cpu_us_per_io": round(cpu / result["ios"] * 1e6, 2)}

    def stop(self) -> None:
        self.daemon.stop()


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def python_rounds(work: Path, seconds: float, rounds: int, baseline: Path | None,
                  with_blk: bool) -> dict[str, Any]:
    """Rounds of every topology and size, and blk qd32 reads, alternately."""
    topologies = ["one daemon", "two daemons"] + (["baseline"] if baseline else [])
    runs: list[dict[str, Any]] = []
    blk_runs: list[dict[str, Any]] = []
    blk = BlkDaemon(work) if with_blk else None
    try:
        for number in range(rounds):
            for size in FRAME_SIZES:
                for topology in topologies:
                    run = bench_net(work, topology, size, seconds, baseline)
                    run["round"] = number
                    runs.append(run)
                    print(f"   round {number + 1} {topology:>11} {size:>5} B: {run['pps']:>8,} pps,"
                          f" {run['drops']} drops, CPU us/packet "
                          f"{[d['cpu_us_per_packet'] for d in run['daemons']]}", flush=True)
                if blk is not None and size == 64:
                    blk_run = blk.read_qd32(seconds)
                    blk_runs.append(blk_run)
                    print(f"   round {number + 1}  blk qd32 4k read: {blk_run['iops']:>8,.0f} IOPS,"
                          f" {blk_run['cpu_us_per_io']} CPU us/read", flush=True)
    finally:
        if blk is not None:
            blk.stop()
    table = []
    for topology in topologies:
        for size in FRAME_SIZES:
            mine = [r for r in runs if r["topology"] == topology and r["size"] == size]
            table.append({
                "topology": topology, "size": size,
                "pps": _median([r["pps"] for r in mine]),
                "gbit_per_s": _median([r["gbit_per_s"] for r in mine]),
                "cpu_us_per_packet": _median([r["cpu_us_per_packet"] for r in mine]),
                "per_daemon_cpu_us": [_median([r["daemons"][i]["cpu_us_per_packet"]
                                               for r in mine])
                                      for i in range(len(mine[0]["daemons"]))],
                "drops": sum(r["drops"] for r in mine),
                "sent": sum(r["sent"] for r in mine),
                "runs_pps": [r["pps"] for r in mine],
            })
    return {"runs": runs, "table": table, "blk": blk_runs,
            "blk_cpu_us_per_io": _median([r["cpu_us_per_io"] for r in blk_runs]),
            "blk_iops": _median([r["iops"] for r in blk_runs])}


# -- DPDK testpmd -------------------------------------------------------------------


def _arrived(daemon: Port) -> int:
    """Frames for receive queue 0 so far: delivered to the front-end, or dropped."""
    counts = daemon_counters(daemon)
    return counts["rx"] + sum(v for k, v in counts.items()
                              if k.startswith(("dropped: rx", "dropped: no rx", "filtered:")))


def _wait(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting until {what}")
        time.sleep(0.1)


def dpdk_driven(work: Path, size: int, seconds: float, one_daemon: bool) -> dict[str, object]:
    """testpmd txonly on A, rxonly on B: pyvirtio's forwarding rate, CPU per packet, counts.

    Both testpmd processes are interactive (:class:`TestPmd`): the rates come from
    the daemons' counters over a window while testpmd transmits; then transmission
    stops, the path drains, and every side's final count is read.  With
    ``one_daemon`` both ports are served by one process (its CPU is then counted
    once, as A's; B's is the same process).
    """
    switch = f"dpdk-{os.getpid()}-{secrets.token_hex(2)}"
    a, b, daemons = start_ports(work, switch, one_daemon=one_daemon)
    try:
        with (
            TestPmd("tx", work, [virtio_user(a.socket_path, mac=MAC_A)],
                    ["--forward-mode=txonly", f"--txpkts={size}",
                     f"--eth-peer=0,{MAC_B}"]) as tx,
            TestPmd("rx", work, [virtio_user(b.socket_path, mac=MAC_B)],
                    ["--forward-mode=rxonly", f"--eth-peer=0,{MAC_A}"]) as rx,
        ):
            rx.start(tx_first=True)  # one burst from B: A learns where MAC_B is
            _wait("A delivered B's first burst", lambda: _arrived(a) >= 32)
            tx.start()
            time.sleep(0.5)  # past the start
            pids = (a.process.pid, b.process.pid, tx.pid, rx.pid)
            t0 = time.monotonic()
            cpu0 = [_cpu_seconds(pid) for pid in pids]
            a0, b0 = daemon_counters(a), daemon_counters(b)
            time.sleep(seconds)
            a1, b1 = daemon_counters(a), daemon_counters(b)
            cpu = [_cpu_seconds(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
            elapsed = time.monotonic() - t0
            tx.stop()
            sent = tx.port_stats()[0]
            _wait("A took every frame", lambda: daemon_counters(a)["tx"] >= sent.tx_packets)
            passed = daemon_counters(a).get("switch sent", 0)
            _wait("B delivered or dropped every frame", lambda: _arrived(b) >= passed)
            delivered = daemon_counters(b)["rx"]
            _wait("rx polled every frame", lambda: rx.port_stats()[0].rx_packets >= delivered)
            rx.stop()
            received = rx.port_stats()[0]
            a2, b2 = daemon_counters(a), daemon_counters(b)  # per connection: read them now
    finally:
        for daemon in daemons:
            daemon.stop()
    taken = a1["tx"] - a0["tx"]
    given = b1["rx"] - b0["rx"]
    if one_daemon:
        cpu[1] = 0.0  # the same process as A's
    drops = {f"A {k}": v for k, v in a2.items() if k.startswith(("dropped", "switch dropped"))}
    drops.update({f"B {k}": v for k, v in b2.items() if k.startswith(("dropped", "filtered"))})
    return {
        "topology": "one daemon" if one_daemon else "two daemons",
        "frame_bytes": size,
        "seconds": round(elapsed, 2),
        "a_taken_pps": round(taken / elapsed),
        "b_delivered_pps": round(given / elapsed),
        "b_delivered_mb_per_s": round(given * size / elapsed / 1e6, 1),
        "a_cpu_per_packet_us": round(cpu[0] / taken * 1e6, 2) if taken else None,
        "b_cpu_per_packet_us": round(cpu[1] / given * 1e6, 2) if given else None,
        "a_cpu_util": round(cpu[0] / elapsed, 2),
        "b_cpu_util": round(cpu[1] / elapsed, 2),
        "testpmd_tx_cpu_util": round(cpu[2] / elapsed, 2),
        "testpmd_rx_cpu_util": round(cpu[3] / elapsed, 2),
        # Whole run, after draining: each side's count of the same frames.
        "testpmd_tx_sent": sent.tx_packets,
        "pyvirtio_a_taken": a2["tx"],
        "pyvirtio_a_passed": a2.get("switch sent", 0),
        "pyvirtio_b_got": b2.get("switch received", 0),
        "pyvirtio_b_delivered": b2["rx"],
        "testpmd_rx_received": received.rx_packets,
        "drops": {k: v for k, v in drops.items() if v},
        "violations": a2["violations"] + b2["violations"],
        "logs": [_diagnostics(d.log) for d in daemons],
    }


def dpdk_only(work: Path, size: int, seconds: float) -> dict[str, object]:
    """The DPDK-only path: testpmd's vhost back end io-forwards port 0 -> 1 (and 1 -> 0).

    Counts after each side stopped; an exact DPDK baseline only if they agree.
    """
    sock_a, sock_b = work / "vhost-a.sock", work / "vhost-b.sock"
    # --iova-mode=va: without it, mapping a 1 GiB no-huge region page by page
    # (virt2iova through /proc/self/pagemap) stalls the vhost control thread.
    # --main-lcore 1: the forwarding lcore is CPU 0, as the pyvirtio daemons' CPU is
    # in dpdk_driven; the two front-ends busy-poll CPU 1.
    with TestPmd("sw", work, [vhost(sock_a), vhost(sock_b, index=1)],
                 ["--forward-mode=io"], eal=("--iova-mode=va", "--main-lcore", "1")) as sw:
        sw.start()
        with (
            TestPmd("rx", work, [virtio_user(sock_b, mac=MAC_B)],
                    ["--forward-mode=rxonly"]) as rx,
            TestPmd("tx", work, [virtio_user(sock_a, mac=MAC_A)],
                    ["--forward-mode=txonly", f"--txpkts={size}",
                     f"--eth-peer=0,{MAC_B}"]) as tx,
        ):
            rx.start()
            tx.start()
            time.sleep(0.5)  # past the start
            t0, cpu0, before = time.monotonic(), _cpu_seconds(sw.pid), sw.port_stats()
            time.sleep(seconds)
            after, cpu = sw.port_stats(), _cpu_seconds(sw.pid) - cpu0
            elapsed = time.monotonic() - t0
            tx.stop()
            time.sleep(1.0)
            forwarded = sw.stop()
            time.sleep(0.5)
            rx.stop()
            sent, received = tx.port_stats()[0], rx.port_stats()[0]
            ports = sw.port_stats()
    return {
        "frame_bytes": size,
        "seconds": round(elapsed, 2),
        "forwarded_pps": round((after[1].tx_packets - before[1].tx_packets) / elapsed),
        "vhost_cpu_util": round(cpu / elapsed, 2),
        "testpmd_tx_sent": sent.tx_packets,
        "vhost_port0_rx": ports[0].rx_packets,
        "vhost_port1_tx": ports[1].tx_packets,
        "testpmd_rx_received": received.rx_packets,
        "io_forward_tx_dropped": sum(int(n) for n in re.findall(
            r"Forward statistics for port \d+.*?TX-dropped:\s*(\d+)", forwarded, re.S)),
    }


# -- 3. guests ---------------------------------------------------------------------------


def guest_rounds(work: Path, mib: int, rounds: int) -> dict[str, Any]:
    """Each network in turn, ``rounds`` times: the same guests, the same transfer."""
    why_not = tap_bridge_possible()
    networks = [n for n in NETWORKS if n != "qemu-tap-bridge" or why_not is None]
    if why_not is not None:
        print(f"   qemu-tap-bridge skipped: {why_not}")
    kit = GuestKit.ensure()
    runs = []
    for number in range(rounds):
        for network in networks:
            run = guest_tcp(kit, work, network, mib)
            run["round"] = number
            runs.append(run)
            print(f"   round {number + 1} {network:>16}: {run['bytes_received']:,} bytes in "
                  f"{run['seconds']} s = {run['mb_per_s']} MB/s (daemon CPU s "
                  f"{run['daemon_cpu_s_whole_run']})", flush=True)
    ratios = {}
    for mine, theirs in (("pyvirtio-1", "qemu-socket"), ("pyvirtio-2", "qemu-socket"),
                         ("pyvirtio-1", "qemu-tap-bridge"), ("pyvirtio-2", "qemu-tap-bridge")):
        pairs = [(a["mb_per_s"], b["mb_per_s"]) for a in runs for b in runs
                 if a["network"] == mine and b["network"] == theirs
                 and a["round"] == b["round"]]
        if pairs:
            ratios[f"{mine} / {theirs}"] = _median([x / y for x, y in pairs])
    medians = {n: _median([r["mb_per_s"] for r in runs if r["network"] == n]) for n in networks}
    return {"runs": runs, "mb_per_s": medians, "ratios": ratios}


def _round_ratios(runs: list[dict[str, Any]], blk: list[dict[str, Any]],
                  baseline: bool) -> dict[str, float]:
    """Ratios within each round (the runs closest in time), then their median."""
    def pick(topology: str, size: int, number: int) -> dict[str, Any] | None:
        for run in runs:
            if (run["topology"], run["size"], run["round"]) == (topology, size, number):
                return run
        return None

    out: dict[str, list[float]] = {}
    for number in sorted({r["round"] for r in runs}):
        one = pick("one daemon", 64, number)
        two = pick("two daemons", 64, number)
        if one is not None and number < len(blk):
            cpu = blk[number]["cpu_us_per_io"]
            out.setdefault("net CPU/packet (one daemon, 64 B) / blk CPU per 4k read qd32",
                           []).append(one["cpu_us_per_packet"] / cpu)
            if two is not None:
                out.setdefault("net CPU/packet (two daemons together, 64 B) / blk CPU per 4k "
                               "read qd32", []).append(two["cpu_us_per_packet"] / cpu)
        for size in FRAME_SIZES:
            base = pick("baseline", size, number) if baseline else None
            for topology in ("one daemon", "two daemons"):
                run = pick(topology, size, number)
                if base is not None and run is not None and base["pps"]:
                    out.setdefault(f"pps {topology} / baseline two daemons, {size} B",
                                   []).append(run["pps"] / base["pps"])
                    out.setdefault(f"CPU/packet {topology} / baseline, {size} B", []).append(
                        run["cpu_us_per_packet"] / base["cpu_us_per_packet"])
    return {name: _median(values) for name, values in out.items()}


def _baseline_tree(ref: str, work: Path) -> Path:
    """``git archive REF src`` unpacked under ``work``: the baseline's code."""
    top = Path(__file__).resolve().parent.parent
    target = work / "baseline"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(top), "archive", ref, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def main() -> int:
    """Run the measurements and print them; the figures last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=5.0, help="seconds per packet run (5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the alternating packet runs (3)")
    parser.add_argument("--baseline", metavar="REF",
                        help="also run two daemons of pyvirtio at git revision REF")
    parser.add_argument("--guest-mib", type=int, default=64, help="MiB the guests move (64)")
    parser.add_argument("--guest-rounds", type=int, default=1,
                        help="rounds of the four guest networks (1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--skip-python", action="store_true",
                        help="no runs with pyvirtio's own front-end (and no blk ratio)")
    parser.add_argument("--skip-blk", action="store_true", help="no blk runs for the ratio")
    parser.add_argument("--skip-dpdk", action="store_true", help="no testpmd runs")
    parser.add_argument("--skip-guest", action="store_true", help="no guest runs")
    args = parser.parse_args()
    machine = _machine()
    print(f"machine: {machine}\n")
    report: dict[str, Any] = {"machine": machine, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                            time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-netbench-") as tmp:
        work = Path(tmp)
        baseline = _baseline_tree(args.baseline, work) if args.baseline else None
        if not args.skip_python:
            print(f"1. pyvirtio bench net ({args.time:g} s each, {args.rounds} rounds, "
                  "alternating) and pyvirtio bench blk randread qd32:", flush=True)
            python = python_rounds(work, args.time, args.rounds, baseline, not args.skip_blk)
            python["ratios"] = _round_ratios(python["runs"], python["blk"], baseline is not None)
            report["python_frontend"] = python
        if not args.skip_dpdk:
            if shutil.which("dpdk-testpmd") is None:
                print("\n2. dpdk-testpmd not found (apt-get install dpdk-dev); skipped")
            else:
                print("\n2. DPDK testpmd txonly -> A -> B -> testpmd rxonly "
                      f"({args.time:g} s each):", flush=True)
                dpdk = []
                for size in FRAME_SIZES:
                    for one in (True, False):
                        row = dpdk_driven(work, size, args.time, one)
                        dpdk.append(row)
                        counts = [row[k] for k in ("testpmd_tx_sent", "pyvirtio_a_taken",
                                                   "pyvirtio_a_passed", "pyvirtio_b_got",
                                                   "pyvirtio_b_delivered",
                                                   "testpmd_rx_received")]
                        print(f"   {row['topology']:>11} {size:>5} B: A took "
                              f"{row['a_taken_pps']:,} pps, B gave {row['b_delivered_pps']:,} "
                              f"pps, CPU us/packet A {row['a_cpu_per_packet_us']} B "
                              f"{row['b_cpu_per_packet_us']}; whole run {counts}, drops "
                              f"{row['drops']}, violations {row['violations']}", flush=True)
                print("   DPDK only: txonly -> testpmd vhost io-forward -> rxonly:")
                base = [dpdk_only(work, size, args.time) for size in FRAME_SIZES]
                for row in base:
                    print(f"   {json.dumps(row)}", flush=True)
                report["dpdk"] = dpdk
                report["dpdk_only"] = base
        if not args.skip_guest:
            print(f"\n3. Guest to guest, {args.guest_mib} MiB over TCP (busybox nc), QEMU TCG, "
                  f"{args.guest_rounds} round(s):", flush=True)
            report["guest"] = guest_rounds(work, args.guest_mib, args.guest_rounds)
    _print_figures(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_figures(report: dict[str, Any]) -> None:
    print("\n== figures (medians over rounds; ratios within each round) ==")
    python = report.get("python_frontend")
    if python is not None:
        print(f"{'topology':>12} {'frame':>6} {'pps':>9} {'Gbit/s':>7} {'CPU us/pkt':>10}"
              f"  per daemon   drops/sent")
        for row in python["table"]:
            print(f"{row['topology']:>12} {row['size']:>6} {row['pps']:>9,.0f}"
                  f" {row['gbit_per_s']:>7.3f} {row['cpu_us_per_packet']:>10}"
                  f"  {row['per_daemon_cpu_us']}  {row['drops']}/{row['sent']}")
        if python["blk"]:
            print(f"blk randread 4k qd32: {python['blk_iops']:,.0f} IOPS, "
                  f"{python['blk_cpu_us_per_io']} CPU us per read")
        for name, value in python["ratios"].items():
            print(f"ratio {name}: {value:.2f}")
    guest = report.get("guest")
    if guest is not None:
        for network, value in guest["mb_per_s"].items():
            print(f"guest TCP {network}: {value} MB/s")
        for name, value in guest["ratios"].items():
            print(f"ratio guest TCP {name}: {value:.2f}")


if __name__ == "__main__":
    sys.exit(main())
