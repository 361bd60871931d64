"""The exception hierarchy of pyvirtio: every exception class pyvirtio defines is here.

Every error pyvirtio raises on purpose derives from :class:`PyVirtioError`.  Below
the root, the tree says who is to blame:

- :class:`PeerError`: the other side broke the rules.  A guest's driver (an
  address outside guest memory, a virtqueue violation, a request too short), a
  vhost-user front-end (a malformed or forbidden message, a memory table that
  cannot be accepted) or, as pyvirtio's own driver side (:mod:`pyvirtio.frontend`)
  sees it, a device or back-end (a bad used ring, a malformed reply, a refused
  request).  These are h11's "remote" errors: the bug is on the other side, so a
  back-end answers them with an error value, a dropped connection or NEEDS_RESET,
  never a traceback.
- :class:`HostError`: this machine or its configuration.  A tool that is missing,
  a guest VM that would not boot or run, a switch whose uplink is taken, guest RAM
  sized too small, options that do not go together.  The fix is on this side.

The whole tree.  ``Name (Base, ...)`` names base classes besides the parent the
drawing shows (for a root, all of them); a line without ``+--`` is a comment::

    PyVirtioError (Exception)       root of every error pyvirtio raises on purpose
     +-- PeerError                  the other side (driver, device, vhost-user peer) broke a rule
     |    +-- GuestMemoryError      a guest physical / user address does not map
     |    +-- BadMemoryRegion       a memory region cannot be accepted
     |    +-- VirtqueueError        the driver broke a virtqueue rule (VIRTIO 1.4 §2.7)
     |    |    |   split rules (§2.7); a packed rule (§2.8) that matches one derives from it
     |    |    +-- DescriptorIndexOutOfRange
     |    |    +-- DescriptorLoop
     |    |    +-- ChainTooLong
     |    |    |    +-- PackedChainTooLong              §2.8.17
     |    |    |    +-- PackedIndirectTooLong           §2.8.19
     |    |    +-- ChainLengthOverflow
     |    |    |    +-- PackedChainLengthOverflow       §2.8.4
     |    |    +-- ReadableAfterWritable
     |    |    |    +-- PackedReadableAfterWritable     §2.8.17
     |    |    +-- IndirectNotNegotiated
     |    |    |    +-- PackedIndirectNotNegotiated     §2.8.19
     |    |    +-- NestedIndirect
     |    |    +-- IndirectWithNext
     |    |    |    +-- IndirectInList                  §2.8.19
     |    |    +-- BadIndirectTableLength
     |    |    |    +-- PackedBadIndirectTableLength    §2.8.7
     |    |    +-- AvailIndexJump
     |    |    +-- BufferOutOfMemory
     |    |    |    +-- PackedBufferOutOfMemory         §2.8.4
     |    |    +-- RingOutOfMemory
     |    |    |    +-- RingMisaligned
     |    |    |    +-- PackedRingOutOfMemory           §2.8.10.1
     |    |    |   packed-only rules (§2.8)
     |    |    +-- IncompleteChain
     |    |    +-- BadAvailFlags
     |    |    +-- BufferIdInUse
     |    |    +-- BadEventSuppression
     |    |         +-- EventSuppressionReservedBits
     |    +-- RequestTooShort       a request's buffers are shorter than its format needs
     |    +-- VhostUserError        the vhost-user front-end broke the protocol
     |    |    +-- TruncatedMessage
     |    |    +-- BadPayloadSize
     |    |    +-- UnknownRequest
     |    |    +-- MissingFds
     |    |    +-- BadRingState
     |    |    +-- BackendChannelError    the front-end broke the back-end request channel
     |    |         +-- NoBackendChannel  a back-end message, but the front-end gave no channel
     |    |              +-- NoFrontend   no front-end is connected: nobody to tell
     |    |   seen from pyvirtio's driver side (pyvirtio.frontend): the device is the peer
     |    +-- DeviceRingError       the device broke a virtqueue rule
     |    +-- BackendError          the back-end broke the protocol, refused or did not answer
     |    |    +-- NetDriverError   VIRTIO_NET_ERR, or a net device that misbehaved
     |    +-- BlkError              a block request completed with a status other than OK
     |    +-- FuseError             a virtio-fs (FUSE) reply carries an error (errno)
     |    +-- GpuCommandError       a virtio-gpu command refused with a VIRTIO_GPU_RESP_ERR_*
     |    +-- SegmentError          a packet's offloads cannot be done (not TCP as it says...)
     +-- HostError                  this machine or its configuration
          +-- GuestRamExhausted     the front-end's guest RAM is too small for its queues
          +-- UplinkTaken (OSError)  the switch has an uplink already (errno EBUSY)
          +-- NoDaemon              no daemon answers a command on its control socket
          +-- VmError               ``pyvirtio vm`` failed: options, images, files
          |    +-- VmTimeout        ``pyvirtio vm --timeout`` expired
          +-- GuestError            the guest test kit failed (pyvirtio.guestkit)
               +-- GuestSetupError  host tools, kernel or modules are missing or unusable
               +-- GuestRunError    QEMU did not start, the guest never ran its script, or hung
               |    +-- GuestTimeoutError
               +-- TestPmdError     DPDK's testpmd exited, hung or answered nonsense
               +-- QmpError         the guest's QEMU refused a QMP command, or hung up
    Terminated (BaseException)      not an error: SIGTERM or SIGHUP, unwind as for Ctrl-C

Where the line is not sharp, the tree follows the usual cause:

- :class:`BadMemoryRegion` is a peer error although mapping a region can also
  fail for want of address space: the regions, their sizes and their fds are the
  front-end's, and nothing on this side can serve without them.
- :class:`BackendError` also covers a back-end that cannot be reached (no
  socket) or does not answer in time: pyvirtio's driver side cannot tell a dead
  back-end from a broken one, and for its caller both mean "the device side".
- :class:`TestPmdError` is a host error, under :class:`GuestError` (the test
  kit), although testpmd plays a vhost-user peer: it reports the testpmd
  *process* failing (not installed, exited, no prompt), never a protocol breach,
  which pyvirtio's back-end reports as a :class:`VhostUserError`.
- :class:`NoFrontend` (no front-end connected at all) is a peer error as a kind
  of :class:`NoBackendChannel`: whoever calls for the channel handles both alike,
  and neither is this machine's fault.
- :class:`UplinkTaken` is also an :class:`OSError` (``EBUSY``): the CLI handles
  it with the other failures to open a tap or a socket.
- :class:`Terminated` is outside the tree on purpose: it derives from
  :class:`BaseException`, as :class:`KeyboardInterrupt` does, so that no
  ``except Exception`` (or ``except PyVirtioError``) on the way stops the unwinding.

Errors caused by the guest or by the socket peer carry the context needed to
locate the bug: the queue, the descriptor index, the message.  Virtqueue errors'
``spec`` attribute names the section of the specification that was broken, so a
log line alone tells a driver writer where to look.  Host errors say what to
install, free or change.
"""

