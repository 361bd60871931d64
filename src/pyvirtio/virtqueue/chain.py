"""Descriptor chains as the device sees them: readable and writable buffers.

A chain is resolved once, when it is popped: every descriptor is read exactly
once and its buffer translated into memoryviews over guest memory, so there is
no time-of-check/time-of-use gap and no copying.  VIRTIO 1.4 §2.7.4.1: the
device must not assume any particular framing, so devices read headers with
:func:`gather` and take data ranges with :func:`take_views`, which work however
the driver split its buffers.
"""

from __future__ import annotations

__all__ = ["DescriptorChain", "gather", "scatter", "take_views", "total_length"]


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
    out: list[memoryview] = []
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
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
    pos = 0
    for v in take_views(views, offset, len(data)):
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n
    return pos
