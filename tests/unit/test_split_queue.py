"""The device side of a split virtqueue (VIRTIO 1.4 §2.7): valid chains and every rule a
driver can break.

Each violation test checks the exact error type, the queue and descriptor it names, that
``str(exc)`` cites the spec section, and that the queue goes on serving the next chain
(except for an available-index jump, which breaks the queue for good).
"""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import (
    AvailIndexJump,
    BadIndirectTableLength,
    BufferOutOfMemory,
    ChainLengthOverflow,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorLoop,
    DeviceRingError,
    IndirectNotNegotiated,
    IndirectWithNext,
    NestedIndirect,
    ReadableAfterWritable,
    RingOutOfMemory,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory, create_memfd
from pyvirtio.spec.virtqueue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.testing import (
    REGION_SIZE,
    Guest,
    GuestFactory,
    QueuePair,
    guest_memory,
    make_queue_pair,
)
from pyvirtio.virtqueue.chain import gather
from pyvirtio.virtqueue.inflight import InflightRegion, region_size
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue, check_queue_size

NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT


def indirect_table(pair: QueuePair, entries: list[tuple[int, int, int, int]]) -> int:
    """Write raw indirect descriptors (addr, len, flags, next); return the table's GPA."""
    raw = b"".join(DESC.pack(*entry) for entry in entries)
    return pair.put(raw)


def serves_next_chain(pair: QueuePair) -> None:
    """The queue still works: a valid chain pops intact and comes back to the driver."""
    request = pair.put(b"next request")
    reply = pair.alloc(8)
    head = pair.driver.add(readable=[(request, 12)], writable=[(reply, 8)])
    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert gather(chain.readable, 0, 12) == b"next request"
    assert chain.writable_len == 8
    pair.device.push(chain.head, 3)
    assert (head, 3) in pair.driver.get_used()


def expect_violation(
    pair: QueuePair,
    error: type[VirtqueueError],
    *,
    descriptor: int | None,
    spec: str,
    head: int | None,
) -> VirtqueueError:
    """Pop, expect ``error`` with this context, give the chain back, check the queue serves on."""
    with pytest.raises(error) as info:
        pair.device.pop()
    exc = info.value
    assert type(exc) is error
    assert exc.queue == pair.device.index
    assert exc.descriptor == descriptor
    assert exc.head == head
    assert exc.spec == f"VIRTIO 1.4 {spec}"
    text = str(exc)
    assert f"VIRTIO 1.4 {spec}" in text
    assert f"queue {pair.device.index}" in text
    if descriptor is not None:
        assert f"descriptor {descriptor}" in text
    if exc.head is not None:
        pair.device.push(exc.head, 0)  # as the back-end does: the driver is not left waiting
    assert pair.device.broken is None
    serves_next_chain(pair)
    return exc


# -- valid chains -----------------------------------------------------------------------------


def test_direct_chain_pops_with_readable_then_writable_buffers(pair: QueuePair) -> None:
    a, b = pair.put(b"header.."), pair.put(b"payload")
    w1, w2 = pair.alloc(32), pair.alloc(1)
    head = pair.driver.add(readable=[(a, 8), (b, 7)], writable=[(w1, 32), (w2, 1)])
    assert pair.device.pending() == 1

    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"header..", b"payload"]
    assert [len(v) for v in chain.writable] == [32, 1]
    assert (chain.readable_len, chain.writable_len) == (15, 33)
    chain.writable[1][0] = 0x5A
    assert pair.memory.read(w2, 1) == b"\x5a"  # views are guest memory, not copies
    assert pair.device.pop() is None
    assert pair.device.pending() == 0


def test_used_element_reaches_the_driver_with_id_and_length(pair: QueuePair) -> None:
    heads = [pair.driver.add(writable=[(pair.alloc(64), 64)]) for _ in range(3)]
    chains = [pair.device.pop() for _ in heads]
    assert [c.head for c in chains if c is not None] == heads
    # The device may complete out of order (§2.7.8).
    pair.device.push(heads[2], 64)
    pair.device.push(heads[0], 10)
    pair.device.push(heads[1], 0)
    assert pair.driver.get_used() == [(heads[2], 64), (heads[0], 10), (heads[1], 0)]
    assert pair.driver.free_count == 16


