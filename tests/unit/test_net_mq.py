"""virtio-net multiqueue (VIRTIO 1.4 §5.1.2, §5.1.4, §5.1.9.5.5): queue pairs, receive
queue selection by flow, per-queue counters, and the vhost-user details QEMU relies on."""

from __future__ import annotations

import pytest

from pyvirtio.cli import _build_parser
from pyvirtio.devices.net import (
    MAX_QUEUE_PAIRS,
    STEERING_FLOWS,
    NetDevice,
    NetDeviceConfig,
    flow_hash,
    flow_key,
    pick_rx_queue,
)
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import BadMemoryRegion
from pyvirtio.memory import RegionSpec, create_memfd
from pyvirtio.spec.net import CONFIG, NetFeature, NetHeader
from pyvirtio.testing import NOT_SPLIT_FEATURES, Frontend, FrontendFactory
from pyvirtio.vhost_user.protocol import Request, encode_region, encode_vring_state

from .test_net_device import MAC, PEER, Host, ListBackend, Port

ETH_IP = b"\x08\x00"


def ipv4(src: bytes, dst: bytes, *, proto: int = 6, sport: int = 1000, dport: int = 80,
         frag: int = 0x4000, vlan: bool = False, payload: bytes = b"x" * 40) -> bytes:
    """An Ethernet frame with an IPv4 header (and a TCP/UDP port pair) from ``src`` to ``dst``."""
    ip = bytes([0x45, 0, 0, 60, 0, 0]) + frag.to_bytes(2, "big") + bytes([64, proto, 0, 0])
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(16)
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return PEER + MAC + tag + ETH_IP + ip + src + dst + l4 + payload


def ipv6(sport: int, dport: int = 80) -> bytes:
    ip = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    return PEER + MAC + b"\x86\xdd" + ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


# -- flow hash and queue selection --------------------------------------------------------------


def test_flow_hash_keeps_one_flow_together_and_tells_flows_apart() -> None:
    one = ipv4(A, B, sport=1234)
    assert flow_hash(one) == flow_hash(ipv4(A, B, sport=1234, payload=b"other data"))
    assert flow_hash(one) != flow_hash(ipv4(A, B, sport=1235))  # ports count
    assert flow_hash(one) != flow_hash(ipv4(B, A, sport=1234))  # addresses count
    assert flow_hash(ipv6(1)) == flow_hash(ipv6(1)) != flow_hash(ipv6(2))
    # A VLAN tag does not change the flow.
    assert flow_hash(ipv4(A, B, sport=7, vlan=True)) == flow_hash(ipv4(A, B, sport=7))


def test_flow_hash_ignores_ports_of_ip_fragments_and_of_other_protocols() -> None:
    # A fragment other than the first has no ports: every fragment uses addresses only.
    assert flow_hash(ipv4(A, B, proto=17, sport=1, frag=0x2000)) == flow_hash(
        ipv4(A, B, proto=17, sport=2, frag=0x0010))
    assert flow_hash(ipv4(A, B, proto=1, sport=1)) == flow_hash(ipv4(A, B, proto=1, sport=2))
    arp = PEER + MAC + b"\x08\x06" + bytes(28)
    assert flow_hash(arp) == flow_hash(arp[:14] + b"\xff" * 28)  # MACs and EtherType
    assert isinstance(flow_hash(b"\x00" * 14), int)  # no payload at all
    assert isinstance(flow_hash(PEER + MAC + ETH_IP + b"\x45"), int)  # truncated IPv4


def test_flow_key_reversed_is_the_key_of_the_reply() -> None:
    out = ipv4(A, B, sport=1234, dport=80)
    reply = ipv4(B, A, sport=80, dport=1234)
    assert flow_key(reply, reverse=True) == flow_key(out)
    assert flow_key(reply) != flow_key(out)
    arp = PEER + MAC + b"\x08\x06" + bytes(28)
    assert flow_key(MAC + PEER + b"\x08\x06" + bytes(28), reverse=True) == flow_key(arp)


def test_pick_rx_queue_uses_only_ready_queues_and_spreads_flows() -> None:
    frames = [ipv4(A, B, sport=port) for port in range(1000, 1064)]
    assert {pick_rx_queue(f, [0, 2]) for f in frames} == {0, 2}
    assert {pick_rx_queue(f, [2]) for f in frames} == {2}  # receiveq1 disabled
    assert {pick_rx_queue(f, []) for f in frames} == {0}  # none ready: wait on receiveq1
    for f in frames:
        assert pick_rx_queue(f, [0, 2, 4]) == pick_rx_queue(f, [0, 2, 4])
        assert pick_rx_queue(f, [0, 2, 4]) in (0, 2, 4)


# -- configuration ------------------------------------------------------------------------------


