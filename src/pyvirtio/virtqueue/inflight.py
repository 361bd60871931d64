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
"""

from __future__ import annotations

import struct

__all__ = ["InflightRegion", "region_size"]

_HEADER = struct.Struct("<QHHHH")
_DESC_STATE = 16
_VERSION_OFFSET = 8
_LAST_BATCH_OFFSET = 12
_USED_IDX_OFFSET = 14
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_pack_u16 = _U16.pack_into
_pack_u64 = _U64.pack_into
_unpack_u16 = _U16.unpack_from


def region_size(queue_size: int) -> int:
    """Bytes of one queue's region, rounded up to 64 (as libvhost-user lays it out)."""
    raw = _HEADER.size + _DESC_STATE * queue_size
    return (raw + 63) // 64 * 64


class InflightRegion:
    """One split queue's inflight state, over a view of the shared buffer.

    Args:
        view: ``region_size(queue_size)`` bytes of the inflight buffer.
        queue_size: the ring's size (the number of descriptor states).
    """

    __slots__ = ("counter", "size", "view")

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < region_size(queue_size):
            raise ValueError(f"inflight region of {len(view)} bytes is too small for "
                             f"a queue of {queue_size}")
        self.view = view
        self.size = queue_size
        #: The next order number a taken chain gets.
        self.counter = 1

    @property
    def initialized(self) -> bool:
        """A back-end wrote this region before (version is not 0)."""
        return bool(_unpack_u16(self.view, _VERSION_OFFSET)[0])

    def reset(self, used_idx: int) -> None:
        """Start fresh: no chain in flight."""
        self.view[:] = bytes(len(self.view))
        _HEADER.pack_into(self.view, 0, 0, 1, self.size, 0, used_idx)
        self.counter = 1

    def recover(self, used_idx: int) -> list[int]:
        """After a reconnect: the heads still in flight, oldest first.

        First, if the ring's used index moved past the region's record, the
        last batch of used chains did reach the driver, so they are no longer
        in flight.
        """
        view = self.view
        recorded = _unpack_u16(view, _USED_IDX_OFFSET)[0]
        if recorded != used_idx:
            head = _unpack_u16(view, _LAST_BATCH_OFFSET)[0]
            for _ in range(min((used_idx - recorded) & 0xFFFF, self.size)):
                if head >= self.size:
                    break
                offset = _HEADER.size + _DESC_STATE * head
                view[offset] = 0
                head = _unpack_u16(view, offset + 6)[0]
            _pack_u16(view, _USED_IDX_OFFSET, used_idx)
        pending: list[tuple[int, int]] = []
        for head in range(self.size):
            offset = _HEADER.size + _DESC_STATE * head
            if view[offset]:
                pending.append((_U64.unpack_from(view, offset + 8)[0], head))
        pending.sort()
        self.counter = (pending[-1][0] + 1) if pending else 1
        return [head for _counter, head in pending]

    def taken(self, head: int) -> None:
        """The device took chain ``head`` from the available ring."""
        offset = _HEADER.size + _DESC_STATE * head
        _pack_u64(self.view, offset + 8, self.counter)
        self.counter += 1
        self.view[offset] = 1

    def forget_since(self, counter: int) -> None:
        """Undo :meth:`taken` for every chain taken with order number ``counter`` or later.

        The device gave those chains back unused (a rewind): they are available
        again, not in flight, and the next chains taken reuse the numbers.
        """
        view = self.view
        for head in range(self.size):
            offset = _HEADER.size + _DESC_STATE * head
            if view[offset] and _U64.unpack_from(view, offset + 8)[0] >= counter:
                view[offset] = 0
        self.counter = counter

    def before_used(self, head: int) -> None:
        """Chain ``head`` is about to go in the used ring: record it as the last batch."""
        offset = _HEADER.size + _DESC_STATE * head
        view = self.view
        _pack_u16(view, offset + 6, _unpack_u16(view, _LAST_BATCH_OFFSET)[0])
        _pack_u16(view, _LAST_BATCH_OFFSET, head)

    def after_used(self, head: int, used_idx: int) -> None:
        """Chain ``head`` is in the used ring and the used index is ``used_idx``."""
        self.view[_HEADER.size + _DESC_STATE * head] = 0
        _pack_u16(self.view, _USED_IDX_OFFSET, used_idx)