from __future__ import annotations

import errno
from typing import ClassVar

__all__ = [
    "AvailIndexJump",
    "BackendChannelError",
    "BackendError",
    "BadAvailFlags",
    "BadEventSuppression",
    "BadIndirectTableLength",
    "BadMemoryRegion",
    "BadPayloadSize",
    "BadRingState",
    "BlkError",
    "BufferIdInUse",
    "BufferOutOfMemory",
    "ChainLengthOverflow",
    "ChainTooLong",
    "DescriptorIndexOutOfRange",
    "DescriptorLoop",
    "DeviceRingError",
    "EventSuppressionReservedBits",
    "FuseError",
    "GpuCommandError",
    "GuestError",
    "GuestMemoryError",
    "GuestRamExhausted",
    "GuestRunError",
    "GuestSetupError",
    "GuestTimeoutError",
    "HostError",
    "IncompleteChain",
    "IndirectInList",
    "IndirectNotNegotiated",
    "IndirectWithNext",
    "MissingFds",
    "NestedIndirect",
    "NetDriverError",
    "NoBackendChannel",
    "NoDaemon",
    "NoFrontend",
    "PackedBadIndirectTableLength",
    "PackedBufferOutOfMemory",
    "PackedChainLengthOverflow",
    "PackedChainTooLong",
    "PackedIndirectNotNegotiated",
    "PackedIndirectTooLong",
    "PackedReadableAfterWritable",
    "PackedRingOutOfMemory",
    "PeerError",
    "PyVirtioError",
    "QmpError",
    "ReadableAfterWritable",
    "RequestTooShort",
    "RingMisaligned",
    "RingOutOfMemory",
    "SegmentError",
    "Terminated",
    "TestPmdError",
    "TruncatedMessage",
    "UnknownRequest",
    "UplinkTaken",
    "VhostUserError",
    "VirtqueueError",
    "VmError",
    "VmTimeout",
]


