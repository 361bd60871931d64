"""The learning switch between net ports, and pcap capture files."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.pcap import (
    LINKTYPE_ETHERNET,
    PCAP_HEADER,
    PCAP_MAGIC,
    PCAP_RECORD,
    PcapWriter,
)
from pyvirtio.devices.switch import SwitchPort, switch_dir

A, B, C = (bytes.fromhex(f"0200000000{i:02x}") for i in (0xA, 0xB, 0xC))
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 50) -> bytes:
    return dst + src + b"\x08\x00" + payload


def drain(port: SwitchPort) -> list[bytes]:
    """Frames that reached ``port`` (datagrams between local sockets arrive at once)."""
    deadline = time.monotonic() + 0.5
    frames = port.receive()
    while not frames and time.monotonic() < deadline:
        time.sleep(0.01)
        frames = port.receive()
    return frames


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for sockets (sun_path is limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ports(short_dir: Path) -> Iterator[list[SwitchPort]]:
    made = [SwitchPort("unit", short_dir) for _ in range(3)]
    yield made
    for port in made:
        port.close()


def test_switch_name_is_validated_and_folder_is_per_name(tmp_path: Path) -> None:
    assert switch_dir("lab-1", tmp_path) == tmp_path / "pyvirtio-switch-lab-1"
    for bad in ("", "a/b", "..", "x" * 65, "sp ace"):
        with pytest.raises(ValueError):
            switch_dir(bad, tmp_path)


def test_broadcast_floods_to_every_other_port(ports: list[SwitchPort]) -> None:
    a, b, c = ports
    frame = eth(BROADCAST, A)
    a.send(frame)
    assert drain(b) == [frame]
    assert drain(c) == [frame]
    assert a.receive() == []  # never back to the sender
    assert a.counters["switch flooded"] == 1


def test_unknown_unicast_floods_then_learned_unicast_goes_to_one_port(
    ports: list[SwitchPort],
) -> None:
    a, b, c = ports
    a.send(eth(B, A))  # B unknown at port a: flooded
    assert len(drain(b)) == 1 and len(drain(c)) == 1
    b.send(eth(A, B))  # b learned A behind a from the flood: unicast
    assert drain(a) == [eth(A, B)]
    assert b.counters["switch flooded"] == 0
    assert a.table[B] == str(b.path)  # a learned B behind b
    a.send(eth(B, A, b"second"))
    assert drain(b) == [eth(B, A, b"second")]
    assert c.receive() == []  # c does not see unicast between a and b
    assert a.counters["switch flooded"] == 1


def test_a_vanished_peer_is_forgotten_and_frames_to_it_are_dropped_and_counted(
    ports: list[SwitchPort],
) -> None:
    a, b, c = ports
    b.send(eth(A, B))
    drain(a)
    drain(c)
    assert B in a.table
    b.close()
    a.send(eth(B, A))  # to the learned, dead peer: dropped, and B is forgotten
    assert a.counters["switch dropped: peer gone"] == 1
    assert B not in a.table
    a.send(eth(BROADCAST, A))  # floods reach only live ports
    assert drain(c)[-1] == eth(BROADCAST, A)


def test_a_killed_ports_stale_socket_file_is_removed(ports: list[SwitchPort]) -> None:
    a = ports[0]
    stale = a.dir / "port-999999-dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody reads it: what SIGKILL leaves
    a.send(eth(BROADCAST, A))
    assert not stale.exists()
    assert a.counters["switch dropped: peer gone"] == 1


def test_a_peer_that_does_not_read_costs_one_short_wait_then_drops(
    ports: list[SwitchPort],
) -> None:
    a, b, c = ports
    c.close()
    b.send(eth(A, B))  # a learns B behind b
    drain(a)
    started = time.monotonic()
    for i in range(200):  # b never reads: its queue fills up
        a.send(eth(B, A, i.to_bytes(2, "big") * 25))
    elapsed = time.monotonic() - started
    busy = a.counters["switch dropped: peer busy"]
    assert busy > 0 and a.counters["switch sent"] + busy == 200
    assert elapsed < 0.5  # one SEND_WAIT (5 ms), then non-blocking drops
    assert len(b.receive()) == a.counters["switch sent"]
    a.send(eth(B, A))  # room again: delivered
    assert drain(b) == [eth(B, A)]


def test_last_port_removes_the_switch_folder(short_dir: Path) -> None:
    port = SwitchPort("solo", short_dir)
    assert port.path.exists()
    port.close()
    assert not (short_dir / "pyvirtio-switch-solo").exists()


# -- pcap -----------------------------------------------------------------------------------


def test_pcap_file_has_the_global_header_and_one_record_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    writer = PcapWriter(path)
    frames = [eth(B, A, os.urandom(60)), eth(BROADCAST, B, b"y" * 1486)]
    writer.write(frames[0], 1700000000.25)
    writer.write(frames[1])
    writer.close()
    data = path.read_bytes()
    magic, major, minor, _zone, _sig, snaplen, link = PCAP_HEADER.unpack_from(data)
    assert (magic, major, minor, snaplen, link) == (PCAP_MAGIC, 2, 4, 65535, LINKTYPE_ETHERNET)
    pos = PCAP_HEADER.size
    got = []
    stamps = []
    while pos < len(data):
        sec, usec, incl, orig = PCAP_RECORD.unpack_from(data, pos)
        assert incl == orig
        pos += PCAP_RECORD.size
        got.append(data[pos : pos + incl])
        stamps.append((sec, usec))
        pos += incl
    assert got == frames
    assert stamps[0] == (1700000000, 250000)
    assert struct.calcsize("<IHHiIII") == 24 and PCAP_RECORD.size == 16


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_reads_the_capture(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    writer = PcapWriter(path)
    # An ARP request from 10.213.0.1 for 10.213.0.2.
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + A + bytes([10, 213, 0, 1]) + bytes(6)
           + bytes([10, 213, 0, 2]))
    writer.write(eth(BROADCAST, A, b"") [:12] + b"\x08\x06" + arp)
    writer.close()
    out = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "ARP, Request who-has 10.213.0.2 tell 10.213.0.1" in out
