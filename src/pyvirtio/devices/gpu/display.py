"""The vhost-user-gpu side protocol: the back-end shows its scanouts in QEMU's display.

QEMU's ``vhost-user-gpu-pci`` hands the back-end one end of a socket pair with
``VHOST_USER_GPU_SET_SOCKET`` (vhost-user request 33) each time the driver sets
DRIVER_OK.  On it the back-end sends requests (QEMU's
docs/interop/vhost-user-gpu.rst; the header and numbers in the host's byte order)
and QEMU answers some:

- ``GET_PROTOCOL_FEATURES`` (answered with a u64) then ``SET_PROTOCOL_FEATURES``:
  we ask for none (the device makes its own EDID; it shares no dmabuf);
- ``GET_DISPLAY_INFO`` (answered with ``struct virtio_gpu_resp_display_info``):
  what QEMU's display would prefer, kept for information
  (:attr:`DisplayLink.qemu_display_info`); the guest is told the daemon's
  ``--width``/``--height``;
- ``SCANOUT``: a scanout's size (QEMU makes a new surface and shows it at the next
  ``UPDATE``); 0x0 disables it;
- ``UPDATE``: a rectangle of a scanout with its pixels (``x8r8g8b8``);
- ``CURSOR_UPDATE``, ``CURSOR_POS``, ``CURSOR_POS_HIDE``: the pointer.

The link never blocks the daemon's loop: QEMU reads this socket in its main loop,
which may itself wait for a vhost-user reply from us.  Messages go out of a queue
as the socket takes them (``when_writable``).  Screen updates are coalesced: each
scanout has at most one pending ``UPDATE``, whose rectangle grows with each flush
and whose pixels are read when it is sent, so a guest that flushes faster than
QEMU reads costs no memory and QEMU always ends on the latest picture.

QEMU is the host's own process, yet its answers are checked (a reply larger than
:data:`MAX_REPLY` or of an unknown kind ends the link).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.devices.base import DeviceHost
from pyvirtio.devices.gpu.resources import Rect
from pyvirtio.spec.gpu import (
    CTRL_HDR,
    DISPLAY_ONE,
    MAX_SCANOUTS,
    RESP_DISPLAY_INFO_SIZE,
    VU_CURSOR_POS,
    VU_FLAG_REPLY,
    VU_HEADER,
    VU_SCANOUT,
    VU_UPDATE,
    VuGpuRequest,
)

__all__ = ["MAX_QUEUED", "MAX_REPLY", "DisplayLink", "FrameSource", "QemuDisplay"]

log = logging.getLogger(__name__)

#: The largest reply accepted from QEMU (a display-info reply is 408 bytes, EDID 1056).
MAX_REPLY = 4096
#: Bytes of small messages (cursor, scanout) queued at most; cursor moves beyond
#: that are dropped (counted), as a pointer that lags has no use.
MAX_QUEUED = 1 << 20
#: The send buffer asked for on QEMU's socket (the kernel caps it at wmem_max).
SEND_BUFFER = 8 << 20
#: Protocol features we ask QEMU for: none.
WANTED_PROTOCOL_FEATURES = 0
#: ``hot_x``, ``hot_y`` of ``VhostUserGpuCursorUpdate``, after its position.
_HOTSPOT = struct.Struct("=II")


class FrameSource(Protocol):
    """What the link reads pixels from: the device's scanouts."""

    def scanout_size(self, scanout: int) -> tuple[int, int] | None:
        """A scanout's size, or None while it is disabled."""

    def scanout_pixels_into(self, scanout: int, rect: Rect, out: memoryview) -> None:
        """Copy the pixels of ``rect`` (inside the scanout) into ``out`` as packed
        ``x8r8g8b8`` rows."""

    def scanout_view(self, scanout: int, rect: Rect) -> memoryview | None:
        """The pixels of ``rect`` as one view of the resource, when they already are packed
        ``x8r8g8b8`` rows there (whole rows of a B8G8R8X8 or B8G8R8A8 resource)."""


@dataclass(frozen=True, slots=True)
class QemuDisplay:
    """One scanout of QEMU's GET_DISPLAY_INFO answer."""

    width: int
    height: int
    enabled: bool


