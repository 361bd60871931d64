"""Bugs the fuzz targets found, as plain tests named after the rule they broke.

Each input is also in ``tests/fuzz/corpus/<target>/``, replayed by its target first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import BadRingState
from pyvirtio.spec.blk import DISCARD_SEGMENT, REQUEST_HEADER, SECTOR_SIZE, RequestType, Status
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import RECEIVEQ, CtrlClass, CtrlRx, NetFeature, NetHeader
from pyvirtio.testing import (
    FRONTEND_GPA,
    NOT_SPLIT_FEATURES,
    Frontend,
    FrontendFactory,
    ring_addresses,
)
from pyvirtio.vhost_user.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Request,
    encode_u64,
    encode_vring_addr,
)
from pyvirtio.vhost_user.protocol import encode_vring_state as state

from ..unit.test_net_device import MAC, PEER, Host, ListBackend


@pytest.mark.parametrize("type_", [RequestType.DISCARD, RequestType.WRITE_ZEROES],
                         ids=["discard", "write-zeroes"])
def test_segment_of_zero_sectors_is_nothing_to_do_not_a_failure_after_the_others_ran(
    make_frontend: FrontendFactory, tmp_path: Path, type_: RequestType
) -> None:
    """corpus/blk/*-zero-sector-segment.json: a request either completes (OK) or leaves
    the image alone; an empty segment made fallocate() fail (EINVAL) after the segments
    before it had been executed, and the request was answered IOERR."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(16 * SECTOR_SIZE))
    fe = make_frontend(BlockDevice(BlockConfig(image=image)))
    fe.start()
    body = REQUEST_HEADER.pack(type_, 0, 0) + DISCARD_SEGMENT.pack(0, 1, 0) + DISCARD_SEGMENT.pack(
        4, 0, 0)
    status = fe.alloc(1)
    head = fe.drivers[0].add([(fe.put(body), len(body))], [(status, 1)])
    assert fe.kick() == [(head, 1)]
    assert fe.memory.read(status, 1)[0] == Status.OK
    if type_ == RequestType.WRITE_ZEROES:
        assert image.read_bytes()[:SECTOR_SIZE] == bytes(SECTOR_SIZE)


def test_size_valid_only_for_packed_rings_is_refused_when_the_ring_starts_split(
    make_frontend: FrontendFactory,
) -> None:
    """corpus/vhost_user/packed-queue-size-then-split-features.json: SET_VRING_NUM 3 is
    valid while VIRTIO_F_RING_PACKED is negotiated (§2.8: any size); after the features
    change to split rings, starting the ring raised ValueError out of ``handle`` (the
    runtime catches only PyVirtioError: the daemon died).  It is a BadRingState now, and
    the back-end serves the next front-end."""
    fe = make_frontend(RngDevice())
    offered = int(U64.unpack(fe.call(Request.GET_FEATURES))[0])
    fe.send(Request.SET_FEATURES, encode_u64(offered))
    fe.send(Request.SET_VRING_NUM, state(0, 3))
    fe.send(Request.SET_FEATURES, encode_u64(offered & ~(1 << Feature.RING_PACKED)))
    fe.set_mem_table()
    addrs = ring_addresses(FRONTEND_GPA + 0x1000, 4)
    fe.send(Request.SET_VRING_ADDR, encode_vring_addr(fe.vring_addr(0, addrs)))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    with pytest.raises(BadRingState, match="not a power of 2"):
        fe.send(Request.SET_VRING_KICK, encode_u64(0), [kick])
    assert fe.backend.vrings[0].queue is None
    fe.backend.disconnect()
    fe.start()
    head = fe.drivers[0].add(writable=[(fe.alloc(16), 16)])
    assert fe.kick() == [(head, 16)]


def two_pairs_without_mq(make_frontend: FrontendFactory) -> tuple[NetDevice, ListBackend, Frontend]:
    """A net device offering two queue pairs, MQ and CTRL_VQ not negotiated (as with QEMU,
    which keeps the control queue), MRG_RXBUF negotiated, and a front-end that starts
    every ring the device has anyway."""
    frames = ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, queues=2), frames)
    fe = make_frontend(device)
    device.attach(Host(fe.backend))
    features = device.offered_features() & ~NOT_SPLIT_FEATURES & ~(
        1 << NetFeature.MQ | 1 << NetFeature.CTRL_VQ)
    fe.start(queues=device.num_queues, size=8, features=features | VHOST_USER_F_PROTOCOL_FEATURES)
    assert device.control_queue == 2
    return device, frames, fe


def flow_frame(peer_ip: int) -> bytes:
    """An IPv4/TCP frame for the device from 10.0.0.``peer_ip`` (one flow each)."""
    ip = bytes([0x45, 0, 0, 86, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, peer_ip, 10, 0, 0, 1])
    return MAC + PEER + b"\x08\x00" + ip + bytes(range(4)) + bytes(62)


def test_without_mq_every_frame_goes_to_receiveq1_never_to_the_control_queue(
    make_frontend: FrontendFactory,
) -> None:
    """corpus/net/no-mq-frames-steered-to-the-control-queue.json: without MQ the driver
    has one pair, and queue 2 is the control queue (VIRTIO 1.4 §5.1.2).  Frames were
    spread over "pairs" 1 and 2 by their flow hash whenever CTRL_VQ was off; those for
    pair 2 waited for the control queue, which with MRG_RXBUF took them into its
    buffers."""
    device, _frames, fe = two_pairs_without_mq(make_frontend)
    command = fe.alloc(1526)
    fe.memory.write(command, b"\xee" * 1526)
    fe.drivers[2].add(writable=[(command, 1526)])
    for _ in range(8):
        fe.drivers[RECEIVEQ].add(writable=[(fe.alloc(1526), 1526)])
    device.deliver([flow_frame(i) for i in range(2, 10)])
    assert len(fe.drivers[RECEIVEQ].get_used()) == 8
    assert fe.drivers[2].get_used() == []
    assert fe.memory.read(command, 1526) == b"\xee" * 1526
    assert not device.has_work(RECEIVEQ)
    assert device.stats[RECEIVEQ].bytes_in == 8 * 100


def test_a_chain_on_a_queue_the_features_do_not_give_the_driver_is_returned_unused(
    make_frontend: FrontendFactory,
) -> None:
    """corpus/net/no-mq-chain-on-a-queue-beyond-the-control-queue.json: without MQ,
    queues 3 and 4 of a two-pair device do not exist for the driver (§5.1.2).  A chain
    on queue 4 reached the receive path, whose backlog 2 does not exist (IndexError,
    logged with a traceback), and one on queue 3 was transmitted.  Each is a driver
    violation now, returned with length 0."""
    device, frames, fe = two_pairs_without_mq(make_frontend)
    head = fe.drivers[4].add(writable=[(fe.alloc(1526), 1526)])
    assert fe.kick(4) == [(head, 0)]
    packet = NetHeader().pack() + flow_frame(2)
    head = fe.drivers[3].add([(fe.put(packet), len(packet))])
    assert fe.kick(3) == [(head, 0)]
    assert frames.sent == []
    for queue in (3, 4):
        assert (device.stats[queue].violations, device.stats[queue].errors) == (1, 0)


def test_rx_extra_commands_without_ctrl_rx_are_refused_not_a_crash(
    make_frontend: FrontendFactory,
) -> None:
    """corpus/net/ctrl-rx-extra-without-ctrl-rx.json: CTRL_RX_EXTRA requires CTRL_RX
    (VIRTIO 1.4 §5.1.3.1), but a driver may accept it alone.  Then no receive filter
    exists, and an ALLUNI command ran into an assertion in NetControl._rx: the
    AssertionError escaped handle_chain (a traceback in the log) and the chain came
    back without an ack.  It is answered VIRTIO_NET_ERR now."""
    device = NetDevice(NetDeviceConfig(mac=MAC), ListBackend())
    fe = make_frontend(device)
    features = device.offered_features() & ~NOT_SPLIT_FEATURES & ~(
        1 << NetFeature.CTRL_RX | 1 << NetFeature.CTRL_VLAN)
    fe.start(queues=3, features=features | VHOST_USER_F_PROTOCOL_FEATURES)
    for command in (CtrlRx.ALLUNI, CtrlRx.NOMULTI, CtrlRx.NOUNI, CtrlRx.NOBCAST):
        ack = fe.alloc(1)
        head = fe.drivers[2].add([(fe.put(bytes([CtrlClass.RX, command, 1])), 3)], [(ack, 1)])
        assert fe.kick(2) == [(head, 1)]
        assert fe.memory.read(ack, 1) == b"\x01"
    assert device.stats[2].kinds["commands refused"] == 4
    assert device.rx_filter is None