def test_indirect_chain_pops_its_table_buffers(pair: QueuePair) -> None:
    r, w = pair.put(b"indirect!"), pair.alloc(20)
    head = pair.driver.add_indirect(pair.alloc(32), readable=[(r, 9)], writable=[(w, 20)])
    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"indirect!"]
    assert (chain.readable_len, chain.writable_len) == (9, 20)


def test_normal_descriptors_followed_by_an_indirect_one_are_one_chain(pair: QueuePair) -> None:
    """§2.7.5.3.2: the device MUST handle normal chained descriptors followed by an indirect one."""
    direct = pair.put(b"direct")
    ind_r, ind_w = pair.put(b"then indirect"), pair.alloc(4)
    table = indirect_table(pair, [(ind_r, 13, NEXT, 1), (ind_w, 4, WRITE, 0)])
    pair.driver.write_desc(0, direct, 6, NEXT, 1)
    pair.driver.write_desc(1, table, 32, INDIRECT)
    pair.driver.publish(0)
    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"direct", b"then indirect"]
    assert chain.writable_len == 4


def test_write_flag_on_an_indirect_descriptor_is_ignored(pair: QueuePair) -> None:
    """§2.7.5.3.2: the device MUST ignore VIRTQ_DESC_F_WRITE on the descriptor of a table."""
    r = pair.put(b"readable")
    table = indirect_table(pair, [(r, 8, 0, 0)])
    pair.driver.write_desc(0, table, 16, INDIRECT | WRITE)
    pair.driver.publish(0)
    chain = pair.device.pop()
    assert chain is not None
    assert [bytes(v) for v in chain.readable] == [b"readable"]
    assert chain.writable == []


def test_zero_length_descriptors_are_accepted_as_empty_buffers(pair: QueuePair) -> None:
    a = pair.put(b"abc")
    head = pair.driver.add(readable=[(a, 3), (a, 0)], writable=[(pair.alloc(0), 0)])
    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert (chain.readable_len, chain.writable_len) == (3, 0)
    assert gather(chain.readable, 0, 3) == b"abc"


def test_chain_buffer_crossing_a_region_boundary_is_split_into_two_views(
    two_regions: Guest,
) -> None:
    pair = make_queue_pair(two_regions.memory, 8)
    data = bytes(range(40))
    two_regions.memory.write(REGION_SIZE - 16, data)
    head = pair.driver.add(readable=[(REGION_SIZE - 16, 40)], writable=[(REGION_SIZE - 4, 8)])
    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert [len(v) for v in chain.readable] == [16, 24]
    assert gather(chain.readable, 0, 40) == data
    assert [len(v) for v in chain.writable] == [4, 4]
    assert chain.writable_len == 8


def test_chain_as_long_as_the_queue_is_not_a_loop(pair: QueuePair) -> None:
    buf = pair.put(b"x")
    for i in range(16):
        pair.driver.write_desc(i, buf, 1, NEXT if i < 15 else 0, i + 1)
    pair.driver.publish(0)
    chain = pair.device.pop()
    assert chain is not None
    assert chain.readable_len == 16


def test_indirect_table_as_long_as_the_queue_is_accepted(pair: QueuePair) -> None:
    buf = pair.put(b"y")
    table = indirect_table(pair, [(buf, 1, NEXT if i < 15 else 0, i + 1) for i in range(16)])
    pair.driver.write_desc(0, table, 16 * 16, INDIRECT)
    pair.driver.publish(0)
    chain = pair.device.pop()
    assert chain is not None
    assert chain.readable_len == 16


def test_chain_is_resolved_once_at_pop_time(pair: QueuePair) -> None:
    """No time-of-check/time-of-use gap: rewriting a descriptor after the pop changes nothing."""
    good, evil = pair.put(b"good"), pair.put(b"evil")
    pair.driver.write_desc(0, good, 4, 0)
    pair.driver.publish(0)
    chain = pair.device.pop()
    pair.driver.write_desc(0, evil, 4, WRITE)
    assert chain is not None
    assert [bytes(v) for v in chain.readable] == [b"good"]
    assert chain.writable == []


def test_pop_on_an_empty_queue_returns_none(pair: QueuePair) -> None:
    assert pair.device.pending() == 0
    assert pair.device.pop() is None
    assert pair.device.popped == 0


# -- violations -------------------------------------------------------------------------------