def _message(request: int, payload: bytes = b"") -> bytes:
    return VU_HEADER.pack(request, 0, len(payload)) + payload


class DisplayLink:
    """One vhost-user-gpu socket to QEMU (from one GPU_SET_SOCKET).

    Args:
        host: the daemon's loop.
        sock: the socket QEMU gave.
        source: the scanouts.
        on_lost: called once when the link ends (QEMU closed it, or broke it).
    """

    def __init__(self, host: DeviceHost, sock: socket.socket, source: FrameSource,
                 on_lost: Callable[[DisplayLink], None]) -> None:
        self.host = host
        self.sock = sock
        self.source = source
        self.on_lost = on_lost
        sock.setblocking(False)
        # Room for a whole 1280x800 frame: fewer wake-ups per update (QEMU reads it all).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._fd = sock.fileno()
        #: Messages to send, in order: bytes, or (scanout, token) for a pending update.
        self._queue: deque[bytes | tuple[int, int]] = deque()
        self._queued_bytes = 0
        self._damage: dict[int, tuple[Rect, int]] = {}
        self._token = 0
        self._out: list[memoryview] = []
        self._waiting = False
        self._inbox = bytearray()
        self.closed = False
        #: QEMU's protocol features and preferred displays, once it answered.
        self.qemu_protocol_features: int | None = None
        self.qemu_display_info: list[QemuDisplay] | None = None
        #: Counters: messages and bytes sent, updates sent, cursor moves dropped.
        self.sent_messages = 0
        self.sent_bytes = 0
        self.updates = 0
        self.dropped = 0
        host.watch_fd(self._fd, self._readable)
        self._push(_message(VuGpuRequest.GET_PROTOCOL_FEATURES))
        self._push(_message(VuGpuRequest.GET_DISPLAY_INFO))

    # -- what the device tells QEMU --------------------------------------------------------

    def scanout(self, scanout: int, width: int, height: int) -> None:
        """SCANOUT: the scanout's new size (0x0: disabled); a pending update is dropped."""
        self._damage.pop(scanout, None)
        self._push(_message(VuGpuRequest.SCANOUT, VU_SCANOUT.pack(scanout, width, height)))

    def damage(self, scanout: int, rect: Rect) -> None:
        """The pixels of ``rect`` (scanout coordinates) changed: an UPDATE is due."""
        pending = self._damage.get(scanout)
        if pending is not None:
            self._damage[scanout] = (pending[0].union(rect), pending[1])
            return
        self._token += 1
        self._damage[scanout] = (rect, self._token)
        self._queue.append((scanout, self._token))
        self._pump()

    def cursor(self, request: VuGpuRequest, scanout: int, x: int, y: int,
               image: tuple[int, int, bytes] | None = None) -> None:
        """CURSOR_POS, CURSOR_POS_HIDE, or CURSOR_UPDATE with ``(hot_x, hot_y, pixels)``."""
        payload = VU_CURSOR_POS.pack(scanout, x, y)
        if image is not None:
            hot_x, hot_y, pixels = image
            payload += _HOTSPOT.pack(hot_x, hot_y) + pixels
        elif self._queued_bytes > MAX_QUEUED:
            self.dropped += 1
            return
        self._push(_message(request, payload))

    # -- sending ---------------------------------------------------------------------------

    def _push(self, message: bytes) -> None:
        self._queue.append(message)
        self._queued_bytes += len(message)
        self._pump()

    def _next(self) -> list[memoryview] | None:
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, bytes):
                self._queued_bytes -= len(item)
                return [memoryview(item)]
            scanout, token = item
            pending = self._damage.get(scanout)
            if pending is None or pending[1] != token:
                continue
            del self._damage[scanout]
            size = self.source.scanout_size(scanout)
            if size is None:
                continue
            rect = pending[0].intersect(Rect(0, 0, *size))
            if rect is None:
                continue
            length = VU_UPDATE.size + rect.width * rect.height * 4
            header = VU_HEADER.pack(VuGpuRequest.UPDATE, 0, length) + VU_UPDATE.pack(
                scanout, rect.x, rect.y, rect.width, rect.height)
            self.updates += 1
            view = self.source.scanout_view(scanout, rect)
            if view is not None:
                # No copy: the socket takes the rows straight from the resource (a later
                # transfer may land in the part not sent yet; its flush sends it again).
                return [memoryview(header), view]
            pixels = bytearray(length - VU_UPDATE.size)
            self.source.scanout_pixels_into(scanout, rect, memoryview(pixels))
            return [memoryview(header), memoryview(pixels)]
        return None

    def _pump(self) -> None:
        """Send what the socket takes; wait for room for the rest."""
        if self.closed or self._waiting:
            return
        while True:
            if not self._out:
                message = self._next()
                if message is None:
                    return
                self._out = message
                self.sent_messages += 1
            try:
                sent = self.sock.sendmsg(self._out)
            except BlockingIOError:
                self._waiting = True
                self.host.when_writable(self._fd, self._writable)
                return
            except OSError as exc:
                self._lose(f"send failed: {exc}")
                return
            self.sent_bytes += sent
            while sent and self._out:
                first = self._out[0]
                if sent < len(first):
                    self._out[0] = first[sent:]
                    break
                sent -= len(first)
                self._out.pop(0)

    def _writable(self) -> None:
        self._waiting = False
        self._pump()

    # -- QEMU's replies --------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"receive failed: {exc}")
            return
        if not data:
            self._lose("QEMU closed the display socket")
            return
        self._inbox += data
        while len(self._inbox) >= VU_HEADER.size:
            request, flags, size = VU_HEADER.unpack_from(self._inbox)
            if size > MAX_REPLY:
                self._lose(f"reply {request} of {size} bytes (at most {MAX_REPLY})")
                return
            if len(self._inbox) < VU_HEADER.size + size:
                return
            payload = bytes(self._inbox[VU_HEADER.size:VU_HEADER.size + size])
            del self._inbox[:VU_HEADER.size + size]
            if not flags & VU_FLAG_REPLY:
                log.warning("vhost-user-gpu: QEMU sent request %d, not a reply: ignored",
                            request)
                continue
            self._reply(request, payload)

    def _reply(self, request: int, payload: bytes) -> None:
        if request == VuGpuRequest.GET_PROTOCOL_FEATURES and len(payload) == 8:
            self.qemu_protocol_features = int.from_bytes(payload, "little")
            log.info("vhost-user-gpu: QEMU offers protocol features %#x, we take %#x",
                     self.qemu_protocol_features, WANTED_PROTOCOL_FEATURES)
            self._push(_message(VuGpuRequest.SET_PROTOCOL_FEATURES,
                                WANTED_PROTOCOL_FEATURES.to_bytes(8, "little")))
        elif request == VuGpuRequest.GET_DISPLAY_INFO and len(payload) == RESP_DISPLAY_INFO_SIZE:
            displays = []
            for n in range(MAX_SCANOUTS):
                _, _, width, height, enabled, _ = DISPLAY_ONE.unpack_from(
                    payload, CTRL_HDR.size + n * DISPLAY_ONE.size)
                displays.append(QemuDisplay(width, height, bool(enabled)))
            self.qemu_display_info = displays
            log.info("vhost-user-gpu: QEMU's displays: %s", ", ".join(
                f"{n}: {d.width}x{d.height}" for n, d in enumerate(displays) if d.enabled))
        elif request == VuGpuRequest.DMABUF_UPDATE:
            pass  # QEMU unblocks a dmabuf update we never send
        else:
            log.warning("vhost-user-gpu: unexpected reply %d (%d bytes): ignored", request,
                        len(payload))

    # -- the end ---------------------------------------------------------------------------

    def _lose(self, why: str) -> None:
        log.info("vhost-user-gpu display link ends: %s", why)
        self.close()
        self.on_lost(self)

    def close(self) -> None:
        """Stop watching and close the socket (pending messages are dropped)."""
        if self.closed:
            return
        self.closed = True
        self.host.unwatch_fd(self._fd)
        if self._waiting:
            self.host.cancel_writable(self._fd)
            self._waiting = False
        with contextlib.suppress(OSError):
            self.sock.close()
        self._queue.clear()
        self._damage.clear()
        self._out = []
