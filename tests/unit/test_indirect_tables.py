"""Long indirect tables as Linux writes them (split: entries linked 0, 1, 2... in
order; packed: flags 0 or WRITE): both rings read them whole and make one view per run
of buffers that follow each other in guest memory (:mod:`pyvirtio.virtqueue.table`).
Whatever the table, the chain must be the one the descriptors describe (VIRTIO 1.4
§2.7.5.3, §2.8.19): same bytes in the same order, readable then writable, and errors
named as the entry-by-entry walk names them.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import (
    BufferOutOfMemory,
    PackedReadableAfterWritable,
    ReadableAfterWritable,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import (
    DESC,
    PACKED_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.testing import REGION_SIZE, Guest, QueuePair, guest_memory, make_queue_pair
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.packed import PackedQueue, PackedRingAddresses

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
PAGE = 4096
#: Tables this long take the passes (shorter ones: the walk of test_split_queue.py).
LONG = 16
QUEUE = 64


@pytest.fixture
def pair(memory: GuestMemory) -> QueuePair:
    """A 64-entry queue with INDIRECT_DESC: room for tables longer than LONG."""
    return make_queue_pair(memory, QUEUE, indirect=True, data_end=REGION_SIZE)


def linear_table(buffers: list[tuple[int, int, bool]]) -> bytes:
    """An indirect table of (GPA, length, writable) buffers, linked in order."""
    last = len(buffers) - 1
    return b"".join(
        DESC.pack(addr, length, (WRITE if writable else 0) | (NEXT if i < last else 0),
                  i + 1 if i < last else 0)
        for i, (addr, length, writable) in enumerate(buffers))


def publish_table(pair: QueuePair, buffers: list[tuple[int, int, bool]]) -> int:
    table = pair.put(linear_table(buffers))
    pair.driver.write_desc(0, table, DESC.size * len(buffers), INDIRECT)
    pair.driver.publish(0)
    return table


def test_pages_that_follow_each_other_become_one_view(pair: QueuePair) -> None:
    """A FUSE READ's shape: two request headers, a reply header, then pages; the pages
    are contiguous in guest memory and come as one view, the headers as their own."""
    in_header, read_in = pair.put(b"H" * 40), pair.put(b"R" * 40)
    out_header = pair.alloc(16)
    pair.alloc(16)  # not next to the pages: its own view
    pages = pair.alloc(LONG * PAGE)
    publish_table(pair, [(in_header, 40, False), (read_in, 40, False), (out_header, 16, True)]
                  + [(pages + i * PAGE, PAGE, True) for i in range(LONG)])
    chain = pair.device.pop()
    assert chain is not None
    assert gather(chain.readable, 0, 80) == b"H" * 40 + b"R" * 40
    assert (chain.readable_len, chain.writable_len) == (80, 16 + LONG * PAGE)
    assert [len(v) for v in chain.writable] == [16, LONG * PAGE]
    data = bytes(range(256)) * (LONG * PAGE // 256)
    assert scatter(chain.writable, 16, data) == len(data)
    assert pair.memory.read(pages, LONG * PAGE) == data


def test_a_run_never_joins_readable_and_writable_buffers(pair: QueuePair) -> None:
    base = pair.alloc(LONG * PAGE)
    publish_table(pair, [(base + i * PAGE, PAGE, i >= 5) for i in range(LONG)])
    chain = pair.device.pop()
    assert chain is not None
    assert [len(v) for v in chain.readable] == [5 * PAGE]
    assert [len(v) for v in chain.writable] == [(LONG - 5) * PAGE]


def test_pages_in_reverse_order_keep_their_order(pair: QueuePair) -> None:
    """Pages given highest first (as a guest's writes often come): no run, each its own
    view, in table order."""
    base = pair.alloc(LONG * PAGE)
    for i in range(LONG):
        pair.memory.write(base + i * PAGE, bytes([i]) * PAGE)
    publish_table(pair, [(base + (LONG - 1 - i) * PAGE, PAGE, False) for i in range(LONG)])
    chain = pair.device.pop()
    assert chain is not None
    assert len(chain.readable) == LONG
    assert gather(chain.readable, 0, LONG * PAGE) == b"".join(
        bytes([LONG - 1 - i]) * PAGE for i in range(LONG))


def test_a_table_whose_buffers_span_two_regions_is_walked_whole(two_regions: Guest) -> None:
    pair = make_queue_pair(two_regions.memory, QUEUE, indirect=True)
    data = bytes(range(256)) * 2
    start = REGION_SIZE - 256  # half the buffers in each region
    two_regions.memory.write(start, data)
    publish_table(pair, [(start + 16 * i, 16, False) for i in range(32)])
    chain = pair.device.pop()
    assert chain is not None
    assert gather(chain.readable, 0, 512) == data
    assert chain.readable_len == 512


def test_a_linked_table_buffer_outside_memory_is_named(pair: QueuePair) -> None:
    buf = pair.put(b"ok" * LONG)
    publish_table(pair, [(buf + 2 * i, 2, False) for i in range(LONG)]
                  + [(REGION_SIZE - 8, 16, False)])
    with pytest.raises(BufferOutOfMemory) as info:
        pair.device.pop()
    assert info.value.descriptor == LONG
    assert info.value.head == 0


def test_a_linked_table_with_readable_after_writable_is_named(pair: QueuePair) -> None:
    buf = pair.alloc(8 * LONG)
    publish_table(pair, [(buf + 8 * i, 8, 0 < i < LONG - 1) for i in range(LONG)])
    with pytest.raises(ReadableAfterWritable) as info:
        pair.device.pop()
    assert info.value.descriptor == LONG - 1


SPAN = 0x8000  # the buffers' window: [DATA, DATA + SPAN)
DATA = 0x20000
TABLE = 0x8000  # the packed tests' table
TAIL = QUEUE * 512  # buffers that follow others may reach past the window


@st.composite
def tables(draw: st.DrawFn) -> list[tuple[int, int, bool]]:
    """Linked tables: buffers that often follow the previous one, zero-length ones,
    readable ones first, sometimes one readable after a writable one."""
    count = draw(st.integers(LONG, QUEUE))
    writable_from = draw(st.integers(0, count))
    out: list[tuple[int, int, bool]] = []
    for i in range(count):
        length = draw(st.sampled_from([0, 1, 7, 64, 512]))
        follows = draw(st.booleans())
        if out and follows:
            addr = out[-1][0] + out[-1][1]
        else:
            addr = DATA + draw(st.integers(0, SPAN - 512))
        out.append((addr, length, i >= writable_from))
    if count > 1 and draw(st.integers(0, 7)) == 0:
        out[-1] = (out[-1][0], out[-1][1], False)  # a readable buffer last: broken if any W
    return out


def _pop_packed(memory: GuestMemory, buffers: list[tuple[int, int, bool]]
                ) -> DescriptorChain | None:
    """Post ``buffers`` in one indirect table on a packed ring; pop it."""
    addrs = PackedRingAddresses(0x1000, 0x1000 + 16 * QUEUE, 0x1004 + 16 * QUEUE)
    driver = DriverPackedQueue(memory, QUEUE, addrs)
    device = PackedQueue(memory, 0, QUEUE, addrs, indirect=True)
    table = b"".join(PACKED_DESC.pack(a, n, 0, WRITE if w else 0) for a, n, w in buffers)
    memory.write(TABLE, table)
    driver.add_raw([(TABLE, len(table), INDIRECT)])
    return device.pop()


def test_a_packed_table_of_pages_that_follow_each_other_is_one_view() -> None:
    with guest_memory() as guest:
        chain = _pop_packed(guest.memory, [(DATA, 40, False)] + [
            (DATA + PAGE * (1 + i), PAGE, True) for i in range(LONG)])
        assert chain is not None
        assert [len(v) for v in chain.readable] == [40]
        assert [len(v) for v in chain.writable] == [LONG * PAGE]


@pytest.mark.parametrize("layout", ["split", "packed"])
@settings(max_examples=200, deadline=None)
@given(buffers=tables())
def test_a_linked_table_gives_exactly_its_buffers(
    layout: str, buffers: list[tuple[int, int, bool]]
) -> None:
    """The chain holds the table's bytes in order (readable), covers its writable
    buffers in order (a write through it lands there), or is refused as a table
    with a readable buffer after a writable one."""
    with guest_memory() as guest:
        pattern = bytes(i * 7 % 251 for i in range(SPAN + TAIL))
        guest.memory.write(DATA, pattern)
        flags = [w for _, _, w in buffers]
        if layout == "packed":
            if flags != sorted(flags):
                with pytest.raises(PackedReadableAfterWritable):
                    _pop_packed(guest.memory, buffers)
                return
            chain = _pop_packed(guest.memory, buffers)
        else:
            pair = make_queue_pair(guest.memory, QUEUE, indirect=True)
            publish_table(pair, buffers)
            if flags != sorted(flags):
                with pytest.raises(ReadableAfterWritable):
                    pair.device.pop()
                return
            chain = pair.device.pop()
        assert chain is not None
        readable = [(a, n) for a, n, w in buffers if not w]
        writable = [(a, n) for a, n, w in buffers if w]
        expected = b"".join(pattern[a - DATA : a - DATA + n] for a, n in readable)
        assert chain.readable_len == len(expected)
        assert b"".join(chain.readable) == expected
        assert chain.writable_len == sum(n for _, n in writable)
        assert len(chain.readable) + len(chain.writable) <= len(buffers)
        # Written through the views, buffer after buffer: what each buffer holds at the
        # end is the last write that reached it (buffers may overlap).
        total = chain.writable_len
        data = bytes((i * 13 + 5) % 256 for i in range(total))
        scatter(chain.writable, 0, data)
        shadow = bytearray(pattern)
        pos = 0
        for addr, n in writable:
            shadow[addr - DATA : addr - DATA + n] = data[pos : pos + n]
            pos += n
        assert guest.memory.read(DATA, SPAN + TAIL) == bytes(shadow)
