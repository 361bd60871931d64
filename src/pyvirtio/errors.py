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
     |    |    +-- RingMisaligned
     |    |   packed virtqueues (VIRTIO 1.4 §2.8): the same rules, their own sections,
     |    |   each a subclass of its split counterpart, plus the packed-only rules
     |    +-- PackedChainTooLong            (ChainTooLong)
     |    +-- PackedIndirectTooLong         (ChainTooLong)
     |    +-- PackedChainLengthOverflow     (ChainLengthOverflow)
     |    +-- PackedReadableAfterWritable   (ReadableAfterWritable)
     |    +-- PackedIndirectNotNegotiated   (IndirectNotNegotiated)
     |    +-- IndirectInList                (IndirectWithNext)
     |    +-- PackedBadIndirectTableLength  (BadIndirectTableLength)
     |    +-- PackedBufferOutOfMemory       (BufferOutOfMemory)
     |    +-- PackedRingOutOfMemory         (RingOutOfMemory)
     |    +-- IncompleteChain
     |    +-- BadAvailFlags
     |    +-- BufferIdInUse
     |    +-- BadEventSuppression
     |         +-- EventSuppressionReservedBits
     +-- DeviceRingError           the device broke a virtqueue rule (seen by a driver)
     +-- VhostUserError            the vhost-user peer broke the protocol
          +-- TruncatedMessage
          +-- BadPayloadSize
          +-- UnknownRequest
          +-- MissingFds
          +-- BadRingState
          +-- BackendChannelError   the front-end broke the back-end request channel
               +-- NoBackendChannel  a back-end message, but the front-end gave no channel

