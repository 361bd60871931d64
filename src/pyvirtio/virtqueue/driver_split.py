"""The driver side of a split virtqueue (VIRTIO 1.4 §2.7).

:class:`DriverSplitQueue` builds chains, publishes them and collects used
elements, with one aligned store per ring field
(:mod:`pyvirtio.virtqueue.words`).  It drives the device side
(:class:`~pyvirtio.virtqueue.split.SplitQueue`) in tests and is the ring engine
of pyvirtio's front-end.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvirtio.errors import DeviceRingError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import (
    DESC,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pyvirtio.virtqueue.barrier import full_barrier
from pyvirtio.virtqueue.split import RingAddresses, SplitRingViews, check_queue_size

__all__ = ["DriverSplitQueue"]


class DriverSplitQueue:
    """The driver side of a split virtqueue, laid out in guest memory.

    It keeps a free list of descriptors, writes chains and the available ring,
    and reads the used ring.  Tests use :meth:`write_desc` and
    :meth:`publish` to build rings that break the rules on purpose.

    Args:
        memory: guest memory to build the rings in.
        size: queue size (power of 2).
        addrs: GPAs of the ring parts (descriptor table 16-aligned, available
            ring 2-aligned, used ring 4-aligned).
        event_idx: VIRTIO_F_EVENT_IDX was negotiated.
    """

    def __init__(
        self, memory: GuestMemory, size: int, addrs: RingAddresses, *, event_idx: bool = False
    ) -> None:
        check_queue_size(size)
        self.memory = memory
        self.size = size
        self.addrs = addrs
        self.event_idx = event_idx
        self._views = SplitRingViews(memory, addrs, size, -1)
        for part in (self._views.desc, self._views.avail, self._views.used):
            part.view[:] = bytes(len(part.view))  # before the device knows the ring
        self._free = list(range(size))
        self._chain_len: dict[int, int] = {}
        self.avail_idx = 0
        self.last_used_idx = 0
        self._kicked_at = 0

    @property
    def free_count(self) -> int:
        """Descriptors not in any outstanding chain."""
        return len(self._free)

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        """Write raw descriptor ``index`` (no checks: tests use it to break rules).

        One store per field: a device may be reading a descriptor the driver
        reuses (a racing or broken device must not see a torn field either).
        """
        desc = self._views.desc
        desc.u64[2 * index] = addr
        desc.u32[4 * index + 2] = length
        desc.u16[8 * index + 6] = flags
        desc.u16[8 * index + 7] = next_

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and advance the index (§2.7.13.2-3)."""
        avail = self._views.avail.u16
        avail[2 + (self.avail_idx & (self.size - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        avail[1] = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Overwrite the available index (tests use it to move it illegally)."""
        self.avail_idx = value & 0xFFFF
        self._views.avail.u16[1] = self.avail_idx

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` (EVENT_IDX): notify me when used idx passes it."""
        self._views.avail.u16[2 + self.size] = value & 0xFFFF

    def set_avail_flags(self, flags: int) -> None:
        """Write the available ring's flags (VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        self._views.avail.u16[0] = flags

    def add(
        self,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        *,
        publish: bool = True,
    ) -> int:
        """Chain buffers given as (GPA, length), readable first, and make it available.

        Returns:
            The head descriptor index (the id the device will use).

        Raises:
            ValueError: not enough free descriptors, or an empty chain.
        """
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if len(bufs) > len(self._free):
            raise ValueError(f"{len(bufs)} descriptors needed, {len(self._free)} free")
        ids = [self._free.pop() for _ in bufs]
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            nxt = 0 if last else ids[i + 1]
            self.write_desc(ids[i], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), nxt)
        self._chain_len[ids[0]] = len(ids)
        if publish:
            self.publish(ids[0])
        return ids[0]

    def add_indirect(
        self,
        table_gpa: int,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        *,
        publish: bool = True,
    ) -> int:
        """Make a chain available through one indirect table written at ``table_gpa``
        (``publish=False``: build it only, for :meth:`publish`)."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        table = bytearray(DESC_SIZE * len(bufs))
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            DESC.pack_into(
                table, i * DESC_SIZE, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                0 if last else i + 1,
            )
        self.memory.write(table_gpa, bytes(table))
        head = self._free.pop()
        self.write_desc(head, table_gpa, len(table), VIRTQ_DESC_F_INDIRECT)
        self._chain_len[head] = 1
        if publish:
            self.publish(head)
        return head

    def should_kick(self) -> bool:
        """Whether the device wants a notification for what was published (§2.7.10.1)."""
        full_barrier()  # the available index store before the avail_event / flags load
        used = self._views.used.u16
        new = self.avail_idx
        if self.event_idx:
            avail_event = used[2 + 4 * self.size]
            old = self._kicked_at
            kick = ((new - avail_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            kick = not used[0] & VIRTQ_USED_F_NO_NOTIFY
        self._kicked_at = new
        return bool(kick)

    def used_idx(self) -> int:
        """The device's current used index."""
        return int(self._views.used.u16[1])

    def reap(self) -> list[tuple[int, int]]:
        """Collect the used elements (id, length) not collected yet, keeping their chains.

        Chains stay built, so a caller that reuses them (a benchmark) can
        :meth:`publish` the same heads again.  With EVENT_IDX this also asks for
        a notification at the next used element (``used_event``, §2.7.10.1) and
        looks once more, so an element used meanwhile is not left unnoticed.

        Raises:
            DeviceRingError: the used index moved more than the queue size past
                what was collected: the device used buffers never made available
                (VIRTIO 1.4 §2.7.8).  Nothing is collected then.
        """
        out: list[tuple[int, int]] = []
        elems = self._views.used.u32
        avail = self._views.avail.u16
        mask = self.size - 1
        last = self.last_used_idx
        while True:
            end = self.used_idx()
            if (end - last) & 0xFFFF > self.size:
                raise DeviceRingError(
                    f"used index {end} is {(end - last) & 0xFFFF} entries past the "
                    f"driver's {last}, more than the queue size {self.size}"
                )
            while last != end:
                slot = last & mask
                out.append((elems[1 + 2 * slot], elems[2 + 2 * slot]))
                last = (last + 1) & 0xFFFF
            if not self.event_idx:
                break
            avail[2 + self.size] = last
            full_barrier()
            if self.used_idx() == last:
                break
        self.last_used_idx = last
        return out

    def get_used(self) -> list[tuple[int, int]]:
        """Collect the used elements (id, length) not collected yet, freeing their chains."""
        out = self.reap()
        for head, _length in out:
            self._release(head)
        return out

    def publish_many(self, heads: Sequence[int]) -> None:
        """Put several heads in the available ring, then move the index once."""
        avail = self._views.avail.u16
        mask = self.size - 1
        idx = self.avail_idx
        for head in heads:
            avail[2 + (idx & mask)] = head
            idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        avail[1] = idx

    def _release(self, head: int) -> None:
        count = self._chain_len.pop(head, 0)
        idx = head
        for _ in range(count):
            self._free.append(idx)
            desc = self._views.desc.u16
            flags, nxt = desc[8 * idx + 6], desc[8 * idx + 7]
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            idx = nxt
