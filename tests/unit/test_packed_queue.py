"""Packed virtqueues (VIRTIO 1.4 §2.8): layout, the device and driver sides, and
every rule a driver can break, each reported with its queue, descriptor and section.

The rings live in real memfd-backed guest memory; :class:`DriverPackedQueue`
builds them, and tests that break rules write descriptors by hand.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.errors import (
    BadAvailFlags,
    BadEventSuppression,
    BufferIdInUse,
    BufferOutOfMemory,
    ChainLengthOverflow,
    ChainTooLong,
    DeviceRingError,
    EventSuppressionReservedBits,
    IncompleteChain,
    IndirectInList,
    IndirectNotNegotiated,
    IndirectWithNext,
    PackedBadIndirectTableLength,
    PackedBufferOutOfMemory,
    PackedChainLengthOverflow,
    PackedChainTooLong,
    PackedIndirectNotNegotiated,
    PackedIndirectTooLong,
    PackedReadableAfterWritable,
    PackedRingOutOfMemory,
    ReadableAfterWritable,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec import virtqueue as vq
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS,
    PACKED_DESC,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.virtqueue import DescriptorChain, gather, scatter
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.packed import (
    INITIAL_VRING_BASE,
    PackedQueue,
    PackedRingAddresses,
    check_packed_queue_size,
    decode_vring_base,
    encode_vring_base,
)

from .store_spy import spy_on_stores

AVAIL = VIRTQ_DESC_F_AVAIL
USED = VIRTQ_DESC_F_USED
NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT

REGION = 0x40000
RING_GPA = 0x1000
DATA_GPA = 0x10000
OUTSIDE = 0x10_0000_0000  # no region there


# -- a driver and a device over one packed ring ---------------------------------------------


@contextlib.contextmanager
def packed_memory(layout: tuple[tuple[int, int], ...] = ((0, REGION),)) -> Iterator[GuestMemory]:
    """Guest memory of memfd regions ``(gpa, size)``; usable inside hypothesis tests."""
    memory = GuestMemory()
    fds = [create_memfd(size, "packed-test") for _gpa, size in layout]
    try:
        memory.set_table(
            (RegionSpec(gpa, size, 0x7F00_0000_0000 + (i << 32), 0), fd)
            for i, ((gpa, size), fd) in enumerate(zip(layout, fds, strict=True))
        )
        yield memory
    finally:
        memory.clear()
        for fd in fds:
            os.close(fd)


def kept(broken: object, exc: BaseException) -> bool:
    """The ring keeps a copy of the error that broke it, without the traceback (whose
    frames hold the queue: the cycle kept guest memory mapped until the cyclic GC)."""
    return (type(broken) is type(exc) and broken is not exc and str(broken) == str(exc)
            and getattr(broken, "__traceback__", True) is None)


def packed_addresses(base: int, size: int) -> PackedRingAddresses:
    """Descriptor ring at ``base``, then the driver and device event structures."""
    return PackedRingAddresses(base, base + 16 * size, base + 16 * size + 4)


@dataclass
class PackedPair:
    """A driver and a device sharing one packed queue, and a bump allocator for buffers."""

    memory: GuestMemory
    driver: DriverPackedQueue
    device: PackedQueue
    addrs: PackedRingAddresses
    next_data: int = DATA_GPA

    def alloc(self, length: int) -> int:
        gpa = self.next_data
        self.next_data = (gpa + max(length, 1) + 15) & ~15
        assert self.next_data <= REGION, "test ran out of buffer space"
        return gpa

    def put(self, data: bytes) -> int:
        gpa = self.alloc(len(data))
        self.memory.write(gpa, data)
        return gpa

    def used_desc(self, pos: int) -> tuple[int, int, int]:
        """(len, id, flags) of descriptor ``pos``."""
        _addr, length, buf_id, flags = PACKED_DESC.unpack(
            self.memory.read(self.addrs.desc + 16 * pos, 16)
        )
        return length, buf_id, flags

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device event suppression structure."""
        off_wrap, flags = EVENT_SUPPRESS.unpack(self.memory.read(self.addrs.device, 4))
        return off_wrap, flags


def make_packed_pair(
    memory: GuestMemory,
    size: int = 8,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    in_order: bool = False,
    index: int = 0,
    start: tuple[int, int] | None = None,
) -> PackedPair:
    """Lay out a packed queue at RING_GPA and attach both sides.

    ``start=(pos, wrap)`` starts the idle ring there, as after ``SET_VRING_BASE``.
    """
    addrs = packed_addresses(RING_GPA, size)
    driver = DriverPackedQueue(memory, size, addrs, event_idx=event_idx, in_order=in_order)
    base = INITIAL_VRING_BASE
    if start is not None:
        driver.resume_at(*start)
        base = encode_vring_base(start[0], start[1], start[0], start[1])
    device = PackedQueue(
        memory, index, size, addrs, event_idx=event_idx, indirect=indirect, vring_base=base
    )
    return PackedPair(memory, driver, device, addrs)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with packed_memory() as mem:
        yield mem


@pytest.fixture
def pair(memory: GuestMemory) -> PackedPair:
    """An 8-entry packed queue, index 2, INDIRECT_DESC negotiated."""
    return make_packed_pair(memory, 8, indirect=True, index=2)


def pop_chain(queue: PackedQueue) -> DescriptorChain:
    chain = queue.pop()
    assert chain is not None
    return chain


