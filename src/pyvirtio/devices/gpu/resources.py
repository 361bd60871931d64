"""virtio-gpu 2D resources and their guest backing (VIRTIO 1.4 §5.7.6.8), bounds-checked.

A resource is a host-side image (``width`` x ``height`` pixels of four bytes, one of
the formats of :class:`~pyvirtio.spec.gpu.GpuFormat`) that the driver fills from
its *backing*: a list of guest memory ranges (``struct virtio_gpu_mem_entry``)
attached with RESOURCE_ATTACH_BACKING and read by TRANSFER_TO_HOST_2D.

Everything here comes from the untrusted driver, and vhost-user-gpu back-ends have
a history of CVEs in exactly these places, so each value is checked before use:

- a resource's size against the dimension limit and the memory budget the whole
  device may spend on resources (``VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY``);
- a backing's entries: a bounded count, no empty entry, every byte inside guest
  memory (``ERR_UNSPEC``, as QEMU answers an unmappable entry) and no two
  entries overlapping (``ERR_INVALID_PARAMETER``: a resource's backing is its own
  pages);
- a transfer's rectangle inside the resource, and every byte it reads (offset,
  stride x rows) inside the backing; a flush's or scanout's rectangle inside the
  resource (``ERR_INVALID_PARAMETER``).

Python integers do not overflow, and every comparison is written so that no
product is formed from unchecked values beyond what the limits allow.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyvirtio.errors import GpuCommandError, GuestMemoryError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.gpu import BYTES_PER_PIXEL, CtrlType, GpuFormat

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "MAX_BACKING_ENTRIES",
    "MAX_DIMENSION",
    "Backing",
    "Rect",
    "Resource",
    "ResourceTable",
    "to_bgrx",
]

#: Bytes of resources the device holds at most by default (QEMU's ``max_hostmem``).
DEFAULT_MAX_MEMORY = 256 << 20
#: The widest or tallest resource accepted.
MAX_DIMENSION = 16384
#: Entries of one RESOURCE_ATTACH_BACKING at most (QEMU's limit, 64 MiB of 4 KiB pages).
MAX_BACKING_ENTRIES = 16384

_INVALID_PARAMETER = CtrlType.RESP_ERR_INVALID_PARAMETER
_INVALID_RESOURCE = CtrlType.RESP_ERR_INVALID_RESOURCE_ID

#: For each format, the byte of a pixel that holds blue, green and red.
_CHANNELS: dict[int, tuple[int, int, int]] = {
    GpuFormat.B8G8R8A8_UNORM: (0, 1, 2),
    GpuFormat.B8G8R8X8_UNORM: (0, 1, 2),
    GpuFormat.A8R8G8B8_UNORM: (3, 2, 1),
    GpuFormat.X8R8G8B8_UNORM: (3, 2, 1),
    GpuFormat.R8G8B8A8_UNORM: (2, 1, 0),
    GpuFormat.X8B8G8R8_UNORM: (1, 2, 3),
    GpuFormat.A8B8G8R8_UNORM: (1, 2, 3),
    GpuFormat.R8G8B8X8_UNORM: (2, 1, 0),
}


def to_bgrx(pixels: bytes | bytearray | memoryview, fmt: int) -> bytes:
    """``pixels`` of format ``fmt`` as blue, green, red, 0xFF: QEMU's ``x8r8g8b8``."""
    blue, green, red = _CHANNELS[fmt]
    if (blue, green, red) == (0, 1, 2):
        return bytes(pixels)
    out = bytearray(b"\xff" * len(pixels))
    out[0::4] = pixels[blue::4]
    out[1::4] = pixels[green::4]
    out[2::4] = pixels[red::4]
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Rect:
    """``struct virtio_gpu_rect``: ``x``, ``y``, ``width``, ``height`` (each a le32)."""

    x: int
    y: int
    width: int
    height: int

    def inside(self, width: int, height: int) -> bool:
        """Whether the rectangle lies within a ``width`` x ``height`` image."""
        return self.x <= width and self.width <= width - self.x \
            and self.y <= height and self.height <= height - self.y

    @property
    def empty(self) -> bool:
        """No pixel in it."""
        return self.width == 0 or self.height == 0

    def intersect(self, other: Rect) -> Rect | None:
        """The common part of two rectangles, or None."""
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        if x1 <= x0 or y1 <= y0:
            return None
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def union(self, other: Rect) -> Rect:
        """The smallest rectangle holding both."""
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1 = max(self.x + self.width, other.x + other.width)
        y1 = max(self.y + self.height, other.y + other.height)
        return Rect(x0, y0, x1 - x0, y1 - y0)