def test_descriptor_loop_is_reported_with_queue_and_descriptor(pair: QueuePair) -> None:
    buf = pair.put(b"loop")
    pair.driver.write_desc(0, buf, 4, NEXT, 1)
    pair.driver.write_desc(1, buf, 4, NEXT, 2)
    pair.driver.write_desc(2, buf, 4, NEXT, 2)  # points at itself
    pair.driver.publish(0)
    exc = expect_violation(pair, DescriptorLoop, descriptor=2, spec="§2.7.5.2", head=0)
    assert "loops" in str(exc)


def test_descriptor_loop_inside_an_indirect_table_is_reported(pair: QueuePair) -> None:
    buf = pair.put(b"loop")
    table = indirect_table(pair, [(buf, 4, NEXT, 1), (buf, 4, NEXT, 2), (buf, 4, NEXT, 1)])
    pair.driver.write_desc(4, table, 48, INDIRECT)
    pair.driver.publish(4)
    # Four hops fit the 3-entry table; the fourth lands on entry 1 again.
    exc = expect_violation(pair, DescriptorLoop, descriptor=1, spec="§2.7.5.2", head=4)
    assert "indirect table of descriptor 4" in str(exc)


def test_next_index_beyond_the_table_is_reported(pair: QueuePair) -> None:
    buf = pair.put(b"next")
    pair.driver.write_desc(0, buf, 4, NEXT, 1)
    pair.driver.write_desc(1, buf, 4, NEXT, 16)  # queue size is 16
    pair.driver.publish(0)
    exc = expect_violation(pair, DescriptorIndexOutOfRange, descriptor=1, spec="§2.7.5", head=0)
    assert "next=16" in str(exc)


def test_next_index_beyond_an_indirect_table_is_reported(pair: QueuePair) -> None:
    buf = pair.put(b"next")
    table = indirect_table(pair, [(buf, 4, NEXT, 1), (buf, 4, NEXT, 2)])  # 2 entries, next=2
    pair.driver.write_desc(3, table, 32, INDIRECT)
    pair.driver.publish(3)
    exc = expect_violation(pair, DescriptorIndexOutOfRange, descriptor=1, spec="§2.7.5", head=3)
    assert "indirect table of 2" in str(exc)


@pytest.mark.parametrize("bad_head", [16, 0xFFFF])
def test_head_index_beyond_the_table_in_the_available_ring_is_reported(
    pair: QueuePair, bad_head: int
) -> None:
    pair.driver.publish(bad_head)
    # No valid head to give back: head stays None.
    exc = expect_violation(
        pair, DescriptorIndexOutOfRange, descriptor=bad_head, spec="§2.7.5", head=None
    )
    assert f"names descriptor {bad_head}" in str(exc)


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (REGION_SIZE, 16),  # just past guest memory
        (REGION_SIZE - 8, 16),  # straddles the end
        (1 << 63, 1),
    ],
)
def test_buffer_outside_guest_memory_is_reported(pair: QueuePair, addr: int, length: int) -> None:
    pair.driver.write_desc(0, pair.put(b"ok"), 2, NEXT, 1)
    pair.driver.write_desc(1, addr, length, WRITE)
    pair.driver.publish(0)
    exc = expect_violation(pair, BufferOutOfMemory, descriptor=1, spec="§2.7.5", head=0)
    assert f"{addr:#x}" in str(exc)


def test_chain_longer_than_2_to_the_32_bytes_is_reported(make_guest: GuestFactory) -> None:
    # The length check follows the memory check, so the buffers must really be guest
    # memory: a sparse 2 GiB memfd, two descriptors of 2^31 + 1 bytes over it.
    big = 0x8010_0000
    memory = make_guest(((0, big),)).memory
    pair = make_queue_pair(memory, 16, index=1, data_end=big)
    buf = 0x8_0000
    pair.driver.write_desc(0, buf, 0x8000_0001, NEXT, 1)
    pair.driver.write_desc(1, buf, 0x8000_0001, WRITE)
    pair.driver.publish(0)
    exc = expect_violation(pair, ChainLengthOverflow, descriptor=1, spec="§2.7.5.2", head=0)
    assert "2^32" in str(exc)


def test_chain_of_exactly_2_to_the_32_bytes_is_allowed(make_guest: GuestFactory) -> None:
    big = 0x8010_0000
    memory = make_guest(((0, big),)).memory
    pair = make_queue_pair(memory, 16, data_end=big)
    pair.driver.write_desc(0, 0x10_0000, 0x8000_0000, NEXT, 1)
    pair.driver.write_desc(1, 0x10_0000, 0x8000_0000, WRITE)
    pair.driver.publish(0)
    chain = pair.device.pop()
    assert chain is not None
    assert chain.readable_len + chain.writable_len == 1 << 32


