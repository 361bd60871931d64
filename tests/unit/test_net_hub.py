"""Ports of one switch in one process (``serve net --socket A --socket B``), batches
of frames between processes, and the transmit path's batching (issue #18)."""

from __future__ import annotations

import select
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.cli import main
from pyvirtio.devices.net import RX_BACKLOG, NetDevice, NetDeviceConfig
from pyvirtio.devices.net.hub import LocalHub
from pyvirtio.devices.net.switch import BATCH_MAGIC, MAX_FRAME, SwitchPort, _batches
from pyvirtio.devices.net.tx import TX_BATCH
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import HDR_SIZE, RECEIVEQ, TRANSMITQ, NetFeature
from pyvirtio.testing import Frontend, FrontendFactory, InMemoryHost

A, B, R = (bytes.fromhex(f"0200000000{i:02x}") for i in (0xA, 0xB, 0xC))
BROADCAST = b"\xff" * 6
#: Split rings, no mergeable buffers: one receive chain per frame.
FEATURES = 1 << Feature.VERSION_1


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x88\xb5" + payload


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Port:
    """A net device on switch ``hub`` of ``short_dir``, started, with its host."""

    def __init__(self, make_frontend: FrontendFactory, folder: Path, mac: bytes) -> None:
        self.switch = SwitchPort("hub", folder)
        self.device = NetDevice(NetDeviceConfig(mac=mac), self.switch)
        self.fe: Frontend = make_frontend(self.device)
        self.host = InMemoryHost(self.fe.backend)
        self.device.attach(self.host)
        self.fe.start(queues=2, size=256, features=FEATURES)
        self.rx_buffers: dict[int, int] = {}
        #: Receive chains used, collected by a kick and not read yet.
        self.rx_used: list[tuple[int, int]] = []

    def transmit(self, *frames: bytes) -> list[tuple[int, int]]:
        """Post one transmit chain per frame, then kick once."""
        for frame in frames:
            packet = bytes(HDR_SIZE) + frame
            self.fe.drivers[TRANSMITQ].add(readable=[(self.fe.put(packet), len(packet))])
        return self.fe.kick(TRANSMITQ)

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            gpa = self.fe.alloc(HDR_SIZE + 1518)
            head = self.fe.drivers[RECEIVEQ].add(writable=[(gpa, HDR_SIZE + 1518)])
            self.rx_buffers[head] = gpa
        self.rx_used += self.fe.kick(RECEIVEQ)

    def received(self) -> list[bytes]:
        used, self.rx_used = self.rx_used + self.fe.get_used(RECEIVEQ), []
        return [self.fe.memory.read(self.rx_buffers[head] + HDR_SIZE, n - HDR_SIZE)
                for head, n in used]

    def kinds(self) -> dict[str, int]:
        return dict(self.device.stats[TRANSMITQ].kinds + self.device.stats[RECEIVEQ].kinds)


@pytest.fixture
def pair(make_frontend: FrontendFactory, short_dir: Path) -> Iterator[tuple[Port, Port]]:
    a, b = Port(make_frontend, short_dir, A), Port(make_frontend, short_dir, B)
    yield a, b
    for port in (a, b):
        port.device.close()
        port.fe.close()


def readable(port: SwitchPort) -> bool:
    return bool(select.select([port.fileno()], [], [], 0.05)[0])


def test_frames_between_ports_of_one_process_skip_the_socket(pair: tuple[Port, Port]) -> None:
    a, b = pair
    assert a.switch.hub is b.switch.hub is not None
    a.post_rx(4)
    b.post_rx(4)
    hello = eth(BROADCAST, B)
    assert len(b.transmit(hello)) == 1
    assert a.received() == [hello]  # flooded to the other port of the hub, directly
    frame = eth(B, A)
    a.transmit(frame)
    assert b.received() == [frame]  # B's address was learned behind b
    assert not readable(a.switch) and not readable(b.switch)  # no datagram at all
    assert a.kinds()["switch sent"] == 1 and b.kinds()["switch received"] == 1
    assert b.kinds()["switch flooded"] == 1 and a.kinds().get("switch flooded", 0) == 0
    a.transmit(eth(A, A))  # to its own port: never back out of it
    assert a.received() == []


