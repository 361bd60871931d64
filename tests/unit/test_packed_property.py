"""Property tests of packed virtqueues (VIRTIO 1.4 §2.8) against a reference model.

Hypothesis drives a :class:`DriverPackedQueue` and a :class:`PackedQueue` that
share a ring in real memfd-backed guest memory through long random sequences of
adds, pops, pushes, used-buffer collection, notification settings and decisions,
and ring-state restarts (``GET_VRING_BASE`` then ``SET_VRING_BASE``), across many
wraps of small rings, power of 2 or not.  After every step the two sides must
agree with a deliberately naive model: FIFOs of buffers and *sets* of
(position, wrap counter) pairs, where the queues use modular arithmetic.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)
from pyvirtio.virtqueue import gather, scatter
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.packed import PackedQueue, PackedRingAddresses, encode_vring_base

REGION = 0x40000
RING_GPA = 0x1000
DATA_GPA = 0x10000
DATA_END = REGION
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 13])
Position = tuple[int, int]  # (offset in the ring, wrap counter)


@contextlib.contextmanager
def guest_ram() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    fd = create_memfd(REGION, "packed-property")
    try:
        memory.set_table([(RegionSpec(0, REGION, 0x7F00_0000_0000, 0), fd)])
        yield memory
    finally:
        memory.clear()
        os.close(fd)


def advance(pos: Position, count: int, size: int) -> tuple[Position, list[Position]]:
    """Step ``count`` descriptors from ``pos``; return the end and every position passed."""
    passed = []
    p, w = pos
    for _ in range(count):
        passed.append((p, w))
        p += 1
        if p == size:
            p, w = 0, w ^ 1
    return (p, w), passed


@dataclass
class Buffer:
    buf_id: int
    descs: int
    readable: bytes
    writable: list[tuple[int, int]]  # (gpa, length)

    @property
    def writable_len(self) -> int:
        return sum(n for _a, n in self.writable)


@dataclass
class Model:
    """What a correct driver/device pair must show, in the plainest terms."""

    size: int
    event_idx: bool
    avail: Position
    used: Position
    waiting: deque[Buffer] = field(default_factory=deque)  # available, not popped
    held: list[Buffer] = field(default_factory=list)  # popped, not pushed
    done: list[tuple[Buffer, int]] = field(default_factory=list)  # pushed, not collected
    free: int = 0
    #: Positions used since the device's last notification decision, and since the
    #: driver's last kick decision, positions made available.
    used_since_decision: set[Position] = field(default_factory=set)
    pushed_since_decision: bool = False
    decided_before: bool = False
    avail_since_kick: set[Position] = field(default_factory=set)
    driver_event: tuple[int, int] = (0, RING_EVENT_FLAGS_ENABLE)  # (off_wrap, flags)
    device_event: tuple[int, int] = (0, RING_EVENT_FLAGS_ENABLE)

    def expect_notify(self) -> bool:
        if not self.pushed_since_decision:
            return False
        covered = self.used_since_decision
        self.used_since_decision = set()
        self.pushed_since_decision = False
        off_wrap, flags = self.driver_event
        if flags == RING_EVENT_FLAGS_ENABLE:
            return True
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        first = not self.decided_before
        self.decided_before = True
        return first or (off_wrap & 0x7FFF, off_wrap >> 15) in covered

    def expect_kick(self) -> bool:
        made = self.avail_since_kick
        self.avail_since_kick = set()
        off_wrap, flags = self.device_event
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        return (off_wrap & 0x7FFF, off_wrap >> 15) in made


class Harness:
    """Both queues, the model, and a wrapping allocator for buffers and tables."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        start: Position,
        *,
        event_idx: bool,
        indirect: bool,
        in_order: bool,
    ) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        self.addrs = PackedRingAddresses(RING_GPA, RING_GPA + 16 * size, RING_GPA + 16 * size + 4)
        self.driver = DriverPackedQueue(
            memory, size, self.addrs, event_idx=event_idx, in_order=in_order
        )
        self.driver.resume_at(*start)
        self.device = self._device(encode_vring_base(start[0], start[1], start[0], start[1]))
        self.model = Model(size, event_idx, start, start, free=size)
        #: Where the driver makes the next descriptor available.
        self.driver_avail = start
        #: Times the device's available position passed the end of the ring.
        self.laps = 0
        self.next_data = DATA_GPA
        self.serial = 0

    def _device(self, base: int) -> PackedQueue:
        return PackedQueue(
            self.memory,
            0,
            self.size,
            self.addrs,
            event_idx=self.event_idx,
            indirect=self.indirect,
            vring_base=base,
        )

    def alloc(self, length: int) -> int:
        length = (max(length, 1) + 15) & ~15
        if self.next_data + length > DATA_END:
            self.next_data = DATA_GPA  # old buffers are long done: at most 13 x 4 x 32 live
        gpa = self.next_data
        self.next_data += length
        return gpa

    # -- steps -------------------------------------------------------------------------

    def add(self, n_read: int, n_write: int, use_indirect: bool, lens: list[int]) -> None:
        m = self.model
        if n_read + n_write == 0:
            n_write = 1
        # §2.8.19: an indirect table may not hold more than the queue size.
        indirect = use_indirect and self.indirect and n_read + n_write <= self.size
        descs = 1 if indirect else n_read + n_write
        if descs > m.free:
            return
        self.serial += 1
        readable = []
        data = b""
        for i in range(n_read):
            piece = bytes((self.serial * 7 + i + k) & 0xFF for k in range(lens[i]))
            gpa = self.alloc(len(piece))
            self.memory.write(gpa, piece)
            readable.append((gpa, len(piece)))
            data += piece
        writable = [(self.alloc(lens[3 + i]), lens[3 + i]) for i in range(n_write)]
        if indirect:
            table = self.alloc(16 * (n_read + n_write))
            buf_id = self.driver.add_indirect(table, readable, writable)
        else:
            buf_id = self.driver.add(readable, writable)
        m.waiting.append(Buffer(buf_id, descs, data, writable))
        m.free -= descs
        self.driver_avail, passed = advance(self.driver_avail, descs, self.size)
        m.avail_since_kick.update(passed)
        assert (self.driver.next_avail, self.driver.avail_wrap) == self.driver_avail

    def pop(self) -> None:
        m = self.model
        chain = self.device.pop()
        if not m.waiting:
            assert chain is None
            return
        buf = m.waiting.popleft()
        assert chain is not None
        assert chain.head == buf.buf_id
        assert chain.readable_len == len(buf.readable)
        assert gather(chain.readable, 0, len(buf.readable)) == buf.readable
        assert chain.writable_len == buf.writable_len
        # The device fills the writable part with a pattern the driver checks later.
        scatter(chain.writable, 0, bytes([buf.buf_id & 0xFF]) * chain.writable_len)
        wrap_before = m.avail[1]
        m.avail, _passed = advance(m.avail, buf.descs, self.size)
        self.laps += m.avail[1] != wrap_before
        m.held.append(buf)
        assert self.device.last_avail_idx == m.avail[0] | m.avail[1] << 15

    def push(self, pick: int, length: int) -> None:
        m = self.model
        if not m.held:
            return
        buf = m.held.pop(0 if self.in_order else pick % len(m.held))
        written = min(length, buf.writable_len)
        self.device.push(buf.buf_id, written)
        m.used, passed = advance(m.used, buf.descs, self.size)
        m.used_since_decision.update(passed)
        m.pushed_since_decision = True
        m.done.append((buf, written))
        assert self.device.used_idx == m.used[0] | m.used[1] << 15

    def collect(self) -> None:
        m = self.model
        got = self.driver.get_used()
        assert got == [(buf.buf_id, n) for buf, n in m.done]
        for buf, n in m.done:
            m.free += buf.descs
            fill = bytes([buf.buf_id & 0xFF])
            left = n
            for gpa, length in buf.writable:
                take = min(left, length)
                assert self.memory.read(gpa, take) == fill * take
                left -= take
        m.done.clear()
        assert self.driver.free_count == m.free

    def notify(self) -> None:
        assert self.device.needs_notification() == self.model.expect_notify()

    def kick(self) -> None:
        assert self.driver.should_kick() == self.model.expect_kick()

    def set_driver_event(self, mode: str, off: int, wrap: int) -> None:
        """``desc``: an event at a random position; ``ahead``: ``off`` descriptors past the
        next used one, as a driver delaying its interrupt does."""
        if mode == "ahead" and self.event_idx:
            next_used = (self.driver.next_used, self.driver.used_wrap)
            (pos, w), _ = advance(next_used, off % 8, self.size)
            self.driver.set_driver_event(RING_EVENT_FLAGS_DESC, pos | w << 15)
            self.model.driver_event = (pos | w << 15, RING_EVENT_FLAGS_DESC)
        elif mode == "desc" and self.event_idx:
            value = (off % self.size) | wrap << 15
            self.driver.set_driver_event(RING_EVENT_FLAGS_DESC, value)
            self.model.driver_event = (value, RING_EVENT_FLAGS_DESC)
        elif mode == "disable":
            self.driver.set_driver_event(RING_EVENT_FLAGS_DISABLE)
            self.model.driver_event = (0, RING_EVENT_FLAGS_DISABLE)
        else:
            self.driver.set_driver_event(RING_EVENT_FLAGS_ENABLE)
            self.model.driver_event = (0, RING_EVENT_FLAGS_ENABLE)

    def device_notifications(self, enable: bool) -> None:
        m = self.model
        if enable:
            arrived = self.device.enable_notifications()
            assert arrived == bool(m.waiting)
            if self.event_idx:
                m.device_event = (m.avail[0] | m.avail[1] << 15, RING_EVENT_FLAGS_DESC)
            else:
                m.device_event = (m.device_event[0], RING_EVENT_FLAGS_ENABLE)
        else:
            self.device.disable_notifications()
            m.device_event = (m.device_event[0], RING_EVENT_FLAGS_DISABLE)
        raw = EVENT_SUPPRESS.unpack(self.memory.read(self.addrs.device, 4))
        assert raw == m.device_event

    def restart(self) -> None:
        """GET_VRING_BASE then SET_VRING_BASE on a new device (nothing in flight)."""
        m = self.model
        if m.held:
            return
        base = self.device.vring_base
        assert base == encode_vring_base(m.avail[0], m.avail[1], m.used[0], m.used[1])
        self.device = self._device(base)
        m.decided_before = False  # a new device measures events from scratch
        m.used_since_decision = set()
        m.pushed_since_decision = False

    def cycle(self, n_read: int, n_write: int, use_indirect: bool, lens: list[int]) -> None:
        """Add, pop, push and collect one buffer (moves the ring on quickly)."""
        self.add(n_read, n_write, use_indirect, lens)
        self.pop()
        while self.model.held:
            self.push(0, lens[-1])
        self.collect()


