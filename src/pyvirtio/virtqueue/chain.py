"""Descriptor chains as the device sees them: readable and writable buffers.

A chain is resolved once, when it is popped: every descriptor is read exactly
once and its buffer translated into memoryviews over guest memory, so there is
no time-of-check/time-of-use gap and no copying.  VIRTIO 1.4 §2.7.4.1: the
device must not assume any particular framing, so devices read headers with
:func:`gather` and take data ranges with :func:`take_views`, which work however
the driver split its buffers.
"""

from __future__ import annotations

import struct
from typing import Any

from pyvirtio.errors import RequestTooShort

__all__ = [
    "ChainReader",
    "ChainWriter",
    "DescriptorChain",
    "gather",
    "scatter",
    "take_views",
    "total_length",
]


class DescriptorChain:
    """One available buffer: the head index and its translated buffers.

    Attributes:
        head: the id the used element returns: for a split ring the descriptor index
            the driver put in the available ring, for a packed ring the Buffer ID.
        readable: device-readable buffers, in chain order.
        writable: device-writable buffers, in chain order.
        readable_len / writable_len: their total lengths in bytes.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def reader(self) -> ChainReader:
        """A cursor over the device-readable bytes (what the driver sent)."""
        return ChainReader(self.readable, self.readable_len)

    def writer(self) -> ChainWriter:
        """A cursor over the device-writable bytes (the answer's room)."""
        return ChainWriter(self.writable, self.writable_len)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B"
            f"/{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )


def total_length(views: list[memoryview]) -> int:
    """Sum of the lengths of ``views``."""
    return sum(len(v) for v in views)


def take_views(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """Views covering ``length`` bytes starting ``offset`` bytes into ``views``.

    The result may be shorter than asked when ``views`` end first; callers check.
    """
    first, count = 0, len(views)
    while first < count and offset >= len(views[first]):
        offset -= len(views[first])
        first += 1
    rest = views[first:]
    if not offset and rest and length > len(rest[0]) and sum(map(len, rest)) == length:
        # Exactly the buffers from here to the end (a READ's pages after the header's
        # own buffer, a WRITE's data): the list as it is, not one view at a time.
        return rest
    out: list[memoryview] = []
    for v in rest:
        n = len(v)
        if offset >= n:  # an empty buffer
            continue
        piece = v[offset : offset + length] if (offset or length < n) else v
        out.append(piece)
        length -= len(piece)
        offset = 0
        if length <= 0:
            break
    return out


def gather(views: list[memoryview], offset: int, length: int) -> bytes:
    """Copy ``length`` bytes starting ``offset`` bytes into ``views`` (short at the end)."""
    first = views[0] if views else None
    if first is not None and offset + length <= len(first):
        return bytes(first[offset : offset + length])
    return b"".join(take_views(views, offset, length))


def scatter(views: list[memoryview], offset: int, data: bytes) -> int:
    """Copy ``data`` into ``views`` starting ``offset`` bytes in; return bytes copied."""
    size = len(data)
    if views and offset + size <= len(views[0]):  # all of it in the first buffer
        views[0][offset : offset + size] = data
        return size
    pos = 0
    for v in take_views(views, offset, size):
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n
    return pos


class _Cursor:
    """A position in a list of buffers, shared by :class:`ChainReader` and :class:`ChainWriter`."""

    __slots__ = ("_views", "offset", "size")

    def __init__(self, views: list[memoryview], size: int) -> None:
        self._views = views
        #: Bytes consumed so far.
        self.offset = 0
        #: Total bytes of the buffers.
        self.size = size

    @property
    def remaining(self) -> int:
        """Bytes after the cursor."""
        return self.size - self.offset

    def take(self, length: int) -> list[memoryview]:
        """Views of the next ``length`` bytes (zero-copy: for ``os.preadv``/``os.pwritev``),
        and move past them.

        Raises:
            RequestTooShort: fewer than ``length`` bytes remain (the cursor stays).
        """
        self._need(length)
        views = take_views(self._views, self.offset, length)
        self.offset += length
        return views

    def skip(self, length: int) -> None:
        """Move ``length`` bytes on.

        Raises:
            RequestTooShort: fewer than ``length`` bytes remain (the cursor stays).
        """
        self._need(length)
        self.offset += length

    def _need(self, length: int) -> None:
        have = self.size - self.offset
        if length > have:
            raise RequestTooShort(
                f"{length} bytes needed at offset {self.offset}, the chain has {have} more",
                need=length, have=have,
            )


class ChainReader(_Cursor):
    """Reads what the driver sent, however it split it over descriptors (VIRTIO 1.4
    §2.7.4: the device must not assume any framing).

    ``read_obj(HEADER)`` instead of offset arithmetic::

        reader = chain.reader()
        kind, _, sector = reader.read_obj(BLK_REQ_HEADER)
        payload = reader.take(reader.remaining)
    """

    __slots__ = ()

    def read(self, length: int | None = None) -> bytes:
        """Copy the next ``length`` bytes (default: all that remain).

        Raises:
            RequestTooShort: fewer than ``length`` bytes remain.
        """
        if length is None:
            length = self.size - self.offset
        self._need(length)
        data = gather(self._views, self.offset, length)
        self.offset += length
        return data

    def read_obj(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Unpack the next ``layout.size`` bytes.

        Raises:
            RequestTooShort: the chain ends first.
        """
        return layout.unpack(self.read(layout.size))


class ChainWriter(_Cursor):
    """Writes the device's answer into the driver's writable buffers; :attr:`offset`
    is then the used length to report (VIRTIO 1.4 §2.7.8.1)."""

    __slots__ = ()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` in and move past it; return its length.

        Raises:
            RequestTooShort: less room than ``data`` needs (nothing is written).
        """
        length = len(data)
        self._need(length)
        scatter(self._views, self.offset, bytes(data))
        self.offset += length
        return length

    def write_obj(self, layout: struct.Struct, *values: Any) -> int:
        """Pack ``values`` with ``layout`` and write them.

        Raises:
            RequestTooShort: less room than ``layout.size``.
        """
        return self.write(layout.pack(*values))

    @property
    def written(self) -> int:
        """Bytes written (or taken with :meth:`take`) so far: the used length."""
        return self.offset
