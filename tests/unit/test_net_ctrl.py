"""virtio-net's control virtqueue and receive filter (VIRTIO 1.4 §5.1.9.5).

The filter and the commands alone, then the control queue through the
vhost-user back end, then the filter QEMU reports over a real QMP socket.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.cli import main
from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.net.ctrl import MAC_TABLE_ENTRIES, NetControl, RxFilter, vlan_id
from pyvirtio.devices.net.qmp import QmpRxFilter
from pyvirtio.spec.net import (
    CONFIG,
    CTRL_ACK_ERR,
    CTRL_ACK_OK,
    RECEIVEQ,
    CtrlAnnounce,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
)
from pyvirtio.testing import NOT_SPLIT_FEATURES, FrontendFactory

from .test_net_device import MAC, PEER, Host, ListBackend, Port, frame

OTHER = bytes.fromhex("02000000ab01")
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")
MCAST2 = bytes.fromhex("333300000001")
ALL_CTRL = sum(1 << b for b in (NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA,
                                NetFeature.CTRL_VLAN, NetFeature.CTRL_MAC_ADDR,
                                NetFeature.GUEST_ANNOUNCE, NetFeature.MQ))


def tagged(dst: bytes, vid: int) -> bytes:
    return dst + PEER + b"\x81\x00" + vid.to_bytes(2, "big") + b"\x08\x00" + bytes(46)


def table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    return (struct.pack("<I", len(unicast)) + b"".join(unicast)
            + struct.pack("<I", len(multicast)) + b"".join(multicast))


# -- the filter alone (§5.1.9.5.1-3) -------------------------------------------------------------


def test_normal_mode_takes_own_mac_broadcast_and_listed_multicast_only() -> None:
    rx = RxFilter(mac=MAC, multicast=frozenset({MCAST}))
    assert rx.reject(frame(dst=MAC)) is None
    assert rx.reject(frame(dst=BCAST)) is None
    assert rx.reject(frame(dst=MCAST)) is None
    assert rx.reject(frame(dst=MCAST2)) == "multicast"
    assert rx.reject(frame(dst=OTHER)) == "unicast"


def test_unicast_table_and_alluni_take_other_unicast_addresses() -> None:
    assert RxFilter(mac=MAC, unicast=frozenset({OTHER})).reject(frame(dst=OTHER)) is None
    assert RxFilter(mac=MAC, alluni=True).reject(frame(dst=OTHER)) is None


def test_promiscuous_mode_takes_everything_even_with_other_modes_on() -> None:
    """§5.1.9.5.1: PROMISC SHOULD take effect even if one of the other modes is on."""
    rx = RxFilter(mac=MAC, promisc=True, nouni=True, nomulti=True, nobcast=True, vlans=set())
    for dst in (MAC, OTHER, MCAST, BCAST):
        assert rx.reject(frame(dst=dst)) is None
    assert rx.reject(tagged(MAC, 7)) is None


def test_no_modes_win_over_all_modes_and_nomulti_spares_broadcast() -> None:
    """§5.1.9.5.1: NOMULTI/NOUNI take effect even with ALLMULTI/ALLUNI; NOMULTI SHOULD NOT
    apply to broadcast; NOBCAST suppresses broadcast."""
    rx = RxFilter(mac=MAC, allmulti=True, alluni=True, nomulti=True, nouni=True)
    assert rx.reject(frame(dst=MCAST)) == "multicast"
    assert rx.reject(frame(dst=MAC)) == "unicast"
    assert rx.reject(frame(dst=BCAST)) is None
    assert RxFilter(mac=MAC, nobcast=True, allmulti=True).reject(frame(dst=BCAST)) == "broadcast"
    assert RxFilter(mac=MAC, allmulti=True).reject(frame(dst=MCAST2)) is None


def test_vlan_filter_drops_tags_absent_from_the_table_and_spares_untagged_frames() -> None:
    """§5.1.9.5.3: tagged frames whose VLAN is in the table MUST pass; others SHOULD drop."""
    rx = RxFilter(mac=MAC, vlans={5})
    assert vlan_id(tagged(MAC, 5)) == 5 and vlan_id(frame(dst=MAC)) is None
    assert rx.reject(tagged(MAC, 5)) is None
    assert rx.reject(tagged(MAC, 7)) == "vlan"
    assert rx.reject(frame(dst=MAC)) is None
    assert RxFilter(mac=MAC).reject(tagged(MAC, 7)) is None  # no VLAN filtering


def test_a_table_too_long_to_keep_takes_every_address_of_its_kind() -> None:
    rx = RxFilter(mac=MAC)
    many = [bytes([1, 0, 0x5E, 0, i >> 8, i & 0xFF]) for i in range(MAC_TABLE_ENTRIES + 1)]
    rx.set_tables([], many)
    assert rx.multi_overflow and not rx.uni_overflow
    assert rx.reject(frame(dst=MCAST2)) is None
    assert rx.reject(frame(dst=OTHER)) == "unicast"


# -- commands (§5.1.9.5) -------------------------------------------------------------------------


@pytest.fixture
def control() -> NetControl:
    state = NetControl(mac=MAC, max_pairs=4)
    state.reset(ALL_CTRL)
    return state


def test_reset_state_is_promiscuous_with_empty_tables(control: NetControl) -> None:
    """§5.1.9.5.2: empty MAC table on reset; §5.1.9.5.3: empty VLAN table; one pair."""
    rx = control.filter
    assert rx is not None and rx.promisc and not rx.unicast and not rx.multicast
    assert rx.vlans == set() and control.pairs == 1
    without = NetControl(mac=MAC, max_pairs=1)
    without.reset(1 << NetFeature.CTRL_VQ)
    assert without.filter is None  # nothing to filter by: every frame is delivered


def test_rx_mode_commands_set_each_mode(control: NetControl) -> None:
    for command in CtrlRx:
        assert control.execute(CtrlClass.RX, command, b"\x01").ack == CTRL_ACK_OK
        assert getattr(control.filter, command.name.lower()) is True
        assert control.execute(CtrlClass.RX, command, b"\x00").ack == CTRL_ACK_OK
        assert getattr(control.filter, command.name.lower()) is False
    assert control.commands["RX_PROMISC"] == 2


@pytest.mark.parametrize(("features", "cls", "command", "data", "why"), [
    (ALL_CTRL, CtrlClass.RX, CtrlRx.PROMISC, b"\x02", "0 or 1"),
    (ALL_CTRL, CtrlClass.RX, CtrlRx.PROMISC, b"", "0 or 1"),
    (ALL_CTRL, CtrlClass.RX, 9, b"\x01", "does not exist"),
    (ALL_CTRL & ~(1 << NetFeature.CTRL_RX_EXTRA), CtrlClass.RX, CtrlRx.NOBCAST, b"\x01",
     "CTRL_RX_EXTRA"),
    (ALL_CTRL & ~(1 << NetFeature.CTRL_RX), CtrlClass.RX, CtrlRx.ALLMULTI, b"\x01", "CTRL_RX"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.TABLE_SET, table([MCAST], []), "in the unicast table"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.TABLE_SET, table([], [OTHER]), "in the multicast table"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.TABLE_SET, struct.pack("<I", 3), "do not fit"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.TABLE_SET, table([], []) + b"x", "after the two"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.TABLE_SET, b"\x00\x00", "count is missing"),
    (ALL_CTRL, CtrlClass.MAC, CtrlMac.ADDR_SET, MCAST, "unicast address"),
    (ALL_CTRL & ~(1 << NetFeature.CTRL_MAC_ADDR), CtrlClass.MAC, CtrlMac.ADDR_SET, OTHER,
     "CTRL_MAC_ADDR"),
    (ALL_CTRL, CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 4096), "beyond 4095"),
    (ALL_CTRL, CtrlClass.VLAN, CtrlVlan.ADD, b"\x05", "2 bytes"),
    (ALL_CTRL & ~(1 << NetFeature.CTRL_VLAN), CtrlClass.VLAN, CtrlVlan.ADD, b"\x05\x00",
     "CTRL_VLAN"),
    (ALL_CTRL, CtrlClass.ANNOUNCE, CtrlAnnounce.ACK, b"\x00", "without data"),
    (ALL_CTRL, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 0), "max_virtqueue_pairs"),
    (ALL_CTRL, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 5), "max_virtqueue_pairs"),
    (ALL_CTRL, CtrlClass.MQ, CtrlMq.RSS_CONFIG, b"", "no RSS"),
    (ALL_CTRL, CtrlClass.GUEST_OFFLOADS, 0, bytes(8), "not supported"),
])
def test_bad_commands_are_answered_err_with_the_reason(
    features: int, cls: int, command: int, data: bytes, why: str
) -> None:
    state = NetControl(mac=MAC, max_pairs=4)
    state.reset(features)
    result = state.execute(cls, command, data)
    assert result.ack == CTRL_ACK_ERR
    assert result.problem is not None and why in result.problem


def test_mac_vlan_announce_and_pairs_commands_change_the_state(control: NetControl) -> None:
    assert control.execute(CtrlClass.MAC, CtrlMac.TABLE_SET,
                           table([OTHER], [MCAST, MCAST2])).ack == CTRL_ACK_OK
    assert control.filter is not None
    assert control.filter.unicast == {OTHER} and control.filter.multicast == {MCAST, MCAST2}
    assert control.execute(CtrlClass.MAC, CtrlMac.ADDR_SET, PEER).ack == CTRL_ACK_OK
    assert control.mac == control.filter.mac == PEER
    assert control.execute(CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 5)).ack == 0
    assert control.execute(CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 6)).ack == 0
    assert control.execute(CtrlClass.VLAN, CtrlVlan.DEL, struct.pack("<H", 5)).ack == 0
    assert control.filter.vlans == {6}
    control.announce = True
    assert control.execute(CtrlClass.ANNOUNCE, CtrlAnnounce.ACK, b"").ack == CTRL_ACK_OK
    assert not control.announce
    assert control.execute(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 4)).ack == 0
    assert control.pairs == 4


# -- the control queue through the vhost-user back end ------------------------------------------


@pytest.fixture
def ctrl_port(make_frontend: FrontendFactory) -> Port:
    frames = ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, mtu=1500, queues=2), frames)
    fe = make_frontend(device)
    device.attach(Host(fe.backend))
    fe.start(queues=5, size=16)
    return Port(fe, frames)


def command(port: Port, cls: int, cmd: int, data: bytes = b"") -> int:
    """Send one control command as Linux lays it out (head, data, ack) and return the ack."""
    fe, queue = port.fe, port.device.control_queue
    head = fe.put(bytes([cls, cmd]))
    parts = [(head, 2)] + ([(fe.put(data), len(data))] if data else [])
    ack = fe.alloc(1)
    fe.memory.write(ack, b"\xee")
    fe.drivers[queue].add(readable=parts, writable=[(ack, 1)])
    used = fe.kick(queue)
    assert used and used[-1][1] == 1
    return fe.memory.read(ack, 1)[0]


def test_control_queue_is_last_and_its_commands_filter_what_reaches_the_driver(
    ctrl_port: Port,
) -> None:
    device = ctrl_port.device
    assert device.control_queue == 4 and device.has_feature(NetFeature.CTRL_VQ)
    ctrl_port.post_rx(*[2048] * 8)
    device.deliver([frame(dst=OTHER)])
    assert device.stats[RECEIVEQ].requests == 1  # promiscuous until the driver says otherwise
    assert command(ctrl_port, CtrlClass.RX, CtrlRx.PROMISC, b"\x00") == CTRL_ACK_OK
    device.deliver([frame(dst=OTHER), frame(dst=MAC), frame(dst=MCAST), frame(dst=BCAST)])
    stats = device.stats[RECEIVEQ]
    assert stats.requests == 3  # own MAC and broadcast
    assert stats.kinds["filtered: unicast"] == 1 and stats.kinds["filtered: multicast"] == 1
    assert stats.errors == 0  # filtering is not an error
    assert command(ctrl_port, CtrlClass.MAC, CtrlMac.TABLE_SET, table([OTHER], [MCAST])) == 0
    assert command(ctrl_port, CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 5)) == 0
    device.deliver([frame(dst=OTHER), frame(dst=MCAST), tagged(MAC, 5), tagged(MAC, 6)])
    assert stats.requests == 6 and stats.kinds["filtered: vlan"] == 1
    assert device.stats[device.control_queue].kinds["commands"] == 3


def test_mac_addr_set_shows_in_config_space_and_becomes_the_filter_mac(ctrl_port: Port) -> None:
    """§5.1.9.5.2: the device MUST update ``mac`` before it consumes MAC_ADDR_SET."""
    device = ctrl_port.device
    assert command(ctrl_port, CtrlClass.RX, CtrlRx.PROMISC, b"\x00") == 0
    assert command(ctrl_port, CtrlClass.MAC, CtrlMac.ADDR_SET, OTHER) == CTRL_ACK_OK
    assert CONFIG.unpack(device.config_space())[0] == OTHER
    ctrl_port.post_rx(2048, 2048)
    device.deliver([frame(dst=OTHER), frame(dst=MAC)])
    assert device.stats[RECEIVEQ].requests == 1
    assert device.stats[RECEIVEQ].kinds["filtered: unicast"] == 1


def test_vq_pairs_set_opens_the_second_receive_queue(ctrl_port: Port) -> None:
    """§5.1.9.5.6: after reset only receiveq1; after VQ_PAIRS_SET n, receiveq1..n."""
    device, fe = ctrl_port.device, ctrl_port.fe
    for queue in (0, 2):
        for _ in range(8):
            fe.drivers[queue].add(writable=[(fe.alloc(2048), 2048)])
    flows = [frame(dst=MAC, size=60 + i) for i in range(8)]
    device.deliver(flows)
    assert device.stats[0].requests == 8 and device.stats[2].requests == 0
    assert command(ctrl_port, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 2)) == 0
    ipv4 = [MAC + PEER + b"\x08\x00" + bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 17, 0, 0])
            + bytes([10, 0, 0, 1, 10, 0, 0, i]) + bytes(20) for i in range(16)]
    device.deliver(ipv4)
    assert device.stats[2].requests > 0


def test_malformed_control_chains_are_counted_and_the_queue_keeps_working(
    ctrl_port: Port, caplog: pytest.LogCaptureFixture
) -> None:
    fe, device = ctrl_port.fe, ctrl_port.device
    queue = device.control_queue
    fe.drivers[queue].add(readable=[(fe.put(b"\x00\x00\x01"), 3)])  # no room for the ack
    fe.kick(queue)
    fe.drivers[queue].add(readable=[(fe.put(b"\x00"), 1)], writable=[(fe.alloc(1), 1)])
    fe.kick(queue)
    assert device.stats[queue].violations == 2
    assert "a byte for the ack" in caplog.text
    # A command the device refuses is answered, counted and logged, not a violation.
    assert command(ctrl_port, CtrlClass.VLAN, CtrlVlan.ADD, struct.pack("<H", 5000)) == 1
    assert device.stats[queue].kinds["commands refused"] == 1
    assert command(ctrl_port, CtrlClass.RX, CtrlRx.ALLMULTI, b"\x01") == CTRL_ACK_OK


# -- the filter QEMU reports (QMP) ---------------------------------------------------------------


QMP_NIC = {
    "name": "net0", "promiscuous": False, "multicast": "normal", "unicast": "normal",
    "vlan": "normal", "broadcast-allowed": True, "multicast-overflow": False,
    "unicast-overflow": False, "main-mac": "02:00:00:00:00:01", "vlan-table": [0, 5],
    "unicast-table": [], "multicast-table": ["01:00:5e:00:00:01"],
}


def test_rx_filter_from_qmp_maps_qemus_rx_filter_info() -> None:
    rx = RxFilter.from_qmp(QMP_NIC)
    assert rx.mac == MAC and not rx.promisc and rx.vlans == {0, 5}
    assert rx.multicast == {MCAST} and not rx.nobcast
    assert rx.reject(frame(dst=OTHER)) == "unicast" and rx.reject(tagged(MAC, 7)) == "vlan"
    wide = RxFilter.from_qmp({**QMP_NIC, "vlan": "all", "multicast": "all", "unicast": "none"})
    assert wide.vlans is None and wide.allmulti and wide.nouni
    # QEMU reports NOBCAST as broadcast-allowed: broadcast passes whatever it says.
    quiet = RxFilter.from_qmp({**QMP_NIC, "broadcast-allowed": False})
    assert quiet.reject(frame(dst=BCAST)) is None
    for bad in ({"vlan": "some"}, {"promiscuous": "yes"}, {"main-mac": "zz"},
                {"vlan-table": [9999]}, {"unicast-table": None}):
        with pytest.raises(ValueError):
            RxFilter.from_qmp({**QMP_NIC, **bad})


class FakeQmp:
    """A QMP server on a real Unix socket: greeting, capabilities, query-rx-filter answers."""

    def __init__(self, path: Path, nics: list[dict[str, object]]) -> None:
        self.nics = nics
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.queries: list[dict[str, object]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        self.conn = conn
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        reader = conn.makefile("rb")
        for line in reader:
            msg = json.loads(line)
            if msg["execute"] == "qmp_capabilities":
                conn.sendall(b'{"return": {}}\n')
            elif msg["execute"] == "query-rx-filter":
                self.queries.append(msg)
                conn.sendall(json.dumps({"return": self.nics, "id": msg["id"]}).encode() + b"\n")

    def event(self, name: str | None) -> None:
        """NIC_RX_FILTER_CHANGED; QEMU leaves the name out for a NIC without an id."""
        assert self.conn is not None
        data = {"path": "/machine/peripheral-anon/device[0]/virtio-backend"}
        if name is not None:
            data["name"] = name
        self.conn.sendall(json.dumps({"event": "NIC_RX_FILTER_CHANGED",
                                      "data": data}).encode() + b"\n")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def pump(client: QmpRxFilter, until: list[RxFilter | None], count: int) -> None:
    """Run the client's reads (as the daemon's loop would) until ``count`` filters arrived."""
    for _ in range(200):
        if len(until) >= count:
            return
        fd = client.fileno()
        if fd is None:
            return
        if select.select([fd], [], [], 0.05)[0]:
            client.readable()
    raise AssertionError(f"only {len(until)} of {count} filters arrived")


@pytest.fixture
def qmp_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "qmp.sock"


def test_qmp_follower_queries_at_start_and_after_each_change_event(qmp_path: Path) -> None:
    other_nic = {**QMP_NIC, "name": "net1", "main-mac": "02:00:00:00:00:09"}
    server = FakeQmp(qmp_path, [other_nic, QMP_NIC])
    seen: list[RxFilter | None] = []
    client = QmpRxFilter(qmp_path, MAC, None, seen.append)
    try:
        assert client.connect()
        pump(client, seen, 1)
        assert seen[0] is not None and seen[0].vlans == {0, 5}  # found by MAC among two NICs
        server.nics = [{**QMP_NIC, "promiscuous": True}]
        server.event("net1")  # another NIC's change: no query
        server.event("net0")
        pump(client, seen, 2)
        assert seen[1] is not None and seen[1].promisc
        server.event(None)
        pump(client, seen, 3)
        assert [q.get("arguments") for q in server.queries] == [None] + [{"name": "net0"}] * 2
    finally:
        client.close()
        server.close()


def test_qmp_follower_gives_up_cleanly_on_garbage_and_on_an_unknown_nic(
    qmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeQmp(qmp_path, [{**QMP_NIC, "main-mac": "02:00:00:00:00:09"},
                                {**QMP_NIC, "name": "net1", "main-mac": "02:00:00:00:00:08"}])
    seen: list[RxFilter | None] = []
    client = QmpRxFilter(qmp_path, MAC, None, seen.append)
    try:
        assert client.connect()
        pump(client, seen, 1)
        assert seen == [None] and client.fileno() is None
        assert "--qmp-nic" in caplog.text
    finally:
        client.close()
        server.close()
    assert not QmpRxFilter(qmp_path.with_name("absent.sock"), MAC, None, seen.append).connect()


def test_without_mq_the_control_queue_is_queue_2_and_one_pair_is_used(
    make_frontend: FrontendFactory,
) -> None:
    """§5.1.2: controlq is 2N, with N = 1 unless MQ (or RSS) is negotiated."""
    frames = ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, queues=2), frames)
    fe = make_frontend(device)
    device.attach(Host(fe.backend))
    fe.start(queues=3, size=16,
             features=device.offered_features() & ~(1 << NetFeature.MQ) & ~NOT_SPLIT_FEATURES)
    port = Port(fe, frames)
    assert device.control_queue == 2
    assert command(port, CtrlClass.RX, CtrlRx.PROMISC, b"\x00") == CTRL_ACK_OK
    assert device.stats[2].kinds["commands"] == 1
    assert command(port, CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 2)) == 1


@settings(max_examples=300, deadline=None)
@given(commands=st.lists(st.tuples(
           st.integers(0, 9), st.integers(0, 7),
           # well-formed payloads too, so that commands get past their length checks
           st.sampled_from([b"", b"\x00", b"\x01", b"\x05\x00", table([OTHER], [MCAST]),
                            OTHER]) | st.binary(max_size=80)),
           max_size=12),
       features=st.integers(0, (1 << 24) - 1),
       frame_data=st.binary(max_size=40) | st.binary(min_size=14, max_size=40))
def test_any_command_sequence_is_answered_and_the_filter_never_fails(
    commands: list[tuple[int, int, bytes]], features: int, frame_data: bytes
) -> None:
    """Whatever the driver sends, every command gets OK or ERR (an ERR with a reason),
    and the filter it leaves decides any frame without an exception."""
    state = NetControl(mac=MAC, max_pairs=2)
    state.reset(features)
    for cls, cmd, data in commands:
        result = state.execute(cls, cmd, data)
        assert result.ack in (CTRL_ACK_OK, CTRL_ACK_ERR)
        assert (result.problem is None) == (result.ack == CTRL_ACK_OK)
    assert 1 <= state.pairs <= 2 and len(state.mac) == 6
    if state.filter is not None:
        assert state.filter.reject(frame_data) in (None, "unicast", "multicast", "broadcast",
                                                   "vlan", "runt")


@pytest.mark.parametrize("features", [
    1 << NetFeature.CTRL_RX,  # without CTRL_VQ
    1 << NetFeature.CTRL_VLAN,
    (1 << NetFeature.CTRL_VQ) | (1 << NetFeature.CTRL_RX_EXTRA),  # without CTRL_RX
])
def test_filter_commands_without_a_filter_are_refused(features: int) -> None:
    """Feature sets that leave no receive filter (§5.1.3.1 dependencies broken): every
    filter command is answered VIRTIO_NET_ERR with a reason, never an exception."""
    state = NetControl(mac=MAC, max_pairs=1)
    state.reset(features)
    assert state.filter is None
    for cls, cmd, data in ((CtrlClass.RX, CtrlRx.PROMISC, b"\x01"),
                           (CtrlClass.RX, CtrlRx.ALLUNI, b"\x01"),
                           (CtrlClass.MAC, CtrlMac.TABLE_SET, table([], [])),
                           (CtrlClass.VLAN, CtrlVlan.ADD, b"\x05\x00")):
        result = state.execute(cls, cmd, data)
        assert result.ack == CTRL_ACK_ERR and result.problem


def test_cli_refuses_qmp_nic_without_qmp(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = tmp_path / "net.sock"
    assert main(["serve", "net", "--socket", str(socket_path), "--qmp-nic", "net0"]) == 2
    assert "--qmp-nic needs --qmp" in capsys.readouterr().err
    assert not socket_path.exists()
