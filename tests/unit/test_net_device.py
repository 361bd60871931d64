"""virtio-net through the vhost-user back-end (VIRTIO 1.4 §5.1 Network Device)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from pyvirtio.cli import main
from pyvirtio.devices.net import (
    RX_BACKLOG,
    NetDevice,
    NetDeviceConfig,
    default_mac,
    format_mac,
    parse_mac,
)
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import (
    CONFIG,
    CONFIG_MTU_OFFSET,
    CONFIG_STATUS_OFFSET,
    HDR,
    HDR_SIZE,
    RECEIVEQ,
    TRANSMITQ,
    GsoType,
    HdrFlag,
    NetFeature,
    NetHeader,
    NetStatus,
)
from pyvirtio.testing import Frontend, FrontendFactory, InMemoryHost

MAC = bytes.fromhex("020000000001")
PEER = bytes.fromhex("020000000002")


class ListBackend:
    """A frame back end in memory: what the device sent, and frames to hand it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []
        self.counters: Counter[str] = Counter()

    def fileno(self) -> int | None:
        return None

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def receive(self) -> list[bytes]:
        frames, self.incoming = self.incoming, []
        return frames

    def close(self) -> None:
        pass


#: The runtime's side of :class:`~pyvirtio.devices.base.DeviceHost`, in memory.
Host = InMemoryHost


class Port:
    """A started net device, its front-end, its frame back end."""

    def __init__(self, fe: Frontend, frames: ListBackend) -> None:
        self.fe = fe
        self.frames = frames
        device = fe.backend.device
        assert isinstance(device, NetDevice)
        self.device = device

    def transmit(self, payload: bytes, header: bytes | None = None) -> list[tuple[int, int]]:
        """Post one transmit chain (header + frame, split in two buffers) and kick."""
        hdr = NetHeader().pack() if header is None else header
        a = self.fe.put(hdr)
        b = self.fe.put(payload)
        self.fe.drivers[TRANSMITQ].add(readable=[(a, len(hdr)), (b, len(payload))])
        return self.fe.kick(TRANSMITQ)

    def post_rx(self, *lengths: int) -> list[int]:
        """Post receive buffers (one chain each); return their GPAs."""
        gpas = []
        for n in lengths:
            gpa = self.fe.alloc(n)
            self.fe.memory.write(gpa, b"\xee" * n)
            self.fe.drivers[RECEIVEQ].add(writable=[(gpa, n)])
            gpas.append(gpa)
        return gpas


def frame(dst: bytes = PEER, src: bytes = MAC, size: int = 100) -> bytes:
    body = os.urandom(size - 14)
    return dst + src + b"\x08\x00" + body


@pytest.fixture
def port(make_frontend: FrontendFactory) -> Port:
    frames = ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, mtu=1500), frames)
    fe = make_frontend(device)
    device.attach(Host(fe.backend))
    fe.start(queues=2, size=16)
    return Port(fe, frames)


# -- spec ---------------------------------------------------------------------------------------


def test_virtio_net_hdr_is_12_bytes_with_version_1_per_spec_5_1_9() -> None:
    assert HDR.size == HDR_SIZE == 12
    assert NetHeader(num_buffers=3).pack()[10:] == b"\x03\x00"
    assert NetHeader(flags=1, gso_type=4, hdr_len=54, gso_size=1448, csum_start=34,
                     csum_offset=16, num_buffers=1) == NetHeader.unpack(
        NetHeader(flags=1, gso_type=4, hdr_len=54, gso_size=1448, csum_start=34,
                  csum_offset=16, num_buffers=1).pack())
    assert len(NetHeader().pack(legacy=True)) == 10


def test_virtio_net_config_layout_per_spec_5_1_4() -> None:
    assert CONFIG.size == 28
    port_config = NetDevice(NetDeviceConfig(mac=MAC, mtu=9000)).config_space()
    assert port_config[:6] == MAC
    assert port_config[CONFIG_STATUS_OFFSET] == NetStatus.LINK_UP
    assert int.from_bytes(port_config[CONFIG_MTU_OFFSET:CONFIG_MTU_OFFSET + 2], "little") == 9000


def test_device_offers_mac_status_mtu_mrg_rxbuf_and_no_offloads() -> None:
    device = NetDevice(NetDeviceConfig(mac=MAC))
    features = device.offered_features()
    for bit in (NetFeature.MAC, NetFeature.STATUS, NetFeature.MTU, NetFeature.MRG_RXBUF,
                Feature.VERSION_1):
        assert features >> bit & 1, bit
    for bit in (NetFeature.CSUM, NetFeature.HOST_TSO4, NetFeature.GUEST_CSUM, NetFeature.MQ):
        assert not features >> bit & 1, bit
    assert device.num_queues == 3  # receiveq1, transmitq1, controlq
    # At any MTU: a jumbo frame is spread over several mergeable buffers.
    jumbo = NetDevice(NetDeviceConfig(mac=MAC, mtu=9000)).offered_features()
    assert jumbo >> NetFeature.MRG_RXBUF & 1 and jumbo >> NetFeature.MTU & 1


