"""The vhost-user back-end with packed rings (VIRTIO_F_RING_PACKED) and in-order use.

An in-process front-end does what QEMU does: it shares memfd guest RAM, lays out
packed (or split) rings there, passes real eventfds and sends the ring messages
straight to :class:`VhostUserBackend`.  The ring state crosses ``GET_VRING_BASE``
/ ``SET_VRING_BASE`` as vhost-user.rst's "vring descriptor indices for packed
virtqueues": positions and wrap counters of both the driver and the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence

import pytest

from pyvirtio.devices.base import DEFERRED, Deferred, VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import BadRingState
from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.blk import REQUEST_HEADER, RequestType, Status
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
)
from pyvirtio.vhost_user import engine as engine_module
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    HEADER,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_STATE,
    Message,
    Request,
    VringAddr,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import (
    INITIAL_VRING_BASE,
    PackedQueue,
    PackedRingAddresses,
    encode_vring_base,
)
from pyvirtio.virtqueue.split import RingAddresses

RAM_GPA = 0x1_0000_0000
RAM_SIZE = 0x100000
USER_ADDR = 0x7F55_0000_0000
QUEUE_STRIDE = 0x8000
DATA = RAM_GPA + 0x40000

PACKED = 1 << Feature.RING_PACKED
IN_ORDER = 1 << Feature.IN_ORDER
EVENT_IDX = 1 << Feature.EVENT_IDX
INDIRECT = 1 << Feature.INDIRECT_DESC
BASE_FEATURES = (1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES


class Front:
    """A vhost-user front-end in-process: guest RAM, rings, eventfds, messages."""

    def __init__(self, device: VirtioDevice) -> None:
        self.backend = VhostUserBackend(device)
        self.fd = create_memfd(RAM_SIZE, "packed-backend-test")
        self.spec = RegionSpec(RAM_GPA, RAM_SIZE, USER_ADDR, 0)
        self.memory = GuestMemory()
        self.memory.set_table([(self.spec, self.fd)])
        self.features = 0
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.next_data = DATA

    def close(self) -> None:
        self.backend.disconnect()
        self.backend.device.close()
        self.memory.clear()
        for fd in [self.fd, *self.kick_fds.values(), *self.call_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- messages ------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes | None:
        reply = self.backend.handle(Message(request, VERSION, payload, list(fds)))
        if reply.error is not None:
            raise reply.error
        return reply.data

    def call_u64(self, request: int) -> int:
        reply = self.send(request)
        assert reply is not None
        value: int = U64.unpack_from(reply, HEADER.size)[0]
        return value

    def negotiate(self, features: int) -> None:
        offered = self.call_u64(Request.GET_FEATURES)
        assert features & ~offered == 0, "the test asks for features not offered"
        self.call_u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(0))
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, encode_u64(features))
        self.features = features

    def set_mem_table(self) -> None:
        self.send(Request.SET_MEM_TABLE, encode_mem_table([self.spec]), [os.dup(self.fd)])

    def user(self, gpa: int) -> int:
        return USER_ADDR + gpa - RAM_GPA

    def start_ring(
        self, index: int, size: int, parts: tuple[int, int, int], *, base: int | None
    ) -> None:
        """NUM, BASE (unless ``None``), ADDR, CALL, KICK, ENABLE, as QEMU starts a ring."""
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, size))
        if base is not None:
            self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        desc, avail, used = parts
        addr = VringAddr(index, 0, self.user(desc), self.user(used), self.user(avail), 0)
        self.send(Request.SET_VRING_ADDR, encode_vring_addr(addr))
        for fds in (self.call_fds, self.kick_fds):
            with contextlib.suppress(KeyError, OSError):
                os.close(fds.pop(index))
        self.call_fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_fds[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.send(Request.SET_VRING_CALL, encode_u64(index), [os.dup(self.call_fds[index])])
        self.send(Request.SET_VRING_KICK, encode_u64(index), [os.dup(self.kick_fds[index])])
        self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, 1))

    def packed_addresses(self, index: int, size: int) -> PackedRingAddresses:
        desc = RAM_GPA + 0x1000 + index * QUEUE_STRIDE
        return PackedRingAddresses(desc, desc + 16 * size, desc + 16 * size + 4)

    def packed_ring(
        self, index: int = 0, size: int = 8, *, base: int | None = INITIAL_VRING_BASE,
        resume: tuple[int, int] | None = None,
    ) -> DriverPackedQueue:
        addrs = self.packed_addresses(index, size)
        driver = DriverPackedQueue(
            self.memory, size, addrs, event_idx=bool(self.features & EVENT_IDX),
            in_order=bool(self.features & IN_ORDER),
        )
        if resume is not None:
            driver.resume_at(*resume)
        self.start_ring(index, size, (addrs.desc, addrs.driver, addrs.device), base=base)
        return driver

    def split_ring(self, index: int = 0, size: int = 8) -> DriverSplitQueue:
        desc = RAM_GPA + 0x1000 + index * QUEUE_STRIDE
        avail = desc + desc_table_size(size)
        used = (avail + avail_ring_size(size) + 3) & ~3
        addrs = RingAddresses(desc, avail, used)
        driver = DriverSplitQueue(
            self.memory, size, addrs, event_idx=bool(self.features & EVENT_IDX)
        )
        self.start_ring(index, size, (desc, avail, used), base=0)
        return driver

    def get_vring_base(self, index: int) -> int:
        reply = self.send(Request.GET_VRING_BASE, encode_vring_state(index, 0))
        assert reply is not None
        ring, num = VRING_STATE.unpack_from(reply, HEADER.size)
        assert ring == index
        value: int = num
        return value

    # -- buffers -------------------------------------------------------------------------

    def alloc(self, length: int) -> int:
        gpa = self.next_data
        self.next_data = (gpa + max(length, 1) + 15) & ~15
        if self.next_data > RAM_GPA + RAM_SIZE:
            self.next_data = DATA
            return self.alloc(length)
        return gpa

    def kick(self, index: int = 0) -> None:
        os.eventfd_write(self.kick_fds[index], 1)
        self.backend.kick(index)

    def calls(self, index: int = 0) -> int:
        try:
            return os.eventfd_read(self.call_fds[index])
        except BlockingIOError:
            return 0


@pytest.fixture
def rng() -> Iterator[Front]:
    front = Front(RngDevice())
    yield front
    front.close()


@pytest.fixture
def blk() -> Iterator[Front]:
    front = Front(BlockDevice(BlockConfig(image=None, size=1 << 20)))
    yield front
    front.close()


def rng_round(front: Front, driver: DriverPackedQueue, count: int = 1, length: int = 16) -> None:
    """Post ``count`` buffers, kick, and check each came back full of random bytes."""
    bufs = {}
    for _ in range(count):
        gpa = front.alloc(length)
        front.memory.write(gpa, bytes(length))
        bufs[driver.add([], [(gpa, length)])] = gpa
    front.kick()
    used = driver.get_used()
    assert sorted(buf_id for buf_id, _n in used) == sorted(bufs)
    for buf_id, n in used:
        assert n == length
        assert front.memory.read(bufs[buf_id], length) != bytes(length)


# -- features ------------------------------------------------------------------------------


def test_ring_packed_and_in_order_are_offered_but_not_notification_data(rng: Front) -> None:
    """NOTIFICATION_DATA cannot reach a vhost-user back-end (kicks are eventfd counts)."""
    offered = rng.call_u64(Request.GET_FEATURES)
    assert offered & PACKED and offered & IN_ORDER
    assert not offered & (1 << Feature.NOTIFICATION_DATA)
    rng.negotiate(BASE_FEATURES | PACKED | IN_ORDER | EVENT_IDX | INDIRECT)
    assert rng.backend.device.has_feature(Feature.RING_PACKED)


def test_notification_data_is_refused(rng: Front) -> None:
    with pytest.raises(Exception, match="were not offered"):
        rng.send(Request.SET_FEATURES, encode_u64(1 << Feature.NOTIFICATION_DATA))


# -- packed rings through the back-end ---------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5, 8, 100])
def test_packed_ring_of_any_size_serves_rng_across_wraps(rng: Front, size: int) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, size)
    for _ in range(3 * size + 1):
        rng_round(rng, driver)
    assert rng.calls() >= 1
    assert rng.backend.device.stats[0].requests == 3 * size + 1
    assert rng.backend.device.stats[0].violations == 0


def test_split_rings_still_need_a_power_of_2_size(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES)
    with pytest.raises(BadRingState, match="power of 2"):
        rng.send(Request.SET_VRING_NUM, encode_vring_state(0, 100))


def test_a_packed_ring_starts_with_both_wrap_counters_set(rng: Front) -> None:
    """§2.8.1: wrap counters start at 1; a front-end that sends no SET_VRING_BASE
    gets that state, not the split ring's 0."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4, base=None)
    rng_round(rng, driver, 3)
    assert rng.get_vring_base(0) == encode_vring_base(3, 1, 3, 1)