class PyVirtioError(Exception):
    """Root of every error pyvirtio raises deliberately."""


class PeerError(PyVirtioError):
    """The other side broke the rules: a guest's driver, a vhost-user peer, a device.

    The bug is neither in pyvirtio nor in this machine's set-up; the error carries
    what locates it on the other side (queue, descriptor, message).
    """


class HostError(PyVirtioError):
    """This machine or its configuration: a missing tool, a resource, bad options.

    Nothing the other side did; the message says what to install, free or change.
    """


class GuestMemoryError(PeerError):
    """An address range is not (entirely) backed by guest memory."""

    def __init__(self, message: str, *, address: int, length: int) -> None:
        super().__init__(message)
        self.address = address
        self.length = length


class VirtqueueError(PeerError):
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


class DeviceRingError(PeerError):
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


class VhostUserError(PeerError):
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


class BadMemoryRegion(PeerError):
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


class RequestTooShort(PeerError):
    """A request's buffers hold fewer bytes than its format needs: a header the
    driver did not send whole, or no room for the status byte (a device answers
    it with its error status, VIRTIO 1.4 §2.7.4: the device may not assume the
    framing, but the sizes are the driver's to get right).

    Attributes:
        need: bytes the read or write needed.
        have: bytes that were left in the chain.
    """

    def __init__(self, message: str, *, need: int, have: int) -> None:
        super().__init__(message)
        self.need = need
        self.have = have


# -- pyvirtio's driver side (pyvirtio.frontend): the device or back-end is the peer ------------


class BackendError(PeerError):
    """The back-end broke the protocol, refused a request or did not answer.

    Raised by :mod:`pyvirtio.frontend`: a reply with the wrong request code, flags
    or size, a REPLY_ACK failure, a feature the driver needs and the back-end does
    not offer, a used ring that returns the wrong chains, no reply in time, or no
    back-end listening at all.

    Attributes:
        request: name of the message the error concerns (``"virtqueue"`` for the
            rings, ``"connect"`` for the socket).
    """

    def __init__(self, message: str, *, request: str) -> None:
        super().__init__(f"{request}: {message}")
        self.request = request


class NetDriverError(BackendError):
    """The device answered a control command with VIRTIO_NET_ERR, or misbehaved."""