class Backing:
    """A resource's backing store: guest memory ranges seen as one run of bytes.

    Args:
        entries: ``(guest address, length)`` pairs, in the driver's order.
        memory: guest memory, to check that every byte is there.

    Raises:
        GpuCommandError: an entry is empty (INVALID_PARAMETER), outside guest memory
            (UNSPEC), or overlaps another (INVALID_PARAMETER).
    """

    def __init__(self, entries: list[tuple[int, int]], memory: GuestMemory) -> None:
        for addr, length in entries:
            if length == 0:
                raise GpuCommandError(f"backing entry at {addr:#x} is empty", _INVALID_PARAMETER)
        ordered = sorted(entries)
        for (a_addr, a_len), (b_addr, _) in itertools.pairwise(ordered):
            if b_addr < a_addr + a_len:
                raise GpuCommandError(
                    f"backing entries at {a_addr:#x}+{a_len:#x} and {b_addr:#x} overlap",
                    _INVALID_PARAMETER)
        self.entries = entries
        self.size = sum(length for _, length in entries)
        self._generation = -1
        self._views: list[memoryview] = []
        self._starts: list[int] = []
        self._resolve(memory)

    def _resolve(self, memory: GuestMemory) -> None:
        """Translate the entries into views (again, after the memory table changed)."""
        if self._generation == memory.generation:
            return
        views: list[memoryview] = []
        try:
            for addr, length in self.entries:
                memory.slices(addr, length, views)
        except GuestMemoryError as exc:
            self._views, self._starts = [], []
            raise GpuCommandError(f"backing outside guest memory: {exc}",
                                  CtrlType.RESP_ERR_UNSPEC) from None
        starts, at = [], 0
        for view in views:
            starts.append(at)
            at += len(view)
        self._views, self._starts = views, starts
        self._generation = memory.generation

    def release(self) -> None:
        """Drop the views (the resource lets go of its backing)."""
        self._views, self._starts = [], []
        self._generation = -1

    def copy_out(self, memory: GuestMemory, offset: int, dest: memoryview) -> None:
        """Copy ``len(dest)`` bytes of the backing, from ``offset``, into ``dest``.

        Raises:
            GpuCommandError: the range is not inside the backing (INVALID_PARAMETER),
                or the backing is no longer in guest memory (UNSPEC).
        """
        need = len(dest)
        if offset > self.size or need > self.size - offset:
            raise GpuCommandError(
                f"transfer reads {need} bytes at backing offset {offset}, the backing has "
                f"{self.size}", _INVALID_PARAMETER)
        self._resolve(memory)
        views, starts = self._views, self._starts
        i = bisect.bisect_right(starts, offset) - 1
        done = 0
        while done < need:
            view = views[i]
            start = offset + done - starts[i]
            take = min(len(view) - start, need - done)
            dest[done:done + take] = view[start:start + take]
            done += take
            i += 1