LENS = st.lists(st.integers(0, 24), min_size=7, max_size=7)
SHAPE = st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(), LENS)
STEP = st.one_of(
    st.tuples(st.just("add"), SHAPE),
    st.tuples(st.just("pop"), st.none()),
    st.tuples(st.just("push"), st.tuples(st.integers(0, 15), st.integers(0, 100))),
    st.tuples(st.just("collect"), st.none()),
    st.tuples(st.just("cycle"), SHAPE),
    st.tuples(st.just("notify"), st.none()),
    st.tuples(st.just("kick"), st.none()),
    st.tuples(
        st.just("driver_event"),
        st.tuples(
            st.sampled_from(["enable", "disable", "desc", "ahead", "ahead"]),
            st.integers(0, 63),
            st.integers(0, 1),
        ),
    ),
    st.tuples(st.just("device_notifications"), st.booleans()),
    st.tuples(st.just("restart"), st.none()),
)


def run(h: Harness, steps: list[tuple[str, Any]]) -> None:
    for name, arg in steps:
        if name == "add":
            h.add(*arg)
        elif name == "cycle":
            h.cycle(*arg)
        elif name == "push":
            h.push(*arg)
        elif name == "driver_event":
            h.set_driver_event(*arg)
        elif name == "device_notifications":
            h.device_notifications(arg)
        else:
            getattr(h, name)()
    # Drain: everything made available comes back, and the ring is whole again.
    while h.model.waiting or h.model.held:
        h.pop()
        while h.model.held:
            h.push(0, 100)
    h.collect()
    assert h.driver.free_count == h.size
    assert h.device.in_flight == 0
    assert h.model.avail == h.model.used
    assert h.device.vring_base == encode_vring_base(*h.model.avail, *h.model.used)


