"""Notification suppression both ways (VIRTIO 1.4 §2.7.7, §2.7.10) and a property test of
the ring protocol over many index wraps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import U16, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from pyvirtio.testing import REGION_SIZE, QueuePair, guest_memory, make_queue_pair
from pyvirtio.virtqueue.chain import DescriptorChain, gather
from pyvirtio.virtqueue.split import SplitQueue


def used_flags(pair: QueuePair) -> int:
    flags: int = U16.unpack(pair.memory.read(pair.addrs.used, 2))[0]
    return flags


def avail_event(pair: QueuePair) -> int:
    value: int = U16.unpack(pair.memory.read(pair.addrs.used + 4 + 8 * pair.device.size, 2))[0]
    return value


def pop_all(queue: SplitQueue) -> list[DescriptorChain]:
    return list(iter(queue.pop, None))


def add_one(pair: QueuePair) -> int:
    return pair.driver.add(writable=[(pair.alloc(8), 8)])


# -- without VIRTIO_F_EVENT_IDX ---------------------------------------------------------------


def test_device_notifies_after_pushing_when_driver_does_not_suppress(memory: GuestMemory) -> None:
    pair = make_queue_pair(memory, 8)
    head = add_one(pair)
    assert pair.device.needs_notification() is False  # nothing pushed yet
    pair.device.pop()
    pair.device.push(head, 0)
    assert pair.device.needs_notification() is True
    assert pair.device.needs_notification() is False  # the answer is consumed


def test_avail_flag_no_interrupt_suppresses_used_buffer_notifications(memory: GuestMemory) -> None:
    """§2.7.7.2: without EVENT_IDX the device SHOULD NOT notify while NO_INTERRUPT is set."""
    pair = make_queue_pair(memory, 8)
    pair.driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    for _ in range(3):
        head = add_one(pair)
        pair.device.pop()
        pair.device.push(head, 8)
        assert pair.device.needs_notification() is False
    pair.driver.set_avail_flags(0)
    head = add_one(pair)
    pair.device.pop()
    pair.device.push(head, 8)
    assert pair.device.needs_notification() is True


def test_used_flag_no_notify_while_draining_suppresses_kicks(memory: GuestMemory) -> None:
    """§2.7.10: without EVENT_IDX the device sets VIRTQ_USED_F_NO_NOTIFY to stop kicks."""
    pair = make_queue_pair(memory, 8)
    add_one(pair)
    assert pair.driver.should_kick() is True
    pair.device.disable_notifications()
    assert used_flags(pair) == VIRTQ_USED_F_NO_NOTIFY
    add_one(pair)
    assert pair.driver.should_kick() is False
    assert len(pop_all(pair.device)) == 2
    # Re-enabling clears the flag and reports nothing new arrived.
    assert pair.device.enable_notifications() is False
    assert used_flags(pair) == 0
    add_one(pair)
    assert pair.driver.should_kick() is True


def test_enable_notifications_reports_chains_that_arrived_while_disabled(
    memory: GuestMemory,
) -> None:
    pair = make_queue_pair(memory, 8)
    pair.device.disable_notifications()
    add_one(pair)
    assert pair.device.enable_notifications() is True  # the caller must drain again
    assert len(pop_all(pair.device)) == 1
    assert pair.device.enable_notifications() is False


# -- with VIRTIO_F_EVENT_IDX ------------------------------------------------------------------


def test_used_event_asks_for_a_notification_only_when_the_used_index_passes_it(
    memory: GuestMemory,
) -> None:
    """§2.7.7.2: with EVENT_IDX, notify when used idx moves past used_event."""
    pair = make_queue_pair(memory, 8, event_idx=True)
    heads = [add_one(pair) for _ in range(5)]
    pop_all(pair.device)
    pair.driver.set_used_event(2)  # "tell me when entry 2 is used", i.e. idx becomes 3
    pair.device.push(heads[0], 0)  # used idx 1
    assert pair.device.needs_notification() is False
    pair.device.push(heads[1], 0)  # used idx 2
    assert pair.device.needs_notification() is False
    pair.device.push(heads[2], 0)  # used idx 3: passes used_event
    assert pair.device.needs_notification() is True
    pair.device.push(heads[3], 0)  # already told the driver about this event
    assert pair.device.needs_notification() is False


def test_used_event_passed_within_one_batch_notifies_once(memory: GuestMemory) -> None:
    pair = make_queue_pair(memory, 8, event_idx=True)
    heads = [add_one(pair) for _ in range(4)]
    pop_all(pair.device)
    pair.driver.set_used_event(1)
    for head in heads:
        pair.device.push(head, 0)
    assert pair.device.needs_notification() is True
    assert pair.device.needs_notification() is False


def test_event_idx_ignores_the_no_interrupt_flag(memory: GuestMemory) -> None:
    pair = make_queue_pair(memory, 8, event_idx=True)
    pair.driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    head = add_one(pair)
    pop_all(pair.device)
    pair.driver.set_used_event(0)
    pair.device.push(head, 0)
    assert pair.device.needs_notification() is True


@pytest.mark.parametrize(
    ("start", "used_event", "pushes", "expected"),
    [
        (0xFFFE, 0xFFFF, 1, False),  # used idx 0xFFFF: not past 0xFFFF yet
        (0xFFFE, 0xFFFF, 2, True),  # used idx wraps to 0: passed 0xFFFF
        (0xFFFF, 0x0000, 1, False),  # used idx 0
        (0xFFFF, 0x0000, 2, True),  # used idx 1 passes 0
        (0xFFF0, 0x0005, 8, False),  # far before the event, across no wrap
    ],
)
def test_used_event_comparison_wraps_at_65536(
    memory: GuestMemory, start: int, used_event: int, pushes: int, expected: bool
) -> None:
    pair = make_queue_pair(memory, 8, event_idx=True, start_idx=start)
    heads = [add_one(pair) for _ in range(pushes)]
    pop_all(pair.device)
    pair.driver.set_used_event(used_event)
    for head in heads:
        pair.device.push(head, 0)
    assert pair.device.used_idx == (start + pushes) & 0xFFFF
    assert pair.device.needs_notification() is expected


def test_avail_event_asks_for_a_kick_only_when_the_avail_index_passes_it(
    memory: GuestMemory,
) -> None:
    """§2.7.10: with EVENT_IDX the device writes avail_event; the driver kicks when passing it."""
    pair = make_queue_pair(memory, 8, event_idx=True)
    pair.device.disable_notifications()
    assert used_flags(pair) == 0  # EVENT_IDX does not use the flag
    assert pair.device.enable_notifications() is False
    assert avail_event(pair) == 0
    add_one(pair)  # avail idx 0 -> 1 passes avail_event 0
    assert pair.driver.should_kick() is True
    add_one(pair)  # the device has not caught up: no new kick
    assert pair.driver.should_kick() is False
    pop_all(pair.device)
    assert pair.device.enable_notifications() is False
    assert avail_event(pair) == 2
    add_one(pair)
    assert pair.driver.should_kick() is True


@pytest.mark.parametrize("start", [0xFFFF, 0xFFFE, 0xFFF9])
def test_avail_event_comparison_wraps_at_65536(memory: GuestMemory, start: int) -> None:
    pair = make_queue_pair(memory, 8, event_idx=True, start_idx=start)
    assert pair.device.enable_notifications() is False
    assert avail_event(pair) == start
    for i in range(3):
        add_one(pair)
        assert pair.driver.should_kick() is (i == 0), i
    chains = pop_all(pair.device)
    assert len(chains) == 3
    assert pair.device.last_avail_idx == (start + 3) & 0xFFFF
    assert pair.device.enable_notifications() is False
    add_one(pair)
    assert pair.driver.should_kick() is True


@settings(max_examples=60, deadline=None)
@given(
    old=st.integers(0, 0xFFFF),
    batch=st.integers(1, 40),
    used_event=st.integers(0, 0xFFFF),
)
def test_used_event_notifies_exactly_when_the_batch_covers_it(
    old: int, batch: int, used_event: int
) -> None:
    """vring_need_event (§2.7.7.2): after a batch moving the used index from ``old`` to
    ``new``, notify iff used_event is one of the entries the batch filled, i.e.
    used_event lies in [old, new) modulo 2^16."""
    with guest_memory() as guest:
        pair = make_queue_pair(guest.memory, 8, event_idx=True, start_idx=old)
        pair.driver.set_used_event(used_event)
        for _ in range(batch):
            pair.device.push(0, 0)
        assert pair.driver.used_idx() == (old + batch) & 0xFFFF
        covered = (used_event - old) & 0xFFFF < batch
        assert pair.device.needs_notification() is covered


# -- property test: the whole ring protocol ---------------------------------------------------


@dataclass
class Outstanding:
    serial: int
    readable: list[bytes]
    writable: list[int]


ADD, POP, PUSH, COLLECT = range(4)
ops = st.lists(
    st.tuples(
        st.sampled_from([ADD, ADD, POP, PUSH, COLLECT]),
        st.integers(0, 2),  # readable buffers
        st.integers(0, 2),  # writable buffers
        st.integers(0, 1000),  # a choice (which popped chain to complete, how much written)
    ),
    min_size=10,
    max_size=150,
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    start=st.sampled_from([0, 0xFFFF - 5, 0xFFFF, 0x8000 - 1]),
    indirect=st.booleans(),
    script=ops,
)
def test_every_chain_comes_back_exactly_once_with_its_buffers(
    size: int, start: int, indirect: bool, script: list[tuple[int, int, int, int]]
) -> None:
    """Random add/pop/push/get_used over a small queue, across ring and 16-bit index wraps.

    Every chain the driver adds is popped once, in order, with the exact bytes
    and lengths it was given; every chain the device pushes comes back to the
    driver once, with the length the device reported; descriptors are all free
    at the end.
    """
    with guest_memory(((0, REGION_SIZE),)) as guest:
        pair = make_queue_pair(guest.memory, size, start_idx=start, indirect=indirect)
        slot_size = 0x400
        slots = 64  # buffer slots, reused round-robin; far more than can be outstanding
        serial = 0
        added: dict[int, Outstanding] = {}  # head -> chain the driver made available
        order: list[int] = []  # heads in the order they were made available
        popped: list[tuple[DescriptorChain, Outstanding]] = []
        pushed: list[tuple[int, int]] = []
        returned: list[tuple[int, int]] = []
        outstanding_serials: set[int] = set()

        def make_chain(n_read: int, n_write: int) -> Outstanding:
            readable = [bytes([serial & 0xFF, i]) * (3 + i) for i in range(n_read)]
            writable = [8 * (i + 1) for i in range(n_write)]
            return Outstanding(serial, readable, writable)

        for op, n_read, n_write_drawn, choice in script:
            n_write = n_write_drawn if n_read + n_write_drawn else 1  # no empty chains
            if op == ADD:
                needed = 1 if indirect else n_read + n_write
                if pair.driver.free_count < needed or n_read + n_write > size:
                    continue  # §2.7.5.3.1: no chain longer than the queue, even indirect
                chain = make_chain(n_read, n_write)
                base = 0x10000 + (serial % slots) * slot_size
                assert serial not in outstanding_serials
                read_bufs, write_bufs, at = [], [], base
                for data in chain.readable:
                    guest.memory.write(at, data)
                    read_bufs.append((at, len(data)))
                    at += 0x40
                for length in chain.writable:
                    write_bufs.append((at, length))
                    at += 0x40
                if indirect:
                    head = pair.driver.add_indirect(at, read_bufs, write_bufs)
                else:
                    head = pair.driver.add(read_bufs, write_bufs)
                assert head not in added, "driver reused a descriptor still in flight"
                added[head] = chain
                order.append(head)
                outstanding_serials.add(serial)
                serial += 1
            elif op == POP:
                got = pair.device.pop()
                if not order:
                    assert got is None
                    continue
                assert got is not None
                head = order.pop(0)
                assert got.head == head
                expected = added[head]
                assert got.readable_len == sum(len(d) for d in expected.readable)
                assert gather(got.readable, 0, got.readable_len) == b"".join(expected.readable)
                assert got.writable_len == sum(expected.writable)
                popped.append((got, expected))
            elif op == PUSH:
                if not popped:
                    continue
                got, expected = popped.pop(choice % len(popped))
                written = choice % (got.writable_len + 1)
                pair.device.push(got.head, written)
                pushed.append((got.head, written))
            else:
                for head, length in pair.driver.get_used():
                    returned.append((head, length))
                    chain = added.pop(head)
                    outstanding_serials.discard(chain.serial)

        # Drain: pop and complete everything still in flight, then collect.
        for got in pop_all(pair.device):
            popped.append((got, added[got.head]))
            order.remove(got.head)
        assert not order
        for got, _expected in popped:
            pair.device.push(got.head, got.writable_len)
            pushed.append((got.head, got.writable_len))
        for head, length in pair.driver.get_used():
            returned.append((head, length))
            added.pop(head)

        assert returned == pushed  # same chains, same lengths, same order, once each
        assert added == {}
        assert pair.driver.free_count == size
        assert pair.device.used_idx == (start + len(pushed)) & 0xFFFF
        assert pair.device.last_avail_idx == (start + serial) & 0xFFFF
        assert pair.device.broken is None
