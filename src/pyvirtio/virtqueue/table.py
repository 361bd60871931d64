"""Long indirect tables read whole, for split and packed rings alike.

Linux puts every request of more than one buffer in an indirect table when
VIRTIO_F_INDIRECT_DESC is negotiated; a 1 MiB FUSE READ or a block request of many
pages gives a table of over a hundred entries.  Walking such a table entry by entry
costs a Python iteration per entry.  Here the table is unpacked in one call, the
layout checks run as passes that loop in C, and buffers that follow each other in
guest memory (a guest's pages often do) become one view: fewer views to make, fewer
iovecs for ``preadv``.  A table that does not have the plain layout these passes
check is left to the ring's own walk, which names what is wrong with it.
"""

from __future__ import annotations

import functools
import struct
from bisect import bisect_left, insort
from collections.abc import Sequence
from itertools import compress
from operator import add, ne

from pyvirtio.memory import GuestMemory

__all__ = ["TABLE_MIN", "table_fields", "table_views"]

#: Tables at least this long are read whole; a shorter one (a request's few headers)
#: is quicker walked entry by entry.
TABLE_MIN = 16


@functools.lru_cache(maxsize=64)
def _table_struct(entries: int) -> struct.Struct:
    """A whole table of ``entries`` 16-byte descriptors (split and packed rings share
    the layout: address, length, then two 16-bit fields) in one unpack."""
    return struct.Struct("<" + "QIHH" * entries)


def table_fields(table: memoryview, entries: int) -> tuple[int, ...]:
    """Every field of the table, entry after entry (four per entry)."""
    return _table_struct(entries).unpack_from(table)


def table_views(memory: GuestMemory, addrs: Sequence[int], lengths: Sequence[int],
                readable: int, limit: int
                ) -> tuple[list[memoryview], list[memoryview], int, int] | None:
    """The readable and writable views of a table's buffers (the first ``readable``
    of them are device-readable) and their byte counts; None when the buffers are not
    all in one memory region or add up to more than ``limit`` bytes (the caller's
    walk then reports it).  Adjacent buffers are joined, never across the readable /
    writable boundary."""
    total = sum(lengths)
    if total > limit:
        return None
    readable_len = sum(lengths[:readable])
    entries = len(addrs)
    ends: Sequence[int] = tuple(map(add, addrs, lengths))
    cuts = list(compress(range(1, entries), map(ne, ends, addrs[1:])))
    if len(cuts) * 2 < entries:  # mostly runs: one view each
        if 0 < readable < entries and readable not in cuts:
            insort(cuts, readable)
        starts = [0, *cuts]
        addrs = tuple(addrs[i] for i in starts)
        ends = (*(ends[i - 1] for i in cuts), ends[-1])
        readable = bisect_left(starts, readable)
    views = memory.views_in_region(addrs, ends)
    if views is None:
        return None
    return views[:readable], views[readable:], readable_len, total - readable_len
