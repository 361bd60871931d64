"""Measure pyvirtio's virtio-net back end: packets per second and guest TCP throughput.

Issue #6.  Two ``pyvirtio serve net --switch S`` daemons (ports A and B) form the
path under test: a frontend sends frames into port A, daemon A passes them to the
switch, daemon B takes them from the switch and delivers them to the frontend on
port B.  Three measurements:

1. **Python frontend driven, no guest** (the figures): pyvirtio's own vhost-user
   frontend (:mod:`pyvirtio.frontend.connection`) keeps port A's transmit ring
   full of 64-byte or 1500-byte frames addressed to B, and keeps port B's
   receive ring full of empty buffers.  Rates come from the daemons' own
   counters (``pyvirtio stats``), CPU time per packet from /proc/PID/stat.
2. **DPDK testpmd driven** (``net_virtio_user`` txonly on A, rxonly on B, both
   interactive, :mod:`pyvirtio.guestkit.dpdk`): pyvirtio's forwarding rate and CPU
   time per packet from the daemons' counters and /proc/PID/stat over a window,
   then, once transmission stopped and the path drained, every side's count of
   the same frames.  For comparison, the DPDK-only path: testpmd's ``net_vhost``
   back end io-forwarding between two ports, with the same two front-ends.
   Both testpmd front-ends busy-poll one CPU (their forwarding lcore is 1), so the
   pyvirtio daemons, or the DPDK back end, have the other: figures are lower bounds.
3. **Guest driven**: two Linux guests (QEMU TCG) on the switch; one sends 64 MiB
   over TCP with busybox ``nc`` to the other, timed inside the sender.

Usage: ``python benchmarks/net_bench.py [--time S] [--skip-python] [--skip-dpdk]
[--skip-guest] [--json FILE]`` (``make bench-net`` runs it with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.guestkit.dpdk import TestPmd, vhost, virtio_user
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import HDR_SIZE
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

MAC_A = "02:00:0a:d6:00:0a"
MAC_B = "02:00:0a:d6:00:0b"
FRAME_SIZES = (64, 1500)
QUEUE_SIZE = 256
RX_BUFFER = HDR_SIZE + 1518
CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_MIB = 64

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
    return (f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, DPDK {dpdk}")


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def _frame(size: int, dst: str, src: str) -> bytes:
    """An Ethernet frame of ``size`` bytes (no FCS), local experimental EtherType."""
    return (_mac(dst) + _mac(src) + b"\x88\xb5").ljust(size, b"\x00")


# -- the Python frontend: one process per port ------------------------------------------


class _Stop:
    requested = False


def _split(queue: FrontendQueue) -> DriverSplitQueue:
    """The queue's ring: split, as RING_PACKED is not negotiated here."""
    assert isinstance(queue.ring, DriverSplitQueue)
    return queue.ring


def _pump(queue: FrontendQueue, stop: type[_Stop]) -> tuple[int, int]:
    """Hand every used chain straight back to the device until told to stop.

    Returns the number of chains used and the bytes the device wrote into them.
    """
    ring = _split(queue)
    count = written = 0
    while not stop.requested:
        used = ring.reap()  # the chains stay built: republish the same heads
        if used:
            count += len(used)
            written += sum(length for _, length in used)
            ring.publish_many([head for head, _ in used])
            queue.kick_if_needed()
        elif not queue.wait(0.5):
            queue.kick()  # a spurious kick is allowed (VIRTIO 1.4 §2.7.10.2)
    return count, written


def port_role(role: str, socket_path: str, size: int) -> int:
    """Child process: drive one port as a transmitter (``tx``) or a receiver (``rx``).

    Prints ``READY`` once its ring is full, then a JSON line of counts after SIGTERM.
    """
    signal.signal(signal.SIGTERM, lambda *_: setattr(_Stop, "requested", True))
    frontend = VhostUserFrontend.connect(socket_path)
    frontend.probe()
    frontend.negotiate((1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX))
    ram = GuestRam((4 << 20) + 2 * QUEUE_SIZE * RX_BUFFER)
    frontend.share_memory(ram)
    rxq = frontend.setup_queue(0, QUEUE_SIZE)
    txq = frontend.setup_queue(1, QUEUE_SIZE)
    heads = []
    if role == "tx":
        frame = bytes(HDR_SIZE) + _frame(size, MAC_B, MAC_A)
        for _ in range(QUEUE_SIZE):
            gpa = ram.alloc(len(frame))
            ram.view(gpa, len(frame))[:] = frame
            heads.append(_split(txq).add([(gpa, len(frame))], publish=False))
        queue = txq
    else:
        # One frame from B first, so that port A learns where MAC_B is (testpmd's
        # --tx-first does the same): A's frames then go to B alone, not flooded.
        hello = bytes(HDR_SIZE) + _frame(64, "ff:ff:ff:ff:ff:ff", MAC_B)
        gpa = ram.alloc(len(hello))
        ram.view(gpa, len(hello))[:] = hello
        txq.submit([(gpa, len(hello))], (), timeout=10.0, what="hello frame")
        for _ in range(QUEUE_SIZE):
            heads.append(_split(rxq).add((), [(ram.alloc(RX_BUFFER), RX_BUFFER)], publish=False))
        queue = rxq
    _split(queue).publish_many(heads)
    queue.kick()
    print("READY", flush=True)
    cpu0 = time.process_time()
    count, written = _pump(queue, _Stop)
    print(json.dumps({"chains": count, "bytes_written": written,
                      "cpu_s": time.process_time() - cpu0}), flush=True)
    frontend.close()
    ram.close()
    return 0