def test_readable_descriptor_after_a_writable_one_is_reported(pair: QueuePair) -> None:
    pair.driver.write_desc(0, pair.put(b"hdr"), 3, NEXT, 1)
    pair.driver.write_desc(1, pair.alloc(8), 8, WRITE | NEXT, 2)
    pair.driver.write_desc(2, pair.put(b"late"), 4, 0)
    pair.driver.publish(0)
    expect_violation(pair, ReadableAfterWritable, descriptor=2, spec="§2.7.4.2", head=0)


def test_readable_after_a_zero_length_writable_descriptor_is_reported(pair: QueuePair) -> None:
    # A zero-length device-writable descriptor still orders the chain (§2.7.4.2),
    # wherever its (unused) address points.
    pair.driver.write_desc(0, 1 << 40, 0, WRITE | NEXT, 1)
    pair.driver.write_desc(1, pair.put(b"late"), 4, 0)
    pair.driver.publish(0)
    expect_violation(pair, ReadableAfterWritable, descriptor=1, spec="§2.7.4.2", head=0)


def test_readable_after_writable_inside_an_indirect_table_is_reported(pair: QueuePair) -> None:
    table = indirect_table(
        pair, [(pair.alloc(4), 4, WRITE | NEXT, 1), (pair.put(b"late"), 4, 0, 0)]
    )
    pair.driver.write_desc(2, table, 32, INDIRECT)
    pair.driver.publish(2)
    expect_violation(pair, ReadableAfterWritable, descriptor=1, spec="§2.7.4.2", head=2)


def test_indirect_table_readable_after_direct_writable_is_reported(pair: QueuePair) -> None:
    table = indirect_table(pair, [(pair.put(b"late"), 4, 0, 0)])
    pair.driver.write_desc(0, pair.alloc(4), 4, WRITE | NEXT, 1)
    pair.driver.write_desc(1, table, 16, INDIRECT)
    pair.driver.publish(0)
    expect_violation(pair, ReadableAfterWritable, descriptor=0, spec="§2.7.4.2", head=0)


def test_indirect_descriptor_without_the_feature_is_reported(memory: GuestMemory) -> None:
    pair = make_queue_pair(memory, 16, indirect=False, index=2, data_end=REGION_SIZE)
    table = indirect_table(pair, [(pair.put(b"data"), 4, 0, 0)])
    pair.driver.write_desc(0, table, 16, INDIRECT)
    pair.driver.publish(0)
    exc = expect_violation(pair, IndirectNotNegotiated, descriptor=0, spec="§2.7.5.3.1", head=0)
    assert "VIRTIO_F_INDIRECT_DESC" in str(exc)


def test_indirect_descriptor_inside_an_indirect_table_is_reported(pair: QueuePair) -> None:
    inner = indirect_table(pair, [(pair.put(b"data"), 4, 0, 0)])
    outer = indirect_table(pair, [(pair.put(b"data"), 4, NEXT, 1), (inner, 16, INDIRECT, 0)])
    pair.driver.write_desc(5, outer, 32, INDIRECT)
    pair.driver.publish(5)
    exc = expect_violation(pair, NestedIndirect, descriptor=1, spec="§2.7.5.3.1", head=5)
    assert "of descriptor 5" in str(exc)


def test_indirect_descriptor_with_next_is_reported(pair: QueuePair) -> None:
    table = indirect_table(pair, [(pair.put(b"data"), 4, 0, 0)])
    pair.driver.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    pair.driver.write_desc(1, pair.alloc(1), 1, WRITE)
    pair.driver.publish(0)
    expect_violation(pair, IndirectWithNext, descriptor=0, spec="§2.7.5.3.1", head=0)


@pytest.mark.parametrize("length", [0, 8, 24, 17 * 16 + 1])
def test_indirect_table_length_not_a_nonzero_multiple_of_16_is_reported(
    pair: QueuePair, length: int
) -> None:
    table = pair.alloc(1024)
    pair.driver.write_desc(0, pair.put(b"hdr"), 3, NEXT, 1)
    pair.driver.write_desc(1, table, length, INDIRECT)
    pair.driver.publish(0)
    exc = expect_violation(pair, BadIndirectTableLength, descriptor=1, spec="§2.7.5.3", head=0)
    assert f"length {length}" in str(exc)


