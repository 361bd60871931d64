"""Split virtqueues (VIRTIO 1.4 §2.7), device side.

:class:`SplitQueue` is the device's view: it pops descriptor chains the driver
made available, checking every rule a driver can break, and pushes used
elements back, one or several at once (:meth:`SplitQueue.push_many`).  A request
that needs more chains than the driver has made available yet can give back
those it took (:meth:`SplitQueue.mark`, :meth:`SplitQueue.rewind`).
The driver's view is :class:`~pyvirtio.virtqueue.driver_split.DriverSplitQueue`.

The queue maps no memory: it works on a :class:`~pyvirtio.memory.GuestMemory`
and re-translates its ring addresses when the regions change.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from typing import NoReturn

from pyvirtio.errors import (
    AvailIndexJump,
    BadIndirectTableLength,
    BufferOutOfMemory,
    ChainLengthOverflow,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorLoop,
    GuestMemoryError,
    IndirectNotNegotiated,
    IndirectWithNext,
    NestedIndirect,
    ReadableAfterWritable,
    RingOutOfMemory,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import (
    DESC,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvirtio.virtqueue.barrier import full_barrier
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.inflight import InflightRegion
from pyvirtio.virtqueue.mapped import MappedRing
from pyvirtio.virtqueue.queue import Virtqueue
from pyvirtio.virtqueue.table import TABLE_MIN, table_fields, table_views
from pyvirtio.virtqueue.words import Words

__all__ = ["RingAddresses", "SplitQueue", "SplitRingViews", "check_queue_size"]

_MAX_CHAIN_BYTES = 1 << 32
_unpack_desc = DESC.unpack_from
_NEXT, _NEXT_WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
#: The ``next`` fields of a table linked in order (SplitQueue._walk_table).
_LINKS = tuple(range(1, 1 << 15))


def check_queue_size(size: int) -> None:
    """VIRTIO 1.4 §2.7: a split queue's size is a power of 2, at most 32768.

    Raises:
        ValueError: the size is not allowed.
    """
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")


class RingAddresses:
    """Guest physical addresses of the three parts of a split queue."""

    __slots__ = ("avail", "desc", "used")

    def __init__(self, desc: int, avail: int, used: int) -> None:
        self.desc = desc
        self.avail = avail
        self.used = used

    def __repr__(self) -> str:
        return f"RingAddresses(desc={self.desc:#x}, avail={self.avail:#x}, used={self.used:#x})"


class SplitRingViews:
    """Word views of the three ring parts, translated from their GPAs.

    Every ring field is stored through them with one aligned store
    (:mod:`pyvirtio.virtqueue.words`): the other side reads the rings while we
    write.  Offsets in 16-bit words: available ring ``flags`` 0, ``idx`` 1,
    ``ring[i]`` 2 + i, ``used_event`` 2 + N; used ring ``flags`` 0, ``idx`` 1,
    ``avail_event`` 2 + 4N; in 32-bit words, used element i is ``id`` 1 + 2i and
    ``len`` 2 + 2i.
    """

    __slots__ = ("avail", "desc", "used")

    def __init__(self, memory: GuestMemory, addrs: RingAddresses, size: int, queue: int) -> None:
        try:
            desc = memory.view(addrs.desc, desc_table_size(size))
            avail = memory.view(addrs.avail, avail_ring_size(size))
            used = memory.view(addrs.used, used_ring_size(size))
        except GuestMemoryError as exc:
            raise RingOutOfMemory(f"ring not in guest memory: {exc}", queue=queue) from exc
        # VIRTIO 1.4 §2.7: alignment 16, 2 and 4.
        self.desc = Words(desc, 16, f"queue {queue} descriptor table (GPA {addrs.desc:#x})")
        self.avail = Words(avail, 2, f"queue {queue} available ring (GPA {addrs.avail:#x})")
        self.used = Words(used, 4, f"queue {queue} used ring (GPA {addrs.used:#x})")


class _SplitMark:
    """A :class:`SplitQueue`'s position, saved by :meth:`SplitQueue.mark`."""

    __slots__ = ("counter", "last_avail_idx", "popped", "resubmit")

    def __init__(self, queue: SplitQueue) -> None:
        self.last_avail_idx = queue.last_avail_idx
        self.popped = queue.popped
        self.resubmit = tuple(queue._resubmit)
        self.counter = queue.inflight.counter if queue.inflight is not None else 0