class PortDriver:
    """A ``net_bench.py --role`` child process driving one port."""

    def __init__(self, role: str, socket_path: Path, size: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", role, str(socket_path), str(size)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "READY":
            self.process.kill()
            raise SystemExit(f"{role} frontend did not start: {line!r}")

    def stop(self) -> dict[str, float]:
        """SIGTERM it and return its counts."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=20)
        result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        return result


# -- the daemons' own counters ---------------------------------------------------------


def daemon_counters(daemon: BackendProcess) -> dict[str, int]:
    """The daemon's counters now (``pyvirtio stats``; counts since connection).

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


def _start_pair(work: Path, switch: str) -> tuple[BackendProcess, BackendProcess]:
    a = BackendProcess("net", work / f"{switch}-a.sock",
                       ["--switch", switch, "--mac", MAC_A])
    try:
        b = BackendProcess("net", work / f"{switch}-b.sock",
                           ["--switch", switch, "--mac", MAC_B])
    except BaseException:
        a.stop()
        raise
    return a, b


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


def python_driven(work: Path, size: int, seconds: float) -> dict[str, object]:
    """Python frontends on A (transmit) and B (receive); rates from the daemons' counts."""
    switch = f"bench-{os.getpid()}-{secrets.token_hex(2)}"
    a, b = _start_pair(work, switch)
    try:
        receiver = PortDriver("rx", b.socket_path, size)
        try:
            sender = PortDriver("tx", a.socket_path, size)
            try:
                time.sleep(0.5)  # past the start
                t0 = time.monotonic()
                cpu_a0, cpu_b0 = _cpu_seconds(a.process.pid), _cpu_seconds(b.process.pid)
                cpu_s0, cpu_r0 = (_cpu_seconds(sender.process.pid),
                                  _cpu_seconds(receiver.process.pid))
                a0, b0 = daemon_counters(a), daemon_counters(b)
                time.sleep(seconds)
                a1, b1 = daemon_counters(a), daemon_counters(b)
                elapsed = time.monotonic() - t0
                cpu_a = _cpu_seconds(a.process.pid) - cpu_a0
                cpu_b = _cpu_seconds(b.process.pid) - cpu_b0
                cpu_s = _cpu_seconds(sender.process.pid) - cpu_s0
                cpu_r = _cpu_seconds(receiver.process.pid) - cpu_r0
            finally:
                sent = sender.stop()
        finally:
            received = receiver.stop()
    finally:
        a.stop()
        b.stop()
    taken = a1["tx"] - a0["tx"]
    delivered = b1["rx"] - b0["rx"]
    dropped = {k: b1.get(k, 0) - b0.get(k, 0) for k in b1 if k.startswith(("dropped", "switch d"))}
    dropped.update({f"A {k}": a1.get(k, 0) - a0.get(k, 0) for k in a1
                    if k.startswith("switch dropped")})
    row: dict[str, object] = {
        "frame_bytes": size,
        "seconds": round(elapsed, 2),
        "a_taken_pps": round(taken / elapsed),
        "b_delivered_pps": round(delivered / elapsed),
        "b_delivered_mb_per_s": round(delivered * size / elapsed / 1e6, 1),
        "a_cpu_per_packet_us": round(cpu_a / taken * 1e6, 2) if taken else None,
        "b_cpu_per_packet_us": round(cpu_b / delivered * 1e6, 2) if delivered else None,
        "a_cpu_util": round(cpu_a / elapsed, 2),
        "b_cpu_util": round(cpu_b / elapsed, 2),
        "sender_cpu_util": round(cpu_s / elapsed, 2),
        "receiver_cpu_util": round(cpu_r / elapsed, 2),
        "drops_in_window": {k: v for k, v in dropped.items() if v},
        "a_switch": {k: v for k, v in a1.items() if k.startswith("switch")},
        "violations": a1["violations"] + b1["violations"],
        "sender_total": sent,
        "receiver_total": received,
    }
    return row


# -- DPDK testpmd -------------------------------------------------------------------


def _arrived(daemon: BackendProcess) -> int:
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


def dpdk_driven(work: Path, size: int, seconds: float) -> dict[str, object]:
    """testpmd txonly on A, rxonly on B: pyvirtio's forwarding rate, CPU per packet, counts.

    Both testpmd processes are interactive (:class:`TestPmd`): the rates come from
    the daemons' counters over a window while testpmd transmits; then transmission
    stops, the path drains, and every side's final count is read.
    """
    switch = f"dpdk-{os.getpid()}-{secrets.token_hex(2)}"
    a, b = _start_pair(work, switch)
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
        a.stop()
        b.stop()
    taken = a1["tx"] - a0["tx"]
    given = b1["rx"] - b0["rx"]
    drops = {f"A {k}": v for k, v in a2.items() if k.startswith(("dropped", "switch dropped"))}
    drops.update({f"B {k}": v for k, v in b2.items() if k.startswith(("dropped", "filtered"))})
    return {
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
        "a_log": _diagnostics(a.log),
        "b_log": _diagnostics(b.log),
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


# -- guests ---------------------------------------------------------------------------

_SETUP = """
    ip link set eth0 up || exit 61
    ip addr add {ip}/24 dev eth0 || exit 62
    n=0
    until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 90 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
"""
RECEIVER = _SETUP + """
    mkfifo /tmp/hold
    exec 3<>/tmp/hold
    echo RESULT recv_bytes=$(nc -l -p 5000 <&3 | wc -c)
"""
SENDER = """
    dd if=/dev/zero of=/tmp/data bs=1048576 count={mib} 2>/dev/null
""" + _SETUP + """
    sleep 1
    t0=$(cut -d' ' -f1 /proc/uptime)
    nc {peer} 5000 </tmp/data || echo RESULT nc=failed
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo RESULT start=$t0
    echo RESULT end=$t1
"""


def _net_args(socket_path: Path, mac: str) -> list[str]:
    # vectors=0: QEMU 7.2 under TCG crashes in virtio-pci's MSI-X path otherwise.
    return ["-chardev", f"socket,id=n0,path={socket_path}",
            "-netdev", "vhost-user,id=n0n,chardev=n0",
            "-device", f"virtio-net-pci,netdev=n0n,vectors=0,mac={mac}"]


def guest_driven(kit: GuestKit, work: Path) -> dict[str, object]:
    """Guest B sends GUEST_MIB MiB over TCP to guest A through the switch."""
    switch = f"guest-{os.getpid()}-{secrets.token_hex(2)}"
    a, b = _start_pair(work, switch)
    try:
        cpu_a0, cpu_b0 = _cpu_seconds(a.process.pid), _cpu_seconds(b.process.pid)
        with (
            kit.start(RECEIVER.format(ip="10.213.0.1", peer="10.213.0.2"), ["virtio_net"],
                      _net_args(a.socket_path, MAC_A)) as vm_a,
            kit.start(SENDER.format(ip="10.213.0.2", peer="10.213.0.1", mib=GUEST_MIB),
                      ["virtio_net"], _net_args(b.socket_path, MAC_B)) as vm_b,
        ):
            result_b = vm_b.wait(timeout=600)
            result_a = vm_a.wait(timeout=60)
        cpu_a = _cpu_seconds(a.process.pid) - cpu_a0
        cpu_b = _cpu_seconds(b.process.pid) - cpu_b0
    finally:
        a.stop()
        b.stop()
    if result_a.exit_code != 0 or result_b.exit_code != 0:
        raise SystemExit(f"guest run failed:\n{result_a.console[-2000:]}\n"
                         f"{result_b.console[-2000:]}")
    seconds = float(result_b.results["end"]) - float(result_b.results["start"])
    received = int(result_a.results["recv_bytes"])
    return {
        "bytes_sent": GUEST_MIB << 20,
        "bytes_received": received,
        "seconds": round(seconds, 2),
        "mb_per_s": round(received / seconds / 1e6, 1),
        "daemon_cpu_s_whole_run": [round(cpu_a, 2), round(cpu_b, 2)],
    }


def main() -> int:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=10.0, help="seconds per packet run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--skip-python", action="store_true",
                        help="no runs with pyvirtio's own front-end")
    parser.add_argument("--skip-dpdk", action="store_true", help="no testpmd runs")
    parser.add_argument("--skip-guest", action="store_true", help="no guest run")
    parser.add_argument("--role", nargs=3, metavar=("ROLE", "SOCKET", "SIZE"),
                        help=argparse.SUPPRESS)  # internal: a frontend child process
    args = parser.parse_args()
    if args.role:
        return port_role(args.role[0], args.role[1], int(args.role[2]))
    machine = _machine()
    print(f"machine: {machine}\n")
    report: dict[str, object] = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-netbench-") as tmp:
        work = Path(tmp)
        rows = []
        if not args.skip_python:
            print("1. Python frontend -> port A -> switch -> port B -> Python frontend "
                  f"({args.time:g} s each; daemons' own counters):")
            print(f"{'frame':>6} {'A took':>10} {'B gave':>10} {'B MB/s':>8} {'A cpu':>7}"
                  f" {'B cpu':>7} {'A util':>7} {'B util':>7} {'tx-fe':>6} {'rx-fe':>6}  drops")
            print(f"{'bytes':>6} {'pps':>10} {'pps':>10} {'':>8} {'us/pkt':>7} {'us/pkt':>7}"
                  f" {'':>7} {'':>7} {'util':>6} {'util':>6}")
        for size in () if args.skip_python else FRAME_SIZES:
            row = python_driven(work, size, args.time)
            rows.append(row)
            print(f"{size:>6} {row['a_taken_pps']:>10,} {row['b_delivered_pps']:>10,}"
                  f" {row['b_delivered_mb_per_s']:>8} {row['a_cpu_per_packet_us']!s:>7}"
                  f" {row['b_cpu_per_packet_us']!s:>7} {row['a_cpu_util']:>7}"
                  f" {row['b_cpu_util']:>7} {row['sender_cpu_util']:>6}"
                  f" {row['receiver_cpu_util']:>6}  {row['drops_in_window']}", flush=True)
        report["python_frontend"] = rows
        if not args.skip_dpdk:
            if shutil.which("dpdk-testpmd") is None:
                print("\n2. dpdk-testpmd not found (apt-get install dpdk-dev); skipped")
            else:
                print("\n2. DPDK testpmd txonly -> pyvirtio A -> switch -> pyvirtio B -> "
                      f"testpmd rxonly ({args.time:g} s each; daemons' own counters):")
                print(f"{'frame':>6} {'A took':>10} {'B gave':>10} {'B MB/s':>8} {'A cpu':>7}"
                      f" {'B cpu':>7} {'A util':>7} {'B util':>7} {'pmd tx':>7} {'pmd rx':>7}")
                print(f"{'bytes':>6} {'pps':>10} {'pps':>10} {'':>8} {'us/pkt':>7}"
                      f" {'us/pkt':>7} {'':>7} {'':>7} {'util':>7} {'util':>7}")
                dpdk = []
                for size in FRAME_SIZES:
                    row = dpdk_driven(work, size, args.time)
                    dpdk.append(row)
                    print(f"{size:>6} {row['a_taken_pps']:>10,} {row['b_delivered_pps']:>10,}"
                          f" {row['b_delivered_mb_per_s']:>8} {row['a_cpu_per_packet_us']!s:>7}"
                          f" {row['b_cpu_per_packet_us']!s:>7} {row['a_cpu_util']:>7}"
                          f" {row['b_cpu_util']:>7} {row['testpmd_tx_cpu_util']:>7}"
                          f" {row['testpmd_rx_cpu_util']:>7}", flush=True)
                print("   whole runs, after draining (testpmd tx sent, A took, A passed, B got, "
                      "B delivered, testpmd rx received; drops; violations; daemons' warnings):")
                for row in dpdk:
                    counts = [row[k] for k in ("testpmd_tx_sent", "pyvirtio_a_taken",
                                               "pyvirtio_a_passed", "pyvirtio_b_got",
                                               "pyvirtio_b_delivered", "testpmd_rx_received")]
                    print(f"{row['frame_bytes']:>6} {counts} {row['drops']} "
                          f"{row['violations']} {row['a_log']} {row['b_log']}", flush=True)
                print("\n   DPDK only: txonly -> testpmd vhost io-forward -> rxonly:")
                base = [dpdk_only(work, size, args.time) for size in FRAME_SIZES]
                for row in base:
                    print(json.dumps(row), flush=True)
                report["dpdk"] = dpdk
                report["dpdk_only"] = base
        if not args.skip_guest:
            print(f"\n3. Guest to guest, {GUEST_MIB} MiB over TCP (busybox nc), QEMU TCG:")
            guest = guest_driven(GuestKit.ensure(), work)
            print(f"   {guest['bytes_received']:,} bytes in {guest['seconds']} s = "
                  f"{guest['mb_per_s']} MB/s (daemon CPU s over the whole run, A/B: "
                  f"{guest['daemon_cpu_s_whole_run']})", flush=True)
            report["guest"] = guest
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
