"""virtio-net multiqueue end to end: two 2-vCPU guests with two queue pairs each.

Both daemons run ``pyvirtio serve net --queues 2`` on one switch; QEMU has
``-netdev vhost-user,...,queues=2`` and ``virtio-net-pci,...,mq=on``.  Linux's
virtio_net uses min(max_virtqueue_pairs, online CPUs) pairs by default and
tells QEMU with VQ_PAIRS_SET; QEMU enables the second pair's rings
(SET_VRING_ENABLE).

Traffic on every queue, deterministically: each guest has two addresses and
pings the other's first address from both, one ping pinned to CPU 0, the other
to CPU 1.  virtio_net maps each CPU to its own transmit queue (XPS), so the
echo requests leave on transmit queues 1 and 3; the daemon steers each reply
to the receive queue paired with the one its request left on (§5.1.9.5.6),
so the replies arrive on receive queues 0 and 2.  No flow is shared between
the two guests' pings (B pings A1 from B1 and B2, A pings B1 and B2 from A2),
so each flow's transmit queue is its pinned CPU's.

Two TCP transfers run in parallel from B to A as well, pinned to the two CPUs,
their data checked with md5sum (their random source ports decide their
receive queues, so those are not asserted).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

from pyvirtio.devices.net import pick_rx_queue
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess

Serve = Callable[..., BackendProcess]
NET = ["virtio_net"]
SUBNET = "10.213.1"
IP_A, IP_B = f"{SUBNET}.1", f"{SUBNET}.2"
#: Second addresses: A pings from these, so no flow of A's pings is one of B's.
IP_A2, IP_B2 = f"{SUBNET}.11", f"{SUBNET}.12"
MAC_A = "02:00:0a:d5:01:01"
MAC_B = "02:00:0a:d5:01:02"
MIB = 4
LISTEN = (5000, 5001)


def mq_net_args(socket_path: Path, mac: str, pairs: int) -> list[str]:
    """QEMU arguments for a multiqueue virtio-net-pci on a vhost-user back end (``vectors=0``:
    see tests/e2e/test_net.py)."""
    return [
        "-chardev", f"socket,id=c0,path={socket_path}",
        "-netdev", f"vhost-user,id=n0,chardev=c0,queues={pairs}",
        "-device", f"virtio-net-pci,netdev=n0,vectors=0,mq=on,mac={mac}",
    ]


def _icmp_frame(src: str, dst: str) -> bytes:
    """An Ethernet + IPv4 header of an ICMP packet, enough for :func:`flow_hash`."""
    ip = (bytes([0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0])
          + bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split(".")))
    return bytes(12) + b"\x08\x00" + ip + bytes(8)


def second_address() -> str:
    """An address for A whose ICMP with B lands on the other receive queue than
    ``IP_A``'s, in both directions (receive queues 0 and 2 of a 2-pair device)."""
    ready = [0, 2]
    for host in range(3, 255):
        other = f"{SUBNET}.{host}"
        to_a = {pick_rx_queue(_icmp_frame(IP_B, dst), ready) for dst in (IP_A, other)}
        to_b = {pick_rx_queue(_icmp_frame(src, IP_B), ready) for src in (IP_A, other)}
        if to_a == to_b == set(ready):
            return other
    raise AssertionError("no address spreads ICMP over both receive queues")


_SETUP = """
    echo RESULT cpus=$(nproc)
    ip link set eth0 up || exit 61
    ip addr add {ip}/24 dev eth0 || exit 62
    {extra}
    echo RESULT queues="$(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
    echo RESULT xps="$(cat /sys/class/net/eth0/queues/tx-*/xps_cpus | tr '\\n' ' ')"
    n=0
    until ping -c 1 -W 1 {peer0} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 90 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
    taskset -c 0 ping -c 10 -i 0.1 -I {src0} {dst0} > /tmp/ping0 &
    taskset -c 1 ping -c 10 -i 0.1 -I {src1} {dst1} > /tmp/ping1 &
    wait
    echo RESULT ping0="$(grep 'packets transmitted' /tmp/ping0)"
    echo RESULT ping1="$(grep 'packets transmitted' /tmp/ping1)"
"""