def test_queue_pairs_set_queues_mq_feature_and_max_virtqueue_pairs() -> None:
    single = NetDevice(NetDeviceConfig(mac=MAC))
    # Two queues per pair and the control queue (§5.1.2).
    assert single.num_queues == 3 and single.queue_num() == 1
    assert not single.offered_features() >> NetFeature.MQ & 1
    assert CONFIG.unpack(single.config_space())[2] == 1
    multi = NetDevice(NetDeviceConfig(mac=MAC, queues=3))
    assert multi.num_queues == 7 and multi.control_queue == 6
    assert multi.queue_num() == 3  # GET_QUEUE_NUM counts pairs for QEMU's vhost-user net
    assert multi.offered_features() >> NetFeature.MQ & 1
    assert CONFIG.unpack(multi.config_space())[2] == 3  # max_virtqueue_pairs (§5.1.4)
    for bad in (0, MAX_QUEUE_PAIRS + 1):
        with pytest.raises(ValueError, match="queues"):
            NetDeviceConfig(mac=MAC, queues=bad)


def test_cli_net_queues_option() -> None:
    args = _build_parser().parse_args(["serve", "net", "--socket", "/tmp/x", "--queues", "4"])
    assert args.queues == 4
    assert _build_parser().parse_args(["serve", "net", "--socket", "/tmp/x"]).queues == 1
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["serve", "net", "--socket", "/tmp/x", "--queues", "0"])


# -- a two-pair port through the vhost-user back end --------------------------------------------


#: The control queue features QEMU's virtio-net keeps to itself: it never acks them to a
#: vhost-user back end, and turns the guest's VQ_PAIRS_SET into SET_VRING_ENABLE.
QEMU_KEEPS = sum(1 << bit for bit in (
    NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN,
    NetFeature.CTRL_MAC_ADDR))


@pytest.fixture
def mq_port(make_frontend: FrontendFactory) -> Port:
    """A two-pair port as QEMU drives it: queue pairs enabled with SET_VRING_ENABLE."""
    frames = ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, mtu=1500, queues=2), frames)
    fe = make_frontend(device)
    device.attach(Host(fe.backend))
    fe.start(queues=4, size=16,
             features=device.offered_features() & ~NOT_SPLIT_FEATURES & ~QEMU_KEEPS)
    return Port(fe, frames)


def post_rx(fe: Frontend, queue: int, count: int, length: int = 2048) -> None:
    for _ in range(count):
        fe.drivers[queue].add(writable=[(fe.alloc(length), length)])


def transmit(fe: Frontend, queue: int, data: bytes) -> None:
    hdr = NetHeader().pack()
    fe.drivers[queue].add(readable=[(fe.put(hdr), len(hdr)), (fe.put(data), len(data))])
    fe.kick(queue)


def test_get_queue_num_answers_queue_pairs(mq_port: Port) -> None:
    reply = mq_port.fe.call(Request.GET_QUEUE_NUM)
    assert int.from_bytes(reply, "little") == 2


def test_every_transmit_queue_sends_and_counts_its_own_packets(mq_port: Port) -> None:
    fe, device = mq_port.fe, mq_port.device
    first, second = ipv4(A, B, sport=1), ipv4(A, B, sport=2, payload=b"y" * 100)
    transmit(fe, 1, first)
    transmit(fe, 3, second)
    transmit(fe, 3, second)
    assert mq_port.frames.sent == [first, second, second]
    assert (device.stats[1].requests, device.stats[1].bytes_out) == (1, len(first))
    assert (device.stats[3].requests, device.stats[3].bytes_out) == (2, 2 * len(second))
    assert device.stats[0].requests == device.stats[2].requests == 0
    # A malformed header is counted on the queue it came on.
    bad = NetHeader(flags=1).pack()
    fe.drivers[3].add(readable=[(fe.put(bad), len(bad)), (fe.put(first), len(first))])
    fe.kick(3)
    assert device.stats[3].errors == 1 and device.stats[1].errors == 0


def test_received_flows_spread_over_the_receive_queues_and_each_counts_its_own(
    mq_port: Port,
) -> None:
    fe, device = mq_port.fe, mq_port.device
    frames = [ipv4(B, A, sport=port) for port in range(2000, 2016)]
    expected = {0: [f for f in frames if pick_rx_queue(f, [0, 2]) == 0],
                2: [f for f in frames if pick_rx_queue(f, [0, 2]) == 2]}
    assert expected[0] and expected[2]
    for queue in (0, 2):
        post_rx(fe, queue, 16)
    device.deliver(frames)
    for queue in (0, 2):
        used = fe.drivers[queue].get_used()
        assert len(used) == len(expected[queue])
        stats = device.stats[queue]
        assert stats.requests == len(expected[queue])
        assert stats.bytes_in == sum(len(f) for f in expected[queue])
    # The same flow again lands on the same queue (in order for the driver).
    device.deliver([frames[0]])
    queue = pick_rx_queue(frames[0], [0, 2])
    assert device.stats[queue].requests == len(expected[queue]) + 1


