"""virtio-net offloads with a back end that carries the virtio_net_hdr (a tap).

The header checks (VIRTIO 1.4 §5.1.9.2.1 for the driver's, §5.1.9.4.1 for the
device's), the features offered, and packets through a started device.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import pytest

from pyvirtio.cli import main
from pyvirtio.devices.net import (
    GSO_MAX_FRAME,
    OFFLOAD_FEATURES,
    NetDevice,
    NetDeviceConfig,
    OffloadBackend,
    rx_header_problem,
    tx_header_problem,
)
from pyvirtio.devices.net.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    check_tap_name,
    tun_offloads,
)
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import (
    GSO_ECN,
    HDR_SIZE,
    RECEIVEQ,
    TRANSMITQ,
    GsoType,
    HdrFlag,
    NetFeature,
    NetHeader,
)
from pyvirtio.testing import NOT_SPLIT_FEATURES, Frontend, FrontendFactory

from .test_net_device import MAC, PEER, Host, frame

ALL = sum(1 << bit for bit in OFFLOAD_FEATURES) | 1 << Feature.VERSION_1
MAX = 1518  # MTU 1500 + 18
CSUM = HdrFlag.NEEDS_CSUM
#: A TCPv4 GSO header as Linux sends it: checksum at 34 + 16, 54 bytes of headers.
TSO4 = NetHeader(flags=CSUM, gso_type=GsoType.TCPV4, hdr_len=54, gso_size=1448,
                 csum_start=34, csum_offset=16)


def without(*bits: int) -> int:
    return ALL & ~sum(1 << bit for bit in bits)


class PacketBackend:
    """An :class:`OffloadBackend` in memory."""

    def __init__(self) -> None:
        self.sent: list[tuple[NetHeader, bytes]] = []
        self.incoming: list[tuple[NetHeader, bytes]] = []
        self.offloads: list[int] = []
        self.counters: Counter[str] = Counter()

    def fileno(self) -> int | None:
        return None

    def send_packet(self, header: NetHeader, frame: bytes) -> None:
        self.sent.append((header, frame))

    def receive_packets(self) -> list[tuple[NetHeader, bytes]]:
        packets, self.incoming = self.incoming, []
        return packets

    def set_guest_offloads(self, features: int) -> None:
        self.offloads.append(features)

    def close(self) -> None:
        pass


# -- transmit checks (§5.1.9.2.1) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "length", "features"),
    [
        (NetHeader(), 100, ALL),
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), 100, ALL),
        (TSO4, 30000, ALL),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV6, hdr_len=74, gso_size=1428,
                   csum_start=54, csum_offset=16), GSO_MAX_FRAME, ALL),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4 | GSO_ECN, hdr_len=54, gso_size=1448,
                   csum_start=34, csum_offset=16), 9000, ALL),
    ],
)
def test_transmit_headers_within_the_negotiated_offloads_pass(
    header: NetHeader, length: int, features: int
) -> None:
    assert tx_header_problem(header, length, features, max_frame=MAX, offloads=True) is None


@pytest.mark.parametrize(
    ("header", "length", "features", "reason", "text"),
    [
        # NEEDS_CSUM without CSUM: the driver MUST set flags to zero.
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), 100,
         without(NetFeature.CSUM), "malformed header", "flags 0x1"),
        # DATA_VALID and RSC_INFO are never set on transmit.
        (NetHeader(flags=HdrFlag.DATA_VALID), 100, ALL, "malformed header", "flags 0x2"),
        (NetHeader(flags=HdrFlag.RSC_INFO), 100, ALL, "malformed header", "flags 0x4"),
        # gso_type whose HOST_* feature was not negotiated.
        (TSO4, 30000, without(NetFeature.HOST_TSO4), "malformed header", "not negotiated"),
        (TSO4, 30000, without(NetFeature.HOST_TSO4, NetFeature.HOST_TSO6), "malformed header",
         "no segmentation offload"),
        (NetHeader(flags=CSUM, gso_type=GsoType.UDP, gso_size=1472, csum_start=34,
                   csum_offset=6), 30000, ALL, "malformed header", "0x3 was not negotiated"),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4 | GSO_ECN, hdr_len=54, gso_size=1448,
                   csum_start=34, csum_offset=16), 30000, without(NetFeature.HOST_ECN),
         "malformed header", "ECN"),
        # A GSO packet MUST have NEEDS_CSUM and the MSS.
        (NetHeader(gso_type=GsoType.TCPV4, hdr_len=54, gso_size=1448), 30000, ALL,
         "malformed header", "needs NEEDS_CSUM"),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4, hdr_len=54, csum_start=34,
                   csum_offset=16), 30000, ALL, "malformed header", "gso_size 0"),
        # Offsets beyond the frame.
        (NetHeader(flags=CSUM, csum_start=90, csum_offset=16), 100, ALL, "malformed header",
         "beyond"),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4, hdr_len=40000, gso_size=1448,
                   csum_start=34, csum_offset=16), 30000, ALL, "malformed header", "hdr_len"),
        # Sizes: MTU + 18 without GSO, GSO_MAX_FRAME (65589 + a VLAN tag) with it.
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), MAX + 1, ALL,
         "oversized frame", "MTU"),
        (TSO4, GSO_MAX_FRAME + 1, ALL, "oversized frame", "GSO packet"),
        (NetHeader(), 13, ALL, "runt frame", "shorter"),
    ],
)
def test_transmit_headers_outside_the_negotiated_offloads_are_refused(
    header: NetHeader, length: int, features: int, reason: str, text: str
) -> None:
    problem = tx_header_problem(header, length, features, max_frame=MAX, offloads=True)
    assert problem is not None
    assert problem[0] == reason and text in problem[1], problem


def test_without_an_offload_back_end_every_offload_header_is_malformed() -> None:
    """The switch cannot carry offloads: nothing of them was offered, whatever bits are set."""
    for header in (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), TSO4):
        problem = tx_header_problem(header, 1000, ALL, max_frame=MAX, offloads=False)
        assert problem is not None and problem[0] == "malformed header"
    assert tx_header_problem(NetHeader(), 1000, ALL, max_frame=MAX, offloads=False) is None


# -- receive checks (§5.1.9.4.1) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "length", "features", "reason"),
    [
        (NetHeader(), 100, 0, None),
        (NetHeader(flags=HdrFlag.DATA_VALID), 100, 0, None),  # cleared when written
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), 100, ALL, None),
        (TSO4, 60000, ALL, None),
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=16), 100,
         without(NetFeature.GUEST_CSUM), "offload not negotiated"),
        (TSO4, 60000, without(NetFeature.GUEST_TSO4), "offload not negotiated"),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4 | GSO_ECN, hdr_len=54, gso_size=1448,
                   csum_start=34, csum_offset=16), 60000, without(NetFeature.GUEST_ECN),
         "offload not negotiated"),
        (NetHeader(flags=CSUM, gso_type=GsoType.UDP_L4, gso_size=1472, csum_start=34,
                   csum_offset=6), 60000, ALL, "offload not negotiated"),
        (NetHeader(flags=CSUM, gso_type=GsoType.TCPV4, hdr_len=54, csum_start=34,
                   csum_offset=16), 60000, ALL, "malformed header"),
        (NetHeader(flags=CSUM, csum_start=34, csum_offset=100), 100, ALL, "malformed header"),
        (NetHeader(), MAX + 1, ALL, "bad frame size"),
        (TSO4, GSO_MAX_FRAME + 1, ALL, "bad frame size"),
        (NetHeader(), 10, ALL, "bad frame size"),
    ],
)
def test_received_headers_must_match_what_the_driver_negotiated(
    header: NetHeader, length: int, features: int, reason: str | None
) -> None:
    problem = rx_header_problem(header, length, features, max_frame=MAX)
    assert (problem and problem[0]) == reason, problem


def test_tun_offloads_follow_the_guest_side_features_and_need_guest_csum() -> None:
    assert tun_offloads(ALL) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    assert tun_offloads(without(NetFeature.GUEST_CSUM)) == 0
    assert tun_offloads(without(NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN)) == (
        TUN_F_CSUM | TUN_F_TSO4)
    assert tun_offloads(without(NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6)) == TUN_F_CSUM
    # HOST_* (guest -> device) offloads do not concern what the tap hands the guest.
    assert tun_offloads(1 << NetFeature.CSUM | 1 << NetFeature.HOST_TSO4) == 0


def test_tap_names_are_interface_names() -> None:
    assert check_tap_name("tap0") == "tap0"
    for bad in ("", "a" * 16, "tap/0", "tap 0", ".."):
        with pytest.raises(ValueError):
            check_tap_name(bad)


# -- through a started device --------------------------------------------------------------------


class OffloadPort:
    def __init__(self, make_frontend: FrontendFactory, features: int | None) -> None:
        self.packets = PacketBackend()
        self.device = NetDevice(NetDeviceConfig(mac=MAC, mtu=1500), self.packets)
        self.fe: Frontend = make_frontend(self.device)
        self.device.attach(Host(self.fe.backend))
        self.fe.start(queues=2, size=16, features=features)

    def transmit(self, header: NetHeader, payload: bytes) -> None:
        hdr = header.pack()
        a, b = self.fe.put(hdr), self.fe.put(payload)
        self.fe.drivers[TRANSMITQ].add(readable=[(a, len(hdr)), (b, len(payload))])
        self.fe.kick(TRANSMITQ)


PortFactory = Callable[..., OffloadPort]


@pytest.fixture
def offload_port(make_frontend: FrontendFactory) -> PortFactory:
    def make(features: int | None = None) -> OffloadPort:
        return OffloadPort(make_frontend, features)
    return make


def test_an_offload_back_end_gets_the_offloads_offered_and_mrg_rxbuf() -> None:
    backend = PacketBackend()
    assert isinstance(backend, OffloadBackend)
    offered = NetDevice(NetDeviceConfig(mac=MAC), backend).offered_features()
    for bit in OFFLOAD_FEATURES:
        assert offered >> bit & 1, bit
    # A 64 KiB GSO packet is spread over as many mergeable buffers as it needs.
    assert offered >> NetFeature.MRG_RXBUF & 1
    assert not offered >> NetFeature.GUEST_UFO & 1 and not offered >> NetFeature.HOST_UFO & 1


def test_negotiated_features_reach_the_back_end_and_a_new_front_end_resets_them(
    offload_port: PortFactory,
) -> None:
    port = offload_port()
    assert port.packets.offloads[-1] >> NetFeature.GUEST_TSO4 & 1
    port.fe.backend.disconnect()
    assert port.packets.offloads[-1] == 0


def test_a_tso_packet_passes_to_the_back_end_with_its_header_unchanged(
    offload_port: PortFactory,
) -> None:
    port = offload_port()
    data = frame(size=20000)
    port.transmit(TSO4, data)
    assert port.packets.sent == [(TSO4, data)]
    kinds = port.device.stats[TRANSMITQ].kinds
    assert kinds["gso packets"] == 1 and port.device.stats[TRANSMITQ].errors == 0


def test_a_gso_packet_the_driver_did_not_negotiate_is_dropped_and_counted(
    offload_port: PortFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    offered = NetDevice(NetDeviceConfig(mac=MAC), PacketBackend()).offered_features()
    port = offload_port(offered & ~(1 << NetFeature.HOST_TSO4) & ~NOT_SPLIT_FEATURES)
    port.transmit(TSO4, frame(size=20000))
    assert port.packets.sent == []
    stats = port.device.stats[TRANSMITQ]
    assert stats.errors == 1 and stats.kinds["dropped: malformed header"] == 1
    assert "§5.1.9.2.1" in caplog.text
    good = frame()
    port.transmit(NetHeader(), good)
    assert port.packets.sent == [(NetHeader(), good)]


def test_a_received_gso_packet_fills_one_big_buffer_with_its_header_and_num_buffers_1(
    offload_port: PortFactory,
) -> None:
    port = offload_port()
    size = HDR_SIZE + 30000
    gpa = port.fe.alloc(size)
    port.fe.drivers[RECEIVEQ].add(writable=[(gpa, size)])
    data = frame(dst=MAC, src=PEER, size=30000)
    header = NetHeader(flags=CSUM | HdrFlag.DATA_VALID, gso_type=GsoType.TCPV4, hdr_len=54,
                       gso_size=1448, csum_start=34, csum_offset=16, num_buffers=0x5A5A)
    port.packets.incoming = [(header, data)]
    port.device.frames_arrived()
    used = port.fe.drivers[RECEIVEQ].get_used()
    assert [n for _, n in used] == [HDR_SIZE + 30000]
    written = NetHeader.unpack(port.fe.memory.read(gpa, HDR_SIZE))
    assert written == NetHeader(flags=CSUM | HdrFlag.DATA_VALID, gso_type=GsoType.TCPV4,
                                hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16,
                                num_buffers=1)
    assert port.fe.memory.read(gpa + HDR_SIZE, 30000) == data
    assert port.device.stats[RECEIVEQ].kinds["gso packets"] == 1


def test_received_packets_with_offloads_not_negotiated_or_too_big_are_dropped(
    offload_port: PortFactory,
) -> None:
    offered = NetDevice(NetDeviceConfig(mac=MAC), PacketBackend()).offered_features()
    port = offload_port(offered & ~(1 << NetFeature.GUEST_TSO4) & ~(1 << NetFeature.MRG_RXBUF)
                        & ~NOT_SPLIT_FEATURES)
    gpa = port.fe.alloc(HDR_SIZE + 2000)
    port.fe.drivers[RECEIVEQ].add(writable=[(gpa, HDR_SIZE + 2000)])
    port.packets.incoming = [(TSO4, frame(dst=MAC, size=30000)),
                             (NetHeader(), frame(dst=MAC, size=1600))]
    port.device.frames_arrived()
    kinds = port.device.stats[RECEIVEQ].kinds
    assert kinds["dropped: offload not negotiated"] == 1
    assert kinds["dropped: bad frame size"] == 1
    # A TSO6 packet is allowed but does not fit the 2000-byte buffer, and without MRG_RXBUF
    # it is not spread over several: dropped, buffer back.
    tso6 = NetHeader(flags=CSUM, gso_type=GsoType.TCPV6, hdr_len=74, gso_size=1428,
                     csum_start=54, csum_offset=16)
    port.packets.incoming = [(tso6, frame(dst=MAC, size=30000))]
    port.device.frames_arrived()
    assert [n for _, n in port.fe.drivers[RECEIVEQ].get_used()] == [0]
    assert kinds["dropped: rx buffer too small"] == 1


def test_without_guest_csum_the_device_clears_data_valid(offload_port: PortFactory) -> None:
    offered = NetDevice(NetDeviceConfig(mac=MAC), PacketBackend()).offered_features()
    guest = (NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
             NetFeature.GUEST_ECN)
    port = offload_port(offered & ~sum(1 << bit for bit in guest) & ~NOT_SPLIT_FEATURES)
    gpa = port.fe.alloc(HDR_SIZE + 200)
    port.fe.drivers[RECEIVEQ].add(writable=[(gpa, HDR_SIZE + 200)])
    port.packets.incoming = [(NetHeader(flags=HdrFlag.DATA_VALID), frame(dst=MAC, size=200))]
    port.device.frames_arrived()
    assert NetHeader.unpack(port.fe.memory.read(gpa, HDR_SIZE)) == NetHeader(num_buffers=1)


def test_cli_refuses_a_bad_tap_name(capsys: pytest.CaptureFixture[str]) -> None:
    """(``--tap`` with ``--switch`` is the switch's uplink: see test_net_switch.py.)"""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "net", "--socket", "/nonexistent/n.sock", "--tap", "a/b"])
    assert exit_info.value.code == 2
    assert "tap name" in capsys.readouterr().err


def test_a_back_end_whose_fd_failed_for_good_is_no_longer_watched(
    offload_port: PortFactory,
) -> None:
    """A deleted tap's fd stays readable (EPOLLERR): the loop must not spin on it."""
    port = offload_port()
    host = Host(port.fe.backend)
    port.packets.fileno = lambda: 42  # type: ignore[method-assign]
    port.device.attach(host)
    assert list(host.watched) == [42]
    port.device.frames_arrived()
    assert list(host.watched) == [42]
    port.packets.fileno = lambda: None  # type: ignore[method-assign]
    port.device.frames_arrived()
    assert host.watched == {}
