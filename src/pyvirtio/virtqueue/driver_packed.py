"""The driver side of a packed virtqueue (VIRTIO 1.4 §2.8).

:class:`DriverPackedQueue` hands out buffer IDs, writes lists of descriptors
(the first one's flags last, §2.8.21.1) with one aligned store per field
(:mod:`pyvirtio.virtqueue.words`), decides about notifications and collects
used descriptors.  It drives the device side
(:class:`~pyvirtio.virtqueue.packed.PackedQueue`) in tests and is the packed
ring engine of pyvirtio's front-end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pyvirtio.errors import DeviceRingError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import (
    PACKED_DESC,
    PACKED_EVENT_WRAP,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.virtqueue.barrier import full_barrier
from pyvirtio.virtqueue.packed import (
    PackedRingAddresses,
    PackedRingViews,
    check_packed_queue_size,
)

__all__ = ["DriverPackedQueue"]

_AVAIL = VIRTQ_DESC_F_AVAIL
_USED = VIRTQ_DESC_F_USED
_BOTH = _AVAIL | _USED
_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_DESC_SIZE = PACKED_DESC.size
_OFF_MASK = PACKED_EVENT_WRAP - 1


class DriverPackedQueue:
    """The driver side of a packed virtqueue, laid out in guest memory.

    It hands out buffer IDs, writes lists of descriptors (the first one's
    ``flags`` last, §2.8.21.1), decides about notifications from the device
    event suppression structure and collects used descriptors.  Tests use
    :meth:`write_desc`, :meth:`add_raw` and :meth:`set_driver_event` to break
    the rules on purpose.

    Args:
        memory: guest memory to build the ring in.
        size: queue size, 1 to 32768.
        addrs: GPAs of the ring parts (descriptor ring 16-aligned, event
            suppression structures 4-aligned).
        event_idx: VIRTIO_F_EVENT_IDX was negotiated.
        in_order: VIRTIO_F_IN_ORDER was negotiated: a used descriptor may stand
            for every outstanding buffer up to its ID (§2.8.8).
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        addrs: PackedRingAddresses,
        *,
        event_idx: bool = False,
        in_order: bool = False,
    ) -> None:
        check_packed_queue_size(size)
        self.memory = memory
        self.size = size
        self.addrs = addrs
        self.event_idx = event_idx
        self.in_order = in_order
        self._views = PackedRingViews(memory, addrs, size, None)
        for part in (self._views.desc, self._views.driver, self._views.device):
            part.view[:] = bytes(len(part.view))  # §2.8.13: the ring starts zeroed
        #: Driver ring wrap counter and next descriptor to fill.
        self.next_avail = 0
        self.avail_wrap = 1
        #: Where the next used descriptor will be, and the wrap counter it will carry.
        self.next_used = 0
        self.used_wrap = 1
        self._free_ids: deque[int] = deque(range(size))
        #: Per outstanding buffer ID: ring descriptors taken and writable bytes.
        self._descs: dict[int, int] = {}
        self._writable: dict[int, int] = {}
        #: Outstanding IDs in the order they were made available (for IN_ORDER batches).
        self._order: deque[int] = deque()
        self._outstanding = 0
        self._kicked_at = 0
        self._added_since_kick = 0

    def resume_at(self, pos: int, wrap: int) -> None:
        """Put the idle ring in the state it has after every buffer up to ``pos`` in
        lap ``wrap`` was used: both positions at ``pos``, both wrap counters ``wrap``,
        the ring's flags as the device left them.  Pair it with a device started at
        ``encode_vring_base(pos, wrap, pos, wrap)``; tests use it to reach wraps quickly.

        Raises:
            ValueError: buffers are outstanding, or ``pos`` is beyond the ring.
        """
        if self._descs:
            raise ValueError("cannot move a ring with outstanding buffers")
        if not 0 <= pos < self.size:
            raise ValueError(f"position {pos} is beyond the ring of {self.size}")
        this_lap = _BOTH if wrap else 0
        for slot in range(self.size):
            used_flags = this_lap if slot < pos else this_lap ^ _BOTH
            self._views.desc.u16[8 * slot + 7] = used_flags
        self.next_avail = self.next_used = pos
        self.avail_wrap = self.used_wrap = wrap
        self._kicked_at = pos if wrap else pos + self.size
        self._added_since_kick = 0

    # -- ring space ----------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        """Ring descriptors not taken by an outstanding buffer."""
        return self.size - self._outstanding

    @property
    def outstanding(self) -> int:
        """Buffers made available and not used yet."""
        return len(self._descs)

    def avail_flags(self, wrap: int | None = None) -> int:
        """AVAIL and USED bits marking a descriptor available in lap ``wrap`` (§2.8.1)."""
        w = self.avail_wrap if wrap is None else wrap
        return _AVAIL if w else _USED

    # -- making buffers available ------------------------------------------------------------

    def write_desc(self, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        """Write raw descriptor ``pos`` (no checks: tests use it to break rules).

        One store per field, ``flags`` last.
        """
        self._write_body(pos, addr, length, buf_id)
        self._views.desc.u16[8 * pos + 7] = flags

    def _write_body(self, pos: int, addr: int, length: int, buf_id: int) -> None:
        """Everything of descriptor ``pos`` but the flags, which publish it."""
        desc = self._views.desc
        desc.u64[2 * pos] = addr
        desc.u32[4 * pos + 2] = length
        desc.u16[8 * pos + 6] = buf_id

    def add_raw(
        self,
        descs: Sequence[tuple[int, int, int]],
        *,
        buf_id: int | None = None,
        link: bool = True,
    ) -> int:
        """Make a list of descriptors ``(addr, len, flags)`` available as one buffer.

        The AVAIL/USED bits are set for each descriptor's lap, VIRTQ_DESC_F_NEXT
        on all but the last when ``link`` (otherwise ``flags`` are written as
        given), the ID in every descriptor, and the first descriptor's flags
        last (§2.8.21.1).

        Returns:
            The Buffer ID.

        Raises:
            ValueError: no free ID or not enough free ring descriptors, or no
                descriptor at all.
        """
        if not descs:
            raise ValueError("a buffer needs at least one element")
        if len(descs) > self.free_count:
            raise ValueError(f"{len(descs)} descriptors needed, {self.free_count} free")
        if buf_id is None:
            if not self._free_ids:
                raise ValueError("no free buffer ID")
            buf_id = self._free_ids.popleft()
        elif buf_id in self._free_ids:
            self._free_ids.remove(buf_id)
        head_pos, head_flags = self.next_avail, 0
        writable = 0
        last = len(descs) - 1
        for i, (addr, length, given) in enumerate(descs):
            flags = given | self.avail_flags() | (_NEXT if link and i < last else 0)
            if flags & _WRITE and not flags & _INDIRECT:
                writable += length
            if i == 0:  # everything but the flags, which publish the list at the end
                self._write_body(self.next_avail, addr, length, buf_id)
                head_flags = flags
            else:
                self.write_desc(self.next_avail, addr, length, buf_id, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self._views.desc.u16[8 * head_pos + 7] = head_flags
        self._descs[buf_id] = len(descs)
        self._writable[buf_id] = writable
        self._order.append(buf_id)
        self._outstanding += len(descs)
        self._added_since_kick += len(descs)
        return buf_id

    def add(
        self, readable: Sequence[tuple[int, int]] = (), writable: Sequence[tuple[int, int]] = ()
    ) -> int:
        """Chain buffers given as (GPA, length), readable first, and make them available.

        Returns:
            The Buffer ID the device will return.
        """
        return self.add_raw(
            [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        )

    def add_indirect(
        self,
        table_gpa: int,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Make a buffer available through one indirect table written at ``table_gpa``.

        Table entries carry only VIRTQ_DESC_F_WRITE (§2.8.19).
        """
        elems = [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        table = bytearray(_DESC_SIZE * len(elems))
        for i, (addr, length, flags) in enumerate(elems):
            PACKED_DESC.pack_into(table, i * _DESC_SIZE, addr, length, 0, flags)
        self.memory.write(table_gpa, bytes(table))
        buf_id = self.add_raw([(table_gpa, len(table), _INDIRECT)])
        self._writable[buf_id] = sum(n for _a, n, f in elems if f & _WRITE)
        return buf_id

    # -- notifications -------------------------------------------------------------------

    def should_kick(self) -> bool:
        """Whether the device wants a notification for what was made available (§2.8.10).

        With RING_EVENT_FLAGS_DESC: when a descriptor was made available at the
        device's event position since the last kick decision.
        """
        full_barrier()
        suppress = self._views.device.u16
        off_wrap, flags = suppress[0], suppress[1]
        size = self.size
        new = self.next_avail if self.avail_wrap else self.next_avail + size
        old, added = self._kicked_at, self._added_since_kick
        self._kicked_at, self._added_since_kick = new, 0
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        off = off_wrap & _OFF_MASK
        event = off if off_wrap & PACKED_EVENT_WRAP else off + size
        return added >= 2 * size or (event - old) % (2 * size) < (new - old) % (2 * size)

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        """Write the driver event suppression structure: offset/wrap first, then flags."""
        suppress = self._views.driver.u16
        suppress[0] = off_wrap
        suppress[1] = flags

    def disable_interrupts(self) -> None:
        """Ask the device for no used buffer notifications (RING_EVENT_FLAGS_DISABLE)."""
        self.set_driver_event(RING_EVENT_FLAGS_DISABLE)

    def enable_interrupts(self, after: int = 0) -> None:
        """Ask for used buffer notifications again.

        With EVENT_IDX: once the device has used the descriptor ``after``
        descriptors past the next used position (0: the next buffer it uses);
        otherwise for every used buffer.
        """
        if not self.event_idx:
            self.set_driver_event(RING_EVENT_FLAGS_ENABLE)
            return
        pos, wrap = self.next_used + after, self.used_wrap
        while pos >= self.size:
            pos -= self.size
            wrap ^= 1
        self.set_driver_event(RING_EVENT_FLAGS_DESC, pos | wrap << 15)

    # -- used descriptors ----------------------------------------------------------------

    def has_used(self) -> bool:
        """Whether the device wrote a used descriptor at the next used position (§2.8.22)."""
        if not self._descs:
            return False
        flags: int = self._views.desc.u16[8 * self.next_used + 7]
        want = _BOTH if self.used_wrap else 0
        return flags & _BOTH == want

    def get_used(self) -> list[tuple[int, int]]:
        """Collect used buffers as (Buffer ID, length), freeing their IDs and descriptors.

        With ``in_order``, a used descriptor stands for every outstanding buffer
        up to its ID; the skipped ones were used completely (§2.8.8), so their
        length is their whole writable size.

        Raises:
            DeviceRingError: the device used an ID that is not outstanding
                (VIRTIO 1.4 §2.8.6).
        """
        out: list[tuple[int, int]] = []
        desc = self._views.desc
        while self.has_used():
            pos = self.next_used
            length, buf_id = desc.u32[4 * pos + 2], desc.u16[8 * pos + 6]
            if buf_id not in self._descs:
                raise DeviceRingError(
                    f"device used buffer ID {buf_id} at descriptor {pos}, which is not "
                    "outstanding"
                )
            if self.in_order:
                while True:
                    first = self._order.popleft()
                    if first == buf_id:
                        break
                    out.append((first, self._writable[first]))
                    self._release(first)
            else:
                self._order.remove(buf_id)
            out.append((buf_id, length))
            self._release(buf_id)
        return out

    def _release(self, buf_id: int) -> None:
        count = self._descs.pop(buf_id)
        del self._writable[buf_id]
        self._outstanding -= count
        self._free_ids.append(buf_id)
        self.next_used += count
        if self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap ^= 1
