"""A tap's packets are read straight into the guest's receive buffers (issue #18).

The tap is one end of a ``SOCK_SEQPACKET`` socket pair (``TapBackend(fd=...)``):
the test writes packets (a 12-byte ``virtio_net_hdr`` and a frame) at the other
end, as the kernel would hand them to a tap reader.  The device reads each with
one ``readv`` into a receive chain's buffers; the tap's own buffer (``spill``)
takes only what does not fit, or packets that arrive while the guest has no
buffer.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

import pytest

from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.net.tap import TapBackend
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import HDR_SIZE, RECEIVEQ, GsoType, HdrFlag, NetFeature, NetHeader
from pyvirtio.testing import Frontend, FrontendFactory, InMemoryHost

from .test_net_device import MAC, PEER, frame

BUFFER = HDR_SIZE + 1518


class TapPort:
    def __init__(self, make_frontend: FrontendFactory, features: int) -> None:
        self.kernel, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap = TapBackend("pvtest0", fd=tap_end.detach())
        self.device = NetDevice(NetDeviceConfig(mac=MAC, mtu=1500), self.tap)
        self.fe: Frontend = make_frontend(self.device)
        self.host = InMemoryHost(self.fe.backend)
        self.device.attach(self.host)
        self.fe.start(queues=2, size=16, features=features)
        self.buffers: dict[int, int] = {}

    def post(self, count: int, size: int = BUFFER) -> None:
        for _ in range(count):
            gpa = self.fe.alloc(size)
            self.buffers[self.fe.drivers[RECEIVEQ].add(writable=[(gpa, size)])] = gpa

    def send(self, header: NetHeader, data: bytes) -> None:
        self.kernel.send(header.pack() + data)

    def used(self, before: list[tuple[int, int]] | None = None,
             ) -> list[tuple[NetHeader, bytes]]:
        out = []
        for head, n in [*(before or []), *self.fe.drivers[RECEIVEQ].get_used()]:
            raw = self.fe.memory.read(self.buffers[head], n)
            out.append((NetHeader.unpack(raw[:HDR_SIZE]), raw[HDR_SIZE:]))
        return out

    def close(self) -> None:
        self.kernel.close()


MakePort = Callable[..., TapPort]


@pytest.fixture
def make_port(make_frontend: FrontendFactory) -> Iterator[MakePort]:
    made: list[TapPort] = []

    def make(features: int = 1 << Feature.VERSION_1) -> TapPort:
        port = TapPort(make_frontend, features)
        made.append(port)
        return port

    yield make
    for port in made:
        port.close()


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, "pyvirtio.devices.net.tap")  # TUNSETOFFLOAD on a socket


def test_packets_go_straight_into_the_receive_buffers(make_port: MakePort) -> None:
    port = make_port()
    port.post(8)
    frames = [frame(dst=MAC, src=PEER, size=60 + 100 * i) for i in range(5)]
    for data in frames:
        # num_buffers as the tap leaves it (not written): the device sets it.
        port.send(NetHeader(flags=HdrFlag.DATA_VALID, num_buffers=0x5A5A), data)
    port.device.frames_arrived()
    got = port.used()
    assert [data for _, data in got] == frames
    # Without GUEST_CSUM, DATA_VALID is cleared; num_buffers is 1 (§5.1.9.4).
    assert all(header == NetHeader(num_buffers=1) for header, _ in got)
    assert not any(port.tap.spill[:2000])  # the tap's buffer was never needed
    assert not port.device._backlogs[0]
    assert port.tap.counters["tap received"] == 5
    assert port.device.stats[RECEIVEQ].kinds["tap read in place"] == 5
    assert port.device.stats[RECEIVEQ].bytes_in == sum(map(len, frames))


def test_without_receive_buffers_packets_wait_then_arrive_in_order(
    make_port: MakePort,
) -> None:
    port = make_port()
    frames = [frame(dst=MAC, src=PEER, size=100 + i) for i in range(6)]
    for data in frames[:4]:
        port.send(NetHeader(), data)
    port.device.frames_arrived()  # no buffer: into the backlog (the tap's buffer)
    assert len(port.device._backlogs[0]) == 4
    for data in frames[4:]:
        port.send(NetHeader(), data)
    port.post(8)
    before = port.fe.kick(RECEIVEQ)  # the backlog first
    port.device.frames_arrived()  # then straight from the tap
    assert [data for _, data in port.used(before)] == frames


def test_a_refused_packet_leaves_the_buffer_for_the_next(make_port: MakePort) -> None:
    offered = NetDevice(NetDeviceConfig(mac=MAC), TapBackend(
        "x", fd=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).detach(),
    )).offered_features()
    port = make_port(offered & ~(1 << NetFeature.GUEST_TSO4) & ~(1 << NetFeature.MRG_RXBUF)
                     & ~(1 << NetFeature.CTRL_VQ) & ~(1 << Feature.RING_PACKED)
                     & ~(1 << Feature.IN_ORDER))
    port.post(1)
    tso4 = NetHeader(flags=HdrFlag.NEEDS_CSUM, gso_type=GsoType.TCPV4, hdr_len=54,
                     gso_size=1448, csum_start=34, csum_offset=16)
    good = frame(dst=MAC, src=PEER, size=200)
    port.send(tso4, frame(dst=MAC, src=PEER, size=1000))  # TSO4 not negotiated
    port.send(NetHeader(), MAC + PEER[:4])  # a runt
    port.send(NetHeader(), good)
    port.device.frames_arrived()
    assert [data for _, data in port.used()] == [good]
    kinds = port.device.stats[RECEIVEQ].kinds
    assert kinds["dropped: offload not negotiated"] == 1
    assert kinds["dropped: bad frame size"] == 1


def test_a_packet_longer_than_the_buffer_is_spread_over_several(
    make_port: MakePort,
) -> None:
    port = make_port(1 << Feature.VERSION_1 | 1 << NetFeature.MRG_RXBUF)
    port.post(4, size=HDR_SIZE + 600)
    big = frame(dst=MAC, src=PEER, size=1500)
    small = frame(dst=MAC, src=PEER, size=100)
    port.send(NetHeader(), big)
    port.send(NetHeader(), small)
    port.device.frames_arrived()
    used = port.fe.drivers[RECEIVEQ].get_used()
    assert [n for _, n in used] == [HDR_SIZE + 600, HDR_SIZE + 600, 288, HDR_SIZE + 100]
    data = b"".join(port.fe.memory.read(port.buffers[h], n) for h, n in used[:3])
    assert NetHeader.unpack(data[:HDR_SIZE]).num_buffers == 3
    assert data[HDR_SIZE:] == big
    assert port.fe.memory.read(port.buffers[used[3][0]] + HDR_SIZE, 100) == small
    assert port.device.stats[RECEIVEQ].kinds["merged frames"] == 1