RECEIVER = _SETUP + """
    mkfifo /tmp/hold
    exec 3<>/tmp/hold
    nc -l -p {port0} <&3 >/tmp/recv0 &
    nc -l -p {port1} <&3 >/tmp/recv1 &
    wait
    for i in 0 1; do
        echo RESULT recv${{i}}_bytes=$(wc -c < /tmp/recv$i)
        echo RESULT recv${{i}}_md5=$(md5sum /tmp/recv$i | cut -d' ' -f1)
    done
"""

SENDER = """
    for i in 0 1; do
        dd if=/dev/urandom of=/tmp/data$i bs=1048576 count={mib} 2>/dev/null
        echo RESULT sent${{i}}_md5=$(md5sum /tmp/data$i | cut -d' ' -f1)
    done
""" + _SETUP + """
    send() {{
        n=0
        until taskset -c $1 nc {peer0} $2 </tmp/data$1; do
            n=$((n + 1))
            [ $n -ge 30 ] && {{ echo RESULT nc$1=failed; return 1; }}
            sleep 1
        done
        echo RESULT sent$1=yes
    }}
    send 0 {port0} &
    send 1 {port1} &
    wait
"""


def queue_totals(log: str, queue: int) -> tuple[int, int, int]:
    """The largest (requests, bytes to the guest, bytes from the guest) logged for ``queue``."""
    rows = re.findall(rf"queue {queue}: (\d+) requests, (\d+) bytes to the guest, "
                      rf"(\d+) bytes from the guest", log)
    assert rows, log
    return (max(int(r[0]) for r in rows), max(int(r[1]) for r in rows),
            max(int(r[2]) for r in rows))


def flush_stats(daemon: BackendProcess) -> str:
    """SIGUSR1, then the log once its statistics are there (the disconnect's come before)."""
    lines = daemon.log.count("pyvirtio.runtime: queue 0:")
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while daemon.log.count("pyvirtio.runtime: queue 0:") == lines and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.log


def test_two_queue_pairs_carry_traffic_on_every_queue(kit: GuestKit, serve: Serve) -> None:
    """VIRTIO 1.4 §5.1.9.5.5: with MQ the driver uses several pairs; every queue moves data."""
    switch = f"e2e-mq-{os.getpid()}-{secrets.token_hex(3)}"
    net_a = serve("net", "--switch", switch, "--mac", MAC_A, "--queues", "2", name="mqa")
    net_b = serve("net", "--switch", switch, "--mac", MAC_B, "--queues", "2", name="mqb")
    ports = {"port0": LISTEN[0], "port1": LISTEN[1]}
    # B pings A1 from B1 (CPU 0) and from B2 (CPU 1); A pings B1 (CPU 0) and B2 (CPU 1)
    # from A2: the four ICMP flows and their replies are eight different flows.
    receiver = RECEIVER.format(ip=IP_A, extra=f"ip addr add {IP_A2}/24 dev eth0 || exit 62",
                               peer0=IP_B, src0=IP_A2, dst0=IP_B, src1=IP_A2, dst1=IP_B2,
                               **ports)
    sender = SENDER.format(ip=IP_B, extra=f"ip addr add {IP_B2}/24 dev eth0 || exit 62",
                           peer0=IP_A, src0=IP_B, dst0=IP_A, src1=IP_B2, dst1=IP_A, mib=MIB,
                           **ports)
    started = time.monotonic()
    with (
        kit.start(receiver, NET, mq_net_args(net_a.socket_path, MAC_A, 2), smp=2) as vm_a,
        kit.start(sender, NET, mq_net_args(net_b.socket_path, MAC_B, 2), smp=2) as vm_b,
    ):
        result_b = vm_b.wait(timeout=300)
        result_a = vm_a.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert result_a.exit_code == 0, result_a.console
    assert result_b.exit_code == 0, result_b.console
    a, b = result_a.results, result_b.results
    for r in (a, b):
        assert r["cpus"] == "2", r
        # Linux enabled both pairs (real_num_rx/tx_queues 2): MQ was negotiated.
        assert r["queues"].split() == ["rx-0", "rx-1", "tx-0", "tx-1"], r
        for ping in ("ping0", "ping1"):
            assert "10 packets transmitted, 10 packets received" in r[ping], r
    for i in (0, 1):
        assert b[f"sent{i}"] == "yes", b
        assert a[f"recv{i}_bytes"] == str(MIB << 20), a
        assert a[f"recv{i}_md5"] == b[f"sent{i}_md5"], (a, b)

    log_a, log_b = flush_stats(net_a), flush_stats(net_b)
    a_stats = {q: queue_totals(log_a, q) for q in range(4)}
    b_stats = {q: queue_totals(log_b, q) for q in range(4)}
    print(f"2 pairs: pings and 2 x {MIB} MiB in parallel in {elapsed:.1f} s (xps {a['xps']})")
    print("A (receiver): (requests, bytes to the guest, bytes from the guest)", a_stats)
    print("B (sender):", b_stats)
    for stats in (a_stats, b_stats):
        for q in range(4):
            assert stats[q][0] > 0, (q, stats)  # every queue carried packets
        assert stats[0][1] > 0 and stats[2][1] > 0, stats  # receive queues: to the guest
        assert stats[1][2] > 0 and stats[3][2] > 0, stats  # transmit queues: from it
    # Every byte of both files reached A through its receive queues, and left B through
    # its transmit queues.
    assert a_stats[0][1] + a_stats[2][1] >= 2 * MIB << 20, a_stats
    assert b_stats[1][2] + b_stats[3][2] >= 2 * MIB << 20, b_stats
    for daemon in (net_a, net_b):
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log, daemon.log
        for bad in ("malformed header", "oversized frame", "runt frame", "rx buffer too small"):
            assert f"dropped: {bad}" not in daemon.log, daemon.log


