"""The exception hierarchy of pyvirtio.

Every error pyvirtio raises on purpose derives from :class:`PyVirtioError`::

    PyVirtioError
     +-- GuestMemoryError          a guest physical / user address does not map
     +-- BadMemoryRegion           a memory region cannot be accepted
     +-- VirtqueueError            the driver broke a virtqueue rule (VIRTIO 1.4 §2.7)
     |    +-- DescriptorIndexOutOfRange
     |    +-- DescriptorLoop
     |    +-- ChainTooLong
     |    +-- ChainLengthOverflow
     |    +-- ReadableAfterWritable
     |    +-- IndirectNotNegotiated
     |    +-- NestedIndirect
     |    +-- IndirectWithNext
     |    +-- BadIndirectTableLength
     |    +-- AvailIndexJump
     |    +-- BufferOutOfMemory
     |    +-- RingOutOfMemory
     +-- VhostUserError            the vhost-user peer broke the protocol
          +-- TruncatedMessage
          +-- BadPayloadSize
          +-- UnknownRequest
          +-- MissingFds
          +-- BadRingState

Errors caused by the guest or by the socket peer ("remote" errors in h11's sense)
carry the context needed to locate the bug: the queue, the descriptor index, the
message.  Their ``spec`` attribute names the section of the specification that
was broken, so a log line alone tells a driver writer where to look.
"""

from __future__ import annotations

__all__ = [
    "AvailIndexJump",
    "BadIndirectTableLength",
    "BadMemoryRegion",
    "BadPayloadSize",
    "BadRingState",
    "BufferOutOfMemory",
    "ChainLengthOverflow",
    "ChainTooLong",
    "DescriptorIndexOutOfRange",
    "DescriptorLoop",
    "GuestMemoryError",
    "IndirectNotNegotiated",
    "IndirectWithNext",
    "MissingFds",
    "NestedIndirect",
    "PyVirtioError",
    "ReadableAfterWritable",
    "RingOutOfMemory",
    "TruncatedMessage",
    "UnknownRequest",
    "VhostUserError",
    "VirtqueueError",
]


class PyVirtioError(Exception):
    """Root of every error pyvirtio raises deliberately."""


class GuestMemoryError(PyVirtioError):
    """An address range is not (entirely) backed by guest memory."""

    def __init__(self, message: str, *, address: int, length: int) -> None:
        super().__init__(message)
        self.address = address
        self.length = length


class VirtqueueError(PyVirtioError):
    """The driver broke a rule of the virtqueue it shares with the device.

    Attributes:
        queue: index of the virtqueue (``None`` when not yet known).
        descriptor: index of the offending descriptor, if one is to blame.
        spec: the section of VIRTIO 1.4 that states the broken rule.
    """

    spec = "VIRTIO 1.4 §2.7"

    def __init__(
        self, message: str, *, queue: int | None = None, descriptor: int | None = None
    ) -> None:
        super().__init__(message)
        self.detail = message
        self.queue = queue
        self.descriptor = descriptor
        #: Head of the chain the error was found in, when the chain can be
        #: returned to the driver; ``None`` when the error concerns the ring itself.
        self.head: int | None = None

    def __str__(self) -> str:
        where = []
        if self.queue is not None:
            where.append(f"queue {self.queue}")
        if self.descriptor is not None:
            where.append(f"descriptor {self.descriptor}")
        prefix = f"{', '.join(where)}: " if where else ""
        return f"{prefix}{self.detail} ({self.spec})"


class DescriptorIndexOutOfRange(VirtqueueError):
    """A ring entry or ``next`` field names a descriptor beyond the table."""

    spec = "VIRTIO 1.4 §2.7.5"


class DescriptorLoop(VirtqueueError):
    """Following ``next`` revisits a descriptor: the chain loops."""

    spec = "VIRTIO 1.4 §2.7.5.2"


class ChainTooLong(VirtqueueError):
    """A chain has more descriptors than the queue (or indirect table) holds."""

    spec = "VIRTIO 1.4 §2.7.5.3.1"


class ChainLengthOverflow(VirtqueueError):
    """The buffers of a chain add up to more than 2^32 bytes."""

    spec = "VIRTIO 1.4 §2.7.5.2"


class ReadableAfterWritable(VirtqueueError):
    """A device-readable descriptor follows a device-writable one."""

    spec = "VIRTIO 1.4 §2.7.4.2"


class IndirectNotNegotiated(VirtqueueError):
    """VIRTQ_DESC_F_INDIRECT used without VIRTIO_F_INDIRECT_DESC."""

    spec = "VIRTIO 1.4 §2.7.5.3.1"


class NestedIndirect(VirtqueueError):
    """An indirect table contains a descriptor that is itself indirect."""

    spec = "VIRTIO 1.4 §2.7.5.3.1"


class IndirectWithNext(VirtqueueError):
    """A descriptor sets both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT."""

    spec = "VIRTIO 1.4 §2.7.5.3.1"


class BadIndirectTableLength(VirtqueueError):
    """An indirect table's length is zero or not a multiple of 16 bytes."""

    spec = "VIRTIO 1.4 §2.7.5.3"


class AvailIndexJump(VirtqueueError):
    """The available index moved ahead by more than the queue size."""

    spec = "VIRTIO 1.4 §2.7.6"


class BufferOutOfMemory(VirtqueueError):
    """A descriptor's buffer is not inside guest memory."""

    spec = "VIRTIO 1.4 §2.7.5"


class RingOutOfMemory(VirtqueueError):
    """A ring area (descriptor table, available or used ring) is not in guest memory."""

    spec = "VIRTIO 1.4 §2.7"


class VhostUserError(PyVirtioError):
    """The vhost-user peer sent something the protocol does not allow.

    Attributes:
        request: name of the request being handled, when known.
    """

    def __init__(self, message: str, *, request: str | None = None) -> None:
        super().__init__(f"{request}: {message}" if request else message)
        self.request = request


class TruncatedMessage(VhostUserError):
    """The connection ended in the middle of a message."""


class BadPayloadSize(VhostUserError):
    """The header's size field does not match the request's payload layout."""


class UnknownRequest(VhostUserError):
    """A request code this backend does not know or did not negotiate."""


class MissingFds(VhostUserError):
    """A request that must carry file descriptors arrived without (enough of) them."""


class BadMemoryRegion(PyVirtioError):
    """A memory region is empty, overflows, overlaps another or cannot be mapped."""


class BadRingState(VhostUserError):
    """A vring request names a queue, size or address the backend cannot accept."""