def test_indirect_table_longer_than_the_queue_is_reported(pair: QueuePair) -> None:
    buf = pair.put(b"z")
    table = indirect_table(pair, [(buf, 1, NEXT if i < 16 else 0, i + 1) for i in range(17)])
    pair.driver.write_desc(0, table, 17 * 16, INDIRECT)
    pair.driver.publish(0)
    exc = expect_violation(pair, ChainTooLong, descriptor=0, spec="§2.7.5.3.1", head=0)
    assert "17 descriptors" in str(exc)


@pytest.mark.parametrize("table_gpa", [REGION_SIZE, REGION_SIZE - 16])
def test_indirect_table_outside_guest_memory_is_reported(pair: QueuePair, table_gpa: int) -> None:
    pair.driver.write_desc(0, table_gpa, 32, INDIRECT)
    pair.driver.publish(0)
    exc = expect_violation(pair, BufferOutOfMemory, descriptor=0, spec="§2.7.5", head=0)
    assert "indirect table" in str(exc)


def test_avail_index_jumping_more_than_the_queue_size_breaks_the_queue(pair: QueuePair) -> None:
    pair.driver.set_avail_idx(17)  # 17 new entries in a 16-entry ring
    with pytest.raises(AvailIndexJump) as info:
        pair.device.pop()
    exc = info.value
    assert exc.queue == 3
    assert exc.descriptor is None
    assert exc.head is None
    assert exc.spec == "VIRTIO 1.4 §2.7.6"
    assert "VIRTIO 1.4 §2.7.6" in str(exc)
    assert "queue 3" in str(exc)
    # The queue keeps a copy without the traceback, whose frames hold the queue: a
    # cycle that kept guest memory mapped after a disconnect until the cyclic GC ran.
    broken = pair.device.broken
    assert isinstance(broken, AvailIndexJump) and broken is not exc
    assert (str(broken), broken.queue, broken.__traceback__) == (str(exc), 3, None)
    # A broken queue serves nothing more, even valid chains.
    pair.driver.set_avail_idx(0)
    pair.driver.add(writable=[(pair.alloc(4), 4)])
    assert pair.device.pending() == 0
    assert pair.device.pop() is None
    assert pair.device.enable_notifications() is False


def test_avail_index_moving_backwards_counts_as_a_jump(pair: QueuePair) -> None:
    """§2.7.6.1: the driver MUST NOT decrement idx; seen modulo 2^16 it leaps ahead."""
    pair.driver.add(writable=[(pair.alloc(4), 4)])
    assert pair.device.pop() is not None
    pair.driver.set_avail_idx(0)
    with pytest.raises(AvailIndexJump):
        pair.device.pending()
    assert pair.device.broken is not None


def test_avail_index_exactly_a_queue_ahead_is_allowed(pair: QueuePair) -> None:
    heads = [pair.driver.add(readable=[(pair.put(b"f"), 1)]) for _ in range(16)]
    assert pair.driver.free_count == 0
    assert pair.device.pending() == 16
    assert [c.head for c in iter(pair.device.pop, None)] == heads


# -- ring placement ---------------------------------------------------------------------------


def test_ring_outside_guest_memory_is_refused_with_its_queue(memory: GuestMemory) -> None:
    addrs = RingAddresses(REGION_SIZE - 64, 0x2000, 0x3000)  # descriptor table runs off the end
    with pytest.raises(RingOutOfMemory) as info:
        SplitQueue(memory, 7, 16, addrs)
    assert info.value.queue == 7
    assert "VIRTIO 1.4 §2.7" in str(info.value)


def test_ring_removed_from_memory_is_refused_on_next_access(guest: Guest) -> None:
    pair = make_queue_pair(guest.memory, 8, index=4)
    guest.memory.clear()
    with pytest.raises(RingOutOfMemory) as info:
        pair.device.pop()
    assert info.value.queue == 4