Errors caused by the guest or by the socket peer ("remote" errors in h11's sense)
carry the context needed to locate the bug: the queue, the descriptor index, the
message.  Their ``spec`` attribute names the section of the specification that
was broken, so a log line alone tells a driver writer where to look.
"""

from __future__ import annotations

__all__ = [
    "AvailIndexJump",
    "BackendChannelError",
    "BadAvailFlags",
    "BadEventSuppression",
    "BadIndirectTableLength",
    "BadMemoryRegion",
    "BadPayloadSize",
    "BadRingState",
    "BufferIdInUse",
    "BufferOutOfMemory",
    "ChainLengthOverflow",
    "ChainTooLong",
    "DescriptorIndexOutOfRange",
    "DescriptorLoop",
    "DeviceRingError",
    "EventSuppressionReservedBits",
    "GuestMemoryError",
    "IncompleteChain",
    "IndirectInList",
    "IndirectNotNegotiated",
    "IndirectWithNext",
    "MissingFds",
    "NestedIndirect",
    "NoBackendChannel",
    "PackedBadIndirectTableLength",
    "PackedBufferOutOfMemory",
    "PackedChainLengthOverflow",
    "PackedChainTooLong",
    "PackedIndirectNotNegotiated",
    "PackedIndirectTooLong",
    "PackedReadableAfterWritable",
    "PackedRingOutOfMemory",
    "PyVirtioError",
    "ReadableAfterWritable",
    "RingMisaligned",
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


class RingMisaligned(RingOutOfMemory):
    """A ring part is not aligned as its layout requires.

    VIRTIO 1.4 §2.7 (split: descriptor table 16, available ring 2, used ring 4)
    and §2.8.10 (packed: descriptor ring 16, event suppression structures 4).
    The device stores ring fields with single aligned stores
    (:mod:`pyvirtio.virtqueue.words`), which a misaligned part cannot take.
    """

    spec = "VIRTIO 1.4 §2.7, §2.8.10"


class DeviceRingError(PyVirtioError):
    """The device broke a virtqueue rule, as pyvirtio's driver side sees it.

    A used index more than the queue size ahead (VIRTIO 1.4 §2.7.8), or a used
    Buffer ID that is not outstanding (§2.8.6): a back-end bug, reported to the
    caller of the driver queue.

    Attributes:
        queue: index of the virtqueue, when known.
    """

    def __init__(self, message: str, *, queue: int | None = None) -> None:
        super().__init__(message if queue is None else f"queue {queue}: {message}")
        self.queue = queue


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


class BackendChannelError(VhostUserError):
    """The back-end request channel (vhost-user.rst "Back-end communication") failed.

    The front-end's answer on the channel is malformed (wrong flags, size or
    request, an answer nobody asked for), the channel hung up, or a message
    cannot be sent.
    """


class NoBackendChannel(BackendChannelError):
    """A back-end-to-front-end message, but the front-end set up no channel.

    The channel exists once BACKEND_REQ is negotiated and SET_BACKEND_REQ_FD
    has handed over its socket; a front-end that does neither (or no front-end
    at all) cannot be told anything.
    """


# -- packed virtqueues (VIRTIO 1.4 §2.8) -----------------------------------------------------
#
# Section numbers count the subsections of packed-ring.tex in order, as the split ones
# above do for split-ring.tex: §2.8.1 Driver and Device Ring Wrap Counters, §2.8.4 Element
# Address and Length, §2.8.7 Indirect Flag, §2.8.10 Driver and Device Event Suppression
# (§2.8.10.1 Structure Size and Alignment), §2.8.14 Event Suppression Structure Format,
# §2.8.17 Driver Requirements: Scatter-Gather Support, §2.8.19 Driver Requirements:
# Indirect Descriptors, §2.8.21.1 Placing Available Buffers Into The Descriptor Ring.


class PackedChainTooLong(ChainTooLong):
    """A descriptor list runs on past the ring space the driver may fill.

    VIRTIO 1.4 §2.8.17: the driver MUST NOT create a list longer than the queue
    size, and MUST make sure there is room in the ring for the whole list (it may
    not overwrite descriptors the device has not used yet).
    """

    spec = "VIRTIO 1.4 §2.8.17"


class PackedIndirectTooLong(ChainTooLong):
    """An indirect table holds more descriptors than the device allows (the queue size).

    VIRTIO 1.4 §2.8.19: the driver MUST NOT create a chain longer than allowed by
    the device; §2.8.5: without a device limit, the maximum is the queue size.
    """

    spec = "VIRTIO 1.4 §2.8.19"


class PackedChainLengthOverflow(ChainLengthOverflow):
    """The buffers of a packed chain add up to 2^32 bytes or more.

    The packed layout states no byte limit, but the used descriptor reports the
    written length in a 32-bit field (§2.8.4, §2.8.13), so pyvirtio limits a
    chain to what that field can describe, as §2.7.5.2 does for split rings.
    """

    spec = "VIRTIO 1.4 §2.8.4"


class PackedReadableAfterWritable(ReadableAfterWritable):
    """VIRTIO 1.4 §2.8.17: device-writable elements MUST follow device-readable ones."""

    spec = "VIRTIO 1.4 §2.8.17"


class PackedIndirectNotNegotiated(IndirectNotNegotiated):
    """VIRTIO 1.4 §2.8.19: VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC."""

    spec = "VIRTIO 1.4 §2.8.19"


class IndirectInList(IndirectWithNext):
    """An indirect descriptor is part of a list linked by VIRTQ_DESC_F_NEXT.

    VIRTIO 1.4 §2.8.19: the driver MUST NOT write direct descriptors with
    VIRTQ_DESC_F_INDIRECT in a scatter-gather list linked by VIRTQ_DESC_F_NEXT,
    whether the indirect descriptor carries NEXT itself or follows one that does
    (unlike split rings, where a list may end in one indirect descriptor).
    """

    spec = "VIRTIO 1.4 §2.8.19"


class PackedBadIndirectTableLength(BadIndirectTableLength):
    """VIRTIO 1.4 §2.8.7: an indirect table is a whole number (>= 1) of 16-byte descriptors."""

    spec = "VIRTIO 1.4 §2.8.7"


class PackedBufferOutOfMemory(BufferOutOfMemory):
    """VIRTIO 1.4 §2.8.4: an element (or indirect table) address is not guest memory."""

    spec = "VIRTIO 1.4 §2.8.4"


class PackedRingOutOfMemory(RingOutOfMemory):
    """VIRTIO 1.4 §2.8.10.1: a ring part is not one contiguous range of guest memory."""

    spec = "VIRTIO 1.4 §2.8.10.1"


class IncompleteChain(VirtqueueError):
    """A list's next descriptor is not available although its first one is.

    VIRTIO 1.4 §2.8.17: the driver MUST NOT make the first descriptor of a list
    available before all the others.  Where the list ends cannot be known, so
    the queue stops until the device is reset.
    """

    spec = "VIRTIO 1.4 §2.8.17"


class BadAvailFlags(VirtqueueError):
    """An available descriptor's VIRTQ_DESC_F_USED bit equals its VIRTQ_DESC_F_AVAIL bit.

    VIRTIO 1.4 §2.8.1: to make a descriptor available the driver sets AVAIL to
    its wrap counter and USED to the inverse; equal bits mark a used descriptor.
    """

    spec = "VIRTIO 1.4 §2.8.1"


class BufferIdInUse(VirtqueueError):
    """The driver made a buffer available under an ID the device has not returned yet.

    VIRTIO 1.4 §2.8.21.1: each buffer takes "the next free buffer id"; two
    outstanding buffers with one ID cannot be told apart when used, so the
    queue stops until the device is reset.
    """

    spec = "VIRTIO 1.4 §2.8.21.1"


class BadEventSuppression(VirtqueueError):
    """The driver event suppression structure holds a value §2.8.10 does not allow.

    The reserved flags value 0x3, RING_EVENT_FLAGS_DESC without VIRTIO_F_EVENT_IDX,
    or a descriptor event offset beyond the ring.  The device then notifies as if
    events were enabled, so the driver is never left waiting.
    """

    spec = "VIRTIO 1.4 §2.8.10"


class EventSuppressionReservedBits(BadEventSuppression):
    """VIRTIO 1.4 §2.8.14: bits 2-15 of the event suppression flags are reserved, set to 0."""

    spec = "VIRTIO 1.4 §2.8.14"