def test_a_base_without_the_used_half_resumes_with_nothing_in_flight(
    rng: Front, caplog: pytest.LogCaptureFixture
) -> None:
    """DPDK 22.11's virtio_user sends 0x8000 for a fresh packed ring: bits 16-31, the
    used half of vhost-user.rst's "descriptor indices", left 0.  Read literally, the
    whole ring would be in flight; the device takes used = available instead."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    with caplog.at_level(logging.INFO, logger="pyvirtio"):
        driver = rng.packed_ring(0, 4, base=0x8000)
    assert "has no used half" in caplog.text
    rng_round(rng, driver, 3)
    assert rng.get_vring_base(0) == encode_vring_base(3, 1, 3, 1)
    assert rng.backend.device.stats[0].violations == 0


def test_a_base_with_the_used_half_is_taken_as_sent(rng: Front) -> None:
    """Driver lap 0 at position 2, device lap 0 at 0: two descriptors in flight, as
    sent (an upper half of 0 is a real position when the driver's wrap counter is 0)."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    rng.packed_ring(0, 4, base=encode_vring_base(2, 0, 0, 0), resume=(2, 0))
    queue = rng.backend.vrings[0].queue
    assert isinstance(queue, PackedQueue)
    assert queue.vring_base == encode_vring_base(2, 0, 0, 0)


def test_get_vring_base_reports_positions_and_wrap_counters(
    rng: Front, caplog: pytest.LogCaptureFixture
) -> None:
    """vhost-user.rst: bits 0-14 next available, 15 driver wrap, 16-30 next used, 31 device wrap."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4)
    for _ in range(6):
        rng_round(rng, driver)
    with caplog.at_level(logging.INFO):
        assert rng.get_vring_base(0) == 0x0002_0002  # position 2, both counters 0
    assert "queue 0 stopped at 0x00020002" in caplog.text
    rng.kick()  # stopped: nothing is processed
    driver.add([], [(rng.alloc(4), 4)])
    rng.backend.kick(0)
    assert driver.get_used() == []


def test_set_vring_base_resumes_a_stopped_packed_ring(rng: Front) -> None:
    """A stop (GET_VRING_BASE) and restart (SET_VRING_BASE, KICK) keeps the ring going,
    as when QEMU stops and starts the device with the guest still running."""
    rng.negotiate(BASE_FEATURES | PACKED | EVENT_IDX)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 5)
    for _ in range(7):
        rng_round(rng, driver)
    base = rng.get_vring_base(0)
    assert base == encode_vring_base(2, 0, 2, 0)
    addrs = rng.packed_addresses(0, 5)
    rng.start_ring(0, 5, (addrs.desc, addrs.driver, addrs.device), base=base)
    for _ in range(9):
        rng_round(rng, driver, 2)
    # 7 + 18 descriptors = 5 laps of 5: both wrap counters flipped 5 times.
    assert rng.get_vring_base(0) == encode_vring_base(0, 0, 0, 0)


def test_guest_reset_then_a_fresh_ring_starts_at_the_initial_state(rng: Front) -> None:
    """A guest reboot: QEMU stops the rings, renegotiates, and starts fresh zeroed rings
    with SET_VRING_BASE 0x80008000."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4)
    for _ in range(5):
        rng_round(rng, driver)
    assert rng.get_vring_base(0) == encode_vring_base(1, 0, 1, 0)
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4, base=INITIAL_VRING_BASE)
    for _ in range(5):
        rng_round(rng, driver)
    assert rng.get_vring_base(0) == encode_vring_base(1, 0, 1, 0)


