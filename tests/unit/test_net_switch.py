"""The learning switch between net ports, and pcap capture files."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.cli import main
from pyvirtio.devices.net.pcap import (
    LINKTYPE_ETHERNET,
    PCAP_HEADER,
    PCAP_MAGIC,
    PCAP_RECORD,
    PcapWriter,
)
from pyvirtio.devices.net.switch import (
    OFFLOAD_MAGIC,
    PEER_BACKLOG,
    PEER_STALL,
    SwitchPort,
    switch_dir,
)
from pyvirtio.devices.net.uplink import (
    LOCAL_BURST,
    LOCK_FILE,
    Uplink,
    UplinkedSwitchPort,
    UplinkLock,
)
from pyvirtio.errors import UplinkTaken
from pyvirtio.spec.net import HDR_SIZE, GsoType, HdrFlag, NetHeader

A, B, C, H = (bytes.fromhex(f"0200000000{i:02x}") for i in (0xA, 0xB, 0xC, 0x11))
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


def test_offload_records_between_processes_and_a_packet_that_cannot_be_finished(
    ports: list[SwitchPort],
) -> None:
    """A packet with offloads travels to another process's port in a record; one whose
    offloads cannot be done (a UDP GSO packet: no UFO in software) is dropped there and
    counted, and a guest's frame that starts like a record arrives as it was sent."""
    a, b, _ = ports
    udp_gso = NetHeader(flags=HdrFlag.NEEDS_CSUM, gso_type=GsoType.UDP, gso_size=100,
                        csum_start=34, csum_offset=6)
    a.queue(eth(BROADCAST, A, bytes(300)), udp_gso)
    a.flush()
    look_alike = OFFLOAD_MAGIC + A + b"\x88\xb5" + bytes(50)
    a.queue(look_alike)
    a.flush()
    assert drain(b) == [look_alike]
    assert b.counters["switch dropped: bad offload"] == 1


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
    stale = a.dir / "999999-dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody reads it: what SIGKILL leaves
    a.send(eth(BROADCAST, A))
    assert not stale.exists()
    assert a.counters["switch dropped: peer gone"] == 1