def test_replies_are_steered_to_the_pair_their_flow_was_sent_on(mq_port: Port) -> None:
    """§5.1.9.5.6: after the driver sent a flow on transmitqX, the device SHOULD steer
    incoming packets of that flow to receiveqX."""
    fe, device = mq_port.fe, mq_port.device
    sports = range(5000, 5008)
    for i, sport in enumerate(sports):  # alternate pairs, whatever the hash says
        transmit(fe, 1 if i % 2 == 0 else 3, ipv4(A, B, sport=sport))
    post_rx(fe, 0, 8)
    post_rx(fe, 2, 8)
    device.deliver([ipv4(B, A, sport=80, dport=sport) for sport in sports])
    assert device.stats[0].requests == device.stats[2].requests == 4
    # A flow sent again on the other pair follows it.
    transmit(fe, 3, ipv4(A, B, sport=5000))
    device.deliver([ipv4(B, A, sport=80, dport=5000)])
    assert device.stats[2].requests == 5
    # A steered pair that is disabled is not used: the hash picks among the ready ones.
    fe.send(Request.SET_VRING_ENABLE, encode_vring_state(2, 0))
    device.deliver([ipv4(B, A, sport=80, dport=5000)])
    assert device.stats[0].requests == 5 and device.stats[2].requests == 5


def test_the_steering_table_is_bounded(mq_port: Port, monkeypatch: pytest.MonkeyPatch) -> None:
    assert STEERING_FLOWS >= 1024
    monkeypatch.setattr("pyvirtio.devices.net.steering.STEERING_FLOWS", 8)
    for sport in range(20):
        transmit(mq_port.fe, 1, ipv4(A, B, sport=sport))
    assert 0 < len(mq_port.device._steering) <= 8


def test_a_disabled_receive_queue_gets_no_frames(mq_port: Port) -> None:
    fe, device = mq_port.fe, mq_port.device
    fe.send(Request.SET_VRING_ENABLE, encode_vring_state(2, 0))  # the driver uses one pair
    assert not fe.backend.queue_ready(2) and fe.backend.queue_ready(0)
    post_rx(fe, 0, 16)
    post_rx(fe, 2, 16)
    device.deliver([ipv4(B, A, sport=port) for port in range(3000, 3016)])
    assert device.stats[0].requests == 16
    assert device.stats[2].requests == 0
    assert fe.drivers[2].get_used() == []


def test_frames_wait_for_buffers_of_their_own_receive_queue(mq_port: Port) -> None:
    fe, device = mq_port.fe, mq_port.device
    frame = ipv4(B, A, sport=4000)
    queue = pick_rx_queue(frame, [0, 2])
    other = 2 - queue
    post_rx(fe, other, 4)
    device.deliver([frame])
    assert device.stats[other].requests == 0  # not delivered on the wrong queue
    assert device.has_work(queue) and not device.has_work(other)
    post_rx(fe, queue, 1)
    fe.kick(queue)
    assert device.stats[queue].requests == 1 and not device.has_work(queue)


# -- vhost-user: one memory table per queue pair in QEMU ---------------------------------------


def test_a_region_added_again_is_counted_and_removed_with_its_last_remove(
    make_frontend: FrontendFactory,
) -> None:
    """QEMU's vhost-user net sends ADD_MEM_REG / REM_MEM_REG once per queue pair."""
    fe = make_frontend(RngDevice())
    fe.start()
    spec = RegionSpec(0x4000_0000, 0x1000, 1 << 45, 0)
    before = len(fe.backend.memory.regions)
    for _ in range(2):
        fe.send(Request.ADD_MEM_REG, encode_region(spec), [create_memfd(0x1000)])
    assert len(fe.backend.memory.regions) == before + 1
    fe.send(Request.REM_MEM_REG, encode_region(spec))
    assert len(fe.backend.memory.regions) == before + 1  # the other pair still uses it
    fe.send(Request.REM_MEM_REG, encode_region(spec))
    assert len(fe.backend.memory.regions) == before
    with pytest.raises(BadMemoryRegion):
        fe.send(Request.REM_MEM_REG, encode_region(spec))
    # A region overlapping a mapped one without being the same is still refused.
    fe.send(Request.ADD_MEM_REG, encode_region(spec), [create_memfd(0x1000)])
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        fe.send(Request.ADD_MEM_REG, encode_region(RegionSpec(0x4000_0000, 0x2000, 1 << 46, 0)),
                [create_memfd(0x2000)])