def test_reset_device_and_reconnect_start_fresh_packed_rings(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4)
    rng_round(rng, driver, 3)
    rng.send(Request.RESET_DEVICE)
    rng.negotiate(BASE_FEATURES | PACKED)
    driver = rng.packed_ring(0, 4, base=None)
    rng_round(rng, driver, 2)
    assert rng.get_vring_base(0) == encode_vring_base(2, 1, 2, 1)
    rng.backend.disconnect()  # the front-end went away; a new one connects
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4, base=None)
    rng_round(rng, driver, 1)
    assert rng.get_vring_base(0) == encode_vring_base(1, 1, 1, 1)


def test_memory_table_change_keeps_the_packed_ring_state(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 3)
    rng_round(rng, driver, 2)
    rng.set_mem_table()  # the same RAM again: every ring is re-translated
    rng_round(rng, driver, 3)
    assert rng.get_vring_base(0) == encode_vring_base(2, 0, 2, 0)


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (encode_vring_base(4, 1, 0, 1), "position 4, beyond the ring of 4"),
        (encode_vring_base(2, 0, 0, 1), "6 descriptors in flight"),
    ],
)
def test_impossible_packed_ring_base_is_refused_when_the_ring_starts(
    rng: Front, base: int, match: str
) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    with pytest.raises(BadRingState, match=match):
        rng.packed_ring(0, 4, base=base)


