"""Offloads through ``pyvirtio serve net --switch``: a 20 KB TCP packet for segmentation
(GSO TCPV4, partial checksum) sent by pyvirtio's own driver on one port, as Linux sends
them, and what each receiver gets: a port whose driver negotiated GUEST_TSO4 and
GUEST_CSUM takes the packet as it is, in the same daemon or in another (the datagram
carries the offloads); one that did not gets 14 finished frames whose checksums verify
(checked here with a plain RFC 1071 sum, not pyvirtio's), in either daemon."""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.frontend.net import NetDriver
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.net import GsoType, HdrFlag, NetFeature, NetHeader
from pyvirtio.testing.packets import ones_complement_sum as _sum

MACS = ["02:00:0a:da:00:0a", "02:00:0a:da:00:0b", "02:00:0a:da:00:0c", "02:00:0a:da:00:0d",
        "02:00:0a:da:00:0e"]
SENDS = (1 << NetFeature.CSUM) | (1 << NetFeature.HOST_TSO4)
TAKES = (1 << NetFeature.GUEST_CSUM) | (1 << NetFeature.GUEST_TSO4)
MSS = 1448
PAYLOAD = 20000


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _gso_packet(dst: bytes, src: bytes, payload: bytes) -> tuple[NetHeader, bytes]:
    """A TCP/IPv4 packet as Linux hands it to a NIC with TSO: the checksum field holds
    the pseudo-header's sum, the IP header is complete."""
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0x2345, 0x4000,
                               64, 6, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    ip[10:12] = (~_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5000, 7000, 1, 5 << 4, 0x18 | 0x01,
                                65535, 0, 0))
    pseudo = bytes(ip[12:20]) + bytes((0, 6)) + (20 + len(payload)).to_bytes(2, "big")
    tcp[16:18] = _sum(pseudo).to_bytes(2, "big")
    frame = dst + src + b"\x08\x00" + bytes(ip) + bytes(tcp) + payload
    header = NetHeader(flags=HdrFlag.NEEDS_CSUM, gso_type=GsoType.TCPV4, hdr_len=54,
                       gso_size=MSS, csum_start=34, csum_offset=16)
    return header, frame