@pytest.mark.parametrize("size", [0, 3, 100, 65536, -1])
def test_queue_size_must_be_a_power_of_two_up_to_32768(memory: GuestMemory, size: int) -> None:
    with pytest.raises(ValueError, match="power of 2"):
        check_queue_size(size)
    with pytest.raises(ValueError, match="power of 2"):
        SplitQueue(memory, 0, size, RingAddresses(0x1000, 0x2000, 0x3000))


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_every_power_of_two_queue_size_up_to_32768_works(
    make_guest: GuestFactory, size: int
) -> None:
    check_queue_size(size)
    memory = make_guest(((0, 0x200000),)).memory
    pair = make_queue_pair(memory, size, data_gpa=0x100000)
    heads = [pair.driver.add(readable=[(pair.put(b"q"), 1)]) for _ in range(min(size, 4))]
    assert [c.head for c in iter(pair.device.pop, None)] == heads


# -- fuzz: arbitrary rings yield chains or our own errors -------------------------------------

FUZZ_SIZE = 8
#: Addresses a fuzzed descriptor may point at: inside memory, at its edge, outside.
fuzz_addrs = st.sampled_from([0x10000, 0x10008, REGION_SIZE - 16, REGION_SIZE, 1 << 40])
fuzz_desc = st.tuples(
    fuzz_addrs,
    st.sampled_from([0, 1, 16, 32, 48, 100, 0x8000_0000]),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT in every combination
    st.integers(0, FUZZ_SIZE + 1),
)