class FuseError(PeerError):
    """A FUSE reply from a virtio-fs device carries an error (VIRTIO 1.4 §5.11.6.1:
    ``fuse_out_header.error``, a negative errno).

    Attributes:
        errno: the positive error number (``ENOENT``...).
    """

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class BlkError(PeerError):
    """A block request completed with a status other than VIRTIO_BLK_S_OK (VIRTIO 1.4 §5.2.6).

    Attributes:
        status: the status byte the device wrote (``VIRTIO_BLK_S_IOERR``,
            ``VIRTIO_BLK_S_UNSUPP``...).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class SegmentError(PeerError):
    """A packet's offloads cannot be done in software (:mod:`pyvirtio.devices.net.segment`):
    a GSO packet that is not TCP over IPv4/IPv6 as its ``virtio_net_hdr`` says, a TCP
    header outside the frame, too many segments.  The switch drops it (counted)."""


class GpuCommandError(PeerError):
    """A virtio-gpu command the device refuses (VIRTIO 1.4 §5.7.6.7): a size, rectangle,
    offset, backing entry or id the driver gave does not hold.

    Attributes:
        response: the ``VIRTIO_GPU_RESP_ERR_*`` code the device answers with.
    """

    def __init__(self, message: str, response: int) -> None:
        super().__init__(message)
        self.response = response


# -- host errors: this machine or its configuration --------------------------------------------


class GuestRamExhausted(HostError):
    """The front-end's guest RAM has no room left for what a driver sets up.

    :class:`~pyvirtio.frontend.connection.GuestRam` is sized when a driver opens
    and never grows: more or larger queues or buffers need a larger one.

    Attributes:
        size: bytes of guest RAM.
        wanted: bytes the allocation asked for.
    """

    def __init__(self, *, size: int, wanted: int) -> None:
        super().__init__(f"guest RAM of {size} bytes exhausted ({wanted} more bytes wanted)")
        self.size = size
        self.wanted = wanted


class UplinkTaken(HostError, OSError):
    """The switch already has an uplink: another process holds its lock.

    Also an :class:`OSError` with errno ``EBUSY``, like the other failures to set
    up a switch port or a tap.

    Attributes:
        switch: the switch's name.
        holder: what the lock file says about its holder (pid and tap).
    """

    def __init__(self, switch: str, holder: str) -> None:
        super().__init__(errno.EBUSY, f"switch {switch!r} already has a tap uplink "
                         f"({holder}); a switch has one at most")
        self.switch = switch
        self.holder = holder

    def __str__(self) -> str:
        return str(self.strerror)


class NoDaemon(HostError):
    """No daemon answers on the control socket a command talks to (none runs there,
    or its answer is not what a daemon says): ``pyvirtio stats``, ``resize``..."""


class VmError(HostError):
    """A failure ``pyvirtio vm`` reports in one line (``pyvirtio vm: ...``).

    Options that do not go together, an image that does not exist, a file that
    cannot be written.
    """


class VmTimeout(VmError):
    """``pyvirtio vm --timeout`` expired; QEMU was killed.

    The message quotes the console's tail.  ``pyvirtio vm`` exits with its own
    status for it (:data:`pyvirtio.vmcmd.EXIT_TIMEOUT`).
    """


class GuestError(HostError):
    """Root of every error raised by the guest test kit (:mod:`pyvirtio.guestkit`)."""


class GuestSetupError(GuestError):
    """The host lacks something the kit needs and the kit could not provide it."""


class GuestRunError(GuestError):
    """A guest run failed: QEMU did not start, the guest never ran its script, or it hung.

    Attributes:
        console: everything the guest and QEMU printed (``\\r`` removed).
    """

    #: How many console lines the message quotes.
    console_tail_lines: ClassVar[int] = 40

    def __init__(self, message: str, console: str) -> None:
        """Quote the last :attr:`console_tail_lines` lines of *console* after *message*."""
        lines = self.console_tail_lines
        tail = "\n".join(console.splitlines()[-lines:])
        super().__init__(f"{message}\n--- last {lines} console lines ---\n{tail}")
        self.console = console


class GuestTimeoutError(GuestRunError):
    """The guest did not finish (or print what was awaited) in time; QEMU was killed."""


class TestPmdError(GuestError):
    """DPDK's testpmd exited, did not answer in time, or printed something unexpected.

    :mod:`pyvirtio.guestkit.dpdk` runs testpmd as a third-party vhost-user peer;
    this error is about the process, not the protocol (see the module docstring).
    """

    __test__ = False  # not a pytest test class, whatever its name


class QmpError(GuestError):
    """The guest's QEMU answered a QMP command with an error, or closed the monitor
    (:mod:`pyvirtio.guestkit.qmp`)."""


# -- not an error ------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind, cleaning up, as for Ctrl-C.

    Raised by the signal handler of ``pyvirtio vm`` (:mod:`pyvirtio.vmcmd`).  A
    :class:`BaseException`, like :class:`KeyboardInterrupt`, so that no ``except
    Exception`` or ``except PyVirtioError`` stops it on the way out.

    Attributes:
        signum: the signal that arrived.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class NoFrontend(NoBackendChannel):
    """No front-end is connected: nobody to tell (the next one reads the config space)."""