def test_split_ring_base_over_16_bits_is_still_refused(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES)
    with pytest.raises(BadRingState, match="exceeds 16 bits"):
        rng.send(Request.SET_VRING_BASE, encode_vring_state(0, INITIAL_VRING_BASE))


@pytest.mark.parametrize(
    ("part", "offset", "match"),
    [("desc", 8, "descriptor ring"), ("driver", 2, "driver event"), ("device", 2, "device event")],
)
def test_misaligned_packed_ring_parts_are_refused(
    rng: Front, part: str, offset: int, match: str
) -> None:
    """§2.8.11: descriptor ring 16-aligned, event suppression structures 4-aligned."""
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    addrs = rng.packed_addresses(0, 4)
    setattr(addrs, part, getattr(addrs, part) + offset)
    with pytest.raises(BadRingState, match=f"{match}.*not {16 if part == 'desc' else 4}-byte"):
        rng.start_ring(0, 4, (addrs.desc, addrs.driver, addrs.device), base=INITIAL_VRING_BASE)


def test_ring_layout_cannot_change_while_a_ring_runs(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    rng.packed_ring(0, 4)
    with pytest.raises(BadRingState, match="layout cannot change"):
        rng.send(Request.SET_FEATURES, encode_u64(BASE_FEATURES))


def test_with_event_idx_the_device_asks_for_a_kick_at_its_next_descriptor(rng: Front) -> None:
    rng.negotiate(BASE_FEATURES | PACKED | EVENT_IDX)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 4)
    rng_round(rng, driver, 3)
    off_wrap, flags = EVENT_SUPPRESS.unpack(rng.memory.read(rng.packed_addresses(0, 4).device, 4))
    assert (off_wrap, flags) == (0x8000 | 3, RING_EVENT_FLAGS_DESC)
    driver.add([], [(rng.alloc(4), 4)])
    assert driver.should_kick() is True


def test_driver_violation_is_logged_and_the_buffer_returned_empty(
    rng: Front, caplog: pytest.LogCaptureFixture
) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 8)
    bad = driver.add([], [(0x10_0000_0000, 16)])  # not guest memory
    with caplog.at_level(logging.ERROR):
        rng.kick()
    assert driver.get_used() == [(bad, 0)]
    assert "driver violation: queue 0, descriptor 0: buffer 0x1000000000+0x10 is not in " \
        "guest memory (VIRTIO 1.4 §2.8.4)" in caplog.text
    assert rng.backend.device.stats[0].violations == 1
    rng_round(rng, driver, 2)