@settings(max_examples=150, deadline=None)
@given(
    table=st.lists(fuzz_desc, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    indirect_table=st.lists(fuzz_desc, min_size=1, max_size=4),
    heads=st.lists(st.integers(0, FUZZ_SIZE + 1), min_size=1, max_size=FUZZ_SIZE),
    extra_idx=st.sampled_from([0, 0, 0, 1, FUZZ_SIZE, 0x8000]),
    indirect=st.booleans(),
)
def test_arbitrary_rings_yield_valid_chains_or_virtqueue_errors(
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    heads: list[int],
    extra_idx: int,
    indirect: bool,
) -> None:
    """rust-vmm style fuzz: whatever the driver writes, pop() returns a chain whose views
    lie in guest memory or raises a VirtqueueError; it never loops and never raises
    anything else."""
    with guest_memory() as guest:
        pair = make_queue_pair(guest.memory, FUZZ_SIZE, indirect=indirect)
        raw_indirect = b"".join(DESC.pack(*d) for d in indirect_table)
        guest.memory.write(0x10000, raw_indirect)  # indirect descriptors point here
        for i, desc in enumerate(table):
            pair.driver.write_desc(i, *desc)
        for head in heads:
            pair.driver.publish(head)
        pair.driver.set_avail_idx(pair.driver.avail_idx + extra_idx)
        outcomes = 0
        for _ in range(len(heads) + 2):
            try:
                chain = pair.device.pop()
            except VirtqueueError as exc:
                outcomes += 1
                assert exc.queue == pair.device.index
                assert exc.spec in str(exc)
                if exc.head is not None:
                    assert 0 <= exc.head < FUZZ_SIZE
                    pair.device.push(exc.head, 0)
                continue
            if chain is None:
                break
            outcomes += 1
            assert 0 <= chain.head < FUZZ_SIZE
            assert chain.readable_len == sum(len(v) for v in chain.readable)
            assert chain.writable_len == sum(len(v) for v in chain.writable)
            assert chain.readable_len + chain.writable_len <= 1 << 32
            for view in [*chain.readable, *chain.writable]:
                bytes(view[:1])  # every view is readable guest memory
        if len(heads) + extra_idx > FUZZ_SIZE:
            assert isinstance(pair.device.broken, AvailIndexJump)
            assert outcomes == 1
        else:
            assert pair.device.broken is None
            assert outcomes == len(heads) + extra_idx  # one chain or one error per entry
        assert pair.device.pop() is None


# -- several chains for one request: mark, rewind, push_many --------------------------------------


def test_rewind_gives_back_every_chain_popped_since_the_mark(pair: QueuePair) -> None:
    """The device reads the available ring only (§2.7.6): giving chains back is moving its
    own position back; the same chains pop again, in order."""
    heads = [pair.driver.add(writable=[(pair.alloc(64), 64)]) for _ in range(3)]
    first = pair.device.pop()
    assert first is not None and first.head == heads[0]
    pair.device.mark()
    assert [c.head for c in (pair.device.pop(), pair.device.pop()) if c] == heads[1:]
    assert pair.device.pop() is None
    pair.device.rewind()
    assert pair.device.last_avail_idx == 1
    assert [c.head for c in (pair.device.pop(), pair.device.pop()) if c] == heads[1:]
    with pytest.raises(ValueError, match="without a mark"):
        pair.device.rewind()  # a mark serves one rewind


def test_push_many_writes_every_used_element_then_the_used_index_once(pair: QueuePair) -> None:
    """§2.7.8.2: elements before the index; one index update makes the batch visible."""
    heads = [pair.driver.add(writable=[(pair.alloc(64), 64)]) for _ in range(3)]
    chains = [pair.device.pop() for _ in heads]
    pair.device.mark()
    pair.device.push_many([(c.head, 10 + i) for i, c in enumerate(chains) if c])
    assert pair.driver.used_idx() == 3
    assert pair.driver.get_used() == [(heads[0], 10), (heads[1], 11), (heads[2], 12)]
    with pytest.raises(ValueError):
        pair.device.rewind()  # using chains ends the mark
    pair.device.push_many([])
    assert pair.driver.used_idx() == 3


def test_ring_full_when_the_device_holds_a_chain_per_ring_entry(pair: QueuePair) -> None:
    for _ in range(pair.device.size):
        pair.driver.add(writable=[(pair.alloc(16), 16)])
    chains = []
    for _ in range(pair.device.size):
        assert not pair.device.ring_full()
        chain = pair.device.pop()
        assert chain is not None
        chains.append(chain)
    assert pair.device.ring_full()
    pair.device.push(chains[0].head, 0)
    assert not pair.device.ring_full()


def test_enable_notifications_at_asks_for_a_kick_beyond_what_was_published(
    make_guest: GuestFactory,
) -> None:
    """§2.7.10: with EVENT_IDX, avail_event names the index whose publication triggers a
    kick: after a rewind, the one after everything the driver already published."""
    pair = make_queue_pair(make_guest().memory, 8, event_idx=True)
    for _ in range(2):
        pair.driver.add(writable=[(pair.alloc(16), 16)])
    assert pair.driver.should_kick()
    pair.device.mark()
    while pair.device.pop() is not None:
        pass
    end = pair.device.last_avail_idx
    pair.device.rewind()
    assert not pair.device.enable_notifications(at=end)  # nothing beyond yet
    pair.driver.add(writable=[(pair.alloc(16), 16)])
    assert pair.driver.should_kick()
    assert pair.device.enable_notifications(at=end)
    # Without ``at``, the rewound position: the driver passed it and would not kick.
    pair.device.enable_notifications()
    pair.driver.add(writable=[(pair.alloc(16), 16)])
    assert not pair.driver.should_kick()


def test_rewind_forgets_inflight_records_of_the_chains_it_gives_back(pair: QueuePair) -> None:
    """vhost-user inflight tracking: chains given back are not in flight, so a crash then
    does not resubmit them (they are still available)."""
    fd = create_memfd(region_size(pair.device.size))
    try:
        buffer = mmap.mmap(fd, region_size(pair.device.size))
        region = InflightRegion(memoryview(buffer), pair.device.size)
        pair.device.attach_inflight(region)
        heads = [pair.driver.add(writable=[(pair.alloc(16), 16)]) for _ in range(3)]
        assert pair.device.pop() is not None
        pair.device.mark()
        assert pair.device.pop() is not None and pair.device.pop() is not None
        pair.device.rewind()
        assert region.recover(pair.device.used_idx) == [heads[0]]
        chains = [pair.device.pop(), pair.device.pop()]
        assert [c.head for c in chains if c] == heads[1:]
        assert region.recover(pair.device.used_idx) == heads
        region.release()
        buffer.close()
    finally:
        os.close(fd)


def test_driver_side_refuses_a_used_index_more_than_a_queue_ahead(pair: QueuePair) -> None:
    """§2.7.8: the device cannot use more buffers than were made available; the driver
    side raises DeviceRingError and collects nothing."""
    head = pair.driver.add(writable=[(pair.alloc(16), 16)])
    pair.memory.write(pair.addrs.used + 2, (pair.driver.size + 1).to_bytes(2, "little"))
    with pytest.raises(DeviceRingError, match="more than the queue size"):
        pair.driver.get_used()
    assert pair.driver.last_used_idx == 0
    pair.memory.write(pair.addrs.used + 2, (0).to_bytes(2, "little"))
    chain = pair.device.pop()
    assert chain is not None and chain.head == head
    pair.device.push(head, 16)
    assert pair.driver.get_used() == [(head, 16)]