@settings(max_examples=80, deadline=None)
@given(
    size=SIZES,
    start=st.tuples(st.integers(0, 12), st.integers(0, 1)),
    features=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    steps=st.lists(STEP, min_size=50, max_size=300),
)
def test_random_driver_and_device_steps_agree_with_the_model(
    size: int,
    start: tuple[int, int],
    features: tuple[bool, bool, bool],
    steps: list[tuple[str, Any]],
) -> None:
    """Features: (EVENT_IDX, INDIRECT_DESC, IN_ORDER); IN_ORDER devices push in pop order."""
    event_idx, indirect, in_order = features
    with guest_ram() as memory:
        h = Harness(
            memory,
            size,
            (start[0] % size, start[1]),
            event_idx=event_idx,
            indirect=indirect,
            in_order=in_order,
        )
        run(h, steps)
        target(float(h.laps), label="ring laps")
        event(f"laps >= 10: {h.laps >= 10}")


@settings(max_examples=40, deadline=None)
@given(
    size=SIZES,
    shapes=st.lists(SHAPE, min_size=1, max_size=12),
    rounds=st.integers(20, 60),
    batch=st.integers(1, 4),
)
def test_many_wraps_with_batches_in_flight(
    size: int, shapes: list[tuple[int, int, bool, list[int]]], rounds: int, batch: int
) -> None:
    """Keep several buffers in flight while the ring wraps dozens of times."""
    with guest_ram() as memory:
        h = Harness(memory, size, (0, 1), event_idx=True, indirect=True, in_order=False)
        for r in range(rounds):
            h.set_driver_event(("ahead", "ahead", "enable", "disable")[r % 4], r, 0)
            for i in range(batch):
                n_read, n_write, use_indirect, lens = shapes[(r + i) % len(shapes)]
                h.add(n_read, n_write, use_indirect, lens)
            h.kick()
            h.device_notifications(False)
            for _ in range(batch):
                h.pop()
            h.device_notifications(True)
            for i in range(len(h.model.held)):
                h.push(r + i, 100)
            h.notify()
            h.collect()
        run(h, [])
        event(f"laps >= 10: {h.laps >= 10}")
