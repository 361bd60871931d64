"""A host tap interface as a virtio-net back end (``pyvirtio serve net --tap NAME``).

The tap is opened through ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``: every frame read or written carries a ``struct virtio_net_hdr``
in front of it, the same header the virtio-net driver uses (Linux
``drivers/net/tun.c``).  ``TUNSETVNETHDRSZ`` makes it the 12-byte VERSION_1
header (with ``num_buffers``, which the tap ignores), so checksum and
segmentation offloads pass between the guest and the host kernel unchanged:

- guest -> tap: a ``NEEDS_CSUM`` or GSO header is handed to the kernel, which
  checksums or segments the packet when it leaves the host (or never, if it
  stays local);
- tap -> guest: the kernel gives partially checksummed and GSO packets only
  for the offloads enabled with ``TUNSETOFFLOAD``; the device enables those
  the driver negotiated (GUEST_CSUM -> ``TUN_F_CSUM``, GUEST_TSO4 ->
  ``TUN_F_TSO4``, GUEST_TSO6 -> ``TUN_F_TSO6``, GUEST_ECN -> ``TUN_F_TSO_ECN``)
  and the kernel does the rest in software first.

The fd is non-blocking: reads happen when the runtime's loop sees it readable,
and a write the tap cannot take now (``EAGAIN``) is dropped and counted.  Both
directions move the packet between the kernel and guest memory directly:
``writev`` from the transmit chain's buffers (:meth:`TapBackend.send_views`),
``readv`` into the receive chain's buffers (:meth:`TapBackend.read_into`); the
back end's own buffer takes only what does not fit them, or packets read while
the guest has no receive buffer (:meth:`TapBackend.receive_packets`).
Creating the interface needs CAP_NET_ADMIN; an existing interface is attached
to (it must be a tap with a virtio-net header and not in use by another
process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
from collections import Counter

from pyvirtio.spec.net import HDR, HDR_SIZE, NetFeature, NetHeader

__all__ = [
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "RECEIVE_BUDGET",
    "TUNSETIFF",
    "TUNSETOFFLOAD",
    "TUNSETVNETHDRSZ",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TapBackend",
    "check_tap_name",
    "tun_offloads",
]

log = logging.getLogger(__name__)

# <linux/if_tun.h>: ioctls on /dev/net/tun (_IOW('T', n, int)) and their flags.
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

#: ``struct ifreq``: the interface name (IFNAMSIZ 16) and the flags, padded to 40 bytes.
_IFREQ = struct.Struct("16sH22x")
_IFNAMSIZ = 16
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
#: Frames read per :meth:`TapBackend.receive_packets` call at most (the loop comes back).
RECEIVE_BUDGET = 256
#: The read buffer: a header and the largest GSO frame the kernel hands a tap (64 KiB
#: plus headers), with room to spare; anything longer is cut and then dropped as oversized.
_READ_SIZE = HDR_SIZE + 0x10000 + 256


def tun_offloads(features: int) -> int:
    """The ``TUN_F_*`` flags matching the guest-side offloads among virtio-net ``features``.

    GUEST_CSUM -> ``TUN_F_CSUM``; GUEST_TSO4/6 -> ``TUN_F_TSO4/6`` and GUEST_ECN
    -> ``TUN_F_TSO_ECN``, only with GUEST_CSUM (the kernel refuses segmentation
    without checksum offload, and so does §5.1.3.1).
    """
    if not features >> NetFeature.GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    for bit, flag in ((NetFeature.GUEST_TSO4, TUN_F_TSO4), (NetFeature.GUEST_TSO6, TUN_F_TSO6)):
        if features >> bit & 1:
            flags |= flag
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> NetFeature.GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags


def check_tap_name(name: str) -> str:
    """Return ``name`` if it can name a network interface.

    Raises:
        ValueError: empty, longer than 15 bytes, or characters other than
            letters, digits, ``_``, ``.`` and ``-``.
    """
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"tap name {name!r}: use 1-15 letters, digits, '_', '.', '-'")
    return name


def _open_tap(name: str) -> tuple[int, str]:
    """Open (create if missing) tap ``name`` with a 12-byte vnet header and no offloads.

    Returns:
        The non-blocking fd and the interface's name as the kernel reports it.

    Raises:
        OSError: ``/dev/net/tun`` cannot be opened, or the kernel refused.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF,
                            _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("@i", HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"tap {name}: {exc.strerror}") from None
    return fd, _IFREQ.unpack(ifreq)[0].rstrip(b"\0").decode()


