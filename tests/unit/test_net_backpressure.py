"""Back-pressure between switch ports of separate processes (issue #18).

The peer here is a bare :class:`SwitchPort` of its own (what another daemon's
port is: a socket in the switch folder, outside this process's hub), read by a
thread; the sender is a net device whose guest transmits through its port.  A
full peer queue must hold the guest's transmit chains in the ring (no drop)
while the peer keeps reading, and a peer that stopped must cost counted drops,
never a blocked sender.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.net.switch import PEER_BACKLOG, PEER_STALL, SwitchPort
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import HDR_SIZE, TRANSMITQ
from pyvirtio.testing import Frontend, FrontendFactory, InMemoryHost

A, B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
RING = 256
FRAME = 1000


def eth(seq: int) -> bytes:
    """A frame from A to B (unknown to the sender: flooded to every peer)."""
    payload = seq.to_bytes(4, "big") * (FRAME // 4)
    return B + A + b"\x88\xb5" + payload[: FRAME - 14]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Sender:
    """A net device on switch ``bp`` whose guest keeps its transmit ring full."""

    def __init__(self, make_frontend: FrontendFactory, folder: Path) -> None:
        self.port = SwitchPort("bp", folder)
        self.device = NetDevice(NetDeviceConfig(mac=A), self.port)
        self.fe: Frontend = make_frontend(self.device)
        self.host = InMemoryHost(self.fe.backend)
        self.device.attach(self.host)
        self.fe.start(queues=2, size=RING, features=1 << Feature.VERSION_1)
        self.free = [self.fe.alloc(HDR_SIZE + FRAME) for _ in range(RING)]
        self.busy: dict[int, int] = {}
        self.posted = self.used = 0

    def post(self, total: int) -> float:
        """Fill the ring with frames up to ``total`` posted, kick; how long the kick took."""
        while self.free and self.posted < total:
            gpa = self.free.pop()
            self.fe.memory.write(gpa, bytes(HDR_SIZE) + eth(self.posted))
            head = self.fe.drivers[TRANSMITQ].add(readable=[(gpa, HDR_SIZE + FRAME)])
            self.busy[head] = gpa
            self.posted += 1
        started = time.monotonic()
        self.collect(self.fe.kick(TRANSMITQ))
        return time.monotonic() - started

    def loop(self) -> float:
        """One round of the event loop: writable waits, timers; how long it took."""
        started = time.monotonic()
        self.host.advance(0.001)
        self.collect(self.fe.get_used(TRANSMITQ))
        return time.monotonic() - started

    def collect(self, used: list[tuple[int, int]]) -> None:
        for head, _ in used:
            self.free.append(self.busy.pop(head))
            self.used += 1

    def kinds(self) -> dict[str, int]:
        return dict(self.device.stats[TRANSMITQ].kinds)


@pytest.fixture
def sender(make_frontend: FrontendFactory, short_dir: Path) -> Iterator[Sender]:
    s = Sender(make_frontend, short_dir)
    yield s
    s.port.close()


def test_a_slow_receiver_that_keeps_up_loses_nothing(sender: Sender, short_dir: Path) -> None:
    peer = SwitchPort("bp", short_dir)
    total = 3000
    got: list[bytes] = []
    done = threading.Event()

    def read_slowly() -> None:
        while not done.is_set() and len(got) < total:
            got.extend(peer.receive(limit=16))
            time.sleep(0.002)  # far slower than the sender: its queue fills often

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        # Until the last frames, held for the peer after their chains were used, got there.
        while (sender.used < total or len(got) < total) and time.monotonic() < deadline:
            sender.post(total)
            sender.loop()
            time.sleep(0.0005)
        reader.join(timeout=30)
    finally:
        done.set()
        reader.join()
        peer.close()
    kinds = sender.kinds()
    assert sender.used == total
    assert not {k: v for k, v in kinds.items() if "dropped" in k}, kinds
    assert kinds["switch sent"] == total
    assert kinds["switch waited: peer full"] > 0  # the queue was full, and it waited
    assert got == [eth(i) for i in range(total)]  # all of them, in order


def test_a_stopped_receiver_costs_counted_drops_never_a_blocked_sender(
    sender: Sender, short_dir: Path,
) -> None:
    peer = SwitchPort("bp", short_dir)  # never reads
    total = 2000
    slowest = 0.0
    started = time.monotonic()
    try:
        while sender.used < total and time.monotonic() - started < 10:
            slowest = max(slowest, sender.post(total), sender.loop())
            time.sleep(0.001)
        elapsed = time.monotonic() - started
        kinds = sender.kinds()
        assert sender.used == total  # every chain went back to the guest
        busy = kinds["switch dropped: peer busy"]
        assert busy > 0 and kinds["switch sent"] + busy == total, kinds
        # The ring was held once, for about PEER_STALL; after that frames the full
        # peer cannot take are dropped at once.
        assert kinds["switch waited: peer full"] == 1
        assert PEER_STALL <= elapsed < PEER_STALL + 2.0
        assert slowest < PEER_STALL / 2  # no call of the device blocked (a few ms each)
        frames = []
        while batch := peer.receive():
            frames += batch
        assert len(frames) == kinds["switch sent"]
    finally:
        peer.close()


def test_a_full_peer_without_a_host_holds_then_gives_up(short_dir: Path) -> None:
    """Bare ports (no device host): the held datagrams are bounded, and given up
    on after PEER_STALL, at the next flush or congestion check."""
    a, b = SwitchPort("bp", short_dir), SwitchPort("bp", short_dir)
    try:
        for i in range(200):  # b never reads: its queue fills up
            a.send(eth(i))
        sent = a.counters["switch sent"]
        busy = a.counters["switch dropped: peer busy"]
        assert a.congested()
        assert sent + busy + PEER_BACKLOG == 200
        time.sleep(PEER_STALL)
        assert not a.congested()
        assert a.counters["switch sent"] + a.counters["switch dropped: peer busy"] == 200
        assert len(b.receive(limit=1000)) == sent
        a.send(eth(999))  # room again: delivered
        assert b.receive() == [eth(999)]
    finally:
        a.close()
        b.close()


def test_a_flood_reaches_a_live_peer_whole_while_a_stopped_one_drops(
    sender: Sender, short_dir: Path,
) -> None:
    """Broadcast to several peers: a stopped peer holds the sender once, for
    PEER_STALL, and then only costs its own frames; the live one loses none."""
    live, stopped = SwitchPort("bp", short_dir), SwitchPort("bp", short_dir)
    total = 2000
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set() and len(got) < total:
            got.extend(live.receive())
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    started = time.monotonic()
    try:
        while ((sender.used < total or len(got) < total)
               and time.monotonic() - started < 20):
            sender.post(total)
            sender.loop()
            time.sleep(0.0005)
        reader.join(timeout=10)
    finally:
        done.set()
        reader.join()
    try:
        kinds = sender.kinds()
        assert sender.used == total
        assert got == [eth(i) for i in range(total)]  # the live peer: every frame, in order
        took = len(stopped.receive(limit=10 * total))
        busy = kinds["switch dropped: peer busy"]
        assert busy > 0 and took + busy == total, kinds  # the stopped one: counted drops
        assert kinds["switch sent"] == total + took
        assert time.monotonic() - started < PEER_STALL + 10
    finally:
        live.close()
        stopped.close()
