"""virtio-net end to end: two Linux guests on one pyvirtio switch.

Each guest has a ``pyvirtio serve net --switch NAME`` daemon behind its
virtio-net-pci device.  The guests are on a test-only subnet that exists
only on their virtual link (10.213.0.0/24): nothing leaves the machine.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import NetFeature

from .guest_scripts import MAKE_DATA, NET_FEATURES, PING, RECEIVE_DATA, RX_ERRORS, SEND_DATA

Serve = Callable[..., BackendProcess]
NET = ["virtio_net"]
SUBNET = "10.213.0"
MAC_A = "02:00:0a:d5:00:01"
MAC_B = "02:00:0a:d5:00:02"
TRANSFER_MIB = 4


def net_args(
    socket_path: Path, ident: str, mac: str, mtu: int, *, packed: bool = False
) -> list[str]:
    """QEMU arguments for a virtio-net-pci device on a vhost-user back-end.

    ``vectors=0``: QEMU 7.2 under TCG crashes in virtio-pci's MSI-X path when a
    vhost-user virtio-net device uses MSI-X (docs: the test environment notes).
    QEMU's virtio-net answers config space reads itself, so the MAC and the MTU
    the guest sees are QEMU's ``mac=`` and ``host_mtu=``: the same as the daemon's.
    """
    return [
        "-chardev", f"socket,id={ident},path={socket_path}",
        "-netdev", f"vhost-user,id={ident}n,chardev={ident}",
        "-device", f"virtio-net-pci,netdev={ident}n,vectors=0,mac={mac},host_mtu={mtu}"
                   + (",packed=on" if packed else ""),
    ]


RECEIVER = NET_FEATURES + PING + RECEIVE_DATA + RX_ERRORS
SENDER = MAKE_DATA + NET_FEATURES + PING + SEND_DATA + RX_ERRORS


@pytest.mark.parametrize(("mtu", "packed"), [(1500, False), (9000, True)])
def test_two_guests_on_a_pyvirtio_switch_ping_and_move_a_file_over_tcp(
    kit: GuestKit, serve: Serve, tmp_path: Path, mtu: int, packed: bool
) -> None:
    """Both MTUs negotiate MRG_RXBUF; at 9000 jumbo frames are spread over several of the
    page-sized receive buffers Linux posts (VIRTIO 1.4 §5.1.9.4).  The MTU 9000 run uses
    packed rings (§2.8, QEMU's ``packed=on``), the 1500 one split rings."""
    switch = f"e2e-{os.getpid()}-{secrets.token_hex(3)}"
    pcap = tmp_path / "a.pcap"
    net_a = serve("net", "--switch", switch, "--mac", MAC_A, "--mtu", str(mtu),
                  "--pcap", str(pcap), name="neta")
    net_b = serve("net", "--switch", switch, "--mac", MAC_B, "--mtu", str(mtu), name="netb")
    ip_a, ip_b = f"{SUBNET}.1", f"{SUBNET}.2"
    payload = mtu - 28  # an ICMP echo that fills the MTU exactly (IP 20 + ICMP 8 bytes)
    started = time.monotonic()
    with (
        kit.start(RECEIVER.format(ip=ip_a, peer=ip_b, payload=payload), NET,
                  net_args(net_a.socket_path, "n0", MAC_A, mtu, packed=packed)) as vm_a,
        kit.start(SENDER.format(ip=ip_b, peer=ip_a, mib=TRANSFER_MIB, payload=payload), NET,
                  net_args(net_b.socket_path, "n0", MAC_B, mtu, packed=packed)) as vm_b,
    ):
        result_b = vm_b.wait(timeout=240)
        result_a = vm_a.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert result_a.exit_code == 0, result_a.console
    assert result_b.exit_code == 0, result_b.console
    a, b = result_a.results, result_b.results
    assert a["mac"] == MAC_A and b["mac"] == MAC_B
    assert a["mtu"] == b["mtu"] == str(mtu)
    for guest in (a, b):
        assert guest["features"][NetFeature.MRG_RXBUF] == "1", guest
        assert guest["features"][Feature.RING_PACKED] == ("1" if packed else "0"), guest
        assert guest["rx_length_errors"] == "0", guest  # every frame's buffers were there
    assert "5 packets transmitted, 5 packets received" in a["ping"], a
    assert "5 packets transmitted, 5 packets received" in b["ping"], b
    assert "3 packets transmitted, 3 packets received" in a["full_ping"], a
    assert "3 packets transmitted, 3 packets received" in b["full_ping"], b
    assert b["sent"] == "yes"
    assert a["recv_bytes"] == str(TRANSFER_MIB << 20)
    assert a["recv_md5"] == b["sent_md5"]
    print(f"MTU {mtu}{' packed' if packed else ''}: two guests, ping and {TRANSFER_MIB} MiB over TCP in {elapsed:.1f} s")

    # Statistics are logged when QEMU disconnects and on SIGUSR1 (zero by then: they
    # count per connection).  Receive queue 0 took the file, transmit queue 1 the acks.
    lines = net_a.log.count("pyvirtio.runtime: queue 0:")
    net_a.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while net_a.log.count("pyvirtio.runtime: queue 0:") == lines and time.monotonic() < deadline:
        time.sleep(0.05)
    log_a = net_a.log
    assert log_a.count("pyvirtio.runtime: queue 0:") > lines, log_a
    rx = re.findall(r"queue 0: (\d+) requests, (\d+) bytes to the guest", log_a)
    tx = re.findall(r"queue 1: (\d+) requests, \d+ bytes to the guest, (\d+) bytes from", log_a)
    assert max(int(n) for _, n in rx) >= TRANSFER_MIB << 20, log_a
    assert max(int(n) for n, _ in tx) > 0, log_a
    assert re.search(r"switch sent [1-9]", log_a), log_a
    if mtu > 4096:  # a full frame does not fit one of Linux's buffers (at most a page)
        assert re.search(r"queue 0: [^\n]*merged frames [1-9]", log_a), log_a
    for daemon in (net_a, net_b):
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log, daemon.log
        for bad in ("malformed header", "oversized frame", "runt frame", "rx buffer too small",
                    "rx ring too small", "rx driver violation"):
            assert f"dropped: {bad}" not in daemon.log, daemon.log

    # The capture of port A holds the ICMP echoes between the two guests.
    dump = subprocess.run(
        ["tcpdump", "-n", "-r", str(pcap), "icmp"], capture_output=True, text=True, check=True
    ).stdout
    assert f"{ip_a} > {ip_b}: ICMP echo request" in dump, dump
    assert f"{ip_b} > {ip_a}: ICMP echo reply" in dump, dump
    assert f"{ip_b} > {ip_a}: ICMP echo request" in dump, dump
    tcp = subprocess.run(
        ["tcpdump", "-n", "-r", str(pcap), "tcp port 5000"], capture_output=True, text=True,
        check=True,
    ).stdout
    # The file's data, in segments of the MTU or in GSO packets (the ports offer TSO
    # and the datagram between the daemons carries it).
    carried = sum(int(n) for n in re.findall(r"length (\d+)$", tcp, re.MULTILINE))
    assert carried >= TRANSFER_MIB << 20, tcp[-2000:]
    full = subprocess.run(
        ["tcpdump", "-n", "-r", str(pcap), f"icmp and greater {mtu + 14}"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert f"{ip_a} > {ip_b}: ICMP echo request" in full, full  # full-MTU frames, both ways
    assert f"{ip_b} > {ip_a}: ICMP echo reply" in full, full


def test_a_qemu72_and_a_qemu10_guest_on_one_switch_offload_both_ways(
    kit: GuestKit, kit10: GuestKit, serve: Serve
) -> None:
    """Two front-ends on one switch: the ports offer checksum offload and TSO, both QEMUs
    pass them to their guests, and the file crosses as GSO packets (VIRTIO 1.4 §5.1.6.2)
    from the QEMU 10 guest to the QEMU 7.2 one."""
    switch = f"e2e-{os.getpid()}-{secrets.token_hex(3)}"
    net_a = serve("net", "--switch", switch, "--mac", MAC_A, name="neta")
    net_b = serve("net", "--switch", switch, "--mac", MAC_B, name="netb")
    ip_a, ip_b = f"{SUBNET}.1", f"{SUBNET}.2"
    with (
        kit.start(RECEIVER.format(ip=ip_a, peer=ip_b, payload=1472), NET,
                  net_args(net_a.socket_path, "n0", MAC_A, 1500)) as vm_a,
        kit10.start(SENDER.format(ip=ip_b, peer=ip_a, mib=TRANSFER_MIB, payload=1472), NET,
                    net_args(net_b.socket_path, "n0", MAC_B, 1500, packed=True)) as vm_b,
    ):
        result_b = vm_b.wait(timeout=240)
        result_a = vm_a.wait(timeout=60)
    assert result_a.exit_code == 0, result_a.console
    assert result_b.exit_code == 0, result_b.console
    a, b = result_a.results, result_b.results
    for guest in (a, b):
        for bit in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.HOST_TSO4,
                    NetFeature.GUEST_TSO4):
            assert guest["features"][bit] == "1", (bit, guest)
    assert b["features"][Feature.RING_PACKED] == "1", b
    assert "5 packets transmitted, 5 packets received" in a["ping"], a
    assert "5 packets transmitted, 5 packets received" in b["ping"], b
    assert a["recv_bytes"] == str(TRANSFER_MIB << 20)
    assert a["recv_md5"] == b["sent_md5"]
    for daemon in (net_a, net_b):
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log, daemon.log
    # The counters logged when QEMU 10 disconnected: its transmit queue sent GSO packets.
    assert re.search(r"queue 1: [^\n]*gso packets [1-9]", net_b.log), net_b.log[-3000:]