def test_incomplete_list_stops_the_queue_until_reset(
    rng: Front, caplog: pytest.LogCaptureFixture
) -> None:
    rng.negotiate(BASE_FEATURES | PACKED)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 8)
    driver.write_desc(1, rng.alloc(4), 4, 0, VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE)
    driver.write_desc(0, rng.alloc(4), 4, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT)
    with caplog.at_level(logging.ERROR):
        rng.kick()
    assert "(VIRTIO 1.4 §2.8.17)" in caplog.text
    assert "queue 0 stops until the device is reset" in caplog.text
    assert rng.get_vring_base(0) == INITIAL_VRING_BASE  # nothing was consumed


def test_blk_reads_and_writes_through_packed_indirect_descriptors(blk: Front) -> None:
    blk.negotiate(BASE_FEATURES | PACKED | INDIRECT | EVENT_IDX)
    blk.set_mem_table()
    driver = blk.packed_ring(0, 6)
    payload = os.urandom(1024)

    def request(kind: int, sector: int, data: bytes | None, length: int) -> tuple[int, bytes]:
        header = blk.alloc(16)
        blk.memory.write(header, REQUEST_HEADER.pack(kind, 0, sector))
        status = blk.alloc(1)
        buf = blk.alloc(length)
        readable = [(header, 16)]
        writable = [(status, 1)]
        if data is not None:
            blk.memory.write(buf, data)
            readable.append((buf, length))
        else:
            writable.insert(0, (buf, length))
        driver.add_indirect(blk.alloc(48), readable, writable)
        blk.kick()
        ((_id, written),) = driver.get_used()
        assert blk.memory.read(status, 1)[0] == Status.OK
        return written, blk.memory.read(buf, length)

    for round_ in range(8):  # 8 one-descriptor lists on a ring of 6: wraps
        assert request(RequestType.OUT, 2 * round_, payload, 1024)[0] == 1
        written, data = request(RequestType.IN, 2 * round_, None, 1024)
        assert (written, data) == (1025, payload)
    assert blk.get_vring_base(0) == encode_vring_base(4, 1, 4, 1)  # 16 = 2 laps of 6, + 4


# -- VIRTIO_F_IN_ORDER ---------------------------------------------------------------------


def test_in_order_packed_buffers_come_back_in_the_order_made_available(rng: Front) -> None:
    """§6.2: a device that negotiated IN_ORDER uses buffers in the order made available,
    rejected ones included."""
    rng.negotiate(BASE_FEATURES | PACKED | IN_ORDER)
    rng.set_mem_table()
    driver = rng.packed_ring(0, 8)
    for _ in range(4):
        ids = [
            driver.add([], [(rng.alloc(8), 8)]),
            driver.add([], [(0x10_0000_0000, 8)]),  # rejected: returned with length 0
            driver.add([], [(rng.alloc(4), 4), (rng.alloc(4), 4)]),
        ]
        rng.kick()
        assert driver.get_used() == [(ids[0], 8), (ids[1], 0), (ids[2], 8)]
    assert rng.backend.device.stats[0].violations == 4