def test_mac_parsing_and_the_default_mac_is_stable_locally_administered_unicast() -> None:
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    assert format_mac(bytes.fromhex("525400abcd01")) == "52:54:00:ab:cd:01"
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:01", "01:00:5e:00:00:01", ""):
        with pytest.raises(ValueError):
            parse_mac(bad)
    a = default_mac(Path("/run/a.sock"))
    assert a == default_mac(Path("/run/a.sock"))
    assert a != default_mac(Path("/run/b.sock"))
    assert a[0] & 0x02 and not a[0] & 0x01
    with pytest.raises(ValueError):
        NetDeviceConfig(mac=MAC, mtu=67)


# -- transmit -----------------------------------------------------------------------------------


def test_transmit_passes_the_frame_without_its_header_to_the_back_end(port: Port) -> None:
    data = frame()
    head_used = port.transmit(data)
    assert [n for _, n in head_used] == [0]  # §5.1.9.2: nothing written into tx buffers
    assert port.frames.sent == [data]
    stats = port.device.stats[TRANSMITQ]
    assert (stats.requests, stats.bytes_out, stats.errors) == (1, 100, 0)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\x00" * 6, "malformed header"),
        (NetHeader(flags=HdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=16).pack(),
         "malformed header"),
        (NetHeader(gso_type=GsoType.TCPV4, gso_size=1448, hdr_len=54).pack(), "malformed header"),
        (NetHeader(flags=HdrFlag.DATA_VALID).pack(), "malformed header"),
    ],
)
def test_malformed_transmit_header_is_dropped_counted_and_the_device_keeps_running(
    port: Port, header: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    if len(header) < HDR_SIZE:  # the whole chain is shorter than a header
        a = port.fe.put(header)
        port.fe.drivers[TRANSMITQ].add(readable=[(a, len(header))])
        used = port.fe.kick(TRANSMITQ)
    else:
        used = port.transmit(frame(), header)
    assert len(used) == 1  # the buffer went back to the driver
    assert port.frames.sent == []
    stats = port.device.stats[TRANSMITQ]
    assert stats.errors == 1 and stats.kinds[f"dropped: {reason}"] == 1
    assert "§5.1.9.2" in caplog.text
    good = frame()
    port.transmit(good)
    assert port.frames.sent == [good]


def test_oversized_and_runt_frames_are_dropped_and_counted(port: Port) -> None:
    port.transmit(frame(size=1500 + 18 + 1))
    port.transmit(b"\x02" * 13)
    ok = frame(size=1500 + 18)  # the largest: MTU + Ethernet header + a VLAN tag
    port.transmit(ok)
    assert port.frames.sent == [ok]
    kinds = port.device.stats[TRANSMITQ].kinds
    assert kinds["dropped: oversized frame"] == 1 and kinds["dropped: runt frame"] == 1


# -- receive ------------------------------------------------------------------------------------


def test_received_frame_lands_in_a_buffer_after_a_header_with_num_buffers_1(port: Port) -> None:
    (gpa,) = port.post_rx(1526)
    port.fe.kick(RECEIVEQ)  # the guest posted buffers: nothing to deliver, none used
    assert port.fe.drivers[RECEIVEQ].get_used() == []
    data = frame(dst=MAC, src=PEER, size=300)
    port.device.deliver([data])
    used = port.fe.drivers[RECEIVEQ].get_used()
    assert [n for _, n in used] == [HDR_SIZE + 300]
    header = NetHeader.unpack(port.fe.memory.read(gpa, HDR_SIZE))
    assert header == NetHeader(num_buffers=1)
    assert port.fe.memory.read(gpa + HDR_SIZE, 300) == data
    assert port.fe.calls(RECEIVEQ) >= 1
    stats = port.device.stats[RECEIVEQ]
    assert (stats.requests, stats.bytes_in, stats.errors) == (1, 300, 0)


def test_frames_without_receive_buffers_wait_then_drop_without_blocking(port: Port) -> None:
    frames = [frame(dst=MAC, src=PEER, size=60 + i) for i in range(RX_BACKLOG + 5)]
    port.device.deliver(frames)
    stats = port.device.stats[RECEIVEQ]
    assert stats.errors == 5 and stats.kinds["dropped: no rx buffer"] == 5
    # The guest refills: the waiting frames arrive in order, one per buffer.
    gpas = port.post_rx(*[200] * 3)
    used = port.fe.kick(RECEIVEQ)
    assert [n for _, n in used] == [HDR_SIZE + 60, HDR_SIZE + 61, HDR_SIZE + 62]
    assert port.fe.memory.read(gpas[2] + HDR_SIZE, 62) == frames[2]


def test_received_frames_of_bad_size_are_dropped(port: Port) -> None:
    port.post_rx(2000)
    port.device.deliver([b"\x02" * 10, frame(size=1600)])
    assert port.fe.drivers[RECEIVEQ].get_used() == []
    assert port.device.stats[RECEIVEQ].kinds["dropped: bad frame size"] == 2


def test_a_new_front_end_gets_no_frames_queued_for_the_old_one(port: Port) -> None:
    port.device.deliver([frame(dst=MAC)])
    port.fe.backend.disconnect()
    assert not port.device.has_work(RECEIVEQ)
    assert port.device.has_work(TRANSMITQ)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_refuses_a_multicast_mac_and_a_bad_switch_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "n.sock")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "net", "--socket", sock, "--mac", "01:00:5e:00:00:01"])
    assert exit_info.value.code == 2
    assert "multicast" in capsys.readouterr().err
    assert main(["serve", "net", "--socket", sock, "--switch", "a/b"]) == 2
    assert "switch name" in capsys.readouterr().err
    assert not Path(sock).exists()
