"""Bugs the fuzz targets found, as plain tests named after the rule they broke.

Each input is also in ``tests/fuzz/corpus/<target>/``, replayed by its target first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import BadRingState
from pyvirtio.spec.blk import DISCARD_SEGMENT, REQUEST_HEADER, SECTOR_SIZE, RequestType, Status
from pyvirtio.spec.common import Feature
from pyvirtio.vhost_user.protocol import U64, Request, encode_u64, encode_vring_addr
from pyvirtio.vhost_user.protocol import encode_vring_state as state

from ..unit.conftest import FRONTEND_GPA, FrontendFactory, ring_addresses


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