class TapBackend:
    """The frames of a tap interface, each with its ``virtio_net_hdr``.

    Args:
        name: the interface (created if missing, attached to if it exists).
        fd: instead of opening ``name``, use this fd, already set up as a tap
            with a 12-byte ``virtio_net_hdr`` (or, in tests, one end of a
            ``SOCK_SEQPACKET`` socket pair standing in for one); it is made
            non-blocking and closed with the back end.

    Attributes:
        name: the interface's name as the kernel reports it.
        counters: ``tap sent``, ``tap received``, ``tap dropped: busy`` (the tap's
            queue was full), ``tap dropped: link down``, ``tap dropped: write
            error`` (the kernel refused the header or frame), ``tap dropped: tap
            gone`` (the interface was deleted).
        offloads: the ``TUN_F_*`` flags last set with ``TUNSETOFFLOAD``.

    Raises:
        ValueError: a bad interface name.
        OSError: ``/dev/net/tun`` cannot be opened, or the kernel refused the
            interface (no CAP_NET_ADMIN, in use, not a tap with a vnet header).
    """

    def __init__(self, name: str, *, fd: int | None = None) -> None:
        check_tap_name(name)
        if fd is None:
            fd, name = _open_tap(name)
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self.name = name
        self.offloads = 0
        self.counters: Counter[str] = Counter()
        self._buffer = bytearray(_READ_SIZE)
        #: What :meth:`read_into` could not put in the guest's buffers.
        self.spill = memoryview(self._buffer)
        #: Reads failed for good (the interface was deleted): fileno() answers None.
        self.failed = False
        log.info("tap %s: attached (virtio_net_hdr of %d bytes)", self.name, HDR_SIZE)

    def fileno(self) -> int | None:
        """The tap's fd, readable when frames wait; None once reads failed for good."""
        return None if self.failed or self._fd < 0 else self._fd

    def set_offloads(self, flags: int) -> None:
        """Tell the kernel which offloads the reader accepts (``TUN_F_*``, TUNSETOFFLOAD).

        A refused combination is logged and the tap falls back to none: the
        kernel then hands only complete, checksummed frames.
        """
        try:
            fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            log.error("tap %s: TUNSETOFFLOAD %#x refused (%s); no offloads", self.name,
                      flags, exc)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, 0)
            flags = 0
        if flags != self.offloads:
            log.info("tap %s: offloads to the guest %#x", self.name, flags)
        self.offloads = flags

    def set_guest_offloads(self, features: int) -> None:
        """The driver negotiated ``features``: enable those offloads (:func:`tun_offloads`)."""
        self.set_offloads(tun_offloads(features))

    def send_packet(self, header: NetHeader, frame: bytes) -> None:
        """Write one frame with its header (never blocks; a full tap drops it)."""
        if self.failed:
            self.counters["tap dropped: tap gone"] += 1
            return
        raw = HDR.pack(header.flags, header.gso_type, header.hdr_len, header.gso_size,
                       header.csum_start, header.csum_offset, 0)
        self._write([raw, frame])

    def send_views(self, views: list[memoryview]) -> None:
        """Write one checked packet straight from guest memory: ``views`` hold its
        12-byte ``virtio_net_hdr`` (the tap's own header size) and then the frame.

        The kernel checks the header again, whatever the guest wrote there since.
        """
        if self.failed:
            self.counters["tap dropped: tap gone"] += 1
            return
        self._write(views)

    def _write(self, parts: list[bytes] | list[memoryview]) -> None:
        """One ``writev`` of a packet; every failure is counted (never blocks)."""
        try:
            os.writev(self._fd, parts)
        except BlockingIOError:
            self.counters["tap dropped: busy"] += 1
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                self.counters["tap dropped: link down"] += 1
            elif exc.errno == errno.EBADFD:
                log.error("tap %s: write failed: %s; the tap is unusable", self.name, exc)
                self.failed = True
                self.counters["tap dropped: tap gone"] += 1
            else:
                self.counters["tap dropped: write error"] += 1
                n = self.counters["tap dropped: write error"]
                if n <= 10 or n % 1000 == 0:
                    log.warning("tap %s: write refused: %s (%d so far)", self.name, exc, n)
            return
        self.counters["tap sent"] += 1

    def read_into(self, views: list[memoryview]) -> int | None:
        """Read one packet (its 12-byte ``virtio_net_hdr``, then the frame) straight into
        ``views`` (a receive chain's buffers in guest memory), and into :attr:`spill`
        what does not fit them.

        Returns:
            The packet's length (beyond the total of ``views``: the rest is in
            :attr:`spill`); 0 for a read shorter than a header (counted, skipped);
            None when no packet waits or the tap failed for good.
        """
        try:
            n = os.readv(self._fd, [*views, self._buffer])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            log.error("tap %s: read failed: %s; the tap is unusable", self.name, exc)
            self.failed = True
            return None
        if n < HDR_SIZE:
            self.counters["tap dropped: short read"] += 1
            return 0
        self.counters["tap received"] += 1
        return n

    def receive_packets(self, limit: int = RECEIVE_BUDGET) -> list[tuple[NetHeader, bytes]]:
        """The frames waiting (at most ``limit``), each with its header.

        A read shorter than a header is counted and skipped.
        """
        packets: list[tuple[NetHeader, bytes]] = []
        buffer = self._buffer
        view = memoryview(buffer)
        while len(packets) < limit:
            try:
                n = os.readv(self._fd, [buffer])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # EBADFD: the interface is gone; the fd stays readable (EPOLLERR) forever.
                log.error("tap %s: read failed: %s; the tap is unusable", self.name, exc)
                self.failed = True
                break
            if n < HDR_SIZE:
                self.counters["tap dropped: short read"] += 1
                continue
            self.counters["tap received"] += 1
            packets.append((NetHeader.unpack(bytes(view[:HDR_SIZE])), bytes(view[HDR_SIZE:n])))
        return packets

    def close(self) -> None:
        """Close the fd (a tap this process created disappears with it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