def test_a_batch_is_used_at_once_and_notified_once_each_way(pair: tuple[Port, Port]) -> None:
    a, b = pair
    b.post_rx(64)
    b.transmit(eth(BROADCAST, B))  # learn B (a has no buffer: the frame waits)
    b.fe.calls(RECEIVEQ)
    b.fe.calls(TRANSMITQ)
    a.fe.calls(TRANSMITQ)
    frames = [eth(B, A, bytes([i]) * 46) for i in range(40)]
    used = a.transmit(*frames)
    assert len(used) == 40
    assert a.fe.calls(TRANSMITQ) == 1  # one notification for the 40 transmit chains
    assert b.received() == frames
    assert b.fe.calls(RECEIVEQ) == 1  # and one for the 40 receive chains


def test_a_congested_port_holds_the_senders_ring_instead_of_dropping(
    pair: tuple[Port, Port],
) -> None:
    """The receiver takes frames slower than they come: nothing is lost."""
    a, b = pair
    b.transmit(eth(BROADCAST, B))
    frames = [eth(B, A, i.to_bytes(2, "big") * 23) for i in range(200)]
    used = a.transmit(*frames)
    # Half the backlog filled while b's driver had no buffer: a stops taking frames.
    assert len(used) == RX_BACKLOG // 2 == 2 * TX_BATCH
    assert len(b.device._backlogs[0]) == RX_BACKLOG // 2
    b.post_rx(250)  # the driver takes them: b drains, a resumes from the loop
    a.host.advance(0)
    a.fe.kick(RECEIVEQ)
    assert len(a.fe.get_used(TRANSMITQ)) == 200 - len(used)
    assert b.received() == frames
    assert not any("dropped" in kind for kind in a.kinds() | b.kinds())