class SplitQueue(MappedRing[SplitRingViews]):
    """The device side of a split virtqueue.

    Args:
        memory: guest memory the ring and buffers live in.
        index: the queue's index (for error messages).
        size: queue size (power of 2).
        addrs: GPAs of descriptor table, available ring and used ring.
        event_idx: VIRTIO_F_EVENT_IDX was negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated.
        last_avail_idx: the next available-ring index to process
            (``SET_VRING_BASE``); the used index is read from the ring.

    Raises:
        ValueError: the size is not a power of 2 up to 32768.
        RingOutOfMemory: a ring part is not inside guest memory.
    """

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        size: int,
        addrs: RingAddresses,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        last_avail_idx: int = 0,
    ) -> None:
        check_queue_size(size)
        self.memory = memory
        self.index = index
        self.size = size
        self.addrs = addrs
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self._mask = size - 1
        self._generation = -1
        self._views = self._translate()
        self.used_idx: int = self._views.used.u16[1]
        #: Used index at the last notification we sent (event-idx bookkeeping).
        self._signalled_used = self.used_idx
        self._pushed_since_signal = False
        #: Set once the driver corrupts the ring beyond recovery (§2.7.6).
        self.broken: VirtqueueError | None = None
        self.popped = 0
        #: Inflight tracking (vhost-user INFLIGHT_SHMFD), when the front-end set it up.
        self.inflight: InflightRegion | None = None
        self._resubmit: deque[int] = deque()
        #: What :meth:`rewind` goes back to, set by :meth:`mark`.
        self._mark: _SplitMark | None = None

    @property
    def vring_base(self) -> int:
        """The ring state ``GET_VRING_BASE`` reports: the next available index
        (vhost-user.rst "Vring descriptor index for split virtqueues")."""
        return self.last_avail_idx

    def take_over(self, old: Virtqueue) -> None:
        """Continue ``old``'s inflight tracking (the ring was re-created in place).

        Raises:
            TypeError: ``old`` is not a split queue (the layout cannot change
                while a ring runs; the back-end refuses that first).
        """
        if not isinstance(old, SplitQueue):
            raise TypeError(f"queue {self.index}: a split ring cannot take over {old!r}")
        self.inflight = old.inflight
        self._resubmit = old._resubmit

    def attach_inflight(self, region: InflightRegion) -> int:
        """Track taken chains in ``region``; resubmit what a previous back-end left.

        Returns:
            How many chains are resubmitted (popped again before new ones).
        """
        self.inflight = region
        if not region.initialized:
            region.reset(self.used_idx)
            return 0
        heads = [h for h in region.recover(self.used_idx) if h < self.size]
        self._resubmit = deque(heads)
        # Everything up to the used index was completed, and these were taken after it.
        self.last_avail_idx = (self.used_idx + len(heads)) & 0xFFFF
        return len(heads)

    # -- memory ------------------------------------------------------------------

    def _make_views(self) -> SplitRingViews:
        return SplitRingViews(self.memory, self.addrs, self.size, self.index)

    # -- available ring ------------------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's current available index."""
        return int(self._ring().avail.u16[1])

    def pending(self) -> int:
        """How many chains the driver has made available that were not popped.

        Raises:
            AvailIndexJump: the index moved by more than the queue size; the
                queue is marked broken.
        """
        if self.broken is not None:
            return 0
        index = self.avail_idx()
        n = (index - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            self._jumped(index)
        return n

    def _jumped(self, index: int) -> NoReturn:
        """The driver's available index ``index`` is more than the queue size ahead:
        the queue is broken (§2.7.6).

        Raises:
            AvailIndexJump: always.
        """
        n = (index - self.last_avail_idx) & 0xFFFF
        self.broken = AvailIndexJump(
            f"available index moved {n} entries ahead of the device "
            f"(index {index}, device at {self.last_avail_idx}), "
            f"more than the queue size {self.size}",
            queue=self.index,
        )
        # A copy is raised, and nothing in this frame refers to it: the raised
        # error's traceback holds this frame, and a cycle through it would keep the
        # ring's views of guest memory (and the mapping's fd) alive after a
        # disconnect, until the cyclic GC ran.
        raise copy.copy(self.broken)

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or ``None`` when there is none.

        Raises:
            VirtqueueError: the chain breaks a rule.  When the chain's head is
                valid, the error's ``head`` attribute names it and the caller
                should give it back with :meth:`push` (length 0) so the driver
                is not left waiting; otherwise the queue is broken.
        """
        if self._resubmit:
            return self._walk_head(self._resubmit.popleft(), self._ring().desc.view)
        if self.broken is not None:
            return None
        # pending(), inlined: this runs once per chain.
        ring = self._ring()
        avail = ring.avail.u16
        last = self.last_avail_idx
        index = avail[1]
        ahead = (index - last) & 0xFFFF
        if ahead == 0:
            return None
        if ahead > self.size:
            self._jumped(index)
        slot = last & self._mask
        head: int = avail[2 + slot]
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.popped += 1
        if head >= self.size:
            raise DescriptorIndexOutOfRange(
                f"available ring entry {slot} names descriptor {head}, "
                f"beyond the table of {self.size}",
                queue=self.index,
                descriptor=head,
            )
        if self.inflight is not None:
            self.inflight.taken(head)
        return self._walk_head(head, ring.desc.view)

    def _walk_head(self, head: int, table: memoryview) -> DescriptorChain:
        """:meth:`_walk`, naming ``head`` in any error so the chain can be returned."""
        try:
            return self._walk(head, table)
        except VirtqueueError as exc:
            exc.head = head
            raise

    def _walk(self, head: int, table: memoryview) -> DescriptorChain:
        """Follow a chain from ``head``, validating and translating each descriptor."""
        first = _unpack_desc(table, head * DESC_SIZE)
        addr, length, flags, _ = first
        if not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            # A chain of one buffer (a network frame, a small request): the checks of
            # the loop below that can apply to it, without its bookkeeping.
            views: list[memoryview] = []
            self._slices(addr, length, views, head)
            if flags & VIRTQ_DESC_F_WRITE:
                return DescriptorChain(head, [], views, 0, length)
            return DescriptorChain(head, views, [], length, 0)
        if (flags & ~VIRTQ_DESC_F_WRITE == VIRTQ_DESC_F_INDIRECT and self.indirect
                and length >= TABLE_MIN * DESC_SIZE):
            chain = self._walk_table(head, addr, length)
            if chain is not None:
                return chain
        return self._walk_chain(head, table, first)

    def _walk_table(self, head: int, addr: int, length: int) -> DescriptorChain | None:
        """A head's long indirect table as Linux writes it (§2.7.5.3: entries linked 0,
        1, 2... in order, buffers in one memory region), read whole
        (:mod:`~pyvirtio.virtqueue.table`); None for any other table, which
        :meth:`_walk_chain` then walks entry by entry, naming whatever is wrong with it.

        Each field is read from guest memory once, and only what was read is checked
        and used: a driver rewriting the table meanwhile gets some consistent table.
        """
        entries, rest = divmod(length, DESC_SIZE)
        if rest or entries > self.size:
            return None
        try:
            fields = table_fields(self.memory.view(addr, length), entries)
        except GuestMemoryError:
            return None
        flags = fields[2::4]
        last = flags[-1]
        if (last & ~VIRTQ_DESC_F_WRITE
                or flags.count(_NEXT) + flags.count(_NEXT_WRITE) != entries - 1
                or fields[3:-4:4] != _LINKS[: entries - 1]):
            return None
        readable = entries - flags.count(_NEXT_WRITE) - (last == VIRTQ_DESC_F_WRITE)
        if _NEXT_WRITE in flags[:readable]:  # a readable buffer after a writable one
            return None
        found = table_views(self.memory, fields[0::4], fields[1::4], readable,
                            _MAX_CHAIN_BYTES)
        return None if found is None else DescriptorChain(head, *found)

    def _slices(self, addr: int, length: int, out: list[memoryview], descriptor: int) -> None:
        """Descriptor ``descriptor``'s buffer as views, appended to ``out``.

        Raises:
            BufferOutOfMemory: the buffer is not in guest memory (§2.7.5).
        """
        try:
            self.memory.slices(addr, length, out)
        except GuestMemoryError as exc:
            raise BufferOutOfMemory(
                f"buffer {addr:#x}+{length:#x} is not in guest memory",
                queue=self.index,
                descriptor=descriptor,
            ) from exc

    def _walk_chain(self, head: int, table: memoryview,
                    first: tuple[int, int, int, int]) -> DescriptorChain:
        """:meth:`_walk` for a chain of several descriptors or an indirect table
        (``first``: the head descriptor, read once)."""
        memory = self.memory
        desc: tuple[int, int, int, int] | None = first
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        # Not ``writable``: a zero-length buffer adds no view but still orders the chain.
        seen_writable = False
        table_len = self.size
        idx = head
        hops = 0
        in_indirect = False
        indirect_of = head
        # The region buffers were last found in, tried first (inlined GuestMemory.slices).
        region = memory.last_region
        lo, hi, rview = ((region.guest_addr, region.guest_end, region.view)
                         if region is not None else (0, 0, memoryview(b"")))
        while True:
            if desc is None:
                addr, length, flags, nxt = _unpack_desc(table, idx * DESC_SIZE)
            else:
                (addr, length, flags, nxt), desc = desc, None
            if flags & VIRTQ_DESC_F_INDIRECT:
                where = f"indirect table entry {idx} (of descriptor {indirect_of})"
                if not self.indirect:
                    raise IndirectNotNegotiated(
                        "descriptor has VIRTQ_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC "
                        "was not negotiated",
                        queue=self.index,
                        descriptor=idx,
                    )
                if in_indirect:
                    raise NestedIndirect(
                        f"{where} is itself indirect", queue=self.index, descriptor=idx
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectWithNext(
                        "descriptor sets both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT",
                        queue=self.index,
                        descriptor=idx,
                    )
                if length == 0 or length % DESC_SIZE:
                    raise BadIndirectTableLength(
                        f"indirect table length {length} is not a non-zero multiple of 16",
                        queue=self.index,
                        descriptor=idx,
                    )
                entries = length // DESC_SIZE
                if entries > self.size:
                    raise ChainTooLong(
                        f"indirect table of {entries} descriptors is longer than the "
                        f"queue size {self.size}",
                        queue=self.index,
                        descriptor=idx,
                    )
                try:
                    table = memory.view(addr, length)
                except GuestMemoryError as exc:
                    raise BufferOutOfMemory(
                        f"indirect table at {addr:#x}+{length:#x} is not in guest memory",
                        queue=self.index,
                        descriptor=idx,
                    ) from exc
                in_indirect = True
                indirect_of = idx
                table_len = entries
                idx = 0
                hops = 0
                continue
            hops += 1
            if hops > table_len:
                what = f"indirect table of descriptor {indirect_of}" if in_indirect else "table"
                raise DescriptorLoop(
                    f"chain from descriptor {head} visits more than the {table_len} "
                    f"descriptors of its {what}: it loops",
                    queue=self.index,
                    descriptor=idx,
                )
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                out = writable
                writable_len += length
            else:
                if seen_writable:
                    raise ReadableAfterWritable(
                        "device-readable descriptor follows a device-writable one",
                        queue=self.index,
                        descriptor=idx,
                    )
                out = readable
                readable_len += length
            if lo <= addr < hi and addr + length <= hi:
                start = addr - lo
                out.append(rview[start : start + length])
            else:
                self._slices(addr, length, out, idx)
                region = memory.last_region
                if region is not None:
                    lo, hi, rview = region.guest_addr, region.guest_end, region.view
            if readable_len + writable_len > _MAX_CHAIN_BYTES:
                raise ChainLengthOverflow(
                    f"chain from descriptor {head} is longer than 2^32 bytes",
                    queue=self.index,
                    descriptor=idx,
                )
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_len, writable_len)
            if nxt >= table_len:
                raise DescriptorIndexOutOfRange(
                    f"descriptor {idx} has next={nxt}, beyond the "
                    f"{'indirect ' if in_indirect else ''}table of {table_len}",
                    queue=self.index,
                    descriptor=idx,
                )
            idx = nxt

    # -- taking chains back -------------------------------------------------------

    def mark(self) -> None:
        """Remember the current position, for :meth:`rewind`.

        A device that needs several chains for one request (virtio-net's mergeable
        receive buffers) marks before popping the first, and rewinds when the
        driver has not made enough available yet.  The mark lasts until the next
        :meth:`mark`, :meth:`rewind`, :meth:`push` or :meth:`push_many`.
        """
        self._mark = _SplitMark(self)

    def rewind(self) -> None:
        """Give back every chain popped since :meth:`mark`: they stay available and
        the next :meth:`pop` returns them again, in the same order.

        The driver sees nothing: the device only reads the available ring
        (VIRTIO 1.4 §2.7.6), so its own position is all there is to restore, plus
        the inflight record of the chains taken since the mark.

        Raises:
            ValueError: no mark is set (a bug in the caller, not the driver).
        """
        mark = self._mark
        if mark is None:
            raise ValueError(f"queue {self.index}: rewind without a mark")
        self._mark = None
        self.last_avail_idx = mark.last_avail_idx
        self.popped = mark.popped
        self._resubmit = deque(mark.resubmit)
        if self.inflight is not None:
            self.inflight.forget_since(mark.counter)

    def ring_full(self) -> bool:
        """Whether the device holds as many chains as the ring has entries.

        Chains popped and not used yet: the driver can make no further chain
        available before the device uses one (§2.7: at most queue size
        descriptors, each chain one or more of them).  A driver whose chains
        take several descriptors each runs out before this says so.
        """
        return (self.last_avail_idx - self.used_idx) & 0xFFFF >= self.size

    # -- used ring ----------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written.

        VIRTIO 1.4 §2.7.8.2: the element is written before the used index.
        """
        self._mark = None
        used = self._ring().used
        inflight = self.inflight
        if inflight is not None:
            inflight.before_used(head)
        slot = self.used_idx & self._mask
        elems = used.u32
        elems[1 + 2 * slot] = head
        elems[2 + 2 * slot] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        used.u16[1] = self.used_idx
        if inflight is not None:
            inflight.after_used(head, self.used_idx)
        self._pushed_since_signal = True

    def push_many(self, used: Sequence[tuple[int, int]]) -> None:
        """Return several chains ``(head, length)`` at once: the driver sees all or none.

        Every used element is written first, then the used index moves once
        (§2.7.8.2, §2.7.14: the driver reads elements up to the index it reads).
        A device whose request spans several buffers uses them together this way
        (virtio-net, §5.1.9.4: "the device MUST use all buffers used by a single
        receive packet together").
        """
        self._mark = None
        if not used:
            return
        ring = self._ring().used
        elems = ring.u32
        inflight = self.inflight
        idx = self.used_idx
        mask = self._mask
        for head, length in used:
            if inflight is not None:
                inflight.before_used(head)
            slot = idx & mask
            elems[1 + 2 * slot] = head
            elems[2 + 2 * slot] = length
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        ring.u16[1] = idx
        if inflight is not None:
            for head, _length in used:
                inflight.after_used(head, idx)
        self._pushed_since_signal = True

    # -- notifications --------------------------------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while the device drains the queue (§2.7.10).

        With EVENT_IDX the ``avail_event`` left from the last drain already
        lies behind the driver, which suppresses kicks; without it the device
        sets VIRTQ_USED_F_NO_NOTIFY.
        """
        if not self.event_idx:
            self._ring().used.u16[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self, at: int | None = None) -> bool:
        """Ask for kicks again; return True if chains arrived meanwhile (drain again).

        Args:
            at: the available index from which on new chains matter (default: the
                next one to pop).  After a :meth:`rewind` the device waits for chains
                beyond those the driver already made available, and passes the index
                it had popped up to: with EVENT_IDX, ``avail_event`` asks the driver
                to kick when it publishes past it (§2.7.10), and the answer says
                whether it already did.
        """
        ring = self._ring()
        wait_from = self.last_avail_idx if at is None else at & 0xFFFF
        if self.event_idx:
            ring.used.u16[2 + 4 * self.size] = wait_from
        else:
            ring.used.u16[0] = 0
        full_barrier()  # the driver must see the store before we look for buffers
        if self.broken is not None:
            return False
        avail: int = ring.avail.u16[1]
        return avail != wait_from

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (§2.7.7.2).

        Call after pushing a batch; a True answer is consumed (the caller
        then signals the call eventfd).
        """
        if not self._pushed_since_signal:
            return False
        full_barrier()  # the used index store before the used_event / flags load
        ring = self._ring()
        new = self.used_idx
        if self.event_idx:
            used_event = ring.avail.u16[2 + self.size]
            old = self._signalled_used
            notify = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            notify = not ring.avail.u16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        self._pushed_since_signal = False
        return bool(notify)