def _check_segments(frames: list[bytes], payload: bytes) -> None:
    """Finished segments: valid IPv4 and TCP checksums, lengths, sequence numbers,
    FIN and PSH only on the last, and the payload whole, in order."""
    assert len(frames) == -(-len(payload) // MSS)
    got = b""
    for number, seg in enumerate(frames):
        assert _sum(seg[14:34]) == 0xFFFF, f"segment {number}: IPv4 header checksum"
        assert int.from_bytes(seg[16:18], "big") == len(seg) - 14
        tcp_len = len(seg) - 34
        pseudo = seg[26:34] + bytes((0, 6)) + tcp_len.to_bytes(2, "big")
        assert _sum(pseudo + seg[34:]) == 0xFFFF, f"segment {number}: TCP checksum"
        assert int.from_bytes(seg[38:42], "big") == 7000 + number * MSS
        flags = seg[47]
        assert bool(flags & 0x09) == (number == len(frames) - 1)
        got += seg[54:]
    assert got == payload


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[tuple[list[Path], Path]]:
    """Ports A, B, C in one daemon, D and E in another, all on one switch."""
    name = f"offl-{os.getpid()}-{secrets.token_hex(3)}"
    socks = [tmp_path / f"{c}.sock" for c in "abc"]
    one = BackendProcess("net", socks[0], ["--socket", str(socks[1]), "--socket",
                                           str(socks[2]), "--switch", name,
                                           *[x for m in MACS[:3] for x in ("--mac", m)]])
    e_sock = tmp_path / "e.sock"
    other = BackendProcess("net", tmp_path / "d.sock", ["--socket", str(e_sock), "--switch",
                                                        name, "--mac", MACS[3], "--mac",
                                                        MACS[4]])
    deadline = time.monotonic() + 10
    while not all(s.exists() for s in [*socks, e_sock]) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield [*socks, other.socket_path, e_sock], tmp_path
    finally:
        for daemon in (one, other):
            assert "Traceback" not in daemon.log
            daemon.stop()


def test_gso_packet_passes_as_is_or_is_finished_in_software(
    switch: tuple[list[Path], Path],
) -> None:
    socks, _ = switch
    a = NetDriver.open(socks[0], offloads=SENDS)
    b = NetDriver.open(socks[1], offloads=TAKES)
    c = NetDriver.open(socks[2])
    d = NetDriver.open(socks[3], offloads=TAKES)  # in another daemon
    e = NetDriver.open(socks[4])
    drivers = (a, b, c, d, e)
    try:
        assert a.features & SENDS == SENDS and b.features & TAKES == TAKES
        assert not c.features & TAKES
        # Each port's address is learned from a frame it sends (a broadcast).
        for driver, mac in zip(drivers, MACS, strict=True):
            driver.send(b"\xff" * 6 + _mac(mac) + b"\x88\xb5" + bytes(50))
        for driver in drivers:
            driver.receive(0.5)
        payload = os.urandom(PAYLOAD)
        for target in (1, 2, 3, 4):
            header, frame = _gso_packet(_mac(MACS[target]), _mac(MACS[0]), payload)
            a.send(frame, header)
        # B and D negotiated the offloads: the packet as it was sent, with its header.
        for driver in (b, d):
            ((got_header, got),) = driver.receive_packets(5, until=1)
            assert got_header.gso_type == GsoType.TCPV4 and got_header.gso_size == MSS
            assert got_header.flags & HdrFlag.NEEDS_CSUM
            assert (got_header.csum_start, got_header.csum_offset) == (34, 16)
            assert got[54:] == payload and len(got) == 54 + PAYLOAD
        # C and E did not: finished frames.
        count = -(-PAYLOAD // MSS)
        for driver in (c, e):
            packets = driver.receive_packets(5, until=count)
            assert all(h.gso_type == GsoType.NONE and not h.flags for h, _ in packets)
            _check_segments([f for _, f in packets], payload)
    finally:
        for driver in drivers:
            driver.close()


def test_partial_checksum_is_completed_for_a_port_without_guest_csum(
    switch: tuple[list[Path], Path],
) -> None:
    socks, _ = switch
    a = NetDriver.open(socks[0], offloads=SENDS)
    c = NetDriver.open(socks[2])
    try:
        for driver, mac in ((a, MACS[0]), (c, MACS[2])):
            driver.send(b"\xff" * 6 + _mac(mac) + b"\x88\xb5" + bytes(50))
        a.receive(0.3)
        c.receive(0.3)
        payload = os.urandom(1000)
        _, frame = _gso_packet(_mac(MACS[2]), _mac(MACS[0]), payload)
        plain = NetHeader(flags=HdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=16)
        a.send(frame, plain)
        ((got_header, got),) = c.receive_packets(5, until=1)
        assert not got_header.flags
        pseudo = got[26:34] + bytes((0, 6)) + (len(got) - 34).to_bytes(2, "big")
        assert _sum(pseudo + got[34:]) == 0xFFFF
        assert got[:34] == frame[:34] and got[54:] == payload
    finally:
        a.close()
        c.close()


def test_no_offloads_offers_none_and_refuses_a_gso_packet(tmp_path: Path) -> None:
    """``--no-offloads``: the port offers no offload feature (VIRTIO 1.4 §5.1.3), so a
    header asking for one is malformed (§5.1.9.2.1): dropped and counted, not sent."""
    name = f"nooffl-{os.getpid()}-{secrets.token_hex(3)}"
    b_sock = tmp_path / "b.sock"
    daemon = BackendProcess("net", tmp_path / "a.sock", ["--socket", str(b_sock), "--switch",
                                                         name, "--no-offloads", "--mac",
                                                         MACS[0], "--mac", MACS[1]])
    try:
        deadline = time.monotonic() + 10
        while not b_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        a = NetDriver.open(daemon.socket_path, offloads=SENDS)
        b = NetDriver.open(b_sock, offloads=TAKES)
        try:
            assert not a.features & SENDS and not b.features & TAKES
            b.send(b"\xff" * 6 + _mac(MACS[1]) + b"\x88\xb5" + bytes(50))
            a.receive(0.3)
            header, frame = _gso_packet(_mac(MACS[1]), _mac(MACS[0]), bytes(3000))
            a.send(frame, header)
            assert b.receive(0.5) == []
            kinds = daemon.stats()["queues"][1]["kinds"]
            assert kinds.get("dropped: malformed header") == 1, kinds
        finally:
            a.close()
            b.close()
        assert "no offloads" in daemon.log
    finally:
        daemon.stop()