def expect_violation(
    pair: PackedPair, kind: type[VirtqueueError], section: str, descriptor: int | None
) -> VirtqueueError:
    """Pop, expecting ``kind`` for the queue's index and ``descriptor``, citing ``section``."""
    with pytest.raises(kind) as info:
        pair.device.pop()
    exc = info.value
    assert type(exc) is kind
    assert exc.queue == pair.device.index
    assert exc.descriptor == descriptor
    assert exc.spec == f"VIRTIO 1.4 {section}"
    assert f"({exc.spec})" in str(exc)
    assert str(exc).startswith(f"queue {pair.device.index}")
    return exc


def still_serves(pair: PackedPair) -> None:
    """The queue takes and returns one more well-formed buffer."""
    gpa = pair.put(b"after")
    buf = pair.driver.add([(gpa, 5)], [(pair.alloc(8), 8)])
    chain = pop_chain(pair.device)
    assert chain.head == buf
    assert gather(chain.readable, 0, 5) == b"after"
    pair.device.push(chain.head, 3)
    assert (buf, 3) in pair.driver.get_used()


def returned_with_zero(pair: PackedPair, exc: VirtqueueError, buf_id: int) -> None:
    """The rejected buffer goes back to the driver with length 0, as the back-end does."""
    assert exc.head == buf_id
    assert pair.device.broken is None
    pair.device.push(buf_id, 0)
    assert pair.driver.get_used() == [(buf_id, 0)]


# -- layout ------------------------------------------------------------------------------


def test_packed_structs_match_the_spec_sizes_and_flag_values() -> None:
    """§2.8.13 pvirtq_desc is 16 bytes; §2.8.14 pvirtq_event_suppress is 4; §2.8.1 flags."""
    assert vq.PACKED_DESC.size == vq.PACKED_DESC_SIZE == 16
    assert vq.EVENT_SUPPRESS.size == vq.EVENT_SUPPRESS_SIZE == 4
    assert vq.PACKED_USED_OFFSET + vq.PACKED_USED.size == 14  # len, id, then flags
    assert (AVAIL, USED) == (0x80, 0x8000)
    assert (RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC) == (0, 1, 2)
    assert vq.PACKED_EVENT_WRAP == 0x8000
    assert vq.packed_ring_size(100) == 1600
    assert vq.MAX_PACKED_QUEUE_SIZE == 1 << 15


def test_packed_desc_field_order_is_addr_len_id_flags() -> None:
    raw = PACKED_DESC.pack(0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x0102)
    assert raw == bytes.fromhex("8877665544332211" "ccbbaa99" "eedd" "0201")


@pytest.mark.parametrize("size", [1, 3, 100, 32768])
def test_any_packed_queue_size_up_to_2_15_is_allowed(size: int) -> None:
    """§2.8.10.1: the queue size does not have to be a power of 2."""
    check_packed_queue_size(size)


@pytest.mark.parametrize("size", [0, 32769, -1])
def test_packed_queue_sizes_outside_1_to_2_15_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match=r"not in 1\.\.32768"):
        check_packed_queue_size(size)


def test_vring_base_encoding_follows_vhost_user() -> None:
    """vhost-user.rst: bits 0-14 avail position, 15 driver wrap, 16-30 used, 31 device wrap."""
    assert INITIAL_VRING_BASE == encode_vring_base(0, 1, 0, 1) == 0x8000_8000
    assert encode_vring_base(5, 0, 3, 1) == 0x8003_0005
    assert decode_vring_base(0x8003_0005) == (5, 0, 3, 1)
    assert decode_vring_base(0x7FFF_FFFF) == (0x7FFF, 1, 0x7FFF, 0)


def test_ring_outside_memory_is_reported(memory: GuestMemory) -> None:
    with pytest.raises(PackedRingOutOfMemory) as info:
        PackedQueue(memory, 4, 8, packed_addresses(REGION - 64, 8))
    assert info.value.queue == 4
    assert "(VIRTIO 1.4 §2.8.10.1)" in str(info.value)