def test_a_stuck_receiver_does_not_hold_its_peers_for_long(
    pair: tuple[Port, Port], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pair
    b.transmit(eth(BROADCAST, B))
    assert len(a.transmit(*[eth(B, A)] * 150)) == 2 * TX_BATCH
    # The oldest waiting frame is older than RX_PRESSURE_AGE: a driver that takes no
    # frame gets them dropped (counted), the sender goes on.
    monkeypatch.setattr("pyvirtio.devices.net.rx.RX_PRESSURE_AGE", -1.0)
    a.host.advance(1.0)  # a looks again (TX_RETRY) and sends the 22 it held
    assert len(a.fe.get_used(TRANSMITQ)) == 150 - 2 * TX_BATCH
    assert len(a.transmit(*[eth(B, A)] * 150)) == 150  # never held again
    assert b.kinds()["dropped: no rx buffer"] == 2 * 150 - RX_BACKLOG


def test_a_closed_port_leaves_the_hub(make_frontend: FrontendFactory, short_dir: Path) -> None:
    a = Port(make_frontend, short_dir, A)
    b = Port(make_frontend, short_dir, B)
    hub = a.switch.hub
    assert hub is not None and hub.ports == [a.switch, b.switch]
    b.transmit(eth(BROADCAST, B))
    b.device.close()
    assert hub.ports == [a.switch] and B not in hub.where
    a.device.close()
    assert short_dir / "pyvirtio-switch-hub" not in LocalHub._hubs


def test_ports_of_other_processes_get_batches(pair: tuple[Port, Port], short_dir: Path) -> None:
    """A flood reaches a port outside the hub in one datagram for the whole batch."""
    a, _ = pair
    remote = SwitchPort("hub", short_dir)
    try:
        frames = [eth(BROADCAST, A, bytes([i]) * 46) for i in range(20)]
        a.transmit(*frames)
        assert a.kinds()["switch flooded"] == 20
        assert remote.receive() == frames  # all 20 from one datagram
        assert remote.table[A] == str(a.switch.path)
        remote.send(eth(A, R))  # unicast back to the learned port, over the socket
        assert readable(a.switch)
        a.post_rx(1)
        a.device.frames_arrived()
        assert a.received() == [eth(A, R)]
    finally:
        remote.close()


def test_batches_split_at_the_datagram_limit_and_round_trip(short_dir: Path) -> None:
    frames = [bytes([i % 251]) * 1514 for i in range(100)]
    batches = _batches(frames)
    assert len(batches) == 3 and sum(n for _, n in batches) == 100
    assert all(len(data) <= MAX_FRAME and bytes(data[:6]) == BATCH_MAGIC for data, _ in batches)
    a, b = SwitchPort("raw", short_dir), SwitchPort("raw", short_dir)
    try:
        for frame in frames:
            a.queue(frame)
        a.flush()
        got: list[bytes] = []
        while len(got) < 100 and readable(b):
            got += b.receive()
        assert got == frames
        assert a.counters["switch sent"] == 100
    finally:
        a.close()
        b.close()


def test_a_frame_that_looks_like_a_batch_goes_in_a_batch_of_one(short_dir: Path) -> None:
    a, b = SwitchPort("raw", short_dir), SwitchPort("raw", short_dir)
    try:
        tricky = BATCH_MAGIC + A + b"\x00\x05hello"
        a.send(tricky)
        assert b.receive() == [tricky]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("datagram", [
    BATCH_MAGIC + b"\x00\x10abc",  # a length beyond the datagram
    BATCH_MAGIC + b"\x00\x02ab\x00",  # a stray byte at the end
])
def test_a_malformed_batch_is_counted_and_never_raises(short_dir: Path, datagram: bytes) -> None:
    port = SwitchPort("raw", short_dir)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender.sendto(datagram, str(port.path))
        frames = port.receive()
        assert frames in ([], [b"ab"])
        assert port.counters["switch dropped: bad batch"] == 1
    finally:
        sender.close()
        port.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--socket", "{d}/a", "--socket", "{d}/b"], "need --switch"),
    (["--socket", "{d}/a", "--socket", "{d}/b", "--switch", "s", "--mac", "02:00:00:00:00:01"],
     "2 --socket but 1 --mac"),
    (["--socket", "{d}/a", "--socket", "{d}/b", "--switch", "s", "--pcap", "{d}/p"],
     "--pcap serves one --socket"),
    (["--socket", "{d}/a", "--socket", "{d}/a", "--switch", "s"], "given twice"),
])
def test_serve_net_with_several_sockets_refuses_what_it_cannot_do(
    short_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
) -> None:
    code = main(["serve", "net", *(arg.format(d=short_dir) for arg in argv)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(short_dir.iterdir()) == []  # nothing left listening


def test_only_net_serves_several_sockets(short_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "rng", "--socket", f"{short_dir}/a", "--socket", f"{short_dir}/b"])
    assert code == 2
    assert "rng serves one --socket" in capsys.readouterr().err


def test_mrg_rxbuf_frames_cross_the_hub_too(make_frontend: FrontendFactory,
                                            short_dir: Path) -> None:
    """With mergeable buffers (what Linux negotiates) a batch lands the same way."""
    ports = []
    for mac in (A, B):
        switch = SwitchPort("hub", short_dir)
        device = NetDevice(NetDeviceConfig(mac=mac), switch)
        fe = make_frontend(device)
        device.attach(InMemoryHost(fe.backend))
        fe.start(queues=2, size=64,
                 features=FEATURES | (1 << NetFeature.MRG_RXBUF) | (1 << Feature.EVENT_IDX))
        ports.append((device, fe))
    (_, fe_a), (dev_b, fe_b) = ports
    try:
        gpas = {}
        for _ in range(8):
            gpa = fe_b.alloc(2048)
            gpas[fe_b.drivers[RECEIVEQ].add(writable=[(gpa, 2048)])] = gpa
        fe_b.kick(RECEIVEQ)
        packet = bytes(HDR_SIZE) + eth(BROADCAST, A)
        for _ in range(5):
            fe_a.drivers[TRANSMITQ].add(readable=[(fe_a.put(packet), len(packet))])
        fe_a.kick(TRANSMITQ)
        used = fe_b.get_used(RECEIVEQ)
        assert [n for _, n in used] == [len(packet)] * 5
        assert fe_b.memory.read(gpas[used[0][0]] + HDR_SIZE, len(packet) - HDR_SIZE) == \
            packet[HDR_SIZE:]
        assert dev_b.stats[RECEIVEQ].requests == 5
    finally:
        for device, fe in ports:
            device.close()
            fe.close()


def test_a_port_stops_reading_its_socket_while_its_backlog_drains(
    make_frontend: FrontendFactory, short_dir: Path,
) -> None:
    """Frames from another process wait in the socket (their sender waits or drops
    there) instead of overflowing the backlog; reading resumes once it drained."""
    b = Port(make_frontend, short_dir, B)
    remote = SwitchPort("hub", short_dir)
    try:
        fd = b.switch.fileno()
        frames = [eth(B, R, i.to_bytes(2, "big") * 23) for i in range(200)]
        for start in range(0, 200, 40):
            for frame in frames[start : start + 40]:
                remote.queue(frame)
            remote.flush()  # five datagrams of 40 frames
        b.host.watched[fd]()
        assert len(b.device._backlogs[0]) == 160  # RECEIVE_BUDGET (128), whole batches
        assert fd not in b.host.watched  # paused: the rest waits in the socket
        b.post_rx(250)  # the driver takes them: reading resumes, nothing lost
        assert fd in b.host.watched
        b.host.watched[fd]()
        assert b.received() == frames
        assert not any("dropped" in kind for kind in b.kinds())
    finally:
        remote.close()
        b.device.close()
        b.fe.close()


def test_a_paused_port_looks_again_after_rx_max_age(
    make_frontend: FrontendFactory, short_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver that posts no buffer: the waiting frames are dropped after
    RX_MAX_AGE and the socket is read again."""
    b = Port(make_frontend, short_dir, B)
    remote = SwitchPort("hub", short_dir)
    try:
        fd = b.switch.fileno()
        for frame in [eth(B, R)] * 100:
            remote.queue(frame)
        remote.flush()
        b.host.watched[fd]()
        assert fd not in b.host.watched
        monkeypatch.setattr("pyvirtio.devices.net.rx.RX_MAX_AGE", -1.0)
        b.host.advance(1.0)
        assert fd in b.host.watched
        assert b.kinds()["dropped: no rx buffer"] == 100
    finally:
        remote.close()
        b.device.close()
        b.fe.close()


def test_a_frame_waiting_for_a_buffer_is_a_copy_not_the_senders_buffer(
    pair: tuple[Port, Port],
) -> None:
    """Frames cross as views of the sender's transmit buffer, copied once; one that
    must wait is copied before the sender's chain is used, so the sender's driver
    may reuse its buffer at once."""
    a, b = pair
    b.transmit(eth(BROADCAST, B))
    frame = eth(B, A, b"\x11" * 46)
    packet = bytes(HDR_SIZE) + frame
    gpa = a.fe.put(packet)
    a.fe.drivers[TRANSMITQ].add(readable=[(gpa, len(packet))])
    assert len(a.fe.kick(TRANSMITQ)) == 1  # used: b had no buffer, the frame waits
    a.fe.memory.write(gpa, b"\xff" * len(packet))  # the driver reuses its buffer
    b.post_rx(1)
    assert b.received() == [frame]
