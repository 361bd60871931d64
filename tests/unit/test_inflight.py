"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD) for split rings.

A back-end that dies between taking a chain and returning it leaves the chain
marked in the inflight buffer the front-end keeps; the next back-end must
resubmit it, once, before new chains, in the order the chains were taken.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import BadRingState
from pyvirtio.memory import create_memfd
from pyvirtio.spec.blk import REQUEST_HEADER, RequestType
from pyvirtio.testing import Frontend, FrontendFactory, parse_reply
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    InflightInfo,
    Message,
    ProtocolFeature,
    Request,
    decode_inflight,
    encode_inflight,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.inflight import InflightRegion, region_size

SIZE = 16


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


def _inflight_fd(fe: Frontend) -> int:
    """GET_INFLIGHT_FD as QEMU sends it; return the buffer's fd."""
    payload = encode_inflight(InflightInfo(0, 0, 1, SIZE))
    reply = fe.backend.handle(Message(Request.GET_INFLIGHT_FD, 1, payload, []))
    info = decode_inflight(Message(Request.GET_INFLIGHT_FD, 5, parse_reply(reply.data,
                                   Request.GET_INFLIGHT_FD), []))
    (fd,) = reply.fds
    assert info.mmap_size == region_size(SIZE) and info.num_queues == 1
    assert os.fstat(fd).st_size == info.mmap_size
    return fd


def _set_inflight(fe: Frontend, fd: int) -> None:
    payload = encode_inflight(InflightInfo(region_size(SIZE), 0, 1, SIZE))
    fe.send(Request.SET_INFLIGHT_FD, payload, [os.dup(fd)])


def _write_request(fe: Frontend, driver: DriverSplitQueue, sector: int, data: bytes) -> int:
    header = fe.put(REQUEST_HEADER.pack(RequestType.OUT, 0, sector))
    return driver.add([(header, 16), (fe.put(data), len(data))], [(fe.alloc(1), 1)])


def test_blk_offers_inflight_tracking_and_rng_does_not(
    make_frontend: FrontendFactory, image: Path
) -> None:
    blk = make_frontend(BlockDevice(BlockConfig(image=image)))
    rng = make_frontend(RngDevice())
    assert blk.backend.protocol_features_offered >> ProtocolFeature.INFLIGHT_SHMFD & 1
    assert not rng.backend.protocol_features_offered >> ProtocolFeature.INFLIGHT_SHMFD & 1


def test_inflight_buffer_for_more_queues_than_the_device_has_is_refused(
    make_frontend: FrontendFactory, image: Path
) -> None:
    fe = make_frontend(BlockDevice(BlockConfig(image=image)))
    fe.negotiate()
    with pytest.raises(BadRingState):
        fe.send(Request.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 4, SIZE)))


def test_a_chain_a_crashed_backend_took_is_resubmitted_once_by_the_next(
    make_frontend: FrontendFactory, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_frontend(BlockDevice(BlockConfig(image=image)))
    first.negotiate()
    first.set_mem_table()
    fd = _inflight_fd(first)
    _set_inflight(first, fd)
    driver = first.setup_queue(0, SIZE)
    blocks = [os.urandom(512) for _ in range(3)]
    heads = [_write_request(first, driver, 8 * i, block) for i, block in enumerate(blocks)]

    # The first back-end completes request 0, takes request 1, and dies.
    queue = first.backend.vrings[0].queue
    assert queue is not None
    chain = queue.pop()
    assert chain is not None
    written = first.backend.device.handle_chain(0, chain)
    assert isinstance(written, int)
    queue.push(chain.head, written)
    assert queue.pop() is not None  # taken, never completed: the crash
    assert driver.get_used() == [(heads[0], 1)]

    # QEMU reconnects a new back-end: same guest RAM and rings, the kept inflight
    # buffer, and a base equal to the used index (all it knows after a crash).
    second = Frontend(VhostUserBackend(BlockDevice(BlockConfig(image=image))), first.guest)
    second.negotiate()
    second.set_mem_table()
    _set_inflight(second, fd)
    second.send(Request.SET_VRING_NUM, encode_vring_state(0, SIZE))
    second.send(Request.SET_VRING_BASE, encode_vring_state(0, 1))
    second.send(Request.SET_VRING_ADDR, encode_vring_addr(second.vring_addr(0, driver.addrs)))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        second.send(Request.SET_VRING_CALL, encode_u64(0), [os.dup(call)])
        with caplog.at_level(logging.INFO, logger="pyvirtio"):
            second.send(Request.SET_VRING_KICK, encode_u64(0), [os.dup(kick)])
            second.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 1))
        assert "resubmitting 1 requests" in caplog.text
        # Request 1 first (resubmitted), then request 2 (never taken), each once.
        assert driver.get_used() == [(heads[1], 1), (heads[2], 1)]
        second.backend.kick(0)
        assert driver.get_used() == []
    finally:
        second.backend.disconnect()
        second.backend.device.close()
        os.close(kick)
        os.close(call)
        os.close(fd)
    data = image.read_bytes()
    for i, block in enumerate(blocks):
        assert data[8 * 512 * i : 8 * 512 * i + 512] == block


def test_last_batch_already_in_the_used_ring_is_not_resubmitted() -> None:
    """vhost-user.rst: a used index past the region's record means the batch completed."""
    fd = create_memfd(region_size(SIZE))
    try:
        buffer = mmap.mmap(fd, region_size(SIZE))
        region = InflightRegion(memoryview(buffer), SIZE)
        region.reset(used_idx=0)
        region.taken(3)
        region.taken(5)
        region.before_used(3)  # the crash: used ring idx moved to 1, after_used never ran
        assert region.recover(used_idx=1) == [5]
        # A fresh region (version 0) has nothing to recover.
        region.view[:] = bytes(len(region.view))
        assert not region.initialized
    finally:
        os.close(fd)