ONE_CPU = """
    ip link set eth0 up || exit 61
    ip addr add {ip}/24 dev eth0 || exit 62
    {extra}
    echo RESULT queues="$(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
    n=0
    until ping -c 1 -W 1 {peer0} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 90 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
    echo RESULT ping0="$(ping -c 5 -i 0.2 {peer0} | grep 'packets transmitted')"
    echo RESULT ping1="$(ping -c 5 -i 0.2 {peer1} | grep 'packets transmitted')"
    sleep 2
"""


def test_a_one_vcpu_guest_uses_one_pair_and_no_frame_goes_to_the_disabled_one(
    kit: GuestKit, serve: Serve
) -> None:
    """Linux uses min(pairs, CPUs) pairs; QEMU disables the other rings (SET_VRING_ENABLE 0).

    A has two addresses whose ICMP with B would use both receive queues, in both
    directions, if both were ready: with queue 2 disabled, every echo and reply
    must arrive on queue 0 (a frame put on queue 2 would wait there and be lost).
    """
    switch = f"e2e-mq1-{os.getpid()}-{secrets.token_hex(3)}"
    net_a = serve("net", "--switch", switch, "--mac", MAC_A, "--queues", "2", name="mq1a")
    net_b = serve("net", "--switch", switch, "--mac", MAC_B, "--queues", "2", name="mq1b")
    ip_a2 = second_address()
    with (
        kit.start(ONE_CPU.format(ip=IP_A, extra=f"ip addr add {ip_a2}/24 dev eth0 || exit 62",
                                 peer0=IP_B, peer1=IP_B), NET,
                  mq_net_args(net_a.socket_path, MAC_A, 2)) as vm_a,
        kit.start(ONE_CPU.format(ip=IP_B, extra="", peer0=IP_A, peer1=ip_a2), NET,
                  mq_net_args(net_b.socket_path, MAC_B, 2)) as vm_b,
    ):
        result_b = vm_b.wait(timeout=120)
        result_a = vm_a.wait(timeout=60)
    assert result_a.exit_code == 0, result_a.console
    assert result_b.exit_code == 0, result_b.console
    for r in (result_a.results, result_b.results):
        assert r["queues"].split() == ["rx-0", "tx-0"], r
        for ping in ("ping0", "ping1"):
            assert "5 packets transmitted, 5 packets received" in r[ping], r
    for daemon in (net_a, net_b):
        log = flush_stats(daemon)
        stats = {q: queue_totals(log, q) for q in range(4)}
        assert stats[0][0] > 0 and stats[1][0] > 0, stats
        assert stats[2] == stats[3] == (0, 0, 0), stats
        assert daemon.stop() == 0
        assert "dropped: no rx buffer" not in daemon.log, daemon.log
