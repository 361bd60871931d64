"""Inflight I/O tracking for split rings (vhost-user.rst, "Inflight I/O tracking").

The back-end records, in a buffer the front-end keeps
(``VHOST_USER_GET_INFLIGHT_FD`` / ``SET_INFLIGHT_FD``), which chains it took and
has not returned yet. If the back-end dies (``kill -9``) and a new one connects,
the front-end hands the same buffer back, and the new back-end resubmits
exactly those chains, in the order they were taken. So the guest sees no error
and no request is lost.

Layout of one queue's region, as vhost-user.rst recommends::

    struct QueueRegionSplit {            // 16 bytes
        u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
        struct DescStateSplit {          // 16 bytes each, one per descriptor
            u8 inflight; u8 padding[5]; u16 next; u64 counter;
        } desc[desc_num];
    };

The front-end keeps the buffer, and a back-end may die between any two
stores, so each field is written with one aligned store of its width
(:mod:`pyvirtio.virtqueue.words`): the next back-end finds the old value or the
new one, never a half-cleared field.
"""

from __future__ import annotations

from pyvirtio.virtqueue.words import Words

__all__ = ["InflightRegion", "region_size"]

_HEADER_SIZE = 16
_DESC_STATE = 16
# Header fields, in 16-bit words.
_VERSION = 4
_DESC_NUM = 5
_LAST_BATCH = 6
_USED_IDX = 7


def region_size(queue_size: int) -> int:
    """Bytes of one queue's region, rounded up to 64 (as libvhost-user lays it out)."""
    raw = _HEADER_SIZE + _DESC_STATE * queue_size
    return (raw + 63) // 64 * 64


class InflightRegion:
    """One split queue's inflight state, over a view of the shared buffer.

    Args:
        view: ``region_size(queue_size)`` bytes of the inflight buffer.
        queue_size: the ring's size (the number of descriptor states).
    """

    __slots__ = ("counter", "size", "u16", "u64", "view")

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < region_size(queue_size):
            raise ValueError(f"inflight region of {len(view)} bytes is too small for "
                             f"a queue of {queue_size}")
        words = Words(view, 8, "inflight region")
        self.view = view
        #: Descriptor state ``d``: ``inflight`` is byte 16 + 16d, ``next`` u16[8d + 11],
        #: ``counter`` u64[2d + 3].
        self.u16 = words.u16
        self.u64 = words.u64
        self.size = queue_size
        #: The next order number a taken chain gets.
        self.counter = 1

    def release(self) -> None:
        """Release the views of the buffer, so its mapping can be closed."""
        for view in (self.u16, self.u64, self.view):
            view.release()

    @property
    def initialized(self) -> bool:
        """A back-end wrote this region before (version is not 0)."""
        return bool(self.u16[_VERSION])

    def reset(self, used_idx: int) -> None:
        """Start fresh: no chain in flight."""
        self.view[:] = bytes(len(self.view))
        u16 = self.u16
        u16[_DESC_NUM] = self.size
        u16[_USED_IDX] = used_idx
        u16[_VERSION] = 1  # last: a region with a version is complete
        self.counter = 1

    def recover(self, used_idx: int) -> list[int]:
        """After a reconnect: the heads still in flight, oldest first.

        First, if the ring's used index moved past the region's record, the
        last batch of used chains did reach the driver, so they are no longer
        in flight.
        """
        view, u16, u64 = self.view, self.u16, self.u64
        recorded = u16[_USED_IDX]
        if recorded != used_idx:
            head = u16[_LAST_BATCH]
            for _ in range(min((used_idx - recorded) & 0xFFFF, self.size)):
                if head >= self.size:
                    break
                view[_HEADER_SIZE + _DESC_STATE * head] = 0
                head = u16[8 * head + 11]
            u16[_USED_IDX] = used_idx
        pending: list[tuple[int, int]] = []
        for head in range(self.size):
            if view[_HEADER_SIZE + _DESC_STATE * head]:
                pending.append((u64[2 * head + 3], head))
        pending.sort()
        self.counter = (pending[-1][0] + 1) if pending else 1
        return [head for _counter, head in pending]

    def taken(self, head: int) -> None:
        """The device took chain ``head`` from the available ring."""
        self.u64[2 * head + 3] = self.counter
        self.counter += 1
        self.view[_HEADER_SIZE + _DESC_STATE * head] = 1

    def forget_since(self, counter: int) -> None:
        """Undo :meth:`taken` for every chain taken with order number ``counter`` or later.

        The device gave those chains back unused (a rewind): they are available
        again, not in flight, and the next chains taken reuse the numbers.
        """
        view, u64 = self.view, self.u64
        for head in range(self.size):
            offset = _HEADER_SIZE + _DESC_STATE * head
            if view[offset] and u64[2 * head + 3] >= counter:
                view[offset] = 0
        self.counter = counter

    def before_used(self, head: int) -> None:
        """Chain ``head`` is about to go in the used ring: record it as the last batch."""
        u16 = self.u16
        u16[8 * head + 11] = u16[_LAST_BATCH]
        u16[_LAST_BATCH] = head

    def after_used(self, head: int, used_idx: int) -> None:
        """Chain ``head`` is in the used ring and the used index is ``used_idx``."""
        self.view[_HEADER_SIZE + _DESC_STATE * head] = 0
        self.u16[_USED_IDX] = used_idx