def test_in_order_split_ring_used_in_ring_order(rng: Front) -> None:
    """§2.7.5: with IN_ORDER the driver uses descriptors in ring order (``next`` = x + 1,
    0 after the last); the device returns the chains in the order made available."""
    rng.negotiate(BASE_FEATURES | IN_ORDER)
    rng.set_mem_table()
    driver = rng.split_ring(0, 4)
    slot = 0
    for round_ in range(5):
        heads = []
        for chain_len in (1, 2):
            heads.append(slot)
            for i in range(chain_len):
                last = i == chain_len - 1
                flags = VIRTQ_DESC_F_WRITE | (0 if last else VIRTQ_DESC_F_NEXT)
                driver.write_desc(slot, rng.alloc(4), 4, flags, 0 if last else (slot + 1) % 4)
                slot = (slot + 1) % 4
        for head in heads:
            driver.publish(head)
        rng.kick()
        end = driver.used_idx()
        used = []
        while driver.last_used_idx != end:  # read the used ring directly (no free list)
            raw = rng.memory.read(driver.addrs.used + 4 + 8 * (driver.last_used_idx % 4), 8)
            used.append((int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")))
            driver.last_used_idx += 1
        assert used == [(heads[0], 4), (heads[1], 8)], round_
        slot = (slot + 1) % 4  # leave one descriptor unused so rounds start at each slot


# -- asynchronous completion ----------------------------------------------------------------


class Later(VirtioDevice):
    """Holds every chain (DEFERRED); the test completes them, in the order it likes."""

    device_id = 0x3FFD

    def __init__(self) -> None:
        super().__init__()
        self.held: list[DescriptorChain] = []
        self.stopping: list[int] = []

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        self.held.append(chain)
        return DEFERRED

    def finish(self, backend: VhostUserBackend, order: Sequence[int]) -> None:
        """Complete held chains by position in :attr:`held`, writing 1 byte to each."""
        for i in order:
            chain = self.held[i]
            chain.writer().write(b"x")
            backend.engine.complete(0, chain, 1)
        backend.flush()

    def stop_queue(self, queue: int) -> None:
        self.stopping.append(queue)


@pytest.fixture
def later() -> Iterator[Front]:
    front = Front(Later())
    yield front
    front.close()


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("in_order", [False, True])
def test_deferred_chains_are_used_as_completed_or_in_order(
    later: Front, layout: str, in_order: bool
) -> None:
    """A device completes chains later and out of order; with IN_ORDER negotiated the
    engine uses them in the order taken (§6.2), else as they complete."""
    features = BASE_FEATURES | (PACKED if layout == "packed" else 0) | (IN_ORDER if in_order else 0)
    later.negotiate(features)
    later.set_mem_table()
    driver = later.packed_ring(0, 8) if layout == "packed" else later.split_ring(0, 8)
    ids = [driver.add([], [(later.alloc(4), 4)]) for _ in range(3)]
    later.kick()
    device = later.backend.device
    assert isinstance(device, Later)
    assert [c.head for c in device.held] == ids
    assert driver.get_used() == []  # nothing used yet: the device holds them all
    device.finish(later.backend, [2])
    assert driver.get_used() == ([] if in_order else [(ids[2], 1)])
    later.set_mem_table()  # the rings are re-made in place: the held chains survive
    device.finish(later.backend, [0, 1])
    expected = [(ids[0], 1), (ids[1], 1), (ids[2], 1)] if in_order else [(ids[0], 1), (ids[1], 1)]
    assert driver.get_used() == expected
    assert later.calls() >= 1
    assert device.stats[0].requests == 3


def test_a_ring_stopping_with_held_chains_waits_for_them(later: Front) -> None:
    """GET_VRING_BASE with chains in flight: the device is told (stop_queue), its
    completions from another thread are used, then the base is reported."""
    later.negotiate(BASE_FEATURES)
    later.set_mem_table()
    driver = later.split_ring(0, 8)
    ids = [driver.add([], [(later.alloc(4), 4)]) for _ in range(2)]
    later.kick()
    device = later.backend.device
    assert isinstance(device, Later)

    def complete_all() -> None:
        for chain in device.held:
            later.backend.engine.complete(0, chain, 0)

    worker = threading.Timer(0.2, complete_all)
    worker.start()
    assert later.get_vring_base(0) == 2
    worker.join()
    assert device.stopping == [0]
    assert sorted(driver.get_used()) == sorted((i, 0) for i in ids)


def test_a_late_completion_after_the_front_end_left_is_dropped(later: Front) -> None:
    later.negotiate(BASE_FEATURES)
    later.set_mem_table()
    driver = later.split_ring(0, 8)
    driver.add([], [(later.alloc(4), 4)])
    later.kick()
    device = later.backend.device
    assert isinstance(device, Later)
    with patch_quiesce_timeout(0.05):
        later.backend.disconnect()  # nobody completes: dropped after the timeout
    assert device.stats == [] or device.stats[0].errors == 0  # counters restart
    device.finish(later.backend, [0])  # no ring, no crash, nothing written
    assert driver.get_used() == []


@contextlib.contextmanager
def patch_quiesce_timeout(seconds: float) -> Iterator[None]:
    old = engine_module.QUIESCE_TIMEOUT
    engine_module.QUIESCE_TIMEOUT = seconds
    try:
        yield
    finally:
        engine_module.QUIESCE_TIMEOUT = old
