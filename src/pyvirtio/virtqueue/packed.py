"""Packed virtqueues (VIRTIO 1.4 §2.8), device side.

A packed queue is one ring of descriptors that driver and device both write:
the driver marks descriptors available by setting ``VIRTQ_DESC_F_AVAIL`` to
its wrap counter (and ``VIRTQ_DESC_F_USED`` to the inverse), the device writes
used descriptors over them with both bits equal to its own wrap counter
(§2.8.1).  Each side walks the ring in order and flips its wrap counter when it
passes the end, so the queue size need not be a power of 2.

:class:`PackedQueue` is the device's view.  It has the interface the back-end
uses for :class:`~pyvirtio.virtqueue.split.SplitQueue` (``pop``, ``push``,
``push_many``, ``mark``, ``rewind``, ``ring_full``, ``disable_notifications``,
``enable_notifications``, ``needs_notification``, ``remap``, ``broken``,
``last_avail_idx``), so every device serves packed rings without
device-specific code.  The driver's view is
:class:`~pyvirtio.virtqueue.driver_packed.DriverPackedQueue`.

Buffer IDs.  A chain's :attr:`~pyvirtio.virtqueue.chain.DescriptorChain.head`
is the Buffer ID from its last descriptor (§2.8.6), which is what the used
descriptor carries.  The queue remembers how many ring descriptors each
outstanding buffer took, so ``push(head, length)`` can skip the used index over
the whole list (§2.8.6, §2.8.22) and the caller needs nothing layout-specific.

VIRTIO_F_IN_ORDER (§2.8.8).  The device side needs no special mode: a device
that returns buffers in the order it popped them (pyvirtio's back-end does, as
it completes each chain before popping the next) satisfies the feature, and
writing one used descriptor per buffer is always valid; batching (one used
descriptor for several buffers) is a MAY, and only correct when every skipped
buffer was written completely, which a short rng fill or a rejected chain is
not.  :class:`DriverPackedQueue` with ``in_order=True`` accepts batched used
descriptors as §2.8.8 describes.

Memory ordering.  Where the spec asks for a full barrier between a store and a
later load (after re-enabling notifications, before reading the other side's
event suppression structure), the queues call
:func:`~pyvirtio.virtqueue.barrier.full_barrier`.  The other ring accesses rely
on the order in which the code writes them (descriptor body before ``flags``,
§2.8.21.1.1), which x86 keeps.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from pyvirtio.errors import (
    BadAvailFlags,
    BadEventSuppression,
    BufferIdInUse,
    EventSuppressionReservedBits,
    GuestMemoryError,
    IncompleteChain,
    IndirectInList,
    PackedBadIndirectTableLength,
    PackedBufferOutOfMemory,
    PackedChainLengthOverflow,
    PackedChainTooLong,
    PackedIndirectNotNegotiated,
    PackedIndirectTooLong,
    PackedReadableAfterWritable,
    PackedRingOutOfMemory,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS_SIZE,
    MAX_PACKED_QUEUE_SIZE,
    PACKED_DESC,
    PACKED_DESC_SIZE,
    PACKED_EVENT_WRAP,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    packed_ring_size,
)
from pyvirtio.virtqueue.barrier import full_barrier
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.inflight import InflightRegion
from pyvirtio.virtqueue.mapped import MappedRing
from pyvirtio.virtqueue.queue import Virtqueue
from pyvirtio.virtqueue.table import TABLE_MIN, table_fields, table_views
from pyvirtio.virtqueue.words import Words

__all__ = [
    "INITIAL_VRING_BASE",
    "PackedQueue",
    "PackedRingAddresses",
    "PackedRingViews",
    "check_packed_queue_size",
    "complete_vring_base",
    "decode_vring_base",
    "encode_vring_base",
]

log = logging.getLogger(__name__)

#: A fresh queue as vhost-user's "vring descriptor indices for packed virtqueues"
#: encode it: both positions 0, both wrap counters 1 (§2.8.1 initialises them to 1).
INITIAL_VRING_BASE = 0x8000_8000

#: The used descriptor's length is 32 bits: a chain must fit in it.
_MAX_CHAIN_BYTES = (1 << 32) - 1
_AVAIL = VIRTQ_DESC_F_AVAIL
_USED = VIRTQ_DESC_F_USED
_BOTH = _AVAIL | _USED
_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_DESC_SIZE = PACKED_DESC_SIZE
_FLAGS_OFFSET = 14
_OFF_MASK = PACKED_EVENT_WRAP - 1
_unpack_desc = PACKED_DESC.unpack_from


def check_packed_queue_size(size: int) -> None:
    """VIRTIO 1.4 §2.8: a packed queue has 1 to 2^15 entries, any number in between.

    Raises:
        ValueError: the size is not allowed.
    """
    if not 0 < size <= MAX_PACKED_QUEUE_SIZE:
        raise ValueError(f"packed queue size {size} is not in 1..{MAX_PACKED_QUEUE_SIZE}")


def encode_vring_base(avail_pos: int, avail_wrap: int, used_pos: int, used_wrap: int) -> int:
    """The ``SET/GET_VRING_BASE`` value of a packed ring (vhost-user.rst, "Vring
    descriptor indices for packed virtqueues").

    Bits 0-14: the next descriptor the device will read; bit 15: the driver
    (available) ring wrap counter; bits 16-30: where the device writes the next
    used descriptor; bit 31: the device (used) ring wrap counter.  Positions are
    offsets in the ring (0 to size - 1), as QEMU sends and expects them: the
    15-bit fields cannot be free-running counters for sizes that do not divide
    2^15, and the wrap bits already say which lap the position is in.
    """
    return (avail_pos | avail_wrap << 15) | (used_pos | used_wrap << 15) << 16


def complete_vring_base(value: int) -> int:
    """A packed ``SET_VRING_BASE`` value with its used half filled in where it is missing.

    Older front-ends send only bits 0-15 (DPDK 22.11's ``virtio_user`` sends
    ``0x8000`` for a fresh ring).  Read literally, an upper half of 0 puts the used
    position at 0 in lap 0; with the driver's wrap counter at 1 that is the
    whole ring or more in flight, which a stopped ring never has.  So when the
    upper half is 0 and the driver's wrap counter is 1, the used position is the
    available one (nothing in flight).  Any other value is taken as sent.
    """
    if value >> 16 == 0 and value & 0x8000:
        return value | value << 16
    return value


def decode_vring_base(value: int) -> tuple[int, int, int, int]:
    """Split a packed ``vring base`` into (avail_pos, avail_wrap, used_pos, used_wrap)."""
    return value & 0x7FFF, value >> 15 & 1, value >> 16 & 0x7FFF, value >> 31 & 1


class PackedRingAddresses:
    """Guest physical addresses of the three parts of a packed queue (§2.8).

    Attributes:
        desc: the descriptor ring (Descriptor Area).
        driver: the driver event suppression structure (Driver Area; vhost-user's
            ``avail`` address).
        device: the device event suppression structure (Device Area; vhost-user's
            ``used`` address).
    """

    __slots__ = ("desc", "device", "driver")

    def __init__(self, desc: int, driver: int, device: int) -> None:
        self.desc = desc
        self.driver = driver
        self.device = device

    def __repr__(self) -> str:
        return (
            f"PackedRingAddresses(desc={self.desc:#x}, driver={self.driver:#x}, "
            f"device={self.device:#x})"
        )


class PackedRingViews:
    """Word views of the three ring parts, translated from their GPAs.

    Every ring field is stored through them with one aligned store
    (:mod:`pyvirtio.virtqueue.words`): the other side polls the descriptor flags
    and the event structures while we write.  Descriptor i in words: ``addr``
    u64[2i], ``len`` u32[4i + 2], ``id`` u16[8i + 6], ``flags`` u16[8i + 7]; an
    event suppression structure: ``off_wrap`` u16[0], ``flags`` u16[1].
    """

    __slots__ = ("desc", "device", "driver")

    def __init__(
        self, memory: GuestMemory, addrs: PackedRingAddresses, size: int, queue: int | None
    ) -> None:
        try:
            desc = memory.view(addrs.desc, packed_ring_size(size))
            driver = memory.view(addrs.driver, EVENT_SUPPRESS_SIZE)
            device = memory.view(addrs.device, EVENT_SUPPRESS_SIZE)
        except GuestMemoryError as exc:
            raise PackedRingOutOfMemory(
                f"packed ring not in guest memory: {exc}", queue=queue
            ) from exc
        # VIRTIO 1.4 §2.8.10: alignment 16, 4 and 4.
        self.desc = Words(desc, 16, f"queue {queue} descriptor ring (GPA {addrs.desc:#x})")
        self.driver = Words(driver, 4, f"queue {queue} driver event area (GPA {addrs.driver:#x})")
        self.device = Words(device, 4, f"queue {queue} device event area (GPA {addrs.device:#x})")


class _PackedMark:
    """A :class:`PackedQueue`'s driver-side position, saved by :meth:`PackedQueue.mark`."""

    __slots__ = ("avail_pos", "avail_wrap", "in_flight", "outstanding", "popped")

    def __init__(self, queue: PackedQueue) -> None:
        self.avail_pos = queue._avail_pos
        self.avail_wrap = queue._avail_wrap
        self.outstanding = queue._outstanding
        self.in_flight = dict(queue._in_flight)
        self.popped = queue.popped


class PackedQueue(MappedRing[PackedRingViews]):
    """The device side of a packed virtqueue.

    Args:
        memory: guest memory the ring and buffers live in.
        index: the queue's index (for error messages).
        size: queue size, 1 to 32768 (§2.8.10.1: need not be a power of 2).
        addrs: GPAs of the descriptor ring and the two event suppression structures.
        event_idx: VIRTIO_F_EVENT_IDX was negotiated (descriptor-specific events).
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated.
        vring_base: where to resume, as ``SET_VRING_BASE`` encodes it
            (:func:`encode_vring_base`); the default is a fresh ring.

    Raises:
        ValueError: the size is not allowed, or ``vring_base`` names a position
            beyond the ring or more outstanding descriptors than the ring holds.
        PackedRingOutOfMemory: a ring part is not inside guest memory.
    """

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        size: int,
        addrs: PackedRingAddresses,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        vring_base: int = INITIAL_VRING_BASE,
    ) -> None:
        check_packed_queue_size(size)
        avail_pos, avail_wrap, used_pos, used_wrap = decode_vring_base(vring_base)
        if avail_pos >= size or used_pos >= size:
            raise ValueError(
                f"ring base {vring_base:#010x} names position {max(avail_pos, used_pos)}, "
                f"beyond the ring of {size}"
            )
        self.memory = memory
        self.index = index
        self.size = size
        self.addrs = addrs
        self.event_idx = event_idx
        self.indirect = indirect
        self._generation = -1
        self._views = self._translate()
        # Device ring state (§2.8.1).  The expected AVAIL|USED bits of an available
        # descriptor and the flags of a used one are kept ready for the hot paths.
        self._avail_pos = avail_pos
        self._set_avail_wrap(avail_wrap)
        self._used_pos = used_pos
        self._used_wrap = used_wrap
        self._used_flags = _BOTH if used_wrap else 0
        #: Descriptors popped but not yet used: the driver may not overwrite them.
        outstanding = (self._linear(avail_pos, avail_wrap) - self._linear(used_pos, used_wrap)) % (
            2 * size
        )
        if outstanding > size:
            raise ValueError(
                f"ring base {vring_base:#010x} puts {outstanding} descriptors in flight, "
                f"more than the ring of {size}"
            )
        self._outstanding = outstanding
        #: Ring descriptors taken by each buffer ID popped and not yet pushed.
        self._in_flight: dict[int, int] = {}
        #: Descriptors used since the last used-buffer notification decision.
        self._pushed = 0
        self._signalled = self._linear(used_pos, used_wrap)
        self._signalled_valid = False
        #: A violation found outside pop() (event suppression), raised by the next pop().
        self._deferred: VirtqueueError | None = None
        self._reported_event: tuple[int, int] | None = None
        #: Set once the driver corrupts the ring beyond recovery.
        self.broken: VirtqueueError | None = None
        self.popped = 0
        #: What :meth:`rewind` goes back to, set by :meth:`mark`.
        self._mark: _PackedMark | None = None

    def _set_avail_wrap(self, wrap: int) -> None:
        self._avail_wrap = wrap
        self._avail_bit = _AVAIL if wrap else 0
        #: AVAIL matches the driver's wrap counter, USED the inverse.
        self._avail_ok = _AVAIL if wrap else _USED

    def _linear(self, pos: int, wrap: int) -> int:
        """A (position, wrap counter) pair as one number modulo 2 x size.

        The wrap counters start at 1, so lap 0 has wrap 1 and lap 1 wrap 0.
        """
        return pos if wrap else pos + self.size

    # -- state ---------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """Next descriptor to read, with the driver ring wrap counter in bit 15."""
        return self._avail_pos | self._avail_wrap << 15

    @property
    def used_idx(self) -> int:
        """Where the next used descriptor goes, with the device ring wrap counter in bit 15."""
        return self._used_pos | self._used_wrap << 15

    @property
    def vring_base(self) -> int:
        """The ring state ``GET_VRING_BASE`` returns (:func:`encode_vring_base`)."""
        return self.last_avail_idx | self.used_idx << 16

    @property
    def in_flight(self) -> int:
        """Buffers popped and not pushed yet."""
        return len(self._in_flight)

    def take_over(self, old: Virtqueue) -> None:
        """Continue ``old``'s record of the buffers in flight (the ring was re-created in
        place, with buffers popped and not used yet: a device completing asynchronously).

        Raises:
            TypeError: ``old`` is not a packed queue.
        """
        if not isinstance(old, PackedQueue):
            raise TypeError(f"queue {self.index}: a packed ring cannot take over {old!r}")
        self._in_flight = dict(old._in_flight)
        self.popped = old.popped

    def attach_inflight(self, region: InflightRegion) -> int:
        """Inflight tracking (vhost-user INFLIGHT_SHMFD) is implemented for split rings
        only: the packed layout of the shared buffer (``inflight_desc_packed``) is not.
        Logged, and nothing is resubmitted: a crash loses the requests in flight."""
        log.warning("queue %d: inflight tracking is not implemented for packed rings; "
                    "requests in flight are not recovered if the back-end dies", self.index)
        return 0

    # -- memory --------------------------------------------------------------------------

    def _make_views(self) -> PackedRingViews:
        return PackedRingViews(self.memory, self.addrs, self.size, self.index)

    def _break(self, exc: VirtqueueError) -> VirtqueueError:
        """Mark the ring broken by ``exc`` and return it to raise.  A copy is kept, not
        ``exc``: the raised one gets a traceback whose frames hold this queue, and the
        cycle would keep the ring's views of guest memory (and the mapping's fd) alive
        after a disconnect, until the cyclic GC ran."""
        self.broken = copy.copy(exc)
        return exc

    # -- available descriptors -------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """Take the next available buffer, or ``None`` when there is none.

        Raises:
            VirtqueueError: the buffer breaks a rule, or the driver event
                suppression structure broke one since the last call.  When the
                buffer's extent and ID are known, the error's ``head`` is its
                Buffer ID and the caller gives it back with :meth:`push`
                (length 0); otherwise (``head`` is ``None``) the queue may be
                :attr:`broken`.
        """
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            raise deferred
        if self.broken is not None:
            return None
        desc = self._ring().desc.view
        pos = self._avail_pos
        head = _unpack_desc(desc, pos * _DESC_SIZE)
        # §2.8.1: available once AVAIL shows the driver's lap and USED the inverse;
        # a head whose flags the driver is still rewriting matches neither.
        if head[3] & _BOTH != self._avail_ok:
            return None
        return self._walk(desc, pos, head)

    def _walk(
        self, desc: memoryview, head_pos: int, head: tuple[int, int, int, int]
    ) -> DescriptorChain:
        """Read the list starting at ``head_pos``, validating and translating it.

        Every descriptor is read once (the head by :meth:`pop`): what was checked
        is what is used.  Structure errors (where the list ends cannot be known)
        break the queue.  Content errors are remembered while the walk goes on to
        the list's last descriptor, which holds the Buffer ID the list is returned
        under.
        """
        memory = self.memory
        size = self.size
        queue = self.index
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        seen_writable = False
        error: VirtqueueError | None = None
        pos = head_pos
        wrap = self._avail_wrap
        avail_bit = self._avail_bit
        avail_ok = self._avail_ok
        room = size - self._outstanding
        count = 0
        addr, length, buf_id, flags = head
        while True:
            count += 1
            if count > room:
                raise self._break(self._too_long(head_pos, pos, room))
            if flags & _BOTH != avail_ok:
                if flags & _AVAIL != avail_bit:  # never the head: pop() checked it
                    raise self._break(
                        IncompleteChain(
                            f"list from descriptor {head_pos} continues into descriptor "
                            f"{pos}, which is not available: the driver made the list's "
                            "first descriptor available before the rest",
                            queue=queue,
                            descriptor=pos,
                        )
                    )
                if flags & _BOTH != avail_ok and error is None:
                    error = BadAvailFlags(
                        f"descriptor flags {flags:#06x} set VIRTQ_DESC_F_USED equal to "
                        f"VIRTQ_DESC_F_AVAIL (driver wrap counter {wrap}); an available "
                        "descriptor has USED set to the inverse",
                        queue=queue,
                        descriptor=pos,
                    )
            if error is None:
                try:
                    if flags & _INDIRECT:
                        r, w, seen_writable = self._indirect(
                            addr,
                            length,
                            pos,
                            in_list=count > 1 or bool(flags & _NEXT),
                            readable=readable,
                            writable=writable,
                            seen_writable=seen_writable,
                        )
                        readable_len += r
                        writable_len += w
                    elif flags & _WRITE:
                        seen_writable = True
                        memory.slices(addr, length, writable)
                        writable_len += length
                    else:
                        if seen_writable:
                            raise PackedReadableAfterWritable(
                                "device-readable descriptor follows a device-writable one",
                                queue=queue,
                                descriptor=pos,
                            )
                        memory.slices(addr, length, readable)
                        readable_len += length
                    if readable_len + writable_len > _MAX_CHAIN_BYTES:
                        raise PackedChainLengthOverflow(
                            f"list from descriptor {head_pos} holds "
                            f"{readable_len + writable_len} bytes, more than a used "
                            "descriptor's 32-bit length can report",
                            queue=queue,
                            descriptor=pos,
                        )
                except GuestMemoryError as exc:
                    error = PackedBufferOutOfMemory(
                        f"buffer {addr:#x}+{length:#x} is not in guest memory",
                        queue=queue,
                        descriptor=pos,
                    )
                    error.__cause__ = exc
                except VirtqueueError as exc:
                    error = exc
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
                avail_bit ^= _AVAIL
                avail_ok ^= _BOTH
            if not flags & _NEXT:
                break
            addr, length, buf_id, flags = _unpack_desc(desc, pos * _DESC_SIZE)
        in_flight = self._in_flight
        if buf_id in in_flight:
            raise self._break(
                BufferIdInUse(
                    f"list from descriptor {head_pos} has buffer ID {buf_id}, which is still "
                    "outstanding (the device has not used it)",
                    queue=queue,
                    descriptor=(pos - 1) % size,
                )
            )
        in_flight[buf_id] = count
        self._outstanding += count
        self._avail_pos = pos
        if wrap != self._avail_wrap:
            self._set_avail_wrap(wrap)
        self.popped += 1
        if error is not None:
            error.head = buf_id
            raise error
        return DescriptorChain(buf_id, readable, writable, readable_len, writable_len)

    def _too_long(self, head_pos: int, pos: int, room: int) -> VirtqueueError:
        if room == self.size:
            detail = f"is longer than the queue size {self.size}"
        else:
            detail = (
                f"needs more than the {room} descriptors the ring has free (queue size "
                f"{self.size}, {self.size - room} still in use by the device)"
            )
        return PackedChainTooLong(
            f"list from descriptor {head_pos} {detail}", queue=self.index, descriptor=pos
        )

    def _indirect(
        self,
        addr: int,
        length: int,
        pos: int,
        *,
        in_list: bool,
        readable: list[memoryview],
        writable: list[memoryview],
        seen_writable: bool,
    ) -> tuple[int, int, bool]:
        """Translate the indirect table of ring descriptor ``pos`` (§2.8.7, §2.8.19).

        Returns the readable and writable bytes added and whether a writable
        element has been seen.  Flags other than VIRTQ_DESC_F_WRITE in table
        entries, and WRITE on the indirect descriptor itself, are reserved and
        ignored by the device (§2.8.7), so they are not errors.
        """
        queue = self.index
        if in_list:
            raise IndirectInList(
                "indirect descriptor is part of a list linked by VIRTQ_DESC_F_NEXT",
                queue=queue,
                descriptor=pos,
            )
        if not self.indirect:
            raise PackedIndirectNotNegotiated(
                "descriptor has VIRTQ_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC "
                "was not negotiated",
                queue=queue,
                descriptor=pos,
            )
        if length == 0 or length % _DESC_SIZE:
            raise PackedBadIndirectTableLength(
                f"indirect table length {length} is not a non-zero multiple of 16",
                queue=queue,
                descriptor=pos,
            )
        entries = length // _DESC_SIZE
        if entries > self.size:
            raise PackedIndirectTooLong(
                f"indirect table of {entries} descriptors is longer than the "
                f"queue size {self.size}",
                queue=queue,
                descriptor=pos,
            )
        memory = self.memory
        try:
            table = memory.view(addr, length)
        except GuestMemoryError as exc:
            raise PackedBufferOutOfMemory(
                f"indirect table at {addr:#x}+{length:#x} is not in guest memory",
                queue=queue,
                descriptor=pos,
            ) from exc
        if entries >= TABLE_MIN and not seen_writable:
            # A long table as Linux writes one (flags 0 or WRITE, readable first): read
            # whole (:mod:`~pyvirtio.virtqueue.table`); any other goes entry by entry.
            fields = table_fields(table, entries)
            flags = fields[3::4]
            count = flags.count(0)
            if count + flags.count(_WRITE) == entries and _WRITE not in flags[:count]:
                found = table_views(memory, fields[0::4], fields[1::4], count,
                                    _MAX_CHAIN_BYTES)
                if found is not None:
                    readable.extend(found[0])
                    writable.extend(found[1])
                    return found[2], found[3], count < entries
        readable_len = writable_len = 0
        for entry in range(entries):
            e_addr, e_len, _id, e_flags = _unpack_desc(table, entry * _DESC_SIZE)
            try:
                if e_flags & _WRITE:
                    seen_writable = True
                    memory.slices(e_addr, e_len, writable)
                    writable_len += e_len
                else:
                    if seen_writable:
                        raise PackedReadableAfterWritable(
                            f"indirect table entry {entry}: device-readable element follows "
                            "a device-writable one",
                            queue=queue,
                            descriptor=pos,
                        )
                    memory.slices(e_addr, e_len, readable)
                    readable_len += e_len
            except GuestMemoryError as exc:
                raise PackedBufferOutOfMemory(
                    f"indirect table entry {entry}: buffer {e_addr:#x}+{e_len:#x} is not in "
                    "guest memory",
                    queue=queue,
                    descriptor=pos,
                ) from exc
        return readable_len, writable_len, seen_writable

    # -- taking buffers back ---------------------------------------------------------------

    def mark(self) -> None:
        """Remember the current position, for :meth:`rewind`.

        A device that needs several buffers for one request (virtio-net's mergeable
        receive buffers) marks before popping the first, and rewinds when the
        driver has not made enough available yet.  The mark lasts until the next
        :meth:`mark`, :meth:`rewind`, :meth:`push` or :meth:`push_many`.
        """
        self._mark = _PackedMark(self)

    def rewind(self) -> None:
        """Give back every buffer popped since :meth:`mark`: they stay available and
        the next :meth:`pop` returns them again, in the same order.

        The driver sees nothing: popping writes nothing to the ring (§2.8.21.1),
        so the device restores its next position, the Driver Ring Wrap Counter
        (§2.8.1) and its record of the buffers in flight.

        Raises:
            ValueError: no mark is set (a bug in the caller, not the driver).
        """
        mark = self._mark
        if mark is None:
            raise ValueError(f"queue {self.index}: rewind without a mark")
        self._mark = None
        self._avail_pos = mark.avail_pos
        self._set_avail_wrap(mark.avail_wrap)
        self._outstanding = mark.outstanding
        self._in_flight = mark.in_flight
        self.popped = mark.popped

    def ring_full(self) -> bool:
        """Whether every descriptor of the ring belongs to a buffer popped and not used:
        the driver can make nothing more available before the device uses one."""
        return self._outstanding >= self.size

    # -- used descriptors ----------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return buffer ``head`` (its Buffer ID) to the driver with ``length`` bytes written.

        Writes one used descriptor at the device's used position, ``len`` and
        ``id`` before ``flags`` (§2.8.21.1.1 by symmetry: the flags publish it),
        with VIRTQ_DESC_F_WRITE when data was written (§2.8.3), then skips the
        used position over every descriptor of the buffer's list (§2.8.6).

        Raises:
            ValueError: ``head`` is not a buffer this queue popped and has not
                pushed (a bug in the device, not the driver).
        """
        self._mark = None
        count = self._in_flight.pop(head, None)
        if count is None:
            raise ValueError(f"queue {self.index}: buffer ID {head} is not outstanding")
        desc = self._ring().desc
        pos = self._used_pos
        desc.u32[4 * pos + 2] = length
        desc.u16[8 * pos + 6] = head
        desc.u16[8 * pos + 7] = self._used_flags | (_WRITE if length else 0)
        pos = self._used_pos + count
        if pos >= self.size:
            pos -= self.size
            self._used_wrap ^= 1
            self._used_flags ^= _BOTH
        self._used_pos = pos
        self._outstanding -= count
        self._pushed += count

    def push_many(self, used: Sequence[tuple[int, int]]) -> None:
        """Return several buffers ``(Buffer ID, length)`` at once: the driver sees all
        or none.

        One used descriptor per buffer, as :meth:`push` writes them, except that
        the first one's ``flags`` are written last: the driver polls the flags at
        its next used position (§2.8.2, §2.8.22), so until then it sees none of
        the batch, and after that all of it.  This mirrors the driver's rule for a
        batch of available descriptors (§2.8.21.1: it "defers updating the
        descriptor flags for the first descriptor ... until after the rest of the
        descriptors have been initialized").  A device whose request spans several
        buffers uses them together this way (virtio-net, §5.1.9.4).

        Raises:
            ValueError: a Buffer ID is not outstanding, or appears twice (a bug in
                the device, not the driver); nothing is written then.
        """
        self._mark = None
        if not used:
            return
        in_flight = self._in_flight
        counts: list[int] = []
        for head, _length in used:
            count = in_flight.pop(head, None)
            if count is None:
                for (taken, _n), n in zip(used, counts, strict=False):
                    in_flight[taken] = n
                raise ValueError(f"queue {self.index}: buffer ID {head} is not outstanding")
            counts.append(count)
        ring = self._ring().desc
        lengths, words = ring.u32, ring.u16
        size = self.size
        pos = self._used_pos
        used_flags = self._used_flags
        first_flags_word = 8 * pos + 7
        first_flags = 0
        total = 0
        for i, ((head, length), count) in enumerate(zip(used, counts, strict=True)):
            lengths[4 * pos + 2] = length
            words[8 * pos + 6] = head
            flags = used_flags | (_WRITE if length else 0)
            if i:
                words[8 * pos + 7] = flags
            else:
                first_flags = flags
            total += count
            pos += count
            if pos >= size:
                pos -= size
                self._used_wrap ^= 1
                used_flags ^= _BOTH
        words[first_flags_word] = first_flags
        self._used_pos = pos
        self._used_flags = used_flags
        self._outstanding -= total
        self._pushed += total

    # -- notifications -------------------------------------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to send available buffer notifications (§2.8.10)."""
        self._ring().device.u16[1] = RING_EVENT_FLAGS_DISABLE

    def enable_notifications(self, at: int | None = None) -> bool:
        """Ask for notifications again; return True if buffers arrived meanwhile.

        With EVENT_IDX the device asks for an event at its next descriptor
        (RING_EVENT_FLAGS_DESC, the offset and wrap counter written first);
        otherwise for every event (RING_EVENT_FLAGS_ENABLE).

        Args:
            at: the descriptor from which on new buffers matter, as
                :attr:`last_avail_idx` encodes it (position, Driver Ring Wrap
                Counter in bit 15); default: the next one to pop.  After a
                :meth:`rewind` the device waits for buffers beyond those already
                available and passes where it had popped up to: the event asks
                the driver to notify when it makes that descriptor available
                (§2.8.10), and the answer says whether it already did.
        """
        ring = self._ring()
        if at is None:
            at = self.last_avail_idx
            pos, avail_ok = self._avail_pos, self._avail_ok
        else:
            pos = at & _OFF_MASK
            avail_ok = _AVAIL if at & PACKED_EVENT_WRAP else _USED
        suppress = ring.device.u16
        if self.event_idx:
            suppress[0] = at
            suppress[1] = RING_EVENT_FLAGS_DESC
        else:
            suppress[1] = RING_EVENT_FLAGS_ENABLE
        if self.broken is not None:
            return False
        full_barrier()
        flags: int = ring.desc.u16[8 * pos + 7]
        return flags & _BOTH == avail_ok

    def needs_notification(self) -> bool:
        """Whether the driver wants a used buffer notification now (§2.8.10).

        Call after pushing a batch; a True answer is consumed.  With
        RING_EVENT_FLAGS_DESC the driver is notified when a used descriptor was
        written at or over its event position since the last notification.  A
        structure that breaks §2.8.10 or §2.8.14 gets a notification (the driver
        is never left waiting) and is reported by the next :meth:`pop`.
        """
        pushed = self._pushed
        if not pushed:
            return False
        full_barrier()
        suppress = self._ring().driver.u16
        off_wrap, flags = suppress[0], suppress[1]
        size = self.size
        old = self._signalled
        self._signalled = new = self._linear(self._used_pos, self._used_wrap)
        self._pushed = 0
        if flags == RING_EVENT_FLAGS_ENABLE:
            return True
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            off = off_wrap & _OFF_MASK
            if off >= size:
                self._report_event(
                    off_wrap,
                    flags,
                    BadEventSuppression(
                        f"driver event offset {off} is beyond the ring of {size}",
                        queue=self.index,
                    ),
                )
                return True
            valid = self._signalled_valid
            self._signalled_valid = True
            if not valid:
                return True  # no earlier decision to measure from: do not risk a lost event
            event = off if off_wrap & PACKED_EVENT_WRAP else off + size
            return pushed >= 2 * size or (event - old) % (2 * size) < (new - old) % (2 * size)
        if flags > RING_EVENT_FLAGS_DESC | RING_EVENT_FLAGS_DISABLE:
            exc: VirtqueueError = EventSuppressionReservedBits(
                f"driver event flags {flags:#06x} set reserved bits 2-15", queue=self.index
            )
        elif flags == RING_EVENT_FLAGS_DESC:
            exc = BadEventSuppression(
                "driver event flags are RING_EVENT_FLAGS_DESC but VIRTIO_F_EVENT_IDX was "
                "not negotiated",
                queue=self.index,
            )
        else:
            exc = BadEventSuppression(
                f"driver event flags value {flags:#x} is reserved", queue=self.index
            )
        self._report_event(off_wrap, flags, exc)
        return True

    def _report_event(self, off_wrap: int, flags: int, exc: VirtqueueError) -> None:
        """Queue ``exc`` for the next pop(), once per distinct bad structure."""
        key = (off_wrap, flags)
        if self._reported_event != key:
            self._reported_event = key
            self._deferred = exc