def test_remap_follows_the_memory_and_fails_when_the_ring_is_gone(pair: PackedPair) -> None:
    pair.device.remap()
    still_serves(pair)
    pair.memory.clear()
    with pytest.raises(PackedRingOutOfMemory):
        pair.device.remap()


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (encode_vring_base(8, 1, 0, 1), "position 8, beyond the ring of 8"),
        (encode_vring_base(0, 1, 9, 1), "position 9"),
        # used is a whole lap plus one ahead of avail: more in flight than the ring holds
        (encode_vring_base(1, 0, 0, 1), "9 descriptors in flight"),
    ],
)
def test_impossible_ring_bases_are_refused(memory: GuestMemory, base: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PackedQueue(memory, 0, 8, packed_addresses(RING_GPA, 8), vring_base=base)


# -- the device side ---------------------------------------------------------------------


def test_empty_ring_pops_nothing(pair: PackedPair) -> None:
    """§2.8.15: a zeroed ring has no available descriptor (AVAIL must change from 0)."""
    assert pair.device.pop() is None
    assert pair.device.vring_base == INITIAL_VRING_BASE


def test_one_readable_and_two_writable_descriptors_make_one_chain(pair: PackedPair) -> None:
    out = pair.put(b"request")
    in1, in2 = pair.alloc(16), pair.alloc(4)
    buf = pair.driver.add([(out, 7)], [(in1, 16), (in2, 4)])
    chain = pop_chain(pair.device)
    assert (chain.head, chain.readable_len, chain.writable_len) == (buf, 7, 20)
    assert gather(chain.readable, 0, 7) == b"request"
    assert scatter(chain.writable, 0, b"x" * 20) == 20
    assert pair.device.in_flight == 1
    assert pair.device.last_avail_idx == 0x8000 | 3
    pair.device.push(chain.head, 20)
    assert pair.memory.read(in1, 16) == b"x" * 16
    assert pair.driver.get_used() == [(buf, 20)]


def test_used_descriptor_overwrites_the_first_of_the_list_and_skips_the_rest(
    pair: PackedPair,
) -> None:
    """§2.8.6: one used descriptor per list, at the used position; the used position
    then skips every descriptor of the list."""
    a = pair.driver.add([(pair.put(b"a"), 1)], [(pair.alloc(2), 2), (pair.alloc(2), 2)])
    b = pair.driver.add([], [(pair.alloc(4), 4)])
    ca, cb = pop_chain(pair.device), pop_chain(pair.device)
    pair.device.push(ca.head, 4)
    assert pair.used_desc(0) == (4, a, AVAIL | USED | WRITE)
    assert pair.device.used_idx == 0x8000 | 3
    pair.device.push(cb.head, 0)
    assert pair.used_desc(3) == (0, b, AVAIL | USED)  # nothing written: no WRITE flag (§2.8.3)
    assert pair.driver.get_used() == [(a, 4), (b, 0)]


def test_device_completes_out_of_order(pair: PackedPair) -> None:
    """§2.8: used descriptors go in the order processing completes."""
    bufs = [pair.driver.add([], [(pair.alloc(8), 8)] * n) for n in (1, 2, 3)]
    chains = [pop_chain(pair.device) for _ in bufs]
    for chain in reversed(chains):
        pair.device.push(chain.head, chain.writable_len)
    assert pair.driver.get_used() == [(bufs[2], 24), (bufs[1], 16), (bufs[0], 8)]
    assert pair.driver.free_count == 8


@pytest.mark.parametrize("size", [1, 3, 5, 8])
def test_wrap_counters_flip_at_the_end_of_the_ring_of_any_size(
    memory: GuestMemory, size: int
) -> None:
    """§2.8.1: each side flips its wrap counter after the last descriptor of the ring."""
    pair = make_packed_pair(memory, size)
    for i in range(4 * size + 1):
        gpa = pair.put(bytes([i]))
        buf = pair.driver.add([(gpa, 1)])
        chain = pop_chain(pair.device)
        assert gather(chain.readable, 0, 1) == bytes([i])
        pair.device.push(chain.head, 0)
        assert pair.driver.get_used() == [(buf, 0)]
        pair.next_data = DATA_GPA
    laps, pos = divmod(4 * size + 1, size)
    wrap = 1 ^ (laps & 1)
    assert pair.device.vring_base == encode_vring_base(pos, wrap, pos, wrap)


def test_a_list_may_wrap_around_the_end_of_the_ring(memory: GuestMemory) -> None:
    pair = make_packed_pair(memory, 5, start=(3, 0))
    bufs = [(pair.put(bytes([i]) * 4), 4) for i in range(4)]
    buf = pair.driver.add(bufs[:2], bufs[2:])
    assert (pair.driver.next_avail, pair.driver.avail_wrap) == (2, 1)
    chain = pop_chain(pair.device)
    assert gather(chain.readable, 0, 8) == b"\0" * 4 + b"\1" * 4
    assert chain.writable_len == 8
    pair.device.push(chain.head, 8)
    assert pair.used_desc(3) == (8, buf, WRITE)  # device wrap counter 0: AVAIL = USED = 0
    assert pair.device.vring_base == encode_vring_base(2, 1, 2, 1)
    assert pair.driver.get_used() == [(buf, 8)]


def test_indirect_table_is_one_ring_descriptor(pair: PackedPair) -> None:
    """§2.8.7: the table is read from memory; the ring holds one descriptor."""
    table = pair.alloc(48)
    out = pair.put(b"head")
    in1, in2 = pair.alloc(8), pair.alloc(1)
    buf = pair.driver.add_indirect(table, [(out, 4)], [(in1, 8), (in2, 1)])
    chain = pop_chain(pair.device)
    assert (chain.head, chain.readable_len, chain.writable_len) == (buf, 4, 9)
    assert pair.device.last_avail_idx == 0x8000 | 1
    pair.device.push(chain.head, 9)
    assert pair.driver.get_used() == [(buf, 9)]


def test_reserved_flags_in_indirect_entries_are_ignored(pair: PackedPair) -> None:
    """§2.8.7: only WRITE is valid in table entries; others are reserved and ignored by the
    device, as is WRITE on the descriptor that points to the table."""
    table = pair.alloc(32)
    out, into = pair.put(b"abc"), pair.alloc(2)
    pair.memory.write(
        table,
        PACKED_DESC.pack(out, 3, 77, NEXT | AVAIL | INDIRECT)
        + PACKED_DESC.pack(into, 2, 0, WRITE | NEXT | USED),
    )
    buf = pair.driver.add_raw([(table, 32, INDIRECT | WRITE)])
    chain = pop_chain(pair.device)
    assert (chain.head, chain.readable_len, chain.writable_len) == (buf, 3, 2)


def test_zero_length_elements_are_accepted(pair: PackedPair) -> None:
    buf = pair.driver.add([(pair.alloc(0), 0)], [(pair.alloc(0), 0)])
    chain = pop_chain(pair.device)
    assert (chain.head, chain.readable_len, chain.writable_len) == (buf, 0, 0)


def test_buffer_ids_need_not_be_below_the_queue_size(pair: PackedPair) -> None:
    """The spec does not bound Buffer IDs; the device returns whatever the driver chose."""
    buf = pair.driver.add_raw([(pair.alloc(4), 4, WRITE)], buf_id=0xBEEF)
    chain = pop_chain(pair.device)
    assert chain.head == 0xBEEF
    pair.device.push(chain.head, 1)
    assert pair.used_desc(0)[1] == buf == 0xBEEF


def test_pushing_a_buffer_that_is_not_outstanding_is_a_device_bug(pair: PackedPair) -> None:
    with pytest.raises(ValueError, match="buffer ID 3 is not outstanding"):
        pair.device.push(3, 0)
    pair.driver.add([(pair.alloc(1), 1)])
    chain = pop_chain(pair.device)
    pair.device.push(chain.head, 0)
    with pytest.raises(ValueError, match="not outstanding"):
        pair.device.push(chain.head, 0)


def test_chains_translate_buffers_spanning_two_regions() -> None:
    with packed_memory(((0, REGION), (REGION, REGION))) as memory:
        pair = make_packed_pair(memory, 4)
        gpa = REGION - 3
        memory.write(gpa, b"across")
        pair.driver.add([(gpa, 6)])
        chain = pop_chain(pair.device)
        assert len(chain.readable) == 2
        assert gather(chain.readable, 0, 6) == b"across"


# -- rules a driver can break --------------------------------------------------------------


def test_first_descriptor_available_before_the_rest_stops_the_queue(pair: PackedPair) -> None:
    """§2.8.17: the driver MUST NOT make the first descriptor available before the rest."""
    d = pair.driver
    d.write_desc(1, pair.alloc(4), 4, 0, USED)  # not available: previous-lap flags
    d.write_desc(0, pair.alloc(4), 4, 0, NEXT | AVAIL)
    exc = expect_violation(pair, IncompleteChain, "§2.8.17", descriptor=1)
    assert exc.head is None
    assert kept(pair.device.broken, exc)
    assert pair.device.pop() is None
    assert pair.device.enable_notifications() is False
    assert pair.device.last_avail_idx == 0x8000  # nothing was consumed


def test_list_longer_than_the_queue_stops_the_queue(memory: GuestMemory) -> None:
    """§2.8.17: the driver MUST NOT create a list longer than the queue size (no loops)."""
    pair = make_packed_pair(memory, 4, index=1)
    for pos in range(4):
        pair.driver.write_desc(pos, DATA_GPA, 4, 0, AVAIL | NEXT)
    exc = expect_violation(pair, PackedChainTooLong, "§2.8.17", descriptor=0)
    assert isinstance(exc, ChainTooLong)
    assert "longer than the queue size 4" in str(exc)
    assert exc.head is None and kept(pair.device.broken, exc)


def test_list_overwriting_descriptors_still_in_use_is_refused(pair: PackedPair) -> None:
    """§2.8.17: the driver MUST make sure there is room in the ring for the whole list."""
    held = pair.driver.add([(pair.alloc(4), 4)] * 3)
    pop_chain(pair.device)  # three descriptors in use by the device
    # The driver (wrongly) fills the rest of the ring and runs over descriptor 0.
    for pos in range(3, 8):
        pair.driver.write_desc(pos, DATA_GPA, 4, 0, AVAIL | NEXT)
    pair.driver.write_desc(0, DATA_GPA, 4, 0, USED | NEXT)
    exc = expect_violation(pair, PackedChainTooLong, "§2.8.17", descriptor=0)
    assert "more than the 5 descriptors the ring has free" in str(exc)
    assert "3 still in use" in str(exc)
    assert held is not None


def test_head_with_used_bit_equal_to_avail_bit_is_not_available(pair: PackedPair) -> None:
    """§2.8.1: available means AVAIL equal to the wrap counter and USED its inverse.

    A head with both bits set looks like a descriptor the device already used,
    and a head the driver is still rewriting may show any flags: the device must
    not take either, so it waits instead of reading a half-written list.
    """
    pair.driver.write_desc(0, pair.alloc(4), 4, 5, AVAIL | USED)
    assert pair.device.pop() is None
    assert pair.device.broken is None
    pair.driver.write_desc(0, pair.alloc(4), 4, 5, 0)  # mid-rewrite: flags not yet set
    assert pair.device.pop() is None
    pair.driver.write_desc(0, pair.alloc(4), 4, 0, 0)
    still_serves(pair)


def test_used_bit_wrong_in_a_later_descriptor_of_the_list(pair: PackedPair) -> None:
    pair.driver.write_desc(1, pair.alloc(4), 4, 6, AVAIL | USED)
    pair.driver.write_desc(0, pair.alloc(4), 4, 6, AVAIL | NEXT)
    exc = expect_violation(pair, BadAvailFlags, "§2.8.1", descriptor=1)
    assert exc.head == 6
    assert pair.device.last_avail_idx == 0x8000 | 2


def test_readable_after_writable(pair: PackedPair) -> None:
    """§2.8.17: device-writable elements MUST follow the device-readable ones."""
    buf = pair.driver.add_raw(
        [(pair.alloc(4), 4, WRITE), (pair.alloc(4), 4, 0), (pair.alloc(4), 4, WRITE)]
    )
    exc = expect_violation(pair, PackedReadableAfterWritable, "§2.8.17", descriptor=1)
    assert isinstance(exc, ReadableAfterWritable)
    assert pair.device.last_avail_idx == 0x8000 | 3  # the whole list was consumed
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_zero_length_writable_still_orders_the_list(pair: PackedPair) -> None:
    pair.driver.add_raw([(pair.alloc(0), 0, WRITE), (pair.alloc(4), 4, 0)])
    expect_violation(pair, PackedReadableAfterWritable, "§2.8.17", descriptor=1)


def test_readable_after_writable_inside_an_indirect_table(pair: PackedPair) -> None:
    table = pair.alloc(32)
    pair.memory.write(
        table,
        PACKED_DESC.pack(pair.alloc(4), 4, 0, WRITE) + PACKED_DESC.pack(pair.alloc(4), 4, 0, 0),
    )
    buf = pair.driver.add_raw([(table, 32, INDIRECT)])
    exc = expect_violation(pair, PackedReadableAfterWritable, "§2.8.17", descriptor=0)
    assert "indirect table entry 1" in str(exc)
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_indirect_without_the_feature(memory: GuestMemory) -> None:
    """§2.8.19: no VIRTQ_DESC_F_INDIRECT unless VIRTIO_F_INDIRECT_DESC was negotiated."""
    pair = make_packed_pair(memory, 8, indirect=False, index=5)
    table = pair.alloc(16)
    pair.memory.write(table, PACKED_DESC.pack(pair.alloc(4), 4, 0, WRITE))
    buf = pair.driver.add_raw([(table, 16, INDIRECT)])
    exc = expect_violation(pair, PackedIndirectNotNegotiated, "§2.8.19", descriptor=0)
    assert isinstance(exc, IndirectNotNegotiated)
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_indirect_descriptor_with_next(pair: PackedPair) -> None:
    """§2.8.19: no indirect descriptor in a list linked by VIRTQ_DESC_F_NEXT."""
    table = pair.alloc(16)
    pair.memory.write(table, PACKED_DESC.pack(pair.alloc(4), 4, 0, WRITE))
    buf = pair.driver.add_raw([(table, 16, INDIRECT), (pair.alloc(4), 4, WRITE)])
    exc = expect_violation(pair, IndirectInList, "§2.8.19", descriptor=0)
    assert isinstance(exc, IndirectWithNext)
    assert pair.device.last_avail_idx == 0x8000 | 2
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_indirect_descriptor_after_a_direct_one(pair: PackedPair) -> None:
    """Unlike split rings (§2.7.5.3.2), a packed list cannot end in an indirect descriptor."""
    table = pair.alloc(16)
    pair.memory.write(table, PACKED_DESC.pack(pair.alloc(4), 4, 0, WRITE))
    buf = pair.driver.add_raw([(pair.put(b"hdr"), 3, 0), (table, 16, INDIRECT)])
    exc = expect_violation(pair, IndirectInList, "§2.8.19", descriptor=1)
    returned_with_zero(pair, exc, buf)


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_table_length_not_a_multiple_of_16(pair: PackedPair, length: int) -> None:
    """§2.8.7: the table is len / sizeof(struct pvirtq_desc) descriptors."""
    buf = pair.driver.add_raw([(pair.alloc(64), length, INDIRECT)])
    exc = expect_violation(pair, PackedBadIndirectTableLength, "§2.8.7", descriptor=0)
    assert str(length) in str(exc)
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_indirect_table_longer_than_the_queue(pair: PackedPair) -> None:
    """§2.8.19 / §2.8.5: no list longer than the device allows, by default the queue size."""
    table = pair.alloc(16 * 9)
    buf = pair.driver.add_raw([(table, 16 * 9, INDIRECT)])
    exc = expect_violation(pair, PackedIndirectTooLong, "§2.8.19", descriptor=0)
    assert isinstance(exc, ChainTooLong)
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_buffer_outside_guest_memory(pair: PackedPair) -> None:
    """§2.8.4: an element address is a guest physical address."""
    buf = pair.driver.add([(pair.put(b"ok"), 2)], [(OUTSIDE, 4)])
    exc = expect_violation(pair, PackedBufferOutOfMemory, "§2.8.4", descriptor=1)
    assert isinstance(exc, BufferOutOfMemory)
    assert f"{OUTSIDE:#x}" in str(exc)
    returned_with_zero(pair, exc, buf)
    still_serves(pair)


def test_buffer_running_off_the_end_of_memory(pair: PackedPair) -> None:
    buf = pair.driver.add([(REGION - 4, 8)])
    exc = expect_violation(pair, PackedBufferOutOfMemory, "§2.8.4", descriptor=0)
    returned_with_zero(pair, exc, buf)


def test_indirect_table_outside_guest_memory(pair: PackedPair) -> None:
    buf = pair.driver.add_raw([(OUTSIDE, 32, INDIRECT)])
    exc = expect_violation(pair, PackedBufferOutOfMemory, "§2.8.4", descriptor=0)
    assert "indirect table" in str(exc)
    returned_with_zero(pair, exc, buf)


def test_indirect_entry_outside_guest_memory(pair: PackedPair) -> None:
    table = pair.alloc(32)
    pair.memory.write(
        table, PACKED_DESC.pack(pair.alloc(4), 4, 0, 0) + PACKED_DESC.pack(OUTSIDE, 4, 0, WRITE)
    )
    buf = pair.driver.add_raw([(table, 32, INDIRECT)])
    exc = expect_violation(pair, PackedBufferOutOfMemory, "§2.8.4", descriptor=0)
    assert "indirect table entry 1" in str(exc)
    returned_with_zero(pair, exc, buf)


def test_list_of_2_32_bytes_or_more_cannot_be_reported_in_a_used_descriptor() -> None:
    """§2.8.4/§2.8.13: the used length is 32 bits, so pyvirtio limits lists to 2^32 - 1 bytes."""
    mib = 1 << 20
    with packed_memory(((0, REGION), (0x100000, mib))) as memory:
        pair = make_packed_pair(memory, 4096, indirect=True, index=7)
        table = pair.alloc(16 * 4096)
        entry = PACKED_DESC.pack(0x100000, mib, 0, WRITE)
        memory.write(table, entry * 4096)  # 4096 x 1 MiB = 2^32 bytes
        buf = pair.driver.add_raw([(table, 16 * 4096, INDIRECT)])
        exc = expect_violation(pair, PackedChainLengthOverflow, "§2.8.4", descriptor=0)
        assert isinstance(exc, ChainLengthOverflow)
        returned_with_zero(pair, exc, buf)
        memory.write(table, entry * 4095 + PACKED_DESC.pack(0x100000, mib - 1, 0, WRITE))
        pair.driver.add_raw([(table, 16 * 4096, INDIRECT)])
        assert pop_chain(pair.device).writable_len == (1 << 32) - 1


def test_buffer_id_reused_while_outstanding_stops_the_queue(pair: PackedPair) -> None:
    """§2.8.21.1: each buffer takes a free ID; two outstanding buffers with one ID
    could not be told apart."""
    buf = pair.driver.add([(pair.alloc(4), 4)])
    pop_chain(pair.device)  # outstanding: the device has not used it
    pair.driver.add_raw([(pair.alloc(4), 4, 0)], buf_id=buf)
    exc = expect_violation(pair, BufferIdInUse, "§2.8.21.1", descriptor=1)
    assert exc.head is None and kept(pair.device.broken, exc)
    pair.device.push(buf, 0)  # the first one can still be returned


def test_first_error_of_a_list_is_reported_and_the_whole_list_consumed(pair: PackedPair) -> None:
    buf = pair.driver.add_raw(
        [(OUTSIDE, 4, 0), (pair.alloc(4), 4, WRITE), (pair.alloc(4), 4, 0)]
    )
    exc = expect_violation(pair, PackedBufferOutOfMemory, "§2.8.4", descriptor=0)
    assert pair.device.last_avail_idx == 0x8000 | 3
    returned_with_zero(pair, exc, buf)
    assert pair.driver.free_count == 8


def test_structure_error_after_a_content_error_still_stops_the_queue(pair: PackedPair) -> None:
    pair.driver.write_desc(1, DATA_GPA, 4, 0, USED)  # not available
    pair.driver.write_desc(0, OUTSIDE, 4, 0, AVAIL | NEXT)
    expect_violation(pair, IncompleteChain, "§2.8.17", descriptor=1)
    assert pair.device.broken is not None


# -- notification suppression (§2.8.10) ------------------------------------------------------


def test_device_disables_and_enables_available_buffer_notifications(pair: PackedPair) -> None:
    pair.device.disable_notifications()
    assert pair.device_event()[1] == RING_EVENT_FLAGS_DISABLE
    pair.driver.add([(pair.alloc(1), 1)])
    assert pair.driver.should_kick() is False
    assert pair.device.enable_notifications() is True  # arrived while disabled: drain again
    assert pair.device_event()[1] == RING_EVENT_FLAGS_ENABLE
    pop_chain(pair.device)
    assert pair.device.enable_notifications() is False
    pair.driver.add([(pair.alloc(1), 1)])
    assert pair.driver.should_kick() is True


def test_with_event_idx_the_device_asks_for_an_event_at_its_next_descriptor(
    memory: GuestMemory,
) -> None:
    """§2.8.10: RING_EVENT_FLAGS_DESC with the device's next position and wrap counter."""
    pair = make_packed_pair(memory, 4, event_idx=True, start=(3, 0))
    assert pair.device.enable_notifications() is False
    assert pair.device_event() == (3, RING_EVENT_FLAGS_DESC)  # wrap 0: bit 15 clear
    pair.driver.add([(pair.alloc(1), 1)] * 2)  # fills positions 3 and 0 (wrap 1)
    assert pair.driver.should_kick() is True
    pair.device.disable_notifications()
    assert pair.device_event()[1] == RING_EVENT_FLAGS_DISABLE
    pop_chain(pair.device)
    assert pair.device.enable_notifications() is False
    assert pair.device_event() == (0x8000 | 1, RING_EVENT_FLAGS_DESC)
    pair.driver.add([(pair.alloc(1), 1)])  # descriptor 1, wrap 1: the event
    assert pair.driver.should_kick() is True


def test_driver_kicks_only_when_passing_the_device_event(memory: GuestMemory) -> None:
    pair = make_packed_pair(memory, 4, event_idx=True)
    drv = pair.driver
    drv.should_kick()
    pair.memory.write(pair.addrs.device, EVENT_SUPPRESS.pack(0x8000 | 2, RING_EVENT_FLAGS_DESC))
    drv.add([(pair.alloc(1), 1)])  # position 0
    assert drv.should_kick() is False
    drv.add([(pair.alloc(1), 1)])  # position 1
    assert drv.should_kick() is False
    drv.add([(pair.alloc(1), 1)] * 2)  # positions 2 and 3: passes the event
    assert drv.should_kick() is True


def test_device_notifies_per_driver_event_flags(pair: PackedPair) -> None:
    def complete_one() -> None:
        pair.driver.add([], [(pair.alloc(1), 1)])
        pair.device.push(pop_chain(pair.device).head, 1)

    assert pair.device.needs_notification() is False  # nothing pushed
    complete_one()
    assert pair.device.needs_notification() is True  # zeroed structure: ENABLE
    assert pair.device.needs_notification() is False  # consumed
    pair.driver.disable_interrupts()
    complete_one()
    assert pair.device.needs_notification() is False
    pair.driver.enable_interrupts()
    complete_one()
    assert pair.device.needs_notification() is True


def test_device_notifies_when_a_used_descriptor_passes_the_driver_event(
    memory: GuestMemory,
) -> None:
    """§2.8.10: with RING_EVENT_FLAGS_DESC, an event only for that descriptor position,
    also when it lies inside a list the used position skipped over."""
    pair = make_packed_pair(memory, 4, event_idx=True)
    dev, drv = pair.device, pair.driver
    drv.enable_interrupts()  # event at used position 0, wrap 1
    drv.add([], [(pair.alloc(1), 1)])
    dev.push(pop_chain(dev).head, 1)
    assert dev.needs_notification() is True  # first decision: always notify
    drv.get_used()
    drv.enable_interrupts(after=2)  # event at position 3 (the device is at 1)
    drv.add([], [(pair.alloc(1), 1)])
    dev.push(pop_chain(dev).head, 1)  # used 1 -> 2
    assert dev.needs_notification() is False
    drv.add([], [(pair.alloc(1), 1)] * 2)
    dev.push(pop_chain(dev).head, 1)  # used 2 -> 0 (wrap 0): skips over position 3
    assert dev.needs_notification() is True
    drv.get_used()
    drv.enable_interrupts()  # event at position 0, wrap 0
    assert drv.used_wrap == 0
    drv.add([], [(pair.alloc(1), 1)])
    dev.push(pop_chain(dev).head, 1)
    assert dev.needs_notification() is True


BadEventCase = tuple[int, bool, type[VirtqueueError], str, str]


@pytest.mark.parametrize(
    "case",
    [
        (3, False, BadEventSuppression, "§2.8.10", "value 0x3 is reserved"),
        (3, True, BadEventSuppression, "§2.8.10", "value 0x3 is reserved"),
        (RING_EVENT_FLAGS_DESC, False, BadEventSuppression, "§2.8.10", "EVENT_IDX was not"),
        (0x10 | RING_EVENT_FLAGS_DISABLE, True, EventSuppressionReservedBits, "§2.8.14", "bits"),
    ],
)
def test_bad_driver_event_structure_notifies_and_is_reported_once(
    memory: GuestMemory, case: BadEventCase
) -> None:
    flags, event_idx, kind, section, text = case
    pair = make_packed_pair(memory, 8, event_idx=event_idx, index=3)
    pair.driver.set_driver_event(flags)
    pair.driver.add([], [(pair.alloc(1), 1)])
    pair.device.push(pop_chain(pair.device).head, 1)
    assert pair.device.needs_notification() is True  # never leave the driver waiting
    exc = expect_violation(pair, kind, section, descriptor=None)
    assert text in str(exc)
    assert exc.head is None and pair.device.broken is None
    pair.driver.add([], [(pair.alloc(1), 1)])
    pair.device.push(pop_chain(pair.device).head, 1)  # not reported a second time
    assert pair.device.needs_notification() is True
    assert pair.device.pop() is None
    still_serves(pair)


def test_driver_event_offset_beyond_the_ring(memory: GuestMemory) -> None:
    pair = make_packed_pair(memory, 8, event_idx=True)
    pair.driver.set_driver_event(RING_EVENT_FLAGS_DESC, 0x8000 | 9)
    pair.driver.add([], [(pair.alloc(1), 1)])
    pair.device.push(pop_chain(pair.device).head, 1)
    assert pair.device.needs_notification() is True
    exc = expect_violation(pair, BadEventSuppression, "§2.8.10", descriptor=None)
    assert "offset 9 is beyond the ring of 8" in str(exc)


# -- VIRTIO_F_IN_ORDER (§2.8.8) ---------------------------------------------------------------


def test_in_order_driver_hands_out_buffer_ids_in_order(memory: GuestMemory) -> None:
    pair = make_packed_pair(memory, 4, in_order=True)
    for expected in (0, 1, 2, 3, 0, 1):
        buf = pair.driver.add([], [(pair.alloc(4), 4)])
        assert buf == expected
        pair.device.push(pop_chain(pair.device).head, 2)
        assert pair.driver.get_used() == [(buf, 2)]


def test_in_order_driver_accepts_one_used_descriptor_for_a_batch(memory: GuestMemory) -> None:
    """§2.8.8: a device may write a single used descriptor with the last buffer's ID; it
    overwrites the batch's first descriptor, the skipped buffers count as fully written."""
    pair = make_packed_pair(memory, 8, in_order=True)
    a = pair.driver.add([(pair.put(b"x"), 1)], [(pair.alloc(8), 8)])
    b = pair.driver.add([], [(pair.alloc(4), 4), (pair.alloc(4), 4)])
    c = pair.driver.add([], [(pair.alloc(16), 16)])
    for _ in range(3):
        pop_chain(pair.device)
    # A batching device: one used descriptor at position 0 for all three (5 descriptors).
    pair.memory.write(pair.addrs.desc, PACKED_DESC.pack(0, 5, c, AVAIL | USED | WRITE))
    assert pair.driver.get_used() == [(a, 8), (b, 8), (c, 5)]
    assert (pair.driver.next_used, pair.driver.free_count) == (5, 8)
    d = pair.driver.add([], [(pair.alloc(4), 4)])
    assert pair.driver.next_avail == 6
    assert d == 3


def test_in_order_device_returns_buffers_in_the_order_they_were_popped(
    memory: GuestMemory,
) -> None:
    """§6.2: with IN_ORDER the device MUST use buffers in the order made available; pyvirtio's
    device needs no special mode for that, one used descriptor per buffer is always valid."""
    pair = make_packed_pair(memory, 6, in_order=True)
    for _ in range(5):
        bufs = [pair.driver.add([], [(pair.alloc(4), 4)] * n) for n in (1, 3, 2)]
        chains = [pop_chain(pair.device) for _ in bufs]
        for chain in chains:
            pair.device.push(chain.head, chain.writable_len)
        assert pair.driver.get_used() == [(bufs[0], 4), (bufs[1], 12), (bufs[2], 8)]


# -- several buffers for one request: mark, rewind, push_many ---------------------------------


def test_rewind_restores_position_wrap_counter_and_buffers_in_flight(memory: GuestMemory) -> None:
    """Popping writes nothing to the ring (§2.8.21.1): giving buffers back restores the
    device's next position, its Driver Ring Wrap Counter (§2.8.1) and its in-flight record,
    so the same buffers pop again, even across the end of the ring."""
    pair = make_packed_pair(memory, 5, start=(3, 1))
    bufs = [pair.driver.add([], [(pair.alloc(8), 8)]) for _ in range(4)]  # 3, 4, 0, 1
    pair.device.mark()
    assert [pop_chain(pair.device).head for _ in bufs] == bufs
    assert pair.device.last_avail_idx == 2  # wrapped: counter 0
    assert pair.device.ring_full() is False and pair.device.in_flight == 4
    pair.device.rewind()
    assert pair.device.last_avail_idx == 3 | 1 << 15
    assert pair.device.in_flight == 0
    assert [pop_chain(pair.device).head for _ in bufs] == bufs  # no BufferIdInUse
    with pytest.raises(ValueError, match="without a mark"):
        pair.device.rewind()
    pair.device.push_many([(buf, 8) for buf in bufs])
    assert pair.driver.get_used() == [(buf, 8) for buf in bufs]


def test_push_many_publishes_the_batch_with_the_first_descriptors_flags_last(
    memory: GuestMemory,
) -> None:
    """Until the first used descriptor's flags are written, the driver (which polls its
    next used position, §2.8.22) sees none of the batch; then all of it, across a wrap."""
    pair = make_packed_pair(memory, 4, start=(2, 1))
    bufs = [pair.driver.add([], [(pair.alloc(8), 8)]) for _ in range(3)]  # 2, 3, 0
    for _ in bufs:
        pop_chain(pair.device)
    calls: list[int] = []

    def before(word: int, value: int) -> None:
        if word % 8 == 7:  # a descriptor's flags
            calls.append(word // 8)
            if len(calls) < 3:
                assert not pair.driver.has_used()  # the first is still unpublished

    spy_on_stores(pair.device._ring().desc, before=before)
    pair.device.push_many([(bufs[0], 8), (bufs[1], 0), (bufs[2], 4)])
    assert calls == [3, 0, 2]
    assert pair.used_desc(3)[2] & (AVAIL | USED) == AVAIL | USED  # lap of wrap counter 1
    assert pair.used_desc(0)[2] & (AVAIL | USED) == 0  # next lap: wrap counter 0
    assert pair.used_desc(3)[2] & WRITE == 0  # nothing written: no VIRTQ_DESC_F_WRITE
    assert pair.driver.get_used() == [(bufs[0], 8), (bufs[1], 0), (bufs[2], 4)]
    assert pair.device.vring_base == encode_vring_base(1, 0, 1, 0)


def test_push_many_of_a_buffer_not_outstanding_writes_nothing(pair: PackedPair) -> None:
    buf = pair.driver.add([], [(pair.alloc(8), 8)])
    pop_chain(pair.device)
    with pytest.raises(ValueError, match="not outstanding"):
        pair.device.push_many([(buf, 8), (buf + 1, 8)])
    assert not pair.driver.has_used()
    assert pair.device.in_flight == 1
    pair.device.push_many([(buf, 8)])
    assert pair.driver.get_used() == [(buf, 8)]


def test_ring_full_when_every_descriptor_is_in_flight(memory: GuestMemory) -> None:
    pair = make_packed_pair(memory, 4)
    a = pair.driver.add([], [(pair.alloc(8), 8), (pair.alloc(8), 8)])  # two descriptors
    pair.driver.add([], [(pair.alloc(8), 8)])
    pop_chain(pair.device)
    pop_chain(pair.device)
    assert not pair.device.ring_full()
    pair.driver.add([], [(pair.alloc(8), 8)])
    pop_chain(pair.device)
    assert pair.device.ring_full()
    pair.device.push(a, 0)
    assert not pair.device.ring_full()


def test_enable_notifications_at_names_the_descriptor_beyond_those_available(
    memory: GuestMemory,
) -> None:
    """§2.8.10: after a rewind the device event is where the driver adds next, with that
    lap's wrap counter, not the rewound position the driver already passed."""
    pair = make_packed_pair(memory, 4, event_idx=True, start=(3, 1))
    pair.driver.add([], [(pair.alloc(8), 8)])
    pair.driver.add([], [(pair.alloc(8), 8)])  # positions 3, then 0 in the next lap
    pair.driver.should_kick()
    pair.device.mark()
    pop_chain(pair.device)
    pop_chain(pair.device)
    end = pair.device.last_avail_idx
    pair.device.rewind()
    assert pair.device.enable_notifications(at=end) is False
    assert pair.device_event() == (1, RING_EVENT_FLAGS_DESC)  # position 1, wrap counter 0
    pair.driver.add([], [(pair.alloc(8), 8)])
    assert pair.driver.should_kick() is True
    assert pair.device.enable_notifications(at=end) is True


def test_driver_side_refuses_a_used_buffer_id_that_is_not_outstanding(pair: PackedPair) -> None:
    """§2.8.6: a used descriptor names a buffer the driver made available."""
    buf = pair.driver.add([], [(pair.alloc(8), 8)])
    # The device writes a used descriptor at position 0 with an ID never made available.
    used = AVAIL | USED  # wrap counter 1
    pair.memory.write(pair.addrs.desc + 8, (8).to_bytes(4, "little")
                      + (buf + 1).to_bytes(2, "little") + used.to_bytes(2, "little"))
    with pytest.raises(DeviceRingError, match=f"buffer ID {buf + 1} at descriptor 0"):
        pair.driver.get_used()