@dataclass(eq=False, slots=True)
class Resource:
    """A 2D resource (§5.7.6.8 RESOURCE_CREATE_2D): its pixels live on the host.

    Attributes:
        resource_id: the driver's id (never 0).
        format: a :class:`GpuFormat`.
        width, height: in pixels.
        pixels: ``height`` rows of ``stride`` bytes.
        backing: the attached guest memory, if any.
        scanouts: the scanouts that show this resource.
    """

    resource_id: int
    format: int
    width: int
    height: int
    pixels: bytearray
    backing: Backing | None = None
    scanouts: set[int] = field(default_factory=set)

    @property
    def stride(self) -> int:
        """Bytes per row."""
        return self.width * BYTES_PER_PIXEL

    def transfer_to_host(self, memory: GuestMemory, rect: Rect, offset: int) -> int:
        """TRANSFER_TO_HOST_2D: copy ``rect`` from the backing; return the bytes copied.

        Row ``n`` of the rectangle is read at ``offset + n * stride`` in the backing
        and lands at ``(rect.y + n) * stride + rect.x * 4`` in the resource (the
        layout QEMU and Linux use).

        Raises:
            GpuCommandError: no backing (UNSPEC), a rectangle outside the resource or
                a read outside the backing (INVALID_PARAMETER).
        """
        if not rect.inside(self.width, self.height):
            raise GpuCommandError(f"transfer rectangle {rect} outside the {self.width}x"
                                  f"{self.height} resource {self.resource_id}",
                                  _INVALID_PARAMETER)
        if self.backing is None:
            raise GpuCommandError(f"resource {self.resource_id} has no backing",
                                  CtrlType.RESP_ERR_UNSPEC)
        if rect.empty:
            return 0
        stride = self.stride
        row = rect.width * BYTES_PER_PIXEL
        last = offset + stride * (rect.height - 1) + row
        if last > self.backing.size:
            raise GpuCommandError(
                f"transfer of {rect} from offset {offset} ends at {last}, past the "
                f"{self.backing.size}-byte backing", _INVALID_PARAMETER)
        pixels = memoryview(self.pixels)
        first = rect.y * stride + rect.x * BYTES_PER_PIXEL
        if rect.x == 0 and rect.width == self.width:
            self.backing.copy_out(memory, offset, pixels[first:first + stride * rect.height])
        else:
            for n in range(rect.height):
                at = first + n * stride
                self.backing.copy_out(memory, offset + n * stride, pixels[at:at + row])
        return row * rect.height

    def region_bgrx(self, rect: Rect) -> bytes:
        """The pixels of ``rect`` (inside the resource), rows packed, as ``x8r8g8b8``."""
        out = bytearray(rect.width * rect.height * BYTES_PER_PIXEL)
        self.region_bgrx_into(rect, memoryview(out))
        return bytes(out)

    def region_bgrx_into(self, rect: Rect, out: memoryview) -> None:
        """Copy the pixels of ``rect`` (inside the resource) into ``out`` (exactly their
        size), rows packed, as ``x8r8g8b8``: one copy for the formats Linux uses."""
        stride = self.stride
        row = rect.width * BYTES_PER_PIXEL
        first = rect.y * stride + rect.x * BYTES_PER_PIXEL
        view = memoryview(self.pixels)
        if rect.x == 0 and rect.width == self.width:
            out[:] = view[first:first + stride * rect.height]
        else:
            for n in range(rect.height):
                at = first + n * stride
                out[n * row:(n + 1) * row] = view[at:at + row]
        if _CHANNELS[self.format] != (0, 1, 2):
            out[:] = to_bgrx(out, self.format)


class ResourceTable:
    """The resources by id, with a budget of host memory for all of them.

    Args:
        max_memory: bytes of pixels all resources may hold together.
    """

    def __init__(self, max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        self.max_memory = max_memory
        self.used = 0
        self._by_id: dict[int, Resource] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._by_id.values())

    def get(self, resource_id: int) -> Resource:
        """The resource ``resource_id``.

        Raises:
            GpuCommandError: there is none (INVALID_RESOURCE_ID).
        """
        resource = self._by_id.get(resource_id)
        if resource is None:
            raise GpuCommandError(f"no resource {resource_id}", _INVALID_RESOURCE)
        return resource

    def create(self, resource_id: int, fmt: int, width: int, height: int) -> Resource:
        """RESOURCE_CREATE_2D.

        Raises:
            GpuCommandError: id 0 or in use (INVALID_RESOURCE_ID), an unknown format or
                an empty or too large size (INVALID_PARAMETER), over the memory budget
                (OUT_OF_MEMORY).
        """
        if resource_id == 0 or resource_id in self._by_id:
            raise GpuCommandError(f"resource id {resource_id} is 0 or in use",
                                  _INVALID_RESOURCE)
        if fmt not in _CHANNELS:
            raise GpuCommandError(f"unknown format {fmt}", _INVALID_PARAMETER)
        if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
            raise GpuCommandError(f"size {width}x{height}: 1..{MAX_DIMENSION} each",
                                  _INVALID_PARAMETER)
        size = width * height * BYTES_PER_PIXEL
        if size > self.max_memory - self.used:
            raise GpuCommandError(
                f"{width}x{height} needs {size} bytes; {self.max_memory - self.used} of "
                f"{self.max_memory} left", CtrlType.RESP_ERR_OUT_OF_MEMORY)
        resource = Resource(resource_id, fmt, width, height, bytearray(size))
        self._by_id[resource_id] = resource
        self.used += size
        return resource

    def unref(self, resource_id: int) -> Resource:
        """RESOURCE_UNREF: forget the resource (the caller takes it off its scanouts).

        Raises:
            GpuCommandError: there is none (INVALID_RESOURCE_ID).
        """
        resource = self.get(resource_id)
        del self._by_id[resource_id]
        self.used -= len(resource.pixels)
        if resource.backing is not None:
            resource.backing.release()
            resource.backing = None
        return resource

    def clear(self) -> None:
        """Forget every resource (a device reset)."""
        for resource in self._by_id.values():
            if resource.backing is not None:
                resource.backing.release()
        self._by_id.clear()
        self.used = 0
