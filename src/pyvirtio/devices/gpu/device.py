"""The virtio-gpu device model, 2D (VIRTIO 1.4 §5.7 GPU Device).

The driver creates resources (host-side images), attaches guest pages to them as
backing, copies pixels in (TRANSFER_TO_HOST_2D), shows a resource on a scanout
(SET_SCANOUT) and says which part changed (RESOURCE_FLUSH).  The device keeps its
own copy of every resource, so ``pyvirtio screenshot`` and ``--record`` read the
screen without QEMU, and sends what changed to QEMU's display over the
vhost-user-gpu socket (:mod:`.display`) when QEMU gave one.

Commands are carried out at once, in ``handle_chain``: a fenced command
(VIRTIO_GPU_FLAG_FENCE) is complete when its response is written, which is what
§5.7.6.7 asks; the response carries the flag and the ``fence_id``.

The controlq answers every request with a response header, an error one
(``VIRTIO_GPU_RESP_ERR_*``, §5.7.6.7) for a request that does not hold; each
check is in :mod:`.resources`.  A request too short for its command gets
ERR_UNSPEC, as in QEMU; an unknown or 3D command ERR_UNSPEC.  The cursorq's
commands (§5.7.6.10) get a response only when the driver left room for one
(Linux leaves none).  Every refusal is counted (``errors`` and ``kinds`` of the
queue) and logged at DEBUG.

Limits: 2D only (no VIRGL, blob resources, UUIDs or capsets); resources stay
across a driver reset within one front-end connection (a driver that reloads
without the VM reconnecting the back-end finds its old ids taken).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from pyvirtio.devices.base import ControlCommand, ControlReply, VirtioDevice
from pyvirtio.devices.gpu.display import DisplayLink
from pyvirtio.devices.gpu.edid import MAX_EDID_SIDE, make_edid
from pyvirtio.devices.gpu.png import bgrx_to_rgb, encode_png
from pyvirtio.devices.gpu.resources import (
    DEFAULT_MAX_MEMORY,
    MAX_BACKING_ENTRIES,
    Backing,
    Rect,
    Resource,
    ResourceTable,
)
from pyvirtio.errors import GpuCommandError, RequestTooShort, VhostUserError
from pyvirtio.spec.common import DeviceId, Feature
from pyvirtio.spec.gpu import (
    CONFIG,
    CONTROLQ,
    CTRL_HDR,
    CURSOR_SIZE,
    DISPLAY_ONE,
    EDID_BLOB_SIZE,
    FLAG_FENCE,
    GET_EDID,
    MAX_SCANOUTS,
    MEM_ENTRY,
    RESOURCE_ATTACH_BACKING,
    RESOURCE_CREATE_2D,
    RESOURCE_FLUSH,
    RESOURCE_ID,
    RESP_EDID,
    SET_SCANOUT,
    TRANSFER_TO_HOST_2D,
    UPDATE_CURSOR,
    CtrlType,
    GpuFeature,
    GpuFormat,
    VuGpuRequest,
)
from pyvirtio.vhost_user.protocol import Message, Request
from pyvirtio.virtqueue.chain import ChainReader, DescriptorChain

__all__ = ["MIN_SCANOUT_SIDE", "GpuConfig", "GpuDevice", "Scanout"]

log = logging.getLogger(__name__)

#: A scanout rectangle is at least 16 pixels a side (as in QEMU).
MIN_SCANOUT_SIDE = 16
_INVALID_PARAMETER = CtrlType.RESP_ERR_INVALID_PARAMETER


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """``pyvirtio serve gpu`` options.

    Attributes:
        width, height: every output's preferred size (GET_DISPLAY_INFO, EDID).
        outputs: scanouts (1..16); QEMU's ``max_outputs`` must be the same.
        record: a folder where a PNG of scanout 0 is kept every ``record_every`` flushes.
        record_every: flushes between two recorded frames.
        max_memory: bytes all resources may hold.
    """

    width: int = 1280
    height: int = 800
    outputs: int = 1
    record: Path | None = None
    record_every: int = 60
    max_memory: int = DEFAULT_MAX_MEMORY

    def __post_init__(self) -> None:
        if not (MIN_SCANOUT_SIDE <= self.width <= MAX_EDID_SIDE
                and MIN_SCANOUT_SIDE <= self.height <= MAX_EDID_SIDE):
            raise ValueError(f"size {self.width}x{self.height}: {MIN_SCANOUT_SIDE}.."
                             f"{MAX_EDID_SIDE} each")
        if not 1 <= self.outputs <= MAX_SCANOUTS:
            raise ValueError(f"outputs {self.outputs}: 1..{MAX_SCANOUTS}")
        if self.record_every < 1:
            raise ValueError("record_every must be at least 1")


@dataclass(slots=True)
class Scanout:
    """One output: the resource it shows and where in it."""

    index: int
    resource: Resource | None = None
    rect: Rect = field(default_factory=lambda: Rect(0, 0, 0, 0))


class GpuDevice(VirtioDevice):
    """virtio-gpu 2D with EDID, shown in QEMU through vhost-user-gpu (§5.7)."""

    device_id = DeviceId.GPU
    num_queues = 2

    def __init__(self, config: GpuConfig | None = None) -> None:
        super().__init__()
        self.config = config or GpuConfig()
        self.resources = ResourceTable(self.config.max_memory)
        self.scanouts = [Scanout(n) for n in range(self.config.outputs)]
        self.events_read = 0
        self.link: DisplayLink | None = None
        #: RESOURCE_FLUSH commands carried out, and frames recorded.
        self.flushes = 0
        self.recorded = 0
        self._edids = [make_edid(self.config.width, self.config.height, serial=n)
                       for n in range(self.config.outputs)]
        self._commands: dict[int, Callable[[ChainReader], bytes]] = {
            CtrlType.CMD_GET_DISPLAY_INFO: self._get_display_info,
            CtrlType.CMD_GET_EDID: self._get_edid,
            CtrlType.CMD_RESOURCE_CREATE_2D: self._resource_create_2d,
            CtrlType.CMD_RESOURCE_UNREF: self._resource_unref,
            CtrlType.CMD_SET_SCANOUT: self._set_scanout,
            CtrlType.CMD_RESOURCE_FLUSH: self._resource_flush,
            CtrlType.CMD_TRANSFER_TO_HOST_2D: self._transfer_to_host_2d,
            CtrlType.CMD_RESOURCE_ATTACH_BACKING: self._attach_backing,
            CtrlType.CMD_RESOURCE_DETACH_BACKING: self._detach_backing,
            CtrlType.CMD_UPDATE_CURSOR: self._update_cursor,
            CtrlType.CMD_MOVE_CURSOR: self._move_cursor,
        }

    # -- features, config space, vhost-user --------------------------------------------------

    def device_features(self) -> int:
        """EDID (§5.7.3): the guest takes its modes from the EDID we make."""
        return 1 << GpuFeature.EDID

    def offered_features(self) -> int:
        """The ring features, EDID, and VIRTIO_F_RING_RESET (§6): QEMU's
        ``vhost-user-gpu-pci`` passes every feature the guest accepted to the back-end,
        RING_RESET included, which its PCI transport offers and carries out itself."""
        return super().offered_features() | 1 << Feature.RING_RESET

    def config_space(self) -> bytes:
        """``struct virtio_gpu_config`` (§5.7.4); QEMU fills the events and scanouts itself."""
        return CONFIG.pack(self.events_read, 0, self.config.outputs, 0)

    def write_config(self, offset: int, data: bytes) -> bool:
        """A write covering ``events_clear`` (offset 4) clears those event bits (§5.7.4.1);
        QEMU writes the whole structure, whose other fields are read-only and ignored."""
        if offset > 4 or offset + len(data) < 8:
            return False
        clear = int.from_bytes(data[4 - offset:8 - offset], "little")
        self.events_read &= ~clear
        return True

    def vhost_user_requests(self) -> Mapping[int, Callable[[Message], bytes | int | None]]:
        """GPU_SET_SOCKET (33): QEMU's display socket (vhost-user.rst)."""
        return {Request.GPU_SET_SOCKET: self._set_socket}

    def _set_socket(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise VhostUserError(f"GPU_SET_SOCKET with {len(msg.fds)} fds, not 1")
        fd = msg.fds.pop()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise VhostUserError(f"GPU_SET_SOCKET: fd is not a socket: {exc}") from None
        if self.link is not None:
            self.link.close()
        assert self.host is not None
        self.link = DisplayLink(self.host, sock, self, self._link_lost)
        log.info("vhost-user-gpu: QEMU's display socket set")
        for scanout in self.scanouts:
            if scanout.resource is not None:
                self.link.scanout(scanout.index, scanout.rect.width, scanout.rect.height)
                self.link.damage(scanout.index, Rect(0, 0, scanout.rect.width,
                                                     scanout.rect.height))

    def start(self) -> None:
        """A new front-end (a new VM, or QEMU reconnecting): a fresh device, no resources."""
        super().start()
        self.resources.clear()
        self.scanouts = [Scanout(n) for n in range(self.config.outputs)]
        self.events_read = 0
        self.close()

    def _link_lost(self, link: DisplayLink) -> None:
        if self.link is link:
            self.link = None

    def close(self) -> None:
        """Close QEMU's display socket."""
        if self.link is not None:
            self.link.close()
            self.link = None

    # -- the scanouts as a frame source (display link, screenshots) -------------------------

    def scanout_size(self, scanout: int) -> tuple[int, int] | None:
        """A scanout's size, or None when it shows nothing."""
        if not 0 <= scanout < len(self.scanouts) or self.scanouts[scanout].resource is None:
            return None
        rect = self.scanouts[scanout].rect
        return rect.width, rect.height

    def scanout_pixels_into(self, scanout: int, rect: Rect, out: memoryview) -> None:
        """Copy ``rect`` of a scanout (scanout coordinates, inside it) into ``out`` as
        ``x8r8g8b8`` rows."""
        shown = self.scanouts[scanout]
        assert shown.resource is not None
        shown.resource.region_bgrx_into(
            Rect(shown.rect.x + rect.x, shown.rect.y + rect.y, rect.width, rect.height), out)

    def scanout_view(self, scanout: int, rect: Rect) -> memoryview | None:
        """``rect`` of a scanout as one view of its resource, when that is packed
        ``x8r8g8b8`` rows already (whole rows of a B8G8R8X8 or B8G8R8A8 resource)."""
        shown = self.scanouts[scanout]
        resource = shown.resource
        assert resource is not None
        if (resource.format not in (GpuFormat.B8G8R8X8_UNORM, GpuFormat.B8G8R8A8_UNORM)
                or shown.rect.x != 0 or rect.x != 0 or rect.width != resource.width):
            return None
        start = (shown.rect.y + rect.y) * resource.stride
        return memoryview(resource.pixels)[start:start + rect.height * resource.stride]

    def screenshot(self, scanout: int = 0) -> bytes:
        """A PNG of what the scanout shows.

        Raises:
            ValueError: no such scanout, or it shows nothing.
        """
        size = self.scanout_size(scanout)
        if size is None:
            raise ValueError(f"scanout {scanout} shows nothing")
        pixels = bytearray(size[0] * size[1] * 4)
        self.scanout_pixels_into(scanout, Rect(0, 0, *size), memoryview(pixels))
        return encode_png(size[0], size[1], bgrx_to_rgb(pixels), level=1)

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``screenshot PATH [SCANOUT]`` (``pyvirtio screenshot``)."""
        return {"screenshot": self._screenshot_command}

    def _screenshot_command(self, args: list[str], reply: ControlReply) -> None:
        """Write a PNG of a scanout to PATH (percent-encoded); answer its size."""
        if not 1 <= len(args) <= 2 or (len(args) == 2 and not args[1].isdigit()):
            reply({"ok": False, "error": "usage: screenshot PATH [SCANOUT]"})
            return
        path = Path(unquote(args[0]))
        scanout = int(args[1]) if len(args) == 2 else 0
        try:
            data = self.screenshot(scanout)
            path.write_bytes(data)
        except (OSError, ValueError) as exc:
            reply({"ok": False, "error": str(exc)})
            return
        width, height = self.scanout_size(scanout) or (0, 0)
        reply({"ok": True, "path": str(path), "scanout": scanout, "width": width,
               "height": height, "bytes": len(data)})

    # -- requests ----------------------------------------------------------------------------

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """One command (§5.7.6): carry it out, write its response header (and data)."""
        stats = self.stats[queue]
        reader = chain.reader()
        stats.bytes_out += chain.readable_len
        try:
            ctype, flags, fence_id, ctx_id, _ = reader.read_obj(CTRL_HDR)
        except RequestTooShort:
            ctype = flags = fence_id = ctx_id = 0
            response = CTRL_HDR.pack(CtrlType.RESP_ERR_UNSPEC, 0, 0, 0, 0)
            self._refused(queue, "short", "request shorter than its header")
        else:
            kind = _kind(ctype)
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            response = self._run(queue, ctype, reader)
            if flags & FLAG_FENCE:
                response = CTRL_HDR.pack(CTRL_HDR.unpack_from(response)[0], FLAG_FENCE,
                                         fence_id, ctx_id, 0) + response[CTRL_HDR.size:]
        if queue != CONTROLQ and chain.writable_len == 0:
            return 0
        writer = chain.writer()
        try:
            writer.write(response)
        except RequestTooShort:
            self._refused(queue, "no_room", f"no room for the {len(response)}-byte response")
            return 0
        stats.bytes_in += writer.written
        return writer.written

    def _run(self, queue: int, ctype: int, reader: ChainReader) -> bytes:
        command = self._commands.get(ctype)
        cursor = ctype in (CtrlType.CMD_UPDATE_CURSOR, CtrlType.CMD_MOVE_CURSOR)
        if command is None or cursor != (queue != CONTROLQ):
            self._refused(queue, "unsupported", f"command {ctype:#x} on queue {queue}")
            return _header(CtrlType.RESP_ERR_UNSPEC)
        try:
            return command(reader)
        except RequestTooShort as exc:
            self._refused(queue, "short", f"command {ctype:#x}: {exc}")
            return _header(CtrlType.RESP_ERR_UNSPEC)
        except GpuCommandError as exc:
            name = CtrlType(exc.response).name.removeprefix("RESP_ERR_").lower()
            self._refused(queue, name, f"command {ctype:#x}: {exc}")
            return _header(exc.response)

    def _refused(self, queue: int, kind: str, why: str) -> None:
        stats = self.stats[queue]
        stats.errors += 1
        key = f"err_{kind}"
        stats.kinds[key] = stats.kinds.get(key, 0) + 1
        log.debug("virtio-gpu queue %d: %s", queue, why)

    # -- controlq commands (§5.7.6.8) -----------------------------------------------------------

    def _get_display_info(self, reader: ChainReader) -> bytes:
        modes = bytearray()
        for n in range(MAX_SCANOUTS):
            if n < self.config.outputs:
                modes += DISPLAY_ONE.pack(0, 0, self.config.width, self.config.height, 1, 0)
            else:
                modes += bytes(DISPLAY_ONE.size)
        return _header(CtrlType.RESP_OK_DISPLAY_INFO) + bytes(modes)

    def _get_edid(self, reader: ChainReader) -> bytes:
        (scanout,) = reader.read_obj(GET_EDID)
        if scanout >= self.config.outputs:
            raise GpuCommandError(f"EDID of scanout {scanout}", _INVALID_PARAMETER)
        edid: bytes = self._edids[int(scanout)]
        return (_header(CtrlType.RESP_OK_EDID) + RESP_EDID.pack(len(edid))
                + edid.ljust(EDID_BLOB_SIZE, b"\0"))

    def _resource_create_2d(self, reader: ChainReader) -> bytes:
        resource_id, fmt, width, height = reader.read_obj(RESOURCE_CREATE_2D)
        self.resources.create(resource_id, fmt, width, height)
        return _header(CtrlType.RESP_OK_NODATA)

    def _resource_unref(self, reader: ChainReader) -> bytes:
        (resource_id,) = reader.read_obj(RESOURCE_ID)
        resource = self.resources.unref(resource_id)
        for index in sorted(resource.scanouts):
            self._disable(self.scanouts[index])
        return _header(CtrlType.RESP_OK_NODATA)

    def _disable(self, scanout: Scanout) -> None:
        if scanout.resource is not None:
            scanout.resource.scanouts.discard(scanout.index)
        scanout.resource = None
        scanout.rect = Rect(0, 0, 0, 0)
        if self.link is not None:
            self.link.scanout(scanout.index, 0, 0)

    def _set_scanout(self, reader: ChainReader) -> bytes:
        x, y, width, height, scanout_id, resource_id = reader.read_obj(SET_SCANOUT)
        if scanout_id >= len(self.scanouts):
            raise GpuCommandError(f"scanout {scanout_id}", CtrlType.RESP_ERR_INVALID_SCANOUT_ID)
        scanout = self.scanouts[scanout_id]
        if resource_id == 0:
            self._disable(scanout)
            return _header(CtrlType.RESP_OK_NODATA)
        resource = self.resources.get(resource_id)
        rect = Rect(x, y, width, height)
        if (not rect.inside(resource.width, resource.height) or width < MIN_SCANOUT_SIDE
                or height < MIN_SCANOUT_SIDE):
            raise GpuCommandError(f"scanout rectangle {rect} of the {resource.width}x"
                                  f"{resource.height} resource {resource_id}",
                                  _INVALID_PARAMETER)
        if scanout.resource is not None:
            scanout.resource.scanouts.discard(scanout_id)
        resized = (scanout.resource is None or (scanout.rect.width, scanout.rect.height)
                   != (width, height))
        scanout.resource, scanout.rect = resource, rect
        resource.scanouts.add(scanout_id)
        if self.link is not None:
            if resized:
                self.link.scanout(scanout_id, width, height)
            self.link.damage(scanout_id, Rect(0, 0, width, height))
        return _header(CtrlType.RESP_OK_NODATA)

    def _resource_flush(self, reader: ChainReader) -> bytes:
        x, y, width, height, resource_id = reader.read_obj(RESOURCE_FLUSH)
        resource = self.resources.get(resource_id)
        rect = Rect(x, y, width, height)
        if not rect.inside(resource.width, resource.height):
            raise GpuCommandError(f"flush rectangle {rect} of the {resource.width}x"
                                  f"{resource.height} resource {resource_id}",
                                  _INVALID_PARAMETER)
        self.flushes += 1
        for index in sorted(resource.scanouts):
            scanout = self.scanouts[index]
            shown = rect.intersect(scanout.rect)
            if shown is not None and self.link is not None:
                self.link.damage(index, Rect(shown.x - scanout.rect.x, shown.y - scanout.rect.y,
                                             shown.width, shown.height))
        if self.config.record is not None and self.flushes % self.config.record_every == 0:
            self._record()
        return _header(CtrlType.RESP_OK_NODATA)

    def _record(self) -> None:
        if self.scanout_size(0) is None or self.config.record is None:
            return
        path = self.config.record / f"frame-{self.flushes:08d}.png"
        try:
            path.write_bytes(self.screenshot(0))
        except OSError as exc:
            log.warning("--record: cannot write %s: %s", path, exc)
            return
        self.recorded += 1

    def _transfer_to_host_2d(self, reader: ChainReader) -> bytes:
        x, y, width, height, offset, resource_id = reader.read_obj(TRANSFER_TO_HOST_2D)
        resource = self.resources.get(resource_id)
        assert self.host is not None
        resource.transfer_to_host(self.host.memory, Rect(x, y, width, height), offset)
        return _header(CtrlType.RESP_OK_NODATA)

    def _attach_backing(self, reader: ChainReader) -> bytes:
        resource_id, count = reader.read_obj(RESOURCE_ATTACH_BACKING)
        resource = self.resources.get(resource_id)
        if resource.backing is not None:
            raise GpuCommandError(f"resource {resource_id} has a backing already",
                                  CtrlType.RESP_ERR_UNSPEC)
        if not 0 < count <= MAX_BACKING_ENTRIES:
            raise GpuCommandError(f"{count} backing entries (1..{MAX_BACKING_ENTRIES})",
                                  _INVALID_PARAMETER)
        raw = reader.read(count * MEM_ENTRY.size)
        entries = [(addr, length) for addr, length in MEM_ENTRY.iter_unpack(raw)]
        assert self.host is not None
        resource.backing = Backing(entries, self.host.memory)
        return _header(CtrlType.RESP_OK_NODATA)

    def _detach_backing(self, reader: ChainReader) -> bytes:
        (resource_id,) = reader.read_obj(RESOURCE_ID)
        resource = self.resources.get(resource_id)
        if resource.backing is None:
            raise GpuCommandError(f"resource {resource_id} has no backing",
                                  CtrlType.RESP_ERR_UNSPEC)
        resource.backing.release()
        resource.backing = None
        return _header(CtrlType.RESP_OK_NODATA)

    # -- cursorq (§5.7.6.10) --------------------------------------------------------------

    def _update_cursor(self, reader: ChainReader) -> bytes:
        return self._cursor(reader, update=True)

    def _move_cursor(self, reader: ChainReader) -> bytes:
        return self._cursor(reader, update=False)

    def _cursor(self, reader: ChainReader, *, update: bool) -> bytes:
        """UPDATE_CURSOR (a 64x64 resource, or 0 to hide it) or MOVE_CURSOR."""
        scanout, x, y, resource_id, hot_x, hot_y = reader.read_obj(UPDATE_CURSOR)
        if scanout >= len(self.scanouts):
            raise GpuCommandError(f"cursor on scanout {scanout}",
                                  CtrlType.RESP_ERR_INVALID_SCANOUT_ID)
        if not update:
            if self.link is not None:
                self.link.cursor(VuGpuRequest.CURSOR_POS, scanout, x, y)
            return _header(CtrlType.RESP_OK_NODATA)
        if resource_id == 0:
            if self.link is not None:
                self.link.cursor(VuGpuRequest.CURSOR_POS_HIDE, scanout, x, y)
            return _header(CtrlType.RESP_OK_NODATA)
        resource = self.resources.get(resource_id)
        if (resource.width, resource.height) != (CURSOR_SIZE, CURSOR_SIZE):
            raise GpuCommandError(f"cursor resource {resource_id} is {resource.width}x"
                                  f"{resource.height}, not 64x64", _INVALID_PARAMETER)
        if hot_x >= CURSOR_SIZE or hot_y >= CURSOR_SIZE:
            raise GpuCommandError(f"cursor hot spot {hot_x},{hot_y}", _INVALID_PARAMETER)
        if self.link is not None:
            pixels = bytes(resource.pixels)
            if resource.format != GpuFormat.B8G8R8A8_UNORM:
                pixels = resource.region_bgrx(Rect(0, 0, CURSOR_SIZE, CURSOR_SIZE))
            self.link.cursor(VuGpuRequest.CURSOR_UPDATE, scanout, x, y, (hot_x, hot_y, pixels))
        return _header(CtrlType.RESP_OK_NODATA)


def _header(ctype: int) -> bytes:
    return CTRL_HDR.pack(ctype, 0, 0, 0, 0)


def _kind(ctype: int) -> str:
    try:
        return CtrlType(ctype).name.removeprefix("CMD_").lower()
    except ValueError:
        return "unknown"