def test_a_peer_that_does_not_read_never_blocks_the_sender(
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
    # Held for b (at most PEER_BACKLOG datagrams), the rest dropped and counted.
    assert busy > 0 and a.counters["switch sent"] + busy + PEER_BACKLOG == 200
    assert elapsed < 0.5  # never a blocking send
    time.sleep(PEER_STALL)
    assert not a.congested()  # b took nothing for PEER_STALL: given up on
    assert a.counters["switch sent"] + a.counters["switch dropped: peer busy"] == 200
    assert len(b.receive()) == a.counters["switch sent"]
    a.send(eth(B, A))  # room again: delivered
    assert drain(b) == [eth(B, A)]


def test_last_port_removes_the_switch_folder(short_dir: Path) -> None:
    port = SwitchPort("solo", short_dir)
    assert port.path.exists()
    port.close()
    assert not (short_dir / "pyvirtio-switch-solo").exists()


# -- the tap uplink ---------------------------------------------------------------------------
# The tap is one end of a SOCK_SEQPACKET socket pair: the test holds the host's end, where
# each datagram is a virtio_net_hdr and a frame, as on a tap with IFF_VNET_HDR.


def uplink_pair(switch: str, base: Path) -> tuple[Uplink, socket.socket]:
    """An uplink of ``switch`` and the host's end of its stand-in tap."""
    host, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Uplink(switch, "pvtest0", base, tap_fd=tap_end.detach()), host


@pytest.fixture
def uplink(short_dir: Path) -> Iterator[tuple[Uplink, socket.socket]]:
    """Switch ``unit``'s uplink, and the host's end of its stand-in tap."""
    made, host = uplink_pair("unit", short_dir)
    yield made, host
    made.close()
    host.close()


def host_send(host: socket.socket, frame: bytes, header: NetHeader | None = None) -> None:
    host.send((header or NetHeader()).pack() + frame)


def host_receive(host: socket.socket) -> tuple[NetHeader, bytes]:
    host.settimeout(0.5)
    data = host.recv(65536)
    return NetHeader.unpack(data[:HDR_SIZE]), data[HDR_SIZE:]


def test_uplink_writes_switch_frames_to_the_tap_with_an_all_zero_header(
    uplink: tuple[Uplink, socket.socket], ports: list[SwitchPort],
) -> None:
    up, host = uplink
    b = ports[1]
    b.send(eth(BROADCAST, B))  # flooded: the uplink is a port like any other
    deadline = time.monotonic() + 0.5
    while not up.to_tap() and time.monotonic() < deadline:
        time.sleep(0.01)
    header, frame = host_receive(host)
    assert header.pack() == bytes(HDR_SIZE) and frame == eth(BROADCAST, B)
    assert up.counters["uplink received"] == 1 and up.counters["tap sent"] == 1


def test_frames_from_the_tap_reach_the_switch_and_ports_learn_the_host_behind_the_uplink(
    uplink: tuple[Uplink, socket.socket], ports: list[SwitchPort],
) -> None:
    up, host = uplink
    _, b, c = ports
    host_send(host, eth(B, H), NetHeader(flags=HdrFlag.DATA_VALID))  # B unknown: flooded
    assert up.from_tap() == 1
    assert drain(b) == [eth(B, H)] and drain(c) == [eth(B, H)]
    assert b.table[H] == str(up.port.path)
    assert up.counters["tap received"] == 1 and up.counters["uplink flooded"] == 1
    b.send(eth(H, B))  # learned: to the uplink only
    deadline = time.monotonic() + 0.5
    while not up.to_tap() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host_receive(host)[1] == eth(H, B)
    assert c.receive() == []
    host_send(host, eth(B, H, b"again"))  # the uplink learned B from that frame
    up.from_tap()
    assert drain(b) == [eth(B, H, b"again")] and c.receive() == []


def test_the_uplink_drops_offloaded_frames_from_the_tap(
    uplink: tuple[Uplink, socket.socket], ports: list[SwitchPort],
) -> None:
    """TUNSETOFFLOAD 0 means none come; one that does has no place on the switch."""
    up, host = uplink
    host_send(host, eth(BROADCAST, H), NetHeader(flags=HdrFlag.NEEDS_CSUM))
    host_send(host, eth(BROADCAST, H), NetHeader(gso_type=GsoType.TCPV4, gso_size=1448))
    assert up.from_tap() == 2
    assert up.counters["uplink dropped: offloaded frame"] == 2
    assert ports[1].receive() == []


def test_a_switch_has_one_uplink_and_the_next_one_names_the_holder(
    uplink: tuple[Uplink, socket.socket], short_dir: Path,
) -> None:
    up, _ = uplink
    stand_in, other_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(UplinkTaken) as taken:
        Uplink("unit", "pvtest1", short_dir, tap_fd=stand_in.fileno())
    assert str(taken.value) == (f"switch 'unit' already has a tap uplink (pid {os.getpid()}, "
                                "tap pvtest0); a switch has one at most")
    assert os.get_blocking(stand_in.fileno())  # refused before it touched the tap
    stand_in.close()
    other_end.close()
    elsewhere, host = uplink_pair("other", short_dir)  # another switch has its own
    elsewhere.close()
    host.close()
    up.close()
    assert not switch_dir("unit", short_dir).exists()  # lock file and socket removed
    again, host = uplink_pair("unit", short_dir)
    again.close()
    host.close()


def test_a_killed_uplinks_lock_is_released_by_the_kernel(short_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from pyvirtio.devices.net.uplink import UplinkLock; "
         "lock = UplinkLock('unit', 'pid child', Path(sys.argv[1])); print('held', flush=True); "
         "sys.stdin.read()", str(short_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(UplinkTaken, match="pid child"):
            UplinkLock("unit", "pid parent", short_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (switch_dir("unit", short_dir) / LOCK_FILE).exists()  # left behind, unlocked
    UplinkLock("unit", "pid parent", short_dir).release()


def test_an_uplinked_port_moves_bursts_both_ways_without_drops(
    uplink: tuple[Uplink, socket.socket], short_dir: Path,
) -> None:
    """Both ports share one thread: the uplink never overfills the guest port's queue."""
    up, host = uplink
    backend = UplinkedSwitchPort(SwitchPort("unit", short_dir), up)
    try:
        burst = 10 * LOCAL_BURST + 3  # far more than a socket queues (max_dgram_qlen)
        for i in range(burst):
            host_send(host, eth(A, H, i.to_bytes(2, "big") * 25))
        assert select.select([backend], [], [], 1.0)[0] == [backend]
        got = backend.receive()
        assert not any("dropped" in key for key in backend.counters), backend.counters
        assert len(got) == burst
        assert got == [eth(A, H, i.to_bytes(2, "big") * 25) for i in range(burst)]
        for i in range(burst):  # H was learned behind the uplink: straight to the tap
            backend.send(eth(H, A, i.to_bytes(2, "big") * 25))
        assert not any("dropped" in key for key in backend.counters), backend.counters
        assert [host_receive(host)[1] for _ in range(burst)] == [
            eth(H, A, i.to_bytes(2, "big") * 25) for i in range(burst)]
        assert backend.counters["tap received"] == backend.counters["tap sent"] == burst
        assert select.select([backend], [], [], 0)[0] == []  # nothing left over
    finally:
        backend.close()
    assert not switch_dir("unit", short_dir).exists()


def test_cli_with_switch_and_tap_refuses_a_second_uplink(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The lock is checked before the tap is made: no root needed to see the error."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    lock = UplinkLock("lab", "pid 1, tap first0")
    try:
        argv = ["serve", "net", "--socket", "/nonexistent/n.sock", "--switch", "lab"]
        assert main([*argv, "--tap", "second0"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "switch 'lab' already has a tap uplink (pid 1, tap first0)" in err, err


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
    assert (magic, major, minor, snaplen, link) == (PCAP_MAGIC, 2, 4, 262144, LINKTYPE_ETHERNET)
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
